"""The matrix-factorization core shared by PMTRec (pmtrec.py) and FedAvg-MF (fedavg_mf.py).

Model: user table P (|U|, d), item table Q (|I|, d), score p_u · q_i. Two layouts, fixed by
`data.layout` (the data source's `layout`): centralized (one client holds every user; P is server
state) or federated (client = user; the user's row p_u is its private state, Q is shared).

Evaluation: full-ranking Recall@K / NDCG@K (algorithms/ranking.py) with the training items
masked (training and validation items for the test split): `evaluate_cohort` returns a
RankingPartial of per-user sums.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from fleetrec.algorithms import privacy, rng
from fleetrec.algorithms.evaluation import RankingPartial, ranking_metrics
from fleetrec.algorithms.protocol import RANKING, AlgorithmBase, CohortBatch, Setup, Tensors
from fleetrec.algorithms.ranking import full_ranking
from fleetrec.algorithms.state import TensorState
from fleetrec.datasets.federated import TEST, TRAIN, VAL

@dataclass(frozen=True)
class MFServer(TensorState):
    """The server state of the MF algorithms: the tables and, where a trainer steps them with Adam on
    the server, their moments and step count, and the multi-task combiner's history."""
    Q: torch.Tensor                                    # (|I|, d) item table
    P: torch.Tensor | None = None                      # (|U|, d) user table (centralized layout only)
    W: torch.Tensor | None = None                      # category head (PMTRec's category task)
    b: torch.Tensor | None = None
    m: dict[str, torch.Tensor] = field(default_factory=dict)   # Adam first moments, by table name
    v: dict[str, torch.Tensor] = field(default_factory=dict)   # Adam second moments
    step: torch.Tensor | None = None                   # 0-d Adam step count
    combiner: dict[str, torch.Tensor] = field(default_factory=dict)        # the combiner's history (DWA, GradNorm, ...)
    combiner_adam: dict[str, torch.Tensor] = field(default_factory=dict)   # Adam state of its learned weights

    def tables(self) -> Tensors:
        return {k: t for k in TABLES if (t := getattr(self, k)) is not None}


@dataclass(frozen=True)
class MFPersonal(TensorState):
    """A federated client's personal state: its user row and, when it steps it with Adam across
    rounds, the row's moments and step count."""
    p: torch.Tensor                                    # (K, d)
    m: torch.Tensor | None = None
    v: torch.Tensor | None = None
    step: torch.Tensor | None = None                   # (K,)


TABLES = ("Q", "P", "W", "b")

MF_EXAMPLE = {"data.name": "mf_synthetic", "data.num_users": 40, "data.num_items": 30, "data.rows_per_user": 8,
              "data.num_categories": 4, "eval.metric": "recall@20", "federation.clients_per_round": 20,
              "resources.workers": 2, "resources.cpus_per_worker": 0.5}   # a tiny run (registry-wide tests)


def csr(table, a: str, b: str, n: int):
    """(indptr, dst) of the edges a -> b of a side table over n nodes; None for no edges."""
    if table is None or table.num_rows == 0:
        return None
    src = np.asarray(table.column(a).to_numpy(), np.int64)
    dst = np.asarray(table.column(b).to_numpy(), np.int64)
    order = np.argsort(src, kind="stable")
    indptr = np.zeros(n + 1, np.int64)
    indptr[1:] = np.cumsum(np.bincount(src, minlength=n))
    return torch.from_numpy(indptr), torch.from_numpy(dst[order])


def local_slots(ids: torch.Tensor, real: torch.Tensor, sentinel: int):
    """Per client, one local slot per distinct item id. ids (K, N) with `real` (K, N) bool; returns
    (sorted ids with padding = sentinel, the slot of each sorted position, the slot of each
    position of `ids`, the first-occurrence mask of the sorted positions)."""
    ids_k = torch.where(real, ids, torch.full_like(ids, sentinel))
    srt, perm = ids_k.sort(dim=1)
    first = torch.ones_like(srt, dtype=torch.bool)
    first[:, 1:] = srt[:, 1:] != srt[:, :-1]
    slot_sorted = first.long().cumsum(1) - 1
    slot = torch.empty_like(slot_sorted).scatter_(1, perm, slot_sorted)
    return srt, slot_sorted, slot, first


@dataclass
class LocalCopies:
    """A cohort's local copies of the item rows, packed: one row per (client, distinct item) that
    its positive or negative ids use -- `items` (U,) in (client, item) order -- and, per position
    of i and j, the packed row it reads (`ri`, `rj` (K, L); padding reads row U, a zero row
    appended by `rows`). Local training then costs U rows, not K × 2L padded slots."""
    items: torch.Tensor              # (U,) item id of each packed row
    ri: torch.Tensor                 # (K, L) packed row of each positive position (padding -> U)
    rj: torch.Tensor                 # (K, L) packed row of each negative position
    live: torch.Tensor               # (K, 2L) bool: which per-client slots hold an item (U of them)

    @classmethod
    def build(cls, i: torch.Tensor, j: torch.Tensor, mask: torch.Tensor, num_items: int) -> "LocalCopies":
        K, L = mask.shape
        real = torch.cat([mask, mask], 1) > 0
        srt, slot_sorted, slot, first = local_slots(torch.cat([i, j], 1), real, num_items)
        items = srt[first & (srt < num_items)]
        live = torch.zeros(K, 2 * L, dtype=torch.bool)
        live.scatter_(1, slot_sorted, srt < num_items)
        packed = torch.full((K, 2 * L), len(items), dtype=torch.long)      # slot -> packed row
        packed[live] = torch.arange(len(items))
        at = packed.gather(1, slot)                                         # position -> packed row
        return cls(items=items, ri=at[:, :L], rj=at[:, L:], live=live)

    def rows(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, L, d) item rows of the positive and the negative positions, from packed rows q (U, d)."""
        qp = torch.cat([q, q.new_zeros(1, q.shape[1])])
        return qp[self.ri], qp[self.rj]

    def sums(self, delta: torch.Tensor, num_items: int) -> dict[str, torch.Tensor]:
        """The upload: per item, the sum of the packed deltas (U, d) (`dQ`, float64) and their count (`nQ`)."""
        dsum = torch.zeros(num_items, delta.shape[1], dtype=torch.float64).index_add_(0, self.items, delta.double())
        cnt = torch.zeros(num_items, dtype=torch.float64).index_add_(
            0, self.items, torch.ones(len(self.items), dtype=torch.float64))
        return {"dQ": dsum, "nQ": cnt}

    def clip_per_client(self, delta: torch.Tensor, clip: float) -> torch.Tensor:
        """Packed (U, d) deltas clipped per client jointly over its rows (privacy.clip_updates)."""
        by_slot = delta.new_zeros(*self.live.shape, delta.shape[1])
        by_slot[self.live] = delta
        return privacy.clip_updates({"dQ": by_slot}, clip)[0]["dQ"][self.live]


def ranking_partial(user_emb: torch.Tensor, item_emb: torch.Tensor, test: torch.Tensor, exclude: torch.Tensor,
                    ks: tuple[int, ...], user_ids: torch.Tensor | None = None) -> RankingPartial:
    """Sums of Recall@K / NDCG@K over the ranked users; with `user_ids` (global id of each row of
    user_emb) also every user's values (`RankingPartial.per_user`)."""
    if test.shape[1] == 0:
        return RankingPartial({}, 0, None if user_ids is None else
                              {"user": np.zeros(0, np.int64), **{f"{m}@{k}": np.zeros(0) for m in ("recall", "ndcg")
                                                                   for k in ks}})
    res = full_ranking(user_emb, item_emb, test, exclude, ks)
    sums = {f"recall@{k}": float(res.recall[k].sum()) for k in ks}
    sums.update({f"ndcg@{k}": float(res.ndcg[k].sum()) for k in ks})
    per = None
    if user_ids is not None:
        per = {"user": user_ids[res.users].cpu().numpy().astype(np.int64)}
        per.update({f"recall@{k}": res.recall[k].double().cpu().numpy() for k in ks})
        per.update({f"ndcg@{k}": res.ndcg[k].double().cpu().numpy() for k in ks})
    return RankingPartial(sums, int(res.users.numel()), per)


class MFAlgorithm(AlgorithmBase):
    """Both halves' common parts: the MF schema check, the layout, the side tables, initial rows,
    negatives, and ranking evaluation. `self.centralized` is the layout."""
    EVALUATION = RANKING
    READS_SIDE_TABLES = True

    def __init__(self, config, setup: Setup, centralized: bool):
        self.config, self.setup, self.centralized = config, setup, centralized
        schema = setup.schema
        names = {f.name for f in schema.categorical}
        if not {"user", "item"} <= names or "rating" not in schema.numeric:
            raise ValueError(f"algorithm.name={config.name!r} needs MF data (categorical user and item, numeric "
                             "rating): use data.name mf_synthetic, mf_epinions, mf_ciao or mf_amazon")
        self.num_users, self.num_items = schema.vocab("user"), schema.vocab("item")
        if centralized and setup.num_clients != 1:
            raise ValueError("algorithm.mode=centralized needs data.layout=centralized (one client holds every user)")
        if not centralized and setup.num_clients != self.num_users:
            raise ValueError("algorithm.mode=federated needs data.layout=federated (client = user)")
        self.num_categories = schema.vocab("item_category") - 1 if "item_category" in names else 0
        self.side = None
        self.item_category = self.trust = self.pairs = None

    def attach_data(self, dataset) -> None:
        side = dataset.side
        cat = side["item_category"].column("category").to_numpy() if "item_category" in side else None
        self.item_category = torch.from_numpy(np.array(cat, dtype=np.int64)) if cat is not None else None
        self.trust = csr(side.get("trust"), "src", "dst", self.num_users)
        self.pairs = csr(side.get("item_pairs"), "a", "b", self.num_items)
        self.side = side

    def _check_attached(self) -> None:
        if self.side is None:
            raise RuntimeError(f"{self.config.name}: the worker did not attach the dataset (attach_data)")

    def init_table(self, rows: int, stream: int) -> torch.Tensor:
        return rng.normal_tensor((self.config.dim,), self.setup.seed, stream, 0, np.arange(rows, dtype=np.uint64),
                                 std=self.config.init_std)

    def init_user_rows(self, client_ids: torch.Tensor) -> torch.Tensor:
        """(K, d) initial rows p_u of the federated layout's clients (the same draws as row u of P)."""
        d = self.config.dim
        if not len(client_ids):
            return torch.zeros(0, d)
        ids = client_ids.numpy().astype(np.uint64)
        return rng.normal_tensor((d,), self.setup.seed, rng.MF_INIT_USERS, 0, ids, std=self.config.init_std)

    def negatives(self, batch: CohortBatch, rnd: int) -> torch.Tensor:
        """(K, L) one uniform negative item per row of every client of the cohort, drawn by (round, client, row)."""
        K, L = batch.mask.shape
        u = rng.uniform(self.setup.seed, rng.MF_NEGATIVES, rnd, batch.client_ids.numpy()[:, None].astype(np.uint64),
                        np.arange(L, dtype=np.uint64)[None, :])
        return torch.from_numpy(np.minimum((u * self.num_items).astype(np.int64), self.num_items - 1))

    # ---- evaluation
    def _users(self, state: Tensors, personal: Tensors) -> torch.Tensor:
        return MFServer.unflatten(state).P if self.centralized else MFPersonal.unflatten(personal).p

    def _pairs(self, b: CohortBatch) -> torch.Tensor:
        """(2, N) (user row of `_users`, item) of the real rows of a batch."""
        real = b.mask > 0
        if self.centralized:
            return torch.stack([b.categorical["user"][real], b.categorical["item"][real]])
        rowpos = torch.arange(b.size)[:, None].expand_as(real)
        return torch.stack([rowpos[real], b.categorical["item"][real]])

    def score_cohort(self, state: Tensors, batch: CohortBatch, personal: Tensors) -> torch.Tensor:
        """Pointwise scores σ(p_u·q_i) of the rows (for inspection; the engine evaluates by ranking)."""
        s = MFServer.unflatten(state)
        q = s.Q[batch.categorical["item"]]
        if self.centralized:
            p = s.P[batch.categorical["user"]]
        else:
            p = MFPersonal.unflatten(personal).p[:, None, :].expand(-1, batch.mask.shape[1], -1)
        return torch.sigmoid((p * q).sum(-1, keepdim=True))

    def evaluate_cohort(self, state: Tensors, batches, personal: Tensors, split: int) -> RankingPartial:
        """Sums over this cohort's users of Recall@K / NDCG@K on `split` and how many were ranked,
        with the training items (and, for test, the validation items) masked."""
        test = self._pairs(batches[split])
        exclude = torch.cat([self._pairs(batches[s]) for s in (TRAIN, VAL) if s < split], dim=1)
        users = self._users(state, personal)
        ids = None
        if self.setup.per_user_eval and split == TEST:           # global user id of each row of `users`
            ids = torch.arange(users.shape[0]) if self.centralized else batches[split].client_ids
        return ranking_partial(users, MFServer.unflatten(state).Q, test, exclude, tuple(self.config.ks), ids)

    def aggregate_evaluate(self, prefix: str, partial: RankingPartial) -> dict[str, float]:
        return ranking_metrics(prefix, partial)
