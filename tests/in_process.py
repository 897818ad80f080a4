"""Both halves of an algorithm in the test process, without Ray: the server state, every client's
personal state, and rounds of configure_train -> train_cohort -> aggregate_train over a cohort.

The engine adds placement, routing, checkpoints and the driver loop on top of exactly these calls;
tests that check an algorithm's own arithmetic (aggregation rules, privacy noise, ablation flags)
use this and leave the engine's part to the tests that run on Ray.
"""
from __future__ import annotations

import numpy as np
import torch

from fleetrec.algorithms import make_algorithm
from fleetrec.datasets.federated import TEST
from fleetrec.simulator.cohort import DataView
from fleetrec.simulator.config import make_setup


class InProcess:
    def __init__(self, cfg, ds=None):
        self.cfg = cfg
        self.ds = cfg.data.build(cfg.seed) if ds is None else ds
        setup = make_setup(cfg, self.ds)
        self.setup = setup
        self.server = make_algorithm(cfg.algorithm, setup)
        self.client = make_algorithm(cfg.algorithm, setup)
        if self.client.READS_SIDE_TABLES:
            self.client.attach_data(self.ds)
        self.state = self.server.init_server()
        self.ids = np.arange(self.ds.num_clients)
        self.personal = self.client.init_personal(torch.from_numpy(self.ids))
        self.view = DataView(self.ds)
        self.last_acc = None

    def round(self, rnd: int, ids=None) -> dict:
        """One round over `ids` (default: every client); returns the server's round statistics."""
        ids = self.ids if ids is None else np.asarray(ids)
        plan = self.server.configure_train(rnd, self.state, torch.from_numpy(ids))
        batch = self.view.batch(ids, 0, epochs=self.cfg.train.local_epochs, seed=self.cfg.seed, rnd=rnd)
        own = {k: v[ids] for k, v in self.personal.items()}
        update = self.client.train_cohort(plan, batch, own)
        for k, v in update.personal.items():
            self.personal[k][ids] = v
        self.last_acc = update.acc.cpu()
        self.state, stats = self.server.aggregate_train(rnd, self.state, self.last_acc)
        return stats

    def scores(self, split=TEST) -> torch.Tensor:
        batch = self.view.batch(self.ids, split)
        return self.client.score_cohort(self.state, batch, self.personal)

    def evaluate(self, split: str = "val", ids=None) -> dict:
        """The algorithm's own evaluation of one split over `ids` (default: every client)."""
        ids = self.ids if ids is None else np.asarray(ids)
        splits = {s: self.view.batch(ids, s) for s in (0, 1, 2)}
        own = {k: v[ids] for k, v in self.personal.items()}
        index = {"train": 0, "val": 1, "test": 2}[split]
        return self.client.aggregate_evaluate(split, self.client.evaluate_cohort(self.state, splits, own, index))
