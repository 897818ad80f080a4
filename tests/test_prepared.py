"""The sharded data plane (datasets/prepared.py): a dataset written as owner-bucketed Parquet, read
back per worker. A run from the layout equals the in-memory run of the same config (to 1e-6), each
worker holds only its own clients' rows, the handle shipped to the actors carries no rows, and a
changed, missing or foreign folder is one line."""
from __future__ import annotations

import dataclasses
import pickle

from pathlib import Path

import numpy as np
import pytest

from fleetrec.algorithms import ALGORITHMS
from fleetrec.datasets.federated import CLIENT, DataError
from fleetrec.datasets.prepared import PreparedDataset, write
from fleetrec.simulator.config import from_dict
from fleetrec.simulator.config_loader import ConfigError, apply_overrides
from fleetrec.simulator.data_cli import main as data_main, write_layout
from fleetrec.simulator.run import federated_dataset, run
from tests.conftest import tiny_config
from tests.test_contract import _assert_same, example_config

QUICKSTART = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")


def _assert_same_run(a, b):
    """Every round's metrics and the final server state to 1e-6 (the contract tests' check), and the
    same reference values."""
    assert a.records
    _assert_same(a, b, "in memory vs the layout")
    assert a.info["ceiling"] == b.info["ceiling"] and a.info["floor"] == b.info["floor"]


def _from_layout(cfg, folder):
    return dataclasses.replace(cfg, data=from_dict(apply_overrides({}, [f"data={{name: prepared, path: {folder}}}"]),
                                                   "t").data)


CASES = {     # (config, buckets): with 2 workers and 8 buckets each worker reads only its own 4 files
    "fedavg, 3 workers, buckets 4 (buckets shared: rows filtered)": (
        lambda: tiny_config(**{"rounds": 2, "resources.workers": 3, "resources.cpus_per_worker": 0.5}), 4),
    "pf_msmtrec scenarios, balanced placement": (
        lambda: example_config("pf_msmtrec", next(iter(ALGORITHMS["pf_msmtrec"].EXAMPLES)),
                               "resources.placement_policy=balanced", "rounds=2"), 2),
    "pmtrec federated, 2 workers, buckets 8 (side tables, ranking)": (
        lambda: example_config("pmtrec", "federated", "rounds=2"), 8),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_run_from_the_layout_equals_the_in_memory_run(ray_session, tmp_path, case):
    make, buckets = CASES[case]
    cfg = make()
    mem = run(cfg)
    folder = write_layout(federated_dataset(cfg), tmp_path / "layout", buckets, cfg)
    sharded = run(_from_layout(cfg, folder))
    _assert_same_run(mem, sharded)
    rows = [w["rows"] for w in sharded.info["workers"]]
    assert sum(rows) == mem.info["num_rows"]                              # every row read exactly once
    if len(rows) > 1:
        assert max(rows) < mem.info["num_rows"]                           # no worker holds them all
    assert all(w["rows"] == mem.info["num_rows"] for w in mem.info["workers"])   # (in memory: each sees all)


def test_layout_round_trip_buckets_and_handle(tmp_path):
    cfg = tiny_config(**{"data.num_clients": 37})
    ds = federated_dataset(cfg)
    write(ds, tmp_path / "l", buckets=4, row_group_rows=50)
    p = PreparedDataset.open(tmp_path / "l")
    assert p.num_clients == ds.num_clients and p.num_rows == ds.num_rows and p.schema == ds.schema
    assert p.fingerprint() == ds.fingerprint() == p.load_all().fingerprint()
    np.testing.assert_array_equal(p.rows_per_client(0), ds.rows_per_client(0))
    owned = np.arange(1, 37, 2)                                             # worker 1 of 2: buckets 1 and 3
    assert p._buckets_of(owned) == [1, 3]
    part = p.load(owned)
    assert set(np.unique(part.column(CLIENT))) == set(owned) and part.num_clients == 37
    keep = np.isin(ds.column(CLIENT), owned)
    for c in ds.table.column_names:
        np.testing.assert_array_equal(part.column(c), ds.column(c)[keep])
    np.testing.assert_array_equal(part.row_base, ds.offsets[:-1])
    size = len(pickle.dumps(p))
    _ = p.offsets, p.split_offsets, p.client_attrs                          # read (and cached) here ...
    assert len(pickle.dumps(p)) == size                                     # ... but never shipped with the handle
    with pytest.raises(DataError, match="needs every row in one process"):
        p.column(CLIENT)
    from fleetrec.simulator.cohort import DataView
    none = p.load(np.zeros(0, np.int64))                                   # a worker whose clients own no rows
    assert none.num_rows == 0
    b = DataView(none).batch(np.array([0, 5]), 0, epochs=1, seed=0, rnd=0)   # padding only, all masked
    assert b.mask.sum() == 0 and tuple(b.labels.shape[:2]) == (2, 1)


def test_a_changed_missing_or_foreign_folder_is_one_line(tmp_path, capsys):
    ds = federated_dataset(tiny_config())
    write(ds, tmp_path / "l", buckets=2)
    shard = tmp_path / "l" / "rows" / "bucket-00001.parquet"
    with open(shard, "r+b") as f:                                           # flip one byte of a shard
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 1]))
    p = PreparedDataset.open(tmp_path / "l")
    p.load(np.array([0]))                                                   # bucket 0 is untouched
    with pytest.raises(DataError, match="bucket-00001.parquet: its content changed since it was prepared"):
        p.load(np.array([1]))
    shard.unlink()
    with pytest.raises(DataError, match="bucket-00001.parquet: missing from the prepared dataset"):
        p.load(np.array([1]))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("mine")
    with pytest.raises(DataError, match="not a prepared dataset"):
        PreparedDataset.open(tmp_path / "other")
    with pytest.raises(DataError, match="exists and is not a prepared dataset"):
        write(ds, tmp_path / "other")
    assert (tmp_path / "other" / "x.txt").read_text() == "mine"             # nothing overwritten
    cfg = from_dict(apply_overrides({}, [f"data={{name: prepared, path: {tmp_path / 'l'}, hold_out: {{fraction: 0.2}}}}"]), "t")
    with pytest.raises(ConfigError, match="data.hold_out: the prepared layout .* holds the clients it was written with"):
        federated_dataset(cfg)
    write(ds, tmp_path / "s", buckets=2, seed=0)                            # rows drawn with seed 0
    seeded = lambda k: from_dict(apply_overrides({}, [f"seed={k}", f"data={{name: prepared, path: {tmp_path / 's'}}}"]), "t")
    assert federated_dataset(seeded(0)).num_clients == ds.num_clients
    with pytest.raises(ConfigError, match="seed: 1, but the prepared layout .* was drawn with seed 0"):
        federated_dataset(seeded(1))
    with pytest.raises(ConfigError, match="data: path: expected the folder written by"):
        from_dict(apply_overrides({}, ["data={name: prepared}"]), "t")
    assert data_main(["prepare", "synthetic_per_user", "num_clients=20", "--buckets", "0", "--out",
                      str(tmp_path / "z")]) == 2
    assert "--buckets: got 0" in capsys.readouterr().err and not (tmp_path / "z").exists()
    assert data_main(["describe", "synthetic_per_user", "--out", str(tmp_path / "z")]) == 2
    assert "--out / --buckets go with prepare" in capsys.readouterr().err


def test_cli_prepare_writes_the_layout_of_what_the_run_federates(tmp_path, capsys):
    out = tmp_path / "layout"
    assert data_main(["prepare", QUICKSTART, "data.num_clients=50", "--out", str(out),
                      "--buckets", "4"]) == 0
    text = capsys.readouterr().out
    assert f"data={{name: prepared, path: {out.resolve()}}}" in text
    p = PreparedDataset.open(out)
    assert p.buckets == 4 and p.num_clients == 50 and p.manifest["seed"] == 0   # data.seed unset: the run's seed
    assert oct(out.stat().st_mode & 0o777) == "0o755"                          # readable on a shared file system
    assert data_main(["describe", "prepared", f"path={out}"]) == 2               # needs every row: one line
    assert "needs every row in one process" in capsys.readouterr().err
    assert p.manifest["reference"]["ceiling"]["bayes_auc"]["test"] > 0.5    # ceiling from all rows, stored
    assert data_main(["prepare", QUICKSTART, "data.num_clients=60", "--out", str(out)]) == 0
    assert PreparedDataset.open(out).num_clients == 60                      # a layout is replaced whole
    assert not [q for q in tmp_path.iterdir() if q.name.endswith(".tmp")]
