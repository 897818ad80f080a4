"""`fleetrec suite SUITE.yaml`: the fair-comparison protocol as one verb (format: suites/README.md).

Length: the YAML schema, the loader that turns each method into its two sweeps, and the stage
runner are one protocol; the report and its statistics live in suite_report.py.

For every method of the suite (an experiment config plus a search space):

1. **tune** on validation with the same budget for every method -- `budget.trials` trials of at
   most `budget.rounds` rounds, ASHA, the same search algorithm and seed -- through `fleetrec tune`
   (one sweep per method, `<storage_path>/<suite>/tune/<method>`);
2. **seeds**: rerun the best configuration on `final.seeds` with early stopping on validation
   (`final.rounds` high, `final.early_stop_patience`), again as a Tune sweep (a grid over `seed`),
   every run with `eval.per_user` where the reported metrics are ranking metrics;
3. **report** (suite_report.py): test metrics mean ± std, how many best rounds sit at the round
   cap, and paired tests against the `reference` method -- Wilcoxon signed-rank over seeds and,
   for ranking metrics, a paired bootstrap over users -- as Markdown, CSV, JSON (with the
   commands, budget, seeds and machine) and a figure in `results_dir`, and as an MLflow run.

Each finished stage leaves a small JSON (`tune.json`, `seeds.json`) holding a fingerprint of what
produced it, so `--resume` skips finished stages, continues an interrupted sweep, and refuses a
suite that changed under a finished stage. Every stage leaves `<stage>.started.json` (its
fingerprint) beside its Tune folder, so `--resume` refuses to restore a folder whose sweep has changed
since, or that has no marker: Tune would hand the old trials back as the new stage's runs.
`seeds.json` also holds every seed run's test metrics
(and, for ranking metrics, `per_user/seed<k>.csv.gz` beside it), so the report needs neither MLflow
nor the Tune folders: a suite's state folder can be committed and continued on another machine.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from fleetrec.simulator.config import RANKING_METRIC
from fleetrec.simulator.config_loader import ConfigError, apply_overrides, build, read_yaml, to_dict
from fleetrec.simulator.suite_report import rel as _rel, record_seed_runs, write_report
from fleetrec.simulator.tune_space import REPO_ROOT, Sweep, load_sweep, resolve_config


# ------------------------------------------------------------------------------ the YAML schema
@dataclass(frozen=True)
class BudgetConfig:
    """The tuning budget, the same for every method."""
    trials: int = 8                    # trials per method
    rounds: int = 40                   # at most this many rounds per trial (ASHA's max_t)
    early_stop_patience: int = 5       # evaluations without improvement before a trial stops by itself
    grace_period: int = 5              # ASHA: rounds before a trial may be stopped
    reduction_factor: float = 2.0      # ASHA: keep the best 1/reduction_factor at every rung
    search_alg: str = "random"         # random | optuna | hyperopt (the last two when installed)
    seed: int = 0                      # seed of the search algorithm (same for every method)
    max_concurrent_trials: int | None = None
    include_config: bool = True        # the method's own config values are the first trial (counted in trials),
                                       # so tuning can only end above the untuned method on validation

    CHECKS: ClassVar[dict] = {"trials": ">=1", "rounds": ">=1", "early_stop_patience": ">=0", "grace_period": ">=1",
                              "reduction_factor": ">1", "search_alg": ("random", "optuna", "hyperopt")}


@dataclass(frozen=True)
class FinalConfig:
    """The seed runs of each method's best configuration."""
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4, 5)
    rounds: int = 200                  # cap; the report counts best rounds that sit at it
    early_stop_patience: int = 10

    CHECKS: ClassVar[dict] = {"rounds": ">=1", "early_stop_patience": ">=1"}

    def validate(self) -> str | None:
        if len(self.seeds) < 2 or len(set(self.seeds)) != len(self.seeds):
            return f"final.seeds: expected at least two distinct seeds, got {list(self.seeds)}"
        return None


@dataclass(frozen=True)
class TestsConfig:
    alpha: float = 0.05                # significance level of the verdicts
    bootstrap_samples: int = 2000      # paired bootstrap over users (ranking metrics); 0 = off
    seed: int = 0                      # of the bootstrap resampling

    CHECKS: ClassVar[dict] = {"alpha": "0..0.5", "bootstrap_samples": ">=0"}


@dataclass(frozen=True)
class MethodConfig:
    config: str = ""                   # experiment YAML: relative to the suite file, else to the repo root
    overrides: tuple[str, ...] = ()    # key.path=value on top of the suite's overrides
    space: Any = None                  # as in a tune space: dotted path -> {choice|loguniform|...: ...}
    label: str | None = None           # name in the table (default: the method's key)
    tuned_as: str | None = None        # an ablation: no tune stage, its seed runs use that method's tuned values


@dataclass(frozen=True)
class PretrainStageConfig:
    """A backbone every FedPA-style method of the suite shares: stage 1 (`fleetrec pretrain`) of
    `config` runs once before any method, into <storage_path>/<name>/pretrain/backbone.pt, which
    method overrides name as `{backbone}` (e.g. `model.backbone={backbone}`)."""
    config: str = ""                   # experiment YAML whose model.pretrain block is run
    overrides: tuple[str, ...] = ()    # on top of the suite's overrides (and the command line's)


@dataclass(frozen=True)
class SuiteConfig:
    name: str | None = None            # default: the file's stem
    reference: str = ""                # the method every other one is tested against
    metric: str = "val/recall@20"      # tuning and early-stopping metric (validation)
    mode: str = "max"
    report: tuple[str, ...] = ("recall@20", "ndcg@20")   # test metrics of the table (test/<name>)
    overrides: tuple[str, ...] = ()    # key.path=value applied to every method's config
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    final: FinalConfig = field(default_factory=FinalConfig)
    tests: TestsConfig = field(default_factory=TestsConfig)
    storage_path: str = "suite_results"   # working state: <storage_path>/<name>/ (relative to the working dir)
    results_dir: str = "suite_results"    # table, CSV, JSON and figure (relative to the working dir)
    tracking_uri: str | None = None    # MLflow store; null = the method configs' (made absolute)
    experiment: str | None = None      # MLflow experiment; null = the method configs'
    methods: Any = None                # method key -> MethodConfig
    pretrain: Any = None               # PretrainStageConfig: one shared stage-1 backbone, `{backbone}` in overrides

    CHECKS: ClassVar[dict] = {"mode": ("max", "min")}

    def validate(self) -> str | None:
        if not self.metric.startswith("val/"):
            return f"metric: got {self.metric!r}, expected a validation metric val/<name> (e.g. val/recall@20)"
        if not self.report:
            return "report: expected at least one test metric, e.g. [recall@20, ndcg@20]"
        return None


# ------------------------------------------------------------------------------ the loaded suite
@dataclass
class Method:
    key: str
    label: str
    cfg: MethodConfig
    config_path: Path
    tune_yaml: dict                    # the tune-space YAML of stage 1
    seeds_yaml: dict | None = None     # of stage 2, once the best values are known


@dataclass
class PretrainStage:
    config_path: Path
    overrides: tuple[str, ...]         # every override of stage 1, in order
    backbone: str                      # the file, as methods' overrides name it (relative to the working dir)


@dataclass
class Suite:
    cfg: SuiteConfig
    source: Path
    name: str
    methods: dict[str, Method]
    cli_overrides: tuple[str, ...]
    per_user: bool                     # every reported metric is a ranking metric: bootstrap over users
    all_overrides: tuple[str, ...] = ()   # every command-line override, suite.* included (for the command)
    tracking_uri: str = ""             # MLflow store of every run (absolute)
    experiment: str = ""
    pretrain: PretrainStage | None = None

    @property
    def dir(self) -> Path:
        return Path(self.cfg.storage_path).expanduser().resolve() / self.name

    @property
    def results_dir(self) -> Path:
        return Path(self.cfg.results_dir).expanduser().resolve()

    def method_dir(self, key: str) -> Path:
        return self.dir / key

    def command(self) -> str:
        return " ".join(["fleetrec", "suite", shlex.quote(_rel(self.source))]
                        + [shlex.quote(o) for o in self.all_overrides])


def _yaml_value(v) -> str:
    """A value as override text that the loader parses back to the same value."""
    return json.dumps(v) if isinstance(v, (list, tuple, dict, str, bool)) or v is None else repr(v)


def load_suite(path: str | Path, overrides: list[str] = ()) -> Suite:
    """Read and validate a suite YAML. `overrides`: `suite.<key>=value` edits the suite itself
    (e.g. suite.budget.trials=2), every other key.path=value applies to every method's config."""
    source = Path(path)
    raw = read_yaml(source)
    suite_over = [o[len("suite."):] for o in overrides if o.startswith("suite.")]
    method_over = [o for o in overrides if not o.startswith("suite.")]
    try:
        raw = apply_overrides(raw, suite_over)
    except ConfigError as e:
        raise ConfigError(f"command line: {e}") from None
    try:
        sc: SuiteConfig = build(SuiteConfig, raw)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    if not isinstance(sc.methods, dict) or len(sc.methods) < 2:
        raise ConfigError(f"{source}: methods: expected a mapping of at least two method names to "
                          "{config, overrides, space}")
    if sc.reference not in sc.methods:
        raise ConfigError(f"{source}: reference: got {sc.reference!r}, expected one of the methods: "
                          f"{', '.join(map(str, sc.methods))}")
    per_user = all(RANKING_METRIC.fullmatch(m) for m in sc.report)
    name = sc.name or source.stem
    pre, sub = _pretrain_stage(sc, source, name, method_over)
    sc = dataclasses.replace(sc, overrides=sub(sc.overrides, "overrides"))
    methods = {}
    for key, entry in sc.methods.items():
        try:
            mc: MethodConfig = build(MethodConfig, entry, f"methods.{key}")
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        mc = dataclasses.replace(mc, overrides=sub(mc.overrides, f"methods.{key}.overrides"))
        if not mc.config:
            raise ConfigError(f"{source}: methods.{key}.config: expected the method's experiment YAML")
        if mc.tuned_as is not None:
            other = sc.methods.get(mc.tuned_as)
            if mc.tuned_as == key or not isinstance(other, dict) or not other.get("space") or other.get("tuned_as"):
                raise ConfigError(f"{source}: methods.{key}.tuned_as: got {mc.tuned_as!r}, expected another method "
                                  "of this suite that has a space of its own")
            if mc.space:
                raise ConfigError(f"{source}: methods.{key}: give either a space or tuned_as, not both")
        cpath = resolve_config(mc.config, source, f"methods.{key}.config")
        b = sc.budget
        tune_yaml = {
            "base": str(cpath), "metric": sc.metric, "mode": sc.mode, "num_samples": b.trials,
            "search_alg": b.search_alg, "seed": b.seed,
            "overrides": [*sc.overrides, *mc.overrides, f"rounds={b.rounds}",
                          f"early_stop_patience={b.early_stop_patience}", "tracking.mlflow=true"],
            "scheduler": {"name": "asha", "grace_period": min(b.grace_period, b.rounds),
                          "reduction_factor": b.reduction_factor},
            "max_concurrent_trials": b.max_concurrent_trials, "max_failures": 1,
            "space": mc.space or {},
        }
        for k in ("tracking_uri", "experiment"):
            if getattr(sc, k):
                tune_yaml[k] = getattr(sc, k)
        methods[str(key)] = Method(str(key), mc.label or str(key), mc, cpath, tune_yaml)
    suite = Suite(sc, source.resolve(), name, methods, tuple(method_over), per_user,
                  all_overrides=tuple(overrides), pretrain=pre)
    stores = set()
    for m in methods.values():                 # every method's sweeps must load: paths, metric, end points
        sw = _sweep(suite, m, "tune", check=True)
        if sc.budget.include_config and m.tune_yaml["space"]:
            tree = to_dict(sw.base_cfg)
            m.tune_yaml["points_to_evaluate"] = [{k: _lookup(tree, k) for k in m.tune_yaml["space"]}]
            sw = _sweep(suite, m, "tune", check=True)
        _sweep(suite, m, "seeds", values={}, check=True)
        stores.add((sw.tracking_uri, sw.experiment))
    if len(stores) > 1:
        raise ConfigError(f"{source}: the methods' configs log to different MLflow stores or experiments "
                          f"({sorted(stores)}); set tracking_uri / experiment in the suite")
    suite.tracking_uri, suite.experiment = stores.pop()
    return suite


BACKBONE = "{backbone}"


def _pretrain_stage(sc: SuiteConfig, source: Path, name: str, method_over: list[str]):
    """The suite's shared stage 1 (or None) and the function that puts its file in for `{backbone}`."""
    if sc.pretrain is None:
        def keep(overrides, where):
            if any(BACKBONE in o for o in overrides):
                raise ConfigError(f"{source}: {where}: {BACKBONE} names the suite's pre-trained backbone, but the "
                                  "suite has no pretrain block (pretrain: {config: ..., overrides: [...]})")
            return tuple(overrides)
        return None, keep
    try:
        pc: PretrainStageConfig = build(PretrainStageConfig, sc.pretrain, "pretrain")
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    if not pc.config:
        raise ConfigError(f"{source}: pretrain.config: expected the experiment YAML whose stage 1 the methods share")
    backbone = str(Path(sc.storage_path) / name / "pretrain" / "backbone.pt")
    track = ["tracking.mlflow=true", *(f"tracking.{k}={getattr(sc, k)}" for k in ("tracking_uri", "experiment")
                                       if getattr(sc, k))]
    stage = PretrainStage(resolve_config(pc.config, source, "pretrain.config"),
                          (*sc.overrides, *pc.overrides, *method_over, *track), backbone)
    from fleetrec.simulator.pretrain import _fedpa_model
    try:
        _fedpa_model(_pretrain_cfg(stage))                 # the config loads and has a FedPA model
    except ConfigError as e:
        raise ConfigError(f"{source}: pretrain ({_rel(stage.config_path)}): "
                          f"{str(e).removeprefix(str(stage.config_path) + ': ')}") from None
    return stage, lambda overrides, where: tuple(o.replace(BACKBONE, backbone) for o in overrides)


def _pretrain_cfg(stage: PretrainStage):
    from fleetrec.simulator.config import load
    return load(str(stage.config_path), [*stage.overrides, "model.backbone="])


def run_pretrain(suite: Suite, log) -> dict | None:
    """Stage 1 of the suite's shared backbone, unless its record and file are there already.
    A record made from another config or overrides is refused, as a finished stage's is."""
    stage = suite.pretrain
    if stage is None:
        return None
    from fleetrec.simulator.pretrain import pretrain
    from fleetrec.algorithms.models.fedpa import load_backbone
    out, done = Path(stage.backbone), suite.dir / "pretrain" / "pretrain.json"
    data = apply_overrides(read_yaml(stage.config_path), [o for o in stage.overrides if not o.startswith("tracking.")])
    fp = _sha16(json.dumps({"config": _portable(str(stage.config_path)), "data": data}, sort_keys=True, default=str))
    if done.is_file():
        rec = json.loads(done.read_text())
        if rec.get("fingerprint") != fp:
            raise ConfigError(f"{done}: the suite's backbone was pre-trained with a different config or overrides "
                              f"(fingerprint {rec.get('fingerprint')} vs {fp}); remove {suite.dir} to redo the suite, "
                              "or give the suite another name")
        if out.is_file() and _digest(out) == rec.get("sha256"):
            log(f"pretrain: done before ({out})")
            return rec
        log(f"pretrain: {out} is missing or changed; pre-training it again")
    log(f"pretrain: stage 1 of {_rel(stage.config_path)} into {out}")
    path = pretrain(_pretrain_cfg(stage), out)
    _, meta = load_backbone(path)
    rec = {"fingerprint": fp, "sha256": _digest(path), "backbone": stage.backbone, "meta": meta,
           "command": f"fleetrec pretrain {_rel(stage.config_path)} model.backbone={stage.backbone}"
                      + "".join(f" {shlex.quote(o)}" for o in stage.overrides)}
    done.parent.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps(rec, indent=1, default=str))
    return rec


def _digest(path: Path) -> str:
    return _sha16(Path(path).read_bytes())


def _sha16(blob: str | bytes) -> str:
    """The 16-hex-digit SHA-256 every suite record uses (stage fingerprints, the backbone's digest)."""
    return hashlib.sha256(blob.encode() if isinstance(blob, str) else blob).hexdigest()[:16]


def _lookup(tree: dict, dotted: str):
    node = tree
    for part in dotted.split("."):
        node = node[part]
    return list(node) if isinstance(node, tuple) else node


def _seeds_yaml(suite: Suite, m: Method, values: dict) -> dict:
    f = suite.cfg.final
    y = dict(m.tune_yaml)
    y.update(num_samples=1, search_alg="grid", scheduler="none", max_concurrent_trials=suite.cfg.budget.max_concurrent_trials,
             space={"seed": {"grid": list(f.seeds)}})
    y.pop("points_to_evaluate", None)
    y["overrides"] = [*suite.cfg.overrides, *m.cfg.overrides,
                      *(f"{k}={_yaml_value(v)}" for k, v in values.items()),
                      f"rounds={f.rounds}", f"early_stop_patience={f.early_stop_patience}", "tracking.mlflow=true",
                      *(["eval.per_user=true"] if suite.per_user else [])]
    return y


def _sweep(suite: Suite, m: Method, stage: str, values: dict | None = None, check: bool = False) -> Sweep:
    """The stage's sweep: its YAML written to <suite dir>/<method>/<stage>.yaml (a temp file for checks)."""
    y = m.tune_yaml if stage == "tune" else _seeds_yaml(suite, m, values or {})
    if stage == "tune" and not y["space"]:
        y = {**y, "num_samples": 1, "search_alg": "grid", "scheduler": "none",
             "space": {"seed": {"grid": [suite.cfg.final.seeds[0]]}}}     # nothing to search: one trial
    text = f"# {stage} stage of method {m.key} of suite {suite.name} (written by fleetrec suite)\n" + \
        yaml.safe_dump(y, sort_keys=False)
    name = f"{suite.name}.{m.key}.{stage}"                   # the Tune experiment and MLflow parent run
    if check:
        extra = []           # a backbone that stage 1 has not written yet: check the rest with a random init
        if suite.pretrain and not Path(suite.pretrain.backbone).is_file() and \
                any(o.startswith("model.backbone=") and suite.pretrain.backbone in o for o in y["overrides"]):
            extra = ["model.backbone="]
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / f"{stage}.yaml"
            p.write_text(text)
            try:
                return load_sweep(p, [*suite.cli_overrides, *extra], name=name, storage_path=str(suite.dir))
            except ConfigError as e:
                raise ConfigError(f"{suite.source}: methods.{m.key} ({stage} stage): "
                                  f"{str(e).removeprefix(str(p) + ': ')}") from None
    d = suite.method_dir(m.key)
    d.mkdir(parents=True, exist_ok=True)
    p = d / f"{stage}.yaml"
    p.write_text(text)
    return load_sweep(p, list(suite.cli_overrides), name=name, storage_path=str(suite.dir))


FINGERPRINT_VERSION = 4


def _portable(path: str) -> str:
    """A config path inside the repository, relative to its root (so a fingerprint holds on any checkout)."""
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return path


def fingerprint(sweep: Sweep, version: int = FINGERPRINT_VERSION) -> str:
    """What a stage's result depends on: the base config data with every override, and the sweep
    YAML as written, its `base` relative to the repository. v4 leaves out where the runs are logged
    (the config's `tracking` block, the sweep's `tracking_uri` / `experiment`): the loader makes the
    tracking URI absolute, so v3 records hold only on the checkout that wrote them. v3 and v2 (the
    absolute `base` path) and v1 (records without a version: the sweep config with every default)
    still check."""
    if version == 1:
        cfg = {k: v for k, v in to_dict(sweep.cfg).items() if k != "points_to_evaluate"}
        blob = json.dumps({"base": sweep.base_data, "sweep": cfg}, sort_keys=True, default=str)
    else:
        y, base = read_yaml(sweep.source), sweep.base_data
        if version >= 3 and isinstance(y.get("base"), str):
            y = {**y, "base": _portable(y["base"])}
        if version >= 4:
            y = {k: v for k, v in y.items() if k not in ("tracking_uri", "experiment")}
            base = {k: v for k, v in base.items() if k != "tracking"}
        blob = json.dumps({"base": base, "sweep": y}, sort_keys=True, default=str)
    return _sha16(blob)


# ------------------------------------------------------------------------------ the stages
def _stage(suite: Suite, m: Method, stage: str, sweep: Sweep, resume: bool, log) -> dict:
    """Run (or skip, or resume) one stage of one method; returns its JSON record."""
    from ray import tune
    from fleetrec.simulator.tune import tune_sweep
    done = suite.method_dir(m.key) / f"{stage}.json"
    fp = fingerprint(sweep)
    if done.is_file():
        rec = json.loads(done.read_text())
        fp = fingerprint(sweep, rec.get("fingerprint_version", 1))
        if rec.get("fingerprint") != fp:
            raise ConfigError(f"{done}: the {stage} stage of {m.key} was run with a different suite or overrides "
                              f"(fingerprint {rec.get('fingerprint')} vs {fp}); remove {suite.method_dir(m.key)} "
                              "to redo the method, or give the suite another name")
        log(f"{m.key}: {stage} stage done before ({done})")
        return rec
    again = sweep.exp_dir.exists()
    started = suite.method_dir(m.key) / f"{stage}.started.json"     # which sweep the Tune folder runs or ran
    if again and not resume:
        raise ConfigError(f"{sweep.exp_dir} exists from an earlier, unfinished suite: pass --resume to continue it")
    if again and not tune.Tuner.can_restore(str(sweep.exp_dir)):
        raise ConfigError(f"{sweep.exp_dir}: an interrupted {stage} stage that Tune cannot restore; remove that "
                          "folder and run again with --resume")
    if again and not started.is_file():     # e.g. a finished stage's record removed to run it again
        raise ConfigError(f"{sweep.exp_dir}: a Tune folder with no record of which sweep it ran ({started.name} is "
                          f"missing); Tune would hand its old trials back as this stage's runs: remove that folder "
                          "to run the stage again")
    then = json.loads(started.read_text()).get("fingerprint") if again else fp
    if then != fp:           # Tune would restore the old sweep's trials and search space as this stage's runs
        raise ConfigError(f"{sweep.exp_dir}: the interrupted {stage} stage of {m.key} was started with a different "
                          f"suite or overrides (fingerprint {then} vs {fp}); remove that folder to start the stage "
                          "again with --resume")
    if not again:
        started.write_text(json.dumps({"fingerprint": fp, "fingerprint_version": FINGERPRINT_VERSION}))
    log(f"{m.key}: {stage} stage ({'resumed' if again else 'started'}): {sweep.cfg.num_samples} trial(s), "
        f"{sweep.base_cfg.rounds} rounds at most")
    t0 = time.time()
    res = tune_sweep(sweep, resume=again, verbose=0)
    rec = {"fingerprint": fp, "fingerprint_version": FINGERPRINT_VERSION, "parent_run_id": res.parent_run_id,
           "wall_s": round(time.time() - t0, 1), "resumed": again,        # this sitting's time only when resumed
           "best": res.best.get("config", {}),
           "best_value": res.best.get("best"), "trials": len(res.trials),
           "stopped_early": sum(t["error"] is None and t["rounds_run"] < sweep.base_cfg.rounds for t in res.trials),
           "errored": sum(t["error"] is not None for t in res.trials),
           "command": f"fleetrec tune {_rel(sweep.source)}" + "".join(f" {shlex.quote(o)}" for o in suite.cli_overrides)}
    if stage == "tune" and not m.tune_yaml["space"]:
        rec["best"] = {}                                   # the one trial only checked that the config runs
    if stage == "seeds":                                   # the record alone is enough for the report
        rec["runs"] = record_seed_runs(suite, suite.method_dir(m.key), res.parent_run_id)
    done.write_text(json.dumps(rec, indent=1, default=str))
    return rec                       # the marker stays: it says what the Tune folder beside it ran


def run_suite(suite: Suite, resume: bool = False, only: list[str] = (), report_only: bool = False,
              log=lambda s: print(s, file=sys.stderr)) -> str:
    """Run the stages that are not done yet for every method (or `only` those), then the report."""
    bad = [k for k in only if k not in suite.methods]
    if bad:
        raise ConfigError(f"--only: {bad[0]!r} is not a method of {suite.source}; methods: {', '.join(suite.methods)}")
    if suite.dir.exists() and not resume and not report_only and not only:
        raise ConfigError(f"{suite.dir} already exists: pass --resume to continue that suite, or suite.name=... "
                          "(or storage_path) for a new one")
    if not report_only:
        run_pretrain(suite, log)
    order = sorted(suite.methods, key=lambda k: suite.methods[k].cfg.tuned_as is not None)   # tuned ones first
    for key in order:
        m = suite.methods[key]
        if report_only or (only and key not in only):
            continue
        if m.cfg.tuned_as is not None:
            tuned = _borrowed_values(suite, m)
        else:
            tuned = _stage(suite, m, "tune", _sweep(suite, m, "tune"), resume or bool(only), log)
        _stage(suite, m, "seeds", _sweep(suite, m, "seeds", values=tuned["best"]), resume or bool(only), log)
    return write_report(suite, log)


def _borrowed_values(suite: Suite, m: Method) -> dict:
    """The tune record of an ablation (`tuned_as`): the other method's best values, no trials of its own.
    The seeds stage's fingerprint holds the values, so a retuned source refuses the old seed runs."""
    ref = m.cfg.tuned_as
    src = suite.method_dir(ref) / "tune.json"
    if not src.is_file():
        raise ConfigError(f"methods.{m.key}.tuned_as: the tune stage of {ref} has not finished ({src}); "
                          f"run it first (fleetrec suite {_rel(suite.source)} --only {ref})")
    best = json.loads(src.read_text())["best"]
    rec = {"best": best, "tuned_as": ref, "trials": 0, "command": f"the tuned values of {ref} ({_rel(src)})"}
    d = suite.method_dir(m.key)
    d.mkdir(parents=True, exist_ok=True)
    (d / "tune.json").write_text(json.dumps(rec, indent=1, default=str))
    return rec
