"""One Ray session for the whole test run (2 CPUs), and tiny experiment configs."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def ray_session():
    import ray
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="error", configure_logging=False,
                 log_to_driver=False)
    yield ray
    ray.shutdown()


def tiny_overrides(**extra) -> list[str]:
    """A small per-user federation that trains in a second or two."""
    base = {
        "rounds": 3, "tracking.mlflow": False, "tracking.progress": False,
        "data.num_clients": 37, "data.num_items": 40, "data.rows_min": 5, "data.rows_max": 30,
        "federation.clients_per_round": 20, "federation.cohort_size": 256,
        "resources.workers": 2, "resources.cpus_per_worker": 0.5,
        "model.dim": 8, "model.hidden": "[8]", "train.lr": 0.1,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def tiny_config(*overrides: str, **extra):
    """The dataclass defaults (not configs/quickstart.yaml) plus tiny overrides."""
    from fleetrec.simulator.config import from_dict
    from fleetrec.simulator.config_loader import apply_overrides
    return from_dict(apply_overrides({}, tiny_overrides(**extra) + list(overrides)), "tiny")


@pytest.fixture(scope="session")
def tiny_cfg():
    return lambda **extra: tiny_config(**extra)
