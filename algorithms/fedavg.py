"""FedAvg on a model with parameter roles.

Client half: start from the global `shared` tensors and the client's own `private` tensors,
run local minibatch training, return the new private tensors and fold the shared ones into
the accumulator weighted by the client's training rows. Server half: the weighted mean.
`frozen` tensors are set once and never trained or sent.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from algorithms import aggregate, privacy
from algorithms.base import RoleModelAlgorithm
from algorithms.protocol import Accumulator, AlgorithmConfig, CohortBatch, CohortUpdate, Tensors, TrainPlan
from algorithms.vectorized import train_cohort_sgd


@dataclass(frozen=True)
class FedAvgConfig(AlgorithmConfig):
    name: str = "fedavg"
    server_lr: float = 1.0            # global step on the averaged delta (1.0 = plain FedAvg)
    weighting: str = "examples"       # examples: weight by training rows; uniform: every client 1

    CHECKS: ClassVar[dict] = {"server_lr": ">0", "weighting": ("examples", "uniform")}


class FedAvg(RoleModelAlgorithm):
    Config = FedAvgConfig

    def configure_train(self, rnd: int, state: Tensors, cohort: torch.Tensor) -> TrainPlan:
        return TrainPlan(round=rnd, params={k: state[k] for k in self.shared_names})

    def train_cohort(self, plan: TrainPlan, batch: CohortBatch, personal: Tensors) -> CohortUpdate:
        K = batch.size
        params = {**personal, **{k: v.expand(K, *v.shape).clone() for k, v in plan.params.items()}}
        params, loss = train_cohort_sgd(self.model, params, self.frozen, batch, self.setup.train,
                                        batch.order)
        ones = torch.ones(K, dtype=torch.float64, device=batch.mask.device)
        weights = batch.n_rows.double() if self.config.weighting == "examples" else ones
        acc = Accumulator()
        shared = {k: params[k] for k in self.shared_names}
        dp = self.setup.privacy
        if dp is not None:   # central DP: clipped deltas, every client weight 1 (bounded sensitivity)
            deltas = {k: shared[k] - plan.params[k] for k in self.shared_names}
            shared, weights = privacy.clip_updates(deltas, dp.clip)[0], ones
        keep = aggregate.fold_weighted(acc, shared, weights, {"train_loss": loss})
        new_personal = {k: torch.where(aggregate.bcast(keep, params[k]), params[k], personal[k])
                        for k in self.private_names}
        return CohortUpdate(personal=new_personal, acc=acc)

    def aggregate_train(self, rnd: int, state: Tensors, acc: Accumulator) -> tuple[Tensors, dict]:
        new, dp = dict(state), self.setup.privacy
        if dp is not None and acc.sums:
            noisy = privacy.privatize(acc, dp, self.setup.seed, rnd, self.setup.clients_per_round)
            for k in self.shared_names:
                new[k] = state[k] + self.config.server_lr * noisy[k].to(state[k].dtype)
            return new, {**aggregate.mean_stats(acc), "privacy/epsilon": self.epsilon(rnd + 1)}
        if acc.weight > 0:
            for k in self.shared_names:
                mean = (acc.sums[k] / acc.weight).to(state[k].dtype)
                new[k] = state[k] + self.config.server_lr * (mean - state[k])
        return new, aggregate.mean_stats(acc)

    def epsilon(self, rounds: int) -> float:
        """epsilon(delta) after `rounds` noisy aggregates, from the accountant (a pure function of rounds)."""
        dp = self.setup.privacy
        q = privacy.sample_rate(self.setup.clients_per_round, self.setup.num_clients)
        acct = privacy.PrivacyAccountant.from_config(dp, q)
        acct.step(rounds)
        return acct.epsilon()
