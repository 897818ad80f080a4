"""The sweep YAML (`fleetrec tune SPACE`): its schema, the loader and the checks that run before any
trial (every `space` path exists in the base config; the end points of every distribution build a
valid config). See simulator/tune.py for the sweep itself."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import yaml

from fleetrec.datasets.registry import Registry, TaggedUnion
from fleetrec.simulator.config import ExperimentConfig, from_dict
from fleetrec.simulator.config_loader import ConfigError, apply_overrides, build, read_yaml, to_dict

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
            return tune.grid_search([encode_value(x) for x in v])
        if k == "choice":
            return tune.choice([encode_value(x) for x in v])
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
            return [to_python(round(lo / q) * q), to_python(round(hi / q) * q)]
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
    points_to_evaluate: Any = None     # [{dotted path: value}, ...]: tried first (counted in num_samples), e.g.
                                       # the base config's own values, so a sweep never ends worse than it

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
    cli_overrides: tuple[str, ...] = ()   # key=value given on the command line (after the YAML's overrides)
    replaced_eval_metric: str | None = None   # the base config's eval.metric (mode), where the sweep's replaced them

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
            set_dotted(data, path, v)
        return data

    def trial_config(self, values: dict, source: str = "trial") -> ExperimentConfig:
        return from_dict(self.trial_data(values), source)


JSON_PREFIX = "json:"


def encode_value(v):
    """A list / mapping value of a choice as one opaque string for Tune, which otherwise walks into
    lists (a preset point such as tasks: [bpr, au] breaks its search-space resolution)."""
    if isinstance(v, (list, tuple, dict)):
        return JSON_PREFIX + json.dumps(list(v) if isinstance(v, tuple) else v)
    return v


def to_python(v):
    """What Tune hands a trial -> the value the loader type-checks: numpy scalars to Python
    scalars, `encode_value` strings back to their lists / mappings."""
    if isinstance(v, np.generic) or (isinstance(v, np.ndarray) and v.ndim == 0):
        return v.item()
    if isinstance(v, str) and v.startswith(JSON_PREFIX):
        return json.loads(v[len(JSON_PREFIX):])
    return v


def _deepcopy(d):
    return yaml.safe_load(yaml.safe_dump(d)) if d else {}


def set_dotted(data: dict, path: str, value) -> None:
    node = data
    parts = path.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value


def resolve_config(base: str, source: Path, what: str = "base") -> Path:
    """A config path named in `source` (at key `what`): relative to that file, else to the repo root."""
    for cand in (source.parent / base, REPO_ROOT / base, Path(base)):
        if cand.is_file():
            return cand.resolve()
    raise ConfigError(f"{source}: {what}: config file {base!r} not found (relative to {source.parent} or {REPO_ROOT})")


def _abs_sqlite(uri: str, cwd: Path) -> str:
    """sqlite:///relative.db -> sqlite:////abs/relative.db; trials run in other processes."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str((cwd / uri[len(prefix):]).resolve())
    if "://" not in uri:                               # a plain folder (file store)
        return str((cwd / uri).resolve())
    return uri


def load_sweep(path: str | Path, overrides: list[str] = (), name: str | None = None,
               storage_path: str | None = None, num_samples: int | None = None) -> Sweep:
    """Read and validate a search-space YAML. `overrides` apply to the base config after the
    YAML's own overrides (e.g. tiny data for a smoke test); `num_samples` replaces the YAML's."""
    source = Path(path)
    raw = read_yaml(source)
    if num_samples is not None:
        raw = {**raw, "num_samples": num_samples}
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
        check_searcher_installed(sc.search_alg, source)

    base_path = resolve_config(sc.base, source)
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
    set_dotted(data, "tracking.tracking_uri", tracking_uri)
    set_dotted(data, "tracking.experiment", experiment)
    set_dotted(data, "tracking.progress", False)
    base_cfg = from_dict(data, f"{source}: base {sc.base}")
    selects = replaced = None
    if sc.metric.startswith("val/"):         # a metric the trials' runs report (checked as their eval.metric)
        selects = sc.metric[len("val/"):]
        if selects.rsplit("/", 1)[-1] == "logloss" and sc.mode == "max":
            raise ConfigError(f"{source}: mode: got 'max' with metric {sc.metric!r}, which is lower-is-better: "
                              "set mode: min (each run's best round would be its worst)")
        try:
            with_metric = from_dict(apply_overrides(data, [f"eval.metric={selects}", f"eval.mode={sc.mode}"]), "base")
        except ConfigError as e:
            why = str(e)
            why = why[why.index("eval.metric:"):] if "eval.metric:" in why else why.removeprefix("base: ")
            raise ConfigError(f"{source}: metric: got {sc.metric!r}, which the base config's runs do not report "
                              f"({why})") from None
        # each run picks its best round (and early-stops) on the sweep's metric and mode too: else
        # best/* would be another metric's best round, or this metric's worst
        if (base_cfg.eval.metric, base_cfg.eval.mode) != (selects, sc.mode):
            replaced = f"{base_cfg.eval.metric} ({base_cfg.eval.mode})"
            for key, value, was in (("metric", selects, base_cfg.eval.metric), ("mode", sc.mode, base_cfg.eval.mode)):
                if value != was:                           # only what differs: the rest of the data stays as written
                    set_dotted(data, f"eval.{key}", value)
            base_cfg = with_metric

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
                  tracking_uri=tracking_uri, experiment=experiment, cli_overrides=tuple(overrides),
                  replaced_eval_metric=replaced)
    # every end point of every dimension must build a valid config (the others stay at the base values)
    for key, dim in space.items():
        for v in dim.end_points():
            try:
                sweep.trial_config({key: v}, "trial")
            except ConfigError as e:
                raise ConfigError(f"{source}: space.{key}: value {v!r} gives a bad config: "
                                  f"{str(e).removeprefix('trial: ')}") from None
    if sc.points_to_evaluate is not None:
        points = sc.points_to_evaluate
        if not isinstance(points, (list, tuple)) or not all(isinstance(p, dict) for p in points):
            raise ConfigError(f"{source}: points_to_evaluate: expected a list of mappings {{dotted path: value}}")
        if sc.search_alg == "grid":
            raise ConfigError(f"{source}: points_to_evaluate: needs search_alg random, optuna or hyperopt (a grid "
                              "tries every point anyway)")
        for n, point in enumerate(points):
            bad = [k for k in point if k not in space]
            if bad:
                raise ConfigError(f"{source}: points_to_evaluate[{n}]: {bad[0]!r} is not a key of space "
                                  f"({', '.join(space)})")
            try:
                sweep.trial_config(dict(point), "trial")
            except ConfigError as e:
                raise ConfigError(f"{source}: points_to_evaluate[{n}]: gives a bad config: "
                                  f"{str(e).removeprefix('trial: ')}") from None
    a, every, rounds = sc.scheduler, base_cfg.eval.every, base_cfg.rounds
    if isinstance(a, AshaConfig) and a.max_t and a.max_t > rounds:
        raise ConfigError(f"{source}: scheduler.max_t: got {a.max_t}, expected <= rounds of the base config ({rounds})")
    if isinstance(a, AshaConfig) and a.grace_period < every:
        raise ConfigError(f"{source}: scheduler.grace_period: got {a.grace_period}, expected >= the base config's "
                          f"eval.every ({every}): ASHA's first rung would judge trials before their first evaluation")
    return sweep


def check_searcher_installed(name: str, source) -> None:
    mod = {"optuna": "optuna", "hyperopt": "hyperopt"}[name]
    try:
        __import__(mod)
    except ImportError:
        raise ConfigError(f"{source}: search_alg: {name} needs the {mod} package (pip install {mod}); "
                          "use random or grid") from None


def short_value(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def trial_label(values: dict, sep: str = "·") -> str:
    """`lr=0.05·server_lr=0.2`: sampled values by the last part of their dotted path."""
    return sep.join(f"{k.rsplit('.', 1)[-1]}={short_value(v)}" for k, v in values.items())
