"""Scenario clients: few clients (business scenarios), each with many rows, and a multi-task model.

Length: one client loop and the seven baselines that are variants of it (a few lines each); kept
together so that every variant reads as a difference from the loop above it.

Shared machinery of PF-MSMTrec (`algorithms/pfmsm.py`) and its baselines: local-only,
centralized on pooled data, FedAvg, FedProx, FedBN, FedPer and Ditto over the MTL models of
`algorithms/models/mtl.py` (Shared-Bottom, MMoE, PLE; `model.name`).

- Every client's whole model (parameters and BatchNorm buffers) is its personal state, stacked
  per tensor in the worker that owns it under the key `m.<name>`. The server state holds only
  what is aggregated; at the start of a round (and for evaluation) the server's tensors replace
  the client's copy of those names.
- A cohort is a handful of heavy clients, so each client trains an ordinary minibatch loop
  (`torch.func.functional_call`, Adam or SGD per `train:`) over its own rows, in the order the
  engine drew for this round. BatchNorm running statistics are updated during training and kept
  with the client. Dropout draws from a generator seeded by (seed, round, client).
- Evaluation runs in eval mode, chunked over rows so a client with 250k rows fits.
- The loss is the mean over tasks of the binary cross-entropy, plus (μ/2)·||θ − θ_ref||² over the
  aggregated tensors when the algorithm sets a reference (FedProx, Ditto, PF-MSMTrec).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call

from fleetrec.algorithms import aggregate, rng, server_opt
from fleetrec.algorithms.base import build_model
from fleetrec.algorithms.models.template import bn_tensor
from fleetrec.datasets.federated import CategoricalField
from fleetrec.algorithms.privacy import CentralDP, LocalDP
from fleetrec.algorithms.state import TensorState
from fleetrec.algorithms.server_opt import ServerOptimizerConfig
from fleetrec.algorithms.protocol import (CENTRAL_DP, LOCAL_DP, PRIVATE, SHARED, Accumulator, AlgorithmBase, AlgorithmConfig, CohortBatch,
                                          CohortUpdate, Setup, Tensors, TrainPlan)

EVAL_CHUNK = 65536          # rows per forward pass in evaluation


@dataclass(frozen=True)
class ScenarioPersonal(TensorState):
    """A scenario client's personal state: its own copy of every model tensor, (K, ...)."""
    m: dict[str, torch.Tensor]


@dataclass(frozen=True)
class DittoPersonal(TensorState):
    """Ditto's: the model of the FedAvg local steps and the personal model it is evaluated with."""
    m: dict[str, torch.Tensor]
    p: dict[str, torch.Tensor]


def scenario_input(schema) -> CategoricalField | None:
    """The per-row input field `scenario` (the client's scenario attribute) that scenario models embed,
    so that a model trained on several scenarios' rows (centralized, FedAvg) can tell them apart;
    None when the dataset names no scenario attribute or already has a row field of that name."""
    if schema.scenario is None or any(f.name == "scenario" for f in schema.categorical):
        return None
    return CategoricalField("scenario", schema.vocab(schema.scenario))


def _client_seed(seed: int, rnd: int, client: int, stream: int) -> int:
    return int(np.random.default_rng([seed, stream, rnd, client]).integers(2**62))


EMBED = "embed.emb."        # embedding tables: embed.emb.<field>.weight (models/mtl.py)
ROW_WEIGHT = "rows."        # accumulator key prefix: per-row weight of the clients that touched a row


def embedding_field(name: str) -> str | None:
    """The categorical field of an embedding table name, None for any other tensor."""
    return name[len(EMBED):-len(".weight")] if name.startswith(EMBED) and name.endswith(".weight") else None


# ----------------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class ScenarioBaseConfig(AlgorithmConfig):
    """Options of every scenario algorithm's local training."""
    name: str = "scenario"
    # weight decay (train.weight_decay) on embedding tables: "none", or "l2" as on every other tensor.
    # Adam's coupled L2 moves every row a client never sees (its gradient is wd·θ, which Adam
    # normalizes to a step of ~lr), so rows of other scenarios' items shrink at every local step.
    embedding_decay: str = "none"

    CHECKS: ClassVar[dict] = {"embedding_decay": ("none", "l2")}


@dataclass(frozen=True)
class ScenarioFedAvgConfig(ScenarioBaseConfig):
    """FedAvg over scenario clients; `local_bn` gives FedBN, `local_towers` FedPer, `mu` FedProx."""
    name: str = "scenario_fedavg"
    # embedding tables: a row is averaged over the clients whose training rows use it ("per_row"), or
    # over every client ("dense": a row trained by one scenario is diluted by the others' stale copies)
    embedding_average: str = "per_row"
    mu: float = 0.0                   # proximal weight (μ/2)·||θ − θ_global||² in local training (FedProx)
    local_bn: bool = False            # BatchNorm weights and statistics never leave the client (FedBN)
    local_towers: bool = False        # task towers stay local (FedPer)
    weighting: str = "examples"       # examples: weight by training rows; uniform: every client 1
    server_lr: float = 1.0            # η of the server rule on the mean delta
    server_optimizer: ServerOptimizerConfig = field(default_factory=ServerOptimizerConfig)   # sgd / adam / ...

    CHECKS: ClassVar[dict] = {**ScenarioBaseConfig.CHECKS, "mu": ">=0", "weighting": ("examples", "uniform"),
                              "server_lr": ">0", "embedding_average": ("per_row", "dense")}

    def check_privacy(self, privacy) -> str | None:
        if privacy.enabled and self.embedding_average == "per_row":
            return ("privacy.enabled: algorithm.embedding_average=per_row divides each row by how many clients "
                    "used it, a count central DP does not cover; set algorithm.embedding_average=dense")
        if privacy.local.enabled and self.embedding_average == "per_row":
            return ("privacy.local: algorithm.embedding_average=per_row uploads which embedding rows a client used, "
                    "which local DP does not hide; set algorithm.embedding_average=dense")
        if privacy.local.enabled and self.weighting == "examples":
            return ("privacy.local: algorithm.weighting=examples sends each client's row count with its noisy update, "
                    "which local DP does not hide; set algorithm.weighting=uniform")
        if privacy.local.enabled and not self.local_bn:
            return ("privacy.local: noise on BatchNorm running variances (clamped at 1e-5 by the server) can blow up "
                    "activations; keep BatchNorm local with algorithm.local_bn=true (FedBN)")
        return super().check_privacy(privacy)


@dataclass(frozen=True)
class ScenarioFedProxConfig(ScenarioFedAvgConfig):
    name: str = "scenario_fedprox"
    mu: float = 0.01


@dataclass(frozen=True)
class ScenarioFedBNConfig(ScenarioFedAvgConfig):
    name: str = "scenario_fedbn"
    local_bn: bool = True


@dataclass(frozen=True)
class ScenarioFedPerConfig(ScenarioFedAvgConfig):
    name: str = "scenario_fedper"
    local_towers: bool = True


@dataclass(frozen=True)
class ScenarioDittoConfig(ScenarioFedAvgConfig):
    """Ditto: a global model by FedAvg, plus a personal model trained with (λ/2)·||v − w_global||²."""
    name: str = "scenario_ditto"
    ditto_lambda: float = 0.1         # λ of the personal model's proximal term

    CHECKS: ClassVar[dict] = {**ScenarioFedAvgConfig.CHECKS, "ditto_lambda": ">=0"}


@dataclass(frozen=True)
class ScenarioLocalConfig(ScenarioBaseConfig):
    """Local-only: every scenario trains its own model; nothing is sent."""
    name: str = "scenario_local"


@dataclass(frozen=True)
class ScenarioCentralizedConfig(ScenarioBaseConfig):
    """Centralized: one model trained on all scenarios' training rows interleaved, evaluated per scenario.
    Needs every client in one training call: resources.workers=1, federation.cohort_size and
    federation.clients_per_round >= the number of scenarios."""
    name: str = "scenario_centralized"


# a tiny run of three scenarios with an MMoE (the registry-wide tests run every algorithm on it)
SCENARIO_EXAMPLE = {
    "data.name": "synthetic_multi_scenario", "data.rows": "[300,200,120]", "data.num_users": 40,
    "data.num_items": 30, "data.num_numeric": 2,
    "model.name": "mmoe", "model.embed_dim": 4, "model.num_global_experts": 2, "model.num_task_experts": 1,
    "model.num_scenario_experts": 1, "model.expert": "[8]", "model.tower": "[4]", "model.dropout": 0.1,
    "train.batch_size": 64, "train.lr": 0.01, "train.optimizer": "adam",
    "federation.clients_per_round": 3, "federation.cohort_size": 3,
    "resources.workers": 2, "resources.cpus_per_worker": 0.5,
}


# ----------------------------------------------------------------------------------- base
class ScenarioAlgorithm(AlgorithmBase):
    """Client half shared by every scenario algorithm, and the FedAvg-style server half."""
    EXAMPLES = {"mmoe": SCENARIO_EXAMPLE}
    Personal: ClassVar[type] = ScenarioPersonal     # the typed personal state (Ditto adds its personal model)

    def __init__(self, config, setup: Setup):
        self.config = config
        self.setup = setup
        self.scenario_field = scenario_input(setup.schema)
        if self.scenario_field is not None:     # the model also embeds the row's scenario (the client attribute)
            f = self.scenario_field
            schema = dataclasses.replace(setup.schema, categorical=setup.schema.categorical + (f,))
            setup = dataclasses.replace(setup, schema=schema)
        self.model = build_model(setup)
        if not self.model.MULTI_TASK:
            raise ValueError(f"algorithm.name={config.name!r} needs a multi-task model "
                             f"(model.name: shared_bottom, mmoe, ple, star, pepnet or m2m), got model.name={setup.model.name!r}")
        sd = self.model.state_dict()
        self.param_names = [n for n, _ in self.model.named_parameters()]
        self.float_names = [n for n, v in sd.items() if v.is_floating_point()]
        self.all_names = list(sd)
        self.template = self.model.state_roles()
        self._initial = {k: v.detach().clone() for k, v in sd.items()}
        self.shared_names = self.select_shared()
        self.dp = CentralDP(setup)                # off unless privacy.enabled (declared: the FedAvg family)
        self.ldp = LocalDP(setup, {n: tuple(self._initial[n].shape) for n in self.shared_names})   # privacy.local
        self.sends_deltas = self.dp.enabled or self.ldp.enabled   # the clients' (noisy / clipped) deltas are summed

    # ---- which tensors the server holds, the proximal weight, client weights; subclasses override
    def select_shared(self) -> list[str]:
        return list(self.float_names)

    def proximal_mu(self) -> float:
        return 0.0

    def weights(self, batch: CohortBatch) -> torch.Tensor:
        return batch.n_rows.double()

    def roles(self) -> dict[str, str]:
        return {n: SHARED if n in self.shared_names else PRIVATE for n in self.all_names}

    # ---- server half
    def init_server(self) -> Tensors:
        return {k: self._initial[k].clone() for k in self.shared_names}

    def configure_train(self, rnd: int, state: Tensors, cohort: torch.Tensor) -> TrainPlan:
        return TrainPlan(round=rnd, params={k: state[k] for k in self.shared_names})

    def aggregate_train(self, rnd: int, state: Tensors, acc: Accumulator) -> tuple[Tensors, dict]:
        stats = aggregate.mean_stats(acc)
        if self.sends_deltas:                     # the (noisy) mean of the clipped / locally noised deltas
            mean = self.dp.mean_delta(acc, rnd)
            delta = {} if mean is None else {k: mean[k].to(state[k].dtype) for k in self.shared_names}
            return self.server_step(state, delta), {**stats, **self.dp.metrics(rnd), **self.ldp.metrics(rnd)}
        if acc.weight <= 0:
            return dict(state), stats
        means = {k: (acc.sums[k] / acc.weight).to(state[k].dtype) for k in self.shared_names}
        for k in self.per_row_tables():           # rows nobody used keep the server's value
            w = acc.sums[ROW_WEIGHT + k]
            rows = acc.sums[k] / w.clamp_min(1e-300).unsqueeze(1)
            means[k] = torch.where((w > 0).unsqueeze(1), rows, state[k].double()).to(state[k].dtype)
        if self.plain_average():                  # the weighted mean of the clients' tensors, exactly
            return {**state, **means}, stats
        return self.server_step(state, {k: means[k] - state[k] for k in means}), stats

    def per_row_tables(self) -> list[str]:
        """Shared embedding tables averaged per row over the clients that used the row."""
        if getattr(self.config, "embedding_average", "dense") != "per_row" or self.sends_deltas:
            return []
        return [n for n in self.shared_names if embedding_field(n) is not None]

    def touched_rows(self, batch: CohortBatch, name: str) -> torch.Tensor:
        """(K, vocab) 1.0 where client k's training rows use row r of embedding table `name`."""
        field_name, vocab = embedding_field(name), self._initial[name].shape[0]
        out = torch.zeros(batch.size, vocab, dtype=torch.float64)
        for k in range(batch.size):
            idx = torch.arange(int(batch.n_rows[k]))
            out[k, self._rows(batch, k, idx)[0][field_name]] = 1.0
        return out

    def plain_average(self) -> bool:
        """True when the server's new tensors are the plain weighted mean (no server rule)."""
        return True

    def server_step(self, state: Tensors, delta: Tensors) -> Tensors:
        """The new server state from the mean delta (base: θ + Δ); BatchNorm variances kept positive."""
        return self._positive_var({**state, **{k: state[k] + d for k, d in delta.items()}})

    def _positive_var(self, state: Tensors) -> Tensors:
        return {k: v.clamp(min=1e-5) if k in self.shared_names and k.endswith("running_var") else v
                for k, v in state.items()}

    def traffic(self) -> tuple[int, int]:
        n = sum(self._initial[k].numel() * self._initial[k].element_size() for k in self.shared_names)
        return n, n

    # ---- client half
    def init_personal(self, client_ids: torch.Tensor) -> Tensors:
        n = len(client_ids)
        return ScenarioPersonal(m={k: v.expand(n, *v.shape).clone() for k, v in self._initial.items()}).flatten()

    def own_model(self, personal: Tensors) -> Tensors:
        """The clients' own model tensors, (K, ...) by name."""
        return self.Personal.unflatten(personal).m

    def client_start(self, plan_or_state: Tensors, personal: Tensors, k: int, client: int) -> Tensors:
        """Client k's model at the start of a round / for evaluation: its own tensors, with the
        server's tensors in place of the aggregated ones."""
        model = self.own_model(personal)
        own = {n: model[n][k] for n in self.all_names}
        own.update({n: plan_or_state[n] for n in self.shared_names if n in plan_or_state})
        return own

    def train_cohort(self, plan: TrainPlan, batch: CohortBatch, personal: Tensors) -> CohortUpdate:
        mu = self.proximal_mu()
        ref = {n: plan.params[n] for n in self.shared_names} if mu > 0 else None
        _, ends, losses = self.train_clients(plan, batch, personal, ref, mu)
        model = {n: torch.stack([e[n] for e in ends]) for n in self.all_names}
        new_personal = ScenarioPersonal(m=model).flatten()
        acc = Accumulator()
        shared = {n: model[n] for n in self.shared_names}
        weights = self.weights(batch)
        if self.sends_deltas:    # deltas from the round's server tensors; local DP noises them in place,
            # central DP clips them and gives every client weight 1
            shared = self.ldp.apply({n: v - plan.params[n] for n, v in shared.items()}, plan.round, batch.client_ids)
            shared, weights = self.dp.client(shared, weights)
        for n in self.per_row_tables():          # a row's sum and weight only over the clients that used it
            touched = self.touched_rows(batch, n)
            shared[n] = shared[n] * touched.unsqueeze(2).to(shared[n].dtype)
            shared[ROW_WEIGHT + n] = touched
        keep = aggregate.fold_weighted(acc, shared, weights, {"train_loss": torch.tensor(losses)})
        # a client whose update was dropped (NaN / inf) keeps its previous state
        new_personal = {k: torch.where(aggregate.bcast(keep, v), v, personal[k]) for k, v in new_personal.items()}
        return CohortUpdate(personal=new_personal, acc=acc)

    def train_clients(self, plan: TrainPlan, batch: CohortBatch, personal: Tensors, ref: Tensors | None,
                      mu: float) -> tuple[list[Tensors], list[Tensors], list[float]]:
        """Every client of the cohort trained from its round start, one after the other:
        (start tensors, end tensors, mean loss) per client, in cohort order."""
        starts, ends, losses = [], [], []
        for k in range(batch.size):
            start = self.client_start(plan.params, personal, k, int(batch.client_ids[k]))
            end, loss = self.train_client(start, batch, k, plan.round, ref, mu)
            starts.append(start)
            ends.append(end)
            losses.append(loss)
        return starts, ends, losses

    # ---- one client's minibatch loop
    def _rows(self, batch: CohortBatch, k: int, idx: torch.Tensor):
        cat = {f: v[k, idx] for f, v in batch.categorical.items()}
        if self.scenario_field is not None:
            name = self.scenario_field.name
            cat[name] = batch.client_attrs[self.setup.schema.scenario][k].expand(len(idx))
        return cat, batch.numeric[k, idx], batch.labels[k, idx]

    def loss_fn(self, tensors: Tensors, cat: Tensors, num: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = functional_call(self.model, tensors, (cat, num, {}))            # (B, T)
        return F.binary_cross_entropy_with_logits(logits, y)                    # mean over rows and tasks

    def make_optimizer(self, params: Tensors):
        """Adam or SGD per `train:`; embedding tables get no weight decay unless `embedding_decay=l2`."""
        tc = self.setup.train
        keep_decay = getattr(self.config, "embedding_decay", "l2") == "l2"
        emb = [v for n, v in params.items() if embedding_field(n) is not None and not keep_decay]
        rest = [v for n, v in params.items() if embedding_field(n) is None or keep_decay]
        groups = [{"params": rest, "weight_decay": tc.weight_decay}, {"params": emb, "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        if tc.optimizer == "adam":
            return torch.optim.Adam(groups, lr=tc.lr)
        return torch.optim.SGD(groups, lr=tc.lr)

    def train_client(self, start: Tensors, batch: CohortBatch, k: int, rnd: int,
                     ref: Tensors | None, mu: float, row_plan=None) -> tuple[Tensors, float]:
        """`local_epochs` of minibatch training of one client from `start`; returns (end tensors, mean loss).

        `row_plan` (optional) is a list of (client slot, row index) minibatches replacing the client's own
        order (centralized training over several clients' rows)."""
        tc = self.setup.train
        params = {n: start[n].detach().clone().requires_grad_(True) for n in self.param_names}
        buffers = {n: start[n].detach().clone() for n in self.all_names if n not in params}
        opt = self.make_optimizer(params)
        client = int(batch.client_ids[k])
        total, steps = 0.0, 0
        if row_plan is None:
            n = int(batch.n_rows[k])
            row_plan = [[(k, batch.order[e, k, s:min(s + tc.batch_size, n)])]
                        for e in range(tc.local_epochs) for s in range(0, n, tc.batch_size)]
        self.model.train()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_client_seed(self.setup.seed, rnd, client, rng.NN_DROPOUT))
            for mb in row_plan:
                parts = [self._rows(batch, kk, idx) for kk, idx in mb]
                cat = {f: torch.cat([p[0][f] for p in parts]) for f in parts[0][0]}
                num = torch.cat([p[1] for p in parts])
                y = torch.cat([p[2] for p in parts])
                if y.shape[0] < 2:           # BatchNorm needs two rows in training mode
                    continue
                loss = self.loss_fn({**params, **buffers}, cat, num, y)
                total += float(loss.detach())
                steps += 1
                if ref is not None and mu > 0:
                    loss = loss + 0.5 * mu * sum(((params[n] - ref[n]) ** 2).sum()
                                                 for n in ref if n in params)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        end = {n: v.detach() for n, v in params.items()}
        end.update(buffers)
        return {n: end[n] for n in self.all_names}, (total / steps if steps else float("nan"))

    # ---- evaluation
    def eval_tensors(self, state: Tensors, personal: Tensors, k: int, client: int) -> Tensors:
        return self.client_start(state, personal, k, client)

    def score_cohort(self, state: Tensors, batch: CohortBatch, personal: Tensors) -> torch.Tensor:
        K, L = batch.mask.shape
        out = torch.zeros(K, L, len(self.model.tasks))
        self.model.eval()
        with torch.no_grad():
            for k in range(K):
                tensors = self.eval_tensors(state, personal, k, int(batch.client_ids[k]))
                n = int(batch.n_rows[k])
                for s in range(0, n, EVAL_CHUNK):
                    idx = torch.arange(s, min(s + EVAL_CHUNK, n))
                    cat, num, _ = self._rows(batch, k, idx)
                    out[k, s:s + len(idx)] = torch.sigmoid(functional_call(self.model, tensors, (cat, num, {})))
        return out


class ScenarioFedAvg(ScenarioAlgorithm):
    """FedAvg / FedProx / FedBN / FedPer over scenario clients (see ScenarioFedAvgConfig)."""
    Config = ScenarioFedAvgConfig
    PRIVACY = frozenset({CENTRAL_DP, LOCAL_DP})
    DP_SETTINGS = {"algorithm.embedding_average": "dense"}
    LOCAL_DP_SETTINGS = {"algorithm.embedding_average": "dense", "algorithm.local_bn": "true",
                         "algorithm.weighting": "uniform"}

    def select_shared(self) -> list[str]:
        cfg = self.config
        return [n for n in self.float_names
                if not (cfg.local_bn and bn_tensor(n)) and not (cfg.local_towers and self.template[n].startswith("tower:"))]

    def proximal_mu(self) -> float:
        return self.config.mu

    def init_server(self) -> Tensors:
        shared = super().init_server()
        return {**shared, **server_opt.init_state(self.config.server_optimizer, shared)}

    def plain_average(self) -> bool:
        return self.config.server_optimizer.name == "sgd" and self.config.server_lr == 1.0

    def server_step(self, state: Tensors, delta: Tensors) -> Tensors:
        return self._positive_var(server_opt.apply(self.config.server_optimizer, self.config.server_lr, state, delta))

    def weights(self, batch: CohortBatch) -> torch.Tensor:
        if self.config.weighting == "uniform":
            return torch.ones(batch.size, dtype=torch.float64)
        return batch.n_rows.double()


class ScenarioFedProx(ScenarioFedAvg):
    Config = ScenarioFedProxConfig


class ScenarioFedBN(ScenarioFedAvg):
    Config = ScenarioFedBNConfig


class ScenarioFedPer(ScenarioFedAvg):
    Config = ScenarioFedPerConfig


class ScenarioLocal(ScenarioAlgorithm):
    """Local-only: the server holds nothing; every client keeps training its own model."""
    Config = ScenarioLocalConfig

    def select_shared(self) -> list[str]:
        return []


class ScenarioDitto(ScenarioFedAvg):
    """Ditto: the global model is FedAvg over every float tensor; each client also trains a personal
    model (personal state `p.<name>`) with (λ/2)·||v − w_global||², and is evaluated with it."""
    Config = ScenarioDittoConfig

    Personal = DittoPersonal

    def init_personal(self, client_ids: torch.Tensor) -> Tensors:
        own = ScenarioPersonal.unflatten(super().init_personal(client_ids)).m
        return DittoPersonal(m=own, p={k: v.clone() for k, v in own.items()}).flatten()

    def roles(self) -> dict[str, str]:
        return {**super().roles(), **{k: PRIVATE for k in DittoPersonal(m={}, p=self._initial).flatten()}}

    def train_cohort(self, plan: TrainPlan, batch: CohortBatch, personal: Tensors) -> CohortUpdate:
        update = super().train_cohort(plan, batch, personal)      # the global model's local steps
        glob = {n: plan.params[n] for n in self.shared_names}
        own = DittoPersonal.unflatten(personal).p
        ends = []
        for k in range(batch.size):
            start = {n: own[n][k] for n in self.all_names}
            end, _ = self.train_client(start, batch, k, plan.round, glob, self.config.ditto_lambda)
            ends.append(end)
        model = ScenarioPersonal.unflatten(update.personal).m
        new = DittoPersonal(m=model, p={n: torch.stack([e[n] for e in ends]) for n in self.all_names})
        return CohortUpdate(personal=new.flatten(), acc=update.acc)

    def eval_tensors(self, state: Tensors, personal: Tensors, k: int, client: int) -> Tensors:
        own = DittoPersonal.unflatten(personal).p
        return {n: own[n][k] for n in self.all_names}


class ScenarioCentralized(ScenarioAlgorithm):
    """One model on the pooled training rows of every scenario, minibatches interleaved across
    scenarios in a seeded order; every scenario is evaluated with that model."""
    Config = ScenarioCentralizedConfig
    EXAMPLES = {"mmoe": {**SCENARIO_EXAMPLE, "resources.workers": 1}}

    def select_shared(self) -> list[str]:
        return list(self.all_names)

    def train_cohort(self, plan: TrainPlan, batch: CohortBatch, personal: Tensors) -> CohortUpdate:
        if batch.size != self.setup.num_clients:
            raise ValueError(
                f"algorithm.name=scenario_centralized trains one model on all {self.setup.num_clients} scenarios "
                f"at once but got {batch.size} in one call: set resources.workers=1 and "
                f"federation.cohort_size, federation.clients_per_round >= {self.setup.num_clients}")
        tc = self.setup.train
        plan_rows = []
        for e in range(tc.local_epochs):
            pairs = np.concatenate([np.stack([np.full(int(n), k), batch.order[e, k, :int(n)].numpy()], 1)
                                    for k, n in enumerate(batch.n_rows.tolist())])           # (R, 2)
            g = np.random.default_rng([self.setup.seed, rng.POOLED_SHUFFLE, plan.round, e])
            pairs = pairs[g.permutation(len(pairs))]
            for s in range(0, len(pairs), tc.batch_size):
                mb = pairs[s:s + tc.batch_size]
                plan_rows.append([(k, torch.from_numpy(mb[mb[:, 0] == k, 1])) for k in np.unique(mb[:, 0])])
        start = {n: plan.params[n] for n in self.all_names}
        end, loss = self.train_client(start, batch, 0, plan.round, None, 0.0, row_plan=plan_rows)
        acc = Accumulator()
        aggregate.fold_weighted(acc, {n: end[n].unsqueeze(0) for n in self.all_names},
                                torch.ones(1, dtype=torch.float64), {"train_loss": torch.tensor([loss])})
        acc.clients = batch.size
        return CohortUpdate(personal={}, acc=acc)

    def init_personal(self, client_ids: torch.Tensor) -> Tensors:
        return {}

    def eval_tensors(self, state: Tensors, personal: Tensors, k: int, client: int) -> Tensors:
        return {n: state[n] for n in self.all_names}
