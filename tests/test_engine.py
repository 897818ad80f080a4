"""End-to-end engine tests on Ray: determinism across workers and cohort sizes, state
ownership, routing with a prime number of clients."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fleetrec.simulator.coordinator import sample_cohort
from fleetrec.simulator.placement import Placement
from fleetrec.simulator.run import run


def _metrics(result):
    return {k: v for r in result.records for k, v in r.items()
            if k.startswith(("val/", "test/", "train/train_loss"))}


def _assert_same_run(a, b, tol=1e-6):
    ma, mb = _metrics(a), _metrics(b)
    assert ma.keys() == mb.keys() and ma
    for k in ma:
        assert ma[k] == pytest.approx(mb[k], abs=tol), k
    assert a.server_state.keys() == b.server_state.keys()
    for k in a.server_state:
        torch.testing.assert_close(a.server_state[k], b.server_state[k], atol=tol, rtol=0)


@pytest.fixture(scope="module")
def reference_run(ray_session, tiny_cfg):
    return run(tiny_cfg(**{"resources.workers": 1}))


def test_one_worker_equals_three_workers(ray_session, tiny_cfg, reference_run):
    three = run(tiny_cfg(**{"resources.workers": 3}))
    _assert_same_run(reference_run, three)


def test_cohort_size_one_equals_256(ray_session, tiny_cfg, reference_run):
    # eval_cohort_rows 1: evaluation one client per call too (the reference scores all in one call)
    one = run(tiny_cfg(**{"resources.workers": 1, "federation.cohort_size": 1, "federation.eval_cohort_rows": 1}))
    _assert_same_run(reference_run, one)


def test_evaluation_cohorts_grow_to_the_row_budget_and_keep_every_client_once():
    from fleetrec.simulator.worker import cohort_chunks
    ids = np.arange(1000, dtype=np.int64)
    n = np.where(ids < 10, 50, 3)                     # ten long clients, the rest short
    train = list(cohort_chunks(ids, n, 4))
    assert [len(c) for c in train] == [4] * 250        # training: cohort_size clients
    ev = list(cohort_chunks(ids, n, 4, rows=300))
    assert sorted(np.concatenate(ev).tolist()) == ids.tolist()
    assert [len(c) for c in ev[:3]] == [6, 6, 100]     # 300 // 50 = 6 long clients per call, then 300 // 3
    assert all(len(c) * n[c].max() <= 300 for c in ev)
    assert [len(c) for c in cohort_chunks(ids, n, 8, rows=300)][0] == 8   # never below cohort_size
    # a cap on clients per call (the worker's: personal state gathered per call <= 64 MB)
    capped = list(cohort_chunks(ids, n, 4, rows=300, max_clients=50))
    assert max(len(c) for c in capped) == 50 and sorted(np.concatenate(capped).tolist()) == ids.tolist()
    assert [len(c) for c in cohort_chunks(ids, n, 4, rows=300, max_clients=2)][:2] == [4, 4]   # cohort_size still


def test_a_dataset_put_by_the_caller_gives_the_same_run(ray_session, tiny_cfg, reference_run):
    import ray

    from fleetrec.simulator.run import federated_dataset
    cfg = tiny_cfg(**{"resources.workers": 1})
    _assert_same_run(reference_run, run(cfg, dataset=ray.put(federated_dataset(cfg))))


def test_workers_read_the_dataset_zero_copy(reference_run):
    assert all(w["zero_copy"] for w in reference_run.info["workers"])


def test_eval_on_a_client_sample(ray_session, tiny_cfg):
    res = run(tiny_cfg(**{"eval.clients": 5, "rounds": 1}))
    assert res.records[-1]["test/clients"] == 5


def test_eval_covers_every_client_by_default(reference_run):
    assert reference_run.records[-1]["test/clients"] == 37


def test_training_changes_the_model(reference_run):
    first, last = reference_run.records[0], reference_run.records[-1]
    assert last["train/train_loss"] < first["train/train_loss"]
    assert reference_run.best_round is not None


def test_prime_number_of_clients_routes_to_owners(ray_session, tiny_cfg):
    cfg = tiny_cfg(**{"data.num_clients": 13, "federation.clients_per_round": 13, "resources.workers": 3,
                      "rounds": 2})
    result, coord = run(cfg, keep_actors=True)
    try:
        import ray
        # every client was trained once per round by its owner: the cohort is everyone
        assert all(r["train/clients_trained"] == 13 for r in result.records)
        workers = ray.get(coord.worker_handles.remote())
        owned = [ray.get(w.personal_state.remote(np.arange(i, 13, 3)))["user_emb"].shape[0]
                 for i, w in enumerate(workers)]
        assert owned == [5, 4, 4]
        with pytest.raises(ray.exceptions.RayTaskError, match="does not own"):
            ray.get(workers[0].personal_state.remote(np.array([1])))
    finally:
        ray.kill(coord)


def test_placement_partitions_the_cohort_and_slots_every_client_once():
    cohort = sample_cohort(seed=3, rnd=5, num_clients=101, k=40)
    rows = np.random.default_rng(0).integers(1, 50, size=101)
    for policy in ("modulo", "balanced"):
        place = Placement.build(policy, 7, rows)
        parts = place.split(cohort)
        assert sorted(np.concatenate(parts).tolist()) == cohort.tolist()
        for w, p in enumerate(parts):
            assert np.all(place.owner(p) == w)
            slots = place.slots(place.owned(w), w)
            assert slots.tolist() == list(range(len(place.owned(w))))      # dense slots, in id order
        with pytest.raises(ValueError, match="does not own"):
            place.slots(place.owned(1)[:1], 0)
    modulo = Placement.build("modulo", 7, rows)
    assert all(np.all(p % 7 == w) for w, p in enumerate(modulo.split(cohort)))
    assert np.array_equal(cohort, sample_cohort(3, 5, 101, 40))          # seeded
    assert not np.array_equal(cohort, sample_cohort(3, 6, 101, 40))      # differs by round


def test_balanced_placement_evens_out_unequal_scenarios():
    rows = np.array([300, 200, 120])                  # SCENARIO_EXAMPLE's scenarios on 2 workers
    assert Placement.build("modulo", 2, rows).rows_per_worker(rows).tolist() == [420, 200]
    assert Placement.build("balanced", 2, rows).rows_per_worker(rows).tolist() == [300, 320]
    big = np.random.default_rng(1).integers(1, 1000, size=5000)
    loads = Placement.build("balanced", 4, big).rows_per_worker(big)
    assert loads.max() - loads.min() <= big.max()      # greedy (largest first) is within one client


def test_results_do_not_depend_on_the_placement_policy(ray_session, tiny_cfg, reference_run):
    balanced = run(tiny_cfg(**{"resources.workers": 3, "resources.placement_policy": "balanced"}))
    _assert_same_run(reference_run, balanced)


def test_personal_state_persists_and_stays_in_worker(ray_session, tiny_cfg):
    import ray
    cfg = tiny_cfg(**{"rounds": 2, "federation.clients_per_round": 10})
    result, coord = run(cfg, keep_actors=True)
    try:
        r0 = set(sample_cohort(cfg.seed, 0, 37, 10).tolist())
        r1 = set(sample_cohort(cfg.seed, 1, 37, 10).tolist())
        trained, untouched = sorted(r0 | r1), sorted(set(range(37)) - r0 - r1)
        state = ray.get(coord.personal_state.remote(trained + untouched))
        from fleetrec.algorithms import make_algorithm
        from fleetrec.algorithms.protocol import Setup
        ds = cfg.data.build(cfg.seed)
        algo = make_algorithm(cfg.algorithm, Setup(ds.schema, ds.num_clients, cfg.seed, cfg.train, cfg.model))
        init = algo.init_personal(torch.arange(37))["user_emb"]
        for c in trained:           # trained in round 0 or 1: the worker kept the result
            assert not torch.allclose(state[c]["user_emb"], init[c])
        for c in untouched:         # never sampled: still the initial value
            torch.testing.assert_close(state[c]["user_emb"], init[c])
        # private tensors are never part of the server state or of what is sent to clients
        assert "user_emb" not in result.server_state
        plan = algo.configure_train(0, algo.init_server(), torch.arange(3))
        assert "user_emb" not in plan.params
    finally:
        ray.kill(coord)


def test_round_two_continues_from_round_one_state(ray_session, tiny_cfg):
    """Client 0's embedding after round 1 is exactly round-1 training started from its
    round-0 embedding (kept by its worker) and the round-0 global model."""
    import ray
    from fleetrec.algorithms import make_algorithm
    from fleetrec.algorithms.protocol import Setup
    from fleetrec.simulator.cohort import DataView

    def personal_after(rounds):
        res, coord = run(tiny_cfg(**{"rounds": rounds, "federation.clients_per_round": 37}), keep_actors=True)
        try:
            return res, ray.get(coord.personal_state.remote([0]))[0]["user_emb"]
        finally:
            ray.kill(coord)

    res_one, emb_one = personal_after(1)
    _, emb_two = personal_after(2)
    cfg = tiny_cfg()
    ds = cfg.data.build(cfg.seed)
    algo = make_algorithm(cfg.algorithm, Setup(ds.schema, ds.num_clients, cfg.seed, cfg.train, cfg.model))
    batch = DataView(ds).batch(np.array([0]), 0, epochs=cfg.train.local_epochs, seed=cfg.seed, rnd=1)
    plan = algo.configure_train(1, res_one.server_state, torch.tensor([0]))
    expected = algo.train_cohort(plan, batch, {"user_emb": emb_one[None]}).personal["user_emb"][0]
    torch.testing.assert_close(emb_two, expected, atol=1e-6, rtol=0)
    assert not torch.allclose(emb_two, emb_one)


def test_central_dp_run_logs_epsilon_every_round(ray_session, tiny_cfg):
    res = run(tiny_cfg(**{"privacy.enabled": True, "privacy.noise_multiplier": 1.0, "privacy.clip": 0.5,
                          "rounds": 2, "algorithm.weighting": "uniform"}))
    eps = [r["privacy/epsilon"] for r in res.records]
    assert 0 < eps[0] < eps[1]


def test_a_run_whose_every_update_diverges_stops_with_one_line(ray_session, tiny_cfg):
    from fleetrec.simulator import run as run_mod
    from fleetrec.simulator.config_loader import ConfigError
    with pytest.raises(ConfigError, match=r"train.lr: in round 1 all \d+ client updates were NaN or inf"):
        run(tiny_cfg(**{"train.lr": 1e30, "rounds": 2}))
    # updates that stay finite but make the model score NaN: round 1's evaluation says so
    with pytest.raises(run_mod.Diverged, match=r"the model scored \d+ val rows as NaN or inf in round 1; train.lr is 1e\+06"):
        run(tiny_cfg(**{"train.lr": 1e6, "rounds": 3, "train.stop_on_divergence": 1}))


def test_diverging_rounds_are_marked_and_stop_the_run_after_k_in_a_row(tiny_cfg, monkeypatch, capsys):
    """A round with more than half of its updates dropped, or a non-finite loss, is `train/diverging`;
    `train.stop_on_divergence` = k of them in a row stop the run (CLI exit 3, one line); 0 never stops."""
    from fleetrec.simulator import run as run_mod
    from fleetrec.simulator.cli import main
    from fleetrec.simulator.tracking import summary_table

    def rec(r, dropped, trained, loss=0.5):
        return {"round": r, "train/updates_dropped": dropped, "train/clients_trained": trained, "train/train_loss": loss,
                "train_seconds": 0.1, "eval_seconds": 0.0, "client_updates_per_s": 10.0}

    loop = run_mod._Loop(tiny_cfg(**{"train.stop_on_divergence": 2}), [])
    loop.record(rec(0, 6, 4))                           # diverging
    loop.record(rec(1, 1, 9))                           # fine: the streak restarts
    loop.record(rec(2, 0, 10, float("nan")))            # diverging (loss)
    with pytest.raises(run_mod.Diverged, match=r"the run diverged: 7 of 10 client updates were NaN or inf in 2 "
                                               r"rounds in a row \(rounds 3-4\); train.lr is"):
        loop.record(rec(3, 7, 3))
    once = run_mod._Loop(tiny_cfg(**{"train.stop_on_divergence": 1}), [])
    with pytest.raises(run_mod.Diverged, match=r"the run diverged: the model scored 4 val rows as NaN or inf in round 1; "):
        once.record({**rec(0, 0, 10), "val/auc": float("nan"), "val/nonfinite_scores": 4})
    assert [r.get("train/diverging", 0) for r in loop.records] == [1.0, 0, 1.0, 1.0] and loop.diverging == [1, 3, 4]
    never = run_mod._Loop(tiny_cfg(**{"train.stop_on_divergence": 0}), [])
    for r in range(5):
        never.record(rec(r, 6, 4))
    res = never.result({}, {})
    line = next(l for l in summary_table(res).splitlines() if l.startswith("diverging rounds"))
    assert line.endswith("5: 1, 2, 3, 4, 5")

    def diverges(*a, **k):
        raise run_mod.Diverged("the run diverged: test")
    monkeypatch.setattr(run_mod, "run", diverges)
    assert main(["run", "rounds=1", "tracking.mlflow=false"]) == 3
    assert capsys.readouterr().err.strip().splitlines()[-1] == "fleetrec: run stopped: the run diverged: test"
