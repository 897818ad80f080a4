"""Seeded multi-scenario, multi-task federation with a known ground truth.

`synthetic_multi_scenario`: each client is a business scenario (e.g. a country or a product
category) holding many rows. Users and items are shared by all scenarios. A row (user u, item i,
numeric features x) has the feature vector phi = [u_lat ⊙ v_lat, x] and, for task t in scenario s,
the click probability sigmoid(signal * <w_{s,t}, phi> / sqrt(dim phi) + bias), with

    w_{s,t} = sqrt(1 - heterogeneity) * w_t + sqrt(heterogeneity) * own_{s,t}       (scenario heterogeneity)
    w_like  = task_correlation * w_click + sqrt(1 - task_correlation^2) * noise       (task correlation)

so `heterogeneity` = 0 makes every scenario the same problem and 1 makes them unrelated, and
`task_correlation` sets how much the two tasks share. The true probability is the Bayes-optimal
scorer; it is kept as the column `_oracle_<task>`, and a run reports its AUC per task and split.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from fleetrec.datasets.federated import CLIENT, SPLIT, CategoricalField, DatasetSchema, FederatedDataset, oracle_column
from fleetrec.datasets.sources import DataConfig
from fleetrec.datasets.synthetic import assign_splits

TASKS = ("click", "like")


@dataclass(frozen=True)
class SyntheticMultiScenarioConfig(DataConfig):
    """Seeded scenario federation (scenarios = clients), tasks `click` and `like`, known Bayes AUC."""
    name: str = "synthetic_multi_scenario"
    rows: tuple[int, ...] = (6000, 4000, 2500, 1500)   # rows per scenario; one entry per scenario
    num_users: int = 500
    num_items: int = 300
    latent_dim: int = 8
    num_numeric: int = 4               # numeric features per row (standard normal)
    heterogeneity: float = 0.5         # 0 = identical scenarios, 1 = unrelated scenarios
    task_correlation: float = 0.5      # correlation of the two tasks' ground-truth weights
    signal: float = 3.0                # logit scale of the ground truth
    bias: float = -0.3                 # logit offset (sets the positive rate)
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    seed: int | None = None            # data seed; null = the experiment seed

    CHECKS: ClassVar[dict] = {"num_users": ">=1", "num_items": ">=1", "latent_dim": ">=1", "num_numeric": ">=0",
                              "heterogeneity": "0..1", "task_correlation": "0..1", "signal": ">=0",
                              "val_fraction": "0..0.5", "test_fraction": "0..0.5"}

    def validate(self) -> str | None:
        if not self.rows or min(self.rows) < 10:
            return f"data.rows: got {list(self.rows)}, expected at least one scenario with >= 10 rows each"
        return None

    def build(self, seed: int) -> FederatedDataset:
        return synthetic_multi_scenario(self, seed if self.seed is None else self.seed)


def synthetic_multi_scenario(cfg: SyntheticMultiScenarioConfig, seed: int) -> FederatedDataset:
    rng = np.random.default_rng([seed, 7003])
    S, d, M = len(cfg.rows), cfg.latent_dim, cfg.num_numeric
    D = d + M
    u_lat = rng.normal(size=(cfg.num_users, d))                                    # (U, d)
    v_lat = rng.normal(size=(cfg.num_items, d))                                    # (I, d)
    item_cat = rng.integers(0, 10, size=cfg.num_items)
    w_click = rng.normal(size=D)
    w_like = cfg.task_correlation * w_click + np.sqrt(1 - cfg.task_correlation ** 2) * rng.normal(size=D)
    base = np.stack([w_click, w_like])                                             # (T, D)
    h = cfg.heterogeneity
    w = np.sqrt(1 - h) * base[None] + np.sqrt(h) * rng.normal(size=(S, len(TASKS), D))   # (S, T, D)
    b = cfg.bias + 0.3 * np.sqrt(h) * rng.normal(size=(S, len(TASKS)))            # (S, T)

    n_rows = np.asarray(cfg.rows, dtype=np.int64)
    client = np.repeat(np.arange(S), n_rows)
    user = rng.integers(0, cfg.num_users, size=len(client))
    item = rng.integers(0, cfg.num_items, size=len(client))
    x = rng.normal(size=(len(client), M)).astype(np.float32)
    phi = np.concatenate([u_lat[user] * v_lat[item], x], axis=1)                  # (R, D)
    logit = cfg.signal * np.einsum("rd,rtd->rt", phi, w[client]) / np.sqrt(D) + b[client]   # (R, T)
    prob = 1.0 / (1.0 + np.exp(-logit))
    label = (rng.random(prob.shape) < prob).astype(np.float32)
    split = assign_splits(rng, client, n_rows, cfg.val_fraction, cfg.test_fraction)

    cols = {CLIENT: client, SPLIT: split, "user_id": user, "item_id": item, "item_cat": item_cat[item]}
    for j in range(M):
        cols[f"x{j}"] = x[:, j]
    for t, task in enumerate(TASKS):
        cols[task] = label[:, t]
    schema = DatasetSchema(
        categorical=(CategoricalField("user_id", cfg.num_users), CategoricalField("item_id", cfg.num_items),
                     CategoricalField("item_cat", 10)),
        numeric=tuple(f"x{j}" for j in range(M)), tasks=TASKS,
        client_categorical=(CategoricalField("scenario", S),), scenario="scenario")
    for t, task in enumerate(TASKS):
        cols[oracle_column(task)] = prob[:, t].astype(np.float32)
    meta = {"positive_rate": {task: float(label[:, t].mean()) for t, task in enumerate(TASKS)}}
    return FederatedDataset.from_columns("synthetic_multi_scenario", cols, schema,
                                         {"scenario": np.arange(S)}, S, meta)
