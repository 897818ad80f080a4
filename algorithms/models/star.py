"""STAR (Sheng et al., CIKM 2021, "One Model to Serve All: Star Topology Adaptive Recommender"),
a multi-scenario model, with one tower per task on top (the paper has one CTR output).

For scenario p, every hidden layer of the main network is a star-topology FC layer

    W_p = W ⊙ W^(p),   b_p = b + b^(p)

(W, b shared by all scenarios; W^(p) starts at ones, b^(p) at zeros, so every scenario starts from
the shared layer), followed by partitioned normalization (PN): batch statistics computed over the
rows of one scenario only, one pair of moving averages per scenario, and scale / shift
γ·γ^(p), β + β^(p). A small auxiliary network on the scenario embedding adds one value per task
to the logits ("domain indicator" path). The scenario of a row is the categorical input
`scenario` (the scenario algorithms add it from the client attribute; algorithms/scenario.py).

STAR is a centralized multi-scenario model: trained on one scenario's rows only (local-only) its
star layers are a reparametrization of plain FC layers, and PN reduces to BatchNorm.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from fleetrec.algorithms.models.base import ModelConfig
from fleetrec.algorithms.models.mtl import _MTLBase, mlp, towers
from fleetrec.algorithms.protocol import Tensors
from fleetrec.datasets.federated import DatasetSchema

SCENARIO_FIELD = "scenario"


class StarLinear(nn.Module):
    """y = x (W ⊙ W^(p))ᵀ + b + b^(p) for the rows of scenario p. Shapes: x (B, D_in), s (B,) -> (B, D_out)."""

    def __init__(self, in_dim: int, out_dim: int, num_scenarios: int):
        super().__init__()
        self.shared = nn.Linear(in_dim, out_dim)
        self.scenario_weight = nn.Parameter(torch.ones(num_scenarios, out_dim, in_dim))
        self.scenario_bias = nn.Parameter(torch.zeros(num_scenarios, out_dim))

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros(x.shape[0], self.shared.out_features)
        for p in torch.unique(s).tolist():                  # the scenarios in this batch (one per client)
            rows = s == p
            w = self.shared.weight * self.scenario_weight[p]
            out = torch.where(rows.unsqueeze(1), F.linear(x, w, self.shared.bias + self.scenario_bias[p]), out)
        return out


class PartitionedNorm(nn.Module):
    """Batch normalization per scenario: statistics over one scenario's rows, moving averages per
    scenario (`running_mean`, `running_var`: (S, D)), affine γ·γ^(p) and β + β^(p)."""

    def __init__(self, dim: int, num_scenarios: int, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.gamma = nn.Parameter(torch.ones(dim))
        self.beta = nn.Parameter(torch.zeros(dim))
        self.scenario_gamma = nn.Parameter(torch.ones(num_scenarios, dim))
        self.scenario_beta = nn.Parameter(torch.zeros(num_scenarios, dim))
        self.register_buffer("running_mean", torch.zeros(num_scenarios, dim))
        self.register_buffer("running_var", torch.ones(num_scenarios, dim))

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for p in torch.unique(s).tolist():
            rows = s == p
            if self.training and int(rows.sum()) > 1:
                xp = x[rows]
                mean, var = xp.mean(0), xp.var(0, unbiased=False)
                with torch.no_grad():                      # moving averages of scenario p only
                    n = xp.shape[0]
                    self.running_mean[p] = (1 - self.momentum) * self.running_mean[p] + self.momentum * mean
                    self.running_var[p] = ((1 - self.momentum) * self.running_var[p]
                                           + self.momentum * var * n / max(n - 1, 1))
            else:
                mean, var = self.running_mean[p], self.running_var[p]
            y = (x - mean) / torch.sqrt(var + self.eps)
            y = y * (self.gamma * self.scenario_gamma[p]) + (self.beta + self.scenario_beta[p])
            out = torch.where(rows.unsqueeze(1), y, out)
        return out


@dataclass(frozen=True)
class StarConfig(ModelConfig):
    name: str = "star"
    embed_dim: int = 128                     # d_e
    star: tuple[int, ...] = (512, 256)       # star-topology FC layers of the main network (each + PN, ReLU, dropout)
    tower: tuple[int, ...] = (128, 64)       # per-task tower MLP widths (then Linear -> 1)
    auxiliary: tuple[int, ...] = (16,)       # the auxiliary network's hidden widths, on the scenario embedding
    dropout: float = 0.2

    CHECKS: ClassVar[dict] = {"embed_dim": ">=1", "dropout": "0..1", "star": ">=1", "tower": ">=1",
                              "auxiliary": ">=1"}


class Star(_MTLBase):
    Config = StarConfig

    def __init__(self, cfg: StarConfig, schema: DatasetSchema):
        super().__init__(cfg, schema)
        if SCENARIO_FIELD not in self.embed.fields:
            raise ValueError("model.name=star needs scenario data (the categorical input 'scenario': a dataset "
                             "that names a scenario attribute, under a scenario algorithm)")
        if not cfg.star:
            raise ValueError("model.star: expected at least one layer width")
        S = schema.vocab(SCENARIO_FIELD)
        dims = (self.embed.out_dim, *cfg.star)
        self.star_layers = nn.ModuleList(StarLinear(dims[i], dims[i + 1], S) for i in range(len(cfg.star)))
        self.norms = nn.ModuleList(PartitionedNorm(w, S) for w in cfg.star)
        self.drop = nn.Dropout(cfg.dropout)
        self.towers = towers(cfg.star[-1], cfg.tower, cfg.dropout, len(self.tasks))
        aux_in = cfg.embed_dim
        self.auxiliary = nn.Sequential(OrderedDict(body=mlp(aux_in, cfg.auxiliary, 0.0),
                                                   head=nn.Linear(cfg.auxiliary[-1] if cfg.auxiliary else aux_in,
                                                                  len(self.tasks))))

    def forward(self, categorical: Tensors, numeric: torch.Tensor, attrs: Tensors) -> torch.Tensor:
        # categorical: name -> (B,) with 'scenario' ; numeric: (B, M) ; returns (B, T) logits
        s = categorical[SCENARIO_FIELD]                              # (B,)
        h = self.embed(categorical, numeric)                         # (B, D_in)
        for layer, norm in zip(self.star_layers, self.norms):
            h = self.drop(F.relu(norm(layer(h, s), s)))              # (B, H_l)
        main = self._heads([h] * len(self.tasks))                   # (B, T)
        return main + self.auxiliary(self.embed.emb[SCENARIO_FIELD](s))   # (B, T)
