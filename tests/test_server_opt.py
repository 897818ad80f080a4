"""Server update rules on the aggregated delta (algorithms/server_opt.py): the formulas of Reddi et
al. (ICLR 2021) step by step, plain sgd is FedAvg's θ + η·Δ, and the rule's moments are server
state (checkpointed; resume and worker loss with FedAdam are in tests/test_contract.py)."""
from __future__ import annotations

import pytest
import torch

from fleetrec.algorithms import make_algorithm, server_opt
from fleetrec.algorithms.server_opt import ServerOptimizerConfig
from fleetrec.simulator.config import make_setup
from fleetrec.simulator.config_loader import ConfigError
from tests.test_contract import example_config


def _run(name: str, deltas, lr=0.5, **kw):
    cfg = ServerOptimizerConfig(name=name, **kw)
    theta = {"w": torch.tensor([1.0, -2.0])}
    state = {**theta, **server_opt.init_state(cfg, theta)}
    out = []
    for d in deltas:
        state = server_opt.apply(cfg, lr, state, {"w": torch.tensor(d)})
        out.append(state["w"].clone())
    return out, state


def test_sgd_is_theta_plus_lr_delta_and_keeps_no_state():
    (w,), state = _run("sgd", [[0.2, 0.4]])
    torch.testing.assert_close(w, torch.tensor([1.1, -1.8]))
    assert set(state) == {"w"}


def test_momentum_adam_and_yogi_follow_the_paper_step_by_step():
    d1, d2 = torch.tensor([0.2, 0.4]), torch.tensor([-0.1, 0.4])
    b1, b2, tau, lr = 0.9, 0.99, 1e-3, 0.5
    ws, _ = _run("momentum", [d1.tolist(), d2.tolist()])
    m1 = d1
    m2 = b1 * m1 + d2
    torch.testing.assert_close(ws[1], torch.tensor([1.0, -2.0]) + lr * m1 + lr * m2)
    for rule in ("adam", "yogi"):
        ws, state = _run(rule, [d1.tolist(), d2.tolist()])
        theta, m, v = torch.tensor([1.0, -2.0]), torch.zeros(2), torch.full((2,), tau ** 2)
        for d in (d1, d2):
            m = b1 * m + (1 - b1) * d
            v = b2 * v + (1 - b2) * d * d if rule == "adam" else v - (1 - b2) * d * d * torch.sign(v - d * d)
            theta = theta + lr * m / (v.sqrt() + tau)
        torch.testing.assert_close(ws[1], theta)
        torch.testing.assert_close(state["server_opt/v/w"], v)


def test_the_rule_is_a_config_block_of_fedavg_and_its_moments_are_server_state():
    cfg = example_config("fedavg", "fedadam")
    assert cfg.algorithm.server_optimizer.name == "adam"
    ds = cfg.data.build(cfg.seed)
    state = make_algorithm(cfg.algorithm, make_setup(cfg, ds)).init_server()
    shared = [k for k in state if not k.startswith("server_opt/")]
    assert {k for k in state if k.startswith("server_opt/")} == {f"server_opt/{m}/{k}" for m in "mv" for k in shared}
    with pytest.raises(ConfigError, match="algorithm.server_optimizer.name"):
        example_config("fedavg", "per_user", "algorithm.server_optimizer.name=lamb")
