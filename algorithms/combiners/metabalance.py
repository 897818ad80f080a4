"""MetaBalance (He et al., WWW 2022): auxiliary gradients rescaled towards the target task's magnitude.

For the shared parameters, with g_0 the target (main) task's gradient and g_t an auxiliary one:

    m_t  <- beta·m_t + (1 - beta)·||g_t||              moving average of every task's gradient norm
    g_t  <- r·(m_0 / m_t)·g_t + (1 - r)·g_t            for the auxiliary tasks the strategy selects
    g    =  (g_0 + sum_t g_t) / T                      (mean scale, as every combiner here)

`relax` r in [0, 1] trades the magnitude of the target (r = 1) against the task's own (r = 0).
`strategy` selects which auxiliary tasks are rescaled: `both` (every one), `reduce` (only those
whose average norm is above the target's: shrink the dominating ones), `enlarge` (only those below).
The paper rescales per shared layer; here it is per call, i.e. per shared tensor the caller passes
(the touched embedding rows of P and Q together for the MF methods). The ratio m_0 / m_t does not
depend on the moving averages' start (zero, as in the paper), so no bias correction is needed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from fleetrec.algorithms.combiners.base import CombineInput, Combined, Combiner, CombinerConfig, dtype_of, flat


@dataclass(frozen=True)
class MetaBalanceConfig(CombinerConfig):
    name: str = "metabalance"
    relax: float = 0.7               # r: 1 = auxiliary magnitudes set to the target's, 0 = unchanged
    beta: float = 0.9                # moving-average factor of the gradient norms
    strategy: str = "both"           # both | reduce (only larger than the target) | enlarge (only smaller)

    CHECKS: ClassVar[dict] = {"relax": "0..1", "beta": "0..0.9999", "strategy": ("both", "reduce", "enlarge")}


def metabalance_weights(avg_norms: torch.Tensor, relax: float, strategy: str, eps: float = 1e-12) -> torch.Tensor:
    """(T,) multipliers of the task gradients (before the 1/T): 1 for the target (task 0), and for
    each selected auxiliary task r·m_0/m_t + 1 - r."""
    ratio = avg_norms[0] / avg_norms.clamp_min(eps)                            # (T,)
    scaled = relax * ratio + (1 - relax)
    if strategy == "reduce":
        pick = avg_norms > avg_norms[0]
    elif strategy == "enlarge":
        pick = avg_norms < avg_norms[0]
    else:
        pick = torch.ones_like(avg_norms, dtype=torch.bool)
    pick[0] = False
    out = torch.where(pick & (avg_norms > 0), scaled, torch.ones_like(scaled))
    return out


class MetaBalance(Combiner):
    """MetaBalance on (T, *S) gradients; task 0 is the target task. Keeps the (T,) moving averages."""
    HAS_HISTORY = True
    Config = MetaBalanceConfig
    needs_grads = True

    def __init__(self, num_tasks: int, config=None, seed: int = 0):
        super().__init__(num_tasks, config, seed)
        self.avg = torch.zeros(num_tasks, dtype=torch.float64)

    def combine(self, inp: CombineInput) -> Combined:
        if inp.grads is None:
            raise ValueError("metabalance needs per-task gradients")
        norms = flat(inp.grads).detach().double().norm(dim=1).cpu()
        b = self.config.beta
        self.avg = b * self.avg + (1 - b) * norms
        w = (metabalance_weights(self.avg, self.config.relax, self.config.strategy) / self.num_tasks).to(dtype_of(inp))
        grad = torch.tensordot(w.to(inp.grads.device), inp.grads, dims=1)
        loss = None if inp.losses is None else (w.to(inp.losses.dtype) * inp.losses).sum()
        return Combined(weights=w, grad=grad, loss=loss)

    def state_dict(self) -> dict:
        return {"avg": self.avg.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.avg = state["avg"].double().clone()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"avg": self.avg.clone()}

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        self.avg = state["avg"].double().clone()
