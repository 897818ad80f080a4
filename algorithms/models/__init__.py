"""Models: plain nn.Modules whose parameters carry roles (frozen / private / shared / group).

`MODELS` is the one registry (models/base.py); built-ins are imported when first looked up.
"""
from __future__ import annotations

from fleetrec.algorithms.models.base import MODELS, ModelConfig, RoleModule

__all__ = ["MODELS", "ModelConfig", "RoleModule"]
