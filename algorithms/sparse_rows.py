"""Per-client row subsets of shared embedding tables: train only the rows a client touches.

A shared item table (V, d) expanded to every client of a cohort costs K x V x d memory and
arithmetic per step, although client k only ever reads the few rows of its own items. Here each
client gets its *local vocabulary*: the U distinct ids in its rows, a (K, U, d) gather of the
table, and its categorical column re-coded to positions in that vocabulary. The model runs
unchanged on the re-coded ids. With no weight decay the result equals dense training exactly:
an untouched row gets zero gradient, and SGD and Adam (zero state) leave it where it was.
Folding back is a scatter-add of the (K, U, d) deltas into the full table.
"""
from __future__ import annotations

import torch


def local_vocab(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (K, L) int64 -> (vocab (K, U), recoded (K, L)) with vocab[k, recoded[k, j]] == ids[k, j].

    U is the largest number of distinct ids of a client; a client with fewer pads its vocabulary
    by repeating its smallest id (a padded slot is never read, so it never moves).
    """
    K, L = ids.shape
    if L == 0:
        return ids.new_zeros((K, 1)), ids
    sorted_ids, pos = ids.sort(dim=1)                                        # (K, L)
    new = torch.ones_like(sorted_ids, dtype=torch.bool)
    new[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]                     # first of each run
    rank = new.long().cumsum(1) - 1                                          # (K, L) slot per sorted row
    U = int(rank[:, -1].max()) + 1
    vocab = sorted_ids[:, :1].expand(K, U).clone()                           # padding = smallest id
    vocab.scatter_(1, rank, sorted_ids)
    recoded = torch.empty_like(ids)
    recoded.scatter_(1, pos, rank)
    return vocab, recoded


def gather_rows(table: torch.Tensor, vocab: torch.Tensor) -> torch.Tensor:
    """(V, ...) table, (K, U) vocab -> (K, U, ...) per-client copies of the rows (a new tensor)."""
    return table[vocab]


def scatter_rows(num_rows: int, vocab: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Sum the (K, U, ...) per-client row values into a (num_rows, ...) float64 table.

    A padded slot repeats a real id of the same client; callers pass deltas, which are zero there.
    """
    out = torch.zeros((num_rows, *values.shape[2:]), dtype=torch.float64, device=values.device)
    return out.index_add_(0, vocab.reshape(-1), values.reshape(-1, *values.shape[2:]).double())
