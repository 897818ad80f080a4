"""Ali-CCP (Alibaba Click and Conversion Prediction, Tianchi 408; ESMM) in the torch-rechub preprocessed layout.

Each of the three CSVs (train / val / test) has the header `click, purchase`, 23 sparse fields (`101`, `121`, ...,
`301`, `109_14`, ..., label-encoded integers) and 8 dense fields (`D109_14`, ..., `D853`, floats). Two variants:

- `standard`: `ali_ccp_{train,val,test}_sample.csv` (torch-rechub; field `301` is 1 on every sample row),
- `multidomain`: `ali_ccp_multidomain_{train,val,test}_sample.csv` (Scenario-Wise-Rec; `301` = domain 1/2/3),

and, for full preprocessed data in `path`, the same names without `_sample`. Tasks: `ctr` = click, `ctcvr` = click
AND purchase (as `aliexpress`). Splits are the given files (official train / val / test); `val_fraction` (default
null) instead draws a seeded fraction of each client's train+val rows as validation.

Clients: `scenario: true` makes each value of field `301` a client (label `301:<value>`, client attribute
`scenario`; `301` is then dropped from the row fields: it is constant inside a client), the scenario-as-client
setting of PF-MSMTrec. `scenario: false` (default) gives one client `all` holding every row (as `census_income`
without `scenario_column`, and `aliexpress` with a single country) and keeps `301` as a row field. Per-user clients
are not offered: the user field `101` has a single value in the shipped samples.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import pandas as pd

from fleetrec.datasets.federated import TEST, TRAIN, VAL, DataError
from fleetrec.datasets.io import numeric_column, read_csv
from fleetrec.datasets.tabular import FILE_SPLIT, TabularConfig, check_tasks, labels01

LABELS = ("click", "purchase")
SPARSE = ("101", "121", "122", "124", "125", "126", "127", "128", "129", "205", "206", "207", "210", "216", "508",
          "509", "702", "853", "301", "109_14", "110_14", "127_14", "150_14")
DENSE = ("D109_14", "D110_14", "D127_14", "D150_14", "D508", "D509", "D702", "D853")
COLUMNS = (*LABELS, *SPARSE, *DENSE)
SCENARIO_FIELD = "301"
TASKS = ("ctr", "ctcvr")
SPLIT_FILES = (("train", TRAIN), ("val", VAL), ("test", TEST))


@dataclass(frozen=True)
class AliCcpConfig(TabularConfig):
    """Ali-CCP (torch-rechub layout): tasks ctr and ctcvr; one client, or one per scenario field 301."""
    name: str = "ali_ccp"
    variant: Literal["standard", "multidomain"] = "standard"   # which file set (see the module docstring)
    scenario: bool = False                   # true: one client per value of field 301; false: one client `all`
    tasks: tuple[str, ...] = TASKS           # from ctr (click), ctcvr (click AND purchase)
    val_fraction: float | None = None        # null = the official val file; else a seeded fraction of train+val rows

    FOLDER: ClassVar[str] = "ali-ccp"
    # file names tried in order ({split} is train, val or test): the shipped samples, then full preprocessed files
    LAYOUTS: ClassVar[dict[str, tuple[str, ...]]] = {
        "standard": ("ali_ccp_{split}_sample.csv", "ali_ccp_{split}.csv"),
        "multidomain": ("ali_ccp_multidomain_{split}_sample.csv", "ali_ccp_multidomain_{split}.csv"),
    }

    def validate(self) -> str | None:
        return check_tasks(self.tasks, TASKS)

    # -- files
    def layout(self, root: Path) -> str:
        for layout in self.LAYOUTS[self.variant]:
            if (root / layout.format(split="train")).is_file():
                return layout
        raise DataError(f"{root}: no Ali-CCP {self.variant} train file found (expected one of "
                        + ", ".join(layout.format(split="train") for layout in self.LAYOUTS[self.variant]) + ")")

    def source_files(self, root: Path) -> list[Path]:
        layout = self.layout(root)
        return [root / layout.format(split=s) for s, _ in SPLIT_FILES]

    # -- parse
    def parse_options(self) -> dict:
        return {"variant": self.variant}

    def frame_columns(self) -> dict[str, str]:
        return {FILE_SPLIT: "int64", **{c: "int64" for c in LABELS}, **{c: "int64" for c in SPARSE},
                **{c: "float64" for c in DENSE}}

    def parse(self, root: Path) -> pd.DataFrame:
        parts = []
        for p, (_, fs) in zip(self.source_files(root), SPLIT_FILES):
            raw = read_csv(p, COLUMNS)
            part = {FILE_SPLIT: np.full(len(raw), fs, np.int64)}
            for c in LABELS:
                part[c] = labels01(raw, c, p)
            for c in SPARSE:
                part[c] = numeric_column(raw, c, p, integer=True, lo=0)
            for c in DENSE:
                part[c] = numeric_column(raw, c, p, integer=False)
            parts.append(pd.DataFrame(part))
        return pd.concat(parts, ignore_index=True)

    # -- build hooks
    def client_key(self, df):
        if not self.scenario:
            return np.zeros(len(df), np.int64), ["all"]
        uniq, code = np.unique(df[SCENARIO_FIELD].to_numpy(), return_inverse=True)
        return code.astype(np.int64).reshape(-1), [f"{SCENARIO_FIELD}:{int(v)}" for v in uniq]

    def categorical_columns(self):
        return tuple(c for c in SPARSE if not (self.scenario and c == SCENARIO_FIELD))

    def numeric_columns(self):
        return DENSE

    def task_arrays(self, df):
        click, buy = df["click"].to_numpy(), df["purchase"].to_numpy()
        y = {"ctr": click, "ctcvr": click * buy}
        return {t: y[t] for t in self.tasks}

    def split_from_files(self, fixed: np.ndarray, client: np.ndarray, seed: int) -> np.ndarray:
        if self.val_fraction is None:                # the official train / val / test files
            return fixed.astype(np.int8)
        return super().split_from_files(fixed, client, seed)

    def extra_meta(self) -> dict:
        return {"variant": self.variant}
