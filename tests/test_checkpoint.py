"""Checkpoint / resume: a run killed after round k and resumed from its checkpoint ends with
the same metrics and server state as an uninterrupted run, in the same MLflow run."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from fleetrec.simulator import checkpoint
from fleetrec.simulator.config_loader import ConfigError, apply_overrides
from fleetrec.simulator.run import Callback, run
from fleetrec.simulator.tracking import MlflowLogger
from tests.test_contract import _KillWorker


class _Crash(Callback):
    def __init__(self, at_round: int):
        self.at = at_round

    def on_round(self, record):
        if record["round"] == self.at:
            raise KeyboardInterrupt("driver killed")


def test_resume_after_kill_matches_uninterrupted(ray_session, tiny_cfg, tmp_path):
    from mlflow.tracking import MlflowClient
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    opts = {"rounds": 5, "checkpoint.every": 1, "checkpoint.dir": str(tmp_path / "ck"),
            "tracking.mlflow": True, "tracking.tracking_uri": uri}
    full = run(tiny_cfg(**{**opts, "checkpoint.dir": str(tmp_path / "full")}))

    cfg = tiny_cfg(**opts)
    logger = MlflowLogger(cfg)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, [logger, _Crash(at_round=2)])
    ck = checkpoint.load(tmp_path / "ck")
    assert ck.round == 1 and len(ck.shards) == cfg.resources.workers

    logger2 = MlflowLogger(cfg)
    resumed = run(cfg, [logger2], resume=ck)
    assert [r["round"] for r in resumed.records] == [0, 1, 2, 3, 4]
    for k in full.records[-1]:
        if k.startswith(("val/", "test/", "train/train_loss")):
            assert resumed.records[-1][k] == pytest.approx(full.records[-1][k], abs=1e-6), k
    for k in full.server_state:
        torch.testing.assert_close(resumed.server_state[k], full.server_state[k], atol=1e-6, rtol=0)
    assert logger2.run_id == logger.run_id                      # the same MLflow run continues
    steps = {m.step for m in MlflowClient(uri).get_metric_history(logger.run_id, "val/auc")}
    assert steps == {0, 1, 2, 3, 4}


def test_ctrl_c_is_one_line_exit_130_a_killed_mlflow_run_and_an_intact_checkpoint(ray_session, tmp_path, monkeypatch,
                                                                                    capsys):
    from mlflow.tracking import MlflowClient
    from fleetrec.simulator import tracking
    from fleetrec.simulator.cli import main
    from tests.conftest import tiny_overrides
    uri, d = f"sqlite:///{tmp_path / 'm.db'}", tmp_path / "ck"
    plain = tracking.default_callbacks
    monkeypatch.setattr(tracking, "default_callbacks", lambda cfg: [*plain(cfg), _Crash(at_round=2)])
    argv = ["run", *tiny_overrides(**{"rounds": 5, "checkpoint.every": 1, "checkpoint.dir": str(d),
                                      "tracking.mlflow": True, "tracking.tracking_uri": uri})]
    assert main(argv) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"fleetrec: interrupted; the MLflow run (if any) is marked KILLED; continue it with: "
                       f"fleetrec run --resume {d}"), err[-3:]
    assert not any("Traceback" in line for line in err)
    assert checkpoint.load(d).round == 1
    client = MlflowClient(uri)
    (r,) = client.search_runs([client.get_experiment_by_name("fleetrec").experiment_id])
    assert r.info.status == "KILLED"


def test_checkpoints_are_pruned_and_missing_dir_is_a_clear_error(ray_session, tiny_cfg, tmp_path):
    run(tiny_cfg(**{"rounds": 4, "checkpoint.every": 1, "checkpoint.keep": 2, "checkpoint.dir": str(tmp_path)}))
    kept = sorted(p.name for p in tmp_path.glob("round_*"))
    assert kept == ["round_000002", "round_000003"]
    assert (tmp_path / "LATEST").read_text() == "round_000003"
    assert not list(tmp_path.glob(".tmp*"))
    with pytest.raises(ConfigError, match="no checkpoint to resume from"):
        checkpoint.load(tmp_path / "nothing")


# right after a checkpoint (nothing to replay); a kill between checkpoints (replay) is run for every
# registered algorithm by tests/test_contract.py
@pytest.mark.parametrize("after_round", [2])
def test_killed_worker_is_restored_and_results_are_unchanged(ray_session, tiny_cfg, tmp_path, after_round):
    opts = {"rounds": 5, "checkpoint.every": 2, "resources.workers": 2}
    full = run(tiny_cfg(**{**opts, "checkpoint.dir": str(tmp_path / "a")}))
    hurt = run(tiny_cfg(**{**opts, "checkpoint.dir": str(tmp_path / "b")}), [_KillWorker(after_round)])
    assert hurt.info["worker_recoveries"] == 1
    for k in full.records[-1]:
        if k.startswith(("val/", "test/", "train/train_loss")):
            assert hurt.records[-1][k] == pytest.approx(full.records[-1][k], abs=1e-6), k
    for k in full.server_state:
        torch.testing.assert_close(hurt.server_state[k], full.server_state[k], atol=1e-6, rtol=0)


def test_worker_failure_without_checkpoints_is_a_clear_error(ray_session, tiny_cfg):
    with pytest.raises(Exception, match="set checkpoint.every > 0"):
        run(tiny_cfg(**{"rounds": 3}), [_KillWorker(0)])


def test_checkpoints_are_bound_to_their_run(ray_session, tiny_cfg, tmp_path):
    """A second run cannot write into a folder holding another run's checkpoints, every checkpoint
    carries its own config, and --resume refuses overrides that change what the state means."""
    from fleetrec.simulator.cli import main
    d = tmp_path / "ck"
    a = tiny_cfg(**{"rounds": 2, "checkpoint.every": 1, "checkpoint.dir": str(d)})
    run(a)
    assert (d / "round_000001" / "config.yaml").is_file() and not (d / "config.yaml").exists()
    with pytest.raises(ConfigError, match=rf"checkpoint.dir: {d} already holds the checkpoints of a run "
                                          rf"\(newest round_000001\); continue it with --resume"):
        run(tiny_cfg(**{"rounds": 2, "checkpoint.every": 1, "checkpoint.dir": str(d), "train.lr": 0.05}))
    ck = checkpoint.load(d)
    assert ck.config["train"]["lr"] == a.train.lr                # the config of the run that wrote it
    for bad, key in (("data.num_items=100", "data.num_items"), ("resources.workers=1", "resources.workers"),
                     ("train.lr=0.05", "train.lr")):
        with pytest.raises(ConfigError, match=rf"--resume: {key} is .* in the checkpoint and .* now"):
            checkpoint.check_resume_overrides(ck.config, apply_overrides(ck.config, [bad]))
    checkpoint.check_resume_overrides(ck.config, apply_overrides(ck.config, ["rounds=9", "tracking.progress=false"]))
    assert main(["run", "--resume", str(d), "train.lr=0.05"]) == 2          # one line, exit 2, nothing run
    # an override is refused as itself, before the new algorithm's keys could fail on the old config
    for bad, was in (("algorithm.name=fedprox", "'fedavg'"), ("data.num_items=100", str(a.data.num_items))):
        with pytest.raises(ConfigError, match=rf"--resume: {bad} \(command line\) would change "
                                              rf"{bad.split('=')[0]}, which is {was} in the checkpoint"):
            checkpoint.refuse_unsafe_overrides(ck.config, [bad])
    checkpoint.refuse_unsafe_overrides(ck.config, ["rounds=9", f"train.lr={a.train.lr}", "tracking.progress=false"])


def test_a_running_run_holds_its_checkpoint_folder(ray_session, tiny_cfg, tmp_path):
    """Two runs cannot share a folder at the same time, new or --resume: the second is refused with
    one line naming the holder (an OS lock, so a holder killed with -9 frees it), and a run refused
    after taking the folder leaves nothing behind."""
    import subprocess
    import sys
    import time
    d = tmp_path / "ck"
    hold = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom fleetrec.simulator.checkpoint import held\n"
                             f"with held({str(d)!r}):\n    print('held', flush=True)\n    time.sleep(600)\n"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert hold.stdout.readline().strip() == "held"
        cfg = tiny_cfg(**{"rounds": 2, "checkpoint.every": 1, "checkpoint.dir": str(d)})
        with pytest.raises(ConfigError, match=rf"checkpoint.dir: {d} is in use by a run that is still going "
                                              rf"\(pid {hold.pid} on .*\); wait for it"):
            run(cfg)
        assert not (d / "LATEST").exists()
    finally:
        hold.kill()
        hold.wait()
    time.sleep(0.1)
    run(cfg)                                        # the killed holder's lock is gone with it
    assert (d / "LATEST").is_file() and not (d / checkpoint.LOCK).exists()
    e = tmp_path / "empty"
    with pytest.raises(RuntimeError):
        with checkpoint.held(e):
            raise RuntimeError("refused after taking the folder")
    assert not e.exists()


def test_resume_checks_tensors_in_the_driver_and_skips_a_damaged_newest_checkpoint(ray_session, tiny_cfg, tmp_path):
    from fleetrec.simulator.run import check_resume_fits
    d = tmp_path / "ck"
    cfg = tiny_cfg(**{"rounds": 3, "checkpoint.every": 1, "checkpoint.dir": str(d)})
    run(cfg)
    ck = checkpoint.load(d)
    ds = cfg.data.build(cfg.seed)
    check_resume_fits(ck, cfg, ds)                                  # the run's own config fits
    bigger = tiny_cfg(**{"rounds": 3, "model.dim": 16})
    with pytest.raises(ConfigError, match=r"--resume: server tensor '[\w.]+' is \(.*\) float32 in the checkpoint, "
                                          r"\(.*\) float32 for this config"):
        check_resume_fits(ck, bigger, bigger.data.build(bigger.seed))
    more = tiny_cfg(**{"rounds": 3, "data.num_clients": 50})
    with pytest.raises(ConfigError, match=r"worker 0's personal tensor .* holds 19 clients in the checkpoint, 25"):
        check_resume_fits(ck, more, more.data.build(more.seed))
    with pytest.raises(ConfigError, match="the checkpoint holds 2 worker shards, resources.workers is 1"):
        check_resume_fits(ck, tiny_cfg(**{"resources.workers": 1}), ds)
    # the same config over data whose content changed (an edited file behind data.path): refused
    assert ck.driver["data_fingerprint"] == ds.fingerprint() == cfg.data.build(cfg.seed).fingerprint()
    task = ds.schema.tasks[0]
    labels = ds.column(task).copy()
    labels[0] = 1 - labels[0]
    import pyarrow as pa
    edited = dataclasses.replace(ds, table=ds.table.set_column(ds.table.column_names.index(task), task,
                                                               pa.array(labels)))
    with pytest.raises(ConfigError, match=r"--resume: the data this config builds differs from the checkpoint's"):
        check_resume_fits(ck, cfg, edited)
    (d / "round_000002" / "server.pt").write_bytes(b"not a tensor file")  # the disk damaged the newest one
    said = []
    older = checkpoint.load(d, warn=lambda msg, file=None: said.append(msg))
    assert older.round == 1 and "round_000002 is unreadable" in said[0] and "resuming from round_000001" in said[0]
    for p in d.glob("round_*/server.pt"):
        p.write_bytes(b"")
    with pytest.raises(ConfigError, match="no readable checkpoint"):
        checkpoint.load(d)
