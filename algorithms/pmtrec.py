"""PMTRec on matrix factorization with auxiliary tasks (methods.md §2), centralized and federated.

Model: the MF core (mf.py: user table P, item table Q, score p_u · q_i) plus a linear category
head (W, b) when the `category` task is on. The tasks are objects of `mf_tasks.MF_TASKS` (task 0
is the main task: `bpr`, or `au` alone for DirectAU, alignment + uniformity as the ranking loss).

Per-task gradients are taken only for the rows a batch touches (`gather_rows` + one
`autograd.grad` per task on the gathered leaf), combined by the configured combiner --
`pmtrec` per row (α, τ and the §2.3 flags), every other combiner on the touched rows of P and Q
as one vector, as they are defined in algorithms/combiners -- and applied by a row-wise (lazy)
Adam or SGD. The category head follows its own plain gradient.

Modes (`algorithm.mode`, which must match `data.layout`), one trainer object each:
- centralized (pmtrec_central.py): one client holds every row; one round = `train.local_epochs`
  epochs of minibatches (the paper's setting). P, Q, the head, the Adam moments and the
  combiner's history are the server state that the one client trains and returns.
- federated (pmtrec_federated.py): client = user. A client computes its per-task gradients on
  all its training rows at the current Q; its own row p_u (private state, with its Adam moments)
  is combined locally; per-task sums of item-row gradients and touch counts are uploaded, and
  the server combines each item row with the same rule before an Adam step on Q (FedSGD on the
  item table).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from fleetrec.algorithms.combiners import CombineInput, CombinerConfig, PMTRecConfig, make_combiner, pmtrec_combine
from fleetrec.algorithms.mf import MF_EXAMPLE, MFAlgorithm, MFServer
from fleetrec.algorithms.mf_tasks import FEDERATED_TASKS, MF_TASKS, TASK_ORDER
from fleetrec.algorithms.pmtrec_central import CentralizedTrainer
from fleetrec.algorithms.pmtrec_federated import FederatedTrainer
from fleetrec.algorithms.protocol import (CENTRAL_DP, Accumulator, AlgorithmConfig, CohortBatch, CohortUpdate, Setup,
                                          Tensors, TrainPlan)

def keeps_history(name: str) -> bool:
    """Combiners whose state carries across calls (DWA, GradNorm, MetaBalance, uncertainty): centralized only."""
    from fleetrec.algorithms.combiners import COMBINERS
    return COMBINERS[name].HAS_HISTORY


@dataclass(frozen=True)
class PMTRecAlgoConfig(AlgorithmConfig):
    name: str = "pmtrec"
    mode: str = "centralized"          # centralized (data.layout=centralized) | federated (data.layout=federated)
    tasks: tuple[str, ...] = ("bpr", "social", "rating", "au")   # first = main task: bpr, or [au] (DirectAU)
    combiner: CombinerConfig = field(default_factory=PMTRecConfig)
    dim: int = 32                      # embedding dimension d
    init_std: float = 0.1              # N(0, init_std²) initial embeddings
    reg: float = 1e-4                  # λ_reg of the main BPR loss
    rating_scale: float = 5.0          # rating task regresses p·q on rating / rating_scale
    unif_sample: int = 256             # rows of each table in the uniformity term (first ones of the batch)
    server_lr: float = 1e-3            # federated: Adam step size on item rows and the head at the server
                                       # (local_steps: Q += server_lr · mean item-row delta, as FedAvg-MF)
    local_update: str = "gradient"     # federated: gradient (one per round at the current Q, FedSGD) |
                                       # local_steps (train.local_epochs FedAvg-style steps on local copies)
    ks: tuple[int, ...] = (20, 40)     # Recall@K / NDCG@K cut-offs

    CHECKS: ClassVar[dict] = {"mode": ("centralized", "federated"), "dim": ">=1", "init_std": ">0", "reg": ">=0",
                              "rating_scale": ">0", "unif_sample": ">=2", "server_lr": ">0",
                              "local_update": ("gradient", "local_steps")}

    def check_privacy(self, priv) -> str | None:
        if priv.enabled and not (self.mode == "federated" and self.local_update == "local_steps"):
            return (f"privacy.enabled: algorithm 'pmtrec' implements central DP in its federated local-steps form "
                    f"only (algorithm.mode=federated, algorithm.local_update=local_steps: clipped item-row deltas, "
                    f"noise on their sum); got mode={self.mode}, local_update={self.local_update}")
        return None

    def check_train(self, train) -> str | None:
        if self.mode == "federated" and self.local_update == "gradient" and train.local_epochs != 1:
            return (f"train.local_epochs: federated PMTRec with algorithm.local_update=gradient takes one gradient "
                    f"per round at the current item table, so local_epochs={train.local_epochs} would be ignored; "
                    "set algorithm.local_update=local_steps for FedAvg-style local steps")
        return None

    def data_layout(self) -> str:
        return self.mode

    def ranking_ks(self) -> tuple[int, ...]:
        return tuple(self.ks)

    def validate(self) -> str | None:
        if not self.tasks or not (self.tasks[0] == "bpr" or list(self.tasks) == ["au"]):
            return (f"algorithm.tasks: the first task is the main task and must be 'bpr' (or the one task [au], "
                    f"DirectAU), got {list(self.tasks)}")
        bad = [t for t in self.tasks if t not in MF_TASKS]
        if bad:
            return f"algorithm.tasks: unknown task {bad[0]!r}; allowed: {', '.join(TASK_ORDER)}"
        if len(set(self.tasks)) != len(self.tasks):
            return f"algorithm.tasks: duplicate task in {list(self.tasks)}"
        if self.mode == "federated":
            bad = [t for t in self.tasks if t not in FEDERATED_TASKS]
            if bad:
                return (f"algorithm.tasks: task {bad[0]!r} needs other users' or items' rows and is centralized "
                        f"only; federated tasks: {', '.join(FEDERATED_TASKS)}")
            if keeps_history(self.combiner.name):
                from fleetrec.algorithms.combiners import COMBINERS
                ok = [n for n in COMBINERS.names() if not keeps_history(n)]
                return (f"algorithm.combiner.name: {self.combiner.name!r} keeps a history across calls and is "
                        f"centralized only; federated combiners: {', '.join(ok)}")
        if self.local_update == "local_steps":
            from fleetrec.algorithms.pmtrec_local import LOCAL_COMBINERS, LOCAL_TASKS
            if self.mode != "federated":
                return "algorithm.local_update: local_steps is a federated update; got algorithm.mode=centralized"
            bad = [t for t in self.tasks if t not in LOCAL_TASKS]
            if bad:
                return (f"algorithm.tasks: task {bad[0]!r} is not implemented with local_update=local_steps; "
                        f"tasks: {', '.join(LOCAL_TASKS)}")
            if self.combiner.name not in LOCAL_COMBINERS:
                return (f"algorithm.combiner.name: {self.combiner.name!r} is not implemented with "
                        f"local_update=local_steps; combiners: {', '.join(LOCAL_COMBINERS)}")
        if not self.ks or min(self.ks) < 1:
            return f"algorithm.ks: expected a non-empty list of cut-offs >= 1, got {list(self.ks)}"
        return None


class PMTRecMF(MFAlgorithm):
    """MF + auxiliary tasks + a combiner; the mode's trainer holds everything mode-specific."""
    Config = PMTRecAlgoConfig
    EXAMPLES = {
        # uncertainty weighting: the combiner with the most state (log-variances and their Adam moments)
        "centralized": {**MF_EXAMPLE, "resources.workers": 1, "algorithm.combiner.name": "uncertainty",
                        "train.optimizer": "adam", "train.lr": 0.01},
        "federated": {**MF_EXAMPLE, "data.layout": "federated", "algorithm.mode": "federated",
                      "algorithm.tasks": "[bpr,rating,au]", "train.optimizer": "adam", "train.lr": 0.05},
        "federated_local_steps": {**MF_EXAMPLE, "data.layout": "federated", "algorithm.mode": "federated",
                                  "algorithm.local_update": "local_steps", "algorithm.server_lr": 1.0,
                                  "algorithm.tasks": "[bpr,rating,au]", "train.local_epochs": 2, "train.lr": 0.05}}
    PRIVACY = frozenset({CENTRAL_DP})  # federated local_steps only (check_privacy refuses the other forms)

    def __init__(self, config: PMTRecAlgoConfig, setup: Setup):
        super().__init__(config, setup, centralized=config.mode == "centralized")
        self.tasks = [MF_TASKS[t] for t in config.tasks]
        self.T = len(self.tasks)
        self.combiner = make_combiner(config.combiner, self.T, setup.seed)
        self.diagnostics: dict[str, float] = {}       # the last combine step's (`_diagnose`)
        self._task_pairs = torch.triu_indices(self.T, self.T, offset=1)
        self._diagnostic_keys = [f"train/combiner/weight_{t}" for t in config.tasks] + (
            ["train/combiner/conflict"] if self.T > 1 else [])
        self.combiner_opt = (torch.optim.Adam(self.combiner.parameters(), lr=setup.train.lr)
                             if self.combiner.parameters() else None)
        self.head_names = ["W", "b"] if "category" in config.tasks else []
        if self.centralized:
            self.trainer = CentralizedTrainer(self)
        elif config.local_update == "local_steps":
            from fleetrec.algorithms.pmtrec_local import LocalStepsTrainer
            self.trainer = LocalStepsTrainer(self)
        else:
            self.trainer = FederatedTrainer(self)

    def attach_data(self, dataset) -> None:
        super().attach_data(dataset)
        for name in TASK_ORDER:
            problem = MF_TASKS[name].check(self, dataset) if name in self.config.tasks else None
            if problem:
                raise ValueError(problem)

    def with_moments(self, tables: Tensors, **extra) -> MFServer:
        """Server state of the tables with zero Adam moments and step count."""
        zeros = {k: torch.zeros_like(t) for k, t in tables.items()}
        return MFServer(**tables, m=zeros, v={k: t.clone() for k, t in zeros.items()}, step=torch.zeros(()), **extra)

    def head_tables(self) -> Tensors:
        if not self.head_names:
            return {}
        C = max(self.num_categories, 1)
        return {"W": torch.zeros(C, self.config.dim), "b": torch.zeros(C)}

    def combine(self, losses: torch.Tensor, Gp: torch.Tensor | None, Gq: torch.Tensor | None,
                tp: torch.Tensor | None, tq: torch.Tensor | None, epoch: int, step: int):
        """Combined (Rp, d) and (Rq, d) row gradients from (T, R, d) task row gradients: `pmtrec`
        per row, any other combiner on the touched rows of P and Q as one vector."""
        if self.config.combiner.name == "pmtrec":
            outs = [None if g is None else pmtrec_combine(g, epoch, self.config.combiner, t)
                    for g, t in ((Gp, tp), (Gq, tq))]
            self._diagnose([g.flatten(1) for g in (Gp, Gq) if g is not None],
                           torch.cat([o[1] for o in outs if o is not None]).mean(dim=0))
            return tuple(None if o is None else o[0] for o in outs)
        G = torch.cat([g.flatten(1) for g in (Gp, Gq) if g is not None], dim=1)
        out = self.combiner.combine(CombineInput(losses=losses.detach(), grads=G, step=step, epoch=epoch))
        self._diagnose([G], out.weights)
        if self.combiner_opt is not None and out.loss is not None:   # uncertainty weighting learns its log-variances
            self.combiner_opt.zero_grad()
            lv = self.combiner.parameters()
            (g,) = torch.autograd.grad(out.loss, lv)
            lv[0].grad = g
            self.combiner_opt.step()
        flat = out.grad
        gp = gq = None
        off = 0
        if Gp is not None:
            n = Gp[0].numel()
            gp, off = flat[:n].reshape(Gp.shape[1:]), n
        if Gq is not None:
            gq = flat[off:off + Gq[0].numel()].reshape(Gq.shape[1:])
        return gp, gq

    def _diagnose(self, parts: list[torch.Tensor], weights: torch.Tensor) -> None:
        """What the combiner did at this step, for the round record (centralized mode logs the mean
        over a round's steps): the weight of each task and the share of the T(T-1)/2 task pairs whose
        gradients conflict (a negative inner product over the touched rows; `parts` are the (T, n)
        flat gradients of P's and Q's rows, their Gram matrices summed, so nothing is copied). For
        the per-row `pmtrec` combiner the weight is the mean over the touched rows of P and Q, rows
        a task does not touch counting 0: a task that touches few rows reads low whatever it is
        given where it does."""
        with torch.no_grad():            # a (T, T) product per table and one host copy per step
            gram = sum(g @ g.T for g in parts)
            pairs = gram[self._task_pairs[0], self._task_pairs[1]]              # above the diagonal
            conflict = (pairs < 0).sum().to(gram.dtype) / max(pairs.numel(), 1)
            values = torch.cat([weights.detach().reshape(-1).to(gram.dtype), conflict.reshape(1)]).tolist()
        self.diagnostics = dict(zip(self._diagnostic_keys, values))

    # ---- the protocol, by the mode's trainer
    def init_server(self) -> Tensors:
        return self.trainer.init_server()

    def init_personal(self, client_ids: torch.Tensor) -> Tensors:
        return self.trainer.init_personal(client_ids)

    def configure_train(self, rnd: int, state: Tensors, cohort: torch.Tensor) -> TrainPlan:
        return TrainPlan(round=rnd, params=self.trainer.sent(state))

    def traffic(self) -> tuple[int, int]:
        return self.trainer.traffic()

    def train_cohort(self, plan: TrainPlan, batch: CohortBatch, personal: Tensors) -> CohortUpdate:
        self._check_attached()
        return self.trainer.train(plan, batch, personal)

    def aggregate_train(self, rnd: int, state: Tensors, acc: Accumulator) -> tuple[Tensors, dict]:
        if acc.weight <= 0:
            return state, {}
        stats = {k: v / acc.weight for k, v in acc.stats.items()}
        stats["clients_trained"] = acc.clients
        stats["train_loss"] = stats.get(f"train/{self.config.tasks[0]}_loss", float("nan"))
        return self.trainer.aggregate(rnd, state, acc, stats), stats
