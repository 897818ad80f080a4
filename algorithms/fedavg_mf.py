"""FedAvg on BPR-MF, the federated baseline of PMTRec (client = user).

Each client runs `train.local_epochs` full-batch local steps (SGD, or Adam reset every round) on
its own row p_u (private state) and on local copies of the item rows it touches (deduplicated per
client); the server adds `server_lr` × the mean of the item-row deltas, over the clients that
touched a row (`item_average: touched`) or over the whole cohort (`cohort`).

Central DP (`privacy.enabled`): each client's item-row delta (all its rows jointly; p_u never
leaves the client) is clipped to L2 norm C, the server adds N(0, (σC)²) to every coordinate of
the summed (I, d) delta -- rows nobody touched included -- and divides by the expected cohort
size (`privacy.CentralDP`), so only `item_average: cohort` is private (who touched a row is not).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from fleetrec.algorithms import privacy, rng
from fleetrec.algorithms.mf import MF_EXAMPLE, LocalCopies, MFAlgorithm, MFPersonal, MFServer
from fleetrec.algorithms.protocol import (CENTRAL_DP, Accumulator, AlgorithmConfig, CohortBatch, CohortUpdate, Setup,
                                          Tensors, TrainPlan)


@dataclass(frozen=True)
class FedAvgMFConfig(AlgorithmConfig):
    name: str = "fedavg_mf"
    dim: int = 32
    init_std: float = 0.1
    reg: float = 1e-4
    server_lr: float = 1.0             # Q += server_lr · (mean delta)
    item_average: str = "touched"      # touched: mean over the clients that touched the row | cohort: over all
    ks: tuple[int, ...] = (20, 40)

    CHECKS: ClassVar[dict] = {"dim": ">=1", "init_std": ">0", "reg": ">=0", "server_lr": ">0",
                              "item_average": ("touched", "cohort")}

    def data_layout(self) -> str:
        return "federated"

    def ranking_ks(self) -> tuple[int, ...]:
        return tuple(self.ks)

    def check_privacy(self, priv) -> str | None:
        if priv.enabled and self.item_average != "cohort":
            return ("algorithm.item_average: with privacy.enabled the item-row mean is over the cohort (how many "
                    f"clients touched a row is not private); set algorithm.item_average=cohort, got {self.item_average!r}")
        return None


class FedAvgMF(MFAlgorithm):
    Config = FedAvgMFConfig
    READS_SIDE_TABLES = False          # BPR on the interactions only
    PRIVACY = frozenset({CENTRAL_DP})
    EXAMPLES = {"federated": {**MF_EXAMPLE, "data.layout": "federated", "train.lr": 0.1,
                              "algorithm.item_average": "cohort"}}

    def __init__(self, config: FedAvgMFConfig, setup: Setup):
        super().__init__(config, setup, centralized=False)
        self.dp = privacy.CentralDP(setup)

    def init_server(self) -> Tensors:
        return MFServer(Q=self.init_table(self.num_items, rng.MF_INIT_ITEMS)).flatten()

    def init_personal(self, client_ids: torch.Tensor) -> Tensors:
        return MFPersonal(p=self.init_user_rows(client_ids)).flatten()

    def configure_train(self, rnd: int, state: Tensors, cohort: torch.Tensor) -> TrainPlan:
        return TrainPlan(round=rnd, params=MFServer.unflatten(state).tables())

    def traffic(self) -> tuple[int, int]:
        n = self.num_items * self.config.dim * 4
        return n, n

    def train_cohort(self, plan: TrainPlan, batch: CohortBatch, personal: Tensors) -> CohortUpdate:
        c, tr = self.config, self.setup.train
        K, m = batch.size, batch.mask
        nrow = m.sum(1).clamp_min(1)
        i, j = batch.categorical["item"], self.negatives(batch, plan.round)
        lc = LocalCopies.build(i, j, m, self.num_items)        # one packed local row per (client, item)
        q0 = plan.params["Q"][lc.items].clone()                                      # (U, d)
        q = q0.clone().requires_grad_(True)
        p = MFPersonal.unflatten(personal).p.clone().requires_grad_(True)
        opt = torch.optim.Adam([p, q], lr=tr.lr) if tr.optimizer == "adam" else torch.optim.SGD([p, q], lr=tr.lr)
        loss_val = 0.0
        for _ in range(tr.local_epochs):
            qi, qj = lc.rows(q)
            x = (p[:, None, :] * (qi - qj)).sum(-1)
            per = ((-F.logsigmoid(x) + c.reg * (qi.pow(2).sum(-1) + qj.pow(2).sum(-1))) * m).sum(1) / nrow \
                + c.reg * p.pow(2).sum(-1)
            opt.zero_grad()
            per.sum().backward()
            opt.step()
            loss_val = float(per.detach().sum())
        delta = q.detach() - q0                                                      # (U, d)
        if self.dp.enabled:                                        # per client, jointly over its item rows
            delta = lc.clip_per_client(delta, self.dp.cfg.clip)
        acc = Accumulator(weight=float(K), clients=K, stats={"train/bpr_loss": loss_val},
                          sums=lc.sums(delta, self.num_items))
        return CohortUpdate(personal=MFPersonal(p=p.detach()).flatten(), acc=acc)


    def aggregate_train(self, rnd: int, state: Tensors, acc: Accumulator) -> tuple[Tensors, dict]:
        if acc.weight <= 0:
            return state, {}
        s = MFServer.unflatten(state)
        if self.dp.enabled:          # noise on the whole summed delta, the expected cohort size as denominator
            mean = self.dp.mean_delta(Accumulator(weight=acc.weight, clients=acc.clients, sums={"dQ": acc.sums["dQ"]}),
                                      rnd)["dQ"]
        else:
            denom = acc.sums["nQ"].clamp_min(1)[:, None] if self.config.item_average == "touched" else acc.weight
            mean = acc.sums["dQ"] / denom
        new = s.replace(Q=s.Q + self.config.server_lr * mean.float()).flatten()
        loss = acc.stats.get("train/bpr_loss", 0.0) / acc.weight
        return new, {"train/bpr_loss": loss, "train_loss": loss, "clients_trained": acc.clients, **self.dp.metrics(rnd)}
