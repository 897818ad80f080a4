"""Pure partitioning helpers: rows -> clients, client subsampling, per-client splits, skewed federations.

Every function takes NumPy arrays and a seed, returns NumPy arrays, and touches no global state,
so the same inputs and seed always give the same output.
"""
from __future__ import annotations

import numpy as np

from fleetrec.datasets.federated import CLIENT, TEST, TRAIN, VAL, DataError, FederatedDataset

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A fixed 64-bit mixing function (SplitMix64 finalizer), vectorized."""
    z = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        z = (z + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        z = z ^ (z >> np.uint64(31))
    return z


def hash_order(keys: np.ndarray, seed: int) -> np.ndarray:
    """Indices that sort `keys` (non-negative ints) by a seeded hash; ties broken by key.

    The rank of a key does not depend on which other keys are present, so growing
    `max_clients` only adds clients: the first N of a larger set contain the first N of a smaller one.
    """
    keys = np.asarray(keys).astype(np.int64)
    salt = _splitmix64(np.array([seed & 0xFFFFFFFF], dtype=np.uint64))[0]
    with np.errstate(over="ignore"):
        h = _splitmix64(keys.astype(np.uint64) ^ salt)
    return np.lexsort((keys, h))


def subsample_clients(keys: np.ndarray, max_clients: int | None, seed: int) -> np.ndarray:
    """The kept client keys (sorted ascending): the first `max_clients` distinct keys by seeded hash order."""
    uniq = np.unique(np.asarray(keys))
    if max_clients is None or max_clients >= len(uniq):
        return uniq
    return np.sort(uniq[hash_order(uniq, seed)[:max_clients]])


def by_column(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Client id per row = rank of the row's value among the distinct values (ascending).

    Returns (client ids int64, distinct values): client c is `values == distinct[c]`.
    Used for by-user (values = user ids) and by-scenario (values = a scenario column).
    """
    uniq, inv = np.unique(np.asarray(values), return_inverse=True)
    return inv.astype(np.int64).reshape(-1), uniq


by_user = by_column
by_scenario = by_column


def rows_at_least(client: np.ndarray, min_rows: int) -> np.ndarray:
    """Boolean row mask: rows whose client has >= min_rows rows."""
    _, inv, counts = np.unique(client, return_inverse=True, return_counts=True)
    return counts[inv.reshape(-1)] >= min_rows


def _split_sizes(n: np.ndarray, val_fraction: float, test_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-row (n_val, n_test) of its client: >= 1 each when the client has >= 3 rows and the fraction > 0."""
    n_test = (np.where(n >= 3, np.maximum(1, np.round(n * test_fraction)), 0) if test_fraction > 0
              else np.zeros_like(n))
    n_val = (np.where(n >= 3, np.maximum(1, np.round(n * val_fraction)), 0) if val_fraction > 0
             else np.zeros_like(n))
    return n_val.astype(np.int64), n_test.astype(np.int64)


def _split_from_rank(rank: np.ndarray, n: np.ndarray, val_fraction: float, test_fraction: float) -> np.ndarray:
    n_val, n_test = _split_sizes(n, val_fraction, test_fraction)
    split = np.full(len(rank), TRAIN, dtype=np.int8)
    split[rank >= n - n_test - n_val] = VAL
    split[rank >= n - n_test] = TEST
    return split


def _rank_within(client: np.ndarray, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Given `order` sorting rows by (client, key), the 0-based rank of each row inside its client and its client size."""
    client = np.asarray(client, dtype=np.int64)
    sorted_client = client[order]
    start = np.r_[0, np.flatnonzero(np.diff(sorted_client)) + 1] if len(client) else np.zeros(0, np.int64)
    sizes = np.diff(np.r_[start, len(client)])
    rank_sorted = np.arange(len(client)) - np.repeat(start, sizes)
    rank = np.empty(len(client), dtype=np.int64)
    rank[order] = rank_sorted
    n = np.empty(len(client), dtype=np.int64)
    n[order] = np.repeat(sizes, sizes)
    return rank, n


def random_split(client: np.ndarray, val_fraction: float, test_fraction: float, seed: int) -> np.ndarray:
    """Random per-client split (int8 0/1/2 per row, in input order)."""
    rng = np.random.default_rng([seed, 9103])
    client = np.asarray(client, dtype=np.int64)
    order = np.lexsort((rng.random(len(client)), client))
    rank, n = _rank_within(client, order)
    return _split_from_rank(rank, n, val_fraction, test_fraction)


def chronological_split(client: np.ndarray, time: np.ndarray, val_fraction: float,
                        test_fraction: float) -> np.ndarray:
    """Per-client split by time: each client's latest rows are test, the ones before them validation.

    Ties in time keep input order, so the result is deterministic.
    """
    client = np.asarray(client, dtype=np.int64)
    order = np.lexsort((np.arange(len(client)), np.asarray(time), client))
    rank, n = _rank_within(client, order)
    return _split_from_rank(rank, n, val_fraction, test_fraction)


def dirichlet_label_skew(labels: np.ndarray, num_clients: int, alpha: float, seed: int) -> np.ndarray:
    """Client id per row: for each label value, its rows are shared among clients with Dirichlet(alpha)
    proportions (small alpha = strong label skew). Returns int64 client ids in [0, num_clients)."""
    if num_clients < 1 or alpha <= 0:
        raise ValueError("dirichlet_label_skew: need num_clients >= 1 and alpha > 0")
    rng = np.random.default_rng([seed, 9201])
    labels = np.asarray(labels)
    out = np.empty(len(labels), dtype=np.int64)
    for value in np.unique(labels):
        idx = np.flatnonzero(labels == value)
        idx = idx[rng.permutation(len(idx))]
        p = rng.dirichlet(np.full(num_clients, alpha))
        cuts = np.round(np.cumsum(p)[:-1] * len(idx)).astype(np.int64)
        for c, part in enumerate(np.split(idx, cuts)):
            out[part] = c
    return out


def dirichlet_quantity_skew(num_rows: int, num_clients: int, alpha: float, seed: int,
                            min_rows: int = 1) -> np.ndarray:
    """Client id per row with Dirichlet(alpha) client sizes, each client getting >= min_rows rows.
    Rows are assigned in a random order, so any row-level structure is spread across clients."""
    if num_clients < 1 or alpha <= 0:
        raise ValueError("dirichlet_quantity_skew: need num_clients >= 1 and alpha > 0")
    if num_rows < num_clients * min_rows:
        raise ValueError(f"dirichlet_quantity_skew: {num_rows} rows cannot give {num_clients} clients "
                         f">= {min_rows} rows each")
    rng = np.random.default_rng([seed, 9202])
    p = rng.dirichlet(np.full(num_clients, alpha))
    extra = num_rows - num_clients * min_rows
    sizes = np.floor(p * extra).astype(np.int64)
    rest = extra - sizes.sum()
    sizes[np.argsort(-(p * extra - sizes), kind="stable")[:rest]] += 1
    sizes += min_rows
    out = np.empty(num_rows, dtype=np.int64)
    out[rng.permutation(num_rows)] = np.repeat(np.arange(num_clients), sizes)
    return out


def quantile_buckets(values: np.ndarray, buckets: int) -> np.ndarray:
    """Code 0..buckets-1 per value by its quantile among `values` (e.g. a client's activity level)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0 or buckets <= 1:
        return np.zeros(len(values), dtype=np.int64)
    edges = np.quantile(values, np.linspace(0, 1, buckets + 1)[1:-1])
    return np.clip(np.searchsorted(edges, values, side="right"), 0, buckets - 1).astype(np.int64)


def open_clients(num_clients: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted ids of the open clients: the first round(fraction * C) ids in seeded hash order."""
    n = int(round(fraction * num_clients))
    return np.sort(hash_order(np.arange(num_clients), seed)[:n]).astype(np.int64)


def subset_clients(ds: FederatedDataset, keep: np.ndarray) -> FederatedDataset:
    """The clients `keep` (sorted ids) only, renumbered 0..len(keep)-1; schema unchanged."""
    keep = np.asarray(keep, dtype=np.int64)
    starts, ends = ds.offsets[keep], ds.offsets[keep + 1]
    rows = np.concatenate([np.arange(s, e) for s, e in zip(starts, ends)]) if len(keep) else np.zeros(0, np.int64)
    cols = {c: ds.column(c)[rows] for c in ds.table.column_names}
    cols[CLIENT] = np.repeat(np.arange(len(keep)), ends - starts)
    attrs = {c: ds.client_attr(c)[keep] for c in ds.client_attrs.column_names if c != "_"}
    meta = {**ds.meta, "clients_kept": int(len(keep)), "clients_before": ds.num_clients}
    return FederatedDataset.from_columns(ds.name, cols, ds.schema, attrs, len(keep), meta)


def select_open(ds: FederatedDataset, fraction: float, seed: int, attribute: str = "", rule: str = "random",
                attribute_key: str = "model.pretrain.open_attribute") -> np.ndarray:
    """Sorted ids of the clients held out of a federation (FedPA's open clients, `data.hold_out`):
    those whose 0/1 client attribute `attribute` is 1, or (attribute "") round(fraction * C) clients:
    by `open_clients(C, fraction, seed)` (rule "random", seeded hash order) or the ones with the most
    rows (rule "most_active"; ties by the seeded hash order). `attribute_key` names the setting in errors."""
    if not attribute and rule == "most_active":
        n = int(round(fraction * ds.num_clients))
        rows = np.diff(ds.offsets)
        rank = np.empty(ds.num_clients, np.int64)
        rank[hash_order(np.arange(ds.num_clients), seed)] = np.arange(ds.num_clients)
        return np.sort(np.lexsort((rank, -rows))[:n]).astype(np.int64)
    if not attribute:
        return open_clients(ds.num_clients, fraction, seed)
    names = [f.name for f in ds.schema.client_categorical]
    if attribute not in names:
        raise DataError(f"{attribute_key}: the data has no client attribute {attribute!r}; "
                        f"expected one of {', '.join(names) or '(none)'} or '' (a fraction)")
    flag = np.asarray(ds.client_attr(attribute))
    if not np.isin(flag, (0, 1)).all():
        raise DataError(f"{attribute_key}: client attribute {attribute!r} has values other than 0/1; "
                        "expected 1 = held out (open), 0 = federated (private)")
    return np.flatnonzero(flag == 1).astype(np.int64)
