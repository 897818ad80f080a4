"""Pure aggregation helpers: folding client updates into accumulators, weighted means."""
from __future__ import annotations

import torch

from fleetrec.algorithms.protocol import Accumulator, Tensors


def bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(K,) -> (K, 1, ..., 1) so it broadcasts against a (K, ...) tensor."""
    return v.view(-1, *([1] * (like.dim() - 1)))


def finite_clients(tensors: Tensors) -> torch.Tensor:
    """(K,) bool: True where every tensor of the client is finite (no NaN / inf)."""
    ok = None
    for v in tensors.values():
        f = torch.isfinite(v.reshape(v.shape[0], -1)).all(1)
        ok = f if ok is None else ok & f
    return ok


def fold_weighted(acc: Accumulator, tensors: Tensors, weights: torch.Tensor,
                  stats: dict[str, torch.Tensor] | None = None, also_check: Tensors | None = None) -> torch.Tensor:
    """Add sum_k w_k x_k (float64) of every tensor to `acc`; clients with a non-finite update
    (in `tensors`, `stats` or `also_check`, tensors the caller folds itself) are dropped and
    counted. Returns the (K,) mask of kept clients."""
    checked = {**tensors, **(stats or {}), **(also_check or {})}
    keep = finite_clients(checked) if checked else torch.ones(len(weights), dtype=torch.bool, device=weights.device)
    w = torch.where(keep, weights.double(), torch.zeros_like(weights, dtype=torch.float64))   # (K,)
    for k, v in tensors.items():
        x = torch.where(bcast(keep, v), v, torch.zeros_like(v)).double()
        s = (bcast(w, x) * x).sum(0)
        acc.sums[k] = acc.sums[k] + s if k in acc.sums else s
    for k, v in (stats or {}).items():
        acc.stats[k] = acc.stats.get(k, 0.0) + float((w * torch.where(keep, v.double(), 0.0)).sum())
    acc.weight += float(w.sum())
    acc.clients += int(keep.sum())
    acc.dropped += int((~keep).sum())
    return keep


def fold_grouped(acc: Accumulator, tensors: Tensors, weights: torch.Tensor, group: torch.Tensor,
                 num_groups: int, key: str) -> None:
    """Per-group weighted sums: acc.group_sums[name] (G, ...) and acc.group_weight[key] (G,)."""
    w = weights.double()
    for k, v in tensors.items():
        s = torch.zeros((num_groups, *v.shape[1:]), dtype=torch.float64, device=v.device)
        s.index_add_(0, group, bcast(w, v) * v.double())
        acc.group_sums[k] = acc.group_sums[k] + s if k in acc.group_sums else s
    gw = torch.zeros(num_groups, dtype=torch.float64, device=w.device).index_add_(0, group, w)
    acc.group_weight[key] = acc.group_weight[key] + gw if key in acc.group_weight else gw


def weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_k w_k v_k / sum_k w_k over the first dimension."""
    w = weights.double()
    return (bcast(w, values) * values.double()).sum(0) / w.sum()


def mean_stats(acc: Accumulator) -> dict[str, float]:
    """Weighted means of the per-client statistics, plus counts."""
    out = {k: v / acc.weight for k, v in acc.stats.items()} if acc.weight > 0 else {}
    out.update(clients_trained=acc.clients, updates_dropped=acc.dropped)
    return out


def fold_rows(acc: Accumulator, name: str, num_rows: int, vocab: torch.Tensor, deltas: torch.Tensor,
              weights: torch.Tensor, keep: torch.Tensor, base: torch.Tensor | None = None) -> None:
    """Fold per-client row deltas (K, U, ...) of table `name` (rows `vocab` (K, U)) into
    acc.sums[name] as sum_k w_k x_k over the full table, x_k = base + delta_k (`base` None:
    the deltas themselves are summed). Clients with keep False add nothing."""
    from fleetrec.algorithms.sparse_rows import scatter_rows
    w = torch.where(keep, weights.double(), torch.zeros_like(weights, dtype=torch.float64))
    d = torch.where(bcast(keep, deltas), deltas, torch.zeros_like(deltas)).double() * bcast(w, deltas)
    s = scatter_rows(num_rows, vocab, d)
    if base is not None:
        s += w.sum() * base.double()
    acc.sums[name] = acc.sums[name] + s if name in acc.sums else s
