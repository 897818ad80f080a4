"""Smoke test of benchmarks/throughput.py at a tiny size: it runs, and its last output line is
the JSON summary with positive numbers. No timing assertions."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO.parent / "shared" / "bench"


def _load_throughput():
    spec = importlib.util.spec_from_file_location("bench_throughput", REPO / "benchmarks" / "throughput.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(not (BENCH_DIR / "workload.py").exists(), reason="reference bench folder not present")
def test_throughput_smoke(ray_session, tmp_path, capsys):
    mod = _load_throughput()
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
