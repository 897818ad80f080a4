"""Hand-computable checks for every multi-task combiner, plus property tests."""
from __future__ import annotations

import dataclasses
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from fleetrec.algorithms.combiners import (COMBINERS, CombineInput, PMTRecConfig, add_row_grad, dwa_weights,
                                           gather_rows, gradnorm_step, make_combiner, min_norm_weights, nash_weights,
                                           pcgrad_coefficients, pmtrec_combine, register, task_row_grads,
                                           touched_mask, uncertainty_loss)
from fleetrec.algorithms.rng import torch_generator as generator
from fleetrec.simulator.config_loader import ConfigError, build

PROPS = settings(max_examples=40, deadline=None)


def t(x):
    return torch.tensor(x, dtype=torch.float64)


def run(name, grads=None, losses=None, step=0, epoch=0, T=None, **cfg):
    cls = COMBINERS[name]
    T = T or (grads if grads is not None else losses).shape[0]
    comb = cls(T, cls.Config(**cfg), seed=7)
    return comb.combine(CombineInput(losses=losses, grads=grads, step=step, epoch=epoch))


# ------------------------------------------------------------------------------ registry / configs
def test_registry_refuses_duplicates_and_builds_from_config():
    with pytest.raises(ValueError, match="already registered"):
        register("pcgrad", COMBINERS["equal"])
    comb = make_combiner(COMBINERS["cagrad"].Config(c=0.5), num_tasks=3, seed=1)
    assert comb.config.c == 0.5 and comb.num_tasks == 3


def test_configs_are_frozen_with_valid_checks_and_load_from_yaml_dicts():
    for name, cls in COMBINERS.items():
        fields = {f.name for f in dataclasses.fields(cls.Config)}
        assert cls.Config().name == name
        assert set(getattr(cls.Config, "CHECKS", {})) <= fields
        with pytest.raises(dataclasses.FrozenInstanceError):
            cls.Config().name = "x"
    cfg = build(COMBINERS["pmtrec"].Config, {"alpha": 1.05, "tau": 0.5, "magnitude": "main"})
    assert cfg.alpha == 1.05 and cfg.magnitude == "main"
    with pytest.raises(ConfigError):
        build(COMBINERS["pmtrec"].Config, {"combine": "sum"})


def test_algorithms_combiners_do_not_import_ray_or_mlflow():
    code = ("import sys, fleetrec.algorithms.combiners, fleetrec.algorithms.ranking;"
            "assert 'ray' not in sys.modules and 'mlflow' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------- loss weighting
def test_every_combiner_declares_whether_it_keeps_a_history():
    """HAS_HISTORY (what the federated modes refuse) matches what a combiner really holds: state
    tensors or learned parameters, at construction and after a few steps."""
    g = torch.Generator().manual_seed(0)
    for name in COMBINERS.names():
        c = COMBINERS[name](2)
        for step in range(3):
            losses = torch.rand(2, generator=g) + 0.5
            grads = torch.randn(2, 3, 4, generator=g) if name == "pmtrec" else torch.randn(2, 6, generator=g)
            c.combine(CombineInput(losses=losses, grads=grads, step=step, epoch=step))
        held = bool(c.state_tensors()) or bool(c.parameters())
        assert COMBINERS[name].HAS_HISTORY == held, name


def test_equal_weighting_is_the_mean():
    g = t([[1.0, 2.0], [3.0, -2.0], [2.0, 6.0]])
    out = run("equal", grads=g, losses=t([1.0, 2.0, 6.0]))
    assert torch.allclose(out.grad, g.mean(0))
    assert math.isclose(float(out.loss), 3.0)


def test_uncertainty_loss_on_known_log_vars():
    log_vars = torch.tensor([0.0, math.log(2.0)], dtype=torch.float64, requires_grad=True)
    total = uncertainty_loss(t([1.0, 4.0]), log_vars)
    # 0.5*1*1 + 0.5*0 + 0.5*(1/2)*4 + 0.5*ln2
    assert math.isclose(float(total.detach()), 1.5 + 0.5 * math.log(2.0), rel_tol=1e-12)
    total.backward()
    # d/ds = -0.5*exp(-s)*L + 0.5  ->  [-0.5 + 0.5, -1 + 0.5]
    assert torch.allclose(log_vars.grad, t([0.0, -0.5]))


def test_uncertainty_combiner_learns_log_vars_through_its_loss():
    comb = COMBINERS["uncertainty"](2)
    out = comb.combine(CombineInput(losses=t([1.0, 3.0])))
    assert torch.allclose(out.weights, torch.tensor([0.5, 0.5]))
    out.loss.backward()
    assert torch.allclose(comb.parameters()[0].grad, torch.tensor([0.0, -1.0]))


def test_dwa_weights_on_a_known_history():
    w = dwa_weights(t([[1.0, 2.0], [0.5, 2.0]]), temperature=2.0)
    # rates [0.5, 1.0] / 2 -> softmax([0.25, 0.5])
    e1, e2 = math.exp(0.25), math.exp(0.5)
    assert torch.allclose(w, t([e1 / (e1 + e2), e2 / (e1 + e2)]))


def test_dwa_records_one_mean_per_epoch():
    comb = COMBINERS["dwa"](2, COMBINERS["dwa"].Config(temperature=2.0))
    for epoch, losses in [(0, [0.5, 2.0]), (0, [1.5, 2.0]), (1, [0.5, 2.0])]:
        w = comb.combine(CombineInput(losses=torch.tensor(losses), epoch=epoch)).weights
        assert torch.allclose(w, torch.tensor([0.5, 0.5]))       # fewer than two finished epochs
    w = comb.combine(CombineInput(losses=torch.tensor([1.0, 1.0]), epoch=2)).weights
    e1, e2 = math.exp(0.25), math.exp(0.5)                         # epoch means [1, 2] then [0.5, 2]
    assert torch.allclose(w, torch.tensor([e1 / (e1 + e2), e2 / (e1 + e2)]))


def test_rlw_is_a_pure_function_of_seed_and_step():
    a = run("rlw", losses=torch.ones(4), step=3).weights
    b = run("rlw", losses=torch.ones(4), step=3).weights
    c = run("rlw", losses=torch.ones(4), step=4).weights
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert math.isclose(float(a.sum()), 1.0, rel_tol=1e-6) and bool((a > 0).all())


def test_gradnorm_update_rule_by_hand():
    w = gradnorm_step(t([1.0, 1.0]), norms=t([1.0, 3.0]), loss_ratio=t([1.0, 1.0]), alpha=1.5, lr=0.1)
    # G = [1, 3], target = mean(G) * 1 = 2 -> w = [1 + 0.1*1, 1 - 0.1*3] = [1.1, 0.7], renormalised to sum 2
    assert torch.allclose(w, t([1.1, 0.7]) * 2 / 1.8)
    comb = COMBINERS["gradnorm"](2, COMBINERS["gradnorm"].Config(lr=0.1, optimizer="sgd"))
    g = t([[1.0, 0.0], [0.0, 3.0]])
    first = comb.combine(CombineInput(losses=t([1.0, 1.0]), grads=g))
    assert torch.allclose(first.weights, t([0.5, 0.5]))
    second = comb.combine(CombineInput(losses=t([1.0, 1.0]), grads=g))
    assert torch.allclose(second.weights, t([1.1, 0.7]) / 1.8)


def test_gradnorm_weights_move_at_embedding_gradient_scale():
    """The paper's weights have an optimizer of their own: with Adam the first step is lr·sign(dL_grad/dw)
    whatever the gradient scale; plain SGD moves them by lr·||g|| (~1e-5 here), i.e. not at all."""
    g = t([[2e-4, 0.0], [0.0, 6e-4]])                           # ||g|| = [2e-4, 6e-4], as for MF rows
    comb = COMBINERS["gradnorm"](2, COMBINERS["gradnorm"].Config(lr=0.025))
    comb.combine(CombineInput(losses=t([1.0, 1.0]), grads=g))
    # G = [2e-4, 6e-4], target = 4e-4 each: dL/dw = [-2e-4, +6e-4] -> Adam step [+0.025, -0.025] (eps ~ 0)
    expect = t([1.025, 0.975])                                    # already sums to 2
    assert torch.allclose(comb.w, expect, atol=1e-6)
    out = comb.combine(CombineInput(losses=t([1.0, 1.0]), grads=g))
    assert torch.allclose(out.weights, expect / 2, atol=1e-6)
    # second Adam step: m = 0.1·0.9·g1 + 0.1·g2 with the same signs, so another ~lr step
    assert float(comb.w[0]) > 1.045 and float(comb.w[1]) < 0.955
    sgd = COMBINERS["gradnorm"](2, COMBINERS["gradnorm"].Config(lr=0.025, optimizer="sgd"))
    sgd.combine(CombineInput(losses=t([1.0, 1.0]), grads=g))
    assert float((sgd.w - 1).abs().max()) < 2e-5                 # the old rule: a no-op at this scale
    state = comb.state_tensors()                                  # Adam moments are part of the history
    twin = COMBINERS["gradnorm"](2, COMBINERS["gradnorm"].Config(lr=0.025))
    twin.load_state_tensors(state)
    a = comb.combine(CombineInput(losses=t([0.9, 1.0]), grads=g)).weights
    b = twin.combine(CombineInput(losses=t([0.9, 1.0]), grads=g)).weights
    assert torch.equal(a, b) and torch.equal(comb.w, twin.w)


def test_metabalance_by_hand():
    from fleetrec.algorithms.combiners import metabalance_weights
    g = t([[3.0, 4.0], [0.0, 10.0], [1.0, 0.0]])                  # norms 5 (main), 10, 1
    comb = COMBINERS["metabalance"](3, COMBINERS["metabalance"].Config(relax=0.5, beta=0.0))
    out = comb.combine(CombineInput(grads=g))
    # multipliers: main 1; aux1 0.5*5/10 + 0.5 = 0.75; aux2 0.5*5/1 + 0.5 = 3.0; then / T
    assert torch.allclose(out.weights, t([1.0, 0.75, 3.0]) / 3)
    assert torch.allclose(out.grad, (g[0] + 0.75 * g[1] + 3.0 * g[2]) / 3)
    avg = t([5.0, 10.0, 1.0])
    assert torch.allclose(metabalance_weights(avg, 0.5, "reduce"), t([1.0, 0.75, 1.0]))
    assert torch.allclose(metabalance_weights(avg, 0.5, "enlarge"), t([1.0, 1.0, 3.0]))
    assert torch.allclose(metabalance_weights(avg, 1.0, "both"), t([1.0, 0.5, 5.0]))   # r=1: every norm = main's
    # moving averages: beta = 0.9 from zero; the ratio is that of the averages
    comb = COMBINERS["metabalance"](2, COMBINERS["metabalance"].Config(relax=1.0, beta=0.9))
    comb.combine(CombineInput(grads=t([[1.0, 0.0], [0.0, 4.0]])))
    out = comb.combine(CombineInput(grads=t([[2.0, 0.0], [0.0, 1.0]])))
    m0, m1 = 0.9 * 0.1 * 1 + 0.1 * 2, 0.9 * 0.1 * 4 + 0.1 * 1
    assert torch.allclose(out.weights, t([1.0, m0 / m1]) / 2)


# ------------------------------------------------------------------------------ gradient surgery
def test_pcgrad_removes_the_conflicting_component():
    g = t([[1.0, 0.0], [-1.0, 1.0]])
    C = pcgrad_coefficients(g, generator(0, 102, 0))
    proj = C @ g
    assert abs(float(proj[0] @ g[1])) < 1e-12 and abs(float(proj[1] @ g[0])) < 1e-12
    assert torch.allclose(proj, t([[0.5, 0.5], [0.0, 1.0]]))
    assert torch.allclose(run("pcgrad", grads=g).grad, t([0.25, 0.75]))


def test_pcgrad_leaves_agreeing_gradients_alone():
    g = t([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    assert torch.allclose(run("pcgrad", grads=g).grad, g.mean(0))


def test_mgda_two_tasks_matches_the_closed_form():
    g = t([[1.0, 0.0], [0.0, 2.0]])
    # min over gamma of gamma^2 + 4 (1 - gamma)^2 -> gamma = 0.8
    out = run("mgda", grads=g)
    assert torch.allclose(out.weights, t([0.8, 0.2]))
    assert torch.allclose(out.grad, t([0.8, 0.4]), atol=1e-6)
    # one gradient inside the other's ray: the min-norm point is the shorter one
    assert np.allclose(min_norm_weights(np.array([[1.0, 2.0], [2.0, 4.0]])), [1.0, 0.0])


def test_mgda_frank_wolfe_on_three_orthonormal_gradients():
    w = min_norm_weights(np.eye(3), max_iter=2000, tol=1e-12)
    assert np.allclose(w, 1.0 / 3.0, atol=1e-3)


def test_cagrad_with_c_zero_is_the_mean_gradient():
    g = torch.randn(3, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(run("cagrad", grads=g, c=0.0).grad, g.mean(0), atol=1e-6)


def test_cagrad_on_symmetric_gradients_keeps_the_mean_direction():
    g = t([[1.0, 0.0], [0.0, 1.0]])
    out = run("cagrad", grads=g, c=0.5, rescale=0)
    assert torch.allclose(out.weights[0], out.weights[1], atol=1e-4)
    # worst-case improvement min_t <g_t, d> is at least that of the mean
    assert float((g @ out.grad).min()) >= float((g @ g.mean(0)).min()) - 1e-6


def test_nash_mtl_equal_weights_on_orthogonal_equal_norm_gradients():
    out = run("nashmtl", grads=t([[2.0, 0.0], [0.0, 2.0]]))
    # G alpha = 1/alpha with G = 4 I -> alpha = 1/2
    assert torch.allclose(out.weights, t([0.5, 0.5]), atol=1e-4)


def test_nash_mtl_satisfies_its_bargaining_condition():
    g = np.random.default_rng(0).normal(size=(3, 6))
    G = g @ g.T
    a = nash_weights(G)
    assert np.allclose((G @ a) * a, 1.0, atol=1e-4)
    assert np.allclose(nash_weights(np.diag([1.0, 4.0])), [1.0, 0.5], atol=1e-4)


def grads_strategy(T_min=2, T_max=4, P=5):
    return st.integers(T_min, T_max).flatmap(lambda T: st.tuples(
        st.just(T), st.integers(0, 10_000), st.permutations(list(range(T)))))


@PROPS
@given(grads_strategy())
def test_simplex_combiners_weights_sum_to_one(case):
    T, seed, _ = case
    g = torch.randn(T, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    losses = torch.rand(T, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) + 0.1
    for name in ("equal", "rlw", "mgda", "dwa"):
        w = run(name, grads=g, losses=losses, step=seed).weights
        assert math.isclose(float(w.sum()), 1.0, rel_tol=1e-5) and bool((w >= 0).all())


@PROPS
@given(grads_strategy())
def test_combined_gradient_is_equivariant_to_task_order(case):
    T, seed, perm = case
    g = torch.randn(T, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    for name, atol in (("equal", 1e-9), ("mgda", 1e-3), ("cagrad", 1e-3), ("nashmtl", 1e-3)):
        a = run(name, grads=g).grad
        b = run(name, grads=g[perm]).grad
        assert torch.allclose(a, b, atol=atol * max(1.0, float(a.norm()))), name


# ------------------------------------------------------------------------------------- PMTRec
def pm(**kw):
    return PMTRecConfig(**{"alpha": 1.0, "tau": 1.0, "norm_scores": "raw", **kw})


def test_pmtrec_normalized_scores_by_hand():
    """methods.md §2.3: the softmax acts on norms divided by the mean norm of the row's tasks."""
    G = t([[[1e-4, 0.0], [0.0, 0.0]], [[0.0, 3e-4], [0.0, 2e-3]]])   # row 0: n = [1e-4, 3e-4]; row 1: aux only
    _, w = pmtrec_combine(G, 0, PMTRecConfig(alpha=1.0, tau=1.0))
    e = math.exp(0.5) / (math.exp(0.5) + math.exp(1.5))              # scores [0.5, 1.5]
    assert torch.allclose(w, t([[e, 1 - e], [0.0, 1.0]]))
    _, raw = pmtrec_combine(G, 0, pm())                                # the raw form: ~uniform at this scale
    assert abs(float(raw[0, 0]) - 0.5) < 1e-3
    # tau rescales the normalized scores; focusing adds e·ln(alpha) to the main logit after normalizing
    _, w = pmtrec_combine(G, 2, PMTRecConfig(alpha=1.5, tau=0.5))
    l0, l1 = 0.5 / 0.5 + 2 * math.log(1.5), 1.5 / 0.5
    assert math.isclose(float(w[0, 0]), math.exp(l0) / (math.exp(l0) + math.exp(l1)), rel_tol=1e-9)
    # scale-free: multiplying every gradient by 1e4 leaves the weights unchanged
    _, big = pmtrec_combine(G * 1e4, 2, PMTRecConfig(alpha=1.5, tau=0.5))
    assert torch.allclose(big, w)


def test_pmtrec_weights_by_hand():
    # row 0: main [3,4] (n=5), aux [0,2] (n=2); row 1: main [1,0] (n=1), aux [0,3] (n=3)
    G = t([[[3.0, 4.0], [1.0, 0.0]], [[0.0, 2.0], [0.0, 3.0]]])      # (T=2, R=2, d=2)
    g, w = pmtrec_combine(G, epoch=1, config=pm(alpha=2.0, tau=2.0))
    # logits / tau, main + 1*ln 2:  row 0 -> [2.5 + ln2, 1.0], row 1 -> [0.5 + ln2, 1.5]
    w00 = 2 * math.exp(2.5) / (2 * math.exp(2.5) + math.exp(1.0))
    w10 = 2 * math.exp(0.5) / (2 * math.exp(0.5) + math.exp(1.5))
    assert torch.allclose(w, t([[w00, 1 - w00], [w10, 1 - w10]]))
    m0 = w00 * 5 + (1 - w00) * 2
    u0 = w00 * t([3.0, 4.0]) / 5 + (1 - w00) * t([0.0, 2.0]) / 2
    m1 = w10 * 1 + (1 - w10) * 3
    u1 = w10 * t([1.0, 0.0]) + (1 - w10) * t([0.0, 3.0]) / 3
    assert torch.allclose(g, torch.stack([m0 * u0, m1 * u1]))
    # pre_softmax_scale: main logit = alpha^e n_0 / tau = 2*5/2 = 5 (row 0)
    _, w = pmtrec_combine(G, 1, pm(alpha=2.0, tau=2.0, focus_mode="pre_softmax_scale"))
    assert math.isclose(float(w[0, 0]), math.exp(5) / (math.exp(5) + math.exp(1.0)), rel_tol=1e-12)
    # raw_weighted: sum_t w_t G_t
    g, w = pmtrec_combine(G, 1, pm(alpha=2.0, tau=2.0, combine="raw_weighted"))
    assert torch.allclose(g[0], w00 * t([3.0, 4.0]) + (1 - w00) * t([0.0, 2.0]))


def test_pmtrec_magnitude_options():
    G = t([[[3.0, 4.0]], [[0.0, 2.0]]])                               # one row, n = [5, 2]
    for magnitude, expect in (("main", 5.0), ("mean", 3.5)):
        g, w = pmtrec_combine(G, 0, pm(magnitude=magnitude))
        u = w[0, 0] * t([0.6, 0.8]) + w[0, 1] * t([0.0, 1.0])
        assert torch.allclose(g[0], expect * u)


def test_pmtrec_large_tau_gives_uniform_weights_and_alpha_one_disables_focusing():
    G = torch.randn(3, 6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 10
    _, w = pmtrec_combine(G, epoch=5, config=pm(alpha=1.0, tau=1e9))
    assert torch.allclose(w, torch.full_like(w, 1 / 3))
    for mode in ("logit", "pre_softmax_scale"):
        _, w0 = pmtrec_combine(G, 0, pm(alpha=1.0, focus_mode=mode))
        _, w9 = pmtrec_combine(G, 9, pm(alpha=1.0, focus_mode=mode))
        assert torch.allclose(w0, w9)
    _, late = pmtrec_combine(G, 200, pm(alpha=1.2))             # focusing tends to the main task
    assert torch.allclose(late[:, 0], torch.ones(6, dtype=torch.float64))


def test_pmtrec_single_task_rows_and_untouched_rows():
    G = torch.zeros(3, 4, 2, dtype=torch.float64)
    G[1, 0] = t([0.3, -0.4])      # row 0: only aux task 1
    G[0, 1] = t([2.0, 1.0])       # row 1: only main
    G[0, 2], G[2, 2] = t([1.0, 0.0]), t([0.0, 1.0])              # row 2: main + task 2; row 3: nobody
    for cfg in (pm(alpha=1.3, tau=0.5), pm(combine="raw_weighted"), pm(magnitude="main"),
                pm(magnitude="mean"), pm(personalized=False)):
        g, w = pmtrec_combine(G, 3, cfg)
        assert torch.equal(g[0], G[1, 0]) and torch.equal(g[1], G[0, 1])
        assert torch.equal(g[3], torch.zeros(2, dtype=torch.float64)) and torch.equal(w[3], torch.zeros(3, dtype=torch.float64))
        assert w[2, 1] == 0 and math.isclose(float(w[2].sum()), 1.0)


def test_pmtrec_unpersonalized_weights_are_shared_by_rows_with_the_same_tasks():
    G = torch.randn(2, 5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    _, w = pmtrec_combine(G, 2, pm(alpha=1.1, personalized=False))
    assert torch.allclose(w, w[:1].expand_as(w))
    n = G.flatten(1).norm(dim=1)                                 # whole-batch norms
    expect = torch.softmax(t([float(n[0]) + 2 * math.log(1.1), float(n[1])]), 0)
    assert torch.allclose(w[0], expect)


def test_pmtrec_combiner_accepts_explicit_touched_mask():
    G = torch.zeros(2, 1, 2)
    G[0, 0] = torch.tensor([1.0, 0.0])                           # aux touches the row with a zero gradient
    comb = COMBINERS["pmtrec"](2, pm(tau=1e9))
    out = comb.combine(CombineInput(grads=G, touched=torch.tensor([[True], [True]])))
    assert torch.allclose(out.weights, torch.tensor([[0.5, 0.5]]))
    assert torch.allclose(out.grad, torch.tensor([[0.25, 0.0]]))  # m = 0.5*1 + 0.5*0, unit = 0.5*[1,0]


@PROPS
@given(st.integers(2, 5), st.integers(0, 10_000), st.data())
def test_pmtrec_weights_sum_to_one_and_aux_tasks_are_exchangeable(T, seed, data):
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(T, 7, 3, dtype=torch.float64, generator=gen)
    G = G * (torch.rand(T, 7, 1, generator=gen, dtype=torch.float64) > 0.4)    # random untouched rows
    cfg = pm(alpha=data.draw(st.sampled_from([1.0, 1.1, 1.5])), tau=data.draw(st.sampled_from([0.3, 1.0, 4.0])),
             combine=data.draw(st.sampled_from(["unit_weighted", "raw_weighted"])),
             focus_mode=data.draw(st.sampled_from(["logit", "pre_softmax_scale"])),
             magnitude=data.draw(st.sampled_from(["weighted_mean", "main", "mean"])),
             norm_scores=data.draw(st.sampled_from(["normalized", "raw"])))
    g, w = pmtrec_combine(G, 3, cfg)
    any_task = (G.norm(dim=-1) > 0).any(0)
    assert torch.allclose(w.sum(1), any_task.double())
    perm = [0] + data.draw(st.permutations(list(range(1, T))))
    g2, w2 = pmtrec_combine(G[perm], 3, cfg)
    assert torch.allclose(g, g2) and torch.allclose(w[:, perm], w2)


# ------------------------------------------------------------------------------- row gradients
def test_task_row_grads_match_dense_autograd_on_touched_rows_only():
    table = torch.randn(10, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    main_ids, aux_ids = torch.tensor([1, 3, 3]), torch.tensor([3, 7])

    def losses(lookup):
        return [(lookup(main_ids) ** 2).sum(), lookup(aux_ids).prod(dim=1).sum()]

    batch = gather_rows(table, main_ids, aux_ids)
    assert batch.rows.tolist() == [1, 3, 7]
    G = task_row_grads(losses(batch.lookup), batch.emb)                  # (2, 3, 3)
    dense = [torch.autograd.grad(loss, table, retain_graph=True)[0] for loss in losses(lambda i: table[i])]
    for task in range(2):
        assert torch.allclose(G[task], dense[task][batch.rows])
    assert torch.equal(G[1, 0], torch.zeros(3, dtype=torch.float64))    # row 1 not used by the aux task
    assert touched_mask(batch.rows, [main_ids, aux_ids]).tolist() == [[True, True, False], [False, True, True]]
    g, _ = pmtrec_combine(G, 0, pm())
    add_row_grad(table, batch.rows, g)
    assert torch.equal(table.grad[batch.rows], g) and float(table.grad[[0, 2, 4]].abs().sum()) == 0.0
