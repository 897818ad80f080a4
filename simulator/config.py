"""The experiment config: frozen dataclasses mirroring the YAML one to one.

`load(path, overrides)` is the only way in: YAML file + `key.path=value` overrides, through
the one loader that names the dotted path of any bad key, type or value.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from fleetrec.algorithms.models import ModelConfig
from fleetrec.algorithms.models.per_user import PerUserModelConfig
from fleetrec.algorithms.fedavg import FedAvgConfig
from fleetrec.algorithms.privacy import CentralDPConfig
from fleetrec.algorithms.protocol import CENTRAL_DP, LOCAL_DP, RANKING, AlgorithmConfig, LocalTrainConfig, Setup
from fleetrec.datasets.sources import DataConfig
from fleetrec.datasets.synthetic import SyntheticPerUserConfig
from fleetrec.simulator.checkpoint import CheckpointConfig
from fleetrec.simulator.artifacts import resolve_backbone
from fleetrec.simulator.placement import POLICIES
from fleetrec.simulator.config_loader import ConfigError, apply_overrides, build, read_yaml
from fleetrec.simulator.system import SystemConfig

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml"


@dataclass(frozen=True)
class FederationConfig:
    clients_per_round: int = 100       # cohort sampled each round (capped at the number of clients)
    cohort_size: int = 256             # clients a worker trains together in one vectorized call
    # pointwise evaluation scores at least cohort_size clients per call, more while the call's padded
    # rows (clients x longest client's rows) stay within this and its gathered personal state within
    # 64 MB (worker.EVAL_PERSONAL_BYTES): evaluation keeps no autograd state, and per-call overhead
    # dominated scoring millions of clients with a few rows each
    eval_cohort_rows: int = 65536

    CHECKS: ClassVar[dict] = {"clients_per_round": ">=1", "cohort_size": ">=1", "eval_cohort_rows": ">=1"}


@dataclass(frozen=True)
class ResourcesConfig:
    workers: int = 2                   # worker actors; which clients each owns: placement_policy
    cpus_per_worker: float = 1.0       # fractional allowed; torch threads = max(1, floor(cpus))
    gpus_per_worker: float = 0.0       # fractional allowed: 0.25 = four workers share a GPU
    address: str | None = None         # Ray address ("auto" joins a running cluster); null = local
    max_restarts: int = 3              # replacements of a dead worker (restored from the last checkpoint)
    placement: str = "default"         # worker actors: Ray's default placement, or "spread" over the nodes
    placement_policy: str = "modulo"   # clients -> workers: modulo (id % workers) | balanced (greedy by train rows)
    dashboard: bool = False            # local runs: start Ray's dashboard and print its URL (watch the actors)

    CHECKS: ClassVar[dict] = {"workers": ">=1", "cpus_per_worker": ">0", "gpus_per_worker": ">=0",
                              "max_restarts": ">=0", "placement": ("default", "spread"),
                              "placement_policy": POLICIES}

    def validate(self) -> str | None:
        if self.gpus_per_worker > 1 and not float(self.gpus_per_worker).is_integer():
            return (f"resources.gpus_per_worker: got {self.gpus_per_worker:g}, expected a fraction up to 1 or a whole "
                    "number of GPUs (Ray places no fractions above 1)")
        return None


RANKING_METRIC = re.compile(r"(recall|ndcg)@([1-9][0-9]*)")


@dataclass(frozen=True)
class EvalConfig:
    every: int = 1                     # evaluate every k rounds (and after the last round)
    metric: str = "auc"                # validation metric that selects the best round: auc | gauc | logloss,
                                       # per task (click/auc) or over scenarios (scenario_mean/auc), or recall@K / ndcg@K
    mode: str = "max"
    clients: int = 0                   # evaluate a fixed seeded sample of this many clients; 0 = all
    per_user: bool = False             # keep every user's test metrics of the best round (ranking algorithms;
                                       # logged as per_user/test.csv, read by fleetrec suite's paired bootstrap)
    # pointwise metrics: exact (every evaluated row's score goes to the coordinator) or histogram (each
    # worker sends a fixed-size summary: GAUC, log-loss, P/R/F1 and per-scenario values stay exact, pooled
    # AUC comes from 16,384 logit bins and <split>/auc_error_bound states its largest error, which grows when
    # the scores bunch together, as an untrained model's do)
    pooled_auc: str = "exact"

    CHECKS: ClassVar[dict] = {"every": ">=1", "clients": ">=0", "mode": ("max", "min"), "pooled_auc": ("exact", "histogram")}
    POINTWISE: ClassVar[tuple] = ("auc", "gauc", "logloss")

    def validate(self) -> str | None:
        last = self.metric.rsplit("/", 1)[-1]
        scoped = "/" in self.metric and all(re.fullmatch(r"[A-Za-z0-9_]+", p) for p in self.metric.split("/")[:-1])
        if not ((last in self.POINTWISE and ("/" not in self.metric or scoped))
                or RANKING_METRIC.fullmatch(self.metric)):
            return (f"eval.metric: got {self.metric!r}, expected one of {', '.join(self.POINTWISE)} (also per task, "
                    "click/auc, or over scenarios, scenario_mean/auc) or a ranking metric recall@K / ndcg@K")
        return None


@dataclass(frozen=True)
class TrackingConfig:
    mlflow: bool = True                # log the run to MLflow
    tracking_uri: str = "sqlite:///mlflow.db"   # default store in the working directory
    experiment: str = "fleetrec"
    run_name: str | None = None        # null = <algorithm>·<dataset>·seed<k>
    progress: bool = True              # progress bar per round
    # the driver machine's real CPU / memory use (and GPU where present) in MLflow's system tab,
    # sampled by MLflow every 10 s (psutil; simulated per-round counters are under round/ and sim/)
    system_metrics: bool = True

    def validate(self) -> str | None:
        if not self.experiment.strip():
            return "tracking.experiment: got an empty name, expected the MLflow experiment to log to"
        return None


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = "quickstart"
    seed: int = 0                      # run seed: cohort sampling, minibatch order, initial state
    rounds: int = 20
    early_stop_patience: int = 0       # stop after this many evaluations without improvement; 0 = off
    data: DataConfig = field(default_factory=SyntheticPerUserConfig)
    model: ModelConfig = field(default_factory=PerUserModelConfig)
    algorithm: AlgorithmConfig = field(default_factory=FedAvgConfig)
    train: LocalTrainConfig = field(default_factory=LocalTrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    privacy: CentralDPConfig = field(default_factory=CentralDPConfig)   # central DP on the aggregate
    system: SystemConfig = field(default_factory=SystemConfig)          # availability, stragglers, virtual clock

    CHECKS: ClassVar[dict] = {"rounds": ">=1", "early_stop_patience": ">=0", "seed": "0..4294967295"}

    def validate(self) -> str | None:
        from fleetrec.algorithms import ALGORITHMS, algorithms_supporting
        algo = ALGORITHMS[self.algorithm.name]
        name = self.algorithm.name
        # ranking algorithms (EVALUATION = ranking, cut-offs in algorithm.ks) report recall@K / ndcg@K,
        # the others pointwise metrics
        m = RANKING_METRIC.fullmatch(self.eval.metric)
        ranking = algo.EVALUATION == RANKING
        if m and not ranking:
            return f"eval.metric: {self.eval.metric!r} is a ranking metric, but algorithm {name!r} reports auc, gauc and logloss"
        ks = self.algorithm.ranking_ks()
        if m and int(m.group(2)) not in ks:
            return f"eval.metric: {self.eval.metric!r} needs {m.group(2)} in algorithm.ks (got {list(ks)})"
        if self.eval.per_user and not ranking:
            return (f"eval.per_user: per-user test metrics are kept for ranking algorithms (recall@K / ndcg@K); "
                    f"algorithm {name!r} reports pooled auc, gauc and logloss")
        if ranking and self.eval.pooled_auc != "exact":
            return (f"eval.pooled_auc: algorithm {name!r} reports ranking metrics, whose partials are per-user sums "
                    f"already; pooled_auc applies to pointwise algorithms (got {self.eval.pooled_auc!r})")
        if ranking and not m:
            return (f"eval.metric: algorithm {name!r} reports ranking metrics; use recall@K or "
                    f"ndcg@K with K in algorithm.ks {list(ks)}, not {self.eval.metric!r}")
        problem = self.algorithm.check_train(self.train) or self.algorithm.check_privacy(self.privacy)
        if problem:
            return problem
        need, have = self.algorithm.data_layout(), self.data.client_layout()
        if need is not None and have is not None and need != have:
            return f"algorithm.mode: {need!r} needs data.layout={need!r} (got data.layout={have!r})"
        decays = [k for k in ("lr_step_decay", "lr_round_decay") if getattr(self.train, k) != 1.0]
        if decays and not algo.LR_SCHEDULE:
            return (f"train.{decays[0]}: algorithm {name!r} trains with its own optimizer, which does not apply "
                    f"train.lr_step_decay / lr_round_decay; it would train at a constant learning rate. Expected 1 "
                    f"(off), or an algorithm that applies them: {', '.join(n for n, a in ALGORITHMS.items() if a.LR_SCHEDULE)}")
        if self.privacy.enabled and CENTRAL_DP not in algo.PRIVACY:
            return (f"privacy.enabled: algorithm {name!r} does not implement central DP (clipped updates, noise on "
                    f"their sum); it would train without noise. Central DP is implemented by: "
                    f"{', '.join(algorithms_supporting(CENTRAL_DP))}")
        if self.privacy.local.enabled and LOCAL_DP not in algo.PRIVACY:
            return (f"privacy.local: algorithm {name!r} does not implement local DP (each upload clipped and noised "
                    f"in the worker); it would upload without noise. Local DP is implemented by: "
                    f"{', '.join(algorithms_supporting(LOCAL_DP))}")
        return None


def make_setup(cfg: ExperimentConfig, ds) -> Setup:
    """What every algorithm instance (coordinator and workers) is built from."""
    return Setup(schema=ds.schema, num_clients=ds.num_clients, seed=cfg.seed, train=cfg.train, model=cfg.model,
                 privacy=cfg.privacy if cfg.privacy.enabled else None,
                 clients_per_round=min(cfg.federation.clients_per_round, ds.num_clients),
                 local_dp=cfg.privacy.local if cfg.privacy.local.enabled else None,
                 per_user_eval=cfg.eval.per_user, pooled_auc=cfg.eval.pooled_auc)


def from_dict(data: dict, source: str = "config") -> ExperimentConfig:
    try:
        return build(ExperimentConfig, resolve_backbone(data, TrackingConfig.tracking_uri))
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def load(path: str | Path | None = None, overrides: list[str] = ()) -> ExperimentConfig:
    """Read a YAML experiment (default: configs/quickstart.yaml) and apply CLI overrides."""
    path = Path(path) if path else DEFAULT_CONFIG
    data = read_yaml(path)
    try:
        data = apply_overrides(data, list(overrides))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    try:
        return from_dict(data, "config")
    except ConfigError as e:
        msg = str(e).removeprefix("config: ")
        raise ConfigError(f"{_blamed(msg, overrides, path) or path}: {msg}") from None


def _blamed(msg: str, overrides, path) -> str | None:
    """The command-line override an error's key comes from (`train.lr=abc (command line)`), if any:
    a bad value given on the command line is not the config file's fault. An error about a whole
    block (`system: ...`) that overrides change names the file and those overrides."""
    m = re.match(r"([\w.@-]+)(?:\[\d+\])*:", msg)
    if not m:
        return None
    key = m.group(1)
    for item in reversed(list(overrides)):          # the last override of a key is the one that counts
        k = item.split("=", 1)[0].strip()
        if key == k or key.startswith(k + "."):
            return f"{item} (command line)"
    inside = [item for item in overrides if item.split("=", 1)[0].strip().startswith(key + ".")]
    if inside:
        return f"{path} with {' '.join(inside)} (command line)"
    return None
