"""Which worker owns which client, and in which local slot its personal state lives.

The coordinator splits every cohort by owner, and each worker stacks its clients' personal
state by slot; both use one `Placement`, built the same way from the config and the dataset.

- `modulo` (default): worker `c % W` owns client `c`, in slot `c // W`. Nothing is stored, so it
  costs nothing at 10M clients, and clients of similar id spread evenly.
- `balanced`: greedy by training rows (largest client first, to the least-loaded worker), for
  federations of few unequal clients (scenarios) where `c % W` can put the two largest on one
  worker. It stores two int64 arrays of one entry per client.

Results do not depend on the policy: each client trains on its own rows with its own random
streams, and the coordinator merges float64 sums (tests/test_engine.py).
"""
from __future__ import annotations

import heapq

import numpy as np

POLICIES = ("modulo", "balanced")


class Placement:
    def __init__(self, num_clients: int, workers: int, owner: np.ndarray | None = None):
        self.num_clients, self.workers = int(num_clients), int(workers)
        self._owner = owner                        # None: modulo
        if owner is not None:
            self._owned = [np.flatnonzero(owner == w).astype(np.int64) for w in range(self.workers)]
            self._slot = np.empty(self.num_clients, dtype=np.int64)
            for ids in self._owned:
                self._slot[ids] = np.arange(len(ids))

    @classmethod
    def build(cls, policy: str, workers: int, rows_per_client: np.ndarray) -> "Placement":
        num_clients = len(rows_per_client)
        if policy == "modulo":
            return cls(num_clients, workers)
        if policy != "balanced":
            raise ValueError(f"resources.placement_policy: got {policy!r}, expected one of {', '.join(POLICIES)}")
        order = np.lexsort((np.arange(num_clients), -np.asarray(rows_per_client)))   # largest first, ties by id
        owner = np.empty(num_clients, dtype=np.int64)
        load = [(0, w) for w in range(workers)]                # (rows so far, worker): ties to the lower index
        for c in order.tolist():
            rows, w = heapq.heappop(load)
            owner[c] = w
            heapq.heappush(load, (rows + int(rows_per_client[c]), w))
        return cls(num_clients, workers, owner)

    def owner(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        return ids % self.workers if self._owner is None else self._owner[ids]

    def split(self, ids: np.ndarray) -> list[np.ndarray]:
        """`ids` per owning worker, each in the order given."""
        ids = np.asarray(ids, dtype=np.int64)
        owner = self.owner(ids)
        return [ids[owner == w] for w in range(self.workers)]

    def owned(self, worker: int) -> np.ndarray:
        """Sorted ids of the clients `worker` owns; a client's slot is its position here."""
        if self._owner is None:
            return np.arange(worker, self.num_clients, self.workers, dtype=np.int64)
        return self._owned[worker]

    def slots(self, ids: np.ndarray, worker: int) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) and np.any(self.owner(ids) != worker):
            raise ValueError(f"worker {worker} got clients it does not own")
        return ids // self.workers if self._owner is None else self._slot[ids]

    def rows_per_worker(self, rows_per_client: np.ndarray) -> np.ndarray:
        return np.bincount(self.owner(np.arange(self.num_clients)), weights=rows_per_client,
                           minlength=self.workers)
