"""KuaiRand-Pure user and video feature tables (`user_features_pure.csv.gz`, `video_features_basic_pure.csv.gz`).

Helpers only (the interaction logs are not available here, so no data source is registered): each returns
the ids and one categorical code array per discrete column, the columns FedPA's `data_preprocess.py` treats
as discrete (methods.md §3.5). Codes follow the sorted distinct raw values (missing = its own value "nan");
`tag` keeps the first tag id of the comma-separated list.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from datasets.federated import DataError
from datasets.real import SHARED_DATA, _numeric, _read_csv

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


def _table(path: Path, id_col: str, columns: tuple[str, ...]) -> FeatureTable:
    raw = _read_csv(path, (id_col, *columns))
    ids = _numeric(raw, id_col, path, integer=True, lo=0)
    if len(np.unique(ids)) != len(ids):
        raise DataError(f"{path}: column '{id_col}' must hold unique ids, found repeats")
    codes, vocab = {}, {}
    for c in columns:
        v = raw[c].astype(object).where(raw[c].notna(), "nan").astype(str).str.strip()
        if c == "tag":
            v = v.str.split(",").str[0]
        code, uniq = pd.factorize(v.to_numpy(), sort=True)
        codes[c], vocab[c] = code.astype(np.int64), max(1, len(uniq))
    return FeatureTable(ids, codes, vocab)


def _folder(path: str | Path | None) -> Path:
    return SHARED_DATA / "kuairand" if path is None else Path(path)


def load_user_features(path: str | Path | None = None, columns: tuple[str, ...] = USER_DISCRETE) -> FeatureTable:
    return _table(_folder(path) / USER_FILE, "user_id", columns)


def load_video_features(path: str | Path | None = None, columns: tuple[str, ...] = VIDEO_DISCRETE) -> FeatureTable:
    return _table(_folder(path) / VIDEO_FILE, "video_id", columns)
