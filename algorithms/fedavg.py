"""FedAvg on a model with parameter roles.

Client half: start from the global `shared` tensors and the client's own `private` tensors,
run local minibatch training, return the new private tensors and fold the shared ones into
the accumulator weighted by the client's training rows. Server half: the weighted mean.
`frozen` tensors are set once and never trained or sent.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from algorithms import aggregate, privacy, sparse_rows
from algorithms.base import RoleModelAlgorithm
from algorithms.protocol import CENTRAL_DP, Accumulator, AlgorithmConfig, CohortBatch, CohortUpdate, Tensors, TrainPlan
from algorithms.vectorized import train_cohort_sgd


@dataclass(frozen=True)
class FedAvgConfig(AlgorithmConfig):
    name: str = "fedavg"
    server_lr: float = 1.0            # global step on the averaged delta (1.0 = plain FedAvg)
    weighting: str = "examples"       # examples: weight by training rows; uniform: every client 1
    sparse_rows: bool = True          # clients train only the rows of shared embedding tables they
                                      # touch (exact; used when train.weight_decay is 0)

    CHECKS: ClassVar[dict] = {"server_lr": ">0", "weighting": ("examples", "uniform")}


class FedAvg(RoleModelAlgorithm):
    Config = FedAvgConfig
    PRIVACY = frozenset({CENTRAL_DP})
    EXAMPLES = {"per_user": {
        "data.num_clients": 37, "data.num_items": 40, "data.rows_min": 5, "data.rows_max": 30,
        "federation.clients_per_round": 20, "resources.workers": 2, "resources.cpus_per_worker": 0.5,
        "model.dim": 8, "model.hidden": "[8]", "train.lr": 0.1}}

    def configure_train(self, rnd: int, state: Tensors, cohort: torch.Tensor) -> TrainPlan:
        return TrainPlan(round=rnd, params={k: state[k] for k in self.shared_names})

    def _row_vocab(self, batch: CohortBatch) -> dict[str, torch.Tensor]:
        """Shared embedding tables trained as per-client row subsets: name -> (K, U) vocab."""
        if not self.config.sparse_rows or self.setup.train.weight_decay:
            return {}
        tables = self.model.row_tables()                            # param name -> categorical field
        out = {}
        for name, field in tables.items():
            if name in self.shared_names and field in batch.categorical:
                out[name] = field
        return out

    def train_cohort(self, plan: TrainPlan, batch: CohortBatch, personal: Tensors) -> CohortUpdate:
        K = batch.size
        fields = self._row_vocab(batch)
        vocab, recoded = {}, dict(batch.categorical)
        for name, field in fields.items():
            vocab[name], recoded[field] = sparse_rows.local_vocab(batch.categorical[field])
        if vocab:
            batch = dataclasses.replace(batch, categorical=recoded)
        start = {k: sparse_rows.gather_rows(v, vocab[k]) if k in vocab else v.expand(K, *v.shape)
                 for k, v in plan.params.items()}
        params = {**personal, **{k: v if k in vocab else v.clone() for k, v in start.items()}}
        params, loss = train_cohort_sgd(self.model, params, self.frozen, batch, self.setup.train,
                                        batch.order)
        ones = torch.ones(K, dtype=torch.float64, device=batch.mask.device)
        weights = batch.n_rows.double() if self.config.weighting == "examples" else ones
        acc = Accumulator()
        dp = self.setup.privacy
        if dp is not None:   # central DP: clipped deltas, every client weight 1 (bounded sensitivity)
            up = privacy.clip_updates({k: params[k] - start[k] for k in self.shared_names}, dp.clip)[0]
            weights = ones
        else:
            up = {k: params[k] - start[k] if k in vocab else params[k] for k in self.shared_names}
        dense = {k: v for k, v in up.items() if k not in vocab}
        keep = aggregate.fold_weighted(acc, dense, weights, {"train_loss": loss},
                                       also_check={k: up[k] for k in vocab})
        for k in vocab:
            table = plan.params[k]
            aggregate.fold_rows(acc, k, table.shape[0], vocab[k], up[k], weights, keep,
                                base=None if dp is not None else table)
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
