"""Per-client row subsets of embedding tables: train only the rows a client touches.

A shared item table (V, d) expanded to every client of a cohort costs K x V x d memory and
arithmetic per step, although client k only ever reads the few rows of its own items. Here each
client gets its *local vocabulary*: the U distinct ids in its rows, a (K, U, d) gather of the
table, and its categorical column re-coded to positions in that vocabulary. The model runs
unchanged on the re-coded ids. With no weight decay the result equals dense training exactly:
an untouched row gets zero gradient, and SGD and Adam (zero state) leave it where it was.
Folding back is a scatter-add of the (K, U, d) deltas into the full table. A private per-client
table (K, V, d), such as FedRAP's personal item table, is gathered and written back the same way
(`gather_own_rows` / `put_own_rows`), so each client's step touches U rows instead of V.
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


def gather_own_rows(tables: torch.Tensor, vocab: torch.Tensor) -> torch.Tensor:
    """(K, V, ...) per-client tables (a private table), (K, U) vocab -> (K, U, ...) each client's own rows."""
    return tables[torch.arange(tables.shape[0], device=vocab.device)[:, None], vocab]


def put_own_rows(tables: torch.Tensor, vocab: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """A copy of the (K, V, ...) per-client tables with each client's (K, U, ...) trained rows written back.
    A padded slot (a repeat of the client's smallest id, after its first slot) is skipped: it was never
    read, so it holds the stale value, and writing it could overwrite that id's trained row."""
    real = torch.ones_like(vocab, dtype=torch.bool)
    real[:, 1:] = vocab[:, 1:] != vocab[:, :1]
    k = torch.arange(tables.shape[0], device=vocab.device)[:, None].expand_as(vocab)
    out = tables.clone()
    out[k[real], vocab[real]] = rows[real].to(out.dtype)
    return out


def scatter_rows(num_rows: int, vocab: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Sum the (K, U, ...) per-client row values into a (num_rows, ...) float64 table.

    A padded slot repeats a real id of the same client; callers pass deltas, which are zero there.
    """
    out = torch.zeros((num_rows, *values.shape[2:]), dtype=torch.float64, device=values.device)
    return out.index_add_(0, vocab.reshape(-1), values.reshape(-1, *values.shape[2:]).double())
