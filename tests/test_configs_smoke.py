"""Every experiment YAML in configs/ loads and runs one tiny round."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from fleetrec.simulator.config import load
from fleetrec.simulator.config_loader import flatten, read_yaml
from fleetrec.simulator.run import run

FOLDER = Path(__file__).resolve().parents[1] / "configs"
ALL = sorted(FOLDER.glob("*.yaml"))


def flag_variant_of(path: Path) -> Path | None:
    """The config `path` is a variant of (the longest other config name its name extends), when the
    two differ only in algorithm options other than algorithm.name (an ablation flag, a combiner):
    such a variant runs the same engine path on the same data, so one in-process round checks it."""
    bases = [p for p in ALL if p != path and path.stem.startswith(p.stem + "_")]
    if not bases:
        return None
    base = max(bases, key=lambda p: len(p.stem))
    a, b = flatten(read_yaml(path)), flatten(read_yaml(base))
    diff = {k for k in set(a) | set(b) if a.get(k) != b.get(k) and k != "name" and not k.startswith("tracking.")}
    ok = diff and all(k.startswith("algorithm.") and k != "algorithm.name" for k in diff)
    return base if ok else None


# the KuaiRand and Epinions FedPA baselines are the MovieLens ones' flags on their own base (checked
# in tests/test_fedpa.py); running their base configs and the MovieLens variants covers them
FLAGS = [p for p in ALL if flag_variant_of(p) is not None]
CONFIGS = [p for p in ALL if p not in FLAGS and not p.stem.startswith(("fedpa_kuairand_", "fedpa_epinions_"))]


def _algorithm(path: Path) -> str:
    return str((read_yaml(path).get("algorithm") or {}).get("name", "fedavg"))


# one config per algorithm runs on Ray (the engine path of that algorithm: placement, routing, the
# driver loop); every other config -- other data, other options of an algorithm already run -- runs
# one round of both halves in this process, which is what differs between them
ON_RAY = [p for i, p in enumerate(CONFIGS) if _algorithm(p) not in {_algorithm(q) for q in CONFIGS[:i]}]
IN_PROCESS = [p for p in ALL if p not in ON_RAY and not p.stem.startswith(("fedpa_kuairand_", "fedpa_epinions_"))]


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


def _data_extra(path: Path, kuairand_release: Path) -> list[str]:
    if (read_yaml(path).get("data") or {}).get("name") == "kuairand":
        return [f"data.path={kuairand_release}", "data.cache=false"]
    return []


@pytest.mark.parametrize("path", ON_RAY, ids=[p.stem for p in ON_RAY])
def test_config_runs_one_tiny_round(ray_session, path, kuairand_release):
    cfg = load(path, [*_tiny(path), *_data_extra(path, kuairand_release)])
    result = run(cfg)
    assert len(result.records) == 1 and result.records[0]["train/clients_trained"] > 0


def test_flag_variants_are_recognized():
    """The variants checked in-process are the ablation flags and combiners, never a baseline."""
    names = {p.stem for p in FLAGS}
    assert {"pf_msmtrec_epinions_no_tower", "pmtrec_epinions_nashmtl", "pmtrec_epinions_single"} <= names
    assert not names & {"pf_msmtrec_epinions_fedavg", "pmtrec_epinions_federated", "fedpa_movielens_no_gate"}
    # every algorithm of a shipped config runs on Ray at least once
    assert {_algorithm(p) for p in ON_RAY} == {_algorithm(p) for p in ALL}


@pytest.mark.parametrize("path", IN_PROCESS, ids=[p.stem for p in IN_PROCESS])
def test_config_trains_and_evaluates_one_round_in_process(path, kuairand_release):
    """Both halves of the algorithm in this process on the config's tiny data slice: one round of
    training over a cohort, aggregation, and the algorithm's own evaluation of the validation split."""
    from tests.in_process import InProcess
    cfg = load(path, [*_tiny(path), *_data_extra(path, kuairand_release)])
    sim = InProcess(cfg)
    ids = sim.ids[:cfg.federation.clients_per_round]
    assert sim.round(0, ids)["clients_trained"] > 0
    metrics = sim.evaluate("val", ids)
    assert metrics and all(k.startswith("val/") for k in metrics)


def test_every_shipped_config_tracks_to_mlflow_unless_it_says_why():
    """A config that turns MLflow off carries the reason on that line (a YAML comment)."""
    silent = []
    for path in ALL:
        if read_yaml(path).get("tracking", {}).get("mlflow", True) is False:
            line = next(l for l in path.read_text().splitlines() if "mlflow" in l and "false" in l)
            if "#" not in line:
                silent.append(path.name)
    assert not silent, silent
