"""PMTRec's centralized mode (the paper's setting): one client holds every row, and one round is
`train.local_epochs` epochs of minibatches over all of them.

P, Q, the category head, their Adam moments and the combiner's history (DWA losses, GradNorm
weights, uncertainty log-variances and their Adam moments: `MFServer.combiner` and
`combiner_adam`) are the server state that the one client trains and returns: the history is
loaded before and written after every round, so a resumed run or a restarted worker continues
it exactly.
"""
from __future__ import annotations

import torch

from fleetrec.algorithms import rng
from fleetrec.algorithms.combiners import gather_rows, make_combiner, task_row_grads, touched_mask
from fleetrec.algorithms.mf import MFServer
from fleetrec.algorithms.mf_tasks import TASK_ORDER, CentralRows
from fleetrec.algorithms.optim import adam_rows
from fleetrec.algorithms.protocol import Accumulator, CohortBatch, CohortUpdate, Tensors, TrainPlan

_OPT_KEYS = ("step", "exp_avg", "exp_avg_sq")


class CentralizedTrainer:
    def __init__(self, algo):
        self.algo = algo

    # ---- state
    def init_server(self) -> Tensors:
        a = self.algo
        return a.with_moments({"Q": a.init_table(a.num_items, rng.MF_INIT_ITEMS),
                               "P": a.init_table(a.num_users, rng.MF_INIT_USERS), **a.head_tables()},
                              **self._fresh_combiner_state()).flatten()

    def init_personal(self, client_ids: torch.Tensor) -> Tensors:
        return {}

    def sent(self, state: Tensors) -> Tensors:
        return state

    def traffic(self) -> tuple[int, int]:
        a = self.algo
        n = (a.num_users + a.num_items) * a.config.dim * 4
        return n, n

    def _fresh_combiner_state(self) -> dict:
        a = self.algo
        fresh = make_combiner(a.config.combiner, a.T, a.setup.seed)
        opt = {}
        if fresh.parameters():                     # learned weights: their Adam step count and moments
            opt = {"step": torch.zeros(()), "exp_avg": torch.zeros(a.T), "exp_avg_sq": torch.zeros(a.T)}
        return {"combiner": dict(fresh.state_tensors()), "combiner_adam": opt}

    def _load_combiner_state(self, s: MFServer) -> None:
        """The combiner object (a cache) rebuilt from the server state before a round."""
        a = self.algo
        a.combiner.load_state_tensors(s.combiner)
        if a.combiner_opt is not None:
            (param,) = a.combiner.parameters()
            st = {k: s.combiner_adam[k].clone() for k in _OPT_KEYS}
            a.combiner_opt.state.clear()
            if float(st["step"]) > 0:
                a.combiner_opt.state[param] = st

    def _save_combiner_state(self, s: MFServer) -> MFServer:
        """The server state with the combiner's history after a round."""
        a = self.algo
        opt = dict(s.combiner_adam)
        if a.combiner_opt is not None:
            (param,) = a.combiner.parameters()
            st = a.combiner_opt.state.get(param)
            if st:
                opt = {k: st[k].detach().clone().float().reshape(opt[k].shape) for k in _OPT_KEYS}
        return s.replace(combiner=dict(a.combiner.state_tensors()), combiner_adam=opt)

    # ---- one minibatch
    def sample(self, u: torch.Tensor, i: torch.Tensor, gen: torch.Generator) -> dict:
        """Every task's extra ids of a minibatch, drawn in the fixed order TASK_ORDER."""
        a = self.algo
        aux = {}
        for name in TASK_ORDER:
            if name in a.config.tasks:
                got = a.tasks[a.config.tasks.index(name)].sample(a, u, i, gen)
                if got is not None:
                    aux[name] = got
        return aux

    def task_ids(self, u, i, j, aux) -> tuple[list, list]:
        """Per task: the user ids and item ids it references (for the exact touched masks)."""
        pairs = [t.ids(u, i, j, aux) for t in self.algo.tasks]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    def losses(self, rows: CentralRows) -> list[torch.Tensor]:
        return [t.loss(self.algo, rows) for t in self.algo.tasks]

    def step(self, s: MFServer, u, i, r, epoch: int) -> dict:
        """One minibatch (u, i, r) in place on the tensors of the state `s`; returns the per-task losses."""
        a = self.algo
        c, tr = a.config, a.setup.train
        tables = s.tables()
        step = int(s.step) + 1
        gen = rng.torch_generator(a.setup.seed, rng.MF_NEGATIVES, step)
        j = torch.randint(a.num_items, u.shape, generator=gen)
        aux = self.sample(u, i, gen)
        users, items = self.task_ids(u, i, j, aux)
        Pr = gather_rows(s.P, *users)
        Qr = gather_rows(s.Q, *items)
        head = {k: tables[k].detach().clone().requires_grad_(True) for k in a.head_names}
        losses = self.losses(CentralRows(Pr, Qr, head, u, i, j, r, aux))
        Gp, Gq = task_row_grads(losses, Pr.emb, Qr.emb)
        head_grads = {}
        if head:
            lc = losses[c.tasks.index("category")]
            head_grads = dict(zip(head, torch.autograd.grad(lc, list(head.values()), allow_unused=True)))
        L = torch.stack([x.detach() for x in losses])
        tp, tq = touched_mask(Pr.rows, users), touched_mask(Qr.rows, items)
        gp, gq = a.combine(L, Gp, Gq, tp, tq, epoch, step)
        with torch.no_grad():
            for name, rows, g in (("P", Pr.rows, gp), ("Q", Qr.rows, gq)):
                g = g + tr.weight_decay * tables[name][rows] if tr.weight_decay else g
                if tr.optimizer == "adam":
                    adam_rows(tables[name], s.m[name], s.v[name], rows, g, step, tr.lr)
                else:
                    tables[name][rows] -= tr.lr * g
            for name, g in head_grads.items():
                if g is None:
                    continue
                if tr.optimizer == "adam":
                    adam_rows(tables[name], s.m[name], s.v[name], slice(None), g, step, tr.lr)
                else:
                    tables[name] -= tr.lr * g
            s.step.fill_(float(step))
        return {**{f"train/{t}_loss": float(x) for t, x in zip(c.tasks, L)}, **a.diagnostics}

    # ---- one round
    def train(self, plan: TrainPlan, batch: CohortBatch, personal: Tensors) -> CohortUpdate:
        s = MFServer.unflatten({k: v.clone() for k, v in plan.params.items()})   # trained in place
        self._load_combiner_state(s)
        n = int(batch.n_rows[0])
        user, item = batch.categorical["user"][0], batch.categorical["item"][0]
        rating = batch.numeric[0, :, 0]
        E, B = self.algo.setup.train.local_epochs, self.algo.setup.train.batch_size
        sums, count = {}, 0
        for e in range(E):
            order = batch.order[e, 0, :n]
            epoch = plan.round * E + e
            for lo in range(0, n, B):
                idx = order[lo:lo + B]
                for k, v in self.step(s, user[idx], item[idx], rating[idx], epoch).items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
        s = self._save_combiner_state(s)
        acc = Accumulator(sums={k: v.double() for k, v in s.flatten().items()}, weight=1.0, clients=1,
                          stats={k: v / max(count, 1) for k, v in sums.items()})
        return CohortUpdate(personal={}, acc=acc)

    def aggregate(self, rnd: int, state: Tensors, acc: Accumulator, stats: dict) -> Tensors:
        return {k: (acc.sums[k] / acc.weight).to(state[k].dtype) for k in state}
