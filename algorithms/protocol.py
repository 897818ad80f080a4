"""The algorithm protocol and the typed payloads that travel between coordinator and workers.

An algorithm owns both halves: the server half runs in the coordinator
(`init_server`, `configure_train`, `aggregate_train`), the client half in workers
(`init_personal`, `train_cohort`, `evaluate_cohort`). Workers train whole cohorts at once;
updates are folded into an `Accumulator` that workers pre-reduce and the coordinator merges.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import torch

from datasets.federated import DatasetSchema

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

    CHECKS: ClassVar[dict] = {"local_epochs": ">=1", "batch_size": ">=1", "lr": ">0",
                              "optimizer": ("sgd", "adam"), "weight_decay": ">=0"}


@dataclass(frozen=True)
class AlgorithmConfig:
    """Base of the YAML `algorithm:` block; `name` picks the algorithm from the registry."""
    name: str = "fedavg"

    @classmethod
    def VARIANTS(cls) -> dict[str, type]:
        from algorithms import ALGORITHMS
        return {name: algo.Config for name, algo in ALGORITHMS.items()}


@dataclass(frozen=True)
class Setup:
    """What an algorithm instance is built from, in the coordinator and in every worker."""
    schema: DatasetSchema
    num_clients: int
    seed: int
    train: LocalTrainConfig
    model: object                    # the model's config dataclass (algorithms.models)
    device: str = "cpu"
    privacy: object = None           # algorithms.privacy.CentralDPConfig, or None (no central DP)
    clients_per_round: int = 0       # cohort size the server expects (central DP's q * N)


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


@dataclass
class EvalOutput:
    """Scores of one cohort on one split: flattened over real rows, clients in row order."""
    client: torch.Tensor                     # (R,) int64
    scores: torch.Tensor                     # (R, T) float32 probabilities
    labels: torch.Tensor                     # (R, T) float32


class Algorithm(Protocol):
    Config: type                             # frozen dataclass; the YAML `algorithm:` block maps onto it

    def __init__(self, config, setup: Setup): ...
    def init_server(self) -> Tensors: ...
    def init_personal(self, client_ids: torch.Tensor) -> Tensors: ...
    def configure_train(self, rnd: int, state: Tensors, cohort: torch.Tensor) -> TrainPlan: ...
    def train_cohort(self, plan: TrainPlan, batch: CohortBatch, personal: Tensors) -> CohortUpdate: ...
    def aggregate_train(self, rnd: int, state: Tensors, acc: Accumulator) -> tuple[Tensors, dict]: ...
    def evaluate_cohort(self, state: Tensors, batch: CohortBatch, personal: Tensors) -> torch.Tensor: ...
    def traffic(self) -> tuple[int, int]: ...   # (bytes up, bytes down) per client per round
