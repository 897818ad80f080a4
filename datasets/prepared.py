"""The sharded data plane: a `FederatedDataset` written once as Parquet, bucketed by owner, so that
each worker reads only its own clients' rows and no node has to hold the whole dataset.

    fleetrec data prepare CONFIG --out DIR [--buckets 64]     # write the layout
    data: {name: prepared, path: DIR}                         # run from it

The layout (`DIR/`):
- `rows/bucket-BBBBB.parquet`: the rows of the clients c with c % B == b, in the dataset's own
  order (by client, then split, then row), with row groups of at most `row_group_rows` rows, so
  a row group covers a client range (its statistics let a reader skip it);
- `clients.parquet` (one row per client: the client attributes), `offsets.npy` ((C+1,) row
  offsets) and `split_offsets.npy` ((C, 4) train / val / test starts and end), `side/<name>.parquet`;
  files and folders are world-readable (a shared file system, another user);
- `manifest.json`: format version, name, schema, meta, bucket count, row and client counts, the
  dataset's content digest (`FederatedDataset.fingerprint`, so checkpoints of an in-memory run and
  of a run from its layout recognise the same data), the SHA-256 of every file (a worker checks the
  files it reads: an edited shard is refused, not trained on), and the reference values a run
  reports (ceiling, client-rate floor) computed from all rows when the layout was written.

The handle a run passes around (`PreparedDataset`) holds the folder and the manifest only: the
driver, the coordinator and a worker restarted on another node each read what they need from the
folder (local disk or a shared file system), so losing the node that started the run does not lose
the data. With `modulo` placement and a worker count that divides the bucket count, worker w reads
exactly the buckets b with b % W == w; otherwise it reads the buckets its clients fall in and keeps
their rows. Either way its `FederatedDataset` keeps the global client ids (the other clients own
zero rows), so training and evaluation are the same code, with the same results, as in memory
(tests/test_prepared.py).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fleetrec.datasets.federated import CLIENT, CategoricalField, DataError, DatasetSchema, FederatedDataset
from fleetrec.datasets.sources import DataConfig

FORMAT = "fleetrec-prepared"
VERSION = 1
MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _schema_dict(s: DatasetSchema) -> dict:
    return {"categorical": [[f.name, f.vocab] for f in s.categorical], "numeric": list(s.numeric),
            "tasks": list(s.tasks), "client_categorical": [[f.name, f.vocab] for f in s.client_categorical],
            "scenario": s.scenario}


def _schema(d: dict) -> DatasetSchema:
    return DatasetSchema(categorical=tuple(CategoricalField(n, int(v)) for n, v in d["categorical"]),
                         numeric=tuple(d["numeric"]), tasks=tuple(d["tasks"]),
                         client_categorical=tuple(CategoricalField(n, int(v)) for n, v in d["client_categorical"]),
                         scenario=d["scenario"])


def _plain(v):
    """NumPy scalars and arrays in the dataset's meta, as JSON values."""
    if isinstance(v, (np.generic, np.ndarray)):
        return v.tolist()
    raise TypeError(f"{type(v).__name__} is not JSON")


def bucket_of(clients: np.ndarray, buckets: int) -> np.ndarray:
    return np.asarray(clients, dtype=np.int64) % buckets


def write(ds: FederatedDataset, out: str | Path, buckets: int = 64, row_group_rows: int = 1 << 20,
          reference: dict | None = None, seed: int | None = None) -> Path:
    """Write `ds` as the layout above into `out` (which must not exist, or be an earlier layout:
    replaced). Written into a temporary folder beside `out` and renamed, so a failure leaves
    nothing half-written (and an earlier layout in place). `reference`: values computed from all
    rows that a run reports. `seed`: the experiment seed the rows were drawn with, or None when they
    do not depend on it (`data.seed` pinned); a run with another seed is refused."""
    out = Path(out)
    if buckets < 1:
        raise DataError(f"--buckets: got {buckets}, expected >= 1")
    if out.exists() and not (out / MANIFEST).is_file():
        raise DataError(f"{out}: exists and is not a prepared dataset (no {MANIFEST}); choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent))
    try:
        (tmp / "rows").mkdir()
        bucket = bucket_of(ds.column(CLIENT), buckets)
        # one stable pass groups the rows by bucket, each bucket keeping the dataset's own order
        # (a radix sort for bucket counts that fit int16)
        by_bucket = np.argsort(bucket.astype(np.int16) if buckets <= np.iinfo(np.int16).max else bucket, kind="stable")
        ends = np.cumsum(np.bincount(bucket, minlength=buckets))
        files = {}
        for b in range(buckets):
            rows = by_bucket[ends[b - 1] if b else 0:ends[b]]
            name = f"rows/bucket-{b:05d}.parquet"
            pq.write_table(ds.table.take(pa.array(rows)), tmp / name, row_group_size=row_group_rows)
            files[name] = None
        pq.write_table(ds.client_attrs, tmp / "clients.parquet")
        np.save(tmp / "offsets.npy", np.ascontiguousarray(ds.offsets, dtype=np.int64))
        np.save(tmp / "split_offsets.npy", np.ascontiguousarray(ds.split_offsets, dtype=np.int64))
        files.update({"clients.parquet": None, "offsets.npy": None, "split_offsets.npy": None})
        if ds.side:
            (tmp / "side").mkdir()
            for k, t in ds.side.items():
                pq.write_table(t, tmp / "side" / f"{k}.parquet")
                files[f"side/{k}.parquet"] = None
        files = {name: _sha256(tmp / name) for name in files}
        manifest = {"format": FORMAT, "version": VERSION, "name": ds.name, "schema": _schema_dict(ds.schema),
                    "meta": ds.meta, "side": sorted(ds.side), "buckets": buckets, "num_clients": ds.num_clients,
                    "num_rows": ds.num_rows, "columns": ds.table.column_names, "fingerprint": ds.fingerprint(),
                    "files": files, "reference": reference or {}, "seed": seed}
        try:
            text = json.dumps(manifest, indent=1, sort_keys=True, default=_plain)
        except TypeError as e:
            raise DataError(f"{ds.name}: dataset meta is not JSON ({e}); cannot prepare it") from None
        (tmp / MANIFEST).write_text(text)
        for q in (tmp, *tmp.rglob("*")):               # readable by other users of a shared file system
            q.chmod(0o755 if q.is_dir() else 0o644)
        old = None
        if out.exists():                                # the earlier layout moves aside until the new one is in
            old = Path(tempfile.mkdtemp(prefix=out.name + ".", suffix=".old", dir=out.parent))
            os.replace(out, old / "layout")
        try:
            os.replace(tmp, out)
        except OSError:
            if old is not None:
                os.replace(old / "layout", out)
            raise
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    f = path / MANIFEST
    if not f.is_file():
        raise DataError(f"{path}: not a prepared dataset (no {MANIFEST}); write one with "
                        "`fleetrec data prepare CONFIG --out DIR`")
    try:
        m = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{f}: unreadable manifest ({e})") from None
    if m.get("format") != FORMAT or m.get("version") != VERSION:
        raise DataError(f"{f}: format {m.get('format')!r} version {m.get('version')!r}; expected {FORMAT!r} "
                        f"version {VERSION}: prepare it again with this fleetrec")
    return m


@dataclass(frozen=True, eq=False)
class PreparedDataset:
    """A prepared layout, by its folder and manifest: what the driver and coordinator need (counts,
    schema, offsets, client attributes, digest) without the rows; `load(owned)` reads a worker's
    rows. Pickles as (path, manifest) only: the arrays it reads are not shipped between processes."""
    path: Path
    manifest: dict = field(repr=False)

    @classmethod
    def open(cls, path: str | Path) -> "PreparedDataset":
        path = Path(path).resolve()
        return cls(path, read_manifest(path))

    def __getstate__(self):
        return {"path": self.path, "manifest": self.manifest}

    def __setstate__(self, state):
        object.__setattr__(self, "path", state["path"])
        object.__setattr__(self, "manifest", state["manifest"])

    # -------------------------------------------------------------- what FederatedDataset offers without rows
    name = property(lambda self: self.manifest["name"])
    num_clients = property(lambda self: int(self.manifest["num_clients"]))
    num_rows = property(lambda self: int(self.manifest["num_rows"]))
    meta = property(lambda self: self.manifest["meta"])
    buckets = property(lambda self: int(self.manifest["buckets"]))

    @cached_property
    def schema(self) -> DatasetSchema:
        return _schema(self.manifest["schema"])

    @cached_property
    def offsets(self) -> np.ndarray:
        return self._array("offsets.npy")

    @cached_property
    def split_offsets(self) -> np.ndarray:
        return self._array("split_offsets.npy")

    @cached_property
    def client_attrs(self) -> pa.Table:
        return pq.read_table(self._file("clients.parquet"))

    def rows_per_client(self, split: int) -> np.ndarray:
        so = self.split_offsets
        return so[:, split + 1] - so[:, split]

    def client_attr(self, name: str) -> np.ndarray:
        return self.client_attrs.column(name).to_numpy()

    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    def column(self, name: str) -> np.ndarray:
        raise DataError(f"data.name=prepared ({self.path}): the rows live in the layout's shards and are read "
                        f"by the workers; this step needs every row in one process (column {name!r}): run it "
                        "on the source config instead")

    # -------------------------------------------------------------- files
    def _file(self, name: str) -> Path:
        """`name` inside the layout, checked against the digest the manifest recorded."""
        p = self.path / name
        want = self.manifest["files"].get(name)
        if not p.is_file():
            raise DataError(f"{p}: missing from the prepared dataset {self.path}; prepare it again")
        if want is not None and _sha256(p) != want:
            raise DataError(f"{p}: its content changed since it was prepared (SHA-256 differs from "
                            f"{self.path / MANIFEST}); prepare it again")
        return p

    def _array(self, name: str) -> np.ndarray:
        a = np.load(self._file(name))
        a.flags.writeable = False
        return a

    def _buckets_of(self, owned: np.ndarray) -> list[int]:
        return np.unique(bucket_of(owned, self.buckets)).tolist()

    def load(self, owned: np.ndarray) -> FederatedDataset:
        """The rows of the `owned` clients (global ids) as a FederatedDataset over all clients: the
        others own zero rows. Reads only the buckets those clients fall in."""
        owned = np.unique(np.asarray(owned, dtype=np.int64))
        parts = []
        for b in self._buckets_of(owned):                  # each bucket filtered as it is read: a worker never
            part = pq.read_table(self._file(f"rows/bucket-{b:05d}.parquet"))   # holds other workers' rows
            keep = np.isin(part.column(CLIENT).to_numpy(), owned)
            parts.append(part if keep.all() else part.filter(pa.array(keep)))
            del part
        names = self.manifest["columns"]
        table = pa.concat_tables(parts) if parts else pa.table(
            {c: pa.array([], type=t) for c, t in zip(names, self._empty_types(names))})
        del parts
        client = table.column(CLIENT).to_numpy()
        order = np.argsort(client, kind="stable")          # each bucket is in order; across buckets, merge
        if len(order) and not (np.diff(order) == 1).all():
            table = table.take(pa.array(order))
        table = table.combine_chunks()
        counts = np.zeros(self.num_clients, dtype=np.int64)
        counts[owned] = self.offsets[owned + 1] - self.offsets[owned]
        offsets = np.zeros(self.num_clients + 1, dtype=np.int64)
        offsets[1:] = np.cumsum(counts)
        if offsets[-1] != table.num_rows:
            raise DataError(f"{self.path}: the shards hold {table.num_rows} rows of these clients, the offsets "
                            f"say {int(offsets[-1])}; prepare it again")
        side = {k: pq.read_table(self._file(f"side/{k}.parquet")) for k in self.manifest["side"]}
        return FederatedDataset(name=self.name, table=table, offsets=offsets, schema=self.schema,
                                client_attrs=self.client_attrs, meta=dict(self.meta), side=side,
                                row_base=self.offsets[:-1])

    def _empty_types(self, names: list[str]) -> list[pa.DataType]:
        t = pq.read_schema(self._file("rows/bucket-00000.parquet"))
        return [t.field(n).type for n in names]

    def load_all(self) -> FederatedDataset:
        return self.load(np.arange(self.num_clients))


# ------------------------------------------------------------------------------------------ data source
@dataclass(frozen=True)
class PreparedConfig(DataConfig):
    """A dataset written by `fleetrec data prepare CONFIG --out DIR`: each worker reads its own clients' rows."""
    name: str = "prepared"
    path: str = ""                      # the folder `fleetrec data prepare --out` wrote

    def validate(self) -> str | None:
        if not self.path:
            return "path: expected the folder written by `fleetrec data prepare CONFIG --out DIR`"
        return None

    def build(self, seed: int) -> PreparedDataset:
        return PreparedDataset.open(Path(self.path).expanduser())
