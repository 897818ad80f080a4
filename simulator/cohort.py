"""Gathering a cohort's rows from the shared table into padded tensors: one vectorized gather.

`DataView` wraps the worker's zero-copy view of the `FederatedDataset` columns as tensors.
Minibatch order is a pure function of (seed, round, epoch, global row), so a client's
training does not depend on which other clients share its cohort or worker.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

from fleetrec.algorithms import rng
from fleetrec.algorithms.protocol import CohortBatch
from fleetrec.datasets.federated import FederatedDataset

_PAD_KEY = np.iinfo(np.uint64).max


def _tensor(a: np.ndarray) -> torch.Tensor:
    with warnings.catch_warnings():          # object-store buffers are read-only; we never write them
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)


class DataView:
    def __init__(self, ds: FederatedDataset):
        s = ds.schema
        self.schema = s
        self.split_offsets = ds.split_offsets                                   # (C, 4)
        self.num_rows = ds.num_rows
        self.categorical = {f.name: _tensor(ds.column(f.name)) for f in s.categorical}
        num = [ds.column(c) for c in s.numeric]
        self.numeric = _tensor(np.stack(num, 1)) if num else None                # (N, M)
        self.labels = _tensor(np.stack([ds.column(t) for t in s.tasks], 1))    # (N, T)
        if self.num_rows == 0:      # a shard whose clients own no rows: one zero row for the (masked) padding
            self.categorical = {k: v.new_zeros(1) for k, v in self.categorical.items()}
            self.numeric = None if self.numeric is None else self.numeric.new_zeros(1, self.numeric.shape[1])
            self.labels = self.labels.new_zeros(1, self.labels.shape[1])
        self.client_attrs = {f.name: _tensor(ds.client_attr(f.name)) for f in s.client_categorical}
        # a shard of a larger dataset: local row + shift[client] = the full dataset's row (the key of its order)
        self.row_shift = None if ds.row_base is None else ds.row_base - ds.offsets[:-1]

    def rows(self, client_ids: np.ndarray, split: int) -> tuple[np.ndarray, np.ndarray]:
        """(K, L) global row indices of each client's rows of `split` (padding repeats a valid
        row index) and (K,) real counts."""
        so = self.split_offsets[client_ids]
        start, n = so[:, split], so[:, split + 1] - so[:, split]                 # (K,)
        L = max(int(n.max()) if len(n) else 0, 1)
        pos = np.arange(L)[None, :]                                              # (1, L)
        idx = start[:, None] + np.minimum(pos, np.maximum(n[:, None] - 1, 0))    # (K, L)
        # a client with no rows of this split pads with its split start, which may be one past
        # the table's end (last client); padded rows are masked, any valid index will do
        return np.minimum(idx, max(self.num_rows - 1, 0)), n

    def batch(self, client_ids: np.ndarray, split: int, epochs: int = 0, seed: int = 0,
              rnd: int = 0) -> CohortBatch:
        idx, n = self.rows(client_ids, split)
        K, L = idx.shape
        mask = np.arange(L)[None, :] < n[:, None]                               # (K, L)
        t_idx = torch.from_numpy(idx)
        order = None
        if epochs:
            orders = []
            key_rows = idx if self.row_shift is None else idx + self.row_shift[client_ids][:, None]
            for e in range(epochs):
                keys = rng.row_keys(seed, rng.MINIBATCH_ORDER, rnd * 1009 + e, key_rows)   # (K, L) uint64
                keys[~mask] = _PAD_KEY                                           # padding sorts last
                orders.append(np.argsort(keys, axis=1, kind="stable"))
            order = torch.from_numpy(np.stack(orders))                           # (E, K, L)
        ids = torch.from_numpy(np.asarray(client_ids, dtype=np.int64))
        numeric = self.numeric[t_idx] if self.numeric is not None else torch.zeros(K, L, 0)
        return CohortBatch(
            client_ids=ids, n_rows=torch.from_numpy(n.astype(np.int64)),
            categorical={k: v[t_idx] for k, v in self.categorical.items()},
            numeric=numeric, labels=self.labels[t_idx],
            mask=torch.from_numpy(mask.astype(np.float32)),
            client_attrs={k: v[ids] for k, v in self.client_attrs.items()},
            order=order)
