"""PMTRec on Epinions: single-task MF, every combiner and PMTRec (centralized), plus PMTRec federated
vs FedAvg-MF federated; Recall@20/40 and NDCG@20/40 on the test split at the best validation
Recall@20, over seeds. Every run goes through the engine (`fleetrec.simulator.run.run`) with the configs in
configs/; the data options are the configs' (10-core, 4,000 users by seeded hash order, 10-core
again; data seed fixed at 0, so the seeds vary initialization, negatives and minibatch order).

    python benchmarks/pmtrec_table.py                       # 3 seeds, writes benchmarks/results/pmtrec_epinions.json
    python benchmarks/pmtrec_table.py --seeds 0 --only pmtrec single   # a quick subset
    python benchmarks/pmtrec_table.py --update --only pmtrec_federated   # rerun some methods into the same file

Prints one JSON object; also the per-epoch cost (median seconds per round, one round = one epoch)
of PMTRec vs equal weighting.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CENTRAL = {"single": "pmtrec_epinions_single.yaml",
           **{c: f"pmtrec_epinions_{c}.yaml" for c in ("equal", "uncertainty", "dwa", "rlw", "gradnorm", "pcgrad",
                                                      "mgda", "cagrad", "nashmtl")},
           "pmtrec": "pmtrec_epinions.yaml"}
FEDERATED = {"pmtrec_federated": "pmtrec_epinions_federated.yaml", "fedavg_mf_federated": "fedavg_mf_epinions.yaml"}
METRICS = ("recall@20", "recall@40", "ndcg@20", "ndcg@40")


def run_one(path: Path, seed: int, extra: list[str]) -> dict:
    from fleetrec.simulator.config import load
    from fleetrec.simulator.run import run
    cfg = load(path, [f"seed={seed}", "tracking.mlflow=false", "tracking.progress=false", *extra])
    t0 = time.perf_counter()
    res = run(cfg)
    wall = time.perf_counter() - t0
    train_s = [r["train_seconds"] for r in res.records]
    return {"seed": seed, "best_round": res.best_round, "rounds_run": len(res.records), "wall_s": round(wall, 2),
            "median_round_s": round(statistics.median(train_s), 4),
            **{f"test/{m}": res.best.get(f"test/{m}") for m in METRICS},
            **{f"val/{m}": res.best.get(f"val/{m}") for m in METRICS}}


def step_cost(reps: int = 5) -> dict:
    """Seconds per epoch of the centralized training step alone (no Ray, one thread): single-task MF,
    equal weighting and PMTRec on the same data and minibatch order (median of `reps` epochs)."""
    import numpy as np
    import torch
    from fleetrec.algorithms.pmtrec import PMTRecMF
    from fleetrec.simulator.cohort import DataView
    from fleetrec.simulator.config import load, make_setup
    torch.set_num_threads(1)
    out, ds = {}, None
    for name in ("single", "equal", "pmtrec"):
        cfg = load(ROOT / "configs" / CENTRAL[name], [])
        ds = ds or cfg.data.build(cfg.seed)
        algo = PMTRecMF(cfg.algorithm, make_setup(cfg, ds))
        algo.attach_data(ds)
        plan = algo.configure_train(0, algo.init_server(), None)
        batch = DataView(ds).batch(np.array([0]), 0, epochs=1, seed=0, rnd=0)
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            algo.trainer.train(plan, batch, {})
            times.append(time.perf_counter() - t)
        steps = -(-int(batch.n_rows[0]) // cfg.train.batch_size)
        out[name] = {"s_per_epoch": statistics.median(times), "steps_per_epoch": steps,
                     "ms_per_step": 1000 * statistics.median(times) / steps}
    return out


def summarize(runs: list[dict]) -> dict:
    out = {}
    for m in METRICS:
        v = [r[f"test/{m}"] for r in runs if r[f"test/{m}"] is not None]
        out[m] = {"mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0}
    out["median_round_s"] = statistics.median(r["median_round_s"] for r in runs)
    out["best_round"] = [r["best_round"] for r in runs]
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--only", nargs="*", default=None, help="method names (keys of the table)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "pmtrec_epinions.json"))
    ap.add_argument("--cost", action="store_true", help="only measure the per-step cost (no Ray) into --out")
    ap.add_argument("--update", action="store_true", help="replace only these methods' entries in an existing --out")
    ap.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    args = ap.parse_args()
    if args.cost:
        out = Path(args.out)
        result = json.loads(out.read_text()) if out.is_file() else {}
        result["cost_no_ray"] = {"command": "python benchmarks/pmtrec_table.py --cost", **step_cost()}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(result["cost_no_ray"], indent=1))
        return 0
    import ray
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="error", configure_logging=False,
             log_to_driver=False)
    methods = {**CENTRAL, **FEDERATED}
    if args.only:
        methods = {k: v for k, v in methods.items() if k in args.only}
    t0 = time.perf_counter()
    result = {"command": " ".join(["python", "benchmarks/pmtrec_table.py", *sys.argv[1:]]),
              "machine": f"{platform.machine()} {os.cpu_count()}-core CPU box, shared", "seeds": args.seeds,
              "configs": {k: f"configs/{v}" for k, v in methods.items()}, "runs": {}, "summary": {}}
    for name, cfg in methods.items():
        runs = []
        for s in args.seeds:
            try:
                r = run_one(ROOT / "configs" / cfg, s, args.overrides)
            except Exception as e:      # record the failure and go on with the other methods
                r = {"seed": s, "error": f"{type(e).__name__}: {e}"[:500]}
            runs.append(r)
            print(json.dumps({"method": name, **r}), file=sys.stderr, flush=True)
        result["runs"][name] = runs
        ok = [r for r in runs if "error" not in r]
        if ok:
            result["summary"][name] = summarize(ok)
    if "pmtrec" in result["summary"] and "equal" in result["summary"]:
        p, e = result["summary"]["pmtrec"]["median_round_s"], result["summary"]["equal"]["median_round_s"]
        result["cost"] = {"pmtrec_s_per_epoch": p, "equal_s_per_epoch": e, "ratio": p / e}
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    out = Path(args.out)
    if args.update and out.is_file():
        old = json.loads(out.read_text())
        for key in ("configs", "runs", "summary"):
            old[key].update(result[key])
        old.setdefault("updates", []).append({"command": result["command"], "methods": list(methods),
                                              "wall_s": result["wall_s"]})
        result = old
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["summary"], indent=1))
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
