"""Client availability and system heterogeneity on a virtual clock.

Each round: a client is online with its availability probability (or per a trace), the
server over-commits the cohort, each selected client may drop out, and the rest finish at a
virtual time = compute (training rows / device speed) + communication (bytes / bandwidth).
Clients past the round deadline are stragglers and are dropped; with over-commitment the
first `clients_per_round` finishers are kept. All draws are pure functions of
(seed, round, client), vectorized over clients.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from fleetrec.algorithms import rng
from fleetrec.simulator.config_loader import ConfigError


@dataclass(frozen=True)
class SystemConfig:
    availability: float = 1.0                   # probability a client is online in a round
    availability_trace: str | None = None       # .npy / .csv 0-1 matrix (clients x periods); round r uses column r % periods
    dropout: float = 0.0                        # probability a selected client drops out mid-round
    overcommit: float = 1.0                     # select ceil(overcommit * clients_per_round), keep the first finishers
    deadline_s: float = 0.0                     # virtual round deadline; 0 = none (no stragglers)
    rows_per_second: float = 200.0              # training rows a speed-1.0 device processes per second
    speeds: tuple[float, ...] = (1.0,)          # device speed profiles (relative), assigned by a seeded hash
    bandwidths: tuple[float, ...] = (1.0e6,)    # bytes/s of each profile (same length as speeds)
    profile_weights: tuple[float, ...] = (1.0,)  # share of clients in each profile

    CHECKS: ClassVar[dict] = {"availability": "0..1", "dropout": "0..1", "overcommit": ">=1",
                              "deadline_s": ">=0", "rows_per_second": ">0"}

    def validate(self) -> str | None:
        n = len(self.speeds)
        if not (len(self.bandwidths) == len(self.profile_weights) == n) or n == 0:
            return (f"system: speeds, bandwidths and profile_weights must have the same non-zero length "
                    f"(one entry per device profile; got {n}, {len(self.bandwidths)} and {len(self.profile_weights)})")
        for name in ("speeds", "bandwidths"):
            if min(getattr(self, name)) <= 0:
                return f"system.{name}: got {list(getattr(self, name))}, expected every value > 0"
        if min(self.profile_weights) < 0 or sum(self.profile_weights) <= 0:
            return f"system.profile_weights: got {list(self.profile_weights)}, expected values >= 0 with a positive sum"
        return None

    @property
    def active(self) -> bool:
        return (self.availability < 1.0 or self.availability_trace is not None or self.dropout > 0
                or self.deadline_s > 0 or self.overcommit > 1.0)


def load_trace(path: str, num_clients: int) -> np.ndarray:
    """(clients, periods) bool matrix from a .npy or .csv file of 0/1 values."""
    p = Path(path)
    try:
        m = np.load(p) if p.suffix == ".npy" else np.loadtxt(p, delimiter=",", ndmin=2)
    except (OSError, ValueError) as e:
        raise ConfigError(f"system.availability_trace: cannot read {p} ({e})") from None
    if m.ndim != 2 or m.shape[0] != num_clients or not np.isin(m, (0, 1)).all():
        raise ConfigError(f"system.availability_trace: {p} must be a 0/1 matrix with one row per client "
                          f"({num_clients}), got shape {m.shape}")
    return m.astype(bool)


class SystemModel:
    def __init__(self, cfg: SystemConfig, seed: int, num_clients: int, train_rows: np.ndarray,
                 bytes_per_client: int, local_epochs: int):
        self.cfg, self.seed = cfg, seed
        self.trace = load_trace(cfg.availability_trace, num_clients) if cfg.availability_trace else None
        w = np.asarray(cfg.profile_weights, dtype=np.float64)
        u = rng.uniform(seed, rng.PROFILE, np.arange(num_clients))
        self.profile = np.searchsorted(np.cumsum(w / w.sum()), u, side="right").clip(0, len(w) - 1)  # (C,)
        self.train_rows = train_rows
        self.bytes = bytes_per_client
        self.epochs = local_epochs

    def available(self, rnd: int, num_clients: int) -> np.ndarray:
        """Ids of the clients online in round `rnd`."""
        ids = np.arange(num_clients)
        on = rng.uniform(self.seed, rng.AVAILABILITY, rnd, ids) < self.cfg.availability
        if self.trace is not None:
            on &= self.trace[:, rnd % self.trace.shape[1]]
        return ids[on]

    def completion_time(self, clients: np.ndarray) -> np.ndarray:
        p = self.profile[clients]
        speed = np.asarray(self.cfg.speeds)[p] * self.cfg.rows_per_second
        bw = np.asarray(self.cfg.bandwidths)[p]
        return self.train_rows[clients] * self.epochs / speed + self.bytes / bw

    def select(self, rnd: int, num_clients: int, k: int) -> tuple[np.ndarray, dict]:
        """The clients whose updates arrive in round `rnd`, and the round's system record."""
        online = self.available(rnd, num_clients)
        want = min(int(np.ceil(self.cfg.overcommit * k)), len(online))
        g = np.random.default_rng([self.seed, rng.SAMPLE, rnd])
        picked = np.sort(g.choice(online, size=want, replace=False)) if want else online[:0]
        dropped = rng.uniform(self.seed, rng.CLIENT_DROPOUT, rnd, picked) < self.cfg.dropout
        t = self.completion_time(picked)
        late = (t > self.cfg.deadline_s) if self.cfg.deadline_s > 0 else np.zeros(len(picked), bool)
        ok = picked[~dropped & ~late]
        t_ok = t[~dropped & ~late]
        if len(ok) > k:                                   # over-commitment: first k finishers
            keep = np.argsort(t_ok, kind="stable")[:k]
            ok, t_ok = ok[keep], t_ok[keep]
        clock = float(t_ok.max()) if len(t_ok) else 0.0
        if self.cfg.deadline_s > 0 and (late.any() or len(ok) < k):
            clock = self.cfg.deadline_s                   # the server waited until the deadline
        record = {"system/online": int(len(online)), "system/sampled": int(len(picked)),
                  "system/dropped_out": int(dropped.sum()), "system/stragglers": int((late & ~dropped).sum()),
                  "system/completed": int(len(ok)), "system/virtual_seconds": clock}
        return np.sort(ok), record
