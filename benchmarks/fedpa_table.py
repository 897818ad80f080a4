"""FedPA against its baselines and ablations, over seeds, plus a local-DP sweep.

For every dataset and seed: stage 1 (`fleetrec.simulator.pretrain.pretrain`: the backbone on the open
users, written to benchmarks/out/fedpa/<dataset>_seed<k>_backbone.pt), then stage 2 for every
method config `configs/fedpa_<dataset>[_<method>].yaml` on the private users with that backbone,
and, on the LDP dataset, FedPA with Laplace noise of scale δ on every uploaded tensor. Each run
is the config as shipped except the overrides listed in the output JSON (`overrides`): the seed,
the backbone path, the rounds, MLflow and the progress bar off, and (Epinions) the user count.

Metrics are those of the round with the best validation AUC (the official model selection):
pooled test AUC, test GAUC (mean per-user AUC), weighted precision at 0.5, and the bytes one
client uploads per round, read from the run's per-round counters (`bytes_up` over `clients_up`,
summed over rounds) and checked against the count by part (`FedPA.upload_floats`, float32).

Writes benchmarks/results/fedpa_<dataset>.json and fedpa_ldp_<dataset>.json (every run and the
mean ± std over seeds) and prints the markdown tables.

    python benchmarks/fedpa_table.py                          # the grid of algorithms/FEDPA.md
    python benchmarks/fedpa_table.py --datasets movielens --seeds 0 --rounds 5 --ldp ""   # quick
    python benchmarks/fedpa_table.py --datasets movielens --rounds 30 --pretrain-epochs 100 --ldp "" --tag full
                                                              # the shipped configs' own budget
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

OUT = REPO / "benchmarks" / "out" / "fedpa"
RESULTS = REPO / "benchmarks" / "results"
METHODS = [  # (name in the tables, config suffix)
    ("fedpa", ""), ("pretrained", "_pretrained"), ("local", "_local"), ("fedavg_full", "_fedavg_full"),
    ("fedavg_whole", "_fedavg_whole"),
    ("fedavg_lora", "_fedavg_lora"), ("no_user_lora", "_no_user_lora"), ("no_group_lora", "_no_group_lora"),
    ("no_gate", "_no_gate"),
]
METRICS = ("test/auc", "test/gauc", "test/precision_w")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default="movielens,epinions", help="comma-separated: movielens, epinions")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--rounds", type=int, default=10, help="stage-2 rounds (the pretrained baseline runs 1)")
    p.add_argument("--pretrain-epochs", type=int, default=20)
    p.add_argument("--epinions-users", type=int, default=600, help="data.max_clients of the Epinions configs")
    p.add_argument("--methods", default=",".join(m for m, _ in METHODS))
    p.add_argument("--ldp", default="0,0.1,0.2,0.5", help="Laplace scales δ for FedPA ('' = no sweep)")
    p.add_argument("--ldp-dataset", default="movielens")
    p.add_argument("--resume", action="store_true", help="keep the runs already in the result files")
    p.add_argument("--results", type=Path, default=None,
                   help="folder for the result files and backbones (default: benchmarks/results, benchmarks/out/fedpa)")
    p.add_argument("--tag", default="", help="result files fedpa[_ldp]_<dataset>_<tag>.json and backbones "
                   "<dataset>_<tag>_seedK (for another budget beside the default grid)")
    return p.parse_args(argv)


def _mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, s


def _algorithm(cfg, ds):
    from fleetrec.algorithms import make_algorithm
    from fleetrec.algorithms.protocol import Setup
    return make_algorithm(cfg.algorithm, Setup(ds.schema, ds.num_clients, cfg.seed, cfg.train, cfg.model))


def _touched_floats(algo, ds, parts: dict[str, int]) -> float | None:
    """Mean floats per client if the attribute and item tables a method averages were sent as the
    rows the client's training rows touch (its own attribute values, the distinct item-field values
    it trained on) instead of whole tables, as the paper and `upload_floats` count them. None when
    the method sends no such table."""
    import numpy as np
    from fleetrec.datasets.federated import CLIENT, SPLIT, TRAIN
    if not (parts.get("user_tables") or parts.get("item_tables")):
        return None
    named = dict(algo.model.named_parameters())
    sent = set(algo.global_names)
    train = ds.column(SPLIT) == TRAIN
    owner = ds.column(CLIENT)[train]
    clients = np.unique(owner)
    rows = np.zeros(ds.num_clients)
    for f in ds.schema.categorical:
        if f"item.{f.name}" in sent:
            vocab, width = named[f"item.{f.name}"].shape
            pairs = np.unique(owner * vocab + ds.column(f.name)[train].astype(np.int64))
            rows += np.bincount(pairs // vocab, minlength=ds.num_clients) * width
    for f in ds.schema.client_categorical:
        if f"user.{f.name}" in sent:
            rows[clients] += named[f"user.{f.name}"].shape[1]
    dense = parts.get("user_tables", 0) + parts.get("item_tables", 0)
    return float(sum(parts.values()) - dense + rows[clients].mean())


def _one(config: Path, overrides: list[str]) -> dict:
    from fleetrec.simulator.config import load
    from fleetrec.simulator.run import federated_dataset
    from fleetrec.simulator.run import run
    cfg = load(config, overrides)
    ds = federated_dataset(cfg)
    t0 = time.perf_counter()
    res = run(cfg, dataset=ds)
    algo = _algorithm(cfg, ds)
    parts = algo.upload_floats()
    # the run's own counters: bytes sent up in each round over the clients that sent them
    sent = sum(r["bytes_up"] for r in res.records)
    senders = sum(r["clients_up"] for r in res.records)
    per_client = sent / senders if senders else 0.0
    assert per_client == res.info["bytes_up_per_client"] == 4 * sum(parts.values()), (per_client, parts)
    return {"best_round": res.best_round, **{k: float(res.best[k]) for k in METRICS + ("val/auc",)},
            "bytes_up_per_client_round": per_client, "bytes_up_total": sent, "client_rounds": senders,
            "upload_floats": sum(parts.values()), "upload_parts": parts,
            "touched_rows_floats": _touched_floats(algo, ds, parts), "clients": ds.num_clients,
            "seconds": round(time.perf_counter() - t0, 1)}


def _retry(fn, *args, tries: int = 3):
    """`fn(*args)`, tried again after a pause when it raises (a shared machine: Ray actors can die)."""
    for i in range(tries):
        try:
            return fn(*args)
        except Exception as e:   # noqa: BLE001 - reported, then retried; the last failure propagates
            if i == tries - 1:
                raise
            print(f"  failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); retrying", file=sys.stderr, flush=True)
            time.sleep(20)


def _summary(runs: list[dict], key: str) -> dict:
    out = {}
    for name in dict.fromkeys(r[key] for r in runs):
        rs = [r for r in runs if r[key] == name]
        out[str(name)] = {"seeds": [r["seed"] for r in rs],
                          **{m: _mean_std([r[m] for r in rs])
                             for m in METRICS + ("upload_floats", "bytes_up_per_client_round")}}
        if all(r.get("touched_rows_floats") is not None for r in rs):
            out[str(name)]["touched_rows_floats"] = _mean_std([r["touched_rows_floats"] for r in rs])
    return out


def _table(summary: dict, first: str) -> str:
    lines = [f"| {first} | test AUC | test GAUC | precision (weighted) | bytes up / client / round (counter) |",
             "|---|---|---|---|---|"]
    for name, s in summary.items():
        cells = [f"{s[m][0]:.4f} ± {s[m][1]:.4f}" for m in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {s['bytes_up_per_client_round'][0]:,.0f} |")
    sent = {name: s["bytes_up_per_client_round"][0] for name, s in summary.items()}
    for base in ("fedavg_full", "fedavg_whole"):
        if sent.get(base) and "fedpa" in sent:
            lines.append(f"\nFedPA sends {1 - sent['fedpa'] / sent[base]:.1%} fewer bytes per client per round "
                         f"than {base}.")
            if "touched_rows_floats" in summary[base]:
                rows = summary[base]["touched_rows_floats"][0]
                lines.append(f"Sending only the table rows its clients touch, {base} would send {rows:,.0f} floats "
                             f"per client per round; FedPA {1 - sent['fedpa'] / (4 * rows):.1%} fewer.")
    return "\n".join(lines)


def _save(path: Path, blob: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(blob, indent=1) + "\n")
    tmp.replace(path)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from throughput import _machine, _versions
    from fleetrec.simulator.pretrain import load_for_pretrain, pretrain
    import torch
    torch.set_num_threads(1)              # stage 1 runs in this process, next to the Ray workers
    if not ray.is_initialized():
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="error",
                 configure_logging=False, log_to_driver=False)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    methods = [m for m in METHODS if m[0] in args.methods.split(",")]
    deltas = [float(d) for d in args.ldp.split(",") if d]
    names = {"movielens": "movielens", "epinions": "epinions"}
    for dataset in args.datasets.split(","):
        stem = REPO / "configs" / f"fedpa_{names[dataset]}"
        data_ov = [f"data.max_clients={args.epinions_users}"] if dataset == "epinions" else []
        tag = f"_{args.tag}" if args.tag else ""
        results, backbones = (args.results, args.results / "backbones") if args.results else (RESULTS, OUT)
        out_path = results / f"fedpa_{dataset}{tag}.json"
        ldp_path = results / f"fedpa_ldp_{dataset}{tag}.json"
        old = json.loads(out_path.read_text())["runs"] if args.resume and out_path.is_file() else []
        old_ldp = json.loads(ldp_path.read_text())["runs"] if args.resume and ldp_path.is_file() else []
        runs, ldp_runs = list(old), list(old_ldp)
        done = {(r["method"], r["seed"]) for r in runs}
        done_ldp = {(r["delta"], r["seed"]) for r in ldp_runs}
        common_doc = ["seed=K", f"model.backbone=benchmarks/out/fedpa/<dataset>{tag}_seedK_backbone.pt",
                      f"rounds={args.rounds}", "tracking.mlflow=false", "tracking.progress=false", *data_ov]
        header = {"dataset": dataset, "configs": f"configs/fedpa_{names[dataset]}[_<method>].yaml",
                  "overrides": common_doc, "pretrain_epochs": args.pretrain_epochs,
                  "machine": {**_machine(), "note": "2-core CPU box, shared"}, "versions": _versions()}
        for seed in seeds:
            bb = backbones / f"{dataset}{tag}_seed{seed}_backbone.pt"
            common = [f"seed={seed}", "tracking.mlflow=false", "tracking.progress=false", *data_ov]
            todo = [m for m in methods if (m[0], seed) not in done]
            todo_ldp = [d for d in deltas if dataset == args.ldp_dataset and (d, seed) not in done_ldp]
            if not (todo or todo_ldp):
                continue
            t0 = time.perf_counter()
            cfg, _ = load_for_pretrain(f"{stem}.yaml", [*common, f"model.pretrain.epochs={args.pretrain_epochs}",
                                                        f"model.backbone={bb}"])
            pretrain(cfg, bb)
            print(f"[{dataset} seed {seed}] pretrain {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
            for method, suffix in todo:
                rounds = [] if method == "pretrained" else [f"rounds={args.rounds}"]
                r = _retry(_one, Path(f"{stem}{suffix}.yaml"), [*common, f"model.backbone={bb}", *rounds])
                runs.append({"method": method, "seed": seed, **r})
                print(f"[{dataset} seed {seed}] {method}: test AUC {r['test/auc']:.4f} GAUC {r['test/gauc']:.4f} "
                      f"up {r['upload_floats']} ({r['seconds']}s)", file=sys.stderr, flush=True)
                _save(out_path, {**header, "runs": runs, "summary": _summary(runs, "method")})
            for d in todo_ldp:
                same = [x for x in runs if x["method"] == "fedpa" and x["seed"] == seed]
                if d == 0 and same:        # Laplace with δ = 0 is the noiseless run, bit for bit (tested)
                    ldp_runs.append({"delta": d, "seed": seed, **same[0], "reused_from": "fedpa"})
                    ldp_runs[-1].pop("method")
                    continue
                r = _retry(_one, Path(f"{stem}.yaml"), [*common, f"model.backbone={bb}", f"rounds={args.rounds}",
                                                "privacy.local.mechanism=laplace", f"privacy.local.scale={d}"])
                ldp_runs.append({"delta": d, "seed": seed, **r})
                print(f"[{dataset} seed {seed}] ldp δ={d}: test AUC {r['test/auc']:.4f} ({r['seconds']}s)",
                      file=sys.stderr, flush=True)
                _save(ldp_path, {**header, "mechanism": "laplace (elementwise, scale δ, no clipping)",
                                 "runs": ldp_runs, "summary": _summary(ldp_runs, "delta")})
        if runs:
            print(f"\n{dataset}\n" + _table(_summary(runs, "method"), "method"))
        if ldp_runs:
            print(f"\n{dataset}, FedPA with Laplace LDP\n" + _table(_summary(ldp_runs, "delta"), "δ"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
