"""PMTRec on matrix factorization with auxiliary tasks (methods.md §2), centralized and federated,
and the FedAvg-MF baseline.

Model: user table P (|U|, d), item table Q (|I|, d), score p_u · q_i; a linear category head
(W, b) when the `category` task is on. Tasks (task 0 is always the main `bpr`):

    bpr       BPR on (u, i+, i-), one uniform negative, + reg·(||p_u||² + ||q_i+||² + ||q_i-||²)
    social    BPR on trust edges of the batch's users: -log σ(p_u·p_v - p_u·p_v-)        (P only)
    coview    BPR on item pairs of the batch's items:  -log σ(q_i·q_j - q_i·q_j-)        (Q only)
    category  softmax cross-entropy of W q_i + b on the batch items' categories          (Q + head)
    rating    (p_u·q_i - r/rating_scale)² on the batch's rated pairs
    au        DirectAU: alignment of normalized positive pairs + uniformity of the batch's users and items

Per-task gradients are taken only for the rows a batch touches (`gather_rows` + one
`autograd.grad` per task on the gathered leaf), combined by the configured combiner --
`pmtrec` per row (α, τ and the §2.3 flags), every other combiner on the touched rows of P and Q
as one vector, as they are defined in algorithms/combiners -- and applied by a row-wise (lazy)
Adam or SGD. The category head follows its own plain gradient.

Modes (`algorithm.mode`, which must match `data.layout`):
- centralized: one client holds every row; one round = `train.local_epochs` epochs of minibatches
  (the paper's setting). P, Q, the head and the Adam moments are the server state that the one
  client trains and returns.
- federated: client = user. A client computes its per-task gradients on all its training rows
  at the current Q; its own row p_u (private state, with its Adam moments) is combined locally;
  per-task sums of item-row gradients and touch counts are uploaded, and the server combines
  each item row with the same rule before an Adam step on Q (FedSGD on the item table).

Evaluation: full-ranking Recall@K / NDCG@K (algorithms/ranking.py) with training items masked
(training and validation items for the test split): `evaluate_cohort` returns a RankingPartial.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from fleetrec.algorithms import rng
from fleetrec.algorithms.combiners import (COMBINERS, CombineInput, CombinerConfig, PMTRecConfig, gather_rows, make_combiner,
                                           pmtrec_combine, task_row_grads, touched_mask)
from fleetrec.algorithms.evaluation import RankingPartial, ranking_metrics
from fleetrec.algorithms.protocol import (RANKING, Accumulator, AlgorithmBase, AlgorithmConfig, CohortBatch, CohortUpdate,
                                          Setup, Tensors, TrainPlan)
from fleetrec.algorithms.ranking import full_ranking
from fleetrec.datasets.federated import TRAIN, VAL

TASKS = ("bpr", "social", "coview", "category", "rating", "au")
FEDERATED_TASKS = ("bpr", "category", "rating", "au")
HISTORY_COMBINERS = ("uncertainty", "dwa", "gradnorm")   # keep state across calls: centralized only
MF_EXAMPLE = {"data.name": "mf_synthetic", "data.num_users": 40, "data.num_items": 30, "data.rows_per_user": 8,
              "data.num_categories": 4, "eval.metric": "recall@20", "federation.clients_per_round": 20,
              "resources.workers": 2, "resources.cpus_per_worker": 0.5}   # a tiny run (registry-wide tests)
COMBINER_PREFIX, COMBINER_OPT_PREFIX = "combiner/", "combiner_adam/"   # server-state keys of the combiner history
BETAS, EPS = (0.9, 0.999), 1e-8


def _neighbor_triples(graph, nodes: torch.Tensor, num_nodes: int, gen: torch.Generator):
    """BPR triples on a graph in CSR form (indptr, dst): each distinct node of `nodes` that has a
    neighbour, one uniformly drawn neighbour (positive) and one uniformly drawn node (negative)."""
    indptr, dst = graph
    src = torch.unique(nodes)
    deg = indptr[src + 1] - indptr[src]
    src, deg = src[deg > 0], deg[deg > 0]
    pick = indptr[src] + (torch.rand(len(src), generator=gen) * deg).long().clamp_max(deg - 1)
    return src, dst[pick], torch.randint(num_nodes, (len(src),), generator=gen)


@dataclass(frozen=True)
class PMTRecAlgoConfig(AlgorithmConfig):
    name: str = "pmtrec"
    mode: str = "centralized"          # centralized (data.layout=centralized) | federated (data.layout=federated)
    tasks: tuple[str, ...] = ("bpr", "social", "rating", "au")   # first = main task, must be bpr
    combiner: CombinerConfig = field(default_factory=PMTRecConfig)
    dim: int = 32                      # embedding dimension d
    init_std: float = 0.1              # N(0, init_std²) initial embeddings
    reg: float = 1e-4                  # λ_reg of the main BPR loss
    rating_scale: float = 5.0          # rating task regresses p·q on rating / rating_scale
    unif_sample: int = 256             # rows of each table in the uniformity term (first ones of the batch)
    server_lr: float = 1e-3            # federated: Adam step size on item rows and the head at the server
    ks: tuple[int, ...] = (20, 40)     # Recall@K / NDCG@K cut-offs

    CHECKS: ClassVar[dict] = {"mode": ("centralized", "federated"), "dim": ">=1", "init_std": ">0", "reg": ">=0",
                              "rating_scale": ">0", "unif_sample": ">=2", "server_lr": ">0"}

    def data_layout(self) -> str:
        return self.mode

    def ranking_ks(self) -> tuple[int, ...]:
        return tuple(self.ks)

    def validate(self) -> str | None:
        if not self.tasks or self.tasks[0] != "bpr":
            return f"algorithm.tasks: the first task must be the main task 'bpr', got {list(self.tasks)}"
        bad = [t for t in self.tasks if t not in TASKS]
        if bad:
            return f"algorithm.tasks: unknown task {bad[0]!r}; allowed: {', '.join(TASKS)}"
        if len(set(self.tasks)) != len(self.tasks):
            return f"algorithm.tasks: duplicate task in {list(self.tasks)}"
        if self.mode == "federated":
            bad = [t for t in self.tasks if t not in FEDERATED_TASKS]
            if bad:
                return (f"algorithm.tasks: task {bad[0]!r} needs other users' or items' rows and is centralized "
                        f"only; federated tasks: {', '.join(FEDERATED_TASKS)}")
            if self.combiner.name in HISTORY_COMBINERS:
                return (f"algorithm.combiner.name: {self.combiner.name!r} keeps a history across calls and is "
                        "centralized only; federated combiners: pmtrec, equal, rlw, pcgrad, mgda, cagrad, nashmtl")
        if not self.ks or min(self.ks) < 1:
            return f"algorithm.ks: expected a non-empty list of cut-offs >= 1, got {list(self.ks)}"
        return None


# --------------------------------------------------------------------------------------- helpers
def _generator(seed: int, stream: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(rng.hash_u64(seed, stream, step)) & ((1 << 63) - 1))


def _adam_rows(param: torch.Tensor, m: torch.Tensor, v: torch.Tensor, rows, grad: torch.Tensor, step: float,
               lr: float) -> None:
    """In-place (lazy) Adam on some rows of a table; `step` is the 1-based step count (scalar or per row)."""
    b1, b2 = BETAS
    m[rows] = b1 * m[rows] + (1 - b1) * grad
    v[rows] = b2 * v[rows] + (1 - b2) * grad * grad
    step = torch.as_tensor(step, dtype=grad.dtype)
    if step.dim():
        step = step.reshape(-1, *([1] * (grad.dim() - 1)))
    mhat = m[rows] / (1 - b1 ** step)
    vhat = v[rows] / (1 - b2 ** step)
    param[rows] = param[rows] - lr * mhat / (vhat.sqrt() + EPS)


def _unif(x: torch.Tensor) -> torch.Tensor:
    """½ log mean_{i<j} exp(-2 ||x̃_i - x̃_j||²) on L2-normalized rows (0 for fewer than 2 rows)."""
    if x.shape[0] < 2:
        return x.sum() * 0.0
    return 0.5 * torch.pdist(F.normalize(x, dim=-1)).pow(2).mul(-2).exp().mean().log()


def _ranking_sums(user_emb: torch.Tensor, item_emb: torch.Tensor, test: torch.Tensor, exclude: torch.Tensor,
                  ks: tuple[int, ...]) -> dict[str, float]:
    if test.shape[1] == 0:
        return {"users": 0}
    res = full_ranking(user_emb, item_emb, test, exclude, ks)
    out = {f"recall@{k}": float(res.recall[k].sum()) for k in ks}
    out.update({f"ndcg@{k}": float(res.ndcg[k].sum()) for k in ks})
    out["users"] = int(res.users.numel())
    return out


# --------------------------------------------------------------------------------------- PMTRec
class PMTRecMF(AlgorithmBase):
    """MF + auxiliary tasks + a combiner; centralized or federated (see the module docstring)."""
    Config = PMTRecAlgoConfig
    EVALUATION = RANKING
    READS_SIDE_TABLES = True
    EXAMPLES = {
        # uncertainty weighting: the combiner with the most state (log-variances and their Adam moments)
        "centralized": {**MF_EXAMPLE, "resources.workers": 1, "algorithm.combiner.name": "uncertainty",
                        "train.optimizer": "adam", "train.lr": 0.01},
        "federated": {**MF_EXAMPLE, "data.layout": "federated", "algorithm.mode": "federated",
                      "algorithm.tasks": "[bpr,rating,au]", "train.optimizer": "adam", "train.lr": 0.05}}

    def __init__(self, config: PMTRecAlgoConfig, setup: Setup):
        self.config, self.setup = config, setup
        schema = setup.schema
        names = {f.name for f in schema.categorical}
        if not {"user", "item"} <= names or "rating" not in schema.numeric:
            raise ValueError(f"algorithm.name={config.name!r} needs MF data (categorical user and item, numeric "
                             "rating): use data.name mf_synthetic, mf_epinions, mf_ciao or mf_amazon")
        self.num_users, self.num_items = schema.vocab("user"), schema.vocab("item")
        layout = "centralized" if setup.num_clients == 1 else "federated"
        if config.mode == "centralized" and setup.num_clients != 1:
            raise ValueError("algorithm.mode=centralized needs data.layout=centralized (one client holds every user)")
        if config.mode == "federated" and setup.num_clients != self.num_users:
            raise ValueError("algorithm.mode=federated needs data.layout=federated (client = user)")
        self.layout = layout
        self.T = len(config.tasks)
        self.combiner = make_combiner(config.combiner, self.T, setup.seed)
        self._comb_opt = (torch.optim.Adam(self.combiner.parameters(), lr=setup.train.lr)
                          if self.combiner.parameters() else None)
        self.num_categories = schema.vocab("item_category") - 1 if "item_category" in names else 0
        self.side = None

    # ---- data the auxiliary tasks read (the worker hands over the dataset's side tables)
    def attach_data(self, dataset) -> None:
        side = dataset.side
        cat = side["item_category"].column("category").to_numpy() if "item_category" in side else None
        self.item_category = torch.from_numpy(np.array(cat, dtype=np.int64)) if cat is not None else None
        self.trust = self._csr(side.get("trust"), "src", "dst", self.num_users)
        self.pairs = self._csr(side.get("item_pairs"), "a", "b", self.num_items)
        need = {"social": self.trust, "coview": self.pairs, "category": self.item_category}
        for t, have in need.items():
            if t in self.config.tasks and (have is None or (t == "category" and self.num_categories == 0)):
                raise ValueError(f"algorithm.tasks: task {t!r} needs data the source {dataset.name!r} does not have")
        if "rating" in self.config.tasks and not (dataset.meta or {}).get("has_rating", True):
            raise ValueError(f"algorithm.tasks: task 'rating' needs data the source {dataset.name!r} does not have "
                             "(implicit feedback: no ratings)")
        self.side = side

    @staticmethod
    def _csr(table, a: str, b: str, n: int):
        if table is None or table.num_rows == 0:
            return None
        src = np.asarray(table.column(a).to_numpy(), np.int64)
        dst = np.asarray(table.column(b).to_numpy(), np.int64)
        order = np.argsort(src, kind="stable")
        indptr = np.zeros(n + 1, np.int64)
        indptr[1:] = np.cumsum(np.bincount(src, minlength=n))
        return torch.from_numpy(indptr), torch.from_numpy(dst[order])

    def ranking_metrics(self) -> tuple[str, ...]:
        return tuple(f"{m}@{k}" for m in ("recall", "ndcg") for k in self.config.ks)

    # ---- state
    def _init_table(self, rows: int, stream: int) -> torch.Tensor:
        return rng.normal_tensor((self.config.dim,), self.setup.seed, stream, 0, np.arange(rows, dtype=np.uint64),
                                 std=self.config.init_std)

    def _head_names(self) -> list[str]:
        return ["W", "b"] if "category" in self.config.tasks else []

    def init_server(self) -> Tensors:
        d = self.config.dim
        s = {"Q": self._init_table(self.num_items, rng.MF_INIT_ITEMS)}
        if self.config.mode == "centralized":
            s["P"] = self._init_table(self.num_users, rng.MF_INIT_USERS)
        if self._head_names():
            C = max(self.num_categories, 1)
            s["W"], s["b"] = torch.zeros(C, d), torch.zeros(C)
        for k in list(s):
            s[f"m/{k}"], s[f"v/{k}"] = torch.zeros_like(s[k]), torch.zeros_like(s[k])
        s["step"] = torch.zeros(())
        if self.config.mode == "centralized":      # the combiner's history travels with P and Q
            s.update(self._fresh_combiner_state())
        return s

    # ---- the combiner's history (DWA losses, GradNorm weights, uncertainty log-variances and their
    # Adam moments) is server state under COMBINER_PREFIX: loaded before and written after every
    # round of centralized training, so a resumed run or a restarted worker continues it exactly
    def _fresh_combiner_state(self) -> Tensors:
        fresh = make_combiner(self.config.combiner, self.T, self.setup.seed)
        out = {COMBINER_PREFIX + k: v for k, v in fresh.state_tensors().items()}
        if fresh.parameters():                     # learned weights: their Adam step count and moments
            out.update({COMBINER_OPT_PREFIX + "step": torch.zeros(()),
                        COMBINER_OPT_PREFIX + "exp_avg": torch.zeros(self.T),
                        COMBINER_OPT_PREFIX + "exp_avg_sq": torch.zeros(self.T)})
        return out

    def _load_combiner_state(self, s: Tensors) -> None:
        self.combiner.load_state_tensors({k[len(COMBINER_PREFIX):]: v for k, v in s.items()
                                          if k.startswith(COMBINER_PREFIX)})
        if self._comb_opt is not None:
            (param,) = self.combiner.parameters()
            st = {k: s[COMBINER_OPT_PREFIX + k].clone() for k in ("step", "exp_avg", "exp_avg_sq")}
            self._comb_opt.state.clear()
            if float(st["step"]) > 0:
                self._comb_opt.state[param] = st

    def _save_combiner_state(self, s: Tensors) -> None:
        s.update({COMBINER_PREFIX + k: v for k, v in self.combiner.state_tensors().items()})
        if self._comb_opt is not None:
            (param,) = self.combiner.parameters()
            st = self._comb_opt.state.get(param)
            if st:
                for k in ("step", "exp_avg", "exp_avg_sq"):
                    s[COMBINER_OPT_PREFIX + k] = st[k].detach().clone().float().reshape(s[COMBINER_OPT_PREFIX + k].shape)

    def init_personal(self, client_ids: torch.Tensor) -> Tensors:
        K, d = len(client_ids), self.config.dim
        if self.config.mode == "centralized":
            return {}
        ids = client_ids.numpy().astype(np.uint64)
        p = rng.normal_tensor((d,), self.setup.seed, rng.MF_INIT_USERS, 0, ids, std=self.config.init_std) if K else torch.zeros(0, d)
        return {"p": p, "m/p": torch.zeros(K, d), "v/p": torch.zeros(K, d), "step/p": torch.zeros(K)}

    def configure_train(self, rnd: int, state: Tensors, cohort: torch.Tensor) -> TrainPlan:
        if self.config.mode == "centralized":
            return TrainPlan(round=rnd, params=state)
        return TrainPlan(round=rnd, params={k: state[k] for k in ("Q", *self._head_names())})

    def traffic(self) -> tuple[int, int]:
        d = self.config.dim
        if self.config.mode == "centralized":
            n = (self.num_users + self.num_items) * d * 4
            return n, n
        down = (self.num_items * d + (max(self.num_categories, 1) * (d + 1) if self._head_names() else 0)) * 4
        return self.T * down, down

    # ---- task losses on gathered rows
    def _losses(self, Pr, Qr, head, u, i, j, r, aux) -> list[torch.Tensor]:
        """Per-task scalar losses. u, i, j, r: (B,) main batch; aux: per-task extra ids."""
        c = self.config
        pu, qi, qj = Pr.lookup(u), Qr.lookup(i), Qr.lookup(j)
        out = []
        for t in c.tasks:
            if t == "bpr":
                x = (pu * (qi - qj)).sum(-1)
                out.append(-F.logsigmoid(x).mean() + c.reg * (pu.pow(2).sum(-1) + qi.pow(2).sum(-1)
                                                              + qj.pow(2).sum(-1)).mean())
            elif t == "social":
                su, sv, sn = aux["social"]
                a, pv, pn = Pr.lookup(su), Pr.lookup(sv), Pr.lookup(sn)
                out.append(-F.logsigmoid((a * (pv - pn)).sum(-1)).mean() if len(su) else Pr.emb.sum() * 0.0)
            elif t == "coview":
                ia, ib, ineg = aux["coview"]
                a, qb, qn = Qr.lookup(ia), Qr.lookup(ib), Qr.lookup(ineg)
                out.append(-F.logsigmoid((a * (qb - qn)).sum(-1)).mean() if len(ia) else Qr.emb.sum() * 0.0)
            elif t == "category":
                ci, cy = aux["category"]
                out.append(F.cross_entropy(Qr.lookup(ci) @ head["W"].T + head["b"], cy) if len(ci)
                           else Qr.emb.sum() * 0.0 + head["W"].sum() * 0.0)
            elif t == "rating":
                out.append(((pu * qi).sum(-1) - r / c.rating_scale).pow(2).mean())
            elif t == "au":
                align = (F.normalize(pu, dim=-1) - F.normalize(qi, dim=-1)).pow(2).sum(-1).mean()
                uu, ii = torch.unique(u)[:c.unif_sample], torch.unique(i)[:c.unif_sample]
                out.append(align + 0.5 * (_unif(Pr.lookup(uu)) + _unif(Qr.lookup(ii))))
        return out

    def _aux_ids(self, u: torch.Tensor, i: torch.Tensor, gen: torch.Generator) -> dict:
        aux = {}
        if "social" in self.config.tasks:
            aux["social"] = _neighbor_triples(self.trust, u, self.num_users, gen)
        if "coview" in self.config.tasks:
            aux["coview"] = _neighbor_triples(self.pairs, i, self.num_items, gen)
        if "category" in self.config.tasks:
            ii = torch.unique(i)
            y = self.item_category[ii]
            aux["category"] = (ii[y >= 0], y[y >= 0])
        return aux

    def _task_ids(self, u, i, j, aux) -> tuple[list, list]:
        """Per task: the user ids and item ids it references (for the exact touched masks)."""
        e = torch.zeros(0, dtype=torch.long)
        users, items = [], []
        for t in self.config.tasks:
            if t in ("bpr",):
                users.append(u), items.append(torch.cat([i, j]))
            elif t in ("rating", "au"):
                users.append(u), items.append(i)
            elif t == "social":
                users.append(torch.cat(aux["social"])), items.append(e)
            elif t == "coview":
                users.append(e), items.append(torch.cat(aux["coview"]))
            elif t == "category":
                users.append(e), items.append(aux["category"][0])
        return users, items

    # ---- combination
    def _combine(self, losses: torch.Tensor, Gp: torch.Tensor | None, Gq: torch.Tensor | None,
                 tp: torch.Tensor | None, tq: torch.Tensor | None, epoch: int, step: int):
        """Combined (Rp, d) and (Rq, d) row gradients from (T, R, d) task row gradients."""
        if self.config.combiner.name == "pmtrec":
            gp = None if Gp is None else pmtrec_combine(Gp, epoch, self.config.combiner, tp)[0]
            gq = None if Gq is None else pmtrec_combine(Gq, epoch, self.config.combiner, tq)[0]
            return gp, gq
        parts = [g.flatten(1) for g in (Gp, Gq) if g is not None]
        G = torch.cat(parts, dim=1)
        out = self.combiner.combine(CombineInput(losses=losses.detach(), grads=G, step=step, epoch=epoch))
        if self._comb_opt is not None and out.loss is not None:   # uncertainty weighting learns its log-variances
            self._comb_opt.zero_grad()
            lv = self.combiner.parameters()
            (g,) = torch.autograd.grad(out.loss, lv)
            lv[0].grad = g
            self._comb_opt.step()
        flat = out.grad
        gp = gq = None
        off = 0
        if Gp is not None:
            n = Gp[0].numel()
            gp, off = flat[:n].reshape(Gp.shape[1:]), n
        if Gq is not None:
            gq = flat[off:off + Gq[0].numel()].reshape(Gq.shape[1:])
        return gp, gq

    # ---- centralized: epochs of minibatches over every row
    def _central_step(self, s: Tensors, u, i, r, epoch: int) -> dict:
        c, tr = self.config, self.setup.train
        step = int(s["step"]) + 1
        gen = _generator(self.setup.seed, rng.MF_NEGATIVES, step)
        j = torch.randint(self.num_items, u.shape, generator=gen)
        aux = self._aux_ids(u, i, gen)
        users, items = self._task_ids(u, i, j, aux)
        Pr = gather_rows(s["P"], *users)
        Qr = gather_rows(s["Q"], *items)
        head = {k: s[k].detach().clone().requires_grad_(True) for k in self._head_names()}
        losses = self._losses(Pr, Qr, head, u, i, j, r, aux)
        Gp = task_row_grads(losses, Pr.emb)
        Gq = task_row_grads(losses, Qr.emb)
        head_grads = {}
        if head:
            lc = losses[c.tasks.index("category")]
            head_grads = dict(zip(head, torch.autograd.grad(lc, list(head.values()), allow_unused=True)))
        L = torch.stack([x.detach() for x in losses])
        tp, tq = touched_mask(Pr.rows, users), touched_mask(Qr.rows, items)
        gp, gq = self._combine(L, Gp, Gq, tp, tq, epoch, step)
        with torch.no_grad():
            for name, rows, g in (("P", Pr.rows, gp), ("Q", Qr.rows, gq)):
                g = g + tr.weight_decay * s[name][rows] if tr.weight_decay else g
                if tr.optimizer == "adam":
                    _adam_rows(s[name], s[f"m/{name}"], s[f"v/{name}"], rows, g, step, tr.lr)
                else:
                    s[name][rows] -= tr.lr * g
            for name, g in head_grads.items():
                if g is None:
                    continue
                allr = slice(None)
                if tr.optimizer == "adam":
                    _adam_rows(s[name], s[f"m/{name}"], s[f"v/{name}"], allr, g, step, tr.lr)
                else:
                    s[name] -= tr.lr * g
            s["step"] = torch.tensor(float(step))
        return {f"train/{t}_loss": float(x) for t, x in zip(c.tasks, L)}

    def _train_central(self, plan: TrainPlan, batch: CohortBatch) -> CohortUpdate:
        s = {k: v.clone() for k, v in plan.params.items()}
        self._load_combiner_state(s)
        n = int(batch.n_rows[0])
        user, item = batch.categorical["user"][0], batch.categorical["item"][0]
        rating = batch.numeric[0, :, 0]
        E, B = self.setup.train.local_epochs, self.setup.train.batch_size
        sums, count = {}, 0
        for e in range(E):
            order = batch.order[e, 0, :n]
            epoch = plan.round * E + e
            for lo in range(0, n, B):
                idx = order[lo:lo + B]
                for k, v in self._central_step(s, user[idx], item[idx], rating[idx], epoch).items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
        self._save_combiner_state(s)
        acc = Accumulator(sums={k: v.double() for k, v in s.items()}, weight=1.0, clients=1,
                          stats={k: v / max(count, 1) for k, v in sums.items()})
        return CohortUpdate(personal={}, acc=acc)

    # ---- federated: client = user, one gradient per round at the current Q
    def _client_losses(self, p_leaf, Qr, head, batch: CohortBatch, rnd: int):
        """Per task: (sum over clients of the client's mean loss, (K,) per-client losses)."""
        c = self.config
        K, L = batch.mask.shape
        m = batch.mask
        nrow = m.sum(1).clamp_min(1)
        i = batch.categorical["item"]
        r = batch.numeric[..., 0]
        j = self._negatives(batch, rnd)
        pu, qi, qj = p_leaf[:, None, :], Qr.lookup(i), Qr.lookup(j)
        mean = lambda x: (x * m).sum(1) / nrow                                     # (K,)
        per = []
        for t in c.tasks:
            if t == "bpr":
                x = (pu * (qi - qj)).sum(-1)
                per.append(mean(-F.logsigmoid(x)) + c.reg * (p_leaf.pow(2).sum(-1)
                                                             + mean(qi.pow(2).sum(-1) + qj.pow(2).sum(-1))))
            elif t == "rating":
                per.append(mean(((pu * qi).sum(-1) - r / c.rating_scale).pow(2)))
            elif t == "au":
                align = mean((F.normalize(pu, dim=-1) - F.normalize(qi, dim=-1)).pow(2).sum(-1))
                S = min(L, c.unif_sample)
                qn = F.normalize(qi[:, :S], dim=-1)
                d2 = torch.cdist(qn, qn).pow(2)                                      # (K, S, S)
                pm = m[:, :S, None] * m[:, None, :S] * (1 - torch.eye(S))[None]
                npairs = pm.sum((1, 2))
                e = ((-2 * d2).exp() * pm).sum((1, 2)) / npairs.clamp_min(1)
                unif = torch.where(npairs > 0, 0.5 * e.clamp_min(1e-30).log(), torch.zeros_like(e))
                per.append(align + 0.5 * unif)
            elif t == "category":
                y = self.item_category[i]
                ok = (y >= 0).float() * m
                logits = qi @ head["W"].T + head["b"]                                # (K, L, C)
                ce = F.cross_entropy(logits.reshape(K * L, -1), y.clamp_min(0).reshape(-1),
                                     reduction="none").reshape(K, L)
                per.append((ce * ok).sum(1) / ok.sum(1).clamp_min(1))
        return [x.sum() for x in per], torch.stack([x.detach() for x in per]), i, j

    def _negatives(self, batch: CohortBatch, rnd: int) -> torch.Tensor:
        K, L = batch.mask.shape
        u = rng.uniform(self.setup.seed, rng.MF_NEGATIVES, rnd, batch.client_ids.numpy()[:, None].astype(np.uint64),
                        np.arange(L, dtype=np.uint64)[None, :])
        return torch.from_numpy(np.minimum((u * self.num_items).astype(np.int64), self.num_items - 1))

    def _train_federated(self, plan: TrainPlan, batch: CohortBatch, personal: Tensors) -> CohortUpdate:
        c, tr = self.config, self.setup.train
        K = batch.size
        p_leaf = personal["p"].clone().requires_grad_(True)
        i_all = batch.categorical["item"]
        j_all = self._negatives(batch, plan.round)
        real = batch.mask > 0
        Qr = gather_rows(plan.params["Q"], i_all, j_all)       # padded rows too (masked out of every loss)
        head = {k: plan.params[k].detach().clone().requires_grad_(True) for k in self._head_names()}
        losses, per_client, i, j = self._client_losses(p_leaf, Qr, head, batch, plan.round)
        Gp = task_row_grads(losses, p_leaf)                                         # (T, K, d)
        Gq = task_row_grads(losses, Qr.emb)                                         # (T, R, d)
        tp = torch.tensor([t in ("bpr", "rating", "au") for t in c.tasks])[:, None].expand(self.T, K)
        tq = touched_mask(Qr.rows, [torch.cat([i[real], j[real]]) if t == "bpr" else i[real]
                                    for t in c.tasks])
        if "category" in c.tasks:
            y = self.item_category[Qr.rows]
            tq[c.tasks.index("category")] &= y >= 0
        # the user row: combined locally, per client
        if c.combiner.name == "pmtrec":
            gp = pmtrec_combine(Gp, plan.round, c.combiner, tp)[0]
        else:
            gp = torch.stack([self.combiner.combine(CombineInput(
                losses=per_client[:, k], grads=Gp[:, k], step=plan.round * self.setup.num_clients
                + int(batch.client_ids[k]), epoch=plan.round)).grad for k in range(K)]) if K else Gp[0]
        with torch.no_grad():
            p, mp, vp = personal["p"].clone(), personal["m/p"].clone(), personal["v/p"].clone()
            stp = personal["step/p"] + 1
            gp = gp + tr.weight_decay * p if tr.weight_decay else gp
            if tr.optimizer == "adam":
                _adam_rows(p, mp, vp, slice(None), gp, stp, tr.lr)
            else:
                p -= tr.lr * gp
        # item rows and the head: per-task sums and touch counts go up
        acc = Accumulator(weight=float(K), clients=K)
        for t in range(self.T):
            dense = torch.zeros(self.num_items, c.dim, dtype=torch.float64)
            dense.index_add_(0, Qr.rows, Gq[t].double())
            acc.sums[f"gq/{t}"] = dense
            cnt = torch.zeros(self.num_items, dtype=torch.float64)
            cnt.index_add_(0, Qr.rows, tq[t].double())
            acc.sums[f"nq/{t}"] = cnt
        if head:
            lc = losses[c.tasks.index("category")]
            for k, g in zip(head, torch.autograd.grad(lc, list(head.values()), allow_unused=True)):
                acc.sums[f"g{k}"] = (torch.zeros_like(head[k]) if g is None else g).double()
        acc.stats = {f"train/{t}_loss": float(per_client[x].sum()) for x, t in enumerate(c.tasks)}
        return CohortUpdate(personal={"p": p, "m/p": mp, "v/p": vp, "step/p": stp}, acc=acc)

    def combine_item_rows(self, G: torch.Tensor, touched: torch.Tensor, losses: torch.Tensor, rnd: int) -> torch.Tensor:
        """Server half of federated mode: (T, I, d) per-task item-row gradients -> (I, d) combined
        (rows touched by no task stay zero)."""
        rows = torch.nonzero(touched.any(0)).flatten()
        out = torch.zeros(G.shape[1:], dtype=G.dtype)
        if not len(rows):
            return out
        _, g = self._combine(losses, None, G[:, rows], None, touched[:, rows], rnd, rnd)
        out[rows] = g
        return out

    def aggregate_train(self, rnd: int, state: Tensors, acc: Accumulator) -> tuple[Tensors, dict]:
        if acc.weight <= 0:
            return state, {}
        stats = {k: v / acc.weight for k, v in acc.stats.items()}
        stats["clients_trained"] = acc.clients
        stats["train_loss"] = stats.get("train/bpr_loss", float("nan"))
        if self.config.mode == "centralized":
            return {k: (acc.sums[k] / acc.weight).to(state[k].dtype) for k in state}, stats
        new = {k: v.clone() for k, v in state.items()}
        G = torch.stack([acc.sums[f"gq/{t}"] for t in range(self.T)]).float() / acc.weight   # (T, I, d) means
        touched = torch.stack([acc.sums[f"nq/{t}"] for t in range(self.T)]) > 0
        losses = torch.tensor([stats[f"train/{t}_loss"] for t in self.config.tasks])
        gq = self.combine_item_rows(G, touched, losses, rnd)
        step = float(state["step"]) + 1
        rows = torch.nonzero(touched.any(0)).flatten()
        _adam_rows(new["Q"], new["m/Q"], new["v/Q"], rows, gq[rows], step, self.config.server_lr)
        for k in self._head_names():
            _adam_rows(new[k], new[f"m/{k}"], new[f"v/{k}"], slice(None), (acc.sums[f"g{k}"] / acc.weight).float(),
                       step, self.config.server_lr)
        new["step"] = torch.tensor(step)
        return new, stats

    def train_cohort(self, plan: TrainPlan, batch: CohortBatch, personal: Tensors) -> CohortUpdate:
        if self.side is None:
            raise RuntimeError("pmtrec: the worker did not attach the dataset (attach_data)")
        if self.config.mode == "centralized":
            return self._train_central(plan, batch)
        return self._train_federated(plan, batch, personal)

    # ---- evaluation
    def score_cohort(self, state: Tensors, batch: CohortBatch, personal: Tensors) -> torch.Tensor:
        """Pointwise scores σ(p_u·q_i) of the rows (for inspection; the engine evaluates by ranking)."""
        q = state["Q"][batch.categorical["item"]]
        p = self._user_rows(state, batch, personal)
        return torch.sigmoid((p * q).sum(-1, keepdim=True))

    def _user_rows(self, state, batch, personal):
        if self.config.mode == "centralized":
            return state["P"][batch.categorical["user"]]
        return personal["p"][:, None, :].expand(-1, batch.mask.shape[1], -1)

    def evaluate_cohort(self, state: Tensors, batches, personal: Tensors, split: int) -> RankingPartial:
        """Sums over this cohort's users of Recall@K / NDCG@K on `split` and how many were ranked,
        with the training items (and, for test, the validation items) masked."""
        def pairs(b: CohortBatch) -> torch.Tensor:
            real = b.mask > 0
            if self.config.mode == "centralized":
                return torch.stack([b.categorical["user"][real], b.categorical["item"][real]])
            rowpos = torch.arange(b.size)[:, None].expand_as(real)
            return torch.stack([rowpos[real], b.categorical["item"][real]])
        test = pairs(batches[split])
        exclude = torch.cat([pairs(batches[s]) for s in (TRAIN, VAL) if s < split], dim=1)
        users = state["P"] if self.config.mode == "centralized" else personal["p"]
        sums = _ranking_sums(users, state["Q"], test, exclude, self.config.ks)
        return RankingPartial(sums, int(sums.pop("users")))

    def aggregate_evaluate(self, prefix: str, partial: RankingPartial) -> dict[str, float]:
        return ranking_metrics(prefix, partial)


# --------------------------------------------------------------------------------------- FedAvg-MF
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


class FedAvgMF(PMTRecMF):
    """FedAvg on BPR-MF, client = user: `train.local_epochs` full-batch local steps (SGD, or Adam reset
    every round) on p_u and a local copy of the item rows the client touches; the server averages
    the item-row deltas. The user row is private."""
    Config = FedAvgMFConfig
    EXAMPLES = {"federated": {**MF_EXAMPLE, "data.layout": "federated", "train.lr": 0.1}}

    def __init__(self, config: FedAvgMFConfig, setup: Setup):
        full = PMTRecAlgoConfig(mode="federated", tasks=("bpr",), combiner=COMBINERS.config("equal")(),
                                dim=config.dim, init_std=config.init_std, reg=config.reg, ks=config.ks)
        super().__init__(full, setup)
        self.fconfig = config

    def train_cohort(self, plan: TrainPlan, batch: CohortBatch, personal: Tensors) -> CohortUpdate:
        c, tr = self.config, self.setup.train
        K, L = batch.mask.shape
        m = batch.mask
        nrow = m.sum(1).clamp_min(1)
        i, j = batch.categorical["item"], self._negatives(batch, plan.round)
        ids = torch.cat([i, j], 1)                                                   # (K, 2L)
        real2 = torch.cat([m, m], 1) > 0
        ids_k = torch.where(real2, ids, torch.full_like(ids, self.num_items))      # padding -> a sentinel id
        srt, perm = ids_k.sort(dim=1)
        first = torch.ones_like(srt, dtype=torch.bool)
        first[:, 1:] = srt[:, 1:] != srt[:, :-1]
        slot_sorted = first.long().cumsum(1) - 1                                     # (K, 2L) local slot per sorted pos
        slot = torch.empty_like(slot_sorted).scatter_(1, perm, slot_sorted)          # local slot per position
        Qpad = torch.cat([plan.params["Q"], torch.zeros(1, c.dim)])
        q0 = torch.zeros(K, 2 * L, c.dim)
        q0.scatter_(1, slot_sorted[..., None].expand(-1, -1, c.dim), Qpad[srt])      # local copies (by slot)
        q = q0.clone().requires_grad_(True)
        p = personal["p"].clone().requires_grad_(True)
        opt = torch.optim.Adam([p, q], lr=tr.lr) if tr.optimizer == "adam" else torch.optim.SGD([p, q], lr=tr.lr)
        si, sj = slot[:, :L], slot[:, L:]
        loss_val = 0.0
        for _ in range(tr.local_epochs):
            qi = q.gather(1, si[..., None].expand(-1, -1, c.dim))
            qj = q.gather(1, sj[..., None].expand(-1, -1, c.dim))
            x = (p[:, None, :] * (qi - qj)).sum(-1)
            per = ((-F.logsigmoid(x) + c.reg * (qi.pow(2).sum(-1) + qj.pow(2).sum(-1))) * m).sum(1) / nrow \
                + c.reg * p.pow(2).sum(-1)
            opt.zero_grad()
            per.sum().backward()
            opt.step()
            loss_val = float(per.detach().sum())
        delta = (q.detach() - q0)                                                   # (K, 2L, d) by slot
        keep = first & (srt < self.num_items)                                        # one slot per (client, item)
        items = srt[keep]
        acc = Accumulator(weight=float(K), clients=K, stats={"train/bpr_loss": loss_val})
        dsum = torch.zeros(self.num_items, c.dim, dtype=torch.float64)
        dsum.index_add_(0, items, delta.gather(1, slot_sorted[..., None].expand(-1, -1, c.dim))[keep].double())
        cnt = torch.zeros(self.num_items, dtype=torch.float64)
        cnt.index_add_(0, items, torch.ones(len(items), dtype=torch.float64))
        acc.sums = {"dQ": dsum, "nQ": cnt}
        new_p = p.detach()
        return CohortUpdate(personal={**personal, "p": new_p}, acc=acc)

    def aggregate_train(self, rnd: int, state: Tensors, acc: Accumulator) -> tuple[Tensors, dict]:
        if acc.weight <= 0:
            return state, {}
        new = dict(state)
        denom = acc.sums["nQ"].clamp_min(1)[:, None] if self.fconfig.item_average == "touched" else acc.weight
        new["Q"] = state["Q"] + self.fconfig.server_lr * (acc.sums["dQ"] / denom).float()
        loss = acc.stats.get("train/bpr_loss", 0.0) / acc.weight
        return new, {"train/bpr_loss": loss, "train_loss": loss, "clients_trained": acc.clients}
