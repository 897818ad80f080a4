"""AliExpress search logs (Tianchi 74690) in the MTReclib per-country layout: one client per country.

Each country has a train and a test CSV with header `search_id, categorical_1..16, numerical_1..63,
click, conversion`. `search_id` is dropped; the 16 categorical fields get one vocabulary across all
countries; the 63 numeric fields are used as they are (already scaled to [0, 1] by the provider).
Tasks: `ctr` = click, `ctcvr` = click AND conversion. The official test file is the test split; a
seeded `val_fraction` of each country's train rows is validation.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd

from fleetrec.datasets.federated import TEST, TRAIN, DataError
from fleetrec.datasets.io import numeric_column, read_csv
from fleetrec.datasets.tabular import FILE_SPLIT, TabularConfig, check_tasks, labels01

CATEGORICAL = tuple(f"categorical_{i}" for i in range(1, 17))
NUMERIC = tuple(f"numerical_{i}" for i in range(1, 64))
LABELS = ("click", "conversion")
COLUMNS = ("search_id", *CATEGORICAL, *NUMERIC, *LABELS)
TASKS = ("ctr", "ctcvr")


@dataclass(frozen=True)
class AliExpressConfig(TabularConfig):
    """AliExpress (MTReclib per-country CSVs): one client per country, tasks ctr and ctcvr."""
    name: str = "aliexpress"
    countries: tuple[str, ...] | None = None     # e.g. [NL, ES, FR, US, RU]; null = every country found
    tasks: tuple[str, ...] = TASKS               # from ctr (click), ctcvr (click AND conversion)

    FOLDER: ClassVar[str] = "aliexpress"
    # file layouts tried in order ({split} is train or test): the shared sample, plain names, MTReclib folders
    LAYOUTS: ClassVar[tuple[str, ...]] = ("aliexpress_{country}_{split}_sample.csv", "aliexpress_{country}_{split}.csv",
                                          "AliExpress_{country}/{split}.csv", "{country}/{split}.csv")

    def validate(self) -> str | None:
        if self.countries is not None:
            if not self.countries:
                return "data.countries: got an empty list, expected country codes (e.g. [NL, ES]) or null"
            if len({c.upper() for c in self.countries}) != len(self.countries):
                return f"data.countries: got {list(self.countries)}, expected no repeated country"
        return check_tasks(self.tasks, TASKS)

    # -- files
    def _files_of(self, root: Path, country: str) -> tuple[Path, Path] | None:
        for layout in self.LAYOUTS:
            tr = root / layout.format(country=country, split="train")
            if tr.is_file():
                return tr, root / layout.format(country=country, split="test")
        return None

    def country_list(self, root: Path) -> list[str]:
        if self.countries is not None:
            return [c.upper() for c in self.countries]
        found = set()
        for layout in self.LAYOUTS:
            pat = re.escape(layout.format(country="\0", split="train")).replace("\0", "([A-Za-z]{2})")
            for p in root.glob(layout.format(country="*", split="train")):
                m = re.fullmatch(pat, p.relative_to(root).as_posix())
                if m:
                    found.add(m.group(1).upper())
        if not found:
            raise DataError(f"{root}: no AliExpress train file found (expected one of "
                            + ", ".join(layout.format(country="<CC>", split="train") for layout in self.LAYOUTS) + ")")
        return sorted(found)

    def source_files(self, root: Path) -> list[Path]:
        out = []
        for c in self.country_list(root):
            pair = self._files_of(root, c)
            if pair is None:
                raise DataError(f"{root}: file not found for country {c!r} (looked for "
                                + ", ".join(layout.format(country=c, split="train") for layout in self.LAYOUTS) + ")")
            out.extend(pair)
        return out

    # -- parse
    def parse_options(self) -> dict:
        return {"countries": self.country_list(self.root())}

    def frame_columns(self) -> dict[str, str]:
        return {"scenario": "int64", FILE_SPLIT: "int64", **{c: "int64" for c in CATEGORICAL},
                **{c: "float64" for c in NUMERIC}, **{c: "int64" for c in LABELS}}

    def parse(self, root: Path) -> pd.DataFrame:
        files = self.source_files(root)
        parts = []
        for i in range(0, len(files), 2):
            for p, fs in ((files[i], TRAIN), (files[i + 1], TEST)):
                raw = read_csv(p, COLUMNS)
                part = {"scenario": np.full(len(raw), i // 2, np.int64), FILE_SPLIT: np.full(len(raw), fs, np.int64)}
                for c in CATEGORICAL:
                    part[c] = numeric_column(raw, c, p, integer=True, lo=0)
                for c in NUMERIC:
                    part[c] = numeric_column(raw, c, p, integer=False)
                for c in LABELS:
                    part[c] = labels01(raw, c, p)
                parts.append(pd.DataFrame(part))
        return pd.concat(parts, ignore_index=True)

    # -- build hooks
    def client_key(self, df):
        return df["scenario"].to_numpy(), [f"country:{c}" for c in self.country_list(self.root())]

    def categorical_columns(self):
        return CATEGORICAL

    def numeric_columns(self):
        return NUMERIC

    def task_arrays(self, df):
        click, conv = df["click"].to_numpy(), df["conversion"].to_numpy()
        y = {"ctr": click, "ctcvr": click * conv}
        return {t: y[t] for t in self.tasks}
