"""Multi-task combiners: T per-task losses / gradients in, one update out.

`COMBINERS` is the one registry (in `base.py`, built-ins imported on first use); `register` refuses a taken name. Build one with
`make_combiner(config, num_tasks, seed)` and call `combine(CombineInput(...))`.

| name | kind | needs |
|---|---|---|
| equal, uncertainty, dwa, rlw | loss weighting | losses (grads optional) |
| gradnorm | loss weighting, weights learned from last-shared-layer grads | losses + grads |
| metabalance | auxiliary gradients rescaled towards the main task's magnitude | grads (T, *S) |
| pcgrad, mgda, cagrad, nashmtl | gradient surgery | grads (T, *S) |
| pmtrec | per-row personalized combination (methods.md §2.3) | row grads (T, R, d) |
"""
from __future__ import annotations

from fleetrec.algorithms.combiners.base import (COMBINERS, CombineInput, Combined, Combiner, CombinerConfig,
                                                 make_combiner, register)
from fleetrec.algorithms.combiners.metabalance import MetaBalance, MetaBalanceConfig, metabalance_weights
from fleetrec.algorithms.combiners.pmtrec import (PMTRec, PMTRecConfig, RowBatch, add_row_grad, gather_rows,
                                                  pmtrec_combine, pmtrec_weights, task_row_grads, touched_mask)
from fleetrec.algorithms.combiners.surgery import (MGDA, PCGrad, CAGrad, NashMTL, cagrad_weights, min_norm_weights,
                                                   nash_weights, pcgrad_coefficients)
from fleetrec.algorithms.combiners.weighting import (DWA, RLW, Equal, GradNorm, Uncertainty, dwa_weights,
                                                     gradnorm_step, gradnorm_weight_grad, uncertainty_loss)
