"""Ali-CCP (torch-rechub layout): the shared sample rows, fixture files, malformed input, cache, CLI."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fleetrec.datasets import SOURCES
from fleetrec.datasets import io as dio
from fleetrec.datasets.ali_ccp import COLUMNS, DENSE, SPARSE, AliCcpConfig
from fleetrec.simulator.data_cli import main as data_main
from fleetrec.datasets.federated import TEST, TRAIN, VAL, DataError

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_ali_ccp = pytest.mark.skipif(not (SHARED_DATA / "ali-ccp" / "ali_ccp_multidomain_train_sample.csv").is_file(),
                                   reason="shared Ali-CCP samples are absent")


def write_ali_ccp(root: Path, sizes=(30, 10, 12), prefix: str = "ali_ccp_", suffix: str = "_sample", seed: int = 0,
                  scenarios=(1, 2)) -> Path:
    """Three files in the official column order; sparse 205 draws from a range that differs per split."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for k, (split, n) in enumerate(zip(("train", "val", "test"), sizes)):
        data = {}
        click = (rng.random(n) < 0.4).astype(int)
        data["click"] = click
        data["purchase"] = click * (rng.random(n) < 0.5).astype(int)
        for c in SPARSE:
            data[c] = rng.integers(0, 3, n)
        data["205"] = 5 * k + rng.integers(0, 5, n)
        data["301"] = np.resize(np.asarray(scenarios), n)
        for c in DENSE:
            data[c] = rng.random(n).round(4)
        pd.DataFrame(data, columns=list(COLUMNS)).to_csv(root / f"{prefix}{split}{suffix}.csv", index=False)
    return root


def test_registered_and_config_checked():
    from fleetrec.simulator.config_loader import ConfigError, build
    from fleetrec.datasets.sources import DataConfig
    assert SOURCES["ali_ccp"] is AliCcpConfig
    cfg = build(DataConfig, {"name": "ali_ccp", "variant": "multidomain", "scenario": True, "tasks": ["ctcvr"]}, "data")
    assert isinstance(cfg, AliCcpConfig) and cfg.variant == "multidomain" and cfg.tasks == ("ctcvr",)
    with pytest.raises(ConfigError, match="data.variant"):
        build(DataConfig, {"name": "ali_ccp", "variant": "full"}, "data")
    with pytest.raises(ConfigError, match="data.tasks"):
        build(DataConfig, {"name": "ali_ccp", "tasks": ["cvr"]}, "data")
    with pytest.raises(ConfigError, match="val_fraction"):
        build(DataConfig, {"name": "ali_ccp", "val_fraction": 0.9}, "data")


# ------------------------------------------------------------------------------------------ shared samples
@needs_ali_ccp
def test_real_standard_sample(tmp_path):
    ds = AliCcpConfig(cache_dir=str(tmp_path)).build(0)
    assert ds.num_clients == 1 and ds.num_rows == 200
    assert ds.client_attrs.column("label").to_pylist() == ["all"]
    assert ds.schema.scenario == "scenario" and ds.schema.tasks == ("ctr", "ctcvr")
    assert [f.name for f in ds.schema.categorical] == list(SPARSE) and ds.schema.numeric == DENSE
    # the given files are the splits: 100 / 50 / 50 rows
    assert list(ds.rows_per_client(TRAIN)) == [100] and list(ds.rows_per_client(VAL)) == [50]
    assert list(ds.rows_per_client(TEST)) == [50]
    split, ctr, ctcvr = ds.column("split"), ds.column("ctr"), ds.column("ctcvr")
    # README: (1,0)/(1,1) = train 6/1, val 2/1, test 1/1
    assert [int(ctr[split == s].sum()) for s in (TRAIN, VAL, TEST)] == [7, 3, 2]
    assert [int(ctcvr[split == s].sum()) for s in (TRAIN, VAL, TEST)] == [1, 1, 1]
    # label encoding: contiguous codes, one vocabulary over the three files
    raw = pd.concat([pd.read_csv(SHARED_DATA / "ali-ccp" / f"ali_ccp_{s}_sample.csv") for s in ("train", "val", "test")])
    for f in ds.schema.categorical:
        assert f.vocab == raw[f.name].nunique()
        assert set(ds.column(f.name)) == set(range(f.vocab))
    assert ds.schema.vocab("301") == 1 and ds.schema.vocab("205") > 100
    assert np.allclose(np.sort(ds.column("D508")), np.sort(raw["D508"].to_numpy(np.float32)))


@needs_ali_ccp
def test_real_multidomain_scenarios_are_clients(tmp_path):
    ds = AliCcpConfig(variant="multidomain", scenario=True, cache_dir=str(tmp_path)).build(0)
    assert ds.num_clients == 3 and ds.num_rows == 200
    assert ds.client_attrs.column("label").to_pylist() == ["301:1", "301:2", "301:3"]
    assert list(ds.client_attr("scenario")) == [0, 1, 2] and ds.schema.vocab("scenario") == 3
    assert "301" not in [f.name for f in ds.schema.categorical] and len(ds.schema.categorical) == 22
    # README: 301 counts train 69/19/12, val 38/7/5, test 39/6/5
    assert list(ds.rows_per_client(TRAIN)) == [69, 19, 12]
    assert list(ds.rows_per_client(VAL)) == [38, 7, 5]
    assert list(ds.rows_per_client(TEST)) == [39, 6, 5]
    split = ds.column("split")
    assert int(ds.column("ctr")[split == TEST].sum()) == 6 and int(ds.column("ctcvr").sum()) == 3
    assert np.all(ds.column("ctcvr") <= ds.column("ctr"))
    # scenario: false on the same files keeps 301 as a row field with 3 values
    one = AliCcpConfig(variant="multidomain", cache_dir=str(tmp_path), tasks=("ctr",)).build(0)
    assert one.num_clients == 1 and one.schema.vocab("301") == 3 and one.schema.tasks == ("ctr",)


# ------------------------------------------------------------------------------------------ fixture files
def test_fixture_splits_vocab_and_options(tmp_path):
    root = write_ali_ccp(tmp_path / "d", prefix="ali_ccp_multidomain_", suffix="")   # full-data file names
    cfg = AliCcpConfig(path=str(root), variant="multidomain", scenario=True, cache_dir=str(tmp_path / "c"))
    ds = cfg.build(0)
    assert ds.client_attrs.column("label").to_pylist() == ["301:1", "301:2"]
    assert list(ds.rows_per_client(TRAIN)) == [15, 15] and list(ds.rows_per_client(VAL)) == [5, 5]
    assert list(ds.rows_per_client(TEST)) == [6, 6]
    # 205 is 0..4 in train, 5..9 in val, 10..14 in test: one vocabulary over all files, codes in raw order
    split, code = ds.column("split"), ds.column("205")
    assert ds.schema.vocab("205") == 15
    assert code[split == TRAIN].max() <= 4 and code[split == VAL].min() >= 5 and code[split == TEST].min() >= 10
    assert cfg.build(1).table.equals(ds.table)             # official splits: the seed changes nothing
    # val_fraction: validation drawn from train+val rows of each client, test file untouched
    drawn = AliCcpConfig(path=str(root), variant="multidomain", scenario=True, cache_dir=str(tmp_path / "c"),
                         val_fraction=0.25).build(0)
    assert list(drawn.rows_per_client(VAL)) == [5, 5] and list(drawn.rows_per_client(TEST)) == [6, 6]
    assert not drawn.table.equals(ds.table)
    capped = AliCcpConfig(path=str(root), variant="multidomain", scenario=True, cache=False,
                          max_rows_per_client=10).build(0)
    assert list(np.diff(capped.offsets)) == [10, 10]
    # the standard variant is not found in a multidomain-only folder
    with pytest.raises(DataError, match=r"no Ali-CCP standard train file found.*ali_ccp_train_sample\.csv"):
        AliCcpConfig(path=str(root), cache=False).build(0)


def test_cache_hit_and_key(tmp_path):
    root = write_ali_ccp(tmp_path / "d")
    cache = tmp_path / "c"
    cfg = AliCcpConfig(path=str(root), cache_dir=str(cache))
    before = dio.PARSE_COUNT["parses"]
    a = cfg.build(0)
    b = AliCcpConfig(path=str(root), cache_dir=str(cache), scenario=True, tasks=("ctcvr",)).build(0)
    assert dio.PARSE_COUNT["parses"] == before + 1          # build options reuse the parsed frame
    assert len(list(cache.glob("ali-ccp-*.parquet"))) == 1 and not list(cache.glob("*.tmp"))
    assert b.num_clients == 2 and a.table.equals(cfg.build(0).table)
    # changed raw bytes -> a new cache entry and a new parse
    p = root / "ali_ccp_test_sample.csv"
    df = pd.read_csv(p)
    df.loc[0, "D853"] = 0.5
    df.to_csv(p, index=False)
    cfg.build(0)
    assert dio.PARSE_COUNT["parses"] == before + 2 and len(list(cache.glob("ali-ccp-*.parquet"))) == 2


# ------------------------------------------------------------------------------------------ malformed input
def test_missing_folder_and_files(tmp_path):
    with pytest.raises(DataError, match="data folder not found"):
        AliCcpConfig(path=str(tmp_path / "nope")).build(0)
    root = write_ali_ccp(tmp_path / "d")
    (root / "ali_ccp_val_sample.csv").unlink()
    with pytest.raises(DataError, match=r"ali_ccp_val_sample\.csv: file not found"):
        AliCcpConfig(path=str(root), cache=False).build(0)
    with pytest.raises(DataError, match=r"no Ali-CCP multidomain train file"):
        AliCcpConfig(path=str(root), variant="multidomain", cache=False).build(0)


@pytest.mark.parametrize("edit, column, what", [
    (lambda df: df.drop(columns="purchase"), "purchase", "missing column"),
    (lambda df: df.drop(columns="D702"), "D702", "missing column"),
    (lambda df: df.assign(click=df["click"].where(df.index != 3, 2)), "click", r"\[0, 1\], found 2 at line 5"),
    (lambda df: df.assign(purchase=df["purchase"].where(df.index != 0, -1)), "purchase",
     r"\[0, 1\], found -1 at line 2"),
    (lambda df: df.assign(**{"206": df["206"].astype(object).where(df.index != 1, "x")}), "206",
     "must be an integer, found 'x' at line 3"),
    (lambda df: df.assign(**{"127_14": df["127_14"].astype(float).where(df.index != 2, 1.5)}), "127_14",
     r"must be an integer, found (np\.float64\()?1\.5\)? at line 4"),
    (lambda df: df.assign(**{"301": df["301"].where(df.index != 0, -2)}), "301", r">= 0, found -2 at line 2"),
    (lambda df: df.assign(D508=df["D508"].astype(object).where(df.index != 4, "oops")), "D508",
     "must be a number, found 'oops' at line 6"),
])
def test_malformed_names_file_column_and_expectation(tmp_path, edit, column, what):
    root = write_ali_ccp(tmp_path / "d")
    p = root / "ali_ccp_val_sample.csv"
    edit(pd.read_csv(p)).to_csv(p, index=False)
    cache = tmp_path / "c"
    with pytest.raises(DataError, match=rf"ali_ccp_val_sample\.csv: .*'{column}'.*{what}|"
                                        rf"ali_ccp_val_sample\.csv: {what}.*'{column}'"):
        AliCcpConfig(path=str(root), cache_dir=str(cache)).build(0)
    assert not cache.exists() or not list(cache.iterdir())    # a parse error leaves no cache entry


def test_empty_official_split_and_bad_cache(tmp_path):
    root = write_ali_ccp(tmp_path / "d")
    cfg = AliCcpConfig(path=str(root), cache_dir=str(tmp_path / "c"), scenario=True, max_rows_per_client=3)
    ds = cfg.build(0)                                      # 3 rows per client, drawn from all three files
    assert list(np.diff(ds.offsets)) == [3, 3]
    (path,) = (tmp_path / "c").glob("ali-ccp-*.parquet")
    pd.read_parquet(path).drop(columns="D509").to_parquet(path)
    with pytest.raises(DataError, match=r"cache file lacks column 'D509'"):
        cfg.build(0)
    # one row kept: at least one of the official val / test splits is then empty
    with pytest.raises(DataError, match=r"column 'split': the (val|test) split is empty"):
        AliCcpConfig(path=str(root), cache=False, max_rows_per_client=1).build(0)
    # a val file with only its header row
    p = root / "ali_ccp_val_sample.csv"
    pd.read_csv(p).iloc[:0].to_csv(p, index=False)
    with pytest.raises(DataError, match=r"ali_ccp_val_sample\.csv: file has no rows"):
        AliCcpConfig(path=str(root), cache=False).build(0)


# ------------------------------------------------------------------------------------------ CLI
def test_cli_describe(tmp_path, capsys):
    root = write_ali_ccp(tmp_path / "d", prefix="ali_ccp_multidomain_", scenarios=(1, 2, 3))
    rc = data_main(["describe", "ali_ccp", f"path={root}", "variant=multidomain", "scenario=true", "cache=false"])
    out = capsys.readouterr().out
    assert rc == 0 and "3 clients, 52 rows" in out and "301:3" in out and "ctcvr" in out
    assert "train 30, val 10, test 12" in out
    rc = data_main(["describe", "ali_ccp", f"path={root}"])
    assert rc == 2 and "no Ali-CCP standard train file" in capsys.readouterr().err
