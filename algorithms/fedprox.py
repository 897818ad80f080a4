"""Per-user FedProx (Li et al., MLSys 2020): FedAvg whose local objective adds (mu/2)·||θ − θ_global||².

This file is the "write your own algorithm" example (algorithms/README.md): one file, the public
protocol only, registered in one line in `algorithms/__init__.py`. From the engine it gets
vectorized cohorts (`train_cohort_sgd` trains K clients in one call), checkpoint / resume and
worker recovery (all its state is the server state and the personal state the engine owns),
central DP (`privacy.CentralDP`: clipped deltas with unit weights, noise on their sum, ε per
round) and local DP (`privacy.LocalDP`: every client's delta clipped and noised in the worker), the server rules of `server_opt` (FedAvgM / FedAdam / FedYogi, moments in the server
state) and pointwise evaluation (`score_cohort`, inherited from RoleModelAlgorithm).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from fleetrec.algorithms import aggregate, server_opt
from fleetrec.algorithms.base import RoleModelAlgorithm
from fleetrec.algorithms.fedavg import PER_USER_EXAMPLE
from fleetrec.algorithms.privacy import CentralDP, LocalDP
from fleetrec.algorithms.protocol import (CENTRAL_DP, LOCAL_DP, Accumulator, AlgorithmConfig, CohortBatch, CohortUpdate, Setup,
                                          Tensors, TrainPlan)
from fleetrec.algorithms.server_opt import ServerOptimizerConfig
from fleetrec.algorithms.vectorized import train_cohort_sgd


@dataclass(frozen=True)
class FedProxConfig(AlgorithmConfig):
    name: str = "fedprox"
    mu: float = 0.01                  # proximal weight; 0 = FedAvg
    server_lr: float = 1.0            # η of the server rule
    server_optimizer: ServerOptimizerConfig = field(default_factory=ServerOptimizerConfig)   # sgd / adam / ...
    weighting: str = "examples"       # examples: weight by training rows; uniform: every client 1 (local DP)

    CHECKS: ClassVar[dict] = {"mu": ">=0", "server_lr": ">0", "weighting": ("examples", "uniform")}

    def check_privacy(self, privacy) -> str | None:   # a row count would travel un-noised beside the update
        if privacy.local.enabled and self.weighting == "examples":
            return "privacy.local: algorithm.weighting=examples reveals row counts; set algorithm.weighting=uniform"
        return None


class FedProx(RoleModelAlgorithm):
    Config = FedProxConfig
    PRIVACY = frozenset({CENTRAL_DP, LOCAL_DP})   # the upload is a weighted sum of deltas
    LR_SCHEDULE = True
    LOCAL_DP_SETTINGS = {"algorithm.weighting": "uniform"}
    EXAMPLES = {"per_user": {**PER_USER_EXAMPLE, "algorithm.mu": 0.1}}   # a tiny run, for the registry-wide tests

    def __init__(self, config: FedProxConfig, setup: Setup):
        super().__init__(config, setup)       # the model, its tensors split by role
        self.dp = CentralDP(setup)            # off unless privacy.enabled
        self.ldp = LocalDP(setup, {k: tuple(self._initial[k].shape) for k in self.shared_names})   # privacy.local

    # ---- server half (the coordinator)
    def init_server(self) -> Tensors:        # the shared tensors and the server rule's moments
        shared = super().init_server()
        return {**shared, **server_opt.init_state(self.config.server_optimizer, shared)}

    def configure_train(self, rnd: int, state: Tensors, cohort: torch.Tensor) -> TrainPlan:
        return TrainPlan(round=rnd, params={k: state[k] for k in self.shared_names})

    def aggregate_train(self, rnd: int, state: Tensors, acc: Accumulator) -> tuple[Tensors, dict]:
        mean = self.dp.mean_delta(acc, rnd)   # weighted mean of the deltas, or their noisy mean
        new = dict(state)
        if mean is not None:                  # θ += η·Δ, or FedAvgM / FedAdam / FedYogi on Δ
            new = server_opt.apply(self.config.server_optimizer, self.config.server_lr, state,
                                   {k: mean[k].to(state[k].dtype) for k in self.shared_names})
        return new, {**aggregate.mean_stats(acc), **self.dp.metrics(rnd), **self.ldp.metrics(rnd)}

    # ---- client half (the workers), K clients at once
    def train_cohort(self, plan: TrainPlan, batch: CohortBatch, personal: Tensors) -> CohortUpdate:
        K, mu = batch.size, self.config.mu
        start = {k: v.expand(K, *v.shape) for k, v in plan.params.items()}      # (K, ...) views

        def proximal(params: Tensors) -> Tensors:                                # d/dθ (mu/2)·||θ − θ_global||²
            return {k: mu * (params[k] - start[k]) for k in start}

        params = {**personal, **{k: v.clone() for k, v in start.items()}}
        params, loss = train_cohort_sgd(self.model, params, self.frozen, batch, self.setup.train, batch.order,
                                        plan.round, extra_grad=proximal if mu > 0 else None)
        deltas = self.ldp.apply({k: params[k] - start[k] for k in start}, plan.round, batch.client_ids)
        ones = torch.ones(batch.size, dtype=torch.float64, device=batch.mask.device)
        deltas, weights = self.dp.client(deltas, batch.n_rows.double() if self.config.weighting == "examples" else ones)
        acc = Accumulator()
        keep = aggregate.fold_weighted(acc, deltas, weights, {"train_loss": loss})   # NaN clients dropped
        new_personal = {k: torch.where(aggregate.bcast(keep, params[k]), params[k], personal[k])
                        for k in self.private_names}
        return CohortUpdate(personal=new_personal, acc=acc)
