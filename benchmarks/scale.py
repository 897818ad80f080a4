"""fleetrec at scale: a million registered clients with persistent personal state.

Builds a light synthetic `FederatedDataset` directly with NumPy (N clients with 5-20 rows each,
one categorical `item_id`, one task `click`; each client's last row is test, the one before it
validation, the rest training), runs the `per_user` model (private `user_emb` of `dim` floats
per client, small shared item table and scorer) with FedAvg for 1 warm-up + R timed rounds of
K clients, evaluating once at the end on a fixed sample of clients, and prints ONE JSON line as
the last line of output:

    seconds_per_round       median train_seconds of the timed rounds
    client_updates_per_s    K / seconds_per_round
    peak_rss_mb/peak_pss_mb peak summed RSS / PSS of the driver and its descendant processes
    dataset_build_seconds   building the FederatedDataset (NumPy + from_columns)
    put_seconds             the one ray.put of the dataset (the driver then drops its private copy)
    startup_seconds         run()'s coordinator/worker start (includes the
                            workers' personal-state init)
    personal_state          raw bytes (N x dim x 4) vs what the workers report (`info()`'s
                            personal_bytes) vs measured resident memory (see below)

Personal-state memory is measured two ways, both from /proc/PID/status `RssAnon` (private
anonymous memory; the dataset's object-store pages are shared memory and not in it):
  * `probe`: a Ray actor (same process kind as a worker) builds what a worker builds at start
    (algorithm, `DataView` of the dataset), calls glibc `malloc_trim(0)` and reads RssAnon, then
    runs the worker's personal-state init loop for one worker's share of clients and reads
    RssAnon again: the growth is what that init costs in resident memory (allocator slack
    included; `_after_trim`: after another `malloc_trim(0)`, i.e. the slack given back);
  * `workers`: each worker actor's RssAnon right after start (run()'s on_start) minus the
    probe's "before" value, summed over workers. `--trim-workers` (a what-if, not what the engine
    does) runs `malloc_trim(0)` inside each worker right after start and measures after it.

    python benchmarks/scale.py                                   # N=1,000,000, K=100,000, 1+2 rounds
    python benchmarks/scale.py --clients 200000 --clients-per-round 20000
    python benchmarks/scale.py --freeze-items                     # item table frozen (no item grads)
    python benchmarks/scale.py --clients 10000000 --per-round 1000000 --data synthetic_per_user \
        --rows-min 12 --rows-max 12 --eval-clients 0 --pooled-auc histogram --no-probe   # 10M clients
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import MemSampler, WorkerWatch, _machine, _versions, emit_json, rss_anon, timed_rounds  # noqa: E402

WARMUP_ROUNDS = 1


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=1_000_000, help="registered clients N")
    p.add_argument("--clients-per-round", "--per-round", type=int, default=100_000, help="K")
    p.add_argument("--data", choices=("light", "synthetic_per_user"), default="light",
                   help="light: the side-path NumPy build below (item_id only; the earlier figures); "
                        "synthetic_per_user: the engine's generator (item_id + 2 item features, known Bayes AUC)")
    p.add_argument("--pooled-auc", choices=("exact", "histogram"), default="exact",
                   help="eval.pooled_auc: histogram keeps the coordinator's evaluation memory independent of rows")
    p.add_argument("--rounds", type=int, default=2, help="timed rounds after 1 warm-up round")
    p.add_argument("--rows-min", type=int, default=5)
    p.add_argument("--rows-max", type=int, default=20)
    p.add_argument("--items", type=int, default=500, help="item_id vocabulary")
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--freeze-items", action="store_true", help="model.freeze=[item_emb]")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--cohort-size", type=int, default=256)
    p.add_argument("--eval-clients", type=int, default=1000, help="clients evaluated at the end; 0 = all")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-cpus", type=int, default=None)
    p.add_argument("--object-store-gb", type=float, default=None,
                   help="object store size when Ray is started here (default: Ray's, 30%% of free memory); "
                        "give room for the dataset, or Ray spills it to disk")
    p.add_argument("--no-probe", action="store_true", help="skip the personal-state probe actor")
    p.add_argument("--trim-workers", action="store_true",
                   help="what-if: right after start, run glibc malloc_trim(0) inside each worker actor "
                        "(through Ray's __ray_call__) and measure their RssAnon after it; the engine "
                        "does not do this itself")
    p.add_argument("--mem-interval", type=float, default=0.5)
    p.add_argument("--json-out", default=None)
    p.add_argument("--layout", default=None, metavar="DIR",
                   help="write the dataset as the sharded Parquet layout into DIR (replaced) and run from it: "
                        "each worker reads its own clients' rows, nothing is put (implies --no-probe)")
    p.add_argument("--buckets", type=int, default=64, help="buckets of --layout")
    return p.parse_args(argv)


def build_dataset(n_clients: int, rows_min: int, rows_max: int, items: int, seed: int):
    from fleetrec.datasets.federated import CategoricalField, DatasetSchema, FederatedDataset
    g = np.random.default_rng(seed)
    n = g.integers(rows_min, rows_max + 1, n_clients)
    total = int(n.sum())
    client = np.repeat(np.arange(n_clients, dtype=np.int64), n)
    starts = np.zeros(n_clients, np.int64)
    starts[1:] = np.cumsum(n)[:-1]
    pos = np.arange(total, dtype=np.int64) - np.repeat(starts, n)
    n_rep = np.repeat(n, n)
    split = np.where(pos == n_rep - 1, 2, np.where(pos == n_rep - 2, 1, 0)).astype(np.int8)
    del pos, n_rep
    item = g.integers(0, items, total)
    # a learnable signal: user taste (+-1) times item sign, plus noise
    taste = np.where(g.random(n_clients) < 0.5, -1.0, 1.0)[client]
    sign = np.where(np.arange(items) % 2 == 0, -1.0, 1.0)[item]
    p_click = 1.0 / (1.0 + np.exp(-(1.5 * taste * sign - 0.5)))
    click = (g.random(total) < p_click).astype(np.float32)
    del taste, sign, p_click
    schema = DatasetSchema(categorical=(CategoricalField("item_id", items),), numeric=(), tasks=("click",))
    return FederatedDataset.from_columns("scale", {"client": client, "split": split, "item_id": item,
                                                   "click": click}, schema, {}, n_clients)


def build_config(args, rounds: int):
    from fleetrec.simulator.config import from_dict
    return from_dict({
        "name": "bench_scale", "seed": args.seed, "rounds": rounds,
        "model": {"name": "per_user", "dim": args.dim, "hidden": [],
                  "freeze": ["item_emb"] if args.freeze_items else []},
        "algorithm": {"name": "fedavg"},
        "train": {"optimizer": "sgd", "lr": 0.1, "batch_size": args.batch_size, "local_epochs": 1},
        "federation": {"clients_per_round": args.clients_per_round, "cohort_size": args.cohort_size},
        "resources": {"workers": args.workers, "cpus_per_worker": args.cpus_per_worker},
        "eval": {"every": rounds + 1, "clients": args.eval_clients, "pooled_auc": args.pooled_auc},
        "tracking": {"mlflow": False, "progress": False},
    }, "benchmarks/scale.py")



def make_probe():
    import ray

    @ray.remote(num_cpus=0)
    class Probe:
        """Does what a Worker does at start, reading RssAnon before and after the personal init."""

        def measure(self, dataset, cfg, index: int, workers: int) -> dict:
            import ctypes
            import gc

            import torch

            from fleetrec.algorithms import make_algorithm
            from fleetrec.simulator.cohort import DataView
            from fleetrec.simulator.config import make_setup
            from fleetrec.simulator.placement import Placement
            from fleetrec.simulator.worker import build_personal
            torch.set_num_threads(1)
            setup = make_setup(cfg, dataset)
            algo = make_algorithm(cfg.algorithm, setup)
            view = DataView(dataset)
            gc.collect()
            libc = ctypes.CDLL("libc.so.6")
            libc.malloc_trim(0)                      # a tight baseline: no free heap pages left resident
            before = rss_anon(os.getpid())
            owned = Placement(setup.num_clients, workers).owned(index)
            t0 = time.perf_counter()
            personal = build_personal(algo, owned)          # what Worker.__init__ runs
            init_s = time.perf_counter() - t0
            gc.collect()
            after = rss_anon(os.getpid())
            libc.malloc_trim(0)
            after_trim = rss_anon(os.getpid())
            nbytes = sum(v.numel() * v.element_size() for v in personal.values())
            del view
            return {"pid": os.getpid(), "rss_anon_before_mb": before / 2 ** 20, "rss_anon_after_mb": after / 2 ** 20,
                    "growth_bytes": after - before, "rss_anon_after_trim_mb": after_trim / 2 ** 20,
                    "growth_after_trim_bytes": after_trim - before, "tensor_bytes": nbytes, "owned_clients": len(owned),
                    "init_seconds": init_s}

    return Probe


def _trim(_actor_self) -> int:
    """Runs inside a worker actor: give free heap memory back to the OS, return RssAnon."""
    import ctypes
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return rss_anon(os.getpid())


class Watch(WorkerWatch):
    """Also reads each worker's RssAnon right after start and after every round."""

    def __init__(self, mem, trim: bool = False):
        super().__init__(mem, None)
        self.trim = trim
        self.untrimmed_anon: list[int] = []
        self.start_anon: list[int] = []
        self.round_anon: list[list[int]] = []
        self.personal_bytes: list[int] = []

    def on_start(self, cfg, info):
        super().on_start(cfg, info)
        self.start_anon = [rss_anon(p) for p in self.worker_pids]
        if self.trim:
            import ray
            self.untrimmed_anon = self.start_anon
            ray.get([h.__ray_call__.remote(_trim) for h in info.get("worker_handles", [])])
            self.start_anon = [rss_anon(p) for p in self.worker_pids]
        self.personal_bytes = [int(w.get("personal_bytes", 0)) for w in info.get("workers", [])]

    def on_round(self, record):
        self.round_anon.append([rss_anon(p) for p in self.worker_pids])


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from fleetrec.simulator.run import run

    t_start = time.perf_counter()
    t0 = time.perf_counter()
    if args.data == "light":
        ds = build_dataset(args.clients, args.rows_min, args.rows_max, args.items, args.seed)
    else:
        from fleetrec.datasets.synthetic import SyntheticPerUserConfig
        ds = SyntheticPerUserConfig(num_clients=args.clients, num_items=args.items, rows_min=args.rows_min,
                                    rows_max=args.rows_max).build(args.seed)
    build_s = time.perf_counter() - t0
    rounds = WARMUP_ROUNDS + args.rounds
    cfg = build_config(args, rounds)

    started_ray = False
    if not ray.is_initialized():
        store = int(args.object_store_gb * 2 ** 30) if args.object_store_gb else None
        ray.init(num_cpus=args.num_cpus or os.cpu_count(), num_gpus=0, include_dashboard=False,
                 configure_logging=False, log_to_driver=True, object_store_memory=store)
        started_ray = True
    probes = []
    rows_total, train_rows = ds.num_rows, int(ds.rows_per_client(0).sum())
    layout_s = None
    t_put = time.perf_counter()
    if args.layout:            # written once, then read per worker: nothing goes through the object store
        from fleetrec.datasets.prepared import PreparedDataset
        from fleetrec.simulator.data_cli import write_layout
        write_layout(ds, Path(args.layout), args.buckets, cfg)      # with the reference values the run reports
        layout_s = time.perf_counter() - t_put
        ds_ref = PreparedDataset.open(args.layout)
        put_s = 0.0
    else:
        ds_ref = ray.put(ds)   # once: the probe and the run read the object store's copy
        put_s = time.perf_counter() - t_put
    del ds                     # the driver keeps no private copy
    try:
        if not args.no_probe and not args.layout:
            Probe = make_probe()
            for i in range(args.workers):
                p = Probe.remote()
                probes.append(ray.get(p.measure.remote(ds_ref, cfg, i, args.workers)))
                ray.kill(p)
        with MemSampler(args.mem_interval) as mem:
            watch = Watch(mem, args.trim_workers)
            t_run = time.perf_counter()
            result = run(cfg, callbacks=[watch], dataset=ds_ref)
            run_s = time.perf_counter() - t_run
    finally:
        if started_ray:
            ray.shutdown()

    recs = result.records
    secs, med, cohort = timed_rounds(recs, WARMUP_ROUNDS)
    raw = args.clients * args.dim * 4
    reported = sum(watch.personal_bytes)
    pers = {"raw_bytes": raw, "raw_mb": raw / 2 ** 20,
            "reported_bytes": reported, "reported_over_raw": reported / raw}
    if probes:
        growth = sum(p["growth_bytes"] for p in probes)
        pers["probe"] = probes
        pers["probe_growth_mb"] = growth / 2 ** 20
        pers["probe_growth_over_raw"] = growth / raw
        pers["probe_growth_after_trim_over_raw"] = sum(p["growth_after_trim_bytes"] for p in probes) / raw
        base = [p["rss_anon_before_mb"] * 2 ** 20 for p in probes]
        w_over = [a - b for a, b in zip(watch.start_anon, base)]
        pers["workers_rss_anon_at_start_mb"] = [a / 2 ** 20 for a in watch.start_anon]
        if watch.trim:
            pers["workers_trimmed_after_start"] = True
            pers["workers_rss_anon_at_start_before_trim_mb"] = [a / 2 ** 20 for a in watch.untrimmed_anon]
            pers["workers_minus_probe_base_before_trim_over_raw"] = sum(
                a - b for a, b in zip(watch.untrimmed_anon, base)) / raw
        pers["workers_rss_anon_after_rounds_mb"] = [[a / 2 ** 20 for a in r] for r in watch.round_anon]
        pers["workers_minus_probe_base_mb"] = sum(w_over) / 2 ** 20
        pers["workers_minus_probe_base_over_raw"] = sum(w_over) / raw
        pers["note"] = ("probe_growth: RssAnon growth of the worker's personal-state init loop run in a "
                        "probe actor (from a malloc_trim'ed baseline; _after_trim: after a second malloc_trim); "
                        "workers_minus_probe_base: workers' RssAnon right after start minus the probe's "
                        "baseline RssAnon (same algorithm + DataView, no personal state)")
    final = recs[-1]
    out = {
        "benchmark": "fleetrec_scale",
        "clients": args.clients, "clients_per_round": args.clients_per_round,
        "seconds_per_round": med, "client_updates_per_s": cohort / med,
        "timed_round_s": secs, "warmup_round_s": [float(r["train_seconds"]) for r in recs[:WARMUP_ROUNDS]],
        "peak_rss_mb": mem.peak_rss / 2 ** 20, "peak_pss_mb": mem.peak_pss / 2 ** 20,
        "memory_processes_at_peak": mem.peak_procs,
        "dataset_build_seconds": build_s,
        "put_seconds": put_s,
        "layout_write_seconds": layout_s,
        "startup_seconds": result.info.get("startup_seconds"),
        "final_eval_seconds": final.get("eval_seconds"),
        "val_auc": final.get("val/auc"), "test_auc": final.get("test/auc"),
        "eval_clients": final.get("val/clients"),
        "train_loss": [r.get("train/train_loss") for r in recs],
        "personal_state": pers,
        "run_seconds": run_s, "total_seconds": time.perf_counter() - t_start,
        "config": {"clients": args.clients, "trim_workers": args.trim_workers, "rows": [args.rows_min, args.rows_max], "rows_total": rows_total, "data": args.data, "pooled_auc": args.pooled_auc,
                   "object_store_gb": args.object_store_gb, "layout": bool(args.layout), "buckets": args.buckets,
                   "train_rows": train_rows, "items": args.items, "dim": args.dim,
                   "freeze_items": args.freeze_items, "workers": args.workers,
                   "cpus_per_worker": args.cpus_per_worker, "cohort_size": args.cohort_size,
                   "eval_clients": args.eval_clients, "warmup_rounds": WARMUP_ROUNDS, "timed_rounds": args.rounds,
                   "batch_size": args.batch_size, "seed": args.seed, "ray_started_here": started_ray},
        "versions": _versions(), "machine": _machine(),
    }
    return emit_json(out, args.json_out)


if __name__ == "__main__":
    main()
