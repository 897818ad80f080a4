"""Census-Income (KDD), UCI 117: the MMoE / PLE multi-task benchmark (`census_income_kdd_test.csv.gz`).

Tasks (MMoE group 1): `income_50k` = income_50k is "50000+", `never_married` = marital_stat is
"Never married" (marital_stat is then dropped from the features). 28 string columns are categorical
fields ("?" and empty cells are their own value), 12 numeric columns are numeric fields, min-max scaled
with the train rows' range (`scale_numeric`); `instance_weight` (a survey weight) is dropped. Only the
official test split (99,762 rows) is available here, so val/test are per-client random fractions.
One client by default; `scenario_column` (e.g. `sex`, `race`) makes each value of that column a
client (a synthetic scenario split; the column is then dropped from the features).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd

from fleetrec.datasets.federated import DataError
from fleetrec.datasets.io import line_of, numeric_column, read_csv
from fleetrec.datasets.tabular import TabularConfig, check_tasks

NUMERIC = ("age", "det_ind_code", "det_occ_code", "wage_per_hour", "capital_gains", "capital_losses",
           "stock_dividends", "num_emp", "own_or_self", "vet_benefits", "weeks_worked", "year")
CATEGORICAL = ("class_worker", "education", "hs_college", "marital_stat", "major_ind_code", "major_occ_code",
               "race", "hisp_origin", "sex", "union_member", "unemp_reason", "full_or_part_emp", "tax_filer_stat",
               "region_prev_res", "state_prev_res", "det_hh_fam_stat", "det_hh_summ", "mig_chg_msa", "mig_chg_reg",
               "mig_move_reg", "mig_same", "mig_prev_sunbelt", "fam_under_18", "country_father", "country_mother",
               "country_self", "citizenship", "vet_question")
INCOME = "income_50k"
INCOME_VALUES = {"50000+": 1, "- 50000": 0, "50000+.": 1, "- 50000.": 0}
TASKS = ("income_50k", "never_married")


@dataclass(frozen=True)
class CensusIncomeConfig(TabularConfig):
    """Census-Income KDD (UCI test split): tasks income_50k and never_married; optional scenario column."""
    name: str = "census_income"
    tasks: tuple[str, ...] = TASKS              # from income_50k, never_married
    scenario_column: str | None = None          # a categorical column whose values are the clients; null = one client
    test_fraction: float = 0.1
    scale_numeric: bool = True                  # min-max scale numeric fields with the train rows' range

    FOLDER: ClassVar[str] = "census-income"
    FILE: ClassVar[str] = "census_income_kdd_test.csv.gz"
    CHECKS: ClassVar[dict] = {**TabularConfig.CHECKS, "test_fraction": "0..0.5"}

    def validate(self) -> str | None:
        if self.scenario_column is not None:
            if self.scenario_column not in CATEGORICAL:
                return (f"data.scenario_column: got {self.scenario_column!r}, expected a categorical column "
                        "such as sex or race")
            if self.scenario_column == "marital_stat" and "never_married" in self.tasks:
                return "data.scenario_column: marital_stat is the never_married label; pick another column"
        return check_tasks(self.tasks, TASKS)

    def source_files(self, root: Path) -> list[Path]:
        return [root / self.FILE]

    def frame_columns(self) -> dict[str, str]:
        return {INCOME: "int64", **{c: "float64" for c in NUMERIC}, **{c: "str" for c in CATEGORICAL}}

    def parse(self, root: Path) -> pd.DataFrame:
        p = root / self.FILE
        raw = read_csv(p, (*NUMERIC, *CATEGORICAL, INCOME))
        out = {}
        inc = raw[INCOME].astype(str).str.strip().map(INCOME_VALUES)
        if inc.isna().any():
            i = int(np.flatnonzero(inc.isna().to_numpy())[0])
            raise DataError(f"{p}: column '{INCOME}' must be '50000+' or '- 50000', "
                            f"found {raw[INCOME].iloc[i]!r} at line {line_of(p, i)}")
        out[INCOME] = inc.to_numpy().astype(np.int64)
        for c in NUMERIC:
            out[c] = numeric_column(raw, c, p, integer=False)
        for c in CATEGORICAL:
            out[c] = raw[c].fillna("?").astype(str).str.strip().to_numpy()
        return pd.DataFrame(out)

    def client_key(self, df):
        if self.scenario_column is None:
            return np.zeros(len(df), np.int64), ["all"]
        uniq, code = np.unique(df[self.scenario_column].to_numpy().astype(str), return_inverse=True)
        return code.astype(np.int64).reshape(-1), [f"{self.scenario_column}:{v}" for v in uniq]

    def categorical_columns(self):
        drop = {self.scenario_column} | ({"marital_stat"} if "never_married" in self.tasks else set())
        return tuple(c for c in CATEGORICAL if c not in drop)

    def numeric_columns(self):
        return NUMERIC

    def transform_numeric(self, x, train):
        if not self.scale_numeric:
            return x
        ref = x[train] if train.any() else x
        lo, hi = float(ref.min()), float(ref.max())
        return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)

    def task_arrays(self, df):
        y = {"income_50k": df[INCOME].to_numpy(),
             "never_married": (df["marital_stat"].to_numpy().astype(str) == "Never married").astype(np.int64)}
        return {t: y[t] for t in self.tasks}

