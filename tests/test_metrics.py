"""Tests of algorithms.metrics against scikit-learn references and hand-computed cases."""
from __future__ import annotations

import math

import numpy as np
import pytest
import sklearn.metrics as skm
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetrec.algorithms.metrics import (
    gauc,
    log_loss,
    per_client_auc,
    pooled_auc,
    precision_recall_f1,
    summarize_task,
    weighted_precision_recall_f1,
)


def _reference_per_client(client, scores, labels):
    """Loop over clients with sklearn; only clients with both classes."""
    ids, aucs, sizes = [], [], []
    for cid in np.unique(client):
        m = client == cid
        if len(np.unique(labels[m])) < 2:
            continue
        ids.append(cid)
        aucs.append(skm.roc_auc_score(labels[m], scores[m]))
        sizes.append(m.sum())
    return np.array(ids, dtype=np.int64), np.array(aucs), np.array(sizes, dtype=float)


def _random_data(seed, n=3000, n_clients=120):
    rng = np.random.default_rng(seed)
    pool = rng.choice(np.arange(-10**12, 10**12, 7919), size=n_clients, replace=False)
    client = rng.choice(pool, size=n).astype(np.int64)
    scores = np.round(rng.random(n), 1)            # heavy ties
    labels = (rng.random(n) < 0.3 + 0.4 * scores).astype(np.int64)
    perm = rng.permutation(n)
    return client[perm], scores[perm], labels[perm]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_per_client_auc_matches_sklearn_loop(seed):
    client, scores, labels = _random_data(seed)
    ids, auc = per_client_auc(client, scores, labels)
    ref_ids, ref_auc, ref_sizes = _reference_per_client(client, scores, labels)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(auc, ref_auc, rtol=0, atol=1e-12)
    assert gauc(client, scores, labels) == pytest.approx(ref_auc.mean(), abs=1e-12)
    assert gauc(client, scores, labels, weighting="impressions") == pytest.approx(
        np.average(ref_auc, weights=ref_sizes), abs=1e-12)


def test_per_client_auc_small_clients_with_one_class_excluded():
    # Many tiny clients: several are single-class and must be dropped.
    client, scores, labels = _random_data(7, n=400, n_clients=150)
    ids, auc = per_client_auc(client, scores, labels)
    ref_ids, ref_auc, _ = _reference_per_client(client, scores, labels)
    assert len(ref_ids) < len(np.unique(client))
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(auc, ref_auc, atol=1e-12)


def test_hand_computed_single_client():
    ids, auc = per_client_auc(np.array([5, 5, 5, 5]), np.array([0.1, 0.4, 0.35, 0.8]),
                              np.array([0, 0, 1, 1]))
    np.testing.assert_array_equal(ids, [5])
    np.testing.assert_allclose(auc, [0.75])
    assert gauc([5, 5, 5, 5], [0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)


def test_hand_computed_ties_and_exclusion():
    # client 9: pos 0.5 vs neg {0.5, 0.2} -> (0.5 + 1) / 2 = 0.75
    # client 3: perfect ranking -> 1.0 ; client 4: only positives -> excluded
    client = np.array([9, 3, 4, 9, 3, 9, 4])
    scores = np.array([0.5, 0.9, 0.1, 0.5, 0.2, 0.2, 0.3])
    labels = np.array([1, 1, 1, 0, 0, 0, 1])
    ids, auc = per_client_auc(client, scores, labels)
    np.testing.assert_array_equal(ids, [3, 9])
    np.testing.assert_allclose(auc, [1.0, 0.75])
    assert gauc(client, scores, labels) == pytest.approx(0.875)
    # impressions: client 3 has 2 rows, client 9 has 3 rows
    assert gauc(client, scores, labels, "impressions") == pytest.approx((2 * 1.0 + 3 * 0.75) / 5)


def test_all_ties_gives_half():
    ids, auc = per_client_auc(np.zeros(6, dtype=np.int64), np.full(6, 0.3),
                              np.array([0, 1, 0, 1, 1, 0]))
    np.testing.assert_allclose(auc, [0.5])


def test_empty_and_no_eligible_client():
    ids, auc = per_client_auc(np.array([], dtype=np.int64), np.array([]), np.array([]))
    assert ids.shape == (0,) and auc.shape == (0,)
    assert math.isnan(gauc(np.array([], dtype=np.int64), np.array([]), np.array([])))
    assert math.isnan(gauc(np.array([1, 1, 2]), np.array([0.1, 0.2, 0.3]), np.array([1, 1, 0])))


def test_gauc_rejects_unknown_weighting():
    with pytest.raises(ValueError):
        gauc(np.array([1, 1]), np.array([0.1, 0.2]), np.array([0, 1]), weighting="bogus")


def test_accepts_torch_tensors():
    import torch
    ids, auc = per_client_auc(torch.tensor([5, 5, 5, 5]), torch.tensor([0.1, 0.4, 0.35, 0.8]),
                              torch.tensor([0.0, 0.0, 1.0, 1.0]))
    np.testing.assert_allclose(auc, [0.75], atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(
        st.tuples(st.integers(-3, 3), st.integers(0, 4), st.booleans()),
        min_size=1, max_size=60),
    seed=st.integers(0, 2**32 - 1),
)
def test_gauc_invariant_to_row_permutation(rows, seed):
    client = np.array([r[0] for r in rows], dtype=np.int64) * 1_000_003
    scores = np.array([r[1] for r in rows], dtype=np.float64) / 4
    labels = np.array([r[2] for r in rows], dtype=np.int64)
    perm = np.random.default_rng(seed).permutation(len(rows))
    for weighting in ("uniform", "impressions"):
        a = gauc(client, scores, labels, weighting)
        b = gauc(client[perm], scores[perm], labels[perm], weighting)
        assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-12)
    ids_a, auc_a = per_client_auc(client, scores, labels)
    ids_b, auc_b = per_client_auc(client[perm], scores[perm], labels[perm])
    np.testing.assert_array_equal(ids_a, ids_b)
    np.testing.assert_allclose(auc_a, auc_b, atol=1e-12)
    ref_ids, ref_auc, _ = _reference_per_client(client, scores, labels)
    np.testing.assert_array_equal(ids_a, ref_ids)
    np.testing.assert_allclose(auc_a, ref_auc, atol=1e-12)


def test_pooled_auc():
    client, scores, labels = _random_data(11)
    assert pooled_auc(scores, labels) == pytest.approx(skm.roc_auc_score(labels, scores))
    assert pooled_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert math.isnan(pooled_auc(np.array([0.2, 0.7]), np.array([1, 1])))
    assert math.isnan(pooled_auc(np.array([0.2, 0.7]), np.array([0, 0])))
    assert math.isnan(pooled_auc(np.array([]), np.array([])))


def test_log_loss_matches_sklearn():
    rng = np.random.default_rng(5)
    p = rng.uniform(0.01, 0.99, size=500)
    y = (rng.random(500) < p).astype(np.int64)
    assert log_loss(p, y) == pytest.approx(skm.log_loss(y, p, labels=[0, 1]), rel=1e-10)
    assert math.isnan(log_loss(np.array([]), np.array([])))
    # clipping keeps it finite for hard 0/1 predictions
    val = log_loss(np.array([0.0, 1.0]), np.array([1, 0]), eps=1e-7)
    assert val == pytest.approx(-math.log(1e-7), rel=1e-6)


def test_precision_recall_f1():
    rng = np.random.default_rng(3)
    p = rng.random(300)
    y = (rng.random(300) < p).astype(np.int64)
    pred = (p >= 0.6).astype(np.int64)
    ref = skm.precision_recall_fscore_support(y, pred, average="binary", zero_division=0)[:3]
    assert precision_recall_f1(p, y, threshold=0.6) == pytest.approx(ref)
    ref_w = skm.precision_recall_fscore_support(y, pred, average="weighted", zero_division=0)[:3]
    assert weighted_precision_recall_f1(p, y, threshold=0.6) == pytest.approx(ref_w)
    # no predicted positives -> zero_division=0
    assert precision_recall_f1(np.array([0.1, 0.2]), np.array([1, 0])) == (0.0, 0.0, 0.0)
    # hand case: preds [1,1,0,0], labels [1,0,1,0] -> P=0.5, R=0.5, F1=0.5
    assert precision_recall_f1([0.9, 0.7, 0.2, 0.1], [1, 0, 1, 0]) == pytest.approx((0.5,) * 3)


@pytest.mark.parametrize("seed", range(6))
def test_precision_recall_f1_from_counts_match_scikit_learn_including_one_class_and_one_prediction(seed):
    """Our count formula (shared by the exact and the histogram evaluation) against scikit-learn,
    also where one class or one predicted value is missing (zero_division=0)."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 40))
    p = rng.random(n)
    y = [(rng.random(n) < p).astype(np.int64), np.ones(n, np.int64), np.zeros(n, np.int64)][seed % 3]
    for threshold in (0.0, 0.3, 0.5, 1.1):
        pred = (p >= threshold).astype(np.int64)
        for average, ours in (("binary", precision_recall_f1), ("weighted", weighted_precision_recall_f1)):
            ref = skm.precision_recall_fscore_support(y, pred, average=average, zero_division=0,
                                                      labels=None if average == "binary" else [0, 1])[:3]
            assert ours(p, y, threshold=threshold) == pytest.approx(ref), (average, threshold)


def test_summarize_task():
    client, scores, labels = _random_data(13)
    out = summarize_task(client, scores, labels)
    assert set(out) == {"auc", "gauc", "logloss"}
    assert all(isinstance(v, float) for v in out.values())
    assert out["auc"] == pytest.approx(pooled_auc(scores, labels))
    assert out["gauc"] == pytest.approx(gauc(client, scores, labels))
    assert out["logloss"] == pytest.approx(log_loss(scores, labels))
