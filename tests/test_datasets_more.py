"""Tabular multi-scenario multi-task sources: AliExpress (per-country files), Tenrec (per-scenario files),
Census-Income (MMoE benchmark), their cache, malformed input and `fleetrec data describe`."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fleetrec.datasets import SOURCES
from fleetrec.datasets import io as dio
from fleetrec.datasets.aliexpress import CATEGORICAL as AE_CAT, COLUMNS as AE_COLUMNS, NUMERIC as AE_NUM, AliExpressConfig
from fleetrec.datasets.census_income import CATEGORICAL as CI_CAT, NUMERIC as CI_NUM, CensusIncomeConfig
from fleetrec.datasets.describe import describe
from fleetrec.simulator.data_cli import main as data_main
from fleetrec.datasets.federated import TEST, TRAIN, VAL, DataError
from fleetrec.datasets.tenrec import TenrecConfig

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_aliexpress = pytest.mark.skipif(not (SHARED_DATA / "aliexpress" / "aliexpress_US_train_sample.csv").is_file(),
                                      reason="shared AliExpress sample is absent")
needs_census = pytest.mark.skipif(not (SHARED_DATA / "census-income" / "census_income_kdd_test.csv.gz").is_file(),
                                  reason="shared Census-Income file is absent")
TENREC_COLUMNS = ("user_id", "item_id", "click", "follow", "like", "share", "video_category", "watching_times",
                  "gender", "age")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("fleetrec-cache-more"))


# ------------------------------------------------------------------------------------------ fixtures
def _aliexpress_rows(rng, n: int, cat_base: int) -> pd.DataFrame:
    data = {"search_id": rng.integers(0, 50, n)}
    for i, c in enumerate(AE_CAT):
        data[c] = cat_base + rng.integers(0, 3 if i == 0 else 4, n)
    for c in AE_NUM:
        data[c] = rng.random(n).round(4)
    click = (rng.random(n) < 0.4).astype(int)
    data["click"] = click
    data["conversion"] = click * (rng.random(n) < 0.3).astype(int)
    return pd.DataFrame(data, columns=list(AE_COLUMNS))


def write_aliexpress(root: Path, sizes: dict[str, tuple[int, int]], seed: int = 0) -> Path:
    """MTReclib layout AliExpress_<CC>/{train,test}.csv; country k's categorical_1 values start at 10*k."""
    rng = np.random.default_rng(seed)
    for k, (country, (n_train, n_test)) in enumerate(sizes.items()):
        d = root / f"AliExpress_{country}"
        d.mkdir(parents=True, exist_ok=True)
        base = 10 * k if country != "FR" else 0          # FR shares categorical_1 values with the first country
        _aliexpress_rows(rng, n_train, base).to_csv(d / "train.csv", index=False)
        _aliexpress_rows(rng, n_test, base).to_csv(d / "test.csv", index=False)
    return root


def write_tenrec(root: Path, sizes: dict[str, int], seed: int = 0, gz: tuple[str, ...] = ()) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for k, (stem, n) in enumerate(sizes.items()):
        click = (rng.random(n) < 0.5).astype(int)
        df = pd.DataFrame({
            "user_id": rng.integers(0, 30, n), "item_id": 100 * k + rng.integers(0, 20, n), "click": click,
            "follow": click * (rng.random(n) < 0.1), "like": click * (rng.random(n) < 0.3),
            "share": click * (rng.random(n) < 0.2), "video_category": rng.integers(0, 5, n),
            "watching_times": rng.integers(0, 4, n), "gender": rng.integers(0, 3, n), "age": rng.integers(0, 8, n)},
            columns=list(TENREC_COLUMNS))
        if stem in gz:
            with gzip.open(root / f"{stem}.csv.gz", "wt") as f:
                df.to_csv(f, index=False)
        else:
            df.to_csv(root / f"{stem}.csv", index=False)
    return root


def write_census(root: Path, n: int = 60, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    data = {c: rng.integers(0, 90, n) for c in CI_NUM}
    for c in CI_CAT:
        data[c] = rng.choice(["a", "b", "?"], n)
    data["sex"] = rng.choice(["Female", "Male"], n)
    data["marital_stat"] = rng.choice(["Never married", "Divorced"], n)
    data["instance_weight"] = rng.random(n)
    data["income_50k"] = rng.choice(["- 50000", "50000+"], n)
    pd.DataFrame(data).to_csv(root / CensusIncomeConfig.FILE, index=False, compression="gzip")
    return root


def _splits_ok(ds):
    split = ds.column("split")
    for s in (TRAIN, VAL, TEST):
        assert (split == s).any()


# ------------------------------------------------------------------------------------------ registry
def test_sources_are_registered_and_configs_checked():
    from fleetrec.simulator.config_loader import ConfigError, build
    from fleetrec.datasets.sources import DataConfig
    for name in ("aliexpress", "tenrec", "census_income"):
        assert name in SOURCES
    cfg = build(DataConfig, {"name": "aliexpress", "countries": ["nl", "ES"], "tasks": ["ctr"]}, "data")
    assert isinstance(cfg, AliExpressConfig) and cfg.countries == ("nl", "ES")
    with pytest.raises(ConfigError, match="data.tasks"):
        build(DataConfig, {"name": "aliexpress", "tasks": ["cvr"]}, "data")
    with pytest.raises(ConfigError, match="data.countries"):
        build(DataConfig, {"name": "aliexpress", "countries": []}, "data")
    with pytest.raises(ConfigError, match="data.tasks"):
        build(DataConfig, {"name": "tenrec", "tasks": ["click", "watching_times"]}, "data")
    with pytest.raises(ConfigError, match="data.features"):
        build(DataConfig, {"name": "tenrec", "features": ["zip"]}, "data")
    with pytest.raises(ConfigError, match="data.scenario_column"):
        build(DataConfig, {"name": "census_income", "scenario_column": "age"}, "data")
    with pytest.raises(ConfigError, match="val_fraction"):
        build(DataConfig, {"name": "census_income", "val_fraction": 0.9}, "data")


# ------------------------------------------------------------------------------------------ AliExpress
@needs_aliexpress
def test_aliexpress_real_us_sample(cache):
    ds = AliExpressConfig(cache_dir=cache).build(0)
    assert ds.num_clients == 1 and ds.num_rows == 120
    assert ds.client_attrs.column("label").to_pylist() == ["country:US"]
    assert ds.schema.scenario == "scenario" and ds.schema.tasks == ("ctr", "ctcvr")
    assert [f.name for f in ds.schema.categorical] == list(AE_CAT) and ds.schema.numeric == AE_NUM
    split = ds.column("split")
    assert (split == TEST).sum() == 20 and (split == VAL).sum() == 10     # official test file; 10% of 100 train rows
    ctr, ctcvr = ds.column("ctr"), ds.column("ctcvr")
    assert ctr.sum() == 70 and ctcvr.sum() == 4 and np.all(ctcvr <= ctr)  # README: (1,0)=66, (1,1)=4 in all
    x = np.stack([ds.column(c) for c in AE_NUM])
    assert x.min() >= 0 and x.max() <= 1
    assert "country:US" in describe(ds)


def test_aliexpress_multi_country_assembly(tmp_path, cache):
    root = write_aliexpress(tmp_path / "ae", {"NL": (40, 10), "ES": (30, 8), "FR": (20, 6)})
    cfg = AliExpressConfig(path=str(root), cache_dir=cache, val_fraction=0.25)
    ds = cfg.build(0)
    labels = ds.client_attrs.column("label").to_pylist()
    assert labels == ["country:ES", "country:FR", "country:NL"]              # discovered, sorted
    assert ds.schema.vocab("scenario") == 3 and list(ds.client_attr("scenario")) == [0, 1, 2]
    assert list(np.diff(ds.offsets)) == [38, 26, 50]
    assert list(ds.rows_per_client(TEST)) == [8, 6, 10]                     # the official test files
    assert list(ds.rows_per_client(VAL)) == [round(30 * .25), 5, 10]         # seeded fraction of train rows
    # one vocabulary across countries: raw categorical_1 values are NL {0..2}, ES {10..12}, FR {0..2}
    raw = pd.concat([pd.read_csv(root / f"AliExpress_{c}" / f) for c in ("ES", "FR", "NL")
                     for f in ("train.csv", "test.csv")])
    assert ds.schema.vocab("categorical_1") == raw["categorical_1"].nunique() == 6
    code, client = ds.column("categorical_1"), ds.column("client")
    assert set(code[client == 0]) == {3, 4, 5} and set(code[client == 1]) == set(code[client == 2]) == {0, 1, 2}
    assert ds.column("ctcvr").sum() == (raw["click"] * raw["conversion"]).sum()
    # deterministic; another seed moves validation rows but never test rows
    again = cfg.build(0)
    assert again.table.equals(ds.table)
    other = cfg.build(1)
    assert not other.table.equals(ds.table)
    assert list(other.rows_per_client(TEST)) == [8, 6, 10]
    # a subset of countries, in the plain-file layout too
    sub = AliExpressConfig(path=str(root), cache_dir=cache, countries=("nl", "FR"), tasks=("ctcvr",)).build(0)
    assert sub.client_attrs.column("label").to_pylist() == ["country:NL", "country:FR"]
    assert sub.schema.tasks == ("ctcvr",) and sub.num_rows == 76
    capped = AliExpressConfig(path=str(root), cache_dir=cache, max_rows_per_client=20).build(0)
    assert list(np.diff(capped.offsets)) == [20, 20, 20]


def test_aliexpress_cache_hit_and_missing_files(tmp_path, cache):
    root = write_aliexpress(tmp_path / "ae", {"NL": (12, 4)})
    cfg = AliExpressConfig(path=str(root), cache_dir=str(tmp_path / "c"))
    before = dio.PARSE_COUNT["parses"]
    a = cfg.build(0)
    b = cfg.build(0)
    assert dio.PARSE_COUNT["parses"] == before + 1 and a.table.equals(b.table)
    assert len(list((tmp_path / "c").glob("aliexpress-*.parquet"))) == 1
    with pytest.raises(DataError, match="'ES'"):
        AliExpressConfig(path=str(root), countries=("ES",), cache=False).build(0)
    (root / "AliExpress_NL" / "test.csv").unlink()
    with pytest.raises(DataError, match=r"AliExpress_NL/test\.csv: file not found"):
        AliExpressConfig(path=str(root), cache=False).build(0)
    with pytest.raises(DataError, match="no AliExpress train file"):
        AliExpressConfig(path=str(tmp_path), cache=False).build(0)


@pytest.mark.parametrize("edit, column, what", [
    (lambda df: df.drop(columns="conversion"), "conversion", "missing column"),
    (lambda df: df.assign(click=df["click"].where(df.index != 3, 2)), "click", r"\[0, 1\], found 2 at line 5"),
    (lambda df: df.assign(categorical_5=df["categorical_5"].astype(object).where(df.index != 0, "x")),
     "categorical_5", "must be an integer"),
    (lambda df: df.assign(numerical_7=df["numerical_7"].astype(object).where(df.index != 1, "oops")),
     "numerical_7", "must be a number"),
])
def test_aliexpress_malformed_names_file_and_column(tmp_path, edit, column, what):
    root = write_aliexpress(tmp_path / "ae", {"NL": (12, 4), "ES": (12, 4)})
    p = root / "AliExpress_ES" / "train.csv"
    edit(pd.read_csv(p)).to_csv(p, index=False)
    with pytest.raises(DataError, match=rf"AliExpress_ES/train\.csv.*'{column}'.*{what}|"
                                        rf"AliExpress_ES/train\.csv.*{what}.*'{column}'"):
        AliExpressConfig(path=str(root), cache=False).build(0)


# ------------------------------------------------------------------------------------------ Tenrec
def test_tenrec_scenarios_from_files(tmp_path, cache):
    root = write_tenrec(tmp_path / "tenrec", {"QK-video": 60, "QB-video": 40, "QB-article": 30}, gz=("QB-article",))
    ds = TenrecConfig(path=str(root), cache_dir=cache).build(0)
    assert ds.client_attrs.column("label").to_pylist() == ["scenario:QK-video", "scenario:QB-video",
                                                          "scenario:QB-article"]
    assert list(np.diff(ds.offsets)) == [60, 40, 30] and ds.schema.scenario == "scenario"
    assert ds.schema.tasks == ("click", "like")
    assert [f.name for f in ds.schema.categorical] == ["user_id", "item_id", "video_category", "gender", "age"]
    assert ds.schema.vocab("user_id") <= 30 and ds.schema.vocab("item_id") <= 60   # shared across scenarios
    assert np.all(ds.column("like") <= ds.column("click"))
    _splits_ok(ds)
    assert list(ds.rows_per_client(TEST)) == [6, 4, 3]
    sub = TenrecConfig(path=str(root), cache_dir=cache, scenarios=("QB-article",), tasks=("click", "share", "follow"),
                       features=("user_id", "item_id")).build(0)
    assert sub.num_clients == 1 and sub.schema.tasks == ("click", "share", "follow")
    raw = pd.read_csv(root / "QB-article.csv.gz")
    assert sub.column("share").sum() == raw["share"].sum()


@pytest.mark.parametrize("edit, column, what", [
    (lambda df: df.drop(columns="like"), "like", "missing column"),
    (lambda df: df.assign(click=df["click"].where(df.index != 2, -1)), "click", r"\[0, 1\], found -1 at line 4"),
    (lambda df: df.assign(like=df["like"].astype(float).where(df.index != 0, 0.5)), "like", "must be an integer"),
])
def test_tenrec_malformed_names_file_and_column(tmp_path, edit, column, what):
    root = write_tenrec(tmp_path / "tenrec", {"QK-video": 20, "QK-article": 20})
    p = root / "QK-article.csv"
    edit(pd.read_csv(p)).to_csv(p, index=False)
    with pytest.raises(DataError, match=rf"QK-article\.csv.*('{column}'.*{what}|{what}.*'{column}')"):
        TenrecConfig(path=str(root), cache=False).build(0)


def test_tenrec_missing_files(tmp_path):
    with pytest.raises(DataError, match="data folder not found"):
        TenrecConfig(path=str(tmp_path / "nope")).build(0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no Tenrec scenario file"):
        TenrecConfig(path=str(tmp_path / "empty")).build(0)
    root = write_tenrec(tmp_path / "t", {"QK-video": 10})
    with pytest.raises(DataError, match=r"QB-video\.csv: file not found"):
        TenrecConfig(path=str(root), scenarios=("QK-video", "QB-video"), cache=False).build(0)


# ------------------------------------------------------------------------------------------ Census-Income
@needs_census
def test_census_income_real(cache):
    ds = CensusIncomeConfig(cache_dir=cache, scenario_column="sex").build(0)
    assert ds.num_rows == 99_762 and ds.num_clients == 2
    assert ds.client_attrs.column("label").to_pylist() == ["sex:Female", "sex:Male"]
    assert ds.schema.tasks == ("income_50k", "never_married")
    names = [f.name for f in ds.schema.categorical]
    assert "marital_stat" not in names and "sex" not in names and len(names) == 26
    assert ds.schema.numeric == CI_NUM and "instance_weight" not in ds.schema.numeric
    assert int(ds.column("income_50k").sum()) == 6_186 and int(ds.column("never_married").sum()) == 43_143
    split = ds.column("split")
    age = ds.column("age")
    assert age[split == TRAIN].min() == 0 and age[split == TRAIN].max() == 1
    _splits_ok(ds)
    one = CensusIncomeConfig(cache_dir=cache, tasks=("income_50k",), scale_numeric=False).build(0)
    assert one.num_clients == 1 and one.schema.tasks == ("income_50k",)
    assert "marital_stat" in [f.name for f in one.schema.categorical] and one.column("age").max() == 90


@pytest.mark.parametrize("edit, column, what", [
    (lambda df: df.drop(columns="marital_stat"), "marital_stat", "missing column"),
    (lambda df: df.assign(income_50k=df["income_50k"].where(df.index != 4, "maybe")), "income_50k",
     "found 'maybe' at line 6"),
    (lambda df: df.assign(age=df["age"].astype(object).where(df.index != 0, "old")), "age", "must be a number"),
])
def test_census_malformed_names_file_and_column(tmp_path, edit, column, what):
    root = write_census(tmp_path / "ci")
    p = root / CensusIncomeConfig.FILE
    edit(pd.read_csv(p)).to_csv(p, index=False, compression="gzip")
    with pytest.raises(DataError, match=rf"census_income_kdd_test\.csv\.gz.*('{column}'.*{what}|{what}.*'{column}')"):
        CensusIncomeConfig(path=str(root), cache=False).build(0)


def test_census_fixture_scenarios(tmp_path):
    root = write_census(tmp_path / "ci", n=80)
    ds = CensusIncomeConfig(path=str(root), cache_dir=str(tmp_path / "c"), scenario_column="sex").build(0)
    assert ds.client_attrs.column("label").to_pylist() == ["sex:Female", "sex:Male"]
    assert ds.schema.vocab("class_worker") == 3
    _splits_ok(ds)


# ------------------------------------------------------------------------------------------ CLI
def test_data_cli_describe_new_sources(tmp_path, capsys):
    ae = write_aliexpress(tmp_path / "ae", {"NL": (20, 5), "FR": (20, 5)})
    rc = data_main(["describe", "aliexpress", f"path={ae}", f"cache_dir={tmp_path / 'c'}"])
    out = capsys.readouterr().out
    assert rc == 0 and "country:FR" in out and "country:NL" in out and "ctcvr" in out
    tr = write_tenrec(tmp_path / "tr", {"QK-video": 20})
    rc = data_main(["describe", "tenrec", f"path={tr}", "tasks=[click, share]", "cache=false"])
    out = capsys.readouterr().out
    assert rc == 0 and "scenario:QK-video" in out and "share" in out
    rc = data_main(["describe", "tenrec", f"path={tmp_path / 'none'}"])
    assert rc == 2 and "data folder not found" in capsys.readouterr().err
    ci = write_census(tmp_path / "ci")
    rc = data_main(["describe", "census_income", f"path={ci}", "scenario_column=sex", "cache=false"])
    assert rc == 0 and "sex:Male" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ KuaiRand tables
@pytest.mark.skipif(not (SHARED_DATA / "kuairand" / "user_features_pure.csv.gz").is_file(),
                    reason="shared KuaiRand tables are absent")
def test_kuairand_feature_tables():
    from fleetrec.datasets.kuairand import USER_DISCRETE, VIDEO_DISCRETE, load_user_features, load_video_features
    users = load_user_features()
    assert len(users.ids) == 27_285 and set(users.codes) == set(USER_DISCRETE)
    for c, v in users.codes.items():
        assert v.min() >= 0 and v.max() < users.vocab[c]
    videos = load_video_features()
    assert len(videos.ids) == 7_583 and videos.vocab["video_type"] >= 2
    assert list(videos.lookup(np.array([5, 0]), Path("log.csv"), "video_id")) == [5, 0]
    with pytest.raises(DataError, match=r"log\.csv: column 'video_id'"):
        videos.lookup(np.array([10**9]), Path("log.csv"), "video_id")


def test_kuairand_malformed_table(tmp_path):
    from fleetrec.datasets.kuairand import load_video_features
    pd.DataFrame({"video_id": [0, 1], "video_type": ["NORMAL", "AD"]}).to_csv(
        tmp_path / "video_features_basic_pure.csv.gz", index=False, compression="gzip")
    with pytest.raises(DataError, match=r"video_features_basic_pure\.csv\.gz: missing column 'upload_dt'"):
        load_video_features(tmp_path)


def test_group_weights_pick_which_user_attributes_carry_the_taste():
    """synthetic_per_user's `group_weights`: equal weights are the unweighted mixture draw for draw;
    weight on one attribute alone makes users that share its value share their group taste; a
    wrong count or all-zero weights are refused with one line."""
    import numpy as np
    import pytest
    from fleetrec.datasets.synthetic import SyntheticPerUserConfig, _mixed
    from fleetrec.simulator.config import load
    from fleetrec.simulator.config_loader import ConfigError
    codes = [np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1])]
    plain = _mixed(np.random.default_rng(5), 4, 3, codes, (2, 2), 0.5)
    equal = _mixed(np.random.default_rng(5), 4, 3, codes, (2, 2), 0.5, (1.0, 1.0))
    assert np.array_equal(plain, equal)
    only_first = _mixed(np.random.default_rng(5), 4, 3, codes, (2, 2), 1.0, (1.0, 0.0))
    assert np.allclose(only_first[0], only_first[1]) and not np.allclose(only_first[0], only_first[2])
    assert load(None, []).data.build(0).fingerprint() == load(None, ["data.group_weights=[1, 1]"]).data.build(0).fingerprint()
    for bad in ("data.group_weights=[1]", "data.group_weights=[0, 0]", "data.group_weights=[1, -1]"):
        with pytest.raises(ConfigError, match="data.group_weights"):
            load(None, [bad])
    assert SyntheticPerUserConfig().group_weights == ()
