"""The data plane: one Arrow table sorted by client, plus offsets, schema and client attributes.

A `FederatedDataset` is built once per run, `ray.put` once, and read zero-copy by every
worker: the table's column buffers live in the object store and `column()` hands out
read-only NumPy views of them. No per-client files, objects or pickling per round.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import pyarrow as pa

CLIENT = "client"   # int64 client id, 0..num_clients-1, table sorted by it
SPLIT = "split"     # int8: 0 train, 1 validation, 2 test; sorted by it inside a client
TRAIN, VAL, TEST = 0, 1, 2
SPLIT_NAMES = ("train", "val", "test")
# Ground truth of generated data, for the simulator to report what a perfect model scores:
ORACLE_PREFIX = "_oracle_"                  # column `_oracle_<task>`: the true probability of the row's label
ORACLE_FACTORS = ("oracle_user_factors", "oracle_item_factors")   # side tables: true factors, in built codes


def oracle_column(task: str) -> str:
    return ORACLE_PREFIX + task


class DataError(ValueError):
    """Bad input data: the message names the file or table, the column and what was expected."""


@dataclass(frozen=True)
class CategoricalField:
    name: str
    vocab: int          # codes are 0..vocab-1


@dataclass(frozen=True)
class DatasetSchema:
    categorical: tuple[CategoricalField, ...]          # per-row categorical features (item side, context)
    numeric: tuple[str, ...]                           # per-row float32 features
    tasks: tuple[str, ...]                             # per-row float32 labels in {0, 1}
    client_categorical: tuple[CategoricalField, ...] = ()   # per-client attributes (groups, scenario)
    scenario: str | None = None                        # a client attribute naming the scenario, if any

    def vocab(self, name: str) -> int:
        for f in self.categorical + self.client_categorical:
            if f.name == name:
                return f.vocab
        raise KeyError(name)


def client_split_order(client: np.ndarray, split: np.ndarray) -> np.ndarray | None:
    """The row order of a `FederatedDataset`: `np.lexsort((split, client))` (by client, then split,
    ties in row order), or None when the rows are in that order already (no copy of any column)."""
    if len(client) < 2:
        return None
    same = client[1:] == client[:-1]
    if ((client[1:] > client[:-1]) | (same & (split[1:] >= split[:-1]))).all():
        return None
    return np.lexsort((split, client))


@dataclass(frozen=True, eq=False)
class FederatedDataset:
    """Rows of all clients in one table; client c owns rows offsets[c]:offsets[c+1].

    Inside a client, rows are ordered train, then validation, then test (column `split`).
    `client_attrs` has one row per client (column i describes client i).
    """
    name: str
    table: pa.Table
    offsets: np.ndarray                   # (C+1,) int64
    schema: DatasetSchema
    client_attrs: pa.Table                # (C rows) client_categorical columns (+ optional `label` strings)
    meta: dict = field(default_factory=dict)   # e.g. {"positive_rate": 0.31}
    side: dict = field(default_factory=dict)   # optional named side tables (pa.Table), e.g. social / item graphs
    # a worker's shard of a larger dataset (datasets/prepared.py): (C,) the full dataset's row index of each
    # client's first row, so row-keyed randomness (minibatch order) is that of the full dataset; None: rows are global
    row_base: np.ndarray | None = None

    @property
    def num_clients(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_rows(self) -> int:
        return self.table.num_rows

    def column(self, name: str) -> np.ndarray:
        """Read-only NumPy view of a column (zero-copy when the table has one chunk, no nulls)."""
        col = self.table.column(name)
        if col.num_chunks == 1:
            return col.chunk(0).to_numpy(zero_copy_only=False)
        return col.to_numpy()

    def client_attr(self, name: str) -> np.ndarray:
        col = self.client_attrs.column(name)
        return col.chunk(0).to_numpy(zero_copy_only=False) if col.num_chunks == 1 else col.to_numpy()

    @cached_property
    def split_offsets(self) -> np.ndarray:
        """(C, 4) int64: start of train, val, test rows and end of the client's rows."""
        split = self.column(SPLIT)
        out = np.empty((self.num_clients, 4), dtype=np.int64)
        out[:, 0] = self.offsets[:-1]
        out[:, 3] = self.offsets[1:]
        client = self.column(CLIENT)
        # rows with split < s, counted per client, give the start of split s
        for s in (VAL, TEST):
            before = np.bincount(client[split < s], minlength=self.num_clients)
            out[:, s] = self.offsets[:-1] + before
        return out

    def rows_per_client(self, split: int) -> np.ndarray:
        so = self.split_offsets
        return so[:, split + 1] - so[:, split]

    def fingerprint(self) -> str:
        """A digest of the dataset's content (every row and client attribute, the client offsets and
        the side tables): numeric columns by their values (zero-copy views; the same for any chunk
        layout), other columns by value. Checkpoints record it, so a resume on data that changed
        behind the same config (an edited file) is refused."""
        h = hashlib.sha256(np.ascontiguousarray(self.offsets).tobytes())
        tables = [("rows", self.table), ("clients", self.client_attrs)] + sorted(self.side.items())
        for label, table in tables:
            h.update(label.encode())
            for name in sorted(table.column_names):
                col = table.column(name)
                h.update(f"{name}|{col.type}|{len(col)}".encode())
                if pa.types.is_integer(col.type) or pa.types.is_floating(col.type) or pa.types.is_boolean(col.type):
                    for chunk in col.chunks:          # the values of the slice (no parent bytes, any chunking)
                        h.update(np.ascontiguousarray(chunk.to_numpy(zero_copy_only=False)).tobytes())
                        h.update(np.asarray(chunk.is_null()).tobytes() if chunk.null_count else b"")
                else:                                 # strings, dictionaries, ...: small tables, by value
                    h.update(repr(col.to_pylist()).encode())
        return h.hexdigest()[:16]

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_columns(cls, name: str, columns: dict[str, np.ndarray], schema: DatasetSchema,
                     client_attrs: dict[str, np.ndarray], num_clients: int,
                     meta: dict | None = None, side: dict | None = None,
                     hand_over: bool = False) -> "FederatedDataset":
        """Sort rows by (client, split), compute offsets and validate. `columns` must hold
        `client`, `split`, every schema field and every task. `hand_over`: the caller gives up
        `columns` (the dict is emptied): each input array is released once its ordered copy exists,
        so the peak is one column above the dataset instead of twice the dataset."""
        missing = [c for c in (CLIENT, SPLIT, *[f.name for f in schema.categorical],
                               *schema.numeric, *schema.tasks) if c not in columns]
        if missing:
            raise DataError(f"{name}: missing column(s) {missing}")
        client = np.asarray(columns[CLIENT], dtype=np.int64)
        split = np.asarray(columns[SPLIT], dtype=np.int8)
        order = client_split_order(client, split)

        def ordered(name: str, dtype) -> np.ndarray:
            a = np.asarray(columns.pop(name) if hand_over else columns[name], dtype=dtype)
            if order is None:                # in order already: the caller's array itself only if handed over
                return a if hand_over else a.copy()
            return a[order]
        del client, split
        cols = {CLIENT: ordered(CLIENT, np.int64), SPLIT: ordered(SPLIT, np.int8)}
        for f in schema.categorical:
            cols[f.name] = ordered(f.name, np.int64)
        for c in (*schema.numeric, *schema.tasks):
            cols[c] = ordered(c, np.float32)
        for c in (oracle_column(t) for t in schema.tasks):     # ground truth of generated data, if any
            if c in columns:
                cols[c] = ordered(c, np.float32)
        if hand_over:
            columns.clear()
        counts = np.bincount(cols[CLIENT], minlength=num_clients) if len(cols[CLIENT]) else np.zeros(num_clients, np.int64)
        offsets = np.zeros(num_clients + 1, dtype=np.int64)
        offsets[1:] = np.cumsum(counts)
        attrs = {f.name: np.asarray(client_attrs[f.name], dtype=np.int64) for f in schema.client_categorical}
        attrs.update({k: v for k, v in client_attrs.items() if k not in attrs})
        ds = cls(name=name, table=pa.table(cols), offsets=offsets, schema=schema,
                 client_attrs=pa.table(attrs) if attrs else pa.table({"_": np.zeros(num_clients, np.int8)}),
                 meta=dict(meta or {}), side=dict(side or {}))
        ds.validate()
        return ds

    def validate(self) -> None:
        """Raise DataError naming the column and the expectation on the first violation."""
        n = self.name
        client = self.column(CLIENT)
        if len(client) and (client.min() < 0 or client.max() >= self.num_clients):
            raise DataError(f"{n}: column '{CLIENT}' must hold ids in [0, {self.num_clients})")
        if len(client) > 1 and np.any(np.diff(client) < 0):
            raise DataError(f"{n}: column '{CLIENT}' must be sorted ascending")
        split = self.column(SPLIT)
        if len(split) and (split.min() < 0 or split.max() > TEST):
            raise DataError(f"{n}: column '{SPLIT}' must be 0 (train), 1 (val) or 2 (test)")
        for f in self.schema.categorical:
            v = self.column(f.name)
            if len(v) and (v.min() < 0 or v.max() >= f.vocab):
                raise DataError(f"{n}: categorical column '{f.name}' must hold codes in [0, {f.vocab}), "
                                f"found {int(v.min())}..{int(v.max())}")
        for t in self.schema.tasks:
            y = self.column(t)
            bad = ~((y == 0) | (y == 1))
            if bad.any():
                raise DataError(f"{n}: task label column '{t}' must be 0 or 1, found {y[bad][0]!r}")
        for c in self.schema.numeric:
            if not np.isfinite(self.column(c)).all():
                raise DataError(f"{n}: numeric column '{c}' must be finite (found NaN or inf)")
        if self.client_attrs.num_rows != self.num_clients:
            raise DataError(f"{n}: client attributes must have one row per client "
                            f"({self.num_clients}), found {self.client_attrs.num_rows}")
        for f in self.schema.client_categorical:
            v = self.client_attr(f.name)
            if len(v) and (v.min() < 0 or v.max() >= f.vocab):
                raise DataError(f"{n}: client attribute '{f.name}' must hold codes in [0, {f.vocab})")
