"""A frozen pre-trained scorer adapted per user: private user embedding + low-rank adapter.

The backbone (item-embedding table, 2-layer MLP) is loaded from an `.npz` file and frozen;
each client trains its personal user embedding and a rank-r adapter on the first MLP layer:
    h = ReLU(W1 x + b1 + B (A x)),   x = [user_emb ; item_emb[item]],   logit = w2 h + b2
This is the reference per-user workload (the benchmark's model).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fleetrec.algorithms.models.base import ModelConfig, RoleModule
from fleetrec.algorithms.protocol import FROZEN, PRIVATE, SHARED, Tensors
from fleetrec.datasets.federated import DatasetSchema


@dataclass(frozen=True)
class AdapterModelConfig(ModelConfig):
    name: str = "adapter"
    backbone: str = ""                  # .npz with item_emb (I,D), w1 (H,2D), b1, w2 (1,H), b2 [, lora_a0, lora_b0, user_emb0]
    item_field: str = "item_id"         # the categorical row field indexing item_emb
    rank: int = 4                       # adapter rank
    init_std: float = 0.1               # std of fresh user embeddings (when the file has none)

    CHECKS: ClassVar[dict] = {"rank": ">=1", "init_std": ">=0"}

    def validate(self) -> str | None:
        if not self.backbone:
            return "model.backbone: expected the path of a pre-trained backbone .npz file"
        return None


class AdapterModel(RoleModule):
    Config = AdapterModelConfig
    def __init__(self, cfg: AdapterModelConfig, schema: DatasetSchema):
        super().__init__()
        z = np.load(cfg.backbone)
        self.cfg = cfg
        t = {k: torch.from_numpy(np.ascontiguousarray(z[k])).float() for k in ("item_emb", "w1", "b1", "w2", "b2")}
        d = t["item_emb"].shape[1]
        hidden = t["w1"].shape[0]
        self.item_emb = nn.Parameter(t["item_emb"])
        self.w1, self.b1 = nn.Parameter(t["w1"]), nn.Parameter(t["b1"])
        self.w2, self.b2 = nn.Parameter(t["w2"]), nn.Parameter(t["b2"])
        a0 = z["lora_a0"] if "lora_a0" in z else np.random.default_rng(0).normal(
            size=(cfg.rank, 2 * d)) / math.sqrt(2 * d)
        self.lora_a = nn.Parameter(torch.as_tensor(np.asarray(a0), dtype=torch.float32))
        self.lora_b = nn.Parameter(torch.zeros(hidden, self.lora_a.shape[0]))
        self.user_emb = nn.Parameter(torch.zeros(d))
        self._user_emb0 = torch.from_numpy(np.asarray(z["user_emb0"], dtype=np.float32)) if "user_emb0" in z else None

    def roles(self) -> dict[str, str]:
        roles = {n: FROZEN for n in ("item_emb", "w1", "b1", "w2", "b2")}
        roles.update(user_emb=PRIVATE, lora_a=SHARED, lora_b=SHARED)
        return roles

    def init_private(self, normal: callable, client_ids: torch.Tensor) -> Tensors:
        if self._user_emb0 is not None and client_ids is not None:
            return {"user_emb": self._user_emb0[client_ids].clone()}
        return {"user_emb": normal(tuple(self.user_emb.shape)) * self.cfg.init_std}

    def forward(self, categorical: Tensors, numeric: torch.Tensor, attrs: Tensors) -> torch.Tensor:
        iv = F.embedding(categorical[self.cfg.item_field], self.item_emb)   # (B, D)
        x = torch.cat([self.user_emb.expand_as(iv), iv], dim=-1)      # (B, 2D)
        pre = F.linear(x, self.w1, self.b1) + F.linear(F.linear(x, self.lora_a), self.lora_b)  # (B, H)
        return F.linear(torch.relu(pre), self.w2, self.b2)            # (B, 1)
