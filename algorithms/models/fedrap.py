"""FedRAP (Li et al., "Federated Recommendation with Additive Personalization", ICLR 2024).

Each client scores item i with a private linear head on the sum of two item vectors: its own
additive part D_u[i] (a private copy of a whole item table) and the global part C[i] (shared,
averaged by the server). There is no user embedding: what is personal is D_u and the head.
The local loss adds, over the minibatch's rows, −λ·mean((D_u[i] − C[i])²) (keep the personal part
distinct from the global one) and μ·mean(|C[i]|) (l1, a sparse global part) or μ·mean(C[i]²) (l2).

Read from the official code (github.com/mtics/FedRAP): the structure, the two regularizers and
their defaults λ = μ = 0.1 with l1, and its learning-rate schedule (decayed by 0.95 every batch
and 0.97 every round: `train.optimizer: sgd`, `train.lr_step_decay: 0.95`, `train.lr_round_decay:
0.97`). Not reproduced: its separate learning rates for the head and the embeddings, and its
tolerance-based early exit from local epochs; here every tensor uses `train:`'s learning rate. Its `tanh(round / 10)` ramp of λ and μ is
computed there but never reaches the loss, which reads the fixed values, so fixed λ and μ are
what it trains with too.
Runs under `fedavg` (the item-common table is the only shared tensor; weighting uniform, as
the official plain mean). The logged training loss is the whole local objective, penalty included,
so it can be negative and does not compare with other models' BCE. The −λ term is unbounded
below. Under Adam (with or without the schedule) D_u grows without limit: on MovieLens-100k at
lr 0.1 the validation AUC peaks at round 2 and then falls below 0.5. Under SGD, the official
optimizer, it does not: the step is proportional to the small −λ gradient, and the same run
rises every round (algorithms/FEDPA.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from fleetrec.algorithms.models.base import ModelConfig, RoleModule
from fleetrec.algorithms.protocol import PRIVATE, SHARED, Tensors
from fleetrec.datasets.federated import DatasetSchema


@dataclass(frozen=True)
class FedRAPModelConfig(ModelConfig):
    name: str = "fedrap"
    dim: int = 32                       # width of the item vectors (official latent_dim 32)
    init_std: float = 0.1               # std of both item tables' initialisation
    lam: float = 0.1                    # λ: weight of −mean((D_u[i] − C[i])²)
    mu: float = 0.1                     # μ: weight of the penalty on C[i]
    regular: str = "l1"                 # l1: mean |C[i]| ; l2: mean C[i]²
    item_field: str = "item_id"         # the categorical field that names the item

    CHECKS: ClassVar[dict] = {"dim": ">=1", "init_std": ">=0", "lam": ">=0", "mu": ">=0", "regular": ("l1", "l2")}


class FedRAPModel(RoleModule):
    Config = FedRAPModelConfig
    HAS_PENALTY = True

    def __init__(self, cfg: FedRAPModelConfig, schema: DatasetSchema):
        super().__init__()
        fields = {f.name: f.vocab for f in schema.categorical}
        if cfg.item_field not in fields:
            raise ValueError(f"model.item_field: the data has no categorical field {cfg.item_field!r}; "
                             f"expected one of {', '.join(fields)}")
        self.cfg = cfg
        V, d = fields[cfg.item_field], cfg.dim
        self.item_common = nn.Parameter(torch.randn(V, d) * cfg.init_std)      # C, shared
        self.item_personal = nn.Parameter(torch.zeros(V, d))                    # D_u, private (init_private)
        self.head = nn.Linear(d, len(schema.tasks))                            # private score function

    def roles(self) -> dict[str, str]:
        return {n: SHARED if n == "item_common" else PRIVATE for n, _ in self.named_parameters()}

    def row_tables(self) -> dict[str, str]:
        """Both item tables are read only at the rows' items: under FedAvg's sparse_rows a client
        trains just those rows of C and of its own D_u (exact without weight decay)."""
        return {"item_common": self.cfg.item_field, "item_personal": self.cfg.item_field}

    def init_private(self, normal: callable, client_ids: torch.Tensor) -> Tensors:
        K = len(client_ids)
        return {"item_personal": normal(tuple(self.item_personal.shape)) * self.cfg.init_std,
                "head.weight": self.head.weight.detach().expand(K, *self.head.weight.shape).clone(),
                "head.bias": self.head.bias.detach().expand(K, *self.head.bias.shape).clone()}

    def forward(self, categorical: Tensors, numeric: torch.Tensor, attrs: Tensors, penalty: bool = False):
        # categorical: name -> (B,) ; returns (B, T) logits, and with `penalty` also the (B,) regularizer per row
        i = categorical[self.cfg.item_field]
        d_row, c_row = F.embedding(i, self.item_personal), F.embedding(i, self.item_common)   # (B, d)
        logits = self.head(d_row + c_row)
        if not penalty:
            return logits
        c_pen = c_row.abs().mean(-1) if self.cfg.regular == "l1" else c_row.pow(2).mean(-1)
        return logits, -self.cfg.lam * (d_row - c_row).pow(2).mean(-1) + self.cfg.mu * c_pen
