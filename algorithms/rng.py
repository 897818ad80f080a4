"""Counter-based randomness: every draw is a pure function of (seed, stream, round, client, index).

A million clients cannot each own a `Generator` object, and results must not depend on
which worker owns a client or how cohorts are chunked. So draws are computed, vectorized,
by hashing the coordinates with SplitMix64 -- the same value for the same coordinates,
whatever else is computed alongside.
"""
from __future__ import annotations

import numpy as np
import torch

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)

# Stream ids, the one table: every use of randomness in the engine and the algorithms has its own
# id, so no two uses share draws (tests/test_layout.py checks that the ids are distinct). The
# numbers are part of every published result: renaming is free, renumbering changes the draws.
# Data generators and partitioners (fleetrec.datasets, which imports nothing of ours) seed their
# NumPy generators with [seed, 7000-9999]: outside this table's range.
INIT_PERSONAL = 1        # personal tensors of a client at first sight (algorithms/base.py)
MINIBATCH_ORDER = 2      # row order of every local epoch (simulator/cohort.py)
NOISE = 3                # Gaussian noise of central DP (privacy.py) and of FedPA's local DP
SAMPLE = 4               # the clients of a round (simulator/coordinator.py, simulator/system.py)
AVAILABILITY = 11        # which clients are online in a round (simulator/system.py)
CLIENT_DROPOUT = 12      # which sampled clients drop out of a round (simulator/system.py)
PROFILE = 13             # each client's speed profile (simulator/system.py)
NN_DROPOUT = 17          # torch dropout masks of a scenario client's local training (scenario.py)
POOLED_SHUFFLE = 23      # minibatches of the pooled centralized baseline (scenario.py)
RLW = 101                # random loss weights (combiners/weighting.py)
PCGRAD = 102             # PCGrad's projection order (combiners/surgery.py)
MF_NEGATIVES = 201       # BPR negative items (pmtrec.py)
MF_SOCIAL = 202          # sampled trust edges (pmtrec.py)
MF_PAIRS = 203           # sampled co-view pairs (pmtrec.py)
MF_STEP = 204            # per-step draws of the MF trainers (pmtrec.py)
MF_INIT_USERS = 301      # initial user factors (pmtrec.py)
MF_INIT_ITEMS = 302      # initial item factors (pmtrec.py)


def _mix(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        z ^= z >> np.uint64(31)
    return z


def hash_u64(*coords) -> np.ndarray:
    """Hash broadcastable integer coordinates to uint64 (SplitMix64 chained over coordinates)."""
    arrays = np.broadcast_arrays(*[np.asarray(c).astype(np.uint64) for c in coords])
    h = np.zeros(arrays[0].shape, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for a in arrays:
            h = _mix(h + _GOLDEN + a)
    return h


def uniform(*coords) -> np.ndarray:
    """Uniform floats in (0, 1) from 53 hashed bits, float64."""
    h = hash_u64(*coords)
    return ((h >> np.uint64(11)).astype(np.float64) + 0.5) * (1.0 / 9007199254740992.0)


def normal(*coords) -> np.ndarray:
    """Standard normal draws (Box-Muller on two independent hashed uniforms), float64."""
    u1 = uniform(*coords, 0)
    u2 = uniform(*coords, 1)
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


def normal_tensor(shape_tail: tuple[int, ...], seed: int, stream: int, rnd: int,
                  clients: np.ndarray, std: float = 1.0) -> torch.Tensor:
    """(K, *shape_tail) float32 normal draws, one independent block per client id."""
    n = int(np.prod(shape_tail)) if shape_tail else 1
    idx = np.arange(n, dtype=np.uint64)
    z = normal(seed, stream, rnd, np.asarray(clients, dtype=np.uint64)[:, None], idx[None, :])
    return torch.from_numpy((z * std).astype(np.float32)).reshape(len(clients), *shape_tail)


def laplace_tensor(shape_tail: tuple[int, ...], seed: int, stream: int, rnd: int,
                   clients: np.ndarray, scale: float = 1.0) -> torch.Tensor:
    """(K, *shape_tail) float32 Laplace(0, scale) draws by inverse CDF."""
    n = int(np.prod(shape_tail)) if shape_tail else 1
    idx = np.arange(n, dtype=np.uint64)
    u = uniform(seed, stream, rnd, np.asarray(clients, dtype=np.uint64)[:, None], idx[None, :]) - 0.5
    z = -scale * np.sign(u) * np.log1p(-2.0 * np.abs(u))
    return torch.from_numpy(z.astype(np.float32)).reshape(len(clients), *shape_tail)


def row_keys(seed: int, stream: int, rnd: int, rows: np.ndarray) -> np.ndarray:
    """One uint64 key per global row index; sorting a client's rows by key shuffles them."""
    return hash_u64(seed, stream, rnd, rows)


def torch_generator(seed: int, stream: int, step: int) -> torch.Generator:
    """A torch.Generator whose state is a pure function of (seed, stream, step), for the draws
    that torch makes itself (random loss weights, PCGrad's order, BPR negatives)."""
    return torch.Generator().manual_seed(int(hash_u64(seed, stream, step)) & ((1 << 63) - 1))
