"""Differential privacy as post-processing of client uploads: central DP on their sum (DP-FedAvg,
McMahan et al. 2018) and local DP on each client's upload (`LocalDP`, at the end of this file).

Length: the two mechanisms, their accountants and their configs share this one module (each half
is short; splitting them would scatter the one privacy story).

Pure building blocks that any algorithm whose aggregate is a weighted sum of client
updates (`Accumulator.sums`) can use; nothing here touches Ray, MLflow or the coordinator.

One round of DP-FedAvg with these pieces::

    clipped, scale = clip_updates(deltas, cfg.clip)             # client half, (K, ...) tensors
    fold_weighted(acc, clipped, torch.ones(K))                  # unit weights, see below
    ...                                                         # workers merge accumulators
    noise = gaussian_noise_for_sum({k: v.shape for k, v in acc.sums.items()},
                                   cfg.noise_multiplier, cfg.clip, seed, rnd)
    mean = dp_mean(acc.sums, dp_denominator(cfg, expected, acc), noise)   # server half
    accountant.step(); metrics["epsilon"] = accountant.epsilon()

Sensitivity. The noise N(0, (sigma*C)^2) per coordinate protects the *sum* only if one
client moves it by at most C in L2 norm: every client update is clipped jointly over all
of its tensors (one global norm per client) and enters the sum with weight <= 1. Folding
with example-count weights breaks this bound; use unit weights (or weights capped at 1,
the "w_k = min(n_k / w_hat, 1)" variant of McMahan et al., then divide by the expected
total weight) when central DP is on.

Denominator. `dp_mean` divides the noisy sum by a number the caller picks:
- "expected" (default): the expected cohort size q*N. It is data independent, so the
  estimator's sensitivity is C / (q*N) and the accountant's guarantee covers the mean.
  This is the fixed-denominator estimator of McMahan et al. (2018). It is biased when
  clients are dropped (NaN updates, failures): the mean shrinks toward zero.
- "actual": the number (total weight) of updates actually summed. Unbiased, but the count
  itself depends on who participated; under Poisson sampling it leaks membership and the
  accountant's epsilon does not cover it. With this simulator's fixed-size cohorts the count
  equals the public cohort size unless updates are dropped, so the two coincide in the
  common case. Treat "actual" as a debugging / utility comparison, not a private setting.

Sampling. The RDP / PRV accountants assume Poisson subsampling with rate q under
add/remove-one neighbouring. The simulator samples a fixed number of clients per round
without replacement; using q = clients_per_round / num_clients is the usual approximation
(as in DP-FedAvg) and is reported as such, not as a formal guarantee for that sampler.

Noise. Server-side noise is drawn with the counter-based generator of `fleetrec.algorithms.rng`
(stream `rng.NOISE`) at a pseudo-client id `SERVER_NOISE_CLIENT + crc32(tensor name)`,
so it is a pure function of (seed, round, tensor name): the same whatever the worker
layout, different every round, and never shared with a real client's local-DP draws.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

from fleetrec.algorithms import aggregate, rng
from fleetrec.algorithms.protocol import Accumulator, Tensors

# Pseudo-client ids for server-side noise start here; real client ids are far below it.
SERVER_NOISE_CLIENT = 2 ** 40

ACCOUNTANTS = ("rdp", "prv")
DENOMINATORS = ("expected", "actual")
LOCAL_MECHANISMS = ("none", "laplace", "gaussian")


@dataclass(frozen=True)
class LocalDPConfig:
    """Local DP on every client upload, in the worker (the YAML `privacy.local:` block).

    Each uploaded tensor of a client is clipped to L2 norm `clip` (0 = no clipping), then gets
    elementwise noise: Laplace with scale b = `scale` or Gaussian with std `scale`. The server only
    ever sees noisy uploads, so nothing has to be trusted (see `LocalDP` for the epsilon reported).
    """
    mechanism: str = "none"           # none | laplace | gaussian
    scale: float = 0.0                # Laplace b or Gaussian std of the elementwise noise; 0 = no noise
    clip: float = 0.0                 # L2 bound on each uploaded tensor of a client before noise; 0 = off
    delta: float = 1e-5               # the delta at which the Gaussian mechanism's epsilon is reported

    CHECKS: ClassVar[dict] = {"mechanism": LOCAL_MECHANISMS, "scale": ">=0", "clip": ">=0", "delta": "0..1"}

    @property
    def enabled(self) -> bool:
        """True when the chain changes an upload: noise (a mechanism with scale > 0), or clipping."""
        return (self.mechanism != "none" and self.scale > 0) or self.clip > 0

    def validate(self) -> str | None:
        if not 0.0 < self.delta < 1.0:
            return f"delta must be in (0, 1), got {self.delta}"
        if self.mechanism == "none" and self.scale > 0:
            return f"scale={self.scale} has no effect with mechanism: none; pick laplace or gaussian"
        return None


@dataclass(frozen=True)
class CentralDPConfig:
    """Central DP on the aggregate (the YAML `privacy:` / `central_dp:` block)."""
    enabled: bool = False            # clip client updates and add Gaussian noise to their sum
    noise_multiplier: float = 1.0    # sigma: noise std per coordinate is sigma * clip
    clip: float = 1.0                # C: L2 bound on each client's whole update (all tensors jointly)
    delta: float = 1e-5              # the delta at which epsilon is reported
    accountant: str = "rdp"          # rdp | prv  (Opacus accountants)
    denominator: str = "expected"    # expected (q*N, private) | actual (count of updates summed)

    local: LocalDPConfig = field(default_factory=LocalDPConfig)   # local DP on each upload (independent of `enabled`)

    CHECKS: ClassVar[dict] = {"noise_multiplier": ">0", "clip": ">0", "delta": "0..1",
                              "accountant": ACCOUNTANTS, "denominator": DENOMINATORS}

    def validate(self) -> str | None:
        """Checks the per-field rules cannot express; a message, or None when valid."""
        if not 0.0 < self.delta < 1.0:
            return f"delta must be in (0, 1), got {self.delta}"
        return None


# ---------------------------------------------------------------------------- client half
def clip_updates(deltas: Tensors, clip: float) -> tuple[Tensors, torch.Tensor]:
    """Per-client L2 clipping over all tensors of a client jointly.

    `deltas[name]` is (K, ...) for K clients. The norm of client k is the global norm
    sqrt(sum_name ||deltas[name][k]||^2); every tensor of client k is multiplied by
    scale_k = min(1, clip / norm_k). Returns (clipped tensors, scale (K,) float32).
    A zero update keeps scale 1. A non-finite update stays non-finite (scale NaN or 0 * inf),
    so `aggregate.fold_weighted` still drops it.
    """
    if clip <= 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    if not deltas:
        return {}, torch.ones(0)
    sq = None
    for v in deltas.values():
        s = v.reshape(v.shape[0], -1).double().pow(2).sum(1)
        sq = s if sq is None else sq + s
    norm = sq.sqrt()
    scale = torch.clamp(clip / norm, max=1.0)            # norm 0 -> inf -> 1; NaN stays NaN
    clipped = {k: v * scale.to(v.dtype).view(-1, *([1] * (v.dim() - 1))) for k, v in deltas.items()}
    return clipped, scale.float()


# ---------------------------------------------------------------------------- server half
def noise_client_id(name: str) -> int:
    """The pseudo-client id whose draws are the server noise of tensor `name` (stable across runs)."""
    return SERVER_NOISE_CLIENT + zlib.crc32(name.encode("utf-8"))


def gaussian_noise_for_sum(shapes: dict[str, tuple], noise_multiplier: float, clip: float,
                           seed: int, rnd: int) -> Tensors:
    """Gaussian noise N(0, (noise_multiplier * clip)^2) per coordinate for the sum of clipped updates.

    `shapes[name]` is the shape of the summed tensor (no client dimension). Returns float64
    tensors (the dtype of `Accumulator.sums`), a pure function of (seed, rnd, name, shape).
    """
    if noise_multiplier < 0 or clip <= 0:
        raise ValueError(f"need noise_multiplier >= 0 and clip > 0, got {noise_multiplier}, {clip}")
    std = float(noise_multiplier) * float(clip)
    out = {}
    for name, shape in shapes.items():
        shape = tuple(int(s) for s in shape)
        z = rng.normal_tensor(shape, seed, rng.NOISE, rnd, np.array([noise_client_id(name)], dtype=np.uint64))
        out[name] = z[0].double() * std                   # unit draws scaled in float64
    return out


def expected_clients(clients_per_round: int, num_clients: int) -> float:
    """q * N: the expected cohort size (the cohort is capped at the number of clients)."""
    return float(min(clients_per_round, num_clients))


def sample_rate(clients_per_round: int, num_clients: int) -> float:
    """q = cohort size / number of clients, the sampling rate the accountant is given."""
    return expected_clients(clients_per_round, num_clients) / float(num_clients)


def dp_denominator(cfg: CentralDPConfig, expected: float, acc: Accumulator) -> float:
    """What `dp_mean` divides by: `expected` (q*N) or, for denominator="actual", the weight
    actually summed (= number of clients kept, with unit weights). See the module docstring."""
    if cfg.denominator == "expected":
        return float(expected)
    if cfg.denominator == "actual":
        return float(acc.weight)
    raise ValueError(f"unknown denominator {cfg.denominator!r}; expected one of {DENOMINATORS}")


def dp_mean(sum_of_clipped: Tensors, denominator: float, noise: Tensors | None = None) -> Tensors:
    """(sum + noise) / denominator per tensor, float64.

    `denominator` is the expected cohort size q*N (private, the fixed-denominator estimator)
    or the actual count of updates summed (not covered by the accountant); `dp_denominator`
    picks it from the config. With denominator <= 0 (nothing expected / nothing summed) the
    result is zeros: no update.
    """
    out = {}
    for k, s in sum_of_clipped.items():
        x = s.double() + (noise[k].to(s.device, torch.float64) if noise is not None else 0.0)
        out[k] = x / denominator if denominator > 0 else torch.zeros_like(x)
    return out


def privatize(acc: Accumulator, cfg: CentralDPConfig, seed: int, rnd: int, expected: float) -> Tensors:
    """Noisy mean of every tensor of `acc.sums` (updates already clipped, unit weights)."""
    noise = gaussian_noise_for_sum({k: tuple(v.shape) for k, v in acc.sums.items()},
                                   cfg.noise_multiplier, cfg.clip, seed, rnd)
    return dp_mean(acc.sums, dp_denominator(cfg, expected, acc), noise)


# ---------------------------------------------------------------------------- accounting
def _opacus_accountant(kind: str):
    from opacus.accountants import RDPAccountant
    if kind == "rdp":
        return RDPAccountant()
    if kind == "prv":
        try:
            from opacus.accountants import PRVAccountant
        except ImportError as e:                         # older Opacus
            raise ValueError("accountant 'prv' needs opacus>=1.4 (PRVAccountant)") from e
        return PRVAccountant()
    raise ValueError(f"unknown accountant {kind!r}; expected one of {ACCOUNTANTS}")


class PrivacyAccountant:
    """Tracks epsilon of the subsampled Gaussian mechanism over rounds, via Opacus.

    Thin wrapper over `opacus.accountants.RDPAccountant` (Renyi DP, Mironov et al.) or
    `PRVAccountant` (privacy random variables, Gopi et al. 2021, tighter). One `step` is one
    round: every sampled client's clipped update is summed and noised once with
    `noise_multiplier`; `sample_rate` is q = expected cohort size / number of clients.
    """

    def __init__(self, noise_multiplier: float, sample_rate: float, delta: float = 1e-5,
                 kind: str = "rdp"):
        if not noise_multiplier > 0:
            raise ValueError(f"noise_multiplier must be > 0, got {noise_multiplier}")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if not 0.0 < delta < 1.0:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        self.noise_multiplier = float(noise_multiplier)
        self.sample_rate = float(sample_rate)
        self.delta = float(delta)
        self.kind = kind
        self._acc = _opacus_accountant(kind)

    @classmethod
    def from_config(cls, cfg: CentralDPConfig, sample_rate: float) -> "PrivacyAccountant":
        return cls(cfg.noise_multiplier, sample_rate, cfg.delta, cfg.accountant)

    @property
    def steps(self) -> int:
        return int(sum(n for _, _, n in self._acc.history))

    def step(self, n: int = 1) -> None:
        """Record `n` more rounds at (noise_multiplier, sample_rate)."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if n == 0:
            return
        # Opacus keeps history as [(sigma, q, steps)] and merges consecutive equal entries in
        # `step`; adding n steps at once builds the same history as n calls.
        self._acc.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        if n > 1:
            s, q, k = self._acc.history[-1]
            self._acc.history[-1] = (s, q, k + n - 1)

    def epsilon(self, delta: float | None = None) -> float:
        """epsilon at `delta` (default: the configured delta) after the steps so far; 0 before any."""
        if self.steps == 0:
            return 0.0
        return float(self._acc.get_epsilon(delta=self.delta if delta is None else float(delta)))

    def state_dict(self) -> dict:
        """Plain, picklable state: the settings and the library's step history."""
        return {"noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate,
                "delta": self.delta, "kind": self.kind,
                "history": [tuple(h) for h in self._acc.history]}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind", self.kind) != self.kind:
            raise ValueError(f"cannot load a {state['kind']!r} accountant state into {self.kind!r}")
        self.noise_multiplier = float(state["noise_multiplier"])
        self.sample_rate = float(state["sample_rate"])
        self.delta = float(state["delta"])
        self._acc.history = [tuple(h) for h in state["history"]]

    def __repr__(self) -> str:
        return (f"PrivacyAccountant(kind={self.kind!r}, sigma={self.noise_multiplier}, "
                f"q={self.sample_rate}, delta={self.delta}, steps={self.steps})")


# ---------------------------------------------------------------------------- both halves
class CentralDP:
    """Central DP for any algorithm whose upload is a weighted sum of client deltas (declared as
    `PRIVACY = {CENTRAL_DP}` on its class), built from `Setup.privacy` (None = off).

    Client half, `client(deltas, weights)`: every client's delta clipped jointly over its
    tensors to L2 norm C and given weight 1 (bounded sensitivity); off, both pass through.
    Server half, `mean_delta(acc, rnd)`: the sum plus N(0, (σC)²) noise, divided by the expected
    cohort size q·N (`privacy.denominator`); off, the weighted mean. `metrics(rnd)` is ε(δ) after
    rnd + 1 noisy rounds from the Opacus accountant (a pure function of the round, so nothing to
    checkpoint), as `privacy/epsilon`.
    """

    def __init__(self, setup):
        self.cfg: CentralDPConfig | None = setup.privacy
        self.seed = setup.seed
        self.expected = expected_clients(setup.clients_per_round, setup.num_clients)
        self.q = sample_rate(setup.clients_per_round, setup.num_clients)

    @property
    def enabled(self) -> bool:
        return self.cfg is not None

    def client(self, deltas: Tensors, weights: torch.Tensor) -> tuple[Tensors, torch.Tensor]:
        if not self.enabled:
            return deltas, weights
        return clip_updates(deltas, self.cfg.clip)[0], torch.ones_like(weights)

    def mean_delta(self, acc: Accumulator, rnd: int) -> Tensors | None:
        """The round's (noisy) mean delta per tensor of `acc.sums`, float64; None when nothing was summed."""
        if self.enabled:
            return privatize(acc, self.cfg, self.seed, rnd, self.expected) if acc.sums else None
        return {k: v / acc.weight for k, v in acc.sums.items()} if acc.weight > 0 else None

    def epsilon(self, rounds: int) -> float:
        acct = PrivacyAccountant.from_config(self.cfg, self.q)
        acct.step(rounds)
        return acct.epsilon()

    def metrics(self, rnd: int) -> dict[str, float]:
        return {"privacy/epsilon": self.epsilon(rnd + 1)} if self.enabled else {}


# ---------------------------------------------------------------------------- local DP
def clip_each(x: torch.Tensor, bound: float) -> torch.Tensor:
    """Scale each client's slice of x (K, ...) to L2 norm <= bound (one tensor, per client)."""
    norm = x.reshape(x.shape[0], -1).norm(dim=1)                              # (K,)
    return x * aggregate.bcast((bound / norm.clamp(min=1e-12)).clamp(max=1.0), x)


class LocalDP:
    """The client-side chain: per-tensor L2 clipping, then Laplace or Gaussian noise on every
    coordinate of every uploaded tensor, applied in the worker before anything is folded.

    An algorithm that declares LOCAL_DP builds one with the per-client shapes of what it uploads
    (`shapes[name]`, no client dimension) and passes every upload through `apply`; an upload
    it did not declare is an error, so the epsilon below is about what is really sent.

    Noise for tensor j (the j-th declared name, sorted) of client c in round r is drawn from the
    counter-based generator at (hash(seed, j), NOISE, r, c): the same whatever the worker layout.

    Epsilon (`privacy/local_epsilon`, for a client that takes part in every round so far, at
    `privacy.local.delta`; a client's noisy upload is public, so no amplification by sampling):
    - gaussian with clip C: two uploads differ by at most 2C per tensor, 2C*sqrt(T) over T
      tensors in L2; T rounds of the Gaussian mechanism with noise multiplier
      scale / (2C*sqrt(T)) are composed by Opacus' RDP accountant (sample rate 1).
    - laplace with clip C: the L1 distance of tensor t (d_t coordinates) is at most 2C*sqrt(d_t),
      so one round is (sum_t 2C*sqrt(d_t) / b)-DP and R rounds R times that (basic composition,
      delta 0). A loose but valid bound: per-coordinate clipping would tighten it.
    - no clip, or scale 0: no finite epsilon; none is reported (`epsilon_bounded` is False).
    """

    def __init__(self, setup, shapes: dict[str, tuple]):
        self.cfg: LocalDPConfig | None = setup.local_dp
        self.seed = setup.seed
        self.shapes = {k: tuple(int(d) for d in v) for k, v in shapes.items()}
        self._index = {k: j for j, k in enumerate(sorted(self.shapes))}

    @property
    def enabled(self) -> bool:
        return self.cfg is not None and self.cfg.enabled

    def apply(self, upload: Tensors, rnd: int, client_ids: torch.Tensor) -> Tensors:
        """The uploads (K, ...) per tensor after clipping and noise; off, they pass through."""
        if not self.enabled:
            return upload
        cfg = self.cfg
        ids = client_ids.cpu().numpy().astype(np.uint64)
        out = {}
        for k, x in upload.items():
            if k not in self._index or tuple(x.shape[1:]) != self.shapes[k]:
                raise ValueError(f"local DP: upload {k!r} of shape {tuple(x.shape[1:])} was not declared "
                                 f"(declared: {self.shapes.get(k, 'nothing under that name')})")
            if cfg.clip > 0:
                x = clip_each(x, cfg.clip)
            if cfg.mechanism != "none" and cfg.scale > 0:
                seed = int(rng.hash_u64(self.seed, self._index[k])[()])
                draw = rng.laplace_tensor if cfg.mechanism == "laplace" else rng.normal_tensor
                x = x + draw(tuple(x.shape[1:]), seed, rng.NOISE, rnd, ids, cfg.scale).to(x.device, x.dtype)
            out[k] = x
        return out

    @property
    def epsilon_bounded(self) -> bool:
        return self.enabled and self.cfg.mechanism != "none" and self.cfg.clip > 0 and self.cfg.scale > 0

    def epsilon(self, rounds: int) -> float:
        """Epsilon after `rounds` uploads of one client (see the class docstring); inf when unbounded."""
        if not self.epsilon_bounded:
            return float("inf")
        if rounds <= 0:
            return 0.0
        cfg, T = self.cfg, len(self.shapes)
        if cfg.mechanism == "laplace":
            l1 = sum(2.0 * cfg.clip * float(np.sqrt(np.prod(s) if s else 1)) for s in self.shapes.values())
            return rounds * l1 / cfg.scale
        acct = PrivacyAccountant(cfg.scale / (2.0 * cfg.clip * np.sqrt(T)), 1.0, cfg.delta, "rdp")
        acct.step(rounds)
        return acct.epsilon()

    def metrics(self, rnd: int) -> dict[str, float]:
        return {"privacy/local_epsilon": self.epsilon(rnd + 1)} if self.epsilon_bounded else {}
