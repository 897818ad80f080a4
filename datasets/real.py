"""Real public rating datasets read in place from `shared/data/`: MovieLens-100k/-1M, Epinions, Ciao, FilmTrust.

Each source is a `DataConfig` whose fields are the YAML keys of the `data:` block. Building runs:

1. parse the raw files into one normalized frame (columns `user`, `item`, `rating`, and where the
   data has them `category`, `time`, `helpfulness`, user demographics, `genre`), checking every
   column's type and range; the frame is cached as Parquet, keyed by the SHA-256 of the raw
   files' bytes, the parser version and the options that affect parsing;
2. dedupe repeated (user, item) pairs, keep users with >= `min_rows` rows, keep `max_clients`
   users by a seeded hash order (or, with `scenario_top_k`, make the k largest categories the clients);
3. split each client's rows (random fractions, or chronological where timestamps exist);
4. derive tasks: `like` = rating >= `rating_threshold`; with `negatives_per_positive` = k, also
   `interaction`: observed rows are positives and k unobserved items per positive are negatives
   (negatives inherit their positive's split and have every task = 0).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from fleetrec.datasets.federated import (CLIENT, SPLIT, SPLIT_NAMES, TEST, VAL, CategoricalField, DataError,
                                         DatasetSchema, FederatedDataset)
from fleetrec.datasets.partition import (by_column, chronological_split, quantile_buckets, random_split,
                                         rows_at_least, subsample_clients)
from fleetrec.datasets.sources import DataConfig

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REPO_ROOT = Path(__file__).resolve().parents[1]
PARSE_VERSION = 1
PARSE_COUNT = {"parses": 0}        # raw parses done in this process (the cache-hit test reads it)
ACTIVITY_BUCKETS = 4


def default_cache_dir() -> Path:
    return Path(os.environ.get("FLEETREC_CACHE") or Path.home() / ".cache" / "fleetrec")


# ---------------------------------------------------------------------------------------- raw reading
def _read_csv(path: Path, columns: tuple[str, ...], *, sep: str = ",", header: bool = True,
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


def _numeric(df: pd.DataFrame, col: str, path: Path, *, integer: bool, lo: float | None = None,
             hi: float | None = None, header: bool = True) -> np.ndarray:
    """Column as int64/float64; DataError naming file, column, line and expectation on a bad value."""
    s = df[col]
    kind = "an integer" if integer else "a number"
    first_line = 2 if header else 1
    if not pd.api.types.is_numeric_dtype(s) or s.isna().any():
        num = pd.to_numeric(s, errors="coerce")
        bad = np.flatnonzero(num.isna().to_numpy())
        if len(bad):
            i = int(bad[0])
            raise DataError(f"{path}: column '{col}' must be {kind}, found {s.iloc[i]!r} at line {i + first_line}")
        s = num
    v = s.to_numpy(dtype=np.float64)
    if integer:
        bad = np.flatnonzero(v != np.floor(v))
        if len(bad):
            i = int(bad[0])
            raise DataError(f"{path}: column '{col}' must be {kind}, found {v[i]!r} at line {i + first_line}")
    if lo is not None or hi is not None:
        lo_ = -np.inf if lo is None else lo
        hi_ = np.inf if hi is None else hi
        bad = np.flatnonzero((v < lo_) | (v > hi_))
        if len(bad):
            i = int(bad[0])
            rng = f"[{lo:g}, {hi:g}]" if lo is not None and hi is not None else (f">= {lo:g}" if lo is not None else f"<= {hi:g}")
            val = int(v[i]) if integer else float(v[i])
            raise DataError(f"{path}: column '{col}' must be in {rng}, found {val} at line {i + first_line}")
    return v.astype(np.int64) if integer else v


# ---------------------------------------------------------------------------------------- cache
def _atomic_write_parquet(table: pa.Table, target: Path) -> None:
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


# ---------------------------------------------------------------------------------------- base config
@dataclass(frozen=True)
class RatingsConfig(DataConfig):
    """Options shared by every real rating source (subclasses set the name, folder and parser)."""
    name: str = "ratings"
    path: str | None = None                # folder with the raw files; null = shared/data/<folder>
    cache_dir: str | None = None           # null = $FLEETREC_CACHE or ~/.cache/fleetrec
    cache: bool = True                     # false: always parse the raw files, write nothing
    rating_threshold: float | None = 4.0   # task `like` = rating >= threshold; null = no `like` task
    negatives_per_positive: int = 0        # > 0 adds task `interaction` with sampled unobserved items
    max_clients: int | None = None         # keep the first N users by seeded hash order
    min_rows: int = 5                      # keep users (or scenarios) with >= min_rows observed rows
    split: str = "random"                  # random | chronological (sources with timestamps)
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    dedupe: bool = True                    # keep one row per (user, item): the latest
    seed: int | None = None                # data seed (subsampling, split, negatives); null = experiment seed

    FOLDER: ClassVar[str] = ""
    FILES: ClassVar[tuple[str, ...]] = ()
    HAS_TIME: ClassVar[bool] = False
    HAS_CATEGORY: ClassVar[bool] = False
    HAS_RATING: ClassVar[bool] = True       # False: implicit feedback (every observed row is a positive)
    RATING_FILE: ClassVar[str] = ""
    CHECKS: ClassVar[dict] = {"negatives_per_positive": ">=0", "max_clients": ">=1", "min_rows": ">=1",
                              "split": ("random", "chronological"), "val_fraction": "0..0.5",
                              "test_fraction": "0..0.5"}

    # -- validation
    def validate(self) -> str | None:
        if self.split == "chronological" and not self.HAS_TIME:
            return f"data.split: got 'chronological', but {self.name} has no timestamps; use 'random'"
        if self.rating_threshold is not None and not self.HAS_RATING:
            return (f"data.rating_threshold: got {self.rating_threshold}, but {self.name} is implicit feedback "
                    "without ratings; set it to null and use negatives_per_positive > 0 (task `interaction`)")
        if not self.task_names():
            return "data: no task: set rating_threshold or negatives_per_positive > 0"
        return None

    def task_names(self) -> tuple[str, ...]:
        out = []
        if self.negatives_per_positive > 0:
            out.append("interaction")
        if self.rating_threshold is not None:
            out.append("like")
        return tuple(out)

    # -- locations
    def root(self) -> Path:
        if self.path is None:
            return SHARED_DATA / self.FOLDER
        p = Path(self.path).expanduser()
        if not p.is_absolute() and not p.exists() and (REPO_ROOT / p).exists():
            p = REPO_ROOT / p
        return p

    def rating_path(self) -> Path:
        return self.root() / self.RATING_FILE

    # -- parse + cache
    def parse_options(self) -> dict:
        """Options that change the parsed frame (part of the cache key)."""
        return {}

    def frame_columns(self) -> dict[str, str]:
        cols = {"user": "int64", "item": "int64", "rating": "float64"}
        if self.HAS_CATEGORY:
            cols["category"] = "int64"
        if self.HAS_TIME:
            cols["time"] = "int64"
        return cols

    def parse(self, root: Path) -> pd.DataFrame:
        raise TypeError(f"{type(self).__name__} must define parse()")   # abstract

    def cache_path(self, root: Path) -> Path:
        files = []
        for f in self.FILES:
            p = root / f
            if not p.is_file():
                raise DataError(f"{p}: file not found (set data.path to the folder holding {', '.join(self.FILES)})")
            files.append(p)
        return content_cache_path(self.FOLDER, f"parser-v{PARSE_VERSION}", self.parse_options(), root, files,
                                  self.cache_dir)

    def load_frame(self) -> pd.DataFrame:
        """The parsed, checked raw rows (from the Parquet cache when present)."""
        root = self.root()
        if not root.is_dir():
            raise DataError(f"{root}: data folder not found (set data.path)")
        return cached_frame(self.cache_path(root) if self.cache else None, self.frame_columns(),
                            lambda: self.parse(root))

    # -- build
    def build(self, seed: int) -> FederatedDataset:
        return build_ratings(self, seed if self.seed is None else self.seed)

    def client_attributes(self, df: pd.DataFrame, users: np.ndarray) -> tuple[dict, list[CategoricalField]]:
        """Per-client attributes beyond `activity` (users = original user id per client)."""
        return {}, []

    def row_features(self, df: pd.DataFrame) -> dict[str, tuple[np.ndarray, int]]:
        """Extra per-row categorical features from the frame (name -> (codes, vocab)); item-keyed."""
        return {}

    def scenario_top_k_value(self) -> int:
        return 0

    def extra_tasks(self, df: pd.DataFrame) -> dict[str, np.ndarray]:
        return {}


# ---------------------------------------------------------------------------------------- cache
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
            _atomic_write_parquet(pa.Table.from_pandas(df, preserve_index=False), target)
        except OSError:
            pass    # the cache is an optimization: an unwritable cache dir only costs a re-parse
    return df


# ---------------------------------------------------------------------------------------- build
def _dedupe(df: pd.DataFrame, has_time: bool) -> pd.DataFrame:
    order = np.arange(len(df))
    if has_time:
        df = df.assign(_o=order).sort_values(["time", "_o"], kind="stable")
    keep = ~df.duplicated(["user", "item"], keep="last")
    df = df[keep]
    if has_time:
        df = df.sort_values("_o", kind="stable").drop(columns="_o")
    return df.reset_index(drop=True)


def _member(keys: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    pos = np.searchsorted(sorted_set, keys)
    return sorted_set[np.minimum(pos, len(sorted_set) - 1)] == keys


def _sample_negatives(rng, owner: np.ndarray, item: np.ndarray, num_items: int,
                      k: int) -> tuple[np.ndarray, np.ndarray]:
    """k items per observed row, each unobserved by that row's owner (user); draws are with replacement.

    Returns (keep mask over the len(owner) * k draws, sampled item codes): a draw is dropped only when
    its owner has observed (almost) every item and 50 redraws found nothing new.
    """
    observed = np.unique(owner.astype(np.int64) * num_items + item)
    neg_owner = np.repeat(owner.astype(np.int64), k)
    neg_item = rng.integers(0, num_items, size=len(neg_owner))
    clash = _member(neg_owner * num_items + neg_item, observed)
    for _ in range(50):
        if not clash.any():
            break
        idx = np.flatnonzero(clash)
        neg_item[idx] = rng.integers(0, num_items, size=len(idx))
        clash[idx] = _member(neg_owner[idx] * num_items + neg_item[idx], observed)
    return ~clash, neg_item


def select_rows(cfg: RatingsConfig, seed: int) -> tuple[pd.DataFrame, np.ndarray]:
    """The kept observed rows (dedupe, min_rows, max_clients / scenario_top_k) and the client key per row.

    `build_ratings` codes items by rank among `np.unique(rows["item"])`, so helpers that need the built
    dataset's item codes (e.g. `fleetrec.datasets.amazon.amazon_item_pairs`) call this with the same seed."""
    src = cfg.rating_path()
    df = cfg.load_frame()
    if cfg.dedupe:
        df = _dedupe(df, cfg.HAS_TIME)
    top_k = cfg.scenario_top_k_value()
    if top_k:
        sizes = df.groupby("category").size()
        sizes = sizes[sizes >= cfg.min_rows]
        ids, counts = sizes.index.to_numpy(), sizes.to_numpy()
        cats = np.sort(ids[np.lexsort((ids, -counts))][:top_k])      # largest first, ties by id
        df = df[df["category"].isin(cats)]
        max_users = getattr(cfg, "max_users", None)
        if max_users is not None:
            df = df[df["user"].isin(subsample_clients(df["user"].to_numpy(), max_users, seed))]
        key = df["category"].to_numpy()
    else:
        df = df[rows_at_least(df["user"].to_numpy(), cfg.min_rows)]
        if len(df):
            df = df[df["user"].isin(subsample_clients(df["user"].to_numpy(), cfg.max_clients, seed))]
        key = df["user"].to_numpy()
    df = df.reset_index(drop=True)
    if len(df) == 0:
        raise DataError(f"{src}: column 'user_id': no client has >= min_rows={cfg.min_rows} rows "
                        "after filtering; expected at least one")
    return df, key


def build_ratings(cfg: RatingsConfig, seed: int) -> FederatedDataset:
    src = cfg.rating_path()
    df, key = select_rows(cfg, seed)
    rng = np.random.default_rng([seed, 7301])
    top_k = cfg.scenario_top_k_value()
    client, client_keys = by_column(key)
    num_clients = len(client_keys)
    item, item_ids = by_column(df["item"].to_numpy())
    num_items = len(item_ids)
    if cfg.split == "chronological":
        split = chronological_split(client, df["time"].to_numpy(), cfg.val_fraction, cfg.test_fraction)
    else:
        split = random_split(client, cfg.val_fraction, cfg.test_fraction, seed)

    cols: dict[str, np.ndarray] = {CLIENT: client, SPLIT: split, "item_id": item}
    fields = [CategoricalField("item_id", num_items)]
    first_row_of_item = np.empty(num_items, dtype=np.int64)            # item code -> its first row
    first_row_of_item[item[::-1]] = np.arange(len(item))[::-1]
    item_feats: dict[str, np.ndarray] = {}
    if cfg.HAS_CATEGORY:
        cat_code, cat_ids = by_column(df["category"].to_numpy())
        cols["category_id"] = cat_code
        item_feats["category_id"] = cat_code[first_row_of_item]
        fields.append(CategoricalField("category_id", len(cat_ids)))
    for name, (codes, vocab) in cfg.row_features(df).items():
        cols[name] = codes
        item_feats[name] = codes[first_row_of_item]
        fields.append(CategoricalField(name, vocab))
    if top_k:
        user_code, user_ids = by_column(df["user"].to_numpy())
        cols["user_id"] = user_code
        fields.append(CategoricalField("user_id", len(user_ids)))

    rating = df["rating"].to_numpy()
    tasks: dict[str, np.ndarray] = {}
    if cfg.negatives_per_positive > 0:
        tasks["interaction"] = np.ones(len(df), np.float32)
    if cfg.rating_threshold is not None:
        tasks["like"] = (rating >= cfg.rating_threshold).astype(np.float32)
    for name, y in cfg.extra_tasks(df).items():
        tasks[name] = y.astype(np.float32)
    cols.update(tasks)

    if cfg.negatives_per_positive > 0:
        k = cfg.negatives_per_positive
        # the "observed" set is per user, also in scenario mode (a user's items are never its negatives)
        owner = cols["user_id"] if top_k else client
        keep, neg_item = _sample_negatives(rng, owner, item, num_items, k)
        src_row = np.repeat(np.arange(len(df)), k)[keep]
        neg = {CLIENT: client[src_row], SPLIT: split[src_row], "item_id": neg_item[keep]}
        for name, per_item in item_feats.items():
            neg[name] = per_item[neg["item_id"]]
        if top_k:
            neg["user_id"] = cols["user_id"][src_row]
        for t in tasks:
            neg[t] = np.zeros(len(src_row), np.float32)
        cols = {c: np.concatenate([v, neg[c]]) for c, v in cols.items()}

    for s, frac in ((VAL, cfg.val_fraction), (TEST, cfg.test_fraction)):
        if frac > 0 and not np.any(cols[SPLIT] == s):
            raise DataError(f"{src}: column 'split': the {SPLIT_NAMES[s]} split is empty after filtering "
                            f"(min_rows={cfg.min_rows}); expected >= 1 row (clients need >= 3 rows)")

    n_obs = np.bincount(client, minlength=num_clients)
    attrs: dict[str, np.ndarray] = {}
    client_fields: list[CategoricalField] = []
    scenario = None
    if top_k:
        attrs["scenario"] = np.arange(num_clients, dtype=np.int64)
        client_fields.append(CategoricalField("scenario", num_clients))
        attrs["label"] = np.array([f"category:{int(c)}" for c in client_keys], dtype=object)
        scenario = "scenario"
    else:
        more, more_fields = cfg.client_attributes(df, client_keys)
        attrs.update(more)
        client_fields.extend(more_fields)
        attrs["activity"] = quantile_buckets(n_obs, ACTIVITY_BUCKETS)
        client_fields.append(CategoricalField("activity", ACTIVITY_BUCKETS))
        attrs["label"] = np.array([f"user:{int(u)}" for u in client_keys], dtype=object)
    schema = DatasetSchema(categorical=tuple(fields), numeric=(), tasks=tuple(tasks),
                           client_categorical=tuple(client_fields), scenario=scenario)
    meta = {"source": cfg.name, "path": str(cfg.root()), "seed": seed,
            "positive_rate": {t: float(cols[t].mean()) for t in tasks}}
    return FederatedDataset.from_columns(cfg.name, cols, schema, attrs, num_clients, meta)


# ---------------------------------------------------------------------------------------- sources
_ML_GENRES = 19
_ML_AGE_EDGES = (18, 25, 35, 45, 50, 56)      # MovieLens-1M age groups: <18, 18-24, ..., 56+


def _attach_ml_users_items(df: pd.DataFrame, p: Path, uid: np.ndarray, age: np.ndarray, gender: np.ndarray,
                           occ: np.ndarray, mid: np.ndarray, genre: np.ndarray, users_file: str,
                           items_file: str) -> pd.DataFrame:
    """Join user demographics and the item genre onto the rating rows; DataError on a dangling id."""
    u_idx = pd.Index(uid).get_indexer(df["user"].to_numpy())
    if (u_idx < 0).any():
        i = int(np.flatnonzero(u_idx < 0)[0])
        raise DataError(f"{p}: column 'user_id' must reference a user in {users_file}, "
                        f"found {df['user'].iloc[i]} at line {i + 1}")
    i_idx = pd.Index(mid).get_indexer(df["item"].to_numpy())
    if (i_idx < 0).any():
        i = int(np.flatnonzero(i_idx < 0)[0])
        raise DataError(f"{p}: column 'item_id' must reference a movie in {items_file}, "
                        f"found {df['item'].iloc[i]} at line {i + 1}")
    df["age"] = age[u_idx]
    df["gender"] = gender[u_idx]
    df["occupation"] = occ[u_idx]
    df["genre"] = genre[i_idx]
    return df


def _ml_gender(users: pd.DataFrame, p: Path, first_line: int = 1) -> np.ndarray:
    gender = users["gender"].astype(str).str.strip().map({"M": 0, "F": 1})
    if gender.isna().any():
        i = int(np.flatnonzero(gender.isna().to_numpy())[0])
        raise DataError(f"{p}: column 'gender' must be 'M' or 'F', found {users['gender'].iloc[i]!r} "
                        f"at line {i + first_line}")
    return gender.to_numpy().astype(np.int64)


def _movielens_ratings(raw: pd.DataFrame, p: Path) -> pd.DataFrame:
    """The checked (user, item, rating, time) frame of a MovieLens ratings file (u.data / ratings.dat)."""
    return pd.DataFrame({
        "user": _numeric(raw, "user_id", p, integer=True, lo=1, header=False),
        "item": _numeric(raw, "item_id", p, integer=True, lo=1, header=False),
        "rating": _numeric(raw, "rating", p, integer=True, lo=1, hi=5, header=False).astype(np.float64),
        "time": _numeric(raw, "timestamp", p, integer=True, lo=0, header=False)})


@dataclass(frozen=True)
class _MovieLensConfig(RatingsConfig):
    """Shared by MovieLens-100k and -1M: frame columns, the `genre` row feature (first genre in the canonical
    19-genre order, 0 = unknown) and client attributes age_group (7), gender (2), occupation (21), activity."""
    HAS_TIME: ClassVar[bool] = True

    def frame_columns(self) -> dict[str, str]:
        return {**super().frame_columns(), "age": "int64", "gender": "int64", "occupation": "int64",
                "genre": "int64"}

    def row_features(self, df):
        return {"genre": (df["genre"].to_numpy(), _ML_GENRES)}

    def client_attributes(self, df, users):
        first = df.drop_duplicates("user").set_index("user").loc[users]
        age_group = np.digitize(first["age"].to_numpy(), _ML_AGE_EDGES).astype(np.int64)
        occ = first["occupation"].to_numpy()
        n_occ = max(21, int(df["occupation"].max()) + 1)
        return ({"age_group": age_group, "gender": first["gender"].to_numpy(), "occupation": occ},
                [CategoricalField("age_group", len(_ML_AGE_EDGES) + 1), CategoricalField("gender", 2),
                 CategoricalField("occupation", n_occ)])


@dataclass(frozen=True)
class MovieLens100kConfig(_MovieLensConfig):
    """MovieLens-100k (`u.data`, `u.user`, `u.item`, `u.occupation`): 943 users, 1,682 movies, timestamps.
    Row features: item_id, genre (first genre flag); client attributes: age_group (7), gender (2),
    occupation (21), activity (4)."""
    name: str = "movielens_100k"

    FOLDER: ClassVar[str] = "movielens-100k"
    FILES: ClassVar[tuple[str, ...]] = ("u.data", "u.user", "u.item", "u.occupation")
    RATING_FILE: ClassVar[str] = "u.data"

    def parse(self, root: Path) -> pd.DataFrame:
        p = root / "u.data"
        raw = _read_csv(p, ("user_id", "item_id", "rating", "timestamp"), sep="\t", header=False)
        df = _movielens_ratings(raw, p)
        po = root / "u.occupation"
        if not po.is_file():
            raise DataError(f"{po}: file not found")
        occupations = [line.strip() for line in po.read_text(encoding="latin-1").splitlines() if line.strip()]
        if not occupations:
            raise DataError(f"{po}: column 'occupation': file is empty, expected one occupation per line")
        pu = root / "u.user"
        users = _read_csv(pu, ("user_id", "age", "gender", "occupation", "zip_code"), sep="|", header=False,
                          encoding="latin-1")
        uid = _numeric(users, "user_id", pu, integer=True, lo=1, header=False)
        age = _numeric(users, "age", pu, integer=True, lo=0, hi=150, header=False)
        gender = _ml_gender(users, pu)
        occ = users["occupation"].astype(str).str.strip().map({o: j for j, o in enumerate(occupations)})
        if occ.isna().any():
            i = int(np.flatnonzero(occ.isna().to_numpy())[0])
            raise DataError(f"{pu}: column 'occupation' must be listed in u.occupation, "
                            f"found {users['occupation'].iloc[i]!r} at line {i + 1}")
        pi = root / "u.item"
        items = _read_csv(pi, ("movie_id", "title", "release_date", "video_release_date", "imdb_url",
                               *[f"g{j}" for j in range(_ML_GENRES)]), sep="|", header=False, encoding="latin-1")
        mid = _numeric(items, "movie_id", pi, integer=True, lo=1, header=False)
        flags = np.stack([_numeric(items, f"g{j}", pi, integer=True, lo=0, hi=1, header=False)
                          for j in range(_ML_GENRES)], axis=1)
        genre = np.where(flags.any(axis=1), flags.argmax(axis=1), 0)
        return _attach_ml_users_items(df, p, uid, age, gender, occ.to_numpy().astype(np.int64), mid, genre,
                                      "u.user", "u.item")


# MovieLens-1M genre names in the order of MovieLens-100k's genre flags (code 0 = unknown / none)
_ML_GENRE_NAMES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
                   "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
                   "War", "Western")
_ML1M_AGES = (1, 18, 25, 35, 45, 50, 56)


def _read_dcolon(path: Path, columns: tuple[str, ...], encoding: str = "latin-1") -> pd.DataFrame:
    """A MovieLens-1M `::`-separated file (no header) as strings-or-numbers per column; the last column
    keeps any further `::` (titles). DataError naming the file, the column and the line when short."""
    if not path.is_file():
        raise DataError(f"{path}: file not found (set data.path to the folder holding it)")
    rows = []
    with open(path, encoding=encoding) as fh:
        for n, line in enumerate(fh, 1):
            line = line.rstrip("\r\n")
            if not line:
                continue
            parts = line.split("::", len(columns) - 1)
            if len(parts) < len(columns):
                raise DataError(f"{path}: missing column '{columns[len(parts)]}' at line {n} (expected "
                                f"{len(columns)} '::'-separated fields: {', '.join(columns)})")
            rows.append(parts)
    if not rows:
        raise DataError(f"{path}: file is empty, expected '::'-separated columns {', '.join(columns)}")
    return pd.DataFrame(rows, columns=list(columns))


def _read_ratings_dat(path: Path) -> pd.DataFrame:
    """`ratings.dat` (1M lines) with the fast C parser: split on ':' and keep every other field."""
    cols = ("user_id", "item_id", "rating", "timestamp")
    if not path.is_file():
        raise DataError(f"{path}: file not found (set data.path to the folder holding it)")
    try:
        raw = pd.read_csv(path, sep=":", header=None, engine="c")
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: file is empty, expected '::'-separated columns {', '.join(cols)}") from None
    except pd.errors.ParserError as e:
        raise DataError(f"{path}: cannot parse ({e}); expected '::'-separated columns {', '.join(cols)}") from None
    if raw.shape[1] < 7:
        raise DataError(f"{path}: missing column '{cols[(raw.shape[1] + 1) // 2]}' (expected 4 '::'-separated "
                        f"fields per line: {', '.join(cols)})")
    gaps = raw.iloc[:, [1, 3, 5]].notna().to_numpy()          # the empty field between the two colons
    if gaps.any():
        i = int(np.flatnonzero(gaps.any(axis=1))[0])
        j = int(np.argmax(gaps[i]))
        raise DataError(f"{path}: column '{cols[j + 1]}' at line {i + 1}: fields are not '::'-separated "
                        f"(expected {', '.join(cols)})")
    short = raw.iloc[:, [0, 2, 4, 6]].isna().to_numpy()
    if short.any():
        i = int(np.flatnonzero(short.any(axis=1))[0])
        raise DataError(f"{path}: missing column '{cols[int(np.argmax(short[i]))]}' at line {i + 1} (expected 4 "
                        f"'::'-separated fields: {', '.join(cols)})")
    raw = raw.iloc[:, [0, 2, 4, 6]]
    raw.columns = list(cols)
    return raw


@dataclass(frozen=True)
class MovieLens1MConfig(_MovieLensConfig):
    """MovieLens-1M (`ratings.dat`, `users.dat`, `movies.dat`, `::`): 6,040 users, 3,706 movies, timestamps.
    Same row features and client attributes as movielens_100k (occupation = the 1M code 0..20)."""
    name: str = "movielens_1m"

    FOLDER: ClassVar[str] = "movielens-1m"
    FILES: ClassVar[tuple[str, ...]] = ("ratings.dat", "users.dat", "movies.dat")
    RATING_FILE: ClassVar[str] = "ratings.dat"

    def parse(self, root: Path) -> pd.DataFrame:
        p = root / "ratings.dat"
        raw = _read_ratings_dat(p)
        df = _movielens_ratings(raw, p)
        pu = root / "users.dat"
        users = _read_dcolon(pu, ("user_id", "gender", "age", "occupation", "zip_code"))
        uid = _numeric(users, "user_id", pu, integer=True, lo=1, header=False)
        gender = _ml_gender(users, pu)
        age = _numeric(users, "age", pu, integer=True, lo=0, hi=150, header=False)
        bad = np.flatnonzero(~np.isin(age, _ML1M_AGES))
        if len(bad):
            raise DataError(f"{pu}: column 'age' must be one of {', '.join(map(str, _ML1M_AGES))}, "
                            f"found {int(age[bad[0]])} at line {bad[0] + 1}")
        occ = _numeric(users, "occupation", pu, integer=True, lo=0, hi=20, header=False)
        pm = root / "movies.dat"
        movies = _read_dcolon(pm, ("movie_id", "title", "genres"))
        mid = _numeric(movies, "movie_id", pm, integer=True, lo=1, header=False)
        index = {g: j for j, g in enumerate(_ML_GENRE_NAMES)}
        genre = np.zeros(len(movies), np.int64)
        for r, text in enumerate(movies["genres"].to_numpy()):
            codes = [index.get(g.strip(), -1) for g in str(text).split("|") if g.strip()]
            if any(c < 0 for c in codes):
                g = next(g for g, c in zip(str(text).split("|"), codes) if c < 0)
                raise DataError(f"{pm}: column 'genres' must list '|'-separated MovieLens genres, found {g!r} "
                                f"at line {r + 1}")
            genre[r] = min(codes) if codes else 0
        return _attach_ml_users_items(df, p, uid, age, gender, occ, mid, genre, "users.dat", "movies.dat")


@dataclass(frozen=True)
class _CategoryConfig(RatingsConfig):
    scenario_top_k: int = 0                # > 0: clients = the k largest categories (scenario variant)
    max_users: int | None = None           # scenario variant only: keep N users by seeded hash order

    HAS_CATEGORY: ClassVar[bool] = True
    CHECKS: ClassVar[dict] = {**RatingsConfig.CHECKS, "scenario_top_k": ">=0", "max_users": ">=1"}

    def validate(self) -> str | None:
        if self.scenario_top_k and self.max_clients is not None:
            return ("data.max_clients: with scenario_top_k the clients are categories; "
                    "use max_users to subsample users")
        if not self.scenario_top_k and self.max_users is not None:
            return "data.max_users: only used with scenario_top_k > 0; use max_clients for per-user clients"
        return super().validate()

    def scenario_top_k_value(self) -> int:
        return self.scenario_top_k


@dataclass(frozen=True)
class EpinionsConfig(_CategoryConfig):
    """Epinions (`ratings.csv.gz`): 22,164 users, 296,277 items, 27 categories, ratings 1..5, no timestamps."""
    name: str = "epinions"

    FOLDER: ClassVar[str] = "epinions"
    FILES: ClassVar[tuple[str, ...]] = ("ratings.csv.gz",)
    RATING_FILE: ClassVar[str] = "ratings.csv.gz"

    def parse(self, root: Path) -> pd.DataFrame:
        p = root / "ratings.csv.gz"
        raw = _read_csv(p, ("user_id", "item_id", "category_id", "rating"))
        return pd.DataFrame({
            "user": _numeric(raw, "user_id", p, integer=True, lo=0),
            "item": _numeric(raw, "item_id", p, integer=True, lo=0),
            "category": _numeric(raw, "category_id", p, integer=True, lo=0),
            "rating": _numeric(raw, "rating", p, integer=True, lo=1, hi=5).astype(np.float64)})


@dataclass(frozen=True)
class CiaoConfig(_CategoryConfig):
    """Ciao (`ratings.csv.gz`): 7,375 users, 105,114 items, 28 categories, ratings 0..5, helpfulness 1..7,
    timestamps. `helpfulness_threshold` adds task `helpful` = helpfulness >= threshold."""
    name: str = "ciao"
    helpfulness_threshold: int | None = None

    FOLDER: ClassVar[str] = "ciao"
    FILES: ClassVar[tuple[str, ...]] = ("ratings.csv.gz",)
    HAS_TIME: ClassVar[bool] = True
    RATING_FILE: ClassVar[str] = "ratings.csv.gz"
    CHECKS: ClassVar[dict] = {**_CategoryConfig.CHECKS, "helpfulness_threshold": "1..7"}

    def task_names(self) -> tuple[str, ...]:
        return super().task_names() + (("helpful",) if self.helpfulness_threshold is not None else ())

    def frame_columns(self) -> dict[str, str]:
        return {**super().frame_columns(), "helpfulness": "int64"}

    def parse(self, root: Path) -> pd.DataFrame:
        p = root / "ratings.csv.gz"
        raw = _read_csv(p, ("user_id", "item_id", "category_id", "rating", "helpfulness", "timestamp"))
        return pd.DataFrame({
            "user": _numeric(raw, "user_id", p, integer=True, lo=0),
            "item": _numeric(raw, "item_id", p, integer=True, lo=0),
            "category": _numeric(raw, "category_id", p, integer=True, lo=0),
            "rating": _numeric(raw, "rating", p, integer=True, lo=0, hi=5).astype(np.float64),
            "helpfulness": _numeric(raw, "helpfulness", p, integer=True, lo=1, hi=7),
            "time": _numeric(raw, "timestamp", p, integer=True, lo=0)})

    def extra_tasks(self, df):
        if self.helpfulness_threshold is None:
            return {}
        return {"helpful": (df["helpfulness"].to_numpy() >= self.helpfulness_threshold)}


@dataclass(frozen=True)
class FilmTrustConfig(RatingsConfig):
    """FilmTrust (`ratings.txt`): 1,508 users, 2,071 items, ratings 0.5..4 (step 0.5), no timestamps."""
    name: str = "filmtrust"
    rating_threshold: float | None = 3.0

    FOLDER: ClassVar[str] = "filmtrust"
    FILES: ClassVar[tuple[str, ...]] = ("ratings.txt",)
    RATING_FILE: ClassVar[str] = "ratings.txt"

    def parse(self, root: Path) -> pd.DataFrame:
        p = root / "ratings.txt"
        raw = _read_csv(p, ("user_id", "item_id", "rating"), sep=r"\s+", header=False)
        return pd.DataFrame({
            "user": _numeric(raw, "user_id", p, integer=True, lo=0, header=False),
            "item": _numeric(raw, "item_id", p, integer=True, lo=0, header=False),
            "rating": _numeric(raw, "rating", p, integer=False, lo=0.5, hi=4, header=False)})
