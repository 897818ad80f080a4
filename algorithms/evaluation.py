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
from typing import Protocol

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
    client, scores, labels = part.client, part.scores, part.labels
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
    return out


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
