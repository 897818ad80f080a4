"""Amazon review data as per-user rating / implicit-feedback sources, plus the item-item graph of the metadata.

Length: three layouts of one source that share their parsers, checks and cache.

Three layouts (one registered source each):

* `amazon` -- the official release layout (2018, Ni, Li & McAuley; the 2014 McAuley layout is read too) in one
  folder: interactions from either the ratings-only CSV `<Category>.csv[.gz]` (no header; `item,user,rating,
  timestamp`) or the 5-core reviews `<Category>_5.json[.gz]` (JSON lines with `reviewerID`, `asin`, `overall`,
  `unixReviewTime`), plus the metadata `meta_<Category>.json[.gz]` (JSON lines with `asin`, `category` (list, root
  first), `also_view`, `also_buy`; 2014: `categories` (list of lists) and `related.also_viewed/also_bought`,
  Python-literal lines accepted). Row feature `category_id` = the metadata category at `category_level`.
* `amazon_video_games` -- `amazon-video-games/Video.txt.gz` (SASRec preprocessing of the 2014 Video Games reviews):
  `user item` per line, a user's lines contiguous and in time order. Implicit feedback, no timestamps: the line
  number is the time, so `split: chronological` puts each user's latest items in test.
* `amazon_office_products` -- `amazon-office-products/` (MiniOneRec 2018 Office Products, last 20% of the timeline):
  `office_{valid,test}_sequences.csv.gz` (`user_id, history_item_ids, item_id`: <= 10 previous items then the
  target) and `items.jsonl.gz` (`item_id, title, brand, description`). A user's interactions are the distinct items
  of its histories and targets, ordered by (row, position in the row); row feature `brand`.

The implicit sources have no ratings: `rating_threshold` must be null and `negatives_per_positive` (default 1)
gives task `interaction`. `amazon_item_pairs(cfg, seed)` / `amazon_item_categories(cfg, seed)` return the
also_view / also_buy pairs and the category code per item, in the item codes of `cfg.build(seed)`.
"""
from __future__ import annotations

import ast
import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd

from fleetrec.datasets.federated import DataError
import pyarrow as pa

from fleetrec.datasets.io import (PARSE_VERSION, atomic_write_parquet, cached_frame, content_cache_path, numeric_column,
                                  read_csv)
from fleetrec.datasets.real import RatingsConfig, select_rows

PAIR_KINDS = ("also_view", "also_buy")
UNKNOWN_CATEGORY = "<unknown>"
_PAIR_COLUMNS = {"item_a": "int64", "item_b": "int64", "kind": "int64"}


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.name.endswith(".gz") else open(path, encoding="utf-8")


def _json_lines(path: Path, required: tuple[str, ...]):
    """Yield (line number, record) of a JSON-lines file (Python-literal lines of the 2014 files accepted);
    DataError naming the file, the column and the line for a bad line or a missing key."""
    if not path.is_file():
        raise DataError(f"{path}: file not found (set data.path to the folder holding it)")
    n_records = 0
    with _open_text(path) as fh:
        for n, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                try:
                    rec = ast.literal_eval(line)
                except (ValueError, SyntaxError):
                    raise DataError(f"{path}: line {n} is not a JSON object (expected keys "
                                    f"{', '.join(required)})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}: line {n} is not a JSON object (expected keys {', '.join(required)})")
            for key in required:
                if rec.get(key) is None:
                    raise DataError(f"{path}: column '{key}' is missing at line {n} "
                                    f"(expected keys {', '.join(required)})")
            n_records += 1
            yield n, rec
    if n_records == 0:
        raise DataError(f"{path}: file has no records, expected JSON lines with keys {', '.join(required)}")


def _find(root: Path, names: list[str]) -> Path | None:
    for name in names:
        if (root / name).is_file():
            return root / name
    return None


# ---------------------------------------------------------------------------------------- base
@dataclass(frozen=True)
class _AmazonBase(RatingsConfig):
    """Per-user Amazon source: the parse gives the rows (`user`, `item`, `rating`, `time`, ...) and the item
    pairs (`item_a`, `item_b`, `kind`), both in the parse's integer item ids and cached side by side."""
    split: str = "chronological"

    HAS_TIME: ClassVar[bool] = True

    def source_files(self, root: Path) -> list[Path]:
        out = []
        for f in self.FILES:
            p = root / f
            if not p.is_file():
                raise DataError(f"{p}: file not found (set data.path to the folder holding "
                                f"{', '.join(self.FILES)})")
            out.append(p)
        return out

    def rating_path(self) -> Path:
        return self.source_files(self.root())[0] if self.root().is_dir() else self.root()

    def _key(self, root: Path, folder: str) -> Path:
        return content_cache_path(folder, f"amazon-v{PARSE_VERSION}", self.parse_options(), root,
                                  self.source_files(root), self.cache_dir)

    def cache_path(self, root: Path) -> Path:
        return self._key(root, self.FOLDER)

    def parse_all(self, root: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
        raise TypeError(f"{type(self).__name__} must define parse_all()")   # abstract

    def parse(self, root: Path) -> pd.DataFrame:
        """Parse rows and pairs; the pairs go straight to their cache entry (the rows to theirs via `cached_frame`)."""
        rows, pairs = self.parse_all(root)
        if self.cache:
            try:
                atomic_write_parquet(pa.Table.from_pandas(pairs, preserve_index=False),
                                      self._key(root, self.FOLDER + "-pairs"))
            except OSError:
                pass    # an unwritable cache dir only costs a re-parse
        return rows

    def load_pairs(self) -> pd.DataFrame:
        """The parsed item pairs (raw integer item ids of the parse), from the Parquet cache when present."""
        root = self.root()
        if not root.is_dir():
            raise DataError(f"{root}: data folder not found (set data.path)")
        target = self._key(root, self.FOLDER + "-pairs") if self.cache else None
        return cached_frame(target, _PAIR_COLUMNS, lambda: self.parse_all(root)[1])


def _empty_pairs() -> pd.DataFrame:
    return pd.DataFrame({c: np.zeros(0, np.int64) for c in _PAIR_COLUMNS})


def amazon_item_pairs(cfg: _AmazonBase, seed: int = 0) -> pd.DataFrame:
    """The metadata's item-item pairs among the items of `cfg.build(seed)`, in its `item_id` codes:
    columns `item_a`, `item_b` (int64) and `kind` (`also_view` or `also_buy`); one row per distinct
    (item_a, item_b, kind), directed as listed in item_a's metadata, no self pairs. Empty for the sequence
    variants (their files carry no also_view / also_buy)."""
    seed = seed if cfg.seed is None else cfg.seed
    rows, _ = select_rows(cfg, seed)
    items = np.unique(rows["item"].to_numpy())
    raw = cfg.load_pairs()

    def code(v: np.ndarray) -> np.ndarray:
        pos = np.minimum(np.searchsorted(items, v), max(len(items) - 1, 0))
        return np.where(items[pos] == v, pos, -1) if len(items) else np.full(len(v), -1)

    a, b = code(raw["item_a"].to_numpy()), code(raw["item_b"].to_numpy())
    keep = (a >= 0) & (b >= 0)
    kind = np.asarray(PAIR_KINDS, dtype=object)[raw["kind"].to_numpy()[keep]]
    return pd.DataFrame({"item_a": a[keep].astype(np.int64), "item_b": b[keep].astype(np.int64), "kind": kind})


def amazon_item_categories(cfg: _AmazonBase, seed: int = 0) -> np.ndarray:
    """Category code per item code of `cfg.build(seed)` (the dataset's `category_id` of that item)."""
    if not cfg.HAS_CATEGORY:
        raise DataError(f"{cfg.rating_path()}: column 'category': {cfg.name} has no item categories "
                        "(expected the official layout with metadata, data.name: amazon)")
    seed = seed if cfg.seed is None else cfg.seed
    rows, _ = select_rows(cfg, seed)
    items, first = np.unique(rows["item"].to_numpy(), return_index=True)
    _, cat_code = np.unique(rows["category"].to_numpy(), return_inverse=True)
    return cat_code.reshape(-1)[first].astype(np.int64)


# ---------------------------------------------------------------------------------------- official layout
@dataclass(frozen=True)
class AmazonConfig(_AmazonBase):
    """Amazon reviews, official 2018/2014 layout (ratings CSV or 5-core JSON + metadata): like, category_id.
    Per-user clients; the metadata's also_view / also_buy pairs via `amazon_item_pairs`."""
    name: str = "amazon"
    category: str | None = None        # file stem, e.g. Office_Products; null = the one meta_*.json[.gz] in the folder
    interactions: str = "auto"         # auto (5-core reviews when present, else ratings CSV) | reviews | ratings
    category_level: int = 1            # index into the metadata category list (0 = root); shorter lists: deepest

    FOLDER: ClassVar[str] = "amazon"
    HAS_CATEGORY: ClassVar[bool] = True
    CHECKS: ClassVar[dict] = {**RatingsConfig.CHECKS, "interactions": ("auto", "reviews", "ratings"),
                              "category_level": ">=0"}

    def stem(self, root: Path) -> str:
        if self.category is not None:
            return self.category
        metas = sorted({p.name.split(".json")[0][len("meta_"):] for p in root.glob("meta_*.json*")})
        if len(metas) != 1:
            raise DataError(f"{root}: expected exactly one metadata file meta_<Category>.json[.gz], found "
                            f"{len(metas)}{' (' + ', '.join(metas) + ')' if metas else ''}; set data.category")
        return metas[0]

    def files(self, root: Path) -> tuple[Path, str, Path]:
        """(interactions file, 'reviews' or 'ratings', metadata file)."""
        stem = self.stem(root)
        reviews = _find(root, [f"{stem}_5.json", f"{stem}_5.json.gz", f"reviews_{stem}_5.json",
                               f"reviews_{stem}_5.json.gz"])
        ratings = _find(root, [f"{stem}.csv", f"{stem}.csv.gz", f"ratings_{stem}.csv", f"ratings_{stem}.csv.gz"])
        meta = _find(root, [f"meta_{stem}.json", f"meta_{stem}.json.gz"])
        if meta is None:
            raise DataError(f"{root / f'meta_{stem}.json.gz'}: file not found (the metadata with category, "
                            "also_view, also_buy; set data.path / data.category)")
        if self.interactions in ("auto", "reviews") and reviews is not None:
            return reviews, "reviews", meta
        if self.interactions in ("auto", "ratings") and ratings is not None:
            return ratings, "ratings", meta
        want = {"reviews": f"{stem}_5.json.gz", "ratings": f"{stem}.csv"}.get(
            self.interactions, f"{stem}_5.json.gz or {stem}.csv")
        raise DataError(f"{root / want.split(' or ')[0]}: file not found (expected {want}; set data.path / "
                        "data.category)")

    def source_files(self, root: Path) -> list[Path]:
        if not root.is_dir():
            raise DataError(f"{root}: data folder not found (set data.path)")
        p, _, meta = self.files(root)
        return [p, meta]

    def parse_options(self) -> dict:
        return {"interactions": self.interactions, "category_level": self.category_level}

    def parse_all(self, root: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
        p, kind, meta_path = self.files(root)
        if kind == "ratings":
            raw = read_csv(p, ("item", "user", "rating", "timestamp"), header=False, dtype={0: str, 1: str})
            users, asins = raw["user"].astype(str).str.strip(), raw["item"].astype(str).str.strip()
            rating = numeric_column(raw, "rating", p, integer=False, lo=1, hi=5, header=False)
            time = numeric_column(raw, "timestamp", p, integer=True, lo=0, header=False)
        else:
            cols = ("reviewerID", "asin", "overall", "unixReviewTime")
            recs = [(r["reviewerID"], r["asin"], r["overall"], r["unixReviewTime"]) for _, r in _json_lines(p, cols)]
            raw = pd.DataFrame(recs, columns=list(cols))
            users, asins = raw["reviewerID"].astype(str), raw["asin"].astype(str)
            rating = numeric_column(raw, "overall", p, integer=False, lo=1, hi=5)
            time = numeric_column(raw, "unixReviewTime", p, integer=True, lo=0)
        user_code, _ = pd.factorize(users.to_numpy(), sort=True)
        item_code, item_asins = pd.factorize(asins.to_numpy(), sort=True)
        asin_index = pd.Index(item_asins)

        item_cat = np.full(len(item_asins), UNKNOWN_CATEGORY, dtype=object)
        pair_a, pair_b, pair_k = [], [], []
        for n, rec in _json_lines(meta_path, ("asin",)):
            a = asin_index.get_indexer([str(rec["asin"])])[0]
            if a < 0:
                continue                        # an item nobody rated here
            cats = rec.get("category")
            if cats is None and isinstance(rec.get("categories"), list) and rec["categories"]:
                cats = rec["categories"][0]     # 2014: list of category paths, the first one
            if cats is not None and not (isinstance(cats, list) and all(isinstance(c, str) for c in cats)):
                raise DataError(f"{meta_path}: column 'category' must be a list of strings, found {cats!r} "
                                f"at line {n}")
            if cats:
                item_cat[a] = cats[min(self.category_level, len(cats) - 1)].strip() or UNKNOWN_CATEGORY
            related = rec.get("related") if isinstance(rec.get("related"), dict) else {}
            for k, (key, old) in enumerate((("also_view", "also_viewed"), ("also_buy", "also_bought"))):
                others = rec.get(key, related.get(old))
                if others is None or others == "":
                    continue
                if not isinstance(others, list):
                    raise DataError(f"{meta_path}: column '{key}' must be a list of ASINs, found {others!r} "
                                    f"at line {n}")
                b = asin_index.get_indexer([str(o) for o in others])
                b = b[(b >= 0) & (b != a)]
                pair_a.append(np.full(len(b), a, np.int64))
                pair_b.append(b.astype(np.int64))
                pair_k.append(np.full(len(b), k, np.int64))
        cat_code, _ = pd.factorize(item_cat, sort=True)
        rows = pd.DataFrame({"user": user_code.astype(np.int64), "item": item_code.astype(np.int64),
                             "rating": rating, "time": time, "category": cat_code[item_code].astype(np.int64)})
        pairs = (pd.DataFrame({"item_a": np.concatenate(pair_a), "item_b": np.concatenate(pair_b),
                               "kind": np.concatenate(pair_k)}).drop_duplicates(ignore_index=True)
                 if pair_a else _empty_pairs())
        return rows, pairs


# ---------------------------------------------------------------------------------------- sequence variants
@dataclass(frozen=True)
class _AmazonImplicit(_AmazonBase):
    rating_threshold: float | None = None
    negatives_per_positive: int = 1

    HAS_RATING: ClassVar[bool] = False


@dataclass(frozen=True)
class AmazonVideoGamesConfig(_AmazonImplicit):
    """Amazon Video Games 2014 (SASRec `Video.txt`): 31,013 users, 23,715 items, implicit, time = line order."""
    name: str = "amazon_video_games"

    FOLDER: ClassVar[str] = "amazon-video-games"
    FILES: ClassVar[tuple[str, ...]] = ("Video.txt.gz",)
    RATING_FILE: ClassVar[str] = "Video.txt.gz"

    def parse_all(self, root: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
        p = root / "Video.txt.gz"
        raw = read_csv(p, ("user_id", "item_id"), sep=" ", header=False)
        user = numeric_column(raw, "user_id", p, integer=True, lo=1, header=False)
        starts = np.r_[0, np.flatnonzero(np.diff(user) != 0) + 1]
        again = pd.Series(user[starts]).duplicated().to_numpy()
        if again.any():
            i = int(starts[np.flatnonzero(again)[0]])
            raise DataError(f"{p}: column 'user_id' must be contiguous per user (a user's lines together, "
                            f"in time order), found user {user[i]} again at line {i + 1}")
        rows = pd.DataFrame({"user": user, "item": numeric_column(raw, "item_id", p, integer=True, lo=1, header=False),
                             "rating": np.ones(len(raw)), "time": np.arange(len(raw), dtype=np.int64)})
        return rows, _empty_pairs()


@dataclass(frozen=True)
class AmazonOfficeProductsConfig(_AmazonImplicit):
    """Amazon Office Products 2018 (MiniOneRec valid/test sequences, last 20% of time): implicit, row feature brand."""
    name: str = "amazon_office_products"

    FOLDER: ClassVar[str] = "amazon-office-products"
    FILES: ClassVar[tuple[str, ...]] = ("office_valid_sequences.csv.gz", "office_test_sequences.csv.gz",
                                        "items.jsonl.gz")
    RATING_FILE: ClassVar[str] = "office_test_sequences.csv.gz"

    def frame_columns(self) -> dict[str, str]:
        return {**super().frame_columns(), "brand": "int64"}

    def parse_all(self, root: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
        brands: dict[int, str] = {}
        pi = root / "items.jsonl.gz"
        for n, rec in _json_lines(pi, ("item_id",)):
            iid = rec["item_id"]
            if not isinstance(iid, int) or isinstance(iid, bool) or iid < 0:
                raise DataError(f"{pi}: column 'item_id' must be an integer >= 0, found {iid!r} at line {n}")
            brands[iid] = str(rec.get("brand") or "").strip()
        users, items, times = [], [], []
        offset = 0
        for f in self.FILES[:2]:
            p = root / f
            raw = read_csv(p, ("user_id", "history_item_ids", "item_id"))
            target = numeric_column(raw, "item_id", p, integer=True, lo=0)
            hist = raw["history_item_ids"].fillna("").astype(str).str.split()
            lens = hist.str.len().to_numpy()
            flat = np.concatenate([np.asarray(h, dtype=object) for h in hist]) if lens.sum() else np.zeros(0, object)
            hist_items = pd.to_numeric(pd.Series(flat), errors="coerce")
            if hist_items.isna().any() or (hist_items < 0).any():
                row = int(np.searchsorted(np.cumsum(lens), int(np.flatnonzero(
                    hist_items.isna().to_numpy() | (hist_items < 0).to_numpy())[0]), side="right"))
                raise DataError(f"{p}: column 'history_item_ids' must be space-separated item ids >= 0, found "
                                f"{raw['history_item_ids'].iloc[row]!r} at line {row + 2}")
            row_of = np.repeat(np.arange(len(raw)), lens)
            pos = np.arange(len(flat)) - np.repeat(np.cumsum(lens) - lens, lens)
            u = raw["user_id"].astype(str).str.strip().to_numpy()
            users += [u[row_of], u]
            items += [hist_items.to_numpy().astype(np.int64), target]
            times += [(offset + row_of) * 16 + pos, (offset + np.arange(len(raw))) * 16 + 15]
            offset += len(raw)
        item = np.concatenate(items)
        known = np.isin(item, np.fromiter(brands, np.int64, len(brands)))
        if not known.all():
            raise DataError(f"{pi}: column 'item_id' must list every item of the sequences, "
                            f"missing {int(item[~known][0])}")
        user_code, _ = pd.factorize(np.concatenate(users), sort=True)
        df = pd.DataFrame({"user": user_code.astype(np.int64), "item": item, "time": np.concatenate(times)})
        # one row per (user, item) at its first appearance: histories repeat earlier targets
        df = df.sort_values(["user", "time"], kind="stable").drop_duplicates(["user", "item"], keep="first")
        df = df.sort_values("time", kind="stable").reset_index(drop=True)
        brand_code, _ = pd.factorize(np.array([brands[i] for i in df["item"].to_numpy()], dtype=object), sort=True)
        df["rating"] = 1.0
        df["brand"] = brand_code.astype(np.int64)
        return df, _empty_pairs()

    def row_features(self, df):
        _, code = np.unique(df["brand"].to_numpy(), return_inverse=True)
        return {"brand": (code.reshape(-1).astype(np.int64), int(code.max()) + 1 if len(code) else 1)}
