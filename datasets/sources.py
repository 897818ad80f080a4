"""The YAML `data:` block: `name` picks a data source, whose config builds a FederatedDataset."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DataConfig:
    name: str = "synthetic_per_user"

    @classmethod
    def VARIANTS(cls) -> dict[str, type]:
        from datasets import SOURCES
        return dict(SOURCES)

    def client_layout(self) -> str | None:
        """centralized (one client holds every user) or federated (client = user) for sources that
        offer both (`data.layout`); None for sources with one fixed layout."""
        return None

    def build(self, seed: int):
        raise TypeError(f"{type(self).__name__} must define build(seed)")
