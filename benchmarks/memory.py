"""Is fleetrec's memory flat over a long run? 500 rounds on small synthetic data.

Runs the quickstart experiment (configs/quickstart.yaml: synthetic per-user data, 1,000 clients,
`per_user` model, FedAvg) for `--rounds` rounds of `--clients-per-round` clients, evaluating every
`--eval-every` rounds, with MLflow, progress bar and checkpoints off. Every `--sample-every`
rounds (from a run() callback, between rounds) it records:

    rss_mb, pss_mb          summed RSS / PSS (/proc/PID/smaps_rollup) of the driver and all its
                            descendants (Ray GCS, raylet, coordinator, workers, idle Ray workers)
    by_role_pss_mb          the same PSS split by process role (driver, coordinator, worker,
                            raylet, gcs, other), from /proc/PID/cmdline
    worker_rss_anon_mb      private anonymous memory of each worker actor (/proc/PID/status)
    coordinator_rss_anon_mb the same for the coordinator actor
    object_store_mb, object_store_objects
                            the raylet's plasma store stats (bytes used, local objects) from
                            `ray._private.internal_api.get_memory_info_reply`, the numbers
                            `ray memory --stats-only` prints

and prints ONE JSON line as the last line of output with the series and, for each quantity, the
slope in MB per 100 rounds of a least-squares line over the second half of the samples (the
first half includes warm-up: allocator pools, lazily imported modules, idle Ray workers).

    python benchmarks/memory.py                                  # 500 rounds, K=200, eval every 50
    python benchmarks/memory.py --rounds 100 --sample-every 5    # quicker
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import _machine, _rss_pss_bytes, _versions, emit_json, rss_anon, tree_pids  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "quickstart.yaml"))
    p.add_argument("--rounds", type=int, default=500)
    p.add_argument("--clients-per-round", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--sample-every", type=int, default=10, help="rounds between memory samples")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--num-cpus", type=int, default=None)
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config overrides (repeatable)")
    p.add_argument("--json-out", default=None)
    return p.parse_args(argv)



def _role(pid: int) -> str:
    if pid == os.getpid():
        return "driver"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "gone"
    if "ray::Coordinator" in cmd:
        return "coordinator"
    if "ray::Worker" in cmd:
        return "worker"
    if "raylet" in cmd.split(" ")[0]:
        return "raylet"
    if "gcs_server" in cmd:
        return "gcs"
    return "other"


class ObjectStore:
    """Plasma store stats of the local raylet (what `ray memory --stats-only` reports)."""

    def __init__(self):
        self.state, self.error = None, None

    def stats(self) -> tuple[float | None, int | None]:
        try:
            import ray
            from ray._private import internal_api
            if self.state is None:
                self.state = internal_api.get_state_from_address(ray.get_runtime_context().gcs_address)
            s = internal_api.get_memory_info_reply(self.state).store_stats
            return s.object_store_bytes_used / 2 ** 20, int(s.num_local_objects)
        except Exception as e:                       # private API: keep the run going without it
            self.error = repr(e)
            return None, None


class Sampler:
    """run() callback: one memory sample every `every` rounds (and before round 0)."""

    def __init__(self, every: int, extra_pids: set[int] | None = None):
        self.every, self.samples, self.store = every, [], ObjectStore()
        self.worker_pids: list[int] = []
        self.t0 = time.perf_counter()

    def sample(self, rnd: int) -> None:
        pids = tree_pids() | set(self.worker_pids)
        rss = pss = 0
        by_role: dict[str, float] = {}
        coord_anon = 0
        for pid in pids:
            r, p = _rss_pss_bytes(pid)
            rss, pss = rss + r, pss + p
            role = _role(pid)
            by_role[role] = by_role.get(role, 0.0) + p / 2 ** 20
            if role == "coordinator":
                coord_anon += rss_anon(pid)
        store_mb, store_n = self.store.stats()
        self.samples.append({
            "round": rnd, "t": time.perf_counter() - self.t0, "rss_mb": rss / 2 ** 20, "pss_mb": pss / 2 ** 20,
            "processes": len(pids), "by_role_pss_mb": by_role,
            "worker_rss_anon_mb": [rss_anon(p) / 2 ** 20 for p in self.worker_pids],
            "coordinator_rss_anon_mb": coord_anon / 2 ** 20,
            "object_store_mb": store_mb, "object_store_objects": store_n})

    def on_start(self, cfg, info):
        self.worker_pids = [int(w["pid"]) for w in info.get("workers", []) if "pid" in w]
        self.sample(-1)

    def on_round(self, record):
        r = int(record["round"])
        if (r + 1) % self.every == 0:
            self.sample(r)

    def on_end(self, result):
        pass

    def on_abort(self, error):
        pass

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def slope_per_100(xs, ys) -> float | None:
    pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
    if len(pts) < 3:
        return None
    x, y = np.array(pts, dtype=float).T
    return float(np.polyfit(x, y, 1)[0] * 100)


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from fleetrec.simulator.config import load
    from fleetrec.simulator.run import federated_dataset
    from fleetrec.simulator.run import run

    cfg = load(args.config, [f"rounds={args.rounds}", f"federation.clients_per_round={args.clients_per_round}",
                             f"eval.every={args.eval_every}", f"resources.workers={args.workers}",
                             f"resources.cpus_per_worker={args.cpus_per_worker}",
                             "tracking.mlflow=false", "tracking.progress=false", *args.override])
    t0 = time.perf_counter()
    ds = federated_dataset(cfg)
    build_s = time.perf_counter() - t0
    started_ray = False
    if not ray.is_initialized():
        ray.init(num_cpus=args.num_cpus or os.cpu_count(), num_gpus=0, include_dashboard=False,
                 configure_logging=False, log_to_driver=True)
        started_ray = True
    sampler = Sampler(args.sample_every)
    try:
        t_run = time.perf_counter()
        result = run(cfg, callbacks=[sampler], dataset=ds)
        run_s = time.perf_counter() - t_run
    finally:
        if started_ray:
            ray.shutdown()

    s = sampler.samples
    half = [x for x in s if x["round"] >= args.rounds // 2]
    xs = [x["round"] for x in half]

    def series(key):
        return [x[key] for x in half]

    roles = sorted({r for x in s for r in x["by_role_pss_mb"]})
    slopes = {
        "pss_mb": slope_per_100(xs, series("pss_mb")),
        "rss_mb": slope_per_100(xs, series("rss_mb")),
        "object_store_mb": slope_per_100(xs, series("object_store_mb")),
        "object_store_objects": slope_per_100(xs, series("object_store_objects")),
        "coordinator_rss_anon_mb": slope_per_100(xs, series("coordinator_rss_anon_mb")),
        "worker_rss_anon_mb": [slope_per_100(xs, [x["worker_rss_anon_mb"][i] for x in half])
                               for i in range(len(sampler.worker_pids))],
        "by_role_pss_mb": {r: slope_per_100(xs, [x["by_role_pss_mb"].get(r, 0.0) for x in half]) for r in roles},
    }
    recs = result.records
    train_s = [float(r["train_seconds"]) for r in recs]
    out = {
        "benchmark": "fleetrec_memory",
        "rounds": len(recs), "clients_per_round": args.clients_per_round, "eval_every": args.eval_every,
        "slope_mb_per_100_rounds": slopes,
        "slope_window_rounds": [xs[0], xs[-1]] if xs else None,
        "first": s[0] if s else None, "last": s[-1] if s else None,
        "peak_pss_mb": max(x["pss_mb"] for x in s), "peak_rss_mb": max(x["rss_mb"] for x in s),
        "series": {"round": [x["round"] for x in s], "pss_mb": [round(x["pss_mb"], 1) for x in s],
                   "rss_mb": [round(x["rss_mb"], 1) for x in s],
                   "object_store_mb": [x["object_store_mb"] for x in s],
                   "object_store_objects": [x["object_store_objects"] for x in s],
                   "coordinator_rss_anon_mb": [round(x["coordinator_rss_anon_mb"], 1) for x in s],
                   "worker_rss_anon_mb": [[round(v, 1) for v in x["worker_rss_anon_mb"]] for x in s],
                   "processes": [x["processes"] for x in s]},
        "object_store_error": sampler.store.error,
        "median_train_seconds": float(np.median(train_s)), "run_seconds": run_s,
        "dataset_build_seconds": build_s, "startup_seconds": result.info.get("startup_seconds"),
        "final_test_auc": result.final.get("test/auc"),
        "config": {"config": args.config, "num_clients": ds.num_clients, "rows": ds.num_rows,
                   "workers": args.workers, "cpus_per_worker": args.cpus_per_worker,
                   "sample_every": args.sample_every, "overrides": args.override,
                   "checkpoint_every": cfg.checkpoint.every, "ray_started_here": started_ray},
        "versions": _versions(), "machine": _machine(),
    }
    return emit_json(out, args.json_out)


if __name__ == "__main__":
    main()
