"""Tenrec (Tencent QQ Kandian / QQ Browser, NeurIPS 2022 datasets track): one client per scenario file.

Raw layout (header, comma separated): `user_id, item_id, click, follow, like, share, video_category,
watching_times, gender, age`; one file per scenario (`QK-video.csv`, `QK-article.csv`, `QB-video.csv`,
`QB-article.csv`, optionally gzip-compressed as `.csv.gz`). Tasks are label columns chosen by `tasks`
(default click, like); the categorical features (`features`) share one vocabulary across scenarios.
`watching_times` is an engagement outcome, not a feature, and is not loaded. No official split:
per-scenario random val/test fractions. The data is not shipped here (Tencent license); set `path`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd

from fleetrec.datasets.federated import DataError
from fleetrec.datasets.io import numeric_column, read_csv
from fleetrec.datasets.tabular import TabularConfig, check_tasks, labels01

LABELS = ("click", "follow", "like", "share")
FEATURES = ("user_id", "item_id", "video_category", "gender", "age")
SCENARIOS = ("QK-video", "QK-article", "QB-video", "QB-article")


@dataclass(frozen=True)
class TenrecConfig(TabularConfig):
    """Tenrec (QK/QB video/article files): one client per scenario file, tasks from click/follow/like/share."""
    name: str = "tenrec"
    scenarios: tuple[str, ...] | None = None      # file stems; null = those of QK-video, QK-article, QB-video, QB-article found
    tasks: tuple[str, ...] = ("click", "like")    # label columns, from click, follow, like, share
    features: tuple[str, ...] = FEATURES          # categorical feature columns (integer ids)
    test_fraction: float = 0.1

    FOLDER: ClassVar[str] = "tenrec"
    CHECKS: ClassVar[dict] = {**TabularConfig.CHECKS, "test_fraction": "0..0.5"}

    def validate(self) -> str | None:
        if self.scenarios is not None and not self.scenarios:
            return "data.scenarios: got an empty list, expected file stems (e.g. [QK-video]) or null"
        if not self.features:
            return "data.features: got an empty list, expected at least one of " + ", ".join(FEATURES)
        bad = [f for f in self.features if f not in FEATURES]
        if bad:
            return f"data.features: got {bad[0]!r}, expected items from " + ", ".join(FEATURES)
        return check_tasks(self.tasks, LABELS)

    def _file(self, root: Path, stem: str) -> Path | None:
        for ext in (".csv", ".csv.gz"):
            if (root / f"{stem}{ext}").is_file():
                return root / f"{stem}{ext}"
        return None

    def scenario_list(self, root: Path) -> list[str]:
        if self.scenarios is not None:
            return list(self.scenarios)
        found = [s for s in SCENARIOS if self._file(root, s) is not None]
        if not found:
            raise DataError(f"{root}: no Tenrec scenario file found (expected "
                            + ", ".join(f"{s}.csv" for s in SCENARIOS) + "; set data.path)")
        return found

    def source_files(self, root: Path) -> list[Path]:
        out = []
        for s in self.scenario_list(root):
            p = self._file(root, s)
            if p is None:
                raise DataError(f"{root / (s + '.csv')}: file not found for scenario {s!r} (set data.path)")
            out.append(p)
        return out

    def parse_options(self) -> dict:
        return {"scenarios": self.scenario_list(self.root()), "tasks": list(self.tasks),
                "features": list(self.features)}

    def frame_columns(self) -> dict[str, str]:
        return {"scenario": "int64", **{c: "int64" for c in self.features}, **{c: "int64" for c in self.tasks}}

    def parse(self, root: Path) -> pd.DataFrame:
        parts = []
        for i, p in enumerate(self.source_files(root)):
            raw = read_csv(p, (*self.features, *self.tasks))
            part = {"scenario": np.full(len(raw), i, np.int64)}
            for c in self.features:
                part[c] = numeric_column(raw, c, p, integer=True, lo=0)
            for c in self.tasks:
                part[c] = labels01(raw, c, p)
            parts.append(pd.DataFrame(part))
        return pd.concat(parts, ignore_index=True)

    def client_key(self, df):
        return df["scenario"].to_numpy(), [f"scenario:{s}" for s in self.scenario_list(self.root())]

    def categorical_columns(self):
        return tuple(self.features)

    def task_arrays(self, df):
        return {t: df[t].to_numpy() for t in self.tasks}
