"""Evaluation partials: what a worker returns for one split, mergeable in any grouping.

Two implementations of one interface (`EvalPartial`: `merge_many`, `empty`):
- `PointwisePartial`: the scored real rows (client id, probabilities, labels), merged by
  concatenation; `pointwise_metrics` turns them into AUC, GAUC, log-loss and weighted
  precision / recall / F1 per task, their means over tasks and, when the clients are
  scenarios, the same per client (`test/s3/like/auc`) and over clients (`test/scenario_mean/auc`).
- `RankingPartial`: per-user sums of Recall@K / NDCG@K and the number of users ranked, merged
  by addition; `ranking_metrics` divides (`val/recall@20`, `test/users`).

Workers merge their cohorts' partials, the coordinator merges the workers' (in worker order)
and the algorithm's `aggregate_evaluate` makes the metrics. No Ray here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import numpy as np
import torch

from fleetrec.algorithms import metrics


class EvalPartial(Protocol):
    @classmethod
    def merge_many(cls, parts: list) -> "EvalPartial": ...
    def empty(self) -> bool: ...


@dataclass
class PointwisePartial:
    """Scores of real rows, flattened: clients in row order."""
    client: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))      # (R,)
    scores: np.ndarray | None = None                                               # (R, T) float32
    labels: np.ndarray | None = None                                               # (R, T) float32

    @classmethod
    def from_scores(cls, batch, prob: torch.Tensor) -> "PointwisePartial":
        """From a cohort batch and its (K, L, T) probabilities (any device)."""
        real = (batch.mask > 0).cpu()
        client = batch.client_ids.cpu()[:, None].expand_as(real)[real]
        return cls(client.numpy(), prob.detach().float().cpu()[real].numpy(), batch.labels.cpu()[real].numpy())

    @classmethod
    def merge_many(cls, parts: list["PointwisePartial"]) -> "PointwisePartial":
        """One concatenation of all the parts' rows, in order."""
        parts = [p for p in parts if p.scores is not None]
        if not parts:
            return cls()
        return cls(np.concatenate([p.client for p in parts]), np.concatenate([p.scores for p in parts]),
                   np.concatenate([p.labels for p in parts]))

    def empty(self) -> bool:
        return self.scores is None or len(self.client) == 0


# ----------------------------------------------------------------------------- summary partial
HIST_BINS = 1 << 14             # logit bins of the pooled-AUC histograms (width 0.002 in logit)
HIST_LOGIT = 16.0               # logits clipped to [-16, 16] (probabilities 1.1e-7 .. 1 - 1.1e-7)
EPS = 1e-7                      # log-loss clipping, as metrics.log_loss


def _bins(p: np.ndarray) -> np.ndarray:
    q = np.clip(p.astype(np.float64), EPS, 1 - EPS)
    z = np.clip(np.log(q) - np.log1p(-q), -HIST_LOGIT, HIST_LOGIT)
    return np.minimum(((z + HIST_LOGIT) / (2 * HIST_LOGIT) * HIST_BINS).astype(np.int64), HIST_BINS - 1)


@dataclass
class SummaryPartial:
    """The pointwise partial whose size does not grow with the rows (`eval.pooled_auc: histogram`),
    for federations whose evaluated rows would not fit the coordinator.

    Per task: histograms of the scores of positive and negative rows over HIST_BINS logit bins
    (pooled AUC, with a bound on its error), log-loss sums, the confusion counts at 0.5 (weighted
    P / R / F1, exact), and the sum and count of per-client AUCs (GAUC, exact: a client's rows are
    all in one cohort). With scenario clients, each client's AUC and log-loss per task (exact).
    Merged by addition; per-client entries are disjoint (a client is owned by one worker).
    """
    pos: np.ndarray | None = None        # (T, B) int64
    neg: np.ndarray | None = None        # (T, B) int64
    loss_sum: np.ndarray | None = None   # (T,) float64
    rows: int = 0
    confusion: np.ndarray | None = None  # (T, 4) int64: tp, fp, fn, tn at threshold 0.5
    gauc_sum: np.ndarray | None = None   # (T,) float64 sum of the eligible clients' AUCs
    gauc_n: np.ndarray | None = None     # (T,) int64 eligible clients (both label classes)
    clients: int = 0
    per_client: dict[int, np.ndarray] = field(default_factory=dict)   # client -> (T, 2) auc, log-loss
    nonfinite: int = 0                   # NaN / inf scores (binned as 0.5; see `unscored`)
    FIXED_SIZE: ClassVar[bool] = True    # merging two gives one of the same size: workers fold as they go

    @classmethod
    def from_scores(cls, batch, prob: torch.Tensor, per_client: bool = False) -> "SummaryPartial":
        rows = PointwisePartial.from_scores(batch, prob)
        return cls.from_rows(rows.client, rows.scores, rows.labels, per_client)

    @classmethod
    def from_rows(cls, client: np.ndarray, scores: np.ndarray, labels: np.ndarray,
                  per_client: bool = False) -> "SummaryPartial":
        T = scores.shape[1] if scores.ndim == 2 else 0
        if len(client) == 0:
            return cls()
        scores, bad = finite_scores(scores)
        pos, neg = np.zeros((T, HIST_BINS), np.int64), np.zeros((T, HIST_BINS), np.int64)
        loss, conf = np.zeros(T), np.zeros((T, 4), np.int64)
        gsum, gn = np.zeros(T), np.zeros(T, np.int64)
        ids, row_client = np.unique(client, return_inverse=True)
        counts = np.bincount(row_client, minlength=len(ids)).astype(np.float64)
        per = np.full((len(ids), T, 2), NAN)                 # per client and task: AUC, log-loss
        for t in range(T):
            p, y = scores[:, t].astype(np.float64), labels[:, t] > 0.5
            b = _bins(p)
            pos[t] = np.bincount(b[y], minlength=HIST_BINS)
            neg[t] = np.bincount(b[~y], minlength=HIST_BINS)
            q = np.clip(p, EPS, 1 - EPS)
            row_loss = -np.where(y, np.log(q), np.log1p(-q))
            loss[t] = float(row_loss.sum())
            pred = p >= 0.5
            conf[t] = [np.sum(pred & y), np.sum(pred & ~y), np.sum(~pred & y), np.sum(~pred & ~y)]
            eligible, auc, _ = metrics._per_client_stats(client, p, y)   # one pass: GAUC and per-client AUC
            gsum[t], gn[t] = float(auc.sum()), auc.size
            per[np.searchsorted(ids, eligible), t, 0] = auc
            per[:, t, 1] = np.bincount(row_client, weights=row_loss, minlength=len(ids)) / counts
        out = {int(c): per[i] for i, c in enumerate(ids)} if per_client else {}
        return cls(pos, neg, loss, int(len(client)), conf, gsum, gn, int(len(ids)), out, bad)

    @classmethod
    def merge_many(cls, parts: list["SummaryPartial"]) -> "SummaryPartial":
        parts = [p for p in parts if not p.empty()]
        if not parts:
            return cls()
        add = lambda name: sum(getattr(p, name) for p in parts)
        per: dict[int, np.ndarray] = {}
        for p in parts:
            per.update(p.per_client)
        return cls(add("pos"), add("neg"), add("loss_sum"), add("rows"), add("confusion"), add("gauc_sum"),
                   add("gauc_n"), add("clients"), per, add("nonfinite"))

    def empty(self) -> bool:
        return self.rows == 0

    def pooled_auc(self, t: int) -> tuple[float, float]:
        """(AUC, bound on its error) of task t: pairs in one bin count 1/2, as exact ties do, so the
        estimate differs from the exact AUC by at most half the fraction of pairs sharing a bin."""
        P, N = int(self.pos[t].sum()), int(self.neg[t].sum())
        if P == 0 or N == 0:
            return NAN, NAN
        pos, neg = self.pos[t].astype(np.float64), self.neg[t].astype(np.float64)
        below = np.cumsum(neg) - neg                    # negatives in lower bins
        same = float(np.dot(pos, neg))
        return float((np.dot(pos, below) + 0.5 * same) / (P * N)), 0.5 * same / (P * N)


NAN = float("nan")


def histogram_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Pooled AUC of probabilities from the HIST_BINS logit histograms of `SummaryPartial`: O(rows),
    no sort, within the partial's error bound of the exact value (the same approximation the
    evaluation makes under `eval.pooled_auc: histogram`)."""
    y = np.asarray(labels) > 0.5
    b = _bins(np.asarray(scores))
    part = SummaryPartial(pos=np.bincount(b[y], minlength=HIST_BINS)[None],
                          neg=np.bincount(b[~y], minlength=HIST_BINS)[None])
    return part.pooled_auc(0)[0]


def summary_metrics(prefix: str, tasks: tuple[str, ...], part: SummaryPartial,
                    per_client: bool = False) -> dict[str, float]:
    """The metrics of `pointwise_metrics` from a SummaryPartial, plus `<prefix>/auc_error_bound`
    (the largest error of the pooled AUC over the tasks: it is the only approximate value)."""
    if part is None or part.empty():
        return {}
    out, per, bound = {}, {"auc": [], "gauc": [], "logloss": [], "precision_w": [], "recall_w": [], "f1_w": []}, 0.0
    for t, task in enumerate(tasks):
        auc, b = part.pooled_auc(t)
        bound = max(bound, b) if b == b else bound
        m = {"auc": auc, "gauc": float(part.gauc_sum[t] / part.gauc_n[t]) if part.gauc_n[t] else NAN,
             "logloss": float(part.loss_sum[t] / part.rows)}
        m.update(zip(("precision_w", "recall_w", "f1_w"), metrics.prf_from_counts(*(int(x) for x in part.confusion[t]))))
        for k, v in m.items():
            per[k].append(v)
            if len(tasks) > 1:
                out[f"{prefix}/{task}/{k}"] = v
    for k, v in per.items():
        out[f"{prefix}/{k}"] = _nanmean(v)
    out[f"{prefix}/auc_error_bound"] = bound
    if per_client and part.per_client:
        means: dict[str, list] = {}
        for c in sorted(part.per_client):
            vals = part.per_client[c]
            for j, k in enumerate(("auc", "logloss")):
                for t, task in enumerate(tasks):
                    out[f"{prefix}/s{c}/{task}/{k}"] = float(vals[t, j])
                    means.setdefault(f"{task}/{k}", []).append(float(vals[t, j]))
                out[f"{prefix}/s{c}/{k}"] = _nanmean(vals[:, j])
                means.setdefault(k, []).append(out[f"{prefix}/s{c}/{k}"])
        out.update({f"{prefix}/scenario_mean/{k}": _nanmean(v) for k, v in means.items()})
    out[f"{prefix}/clients"] = int(part.clients)
    return unscored(prefix, out, part.nonfinite)


def finite_scores(scores: np.ndarray) -> tuple[np.ndarray, int]:
    """(scores with NaN / inf set to 0.5, how many there were): a diverged model's scores can be
    binned and summed without error, and `unscored` then reports the split as having no metrics."""
    ok = np.isfinite(scores)
    bad = int(ok.size - np.count_nonzero(ok))
    return (scores if bad == 0 else np.where(ok, scores, np.float32(0.5)).astype(scores.dtype)), bad


def unscored(prefix: str, out: dict[str, float], nonfinite: int) -> dict[str, float]:
    """The split's metrics, every score-based one NaN when any of its scores was NaN or inf (the
    metrics of the other rows would describe a model that does not exist), with the count as
    `<prefix>/nonfinite_scores`; the run counts such a round as diverging."""
    if not nonfinite:
        return out
    keep = (f"{prefix}/clients",)
    out = {k: (v if k in keep else NAN) for k, v in out.items()}
    out[f"{prefix}/nonfinite_scores"] = int(nonfinite)
    return out


PER_USER = "per_user/test"     # round-record key of the test split's per-user values (eval.per_user)


@dataclass
class RankingPartial:
    """Sums over users of each ranking metric ("recall@20": sum, ...) and how many users were ranked;
    optionally (`Setup.per_user_eval`) every user's values: {"user": (U',) int64 global ids,
    "recall@20": (U',) float64, ...}, merged by concatenation."""
    sums: dict[str, float] = field(default_factory=dict)
    users: int = 0
    per_user: dict[str, np.ndarray] | None = None

    @classmethod
    def merge_many(cls, parts: list["RankingPartial"]) -> "RankingPartial":
        sums: dict[str, float] = {}
        for p in parts:
            for k, v in p.sums.items():
                sums[k] = sums.get(k, 0.0) + v
        per = [p.per_user for p in parts if p.per_user is not None]
        per_user = {k: np.concatenate([d[k] for d in per]) for k in per[0]} if per else None
        return cls(sums, sum(p.users for p in parts), per_user)

    def empty(self) -> bool:
        return self.users == 0


def merge_all(parts: list) -> EvalPartial | None:
    """The parts (all of one kind, in order) as one partial; None when there are none."""
    parts = [p for p in parts if p is not None]
    return type(parts[0]).merge_many(parts) if parts else None


def _nanmean(v) -> float:
    v = [x for x in v if not math.isnan(x)]
    return float(np.mean(v)) if v else float("nan")


def pointwise_metrics(prefix: str, tasks: tuple[str, ...], part: PointwisePartial,
                      per_client: bool = False) -> dict[str, float]:
    """AUC, GAUC, log-loss and weighted P/R/F1 per task (when several) and their means over tasks;
    with `per_client` (datasets whose clients are scenarios) also per client, see `per_client_metrics`.
    Nothing when the partial holds no rows."""
    if part is None or part.empty():
        return {}
    client, labels = part.client, part.labels
    scores, bad = finite_scores(part.scores)
    out, per = {}, {"auc": [], "gauc": [], "logloss": [], "precision_w": [], "recall_w": [], "f1_w": []}
    for t, task in enumerate(tasks):
        m = metrics.summarize_task(client, scores[:, t], labels[:, t])
        m.update(zip(("precision_w", "recall_w", "f1_w"),
                     metrics.weighted_precision_recall_f1(scores[:, t], labels[:, t])))
        for k, v in m.items():
            per[k].append(v)
            if len(tasks) > 1:
                out[f"{prefix}/{task}/{k}"] = v
    for k, v in per.items():
        out[f"{prefix}/{k}"] = float(np.nanmean(v)) if not all(math.isnan(x) for x in v) else float("nan")
    if per_client:
        out.update(per_client_metrics(prefix, tasks, client, scores, labels))
    out[f"{prefix}/clients"] = int(len(np.unique(client)))
    return unscored(prefix, out, bad)


def per_client_metrics(prefix: str, tasks: tuple[str, ...], client, scores, labels) -> dict[str, float]:
    """AUC and log-loss per client (scenario) and task, e.g. `test/s3/like/auc`, the per-client
    means over tasks (`test/s3/auc`), and the means over clients (`test/scenario_mean/auc`,
    `test/scenario_mean/like/auc`)."""
    out, means = {}, {}
    for c in np.unique(client):
        rows = client == c
        per = {"auc": [], "logloss": []}
        for t, task in enumerate(tasks):
            m = {"auc": metrics.pooled_auc(scores[rows, t], labels[rows, t]),
                 "logloss": metrics.log_loss(scores[rows, t], labels[rows, t])}
            for k, v in m.items():
                out[f"{prefix}/s{c}/{task}/{k}"] = v
                per[k].append(v)
                means.setdefault(f"{task}/{k}", []).append(v)
        for k, v in per.items():
            out[f"{prefix}/s{c}/{k}"] = _nanmean(v)
            means.setdefault(k, []).append(out[f"{prefix}/s{c}/{k}"])
    out.update({f"{prefix}/scenario_mean/{k}": _nanmean(v) for k, v in means.items()})
    return out


def ranking_metrics(prefix: str, part: RankingPartial) -> dict[str, float]:
    """Means over the ranked users (`val/recall@20`, `test/ndcg@40`, ...) and `<prefix>/users`."""
    if part is None or part.empty():
        return {}
    out = {f"{prefix}/{k}": v / part.users for k, v in part.sums.items()}
    out[f"{prefix}/users"] = int(part.users)
    return out
