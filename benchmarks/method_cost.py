"""What each research method costs against its own floor, through the engine, on the configs'
workloads: a FedPA round vs a FedAvg-LoRA round on the same private users (MovieLens-100k), a
PMTRec epoch vs an equal-weight summed-loss epoch of the same four tasks (Epinions, centralized),
a federated PMTRec round with 3 local steps vs a FedAvg-MF round with the same steps (Epinions,
client = user), and a PF-MSMTrec round vs a centralized MMoE epoch over the same rows (Epinions,
5 scenarios).

    python benchmarks/method_cost.py                        # all pairs, 3 alternated pairs each
    python benchmarks/method_cost.py --only pmtrec --pairs 2 --out /tmp/cost.json

Each run trains `rounds` rounds with evaluation only after the last one and tracking off; the
first round is a warm-up and is dropped, the rest give the median `train_seconds` per round
(the coordinator's wall time of a round: broadcast, every worker's training, the reduction and the
server update; evaluation is timed apart and not included). The method and its floor alternate
(A, B, A, B, ...) so a change in the box's load hits both; the ratio is reported per pair and as
the median of the pairs. Prints one JSON object and writes it to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PAIRS = {
    "fedpa": {"method": "fedpa_movielens.yaml", "floor": "fedpa_movielens_fedavg_lora.yaml", "rounds": 30,
              "goal": None,
              "workload": "MovieLens-100k, the 80% private users (754) every round, 1 local epoch, batch 1024; "
                          "the same pre-trained backbone; floor: FedAvg-LoRA (one shared LoRA, no gate)"},
    "pmtrec": {"method": "pmtrec_epinions.yaml", "floor": "pmtrec_epinions_equal.yaml", "rounds": 16, "goal": 1.3,
               "workload": "Epinions (10-core, 4,000 users), centralized, tasks bpr+social+rating+au, dim 32, "
                           "batch 2048, one round = one epoch; floor: the same tasks, equal weights (summed loss)"},
    "pmtrec_federated": {"method": "pmtrec_epinions_federated.yaml", "floor": "fedavg_mf_epinions.yaml",
                         "method_overrides": ["algorithm.local_update=local_steps", "train.local_epochs=3",
                                              "algorithm.server_lr=1.0"],
                         "floor_overrides": ["train.local_epochs=3"], "rounds": 12, "goal": None,
                         "workload": "Epinions (10-core, 4,000 users), federated (client = user, every user every "
                                     "round), 3 local Adam steps on local item copies, tasks bpr+rating+au, dim 32; "
                                     "floor: FedAvg-MF (bpr) with the same 3 local steps"},
    "pf_msmtrec": {"method": "pf_msmtrec_epinions.yaml", "floor": "pf_msmtrec_epinions_centralized.yaml",
                   "rounds": 5, "goal": 1.2,
                   "workload": "Epinions, 5 category scenarios, 2,000 users, MMoE (4 global + 1 per task + 2 "
                               "scenario experts, 64-32, tower 32), batch 512, one round = one local epoch of "
                               "every scenario; floor: one centralized MMoE epoch over the pooled rows"},
}


def _backbone(config: str) -> None:
    """FedPA's stage 1 (the pre-trained backbone both runs of the pair load), when not yet built."""
    import yaml
    from fleetrec.simulator.config import load
    from fleetrec.simulator.pretrain import pretrain
    path = (yaml.safe_load((ROOT / "configs" / config).read_text()).get("model") or {}).get("backbone")
    if path and not (ROOT / path).exists():
        pretrain(load(ROOT / "configs" / config, ["model.backbone=", "tracking.mlflow=false"]), ROOT / path)


def timed_run(config: str, rounds: int, seed: int, overrides: list[str] = ()) -> dict:
    from fleetrec.simulator.config import load
    from fleetrec.simulator.run import run
    _backbone(config)
    cfg = load(ROOT / "configs" / config, [*overrides, f"seed={seed}", f"rounds={rounds}", f"eval.every={rounds}",
                                           "early_stop_patience=0", "tracking.mlflow=false",
                                           "tracking.progress=false"])
    t0 = time.perf_counter()
    res = run(cfg)
    secs = [r["train_seconds"] for r in res.records]
    return {"config": config, "wall_s": round(time.perf_counter() - t0, 2), "round_s": [round(s, 4) for s in secs],
            "median_round_s": statistics.median(secs[1:])}


def measure(name: str, pairs: int, seed: int) -> dict:
    spec = PAIRS[name]
    runs = []
    for i in range(pairs):
        a = timed_run(spec["method"], spec["rounds"], seed, spec.get("method_overrides", ()))
        b = timed_run(spec["floor"], spec["rounds"], seed, spec.get("floor_overrides", ()))
        runs.append({"method": a, "floor": b, "ratio": a["median_round_s"] / b["median_round_s"]})
        print(f"{name} pair {i}: {a['median_round_s']:.3f} s vs {b['median_round_s']:.3f} s "
              f"= {runs[-1]['ratio']:.2f}x", file=sys.stderr, flush=True)
    ratio = statistics.median(r["ratio"] for r in runs)
    return {**spec, "pairs": runs, "ratio_median": ratio,
            "method_round_s_median": statistics.median(r["method"]["median_round_s"] for r in runs),
            "floor_round_s_median": statistics.median(r["floor"]["median_round_s"] for r in runs),
            "timed_s_per_run_min": min(sum(r[k]["round_s"][1:]) for r in runs for k in ("method", "floor")),
            "meets_goal": None if spec["goal"] is None else ratio <= spec["goal"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=sorted(PAIRS), default=sorted(PAIRS))
    ap.add_argument("--pairs", type=int, default=3, help="alternated (method, floor) pairs per comparison")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / f"method_cost_{date.today()}.json"))
    args = ap.parse_args()
    if args.pairs < 1:
        ap.error("--pairs must be >= 1")
    import ray
    import torch
    if not ray.is_initialized():
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    result = {"benchmark": "fleetrec_method_cost", "command": "python benchmarks/method_cost.py " + " ".join(sys.argv[1:]),
              "seed": args.seed, "comparisons": {n: measure(n, args.pairs, args.seed) for n in args.only},
              "versions": {"python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__},
              "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                          "load_avg_1m": os.getloadavg()[0]}}
    text = json.dumps(result, indent=1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
