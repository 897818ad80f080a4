"""FedPA (Zhang et al., IJCAI 2024): federated adaptation of a pre-trained recommender.

Client half: start from the client's private tensors (user attribute tables, user LoRA), the
global tensors (gates, output layer) and, for each group feature f, the server's group-LoRA
row of the client's own value v_f; train locally; keep the private tensors; upload the global
tensors and the group rows, optionally clipped and perturbed by local DP noise. Server half:
mean of the global tensors over the cohort; per (feature, value), mean of the rows uploaded
by clients with that value (values nobody uploaded keep their server copy). Both means are
unweighted by default, as in the official code. Frozen tensors are never trained or sent.

The same class runs the baselines through flags: `adapt: false` (the pre-trained model, no
training, nothing sent) and `aggregate: false` (local fine-tuning: every trained tensor stays
with its client); model flags select the trained tensors (see configs/fedpa_*.yaml).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from fleetrec.algorithms import aggregate
from fleetrec.algorithms.privacy import LocalDP
from fleetrec.algorithms.base import RoleModelAlgorithm
from fleetrec.algorithms.protocol import (GROUP, LOCAL_DP, SHARED, Accumulator, AlgorithmConfig, CohortBatch, CohortUpdate, Setup,
                                          Tensors, TrainPlan)
from fleetrec.algorithms.vectorized import predict_cohort, train_cohort_sgd


@dataclass(frozen=True)
class FedPAConfig(AlgorithmConfig):
    name: str = "fedpa"
    adapt: bool = True                # false: no local training, nothing uploaded (the pre-trained baseline)
    aggregate: bool = True            # false: local fine-tuning only; every trained tensor stays private
    shared_weighting: str = "uniform" # gates / output layer mean: uniform (code) | examples (FedAvg)
    group_weighting: str = "uniform"  # group LoRA mean per value: uniform (code) | examples

    CHECKS: ClassVar[dict] = {"shared_weighting": ("uniform", "examples"), "group_weighting": ("uniform", "examples")}

    def check_privacy(self, privacy) -> str | None:
        for key in ("shared_weighting", "group_weighting"):
            if privacy.local.enabled and getattr(self, key) == "examples":
                return (f"privacy.local: algorithm.{key}=examples sends each client's row count with its noisy "
                        f"upload, which local DP does not hide; set algorithm.{key}=uniform")
        if privacy.local.enabled and not (self.adapt and self.aggregate):
            return ("privacy.local: with algorithm.adapt=false or algorithm.aggregate=false a FedPA client uploads "
                    "nothing, so local DP would change nothing; drop privacy.local or aggregate")
        return None


# parameter-name prefix -> the part of the model it belongs to (for upload_floats)
UPLOAD_PARTS = (("group.", "group_lora"), ("gate.", "gate"), ("out_", "output_layer"), ("lora.", "user_lora"),
                ("user_vec", "user_vector"), ("user.", "user_tables"), ("item.", "item_tables"),
                ("w.", "backbone_mlp"), ("b.", "backbone_mlp"))


def _weights(kind: str, batch: CohortBatch) -> torch.Tensor:
    if kind == "examples":
        return batch.n_rows.double()
    return torch.ones(batch.size, dtype=torch.float64, device=batch.mask.device)


class FedPA(RoleModelAlgorithm):
    Config = FedPAConfig
    PRIVACY = frozenset({LOCAL_DP})   # the paper's LDP on each upload (privacy.local); uploads are not deltas
    LR_SCHEDULE = True
    EXAMPLES = {"synthetic": {
        "data.num_clients": 37, "data.num_items": 40, "data.rows_min": 5, "data.rows_max": 30,
        "federation.clients_per_round": 20, "resources.workers": 2, "resources.cpus_per_worker": 0.5,
        "model.name": "fedpa", "model.group_features": "[group_0,group_1]", "train.optimizer": "adam"}}

    def __init__(self, config: FedPAConfig, setup: Setup):
        super().__init__(config, setup)
        groups = self.model.group_params
        self.group_names = [k for k in self.shared_names if self.roles[k] == GROUP]
        self.global_names = [k for k in self.shared_names if self.roles[k] == SHARED]
        self.group_feature = {k: groups[k] for k in self.group_names}
        if not config.aggregate:
            if self.group_names:
                raise ValueError("algorithm.aggregate: false (local fine-tuning) needs model.group_lora: false")
            self.private_names = self.private_names + self.global_names
            self.global_names = []
        self.ldp = LocalDP(setup, {k: tuple(self._initial[k].shape) for k in self.global_names + self.group_names})
        meta = self.model.backbone_meta
        private = meta.get("private_clients")
        if private is not None and private != setup.num_clients:
            raise ValueError(
                f"model.backbone was pre-trained with {meta.get('open_clients')} open clients held out of "
                f"{meta.get('total_clients')}; stage 2 must federate the {private} private clients only, but the "
                f"dataset has {setup.num_clients}: build it with fleetrec.simulator.run.federated_dataset(cfg)")

    # ---- server half
    def init_server(self) -> Tensors:
        state = {k: self._initial[k] for k in self.global_names}
        if self.group_names:
            state.update(self.model.init_group_tables(self.setup.seed))
        return state

    def configure_train(self, rnd: int, state: Tensors, cohort: torch.Tensor) -> TrainPlan:
        return TrainPlan(round=rnd, params={k: state[k] for k in self.global_names + self.group_names})

    def aggregate_train(self, rnd: int, state: Tensors, acc: Accumulator) -> tuple[Tensors, dict]:
        new = dict(state)
        for k in self.global_names:
            if acc.weight > 0 and k in acc.sums:      # nothing is summed when not adapting
                new[k] = (acc.sums[k] / acc.weight).to(state[k].dtype)
        for k in self.group_names:
            w = acc.group_weight.get(self.group_feature[k])
            if w is None or k not in acc.group_sums:
                continue
            has = aggregate.bcast(w > 0, state[k])                            # (V, 1, 1)
            mean = acc.group_sums[k] / aggregate.bcast(w.clamp(min=1e-300), state[k])
            new[k] = torch.where(has, mean.to(state[k].dtype), state[k])
        return new, {**aggregate.mean_stats(acc), **self.ldp.metrics(rnd)}

    # ---- client half
    def init_personal(self, client_ids: torch.Tensor) -> Tensors:
        out = super().init_personal(client_ids)
        K = int(client_ids.shape[0])
        for k in self.private_names:
            if k not in out:           # local fine-tuning: the client's own copy of a global tensor
                out[k] = self._initial[k].expand(K, *self._initial[k].shape).clone()
        return out

    def _group_rows(self, tables: Tensors, batch: CohortBatch) -> Tensors:
        """Each client's own rows of the group tables: name -> (K, ...) (a gather, so a new tensor)."""
        return {k: tables[k][batch.client_attrs[self.group_feature[k]]] for k in self.group_names}

    def _cohort_params(self, tables: Tensors, batch: CohortBatch, personal: Tensors) -> Tensors:
        K = batch.size
        params = dict(personal)
        for k in self.global_names:
            params[k] = tables[k].expand(K, *tables[k].shape).clone()
        params.update(self._group_rows(tables, batch))
        return params

    def train_cohort(self, plan: TrainPlan, batch: CohortBatch, personal: Tensors) -> CohortUpdate:
        acc = Accumulator()
        if not self.config.adapt:
            loss = self._loss(plan.params, batch, personal)
            aggregate.fold_weighted(acc, {}, _weights("uniform", batch), {"train_loss": loss})
            return CohortUpdate(personal=personal, acc=acc)
        params = self._cohort_params(plan.params, batch, personal)
        params, loss = train_cohort_sgd(self.model, params, self.frozen, batch, self.setup.train, batch.order,
                                        plan.round)
        # the paper's LDP (privacy.local): every uploaded tensor, the client's own group rows included
        up = self.ldp.apply({k: params[k] for k in self.global_names + self.group_names}, plan.round, batch.client_ids)
        groups = {k: up[k] for k in self.group_names}
        ok = aggregate.finite_clients(groups) if groups else torch.ones_like(loss, dtype=torch.bool)
        loss = torch.where(ok, loss, torch.full_like(loss, float("nan")))   # a non-finite row drops the client
        keep = aggregate.fold_weighted(acc, {k: up[k] for k in self.global_names},
                                       _weights(self.config.shared_weighting, batch), {"train_loss": loss})
        gw = torch.where(keep, _weights(self.config.group_weighting, batch), 0.0)
        for f in dict.fromkeys(self.group_feature.values()):
            names = [k for k in self.group_names if self.group_feature[k] == f]
            vals = {k: torch.where(aggregate.bcast(keep, up[k]), up[k], 0.0) for k in names}
            aggregate.fold_grouped(acc, vals, gw, batch.client_attrs[f], self.model.group_vocab[f], f)
        new_personal = {k: torch.where(aggregate.bcast(keep, params[k]), params[k], personal[k])
                        for k in self.private_names}
        return CohortUpdate(personal=new_personal, acc=acc)

    def _loss(self, tables: Tensors, batch: CohortBatch, personal: Tensors) -> torch.Tensor:
        """(K,) mean BCE of each client's training rows under the current model (no training)."""
        prob = self.score_cohort(tables, batch, personal).clamp(1e-7, 1 - 1e-7)   # (K, L, T)
        y = batch.labels
        bce = -(y * prob.log() + (1 - y) * (1 - prob).log()).mean(-1)                 # (K, L)
        return (bce * batch.mask).sum(1) / batch.mask.sum(1).clamp(min=1.0)

    def score_cohort(self, state: Tensors, batch: CohortBatch, personal: Tensors) -> torch.Tensor:
        common = {k: state[k] for k in self.global_names}                   # one copy for the cohort
        params = {**{k: v for k, v in personal.items() if k not in common}, **self._group_rows(state, batch)}
        return predict_cohort(self.model, params, self.frozen, batch, common)   # (K, L, T)

    def upload_floats(self) -> dict[str, int]:
        """Floats one client uploads per round, by part of the model, counted from the roles: every
        SHARED tensor (gates, output layer, and whatever else a baseline trains and averages) plus
        one row of every GROUP tensor (the client's own value v_f). Private and frozen tensors are
        never sent; nothing is sent when not adapting. Downloads are the same tensors."""
        if not self.config.adapt:
            return {}
        named = dict(self.model.named_parameters())
        out: dict[str, int] = {}
        for k in self.global_names + self.group_names:
            part = next(p for pre, p in UPLOAD_PARTS if k.startswith(pre))
            out[part] = out.get(part, 0) + named[k].numel()
        return out

    def traffic(self) -> tuple[int, int]:
        """(bytes up, bytes down) per client per round: `upload_floats` at the tensors' width."""
        if not self.config.adapt:
            return 0, 0
        named = dict(self.model.named_parameters())
        n = sum(named[k].numel() * named[k].element_size() for k in self.global_names + self.group_names)
        return n, n
