"""Optimizers over stacked per-client parameters: one step updates a whole cohort.

Each tensor is (K, ...) -- one slice per client. `active` (K,) says which clients take this
step (a client whose rows are exhausted sits out), so unequal client sizes need no loop.
"""
from __future__ import annotations

import torch

from fleetrec.algorithms.protocol import LocalTrainConfig, Tensors


def _bcast(active: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return active.view(-1, *([1] * (like.dim() - 1)))


class CohortOptimizer:
    """Plain SGD or Adam on dicts of (K, ...) tensors; state starts fresh every round. Round `rnd`
    (from 0) starts at lr * lr_round_decay**rnd; each client's own s-th step (from 0; a client
    sitting a step out does not advance) is scaled by lr_step_decay**s."""

    def __init__(self, cfg: LocalTrainConfig, params: Tensors, rnd: int = 0):
        self.cfg = cfg
        first = next(iter(params.values()))
        self.t = torch.zeros(first.shape[0], device=first.device)
        self.lr0 = cfg.lr * cfg.lr_round_decay ** rnd
        if cfg.optimizer == "adam":
            self.m = {k: torch.zeros_like(v) for k, v in params.items()}
            self.v = {k: torch.zeros_like(v) for k, v in params.items()}

    def step(self, params: Tensors, grads: Tensors, active: torch.Tensor) -> Tensors:
        cfg, out = self.cfg, {}
        self.t = self.t + active
        lr = self.lr0 if cfg.lr_step_decay == 1.0 else \
            self.lr0 * cfg.lr_step_decay ** (self.t - 1).clamp(min=0)             # (K,) per client's own step
        for k, p in params.items():
            step_lr = lr if isinstance(lr, float) else _bcast(lr, p)
            g = grads[k]
            if cfg.weight_decay:
                g = g + cfg.weight_decay * p
            a = _bcast(active, p) > 0
            if cfg.optimizer == "sgd":
                new = p - step_lr * g
            else:
                b1, b2, eps = 0.9, 0.999, 1e-8
                m = torch.where(a, b1 * self.m[k] + (1 - b1) * g, self.m[k])
                v = torch.where(a, b2 * self.v[k] + (1 - b2) * g * g, self.v[k])
                self.m[k], self.v[k] = m, v
                t = _bcast(self.t.clamp(min=1), p)
                new = p - step_lr * (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps)
            out[k] = torch.where(a, new, p)
        return out


def adam_rows(param: torch.Tensor, m: torch.Tensor, v: torch.Tensor, rows, grad: torch.Tensor, step,
              lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
    """In-place (lazy) Adam on some rows of a table: only the rows a batch touched move, and
    only their moments decay. `step` is the 1-based step count, a scalar or one per row."""
    b1, b2 = betas
    m[rows] = b1 * m[rows] + (1 - b1) * grad
    v[rows] = b2 * v[rows] + (1 - b2) * grad * grad
    step = torch.as_tensor(step, dtype=grad.dtype)
    if step.dim():
        step = step.reshape(-1, *([1] * (grad.dim() - 1)))
    mhat = m[rows] / (1 - b1 ** step)
    vhat = v[rows] / (1 - b2 ** step)
    param[rows] = param[rows] - lr * mhat / (vhat.sqrt() + eps)
