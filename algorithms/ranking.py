"""Full-ranking Recall@K and NDCG@K over all items, with known items masked out.

For each chunk of users: scores = U_chunk @ Qᵀ, the chunk's excluded (training / validation)
items set to -inf with one index_put, one topk at the largest K, then hits read off a dense
(C, I) test mask. No per-user Python loop.

Conventions (LightGCN / NGCF style): Recall@K = hits in the top K / number of test items;
NDCG@K = DCG@K / IDCG@K with binary relevance, IDCG over min(K, number of test items)
positions. Users without test items are excluded from every mean.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RankingResult:
    users: torch.Tensor                      # (U',) int64 evaluated users (those with test items)
    recall: dict[int, torch.Tensor]          # K -> (U',) per-user Recall@K
    ndcg: dict[int, torch.Tensor]            # K -> (U',) per-user NDCG@K

    def means(self) -> dict[str, float]:
        out = {f"recall@{k}": float(v.mean()) if v.numel() else float("nan") for k, v in self.recall.items()}
        out.update({f"ndcg@{k}": float(v.mean()) if v.numel() else float("nan") for k, v in self.ndcg.items()})
        return out


def _chunk_mask(pairs: torch.Tensor, lo: int, hi: int, pos: torch.Tensor, num_items: int) -> torch.Tensor:
    """(hi-lo, I) bool mask of the (user, item) pairs whose user is in users[lo:hi]; `pos` maps user -> row."""
    u, i = pairs
    row = pos[u]                                                                # (N,) -1 = not evaluated
    keep = (row >= lo) & (row < hi)
    mask = torch.zeros(hi - lo, num_items, dtype=torch.bool, device=pairs.device)
    mask.index_put_((row[keep] - lo, i[keep]), torch.ones((), dtype=torch.bool, device=pairs.device))
    return mask


def topk_items(user_emb: torch.Tensor, item_emb: torch.Tensor, exclude: torch.Tensor, k: int,
               users: torch.Tensor | None = None, chunk: int = 1024) -> torch.Tensor:
    """(U', k) item ids ranked by p_u · q_i, with the (2, N) (user, item) pairs in `exclude` masked."""
    users = torch.arange(user_emb.shape[0], device=user_emb.device) if users is None else users
    pos = torch.full((user_emb.shape[0],), -1, dtype=torch.long, device=user_emb.device)
    pos[users] = torch.arange(users.numel(), device=user_emb.device)
    out = []
    for lo in range(0, users.numel(), chunk):
        hi = min(lo + chunk, users.numel())
        scores = user_emb[users[lo:hi]] @ item_emb.T                            # (C, I)
        scores = scores.masked_fill(_chunk_mask(exclude, lo, hi, pos, item_emb.shape[0]), float("-inf"))
        out.append(torch.topk(scores, k, dim=1).indices)                        # (C, k)
    return torch.cat(out) if out else torch.zeros(0, k, dtype=torch.long)


def full_ranking(user_emb: torch.Tensor, item_emb: torch.Tensor, test: torch.Tensor, exclude: torch.Tensor,
                 ks: tuple[int, ...] = (20, 40), chunk: int = 1024) -> RankingResult:
    """Recall@K / NDCG@K for every user with at least one test item.

    user_emb (U, d), item_emb (I, d); `test` and `exclude` are (2, N) int64 (user, item) pairs
    -- `exclude` holds the training (and validation) pairs that must never be ranked.
    """
    U, I = user_emb.shape[0], item_emb.shape[0]
    kmax = min(max(ks), I)
    users = torch.unique(test[0])                                               # (U',) sorted
    pos = torch.full((U,), -1, dtype=torch.long, device=test.device)
    pos[users] = torch.arange(users.numel(), device=test.device)
    n_test = torch.bincount(pos[test[0]], minlength=users.numel()).to(user_emb.dtype)  # (U',)
    disc = 1.0 / torch.log2(torch.arange(kmax, device=user_emb.device, dtype=user_emb.dtype) + 2.0)
    idcg_table = torch.cumsum(disc, 0)                                          # (kmax,) IDCG at n positions
    top = topk_items(user_emb, item_emb, exclude, kmax, users, chunk)           # (U', kmax)
    hits = torch.zeros(users.numel(), kmax, dtype=user_emb.dtype, device=user_emb.device)
    for lo in range(0, users.numel(), chunk):
        hi = min(lo + chunk, users.numel())
        hits[lo:hi] = _chunk_mask(test, lo, hi, pos, I).gather(1, top[lo:hi]).to(user_emb.dtype)
    recall, ndcg = {}, {}
    for k in ks:
        kk = min(k, kmax)
        recall[k] = hits[:, :kk].sum(1) / n_test
        ideal = idcg_table[(torch.clamp(n_test, max=kk) - 1).long()]             # (U',)
        ndcg[k] = (hits[:, :kk] * disc[:kk]).sum(1) / ideal
    return RankingResult(users=users, recall=recall, ndcg=ndcg)
