"""The combiner protocol: explicit inputs in, one typed result out, and the explicit registry.

A combiner turns T per-task signals into one update. It is called inside an algorithm's
local step (one client, or a cohort chunk) and in centralized training alike, so it takes
everything it needs as arguments -- no model, no optimizer, no hidden global state beyond
its own small history (loss history for DWA, learned log-variances for uncertainty weighting,
GradNorm's task weights), which `state_dict` exposes for checkpoints.

Scale convention: every combiner returns a *mean-scale* update -- equal weighting is the mean
of the task gradients, not their sum -- so switching combiners does not silently change the
effective learning rate. Two exceptions, each following its paper: uncertainty weighting
(weights ½·exp(-s_t), learned) and Nash-MTL (weights solve a bargaining problem and have no
fixed sum).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from fleetrec.datasets.registry import Registry, TaggedUnion


_C = "fleetrec.algorithms.combiners."
# The one registry of combiners (`register` adds one). Built-ins are imported on first use.
COMBINERS: Registry[type] = Registry("combiner", {
    **{name: _C + f"weighting:{cls}" for name, cls in
       [("equal", "Equal"), ("uncertainty", "Uncertainty"), ("dwa", "DWA"), ("rlw", "RLW"), ("gradnorm", "GradNorm")]},
    **{name: _C + f"surgery:{cls}" for name, cls in
       [("pcgrad", "PCGrad"), ("mgda", "MGDA"), ("cagrad", "CAGrad"), ("nashmtl", "NashMTL")]},
    "pmtrec": _C + "pmtrec:PMTRec",
    "metabalance": _C + "metabalance:MetaBalance",
}, config_of=lambda combiner: combiner.Config, base=lambda: Combiner)


def register(name: str, combiner: type) -> type:
    return COMBINERS.register(name, combiner)


def make_combiner(config: "CombinerConfig", num_tasks: int, seed: int = 0) -> "Combiner":
    return COMBINERS[config.name](num_tasks, config, seed)


@dataclass(frozen=True)
class CombinerConfig(TaggedUnion):
    """Base of a YAML `combiner:` block; `name` picks the combiner from `COMBINERS`."""
    name: str = "equal"

    REGISTRY: ClassVar[Registry] = COMBINERS


@dataclass
class CombineInput:
    """What one combination step sees. T = tasks; task 0 is the main task where it matters.

    `grads` is (T, *S): (T, P) for flattened shared parameters, or (T, R, d) for the embedding
    rows a batch touches. Combiners other than `pmtrec` treat the trailing dims as one vector.
    """
    losses: torch.Tensor | None = None       # (T,) per-task losses (may carry autograd history)
    grads: torch.Tensor | None = None        # (T, *S) per-task gradients
    step: int = 0                            # global step counter (seeds the random combiners)
    epoch: int = 0                           # epoch counter (DWA history, PMTRec focusing)
    touched: torch.Tensor | None = None      # (T, R) bool, optional: which task touches which row (pmtrec)


@dataclass
class Combined:
    """The result. `grad` is set when grads were given; `loss` when losses were given."""
    weights: torch.Tensor                    # (T,) or, for per-row combiners, (R, T); detached
    grad: torch.Tensor | None = None         # (*S) combined gradient
    loss: torch.Tensor | None = None         # scalar weighted loss; differentiable where the inputs were


class Combiner:
    """Small base: holds the frozen config. Subclasses set `Config`, `needs_grads`, and `combine`."""
    Config: ClassVar[type] = CombinerConfig
    needs_grads: ClassVar[bool] = False      # True: `combine` requires `grads`; False: losses suffice
    # True: state carries across calls (`state_tensors` / `parameters`: loss history, learned weights),
    # so the combiner needs one process to see every step (centralized PMTRec only)
    HAS_HISTORY: ClassVar[bool] = False

    def __init__(self, num_tasks: int, config=None, seed: int = 0):
        self.num_tasks = num_tasks
        self.config = config if config is not None else self.Config()
        self.seed = seed                     # run seed; random combiners derive per-step generators from it

    def combine(self, inp: CombineInput) -> Combined:
        raise TypeError(f"{type(self).__name__} must define combine()")   # abstract

    def parameters(self) -> list[torch.Tensor]:
        """Learned tensors the caller's optimizer must step (uncertainty weighting only)."""
        return []

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """What changes across calls, as fixed-shape tensors (the algorithm keeps them in the state
        the engine checkpoints); empty for combiners without history."""
        return {}

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        """Set the history from `state_tensors()` output (the inverse, exactly)."""


def apply_weights(weights: torch.Tensor, inp: CombineInput) -> Combined:
    """Loss-weighting combiners: weighted loss and/or weighted gradient from (T,) weights."""
    w = weights.detach()
    grad = None if inp.grads is None else torch.tensordot(w.to(inp.grads.dtype), inp.grads, dims=1)
    loss = None if inp.losses is None else (weights.to(inp.losses.dtype) * inp.losses).sum()
    return Combined(weights=w, grad=grad, loss=loss)


def flat(grads: torch.Tensor) -> torch.Tensor:
    return grads.reshape(grads.shape[0], -1)                                   # (T, P)


def dtype_of(inp: CombineInput) -> torch.dtype:
    """Weights are made in the inputs' floating dtype, so float64 callers keep float64 precision."""
    src = inp.grads if inp.grads is not None else inp.losses
    return src.dtype if src is not None and src.is_floating_point() else torch.float32


def gram(g: torch.Tensor) -> np.ndarray:
    """(T, T) float64 Gram matrix of flattened task gradients, for the small SciPy solvers."""
    g64 = flat(g).double()
    return (g64 @ g64.T).cpu().numpy()
