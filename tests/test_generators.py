"""The fast generators give the same rows as the sorting ones they replaced, for the same seed.

The digests below were taken from the previous implementation (a global `lexsort` per row for the
within-client shuffle, one-block label draws) before it was replaced; the rank and order helpers are
checked against the `lexsort` they stand for on random shapes, including empty and one-row clients.
"""
import numpy as np
import pytest

from fleetrec.datasets.federated import client_split_order
from fleetrec.datasets.synthetic import SyntheticPerUserConfig, true_labels, within_client_ranks
from fleetrec.datasets.synthetic_scenario import SyntheticMultiScenarioConfig

DIGESTS_BEFORE = [
    ({}, "d9c3b7a9e2ffe317"),
    ({"num_clients": 300, "rows_min": 3, "rows_max": 200, "group_weights": (1.0, 3.0)}, "ae42286f4dceb238"),
    ({"num_clients": 2000, "rows_min": 12, "rows_max": 12}, "7c3290d420113650"),
]


@pytest.mark.parametrize("options,digest", DIGESTS_BEFORE)
def test_synthetic_per_user_rows_unchanged(options, digest):
    assert SyntheticPerUserConfig(**options).build(3).fingerprint() == digest


def test_synthetic_multi_scenario_rows_unchanged():
    assert SyntheticMultiScenarioConfig().build(0).fingerprint() == "4d7df71b50117772"


def test_within_client_ranks_equal_lexsort():
    g = np.random.default_rng(0)
    for lengths in ([0, 1, 5, 0, 3], [4] * 7, list(g.integers(0, 9, 60)), [1]):
        n_rows = np.asarray(lengths, dtype=np.int64)
        client = np.repeat(np.arange(len(n_rows)), n_rows)
        keys = np.random.default_rng(5).random(len(client))
        order = np.lexsort((keys, client))
        want = np.empty(len(client), np.int64)
        want[order] = np.arange(len(client)) - np.repeat(np.cumsum(n_rows) - n_rows, n_rows)
        got = within_client_ranks(np.random.default_rng(5), n_rows)
        assert np.array_equal(got, want), lengths


def test_client_split_order_equals_lexsort_or_is_identity():
    g = np.random.default_rng(1)
    for trial in range(200):
        n = g.integers(0, 8, g.integers(1, 20))
        client = np.repeat(np.arange(len(n)), n)
        if trial % 3 == 0:
            client = g.permutation(client)
        split = g.integers(0, 3, len(client)).astype(np.int8)
        if trial % 4 == 0:
            split = np.concatenate([np.sort(split[client == c]) for c in range(len(n))] or [split])
            client = np.sort(client)
        order = client_split_order(client, split)
        want = np.lexsort((split, client))
        if order is None:
            assert np.array_equal(want, np.arange(len(client)))
        else:
            assert np.array_equal(order, want)


def test_label_blocks_do_not_change_values(monkeypatch):
    import fleetrec.datasets.synthetic as synthetic
    g = np.random.default_rng(2)
    u, v = g.normal(size=(50, 4)), g.normal(size=(9, 4))
    client, item = np.repeat(np.arange(50), 7), g.integers(0, 9, 350)
    whole = true_labels(np.random.default_rng(3), u, v, client, item, 2.0, -0.5)
    monkeypatch.setattr(synthetic, "CHUNK_ROWS", 16)
    blocks = true_labels(np.random.default_rng(3), u, v, client, item, 2.0, -0.5)
    assert np.array_equal(whole[0], blocks[0]) and np.array_equal(whole[1], blocks[1])
    assert 0 < whole[1].mean() < 1
