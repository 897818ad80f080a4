"""PMTRec's federated mode: client = user, one gradient per round at the current item table.

A client computes its per-task gradients on all its training rows at the current Q; its own
row p_u (private state, with its Adam moments) is combined locally; per-task sums of item-row
gradients and touch counts are uploaded, and the server combines each item row with the same
rule before an Adam step on Q (FedSGD on the item table). Only tasks computable from one user's
own rows run here (`MFTask.FEDERATED`).
"""
from __future__ import annotations

import torch

from fleetrec.algorithms import rng
from fleetrec.algorithms.combiners import CombineInput, gather_rows, pmtrec_combine, task_row_grads, touched_mask
from fleetrec.algorithms.mf import MFPersonal, MFServer
from fleetrec.algorithms.mf_tasks import ClientRows
from fleetrec.algorithms.optim import adam_rows
from fleetrec.algorithms.protocol import Accumulator, CohortBatch, CohortUpdate, Tensors, TrainPlan


class FederatedTrainer:
    def __init__(self, algo):
        self.algo = algo

    # ---- state
    def init_server(self) -> Tensors:
        a = self.algo
        return a.with_moments({"Q": a.init_table(a.num_items, rng.MF_INIT_ITEMS), **a.head_tables()}).flatten()

    def init_personal(self, client_ids: torch.Tensor) -> Tensors:
        K, d = len(client_ids), self.algo.config.dim
        return MFPersonal(p=self.algo.init_user_rows(client_ids), m=torch.zeros(K, d), v=torch.zeros(K, d),
                          step=torch.zeros(K)).flatten()

    def sent(self, state: Tensors) -> Tensors:
        return MFServer.unflatten(state).tables()         # Q and the category head, without the moments

    def traffic(self) -> tuple[int, int]:
        a = self.algo
        d = a.config.dim
        down = (a.num_items * d + (max(a.num_categories, 1) * (d + 1) if a.head_names else 0)) * 4
        return a.T * down, down

    # ---- client half
    def client_losses(self, p_leaf, Qr, head, batch: CohortBatch, rnd: int):
        """Per task: (sum over clients of the client's mean loss, (T, K) per-client losses), i, j."""
        a = self.algo
        i = batch.categorical["item"]
        j = a.negatives(batch, rnd)
        rows = ClientRows(p_leaf, Qr, head, i, j, batch.numeric[..., 0], batch.mask)
        per = [t.client_loss(a, rows) for t in a.tasks]
        return [x.sum() for x in per], torch.stack([x.detach() for x in per]), i, j

    def train(self, plan: TrainPlan, batch: CohortBatch, personal: Tensors) -> CohortUpdate:
        a = self.algo
        c, tr = a.config, a.setup.train
        K = batch.size
        own = MFPersonal.unflatten(personal)
        p_leaf = own.p.clone().requires_grad_(True)
        i_all = batch.categorical["item"]
        j_all = a.negatives(batch, plan.round)
        real = batch.mask > 0
        Qr = gather_rows(plan.params["Q"], i_all, j_all)       # padded rows too (masked out of every loss)
        head = {k: plan.params[k].detach().clone().requires_grad_(True) for k in a.head_names}
        losses, per_client, i, j = self.client_losses(p_leaf, Qr, head, batch, plan.round)
        Gp, Gq = task_row_grads(losses, p_leaf, Qr.emb)                             # (T, K, d), (T, R, d)
        tp = torch.tensor([t.USER_ROW for t in a.tasks])[:, None].expand(a.T, K)
        tq = touched_mask(Qr.rows, [t.client_items(i[real], j[real]) for t in a.tasks])
        for x, t in enumerate(a.tasks):
            mask = t.item_mask(a, Qr.rows)
            if mask is not None:
                tq[x] &= mask
        # the user row: combined locally, per client
        if c.combiner.name == "pmtrec":
            gp = pmtrec_combine(Gp, plan.round, c.combiner, tp)[0]
        else:
            gp = torch.stack([a.combiner.combine(CombineInput(
                losses=per_client[:, k], grads=Gp[:, k], step=plan.round * a.setup.num_clients
                + int(batch.client_ids[k]), epoch=plan.round)).grad for k in range(K)]) if K else Gp[0]
        with torch.no_grad():
            p, mp, vp = own.p.clone(), own.m.clone(), own.v.clone()
            stp = own.step + 1
            gp = gp + tr.weight_decay * p if tr.weight_decay else gp
            if tr.optimizer == "adam":
                adam_rows(p, mp, vp, slice(None), gp, stp, tr.lr)
            else:
                p -= tr.lr * gp
        # item rows and the head: per-task sums and touch counts go up
        acc = Accumulator(weight=float(K), clients=K)
        for t in range(a.T):
            dense = torch.zeros(a.num_items, c.dim, dtype=torch.float64)
            dense.index_add_(0, Qr.rows, Gq[t].double())
            acc.sums[f"gq/{t}"] = dense
            cnt = torch.zeros(a.num_items, dtype=torch.float64)
            cnt.index_add_(0, Qr.rows, tq[t].double())
            acc.sums[f"nq/{t}"] = cnt
        if head:
            lc = losses[c.tasks.index("category")]
            for k, g in zip(head, torch.autograd.grad(lc, list(head.values()), allow_unused=True)):
                acc.sums[f"g{k}"] = (torch.zeros_like(head[k]) if g is None else g).double()
        acc.stats = {f"train/{t}_loss": float(per_client[x].sum()) for x, t in enumerate(c.tasks)}
        return CohortUpdate(personal=MFPersonal(p=p, m=mp, v=vp, step=stp).flatten(), acc=acc)

    # ---- server half
    def combine_item_rows(self, G: torch.Tensor, touched: torch.Tensor, losses: torch.Tensor, rnd: int) -> torch.Tensor:
        """(T, I, d) per-task item-row gradients -> (I, d) combined (rows touched by no task stay zero)."""
        rows = torch.nonzero(touched.any(0)).flatten()
        out = torch.zeros(G.shape[1:], dtype=G.dtype)
        if not len(rows):
            return out
        _, g = self.algo.combine(losses, None, G[:, rows], None, touched[:, rows], rnd, rnd)
        out[rows] = g
        return out

    def aggregate(self, rnd: int, state: Tensors, acc: Accumulator, stats: dict) -> Tensors:
        a = self.algo
        new = MFServer.unflatten({k: v.clone() for k, v in state.items()})   # stepped in place
        tables = new.tables()
        G = torch.stack([acc.sums[f"gq/{t}"] for t in range(a.T)]).float() / acc.weight   # (T, I, d) means
        touched = torch.stack([acc.sums[f"nq/{t}"] for t in range(a.T)]) > 0
        losses = torch.tensor([stats[f"train/{t}_loss"] for t in a.config.tasks])
        gq = self.combine_item_rows(G, touched, losses, rnd)
        step = float(new.step) + 1
        rows = torch.nonzero(touched.any(0)).flatten()
        lr = a.config.server_lr
        adam_rows(new.Q, new.m["Q"], new.v["Q"], rows, gq[rows], step, lr)
        for k in a.head_names:
            adam_rows(tables[k], new.m[k], new.v[k], slice(None), (acc.sums[f"g{k}"] / acc.weight).float(), step, lr)
        return new.replace(step=torch.tensor(step)).flatten()
