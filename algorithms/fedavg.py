"""FedAvg on a model with parameter roles.

Client half: start from the global `shared` tensors and the client's own `private` tensors,
run local minibatch training, return the new private tensors and fold the shared ones into
the accumulator weighted by the client's training rows. Server half: the weighted mean.
`frozen` tensors are set once and never trained or sent.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from fleetrec.algorithms import aggregate, privacy, server_opt, sparse_rows
from fleetrec.algorithms.base import RoleModelAlgorithm
from fleetrec.algorithms.protocol import CENTRAL_DP, LOCAL_DP, Accumulator, AlgorithmConfig, CohortBatch, CohortUpdate, Tensors, TrainPlan
from fleetrec.algorithms.server_opt import ServerOptimizerConfig
from fleetrec.algorithms.vectorized import train_cohort_sgd


# a tiny per-user federation (the registry-wide tests run every algorithm on its EXAMPLES)
PER_USER_EXAMPLE = {
    "data.num_clients": 37, "data.num_items": 40, "data.rows_min": 5, "data.rows_max": 30,
    "federation.clients_per_round": 20, "resources.workers": 2, "resources.cpus_per_worker": 0.5,
    "model.dim": 8, "model.hidden": "[8]", "train.lr": 0.1}


@dataclass(frozen=True)
class FedAvgConfig(AlgorithmConfig):
    name: str = "fedavg"
    server_lr: float = 1.0            # global step on the averaged delta (1.0 = plain FedAvg)
    weighting: str = "examples"       # examples: weight by training rows; uniform: every client 1
    sparse_rows: bool = True          # clients train only the rows of embedding tables (shared, and
                                      # private ones such as FedRAP's D_u) they touch (exact; used
                                      # when train.weight_decay is 0 and local DP is off)
    server_optimizer: ServerOptimizerConfig = field(default_factory=ServerOptimizerConfig)   # rule on the mean delta

    CHECKS: ClassVar[dict] = {"server_lr": ">0", "weighting": ("examples", "uniform")}

    def check_privacy(self, privacy) -> str | None:
        if privacy.local.enabled and self.weighting == "examples":
            return ("privacy.local: algorithm.weighting=examples sends each client's row count with its noisy update, "
                    "which local DP does not hide; set algorithm.weighting=uniform")
        return None


class FedAvg(RoleModelAlgorithm):
    Config = FedAvgConfig
    PRIVACY = frozenset({CENTRAL_DP, LOCAL_DP})
    LR_SCHEDULE = True
    LOCAL_DP_SETTINGS = {"algorithm.weighting": "uniform"}
    EXAMPLES = {"per_user": PER_USER_EXAMPLE,
                # FedAdam: the server rule's moments must survive a resume and a worker loss
                "fedadam": {**PER_USER_EXAMPLE, "algorithm.server_optimizer": "{name: adam}",
                            "algorithm.server_lr": 0.03}}

    def __init__(self, config: FedAvgConfig, setup):
        super().__init__(config, setup)
        self.dp = privacy.CentralDP(setup)
        self.ldp = privacy.LocalDP(setup, {k: tuple(self._initial[k].shape) for k in self.shared_names})
        self.sends_deltas = self.dp.enabled or self.ldp.enabled    # else the clients' new tensors are summed

    def init_server(self) -> Tensors:
        shared = super().init_server()
        return {**shared, **server_opt.init_state(self.config.server_optimizer, shared)}

    def configure_train(self, rnd: int, state: Tensors, cohort: torch.Tensor) -> TrainPlan:
        return TrainPlan(round=rnd, params={k: state[k] for k in self.shared_names})

    def _row_vocab(self, batch: CohortBatch) -> dict[str, str]:
        """Embedding tables (shared or private) trained as per-client row subsets: name -> field."""
        if not self.config.sparse_rows or self.setup.train.weight_decay or self.ldp.enabled:
            return {}     # (local DP noises every row: sending touched rows only would reveal them)
        tables = self.model.row_tables()                            # param name -> categorical field
        out = {}
        for name, field in tables.items():
            if (name in self.shared_names or name in self.private_names) and field in batch.categorical:
                out[name] = field
        return out

    def train_cohort(self, plan: TrainPlan, batch: CohortBatch, personal: Tensors) -> CohortUpdate:
        K = batch.size
        fields = self._row_vocab(batch)
        vocab, recoded, by_field = {}, dict(batch.categorical), {}
        for name, field in fields.items():
            if field not in by_field:
                by_field[field] = sparse_rows.local_vocab(batch.categorical[field])
            vocab[name], recoded[field] = by_field[field]
        if vocab:
            batch = dataclasses.replace(batch, categorical=recoded)
        start = {k: sparse_rows.gather_rows(v, vocab[k]) if k in vocab else v.expand(K, *v.shape)
                 for k, v in plan.params.items()}
        own = {k: sparse_rows.gather_own_rows(v, vocab[k]) if k in vocab else v for k, v in personal.items()}
        params = {**own, **{k: v if k in vocab else v.clone() for k, v in start.items()}}
        params, loss = train_cohort_sgd(self.model, params, self.frozen, batch, self.setup.train,
                                        batch.order, plan.round)
        ones = torch.ones(K, dtype=torch.float64, device=batch.mask.device)
        weights = batch.n_rows.double() if self.config.weighting == "examples" else ones
        acc = Accumulator()
        dp = self.sends_deltas
        if dp:               # local DP: noisy deltas; central DP: clipped deltas, every client weight 1
            up = self.ldp.apply({k: params[k] - start[k] for k in self.shared_names}, plan.round, batch.client_ids)
            up, weights = self.dp.client(up, weights)
        else:
            up = {k: params[k] - start[k] if k in vocab else params[k] for k in self.shared_names}
        dense = {k: v for k, v in up.items() if k not in vocab}
        rows = [k for k in self.shared_names if k in vocab]          # shared tables sent as touched rows
        keep = aggregate.fold_weighted(acc, dense, weights, {"train_loss": loss},
                                       also_check={k: up[k] for k in rows})
        for k in rows:
            table = plan.params[k]
            aggregate.fold_rows(acc, k, table.shape[0], vocab[k], up[k], weights, keep,
                                base=None if dp else table)
        trained = {k: sparse_rows.put_own_rows(personal[k], vocab[k], params[k]) if k in vocab else params[k]
                   for k in self.private_names}
        new_personal = {k: torch.where(aggregate.bcast(keep, trained[k]), trained[k], personal[k])
                        for k in self.private_names}
        return CohortUpdate(personal=new_personal, acc=acc)

    def aggregate_train(self, rnd: int, state: Tensors, acc: Accumulator) -> tuple[Tensors, dict]:
        opt, lr = self.config.server_optimizer, self.config.server_lr
        if self.sends_deltas and acc.sums:      # the summed updates are deltas (central DP: their noisy mean)
            noisy = self.dp.mean_delta(acc, rnd)
            privacy_metrics = {**self.dp.metrics(rnd), **self.ldp.metrics(rnd)}
            if noisy is None:                   # no update kept (all dropped): the state stays
                return dict(state), {**aggregate.mean_stats(acc), **privacy_metrics}
            delta = {k: noisy[k].to(state[k].dtype) for k in self.shared_names}
            return server_opt.apply(opt, lr, state, delta), {**aggregate.mean_stats(acc), **privacy_metrics}
        if acc.weight > 0:                      # the summed updates are the clients' new tensors
            delta = {k: (acc.sums[k] / acc.weight).to(state[k].dtype) - state[k] for k in self.shared_names}
            return server_opt.apply(opt, lr, state, delta), aggregate.mean_stats(acc)
        return dict(state), aggregate.mean_stats(acc)
