"""Hand-computable checks of the PF-MSMTrec math (methods.md §1.4)."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from fleetrec.algorithms import pfmsm_math as pm


# ------------------------------------------------------------------ conflict coordination
def test_ca_orthogonal_equal_norm_by_hand():
    # Δ1 = e1, Δ2 = e2: Δ̄ = (.5, .5), GᵀG = I, so the dual is minimized at w = (.5, .5) by symmetry,
    # g_w = Δ̄, λ = κ||Δ̄|| / ||g_w|| = κ and d = Δ̄ (1 + κ) / (1 + κ²) = 0.5 · 1.4 / 1.16 per entry.
    deltas = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    d = pm.conflict_averse_delta(deltas, kappa=0.4)
    expected = 0.5 * 1.4 / 1.16
    assert torch.allclose(d, torch.tensor([expected, expected], dtype=torch.float64), atol=1e-6)
    assert torch.allclose(pm.conflict_averse_delta(deltas, 0.4, "1+k"), torch.full((2,), 0.5, dtype=torch.float64),
                          atol=1e-6)
    assert torch.allclose(pm.conflict_averse_delta(deltas, 0.4, "none"), torch.full((2,), 0.7, dtype=torch.float64),
                          atol=1e-6)


def test_ca_opposed_deltas_give_zero_without_nan():
    v = torch.tensor([1.0, -2.0, 3.0])
    d = pm.conflict_averse_delta(torch.stack([v, -v]), kappa=0.4)
    assert torch.isfinite(d).all()
    assert torch.allclose(d, torch.zeros(3), atol=1e-7)


def test_ca_kappa_zero_is_mean():
    deltas = torch.randn(5, 11, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(pm.conflict_averse_delta(deltas, kappa=0.0), deltas.mean(0))


def test_ca_rejects_unknown_rescale():
    with pytest.raises(ValueError):
        pm.conflict_averse_delta(torch.ones(2, 3), 0.4, "1+k3")


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 5), dim=st.integers(2, 8), seed=st.integers(0, 10_000),
       kappa=st.sampled_from([0.2, 0.4, 0.8]))
def test_ca_worst_client_alignment_not_below_mean(n, dim, seed, kappa):
    deltas = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    d = pm.conflict_averse_delta(deltas, kappa=kappa)
    worst_ca = (deltas @ d).min()
    worst_mean = (deltas @ deltas.mean(0)).min()
    assert worst_ca >= worst_mean - 1e-5 * float((deltas ** 2).sum())
    # stays in the ball ||d·s − Δ̄|| ≤ κ||Δ̄|| (s the rescale factor)
    mean = deltas.mean(0)
    assert (d * (1 + kappa ** 2) - mean).norm() <= kappa * mean.norm() + 1e-6


# ------------------------------------------------------------------ server_norm
def test_server_norm_equalizes_client_scales():
    g = torch.Generator().manual_seed(1)
    deltas = torch.randn(4, 50, generator=g, dtype=torch.float64) * torch.tensor([[0.1], [1.0], [10.0], [3.0]],
                                                                                  dtype=torch.float64)
    out = pm.server_norm(deltas)
    s_in = deltas.std(dim=1, correction=0)
    s_out = out.std(dim=1, correction=0)
    assert torch.allclose(s_out, torch.full((4,), float(s_in.mean()), dtype=torch.float64), rtol=1e-6)
    assert torch.allclose(out.mean(dim=1), torch.full((4,), float(deltas.mean(dim=1).mean()), dtype=torch.float64),
                          atol=1e-9)


# ------------------------------------------------------------------ personalized aggregation
def test_personalized_update_alpha_zero_is_local_and_clipped():
    start = torch.arange(6.0).reshape(2, 3)
    deltas = torch.ones(2, 3)
    d = torch.tensor([10.0, 20.0, 30.0])
    assert torch.equal(pm.personalized_update(start, deltas, d, torch.zeros(2)), start + deltas)
    out = pm.personalized_update(start, deltas, d, torch.tensor([-0.5, 2.0]))   # clipped to 0 and 1
    assert torch.equal(out[0], start[0] + 1)
    assert torch.equal(out[1], start[1] + 1 + d)


def test_hypergrad_step_direction():
    prev_d = torch.tensor([1.0, 0.0])
    deltas = torch.tensor([[2.0, 0.0], [-2.0, 0.0], [0.0, 5.0]])   # agrees, opposes, orthogonal
    grad = pm.hypergrad(deltas, prev_d, "raw")
    assert torch.equal(grad, torch.tensor([-2.0, 2.0, 0.0]))
    # cosine: the same signs, scale-free (a delta 1000x larger gives the same value)
    torch.testing.assert_close(pm.hypergrad(deltas, prev_d), torch.tensor([-1.0, 1.0, 0.0]))
    torch.testing.assert_close(pm.hypergrad(deltas * 1000, prev_d * 1e-3), torch.tensor([-1.0, 1.0, 0.0]))
    # one direction per client (the towers' (a V)_c): row-wise
    per = torch.tensor([[0.0, 1.0], [1.0, 1.0], [0.0, -1.0]])
    torch.testing.assert_close(pm.hypergrad(deltas, per), torch.tensor([0.0, 2 / 2 ** 0.5 / 2, 1.0]))
    assert torch.equal(pm.hypergrad(deltas, torch.zeros(2)), torch.zeros(3))   # first round: no direction
    alpha, buf = pm.momentum_step(torch.full((3,), 0.1), torch.zeros(3), grad, 0.01, 0.9, 1e-4)
    assert alpha[0] > 0.1 and alpha[1] < 0.1
    # plain SGD step: 0.1 − 0.01 · (g + 1e-4 · 0.1)
    assert alpha[0].item() == pytest.approx(0.1 - 0.01 * (-2.0 + 1e-5), abs=1e-7)
    assert alpha[2].item() == pytest.approx(0.1 - 0.01 * 1e-5, abs=1e-7)


def test_momentum_step_is_torch_sgd_with_clipping():
    """The pure step (value, buffer) -> (value, buffer) follows torch.optim.SGD with momentum and
    weight decay over several steps, clipped to [0, 1] after each, as the optimizer object did."""
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(5, generator=g) * 3 for _ in range(6)]
    p = torch.nn.Parameter(torch.full((5,), 0.1))
    opt = torch.optim.SGD([p], lr=0.05, momentum=0.9, weight_decay=1e-4)
    value, buf = torch.full((5,), 0.1), torch.zeros(5)
    for grad in grads:
        p.grad = grad.clone()
        opt.step()
        with torch.no_grad():
            p.clamp_(0.0, 1.0)
        value, buf = pm.momentum_step(value, buf, grad, 0.05, 0.9, 1e-4)
        torch.testing.assert_close(value, p.detach(), atol=1e-7, rtol=0)
        torch.testing.assert_close(buf, opt.state[p]["momentum_buffer"], atol=1e-7, rtol=0)
    assert ((value == 0) | (value == 1)).any()        # the clipping was exercised
    assert torch.equal(pm.momentum_step(torch.full((2,), 0.1), torch.zeros(2), torch.tensor([-5.0, 5.0]),
                                        1.0, 0.9, 1e-4)[0], torch.tensor([1.0, 0.0]))


# ------------------------------------------------------------------ tower aggregation
def test_tower_attention_identical_deltas():
    v = torch.tensor([0.5, -1.0, 2.0, 0.0])
    deltas = v.expand(3, 4).clone()
    beta = torch.tensor([0.0, 0.1, 1.5])
    out = pm.tower_cross_attention(deltas, beta)
    assert torch.allclose(out, deltas + beta.clamp(0, 1).unsqueeze(1) * deltas)


def test_tower_attention_weights_by_hand():
    # Δ1 = (2, 0), Δ2 = (0, 2); D = 2: client 1 scores (4, 0)/√2, so a = softmax(2√2, 0).
    deltas = torch.tensor([[2.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    out = pm.tower_cross_attention(deltas, torch.tensor([1.0, 0.0]))
    a1 = 1 / (1 + math.exp(-2 * math.sqrt(2)))
    assert torch.allclose(out[0], torch.tensor([2 + 2 * a1, 2 * (1 - a1)], dtype=torch.float64))
    assert torch.equal(out[1], deltas[1])


def test_tower_fallback_is_ca_plus_personalized():
    deltas = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    out = pm.tower_fallback(torch.zeros_like(deltas), deltas, torch.tensor([0.0, 1.0]))
    assert torch.equal(out[0], deltas[0])
    assert torch.allclose(out[1], deltas[1] + pm.conflict_averse_delta(deltas))


# ------------------------------------------------------------------ template and FedBN
NAMES = [
    "embed.emb.item.weight", "embed.num_proj.weight",
    "global_experts.0.lin0.weight", "global_experts.3.bn1.running_var",
    "task_experts.0.0.lin0.bias", "task_experts.1.0.bn0.weight",
    "scenario_experts.1.lin1.weight", "gates.1.weight",
    "towers.0.body.lin0.weight", "towers.1.head.bias", "bottom.bn0.num_batches_tracked",
    "levels.1.global_experts.2.lin0.weight", "levels.0.task_experts.1.3.lin0.weight", "levels.0.shared_gate.weight",
]


def test_template_roles_route_experts():
    roles = pm.template_roles(NAMES, ("ctr", "ctcvr"))
    assert roles == {
        "embed.emb.item.weight": "local", "embed.num_proj.weight": "local",
        "global_experts.0.lin0.weight": "global", "global_experts.3.bn1.running_var": "global",
        "task_experts.0.0.lin0.bias": "task:ctr", "task_experts.1.0.bn0.weight": "task:ctcvr",
        "scenario_experts.1.lin1.weight": "scenario", "gates.1.weight": "local",
        "towers.0.body.lin0.weight": "tower:ctr", "towers.1.head.bias": "tower:ctcvr",
        "bottom.bn0.num_batches_tracked": "global",
        "levels.1.global_experts.2.lin0.weight": "global", "levels.0.task_experts.1.3.lin0.weight": "task:ctcvr",
        "levels.0.shared_gate.weight": "local",
    }
    personal = pm.template_roles(NAMES, ("ctr", "ctcvr"), aggregate_scenario_experts=False)
    assert personal["scenario_experts.1.lin1.weight"] == "personal"


def test_upload_names_and_groups():
    roles = pm.template_roles(NAMES, ("ctr", "ctcvr"), aggregate_scenario_experts=False)
    up = pm.upload_names(roles, "local_bn")
    assert not any(pm.bn_tensor(n) for n in up)
    assert "gates.1.weight" not in up and "scenario_experts.1.lin1.weight" not in up
    assert "global_experts.3.bn1.running_var" in pm.upload_names(roles, "server_norm")
    groups = pm.aggregation_groups(roles, up)
    assert groups["task:ctcvr"] == ["levels.0.task_experts.1.3.lin0.weight"]
    with pytest.raises(ValueError):
        pm.upload_names(roles, "fedbn")


def test_bn_tensor_names():
    assert pm.bn_tensor("towers.0.body.bn1.running_mean")
    assert pm.bn_tensor("bn0.weight")
    assert not pm.bn_tensor("towers.0.body.lin1.weight")
    assert not pm.bn_tensor("embed.emb.bn0_field.weight")


# ------------------------------------------------------------------ helpers
def test_flatten_round_trip_and_proximal():
    stacked = {"a": torch.arange(12.0).reshape(2, 2, 3), "b": torch.arange(4.0).reshape(2, 2)}
    flat = pm.flatten_group(stacked, ["a", "b"])
    assert flat.shape == (2, 8)
    back = pm.unflatten_group(flat, stacked, ["a", "b"])
    assert all(torch.equal(back[k], stacked[k]) for k in stacked)
    params = {"w": torch.tensor([1.0, 2.0]), "x": torch.tensor([5.0])}
    ref = {"w": torch.tensor([0.0, 0.0])}          # only names in ref count
    assert pm.proximal_term(params, ref, mu=0.1).item() == pytest.approx(0.05 * 5.0)
    assert pm.proximal_term(params, {}, mu=0.1).item() == 0.0


def test_proximal_gradient_pulls_to_reference():
    w = torch.tensor([1.0, -1.0], requires_grad=True)
    pm.proximal_term({"w": w}, {"w": torch.zeros(2)}, mu=2.0).backward()
    assert torch.equal(w.grad, torch.tensor([2.0, -2.0]))   # μ (θ − θ_ref)


def test_no_ray_or_mlflow_import():
    src = open(pm.__file__).read() + open(pm.__file__.replace("pfmsm_math.py", "models/mtl.py")).read()
    assert "import ray" not in src and "mlflow" not in src
