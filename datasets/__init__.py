"""Data sources: real public datasets, synthetic generators, partitioners -> FederatedDataset.

The bottom layer of fleetrec: nothing here imports the algorithms or the simulator.
"""
from __future__ import annotations

from fleetrec.datasets.sources import SOURCES, DataConfig, register_source

__all__ = ["SOURCES", "DataConfig", "register_source"]
