"""M2M (Zhang et al., WSDM 2022, "Leaving No One Behind: A Multi-Scenario Multi-Task Meta Learning
Approach for Advertiser Modeling"), a multi-scenario multi-task model, on tabular inputs.

The paper's central piece is the **meta unit**: a layer whose weights are generated from the
scenario knowledge representation S (here the scenario embedding), so every scenario gets its own
parameters from shared generators:

    MetaLinear_S(x) = W(S) x + b(S),   W(S) = reshape(G_w S + g_w),  b(S) = G_b S + g_b.

- **Experts**: K shared MLPs over the input embeddings (the paper's experts are transformer layers
  over behaviour sequences; these inputs have no sequences, so the experts are MLPs -- the one
  deviation from the paper).
- **Meta attention** (per task t): score_k = v_tᵀ ReLU(MetaLinear_{t,S}([E_k ; q_t])) over the
  experts E_k with a learned task embedding q_t; z_t = Σ_k softmax(score)_k E_k.
- **Meta tower** (per task): L residual meta layers h <- ReLU(MetaLinear_S(h)) + h, then
  Linear(-> 1).

The scenario of a row is the categorical input `scenario` (the scenario algorithms add it from the
client attribute; algorithms/scenario.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from fleetrec.algorithms.models.base import ModelConfig
from fleetrec.algorithms.models.mtl import _MTLBase, experts
from fleetrec.algorithms.protocol import Tensors
from fleetrec.datasets.federated import DatasetSchema

SCENARIO_FIELD = "scenario"


class MetaLinear(nn.Module):
    """A linear layer whose weight and bias are generated from a condition vector (the meta unit).
    Shapes: x (B, D_in), cond (B, C) -> (B, D_out)."""

    def __init__(self, in_dim: int, out_dim: int, cond_dim: int):
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.weight_gen = nn.Linear(cond_dim, out_dim * in_dim)
        self.bias_gen = nn.Linear(cond_dim, out_dim)
        with torch.no_grad():             # generated weights start at the scale of nn.Linear's init
            self.weight_gen.weight.mul_(1.0 / (in_dim ** 0.5))
            self.weight_gen.bias.uniform_(-1.0 / in_dim ** 0.5, 1.0 / in_dim ** 0.5)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        w = self.weight_gen(cond).view(-1, self.out_dim, self.in_dim)       # (B, D_out, D_in)
        return torch.bmm(w, x.unsqueeze(-1)).squeeze(-1) + self.bias_gen(cond)   # (B, D_out)


@dataclass(frozen=True)
class M2MConfig(ModelConfig):
    name: str = "m2m"
    embed_dim: int = 128                     # d_e (also the scenario representation S)
    num_experts: int = 4                     # K shared experts
    expert: tuple[int, ...] = (512, 256)     # expert MLP widths
    attention_hidden: int = 32               # width of the meta attention's meta layer
    tower_layers: int = 2                    # residual meta layers per task tower
    dropout: float = 0.2

    CHECKS: ClassVar[dict] = {"embed_dim": ">=1", "num_experts": ">=1", "expert": ">=1", "attention_hidden": ">=1",
                              "tower_layers": ">=0", "dropout": "0..1"}


class M2M(_MTLBase):
    Config = M2MConfig

    def __init__(self, cfg: M2MConfig, schema: DatasetSchema):
        super().__init__(cfg, schema)
        if SCENARIO_FIELD not in self.embed.fields:
            raise ValueError("model.name=m2m needs scenario data (the categorical input 'scenario': a dataset "
                             "that names a scenario attribute, under a scenario algorithm)")
        T, H, d = len(self.tasks), cfg.expert[-1], cfg.embed_dim
        self.global_experts = experts(cfg.num_experts, self.embed.out_dim, cfg.expert, cfg.dropout)
        self.task_query = nn.Parameter(torch.randn(T, H) * 0.1)
        self.attention = nn.ModuleList(MetaLinear(2 * H, cfg.attention_hidden, d) for _ in range(T))
        self.attention_out = nn.ModuleList(nn.Linear(cfg.attention_hidden, 1, bias=False) for _ in range(T))
        self.towers = nn.ModuleList(nn.ModuleDict({
            "layers": nn.ModuleList(MetaLinear(H, H, d) for _ in range(cfg.tower_layers)),
            "head": nn.Linear(H, 1)}) for _ in range(T))
        self.drop = nn.Dropout(cfg.dropout)

    def expert_weights(self, e: torch.Tensor, s: torch.Tensor, t: int) -> torch.Tensor:
        """Meta attention of task t over the experts: (B, K) softmax weights from e (B, K, H), S (B, d)."""
        B, K, H = e.shape
        q = self.task_query[t].expand(B, K, H)
        inp = torch.cat([e, q], dim=-1).reshape(B * K, 2 * H)
        cond = s.unsqueeze(1).expand(B, K, s.shape[-1]).reshape(B * K, -1)
        score = self.attention_out[t](torch.relu(self.attention[t](inp, cond))).view(B, K)
        return torch.softmax(score, dim=-1)

    def forward(self, categorical: Tensors, numeric: torch.Tensor, attrs: Tensors) -> torch.Tensor:
        # categorical: name -> (B,) with 'scenario' ; numeric: (B, M) ; returns (B, T) logits
        x = self.embed(categorical, numeric)                                   # (B, D_in)
        s = self.embed.emb[SCENARIO_FIELD](categorical[SCENARIO_FIELD])        # (B, d): scenario representation
        e = torch.stack([ex(x) for ex in self.global_experts], dim=1)          # (B, K, H)
        out = []
        for t, tower in enumerate(self.towers):
            h = (self.expert_weights(e, s, t).unsqueeze(-1) * e).sum(dim=1)    # (B, H)
            for layer in tower["layers"]:
                h = self.drop(torch.relu(layer(h, s))) + h                     # residual meta layer
            out.append(tower["head"](h))                                       # (B, 1)
        return torch.cat(out, dim=-1)                                          # (B, T)
