"""`fleetrec tune`: hyperparameter sweeps with Ray Tune over the same `run(cfg)` as `fleetrec run`.

A search-space YAML (see tune_spaces/README.md) names a base experiment config, overrides,
the metric to optimize, the search algorithm, the scheduler and a `space` that maps dotted
config paths to distributions. It goes through the same loader as experiment configs, so a
bad key or value is one line naming its dotted path; every `space` path must exist in the
base config, and the end points of every distribution must build a valid config.

Each trial builds its config through the same loader, calls `run(cfg)` inside a placement
group sized from the base config's resources (trial + coordinator: 0 CPU; one bundle per
worker with cpus_per_worker / gpus_per_worker), and reports every round to Tune
(training_iteration = round + 1), so ASHA can stop bad trials early. MLflow gets one parent
run per sweep and one nested child run per trial; the parent gets the best trial, its config
(YAML) and plots at the end.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import yaml
from ray.tune import Callback as TuneCallback

from fleetrec.datasets.registry import Registry, TaggedUnion
from fleetrec.simulator.config import ExperimentConfig, from_dict
from fleetrec.simulator.config_loader import ConfigError, apply_overrides, build, read_yaml, to_dict
from fleetrec.simulator.run import Callback

REPO_ROOT = Path(__file__).resolve().parent.parent
SWEEP_STATE = "fleetrec_sweep.json"          # in the experiment dir: parent run id, for --resume
KINDS = ("choice", "grid", "uniform", "loguniform", "randint", "quniform")


# ------------------------------------------------------------------------------ the YAML schema
@dataclass(frozen=True)
class DimConfig:
    """One searched parameter: exactly one of the keys below."""
    choice: tuple[Any, ...] | None = None          # sample one of the values
    grid: tuple[Any, ...] | None = None            # every value (crossed with the other grids)
    uniform: tuple[float, float] | None = None     # [lo, hi]
    loguniform: tuple[float, float] | None = None  # [lo, hi], lo > 0
    randint: tuple[int, int] | None = None         # integers in [lo, hi) (hi excluded, as in Tune)
    quniform: tuple[float, float, float] | None = None   # [lo, hi, q]: uniform rounded to multiples of q

    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) is not None)

    def validate(self) -> str | None:
        set_ = [k for k in KINDS if getattr(self, k) is not None]
        if len(set_) != 1:
            return ("expected exactly one of " + ", ".join(KINDS)
                    + (f", got {', '.join(set_)}" if set_ else ", got none"))
        k, v = set_[0], getattr(self, set_[0])
        if k in ("choice", "grid"):
            return None if len(v) else f"{k}: expected at least one value"
        if not v[0] < v[1]:
            return f"{k}: expected lo < hi, got {list(v)}"
        if k == "loguniform" and v[0] <= 0:
            return f"{k}: expected lo > 0, got {v[0]}"
        if k == "quniform" and v[2] <= 0:
            return f"{k}: expected q > 0, got {v[2]}"
        return None

    def tune_domain(self, grid: bool = False):
        from ray import tune
        k, v = self.kind(), getattr(self, self.kind())
        if k == "grid" or (k == "choice" and grid):
            return tune.grid_search(list(v))
        if k == "choice":
            return tune.choice(list(v))
        return {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint,
                "quniform": tune.quniform}[k](*v)

    def end_points(self) -> list:
        """Values a trial may get at the edges of the domain (all of them for choice/grid)."""
        k, v = self.kind(), getattr(self, self.kind())
        if k in ("choice", "grid"):
            return list(v)
        if k == "randint":
            return [v[0], v[1] - 1]
        if k == "quniform":
            lo, hi, q = v
            return [_py(round(lo / q) * q), _py(round(hi / q) * q)]
        return [float(v[0]), float(v[1])]


SCHEDULERS: Registry[type] = Registry("scheduler")     # name -> its config dataclass


@dataclass(frozen=True)
class SchedulerConfig(TaggedUnion):
    name: str = "asha"

    REGISTRY: ClassVar[Registry] = SCHEDULERS


@dataclass(frozen=True)
class AshaConfig(SchedulerConfig):
    name: str = "asha"
    max_t: int | None = None           # rounds; null = the base config's rounds
    grace_period: int = 1              # rounds every trial runs before it can be stopped
    reduction_factor: float = 2.0      # keep the top 1/reduction_factor at every rung

    CHECKS: ClassVar[dict] = {"max_t": ">=1", "grace_period": ">=1", "reduction_factor": ">1"}


@dataclass(frozen=True)
class NoSchedulerConfig(SchedulerConfig):
    name: str = "none"


SCHEDULERS.register("asha", AshaConfig)
SCHEDULERS.register("none", NoSchedulerConfig)


@dataclass(frozen=True)
class SweepConfig:
    name: str | None = None            # sweep (Tune experiment) name; null = the YAML file's stem
    base: str = "configs/quickstart.yaml"   # experiment config: relative to this YAML, else to the repo root
    overrides: tuple[str, ...] = ()    # key.path=value applied to the base config
    metric: str = "val/auc"            # a round-record key: val/auc, val/gauc, val/logloss, train/train_loss
    mode: str = "max"
    num_samples: int = 8               # trials (with grid dims: repeats of the whole grid)
    search_alg: str = "random"         # random | grid | optuna | hyperopt (the last two when installed)
    seed: int | None = 0               # seed of the search algorithm; null = unseeded
    scheduler: SchedulerConfig = field(default_factory=AshaConfig)
    max_concurrent_trials: int | None = None   # null = as many as the placement groups fit
    max_failures: int = 0              # retries of a failed trial
    trial_cpu: float = 0.0             # CPU of the bundle holding the trial loop and the coordinator
    storage_path: str = "tune_results" # Tune results go to <storage_path>/<name> (made absolute)
    tracking_uri: str | None = None    # MLflow store; null = the base config's (made absolute)
    experiment: str | None = None      # MLflow experiment; null = the base config's
    space: Any = None                  # dotted config path -> {choice|grid|uniform|loguniform|randint|quniform: ...}

    CHECKS: ClassVar[dict] = {"mode": ("max", "min"), "num_samples": ">=1",
                              "search_alg": ("random", "grid", "optuna", "hyperopt"),
                              "max_concurrent_trials": ">=1", "max_failures": ">=0", "trial_cpu": ">=0"}

    def validate(self) -> str | None:
        if not self.metric.startswith(("val/", "train/")):
            return f"metric: got {self.metric!r}, expected a val/... or train/... round metric (e.g. val/auc)"
        return None


@dataclass
class Sweep:
    """A validated sweep: the YAML, the resolved base config data and the parsed space."""
    cfg: SweepConfig
    source: Path
    name: str
    base_path: Path
    base_data: dict                    # base YAML + sweep overrides + CLI overrides + tracking settings
    base_cfg: ExperimentConfig
    space: dict[str, DimConfig]
    storage_path: Path
    tracking_uri: str
    experiment: str

    @property
    def exp_dir(self) -> Path:
        return self.storage_path / self.name

    def bundles(self) -> list[dict]:
        r = self.base_cfg.resources
        worker = {"CPU": r.cpus_per_worker, **({"GPU": r.gpus_per_worker} if r.gpus_per_worker else {})}
        return [{"CPU": self.cfg.trial_cpu}] + [dict(worker) for _ in range(r.workers)]

    def trial_data(self, values: dict) -> dict:
        data = _deepcopy(self.base_data)
        for path, v in values.items():
            _set(data, path, v)
        return data

    def trial_config(self, values: dict, source: str = "trial") -> ExperimentConfig:
        return from_dict(self.trial_data(values), source)


def _py(v):
    """numpy scalars (what Tune samples) -> Python scalars, so the loader type-checks them."""
    if isinstance(v, np.generic) or (isinstance(v, np.ndarray) and v.ndim == 0):
        return v.item()
    return v


def _deepcopy(d):
    return yaml.safe_load(yaml.safe_dump(d)) if d else {}


def _set(data: dict, path: str, value) -> None:
    node = data
    parts = path.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value


def _resolve_base(base: str, source: Path) -> Path:
    for cand in (source.parent / base, REPO_ROOT / base, Path(base)):
        if cand.is_file():
            return cand.resolve()
    raise ConfigError(f"{source}: base: config file {base!r} not found (relative to {source.parent} or {REPO_ROOT})")


def _abs_sqlite(uri: str, cwd: Path) -> str:
    """sqlite:///relative.db -> sqlite:////abs/relative.db; trials run in other processes."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str((cwd / uri[len(prefix):]).resolve())
    if "://" not in uri:                               # a plain folder (file store)
        return str((cwd / uri).resolve())
    return uri


def load_sweep(path: str | Path, overrides: list[str] = (), name: str | None = None,
               storage_path: str | None = None) -> Sweep:
    """Read and validate a search-space YAML. `overrides` apply to the base config after the
    YAML's own overrides (e.g. tiny data for a smoke test)."""
    source = Path(path)
    raw = read_yaml(source)
    sched = raw.get("scheduler", "asha")
    if sched is None or isinstance(sched, str):            # `scheduler: none` / `scheduler: asha`
        raw = {**raw, "scheduler": {"name": "none" if sched is None else sched}}
    try:
        sc: SweepConfig = build(SweepConfig, raw)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    if not isinstance(sc.space, dict) or not sc.space:
        raise ConfigError(f"{source}: space: expected a mapping of dotted config paths to distributions")
    space: dict[str, DimConfig] = {}
    for key, dim in sc.space.items():
        try:
            space[str(key)] = build(DimConfig, dim, f"space.{key}")
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
    kinds = {k: d.kind() for k, d in space.items()}
    if sc.search_alg == "grid":
        bad = [k for k, kind in kinds.items() if kind not in ("grid", "choice")]
        if bad:
            raise ConfigError(f"{source}: space.{bad[0]}: search_alg grid needs grid or choice values, got {kinds[bad[0]]}")
    if sc.search_alg in ("optuna", "hyperopt"):
        bad = [k for k, kind in kinds.items() if kind == "grid"]
        if bad:
            raise ConfigError(f"{source}: space.{bad[0]}: grid values need search_alg random or grid")
        _searcher_module(sc.search_alg, source)

    base_path = _resolve_base(sc.base, source)
    cwd = Path.cwd()
    data = read_yaml(base_path)
    try:
        data = apply_overrides(data, list(sc.overrides))
    except ConfigError as e:
        raise ConfigError(f"{source}: overrides: {e}") from None
    try:
        data = apply_overrides(data, list(overrides))
    except ConfigError as e:
        raise ConfigError(f"command line: {e}") from None
    base_cfg = from_dict(data, f"{source}: base {sc.base}")
    tracking_uri = _abs_sqlite(sc.tracking_uri or base_cfg.tracking.tracking_uri, cwd)
    experiment = sc.experiment or base_cfg.tracking.experiment
    data = apply_overrides(data, [])
    _set(data, "tracking.tracking_uri", tracking_uri)
    _set(data, "tracking.experiment", experiment)
    _set(data, "tracking.progress", False)
    base_cfg = from_dict(data, f"{source}: base {sc.base}")

    tree = to_dict(base_cfg)
    for key in space:
        node, parts = tree, key.split(".")
        for i, p in enumerate(parts):
            if not isinstance(node, dict) or p not in node:
                where = ".".join(parts[:i]) or "the top level"
                have = ", ".join(sorted(node)) if isinstance(node, dict) else "no keys"
                raise ConfigError(f"{source}: space.{key}: not a key of the base config {sc.base} "
                                  f"({where} has {have})")
            node = node[p]
    sweep = Sweep(cfg=sc, source=source.resolve(), name=name or sc.name or source.stem, base_path=base_path,
                  base_data=data, base_cfg=base_cfg, space=space,
                  storage_path=Path(storage_path or sc.storage_path).expanduser().resolve(),
                  tracking_uri=tracking_uri, experiment=experiment)
    # every end point of every dimension must build a valid config (the others stay at the base values)
    for key, dim in space.items():
        for v in dim.end_points():
            try:
                sweep.trial_config({key: v}, "trial")
            except ConfigError as e:
                raise ConfigError(f"{source}: space.{key}: value {v!r} gives a bad config: "
                                  f"{str(e).removeprefix('trial: ')}") from None
    if isinstance(sc.scheduler, AshaConfig) and sc.scheduler.max_t and sc.scheduler.max_t > base_cfg.rounds:
        raise ConfigError(f"{source}: scheduler.max_t: got {sc.scheduler.max_t}, expected <= rounds "
                          f"of the base config ({base_cfg.rounds})")
    return sweep


def _searcher_module(name: str, source) -> None:
    mod = {"optuna": "optuna", "hyperopt": "hyperopt"}[name]
    try:
        __import__(mod)
    except ImportError:
        raise ConfigError(f"{source}: search_alg: {name} needs the {mod} package (pip install {mod}); "
                          "use random or grid") from None


# ------------------------------------------------------------------------------ the trial
class TuneReport(Callback):
    """Reports every round record to Tune; rounds without evaluation repeat the last metric."""

    def __init__(self, metric: str):
        self.metric = metric
        self.last = None

    def on_start(self, cfg, info: dict) -> None:
        self.rounds = cfg.rounds

    def on_round(self, record: dict) -> None:
        from ray import tune
        out = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.metric in out:
            self.last = out[self.metric]
        elif self.last is not None:
            out[self.metric] = self.last
        out["rounds"] = self.rounds
        tune.report(out)


class TrialTags(Callback):
    """Tags the trial's MLflow child run (it is the active run in this process)."""

    def __init__(self, values: dict, sweep: str):
        self.values, self.sweep = values, sweep

    def on_start(self, cfg, info: dict) -> None:
        import mlflow
        from ray import tune
        ctx = tune.get_context()
        mlflow.set_tags({"tune.sweep": self.sweep, "tune.trial_id": ctx.get_trial_id(),
                         "tune.trial_name": ctx.get_trial_name(), "tune.sampled": json.dumps(self.values)})
        mlflow.log_params({f"sampled.{k}": str(v)[:500] for k, v in self.values.items()})


def trial(config: dict, sweep: Sweep, parent_run_id: str | None, cwd: str) -> None:
    """One Tune trial: build the config through the loader and call `run(cfg)`."""
    from ray import tune
    from fleetrec.simulator.run import run
    from fleetrec.simulator.tracking import MlflowLogger
    os.chdir(cwd)                                       # relative data paths as in the driver
    values = {k: _py(v) for k, v in config.items()}
    name = tune.get_context().get_trial_name()
    data = sweep.trial_data(values)
    _set(data, "tracking.run_name", name)
    cfg = from_dict(data, f"trial {name}")
    cbs: list[Callback] = []
    if cfg.tracking.mlflow:
        cbs += [MlflowLogger(cfg, parent_run_id=parent_run_id), TrialTags(values, sweep.name)]
    cbs.append(TuneReport(sweep.cfg.metric))
    run(cfg, cbs)


# ------------------------------------------------------------------------------ the sweep
def _search_alg(sweep: Sweep):
    sc = sweep.cfg
    if sc.search_alg in ("random", "grid"):
        from ray.tune.search import BasicVariantGenerator
        return BasicVariantGenerator(random_state=sc.seed, max_concurrent=sc.max_concurrent_trials or 0)
    _searcher_module(sc.search_alg, sweep.source)
    if sc.search_alg == "optuna":
        from ray.tune.search.optuna import OptunaSearch
        alg = OptunaSearch(metric=sc.metric, mode=sc.mode, seed=sc.seed)
    else:
        from ray.tune.search.hyperopt import HyperOptSearch
        alg = HyperOptSearch(metric=sc.metric, mode=sc.mode, random_state_seed=sc.seed)
    if sc.max_concurrent_trials:
        from ray.tune.search import ConcurrencyLimiter
        alg = ConcurrencyLimiter(alg, max_concurrent=sc.max_concurrent_trials)
    return alg


def _scheduler(sweep: Sweep):
    s = sweep.cfg.scheduler
    if isinstance(s, AshaConfig):
        from ray.tune.schedulers import ASHAScheduler
        return ASHAScheduler(time_attr="training_iteration", max_t=s.max_t or sweep.base_cfg.rounds,
                             grace_period=s.grace_period, reduction_factor=s.reduction_factor,
                             stop_last_trials=False)   # trials that reach max_t end by themselves
    return None


def param_space(sweep: Sweep) -> dict:
    grid = sweep.cfg.search_alg == "grid"
    return {k: d.tune_domain(grid) for k, d in sweep.space.items()}


def trainable(sweep: Sweep, parent_run_id: str | None):
    from ray import tune
    fn = tune.with_parameters(trial, sweep=sweep, parent_run_id=parent_run_id, cwd=str(Path.cwd()))
    return tune.with_resources(fn, tune.PlacementGroupFactory(sweep.bundles()))


def _reporter(sweep: Sweep):
    from ray.tune import CLIReporter
    return CLIReporter(metric_columns={sweep.cfg.metric: sweep.cfg.metric, "training_iteration": "rounds"},
                       parameter_columns=list(sweep.space), max_report_frequency=10,
                       sort_by_metric=True, metric=sweep.cfg.metric, mode=sweep.cfg.mode)


def _parent_run(sweep: Sweep, resume: bool) -> str | None:
    if not sweep.base_cfg.tracking.mlflow:
        return None
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=sweep.tracking_uri)
    state = sweep.exp_dir / SWEEP_STATE
    if resume and state.is_file():
        run_id = json.loads(state.read_text()).get("parent_run_id")
        if run_id:
            client.update_run(run_id, status="RUNNING")
            return run_id
    exp = client.get_experiment_by_name(sweep.experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(sweep.experiment)
    run = client.create_run(exp_id, run_name=sweep.name, tags={"tune.sweep": sweep.name, "tune.parent": "true"})
    rid = run.info.run_id
    sc = sweep.cfg
    params = {"sweep.metric": sc.metric, "sweep.mode": sc.mode, "sweep.num_samples": sc.num_samples,
              "sweep.search_alg": sc.search_alg, "sweep.scheduler": json.dumps(to_dict(sc.scheduler)),
              "sweep.base": str(sweep.base_path), "sweep.overrides": json.dumps(list(sc.overrides)),
              "sweep.bundles": json.dumps(sweep.bundles()), "sweep.max_failures": sc.max_failures,
              "sweep.storage_path": str(sweep.exp_dir)}
    params.update({f"space.{k}": json.dumps({d.kind(): list(getattr(d, d.kind()))})
                   for k, d in sweep.space.items()})
    for k, v in params.items():
        client.log_param(rid, k, str(v)[:500])
    client.log_artifact(rid, str(sweep.source))
    return rid


@dataclass
class SweepResult:
    results: Any                       # ray.tune.ResultGrid
    best: dict                         # trial_id, name, config (sampled), metric value, rounds
    best_config: ExperimentConfig | None
    parent_run_id: str | None
    trials: list[dict]                 # per trial: id, config, rounds run, best metric, status
    exp_dir: Path


def _trials(sweep: Sweep, grid) -> list[dict]:
    sc, out = sweep.cfg, []
    for r in grid:
        df = r.metrics_dataframe
        curve = []
        if df is not None and sc.metric in df:
            curve = [(int(i), float(v)) for i, v in zip(df["training_iteration"], df[sc.metric])]
        vals = [v for _, v in curve if not math.isnan(v)]
        best = (max(vals) if sc.mode == "max" else min(vals)) if vals else float("nan")
        m = r.metrics or {}
        out.append({"trial_id": m.get("trial_id"), "config": {k: _py(v) for k, v in (r.config or {}).items()},
                    "rounds_run": int(m.get("training_iteration", 0) or 0), "best": best, "curve": curve,
                    "error": None if r.error is None else str(r.error).splitlines()[0][:300],
                    "path": r.path})
    return out


def _plots(sweep: Sweep, trials: list[dict], d: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    metric, paths = sweep.cfg.metric, []
    done = [t for t in trials if not math.isnan(t["best"])]
    for key, dim in sweep.space.items():
        fig, ax = plt.subplots(figsize=(5, 3.5))
        xs = [t["config"].get(key) for t in done]
        ys = [t["best"] for t in done]
        numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
        if numeric:
            ax.scatter(xs, ys)
            if dim.kind() == "loguniform" or (dim.kind() in ("choice", "grid") and xs and min(xs) > 0
                                              and max(xs) / min(xs) >= 100):
                ax.set_xscale("log")
        else:
            labels = sorted({str(x) for x in xs})
            ax.scatter([labels.index(str(x)) for x in xs], ys)
            ax.set_xticks(range(len(labels)), labels)
        ax.set(xlabel=key, ylabel=f"best {metric}", title=f"{metric} vs {key}")
        fig.tight_layout()
        p = d / f"{metric.replace('/', '_')}_vs_{key}.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        paths.append(p)
    fig, ax = plt.subplots(figsize=(7, 4))
    for t in trials:
        if t["curve"]:
            ax.plot(*zip(*t["curve"]), marker=".",
                    label=", ".join(f"{k.split('.')[-1]}={_short(v)}" for k, v in t["config"].items()))
    ax.set(xlabel="round (training_iteration)", ylabel=metric, title="learning curves of all trials")
    if 0 < len(ax.lines) <= 12:
        ax.legend(fontsize=6)
    fig.tight_layout()
    p = d / "learning_curves.png"
    fig.savefig(p, dpi=100)
    plt.close(fig)
    return paths + [p]


def _short(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _summarize(sweep: Sweep, grid, parent: str | None) -> SweepResult:
    sc = sweep.cfg
    trials = _trials(sweep, grid)
    scored = [t for t in trials if not math.isnan(t["best"])]
    best, best_cfg = {}, None
    if scored:
        t = (max if sc.mode == "max" else min)(scored, key=lambda t: t["best"])
        best = {k: t[k] for k in ("trial_id", "config", "best", "rounds_run", "path")}
        best_cfg = sweep.trial_config(t["config"], "best trial")
    if parent:
        _summarize_mlflow(sweep, parent, trials, best, best_cfg)
    return SweepResult(results=grid, best=best, best_config=best_cfg, parent_run_id=parent, trials=trials,
                       exp_dir=sweep.exp_dir)


def _summarize_mlflow(sweep: Sweep, parent: str, trials: list[dict], best: dict, best_cfg) -> None:
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=sweep.tracking_uri)
    sc = sweep.cfg
    exp_id = client.get_run(parent).info.experiment_id
    children = client.search_runs([exp_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'",
                                  max_results=10000, order_by=["attributes.start_time DESC"])
    by_trial = {t["trial_id"]: t for t in trials}
    seen = set()
    best_child = None
    for c in children:                 # newest first: an older run of a trial was a failed or resumed attempt
        tid = c.data.tags.get("tune.trial_id")
        if tid in seen:
            if c.info.status == "RUNNING":
                client.set_tag(c.info.run_id, "tune.superseded", "true")
                client.set_terminated(c.info.run_id, "KILLED")
            continue
        seen.add(tid)
        t = by_trial.get(tid)
        if t is None:
            continue
        rounds = sweep.base_cfg.rounds
        early = t["error"] is None and t["rounds_run"] < rounds
        client.set_tag(c.info.run_id, "tune.stopped_early", str(early).lower())
        client.log_metric(c.info.run_id, "tune/rounds_run", t["rounds_run"])
        status = "FAILED" if t["error"] else "FINISHED"
        if c.info.status != status:    # ASHA stopped it: its process ended mid-run
            client.set_terminated(c.info.run_id, status)
        if best and tid == best["trial_id"]:
            best_child = c.info.run_id
    client.log_metric(parent, "tune/trials", len(trials))
    client.log_metric(parent, "tune/stopped_early", sum(t["error"] is None and t["rounds_run"] < sweep.base_cfg.rounds
                                                        for t in trials))
    client.log_metric(parent, "tune/errored", sum(t["error"] is not None for t in trials))
    if best:
        from fleetrec.simulator.tracking import mlflow_name
        client.log_metric(parent, mlflow_name(f"best/{sc.metric}"), best["best"])
        client.set_tag(parent, "tune.best_trial_id", best["trial_id"])
        if best_child:
            client.set_tag(parent, "tune.best_run_id", best_child)
        for k, v in best["config"].items():
            client.log_param(parent, f"best.{k}", str(v)[:500])
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        if best_cfg is not None:
            p = d / "best_config.yaml"
            p.write_text(f"# best trial {best['trial_id']} of sweep {sweep.name}: {sc.metric} = {best['best']:.6f}\n"
                         + yaml.safe_dump(to_dict(best_cfg), sort_keys=False))
            client.log_artifact(parent, str(p))
        rows = [{"trial_id": t["trial_id"], **t["config"], "rounds_run": t["rounds_run"], f"best {sc.metric}": t["best"],
                 "error": t["error"] or ""} for t in trials]
        (d / "trials.json").write_text(json.dumps(rows, indent=1, default=str))
        client.log_artifact(parent, str(d / "trials.json"))
        for p in _plots(sweep, trials, d):
            client.log_artifact(parent, str(p), artifact_path="plots")
    client.set_terminated(parent, "FINISHED")


def tune_sweep(sweep: Sweep, resume: bool = False, verbose: int = 1) -> SweepResult:
    """Run (or resume) a sweep; returns the per-trial summary and the best trial."""
    import ray
    from ray import tune
    from fleetrec.simulator.run import ensure_ray
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")      # trials keep the driver's working dir
    ensure_ray(sweep.base_cfg)
    _check_fits(sweep, ray.cluster_resources())
    exp_dir = sweep.exp_dir
    if resume:
        if not tune.Tuner.can_restore(str(exp_dir)):
            raise ConfigError(f"--resume: no sweep to resume in {exp_dir}")
    elif exp_dir.exists():
        raise ConfigError(f"{exp_dir} already exists: pass --resume to continue that sweep, "
                          "or --name / storage_path for a new one")
    parent = _parent_run(sweep, resume)
    exp_dir.mkdir(parents=True, exist_ok=True)
    (exp_dir / SWEEP_STATE).write_text(json.dumps({"parent_run_id": parent, "source": str(sweep.source),
                                                   "started": time.time()}))
    fn = trainable(sweep, parent)
    _ENDED.clear()
    if resume:                         # trials that had ended before (a finished sweep never steps)
        _ENDED.update(t.trial_id for t in tune.ExperimentAnalysis(str(exp_dir)).trials
                      if t.status in ("TERMINATED", "ERROR"))
        tuner = tune.Tuner.restore(str(exp_dir), trainable=fn, resume_unfinished=True, restart_errored=True)
    else:
        sc = sweep.cfg
        tuner = tune.Tuner(
            fn, param_space=param_space(sweep),
            tune_config=tune.TuneConfig(metric=sc.metric, mode=sc.mode, num_samples=sc.num_samples,
                                        search_alg=_search_alg(sweep), scheduler=_scheduler(sweep),
                                        max_concurrent_trials=sc.max_concurrent_trials),
            run_config=tune.RunConfig(name=sweep.name, storage_path=str(sweep.storage_path),
                                      callbacks=[EndedTrials()],
                                      failure_config=tune.FailureConfig(max_failures=sc.max_failures),
                                      progress_reporter=_reporter(sweep) if verbose else None,
                                      verbose=verbose))
    grid = tuner.fit()
    unfinished = len(grid) - len(_ENDED)
    if unfinished > 0:                 # interrupted (Ctrl-C): Tune saved its state; no summary yet
        if parent:
            from mlflow.tracking import MlflowClient
            MlflowClient(tracking_uri=sweep.tracking_uri).set_terminated(parent, "KILLED")
        raise SweepInterrupted(f"sweep {sweep.name} interrupted with {unfinished} of {len(grid)} trials "
                               f"unfinished; continue it with: fleetrec tune {sweep.source} --resume "
                               "(same overrides)")
    return _summarize(sweep, grid, parent)


_ENDED: set[str] = set()              # trial ids that ended this sweep (filled by EndedTrials callbacks)


class EndedTrials(TuneCallback):
    """Records trials that ended (done, stopped by the scheduler, errored) rather than being cut
    off by Ctrl-C; on a restored sweep, those that had ended before count too (they are
    TERMINATED at the first step). A module-level class writing to a module-level set, so the
    copy that a restored sweep unpickles from its saved state records into the same set."""

    def on_step_begin(self, iteration, trials, **info):
        _ENDED.update(t.trial_id for t in trials if t.status in ("TERMINATED", "ERROR"))

    def on_trial_complete(self, iteration, trials, trial, **info):
        _ENDED.add(trial.trial_id)

    def on_trial_error(self, iteration, trials, trial, **info):
        _ENDED.add(trial.trial_id)


class SweepInterrupted(RuntimeError):
    """Ctrl-C during a sweep: the experiment state is saved under <storage_path>/<name>."""


def _check_fits(sweep: Sweep, cluster: dict) -> None:
    need: dict[str, float] = {}
    for b in sweep.bundles():
        for k, v in b.items():
            need[k] = need.get(k, 0) + v
    for k, v in need.items():
        if v > cluster.get(k, 0) + 1e-9:
            raise ConfigError(f"{sweep.source}: one trial needs {v:g} {k} (resources.workers x cpus_per_worker / "
                              f"gpus_per_worker of the base config) but the Ray cluster has {cluster.get(k, 0):g}")


def describe(sweep: Sweep) -> str:
    sc = sweep.cfg
    lines = [f"sweep {sweep.name}: {sc.num_samples} samples, {sc.search_alg} search, scheduler "
             f"{sc.scheduler.name}, {sc.mode} {sc.metric}",
             f"base {sweep.base_path} ({sweep.base_cfg.rounds} rounds); resources per trial (placement group) "
             f"{sweep.bundles()}",
             f"results {sweep.exp_dir}; MLflow {sweep.tracking_uri} experiment {sweep.experiment!r}"]
    lines += [f"  {k}: {d.kind()} {list(getattr(d, d.kind()))}" for k, d in sweep.space.items()]
    return "\n".join(lines)


def report(result: SweepResult, sweep: Sweep) -> str:
    sc = sweep.cfg
    lines = ["", f"sweep {sweep.name}: {len(result.trials)} trials, "
                 f"{sum(t['error'] is None and t['rounds_run'] < sweep.base_cfg.rounds for t in result.trials)} stopped early, "
                 f"{sum(t['error'] is not None for t in result.trials)} errored"]
    if result.best:
        b = result.best
        lines.append(f"best trial {b['trial_id']}: {sc.metric} = {b['best']:.4f} "
                     f"({b['rounds_run']} rounds) with " + ", ".join(f"{k}={_short(v)}" for k, v in b["config"].items()))
    if result.parent_run_id:
        lines.append(f"MLflow parent run {result.parent_run_id} (best config, plots); "
                     f"open it with: fleetrec ui --backend-store-uri {sweep.tracking_uri}")
    lines.append(f"resume with: fleetrec tune {sweep.source} --resume")
    return "\n".join(lines)
