"""Every experiment YAML in configs/ loads and runs one tiny round."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from simulator.config import load
from simulator.config_loader import read_yaml
from simulator.run import run

# the KuaiRand FedPA baselines are the MovieLens ones' flags on the KuaiRand base (checked in
# tests/test_fedpa.py); running fedpa_kuairand.yaml and the MovieLens variants covers them
CONFIGS = sorted(p for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")
                 if not p.stem.startswith("fedpa_kuairand_"))


def _tiny(path: Path) -> list[str]:
    raw = read_yaml(path)
    # a pre-trained backbone fits the full data's vocabularies, not a 23-client slice: random init
    pre = ["model.backbone="] if (raw.get("model") or {}).get("backbone") else []
    cfg = load(path, pre)
    fields = {f.name for f in dataclasses.fields(cfg.data)}
    # never more workers than the config asks (centralized training needs its one worker)
    out = pre + ["rounds=1", "tracking.mlflow=false", "tracking.progress=false",
                 f"resources.workers={min(2, cfg.resources.workers)}",
                 "resources.cpus_per_worker=0.5", "federation.clients_per_round=8"]
    scenarios = getattr(cfg.data, "scenario_top_k", 0)
    if "num_clients" in fields:
        out += ["data.num_clients=23"]
    if "max_clients" in fields and not scenarios:
        out += ["data.max_clients=23"]
    if scenarios and "max_users" in fields:   # clients are categories: subsample users instead
        out += ["data.max_users=200"]
    return out


def test_there_is_a_quickstart():
    assert any(p.name == "quickstart.yaml" for p in CONFIGS)


@pytest.fixture(scope="module")
def kuairand_release(tmp_path_factory) -> Path:
    """A tiny folder in the official KuaiRand-Pure layout (logs and the three feature tables), for
    the configs that need the release (the shared folder has the feature tables only)."""
    from tests.test_datasets_kuairand_ml1m import write_feature_tables, write_logs
    root = tmp_path_factory.mktemp("kuairand")
    return write_feature_tables(write_logs(root, 30, 40, rows=(600, 150)), 30, 40, stats=True)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_runs_one_tiny_round(ray_session, path, kuairand_release):
    extra = []
    if (read_yaml(path).get("data") or {}).get("name") == "kuairand":
        extra = [f"data.path={kuairand_release}", "data.cache=false"]
    cfg = load(path, [*_tiny(path), *extra])
    result = run(cfg)
    assert len(result.records) == 1 and result.records[0]["train/clients_trained"] > 0
