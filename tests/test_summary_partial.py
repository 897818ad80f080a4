"""The fixed-size pointwise partial (`eval.pooled_auc: histogram`): every metric equals the exact
rows-based one (scikit-learn) except pooled AUC, which stays within its reported bound; merging
in any grouping gives the same result; its size does not depend on the number of rows."""
from __future__ import annotations

import pickle

import numpy as np
import pytest

from fleetrec.algorithms.evaluation import (HIST_BINS, PointwisePartial, SummaryPartial, merge_all, pointwise_metrics,
                                            summary_metrics)


def _rows(n: int, clients: int, T: int = 2, seed: int = 0, ties: bool = False):
    g = np.random.default_rng(seed)
    client = np.sort(g.integers(0, clients, n)).astype(np.int64)
    labels = (g.random((n, T)) < 0.3).astype(np.float32)
    scores = (1 / (1 + np.exp(-(g.standard_normal((n, T)) + 0.8 * labels - 1.0)))).astype(np.float32)
    if ties:
        scores = np.round(scores, 2)
    return client, scores, labels


def _split(client, scores, labels, parts: int, per_client: bool):
    """Partials of disjoint client groups (as workers and cohorts hold them)."""
    edges = np.linspace(0, client.max() + 1, parts + 1).astype(int)
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (client >= lo) & (client < hi)
        out.append(SummaryPartial.from_rows(client[m], scores[m], labels[m], per_client))
    return out


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("per_client", [False, True])
def test_summary_metrics_equal_the_exact_ones_and_auc_is_within_its_bound(ties, per_client):
    client, scores, labels = _rows(20_000, 6 if per_client else 400, ties=ties)
    tasks = ("click", "like")
    exact = pointwise_metrics("val", tasks, PointwisePartial(client, scores, labels), per_client=per_client)
    got = summary_metrics("val", tasks, merge_all(_split(client, scores, labels, 3, per_client)), per_client=per_client)
    bound = got.pop("val/auc_error_bound")
    assert 0 <= bound < (0.02 if ties else 1e-3)          # rounded scores: exact ties share bins (they count 1/2 in both)
    assert got.keys() == exact.keys()
    for k, v in exact.items():
        if k.endswith("/auc") and "/s" not in k and "scenario_mean" not in k:     # pooled AUC: within the bound
            assert abs(got[k] - v) <= bound + 1e-12, (k, got[k], v, bound)
        else:                                                                    # everything else: exact
            assert got[k] == pytest.approx(v, abs=1e-9), k


@pytest.mark.parametrize("per_client", [False, True])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_split_with_a_nan_or_inf_score_has_no_metrics_and_counts_them(per_client, bad):
    """A diverged model's scores: no metric of the other rows is reported (both partials, the same
    keys as a finite split), `<split>/nonfinite_scores` counts them and the run calls the round diverging."""
    from fleetrec.simulator.run import diverging
    client, scores, labels = _rows(2_000, 6 if per_client else 80, seed=5)
    tasks = ("click", "like")
    fine = pointwise_metrics("val", tasks, PointwisePartial(client, scores, labels), per_client=per_client)
    broken = scores.copy()
    broken[[3, 700, 1500], [0, 1, 1]] = bad
    exact = pointwise_metrics("val", tasks, PointwisePartial(client, broken, labels), per_client=per_client)
    hist = summary_metrics("val", tasks, merge_all(_split(client, broken, labels, 3, per_client)), per_client=per_client)
    hist.pop("val/auc_error_bound")
    for got in (exact, hist):
        assert got.keys() == fine.keys() | {"val/nonfinite_scores"}
        assert got["val/nonfinite_scores"] == 3 and got["val/clients"] == fine["val/clients"]
        assert all(np.isnan(v) for k, v in got.items() if k not in ("val/nonfinite_scores", "val/clients"))
        assert diverging({"round": 0, **got}) == "the model scored 3 val rows as NaN or inf"
    assert diverging({"round": 0, **fine}) is None


def test_merging_in_any_grouping_is_the_same_and_the_size_does_not_grow_with_rows():
    client, scores, labels = _rows(30_000, 300, seed=3)
    tasks = ("a", "b")
    one = summary_metrics("t", tasks, merge_all(_split(client, scores, labels, 1, False)))
    many = summary_metrics("t", tasks, merge_all(_split(client, scores, labels, 7, False)))
    assert one == pytest.approx(many, abs=1e-12)
    small = SummaryPartial.from_rows(*_rows(1_000, 50, seed=1))
    big = SummaryPartial.from_rows(*_rows(100_000, 5_000, seed=1))
    assert abs(len(pickle.dumps(big)) - len(pickle.dumps(small))) < 64   # what the coordinator receives (int widths aside)
    assert small.pos.shape == (2, HIST_BINS)
    rows_small, rows_big = PointwisePartial(*_rows(1_000, 50, seed=1)), PointwisePartial(*_rows(100_000, 5_000, seed=1))
    assert len(pickle.dumps(rows_big)) > 50 * len(pickle.dumps(rows_small))  # the exact partial grows with the rows
    assert len(pickle.dumps(big)) < len(pickle.dumps(rows_big))


def test_undefined_values_are_nan_and_an_empty_partial_reports_nothing():
    client = np.zeros(5, np.int64)
    scores, labels = np.full((5, 1), 0.4, np.float32), np.ones((5, 1), np.float32)      # one class only
    m = summary_metrics("v", ("y",), SummaryPartial.from_rows(client, scores, labels))
    assert np.isnan(m["v/auc"]) and np.isnan(m["v/gauc"]) and m["v/logloss"] == pytest.approx(-np.log(0.4))
    assert summary_metrics("v", ("y",), SummaryPartial()) == {} and merge_all([SummaryPartial()]).empty()


@pytest.mark.parametrize("name,example", [("fedavg", "per_user"), ("scenario_fedavg", "mmoe")])
def test_a_run_evaluated_by_histogram_reports_the_exact_metrics_but_pooled_auc(name, example):
    from tests.in_process import InProcess
    from tests.test_contract import example_config
    runs = {}
    for how in ("exact", "histogram"):
        sim = InProcess(example_config(name, example, f"eval.pooled_auc={how}"))
        sim.round(0)
        runs[how] = sim.evaluate("val")
    exact, hist = runs["exact"], runs["histogram"]
    bound = hist.pop("val/auc_error_bound")
    # (after one round the tiny models' scores are bunched, so many pairs share a bin: the bound is
    # large here, and still holds)
    assert hist.keys() == exact.keys() and 0 <= bound < 0.5
    for k, v in exact.items():
        if k in ("val/auc",) or (k.endswith("/auc") and k.count("/") == 2 and "/s" not in k and "scenario_mean" not in k):
            assert abs(hist[k] - v) <= bound + 1e-12, k
        else:
            assert hist[k] == pytest.approx(v, abs=1e-9, nan_ok=True), k


def test_ranking_algorithms_refuse_the_histogram_option():
    from fleetrec.simulator.config_loader import ConfigError
    from tests.test_contract import example_config
    with pytest.raises(ConfigError, match="eval.pooled_auc: algorithm 'pmtrec' reports ranking metrics"):
        example_config("pmtrec", "centralized", "eval.pooled_auc=histogram")


def test_the_runs_reference_aucs_use_the_histogram_when_the_evaluation_does():
    from fleetrec.algorithms.evaluation import histogram_auc
    from fleetrec.algorithms.metrics import pooled_auc
    from fleetrec.datasets.synthetic import SyntheticPerUserConfig
    from fleetrec.simulator.ceiling import ceiling, client_rate_auc
    g = np.random.default_rng(4)
    p = g.random(20000)
    y = g.random(20000) < p
    assert abs(histogram_auc(p, y) - pooled_auc(p, y)) < 1e-3
    ds = SyntheticPerUserConfig(num_clients=200).build(0)
    exact, approx = ceiling(ds)["bayes_auc"], ceiling(ds, approximate=True)["bayes_auc"]
    assert exact.keys() == approx.keys() and all(abs(exact[k] - approx[k]) < 1e-3 for k in exact)
    exact, approx = client_rate_auc(ds), client_rate_auc(ds, approximate=True)
    assert exact.keys() == approx.keys() and all(abs(exact[k] - approx[k]) < 1e-3 for k in exact)
