"""PEPNet (Chang et al., KDD 2023, "PEPNet: Parameter and Embedding Personalized Network for
Infusing with Personalized Prior Information"), a multi-scenario multi-task model.

Gate NU (the paper's gate neural unit): δ = γ · sigmoid(W₂ ReLU(W₁ x + b₁) + b₂), γ = 2, so a gate
starts near 1 and can scale a signal up or down.

- **EPNet** (embedding personalization): the scenario embedding e_d and the input embeddings E
  (gradient stopped inside the gate) give δ_domain = GateNU([e_d, sg(E)]); the network sees
  O_ep = δ_domain ⊙ E.
- **PPNet** (parameter personalization): each task has its own tower; after every hidden layer
  l of task t the activations are scaled by δ_{t,l} = GateNU_{t,l}([e_prior, sg(O_ep)]), where
  e_prior is the embedding of the personal prior fields (`prior_fields`, default user_id and
  item_id where the data has them, as the paper's user / item / author ids).

The scenario of a row is the categorical input `scenario` (the scenario algorithms add it from
the client attribute; algorithms/scenario.py). Towers are Linear -> ReLU -> Dropout per width,
then Linear(-> 1); there is no BatchNorm in PEPNet.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from fleetrec.algorithms.models.base import ModelConfig
from fleetrec.algorithms.models.mtl import _MTLBase
from fleetrec.algorithms.protocol import Tensors
from fleetrec.datasets.federated import DatasetSchema

SCENARIO_FIELD = "scenario"


class GateNU(nn.Module):
    """δ = γ · sigmoid(W₂ ReLU(W₁ x + b₁) + b₂). Shapes (B, D_in) -> (B, D_out)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, gamma: float = 2.0):
        super().__init__()
        self.gamma = gamma
        self.lin0 = nn.Linear(in_dim, hidden)
        self.lin1 = nn.Linear(hidden, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gamma * torch.sigmoid(self.lin1(torch.relu(self.lin0(x))))


@dataclass(frozen=True)
class PEPNetConfig(ModelConfig):
    name: str = "pepnet"
    embed_dim: int = 128                     # d_e
    tower: tuple[int, ...] = (512, 256, 128)  # each task's DNN widths (each layer gated by PPNet), then Linear -> 1
    gate_hidden: int = 64                    # hidden width of every gate NU
    prior_fields: tuple[str, ...] = ("user_id", "item_id")   # PPNet's personal prior (those the data has)
    dropout: float = 0.2

    CHECKS: ClassVar[dict] = {"embed_dim": ">=1", "gate_hidden": ">=1", "dropout": "0..1", "tower": ">=1"}


class PEPNet(_MTLBase):
    Config = PEPNetConfig

    def __init__(self, cfg: PEPNetConfig, schema: DatasetSchema):
        super().__init__(cfg, schema)
        if SCENARIO_FIELD not in self.embed.fields:
            raise ValueError("model.name=pepnet needs scenario data (the categorical input 'scenario': a dataset "
                             "that names a scenario attribute, under a scenario algorithm)")
        if not cfg.tower:
            raise ValueError("model.tower: expected at least one layer width")
        d, D = cfg.embed_dim, self.embed.out_dim
        self.prior = tuple(f for f in cfg.prior_fields if f in self.embed.fields) or (SCENARIO_FIELD,)
        self.epnet = GateNU(d + D, cfg.gate_hidden, D)
        dims = (D, *cfg.tower)
        prior_dim = d * len(self.prior) + D
        self.towers = nn.ModuleList(nn.ModuleDict({
            "layers": nn.ModuleList(nn.Linear(dims[i], dims[i + 1]) for i in range(len(cfg.tower))),
            "gates": nn.ModuleList(GateNU(prior_dim, cfg.gate_hidden, w) for w in cfg.tower),
            "head": nn.Linear(cfg.tower[-1], 1)}) for _ in self.tasks)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, categorical: Tensors, numeric: torch.Tensor, attrs: Tensors) -> torch.Tensor:
        # categorical: name -> (B,) with 'scenario' ; numeric: (B, M) ; returns (B, T) logits
        emb = self.embed(categorical, numeric)                                   # (B, D)
        e_d = self.embed.emb[SCENARIO_FIELD](categorical[SCENARIO_FIELD])        # (B, d)
        o_ep = self.epnet(torch.cat([e_d, emb.detach()], dim=-1)) * emb          # EPNet: (B, D)
        prior = torch.cat([self.embed.emb[f](categorical[f]) for f in self.prior] + [o_ep.detach()], dim=-1)
        out = []
        for tower in self.towers:
            h = o_ep
            for layer, gate in zip(tower["layers"], tower["gates"]):
                h = self.drop(torch.relu(layer(h)) * gate(prior))              # PPNet: (B, H_l)
            out.append(tower["head"](h))                                       # (B, 1)
        return torch.cat(out, dim=-1)                                          # (B, T)
