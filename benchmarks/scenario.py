"""Scenario mode: a few heavy clients (scenarios) with an MMoE. Is a federated round as cheap as
a centralized epoch over the same rows?

Builds the synthetic multi-scenario dataset (`synthetic_multi_scenario`, --scenarios x --rows
rows, tasks click and like) once, then in the same invocation:

  fleetrec     `fleetrec.simulator.run.run` with `--algorithm` (default `scenario_fedavg`) over all
               scenarios every round, --workers worker actors x --cpus-per-worker CPUs; each
               scenario trains one local epoch of minibatches. Rounds 1..R are timed (round 0
               warms up); the figure is the median `train_seconds` of a round as the coordinator
               measures it (dispatch, local training, aggregation; evaluation off).
  centralized  the same MMoE (`fleetrec.algorithms.models.mtl`) as an ordinary nn.Module, Adam, the same
               batch size, one epoch over every scenario's training rows in one shuffled stream,
               in this process, once per torch thread count in --central-threads (default 1 and
               workers x cpus-per-worker); the fastest is the compute floor.

Prints one JSON line with both times, rows per second and `round_over_central_epoch`.

    python benchmarks/scenario.py                                   # 4 x 250,000 rows
    python benchmarks/scenario.py --rows 20000 --rounds 1           # quick
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import MemSampler, _machine, _versions, emit_json  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenarios", type=int, default=4)
    p.add_argument("--rows", type=int, default=250_000, help="rows per scenario (all splits)")
    p.add_argument("--rounds", type=int, default=2, help="timed rounds after one warm-up round")
    p.add_argument("--algorithm", default="scenario_fedavg")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--embed-dim", type=int, default=16)
    p.add_argument("--expert", default="[128,64]", help="expert MLP widths")
    p.add_argument("--tower", default="[32]", help="tower MLP widths")
    p.add_argument("--central-threads", default=None,
                   help="comma-separated torch thread counts for the centralized epoch (default: 1 and workers x cpus)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-cpus", type=int, default=None)
    p.add_argument("--json-out", default=None)
    return p.parse_args(argv)


def experiment(a: argparse.Namespace):
    from fleetrec.simulator.config import from_dict
    from fleetrec.simulator.config_loader import apply_overrides
    over = {
        "name": "scenario_bench", "seed": a.seed, "rounds": a.rounds + 1,
        "data.name": "synthetic_multi_scenario", "data.rows": "[" + ",".join([str(a.rows)] * a.scenarios) + "]",
        "model.name": "mmoe", "model.embed_dim": a.embed_dim, "model.expert": a.expert, "model.tower": a.tower,
        "algorithm.name": a.algorithm,
        "train.local_epochs": 1, "train.batch_size": a.batch_size, "train.optimizer": "adam", "train.lr": 0.001,
        "federation.clients_per_round": a.scenarios, "federation.cohort_size": 1,
        "resources.workers": a.workers, "resources.cpus_per_worker": a.cpus_per_worker,
        "eval.every": 10_000, "tracking.mlflow": False, "tracking.progress": False,
    }
    return from_dict(apply_overrides({}, [f"{k}={v}" for k, v in over.items()]), "scenario_bench")


def centralized_epoch(cfg, ds, threads: int) -> dict:
    """One epoch of ordinary minibatch training of the same model over all training rows."""
    from fleetrec.algorithms.base import build_model
    from fleetrec.datasets.federated import SPLIT, TRAIN
    from fleetrec.simulator.config import make_setup
    torch.set_num_threads(threads)
    model = build_model(make_setup(cfg, ds))
    model.train()
    split = ds.column(SPLIT)
    rows = np.flatnonzero(split == TRAIN)
    s = ds.schema
    cat = {f.name: torch.from_numpy(ds.column(f.name)[rows].copy()) for f in s.categorical}
    num = torch.from_numpy(np.stack([ds.column(c)[rows] for c in s.numeric], 1).copy()) if s.numeric \
        else torch.zeros(len(rows), 0)
    y = torch.from_numpy(np.stack([ds.column(t)[rows] for t in s.tasks], 1).copy())
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    g = torch.Generator().manual_seed(cfg.seed)
    perm = torch.randperm(len(rows), generator=g)
    bs = cfg.train.batch_size
    t0 = time.perf_counter()
    for st in range(0, len(rows), bs):
        idx = perm[st:st + bs]
        if len(idx) < 2:
            continue
        logits = model({k: v[idx] for k, v in cat.items()}, num[idx], {})
        loss = F.binary_cross_entropy_with_logits(logits, y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return {"seconds": time.perf_counter() - t0, "train_rows": int(len(rows)), "threads": threads}


def main(argv=None) -> dict:
    a = parse_args(argv)
    import ray
    from fleetrec.simulator.run import Callback, run
    cfg = experiment(a)
    t0 = time.perf_counter()
    ds = cfg.data.build(cfg.seed)
    build_s = time.perf_counter() - t0
    threads = max(1, int(a.workers * a.cpus_per_worker))
    counts = sorted({int(t) for t in a.central_threads.split(",")} if a.central_threads else {1, threads})
    centrals = [centralized_epoch(cfg, ds, t) for t in counts]
    central = min(centrals, key=lambda r: r["seconds"])

    records: list[dict] = []

    class Keep(Callback):
        def on_round(self, record: dict):
            records.append(record)

    started = False
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=a.num_cpus or max(2, threads), include_dashboard=False, logging_level="error",
                 configure_logging=False, log_to_driver=False)
        started = True
    try:
        with MemSampler(interval=0.5) as sampler:
            run(cfg, [Keep()], dataset=ds)
    finally:
        if started:
            ray.shutdown()
    timed = [r["train_seconds"] for r in records[1:]] or [records[-1]["train_seconds"]]
    round_s = statistics.median(timed)
    out = {
        "benchmark": "scenario", "algorithm": a.algorithm, "scenarios": a.scenarios, "rows_per_scenario": a.rows,
        "train_rows": central["train_rows"], "model": {"name": "mmoe", "embed_dim": a.embed_dim,
                                                         "expert": a.expert, "tower": a.tower},
        "batch_size": a.batch_size, "workers": a.workers, "cpus_per_worker": a.cpus_per_worker,
        "round_seconds": round_s, "round_seconds_all": [r["train_seconds"] for r in records],
        "central_epoch_seconds": central["seconds"], "central_threads": central["threads"],
        "central_epoch_seconds_by_threads": {str(r["threads"]): r["seconds"] for r in centrals},
        "round_over_central_epoch": round_s / central["seconds"],
        "rows_per_s_fleetrec": central["train_rows"] / round_s,
        "rows_per_s_central": central["train_rows"] / central["seconds"],
        "dataset_build_seconds": build_s, "peak_rss_mb": sampler.peak_rss / 2**20, "peak_pss_mb": sampler.peak_pss / 2**20,
        "seed": a.seed, "versions": _versions(), "machine": _machine(),
    }
    return emit_json(out, a.json_out)


if __name__ == "__main__":
    main()
