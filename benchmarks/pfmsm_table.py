"""PF-MSMTrec against its baselines and ablations on Epinions scenarios: a seeds x methods grid.

Runs every config of `--configs` (default: PF-MSMTrec, local-only, centralized, FedAvg, FedProx,
FedBN, Ditto and the five ablations, all `configs/pf_msmtrec_epinions*.yaml`) for every seed in
one Ray session, picks each run's round by the best validation mean-over-scenarios AUC
(`val/scenario_mean/auc`), and writes per-scenario and mean test AUC / log-loss per task to JSON
(after every run, so a cut-off grid keeps what finished), then prints a markdown table.

    python benchmarks/pfmsm_table.py                                  # the full grid (3 seeds)
    python benchmarks/pfmsm_table.py --seeds 0 --rounds 2 --max-users 500 --configs pf_msmtrec_epinions fedavg
    python benchmarks/pfmsm_table.py --table-only                     # re-print the table from the JSON
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DEFAULT_OUT = REPO / "benchmarks" / "results" / "pfmsm_epinions.json"
METHODS = [  # (label, config stem)
    ("PF-MSMTrec", "pf_msmtrec_epinions"),
    ("local-only", "pf_msmtrec_epinions_local"),
    ("centralized", "pf_msmtrec_epinions_centralized"),
    ("FedAvg", "pf_msmtrec_epinions_fedavg"),
    ("FedProx", "pf_msmtrec_epinions_fedprox"),
    ("FedBN", "pf_msmtrec_epinions_fedbn"),
    ("Ditto", "pf_msmtrec_epinions_ditto"),
    ("PF-MSMTrec w/o template", "pf_msmtrec_epinions_no_template"),
    ("PF-MSMTrec w/o FedBN", "pf_msmtrec_epinions_no_fedbn"),
    ("PF-MSMTrec w/o conflict coord.", "pf_msmtrec_epinions_no_conflict"),
    ("PF-MSMTrec w/o pers. aggregation", "pf_msmtrec_epinions_no_personalized"),
    ("PF-MSMTrec w/o tower aggregation", "pf_msmtrec_epinions_no_tower"),
]
SELECT = "val/scenario_mean/auc"


def _stem(name: str) -> str:
    return name if name.startswith("pf_msmtrec") else f"pf_msmtrec_epinions_{name}"


def run_grid(args) -> dict:
    import ray
    from fleetrec.simulator.config import load
    from fleetrec.simulator.run import run

    out = Path(args.out)
    res = json.loads(out.read_text()) if args.resume and out.is_file() else {"runs": []}
    done = {(r["config"], r["seed"]) for r in res["runs"]}
    stems = [_stem(c) for c in args.configs] if args.configs else [s for _, s in METHODS]
    over = ["tracking.mlflow=false", "tracking.progress=false"]
    if args.rounds:
        over.append(f"rounds={args.rounds}")
    if args.max_users:
        over.append(f"data.max_users={args.max_users}")
    res["command"] = "python benchmarks/pfmsm_table.py " + " ".join(sys.argv[1:])
    res["overrides"] = over
    res["machine"] = args.machine or f"{platform.machine()} {platform.system()}"
    res["select"] = SELECT
    ray.init(include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        for seed in args.seeds:
            for stem in stems:
                if (stem, seed) in done:
                    continue
                cfg = load(REPO / "configs" / f"{stem}.yaml", over + [f"seed={seed}"])
                t0 = time.perf_counter()
                result = run(cfg)
                evaluated = [r for r in result.records if SELECT in r]
                best = max(evaluated, key=lambda r: -math.inf if math.isnan(r[SELECT]) else r[SELECT])
                row = {"config": stem, "seed": seed, "best_round": best["round"],
                       "seconds": round(time.perf_counter() - t0, 1),
                       "data": {k: v for k, v in vars(cfg.data).items()},
                       "metrics": {k: v for k, v in best.items() if k.startswith(("test/", "val/"))}}
                res["runs"].append(row)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(res, indent=1, default=str))
                print(f"{stem} seed {seed}: round {best['round']} test mean AUC "
                      f"{best['test/scenario_mean/auc']:.4f} ({row['seconds']} s)", flush=True)
    finally:
        ray.shutdown()
    return res


def table(res: dict) -> str:
    runs = res["runs"]
    if not runs:
        return "(no runs)"
    m0 = runs[0]["metrics"]
    scen = sorted({k.split("/")[1] for k in m0 if k.startswith("test/s") and k.split("/")[1][1:].isdigit()},
                  key=lambda s: int(s[1:]))
    tasks = sorted({k.split("/")[2] for k in m0 if k.startswith("test/scenario_mean/") and k.count("/") == 3})
    cols = [(f"{s} {t}", f"test/{s}/{t}/auc") for s in scen for t in tasks]
    cols += [(f"mean {t}", f"test/scenario_mean/{t}/auc") for t in tasks]
    cols += [("mean", "test/scenario_mean/auc"), ("mean log-loss", "test/scenario_mean/logloss")]
    labels = {s: l for l, s in METHODS}
    lines = ["| method | " + " | ".join(c for c, _ in cols) + " | seeds |",
             "|---" * (len(cols) + 2) + "|"]
    for stem in dict.fromkeys(r["config"] for r in runs):
        rs = [r for r in runs if r["config"] == stem]
        cells = []
        for name, key in cols:
            vals = [r["metrics"][key] for r in rs if key in r["metrics"]]
            mean = statistics.fmean(vals)
            cells.append(f"{mean:.4f} ± {statistics.stdev(vals):.4f}" if name.startswith("mean") and len(vals) > 1
                         else f"{mean:.4f}")
        lines.append(f"| {labels.get(stem, stem)} | " + " | ".join(cells) + f" | {len(rs)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--configs", nargs="*", help="config stems or suffixes (fedavg, no_tower, ...)")
    ap.add_argument("--rounds", type=int, default=0, help="override rounds (0 = the configs' value)")
    ap.add_argument("--max-users", type=int, default=0, help="override data.max_users (0 = the configs' value)")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--machine", default="", help="free text recorded with the results")
    ap.add_argument("--resume", action="store_true", help="skip (config, seed) pairs already in --out")
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    res = json.loads(Path(args.out).read_text()) if args.table_only else run_grid(args)
    print(table(res))


if __name__ == "__main__":
    main()
