"""The model base: an nn.Module whose parameters carry roles, with every optional part declared.

Algorithms read these attributes directly (no probing): a model without private tensors
returns none, one without shared embedding tables trained as row subsets lists none, and so on.
"""
from __future__ import annotations

from abc import ABCMeta, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from fleetrec.algorithms.protocol import Tensors
from fleetrec.datasets.registry import Registry, TaggedUnion


_M = "fleetrec.algorithms.models."
# The one registry of models: name -> RoleModule subclass, built as `cls(config, schema)`.
MODELS: Registry[type] = Registry("model", {
    "per_user": _M + "per_user:PerUserModel",
    "adapter": _M + "adapter:AdapterModel",
    "fedpa": _M + "fedpa:FedPAModel",
    "shared_bottom": _M + "mtl:SharedBottom",
    "mmoe": _M + "mtl:MMoE",
    "ple": _M + "mtl:PLE",
    "star": _M + "star:Star",
    "pepnet": _M + "pepnet:PEPNet",
    "m2m": _M + "m2m:M2M",
    "fedrap": _M + "fedrap:FedRAPModel",
}, config_of=lambda model: model.Config, base=lambda: RoleModule)


@dataclass(frozen=True)
class ModelConfig(TaggedUnion):
    """Base of the YAML `model:` block; `name` picks the model from `MODELS`."""
    name: str = "per_user"

    REGISTRY: ClassVar[Registry] = MODELS

    def pretrained_clients(self, ds) -> np.ndarray | None:
        """Clients a pre-trained part of the model has already seen (FedPA's open clients), which a
        federated run holds out of its dataset; None (the default) holds out nobody."""
        return None


class RoleModule(nn.Module, metaclass=ABCMeta):
    Config: ClassVar[type]                    # its ModelConfig subclass (the YAML `model:` block)
    MULTI_TASK: ClassVar[bool] = False        # one output per task with template roles (algorithms/models/mtl.py)
    # forward(..., penalty=True) also returns a (B,) regularizer per row that local training adds to the
    # loss (FedRAP's); evaluation calls forward without it
    HAS_PENALTY: ClassVar[bool] = False

    def __init__(self):
        super().__init__()
        self.group_params: dict[str, str] = {}    # group-shared parameter name -> the client attribute it is keyed by
        self.backbone_meta: dict = {}             # what a pre-trained backbone file recorded (FedPA stage 1)

    @abstractmethod
    def roles(self) -> dict[str, str]:
        """Role (algorithms.protocol FROZEN / PRIVATE / SHARED / GROUP, or a template role) per parameter."""

    def init_private(self, normal: callable, client_ids: torch.Tensor) -> Tensors:
        """Fresh private tensors for K clients; `normal(shape_tail)` draws (K, *shape_tail)."""
        return {}

    def row_tables(self) -> dict[str, str]:
        """Embedding tables indexed by one categorical field each (param name -> field), which a
        client may train as its own row subset (algorithms/sparse_rows.py)."""
        return {}
