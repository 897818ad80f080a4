"""The tasks of multi-task MF (PMTRec, methods.md §2): one object per task, in the registry `MF_TASKS`.

Task 0 is always the main task `bpr`. Each task says what it reads, which rows it references,
its loss on a centralized minibatch (`loss`) and, where it can be computed from one user's own
rows, its per-client loss in the federated layout (`client_loss`):

    bpr       BPR on (u, i+, i-), one uniform negative, + reg·(||p_u||² + ||q_i+||² + ||q_i-||²)
    social    BPR on trust edges of the batch's users: -log σ(p_u·p_v - p_u·p_v-)        (P only)
    coview    BPR on item pairs of the batch's items:  -log σ(q_i·q_j - q_i·q_j-)        (Q only)
    category  softmax cross-entropy of W q_i + b on the batch items' categories          (Q + head)
    rating    (p_u·q_i - r/rating_scale)² on the batch's rated pairs
    au        DirectAU: alignment of normalized positive pairs + uniformity of the batch's users and items
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from fleetrec.algorithms.combiners import RowBatch
from fleetrec.datasets.registry import Registry

_EMPTY = torch.zeros(0, dtype=torch.long)


def neighbor_triples(graph, nodes: torch.Tensor, num_nodes: int, gen: torch.Generator):
    """BPR triples on a graph in CSR form (indptr, dst): each distinct node of `nodes` that has a
    neighbour, one uniformly drawn neighbour (positive) and one uniformly drawn node (negative)."""
    indptr, dst = graph
    src = torch.unique(nodes)
    deg = indptr[src + 1] - indptr[src]
    src, deg = src[deg > 0], deg[deg > 0]
    pick = indptr[src] + (torch.rand(len(src), generator=gen) * deg).long().clamp_max(deg - 1)
    return src, dst[pick], torch.randint(num_nodes, (len(src),), generator=gen)


def uniformity(x: torch.Tensor) -> torch.Tensor:
    """½ log mean_{i<j} exp(-2 ||x̃_i - x̃_j||²) on L2-normalized rows (0 for fewer than 2 rows)."""
    if x.shape[0] < 2:
        return x.sum() * 0.0
    return 0.5 * torch.pdist(F.normalize(x, dim=-1)).pow(2).mul(-2).exp().mean().log()


@dataclass
class CentralRows:
    """One centralized minibatch: the gathered rows of P and Q, the head, the main triples
    (u, i+, i-) with ratings r, and each task's extra ids (`MFTask.sample`)."""
    P: RowBatch
    Q: RowBatch
    head: dict
    u: torch.Tensor
    i: torch.Tensor
    j: torch.Tensor
    r: torch.Tensor
    aux: dict
    pu: torch.Tensor = field(init=False)
    qi: torch.Tensor = field(init=False)
    _qj: torch.Tensor | None = field(init=False, default=None)

    def __post_init__(self):
        self.pu, self.qi = self.P.lookup(self.u), self.Q.lookup(self.i)

    @property
    def qj(self) -> torch.Tensor:
        """The negatives' rows; gathered only by tasks that use them (BPR), looked up on first use."""
        if self._qj is None:
            self._qj = self.Q.lookup(self.j)
        return self._qj


@dataclass
class ClientRows:
    """The federated cohort: each client's own row p (K, d), the gathered item rows, the head,
    its padded training rows (i, j, r: (K, L)) and their mask."""
    p: torch.Tensor
    Q: RowBatch
    head: dict
    i: torch.Tensor
    j: torch.Tensor
    r: torch.Tensor
    m: torch.Tensor
    pu: torch.Tensor = field(init=False)
    qi: torch.Tensor = field(init=False)
    qj: torch.Tensor = field(init=False)

    def __post_init__(self):
        self.pu, self.qi, self.qj = self.p[:, None, :], self.Q.lookup(self.i), self.Q.lookup(self.j)
        self.nrow = self.m.sum(1).clamp_min(1)

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """(K,) each client's mean of a (K, L) row quantity over its real rows."""
        return (x * self.m).sum(1) / self.nrow


class MFTask(ABC):
    name: ClassVar[str]
    FEDERATED: ClassVar[bool] = True     # computable from one user's own rows (has `client_loss`)
    USER_ROW: ClassVar[bool] = True      # federated: its loss reaches the client's own row p_u

    def check(self, algo, dataset) -> str | None:
        """Why this task cannot run on `dataset`, or None."""
        return None

    def sample(self, algo, u: torch.Tensor, i: torch.Tensor, gen: torch.Generator):
        """Extra ids of a centralized minibatch (drawn from `gen`, in the fixed order of TASK_ORDER)."""
        return None

    @abstractmethod
    def loss(self, algo, b: CentralRows) -> torch.Tensor:
        """The task's loss on a centralized minibatch."""

    def ids(self, b_u: torch.Tensor, b_i: torch.Tensor, b_j: torch.Tensor, aux) -> tuple[torch.Tensor, torch.Tensor]:
        """(user ids, item ids) the task's centralized loss references: its exact touched rows."""
        return b_u, b_i

    def client_loss(self, algo, c: ClientRows) -> torch.Tensor:
        """(K,) per-client loss in the federated layout; tasks with FEDERATED = False have none (the
        config refuses them in federated mode before anything runs)."""
        raise TypeError(f"task {self.name!r} is centralized only (FEDERATED = False)")

    def client_items(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """Item ids of the clients' real rows that the federated loss references."""
        return i

    def item_mask(self, algo, rows: torch.Tensor) -> torch.Tensor | None:
        """Which of the gathered item rows the federated loss really reaches (None: all referenced)."""
        return None


class BPR(MFTask):
    name = "bpr"

    def loss(self, algo, b):
        x = (b.pu * (b.qi - b.qj)).sum(-1)
        return -F.logsigmoid(x).mean() + algo.config.reg * (b.pu.pow(2).sum(-1) + b.qi.pow(2).sum(-1)
                                                            + b.qj.pow(2).sum(-1)).mean()

    def ids(self, b_u, b_i, b_j, aux):
        return b_u, torch.cat([b_i, b_j])

    def client_loss(self, algo, c):
        x = (c.pu * (c.qi - c.qj)).sum(-1)
        return c.mean(-F.logsigmoid(x)) + algo.config.reg * (c.p.pow(2).sum(-1)
                                                             + c.mean(c.qi.pow(2).sum(-1) + c.qj.pow(2).sum(-1)))

    def client_items(self, i, j):
        return torch.cat([i, j])


class _GraphBPR(MFTask):
    """BPR on the edges of a side graph among the batch's users (social) or items (coview)."""
    FEDERATED = False
    GRAPH: ClassVar[str]                 # attribute of the algorithm holding the CSR graph
    SIDE: ClassVar[str]                  # side table it comes from
    USERS: ClassVar[bool]                # graph over users (P) or items (Q)

    def check(self, algo, dataset):
        if getattr(algo, self.GRAPH) is None:
            return f"algorithm.tasks: task {self.name!r} needs data the source {dataset.name!r} does not have"
        return None

    def sample(self, algo, u, i, gen):
        nodes, n = (u, algo.num_users) if self.USERS else (i, algo.num_items)
        return neighbor_triples(getattr(algo, self.GRAPH), nodes, n, gen)

    def loss(self, algo, b):
        rows = b.P if self.USERS else b.Q
        a_, pos_, neg_ = b.aux[self.name]
        a, pos, neg = rows.lookup(a_), rows.lookup(pos_), rows.lookup(neg_)
        return -F.logsigmoid((a * (pos - neg)).sum(-1)).mean() if len(a_) else rows.emb.sum() * 0.0

    def ids(self, b_u, b_i, b_j, aux):
        ids = torch.cat(aux[self.name])
        return (ids, _EMPTY) if self.USERS else (_EMPTY, ids)


class Social(_GraphBPR):
    name, GRAPH, SIDE, USERS = "social", "trust", "trust", True


class Coview(_GraphBPR):
    name, GRAPH, SIDE, USERS = "coview", "pairs", "item_pairs", False


class Category(MFTask):
    name = "category"
    USER_ROW = False

    def check(self, algo, dataset):
        if algo.item_category is None or algo.num_categories == 0:
            return f"algorithm.tasks: task {self.name!r} needs data the source {dataset.name!r} does not have"
        return None

    def sample(self, algo, u, i, gen):
        ii = torch.unique(i)
        y = algo.item_category[ii]
        return ii[y >= 0], y[y >= 0]

    def loss(self, algo, b):
        ci, cy = b.aux["category"]
        W, bias = b.head["W"], b.head["b"]
        return (F.cross_entropy(b.Q.lookup(ci) @ W.T + bias, cy) if len(ci)
                else b.Q.emb.sum() * 0.0 + W.sum() * 0.0)

    def ids(self, b_u, b_i, b_j, aux):
        return _EMPTY, aux["category"][0]

    def client_loss(self, algo, c):
        K, L = c.m.shape
        y = algo.item_category[c.i]
        ok = (y >= 0).float() * c.m
        logits = c.qi @ c.head["W"].T + c.head["b"]                                  # (K, L, C)
        ce = F.cross_entropy(logits.reshape(K * L, -1), y.clamp_min(0).reshape(-1), reduction="none").reshape(K, L)
        return (ce * ok).sum(1) / ok.sum(1).clamp_min(1)

    def item_mask(self, algo, rows):
        return algo.item_category[rows] >= 0


class Rating(MFTask):
    name = "rating"

    def check(self, algo, dataset):
        if not (dataset.meta or {}).get("has_rating", True):
            return (f"algorithm.tasks: task 'rating' needs data the source {dataset.name!r} does not have "
                    "(implicit feedback: no ratings)")
        return None

    def loss(self, algo, b):
        return ((b.pu * b.qi).sum(-1) - b.r / algo.config.rating_scale).pow(2).mean()

    def client_loss(self, algo, c):
        return c.mean(((c.pu * c.qi).sum(-1) - c.r / algo.config.rating_scale).pow(2))


class AlignUniform(MFTask):
    name = "au"

    def loss(self, algo, b):
        S = algo.config.unif_sample
        align = (F.normalize(b.pu, dim=-1) - F.normalize(b.qi, dim=-1)).pow(2).sum(-1).mean()
        uu, ii = torch.unique(b.u)[:S], torch.unique(b.i)[:S]
        return align + 0.5 * (uniformity(b.P.lookup(uu)) + uniformity(b.Q.lookup(ii)))

    def client_loss(self, algo, c):
        align = c.mean((F.normalize(c.pu, dim=-1) - F.normalize(c.qi, dim=-1)).pow(2).sum(-1))
        S = min(c.m.shape[1], algo.config.unif_sample)
        qn = F.normalize(c.qi[:, :S], dim=-1)
        d2 = torch.cdist(qn, qn).pow(2)                                             # (K, S, S)
        pm = c.m[:, :S, None] * c.m[:, None, :S] * (1 - torch.eye(S))[None]
        npairs = pm.sum((1, 2))
        e = ((-2 * d2).exp() * pm).sum((1, 2)) / npairs.clamp_min(1)
        unif = torch.where(npairs > 0, 0.5 * e.clamp_min(1e-30).log(), torch.zeros_like(e))
        return align + 0.5 * unif


TASK_ORDER = ("bpr", "social", "coview", "category", "rating", "au")   # also the order extra ids are drawn in
MF_TASKS: Registry[MFTask] = Registry("MF task")
for _task in (BPR(), Social(), Coview(), Category(), Rating(), AlignUniform()):
    MF_TASKS.register(_task.name, _task)
del _task
FEDERATED_TASKS = tuple(t for t in TASK_ORDER if MF_TASKS[t].FEDERATED)
