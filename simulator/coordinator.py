"""The coordinator actor: runs the server half of the algorithm and drives the workers.

Per round: sample the cohort (seeded by (seed, round)), ask the algorithm for the plan, put
it in the object store once, send each worker the ids of its own clients (one call per
worker, never per client), merge the pre-reduced accumulators in worker order, aggregate,
evaluate when due, and return a round record.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import ray
import torch

from fleetrec.algorithms import make_algorithm, rng
from fleetrec.algorithms.evaluation import PER_USER, merge_all
from fleetrec.algorithms.protocol import Accumulator, Tensors
from fleetrec.datasets.federated import TEST, TRAIN, VAL
from fleetrec.simulator import checkpoint
from fleetrec.simulator.placement import Placement
from fleetrec.simulator.worker import Worker


def sample_cohort(seed: int, rnd: int, num_clients: int, k: int) -> np.ndarray:
    """Sorted ids of the k clients of round `rnd` (without replacement)."""
    g = np.random.default_rng([seed, rng.SAMPLE, rnd])
    return np.sort(g.choice(num_clients, size=min(k, num_clients), replace=False))


class WorkerLost(RuntimeError):
    """A worker died and could not be replaced (no checkpoints, or `resources.max_restarts` used up)."""


def worker_actor(cfg, i: int, placement: Placement, ds_ref, setup):
    """Worker i of a run. Ray does not restart it (`max_restarts=0`): a worker that dies is
    replaced by the coordinator with a new actor built from the same arguments (`_recover`), up to
    `resources.max_restarts` times. Ray's own restarts would keep the dataset ref among the
    constructor arguments of a restartable actor, which Ray warns against (ray issue 53727)."""
    res = cfg.resources
    # "spread": one worker per node as far as the nodes allow (Ray's SPREAD strategy; a replaced
    # worker is placed the same way). Inside a Tune trial the workers stay in its placement group.
    spread = res.placement == "spread" and ray.util.get_current_placement_group() is None
    return Worker.options(num_cpus=res.cpus_per_worker, num_gpus=res.gpus_per_worker, max_restarts=0,
                          **({"scheduling_strategy": "SPREAD"} if spread else {})).remote(
        i, placement, ds_ref, cfg.algorithm, setup, cfg.federation.cohort_size, int(res.cpus_per_worker),
        cfg.federation.eval_cohort_rows)


def start_workers(cfg, ds, ds_ref) -> tuple[list, Placement]:
    """The run's worker actors and their placement, started by the run's driver beside the
    coordinator, so that their processes start (and import torch) at the same time as the
    coordinator's rather than after it. `ds` is the dataset (or a prepared layout's handle),
    `ds_ref` what the workers receive (an ObjectRef, or the handle itself)."""
    from fleetrec.simulator.config import make_setup
    setup = make_setup(cfg, ds)
    placement = Placement.build(cfg.resources.placement_policy, cfg.resources.workers, ds.rows_per_client(TRAIN))
    return [worker_actor(cfg, i, placement, ds_ref, setup) for i in range(cfg.resources.workers)], placement


@ray.remote
class Coordinator:
    def __init__(self, cfg, dataset_holder: list, workers: list, placement: Placement):
        ds = dataset_holder[0]          # an ObjectRef to a FederatedDataset, or a PreparedDataset handle
        ds = ray.get(ds) if isinstance(ds, ray.ObjectRef) else ds
        self.cfg = cfg
        self.num_clients = ds.num_clients
        from fleetrec.simulator.config import make_setup
        setup = make_setup(cfg, ds)
        self.algo = make_algorithm(cfg.algorithm, setup)
        self.state: Tensors = self.algo.init_server()
        self.placement = placement
        self.workers = list(workers)     # started by the driver (`start_workers`); replaced here (`_recover`)
        self.worker_args = (placement, dataset_holder[0], setup)
        self.replaced = [0] * len(self.workers)
        if cfg.eval.pooled_auc != "histogram":   # exact pooled AUC: import scikit-learn (~1.3 s) now,
            import sklearn.metrics  # noqa: F401  # while the workers start, not in round 0's evaluation
        self.worker_info = ray.get([w.info.remote() for w in self.workers])
        self.history: list = []            # (plan ref, per-worker client ids) of rounds since the last snapshot
        self.recoveries = 0
        self.system = None
        if cfg.system.active:
            from fleetrec.simulator.system import SystemModel
            up, down = self.algo.traffic()
            self.system = SystemModel(cfg.system, cfg.seed, ds.num_clients, ds.rows_per_client(0), up + down,
                                      cfg.train.local_epochs)

    def info(self) -> dict:
        up, down = self.algo.traffic()
        return {"node": ray.get_runtime_context().get_node_id(), "workers": self.worker_info,
                "bytes_up_per_client": up, "bytes_down_per_client": down,
                "num_clients": self.num_clients, "worker_recoveries": self.recoveries}

    def run_round(self, rnd: int, evaluate: bool) -> dict:
        t0 = time.perf_counter()
        k = self.cfg.federation.clients_per_round
        if self.system is None:
            cohort, system_record = sample_cohort(self.cfg.seed, rnd, self.num_clients, k), {}
        else:
            cohort, system_record = self.system.select(rnd, self.num_clients, k)
        plan_ref = ray.put(self.algo.configure_train(rnd, self.state, torch.from_numpy(cohort)))
        parts = self.placement.split(cohort)
        calls = [(i, w.train.remote(plan_ref, ids)) for i, (w, ids) in enumerate(zip(self.workers, parts)) if len(ids)]
        acc = Accumulator()
        for part in self._gather(calls, lambda i: self.workers[i].train.remote(plan_ref, parts[i])):
            acc.merge(part)                    # fixed (worker) order; sums are float64
        if self.cfg.checkpoint.every:          # only needed to replay a failed worker since the last checkpoint
            self.history.append((plan_ref, parts))
        self.state, train_metrics = self.algo.aggregate_train(rnd, self.state, acc)
        seconds = time.perf_counter() - t0
        up, down = self.algo.traffic()
        record = {"round": rnd, "cohort": len(cohort), "train_seconds": seconds,
                  "client_updates_per_s": len(cohort) / seconds,
                  "bytes_up": up * acc.clients, "bytes_down": down * len(cohort), "clients_up": acc.clients,
                  **system_record,
                  **{(k if "/" in k else f"train/{k}"): v for k, v in train_metrics.items()}}
        if evaluate:
            t1 = time.perf_counter()
            record.update(self.evaluate())
            record["eval_seconds"] = time.perf_counter() - t1
        return record

    def _eval_clients(self) -> list[np.ndarray | None]:
        n = self.cfg.eval.clients
        if n == 0 or n >= self.num_clients:
            return [None] * len(self.workers)
        g = np.random.default_rng([self.cfg.seed, rng.SAMPLE, 2**31])      # same sample every time
        return self.placement.split(np.sort(g.choice(self.num_clients, size=n, replace=False)))

    def evaluate(self) -> dict[str, float]:
        """Validation and test metrics: every worker's partial per split, merged in worker order,
        made into metrics by the algorithm (`aggregate_evaluate`)."""
        state_ref = ray.put(self.state)
        subsets = self._eval_clients()
        call = lambda i: self.workers[i].evaluate.remote(state_ref, (VAL, TEST), subsets[i])
        parts = self._gather([(i, call(i)) for i in range(len(self.workers))], call)
        out = {}
        for split, name in ((VAL, "val"), (TEST, "test")):
            merged = merge_all([p[split] for p in parts])
            out.update(self.algo.aggregate_evaluate(name, merged))
            if split == TEST and getattr(merged, "per_user", None) is not None:
                out[PER_USER] = merged.per_user     # popped by the driver before anything else sees the record
        return out

    def _gather(self, calls: list, redo) -> list:
        """Results of per-worker calls in worker order; a worker that died (its process, or its
        node) is replaced, restored and its call re-issued with `redo(i)`."""
        out = []
        for i, ref in calls:
            try:
                out.append(ray.get(ref))
            except ray.exceptions.RayActorError:
                self._recover(i)
                out.append(ray.get(redo(i)))
        return out

    def _recover(self, i: int) -> None:
        """Replace dead worker i by a new actor, restore it from the last checkpoint and replay the
        rounds since then."""
        ck, limit = self.cfg.checkpoint, self.cfg.resources.max_restarts
        if not ck.every:
            raise WorkerLost(f"worker {i} failed and its clients' personal state is lost; "
                               "set checkpoint.every > 0 so fleetrec can restore a failed worker")
        if self.replaced[i] >= limit:
            raise WorkerLost(f"worker {i} failed {self.replaced[i] + 1} times; resources.max_restarts = {limit}")
        self.replaced[i] += 1
        shard = None
        if (Path(ck.dir) / "LATEST").is_file():
            shard = checkpoint.load_shard(ck.dir, i)
        replay = [(plan_ref, parts[i]) for plan_ref, parts in self.history]
        self.workers[i] = worker_actor(self.cfg, i, *self.worker_args)
        ray.get(self.workers[i].restore.remote(shard, replay))
        self.worker_info[i] = ray.get(self.workers[i].info.remote())
        self.recoveries += 1

    def snapshot(self) -> tuple[Tensors, list[Tensors]]:
        """Server state and every worker's shard of personal state, for a checkpoint. The
        rounds before it no longer need replaying after a worker failure."""
        shards = self._gather([(i, w.shard.remote()) for i, w in enumerate(self.workers)],
                              lambda i: self.workers[i].shard.remote())
        self.history.clear()
        return self.server_state(), shards

    def restore(self, server: Tensors, shards: list[Tensors]) -> None:
        if len(shards) != len(self.workers):
            raise ValueError(f"checkpoint has {len(shards)} worker shards, the run has {len(self.workers)} workers")
        if set(server) != set(self.state):
            raise ValueError(f"checkpoint server state has tensors {sorted(server)}, expected {sorted(self.state)}")
        self.state = {k: v.clone() for k, v in server.items()}
        ray.get([w.load_shard.remote(s) for w, s in zip(self.workers, shards)])

    def server_state(self) -> Tensors:
        return {k: v.clone() for k, v in self.state.items()}

    def personal_state(self, client_ids: list[int]) -> dict[int, Tensors]:
        """Personal state of some clients, fetched from their owners (inspection and tests)."""
        out = {}
        for c in client_ids:
            owner = int(self.placement.owner(np.array([c]))[0])
            part = ray.get(self.workers[owner].personal_state.remote(np.array([c])))
            out[c] = {k: v[0] for k, v in part.items()}
        return out

    def worker_handles(self) -> list:
        return list(self.workers)
