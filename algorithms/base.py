"""Shared machinery of algorithms whose model declares parameter roles.

Builds the model from the `Setup`, splits its tensors by role, initializes server and
personal state, evaluates cohorts and counts traffic. Concrete algorithms add
`configure_train`, `train_cohort` and `aggregate_train`.
"""
from __future__ import annotations

import numpy as np
import torch

from fleetrec.algorithms import rng
from fleetrec.algorithms.models import MODELS
from fleetrec.algorithms.protocol import FROZEN, GROUP, PRIVATE, SHARED, AlgorithmBase, CohortBatch, Setup, Tensors
from fleetrec.algorithms.vectorized import predict_cohort


def build_model(setup: Setup):
    torch.manual_seed(setup.seed)   # the one global-RNG use: identical initial model everywhere
    model = MODELS[setup.model.name](setup.model, setup.schema)
    return model.to(setup.device)


class RoleModelAlgorithm(AlgorithmBase):

    def __init__(self, config, setup: Setup):
        self.config = config
        self.setup = setup
        self.model = build_model(setup)
        roles = self.model.roles()
        named = dict(self.model.named_parameters())
        self.roles = roles
        self.frozen = {k: v.detach() for k, v in named.items() if roles[k] == FROZEN}
        self.private_names = [k for k in named if roles[k] == PRIVATE]
        self.shared_names = [k for k in named if roles[k] in (SHARED, GROUP)]
        self._initial = {k: v.detach().clone() for k, v in named.items()}

    # ---- server half
    def init_server(self) -> Tensors:
        return {k: self._initial[k] for k in self.shared_names}

    # ---- client half
    def init_personal(self, client_ids: torch.Tensor) -> Tensors:
        ids = client_ids.cpu().numpy().astype(np.uint64)

        def normal(shape_tail):
            return rng.normal_tensor(shape_tail, self.setup.seed, rng.INIT_PERSONAL, 0, ids)
        return self.model.init_private(normal, client_ids)

    def score_cohort(self, state: Tensors, batch: CohortBatch, personal: Tensors) -> torch.Tensor:
        common = {k: state[k] for k in self.shared_names}                  # one copy for the cohort
        own = {k: v for k, v in personal.items() if k not in common}
        return predict_cohort(self.model, own, self.frozen, batch, common)  # (K, L, T)

    def traffic(self) -> tuple[int, int]:
        """(bytes up, bytes down) per client per round, from the roles of the tensors sent."""
        n = sum(self._initial[k].numel() * self._initial[k].element_size() for k in self.shared_names)
        return n, n
