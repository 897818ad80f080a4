"""Shared pipeline of the tabular multi-scenario multi-task sources (AliExpress, Tenrec, Census-Income).

Each row is one impression with categorical fields, numeric fields and 0/1 labels; a client is a
scenario (a country file, an app/content-type file, or the values of a column). Building runs:

1. parse the raw files into one checked frame (a `scenario` code per row, the raw categorical values,
   float numeric values, 0/1 labels and, where the data ships an official train/test split, a
   `file_split` column), cached as Parquet keyed by the SHA-256 of the raw bytes, the parser version
   and the options that change parsing (the cache helpers of `fleetrec.datasets.real` are reused);
2. optionally keep `max_rows_per_client` rows per client (seeded);
3. split: official test files stay test and a seeded `val_fraction` of each client's train rows is
   validation; without an official split, per-client random val/test fractions;
4. encode every categorical field over the rows of all scenarios together (one vocabulary shared
   by every client), derive the tasks and build the `FederatedDataset` (client attribute
   `scenario`, `schema.scenario = "scenario"`, a `label` string per client).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd

from fleetrec.datasets.federated import (CLIENT, SPLIT, SPLIT_NAMES, TEST, TRAIN, VAL, CategoricalField, DataError,
                                         DatasetSchema, FederatedDataset)
from fleetrec.datasets.partition import _rank_within, by_column, random_split
from fleetrec.datasets.io import cached_frame, content_cache_path, numeric_column
from fleetrec.datasets.real import RatingsConfig
from fleetrec.datasets.sources import DataConfig

TABULAR_PARSE_VERSION = 1
FILE_SPLIT = "file_split"      # frame column: 0 = official train file, 2 = official test file, -1 = none


def labels01(df: pd.DataFrame, col: str, path: Path) -> np.ndarray:
    """A 0/1 label column as int64; DataError naming file, column and line otherwise."""
    return numeric_column(df, col, path, integer=True, lo=0, hi=1)


def check_tasks(tasks: tuple[str, ...], allowed: tuple[str, ...]) -> str | None:
    if not tasks:
        return "data.tasks: got an empty list, expected at least one of " + ", ".join(allowed)
    for t in tasks:
        if t not in allowed:
            return f"data.tasks: got {t!r}, expected items from " + ", ".join(allowed)
    if len(set(tasks)) != len(tasks):
        return f"data.tasks: got {list(tasks)}, expected no repeated task"
    return None


@dataclass(frozen=True)
class TabularConfig(DataConfig):
    """Options shared by the tabular scenario sources (subclasses set the name, folder and parser)."""
    name: str = "tabular"
    path: str | None = None                  # folder with the raw files; null = shared/data/<folder>
    cache_dir: str | None = None             # null = $FLEETREC_CACHE or ~/.cache/fleetrec
    cache: bool = True                       # false: always parse the raw files, write nothing
    val_fraction: float = 0.1                # per client (of the train rows where an official split exists)
    max_rows_per_client: int | None = None   # keep N rows per client (seeded); null = all
    seed: int | None = None                  # data seed (subsample, split); null = the experiment seed

    FOLDER: ClassVar[str] = ""
    CHECKS: ClassVar[dict] = {"val_fraction": "0..0.5", "max_rows_per_client": ">=1"}

    # -- locations
    def root(self) -> Path:
        return RatingsConfig.root(self)          # same rule: null = shared/data/<FOLDER>, else path

    def source_files(self, root: Path) -> list[Path]:
        """The raw files, in scenario order (hashed for the cache key)."""
        raise TypeError(f"{type(self).__name__} must define source_files()")   # abstract

    def main_file(self) -> Path:
        root = self.root()
        try:
            return self.source_files(root)[0]
        except (DataError, IndexError):
            return root

    # -- parse + cache
    def parse_options(self) -> dict:
        return {}

    def frame_columns(self) -> dict[str, str]:
        raise TypeError(f"{type(self).__name__} must define frame_columns()")   # abstract

    def parse(self, root: Path) -> pd.DataFrame:
        raise TypeError(f"{type(self).__name__} must define parse()")   # abstract

    def cache_path(self, root: Path, files: list[Path]) -> Path:
        return content_cache_path(self.FOLDER, f"tabular-v{TABULAR_PARSE_VERSION}", self.parse_options(), root,
                                  files, self.cache_dir)

    def load_frame(self) -> pd.DataFrame:
        """The parsed, checked rows of every scenario (from the Parquet cache when present)."""
        root = self.root()
        if not root.is_dir():
            raise DataError(f"{root}: data folder not found (set data.path)")
        files = self.source_files(root)
        for p in files:
            if not p.is_file():
                raise DataError(f"{p}: file not found (set data.path to the folder holding it)")
        return cached_frame(self.cache_path(root, files) if self.cache else None, self.frame_columns(),
                            lambda: self.parse(root))

    # -- build hooks
    def client_key(self, df: pd.DataFrame) -> tuple[np.ndarray, list[str]]:
        """(scenario code per row, label per code)."""
        raise TypeError(f"{type(self).__name__} must define client_key()")   # abstract

    def categorical_columns(self) -> tuple[str, ...]:
        raise TypeError(f"{type(self).__name__} must define categorical_columns()")   # abstract

    def numeric_columns(self) -> tuple[str, ...]:
        return ()

    def task_arrays(self, df: pd.DataFrame) -> dict[str, np.ndarray]:
        raise TypeError(f"{type(self).__name__} must define task_arrays()")   # abstract

    def transform_numeric(self, x: np.ndarray, train: np.ndarray) -> np.ndarray:
        return x

    def split_from_files(self, fixed: np.ndarray, client: np.ndarray, seed: int) -> np.ndarray:
        """Row splits where the files fix them (`fixed`: the file's split per row): official test
        rows stay test; a seeded `val_fraction` of each client's other rows becomes validation."""
        split = np.where(fixed == TEST, TEST, TRAIN).astype(np.int8)
        tr = fixed != TEST
        split[tr] = random_split(client[tr], self.val_fraction, 0.0, seed)
        return split

    def extra_meta(self) -> dict:
        return {}

    def test_fraction_value(self) -> float:
        return getattr(self, "test_fraction", 0.0)

    def build(self, seed: int) -> FederatedDataset:
        return build_tabular(self, seed if self.seed is None else self.seed)


def build_tabular(cfg: TabularConfig, seed: int) -> FederatedDataset:
    src = cfg.main_file()
    df = cfg.load_frame()
    codes, names = cfg.client_key(df)
    if cfg.max_rows_per_client is not None and len(df):
        rng = np.random.default_rng([seed, 7401])
        order = np.lexsort((rng.random(len(df)), codes))
        rank, _ = _rank_within(codes, order)
        keep = rank < cfg.max_rows_per_client
        df, codes = df[keep].reset_index(drop=True), codes[keep]
    if len(df) == 0:
        raise DataError(f"{src}: no rows after filtering; expected at least one")
    client, keys = by_column(codes)
    num_clients = len(keys)
    test_fraction = cfg.test_fraction_value()
    if FILE_SPLIT in df.columns:
        split = cfg.split_from_files(df[FILE_SPLIT].to_numpy(), client, seed)
    else:
        split = random_split(client, cfg.val_fraction, test_fraction, seed)
    val_expected = 1.0 if cfg.val_fraction is None else cfg.val_fraction    # None: the files give it
    for s, frac in ((VAL, val_expected), (TEST, test_fraction if FILE_SPLIT not in df.columns else 1.0)):
        if frac > 0 and not np.any(split == s):
            raise DataError(f"{src}: column 'split': the {SPLIT_NAMES[s]} split is empty; expected >= 1 row "
                            "(clients need >= 3 rows)")

    cols: dict[str, np.ndarray] = {CLIENT: client, SPLIT: split}
    fields = []
    for name in cfg.categorical_columns():
        code, uniq = pd.factorize(df[name].to_numpy(), sort=True)   # one vocabulary across all scenarios
        cols[name] = code.astype(np.int64)
        fields.append(CategoricalField(name, max(1, len(uniq))))
    train = split == TRAIN
    numeric = cfg.numeric_columns()
    for name in numeric:
        x = cfg.transform_numeric(df[name].to_numpy(np.float64), train)
        if not np.isfinite(x).all():
            i = int(np.flatnonzero(~np.isfinite(x))[0])
            raise DataError(f"{src}: column '{name}' must be finite, found {x[i]!r}")
        cols[name] = x.astype(np.float32)
    tasks = {t: np.asarray(y, np.float32) for t, y in cfg.task_arrays(df).items()}
    cols.update(tasks)
    attrs = {"scenario": np.arange(num_clients, dtype=np.int64),
             "label": np.array([names[int(k)] for k in keys], dtype=object)}
    schema = DatasetSchema(categorical=tuple(fields), numeric=tuple(numeric), tasks=tuple(tasks),
                           client_categorical=(CategoricalField("scenario", num_clients),), scenario="scenario")
    meta = {"source": cfg.name, "path": str(cfg.root()), "seed": seed, **cfg.extra_meta(),
            "scenarios": [names[int(k)] for k in keys],
            "positive_rate": {t: float(y.mean()) for t, y in tasks.items()}}
    return FederatedDataset.from_columns(cfg.name, cols, schema, attrs, num_clients, meta)
