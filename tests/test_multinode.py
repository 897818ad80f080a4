"""Multi-node behaviour on one machine (a `ray.cluster_utils.Cluster` of three nodes, run in a
subprocess by tests/multinode_cluster.py because this session already holds its own Ray):
`resources.placement=spread` puts the workers on different nodes, and a run that loses a
worker's node mid-run restarts that worker on the remaining node, restores it from the last
checkpoint and ends with exactly the metrics and server state of an uninterrupted run. The
interrupted run reads the sharded Parquet layout (each worker its own clients' rows, re-read by
the restarted worker), the uninterrupted one the in-memory dataset: the same results."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fleetrec.simulator.config_loader import ConfigError

SCRIPT = Path(__file__).resolve().parent / "multinode_cluster.py"


@pytest.fixture(scope="module")
def multinode(tmp_path_factory):
    ck = tmp_path_factory.mktemp("multinode")
    # node removed after round 2: between the checkpoints of rounds 1 and 3, so round 2 is replayed
    proc = subprocess.run([sys.executable, str(SCRIPT), str(ck), "2"], capture_output=True, text=True,
                          timeout=240, cwd=SCRIPT.parents[1])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_spread_places_workers_on_different_nodes(multinode):
    workers = multinode["full"]["workers"]
    assert len(set(workers)) == 2                                  # one worker per 1-CPU node
    assert set(workers) == set(multinode["worker_nodes"])          # never on the CPU-less head


def test_run_survives_losing_a_worker_node_with_unchanged_results(multinode):
    full, hurt = multinode["full"], multinode["hurt"]
    removed = hurt["removed"]
    assert removed is not None and removed["node"] != hurt["coordinator"]
    assert hurt["workers"][removed["worker"]] == removed["node"]
    assert removed["node"] not in multinode["alive_nodes"]
    # the lost worker was restarted on the node that is left and restored from the checkpoint
    # (more than once when Ray's first restart still lands on the node being removed)
    survivor = next(n for n in multinode["worker_nodes"] if n != removed["node"])
    assert hurt["workers_at_end"] == [survivor, survivor]
    assert hurt["recoveries"] >= 1
    assert hurt["rounds"] == [0, 1, 2, 3, 4]
    # the hurt run read the sharded layout: each worker held only its own clients' rows
    assert sum(hurt["rows"]) == hurt["num_rows"] and max(hurt["rows"]) < hurt["num_rows"]
    assert set(hurt["metrics"]) == set(full["metrics"]) and "val/auc" in full["metrics"]
    for k, v in full["metrics"].items():
        assert hurt["metrics"][k] == pytest.approx(v, abs=1e-6), k
    assert set(hurt["server_state"]) == set(full["server_state"])
    for k, v in full["server_state"].items():
        assert hurt["server_state"][k] == pytest.approx(v, abs=1e-6), k


def test_placement_option_is_checked(tiny_cfg):
    assert tiny_cfg().resources.placement == "default"
    assert tiny_cfg(**{"resources.placement": "spread"}).resources.placement == "spread"
    with pytest.raises(ConfigError, match="placement"):
        tiny_cfg(**{"resources.placement": "packed"})
