"""One MLflow run per experiment with per-round metrics, params and artifacts, read back
through MLflow's client API; progress bar and summary table on the terminal."""
from __future__ import annotations

import dataclasses
import io

import pytest

from fleetrec.simulator.run import run
from fleetrec.simulator.tracking import MlflowLogger, ProgressBar, summary_table


def test_mlflow_run_has_per_round_metrics(ray_session, tiny_cfg, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    # real CPU / memory samples: MLflow publishes one only after a full interval, and this MLflow run
    # can last under a second, so the interval is well below that
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.05")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = tiny_cfg(**{"tracking.mlflow": True, "tracking.tracking_uri": uri, "tracking.experiment": "t",
                      "rounds": 3})
    out = io.StringIO()
    result = run(cfg, [MlflowLogger(cfg), ProgressBar(stream=out)])
    assert result.run_id
    client = MlflowClient(tracking_uri=uri)
    r = client.get_run(result.run_id)
    assert r.data.params["train.lr"] == str(cfg.train.lr)
    assert r.data.params["algorithm.name"] == "fedavg"
    assert "data.bayes_auc.test" in r.data.params
    for key in ("val/auc", "test/gauc", "train/train_loss", "round/train_seconds",
                "round/client_updates_per_s", "round/mb_up"):
        hist = client.get_metric_history(result.run_id, key)
        assert [m.step for m in hist] == [0, 1, 2], key
    assert client.get_metric_history(result.run_id, "val/auc")[-1].value == result.records[-1]["val/auc"]
    assert client.get_metric_history(result.run_id, "round/mb_up")[-1].value == result.records[-1]["bytes_up"] / 1e6
    # MLflow's system tab holds real hardware samples only (the simulated counters are under round/)
    system = {k for k in r.data.metrics if k.startswith("system/")}
    assert "system/cpu_utilization_percentage" in system and "system/system_memory_usage_megabytes" in system
    assert not any(k[len("system/"):].startswith(("train_seconds", "mb_up", "client_updates")) for k in system)
    # made for comparison: a name and tags that say what the run is, its dataset as an input
    assert r.info.run_name == f"fedavg·synthetic_per_user·seed{cfg.seed}"
    tags = r.data.tags
    assert (tags["algorithm"], tags["dataset"], tags["model"], tags["seed"]) == ("fedavg", "synthetic_per_user",
                                                                                  "per_user", str(cfg.seed))
    assert len(tags["git_commit"]) >= 40 or tags["git_commit"] == "unknown"
    assert tags["mlflow.note.content"].startswith("fedavg on synthetic_per_user (37 clients")
    (inp,) = r.inputs.dataset_inputs
    assert inp.dataset.name == "synthetic_per_user" and {t.key: t.value for t in inp.tags}["clients"] == "37"
    # switched-off blocks leave their on/off key only
    assert r.data.params["privacy.enabled"] == "False" and "privacy.noise_multiplier" not in r.data.params
    assert r.data.params["privacy.local.mechanism"] == "none" and "privacy.local.scale" not in r.data.params
    # tracking.progress: false drops the bar, not the summary table (it used to print nothing at all)
    from fleetrec.simulator.tracking import default_callbacks
    off = dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, progress=False, mlflow=False))
    (quiet,) = default_callbacks(off)
    quiet.stream = io.StringIO()
    quiet.on_round(result.records[-1])
    quiet.on_end(result)
    text = quiet.stream.getvalue()
    assert "median train s/round" in text and "round/s" not in text and text.splitlines()[0] == \
        summary_table(result).splitlines()[0]
    # the experiment opens on its runs in MLflow 3's UI, and the summary prints the run's link
    assert client.get_experiment(r.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    link = f"/#/experiments/{r.info.experiment_id}/runs/{result.run_id}?workflowType=machine_learning"
    assert result.info["mlflow_link"].endswith(link)
    from fleetrec.simulator.cli import experiment_links
    assert any(line.strip() == f"t: http://127.0.0.1:5000/#/experiments/{r.info.experiment_id}?workflowType=machine_learning"
               for line in experiment_links(uri, "127.0.0.1", 5000))
    arts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"config.yaml", "learning_curve.png"} <= arts
    text = out.getvalue()
    assert "Bayes-optimal AUC" in text and "summary" in text and result.run_id in text and link in text


def test_scenario_run_logs_a_scenario_by_task_table_and_figure(ray_session, tmp_path):
    import json

    from mlflow.tracking import MlflowClient

    from fleetrec.algorithms.scenario import SCENARIO_EXAMPLE
    from fleetrec.simulator.config import from_dict
    from fleetrec.simulator.config_loader import apply_overrides
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    over = {**SCENARIO_EXAMPLE, "algorithm.name": "scenario_fedavg", "rounds": 2, "tracking.progress": False,
            "tracking.tracking_uri": uri, "eval.metric": "scenario_mean/auc"}
    cfg = from_dict(apply_overrides({}, [f"{k}={v}" for k, v in over.items()]), "tiny scenario")
    result = run(cfg, [MlflowLogger(cfg)])
    client = MlflowClient(tracking_uri=uri)
    r = client.get_run(result.run_id)
    assert [r.data.params[f"scenario.s{k}"] for k in range(3)] == ["s0", "s1", "s2"]
    arts = {a.path for a in client.list_artifacts(result.run_id, "scenarios")}
    assert arts == {"scenarios/best_round.json", "scenarios/best_round_test_auc.png", "scenarios/per_evaluation.json",
                    "scenarios/round_0001_test_auc.png", "scenarios/round_0002_test_auc.png"}
    every = json.loads(open(client.download_artifacts(result.run_id, "scenarios/per_evaluation.json")).read())
    per = [dict(zip(every["columns"], row)) for row in every["data"]]          # one table, a row per (round, split, scenario)
    assert len(per) == 12 and sorted({x["round"] for x in per}) == [1, 2]
    last = next(x for x in per if (x["round"], x["split"], x["scenario"]) == (2, "test", "s1"))
    assert last["click/auc"] == pytest.approx(result.records[1]["test/s1/click/auc"], abs=1e-6)
    table = json.loads(open(client.download_artifacts(result.run_id, "scenarios/best_round.json")).read())
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert len(rows) == 6 and {x["split"] for x in rows} == {"val", "test"}
    s1 = next(x for x in rows if x["split"] == "test" and x["scenario"] == "s1")
    assert s1["click/auc"] == pytest.approx(result.best["test/s1/click/auc"], abs=1e-6)


def test_a_stopped_trial_gets_its_best_round_summary_from_its_history(tmp_path):
    """ASHA ends a trial before its run logs `best/*`; fill_best reads the metric history and logs
    the values at the round with the best validation metric (ties: the earlier round)."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from fleetrec.simulator.tune_report import fill_best
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("t")
    run_id = client.create_run(exp).info.run_id
    val, test = [0.60, 0.71, 0.71, 0.65], [0.58, 0.69, 0.70, 0.66]
    client.log_batch(run_id, metrics=[Metric("val/auc", v, 0, s) for s, v in enumerate(val)]
                     + [Metric("test/auc", v, 0, s) for s, v in enumerate(test)]
                     + [Metric("train/train_loss", 0.5, 0, s) for s in range(4)])
    fill_best(client, client.get_run(run_id), "val/auc", "max")
    m = client.get_run(run_id).data.metrics
    assert (m["best/best_round"], m["best/val/auc"], m["best/test/auc"]) == (1.0, 0.71, 0.69)
    assert "best/train/train_loss" not in m
    fill_best(client, client.get_run(run_id), "test/auc", "max")        # a run with a summary is left alone
    assert client.get_run(run_id).data.metrics["best/test/auc"] == 0.69
    other = client.create_run(exp).info.run_id
    client.log_batch(other, metrics=[Metric("val/logloss", v, 0, s) for s, v in enumerate([0.7, 0.6, 0.65])])
    fill_best(client, client.get_run(other), "val/logloss", "min")
    assert client.get_run(other).data.metrics["best/best_round"] == 1.0


def test_a_store_race_on_a_shared_dataset_row_is_retried_and_other_errors_are_not(monkeypatch):
    """Concurrent trials log the same dataset: the loser of the insert race sees the store's
    unique-key error once, and the next try reuses the row. Any other store error is raised."""
    import sqlite3
    from mlflow.exceptions import MlflowException
    from fleetrec.simulator.tracking import retry_store_race
    calls = []

    def racy():
        calls.append(1)
        if len(calls) == 1:
            try:
                raise sqlite3.IntegrityError("UNIQUE constraint failed: datasets.experiment_id, datasets.name")
            except sqlite3.IntegrityError as e:
                raise MlflowException(f"(sqlite3.IntegrityError) {e}") from e
        return "logged"
    assert retry_store_race(racy, pause=0) == "logged" and len(calls) == 2

    def broken():
        calls.append(1)
        raise MlflowException("no such table: datasets")
    calls.clear()
    with pytest.raises(MlflowException, match="no such table"):
        retry_store_race(broken, pause=0)
    assert len(calls) == 1

    def always_racing():
        calls.append(1)
        raise MlflowException("UNIQUE constraint failed: datasets.digest")
    calls.clear()
    with pytest.raises(MlflowException, match="UNIQUE"):
        retry_store_race(always_racing, attempts=3, pause=0)
    assert len(calls) == 3


def test_a_cli_run_prints_only_what_the_user_asked_for(ray_session, tmp_path):
    """`fleetrec run` with MLflow on, in its own process: the dataset lines, the progress bar and the
    summary; no MLflow INFO lines, no Ray notices, no deprecation warnings, nothing after the summary."""
    import os
    import subprocess
    import sys
    from tests.conftest import tiny_overrides
    address = ray_session.get_runtime_context().gcs_address
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_LOGGING_LEVEL"}
    argv = [sys.executable, "-m", "fleetrec.simulator.cli", "run",
            *tiny_overrides(**{"tracking.mlflow": True, "tracking.progress": True, "rounds": 2,
                               "tracking.tracking_uri": f"sqlite:///{tmp_path / 'm.db'}",
                               "resources.address": address})]
    p = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = [l for l in (p.stdout + p.stderr).replace("\r", "\n").splitlines() if l.strip()]
    noise = [l for l in lines if any(s in l for s in ("INFO", "WARNING", "Warning", "core_worker", "token", "Deprecat"))]
    assert not noise, noise
    assert lines[0].startswith("dataset synthetic_per_user: 37 clients")
    assert lines[-1].startswith("open it (after `fleetrec ui`)")       # the summary ends the output
