"""Evaluation metrics for click-through style binary tasks.

Pure numpy / scikit-learn (torch tensors are accepted as inputs and converted); no Ray, no
MLflow, so the module is importable from workers, the coordinator and tests alike.

Conventions: `scores` are predicted probabilities of the positive class, `labels` are binary
(0/1, bool or 0.0/1.0; anything > 0.5 counts as positive), `client` holds arbitrary int64
client ids. All three are 1-D arrays of the same length N (one row per impression).

Undefined metrics (empty input, a single label class, no eligible client) are float('nan').
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch

__all__ = [
    "pooled_auc",
    "log_loss",
    "per_client_auc",
    "gauc",
    "precision_recall_f1",
    "prf_from_counts",
    "weighted_precision_recall_f1",
    "summarize_task",
]

NAN = float("nan")


def _np(x, dtype=None) -> np.ndarray:
    """Any array-like (numpy, list, torch tensor) -> flat numpy array."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x, dtype=dtype)
    return arr.reshape(-1)


def _binary(labels) -> np.ndarray:
    """Labels -> bool array [N], positive where label > 0.5."""
    return _np(labels, np.float64) > 0.5


def pooled_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC over all rows pooled together.

    scores: [N] float, labels: [N] binary. Returns nan when N == 0, only one class is present or
    a score is NaN or inf.
    """
    s = _np(scores, np.float64)
    y = _binary(labels)
    if y.size == 0 or y.all() or not y.any() or not np.isfinite(s).all():
        return NAN
    from sklearn.metrics import roc_auc_score   # imported on use: workers never load scikit-learn
    return float(roc_auc_score(y, s))


def log_loss(scores: np.ndarray, labels: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of probabilities `scores` [N] against `labels` [N].

    Probabilities are clipped to [eps, 1 - eps]. Returns nan when N == 0.
    """
    p = np.clip(_np(scores, np.float64), eps, 1.0 - eps)
    y = _binary(labels)
    if y.size == 0:
        return NAN
    return float(-np.mean(np.where(y, np.log(p), np.log1p(-p))))


def _per_client_stats(client, scores, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vectorized per-client AUC via the Mann-Whitney U statistic.

    Returns (ids [K], auc [K], n_rows [K]) for the K clients that have both label classes,
    ids in ascending order. Ties (same client, equal score) get their average rank, which
    matches sklearn's roc_auc_score exactly (a tied pos/neg pair counts 1/2).
    """
    c = _np(client, np.int64)
    s = _np(scores, np.float64)
    y = _binary(labels)
    if not (c.size == s.size == y.size):
        raise ValueError(f"length mismatch: client={c.size} scores={s.size} labels={y.size}")
    n = c.size
    if n == 0:
        empty = np.empty(0, dtype=np.int64)
        return empty, np.empty(0, dtype=np.float64), empty

    order = np.lexsort((s, c))                      # primary key client, secondary score
    c, s, y = c[order], s[order], y[order]          # [N] each, sorted

    new_client = np.empty(n, dtype=bool)            # [N] True at first row of each client
    new_client[0] = True
    np.not_equal(c[1:], c[:-1], out=new_client[1:])
    new_tie = new_client.copy()                     # [N] True at first row of each tie group
    new_tie[1:] |= s[1:] != s[:-1]

    client_start = np.flatnonzero(new_client)       # [C] first sorted index of each client
    tie_start = np.flatnonzero(new_tie)             # [T] first sorted index of each tie group
    tie_end = np.append(tie_start[1:], n) - 1       # [T] last (inclusive) index of each group

    # 1-based average rank inside the client: mean global position of the tie group minus
    # the client's first position. Tie groups never straddle clients.
    client_of_row = np.cumsum(new_client) - 1       # [N] dense client index per row
    tie_of_row = np.cumsum(new_tie) - 1             # [N] dense tie-group index per row
    group_mid = 0.5 * (tie_start + tie_end)         # [T]
    rank = group_mid[tie_of_row] - client_start[client_of_row] + 1.0  # [N]

    n_rows = np.diff(np.append(client_start, n))    # [C]
    n_pos = np.add.reduceat(y.astype(np.int64), client_start)        # [C]
    r_pos = np.add.reduceat(np.where(y, rank, 0.0), client_start)    # [C]
    n_neg = n_rows - n_pos

    ok = (n_pos > 0) & (n_neg > 0)
    n_pos_f = n_pos[ok].astype(np.float64)
    u = r_pos[ok] - n_pos_f * (n_pos_f + 1.0) / 2.0
    auc = u / (n_pos_f * n_neg[ok].astype(np.float64))
    return c[client_start][ok], auc, n_rows[ok]


def per_client_auc(client: np.ndarray, scores: np.ndarray,
                   labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUC of every client that has both positive and negative rows.

    client: [N] int64 ids (any order, not necessarily contiguous), scores: [N], labels: [N].
    Returns (ids [K] int64 ascending, auc [K] float64). Fully vectorized: O(N log N), no
    Python loop over clients.
    """
    ids, auc, _ = _per_client_stats(client, scores, labels)
    return ids, auc


def gauc(client: np.ndarray, scores: np.ndarray, labels: np.ndarray,
         weighting: Literal["uniform", "impressions"] = "uniform") -> float:
    """Group AUC: mean per-client AUC over clients that have both label classes.

    weighting="uniform" gives every eligible client equal weight; "impressions" weights each
    by its row count. Returns nan when no client is eligible.
    """
    if weighting not in ("uniform", "impressions"):
        raise ValueError(f"unknown weighting {weighting!r}; use 'uniform' or 'impressions'")
    _, auc, n_rows = _per_client_stats(client, scores, labels)
    if auc.size == 0:
        return NAN
    if weighting == "uniform":
        return float(auc.mean())
    w = n_rows.astype(np.float64)
    return float(np.dot(auc, w) / w.sum())


def prf_from_counts(tp: int, fp: int, fn: int, tn: int, average: str = "weighted") -> tuple[float, float, float]:
    """Precision, recall, F1 from the confusion counts, as scikit-learn's
    `precision_recall_fscore_support(..., zero_division=0)` with `average` "binary" (the positive
    class) or "weighted" (both classes, weighted by support). Counts merge across workers, so the
    exact and the histogram evaluation share this one formula (the tests compare it with
    scikit-learn, which the exact pooled AUC still uses)."""
    def prf(tp_, fp_, fn_):
        p = tp_ / (tp_ + fp_) if tp_ + fp_ else 0.0
        r = tp_ / (tp_ + fn_) if tp_ + fn_ else 0.0
        return p, r, (2 * p * r / (p + r) if p + r else 0.0)
    if average == "binary":
        return tuple(float(v) for v in prf(tp, fp, fn))
    s1, s0 = tp + fn, tn + fp
    if s1 + s0 == 0:
        return NAN, NAN, NAN
    one, zero = prf(tp, fp, fn), prf(tn, fn, fp)
    return tuple(float((s1 * a + s0 * b) / (s1 + s0)) for a, b in zip(one, zero))


def _prf(scores, labels, threshold: float, average: str) -> tuple[float, float, float]:
    """Precision, recall, F1 of predictions `scores >= threshold` with the given averaging."""
    y = _binary(labels).astype(bool)
    if y.size == 0:
        return NAN, NAN, NAN
    pred = _np(scores, np.float64) >= threshold
    tp, fp = int(np.count_nonzero(pred & y)), int(np.count_nonzero(pred & ~y))
    fn = int(np.count_nonzero(y)) - tp
    return prf_from_counts(tp, fp, fn, y.size - tp - fp - fn, average)


def precision_recall_f1(scores: np.ndarray, labels: np.ndarray,
                        threshold: float = 0.5) -> tuple[float, float, float]:
    """Binary (positive-class) precision, recall and F1 at `threshold`; 0 where undefined.

    scores: [N], labels: [N]. Returns (nan, nan, nan) when N == 0.
    """
    return _prf(scores, labels, threshold, "binary")


def weighted_precision_recall_f1(scores: np.ndarray, labels: np.ndarray,
                                 threshold: float = 0.5) -> tuple[float, float, float]:
    """Support-weighted (over both classes) precision, recall and F1 at `threshold`.

    scores: [N], labels: [N]. Returns (nan, nan, nan) when N == 0.
    """
    return _prf(scores, labels, threshold, "weighted")


def summarize_task(client: np.ndarray, scores: np.ndarray,
                   labels: np.ndarray) -> dict[str, float]:
    """Headline metrics of one task: {"auc": pooled AUC, "gauc": uniform GAUC, "logloss"}."""
    return {
        "auc": pooled_auc(scores, labels),
        "gauc": gauc(client, scores, labels),
        "logloss": log_loss(scores, labels),
    }
