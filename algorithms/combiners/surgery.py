"""Gradient-surgery combiners: the update is built from the geometry of the task gradients.

PCGrad (Yu et al. 2020), MGDA-UB (Sener & Koltun 2018), CAGrad (Liu et al. 2021) and
Nash-MTL (Navon et al. 2022). All need `grads` (T, *S); the trailing dims are one vector.
Each returns the effective task weights w with grad = w @ grads, so the weighted loss
sum_t w_t L_t (w detached) reproduces the same update by backprop.
The small per-step problems are solved on the (T, T) Gram matrix with NumPy / SciPy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from fleetrec.algorithms import rng
from fleetrec.algorithms.combiners.base import (CombineInput, Combined, Combiner, CombinerConfig,
                                                apply_weights, dtype_of, flat, gram)


def _need_grads(inp: CombineInput, name: str) -> torch.Tensor:
    if inp.grads is None:
        raise ValueError(f"{name} needs per-task gradients")
    return inp.grads


def _weights_result(w: np.ndarray, inp: CombineInput) -> Combined:
    return apply_weights(torch.as_tensor(w, dtype=dtype_of(inp)), inp)


# ----------------------------------------------------------------------------------- PCGrad
@dataclass(frozen=True)
class PCGradConfig(CombinerConfig):
    name: str = "pcgrad"


def pcgrad_coefficients(g: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """(T, T) matrix C with projected gradients = C @ g, for (T, P) gradients g.

    For each task i, the other tasks are visited in a random order; whenever the running
    projection of g_i conflicts with g_j (negative dot product), its component along g_j is
    removed. Tracking coefficients instead of vectors keeps the result a linear combination.
    """
    T = g.shape[0]
    G = (g.double() @ g.double().T)                                             # (T, T) Gram
    C = torch.eye(T, dtype=torch.float64)
    for i in range(T):
        for j in torch.randperm(T, generator=gen).tolist():
            dot = C[i] @ G[:, j]                                                # <proj_i, g_j>
            if j != i and dot < 0 and G[j, j] > 0:
                C[i, j] -= dot / G[j, j]
    return C


class PCGrad(Combiner):
    """PCGrad: project away pairwise conflicts, then average the projected gradients."""
    Config = PCGradConfig
    needs_grads = True

    def combine(self, inp: CombineInput) -> Combined:
        g = flat(_need_grads(inp, "pcgrad"))
        C = pcgrad_coefficients(g, rng.torch_generator(self.seed, rng.PCGRAD, inp.step))
        return _weights_result(C.mean(dim=0).numpy(), inp)


# ------------------------------------------------------------------------------------- MGDA
@dataclass(frozen=True)
class MGDAConfig(CombinerConfig):
    name: str = "mgda"
    normalize: str = "none"          # none | l2 (unit gradients) | loss (g_t / L_t) before the solve
    max_iter: int = 250              # Frank-Wolfe iterations for T > 2
    tol: float = 1e-6                # stop when the weights move less than this

    CHECKS: ClassVar[dict] = {"normalize": ("none", "l2", "loss"), "max_iter": ">=1", "tol": ">0"}


def _min_norm_pair(a: float, b: float, c: float) -> float:
    """gamma minimising ||gamma v1 + (1-gamma) v2||^2 with a = v1.v1, b = v1.v2, c = v2.v2."""
    denom = a - 2.0 * b + c
    return 0.5 if denom <= 0 else float(np.clip((c - b) / denom, 0.0, 1.0))


def min_norm_weights(G: np.ndarray, max_iter: int = 250, tol: float = 1e-6) -> np.ndarray:
    """Simplex weights of the min-norm point of the convex hull of the gradients with Gram G.

    Two tasks: closed form. More: Frank-Wolfe with exact line search.
    """
    T = G.shape[0]
    if T == 1:
        return np.ones(1)
    if T == 2:
        gamma = _min_norm_pair(G[0, 0], G[0, 1], G[1, 1])
        return np.array([gamma, 1.0 - gamma])
    w = np.full(T, 1.0 / T)
    for _ in range(max_iter):
        Gw = G @ w                                                              # (T,)
        t = int(np.argmin(Gw))                                                  # best vertex
        gamma = _min_norm_pair(float(w @ Gw), float(Gw[t]), float(G[t, t]))
        new = gamma * w
        new[t] += 1.0 - gamma
        if np.abs(new - w).sum() < tol:
            return new
        w = new
    return w


class MGDA(Combiner):
    """MGDA-UB: the min-norm convex combination. Pass gradients w.r.t. the shared
    representation for the upper-bound variant, or w.r.t. shared parameters for plain MGDA."""
    Config = MGDAConfig
    needs_grads = True

    def combine(self, inp: CombineInput) -> Combined:
        g = flat(_need_grads(inp, "mgda")).double()
        if self.config.normalize == "l2":
            g = g / g.norm(dim=1, keepdim=True).clamp_min(1e-12)
        elif self.config.normalize == "loss":
            if inp.losses is None:
                raise ValueError("mgda normalize='loss' needs losses")
            g = g / inp.losses.detach().double().cpu().clamp_min(1e-12)[:, None]
        w = min_norm_weights(gram(g), self.config.max_iter, self.config.tol)
        return _weights_result(w, inp)


# ----------------------------------------------------------------------------------- CAGrad
@dataclass(frozen=True)
class CAGradConfig(CombinerConfig):
    name: str = "cagrad"
    c: float = 0.4                   # radius of the ball around the mean gradient (0 = mean gradient)
    rescale: int = 1                 # 0: none, 1: divide by 1 + c^2, 2: divide by 1 + c (as the paper's code)

    CHECKS: ClassVar[dict] = {"c": ">=0", "rescale": (0, 1, 2)}


def cagrad_weights(G: np.ndarray, c: float, rescale: int = 1) -> np.ndarray:
    """Effective (T,) weights of the CAGrad direction from the Gram matrix G.

    Dual: min over the simplex of w.(G b) + c·||g0||·||g_w||, b = 1/T, g0 = mean gradient,
    g_w = sum w_t g_t; direction d = g0 + (c·||g0|| / ||g_w||)·g_w.
    """
    T = G.shape[0]
    b = np.full(T, 1.0 / T)
    radius = c * np.sqrt(max(b @ G @ b, 0.0))
    if radius == 0.0:
        return b
    Gb = G @ b

    def obj(w):
        return float(w @ Gb + radius * np.sqrt(w @ G @ w + 1e-8))

    def jac(w):
        return Gb + radius * (G @ w) / np.sqrt(w @ G @ w + 1e-8)

    from scipy.optimize import minimize   # imported on use (SciPy costs ~0.4 s per process)

    res = minimize(obj, b, jac=jac, method="SLSQP", bounds=[(0.0, 1.0)] * T,
                   constraints=({"type": "eq", "fun": lambda w: w.sum() - 1.0,
                                 "jac": lambda w: np.ones_like(w)},))
    w = np.clip(res.x, 0.0, None)
    lam = radius / (np.sqrt(max(w @ G @ w, 0.0)) + 1e-8)
    weights = b + lam * w
    return weights / {0: 1.0, 1: 1.0 + c ** 2, 2: 1.0 + c}[rescale]


class CAGrad(Combiner):
    """Conflict-averse gradient descent: the direction near the mean gradient that maximises
    the worst task's improvement."""
    Config = CAGradConfig
    needs_grads = True

    def combine(self, inp: CombineInput) -> Combined:
        G = gram(_need_grads(inp, "cagrad"))
        return _weights_result(cagrad_weights(G, self.config.c, self.config.rescale), inp)


# --------------------------------------------------------------------------------- Nash-MTL
@dataclass(frozen=True)
class NashMTLConfig(CombinerConfig):
    name: str = "nashmtl"
    max_iter: int = 200              # L-BFGS-B iterations of the bargaining solve

    CHECKS: ClassVar[dict] = {"max_iter": ">=1"}


def nash_weights(G: np.ndarray, max_iter: int = 200) -> np.ndarray:
    """The Nash bargaining weights: alpha > 0 with (G alpha)_t = 1 / alpha_t.

    Solver (simpler than the paper's sequence of convex-concave programs, same solution):
    that condition is the stationarity condition of the strictly convex
    f(alpha) = ½ alphaᵀ G alpha - sum_t log alpha_t, minimised with L-BFGS-B. G is scaled
    to unit Frobenius norm for conditioning and alpha scaled back (alpha ∝ 1/sqrt(scale)).
    Tasks with a zero gradient get weight 0 and are left out of the solve.
    """
    T = G.shape[0]
    alive = np.diag(G) > 0
    out = np.zeros(T)
    if not alive.any():
        return out
    Ga = G[np.ix_(alive, alive)]
    scale = np.linalg.norm(Ga)
    Gn = Ga / scale

    def f(a):
        Ga_ = Gn @ a
        return 0.5 * a @ Ga_ - np.log(a).sum(), Ga_ - 1.0 / a

    x0 = np.ones(int(alive.sum()))
    from scipy.optimize import minimize   # imported on use (SciPy costs ~0.4 s per process)
    res = minimize(f, x0, jac=True, method="L-BFGS-B", bounds=[(1e-8, None)] * len(x0),
                   options={"maxiter": max_iter, "gtol": 1e-10, "ftol": 1e-14})
    out[alive] = res.x / np.sqrt(scale)
    return out


class NashMTL(Combiner):
    """Nash-MTL: the bargaining solution. Weights have no fixed sum (they scale as 1/||g||);
    clip the update norm in the optimizer if needed, as the paper does."""
    Config = NashMTLConfig
    needs_grads = True

    def combine(self, inp: CombineInput) -> Combined:
        G = gram(_need_grads(inp, "nashmtl"))
        return _weights_result(nash_weights(G, self.config.max_iter), inp)
