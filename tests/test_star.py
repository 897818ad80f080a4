"""The multi-scenario models STAR (algorithms/models/star.py: the star-topology layer and
partitioned normalization by hand), PEPNet (algorithms/models/pepnet.py: the gates by hand) and
M2M (algorithms/models/m2m.py: the meta unit by hand), trained by the scenario baselines on the
tiny multi-scenario data."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fleetrec.algorithms.models.star import PartitionedNorm, StarLinear
from fleetrec.simulator.config import from_dict
from fleetrec.simulator.config_loader import apply_overrides
from fleetrec.algorithms.scenario import SCENARIO_EXAMPLE
from tests.in_process import InProcess

STAR = {**{k: v for k, v in SCENARIO_EXAMPLE.items() if not k.startswith("model.")},
        "model.name": "star", "model.embed_dim": 4, "model.star": "[8]", "model.tower": "[4]", "model.dropout": 0.0,
        "rounds": 2, "tracking.mlflow": False, "tracking.progress": False, "resources.workers": 1}


def cfg(**extra):
    return from_dict(apply_overrides({}, [f"{k}={v}" for k, v in {**STAR, **extra}.items()]), "star")


def test_star_linear_is_the_shared_layer_times_the_scenario_layer():
    g = torch.Generator().manual_seed(0)
    layer = StarLinear(5, 3, num_scenarios=2)
    with torch.no_grad():
        layer.scenario_weight.copy_(torch.rand(2, 3, 5, generator=g) + 0.5)
        layer.scenario_bias.copy_(torch.randn(2, 3, generator=g))
    x, s = torch.randn(6, 5, generator=g), torch.tensor([0, 1, 1, 0, 1, 0])
    out = layer(x, s)
    for i in range(6):
        p = int(s[i])
        w = layer.shared.weight * layer.scenario_weight[p]
        torch.testing.assert_close(out[i], x[i] @ w.T + layer.shared.bias + layer.scenario_bias[p])
    fresh = StarLinear(5, 3, 2)                     # W^(p) = 1, b^(p) = 0: the shared layer itself
    torch.testing.assert_close(fresh(x, s), F.linear(x, fresh.shared.weight, fresh.shared.bias))


def test_partitioned_norm_uses_each_scenarios_own_statistics():
    g = torch.Generator().manual_seed(1)
    pn = PartitionedNorm(4, num_scenarios=3)
    x = torch.randn(10, 4, generator=g) * 3 + 1
    s = torch.tensor([0, 0, 0, 0, 2, 2, 2, 2, 2, 2])
    out = pn(x, s)
    for p in (0, 2):
        xp = x[s == p]
        expect = (xp - xp.mean(0)) / torch.sqrt(xp.var(0, unbiased=False) + 1e-5)
        torch.testing.assert_close(out[s == p], expect, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(pn.running_mean[p], 0.1 * xp.mean(0))
    assert torch.equal(pn.running_mean[1], torch.zeros(4))          # scenario 1 was not in the batch
    pn.eval()
    y = pn(x[:1], s[:1])
    torch.testing.assert_close(y[0], (x[0] - pn.running_mean[0]) / torch.sqrt(pn.running_var[0] + 1e-5))


def test_star_trains_centralized_and_local_and_needs_a_scenario():
    for algo in ("scenario_centralized", "scenario_local"):
        sim = InProcess(cfg(**{"algorithm.name": algo}))
        before = sim.scores().clone()
        for r in range(2):
            stats = sim.round(r)
        assert stats["clients_trained"] == 3 and torch.isfinite(sim.scores()).all()
        assert not torch.allclose(sim.scores(), before)
    central = InProcess(cfg(**{"algorithm.name": "scenario_centralized"}))
    central.round(0)
    w = central.state["star_layers.0.scenario_weight"]           # each scenario moved its own W^(p)
    assert all(not torch.equal(w[p], torch.ones_like(w[p])) for p in range(3))
    with pytest.raises(ValueError, match="model.name=star needs scenario data"):
        InProcess(from_dict(apply_overrides({}, ["model.name=star", "tracking.mlflow=false"]), "x"))


def test_pepnet_gates_by_hand_and_training():
    from fleetrec.algorithms.models.pepnet import GateNU
    g = torch.Generator().manual_seed(2)
    gate = GateNU(3, 4, 2)
    x = torch.randn(5, 3, generator=g)
    expect = 2 * torch.sigmoid(gate.lin1(torch.relu(gate.lin0(x))))
    torch.testing.assert_close(gate(x), expect)
    d = gate(x).detach()
    assert float(d.min()) > 0 and float(d.max()) < 2
    pep = {k: v for k, v in STAR.items() if k not in ("model.star", "model.auxiliary")}
    pep.update({"model.name": "pepnet", "model.tower": "[8, 4]", "model.gate_hidden": 4})
    for algo in ("scenario_centralized", "scenario_local"):
        sim = InProcess(from_dict(apply_overrides({}, [f"{k}={v}" for k, v in {**pep, "algorithm.name": algo}.items()]),
                                  "pepnet"))
        before = sim.scores().clone()
        for r in range(2):
            sim.round(r)
        assert torch.isfinite(sim.scores()).all() and not torch.allclose(sim.scores(), before)
    model = sim.client.model
    assert model.prior == ("user_id", "item_id")
    cat = {f: torch.zeros(4, dtype=torch.long) for f in model.embed.fields}
    assert model(cat, torch.zeros(4, len(sim.ds.schema.numeric)), {}).shape == (4, 2)


def test_m2m_meta_unit_by_hand_and_training():
    from fleetrec.algorithms.models.m2m import MetaLinear
    g = torch.Generator().manual_seed(3)
    layer = MetaLinear(3, 2, cond_dim=4)
    x, cond = torch.randn(5, 3, generator=g), torch.randn(5, 4, generator=g)
    out = layer(x, cond)
    for i in range(5):                       # row i uses its own generated W(S_i), b(S_i)
        w = (layer.weight_gen.weight @ cond[i] + layer.weight_gen.bias).view(2, 3)
        b = layer.bias_gen.weight @ cond[i] + layer.bias_gen.bias
        torch.testing.assert_close(out[i], w @ x[i] + b)
    m2m = {k: v for k, v in STAR.items() if k not in ("model.star", "model.auxiliary", "model.tower")}
    m2m.update({"model.name": "m2m", "model.expert": "[8]", "model.num_experts": 2, "model.attention_hidden": 4})
    for algo in ("scenario_centralized", "scenario_local"):
        sim = InProcess(from_dict(apply_overrides({}, [f"{k}={v}" for k, v in {**m2m, "algorithm.name": algo}.items()]),
                                  "m2m"))
        before = sim.scores().clone()
        for r in range(2):
            sim.round(r)
        assert torch.isfinite(sim.scores()).all() and not torch.allclose(sim.scores(), before)
    model = sim.client.model
    e, s = torch.randn(6, 2, 8), torch.randn(6, 4)
    w = model.expert_weights(e, s, 0)
    torch.testing.assert_close(w.sum(1), torch.ones(6))
