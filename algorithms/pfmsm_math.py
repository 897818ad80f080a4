"""Pure math of PF-MSMTrec (methods.md §1.4): federated BN, conflict coordination, personalized
aggregation with learned client weights, tower cross-attention, the parameter template and the
proximal regularizer.

Every aggregation works on one tensor group flattened to a matrix of client deltas (N, D), where
N is the number of clients (scenarios) holding the group and D the group's number of entries.
No Ray, no per-client objects: callers stack the clients' deltas and call these functions.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch

# The parameter template (roles by module name) and the BatchNorm-name rule belong to the models;
# they are re-exported here because every aggregation below is keyed by them.
from fleetrec.algorithms.models.template import (GLOBAL, LOCAL, PERSONAL, SCENARIO, TASK_PREFIX,  # noqa: F401
                                                 TOWER_PREFIX, bn_tensor, task_role, template_roles, tower_role)

RESCALES = ("1+k2", "1+k", "none")
# local_bn: BN tensors stay with the client (FedBN); server_norm: uploaded, deltas normalized; aggregate: plain
FEDBN_MODES = ("local_bn", "server_norm", "aggregate")

# ---------------------------------------------------------------------------------- module 1
def server_norm(deltas: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """`fedbn_mode="server_norm"`: put every client's update on a common scale.

    Δ̂_c = (Δ_c − m_c) / (s_c + eps) · s̄ + m̄, with m_c, s_c the mean and (population) std of the
    entries of Δ_c, s̄ = mean_c s_c and m̄ = mean_c m_c.
    """
    m = deltas.mean(dim=1, keepdim=True)                        # (N, 1)
    s = deltas.std(dim=1, correction=0, keepdim=True)           # (N, 1)
    return (deltas - m) / (s + eps) * s.mean() + m.mean()       # (N, D)


# ---------------------------------------------------------------------------------- module 2
def _simplex_dual(gram: np.ndarray, c: float) -> np.ndarray:
    """w* = argmin_{w in simplex} wᵀ A b + c · sqrt(wᵀ A w), with A = GᵀG and b = 1/N (SLSQP)."""
    n = gram.shape[0]
    w0 = np.full(n, 1.0 / n)
    ab = gram @ w0                                              # (N,) = GᵀΔ̄

    def fun(w):
        return float(w @ ab + c * math.sqrt(max(w @ gram @ w, 0.0) + 1e-12))

    def jac(w):
        return ab + c * (gram @ w) / math.sqrt(max(w @ gram @ w, 0.0) + 1e-12)

    from scipy.optimize import minimize   # imported on use (SciPy costs ~0.4 s per process)

    res = minimize(fun, w0, jac=jac, method="SLSQP", bounds=[(0.0, 1.0)] * n,
                   constraints=({"type": "eq", "fun": lambda w: 1.0 - w.sum(),
                                 "jac": lambda w: -np.ones_like(w)},),
                   options={"ftol": 1e-12, "maxiter": 200})
    return np.clip(res.x, 0.0, 1.0)


def conflict_averse_delta(deltas: torch.Tensor, kappa: float = 0.4, rescale: str = "1+k2") -> torch.Tensor:
    """Conflict-averse aggregated delta (CAGrad on client deltas, §1.4 module 2).

    Maximizes min_c <Δ_c, d> subject to ||d − Δ̄|| ≤ κ||Δ̄||. With G = [Δ_1..Δ_N] (D × N):
        w* = argmin_{w in simplex} wᵀGᵀΔ̄ + κ||Δ̄||·||Gw||,   g_w = G w*,   λ = κ||Δ̄|| / ||g_w||,
        d  = (Δ̄ + λ g_w) / s,  s = 1+κ² ("1+k2"), 1+κ ("1+k") or 1 ("none").
    κ = 0 returns Δ̄. Works on the N × N Gram matrix, so the QP costs nothing in D.
    """
    if rescale not in RESCALES:
        raise ValueError(f"rescale must be one of {RESCALES}, got {rescale!r}")
    mean = deltas.mean(dim=0)                                   # (D,)
    if kappa == 0 or deltas.shape[0] == 1:
        return mean
    g64 = deltas.double()                                       # (N, D)
    gram = (g64 @ g64.T).cpu().numpy()                          # (N, N)
    mean_norm = math.sqrt(max(gram.mean(), 0.0))                # ||Δ̄||
    c = kappa * mean_norm
    w = torch.from_numpy(_simplex_dual(gram, c)).to(g64)        # (N,)
    g_w = w @ g64                                               # (D,)
    gw_norm = float(g_w.norm())
    lam = c / gw_norm if gw_norm > 1e-12 and mean_norm > 1e-12 else 0.0
    scale = {"1+k2": 1 + kappa ** 2, "1+k": 1 + kappa, "none": 1.0}[rescale]
    return ((g64.mean(dim=0) + lam * g_w) / scale).to(deltas.dtype)   # (D,)


# ---------------------------------------------------------------------------------- module 3
def personalized_update(start: torch.Tensor, deltas: torch.Tensor, d: torch.Tensor,
                        alpha: torch.Tensor) -> torch.Tensor:
    """θ_c = θ_c^start + Δ_c + clip(α_c, 0, 1) · d   (§1.4 module 3). Shapes (N, D), (N, D), (D,), (N,)."""
    a = alpha.clamp(0.0, 1.0).to(deltas.dtype).unsqueeze(1)     # (N, 1)
    return start + deltas + a * d.unsqueeze(0)                  # (N, D)


HYPERGRADS = ("cosine", "raw")


def hypergrad(deltas: torch.Tensor, direction: torch.Tensor, form: str = "cosine",
              eps: float = 1e-12) -> torch.Tensor:
    """∂L/∂α_c ≈ <θ_c^new(r−1) − θ_c^end(r), d^(r−1)> = −<Δ_c^(r), d^(r−1)> (§1.4 module 3), and the
    same for β with v_c = (a V)_c. The hypergradient of a personalization weight from this round's deltas (N, D) and last round's
    direction it scaled ((D,) shared, or (N, D) one per client). "raw": −<Δ_c, v_c> (FedHCA2);
    "cosine": −<Δ_c, v_c> / (||Δ_c|| ||v_c||), scale-free, so one learning rate fits any model size.
    A zero direction (first round) gives 0. Returns (N,)."""
    if form not in HYPERGRADS:
        raise ValueError(f"hypergrad must be one of {HYPERGRADS}, got {form!r}")
    v = direction.to(deltas.dtype).expand_as(deltas)
    dot = (deltas * v).sum(1)
    if form == "raw":
        return -dot
    return -dot / (deltas.norm(dim=1) * v.norm(dim=1)).clamp_min(eps)


def momentum_step(value: torch.Tensor, buf: torch.Tensor, grad: torch.Tensor, lr: float, momentum: float,
                  weight_decay: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of SGD with momentum and weight decay on personalization weights, as a pure function
    of (value, momentum buffer, gradient): returns (new value clipped to [0, 1], new buffer). The same
    arithmetic as torch.optim.SGD (dampening 0, no Nesterov; a zero buffer is its first step), with
    the buffer kept in the server state so a resumed run continues it. Defaults follow FedHCA2:
    lr 0.01, momentum 0.9, weight decay 1e-4, init 0.1."""
    g = grad.to(value.dtype) + weight_decay * value
    buf = momentum * buf + g
    return (value - lr * buf).clamp(0.0, 1.0), buf


# ---------------------------------------------------------------------------------- module 4
def tower_attention(deltas: torch.Tensor) -> torch.Tensor:
    """(a V)_c of §1.4 module 4: a = softmax(Δ_c Δᵀ / sqrt(D_l)), V = Δ. Shapes (N, D_l) -> (N, D_l)."""
    scores = deltas @ deltas.T / math.sqrt(deltas.shape[1])     # (N, N)
    return torch.softmax(scores, dim=1) @ deltas                # rows of a sum to 1


def tower_cross_attention(deltas: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Personalized tower aggregation (§1.4 module 4) for one tower tensor of one task.

    For client c: q = Δ_c (1 × D_l), K = V = [Δ_1..Δ_N] (N × D_l) over the clients holding the task,
        a = softmax(q Kᵀ / sqrt(D_l)),   Δ'_c = Δ_c + clip(β_c, 0, 1) · (a V).
    Then θ_c^new = θ_c^start + Δ'_c. Shapes (N, D_l), (N,) -> (N, D_l).
    """
    b = beta.clamp(0.0, 1.0).to(deltas.dtype).unsqueeze(1)      # (N, 1)
    return deltas + b * tower_attention(deltas)                 # (N, D_l)


def tower_fallback(start: torch.Tensor, deltas: torch.Tensor, beta: torch.Tensor,
                   kappa: float = 0.4, rescale: str = "1+k2") -> torch.Tensor:
    """The simpler tower aggregation §1.4 allows: modules 2 and 3 applied to the tower tensor,
    θ_c^new = θ_c^start + Δ_c + clip(β_c, 0, 1) · ConflictAverse(Δ). Returns (N, D_l) new parameters."""
    return personalized_update(start, deltas, conflict_averse_delta(deltas, kappa, rescale), beta)


# ---------------------------------------------------------------------------------- template


def is_aggregated(role: str) -> bool:
    """Whether tensors of this template role are uploaded and aggregated."""
    return role not in (LOCAL, PERSONAL)


def upload_names(roles: Mapping[str, str], fedbn_mode: str = "local_bn") -> list[str]:
    """Names a client uploads: aggregated roles, minus every BN tensor under `local_bn` (FedBN)."""
    if fedbn_mode not in FEDBN_MODES:
        raise ValueError(f"fedbn_mode must be one of {FEDBN_MODES}, got {fedbn_mode!r}")
    return [n for n, r in roles.items()
            if is_aggregated(r) and not (fedbn_mode == "local_bn" and bn_tensor(n))]


def aggregation_groups(roles: Mapping[str, str], names: Iterable[str]) -> dict[str, list[str]]:
    """Group uploaded names by role: each group is aggregated over its own set of clients."""
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(roles[n], []).append(n)
    return groups


# ---------------------------------------------------------------------------------- helpers
def flatten_group(stacked: Mapping[str, torch.Tensor], names: Sequence[str]) -> torch.Tensor:
    """Concatenate per-client tensors name -> (N, ...) into one matrix (N, D)."""
    return torch.cat([stacked[n].reshape(stacked[n].shape[0], -1) for n in names], dim=1)   # (N, D)


def unflatten_group(flat: torch.Tensor, like: Mapping[str, torch.Tensor],
                    names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Inverse of `flatten_group`: split (N, D) back into name -> (N, ...) shaped like `like`."""
    sizes = [like[n][0].numel() for n in names]
    parts = torch.split(flat, sizes, dim=1)                     # each (N, D_n)
    return {n: p.reshape(like[n].shape) for n, p in zip(names, parts)}


def proximal_term(params: Mapping[str, torch.Tensor], ref: Mapping[str, torch.Tensor],
                  mu: float) -> torch.Tensor:
    """Personalization regularizer (μ/2) · Σ_P ||θ^P − θ_ref^P||², summed over the names in `ref`."""
    total = sum(((params[n] - r.detach()) ** 2).sum() for n, r in ref.items())
    return 0.5 * mu * torch.as_tensor(total)
