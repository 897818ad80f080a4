"""Central DP building blocks: clipping, seeded server noise, the fixed-denominator mean, accounting."""
import math

import opacus.accountants as opacus_accountants
import pytest
import torch

from fleetrec.algorithms import privacy as P
from fleetrec.algorithms.aggregate import fold_weighted
from fleetrec.algorithms.protocol import Accumulator
from fleetrec.simulator import config_loader as loader


# ---------------------------------------------------------------------------- accountant
@pytest.mark.parametrize("q,sigma,steps,delta", [(0.01, 1.0, 100, 1e-5), (0.05, 0.8, 37, 1e-6),
                                                  (1.0, 2.0, 5, 1e-5)])
def test_rdp_epsilon_equals_library(q, sigma, steps, delta):
    acc = P.PrivacyAccountant(sigma, q, delta, "rdp")
    acc.step(steps)
    ref = opacus_accountants.RDPAccountant()
    for _ in range(steps):
        ref.step(noise_multiplier=sigma, sample_rate=q)
    assert acc.steps == steps
    assert acc.epsilon() == pytest.approx(ref.get_epsilon(delta=delta), rel=1e-12)


def test_step_n_equals_n_single_steps():
    a, b = P.PrivacyAccountant(1.1, 0.02), P.PrivacyAccountant(1.1, 0.02)
    a.step(25)
    for _ in range(25):
        b.step()
    assert a.state_dict() == b.state_dict()
    assert a.epsilon() == b.epsilon()


def test_prv_epsilon_equals_library():
    acc = P.PrivacyAccountant(1.0, 0.01, 1e-5, "prv")
    acc.step(50)
    ref = opacus_accountants.PRVAccountant()
    for _ in range(50):
        ref.step(noise_multiplier=1.0, sample_rate=0.01)
    assert acc.epsilon() == pytest.approx(ref.get_epsilon(delta=1e-5), rel=1e-9)
    rdp = P.PrivacyAccountant(1.0, 0.01, 1e-5, "rdp")
    rdp.step(50)
    assert acc.epsilon() <= rdp.epsilon()                # PRV is the tighter accountant


def test_epsilon_grows_with_steps_and_shrinks_with_sigma():
    acc = P.PrivacyAccountant(1.0, 0.01)
    assert acc.epsilon() == 0.0
    eps = []
    for _ in range(4):
        acc.step(50)
        eps.append(acc.epsilon())
    assert all(a < b for a, b in zip(eps, eps[1:]))
    by_sigma = []
    for sigma in (0.8, 1.0, 1.5, 2.0):
        a = P.PrivacyAccountant(sigma, 0.01)
        a.step(100)
        by_sigma.append(a.epsilon())
    assert all(a > b for a, b in zip(by_sigma, by_sigma[1:]))


def test_state_dict_round_trip():
    a = P.PrivacyAccountant(1.2, 0.03, 1e-5, "rdp")
    a.step(17)
    state = a.state_dict()
    b = P.PrivacyAccountant(9.0, 0.5, 1e-3, "rdp")       # settings come from the state
    b.load_state_dict(state)
    assert b.steps == 17 and b.epsilon() == a.epsilon()
    a.step(3)
    b.step(3)
    assert b.epsilon() == a.epsilon()
    with pytest.raises(ValueError):
        P.PrivacyAccountant(1.2, 0.03, 1e-5, "prv").load_state_dict(state)


def test_accountant_rejects_bad_settings():
    for args in [(0.0, 0.1), (1.0, 0.0), (1.0, 1.5)]:
        with pytest.raises(ValueError):
            P.PrivacyAccountant(*args)
    with pytest.raises(ValueError):
        P.PrivacyAccountant(1.0, 0.1, kind="moments")


# ---------------------------------------------------------------------------- noise
def test_noise_std_matches_sigma_times_clip():
    sigma, clip = 1.3, 0.7
    noise = P.gaussian_noise_for_sum({"w": (100_000,)}, sigma, clip, seed=3, rnd=1)["w"]
    assert noise.dtype == torch.float64
    assert abs(noise.std().item() / (sigma * clip) - 1.0) < 0.02
    assert abs(noise.mean().item()) < 0.02 * sigma * clip


def test_noise_deterministic_per_seed_and_round():
    shapes = {"a": (4, 3), "b": (7,)}
    n1 = P.gaussian_noise_for_sum(shapes, 1.0, 1.0, seed=0, rnd=5)
    n2 = P.gaussian_noise_for_sum(shapes, 1.0, 1.0, seed=0, rnd=5)
    n3 = P.gaussian_noise_for_sum(shapes, 1.0, 1.0, seed=0, rnd=6)
    n4 = P.gaussian_noise_for_sum(shapes, 1.0, 1.0, seed=1, rnd=5)
    for k, s in shapes.items():
        assert n1[k].shape == s
        assert torch.equal(n1[k], n2[k])
        assert not torch.equal(n1[k], n3[k])
        assert not torch.equal(n1[k], n4[k])
    # a tensor's noise depends on its own name, not on which other tensors are noised
    alone = P.gaussian_noise_for_sum({"b": (7,)}, 1.0, 1.0, seed=0, rnd=5)
    assert torch.equal(alone["b"], n1["b"])
    assert not torch.equal(n1["a"].flatten()[:7], n1["b"])


def test_zero_noise_multiplier_gives_zero_noise():
    n = P.gaussian_noise_for_sum({"w": (5,)}, 0.0, 1.0, seed=0, rnd=0)["w"]
    assert torch.equal(n, torch.zeros(5, dtype=torch.float64))


# ---------------------------------------------------------------------------- clipping
def test_clip_scales_large_norm_and_keeps_small():
    C = 1.5
    big = torch.tensor([2 * C, 0.0, 0.0])                # norm 2C
    small = torch.tensor([0.3, 0.4, 0.0])                # norm 0.5 < C
    zero = torch.zeros(3)
    clipped, scale = P.clip_updates({"w": torch.stack([big, small, zero])}, C)
    assert scale.tolist() == pytest.approx([0.5, 1.0, 1.0])
    assert torch.allclose(clipped["w"][0], big / 2)
    assert torch.equal(clipped["w"][1], small)
    assert torch.equal(clipped["w"][2], zero)


def test_clip_uses_joint_norm_across_tensors():
    # tensor a alone has norm 1 = C, b sqrt(3) < 2C; jointly sqrt(1 + 3) = 2 = 2C
    C = 1.0
    d = {"a": torch.tensor([[1.0, 0.0]]),                # norm 1
         "b": torch.tensor([[[0.0, 1.0], [1.0, 1.0]]])}  # norm sqrt(3)
    clipped, scale = P.clip_updates(d, C)
    assert scale.item() == pytest.approx(0.5)
    total = sum(v.pow(2).sum() for v in clipped.values()).sqrt()
    assert total.item() == pytest.approx(C)
    assert torch.allclose(clipped["a"], d["a"] / 2) and torch.allclose(clipped["b"], d["b"] / 2)


def test_clip_bounds_every_client_norm():
    g = torch.Generator().manual_seed(0)
    d = {"a": torch.randn(64, 5, generator=g) * 3, "b": torch.randn(64, 2, 3, generator=g)}
    clipped, scale = P.clip_updates(d, 0.8)
    norms = (clipped["a"].pow(2).sum(1) + clipped["b"].pow(2).sum((1, 2))).sqrt()
    assert (norms <= 0.8 + 1e-5).all() and (scale <= 1).all() and (scale > 0).all()


def test_clip_keeps_non_finite_updates_non_finite():
    d = {"w": torch.tensor([[float("nan"), 1.0], [float("inf"), 0.0], [3.0, 4.0]])}
    clipped, _ = P.clip_updates(d, 1.0)
    acc = Accumulator()
    keep = fold_weighted(acc, clipped, torch.ones(3))
    assert keep.tolist() == [False, False, True] and acc.dropped == 2


# ---------------------------------------------------------------------------- mean and config
def test_dp_mean_fixed_denominator_and_privatize():
    d = {"w": torch.tensor([[3.0, 4.0], [0.1, 0.0], [0.0, 0.2]])}
    clipped, _ = P.clip_updates(d, 1.0)
    acc = Accumulator()
    fold_weighted(acc, clipped, torch.ones(3))
    cfg = P.CentralDPConfig(enabled=True, noise_multiplier=0.5, clip=1.0)
    expected = P.expected_clients(4, 100)                # one of 4 expected clients did not report
    noise = P.gaussian_noise_for_sum({"w": (2,)}, 0.5, 1.0, seed=7, rnd=2)
    mean = P.dp_mean(acc.sums, P.dp_denominator(cfg, expected, acc), noise)
    assert torch.allclose(mean["w"], (acc.sums["w"] + noise["w"]) / 4.0)
    assert torch.equal(P.privatize(acc, cfg, 7, 2, expected)["w"], mean["w"])
    actual = P.CentralDPConfig(enabled=True, denominator="actual")
    assert P.dp_denominator(actual, expected, acc) == 3.0
    assert torch.allclose(P.dp_mean(acc.sums, 3.0)["w"], acc.sums["w"] / 3.0)
    assert torch.equal(P.dp_mean(acc.sums, 0.0)["w"], torch.zeros(2, dtype=torch.float64))
    assert P.sample_rate(4, 100) == pytest.approx(0.04) and P.sample_rate(500, 100) == 1.0


def test_config_defaults_and_checks():
    cfg = P.CentralDPConfig()
    assert (cfg.enabled, cfg.noise_multiplier, cfg.clip, cfg.delta, cfg.accountant, cfg.denominator) == \
        (False, 1.0, 1.0, 1e-5, "rdp", "expected")
    assert cfg.validate() is None and P.CentralDPConfig(delta=1.0).validate()
    assert set(P.CentralDPConfig.CHECKS) <= {f for f in P.CentralDPConfig.__dataclass_fields__}
    with pytest.raises(Exception):
        cfg.clip = 2.0                                   # frozen
    acc = P.PrivacyAccountant.from_config(P.CentralDPConfig(noise_multiplier=2.0, accountant="rdp"), 0.1)
    assert (acc.noise_multiplier, acc.sample_rate, acc.delta, acc.kind) == (2.0, 0.1, 1e-5, "rdp")


def test_config_loads_through_the_project_loader():
    load = loader.build
    cfg = load(P.CentralDPConfig, {"enabled": True, "noise_multiplier": 0.9, "accountant": "prv"})
    assert cfg == P.CentralDPConfig(enabled=True, noise_multiplier=0.9, accountant="prv")
    for bad in ({"clip": 0.0}, {"accountant": "moments"}, {"denominator": "both"}, {"delta": 1.0}):
        with pytest.raises(loader.ConfigError):
            load(P.CentralDPConfig, bad)


# ---------------------------------------------------------------------------- local DP
def _local(shapes, seed=7, **kw):
    from types import SimpleNamespace
    return P.LocalDP(SimpleNamespace(local_dp=P.LocalDPConfig(**kw), seed=seed), shapes)


@pytest.mark.parametrize("mechanism", ["gaussian", "laplace"])
def test_local_noise_std_within_two_percent_over_1e5_draws(mechanism):
    scale = 0.3
    ldp = _local({"x": (50,), "y": (50,)}, mechanism=mechanism, scale=scale)
    ids = torch.arange(2000)
    up = {"x": torch.zeros(2000, 50), "y": torch.zeros(2000, 50)}       # 10^5 draws per tensor
    noisy = ldp.apply(up, 3, ids)
    x = noisy["x"].double()
    std = scale if mechanism == "gaussian" else math.sqrt(2) * scale   # Laplace(b): Var = 2 b^2
    assert x.numel() == 100_000 and abs(float(x.std()) / std - 1) < 0.02
    assert abs(float(x.mean())) < 0.01
    assert not torch.equal(noisy["x"], noisy["y"])                      # own draws per tensor
    assert torch.equal(ldp.apply(up, 3, ids)["x"], noisy["x"])          # a pure function of (seed, round, client)
    assert not torch.equal(ldp.apply(up, 4, ids)["x"], noisy["x"])
    # client 5's draws do not depend on which other clients share its cohort (any worker layout)
    alone = ldp.apply({"x": torch.zeros(1, 50), "y": torch.zeros(1, 50)}, 3, torch.tensor([5]))
    assert torch.equal(alone["x"][0], noisy["x"][5])


def test_local_noise_is_the_counter_generator_at_the_tensor_index():
    """Tensor j (sorted names) of client c in round r gets draws (hash(seed, j), NOISE, r, c): the
    draws FedPA's own LDP used before it became this chain, so its results are unchanged."""
    from fleetrec.algorithms import rng
    ldp = _local({"b": (3,), "a": (2, 2)}, seed=11, mechanism="laplace", scale=0.5)
    ids = torch.tensor([4, 9])
    out = ldp.apply({"a": torch.ones(2, 2, 2), "b": torch.zeros(2, 3)}, 2, ids)
    for j, k in enumerate(["a", "b"]):
        seed = int(rng.hash_u64(11, j)[()])
        draw = rng.laplace_tensor(tuple(out[k].shape[1:]), seed, rng.NOISE, 2, ids.numpy().astype("uint64"), 0.5)
        base = torch.ones(2, 2, 2) if k == "a" else torch.zeros(2, 3)
        torch.testing.assert_close(out[k], base + draw, atol=0, rtol=0)


def test_local_clip_bounds_each_tensor_and_undeclared_uploads_are_refused():
    ldp = _local({"x": (10,), "y": (4,)}, clip=1.0)
    x, y = torch.randn(6, 10) * 5, torch.randn(6, 4) * 0.01
    out = ldp.apply({"x": x, "y": y}, 0, torch.arange(6))
    assert torch.all(out["x"].norm(dim=1) <= 1.0 + 1e-5)
    torch.testing.assert_close(out["y"], y)                             # already inside the ball
    with pytest.raises(ValueError, match="'z'.*not declared"):
        ldp.apply({"z": x}, 0, torch.arange(6))
    with pytest.raises(ValueError, match="'x' of shape \\(3,\\)"):
        ldp.apply({"x": torch.zeros(6, 3)}, 0, torch.arange(6))
    off = _local({"x": (10,)})
    assert not off.enabled and off.apply({"x": x}, 0, torch.arange(6))["x"] is x


def test_local_epsilon_gaussian_is_the_rdp_accountant_at_sample_rate_one():
    C, sigma = 0.5, 2.0
    ldp = _local({"x": (10,), "y": (4,), "z": (1,)}, mechanism="gaussian", scale=sigma, clip=C)
    ref = opacus_accountants.RDPAccountant()
    for _ in range(3):
        ref.step(noise_multiplier=sigma / (2 * C * math.sqrt(3)), sample_rate=1.0)
    assert ldp.epsilon(3) == pytest.approx(ref.get_epsilon(delta=1e-5), rel=1e-9)
    assert ldp.metrics(2) == {"privacy/local_epsilon": pytest.approx(ldp.epsilon(3))}
    assert 0 < ldp.epsilon(1) < ldp.epsilon(3)


def test_local_epsilon_laplace_is_the_l1_bound_and_none_is_reported_without_clip():
    C, b = 0.5, 4.0
    ldp = _local({"x": (4, 4), "y": (9,)}, mechanism="laplace", scale=b, clip=C)
    per_round = (2 * C * 4.0 + 2 * C * 3.0) / b                         # sum_t 2C sqrt(d_t) / b
    assert ldp.epsilon(5) == pytest.approx(5 * per_round)
    unbounded = _local({"x": (4,)}, mechanism="laplace", scale=b)       # no clip: no finite epsilon
    assert unbounded.enabled and not unbounded.epsilon_bounded and unbounded.metrics(3) == {}


def test_local_config_loads_and_refuses_a_scale_without_a_mechanism():
    cfg = loader.build(P.CentralDPConfig, {"local": {"mechanism": "gaussian", "scale": 0.1, "clip": 1.0}})
    assert cfg.local == P.LocalDPConfig("gaussian", 0.1, 1.0) and cfg.local.enabled and not cfg.enabled
    assert _local({"x": (4,)}, mechanism="gaussian", scale=1.0, clip=1.0, delta=1e-3).epsilon(2) < \
        _local({"x": (4,)}, mechanism="gaussian", scale=1.0, clip=1.0).epsilon(2)            # its own delta
    for bad in ({"mechanism": "poisson"}, {"scale": -1.0}, {"scale": 0.5}):
        with pytest.raises(loader.ConfigError, match="local"):
            loader.build(P.CentralDPConfig, {"local": bad})
