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

# Stream ids: one per use, so different uses never share draws.
INIT_PERSONAL, MINIBATCH_ORDER, NOISE, SAMPLE, DROPOUT = 1, 2, 3, 4, 5


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
