"""Smoke tests of benchmarks/throughput.py, scale.py and generate.py at tiny sizes: each runs, and
its last output line is the JSON summary with positive numbers. No timing assertions."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO.parent / "shared" / "bench"


def _load(name: str = "throughput"):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(not (BENCH_DIR / "workload.py").exists(), reason="reference bench folder not present")
def test_throughput_smoke(ray_session, tmp_path, capsys):
    mod = _load()
    out = mod.main(["--users", "60", "--clients-per-round", "20", "--rounds", "1", "--workers", "1",
                    "--cpus-per-worker", "1", "--seed", "7", "--bench-dir", str(BENCH_DIR),
                    "--cache-dir", str(tmp_path / "workload"), "--pretrain-users", "200", "--mem-interval", "0.1", "--check"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    summary = json.loads(last)
    assert summary == json.loads(json.dumps(out))
    for key in ("client_updates_per_s", "seconds_per_round", "peak_rss_mb"):
        assert summary[key] > 0, key
    assert len(summary["timed_round_s"]) == 1 and summary["timed_round_s"][0] > 0
    assert len(summary["warmup_round_s"]) == 1
    assert summary["config"]["clients_per_round"] == 20 and summary["config"]["cohort"] == 20
    assert summary["config"]["ray_started_here"] is False      # reused the session's Ray
    assert summary["machine"]["cpu_count"] >= 1
    assert {"python", "torch", "ray"} <= set(summary["versions"])
    # the var_d-style reference loop on the same cohorts and minibatch orders agrees
    check = summary["check"]
    assert check["max_abs_diff_lora_a"] < 1e-4 and check["max_abs_diff_lora_b"] < 1e-4
    assert check["reference_train_loss"] == pytest.approx(check["fleetrec_train_loss"], abs=1e-4)


def test_scale_smoke_on_the_generator_from_the_layout_with_every_client_evaluated(ray_session, capsys, tmp_path):
    out = _load("scale").main(["--clients", "3000", "--per-round", "300", "--rounds", "1", "--workers", "1",
                               "--data", "synthetic_per_user", "--rows-min", "12", "--rows-max", "12",
                               "--eval-clients", "0", "--pooled-auc", "histogram", "--no-probe",
                               "--mem-interval", "0.1", "--layout", str(tmp_path / "layout"), "--buckets", "4"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == json.loads(json.dumps(out))
    assert out["config"]["rows_total"] == 36000 and out["config"]["data"] == "synthetic_per_user"
    assert out["eval_clients"] == 3000 and out["clients_per_round"] == 300
    assert 0 < out["test_auc"] < 1 and out["client_updates_per_s"] > 0
    assert out["config"]["layout"] and out["layout_write_seconds"] > 0 and out["put_seconds"] == 0
    assert len(list((tmp_path / "layout" / "rows").glob("bucket-*.parquet"))) == 4


def test_generate_smoke(capsys):
    out = _load("generate").main(["--clients", "500", "--rows-min", "12", "--rows-max", "12"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == json.loads(json.dumps(out))
    assert out["rows"] == 6000 and out["rows_per_s"] > 0 and out["peak_rss_mb"] > 0
