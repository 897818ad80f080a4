"""The I/O base of the data sources: where raw data lives, checked CSV reading, the Parquet cache.

Every real source reads its raw files in place (never copied) with `read_csv` and checks each
column with `numeric_column`, so a bad file fails with one line naming the file, the column and
the row; parsed frames are cached as Parquet keyed by the raw bytes (`content_cache_path`,
`cached_frame`), written atomically.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from fleetrec.datasets.federated import DataError

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REPO_ROOT = Path(__file__).resolve().parents[1]
PARSE_VERSION = 1
PARSE_COUNT = {"parses": 0}        # raw parses done in this process (the cache-hit test reads it)


def default_cache_dir() -> Path:
    return Path(os.environ.get("FLEETREC_CACHE") or Path.home() / ".cache" / "fleetrec")


# ---------------------------------------------------------------------------------------- raw reading
def read_csv(path: Path, columns: tuple[str, ...], *, sep: str = ",", header: bool = True,
              encoding: str = "utf-8", dtype: dict | None = None) -> pd.DataFrame:
    """Read a delimited file; DataError (naming the file and column) when it is absent, empty or short.
    `dtype` (e.g. {0: str} without a header) keeps id columns as text (leading zeros of Amazon ASINs)."""
    if not path.is_file():
        raise DataError(f"{path}: file not found (set data.path to the folder holding it)")
    try:
        df = pd.read_csv(path, sep=sep, header=0 if header else None, encoding=encoding, dtype=dtype,
                         skipinitialspace=True, engine="c" if sep != "|" else "python")
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: file is empty, expected columns {', '.join(columns)}") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot parse ({e}); expected columns {', '.join(columns)}") from None
    except (EOFError, OSError, zlib.error) as e:      # gzip.BadGzipFile is an OSError; a cut file, EOFError
        kind = "a truncated or damaged compressed file" if path.suffix in (".gz", ".bz2", ".xz", ".zip") else "unreadable"
        raise DataError(f"{path}: {kind} ({e})") from None
    if header:
        df.columns = [str(c).strip() for c in df.columns]
        missing = [c for c in columns if c not in df.columns]
        if missing:
            raise DataError(f"{path}: missing column '{missing[0]}' (header has {list(df.columns)}, "
                            f"expected {', '.join(columns)})")
        df = df[list(columns)]
    else:
        if df.shape[1] < len(columns):
            raise DataError(f"{path}: missing column '{columns[df.shape[1]]}' (found {df.shape[1]} "
                            f"fields per line, expected {len(columns)}: {', '.join(columns)})")
        df = df.iloc[:, :len(columns)]
        df.columns = list(columns)
    if len(df) == 0:
        raise DataError(f"{path}: file has no rows, expected columns {', '.join(columns)}")
    return df


def line_of(path: Path, row: int, header: bool = True) -> int:
    """The physical (1-based) line of data row `row` of a file `read_csv` read. pandas skips blank
    lines, so `row + 2` is wrong below one; the file is counted again only when an error names a line."""
    import bz2
    import gzip
    import lzma
    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(Path(path).suffix, open)
    want, seen = row + (1 if header else 0), -1         # non-blank lines before it (the header is one)
    try:
        with opener(path, "rb") as fh:
            for n, line in enumerate(fh, 1):
                if line.strip():
                    seen += 1
                    if seen == want:
                        return n
    except (OSError, EOFError):
        pass
    return row + (2 if header else 1)


def numeric_column(df: pd.DataFrame, col: str, path: Path, *, integer: bool, lo: float | None = None,
             hi: float | None = None, header: bool = True) -> np.ndarray:
    """Column as int64/float64; DataError naming file, column, line and expectation on a bad value."""
    s = df[col]
    kind = "an integer" if integer else "a number"
    if not pd.api.types.is_numeric_dtype(s) or s.isna().any():
        num = pd.to_numeric(s, errors="coerce")
        bad = np.flatnonzero(num.isna().to_numpy())
        if len(bad):
            i = int(bad[0])
            raise DataError(f"{path}: column '{col}' must be {kind}, found {str(s.iloc[i])!r} at line {line_of(path, i, header)}")
        s = num
    if integer and pd.api.types.is_integer_dtype(s):
        big = np.flatnonzero(s.to_numpy() > np.iinfo(np.int64).max) if s.dtype == np.uint64 else []
        if len(big):                       # would wrap around to a negative id
            i = int(big[0])
            raise DataError(f"{path}: column '{col}' must be an integer below 2^63, found {s.iloc[i]} at line "
                            f"{line_of(path, i, header)}")
        exact = s.to_numpy(dtype=np.int64)
    else:
        exact = None
    v = s.to_numpy(dtype=np.float64)
    if integer and exact is None:
        bad = np.flatnonzero((v != np.floor(v)) | (np.abs(v) >= 2.0 ** 53))
        if len(bad):
            i = int(bad[0])
            what = "too large to be read exactly" if v[i] == np.floor(v[i]) else "not a whole number"
            raise DataError(f"{path}: column '{col}' must be {kind}, found {float(v[i])!r} at line {line_of(path, i, header)} "
                            f"({what})")
    if lo is not None or hi is not None:
        lo_ = -np.inf if lo is None else lo
        hi_ = np.inf if hi is None else hi
        bad = np.flatnonzero((v < lo_) | (v > hi_))
        if len(bad):
            i = int(bad[0])
            rng = f"[{lo:g}, {hi:g}]" if lo is not None and hi is not None else (f">= {lo:g}" if lo is not None else f"<= {hi:g}")
            val = int(v[i]) if integer else float(v[i])
            raise DataError(f"{path}: column '{col}' must be in {rng}, found {val} at line {line_of(path, i, header)}")
    if not integer:
        return v
    return exact if exact is not None else v.astype(np.int64)


# ---------------------------------------------------------------------------------------- cache
def atomic_write_parquet(table: pa.Table, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _check_cached(table: pa.Table, path: Path, expected: dict[str, str]) -> pd.DataFrame:
    for col, kind in expected.items():
        if col not in table.column_names:
            raise DataError(f"{path}: cache file lacks column '{col}' (expected {kind}); delete the file to rebuild")
        t = table.schema.field(col).type
        ok = pa.types.is_integer(t) if kind == "int64" else (pa.types.is_floating(t) if kind == "float64" else True)
        if not ok:
            raise DataError(f"{path}: column '{col}' in the cache must be {kind}, found {t}; "
                            "delete the file to rebuild")
        if table.column(col).null_count:
            raise DataError(f"{path}: column '{col}' in the cache must have no nulls; delete the file to rebuild")
    return table.to_pandas()


def content_cache_path(folder: str, version: str, options: dict, root: Path, files: list[Path],
                       cache_dir: str | None) -> Path:
    """Cache file keyed by the raw files' bytes, the parser version and the parse options."""
    h = hashlib.sha256()
    h.update(f"{folder}|{version}|{json.dumps(options, sort_keys=True)}".encode())
    for p in files:
        h.update(f"|{p.relative_to(root) if p.is_relative_to(root) else p.name}|".encode())
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
    base = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    return base / f"{folder}-{h.hexdigest()[:20]}.parquet"


def cached_frame(target: Path | None, expected: dict[str, str], parse) -> pd.DataFrame:
    """Rows from the Parquet cache `target` when present, else `parse()` cast to `expected`
    (int64 / float64, anything else as str) and written atomically (None = no cache)."""
    if target is not None and target.is_file():
        try:
            table = pq.read_table(target)
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{target}: unreadable cache file ({e}); delete it to rebuild") from None
        return _check_cached(table, target, expected)
    PARSE_COUNT["parses"] += 1
    df = parse()
    df = pd.DataFrame({c: (df[c].to_numpy().astype(k) if k in ("int64", "float64")
                           else df[c].astype(str).to_numpy()) for c, k in expected.items()})
    if target is not None:
        try:
            atomic_write_parquet(pa.Table.from_pandas(df, preserve_index=False), target)
        except OSError:
            pass    # the cache is an optimization: an unwritable cache dir only costs a re-parse
    return df
