"""The plug-in contract, checked for every registered algorithm: a newly registered one is picked
up here without editing this file (it must declare `EXAMPLES`, tiny runs of itself).

- declared capabilities are consistent (evaluation kind, privacy mechanisms, ranking cut-offs);
- resume from the checkpoint of round 1, then kill a worker mid-run (checkpoints on): every
  round's metrics and the final server state equal an uninterrupted run's (1e-6);
- `privacy.enabled=true` either trains with noise and logs `privacy/epsilon`, or is refused by
  the config loader with one line naming `privacy.enabled` and the algorithm;
- `privacy.local` (local DP in the worker) likewise: noise in the uploads and `privacy/local_epsilon`,
  the noiseless chain leaves every result unchanged, or one line naming `privacy.local`;
- `train.lr_step_decay` / `lr_round_decay` change local training, or one line naming the key.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fleetrec.algorithms import ALGORITHMS
from fleetrec.algorithms.protocol import CENTRAL_DP, LOCAL_DP, POINTWISE, RANKING, AlgorithmBase
from fleetrec.simulator import checkpoint
from fleetrec.simulator.config import from_dict
from fleetrec.simulator.config_loader import ConfigError, apply_overrides
from fleetrec.simulator.coordinator import WorkerLost
from fleetrec.simulator.run import Callback, run
from tests.in_process import InProcess

ROUNDS = 4
CASES = [pytest.param(name, ex, id=f"{name}-{ex}")
         for name, algo in sorted(ALGORITHMS.items()) for ex in algo.EXAMPLES]


def example_config(name: str, example: str, *extra: str):
    over = {"rounds": ROUNDS, "tracking.mlflow": False, "tracking.progress": False, "algorithm.name": name,
            **ALGORITHMS[name].EXAMPLES[example]}
    return from_dict(apply_overrides({}, [f"{k}={v}" for k, v in over.items()] + list(extra)),
                     f"{name} example {example!r}")


def test_every_algorithm_declares_its_capabilities_and_a_tiny_example():
    assert len(ALGORITHMS) >= 12
    for name, algo in ALGORITHMS.items():
        assert issubclass(algo, AlgorithmBase), name
        assert algo.EXAMPLES, f"{name}: declare EXAMPLES (tiny runs) on the class"
        assert algo.EVALUATION in (POINTWISE, RANKING), name
        assert algo.PRIVACY <= {CENTRAL_DP, LOCAL_DP}, name
        for ex in algo.EXAMPLES:
            cfg = example_config(name, ex)
            assert cfg.algorithm.name == name
            assert bool(cfg.algorithm.ranking_ks()) == (algo.EVALUATION == RANKING), name


class _KillWorker(Callback):
    """Kills the last worker (the coordinator replaces it with a fresh one) after a given round."""

    def __init__(self, after_round: int):
        self.after = after_round

    def on_start(self, cfg, info):
        self.handle = info["worker_handles"][-1]

    def on_round(self, record):
        if record["round"] == self.after:
            import ray
            ray.kill(self.handle, no_restart=False)


def _metrics(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k.startswith(("val/", "test/", "train/"))}


def _assert_same(full, other, what: str) -> None:
    assert [r["round"] for r in other.records] == [r["round"] for r in full.records], what
    for a, b in zip(full.records, other.records):
        ma, mb = _metrics(a), _metrics(b)
        assert ma.keys() == mb.keys(), what
        for k in ma:
            assert mb[k] == pytest.approx(ma[k], abs=1e-6, nan_ok=True), f"{what}: round {a['round']} {k}"
    assert full.server_state.keys() == other.server_state.keys(), what
    for k, v in full.server_state.items():
        torch.testing.assert_close(other.server_state[k], v, atol=1e-6, rtol=0, msg=lambda m: f"{what}: {k}: {m}")


@pytest.mark.parametrize("name,example", CASES)
def test_resume_and_worker_loss_leave_every_result_unchanged(ray_session, tmp_path, name, example):
    """An uninterrupted run with checkpoints every 2 rounds; then a run resumed from its round-1
    checkpoint (as after a driver that died in round 2; the crash itself is tested in
    tests/test_checkpoint.py) re-runs rounds 2 and 3, and a worker is killed after round 2 of it, so
    it is restored from its round-1 shard and replays round 2. Every round's metrics and the final
    server state must equal the uninterrupted run's."""
    folder = tmp_path / "ck"
    # one worker: the kill restores the only worker's whole shard (multi-worker restores: test_checkpoint.py)
    cfg = example_config(name, example, "checkpoint.every=2", "checkpoint.keep=2", f"checkpoint.dir={folder}",
                         "resources.workers=1")
    full = run(cfg)
    first, last = _metrics(full.records[0]), _metrics(full.records[-1])
    assert any(not math.isclose(first[k], last[k], abs_tol=1e-9) for k in first if k.startswith("val/")
               and not math.isnan(first[k])), f"{name}: validation metrics did not move in {ROUNDS} rounds"

    assert sorted(p.name for p in folder.glob("round_*")) == ["round_000001", "round_000003"]
    (folder / "LATEST").write_text("round_000001")
    ck = checkpoint.load(folder)
    assert ck.round == 1 and [r["round"] for r in ck.driver["records"]] == [0, 1]
    resumed = run(cfg, [_KillWorker(after_round=2)], resume=ck)
    assert resumed.info["worker_recoveries"] == 1
    _assert_same(full, resumed, f"{name}: resumed from round 1, a worker killed after round 2")


def test_a_worker_that_fails_beyond_max_restarts_ends_the_run_naming_the_key(ray_session, tmp_path):
    cfg = example_config("fedavg", "per_user", "checkpoint.every=1", f"checkpoint.dir={tmp_path / 'ck'}",
                         "resources.workers=1", "resources.max_restarts=0")
    with pytest.raises(WorkerLost) as e:
        run(cfg, [_KillWorker(after_round=1)])
    assert str(e.value.cause) == "worker 0 failed 1 times; resources.max_restarts = 0"


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_central_dp_is_real_or_refused_before_anything_starts(name):
    """With privacy on, a supporting algorithm logs a growing ε and its shared tensors carry the
    noise: with σ = 1000 the noise swamps the clipped updates, so after R rounds of θ += Δ each
    coordinate has moved with std √R·σ·C / (q·N) (within 25%). Any other algorithm is refused
    by the loader, naming privacy.enabled and the algorithm. An algorithm that declares central
    DP for some of its forms only (PMTRec: federated local steps) must refuse the others with one
    line and run at least one of its examples with noise."""
    algo = ALGORITHMS[name]
    if CENTRAL_DP not in algo.PRIVACY:
        with pytest.raises(ConfigError, match=rf"privacy\.enabled: algorithm '{name}' does not implement central DP"):
            example_config(name, next(iter(algo.EXAMPLES)), "privacy.enabled=true")
        return
    runnable = []
    needs = [f"{k}={v}" for k, v in algo.DP_SETTINGS.items()]
    for example in algo.EXAMPLES:
        if needs:    # without the declared settings the loader refuses, naming them
            with pytest.raises(ConfigError, match="privacy.enabled") as e:
                example_config(name, example, "privacy.enabled=true")
            assert all(k.split("=")[0] in str(e.value) for k in needs), str(e.value)
        try:
            example_config(name, example, "privacy.enabled=true", *needs)
            runnable.append(example)
        except ConfigError as e:
            assert "privacy" in str(e) and len(str(e).splitlines()) == 1, (name, example, str(e))
    assert runnable, f"{name} declares central DP but refuses it for every example"
    example = runnable[0]
    rounds, sigma, clip = 2, 1000.0, 1.0
    cfg = example_config(name, example, "privacy.enabled=true", *needs, f"privacy.noise_multiplier={sigma}",
                         f"privacy.clip={clip}", f"rounds={rounds}")
    # both halves in this process (the engine's DP run is tests/test_engine.py's): a cohort per round
    sim = InProcess(cfg)
    start = {k: v.clone() for k, v in sim.state.items()}
    cohort = np.random.default_rng(0).permutation(sim.ds.num_clients)[:sim.setup.clients_per_round]
    eps = [sim.round(r, np.sort(cohort))["privacy/epsilon"] for r in range(rounds)]
    assert 0 < eps[0] < eps[1], name
    moved = torch.cat([(sim.state[k] - v).flatten().double() for k, v in start.items()
                       if v.is_floating_point() and not k.endswith("running_var")])
    expect = math.sqrt(rounds) * sigma * clip / sim.setup.clients_per_round
    assert moved.numel() > 100 and abs(float(moved.std()) / expect - 1) < 0.25, (name, float(moved.std()), expect)


def _local_runnable(name: str) -> tuple[str, list[str]]:
    algo, needs = ALGORITHMS[name], [f"{k}={v}" for k, v in ALGORITHMS[name].LOCAL_DP_SETTINGS.items()]
    for example in algo.EXAMPLES:
        try:
            example_config(name, example, "privacy.local.mechanism=gaussian", "privacy.local.scale=0.1", *needs)
            return example, needs
        except ConfigError as e:
            assert "privacy.local" in str(e) and len(str(e).splitlines()) == 1, (name, example, str(e))
    raise AssertionError(f"{name} declares local DP but refuses it for every example")


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_local_dp_is_real_or_refused_before_anything_starts(name):
    """With `privacy.local` on, a supporting algorithm's uploads carry the noise: with σ = 1000 on
    every coordinate the server's shared tensors move by at least σ / (2·sqrt(K)) per coordinate
    (K clients averaged; without noise they move by about the learning rate) and at most
    1.25·σ·sqrt(R) after R rounds, and ε grows. The chain with a clip no update reaches and no noise
    gives the same server state after one round as no local DP (1e-5): the chain's wiring (deltas
    instead of new tensors, dense embedding rows, unit weights where the example weights are
    uniform) changes nothing else. (One round: the float
    roundoff of the two sums, ~1e-7, is amplified by Adam's local steps in later rounds.)
    Any other algorithm is refused by the loader, naming privacy.local and the algorithm."""
    algo = ALGORITHMS[name]
    if LOCAL_DP not in algo.PRIVACY:
        with pytest.raises(ConfigError, match=rf"privacy\.local: algorithm '{name}' does not implement local DP"):
            example_config(name, next(iter(algo.EXAMPLES)), "privacy.local.mechanism=gaussian", "privacy.local.scale=0.1")
        return
    example, needs = _local_runnable(name)
    rounds, sigma = 2, 1000.0
    runs = {}
    for label, extra in (("plain", []), ("noiseless", ["privacy.local.clip=1.0e+9"]),   # the chain on, changing nothing
                         ("noisy", ["privacy.local.mechanism=gaussian", f"privacy.local.scale={sigma}",
                                    "privacy.local.clip=1.0"])):
        sim = InProcess(example_config(name, example, *needs, *extra, f"rounds={rounds}"))
        start = {k: v.clone() for k, v in sim.state.items()}
        cohort = np.sort(np.random.default_rng(0).permutation(sim.ds.num_clients)[:sim.setup.clients_per_round])
        stats = [sim.round(r, cohort) for r in range(rounds if label == "noisy" else 1)]
        runs[label] = (sim, start, stats)
    plain, noiseless = runs["plain"][0].state, runs["noiseless"][0].state
    assert plain.keys() == noiseless.keys()
    for k, v in plain.items():
        torch.testing.assert_close(noiseless[k], v, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {k}: {m}")
    sim, start, stats = runs["noisy"]
    eps = [s["privacy/local_epsilon"] for s in stats]
    assert 0 < eps[0] < eps[1], name
    moved = torch.cat([(sim.state[k] - v).flatten().double() for k, v in start.items()
                       if v.is_floating_point() and not k.endswith("running_var")])
    K = sim.setup.clients_per_round
    assert moved.numel() > 100, name
    assert sigma / (2 * math.sqrt(K)) < float(moved.std()) < 1.25 * sigma * math.sqrt(rounds), (name, float(moved.std()))


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_lr_schedule_is_applied_or_refused_before_anything_starts(name):
    """train.lr_step_decay / lr_round_decay: an algorithm that declares LR_SCHEDULE trains differently
    with them (one round, same cohort: a different server state); any other is refused by the
    loader with one line naming the key and the algorithm."""
    algo = ALGORITHMS[name]
    example = next(iter(algo.EXAMPLES))
    if not algo.LR_SCHEDULE:
        for key in ("lr_step_decay", "lr_round_decay"):
            with pytest.raises(ConfigError, match=rf"train\.{key}: algorithm '{name}' trains with its own optimizer") as e:
                example_config(name, example, f"train.{key}=0.5")
            assert len(str(e.value).splitlines()) == 1
        return
    states = {}
    for label, extra in (("constant", []), ("step", ["train.lr_step_decay=0.1"]), ("round", ["train.lr_round_decay=0.1"])):
        sim = InProcess(example_config(name, example, *extra))
        cohort = np.sort(np.random.default_rng(0).permutation(sim.ds.num_clients)[:sim.setup.clients_per_round])
        sim.round(1, cohort)              # round 1: the round decay scales its learning rate by 0.1
        states[label] = sim.state
    for label in ("step", "round"):
        gap = max(float((states[label][k] - v).abs().max()) for k, v in states["constant"].items() if v.is_floating_point())
        assert gap > 1e-4, (name, label, gap)


def test_typed_state_round_trips_and_refuses_unknown_or_missing_keys():
    from fleetrec.algorithms.mf import MFServer
    from fleetrec.algorithms.pfmsm import PFMSMServer
    from fleetrec.algorithms.scenario import DittoPersonal
    from fleetrec.algorithms.state import TensorState
    sim = InProcess(example_config("pf_msmtrec", "mmoe"))
    s = PFMSMServer.unflatten(sim.state)
    assert s.flatten().keys() == sim.state.keys() and all(s.flatten()[k] is v for k, v in sim.state.items())
    assert set(s.prev_dir) and all(k.startswith("towers.") for k in s.prev_dir)
    with pytest.raises(KeyError, match="unknown state key 'alpha_momentun'"):
        PFMSMServer.unflatten({**sim.state, "alpha_momentun": torch.zeros(1)})
    with pytest.raises(KeyError, match="no 'has_prev'"):
        PFMSMServer.unflatten({k: v for k, v in sim.state.items() if k != "has_prev"})
    with pytest.raises(KeyError, match="unknown state key 'q.x'"):
        DittoPersonal.unflatten({"m.x": torch.zeros(1), "q.x": torch.zeros(1)})
    mf = MFServer(Q=torch.zeros(3, 2))                       # optional tensors left out, empty groups
    assert mf.flatten().keys() == {"Q"} and MFServer.unflatten(mf.flatten()).P is None
    with pytest.raises(TypeError, match="a state field is a tensor"):
        from dataclasses import dataclass

        @dataclass(frozen=True)
        class Bad(TensorState):
            n: int
        Bad.unflatten({})
