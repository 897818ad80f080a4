"""Vectorized local training: a whole cohort of clients takes each minibatch step at once.

`torch.func.functional_call` runs the model with one client's parameters, `vmap` maps it
over the K clients of a cohort, and autograd differentiates the sum of the K losses (each
client's parameters only reach its own loss, so that yields every client's own gradient). Clients with fewer rows
are padded; padded rows have mask 0, and a client whose rows are exhausted sits out the
step (`active` = 0), so the result equals training each client alone.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.func import functional_call, vmap

from fleetrec.algorithms.optim import CohortOptimizer
from fleetrec.algorithms.protocol import CohortBatch, LocalTrainConfig, Tensors


def _client_loss(model, params: Tensors, frozen: Tensors, cat: Tensors, num, attrs: Tensors, y, m):
    # cat: name -> (B,), num: (B, M), y: (B, T), m: (B,) ; returns mean BCE over real rows and tasks
    if model.HAS_PENALTY:                        # the model's own regularizer per row (FedRAP's)
        logits, pen = functional_call(model, {**frozen, **params}, (cat, num, attrs), {"penalty": True})
        per_row = F.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(-1) + pen    # (B,)
    else:
        logits = functional_call(model, {**frozen, **params}, (cat, num, attrs))                     # (B, T)
        per_row = F.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(-1)          # (B,)
    return (per_row * m).sum() / m.sum().clamp(min=1.0)


def _step_rows(batch: CohortBatch, rows: torch.Tensor) -> tuple[Tensors, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gather the rows `rows` (K, b) of every client: features, labels and mask for one step."""
    cat = {k: v.gather(1, rows) for k, v in batch.categorical.items()}               # (K, b)
    k_idx = torch.arange(rows.shape[0], device=rows.device).unsqueeze(1)
    num = batch.numeric[k_idx, rows]                                                 # (K, b, M)
    y = batch.labels[k_idx, rows]                                                    # (K, b, T)
    m = batch.mask.gather(1, rows)                                                   # (K, b)
    return cat, num, y, m


def train_cohort_sgd(model, params: Tensors, frozen: Tensors, batch: CohortBatch,
                     cfg: LocalTrainConfig, order: torch.Tensor, rnd: int,
                     extra_grad: Callable[[Tensors], Tensors] | None = None) -> tuple[Tensors, torch.Tensor]:
    """Run `cfg.local_epochs` of minibatch training for every client of the cohort.

    params: name -> (K, ...) per-client trainable tensors; frozen: name -> tensor (shared by all).
    order: (E, K, L) row order per epoch, real rows first. `extra_grad(params)` (optional) returns
    gradients of a regularizer to add at every step, for some of the tensors (e.g. FedProx's
    mu·(θ − θ_global)). `rnd`: the round (from 0), for cfg's learning-rate schedule.
    Returns (new params, (K,) mean loss).
    """
    K, L = batch.mask.shape
    bs = cfg.batch_size
    steps = math.ceil(L / bs)
    # vmap the forward only and let ordinary autograd run the backward of the summed losses:
    # client k's loss depends on slice k alone, so d(sum)/d(params[k]) is client k's gradient.
    # Measured ~2x faster than vmap(grad(...)) on the reference workload (no functorch grad level).
    loss_fn = vmap(lambda p, c, n, a, y, m: _client_loss(model, p, frozen, c, n, a, y, m))

    def grad_fn(p, c, n, a, y, m):
        leaves = {k: v.detach().requires_grad_(True) for k, v in p.items()}
        losses = loss_fn(leaves, c, n, a, y, m)                                      # (K,)
        grads = torch.autograd.grad(losses.sum(), list(leaves.values()))
        return dict(zip(leaves, grads)), losses.detach()

    opt = CohortOptimizer(cfg, params, rnd)
    loss_sum = torch.zeros(K, device=batch.mask.device)
    n_steps = torch.zeros(K, device=batch.mask.device)
    for epoch in range(cfg.local_epochs):
        for s in range(steps):
            rows = order[epoch % order.shape[0], :, s * bs:(s + 1) * bs]              # (K, b)
            cat, num, y, m = _step_rows(batch, rows)
            active = (m.sum(1) > 0).float()                                          # (K,)
            grads, loss = grad_fn(params, cat, num, batch.client_attrs, y, m)
            if extra_grad is not None:
                grads.update({k: grads[k] + g for k, g in extra_grad(params).items()})
            params = opt.step(params, grads, active)
            loss_sum += loss.detach() * active
            n_steps += active
    return params, loss_sum / n_steps.clamp(min=1.0)


def predict_cohort(model, params: Tensors, frozen: Tensors, batch: CohortBatch,
                   common: Tensors | None = None) -> torch.Tensor:
    """(K, L, T) probabilities for every row of every client (padded rows included).
    params: name -> (K, ...) per-client tensors; frozen and `common` (e.g. the server's shared
    tensors at evaluation): name -> one tensor for every client. Pass a tensor every client shares
    in `common`, not expanded to K in `params`: a batched embedding table makes vmap copy it K
    times per lookup (measured: half of evaluation time at 1M clients)."""
    fixed = {**frozen, **(common or {})}
    fn = vmap(lambda p, c, n, a: functional_call(model, {**fixed, **p}, (c, n, a)), in_dims=(0, 0, 0, 0))
    with torch.no_grad():
        return torch.sigmoid(fn(params, batch.categorical, batch.numeric, batch.client_attrs))
