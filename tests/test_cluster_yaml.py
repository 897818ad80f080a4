"""Offline checks for the Ray cluster-launcher config in ``cluster.yaml``.

Uses the same code path ``ray up`` runs before it talks to AWS
(``prepare_config`` + ``validate_config`` from the installed Ray), so no cloud
credentials or network access are needed.
"""

import copy
import re
from pathlib import Path

import pytest
import yaml

import ray
from ray.autoscaler._private.util import prepare_config, validate_config

REPO_ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO_ROOT / "cluster.yaml"
REMOTE_REPO = "~/fleetrec"


@pytest.fixture(scope="module")
def raw_config():
    with open(CLUSTER_YAML) as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def prepared_config(raw_config):
    # prepare_config fills in Ray's AWS defaults, merges setup commands and
    # per-node-type worker limits, exactly as `ray up` does.
    return prepare_config(copy.deepcopy(raw_config))


def test_passes_ray_schema_validation(prepared_config):
    # Raises jsonschema.ValidationError / ValueError on an invalid config.
    validate_config(prepared_config)


def test_raw_config_matches_schema_too(raw_config):
    # Catch typos in top-level keys before defaults are merged in.
    import json
    import os

    import jsonschema

    schema_path = os.path.join(
        os.path.dirname(ray.autoscaler.__file__), "ray-schema.json"
    )
    with open(schema_path) as f:
        schema = json.load(f)
    jsonschema.validate(raw_config, schema)


def test_aws_head_and_gpu_workers(raw_config, prepared_config):
    assert raw_config["cluster_name"] == "fleetrec"
    assert raw_config["provider"]["type"] == "aws"
    assert "idle_timeout_minutes" in raw_config
    assert "docker" not in raw_config

    node_types = prepared_config["available_node_types"]
    head_type = prepared_config["head_node_type"]
    assert head_type in node_types
    assert node_types[head_type]["max_workers"] == 0

    workers = {k: v for k, v in node_types.items() if k != head_type}
    assert len(workers) == 1
    (worker,) = workers.values()
    assert worker["min_workers"] == 0
    assert worker["max_workers"] == 4
    assert prepared_config["max_workers"] >= worker["max_workers"]
    # g4dn/g5/g6/p* instance families carry NVIDIA GPUs.
    assert re.match(r"^(g\d|p\d)", worker["node_config"]["InstanceType"])
    assert not re.match(r"^(g\d|p\d)", node_types[head_type]["node_config"]["InstanceType"])


def test_file_mounts_include_repository(raw_config):
    mounts = raw_config["file_mounts"]
    assert REMOTE_REPO in mounts
    local = Path(mounts[REMOTE_REPO])
    # Relative paths are resolved from the directory `ray up` runs in, which
    # is the repository root.
    if not local.is_absolute():
        local = REPO_ROOT / local
    assert local.resolve() == REPO_ROOT


def test_setup_commands_install_project(prepared_config):
    for key in ("head_setup_commands", "worker_setup_commands"):
        cmds = prepared_config[key]
        installs = [
            i for i, c in enumerate(cmds) if re.search(r"pip install .*-e ~/fleetrec\b", c)
        ]
        assert installs, f"{key} does not install the project: {cmds}"


def test_cluster_ray_version_matches_local(raw_config):
    # The launcher and the cluster's autoscaler must run the same Ray version.
    pins = [
        m.group(1)
        for c in raw_config["setup_commands"]
        for m in re.finditer(r"ray\[[^\]]*\]==([0-9][^\"'\s]*)", c)
    ]
    assert pins == [ray.__version__]


def test_standard_start_commands(prepared_config):
    head = " ".join(prepared_config["head_start_ray_commands"])
    worker = " ".join(prepared_config["worker_start_ray_commands"])
    assert "ray start --head" in head
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert "ray start --address=$RAY_HEAD_IP:6379" in worker


def test_shell_commands_not_truncated(raw_config):
    # A " #" inside an unquoted YAML scalar silently starts a comment and cuts
    # the command short; unbalanced quotes are the tell-tale sign.
    keys = [k for k in raw_config if k.endswith("_commands")]
    for key in keys:
        for cmd in raw_config[key]:
            assert cmd.count("'") % 2 == 0 and cmd.count('"') % 2 == 0, (key, cmd)
            assert cmd.count("(") == cmd.count(")"), (key, cmd)
