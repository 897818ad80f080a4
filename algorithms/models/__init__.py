"""Models: plain nn.Modules whose parameters carry roles (frozen / private / shared / group)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelConfig:
    """Base of the YAML `model:` block; `name` picks the model."""
    name: str = "per_user"

    @classmethod
    def VARIANTS(cls) -> dict[str, type]:
        from algorithms.models.per_user import PerUserModelConfig
        from algorithms.models.adapter import AdapterModelConfig
        from algorithms.models.fedpa import FedPAModelConfig
        from algorithms.models.mtl import MODELS as MTL_MODELS
        return {"per_user": PerUserModelConfig, "adapter": AdapterModelConfig, "fedpa": FedPAModelConfig,
                **{name: cfg for name, (cfg, _) in MTL_MODELS.items()}}
