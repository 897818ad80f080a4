"""What a perfect model scores on generated data, and what a model-free heuristic scores on any
pointwise data, measured with the engine's own metric code.

The heuristic (`client_rate_auc`) predicts every row by its client's training positive rate for
that task (Laplace-smoothed toward the global rate). It knows nothing about items, so it only
tells how much of a pooled AUC is per-client base rates: a method should beat it (its GAUC is 0.5
by construction, every score of a client being the same).

Synthetic sources keep their ground truth in the dataset (datasets/federated.py): the true
probability of every label (`_oracle_<task>` columns) or the true user / item factors (side
tables `oracle_user_factors`, `oracle_item_factors`). A run reports the Bayes-optimal AUC, or the
Recall / NDCG@K of ranking by the true factors, beside its own metrics; real data has no ceiling.
With `approximate=True` (runs under `eval.pooled_auc: histogram`) pooled AUCs come from the same
logit histograms as the evaluation: O(rows) in the driver instead of a sort of every row.
"""
from __future__ import annotations

import numpy as np
import torch

from fleetrec.algorithms.metrics import pooled_auc
from fleetrec.algorithms.ranking import full_ranking
from fleetrec.datasets.federated import ORACLE_FACTORS, SPLIT, SPLIT_NAMES, TEST, VAL, FederatedDataset, oracle_column


def _auc(approximate: bool):
    if approximate:
        from fleetrec.algorithms.evaluation import histogram_auc
        return histogram_auc
    return pooled_auc


def ceiling(ds: FederatedDataset, ks: tuple[int, ...] = (20, 40),
            approximate: bool = False) -> dict[str, dict[str, float]]:
    """{"bayes_auc": {"<task>/<split>": auc, "<split>": mean over tasks}} for data with oracle
    probabilities, {"oracle_ranking": {"<split>/recall@K": ...}} for data with true factors, else {}."""
    out = {}
    names = set(ds.table.column_names)
    tasks = [t for t in ds.schema.tasks if oracle_column(t) in names]
    if tasks:
        split = ds.column(SPLIT)
        auc_of = _auc(approximate)
        auc = {f"{t}/{SPLIT_NAMES[s]}": auc_of(ds.column(oracle_column(t))[split == s], ds.column(t)[split == s])
               for t in tasks for s in range(len(SPLIT_NAMES))}
        for s in SPLIT_NAMES:
            auc[s] = float(np.mean([auc[f"{t}/{s}"] for t in tasks]))
        out["bayes_auc"] = auc
    if all(name in ds.side for name in ORACLE_FACTORS):
        out["oracle_ranking"] = _oracle_ranking(ds, ks)
    return out


def client_rate_auc(ds: FederatedDataset, prior: float = 1.0, approximate: bool = False) -> dict[str, float]:
    """{"<task>/<split>": pooled AUC, "<split>": mean over tasks} on the validation and test rows of
    the score (positives + prior·p) / (train rows + prior) of each row's client, p = the task's
    training positive rate over all clients."""
    from fleetrec.datasets.federated import CLIENT, TRAIN
    client, split = ds.column(CLIENT), ds.column(SPLIT)
    train = split == TRAIN
    n = np.bincount(client[train], minlength=ds.num_clients).astype(np.float64)
    out = {}
    for t in ds.schema.tasks:
        y = ds.column(t).astype(np.float64)
        p = float(y[train].mean()) if train.any() else 0.5
        pos = np.bincount(client[train], weights=y[train], minlength=ds.num_clients)
        rate = (pos + prior * p) / (n + prior)                       # (C,)
        for s in (VAL, TEST):
            m = split == s
            if 0 < y[m].sum() < m.sum():
                out[f"{t}/{SPLIT_NAMES[s]}"] = _auc(approximate)(rate[client[m]], y[m])
    for s in (VAL, TEST):
        vals = [v for k, v in out.items() if k.endswith("/" + SPLIT_NAMES[s])]
        if vals:
            out[SPLIT_NAMES[s]] = float(np.mean(vals))
    return out


def _oracle_ranking(ds: FederatedDataset, ks: tuple[int, ...]) -> dict[str, float]:
    """Recall@K / NDCG@K on the validation and test splits when items are ranked by the true
    preferences u·q (earlier splits' items masked, as in evaluation)."""
    ue, ie = (torch.from_numpy(np.stack([c.to_numpy() for c in ds.side[name].columns], 1)).double()
              for name in ORACLE_FACTORS)
    user, item, split = ds.column("user"), ds.column("item"), ds.column(SPLIT)
    out = {}
    for s in (VAL, TEST):
        test = torch.from_numpy(np.stack([user[split == s], item[split == s]]).astype(np.int64))
        known = split < s
        exclude = torch.from_numpy(np.stack([user[known], item[known]]).astype(np.int64))
        out.update({f"{SPLIT_NAMES[s]}/{k}": v for k, v in full_ranking(ue, ie, test, exclude, tuple(ks)).means().items()})
    return out
