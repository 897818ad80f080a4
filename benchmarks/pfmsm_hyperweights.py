"""PF-MSMTrec's learned personalization weights over a long run: α_c (expert aggregation) and β_c
(tower aggregation, the mean over tower layers) per scenario and round, with the scale-free
cosine hypergradient (default) and FedHCA2's raw inner product (`algorithm.hypergrad=raw`).

One run per variant of `configs/pf_msmtrec_epinions.yaml` (seed 0, MLflow off); the JSON is
written after every run (`--resume` skips finished variants), then the figure.

    python benchmarks/pfmsm_hyperweights.py                       # 50 rounds, both variants
    python benchmarks/pfmsm_hyperweights.py --rounds 3 --max-users 300 --out /tmp/h.json
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

VARIANTS = {"cosine": [], "raw": ["algorithm.hypergrad=raw"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--max-users", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "pfmsm_hyperweights.json"))
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args(argv)
    from fleetrec.simulator.config import load
    from fleetrec.simulator.run import run

    out = Path(args.out)
    doc = json.loads(out.read_text()) if args.resume and out.is_file() else {"runs": {}}
    doc.update(command="python benchmarks/pfmsm_hyperweights.py" + "".join(f" {a}" for a in (argv or sys.argv[1:])),
               config="configs/pf_msmtrec_epinions.yaml", seed=args.seed, rounds=args.rounds,
               machine=f"{platform.machine()}, {platform.python_version()}")
    for name, extra in VARIANTS.items():
        if name in doc["runs"]:
            continue
        over = [f"rounds={args.rounds}", f"seed={args.seed}", "tracking.mlflow=false", "tracking.progress=false",
                "early_stop_patience=0", *extra]
        if args.max_users:
            over.append(f"data.max_users={args.max_users}")
        cfg = load(REPO / "configs" / "pf_msmtrec_epinions.yaml", over)
        t = time.time()
        res = run(cfg)
        recs = res.records
        clients = sorted({int(k.split("/")[-1]) for r in recs for k in r if k.startswith("pfmsm/alpha/")})
        doc["runs"][name] = {
            "overrides": over, "seconds": round(time.time() - t, 1),
            "alpha": {c: [r.get(f"pfmsm/alpha/{c}") for r in recs] for c in clients},
            "beta": {c: [r.get(f"pfmsm/beta/{c}") for r in recs] for c in clients},
            "val/scenario_mean/auc": [r.get("val/scenario_mean/auc") for r in recs],
            "test/scenario_mean/auc": [r.get("test/scenario_mean/auc") for r in recs]}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1))
        b = doc["runs"][name]["beta"]
        moved = max(abs(v[-1] - v[0]) for v in b.values() if v and v[0] is not None)
        print(f"{name}: {len(recs)} rounds in {doc['runs'][name]['seconds']} s; largest |beta_end - beta_start| "
              f"{moved:.4f}", flush=True)
    figure(doc, out.with_suffix(".png"))
    print(f"written: {out}, {out.with_suffix('.png')}")
    return 0


def figure(doc: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(doc["runs"])
    fig, axes = plt.subplots(len(names), 2, figsize=(10, 3.2 * len(names)), squeeze=False)
    for i, name in enumerate(names):
        for j, w in enumerate(("alpha", "beta")):
            ax = axes[i][j]
            for c, v in doc["runs"][name][w].items():
                ax.plot(range(1, len(v) + 1), v, label=f"s{c}")
            ax.set_title(f"{w} per scenario, hypergrad={name}", fontsize=9)
            ax.set_xlabel("round")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
