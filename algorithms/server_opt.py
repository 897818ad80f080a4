"""Server update rules applied to the round's aggregated delta (Reddi et al., "Adaptive Federated
Optimization", ICLR 2021): the `algorithm.server_optimizer` block of FedAvg-style algorithms.

With Δ the (noisy) mean client delta of a shared tensor and η the algorithm's `server_lr`:

    sgd       θ ← θ + η Δ                                          (FedAvg; η = 1 is plain averaging)
    momentum  m ← β₁ m + Δ ;                 θ ← θ + η m            (FedAvgM)
    adam      m ← β₁ m + (1−β₁) Δ ; v ← β₂ v + (1−β₂) Δ² ;          θ ← θ + η m / (√v + τ)   (FedAdam)
    yogi      m as adam ; v ← v − (1−β₂) Δ² sign(v − Δ²) ;          θ ← θ + η m / (√v + τ)   (FedYogi)

as in the paper: no bias correction, v starts at τ². The moments are server state under
`server_opt/m/<name>` and `server_opt/v/<name>`, so they are checkpointed with everything else.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from fleetrec.algorithms.protocol import Tensors

RULES = ("sgd", "momentum", "adam", "yogi")
M, V = "server_opt/m/", "server_opt/v/"


@dataclass(frozen=True)
class ServerOptimizerConfig:
    name: str = "sgd"                # sgd (FedAvg) | momentum (FedAvgM) | adam (FedAdam) | yogi (FedYogi)
    beta1: float = 0.9               # momentum / first-moment decay
    beta2: float = 0.99              # second-moment decay (adam, yogi)
    tau: float = 1e-3                # adaptivity: v starts at tau², the step divides by sqrt(v) + tau

    CHECKS: ClassVar[dict] = {"name": RULES, "beta1": "0..1", "beta2": "0..1", "tau": ">0"}


def init_state(cfg: ServerOptimizerConfig, params: Tensors) -> Tensors:
    """The optimizer's moments for the shared tensors `params` (none for plain sgd)."""
    out: Tensors = {}
    if cfg.name in ("momentum", "adam", "yogi"):
        out.update({M + k: torch.zeros_like(v, dtype=torch.float32) for k, v in params.items()})
    if cfg.name in ("adam", "yogi"):
        out.update({V + k: torch.full_like(v, cfg.tau ** 2, dtype=torch.float32) for k, v in params.items()})
    return out


def apply(cfg: ServerOptimizerConfig, lr: float, state: Tensors, deltas: Tensors) -> Tensors:
    """The new server state: every tensor named in `deltas` stepped by the rule, its moments updated;
    the other entries of `state` unchanged."""
    new = dict(state)
    for k, d in deltas.items():
        d = d.to(torch.float32)
        if cfg.name == "sgd":
            step = d
        elif cfg.name == "momentum":
            new[M + k] = cfg.beta1 * state[M + k] + d
            step = new[M + k]
        else:
            new[M + k] = cfg.beta1 * state[M + k] + (1 - cfg.beta1) * d
            d2 = d * d
            if cfg.name == "adam":
                new[V + k] = cfg.beta2 * state[V + k] + (1 - cfg.beta2) * d2
            else:
                new[V + k] = state[V + k] - (1 - cfg.beta2) * d2 * torch.sign(state[V + k] - d2)
            step = new[M + k] / (new[V + k].clamp(min=0).sqrt() + cfg.tau)
        new[k] = state[k] + (lr * step).to(state[k].dtype)
    return new
