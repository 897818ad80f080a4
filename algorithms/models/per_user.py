"""A per-user recommender: private user embedding + shared attribute/item embeddings + scorer.

Written for one client's rows (it is vmapped over a cohort): the user vector is the client's
private embedding plus embeddings of its attributes (e.g. age group); the item vector sums
embeddings of the row's categorical fields and a projection of its numeric fields. A GMF+MLP
scorer (elementwise product, both vectors) gives one logit per task.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from fleetrec.algorithms.models.base import ModelConfig, RoleModule
from fleetrec.algorithms.protocol import FROZEN, PRIVATE, SHARED, Tensors
from fleetrec.datasets.federated import DatasetSchema


@dataclass(frozen=True)
class PerUserModelConfig(ModelConfig):
    name: str = "per_user"
    dim: int = 16                          # width of user and item vectors
    hidden: tuple[int, ...] = (32,)        # scorer MLP widths; () = linear scorer on [u*v, u, v]
    init_std: float = 0.1                  # std of embedding initialisation
    freeze: tuple[str, ...] = ()           # parameter-name prefixes to freeze, e.g. [item_emb]
    private: tuple[str, ...] = ("user_emb",)  # parameter-name prefixes kept per client

    CHECKS: ClassVar[dict] = {"dim": ">=1", "init_std": ">=0", "hidden": ">=1"}
    # the model's parameter-name roots: a freeze / private prefix must name one (or a part of one)
    ROOTS: ClassVar[tuple[str, ...]] = ("user_emb", "attr_emb", "item_emb", "num_proj", "mlp", "head")

    def validate(self) -> str | None:
        for key in ("freeze", "private"):
            for p in getattr(self, key):
                if not p or not any(r.startswith(p) or p.startswith(r + ".") for r in self.ROOTS):
                    return (f"model.{key}: prefix {p!r} matches no parameter; expected a prefix of one of "
                            f"{', '.join(self.ROOTS)} (or of a parameter inside one, e.g. item_emb.item_id)")
        return None


class PerUserModel(RoleModule):
    Config = PerUserModelConfig
    def __init__(self, cfg: PerUserModelConfig, schema: DatasetSchema):
        super().__init__()
        d = cfg.dim
        self.cfg = cfg
        self.user_emb = nn.Parameter(torch.zeros(d))
        self.attr_emb = nn.ModuleDict({f.name: nn.Embedding(f.vocab, d) for f in schema.client_categorical})
        self.item_emb = nn.ModuleDict({f.name: nn.Embedding(f.vocab, d) for f in schema.categorical})
        self.num_proj = nn.Linear(len(schema.numeric), d, bias=False) if schema.numeric else None
        layers, width = [], 3 * d
        for h in cfg.hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.mlp = nn.Sequential(*layers)
        self.head = nn.Linear(width, len(schema.tasks))
        for emb in (*self.attr_emb.values(), *self.item_emb.values()):
            nn.init.normal_(emb.weight, std=cfg.init_std)

    def roles(self) -> dict[str, str]:
        out = {}
        for name, _ in self.named_parameters():
            if any(name.startswith(p) for p in self.cfg.freeze):
                out[name] = FROZEN
            elif any(name.startswith(p) for p in self.cfg.private):
                out[name] = PRIVATE
            else:
                out[name] = SHARED
        return out

    def row_tables(self) -> dict[str, str]:
        """Embedding tables indexed by one categorical field each: param name -> field (the
        tables a client may train as its own row subset; see algorithms/sparse_rows.py)."""
        return {f"item_emb.{name}.weight": name for name in self.item_emb}

    def init_private(self, normal: callable, client_ids: torch.Tensor) -> Tensors:
        """Fresh private tensors for K clients; `normal(shape_tail)` draws (K, *shape_tail). The user
        vector is drawn per client; any other private tensor (e.g. the scorer, with `private:
        [user_emb, mlp, head]`, PFedRec's personal score function) starts from the shared initial value."""
        K, roles = len(client_ids), self.roles()
        out = {"user_emb": normal(tuple(self.user_emb.shape)) * self.cfg.init_std} if roles["user_emb"] == PRIVATE else {}
        for name, v in self.named_parameters():
            if roles[name] == PRIVATE and name not in out:
                out[name] = v.detach().expand(K, *v.shape).clone()
        return out

    def forward(self, categorical: Tensors, numeric: torch.Tensor, attrs: Tensors) -> torch.Tensor:
        # categorical: name -> (B,) ; numeric: (B, M) ; attrs: name -> () ; returns (B, T) logits
        u = self.user_emb
        for name, emb in self.attr_emb.items():
            u = u + F.embedding(attrs[name].unsqueeze(0), emb.weight)[0]   # (d,)
        v = 0
        for name, emb in self.item_emb.items():
            v = v + F.embedding(categorical[name], emb.weight)            # (B, d)
        if self.num_proj is not None:
            v = v + self.num_proj(numeric)                            # (B, d)
        u = u.expand_as(v)                                            # (B, d)
        z = torch.cat([u * v, u, v], dim=-1)                          # (B, 3d)
        return self.head(self.mlp(z))                                 # (B, T)
