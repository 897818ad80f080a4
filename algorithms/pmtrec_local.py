"""PMTRec's federated mode with FedAvg-style local steps (`algorithm.local_update: local_steps`).

The same local compute as FedAvg-MF (algorithms/fedavg_mf.py), so the two compare at equal cost:
each client runs `train.local_epochs` full-batch steps (SGD, or Adam reset every round) on its
own row p_u and on local copies of the item rows it touches (one copy per (client, item)). At
every local step each task's loss is differentiated separately and the per-task gradients are
combined **per row** -- the client's p_u and each of its item copies -- by the `pmtrec` rule
(methods.md §2.3; task focusing uses the round as the epoch), or averaged (`equal`). The server
adds `server_lr` × the mean item-row delta over the clients that touched the row. With the one
task `[bpr]` this is exactly FedAvg-MF (tested). Central DP as in FedAvg-MF: each client's item-row
delta clipped jointly, noise on the whole summed table, the expected cohort size as denominator.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fleetrec.algorithms import privacy, rng
from fleetrec.algorithms.combiners import pmtrec_combine, task_row_grads
from fleetrec.algorithms.mf import LocalCopies, MFPersonal, MFServer
from fleetrec.algorithms.mf_tasks import ClientRows
from fleetrec.algorithms.protocol import Accumulator, CohortBatch, CohortUpdate, Tensors, TrainPlan

LOCAL_COMBINERS = ("pmtrec", "equal")
LOCAL_TASKS = ("bpr", "rating", "au")      # no category: its head would need local copies as well


@dataclass
class LocalCopyRows(ClientRows):
    """ClientRows whose item rows are the clients' own local copies (K, L, d), not a shared table."""
    qi_local: torch.Tensor | None = None
    qj_local: torch.Tensor | None = None

    def __post_init__(self):
        self.pu, self.qi, self.qj = self.p[:, None, :], self.qi_local, self.qj_local
        self.nrow = self.m.sum(1).clamp_min(1)


class LocalStepsTrainer:
    """Client = user; Q is the server state (no server optimizer: Q += server_lr · mean delta)."""

    def __init__(self, algo):
        self.algo = algo
        self.dp = privacy.CentralDP(algo.setup)

    def init_server(self) -> Tensors:
        return MFServer(Q=self.algo.init_table(self.algo.num_items, rng.MF_INIT_ITEMS)).flatten()

    def init_personal(self, client_ids: torch.Tensor) -> Tensors:
        return MFPersonal(p=self.algo.init_user_rows(client_ids)).flatten()

    def sent(self, state: Tensors) -> Tensors:
        return MFServer.unflatten(state).tables()

    def traffic(self) -> tuple[int, int]:
        n = self.algo.num_items * self.algo.config.dim * 4
        return n, n

    def combine(self, G: torch.Tensor, rnd: int) -> torch.Tensor:
        """(T, *R, d) per-task row gradients -> (*R, d): per row (pmtrec) or their mean (equal)."""
        c = self.algo.config
        if c.combiner.name == "equal":
            return G.mean(0)
        T, d = G.shape[0], G.shape[-1]
        return pmtrec_combine(G.reshape(T, -1, d), rnd, c.combiner)[0].reshape(G.shape[1:])

    def train(self, plan: TrainPlan, batch: CohortBatch, personal: Tensors) -> CohortUpdate:
        a = self.algo
        c, tr = a.config, a.setup.train
        K, m = batch.size, batch.mask
        i, j = batch.categorical["item"], a.negatives(batch, plan.round)
        lc = LocalCopies.build(i, j, m, a.num_items)                                    # U packed rows
        q0 = plan.params["Q"][lc.items].clone()                                          # (U, d)
        q = q0.clone().requires_grad_(True)
        p = MFPersonal.unflatten(personal).p.clone().requires_grad_(True)
        opt = torch.optim.Adam([p, q], lr=tr.lr) if tr.optimizer == "adam" else torch.optim.SGD([p, q], lr=tr.lr)
        r = batch.numeric[..., 0]
        last = torch.zeros(a.T)
        for _ in range(tr.local_epochs):
            qi, qj = lc.rows(q)
            rows = LocalCopyRows(p, None, {}, i, j, r, m, qi_local=qi, qj_local=qj)
            per = [t.client_loss(a, rows) for t in a.tasks]                            # T x (K,)
            losses = [x.sum() for x in per]
            Gp, Gq = task_row_grads(losses, p, q)                                       # (T, K, d), (T, U, d)
            opt.zero_grad()
            p.grad, q.grad = self.combine(Gp, plan.round).detach(), self.combine(Gq, plan.round).detach()
            opt.step()
            last = torch.stack([x.detach().sum() for x in per])
        delta = q.detach() - q0                                                          # (U, d)
        if self.dp.enabled:                                                              # per client, jointly
            delta = lc.clip_per_client(delta, self.dp.cfg.clip)
        acc = Accumulator(weight=float(K), clients=K,
                          stats={f"train/{t}_loss": float(x) for t, x in zip(c.tasks, last)})
        acc.sums = lc.sums(delta, a.num_items)
        return CohortUpdate(personal=MFPersonal(p=p.detach()).flatten(), acc=acc)

    def aggregate(self, rnd: int, state: Tensors, acc: Accumulator, stats: dict) -> Tensors:
        s = MFServer.unflatten(state)
        if self.dp.enabled:
            mean = self.dp.mean_delta(Accumulator(weight=acc.weight, clients=acc.clients, sums={"dQ": acc.sums["dQ"]}),
                                      rnd)["dQ"]
            stats.update(self.dp.metrics(rnd))
        else:
            mean = acc.sums["dQ"] / acc.sums["nQ"].clamp_min(1)[:, None]
        return s.replace(Q=s.Q + self.algo.config.server_lr * mean.float()).flatten()
