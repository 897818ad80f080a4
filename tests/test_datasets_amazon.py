"""Amazon sources: the official 2018 / 2014 layout (tiny fixtures written here), the two sequence files of
shared/data, the item-item pairs and categories in the built dataset's item codes, malformed input and the cache."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from fleetrec.datasets import SOURCES
from fleetrec.datasets import io as dio
from fleetrec.datasets.amazon import (AmazonConfig, AmazonOfficeProductsConfig, AmazonVideoGamesConfig,
                                      amazon_item_categories, amazon_item_pairs)
from fleetrec.simulator.data_cli import main as data_main
from fleetrec.datasets.federated import TEST, TRAIN, VAL, DataError

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_video = pytest.mark.skipif(not (SHARED_DATA / "amazon-video-games" / "Video.txt.gz").is_file(),
                                 reason="shared amazon-video-games is absent")
needs_office = pytest.mark.skipif(not (SHARED_DATA / "amazon-office-products" / "items.jsonl.gz").is_file(),
                                  reason="shared amazon-office-products is absent")

N_USERS, N_ITEMS = 8, 12
CATS = ["Paper", "Pens", "Ink"]


def asin(i: int) -> str:
    return f"B{i:09d}" if i else "0078800242"      # ISBN-like ASINs keep their leading zero


def _interactions():
    """(user, item, rating, time): user u rates 7 items; its later items have later timestamps."""
    out = []
    for u in range(N_USERS):
        for j in range(7):
            item = (u + 5 * j) % N_ITEMS
            out.append((f"A{u:05d}XYZ", asin(item), float((u + j) % 5 + 1), 1_400_000_000 + 86_400 * (10 * j + u)))
    return out


def _meta_records():
    recs = []
    for i in range(N_ITEMS):
        recs.append({"asin": asin(i), "title": f"item {i}", "brand": "Acme", "main_cat": "Office Products",
                     "category": ["Office Products", CATS[i % 3], "Sub"] if i != 5 else ["Office Products"],
                     "also_view": [asin((i + 1) % N_ITEMS), "B999999999", asin(i)],      # unknown + self dropped
                     "also_buy": [asin((i + 3) % N_ITEMS)] if i % 2 == 0 else [],
                     "feature": [], "description": [], "rank": "1 in Office", "price": "$1.00"})
    recs.append({"asin": "B888888888", "category": ["Office Products", "Tape"], "also_view": [asin(0)]})  # unrated
    return recs


def _write(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def write_official(root: Path, reviews: bool = True, ratings: bool = True, stem: str = "Office_Products") -> Path:
    """The 2018 release layout: `<stem>_5.json.gz`, `<stem>.csv`, `meta_<stem>.json.gz`."""
    rows = _interactions()
    if reviews:
        _write(root / f"{stem}_5.json.gz", [json.dumps({
            "overall": r, "verified": True, "reviewTime": "01 1, 2015", "reviewerID": u, "asin": a,
            "reviewerName": "x", "reviewText": "fine", "summary": "ok", "unixReviewTime": t}) for u, a, r, t in rows])
    if ratings:
        _write(root / f"{stem}.csv", [f"{a},{u},{r},{t}" for u, a, r, t in rows])
    _write(root / f"meta_{stem}.json.gz", [json.dumps(m) for m in _meta_records()])
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("fleetrec-cache-amazon"))


# ------------------------------------------------------------------------------------------ registry / config
def test_amazon_sources_are_registered_and_checked():
    from fleetrec.datasets.sources import DataConfig
    from fleetrec.simulator.config_loader import ConfigError, build
    for name in ("amazon", "amazon_video_games", "amazon_office_products"):
        assert name in SOURCES
    cfg = build(DataConfig, {"name": "amazon_video_games", "max_clients": 10}, "data")
    assert isinstance(cfg, AmazonVideoGamesConfig) and cfg.task_names() == ("interaction",)
    assert cfg.split == "chronological"
    with pytest.raises(ConfigError, match="data.rating_threshold.*implicit"):
        build(DataConfig, {"name": "amazon_office_products", "rating_threshold": 4}, "data")
    with pytest.raises(ConfigError, match="data.interactions"):
        build(DataConfig, {"name": "amazon", "interactions": "clicks"}, "data")


# ------------------------------------------------------------------------------------------ official layout
def test_official_reviews_with_categories_and_chronological_split(tmp_path):
    root = write_official(tmp_path / "amz")
    cfg = AmazonConfig(path=str(root), cache_dir=str(tmp_path / "c"))
    ds = cfg.build(0)
    assert ds.num_clients == N_USERS and ds.num_rows == N_USERS * 7
    assert ds.schema.tasks == ("like",) and ds.schema.vocab("item_id") == N_ITEMS
    # category_id = category level 1 (Paper/Pens/Ink; item 5 has only the root -> the root is used)
    assert ds.schema.vocab("category_id") == 4
    item, cat = ds.column("item_id"), ds.column("category_id")
    names = sorted(set(CATS) | {"Office Products"})
    for i, c in zip(item, cat):                     # item code i = asin(i) (all items kept, sorted ASINs)
        assert names[c] == ("Office Products" if i == 5 else CATS[i % 3])
    # chronological: each user's test rows are its latest items
    rows = _interactions()
    time_of = {(u, a): t for u, a, _, t in rows}
    labels = ds.client_attrs.column("label").to_pylist()
    users = sorted({u for u, *_ in rows})
    split, client = ds.column("split"), ds.column("client")
    for c in range(ds.num_clients):
        u = users[int(labels[c].split(":")[1])]
        t = {s: [time_of[(u, asin(int(i)))] for i in item[(client == c) & (split == s)]] for s in (TRAIN, VAL, TEST)}
        assert max(t[TRAIN]) < min(t[VAL]) <= max(t[VAL]) < min(t[TEST])
    like = ds.column("like")
    rating_of = {(u, a): r for u, a, r, _ in rows}
    for c, i, y in zip(client, item, like):
        assert y == (rating_of[(users[int(labels[c].split(":")[1])], asin(int(i)))] >= 4)


def test_official_item_pairs_and_categories_use_the_dataset_item_codes(tmp_path):
    root = write_official(tmp_path / "amz")
    cfg = AmazonConfig(path=str(root), cache_dir=str(tmp_path / "c"))
    pairs = amazon_item_pairs(cfg, seed=0)
    assert list(pairs.columns) == ["item_a", "item_b", "kind"]
    got = set(zip(pairs["item_a"], pairs["item_b"], pairs["kind"]))
    want = {(i, (i + 1) % N_ITEMS, "also_view") for i in range(N_ITEMS)}
    want |= {(i, (i + 3) % N_ITEMS, "also_buy") for i in range(0, N_ITEMS, 2)}
    assert got == want and len(pairs) == len(want)          # unknown ASINs, self pairs and the unrated item dropped
    ds = cfg.build(0)
    cats = amazon_item_categories(cfg, seed=0)
    item, cat = ds.column("item_id"), ds.column("category_id")
    assert np.array_equal(cats[item], cat)
    # a subsample: fewer items, codes re-ranked; the pairs follow the built dataset's codes
    small = AmazonConfig(path=str(root), cache_dir=str(tmp_path / "c"), max_clients=2)
    ds2 = small.build(0)
    p2 = amazon_item_pairs(small, seed=0)
    n2 = ds2.schema.vocab("item_id")
    assert n2 < N_ITEMS and len(p2) and p2[["item_a", "item_b"]].to_numpy().max() < n2
    kept = np.unique(small.load_frame()["item"].to_numpy()[np.isin(small.load_frame()["user"],
                     [int(x.split(":")[1]) for x in ds2.client_attrs.column("label").to_pylist()])])
    assert set(zip(kept[p2["item_a"]], kept[p2["item_b"]], p2["kind"])) <= want


def test_official_ratings_csv_and_negatives(tmp_path):
    root = write_official(tmp_path / "amz", reviews=False)
    ds = AmazonConfig(path=str(root), cache_dir=str(tmp_path / "c"), negatives_per_positive=2).build(0)
    assert ds.schema.tasks == ("interaction", "like")
    inter, like = ds.column("interaction"), ds.column("like")
    assert inter.sum() == N_USERS * 7 and np.all(like <= inter)
    # the same interactions from the reviews file give the same observed rows
    both = write_official(tmp_path / "amz2")
    a = AmazonConfig(path=str(both), cache_dir=str(tmp_path / "c"), interactions="ratings").build(0)
    b = AmazonConfig(path=str(both), cache_dir=str(tmp_path / "c"), interactions="reviews").build(0)
    assert a.table.equals(b.table)
    # all-digit ASINs (books) keep their leading zeros, so they still join the metadata
    digits = tmp_path / "amz3"
    write_official(digits, reviews=False)
    for f in ("Office_Products.csv", "meta_Office_Products.json.gz"):
        text = (gzip.open if f.endswith(".gz") else open)(digits / f, "rt").read()
        _write(digits / f, text.replace('"B', '"0').replace("B0", "00").splitlines())
    cfg = AmazonConfig(path=str(digits), cache=False)
    assert cfg.build(0).schema.vocab("category_id") == 4 and len(amazon_item_pairs(cfg)) == 18


def test_official_2014_metadata_layout(tmp_path):
    root = tmp_path / "amz14"
    write_official(root, ratings=False, stem="Video_Games")
    recs = [str({"asin": asin(i), "categories": [["Video Games", "PC"], ["Video Games"]],
                 "related": {"also_bought": [asin((i + 1) % N_ITEMS)], "also_viewed": [asin((i + 2) % N_ITEMS)]}})
            for i in range(N_ITEMS)]                         # Python-literal lines, as in the 2014 files
    _write(root / "meta_Video_Games.json.gz", recs)
    (root / "Video_Games_5.json.gz").rename(root / "reviews_Video_Games_5.json.gz")
    cfg = AmazonConfig(path=str(root), cache=False)
    ds = cfg.build(0)
    assert ds.schema.vocab("category_id") == 1
    pairs = amazon_item_pairs(cfg)
    assert sorted(set(pairs["kind"])) == ["also_buy", "also_view"] and len(pairs) == 2 * N_ITEMS


def test_official_cache_hit_skips_parsing(tmp_path, monkeypatch):
    root = write_official(tmp_path / "amz")
    cfg = AmazonConfig(path=str(root), cache_dir=str(tmp_path / "c"))
    before = dio.PARSE_COUNT["parses"]
    first = cfg.build(0)
    assert len(list((tmp_path / "c").glob("*.parquet"))) == 2          # rows + pairs

    def boom(self, root):
        raise AssertionError("parsed again despite a cache entry")
    monkeypatch.setattr(AmazonConfig, "parse_all", boom)
    assert cfg.build(0).table.equals(first.table) and len(amazon_item_pairs(cfg)) > 0
    assert dio.PARSE_COUNT["parses"] == before + 1                     # one parse filled both entries


@pytest.mark.parametrize("mutate, column, what", [
    (lambda r: r.pop("overall"), "overall", "missing at line 3"),
    (lambda r: r.update(overall=9.0), "overall", "must be in [1, 5]"),
    (lambda r: r.update(unixReviewTime="yesterday"), "unixReviewTime", "must be an integer"),
])
def test_malformed_reviews_name_file_column_and_line(tmp_path, mutate, column, what):
    root = write_official(tmp_path / "amz", ratings=False)
    p = root / "Office_Products_5.json.gz"
    lines = gzip.open(p, "rt").read().splitlines()
    rec = json.loads(lines[2])
    mutate(rec)
    lines[2] = json.dumps(rec)
    _write(p, lines)
    with pytest.raises(DataError) as e:
        AmazonConfig(path=str(root), cache_dir=str(tmp_path / "c")).build(0)
    msg = str(e.value)
    assert str(p) in msg and f"'{column}'" in msg and what in msg
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())


def test_malformed_metadata_and_missing_files(tmp_path):
    root = write_official(tmp_path / "amz")
    meta = root / "meta_Office_Products.json.gz"
    recs = _meta_records()
    recs[3]["also_buy"] = "B000000001"
    _write(meta, [json.dumps(m) for m in recs])
    with pytest.raises(DataError, match=r"meta_Office_Products\.json\.gz: column 'also_buy' must be a list.*line 4"):
        AmazonConfig(path=str(root), cache=False).build(0)
    _write(meta, ["{not json"])
    with pytest.raises(DataError, match=r"meta_Office_Products\.json\.gz: line 1 is not a JSON object"):
        AmazonConfig(path=str(root), cache=False).build(0)
    meta.unlink()
    with pytest.raises(DataError, match="expected exactly one metadata file"):
        AmazonConfig(path=str(root), cache=False).build(0)
    with pytest.raises(DataError, match=r"meta_Office_Products\.json\.gz: file not found"):
        AmazonConfig(path=str(root), category="Office_Products", cache=False).build(0)
    with pytest.raises(DataError, match="data folder not found"):
        AmazonConfig(path=str(tmp_path / "nowhere"), cache=False).build(0)


def test_amazon_cli_describe(tmp_path, capsys):
    root = write_official(tmp_path / "amz")
    rc = data_main(["describe", "amazon", f"path={root}", "cache=false", "negatives_per_positive=1"])
    out = capsys.readouterr().out
    assert rc == 0 and f"{N_USERS} clients" in out and "category_id 4" in out and "interaction" in out


# ------------------------------------------------------------------------------------------ shared sequence files
@needs_video
def test_video_games_sequences(cache):
    cfg = AmazonVideoGamesConfig(max_clients=150, cache_dir=cache)
    ds = cfg.build(0)
    assert ds.num_clients == 150 and ds.schema.tasks == ("interaction",)
    assert [f.name for f in ds.schema.categorical] == ["item_id"]
    assert abs(ds.column("interaction").mean() - 0.5) < 1e-9           # 1 negative per positive
    assert len(amazon_item_pairs(cfg)) == 0
    # chronological = file order: a user's test positives are its last lines
    frame = cfg.load_frame()
    user = int(ds.client_attrs.column("label")[0].as_py().split(":")[1])
    lines = frame.loc[frame["user"] == user].sort_values("time")
    client, split, inter = ds.column("client"), ds.column("split"), ds.column("interaction")
    test_items = set(ds.column("item_id")[(client == 0) & (split == TEST) & (inter == 1)].tolist())
    items = np.unique(frame.loc[frame["user"].isin([int(x.split(":")[1]) for x in
                                                    ds.client_attrs.column("label").to_pylist()]), "item"])
    last = lines.drop_duplicates("item", keep="last")["item"].to_numpy()[-len(test_items):]
    assert {int(np.searchsorted(items, i)) for i in last} == test_items


@needs_office
def test_office_products_sequences(cache):
    ds = AmazonOfficeProductsConfig(max_clients=200, cache_dir=cache, negatives_per_positive=3).build(1)
    assert ds.num_clients == 200 and ds.schema.tasks == ("interaction",)
    assert [f.name for f in ds.schema.categorical] == ["item_id", "brand"]
    assert abs(ds.column("interaction").mean() - 0.25) < 1e-9
    assert (np.diff(ds.offsets) >= 5 * 4).all()                         # min_rows observed rows, + negatives
    for s in (TRAIN, VAL, TEST):
        assert (ds.column("split") == s).any()
    # each item keeps one brand, also on negatives
    item, brand = ds.column("item_id"), ds.column("brand")
    first = {}
    for i, b in zip(item.tolist(), brand.tolist()):
        assert first.setdefault(i, b) == b
