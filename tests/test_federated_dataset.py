"""FederatedDataset layout and validation, the synthetic per-user generator, counter RNG."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from fleetrec.algorithms import rng
from fleetrec.datasets.federated import CategoricalField, DataError, DatasetSchema, FederatedDataset
from fleetrec.datasets.synthetic import SyntheticPerUserConfig

SCHEMA = DatasetSchema(categorical=(CategoricalField("item", 5),), numeric=("price",), tasks=("click",),
                       client_categorical=(CategoricalField("age", 3),))


def _cols(**over):
    cols = {"client": np.array([2, 0, 0, 1, 2, 0]), "split": np.array([0, 2, 0, 1, 0, 1]),
            "item": np.array([1, 2, 3, 4, 0, 1]), "price": np.ones(6), "click": np.array([1, 0, 1, 0, 1, 1.0])}
    cols.update(over)
    return cols


def test_rows_sorted_by_client_then_split_with_offsets():
    ds = FederatedDataset.from_columns("t", _cols(), SCHEMA, {"age": np.array([0, 1, 2])}, 3)
    assert ds.column("client").tolist() == [0, 0, 0, 1, 2, 2]
    assert ds.column("split").tolist() == [0, 1, 2, 1, 0, 0]
    assert ds.offsets.tolist() == [0, 3, 4, 6]
    assert ds.split_offsets.tolist() == [[0, 1, 2, 3], [3, 3, 4, 4], [4, 6, 6, 6]]
    assert ds.rows_per_client(0).tolist() == [1, 0, 2]


@pytest.mark.parametrize("over, message", [
    ({"click": np.array([1, 0, 2, 0, 1, 1.0])}, "task label column 'click' must be 0 or 1"),
    ({"item": np.array([1, 2, 3, 9, 0, 1])}, "categorical column 'item' must hold codes in [0, 5)"),
    ({"price": np.array([1, np.nan, 1, 1, 1, 1])}, "numeric column 'price' must be finite"),
    ({"split": np.array([0, 3, 0, 1, 0, 1])}, "column 'split' must be 0 (train), 1 (val) or 2 (test)"),
])
def test_validation_names_the_column(over, message):
    with pytest.raises(DataError) as e:
        FederatedDataset.from_columns("shop.csv", _cols(**over), SCHEMA, {"age": np.array([0, 1, 2])}, 3)
    assert str(e.value).startswith("shop.csv: ") and message in str(e.value)


def test_missing_column_and_bad_attributes():
    cols = _cols()
    del cols["price"]
    with pytest.raises(DataError, match=r"missing column\(s\) \['price'\]"):
        FederatedDataset.from_columns("t", cols, SCHEMA, {"age": np.array([0, 1, 2])}, 3)
    with pytest.raises(DataError, match="client attribute 'age'"):
        FederatedDataset.from_columns("t", _cols(), SCHEMA, {"age": np.array([0, 1, 7])}, 3)


def test_synthetic_generator_is_seeded_and_reports_bayes_auc():
    cfg = SyntheticPerUserConfig(num_clients=50, num_items=30)
    a, b, c = cfg.build(1), cfg.build(1), cfg.build(2)
    assert a.table.equals(b.table) and not a.table.equals(c.table)
    from fleetrec.simulator.ceiling import ceiling
    bayes = ceiling(a)["bayes_auc"]               # from the true probabilities the generator keeps
    assert set(bayes) == {"train", "val", "test", "click/train", "click/val", "click/test"}
    assert all(0.5 < v < 1.0 for v in bayes.values())
    import dataclasses
    assert ceiling(dataclasses.replace(a, table=a.table.drop_columns(["_oracle_click"]))) == {}   # no truth, no ceiling
    n = a.offsets[1:] - a.offsets[:-1]
    assert n.min() >= cfg.rows_min and n.max() <= cfg.rows_max
    assert (a.rows_per_client(1) >= 1).all() and (a.rows_per_client(2) >= 1).all()
    assert a.schema.client_categorical[0].name == "group_0"


def test_counter_rng_is_deterministic_and_well_spread():
    a = rng.uniform(1, 2, 3, np.arange(100_000))
    assert np.array_equal(a, rng.uniform(1, 2, 3, np.arange(100_000)))
    assert abs(a.mean() - 0.5) < 0.01 and 0 < a.min() and a.max() < 1
    z = rng.normal(7, np.arange(200_000))
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
    lap = rng.laplace_tensor((1000,), 0, rng.NOISE, 0, np.arange(100), scale=2.0)
    assert abs(float(lap.abs().mean()) - 2.0) < 0.05           # E|X| = scale for Laplace


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 10**6), min_size=1, max_size=20, unique=True))
def test_per_client_draws_do_not_depend_on_the_cohort(clients):
    """A client's draws are the same whether drawn alone or with any other clients."""
    together = rng.normal_tensor((4,), 5, rng.INIT_PERSONAL, 0, np.array(clients))
    for i, c in enumerate(clients):
        alone = rng.normal_tensor((4,), 5, rng.INIT_PERSONAL, 0, np.array([c]))
        assert np.array_equal(together[i].numpy(), alone[0].numpy())
