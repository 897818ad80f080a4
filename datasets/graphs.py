"""Matrix-factorization data with auxiliary graphs, for PMTRec (methods.md §2.5).

An `MFData` holds interactions (user, item, rating) with a per-user random train / val / test
split, plus the auxiliary information the auxiliary tasks read: directed trust edges among the
kept users, one category per item (-1 = unknown) and optional item-item pairs (co-view /
co-buy). `to_federated` turns it into a `FederatedDataset` whose rows are interactions and
whose `side` tables carry the graphs:

    side["trust"]          columns src, dst         (int64 user ids)
    side["item_category"]  column  category         (int64, one row per item, -1 = unknown)
    side["item_pairs"]     columns a, b             (int64 item ids; absent when the source has none)

Layouts: `centralized` = one client (id 0) holds every user's rows (the paper's setting);
`federated` = client c is user c. Row columns in both: categorical `user`, `item`, `item_category`
(the item's category + 1, 0 = unknown); numeric `rating`; task `interaction` (every observed
row is a positive).

Sources: `mf_synthetic` (seeded generator, social edges correlated with user factors, item
categories and co-view pairs from item factors), `mf_epinions` (ratings + trust), `mf_ciao`
(ratings + item categories, no trust file) and `mf_amazon` (one of the Amazon layouts of
datasets/amazon.py: item categories and also_view / also_buy pairs where the files have them,
no trust). Implicit-feedback sources have no ratings: their `rating` column is 1.0 for every
row and `meta["has_rating"]` is False, so PMTRec refuses the `rating` task on them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pyarrow as pa

from fleetrec.datasets.federated import ORACLE_FACTORS, CategoricalField, DataError, DatasetSchema, FederatedDataset
from fleetrec.datasets.partition import random_split, subsample_clients
from fleetrec.datasets.sources import DataConfig

LAYOUTS = ("centralized", "federated")


@dataclass
class MFData:
    name: str
    num_users: int
    num_items: int
    user: np.ndarray              # (N,) int64
    item: np.ndarray              # (N,) int64
    rating: np.ndarray            # (N,) float32
    split: np.ndarray             # (N,) int8 0 train / 1 val / 2 test
    trust: np.ndarray             # (2, E) int64 directed user -> user
    item_category: np.ndarray     # (I,) int64, -1 = unknown
    item_pairs: np.ndarray | None = None   # (2, P) int64 item -> item, or None
    meta: dict | None = None
    user_ids: np.ndarray | None = None     # (U,) the source's id of each user code
    item_ids: np.ndarray | None = None     # (I,) the source's id of each item code
    true_factors: tuple[np.ndarray, np.ndarray] | None = None   # (U, d), (I, d) in codes: generated data only

    @property
    def num_categories(self) -> int:
        return int(self.item_category.max()) + 1 if len(self.item_category) and self.item_category.max() >= 0 else 0


def kcore(user: np.ndarray, item: np.ndarray, k: int, max_iter: int = 100) -> np.ndarray:
    """Boolean row mask of the k-core: every kept user and item has >= k kept rows."""
    keep = np.ones(len(user), dtype=bool)
    if k <= 1:
        return keep
    for _ in range(max_iter):
        u, i = user[keep], item[keep]
        cu = np.bincount(u, minlength=int(user.max()) + 1 if len(user) else 0)
        ci = np.bincount(i, minlength=int(item.max()) + 1 if len(item) else 0)
        ok = (cu[user] >= k) & (ci[item] >= k) & keep
        if ok.sum() == keep.sum():
            return ok
        keep = ok
    return keep


def reindex(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dense codes 0..n-1 (ascending original id) and the original ids."""
    uniq, inv = np.unique(values, return_inverse=True)
    return inv.astype(np.int64).reshape(-1), uniq


def build_mf(name: str, user: np.ndarray, item: np.ndarray, rating: np.ndarray, *, trust: np.ndarray | None,
             item_category_per_row: np.ndarray | None, item_pairs: np.ndarray | None, k_core: int,
             max_users: int | None, val_fraction: float, test_fraction: float, seed: int,
             has_rating: bool = True) -> MFData:
    """Filter (k-core, deterministic user subsample, k-core again), reindex, split per user,
    and keep only the graph edges among kept users / items. Ids may be any non-negative ints."""
    user, item = np.asarray(user, np.int64), np.asarray(item, np.int64)
    rating = np.asarray(rating, np.float32)
    # one row per (user, item): the last
    key = user * (int(item.max()) + 1) + item
    _, last = np.unique(key[::-1], return_index=True)
    rows = np.sort(len(key) - 1 - last)
    user, item, rating = user[rows], item[rows], rating[rows]
    cat_row = None if item_category_per_row is None else np.asarray(item_category_per_row, np.int64)[rows]
    keep = kcore(user, item, k_core)
    if max_users is not None:
        kept_users = subsample_clients(user[keep], max_users, seed)
        keep = kcore_mask_on(user, item, keep & np.isin(user, kept_users), k_core)
    if not keep.any():
        raise DataError(f"{name}: no interaction is left after the {k_core}-core filter")
    u_code, u_ids = reindex(user[keep])
    i_code, i_ids = reindex(item[keep])
    r = rating[keep]
    U, I = len(u_ids), len(i_ids)
    item_cat = np.full(I, -1, np.int64)
    if cat_row is not None:
        item_cat[i_code] = cat_row[keep]
        known = item_cat >= 0
        _, item_cat[known] = np.unique(item_cat[known], return_inverse=True)
    split = random_split(u_code, val_fraction, test_fraction, seed)
    tr = np.zeros((2, 0), np.int64)
    if trust is not None and len(trust[0]):
        s = np.searchsorted(u_ids, trust[0])
        d = np.searchsorted(u_ids, trust[1])
        ok = (s < U) & (d < U)
        ok[ok] &= (u_ids[s[ok]] == trust[0][ok]) & (u_ids[d[ok]] == trust[1][ok])
        ok &= s != d
        tr = np.unique(np.stack([s[ok], d[ok]]), axis=1)
    pairs = None
    if item_pairs is not None:
        a = np.searchsorted(i_ids, item_pairs[0])
        b = np.searchsorted(i_ids, item_pairs[1])
        ok = (a < I) & (b < I)
        ok[ok] &= (i_ids[a[ok]] == item_pairs[0][ok]) & (i_ids[b[ok]] == item_pairs[1][ok])
        ok &= a != b
        pairs = np.unique(np.stack([a[ok], b[ok]]), axis=1)
    return MFData(name=name, num_users=U, num_items=I, user=u_code, item=i_code, rating=r, split=split,
                  trust=tr, item_category=item_cat, item_pairs=pairs, user_ids=u_ids, item_ids=i_ids,
                  meta={"users": U, "items": I, "interactions": int(keep.sum()), "trust_edges": int(tr.shape[1]),
                        "item_pairs": 0 if pairs is None else int(pairs.shape[1]), "k_core": k_core,
                        "has_rating": bool(has_rating)})


def kcore_mask_on(user: np.ndarray, item: np.ndarray, keep: np.ndarray, k: int) -> np.ndarray:
    """k-core of the rows already in `keep` (rows outside stay out)."""
    idx = np.flatnonzero(keep)
    out = np.zeros(len(user), dtype=bool)
    if len(idx):
        out[idx] = kcore(user[idx], item[idx], k)
    return out


def to_federated(data: MFData, layout: str) -> FederatedDataset:
    if layout not in LAYOUTS:
        raise DataError(f"{data.name}: layout must be one of {LAYOUTS}, got {layout!r}")
    client = np.zeros(len(data.user), np.int64) if layout == "centralized" else data.user
    num_clients = 1 if layout == "centralized" else data.num_users
    # item_category: the row's item category + 1 (0 = unknown), so the schema carries the category count
    schema = DatasetSchema(categorical=(CategoricalField("user", data.num_users), CategoricalField("item", data.num_items),
                                        CategoricalField("item_category", data.num_categories + 1)),
                           numeric=("rating",), tasks=("interaction",))
    side = {"trust": pa.table({"src": data.trust[0], "dst": data.trust[1]}),
            "item_category": pa.table({"category": data.item_category})}
    if data.item_pairs is not None:
        side["item_pairs"] = pa.table({"a": data.item_pairs[0], "b": data.item_pairs[1]})
    if data.true_factors is not None:       # what a model that knows the true preferences scores
        for name, f in zip(ORACLE_FACTORS, data.true_factors):
            side[name] = pa.table({f"f{j}": f[:, j] for j in range(f.shape[1])})
    meta = {**(data.meta or {}), "layout": layout, "num_users": data.num_users, "num_items": data.num_items,
            "num_categories": data.num_categories}
    return FederatedDataset.from_columns(
        data.name, {"client": client, "split": data.split, "user": data.user, "item": data.item,
                    "rating": data.rating, "item_category": data.item_category[data.item] + 1,
                    "interaction": np.ones(len(data.user), np.float32)},
        schema, {}, num_clients, meta=meta, side=side)


# ---------------------------------------------------------------------------------- synthetic
def synthetic_mf(num_users: int, num_items: int, dim: int, rows_per_user: int, num_categories: int,
                 trust_per_user: int, pairs_per_item: int, seed: int) -> tuple:
    """Seeded MF world: item factors = category centroid + noise, user factors ~ N(0, I);
    each user picks `rows_per_user` (+/- half) items by Gumbel-top-k on u·q; ratings from u·q;
    trust: each user links to the most similar users among a random candidate set;
    co-view pairs: each item with its nearest items of the same category."""
    g = np.random.default_rng([seed, 7177])
    cat = g.integers(0, num_categories, num_items)
    centroids = g.normal(size=(num_categories, dim)) * 1.0
    q = centroids[cat] + 0.5 * g.normal(size=(num_items, dim))
    p = g.normal(size=(num_users, dim))
    scores = p @ q.T / np.sqrt(dim)                                               # (U, I)
    n = np.clip(g.integers(rows_per_user // 2, rows_per_user * 3 // 2 + 1, num_users), 3, num_items)
    gumbel = -np.log(-np.log(g.random(scores.shape) + 1e-12) + 1e-12)
    order = np.argsort(-(scores * 2.0 + gumbel), axis=1)
    user = np.repeat(np.arange(num_users), n)
    item = np.concatenate([order[u, :n[u]] for u in range(num_users)])
    s = scores[user, item]
    rating = np.clip(np.round(3.0 + 1.5 * s + 0.5 * g.normal(size=len(s))), 1, 5)
    cand = g.integers(0, num_users, (num_users, 8 * trust_per_user + 1))
    sim = np.einsum("ud,ucd->uc", p, p[cand])
    sim[cand == np.arange(num_users)[:, None]] = -np.inf
    top = np.argsort(-sim, axis=1)[:, :trust_per_user]
    trust = np.stack([np.repeat(np.arange(num_users), trust_per_user), np.take_along_axis(cand, top, 1).reshape(-1)])
    qs = q @ q.T
    qs[np.arange(num_items), np.arange(num_items)] = -np.inf
    qs[cat[:, None] != cat[None, :]] = -np.inf
    k = min(pairs_per_item, max(num_items - 1, 0))
    nn = np.argsort(-qs, axis=1)[:, :k]
    a = np.repeat(np.arange(num_items), k)
    b = nn.reshape(-1)
    ok = np.isfinite(qs[a, b])
    return user, item, rating, trust, cat[item], np.stack([a[ok], b[ok]]), (p, q)


@dataclass(frozen=True)
class MFSyntheticConfig(DataConfig):
    """Seeded synthetic MF data with a trust graph, item categories and co-view pairs."""
    name: str = "mf_synthetic"
    num_users: int = 600
    num_items: int = 400
    dim: int = 8                       # true factor dimension
    rows_per_user: int = 20            # mean interactions per user (uniform in [n/2, 3n/2])
    num_categories: int = 10
    trust_per_user: int = 5            # out-edges per user, to the most similar of a random candidate set
    pairs_per_item: int = 3            # co-view pairs per item (nearest items of its category); 0 = none
    k_core: int = 1
    layout: str = "centralized"        # centralized: one client holds all users | federated: user = client
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int | None = None            # data seed; null = experiment seed

    def client_layout(self) -> str:
        return self.layout

    CHECKS: ClassVar[dict] = {"num_users": ">=2", "num_items": ">=2", "dim": ">=1", "rows_per_user": ">=3",
                              "num_categories": ">=1", "trust_per_user": ">=0", "pairs_per_item": ">=0",
                              "k_core": ">=1", "layout": LAYOUTS, "val_fraction": "0..0.5",
                              "test_fraction": "0..0.5"}

    def validate(self) -> str | None:
        if self.rows_per_user >= self.num_items:
            return f"data.rows_per_user: got {self.rows_per_user}, must be below data.num_items ({self.num_items})"
        return None

    def mf(self, seed: int) -> MFData:
        s = seed if self.seed is None else self.seed
        user, item, rating, trust, cat_row, pairs, factors = synthetic_mf(
            self.num_users, self.num_items, self.dim, self.rows_per_user, self.num_categories,
            self.trust_per_user, self.pairs_per_item, s)
        data = build_mf(self.name, user, item, rating, trust=trust, item_category_per_row=cat_row,
                        item_pairs=pairs if self.pairs_per_item else None, k_core=self.k_core, max_users=None,
                        val_fraction=self.val_fraction, test_fraction=self.test_fraction, seed=s)
        p, q = factors
        data.true_factors = (p[data.user_ids], q[data.item_ids])
        return data

    def build(self, seed: int) -> FederatedDataset:
        return to_federated(self.mf(seed), self.layout)


@dataclass(frozen=True)
class _MFRealConfig(DataConfig):
    """Options shared by the MF sources that read a real rating source in place; subclasses
    give the name, the source's defaults and `read(seed)` -> the rows and graphs for build_mf."""
    path: str | None = None            # the source's folder; null = its shared/data folder
    cache_dir: str | None = None       # the source's parsed-rows cache; null = default
    cache: bool = True
    k_core: int = 10                   # k-core on users and items, before and after subsampling users
    max_users: int | None = None       # keep N users (seeded hash order) after the first k-core; null = all
    layout: str = "centralized"        # centralized: one client holds all users | federated: user = client
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int | None = None            # data seed; null = experiment seed

    def client_layout(self) -> str:
        return self.layout

    CHECKS: ClassVar[dict] = {"k_core": ">=1", "max_users": ">=2", "layout": LAYOUTS,
                              "val_fraction": "0..0.5", "test_fraction": "0..0.5"}

    def read(self) -> dict:
        """df (user, item, rating[, category]), and keyword arguments of build_mf: trust,
        item_category_per_row, item_pairs, has_rating."""
        raise TypeError(f"{type(self).__name__} must define read()")   # abstract

    def mf(self, seed: int) -> MFData:
        got = self.read()
        df = got.pop("df")
        return build_mf(self.name, df["user"].to_numpy(), df["item"].to_numpy(), df["rating"].to_numpy(),
                        k_core=self.k_core, max_users=self.max_users, val_fraction=self.val_fraction,
                        test_fraction=self.test_fraction, seed=seed if self.seed is None else self.seed, **got)

    def build(self, seed: int) -> FederatedDataset:
        return to_federated(self.mf(seed), self.layout)


@dataclass(frozen=True)
class MFEpinionsConfig(_MFRealConfig):
    """Epinions ratings (+ item categories) and its trust network, read in place."""
    name: str = "mf_epinions"

    def read(self) -> dict:
        from fleetrec.datasets.io import numeric_column, read_csv
        from fleetrec.datasets.real import EpinionsConfig
        src = EpinionsConfig(path=self.path, cache_dir=self.cache_dir, cache=self.cache)
        df = src.load_frame()
        trust_path = Path(src.root()) / "trust.csv.gz"
        raw = read_csv(trust_path, ("truster_id", "trustee_id"))
        trust = np.stack([numeric_column(raw, "truster_id", trust_path, integer=True, lo=0),
                          numeric_column(raw, "trustee_id", trust_path, integer=True, lo=0)]).astype(np.int64)
        return {"df": df, "trust": trust, "item_category_per_row": df["category"].to_numpy(), "item_pairs": None}


@dataclass(frozen=True)
class MFCiaoConfig(_MFRealConfig):
    """Ciao ratings (0..5) with item categories, read in place; no trust graph (the shared folder has none)."""
    name: str = "mf_ciao"

    def read(self) -> dict:
        from fleetrec.datasets.real import CiaoConfig
        df = CiaoConfig(path=self.path, cache_dir=self.cache_dir, cache=self.cache).load_frame()
        return {"df": df, "trust": None, "item_category_per_row": df["category"].to_numpy(), "item_pairs": None}


AMAZON_KINDS = ("official", "video_games", "office_products")


@dataclass(frozen=True)
class MFAmazonConfig(_MFRealConfig):
    """Amazon interactions from one of datasets/amazon.py's layouts (`source`), read in place: item categories
    (official layout only) and the metadata's also_view / also_buy pairs (official layout only) as item pairs;
    no trust. The implicit layouts (video_games, office_products) have no ratings: rating = 1.0 for every row
    and meta has_rating = False (PMTRec refuses its `rating` task)."""
    name: str = "mf_amazon"
    source: str = "video_games"        # official (AmazonConfig) | video_games | office_products
    category: str | None = None        # official only: the file stem (e.g. Office_Products); null = the one there
    category_level: int = 1            # official only: index into the metadata category list
    k_core: int = 5

    CHECKS: ClassVar[dict] = {**_MFRealConfig.CHECKS, "source": AMAZON_KINDS, "category_level": ">=0"}

    def validate(self) -> str | None:
        if self.category is not None and self.source != "official":
            return f"data.category: got {self.category!r}, but only data.source=official reads a category file"
        return None

    def amazon(self):
        from fleetrec.datasets.amazon import AmazonConfig, AmazonOfficeProductsConfig, AmazonVideoGamesConfig
        common = {"path": self.path, "cache_dir": self.cache_dir, "cache": self.cache}
        if self.source == "official":
            return AmazonConfig(category=self.category, category_level=self.category_level, **common)
        return {"video_games": AmazonVideoGamesConfig,
                "office_products": AmazonOfficeProductsConfig}[self.source](**common)

    def read(self) -> dict:
        src = self.amazon()
        df = src.load_frame()
        raw = src.load_pairs()           # the parse's raw item ids, as df["item"]
        pairs = (np.stack([raw["item_a"].to_numpy(), raw["item_b"].to_numpy()]).astype(np.int64)
                 if len(raw) else None)
        return {"df": df, "trust": None, "item_pairs": pairs, "has_rating": src.HAS_RATING,
                "item_category_per_row": df["category"].to_numpy() if src.HAS_CATEGORY else None}
