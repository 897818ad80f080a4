"""PF-MSMTrec (methods.md §1): personalized federated multi-scenario multi-task recommendation.

Scenario = client; each client trains its own multi-task model (MMoE with the parameter template
by default) with the client half of `algorithms/scenario.py`. The server keeps one personalized
copy per client of every uploaded tensor (server state `pers.<name>`, stacked (N, ...)) and, each
round, for every template group P (global experts; task-t experts; scenario experts):

1. federated BN: `fedbn_mode=local_bn` keeps BatchNorm tensors on the client (FedBN);
   `server_norm` uploads them and puts every client's delta on a common scale before step 2;
   `aggregate` uploads and aggregates them like the rest, no normalization (ablation);
2. conflict coordination: d^P = ConflictAverse({Δ_c^P}) with κ (`conflict_coordination=false`: the mean);
3. personalized aggregation: θ_c^P = θ_c^start + Δ_c^P + α_c · d^P, with α_c learned on the server by
   the hypergradient −cos(Δ_c^(r), d^(r−1)) (`hypergrad=raw`: FedHCA2's −<Δ_c^(r), d^(r−1)>, which
   is ~1e-4 here and leaves α at its start) (`personalized=false`: every client gets mean(θ^start) + d^P);
4. task towers: per tower layer, cross-attention over the clients' deltas with learned β
   (`tower_aggregation=cross_attention`), modules 2-3 on the towers (`fallback`) or no tower
   upload at all (`none`). θ_c = θ_c^start + Δ_c + β_c · v_c with v_c = (a V)_c (or d), so β's
   hypergradient uses v_c of the last round (∂θ_c/∂β_c), not β_c · v_c.

The template (`specific_parts=local`, default) uploads only the global experts (and towers): task-
and scenario-specific experts stay on their client, following the seed's "W_j is aggregated across
clients ... while W_loc and W_ti remain local". `specific_parts=aggregated` gives every expert group
the same personalized conflict-averse update (the former reading, under which `template=false`
only regrouped the QP and could not differ much).

Local training adds (μ/2)·||θ − θ_ref||² over the uploaded tensors, θ_ref = the mean of the
clients' personalized copies. `template=false` (ablation) aggregates every expert as one global
group. Embeddings and gates never leave the client.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from fleetrec.algorithms import aggregate
from fleetrec.algorithms import pfmsm_math as pm
from fleetrec.algorithms.protocol import (PERSONALIZED, PRIVATE, Accumulator, CohortBatch, CohortUpdate,
                                          Tensors, TrainPlan)
from fleetrec.algorithms.scenario import SCENARIO_EXAMPLE, ScenarioPersonal, ScenarioAlgorithm, ScenarioBaseConfig
from fleetrec.algorithms.state import TensorState

TOWER_MODES = ("cross_attention", "fallback", "none")


@dataclass(frozen=True)
class PFMSMServer(TensorState):
    """Everything the PF-MSMTrec server carries from round to round (N clients)."""
    pers: dict[str, torch.Tensor]             # every uploaded tensor, one personalized copy per client: (N, ...)
    alpha: torch.Tensor                       # (N,) α_c of the expert groups
    beta: torch.Tensor                        # (N, tower layers) β_c of the towers
    alpha_momentum: torch.Tensor              # SGD momentum buffers of α and β
    beta_momentum: torch.Tensor
    has_prev: torch.Tensor                    # 0-d: 1 once a round has been aggregated (the hypergradient is one round late)
    prev_d: dict[str, torch.Tensor]           # expert group -> d^(r-1), the last round's common delta (D,)
    prev_dir: dict[str, torch.Tensor]         # tower layer -> ∂θ_c/∂β_c of the last round, (N, D_l)


@dataclass(frozen=True)
class PFMSMPlan(TensorState):
    """What every client of a round receives."""
    pers: dict[str, torch.Tensor]             # the personalized copies (each client reads its own row)
    ref: dict[str, torch.Tensor]              # θ_ref of the proximal term (empty when μ = 0)


@dataclass(frozen=True)
class PFMSMTrecConfig(ScenarioBaseConfig):
    name: str = "pf_msmtrec"
    template: bool = True                    # parameter template (option A); false: all experts in one global group
    # with the template: task- and scenario-specific experts stay on the client ("local", the seed's
    # W_loc / W_ti) or are aggregated by the same rule as the global ones ("aggregated", the old reading)
    specific_parts: str = "local"
    fedbn_mode: str = "local_bn"             # local_bn (FedBN) | server_norm (Eq. 8 reading) | aggregate (ablation)
    conflict_coordination: bool = True      # conflict-averse aggregated delta (false: plain mean of deltas)
    kappa: float = 0.4                       # κ of the conflict-averse delta
    rescale: str = "1+k2"                    # d = (Δ̄ + λ g_w) / s, s = 1+κ² | 1+κ | none
    personalized: bool = True                # θ_c = θ_c^start + Δ_c + α_c d (false: one global result)
    alpha_init: float = 0.1                  # α_c and β_{c,l} start here, clipped to [0, 1]
    alpha_lr: float = 0.01                   # SGD on α and β (hypergradient)
    alpha_momentum: float = 0.9
    alpha_weight_decay: float = 1e-4
    # the α/β hypergradient: "cosine" = −cos(Δ_c^(r), direction^(r−1)) (scale-free, in [−1, 1]),
    # "raw" = −<Δ_c^(r), direction^(r−1)> (FedHCA2's rule; ~1e-4 on these models, so α barely moves)
    hypergrad: str = "cosine"
    tower_aggregation: str = "cross_attention"   # cross_attention | fallback | none (towers stay local)
    mu: float = 0.01                         # proximal weight toward the mean personalized copy

    CHECKS: ClassVar[dict] = {**ScenarioBaseConfig.CHECKS, "fedbn_mode": pm.FEDBN_MODES, "kappa": ">=0", "rescale": pm.RESCALES,
                              "alpha_init": "0..1", "alpha_lr": ">=0", "alpha_momentum": "0..1",
                              "alpha_weight_decay": ">=0", "tower_aggregation": TOWER_MODES, "mu": ">=0",
                              "specific_parts": ("local", "aggregated"), "hypergrad": pm.HYPERGRADS}


def _is_tower(role: str) -> bool:
    return role.startswith(pm.TOWER_PREFIX)


class PFMSMTrec(ScenarioAlgorithm):
    Config = PFMSMTrecConfig
    # α and β move visibly in four rounds (the hypergradient momentum must survive a resume)
    EXAMPLES = {"mmoe": {**SCENARIO_EXAMPLE, "algorithm.alpha_lr": 1.0}}

    def select_shared(self) -> list[str]:
        cfg = self.config
        roles = {n: self.template[n] for n in self.float_names}
        if not cfg.template:       # ablation: every expert tensor in one group aggregated over all clients
            roles = {n: (pm.GLOBAL if r not in (pm.LOCAL,) and not _is_tower(r) else r) for n, r in roles.items()}
        elif cfg.specific_parts == "local":   # the seed: only the shared part W_j is aggregated
            roles = {n: (pm.LOCAL if r == pm.SCENARIO or r.startswith(pm.TASK_PREFIX) else r)
                     for n, r in roles.items()}
        if cfg.tower_aggregation == "none":
            roles = {n: (pm.LOCAL if _is_tower(r) else r) for n, r in roles.items()}
        self.group_roles = roles
        names = pm.upload_names(roles, cfg.fedbn_mode)
        groups = pm.aggregation_groups(roles, names)
        self.expert_groups = {g: ns for g, ns in groups.items() if not _is_tower(g)}
        tower_names = [n for g, ns in groups.items() if _is_tower(g) for n in ns]
        self.tower_layers: dict[str, list[str]] = {}
        for n in tower_names:      # one β per client and tower layer (e.g. towers.0.body.lin0)
            self.tower_layers.setdefault(n.rsplit(".", 1)[0], []).append(n)
        self.layer_keys = list(self.tower_layers)
        return names

    def roles(self) -> dict[str, str]:
        return {n: PERSONALIZED if n in self.shared_names else PRIVATE for n in self.all_names}

    # ---- server half
    def init_server(self) -> Tensors:
        N, cfg = self.setup.num_clients, self.config
        size = lambda names: sum(self._initial[n].numel() for n in names)
        return PFMSMServer(
            pers={n: self._initial[n].expand(N, *self._initial[n].shape).clone() for n in self.shared_names},
            alpha=torch.full((N,), cfg.alpha_init), beta=torch.full((N, len(self.layer_keys)), cfg.alpha_init),
            alpha_momentum=torch.zeros(N), beta_momentum=torch.zeros(N, len(self.layer_keys)),
            has_prev=torch.zeros(()),
            prev_d={g: torch.zeros(size(names)) for g, names in self.expert_groups.items()},
            prev_dir={layer: torch.zeros(N, size(names)) for layer, names in self.tower_layers.items()},
        ).flatten()

    def configure_train(self, rnd: int, state: Tensors, cohort: torch.Tensor) -> TrainPlan:
        s = PFMSMServer.unflatten(state)
        ref = {n: s.pers[n].mean(0) for n in self.shared_names} if self.config.mu > 0 else {}
        return TrainPlan(round=rnd, params=PFMSMPlan(pers=dict(s.pers), ref=ref).flatten())

    def aggregate_train(self, rnd: int, state: Tensors, acc: Accumulator) -> tuple[Tensors, dict]:
        cfg, stats = self.config, aggregate.mean_stats(acc)
        ids = sorted(acc.per_client)
        if not ids:
            return state, stats
        s = PFMSMServer.unflatten(state)
        idx = torch.tensor(ids)
        deltas = {n: torch.stack([acc.per_client[c][n] for c in ids]).float() for n in self.shared_names}
        start = {n: s.pers[n][idx] for n in self.shared_names}
        alpha, beta = s.alpha, s.beta
        alpha_m, beta_m = s.alpha_momentum, s.beta_momentum

        # hypergradient step on α and β, one round late (module 3)
        if cfg.personalized and float(s.has_prev) > 0 and cfg.alpha_lr > 0:
            hyper = dict(lr=cfg.alpha_lr, momentum=cfg.alpha_momentum, weight_decay=cfg.alpha_weight_decay)
            g_a = torch.zeros_like(alpha)
            for g, names in self.expert_groups.items():     # cosine: the mean over groups
                h = pm.hypergrad(pm.flatten_group(deltas, names), s.prev_d[g], cfg.hypergrad)
                g_a[idx] += h.float() / (len(self.expert_groups) if cfg.hypergrad == "cosine" else 1)
            if self.expert_groups:
                alpha, alpha_m = pm.momentum_step(alpha, alpha_m, g_a, **hyper)
            if self.layer_keys and cfg.tower_aggregation != "none":
                g_b = torch.zeros_like(beta)
                for j, (layer, names) in enumerate(self.tower_layers.items()):
                    flat = pm.flatten_group(deltas, names)
                    g_b[idx, j] = pm.hypergrad(flat, s.prev_dir[layer][idx], cfg.hypergrad).float()
                beta, beta_m = pm.momentum_step(beta, beta_m, g_b, **hyper)

        def norm(flat: torch.Tensor) -> torch.Tensor:
            return pm.server_norm(flat) if cfg.fedbn_mode == "server_norm" else flat

        def combine(flat: torch.Tensor) -> torch.Tensor:
            if cfg.conflict_coordination:
                return pm.conflict_averse_delta(flat, cfg.kappa, cfg.rescale)
            return flat.mean(0)

        pers, prev_d, prev_dir = dict(s.pers), dict(s.prev_d), dict(s.prev_dir)
        # expert groups: federated BN, conflict coordination, personalized aggregation (modules 1-3)
        for g, names in self.expert_groups.items():
            G = pm.flatten_group(deltas, names)                               # (M, D)
            st = pm.flatten_group(start, names)                               # (M, D)
            d = combine(norm(G))                                              # (D,)
            if cfg.personalized:
                out = pm.personalized_update(st, G, d, alpha[idx])
            else:
                out = (st.mean(0) + d).expand_as(st)
            _write(pers, idx, pm.unflatten_group(out, start, names))
            prev_d[g] = d.float()

        # task towers (module 4)
        for j, (layer, names) in enumerate(self.tower_layers.items()):
            G = pm.flatten_group(deltas, names)                               # (M, D_l)
            st = pm.flatten_group(start, names)
            Gn, b = norm(G), beta[idx, j]
            if cfg.tower_aggregation == "cross_attention":
                v = pm.tower_attention(Gn)                                    # (a V)_c, (M, D_l)
            else:                                                             # fallback: modules 2-3
                v = combine(Gn).unsqueeze(0).expand_as(Gn)
            u = b.clamp(0, 1).to(v.dtype).unsqueeze(1) * v                    # β_c · v_c
            _write(pers, idx, pm.unflatten_group(st + G + u, start, names))
            prev = s.prev_dir[layer].clone()
            prev[idx] = v.float()             # ∂θ_c/∂β_c = v_c (not β_c · v_c)
            prev_dir[layer] = prev

        stats["alpha_mean"] = float(alpha.mean())
        for c in ids:
            stats[f"pfmsm/alpha/{c}"] = float(alpha[c])
            if self.layer_keys:            # β_c: the mean over its tower layers
                stats[f"pfmsm/beta/{c}"] = float(beta[c].mean())
        new = s.replace(pers=pers, alpha=alpha, beta=beta, alpha_momentum=alpha_m, beta_momentum=beta_m,
                        has_prev=torch.ones(()), prev_d=prev_d, prev_dir=prev_dir)
        return new.flatten(), stats

    # ---- client half
    def client_start(self, plan_or_state: Tensors, personal: Tensors, k: int, client: int) -> Tensors:
        model = self.own_model(personal)
        own = {n: model[n][k] for n in self.all_names}
        pers = {n[len("pers."):]: v for n, v in plan_or_state.items() if n.startswith("pers.")}   # plan or server state
        own.update({n: pers[n][client] for n in self.shared_names})
        return own

    def train_cohort(self, plan: TrainPlan, batch: CohortBatch, personal: Tensors) -> CohortUpdate:
        mu = self.config.mu
        ref = PFMSMPlan.unflatten(plan.params).ref if mu > 0 else None
        starts, ends, losses = self.train_clients(plan, batch, personal, ref, mu)
        deltas = {int(c): {n: (end[n] - start[n]).double() for n in self.shared_names}
                  for c, start, end in zip(batch.client_ids, starts, ends)}
        new_personal = ScenarioPersonal(m={n: torch.stack([e[n] for e in ends]) for n in self.all_names}).flatten()
        acc = Accumulator()
        loss_t = torch.tensor(losses)
        keep = aggregate.fold_weighted(acc, {}, batch.n_rows.double(), {"train_loss": loss_t})
        for k, c in enumerate(batch.client_ids.tolist()):
            finite = all(bool(torch.isfinite(v).all()) for v in deltas[c].values())
            if bool(keep[k]) and finite:
                acc.per_client[c] = deltas[c]
            elif bool(keep[k]):      # a non-finite update: dropped and counted
                acc.clients -= 1
                acc.dropped += 1
        return CohortUpdate(personal=new_personal, acc=acc)


def _write(pers: Tensors, idx: torch.Tensor, values: Tensors) -> None:
    """Rows `idx` of the personalized copies set to `values` (new tensors; aggregated variances kept positive)."""
    for n, v in values.items():
        t = pers[n].clone()
        t[idx] = v.to(t.dtype)
        if n.endswith("running_var"):
            t.clamp_(min=1e-5)
        pers[n] = t
