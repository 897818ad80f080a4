"""Multi-node runs on one machine, for tests/test_multinode.py (run as a subprocess, since the
test session already holds its own single-node Ray).

Starts a `ray.cluster_utils.Cluster`: a head node with no CPUs (it hosts the driver) and two
nodes with 1 CPU each. Runs the tiny experiment twice with two 0.5-CPU workers placed with
`resources.placement=spread`: once uninterrupted (in memory), once from the sharded layout
(datasets/prepared.py) removing the node of a worker (one that does not host the coordinator)
after a given round. Prints one JSON object on the last line.

    python tests/multinode_cluster.py CHECKPOINT_DIR [REMOVE_AFTER_ROUND]
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# A private Ray temp dir: Cluster writes its address to <temp dir>/ray/ray_current_cluster, where
# a plain ray.init() anywhere else on the machine would otherwise find it and join this cluster.
# Short, because Ray's socket paths under it must fit in 107 bytes.
RAY_TMPDIR = tempfile.mkdtemp(prefix="fleetrec-mn-", dir="/tmp" if os.path.isdir("/tmp") else None)
os.environ["RAY_TMPDIR"] = RAY_TMPDIR

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from fleetrec.datasets.prepared import PreparedConfig  # noqa: E402
from fleetrec.simulator.data_cli import write_layout  # noqa: E402
from fleetrec.simulator.run import Callback, federated_dataset, run  # noqa: E402
from tests.conftest import tiny_config  # noqa: E402

NODE = {"num_cpus": 1, "object_store_memory": 80 * 2**20}


class RemoveWorkerNode(Callback):
    """After round `after`, removes the node of a worker that does not share the coordinator's node."""

    def __init__(self, cluster: Cluster, nodes: dict, after: int):
        self.cluster, self.nodes, self.after = cluster, nodes, after
        self.removed: dict | None = None

    def on_start(self, cfg, info):
        self.info = info

    def on_round(self, record):
        if record["round"] != self.after:
            return
        victim = next(w for w in self.info["workers"] if w["node"] != self.info["node"])
        self.cluster.remove_node(self.nodes[victim["node"]])
        self.removed = {"worker": victim["index"], "node": victim["node"]}


def main(ck_dir: str, after: int) -> dict:
    cluster = Cluster(initialize_head=True, connect=True,
                      head_node_args={"num_cpus": 0, "object_store_memory": 80 * 2**20,
                                      "include_dashboard": False})
    try:
        nodes = {}
        for _ in range(2):
            node = cluster.add_node(**NODE)
            nodes[node.node_id] = node
        cluster.wait_for_nodes()
        opts = {"rounds": 5, "checkpoint.every": 2, "resources.workers": 2, "resources.cpus_per_worker": 0.5,
                "resources.placement": "spread"}
        full = run(tiny_config(**{**opts, "checkpoint.dir": f"{ck_dir}/full"}))
        remover = RemoveWorkerNode(cluster, nodes, after)
        # the interrupted run reads the sharded layout: no object in the head's store holds rows, and the
        # restarted worker re-reads its own clients' shard from the folder
        hurt_cfg = tiny_config(**{**opts, "checkpoint.dir": f"{ck_dir}/hurt"})
        layout = write_layout(federated_dataset(hurt_cfg), Path(ck_dir) / "layout", 4, hurt_cfg)
        hurt_cfg = dataclasses.replace(hurt_cfg, data=PreparedConfig(path=str(layout)))
        hurt, coord = run(hurt_cfg, [remover], keep_actors=True)
        after_run = [w["node"] for w in ray.get([h.info.remote() for h in ray.get(coord.worker_handles.remote())])]
        ray.kill(coord)
        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        metrics = lambda r: {k: v for k, v in r.records[-1].items()                  # noqa: E731
                             if k.startswith(("val/", "test/", "train/train_loss"))}
        return {
            "head": cluster.head_node.node_id,
            "worker_nodes": sorted(nodes),
            "alive_nodes": sorted(alive),
            "full": {"coordinator": full.info["node"], "workers": [w["node"] for w in full.info["workers"]],
                     "metrics": metrics(full),
                     "server_state": {k: v.flatten().tolist() for k, v in full.server_state.items()}},
            "hurt": {"coordinator": hurt.info["node"], "workers": [w["node"] for w in hurt.info["workers"]],
                     "workers_at_end": after_run, "rounds": [r["round"] for r in hurt.records], "recoveries": hurt.info["worker_recoveries"],
                     "removed": remover.removed, "metrics": metrics(hurt),
                     "rows": [w["rows"] for w in hurt.info["workers"]], "num_rows": hurt.info["num_rows"],
                     "server_state": {k: v.flatten().tolist() for k, v in hurt.server_state.items()}},
        }
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(RAY_TMPDIR, ignore_errors=True)


if __name__ == "__main__":
    out = main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 2)
    print(json.dumps(out))
