"""The algorithm protocol and the typed payloads that travel between coordinator and workers.

An algorithm owns both halves: the server half runs in the coordinator
(`init_server`, `configure_train`, `aggregate_train`, `aggregate_evaluate`), the client half in
workers (`init_personal`, `train_cohort`, `evaluate_cohort`). Workers train whole cohorts at
once; updates are folded into an `Accumulator` that workers pre-reduce and the coordinator
merges. Evaluation works the same way: `evaluate_cohort` returns a mergeable partial
(`fleetrec.algorithms.evaluation`), workers merge their cohorts' partials, the coordinator merges the
workers' and `aggregate_evaluate` turns the result into metrics.

What an algorithm can do is declared on its class (`AlgorithmBase`), never probed: its
evaluation kind, the privacy mechanisms it supports, whether it reads the dataset's side
tables, and the tiny example runs that the registry-wide tests use (tests/test_contract.py).
Everything that changes across rounds lives in the server state or the personal state the
engine owns (and checkpoints); an algorithm object holds nothing mutable after `__init__`
beyond caches rebuilt from that state.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from abc import ABCMeta, abstractmethod
from typing import TYPE_CHECKING, ClassVar, Protocol

import torch

from fleetrec.datasets.federated import DatasetSchema
from fleetrec.datasets.registry import Registry, TaggedUnion

if TYPE_CHECKING:
    from fleetrec.algorithms.evaluation import EvalPartial
    from fleetrec.algorithms.models import ModelConfig
    from fleetrec.algorithms.privacy import CentralDPConfig, LocalDPConfig

Tensors = dict[str, torch.Tensor]

# Parameter roles: who owns a tensor and how it is aggregated.
FROZEN = "frozen"            # never trained, never sent after set-up
PRIVATE = "private"          # personal state of a client, lives in the worker that owns the client
SHARED = "shared"            # aggregated over the cohort
GROUP = "group"              # aggregated among clients sharing a client attribute value
PERSONALIZED = "personalized"  # the server keeps one copy per client
ROLES = (FROZEN, PRIVATE, SHARED, GROUP, PERSONALIZED)


@dataclass(frozen=True)
class LocalTrainConfig:
    """How a client trains in one round (the YAML `train:` block)."""
    local_epochs: int = 1            # passes over the client's training rows per round
    batch_size: int = 16             # minibatch size inside a client
    lr: float = 0.1                  # learning rate of the local optimizer
    optimizer: str = "sgd"           # sgd | adam  (adam state is reset every round)
    weight_decay: float = 0.0        # L2 penalty added to the gradient
    # learning-rate schedule of the vectorized local optimizer (algorithms that declare LR_SCHEDULE;
    # the loader refuses it elsewhere): a client's s-th local step of round r (both from 0) uses
    # lr * lr_round_decay**r * lr_step_decay**s, restarting at s = 0 every round (1 = off; FedRAP's
    # official code decays by 0.95 every batch and 0.97 every round)
    lr_step_decay: float = 1.0
    lr_round_decay: float = 1.0
    # a round diverges when more than half of its client updates were dropped (NaN / inf) or its
    # training loss is not finite; the run stops (exit 3) after this many such rounds in a row
    # (0 = never stop; the rounds are still counted, shown and summarized)
    stop_on_divergence: int = 3

    CHECKS: ClassVar[dict] = {"local_epochs": ">=1", "batch_size": ">=1", "lr": ">0",
                              "optimizer": ("sgd", "adam"), "weight_decay": ">=0", "stop_on_divergence": ">=0",
                              "lr_step_decay": "0..1", "lr_round_decay": "0..1"}


_A = "fleetrec.algorithms."
# The one registry of algorithms (`register` adds a plug-in). Built-ins are imported on first use.
ALGORITHMS: Registry[type] = Registry("algorithm", {
    "fedavg": _A + "fedavg:FedAvg",
    "fedprox": _A + "fedprox:FedProx",
    "fedpa": _A + "fedpa:FedPA",
    "pmtrec": _A + "pmtrec:PMTRecMF",
    "fedavg_mf": _A + "fedavg_mf:FedAvgMF",
    "scenario_local": _A + "scenario:ScenarioLocal",
    "scenario_centralized": _A + "scenario:ScenarioCentralized",
    "scenario_fedavg": _A + "scenario:ScenarioFedAvg",
    "scenario_fedprox": _A + "scenario:ScenarioFedProx",
    "scenario_fedbn": _A + "scenario:ScenarioFedBN",
    "scenario_fedper": _A + "scenario:ScenarioFedPer",
    "scenario_ditto": _A + "scenario:ScenarioDitto",
    "pf_msmtrec": _A + "pfmsm:PFMSMTrec",
}, config_of=lambda algorithm: algorithm.Config, base=lambda: AlgorithmBase)


@dataclass(frozen=True)
class AlgorithmConfig(TaggedUnion):
    """Base of the YAML `algorithm:` block; `name` picks the algorithm from the registry."""
    name: str = "fedavg"

    REGISTRY: ClassVar[Registry] = ALGORITHMS

    def data_layout(self) -> str | None:
        """The `data.layout` this configuration needs (centralized / federated), or None for any."""
        return None

    def ranking_ks(self) -> tuple[int, ...]:
        """Recall@K / NDCG@K cut-offs of a ranking algorithm (empty for pointwise ones)."""
        return ()

    def check_train(self, train) -> str | None:
        """Why this algorithm cannot honour the `train:` block (a setting it would ignore), or None."""
        return None

    def check_privacy(self, privacy) -> str | None:
        """Why this configuration cannot honour the `privacy:` block (beyond the class's PRIVACY), or None."""
        return None


@dataclass(frozen=True)
class Setup:
    """What an algorithm instance is built from, in the coordinator and in every worker."""
    schema: DatasetSchema
    num_clients: int
    seed: int
    train: LocalTrainConfig
    model: "ModelConfig"             # the model's config dataclass (algorithms.models)
    device: str = "cpu"
    privacy: "CentralDPConfig | None" = None   # central DP on the aggregate, or None (off)
    clients_per_round: int = 0       # cohort size the server expects (central DP's q * N)
    local_dp: "LocalDPConfig | None" = None    # local DP on every client upload (privacy.local), or None (off)
    per_user_eval: bool = False      # ranking algorithms: also return each user's test metrics (RankingPartial.per_user)
    pooled_auc: str = "exact"        # pointwise evaluation: exact (the rows go to the coordinator) | histogram
                                     # (SummaryPartial: a fixed size per worker, pooled AUC within a reported bound)


@dataclass
class CohortBatch:
    """Padded rows of K clients. L = rows of the longest client, padded; `mask` marks real rows.

    For training, rows are already in each client's minibatch order for this round.
    """
    client_ids: torch.Tensor                 # (K,) int64
    n_rows: torch.Tensor                     # (K,) int64 real rows per client
    categorical: Tensors                     # name -> (K, L) int64
    numeric: torch.Tensor                    # (K, L, M) float32
    labels: torch.Tensor                     # (K, L, T) float32
    mask: torch.Tensor                       # (K, L) float32, 1 = real row
    client_attrs: Tensors                    # name -> (K,) int64
    order: torch.Tensor | None = None        # (E, K, L) int64 row order per local epoch (training only)

    @property
    def size(self) -> int:
        return int(self.client_ids.shape[0])

    def to(self, device) -> "CohortBatch":
        if str(device) == "cpu":
            return self
        mv = lambda d: {k: v.to(device, non_blocking=True) for k, v in d.items()}
        return CohortBatch(self.client_ids.to(device), self.n_rows.to(device), mv(self.categorical),
                           self.numeric.to(device), self.labels.to(device), self.mask.to(device),
                           mv(self.client_attrs), None if self.order is None else self.order.to(device))


@dataclass
class TrainPlan:
    """What every client of a round receives: the global tensors and the round number."""
    round: int
    params: Tensors                          # role shared/group tensors, as the server holds them
    extra: dict = field(default_factory=dict)


@dataclass
class Accumulator:
    """Weighted sums of client updates, in float64 so the sum order does not matter.

    `sums[name]` = sum_k w_k * x_k ; `weight` = sum_k w_k ; `stats[name]` = sum_k w_k * metric_k.
    `group_sums[name]` = (G, ...) sums per value of a client attribute, `group_weight[name]` = (G,).
    `per_client[c]` keeps client c's own tensors, for aggregators that need every client's delta.
    """
    sums: Tensors = field(default_factory=dict)
    weight: float = 0.0
    clients: int = 0
    stats: dict[str, float] = field(default_factory=dict)
    group_sums: Tensors = field(default_factory=dict)
    group_weight: Tensors = field(default_factory=dict)
    dropped: int = 0                         # client updates rejected (NaN / inf)
    per_client: dict[int, Tensors] = field(default_factory=dict)   # keep-all: client id -> its tensors

    def merge(self, other: "Accumulator") -> "Accumulator":
        for k, v in other.sums.items():
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
        for k, v in other.group_sums.items():
            self.group_sums[k] = self.group_sums[k] + v if k in self.group_sums else v.clone()
        for k, v in other.group_weight.items():
            self.group_weight[k] = self.group_weight[k] + v if k in self.group_weight else v.clone()
        for k, v in other.stats.items():
            self.stats[k] = self.stats.get(k, 0.0) + v
        self.weight += other.weight
        self.clients += other.clients
        self.dropped += other.dropped
        self.per_client.update(other.per_client)
        return self

    def cpu(self) -> "Accumulator":
        mv = lambda d: {k: v.cpu() for k, v in d.items()}
        return Accumulator(mv(self.sums), self.weight, self.clients, dict(self.stats),
                           mv(self.group_sums), mv(self.group_weight), self.dropped,
                           {c: mv(t) for c, t in self.per_client.items()})


@dataclass
class CohortUpdate:
    personal: Tensors                        # new personal state of the K clients, (K, ...)
    acc: Accumulator                         # this cohort's contribution, already reduced


# Evaluation kinds an algorithm declares (`AlgorithmBase.EVALUATION`).
POINTWISE = "pointwise"      # AUC / GAUC / log-loss / P-R-F1 per task (and per scenario) of row scores
RANKING = "ranking"          # full-ranking Recall@K / NDCG@K per user
# Privacy mechanisms an algorithm may declare (`AlgorithmBase.PRIVACY`).
CENTRAL_DP = "central"       # clipped client updates summed with unit weight, Gaussian noise on the sum
LOCAL_DP = "local"           # every upload clipped and noised in the worker (privacy.LocalDP)


class Algorithm(Protocol):
    Config: type                             # frozen dataclass; the YAML `algorithm:` block maps onto it
    EVALUATION: str                          # POINTWISE | RANKING
    PRIVACY: frozenset                       # mechanisms it implements (the loader refuses the others)
    READS_SIDE_TABLES: bool                  # the worker hands it the dataset (`attach_data`)
    EXAMPLES: dict                           # name -> key.path: value overrides of a tiny run (registry-wide tests)

    def __init__(self, config, setup: Setup): ...
    def attach_data(self, dataset) -> None: ...
    def init_server(self) -> Tensors: ...
    def init_personal(self, client_ids: torch.Tensor) -> Tensors: ...
    def configure_train(self, rnd: int, state: Tensors, cohort: torch.Tensor) -> TrainPlan: ...
    def train_cohort(self, plan: TrainPlan, batch: CohortBatch, personal: Tensors) -> CohortUpdate: ...
    def aggregate_train(self, rnd: int, state: Tensors, acc: Accumulator) -> tuple[Tensors, dict]: ...
    def evaluate_cohort(self, state: Tensors, batches: "SplitBatches", personal: Tensors,
                        split: int) -> "EvalPartial": ...
    def aggregate_evaluate(self, prefix: str, partial: "EvalPartial") -> dict[str, float]: ...
    def traffic(self) -> tuple[int, int]: ...   # (bytes up, bytes down) per client per round


class SplitBatches(Protocol):
    """The rows of one cohort chunk, by split (0 train, 1 validation, 2 test), built on first use."""

    def __getitem__(self, split: int) -> CohortBatch: ...


class AlgorithmBase(metaclass=ABCMeta):
    """Defaults every registered algorithm inherits, and its declared capabilities.

    Pointwise evaluation is the default: `evaluate_cohort` scores the split's rows with
    `score_cohort` ((K, L, T) probabilities) and returns them as a `PointwisePartial`;
    `aggregate_evaluate` computes AUC / GAUC / log-loss / P-R-F1 per task, and per client when
    the clients are scenarios. A ranking algorithm sets EVALUATION = RANKING and overrides both
    (and still defines `score_cohort`, the row scores, for inspection).
    """
    Config: ClassVar[type]
    EVALUATION: ClassVar[str] = POINTWISE
    PRIVACY: ClassVar[frozenset] = frozenset()
    # whether its local training applies train.lr_step_decay / lr_round_decay (the vectorized
    # optimizer of algorithms/optim.py); the loader refuses those keys for the others
    LR_SCHEDULE: ClassVar[bool] = False
    READS_SIDE_TABLES: ClassVar[bool] = False
    EXAMPLES: ClassVar[dict[str, dict]] = {}    # tiny runs every registered algorithm must declare
    # settings (dotted key -> value) its central DP needs beyond privacy.enabled; check_privacy refuses
    # a config without them, naming them; the registry-wide DP test adds them to an example
    DP_SETTINGS: ClassVar[dict[str, object]] = {}
    LOCAL_DP_SETTINGS: ClassVar[dict[str, object]] = {}      # the same for privacy.local

    config: object
    setup: Setup

    def attach_data(self, dataset) -> None:
        """Called once per worker with the FederatedDataset when READS_SIDE_TABLES is set."""

    @abstractmethod
    def score_cohort(self, state: Tensors, batch: CohortBatch, personal: Tensors) -> torch.Tensor:
        """(K, L, T) probabilities of every row of every client of the cohort."""

    def evaluate_cohort(self, state: Tensors, batches: SplitBatches, personal: Tensors,
                        split: int) -> "EvalPartial":
        from fleetrec.algorithms.evaluation import PointwisePartial, SummaryPartial
        batch = batches[split]
        prob = self.score_cohort(state, batch, personal)
        if self.setup.pooled_auc == "histogram":
            return SummaryPartial.from_scores(batch, prob, per_client=self.setup.schema.scenario is not None)
        return PointwisePartial.from_scores(batch, prob)

    def aggregate_evaluate(self, prefix: str, partial: "EvalPartial") -> dict[str, float]:
        from fleetrec.algorithms.evaluation import pointwise_metrics, summary_metrics
        schema = self.setup.schema
        metrics = summary_metrics if self.setup.pooled_auc == "histogram" else pointwise_metrics
        return metrics(prefix, schema.tasks, partial, per_client=schema.scenario is not None)


def register(name: str, algorithm: type) -> type:
    """Add an algorithm class. It must subclass `AlgorithmBase` (declared capabilities and
    defaults) and have a `Config` whose default `name` is `name`; a taken name is refused."""
    return ALGORITHMS.register(name, algorithm)


def algorithms_supporting(mechanism: str) -> list[str]:
    """Registered algorithms that declare a privacy mechanism (CENTRAL_DP, ...)."""
    return [n for n, a in ALGORITHMS.items() if mechanism in a.PRIVACY]


def make_algorithm(config: AlgorithmConfig, setup: Setup):
    cls = ALGORITHMS[config.name]
    if setup.privacy is not None and CENTRAL_DP not in cls.PRIVACY:   # the config loader refuses this first
        raise ValueError(f"privacy.enabled: algorithm {config.name!r} does not implement central DP")
    if setup.local_dp is not None and LOCAL_DP not in cls.PRIVACY:
        raise ValueError(f"privacy.local: algorithm {config.name!r} does not implement local DP")
    return cls(config, setup)
