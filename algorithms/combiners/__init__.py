"""Multi-task combiners: T per-task losses / gradients in, one update out.

`COMBINERS` is the explicit registry; `register` refuses a taken name. Build one with
`make_combiner(config, num_tasks, seed)` and call `combine(CombineInput(...))`.

| name | kind | needs |
|---|---|---|
| equal, uncertainty, dwa, rlw | loss weighting | losses (grads optional) |
| gradnorm | loss weighting, weights learned from last-shared-layer grads | losses + grads |
| pcgrad, mgda, cagrad, nashmtl | gradient surgery | grads (T, *S) |
| pmtrec | per-row personalized combination (methods.md §2.3) | row grads (T, R, d) |
"""
from __future__ import annotations

from algorithms.combiners.base import CombineInput, Combined, Combiner, CombinerConfig
from algorithms.combiners.pmtrec import (PMTRec, PMTRecConfig, RowBatch, add_row_grad, gather_rows,
                                         pmtrec_combine, pmtrec_weights, task_row_grads, touched_mask)
from algorithms.combiners.surgery import (MGDA, PCGrad, CAGrad, NashMTL, cagrad_weights, min_norm_weights,
                                          nash_weights, pcgrad_coefficients)
from algorithms.combiners.weighting import (DWA, RLW, Equal, GradNorm, Uncertainty, dwa_weights,
                                            gradnorm_step, uncertainty_loss)

COMBINERS: dict[str, type] = {}


def register(name: str, combiner: type) -> type:
    if name in COMBINERS:
        raise ValueError(f"combiner {name!r} is already registered ({COMBINERS[name].__name__})")
    COMBINERS[name] = combiner
    return combiner


def make_combiner(config: CombinerConfig, num_tasks: int, seed: int = 0) -> Combiner:
    return COMBINERS[config.name](num_tasks, config, seed)


for _cls in (Equal, Uncertainty, DWA, RLW, GradNorm, PCGrad, MGDA, CAGrad, NashMTL, PMTRec):
    register(_cls.Config.name, _cls)
del _cls
