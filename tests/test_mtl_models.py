"""Shapes, gates and template roles of the multi-task models in algorithms/models/mtl.py."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fleetrec.algorithms import pfmsm_math as pm
from fleetrec.algorithms.models.mtl import (MMoE, PLE, MMoEConfig, PLEConfig, SharedBottom, SharedBottomConfig,
                                            InputLayer)
from fleetrec.datasets.federated import CategoricalField, DatasetSchema

SCHEMA = DatasetSchema(categorical=(CategoricalField("item", 11), CategoricalField("cat", 5)),
                       numeric=("n0", "n1", "n2"), tasks=("ctr", "ctcvr"))
SMALL = dict(embed_dim=4, tower=(6, 3), dropout=0.2)


def batch(b: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cat = {"item": torch.randint(0, 11, (b,), generator=g), "cat": torch.randint(0, 5, (b,), generator=g)}
    return cat, torch.randn(b, 3, generator=g), {}


MODELS = [
    (SharedBottom, SharedBottomConfig(bottom=(8, 5), **SMALL)),
    (MMoE, MMoEConfig(num_global_experts=2, num_task_experts=1, num_scenario_experts=2, expert=(8, 5), **SMALL)),
    (MMoE, MMoEConfig(num_global_experts=3, num_task_experts=0, num_scenario_experts=0, expert=(7,), **SMALL)),
    (PLE, PLEConfig(levels=(8, 5), num_shared_experts=2, num_task_experts=1, **SMALL)),
    (PLE, PLEConfig(levels=(6,), num_shared_experts=0, num_task_experts=2, **SMALL)),
]


@pytest.mark.parametrize("cls,cfg", MODELS)
@pytest.mark.parametrize("b", [1, 7])
def test_output_shape(cls, cfg, b):
    torch.manual_seed(0)
    model = cls(cfg, SCHEMA)
    if b == 1:
        model.eval()          # BatchNorm1d needs more than one row in training mode
    out = model(*batch(b))
    assert out.shape == (b, 2)
    assert torch.isfinite(out).all()
    if b > 1:
        out.sum().backward()  # trains end to end
        assert all(p.grad is not None for p in model.parameters())


def test_input_layer_dim():
    layer = InputLayer(SCHEMA, 4)
    cat, num, _ = batch(3)
    assert layer.out_dim == 12 and layer(cat, num).shape == (3, 12)
    no_num = InputLayer(DatasetSchema(categorical=SCHEMA.categorical, numeric=(), tasks=("y",)), 4)
    assert no_num.out_dim == 8 and no_num(cat, torch.zeros(3, 0)).shape == (3, 8)


def test_mmoe_with_only_global_experts_is_plain_mmoe():
    torch.manual_seed(0)
    model = MMoE(MMoEConfig(num_global_experts=3, num_task_experts=0, num_scenario_experts=0,
                            expert=(7,), **SMALL), SCHEMA).eval()
    assert len(model.task_experts[0]) == 0 and len(model.scenario_experts) == 0
    cat, num, attrs = batch(5)
    x = model.embed(cat, num)
    weights = model.gate_weights(x)
    assert all(w.shape == (5, 3) and torch.allclose(w.sum(-1), torch.ones(5)) for w in weights)
    # by hand: z_t = Σ_k g_{t,k} E_k(x), then tower t
    h = torch.stack([e(x) for e in model.global_experts], dim=1)          # (B, K, H)
    expected = torch.cat([tower((w.unsqueeze(-1) * h).sum(1)) for tower, w in zip(model.towers, weights)], dim=-1)
    assert torch.allclose(model(cat, num, attrs), expected, atol=1e-6)
    assert set(model.roles().values()) == {"local", "global", "tower:ctr", "tower:ctcvr"}


def test_mmoe_gate_sees_global_own_task_and_scenario_experts():
    model = MMoE(MMoEConfig(num_global_experts=2, num_task_experts=3, num_scenario_experts=1,
                            expert=(5,), **SMALL), SCHEMA)
    assert all(g.out_features == 2 + 3 + 1 for g in model.gates)
    # an expert of task 0 does not reach the logit of task 1
    model.eval()
    cat, num, attrs = batch(4)
    model.task_experts[0][0].lin0.weight.data.zero_()
    before = model(cat, num, attrs)
    with torch.no_grad():
        model.task_experts[0][0].lin0.bias.add_(3.0)
    after = model(cat, num, attrs)
    assert torch.equal(before[:, 1], after[:, 1]) and not torch.equal(before[:, 0], after[:, 0])


def test_mmoe_rejects_no_experts():
    with pytest.raises(ValueError):
        MMoE(MMoEConfig(num_global_experts=0, num_task_experts=0, num_scenario_experts=0, **SMALL), SCHEMA)


def test_mmoe_roles_route_template():
    cfg = MMoEConfig(num_global_experts=2, num_task_experts=1, num_scenario_experts=2, expert=(8, 5), **SMALL)
    roles = MMoE(cfg, SCHEMA).roles()
    assert roles["global_experts.1.lin0.weight"] == "global"
    assert roles["task_experts.1.0.lin1.weight"] == "task:ctcvr"
    assert roles["scenario_experts.0.bn0.bias"] == "scenario"
    assert roles["gates.0.weight"] == "local" and roles["embed.emb.item.weight"] == "local"
    assert roles["towers.0.head.weight"] == "tower:ctr"
    personal = MMoE(MMoEConfig(aggregate_scenario_experts=False, **SMALL), SCHEMA).roles()
    assert {r for n, r in personal.items() if n.startswith("scenario_experts")} == {"personal"}


@pytest.mark.parametrize("cls,cfg", MODELS)
def test_bn_tensor_finds_every_batchnorm_tensor(cls, cfg):
    model = cls(cfg, SCHEMA)
    bn = {f"{m}.{t}" for m, mod in model.named_modules() if isinstance(mod, nn.BatchNorm1d)
          for t in mod.state_dict()}
    names = set(model.state_dict())
    assert bn and {n for n in names if pm.bn_tensor(n)} == bn
    uploaded = set(pm.upload_names(model.state_roles(), "local_bn"))
    assert uploaded and not uploaded & bn
    # server_norm mode uploads BN tensors of aggregated groups
    assert set(pm.upload_names(model.state_roles(), "server_norm")) & bn


def test_ple_roles():
    roles = PLE(PLEConfig(levels=(8, 5), num_shared_experts=2, num_task_experts=1, **SMALL), SCHEMA).roles()
    assert roles["levels.0.global_experts.1.lin0.weight"] == "global"
    assert roles["levels.1.task_experts.0.0.lin0.weight"] == "task:ctr"
    assert roles["levels.0.shared_gate.weight"] == "local"
    assert "levels.1.shared_gate.weight" not in roles      # the last level has no shared gate
