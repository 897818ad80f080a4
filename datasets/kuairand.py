"""KuaiRand-Pure: the `kuairand` interaction source (FedPA's preprocessing, methods.md §3.5) and the user /
video feature tables (`user_features_pure.csv[.gz]`, `video_features_basic_pure.csv[.gz]`).

Feature tables: `load_user_features` / `load_video_features` return the ids and one categorical code array per
discrete column, the columns FedPA's `data_preprocess.py` treats as discrete. Codes follow the sorted distinct raw
values (missing = its own value "nan"); `tag` keeps the first tag id of the comma-separated list.

Source `kuairand`: the logs `log_standard_*.csv[.gz]` and `log_random_*.csv[.gz]` (official columns; `user_id`,
`video_id`, `time_ms` and the 0/1 label columns are read) concatenated and sorted by (user, time_ms); one client per
user; task `is_click` (no negative sampling: unclicked exposures are the negatives; other official labels via
`tasks`); chronological per-user split (latest 20% test, the 20% before validation); row features item_id and the
video columns (codes of the whole video table, so vocabularies do not depend on the slice), plus FedPA's
100-bucket log-binned video statistics when `video_features_statistic_pure.csv[.gz]` is present; client attributes
= the user feature columns (FedPA's 23 by default), `open` (FedPA's open/private user division) and `activity`.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd

from fleetrec.datasets.federated import (CLIENT, SPLIT, SPLIT_NAMES, TEST, VAL, CategoricalField, DataError,
                                         DatasetSchema, FederatedDataset)
from fleetrec.datasets.partition import by_column, chronological_split, quantile_buckets, rows_at_least, subsample_clients
from fleetrec.datasets.io import (PARSE_VERSION, REPO_ROOT, SHARED_DATA, cached_frame, content_cache_path, numeric_column,
                                  read_csv)
from fleetrec.datasets.real import ACTIVITY_BUCKETS
from fleetrec.datasets.sources import DataConfig
from fleetrec.datasets.tabular import check_tasks, labels01

USER_FILE = "user_features_pure.csv.gz"
VIDEO_FILE = "video_features_basic_pure.csv.gz"
USER_DISCRETE = ("user_active_degree", "is_live_streamer", "is_video_author", "follow_user_num_range",
                 "fans_user_num_range", "friend_user_num_range", "register_days_range",
                 *[f"onehot_feat{i}" for i in range(18)])
VIDEO_DISCRETE = ("video_type", "upload_dt", "upload_type", "server_width", "server_height", "music_type", "tag")


@dataclass(frozen=True)
class FeatureTable:
    ids: np.ndarray                       # int64 raw ids (user_id or video_id), one per row, unique
    codes: dict[str, np.ndarray]          # column -> int64 codes 0..vocab-1
    vocab: dict[str, int]

    def lookup(self, raw_ids: np.ndarray, path: Path, column: str) -> np.ndarray:
        """Row index per raw id; DataError naming file and column for an unknown id."""
        idx = pd.Index(self.ids).get_indexer(np.asarray(raw_ids))
        if (idx < 0).any():
            bad = np.asarray(raw_ids)[idx < 0][0]
            raise DataError(f"{path}: column '{column}' must reference a known id, found {bad}")
        return idx


def _table(path: Path, id_col: str, columns: tuple[str, ...], first_tag: bool = True) -> FeatureTable:
    raw = read_csv(path, (id_col, *columns))
    ids = numeric_column(raw, id_col, path, integer=True, lo=0)
    if len(np.unique(ids)) != len(ids):
        raise DataError(f"{path}: column '{id_col}' must hold unique ids, found repeats")
    codes, vocab = {}, {}
    for c in columns:
        v = raw[c].astype(object).where(raw[c].notna(), "nan").astype(str).str.strip()
        if c == "tag" and first_tag:
            v = v.str.split(",").str[0]
        code, uniq = pd.factorize(v.to_numpy(), sort=True)
        codes[c], vocab[c] = code.astype(np.int64), max(1, len(uniq))
    return FeatureTable(ids, codes, vocab)


def _folder(path: str | Path | None) -> Path:
    return SHARED_DATA / "kuairand" if path is None else Path(path)


def _file(folder: Path, name: str) -> Path:
    """`name` (a .csv.gz file name) or its uncompressed official .csv sibling, whichever exists."""
    plain = folder / name.removesuffix(".gz")
    return plain if not (folder / name).is_file() and plain.is_file() else folder / name


def load_user_features(path: str | Path | None = None, columns: tuple[str, ...] = USER_DISCRETE) -> FeatureTable:
    return _table(_file(_folder(path), USER_FILE), "user_id", columns)


def load_video_features(path: str | Path | None = None, columns: tuple[str, ...] = VIDEO_DISCRETE) -> FeatureTable:
    return _table(_file(_folder(path), VIDEO_FILE), "video_id", columns)


# ---------------------------------------------------------------------------------------- FedPA helpers
STAT_FILE = "video_features_statistic_pure.csv.gz"
FEDPA_USER_FEATURES = tuple(c for c in USER_DISCRETE if c not in ("onehot_feat3", "onehot_feat8"))
FEDPA_VIDEO_FEATURES = ("upload_type", "music_type", "tag")
FEDPA_VIDEO_STATISTICS = ("play_duration", "comment_stay_duration", "complete_play_cnt")
FEDPA_OPEN_DEGREES = ("high_active", "low_active", "middle_active", "single_low_active")   # codes 5..8 of 9
LOG_LABELS = ("is_click", "is_like", "is_follow", "is_comment", "is_forward", "is_hate", "long_view")
STAT_BUCKETS = 100


def fedpa_bins(values: np.ndarray, buckets: int = STAT_BUCKETS) -> np.ndarray:
    """FedPA's binning of a video statistic: log1p, `buckets - 1` equally spaced edges between the 1st and
    99th percentile of the log values, outer edges at min - 1 and max + 1 -> codes 0..buckets-1 (intervals
    closed on the right, as pandas.cut). Missing values get code 0."""
    x = np.log1p(np.asarray(values, dtype=np.float64))
    ok = np.isfinite(x)
    out = np.zeros(len(x), np.int64)
    if not ok.any():
        return out
    lo, hi = np.percentile(x[ok], [1, 99])
    edges = np.r_[x[ok].min() - 1, np.linspace(lo, hi, buckets - 1), x[ok].max() + 1]
    out[ok] = np.clip(np.searchsorted(edges, x[ok], side="left") - 1, 0, buckets - 1)
    return out


def fedpa_open_users(user_ids: np.ndarray, degree: np.ndarray, open_degrees=FEDPA_OPEN_DEGREES,
                     open_ratio: float = 0.8, other_ratio: float = 0.2, seed: int = 0) -> np.ndarray:
    """FedPA's open/private division (methods.md §3.3 stage 0): `open_ratio` of the users whose
    user_active_degree is in `open_degrees` plus `other_ratio` of the others are open (Python
    `random.Random(seed).sample` over the ascending ids of each group). Returns a 0/1 flag per user."""
    user_ids = np.asarray(user_ids)
    in_group = np.isin(np.asarray(degree).astype(str), list(open_degrees))
    flag = np.zeros(len(user_ids), np.int64)
    rnd = random.Random(seed)
    for mask, ratio in ((in_group, open_ratio), (~in_group, other_ratio)):
        ids = sorted(user_ids[mask].tolist())
        chosen = rnd.sample(ids, int(len(ids) * ratio))
        flag[np.isin(user_ids, chosen)] = 1
    return flag


# ---------------------------------------------------------------------------------------- source
@dataclass(frozen=True)
class KuaiRandConfig(DataConfig):
    """KuaiRand-Pure logs + user/video features (FedPA preprocessing): per-user clients, task is_click, open/private."""
    name: str = "kuairand"
    path: str | None = None                 # folder with the logs; null = shared/data/kuairand
    features_path: str | None = None        # folder with the feature tables; null = path
    cache_dir: str | None = None
    cache: bool = True
    logs: tuple[str, ...] | None = None     # log file names; null = every log_standard_* and log_random_* found
    tasks: tuple[str, ...] = ("is_click",)  # label columns of the logs
    users: str = "all"                      # all | private | open (FedPA: open users pre-train, private = clients)
    open_degrees: tuple[str, ...] = FEDPA_OPEN_DEGREES
    open_ratio: float = 0.8                 # share of open_degrees users that are open
    other_open_ratio: float = 0.2           # share of the other users that are open
    open_seed: int = 0                      # FedPA: Python random seeded with 0
    user_features: tuple[str, ...] = FEDPA_USER_FEATURES      # client attributes
    video_features: tuple[str, ...] = FEDPA_VIDEO_FEATURES    # row features (besides item_id)
    video_statistics: tuple[str, ...] | None = None   # bucketized; null = FedPA's three when the statistic file exists
    tag: str = "full"                       # full: the tag list is one value (FedPA, 111 values); first: first tag
    max_clients: int | None = None
    min_rows: int = 5
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    seed: int | None = None

    CHECKS: ClassVar[dict] = {"users": ("all", "private", "open"), "tag": ("full", "first"), "open_ratio": "0..1",
                              "other_open_ratio": "0..1", "max_clients": ">=1", "min_rows": ">=1",
                              "val_fraction": "0..0.5", "test_fraction": "0..0.5"}

    def validate(self) -> str | None:
        bad = [c for c in self.user_features if c not in USER_DISCRETE]
        if bad:
            return f"data.user_features: got {bad[0]!r}, expected items from " + ", ".join(USER_DISCRETE)
        bad = [c for c in self.video_features if c not in VIDEO_DISCRETE]
        if bad:
            return f"data.video_features: got {bad[0]!r}, expected items from " + ", ".join(VIDEO_DISCRETE)
        if self.logs is not None and not self.logs:
            return "data.logs: got an empty list, expected log file names or null"
        return check_tasks(self.tasks, LOG_LABELS)

    def task_names(self) -> tuple[str, ...]:
        return tuple(self.tasks)

    # -- locations
    def _dir(self, value: str | None) -> Path:
        if value is None:
            return SHARED_DATA / "kuairand"
        p = Path(value).expanduser()
        if not p.is_absolute() and not p.exists() and (REPO_ROOT / p).exists():
            p = REPO_ROOT / p
        return p

    def root(self) -> Path:
        return self._dir(self.path)

    def feature_root(self) -> Path:
        return self._dir(self.features_path if self.features_path is not None else self.path)

    def log_files(self) -> list[Path]:
        root = self.root()
        if not root.is_dir():
            raise DataError(f"{root}: data folder not found (set data.path)")
        if self.logs is not None:
            out = [root / f for f in self.logs]
            for p in out:
                if not p.is_file():
                    raise DataError(f"{p}: file not found (set data.path / data.logs)")
            return out
        out = [p for pat in ("log_standard_*.csv", "log_standard_*.csv.gz", "log_random_*.csv",
                             "log_random_*.csv.gz") for p in sorted(root.glob(pat))]    # FedPA's order
        if not out:
            raise DataError(f"{root / 'log_standard_4_08_to_4_21_pure.csv'}: file not found (no KuaiRand log "
                            "log_standard_*.csv or log_random_*.csv in the folder; set data.path)")
        return out

    # -- parse + cache
    def frame_columns(self) -> dict[str, str]:
        return {"user": "int64", "item": "int64", "time": "int64", **{t: "int64" for t in self.tasks}}

    def parse(self, files: list[Path]) -> pd.DataFrame:
        parts = []
        for p in files:
            raw = read_csv(p, ("user_id", "video_id", "time_ms", *self.tasks))
            part = {"user": numeric_column(raw, "user_id", p, integer=True, lo=0),
                    "item": numeric_column(raw, "video_id", p, integer=True, lo=0),
                    "time": numeric_column(raw, "time_ms", p, integer=True, lo=0)}
            for t in self.tasks:
                part[t] = labels01(raw, t, p)
            parts.append(pd.DataFrame(part))
        return pd.concat(parts, ignore_index=True)

    def load_frame(self) -> pd.DataFrame:
        files = self.log_files()
        target = (content_cache_path("kuairand", f"parser-v{PARSE_VERSION}", {"tasks": list(self.tasks)},
                                     self.root(), files, self.cache_dir) if self.cache else None)
        return cached_frame(target, self.frame_columns(), lambda: self.parse(files))

    # -- build
    def build(self, seed: int) -> FederatedDataset:
        seed = seed if self.seed is None else self.seed
        files = self.log_files()
        src = files[0]
        df = self.load_frame()
        froot = self.feature_root()
        ufile, vfile = _file(froot, USER_FILE), _file(froot, VIDEO_FILE)
        utab = _table(ufile, "user_id", tuple(dict.fromkeys(("user_active_degree", *self.user_features))))
        vtab = _table(vfile, "video_id", tuple(self.video_features), first_tag=self.tag == "first")
        for col, ids, table_file, values in (("user_id", utab.ids, ufile, df["user"].to_numpy()),
                                              ("video_id", vtab.ids, vfile, df["item"].to_numpy())):
            known = np.isin(values, ids)
            if not known.all():
                i = int(np.flatnonzero(~known)[0])
                raise DataError(f"{', '.join(str(f) for f in files)}: column '{col}' must reference an id of "
                                f"{table_file}, found {values[i]} (row {i + 1} of the concatenated logs)")
        # FedPA: concatenate the logs, sort by (user, time)
        df = df.iloc[np.lexsort((df["time"].to_numpy(), df["user"].to_numpy()))].reset_index(drop=True)

        raw_degree = read_csv(ufile, ("user_id", "user_active_degree"))
        open_flag = fedpa_open_users(raw_degree["user_id"].to_numpy(), raw_degree["user_active_degree"].to_numpy(),
                                     self.open_degrees, self.open_ratio, self.other_open_ratio, self.open_seed)
        open_of = pd.Series(open_flag, index=raw_degree["user_id"].to_numpy())
        df = df[rows_at_least(df["user"].to_numpy(), self.min_rows)]
        if self.users != "all":
            want = 1 if self.users == "open" else 0
            df = df[open_of.reindex(df["user"].to_numpy()).to_numpy() == want]
        if len(df):
            df = df[df["user"].isin(subsample_clients(df["user"].to_numpy(), self.max_clients, seed))]
        df = df.reset_index(drop=True)
        if len(df) == 0:
            raise DataError(f"{src}: column 'user_id': no {'' if self.users == 'all' else self.users + ' '}user "
                            f"has >= min_rows={self.min_rows} rows after filtering; expected at least one")
        client, users = by_column(df["user"].to_numpy())
        num_clients = len(users)
        split = chronological_split(client, df["time"].to_numpy(), self.val_fraction, self.test_fraction)
        item, _ = by_column(df["item"].to_numpy())
        cols: dict[str, np.ndarray] = {CLIENT: client, SPLIT: split, "item_id": item}
        fields = [CategoricalField("item_id", int(item.max()) + 1)]
        vrow = vtab.lookup(df["item"].to_numpy(), vfile, "video_id")
        for c in self.video_features:
            cols[c] = vtab.codes[c][vrow]
            fields.append(CategoricalField(c, vtab.vocab[c]))
        for c, codes in self._statistics(froot, df["item"].to_numpy()).items():
            cols[c] = codes
            fields.append(CategoricalField(c, STAT_BUCKETS))
        tasks = {t: df[t].to_numpy().astype(np.float32) for t in self.tasks}
        cols.update(tasks)
        for s, frac in ((VAL, self.val_fraction), (TEST, self.test_fraction)):
            if frac > 0 and not np.any(split == s):
                raise DataError(f"{src}: column 'split': the {SPLIT_NAMES[s]} split is empty after filtering "
                                f"(min_rows={self.min_rows}); expected >= 1 row (clients need >= 3 rows)")
        urow = utab.lookup(users, ufile, "user_id")
        attrs: dict[str, np.ndarray] = {}
        client_fields: list[CategoricalField] = []
        for c in self.user_features:
            attrs[c] = utab.codes[c][urow]
            client_fields.append(CategoricalField(c, utab.vocab[c]))
        attrs["open"] = open_of.reindex(users).to_numpy().astype(np.int64)
        client_fields.append(CategoricalField("open", 2))
        attrs["activity"] = quantile_buckets(np.bincount(client, minlength=num_clients), ACTIVITY_BUCKETS)
        client_fields.append(CategoricalField("activity", ACTIVITY_BUCKETS))
        attrs["label"] = np.array([f"user:{int(u)}" for u in users], dtype=object)
        schema = DatasetSchema(categorical=tuple(fields), numeric=(), tasks=tuple(tasks),
                               client_categorical=tuple(client_fields))
        meta = {"source": self.name, "path": str(self.root()), "seed": seed,
                "positive_rate": {t: float(cols[t].mean()) for t in tasks},
                "open_clients": int(attrs["open"].sum())}
        return FederatedDataset.from_columns(self.name, cols, schema, attrs, num_clients, meta)

    def _statistics(self, froot: Path, video_ids: np.ndarray) -> dict[str, np.ndarray]:
        """FedPA's bucketized video statistics per row (binned over the whole statistic table)."""
        p = _file(froot, STAT_FILE)
        if self.video_statistics is None and not p.is_file():
            return {}
        stats = FEDPA_VIDEO_STATISTICS if self.video_statistics is None else tuple(self.video_statistics)
        if not stats:
            return {}
        raw = read_csv(p, ("video_id", *stats))
        ids = numeric_column(raw, "video_id", p, integer=True, lo=0)
        row = pd.Index(ids).get_indexer(video_ids)
        out = {}
        for c in stats:
            v = pd.to_numeric(raw[c], errors="coerce").to_numpy(dtype=np.float64)
            codes = fedpa_bins(v)
            out[c] = np.where(row >= 0, codes[np.maximum(row, 0)], 0)
        return out

