"""The "write your own algorithm" example (algorithms/fedprox.py): one short file on the public
protocol, registered in one line; resume, worker loss and central DP are checked for it, as for
every registered algorithm, by tests/test_contract.py."""
from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import torch

from fleetrec.algorithms import ALGORITHMS, make_algorithm
from fleetrec.algorithms.fedprox import FedProx
from fleetrec.simulator.cohort import DataView
from fleetrec.simulator.config import make_setup
from tests.test_contract import example_config

SOURCE = Path(__file__).resolve().parents[1] / "algorithms" / "fedprox.py"
PROTOCOL = Path(__file__).resolve().parents[1] / "algorithms" / "protocol.py"


def test_the_example_is_one_short_file_on_the_public_protocol_registered_in_one_line():
    text = SOURCE.read_text()
    assert len(text.splitlines()) <= 120
    imported = {n.module for n in ast.walk(ast.parse(text)) if isinstance(n, ast.ImportFrom)}
    assert not any(m.startswith(("fleetrec.simulator", "ray", "mlflow")) for m in imported), imported
    assert ALGORITHMS["fedprox"] is FedProx
    assert sum('"fedprox": _A + "fedprox:FedProx"' in line for line in PROTOCOL.read_text().splitlines()) == 1


def _one_round(name: str, *extra: str):
    """Both halves in one process: every client of round 0 trained, the server state after it."""
    cfg = example_config(name, "per_user", *extra)
    ds = cfg.data.build(cfg.seed)
    algo = make_algorithm(cfg.algorithm, make_setup(cfg, ds))
    ids = np.arange(ds.num_clients, dtype=np.int64)[:20]
    batch = DataView(ds).batch(ids, 0, epochs=cfg.train.local_epochs, seed=cfg.seed, rnd=0)
    state = algo.init_server()
    update = algo.train_cohort(algo.configure_train(0, state, torch.from_numpy(ids)), batch,
                               algo.init_personal(torch.from_numpy(ids)))
    new, stats = algo.aggregate_train(0, state, update.acc)
    return state, new, update, stats


def test_mu_zero_is_fedavg_and_mu_pulls_every_client_toward_the_global_model():
    _, fedavg, _, _ = _one_round("fedavg", "algorithm.sparse_rows=false", "train.local_epochs=4")
    start, prox0, _, _ = _one_round("fedprox", "algorithm.mu=0", "train.local_epochs=4")
    for k in fedavg:
        torch.testing.assert_close(prox0[k], fedavg[k], atol=1e-6, rtol=1e-5)
    _, prox, _, _ = _one_round("fedprox", "algorithm.mu=5", "train.local_epochs=4")
    moved0 = sum(float((prox0[k] - start[k]).norm()) for k in start)
    moved = sum(float((prox[k] - start[k]).norm()) for k in start)
    assert 0 < moved < 0.9 * moved0                 # the proximal term shrinks the averaged step


def test_central_dp_clips_each_client_and_adds_noise_of_sigma_times_clip():
    start, plain, _, _ = _one_round("fedprox", "privacy.enabled=true", "privacy.noise_multiplier=1e-9",
                                    "privacy.clip=1e-3")
    # with (almost) no noise the step is the mean of clipped deltas: each client moves at most C
    step = torch.cat([(plain[k] - start[k]).flatten() for k in start]).double().norm()
    assert 0 < float(step) <= 1e-3 * (1 + 1e-6)
    # with large noise the step is the noise over q·N = 20 expected clients: std σ·C / 20 per coordinate
    _, noisy, _, stats = _one_round("fedprox", "privacy.enabled=true", "privacy.noise_multiplier=100",
                                    "privacy.clip=0.5")
    noise = torch.cat([(noisy[k] - start[k]).flatten() for k in start]).double() * 20
    assert noise.numel() > 300 and abs(float(noise.std()) / (100 * 0.5) - 1) < 0.1
    assert stats["privacy/epsilon"] > 0
