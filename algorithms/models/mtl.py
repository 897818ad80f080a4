"""Multi-task recommenders over one scenario's rows: Shared-Bottom, MMoE (with the PF-MSMTrec
expert template, methods.md §1.2 option A) and PLE. One logit per task.

Input layer: each categorical field embedded to d_e, numeric fields projected linearly to d_e,
all concatenated to x in R^{(F+1) d_e}. Experts and towers are MLPs of Linear -> BatchNorm1d ->
ReLU -> Dropout blocks. Module names carry the template: `global_experts`, `task_experts.<t>`,
`scenario_experts`, `bottom`, `towers.<t>`, `gates`, `embed`; BatchNorm modules are named `bn<i>`
so that `template.bn_tensor` can tell them apart by name.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from fleetrec.algorithms.models.base import ModelConfig, RoleModule
from fleetrec.algorithms.models.template import template_roles
from fleetrec.algorithms.protocol import Tensors
from fleetrec.datasets.federated import DatasetSchema


class InputLayer(nn.Module):
    """Categorical embeddings (F × d_e) and a linear projection of the numeric vector (d_e), concatenated."""

    def __init__(self, schema: DatasetSchema, dim: int):
        super().__init__()
        self.fields = tuple(f.name for f in schema.categorical)
        self.emb = nn.ModuleDict({f.name: nn.Embedding(f.vocab, dim) for f in schema.categorical})
        self.num_proj = nn.Linear(len(schema.numeric), dim) if schema.numeric else None
        self.out_dim = dim * (len(self.fields) + (1 if schema.numeric else 0))

    def forward(self, categorical: Tensors, numeric: torch.Tensor) -> torch.Tensor:
        parts = [self.emb[f](categorical[f]) for f in self.fields]   # F × (B, d_e)
        if self.num_proj is not None:
            parts.append(self.num_proj(numeric))                     # (B, d_e)
        return torch.cat(parts, dim=-1)                              # (B, (F+1) d_e)


def mlp(in_dim: int, widths: tuple[int, ...], dropout: float) -> nn.Sequential:
    """Linear -> BatchNorm1d -> ReLU -> Dropout per width; modules named lin<i>, bn<i>, act<i>, drop<i>."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for i, w in enumerate(widths):
        layers[f"lin{i}"] = nn.Linear(in_dim, w)
        layers[f"bn{i}"] = nn.BatchNorm1d(w)
        layers[f"act{i}"] = nn.ReLU()
        layers[f"drop{i}"] = nn.Dropout(dropout)
        in_dim = w
    return nn.Sequential(layers)


def towers(in_dim: int, widths: tuple[int, ...], dropout: float, num_tasks: int) -> nn.ModuleList:
    """One tower per task: MLP then Linear(-> 1)."""
    out_dim = widths[-1] if widths else in_dim
    return nn.ModuleList(nn.Sequential(OrderedDict(body=mlp(in_dim, widths, dropout), head=nn.Linear(out_dim, 1)))
                         for _ in range(num_tasks))


def experts(n: int, in_dim: int, widths: tuple[int, ...], dropout: float) -> nn.ModuleList:
    return nn.ModuleList(mlp(in_dim, widths, dropout) for _ in range(n))


class _MTLBase(RoleModule):
    """Shared plumbing: the input layer, task names and template roles."""
    MULTI_TASK = True

    def __init__(self, cfg, schema: DatasetSchema):
        super().__init__()
        self.cfg = cfg
        self.tasks = tuple(schema.tasks)
        self.embed = InputLayer(schema, cfg.embed_dim)

    def roles(self) -> dict[str, str]:
        """Template role (pfmsm_math: global / task:<t> / scenario / personal / tower:<t> / local) per parameter."""
        return template_roles((n for n, _ in self.named_parameters()), self.tasks,
                              getattr(self.cfg, "aggregate_scenario_experts", True))

    def state_roles(self) -> dict[str, str]:
        """Like `roles`, over every state_dict entry (parameters and BatchNorm buffers)."""
        return template_roles(self.state_dict().keys(), self.tasks,
                              getattr(self.cfg, "aggregate_scenario_experts", True))

    def _heads(self, z: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([tower(zt) for tower, zt in zip(self.towers, z)], dim=-1)   # (B, T)


# ------------------------------------------------------------------------------ Shared-Bottom
@dataclass(frozen=True)
class SharedBottomConfig(ModelConfig):
    name: str = "shared_bottom"
    embed_dim: int = 128                     # d_e, per categorical field and for the numeric projection
    bottom: tuple[int, ...] = (512, 256)     # shared bottom MLP widths
    tower: tuple[int, ...] = (128, 64)       # per-task tower MLP widths (then Linear -> 1)
    dropout: float = 0.2                     # dropout after every hidden block

    CHECKS: ClassVar[dict] = {"embed_dim": ">=1", "dropout": "0..1", "bottom": ">=1", "tower": ">=1"}


class SharedBottom(_MTLBase):
    Config = SharedBottomConfig
    def __init__(self, cfg: SharedBottomConfig, schema: DatasetSchema):
        super().__init__(cfg, schema)
        self.bottom = mlp(self.embed.out_dim, cfg.bottom, cfg.dropout)
        width = cfg.bottom[-1] if cfg.bottom else self.embed.out_dim
        self.towers = towers(width, cfg.tower, cfg.dropout, len(self.tasks))

    def forward(self, categorical: Tensors, numeric: torch.Tensor, attrs: Tensors) -> torch.Tensor:
        # categorical: name -> (B,) ; numeric: (B, M) ; returns (B, T) logits
        h = self.bottom(self.embed(categorical, numeric))            # (B, H)
        return self._heads([h] * len(self.tasks))                   # (B, T)


# ------------------------------------------------------------------------------ MMoE (template)
@dataclass(frozen=True)
class MMoEConfig(ModelConfig):
    name: str = "mmoe"
    embed_dim: int = 128                     # d_e
    num_global_experts: int = 4              # K_g: seen by every gate, aggregated across all clients
    num_task_experts: int = 1                # K_t per task: seen only by that task's gate, aggregated per task
    num_scenario_experts: int = 2            # K_s: the client's own experts, seen by every gate
    expert: tuple[int, ...] = (512, 256)     # expert MLP widths
    tower: tuple[int, ...] = (128, 64)       # per-task tower MLP widths (then Linear -> 1)
    dropout: float = 0.2
    aggregate_scenario_experts: bool = True  # scenario experts get personalized aggregation (False: kept local)

    CHECKS: ClassVar[dict] = {"embed_dim": ">=1", "num_global_experts": ">=0", "num_task_experts": ">=0",
                              "num_scenario_experts": ">=0", "dropout": "0..1", "expert": ">=1", "tower": ">=1"}


class MMoE(_MTLBase):
    """Gate t mixes K_g global + K_t experts of task t + K_s scenario experts. K_t = K_s = 0 is plain MMoE."""
    Config = MMoEConfig

    def __init__(self, cfg: MMoEConfig, schema: DatasetSchema):
        super().__init__(cfg, schema)
        T, d_in = len(self.tasks), self.embed.out_dim
        per_gate = cfg.num_global_experts + cfg.num_task_experts + cfg.num_scenario_experts
        if per_gate < 1 or not cfg.expert:
            raise ValueError("MMoE needs at least one expert per gate and at least one expert width")
        self.global_experts = experts(cfg.num_global_experts, d_in, cfg.expert, cfg.dropout)
        self.task_experts = nn.ModuleList(experts(cfg.num_task_experts, d_in, cfg.expert, cfg.dropout)
                                          for _ in range(T))
        self.scenario_experts = experts(cfg.num_scenario_experts, d_in, cfg.expert, cfg.dropout)
        self.gates = nn.ModuleList(nn.Linear(d_in, per_gate) for _ in range(T))
        self.towers = towers(cfg.expert[-1], cfg.tower, cfg.dropout, T)

    def gate_weights(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Softmax gate weights per task, each (B, K_g + K_t + K_s), from the input vector x (B, D_in)."""
        return [torch.softmax(g(x), dim=-1) for g in self.gates]

    def forward(self, categorical: Tensors, numeric: torch.Tensor, attrs: Tensors) -> torch.Tensor:
        # categorical: name -> (B,) ; numeric: (B, M) ; returns (B, T) logits
        x = self.embed(categorical, numeric)                         # (B, D_in)
        shared = [e(x) for e in (*self.global_experts, *self.scenario_experts)]   # (K_g + K_s) × (B, H)
        z = []
        for t, w in enumerate(self.gate_weights(x)):
            own = [e(x) for e in self.task_experts[t]]               # K_t × (B, H)
            h = torch.stack(shared[:self.cfg.num_global_experts] + own
                            + shared[self.cfg.num_global_experts:], dim=1)   # (B, K, H)
            z.append((w.unsqueeze(-1) * h).sum(dim=1))               # (B, H)
        return self._heads(z)                                        # (B, T)


# ------------------------------------------------------------------------------ PLE
@dataclass(frozen=True)
class PLEConfig(ModelConfig):
    name: str = "ple"
    embed_dim: int = 128                     # d_e
    levels: tuple[int, ...] = (512, 256)     # one CGC level per entry; each expert of level l is one block of this width
    num_shared_experts: int = 4              # shared experts per level (template role "global")
    num_task_experts: int = 4                # experts per task per level (template role "task:<t>")
    tower: tuple[int, ...] = (128, 64)
    dropout: float = 0.2

    CHECKS: ClassVar[dict] = {"embed_dim": ">=1", "num_shared_experts": ">=0",
                              "num_task_experts": ">=1", "dropout": "0..1", "levels": ">=1", "tower": ">=1"}


class CGCLevel(nn.Module):
    """One Customized Gate Control level: task gates over own + shared experts; a shared gate over all
    experts feeds the next level (absent on the last level)."""

    def __init__(self, in_dim: int, width: int, n_tasks: int, k_shared: int, k_task: int,
                 dropout: float, last: bool):
        super().__init__()
        self.global_experts = experts(k_shared, in_dim, (width,), dropout)
        self.task_experts = nn.ModuleList(experts(k_task, in_dim, (width,), dropout) for _ in range(n_tasks))
        self.gates = nn.ModuleList(nn.Linear(in_dim, k_task + k_shared) for _ in range(n_tasks))
        self.shared_gate = None if last else nn.Linear(in_dim, n_tasks * k_task + k_shared)

    def forward(self, task_in: list[torch.Tensor], shared_in: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        # task_in: T × (B, D) ; shared_in: (B, D) ; returns T × (B, H) and (B, H)
        shared = [e(shared_in) for e in self.global_experts]             # K_sh × (B, H)
        own = [[e(xt) for e in es] for es, xt in zip(self.task_experts, task_in)]   # T × K_t × (B, H)
        outs = []
        for t, gate in enumerate(self.gates):
            h = torch.stack(own[t] + shared, dim=1)                      # (B, K_t + K_sh, H)
            w = torch.softmax(gate(task_in[t]), dim=-1).unsqueeze(-1)    # (B, K_t + K_sh, 1)
            outs.append((w * h).sum(dim=1))                              # (B, H)
        if self.shared_gate is None:
            return outs, shared_in
        h = torch.stack([e for es in own for e in es] + shared, dim=1)   # (B, T K_t + K_sh, H)
        w = torch.softmax(self.shared_gate(shared_in), dim=-1).unsqueeze(-1)
        return outs, (w * h).sum(dim=1)                                  # T × (B, H), (B, H)


class PLE(_MTLBase):
    Config = PLEConfig
    def __init__(self, cfg: PLEConfig, schema: DatasetSchema):
        super().__init__(cfg, schema)
        if not cfg.levels:
            raise ValueError("PLE needs at least one level")
        T, dims = len(self.tasks), (self.embed.out_dim, *cfg.levels)
        self.levels = nn.ModuleList(
            CGCLevel(dims[i], dims[i + 1], T, cfg.num_shared_experts, cfg.num_task_experts, cfg.dropout,
                     last=i == len(cfg.levels) - 1)
            for i in range(len(cfg.levels)))
        self.towers = towers(cfg.levels[-1], cfg.tower, cfg.dropout, T)

    def forward(self, categorical: Tensors, numeric: torch.Tensor, attrs: Tensors) -> torch.Tensor:
        # categorical: name -> (B,) ; numeric: (B, M) ; returns (B, T) logits
        x = self.embed(categorical, numeric)                         # (B, D_in)
        task_h, shared_h = [x] * len(self.tasks), x
        for level in self.levels:
            task_h, shared_h = level(task_h, shared_h)               # T × (B, H_l), (B, H_l)
        return self._heads(task_h)                                   # (B, T)
