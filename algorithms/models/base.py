"""The model base: an nn.Module whose parameters carry roles, with every optional part declared.

Algorithms read these attributes directly (no probing): a model without private tensors
returns none, one without shared embedding tables trained as row subsets lists none, and so on.
"""
from __future__ import annotations

from abc import ABCMeta, abstractmethod
from typing import ClassVar

import torch
from torch import nn

from algorithms.protocol import Tensors


class RoleModule(nn.Module, metaclass=ABCMeta):
    MULTI_TASK: ClassVar[bool] = False        # one output per task with template roles (algorithms/models/mtl.py)

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
