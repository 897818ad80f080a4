"""Real public rating datasets read in place from `shared/data/`: the shared ratings pipeline, and
Epinions, Ciao, FilmTrust (MovieLens-100k / -1M are in `movielens.py`).

Length: the pipeline below is one sequence of steps over one frame; the three sources are short.

Each source is a `DataConfig` whose fields are the YAML keys of the `data:` block. Building runs:

1. parse the raw files into one normalized frame (columns `user`, `item`, `rating`, and where the
   data has them `category`, `time`, `helpfulness`, user demographics, `genre`), checking every
   column's type and range; the frame is cached as Parquet, keyed by the SHA-256 of the raw
   files' bytes, the parser version and the options that affect parsing;
2. dedupe repeated (user, item) pairs, keep users with >= `min_rows` rows, keep `max_clients`
   users by a seeded hash order (or, with `scenario_top_k`, make the k largest categories the clients);
3. split each client's rows (random fractions, or chronological where timestamps exist);
4. derive tasks: `like` = rating >= `rating_threshold`; with `negatives_per_positive` = k, also
   `interaction`: observed rows are positives and k unobserved items per positive are negatives
   (negatives inherit their positive's split and have every task = 0). In the scenario variant the
   negatives are drawn among the scenario's own items and `category_id` is not a model input
   (`scenario_negatives`, `scenario_feature`); `meta["scenario_match_auc"]` records what the rule
   "item category == scenario" scores, which must stay near 0.5 (with all-item negatives it is ~0.85).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd

from fleetrec.datasets.federated import (CLIENT, SPLIT, SPLIT_NAMES, TEST, VAL, CategoricalField, DataError,
                                         DatasetSchema, FederatedDataset)
from fleetrec.datasets.partition import (by_column, chronological_split, quantile_buckets, random_split,
                                         rows_at_least, subsample_clients)
from fleetrec.datasets.io import (PARSE_VERSION, REPO_ROOT, SHARED_DATA, cached_frame, content_cache_path, numeric_column,
                                  read_csv)
from fleetrec.datasets.sources import DataConfig

ACTIVITY_BUCKETS = 4


# ---------------------------------------------------------------------------------------- base config
@dataclass(frozen=True)
class RatingsConfig(DataConfig):
    """Options shared by every real rating source (subclasses set the name, folder and parser)."""
    name: str = "ratings"
    path: str | None = None                # folder with the raw files; null = shared/data/<folder>
    cache_dir: str | None = None           # null = $FLEETREC_CACHE or ~/.cache/fleetrec
    cache: bool = True                     # false: always parse the raw files, write nothing
    rating_threshold: float | None = 4.0   # task `like` = rating >= threshold; null = no `like` task
    negatives_per_positive: int = 0        # > 0 adds task `interaction` with sampled unobserved items
    max_clients: int | None = None         # keep the first N users by seeded hash order
    min_rows: int = 5                      # keep users (or scenarios) with >= min_rows observed rows
    split: str = "random"                  # random | chronological (sources with timestamps)
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    dedupe: bool = True                    # keep one row per (user, item): the latest
    seed: int | None = None                # data seed (subsampling, split, negatives); null = experiment seed

    FOLDER: ClassVar[str] = ""
    FILES: ClassVar[tuple[str, ...]] = ()
    HAS_TIME: ClassVar[bool] = False
    HAS_CATEGORY: ClassVar[bool] = False
    HAS_RATING: ClassVar[bool] = True       # False: implicit feedback (every observed row is a positive)
    RATING_FILE: ClassVar[str] = ""
    CHECKS: ClassVar[dict] = {"negatives_per_positive": ">=0", "max_clients": ">=1", "min_rows": ">=1",
                              "split": ("random", "chronological"), "val_fraction": "0..0.5",
                              "test_fraction": "0..0.5"}

    # -- validation
    def validate(self) -> str | None:
        if self.split == "chronological" and not self.HAS_TIME:
            return f"data.split: got 'chronological', but {self.name} has no timestamps; use 'random'"
        if self.rating_threshold is not None and not self.HAS_RATING:
            return (f"data.rating_threshold: got {self.rating_threshold}, but {self.name} is implicit feedback "
                    "without ratings; set it to null and use negatives_per_positive > 0 (task `interaction`)")
        if not self.task_names():
            return "data: no task: set rating_threshold or negatives_per_positive > 0"
        return None

    def task_names(self) -> tuple[str, ...]:
        out = []
        if self.negatives_per_positive > 0:
            out.append("interaction")
        if self.rating_threshold is not None:
            out.append("like")
        return tuple(out)

    # -- locations
    def root(self) -> Path:
        if self.path is None:
            return SHARED_DATA / self.FOLDER
        p = Path(self.path).expanduser()
        if not p.is_absolute() and not p.exists() and (REPO_ROOT / p).exists():
            p = REPO_ROOT / p
        return p

    def rating_path(self) -> Path:
        return self.root() / self.RATING_FILE

    # -- parse + cache
    def parse_options(self) -> dict:
        """Options that change the parsed frame (part of the cache key)."""
        return {}

    def frame_columns(self) -> dict[str, str]:
        cols = {"user": "int64", "item": "int64", "rating": "float64"}
        if self.HAS_CATEGORY:
            cols["category"] = "int64"
        if self.HAS_TIME:
            cols["time"] = "int64"
        return cols

    def parse(self, root: Path) -> pd.DataFrame:
        raise TypeError(f"{type(self).__name__} must define parse()")   # abstract

    def cache_path(self, root: Path) -> Path:
        files = []
        for f in self.FILES:
            p = root / f
            if not p.is_file():
                raise DataError(f"{p}: file not found (set data.path to the folder holding {', '.join(self.FILES)})")
            files.append(p)
        return content_cache_path(self.FOLDER, f"parser-v{PARSE_VERSION}", self.parse_options(), root, files,
                                  self.cache_dir)

    def load_frame(self) -> pd.DataFrame:
        """The parsed, checked raw rows (from the Parquet cache when present)."""
        root = self.root()
        if not root.is_dir():
            raise DataError(f"{root}: data folder not found (set data.path)")
        return cached_frame(self.cache_path(root) if self.cache else None, self.frame_columns(),
                            lambda: self.parse(root))

    # -- build
    def build(self, seed: int) -> FederatedDataset:
        return build_ratings(self, seed if self.seed is None else self.seed)

    def client_attributes(self, df: pd.DataFrame, users: np.ndarray) -> tuple[dict, list[CategoricalField]]:
        """Per-client attributes beyond `activity` (users = original user id per client)."""
        return {}, []

    def row_features(self, df: pd.DataFrame) -> dict[str, tuple[np.ndarray, int]]:
        """Extra per-row categorical features from the frame (name -> (codes, vocab)); item-keyed."""
        return {}

    def scenario_top_k_value(self) -> int:
        return 0

    def extra_tasks(self, df: pd.DataFrame) -> dict[str, np.ndarray]:
        return {}


# ---------------------------------------------------------------------------------------- build
def _dedupe(df: pd.DataFrame, has_time: bool) -> pd.DataFrame:
    order = np.arange(len(df))
    if has_time:
        df = df.assign(_o=order).sort_values(["time", "_o"], kind="stable")
    keep = ~df.duplicated(["user", "item"], keep="last")
    df = df[keep]
    if has_time:
        df = df.sort_values("_o", kind="stable").drop(columns="_o")
    return df.reset_index(drop=True)


def _member(keys: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    pos = np.searchsorted(sorted_set, keys)
    return sorted_set[np.minimum(pos, len(sorted_set) - 1)] == keys


def _sample_negatives(rng, owner: np.ndarray, item: np.ndarray, num_items: int, k: int,
                      pool: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """k items per observed row, each unobserved by that row's owner (user); draws are with replacement.

    `pool` (one group code per observed row, e.g. its scenario) restricts each row's draws to the
    items observed in that row's group (anyone's rows); None draws from every item.
    Returns (keep mask over the len(owner) * k draws, sampled item codes): a draw is dropped only when
    its owner has observed (almost) every item of its pool and 50 redraws found nothing new.
    """
    observed = np.unique(owner.astype(np.int64) * num_items + item)
    neg_owner = np.repeat(owner.astype(np.int64), k)
    if pool is None:
        def draw(rows: np.ndarray) -> np.ndarray:
            return rng.integers(0, num_items, size=len(rows))
    else:
        pairs = np.unique(pool.astype(np.int64) * num_items + item)        # sorted (group, item) pairs
        pool_items = pairs % num_items
        starts = np.searchsorted(pairs // num_items, np.arange(int(pool.max()) + 2))
        neg_group = np.repeat(pool.astype(np.int64), k)

        def draw(rows: np.ndarray) -> np.ndarray:
            g = neg_group[rows]
            lo, size = starts[g], starts[g + 1] - starts[g]
            return pool_items[lo + (rng.random(len(rows)) * size).astype(np.int64)]
    everyone = np.arange(len(neg_owner))
    neg_item = draw(everyone)
    clash = _member(neg_owner * num_items + neg_item, observed)
    for _ in range(50):
        if not clash.any():
            break
        idx = np.flatnonzero(clash)
        neg_item[idx] = draw(idx)
        clash[idx] = _member(neg_owner[idx] * num_items + neg_item[idx], observed)
    return ~clash, neg_item


def scenario_match_auc(client: np.ndarray, split: np.ndarray, row_category: np.ndarray,
                       tasks: dict[str, np.ndarray]) -> dict[str, float]:
    """Test AUC of the fixed rule "the row's item category is this scenario's category", per task,
    averaged over the scenario clients (client code c = category code c in scenario mode).

    A data shortcut check: with negatives drawn from every item, most negatives of a scenario belong to
    other categories and this rule, which learns nothing, scores ~0.85. Scenario datasets must keep it
    near 0.5 (tests/test_datasets_real.py checks every shipped scenario config)."""
    from sklearn.metrics import roc_auc_score   # imported on use (workers never need it)

    out: dict[str, float] = {}
    score = (row_category == client).astype(np.float64)
    test = split == TEST
    for t, y in tasks.items():
        aucs = []
        for c in np.unique(client[test]):
            m = test & (client == c)
            if 0 < y[m].sum() < m.sum():
                aucs.append(0.5 if np.all(score[m] == score[m][0]) else roc_auc_score(y[m], score[m]))
        out[t] = float(np.mean(aucs)) if aucs else float("nan")
    return out


def select_rows(cfg: RatingsConfig, seed: int) -> tuple[pd.DataFrame, np.ndarray]:
    """The kept observed rows (dedupe, min_rows, max_clients / scenario_top_k) and the client key per row.

    `build_ratings` codes items by rank among `np.unique(rows["item"])`, so helpers that need the built
    dataset's item codes (e.g. `fleetrec.datasets.amazon.amazon_item_pairs`) call this with the same seed."""
    src = cfg.rating_path()
    df = cfg.load_frame()
    if cfg.dedupe:
        df = _dedupe(df, cfg.HAS_TIME)
    top_k = cfg.scenario_top_k_value()
    if top_k:
        sizes = df.groupby("category").size()
        sizes = sizes[sizes >= cfg.min_rows]
        ids, counts = sizes.index.to_numpy(), sizes.to_numpy()
        cats = np.sort(ids[np.lexsort((ids, -counts))][:top_k])      # largest first, ties by id
        df = df[df["category"].isin(cats)]
        max_users = getattr(cfg, "max_users", None)
        if max_users is not None:
            df = df[df["user"].isin(subsample_clients(df["user"].to_numpy(), max_users, seed))]
        key = df["category"].to_numpy()
    else:
        df = df[rows_at_least(df["user"].to_numpy(), cfg.min_rows)]
        if len(df):
            df = df[df["user"].isin(subsample_clients(df["user"].to_numpy(), cfg.max_clients, seed))]
        key = df["user"].to_numpy()
    df = df.reset_index(drop=True)
    if len(df) == 0:
        raise DataError(f"{src}: column 'user_id': no client has >= min_rows={cfg.min_rows} rows "
                        "after filtering; expected at least one")
    return df, key


def build_ratings(cfg: RatingsConfig, seed: int) -> FederatedDataset:
    src = cfg.rating_path()
    df, key = select_rows(cfg, seed)
    rng = np.random.default_rng([seed, 7301])
    top_k = cfg.scenario_top_k_value()
    client, client_keys = by_column(key)
    num_clients = len(client_keys)
    item, item_ids = by_column(df["item"].to_numpy())
    num_items = len(item_ids)
    if cfg.split == "chronological":
        split = chronological_split(client, df["time"].to_numpy(), cfg.val_fraction, cfg.test_fraction)
    else:
        split = random_split(client, cfg.val_fraction, cfg.test_fraction, seed)

    cols: dict[str, np.ndarray] = {CLIENT: client, SPLIT: split, "item_id": item}
    fields = [CategoricalField("item_id", num_items)]
    first_row_of_item = np.empty(num_items, dtype=np.int64)            # item code -> its first row
    first_row_of_item[item[::-1]] = np.arange(len(item))[::-1]
    item_feats: dict[str, np.ndarray] = {}
    if cfg.HAS_CATEGORY:
        cat_code, cat_ids = by_column(df["category"].to_numpy())
        cols["category_id"] = cat_code
        item_feats["category_id"] = cat_code[first_row_of_item]
        fields.append(CategoricalField("category_id", len(cat_ids)))
    for name, (codes, vocab) in cfg.row_features(df).items():
        cols[name] = codes
        item_feats[name] = codes[first_row_of_item]
        fields.append(CategoricalField(name, vocab))
    if top_k:
        user_code, user_ids = by_column(df["user"].to_numpy())
        cols["user_id"] = user_code
        fields.append(CategoricalField("user_id", len(user_ids)))

    rating = df["rating"].to_numpy()
    tasks: dict[str, np.ndarray] = {}
    if cfg.negatives_per_positive > 0:
        tasks["interaction"] = np.ones(len(df), np.float32)
    if cfg.rating_threshold is not None:
        tasks["like"] = (rating >= cfg.rating_threshold).astype(np.float32)
    for name, y in cfg.extra_tasks(df).items():
        tasks[name] = y.astype(np.float32)
    cols.update(tasks)

    if cfg.negatives_per_positive > 0:
        k = cfg.negatives_per_positive
        # the "observed" set is per user, also in scenario mode (a user's items are never its negatives)
        owner = cols["user_id"] if top_k else client
        in_scenario = bool(top_k) and cfg.scenario_negatives == "scenario"
        keep, neg_item = _sample_negatives(rng, owner, item, num_items, k, pool=client if in_scenario else None)
        src_row = np.repeat(np.arange(len(df)), k)[keep]
        neg = {CLIENT: client[src_row], SPLIT: split[src_row], "item_id": neg_item[keep]}
        for name, per_item in item_feats.items():
            neg[name] = per_item[neg["item_id"]]
        if top_k:
            neg["user_id"] = cols["user_id"][src_row]
        for t in tasks:
            neg[t] = np.zeros(len(src_row), np.float32)
        cols = {c: np.concatenate([v, neg[c]]) for c, v in cols.items()}

    for s, frac in ((VAL, cfg.val_fraction), (TEST, cfg.test_fraction)):
        if frac > 0 and not np.any(cols[SPLIT] == s):
            raise DataError(f"{src}: column 'split': the {SPLIT_NAMES[s]} split is empty after filtering "
                            f"(min_rows={cfg.min_rows}); expected >= 1 row (clients need >= 3 rows)")

    n_obs = np.bincount(client, minlength=num_clients)
    attrs: dict[str, np.ndarray] = {}
    client_fields: list[CategoricalField] = []
    scenario = None
    if top_k:
        attrs["scenario"] = np.arange(num_clients, dtype=np.int64)
        client_fields.append(CategoricalField("scenario", num_clients))
        attrs["label"] = np.array([f"category:{int(c)}" for c in client_keys], dtype=object)
        scenario = "scenario"
    else:
        more, more_fields = cfg.client_attributes(df, client_keys)
        attrs.update(more)
        client_fields.extend(more_fields)
        attrs["activity"] = quantile_buckets(n_obs, ACTIVITY_BUCKETS)
        client_fields.append(CategoricalField("activity", ACTIVITY_BUCKETS))
        attrs["label"] = np.array([f"user:{int(u)}" for u in client_keys], dtype=object)
    if top_k and cfg.HAS_CATEGORY:
        # the category is the scenario: as an input it is constant for a client's own rows
        meta_extra = {"scenario_match_auc": scenario_match_auc(cols[CLIENT], cols[SPLIT], cols["category_id"],
                                                               {t: cols[t] for t in tasks})}
        if cfg.scenario_feature == "drop":
            fields = [f for f in fields if f.name != "category_id"]
    else:
        meta_extra = {}
    schema = DatasetSchema(categorical=tuple(fields), numeric=(), tasks=tuple(tasks),
                           client_categorical=tuple(client_fields), scenario=scenario)
    meta = {"source": cfg.name, "path": str(cfg.root()), "seed": seed,
            "positive_rate": {t: float(cols[t].mean()) for t in tasks}, **meta_extra}
    return FederatedDataset.from_columns(cfg.name, cols, schema, attrs, num_clients, meta)


# ---------------------------------------------------------------------------------------- sources
@dataclass(frozen=True)
class _CategoryConfig(RatingsConfig):
    scenario_top_k: int = 0                # > 0: clients = the k largest categories (scenario variant)
    max_users: int | None = None           # scenario variant only: keep N users by seeded hash order
    # scenario variant: sampled negatives come from the items of the row's own scenario ("scenario"), or
    # from every item ("all": most negatives then belong to other categories, a shortcut worth ~0.85 AUC)
    scenario_negatives: str = "scenario"
    # scenario variant: category_id (= the scenario) is dropped from the model inputs, or kept ("keep")
    scenario_feature: str = "drop"

    HAS_CATEGORY: ClassVar[bool] = True
    CHECKS: ClassVar[dict] = {**RatingsConfig.CHECKS, "scenario_top_k": ">=0", "max_users": ">=1",
                              "scenario_negatives": ("scenario", "all"), "scenario_feature": ("drop", "keep")}

    def validate(self) -> str | None:
        if self.scenario_top_k and self.max_clients is not None:
            return ("data.max_clients: with scenario_top_k the clients are categories; "
                    "use max_users to subsample users")
        if not self.scenario_top_k and self.max_users is not None:
            return "data.max_users: only used with scenario_top_k > 0; use max_clients for per-user clients"
        for key, default in (("scenario_negatives", "scenario"), ("scenario_feature", "drop")):
            if not self.scenario_top_k and getattr(self, key) != default:
                return f"data.{key}: only used with scenario_top_k > 0 (clients = categories)"
        return super().validate()

    def scenario_top_k_value(self) -> int:
        return self.scenario_top_k


@dataclass(frozen=True)
class EpinionsConfig(_CategoryConfig):
    """Epinions (`ratings.csv.gz`): 22,164 users, 296,277 items, 27 categories, ratings 1..5, no timestamps."""
    name: str = "epinions"

    FOLDER: ClassVar[str] = "epinions"
    FILES: ClassVar[tuple[str, ...]] = ("ratings.csv.gz",)
    RATING_FILE: ClassVar[str] = "ratings.csv.gz"

    def parse(self, root: Path) -> pd.DataFrame:
        p = root / "ratings.csv.gz"
        raw = read_csv(p, ("user_id", "item_id", "category_id", "rating"))
        return pd.DataFrame({
            "user": numeric_column(raw, "user_id", p, integer=True, lo=0),
            "item": numeric_column(raw, "item_id", p, integer=True, lo=0),
            "category": numeric_column(raw, "category_id", p, integer=True, lo=0),
            "rating": numeric_column(raw, "rating", p, integer=True, lo=1, hi=5).astype(np.float64)})


@dataclass(frozen=True)
class CiaoConfig(_CategoryConfig):
    """Ciao (`ratings.csv.gz`): 7,375 users, 105,114 items, 28 categories, ratings 0..5, helpfulness 1..7,
    timestamps. `helpfulness_threshold` adds task `helpful` = helpfulness >= threshold."""
    name: str = "ciao"
    helpfulness_threshold: int | None = None

    FOLDER: ClassVar[str] = "ciao"
    FILES: ClassVar[tuple[str, ...]] = ("ratings.csv.gz",)
    HAS_TIME: ClassVar[bool] = True
    RATING_FILE: ClassVar[str] = "ratings.csv.gz"
    CHECKS: ClassVar[dict] = {**_CategoryConfig.CHECKS, "helpfulness_threshold": "1..7"}

    def task_names(self) -> tuple[str, ...]:
        return super().task_names() + (("helpful",) if self.helpfulness_threshold is not None else ())

    def frame_columns(self) -> dict[str, str]:
        return {**super().frame_columns(), "helpfulness": "int64"}

    def parse(self, root: Path) -> pd.DataFrame:
        p = root / "ratings.csv.gz"
        raw = read_csv(p, ("user_id", "item_id", "category_id", "rating", "helpfulness", "timestamp"))
        return pd.DataFrame({
            "user": numeric_column(raw, "user_id", p, integer=True, lo=0),
            "item": numeric_column(raw, "item_id", p, integer=True, lo=0),
            "category": numeric_column(raw, "category_id", p, integer=True, lo=0),
            "rating": numeric_column(raw, "rating", p, integer=True, lo=0, hi=5).astype(np.float64),
            "helpfulness": numeric_column(raw, "helpfulness", p, integer=True, lo=1, hi=7),
            "time": numeric_column(raw, "timestamp", p, integer=True, lo=0)})

    def extra_tasks(self, df):
        if self.helpfulness_threshold is None:
            return {}
        return {"helpful": (df["helpfulness"].to_numpy() >= self.helpfulness_threshold)}


@dataclass(frozen=True)
class FilmTrustConfig(RatingsConfig):
    """FilmTrust (`ratings.txt`): 1,508 users, 2,071 items, ratings 0.5..4 (step 0.5), no timestamps."""
    name: str = "filmtrust"
    rating_threshold: float | None = 3.0

    FOLDER: ClassVar[str] = "filmtrust"
    FILES: ClassVar[tuple[str, ...]] = ("ratings.txt",)
    RATING_FILE: ClassVar[str] = "ratings.txt"

    def parse(self, root: Path) -> pd.DataFrame:
        p = root / "ratings.txt"
        raw = read_csv(p, ("user_id", "item_id", "rating"), sep=r"\s+", header=False)
        return pd.DataFrame({
            "user": numeric_column(raw, "user_id", p, integer=True, lo=0, header=False),
            "item": numeric_column(raw, "item_id", p, integer=True, lo=0, header=False),
            "rating": numeric_column(raw, "rating", p, integer=False, lo=0.5, hi=4, header=False)})
