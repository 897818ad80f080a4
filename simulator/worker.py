"""Worker actors: stateful shards that own clients and train them in vectorized cohorts.

Which clients worker `w` owns, and in which local slot each lives, is the run's `Placement`
(simulator/placement.py). Its personal state (e.g. user embeddings) is stacked per tensor by
slot, so a cohort's state is one gather and one scatter, and it never leaves the worker.
"""
from __future__ import annotations

import ctypes
import math
import os
import sys

import numpy as np
import ray
import torch

from fleetrec.algorithms import make_algorithm
from fleetrec.algorithms.evaluation import merge_all
from fleetrec.algorithms.protocol import RANKING, Accumulator, Setup, TrainPlan, Tensors
from fleetrec.datasets.federated import FederatedDataset
from fleetrec.datasets.prepared import PreparedDataset
from fleetrec.simulator.cohort import DataView
from fleetrec.simulator.placement import Placement


def _release_freed_heap() -> None:
    """Return freed heap pages to the OS (glibc only); measured: personal-state memory 2.6x -> 1.04x raw."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def build_personal(algo, owned: np.ndarray, chunk_rows: int = 65536) -> Tensors:
    """Personal state of the `owned` clients, stacked by slot. Built chunk by chunk into tensors
    allocated once at full size, so init never holds two copies (no concatenation)."""
    personal: Tensors = {}
    start = 0
    for chunk in np.array_split(owned, max(1, math.ceil(len(owned) / chunk_rows))):
        part = algo.init_personal(torch.from_numpy(chunk))
        for k, v in part.items():
            if k not in personal:
                personal[k] = torch.empty((len(owned), *v.shape[1:]), dtype=v.dtype, device=v.device)
            personal[k][start:start + len(chunk)] = v
        start += len(chunk)
    return personal


class _SplitBatches:
    """One cohort chunk's rows by split, each built (and moved to the device) on first use."""

    def __init__(self, data: DataView, ids: np.ndarray, device: str):
        self._data, self._ids, self._device, self._cache = data, ids, device, {}

    def __getitem__(self, split: int):
        if split not in self._cache:
            self._cache[split] = self._data.batch(self._ids, split).to(self._device)
        return self._cache[split]


# evaluation cohorts grow past cohort_size only while their gathered personal state stays within this
EVAL_PERSONAL_BYTES = 64 << 20


def cohort_chunks(client_ids: np.ndarray, n_rows: np.ndarray, cohort_size: int, rows: int = 0,
                  max_clients: int | None = None):
    """Cohorts of at most `cohort_size` clients of similar size (sorted by `n_rows`, most first),
    so padding to the longest client of a cohort wastes little. With `rows` > 0 (evaluation), a
    cohort holds at least `cohort_size` clients and grows while clients x its longest client's
    rows stay within `rows` and its clients within `max_clients` (if given)."""
    order = np.lexsort((client_ids, -n_rows))
    ordered, n = client_ids[order], n_rows[order]
    s = 0
    while s < len(ordered):
        size = cohort_size
        if rows > 0:
            grown = rows // max(int(n[s]), 1)
            size = max(cohort_size, grown if max_clients is None else min(grown, max_clients))
        yield ordered[s:s + size]
        s += size


@ray.remote
class Worker:
    def __init__(self, index: int, placement: Placement, dataset: FederatedDataset | PreparedDataset, algo_config, setup: Setup,
                 cohort_size: int, threads: int, eval_cohort_rows: int = 0):
        torch.set_num_threads(max(1, threads))
        gpu_ids = ray.get_gpu_ids()
        device = "cuda" if gpu_ids and torch.cuda.is_available() else "cpu"
        self.setup = Setup(**{**setup.__dict__, "device": device})
        self.index, self.placement = index, placement
        if isinstance(dataset, PreparedDataset):      # a sharded layout: read this worker's clients' rows
            dataset = dataset.load(placement.owned(index))
        self.data = DataView(dataset)
        # columns are views of the object store's buffers, not copies (read-only memory)
        self.zero_copy = all(not dataset.column(c).flags.writeable for c in dataset.table.column_names)
        self.algo = make_algorithm(algo_config, self.setup)
        if self.algo.READS_SIDE_TABLES:            # algorithms that read the dataset's side tables (graphs)
            self.algo.attach_data(dataset)
        self.cohort_size, self.eval_cohort_rows = cohort_size, eval_cohort_rows
        self.personal: Tensors = build_personal(self.algo, placement.owned(index))
        # clients whose personal state fits one evaluation call's budget (shapes never change)
        per_client = sum(v[0].numel() * v.element_size() for v in self.personal.values() if len(v))
        self.eval_max_clients = EVAL_PERSONAL_BYTES // per_client if per_client else None
        _release_freed_heap()   # init temporaries (float64 draws, concatenations) stay resident otherwise

    def _slots(self, client_ids: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(self.placement.slots(client_ids, self.index))

    def _chunks(self, client_ids: np.ndarray, split: int = 0, rows: int = 0):
        n = self.data.split_offsets[client_ids, split + 1] - self.data.split_offsets[client_ids, split]
        return cohort_chunks(client_ids, n, self.cohort_size, rows, self.eval_max_clients)

    def restore(self, shard: Tensors | None, replay: list) -> None:
        """Bring a replacement worker up to date: load its checkpointed shard (None = initial
        state), then re-train its clients of every round since that checkpoint, in order."""
        if shard is not None:
            self.load_shard(shard)
        for plan_ref, ids in replay:
            if len(ids):
                self._train(ray.get(plan_ref), ids)

    def train(self, plan: TrainPlan, client_ids: np.ndarray) -> Accumulator:
        """Train the given owned clients, cohort by cohort; return the pre-reduced accumulator."""
        return self._train(plan, client_ids)

    def _train(self, plan: TrainPlan, client_ids: np.ndarray) -> Accumulator:
        acc = Accumulator()
        cfg, dev = self.setup.train, self.setup.device
        if dev != "cpu":
            plan = TrainPlan(plan.round, {k: v.to(dev) for k, v in plan.params.items()}, plan.extra)
        for ids in self._chunks(np.asarray(client_ids, dtype=np.int64)):
            slots = self._slots(ids)
            batch = self.data.batch(ids, 0, epochs=cfg.local_epochs, seed=self.setup.seed, rnd=plan.round)
            personal = {k: v[slots].to(dev) for k, v in self.personal.items()}
            update = self.algo.train_cohort(plan, batch.to(dev), personal)
            for k, v in update.personal.items():
                self.personal[k][slots] = v.to("cpu", self.personal[k].dtype)
            acc.merge(update.acc)
        return acc.cpu()

    def evaluate(self, state: Tensors, splits: tuple[int, ...], client_ids: np.ndarray | None = None) -> dict:
        """The algorithm's evaluation partial of the owned clients (all, or the given ones) per split:
        {split: EvalPartial or None}. Pointwise: cohort chunks formed by each split's row counts.
        Ranking reads a cohort's training (and validation) rows to mask them, so its chunks are formed
        once and their batches are shared by every split."""
        ids_all = self.placement.owned(self.index) if client_ids is None \
            else np.sort(np.asarray(client_ids, dtype=np.int64))
        dev = self.setup.device
        if dev != "cpu":
            state = {k: v.to(dev) for k, v in state.items()}
        if self.algo.EVALUATION == RANKING:
            plan = [(tuple(splits), ids) for ids in self._chunks(ids_all, 0)]
        else:
            plan = [((split,), ids) for split in splits
                    for ids in self._chunks(ids_all, split, self.eval_cohort_rows)]
        parts: dict[int, list] = {split: [] for split in splits}
        for chunk_splits, ids in plan:
            personal = {k: v[self._slots(ids)].to(dev) for k, v in self.personal.items()}
            batches = _SplitBatches(self.data, ids, dev)
            for split in chunk_splits:
                part = self.algo.evaluate_cohort(state, batches, personal, split)
                if getattr(part, "FIXED_SIZE", False):     # fold now: memory independent of the cohort count
                    parts[split] = [merge_all(parts[split] + [part])]
                else:
                    parts[split].append(part)
        return {split: merge_all(p) for split, p in parts.items()}

    def personal_state(self, client_ids: np.ndarray) -> Tensors:
        """A copy of some owned clients' personal state (for inspection and tests)."""
        slots = self._slots(np.asarray(client_ids, dtype=np.int64))
        return {k: v[slots].clone() for k, v in self.personal.items()}

    def shard(self) -> Tensors:
        """This worker's personal state (all owned clients, by slot) for a checkpoint."""
        return {k: v.clone() for k, v in self.personal.items()}

    def load_shard(self, shard: Tensors) -> None:
        for k, v in self.personal.items():
            if k not in shard or shard[k].shape != v.shape:
                raise ValueError(f"checkpoint shard of worker {self.index} does not match tensor {k!r} "
                                 f"(expected shape {tuple(v.shape)})")
        self.personal = {k: shard[k].clone() for k in self.personal}

    def info(self) -> dict:
        return {"index": self.index, "pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(),
                "device": self.setup.device, "gpu_ids": ray.get_gpu_ids(), "zero_copy": self.zero_copy,
                "rows": self.data.num_rows,          # rows this worker holds (its own clients' only, when sharded)
                "personal_bytes": sum(v.numel() * v.element_size() for v in self.personal.values())}
