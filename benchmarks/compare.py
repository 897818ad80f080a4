"""fleetrec side by side with the reference simulators of shared/bench, in one invocation.

Copies the reference scripts (*.py of the bench folder) into benchmarks/out/ref, so their
data/ and out/ folders are written there and never into the (read-only) reference folder,
prepares the workload once, then runs, each in its own process:

    E_central     var_e_central.py      centralized batch-1,024 training: the compute floor
    D_vmap        var_d_vmap.py         all clients at once with torch.func
    B_sequential  var_b_sequential.py   plain sequential PyTorch loop
    C_ray_actors  var_c_ray_actors.py   only with --ray-actors
    A_flower      var_a_flower.py       only with --flower-python PATH (a Python with flwr[simulation]==1.41.0)
    fleetrec      benchmarks/throughput.py (same workload file, same sizes)

and prints ONE JSON line (last line of output) with each variant's client_updates_per_s and
seconds_per_round and the ratios fleetrec/central, fleetrec/flower, fleetrec/vmap,
fleetrec/sequential (higher = fleetrec faster; fleetrec/central is the fraction of the
compute floor fleetrec reaches). Also written to benchmarks/out/compare.json.

    python benchmarks/compare.py
    python benchmarks/compare.py --flower-python ../.venv-flwr/bin/python --ray-actors
    python benchmarks/compare.py --users 600 --clients-per-round 100 --rounds 2   # quick
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "benchmarks" / "out"
DEFAULT_BENCH_DIR = REPO.parent / "shared" / "bench"

REFERENCE = [  # (result name, script, needs flag)
    ("E_central", "var_e_central.py", None),
    ("D_vmap", "var_d_vmap.py", None),
    ("B_sequential", "var_b_sequential.py", None),
    ("C_ray_actors", "var_c_ray_actors.py", "ray_actors"),
    ("A_flower", "var_a_flower.py", "flower_python"),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, default=int(os.environ.get("BENCH_U", 5000)))
    p.add_argument("--clients-per-round", type=int, default=int(os.environ.get("BENCH_K", 1000)))
    p.add_argument("--rounds", type=int, default=int(os.environ.get("BENCH_ROUNDS", 3)), help="timed rounds")
    p.add_argument("--seed", type=int, default=int(os.environ.get("BENCH_SEED", 1234)))
    p.add_argument("--bench-dir", default=os.environ.get("FLEETREC_BENCH_DIR", str(DEFAULT_BENCH_DIR)))
    p.add_argument("--work-dir", default=str(OUT / "ref"), help="where the reference scripts are copied and run")
    p.add_argument("--ref-python", default=sys.executable, help="Python for var_b/d/e (torch; ray for var_c)")
    p.add_argument("--flower-python", default=None, help="Python with flwr[simulation]==1.41.0: also run var_a")
    p.add_argument("--ray-actors", action="store_true", help="also run var_c (two Ray actors)")
    p.add_argument("--skip", default="", help="comma-separated result names to skip, e.g. B_sequential")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per variant")
    p.add_argument("--fleetrec-args", default="", help="extra arguments for throughput.py, e.g. '--workers 1 --cpus-per-worker 2'")
    return p.parse_args(argv)


def _last_json(text: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("no JSON line in output")


def _run(cmd, cwd, env, timeout, log: Path) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        rc, text = p.returncode, p.stdout + p.stderr
        stdout = p.stdout
    except subprocess.TimeoutExpired as e:
        rc, text, stdout = 124, f"timeout after {timeout}s\n{e.stdout or ''}{e.stderr or ''}", ""
    log.write_text(text if isinstance(text, str) else text.decode(errors="replace"))
    return rc, stdout, time.perf_counter() - t0


def main(argv=None) -> dict:
    args = parse_args(argv)
    bench = Path(args.bench_dir).resolve()
    work = Path(args.work_dir).resolve()
    if not (bench / "workload.py").exists():
        raise SystemExit(f"workload.py not found in {bench}")
    work.mkdir(parents=True, exist_ok=True)
    for f in bench.glob("*.py"):
        shutil.copy2(f, work / f.name)
    (work / "out").mkdir(exist_ok=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    env = dict(os.environ, BENCH_U=str(args.users), BENCH_K=str(args.clients_per_round),
               BENCH_ROUNDS=str(args.rounds), BENCH_SEED=str(args.seed), PYTHONUNBUFFERED="1",
               FLWR_TELEMETRY_ENABLED="0", RAY_USAGE_STATS_ENABLED="0",
               RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="0")
    env.pop("BENCH_TAG", None)
    skip = {s for s in args.skip.split(",") if s}

    rc, _, prep_s = _run([args.ref_python, "workload.py", "prepare"], work, env, args.timeout, logs / "prepare.log")
    if rc:
        raise SystemExit(f"workload prepare failed, see {logs / 'prepare.log'}")

    variants: dict[str, dict] = {}
    for name, script, flag in REFERENCE:
        if name in skip or (flag and not getattr(args, flag)):
            continue
        py = args.flower_python if flag == "flower_python" else args.ref_python
        res_file = work / "out" / f"{name}.json"
        res_file.unlink(missing_ok=True)
        rc, _, wall = _run([py, script], work, env, args.timeout, logs / f"{name}.log")
        if rc or not res_file.exists():
            variants[name] = {"error": f"exit {rc}, see {logs / (name + '.log')}", "wall_s": wall}
            continue
        r = json.loads(res_file.read_text())
        variants[name] = {"client_updates_per_s": r["client_updates_per_s"],
                          "seconds_per_round": r["median_s_per_round"],
                          "timed_round_s": r["timed_round_s"], "warmup_round_s": r["warmup_round_s"],
                          "final_train_loss": r["per_round_metrics"][-1]["train_loss"],
                          "wall_s": wall}

    if "fleetrec" not in skip:
        cmd = [sys.executable, str(REPO / "benchmarks" / "throughput.py"), "--users", str(args.users),
               "--clients-per-round", str(args.clients_per_round), "--rounds", str(args.rounds),
               "--seed", str(args.seed), "--bench-dir", str(work), "--cache-dir", str(work / "data"),
               # one memory sample a second: the default 0.2 s sampler reads every Ray process's smaps in
               # the driver and took ~14% of the 2-core box from the workers (the other variants are not
               # sampled; 2026-12-07, throughput.py 80 rounds, 0.2 s vs 5 s, 2 alternated pairs)
               "--mem-interval", "1.0", *args.fleetrec_args.split()]
        rc, stdout, wall = _run(cmd, REPO, env, args.timeout, logs / "fleetrec.log")
        try:
            r = _last_json(stdout)
            variants["fleetrec"] = {"client_updates_per_s": r["client_updates_per_s"],
                                    "seconds_per_round": r["seconds_per_round"],
                                    "timed_round_s": r["timed_round_s"], "warmup_round_s": r["warmup_round_s"],
                                    "final_train_loss": r["train_loss"][-1], "peak_rss_mb": r["peak_rss_mb"],
                                    "peak_pss_mb": r["peak_pss_mb"], "config": r["config"], "wall_s": wall}
        except (ValueError, KeyError) as e:
            variants["fleetrec"] = {"error": f"exit {rc} ({e}), see {logs / 'fleetrec.log'}", "wall_s": wall}

    def ups(name):
        return variants.get(name, {}).get("client_updates_per_s")

    ratios = {}
    for other, key in (("E_central", "fleetrec/central"), ("A_flower", "fleetrec/flower"),
                       ("D_vmap", "fleetrec/vmap"), ("B_sequential", "fleetrec/sequential"),
                       ("C_ray_actors", "fleetrec/ray_actors")):
        if ups("fleetrec") and ups(other):
            ratios[key] = ups("fleetrec") / ups(other)

    # B and D implement the same algorithm and order: their final adapters should agree (~1e-6)
    agreement = None
    try:
        import numpy as np
        b, d = (np.load(work / "out" / f"{n}_state.npz") for n in ("B_sequential", "D_vmap"))
        agreement = float(max(np.abs(b[k] - d[k]).max() for k in ("lora_a", "lora_b")))
    except (OSError, KeyError, ImportError):
        pass

    out = {"benchmark": "fleetrec_compare",
           "client_updates_per_s": {k: v.get("client_updates_per_s") for k, v in variants.items()},
           "ratios": ratios, "variants": variants,
           "reference_B_vs_D_max_abs_adapter_diff": agreement,
           "config": {"users": args.users, "clients_per_round": args.clients_per_round, "timed_rounds": args.rounds,
                      "seed": args.seed, "work_dir": str(work.relative_to(REPO) if work.is_relative_to(REPO) else work),
                      "prepare_s": prep_s, "cpu_count": os.cpu_count(),
                      "load_avg_1m": os.getloadavg()[0]}}
    line = json.dumps(out)
    (OUT / "compare.json").write_text(line + "\n")
    print(line, flush=True)
    return out


if __name__ == "__main__":
    main()
