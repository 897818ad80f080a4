"""PMTRec's personalized per-row gradient combination (methods.md §2.3) and row-gradient helpers.

Each embedding row x (a user row p_u or an item row q_i) gets its own task weights from the
norms of the per-task gradients on that row:

    S_x  = tasks touching x          n_t = ||G_t[x]||         l_t = (n_t / mean_{s in S_x} n_s) / tau
                                     (norm_scores: raw -> l_t = n_t / tau, scale-dependent)
    l_0 += e·ln(alpha)               (task focusing; or l_0 = alpha^e·n_0 / tau)
    w    = softmax over S_x of l     (gradient magnitude balancing)
    g_x  = m_x · sum_t w_t G_t[x] / n_t   with m_x = sum_t w_t n_t   (unit_weighted, weighted_mean)

Everything is vectorized over rows. Per-task row gradients are taken only for the rows a batch
touches: gather the unique rows once into a small leaf tensor, compute every task's loss from it,
and call autograd.grad per task w.r.t. that leaf -- never a dense |U| x d gradient per task.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch

from fleetrec.algorithms.combiners.base import CombineInput, Combined, Combiner, CombinerConfig


@dataclass(frozen=True)
class PMTRecConfig(CombinerConfig):
    name: str = "pmtrec"
    alpha: float = 1.1               # task focusing base: main task weight x alpha^epoch (1.0 = off)
    tau: float = 1.0                 # GMB softmax temperature (large = uniform weights)
    combine: str = "unit_weighted"   # unit_weighted: combine unit directions | raw_weighted: sum_t w_t G_t
    focus_mode: str = "logit"        # logit: l_0 += e·ln(alpha) | pre_softmax_scale: l_0 = alpha^e·n_0/tau
    magnitude: str = "weighted_mean"  # weighted_mean: sum w_t n_t | main: n_0 | mean: mean of n_t over S_x
    personalized: bool = True        # False: weights from whole-batch norms ||G_t||_F, same for every row
    norm_scores: str = "normalized"  # normalized: softmax of (n_t / mean of the row's n_s) / tau | raw: of n_t / tau

    CHECKS: ClassVar[dict] = {"alpha": ">0", "tau": ">0", "norm_scores": ("normalized", "raw"),
                              "combine": ("unit_weighted", "raw_weighted"),
                              "focus_mode": ("logit", "pre_softmax_scale"),
                              "magnitude": ("weighted_mean", "main", "mean")}


def normalized_scores(norms: torch.Tensor, touched: torch.Tensor) -> torch.Tensor:
    """(T, R) norms divided by the mean norm of the tasks touching each row (methods.md §2.3), so the
    softmax temperature acts on relative magnitudes: raw embedding-row norms of 1e-4..1e-2 over
    tau = 1 give every task the same weight. Rows whose touching tasks all have zero norm keep 0."""
    mean = (norms * touched).sum(dim=0) / touched.sum(dim=0).clamp_min(1)      # (R,)
    return torch.where(mean > 0, norms / torch.where(mean > 0, mean, torch.ones_like(mean)), torch.zeros_like(norms))


def pmtrec_weights(norms: torch.Tensor, touched: torch.Tensor, epoch: int, alpha: float, tau: float,
                   focus_mode: str = "logit", norm_scores: str = "normalized") -> torch.Tensor:
    """(R, T) per-row task weights from (T, R) scores `norms`; rows touched by no task get zeros."""
    if norm_scores == "normalized":
        norms = normalized_scores(norms, touched)
    logits = norms / tau                                                        # (T, R)
    if focus_mode == "logit":
        logits = torch.cat([logits[:1] + epoch * math.log(alpha), logits[1:]])
    else:
        logits = torch.cat([logits[:1] * alpha ** epoch, logits[1:]])
    logits = logits.masked_fill(~touched, float("-inf"))
    any_task = touched.any(dim=0)                                               # (R,)
    logits = torch.where(any_task[None, :], logits, torch.zeros_like(logits))  # avoid NaN on empty rows
    w = torch.softmax(logits, dim=0) * touched                                  # (T, R)
    return w.T                                                                  # (R, T)


def pmtrec_combine(G: torch.Tensor, epoch: int, config: PMTRecConfig,
                   touched: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine (T, R, d) per-task row gradients (task 0 = main) into (R, d); also return (R, T) weights.

    `touched` (T, R) bool says which task touches which row; by default a row counts as touched
    when its gradient is non-zero. Under magnitude='main', rows the main task does not touch fall
    back to 'weighted_mean' (n_0 would be 0 and the row would never move).
    """
    n = G.norm(dim=-1)                                                          # (T, R)
    touched = n > 0 if touched is None else touched
    if config.personalized:
        scores = n
    else:
        scores = G.flatten(1).norm(dim=1)[:, None].expand_as(n)                  # (T, R) batch-level norms
    w = pmtrec_weights(scores, touched, epoch, config.alpha, config.tau, config.focus_mode,
                       config.norm_scores)                                     # (R, T)
    wt = w.T.unsqueeze(-1)                                                      # (T, R, 1)
    if config.combine == "raw_weighted":
        return (wt * G).sum(dim=0), w                                           # (R, d)
    safe_n = torch.where(n > 0, n, torch.ones_like(n)).unsqueeze(-1)            # (T, R, 1)
    unit = (wt * G / safe_n).sum(dim=0)                                         # (R, d)
    m = (w.T * n).sum(dim=0)                                                    # (R,) weighted_mean
    if config.magnitude == "main":
        m = torch.where(touched[0], n[0], m)
    elif config.magnitude == "mean":
        m = (n * touched).sum(dim=0) / touched.sum(dim=0).clamp_min(1)
    return m.unsqueeze(-1) * unit, w


class PMTRec(Combiner):
    """Per-row PMTRec combination; `grads` are (T, R, d) row gradients, `weights` come back (R, T)."""
    Config = PMTRecConfig
    needs_grads = True

    def combine(self, inp: CombineInput) -> Combined:
        if inp.grads is None or inp.grads.dim() != 3:
            raise ValueError("pmtrec needs per-task row gradients of shape (T, R, d)")
        g, w = pmtrec_combine(inp.grads, inp.epoch, self.config, inp.touched)
        loss = None if inp.losses is None else inp.losses.sum()
        return Combined(weights=w, grad=g, loss=loss)


# ---------------------------------------------------------------------------- row gradients
@dataclass
class RowBatch:
    """The unique rows of one table that a batch touches, gathered once into a leaf tensor."""
    rows: torch.Tensor               # (R,) int64 sorted unique row ids into the table
    emb: torch.Tensor                # (R, d) leaf copy of table[rows], requires_grad

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Embeddings for any ids among `rows` (any shape) -> (*ids.shape, d), differentiable in emb."""
        return self.emb[torch.searchsorted(self.rows, ids)]

    def positions(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.searchsorted(self.rows, ids)


def gather_rows(table: torch.Tensor, *ids: torch.Tensor) -> RowBatch:
    """Gather the union of the row ids used by every task of a batch from a (N, d) table."""
    rows = torch.unique(torch.cat([i.reshape(-1) for i in ids]))                # (R,) sorted
    return RowBatch(rows=rows, emb=table.detach()[rows].clone().requires_grad_(True))


def task_row_grads(losses: Sequence[torch.Tensor], emb: torch.Tensor, *more: torch.Tensor):
    """(T, R, d) gradients of each task loss w.r.t. the gathered rows; unused rows are zero. With
    more tensors (e.g. the user rows and the item rows), one (T, ...) stack per tensor, from one
    backward pass per task for all of them rather than one per task and tensor."""
    embs = (emb, *more)
    out: list[list[torch.Tensor]] = [[] for _ in embs]
    for loss in losses:
        grads = torch.autograd.grad(loss, embs, retain_graph=True, allow_unused=True)
        for o, g, e in zip(out, grads, embs):
            o.append(torch.zeros_like(e) if g is None else g)
    stacks = tuple(torch.stack(o) for o in out)
    return stacks[0] if not more else stacks


def touched_mask(rows: torch.Tensor, task_ids: Sequence[torch.Tensor]) -> torch.Tensor:
    """(T, R) bool: which of the gathered rows each task's ids reference (exact, even for zero grads)."""
    mask = torch.zeros(len(task_ids), rows.numel(), dtype=torch.bool)
    for t, ids in enumerate(task_ids):
        if ids.numel():
            mask[t, torch.searchsorted(rows, ids.reshape(-1))] = True
    return mask


def add_row_grad(table: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor) -> None:
    """Accumulate a combined (R, d) row gradient into table.grad (created once if missing)."""
    if table.grad is None:
        table.grad = torch.zeros_like(table)
    table.grad.index_add_(0, rows, grad.to(table.grad.dtype))
