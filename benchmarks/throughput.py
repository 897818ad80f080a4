"""fleetrec throughput on the reference per-user workload (shared/bench/workload.py).

Generates (or reuses from a cache) the seeded reference workload, converts it to a
`FederatedDataset` plus a backbone `.npz` for the `adapter` model, runs fleetrec's FedAvg on it
with `fleetrec.simulator.run.run`, and prints ONE JSON line as the last line of output:

    client_updates_per_s  clients per round / median train_seconds of the timed rounds
    seconds_per_round     median train_seconds of the timed rounds (warm-up round excluded)
    peak_rss_mb           peak of the summed RSS of the driver and every descendant process
                          (Ray GCS, raylet, coordinator and worker actors, idle Ray workers),
                          sampled every --mem-interval seconds during the run
    peak_pss_mb           the same sum with PSS (shared pages such as torch's libraries and the
                          object store split between the processes mapping them; Linux only)

`train_seconds` is measured by the coordinator around one round: cohort sampling, sending the
plan, every worker's local training, merging the accumulators and FedAvg. Evaluation is not
part of it (the dataset has no validation/test rows, so the evaluation run() does after the
last round is near free and reported apart as `final_eval_seconds`).

    python benchmarks/throughput.py                       # the reference size: U=5000, K=1000, 1+3 rounds
    python benchmarks/throughput.py --users 60 --clients-per-round 20 --rounds 1 --workers 1
    python benchmarks/throughput.py --check               # also compare with a var_d-style reference loop

Environment knobs as in the reference scripts: BENCH_U, BENCH_K, BENCH_ROUNDS, BENCH_SEED
(CLI flags win). FLEETREC_BENCH_DIR points at the reference bench folder (default: ../shared/bench
next to the repository).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "benchmarks" / "out"
DEFAULT_BENCH_DIR = REPO.parent / "shared" / "bench"
WARMUP_ROUNDS = 1


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=_env_int("BENCH_U", 5000), help="pool of clients (BENCH_U)")
    p.add_argument("--clients-per-round", type=int, default=_env_int("BENCH_K", 1000), help="K (BENCH_K)")
    p.add_argument("--rounds", type=int, default=_env_int("BENCH_ROUNDS", 3),
                   help="timed rounds, after 1 warm-up round (BENCH_ROUNDS)")
    p.add_argument("--seed", type=int, default=_env_int("BENCH_SEED", 1234), help="workload and run seed (BENCH_SEED)")
    p.add_argument("--workers", type=int, default=2, help="fleetrec worker actors")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--gpus-per-worker", type=float, default=0.0)
    p.add_argument("--cohort-size", type=int, default=256, help="clients a worker trains in one vectorized call")
    p.add_argument("--num-cpus", type=int, default=None,
                   help="CPUs given to ray.init (default: the machine's); ignored when Ray is already up")
    p.add_argument("--bench-dir", default=os.environ.get("FLEETREC_BENCH_DIR", str(DEFAULT_BENCH_DIR)),
                   help="folder holding the reference workload.py")
    p.add_argument("--cache-dir", default=str(OUT / "workload"), help="where the generated workload is cached")
    p.add_argument("--pretrain-users", type=int, default=None,
                   help="users of the central pre-training (reference: 2000); smaller only for smoke tests")
    p.add_argument("--mem-interval", type=float, default=0.2, help="seconds between memory samples")
    p.add_argument("--profile-worker", default=None, metavar="PATH",
                   help="attach `py-spy record` to worker 0 for the whole run; raw collapsed stacks to PATH")
    p.add_argument("--check", action="store_true",
                   help="rerun the same cohorts and minibatch orders with a var_d-style torch.func loop "
                        "in the driver and report the adapter difference and per-round losses")
    p.add_argument("--json-out", default=None, help="also write the JSON result to this file")
    return p.parse_args(argv)


# --------------------------------------------------------------------------------- workload
def load_workload(bench_dir: str, cache_dir: str, users: int, clients_per_round: int, rounds: int, seed: int,
                  pretrain_users: int | None = None):
    """Import the reference workload.py, point its data/out folders at `cache_dir`, prepare it."""
    bench_dir = str(Path(bench_dir).resolve())
    if not (Path(bench_dir) / "workload.py").exists():
        raise SystemExit(f"workload.py not found in {bench_dir} (set --bench-dir or FLEETREC_BENCH_DIR)")
    if bench_dir not in sys.path:
        sys.path.insert(0, bench_dir)
    W = importlib.import_module("workload")
    ref_pretrain = W.__dict__.setdefault("_reference_pretrain_users", W.CFG["pretrain_users"])
    W.CFG["pretrain_users"] = pretrain_users or ref_pretrain
    if W.CFG["pretrain_users"] != ref_pretrain:          # not in the file name: keep apart
        cache_dir = str(Path(cache_dir) / f"pretrain{pretrain_users}")
    W.DATA_DIR = Path(cache_dir)
    W.OUT_DIR = Path(cache_dir) / "out"            # never write next to the reference scripts
    W.CFG.update(num_users=users, clients_per_round=clients_per_round, timed_rounds=rounds, seed=seed,
                 warmup_rounds=WARMUP_ROUNDS)
    t0 = time.perf_counter()
    path = W.prepare()
    wl = W.Workload(path)
    return W, wl, time.perf_counter() - t0


def to_dataset(W, wl):
    """One row per interaction: client = user, split 0, item_id (vocab = items), task `click`."""
    from fleetrec.datasets.federated import CategoricalField, DatasetSchema, FederatedDataset
    n = np.diff(wl.offsets)
    schema = DatasetSchema(categorical=(CategoricalField("item_id", W.CFG["num_items"]),),
                           numeric=(), tasks=("click",))
    # All interactions are training rows (no validation / test rows: evaluation is empty).
    columns = {"client": np.repeat(np.arange(wl.num_users, dtype=np.int64), n),
               "split": np.zeros(len(wl.items), dtype=np.int8),
               "item_id": wl.items.astype(np.int64), "click": wl.labels.astype(np.float32)}
    return FederatedDataset.from_columns("bench_workload", columns, schema, {}, wl.num_users,
                                         meta={"workload": {k: W.CFG[k] for k in ("num_users", "num_items", "seed")}})


def write_backbone(wl, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, item_emb=wl.item_emb.numpy(), w1=wl.w1.numpy(), b1=wl.b1.numpy(), w2=wl.w2.numpy(),
             b2=wl.b2.numpy(), lora_a0=wl.lora_a0.numpy(), user_emb0=np.asarray(wl.user_emb0))
    return path


def build_config(args, W, backbone: Path):
    from fleetrec.simulator.config import from_dict
    total = WARMUP_ROUNDS + args.rounds
    return from_dict({
        "name": "bench_throughput", "seed": args.seed, "rounds": total,
        "model": {"name": "adapter", "backbone": str(backbone), "item_field": "item_id", "rank": W.CFG["rank"]},
        "algorithm": {"name": "fedavg"},
        "train": {"optimizer": "sgd", "lr": W.CFG["lr"], "batch_size": W.CFG["batch_size"],
                  "local_epochs": W.CFG["local_epochs"]},
        "federation": {"clients_per_round": args.clients_per_round, "cohort_size": args.cohort_size},
        "resources": {"workers": args.workers, "cpus_per_worker": args.cpus_per_worker,
                      "gpus_per_worker": args.gpus_per_worker},
        # run() always evaluates after the last round; the dataset has no val/test rows
        "eval": {"every": total},
        "tracking": {"mlflow": False, "progress": False},
    }, "benchmarks/throughput.py")


# --------------------------------------------------------------------------------- memory
def _proc_children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    s = f.read()
                kids.setdefault(int(s[s.rindex(")") + 2:].split()[1]), []).append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    return kids


def _rss_pss_bytes(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process from /proc/PID/smaps_rollup (0, 0 when it is gone)."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1]) * 1024
    except OSError:
        pass
    return rss, pss


def tree_pids() -> set[int]:
    """This process and all its descendants (from /proc)."""
    kids, out, stack = _proc_children(), set(), [os.getpid()]
    while stack:
        p = stack.pop()
        if p not in out:
            out.add(p)
            stack.extend(kids.get(p, []))
    return out


def timed_rounds(records: list[dict], warmup: int) -> tuple[list[float], float, int]:
    """(train_seconds of the rounds after `warmup`, their median, the cohort size)."""
    timed = records[warmup:] or records
    secs = [float(r["train_seconds"]) for r in timed]
    return secs, statistics.median(secs), int(timed[0]["cohort"])


class MemSampler:
    """Samples the summed RSS/PSS of this process and all its descendants (Ray's GCS, raylet,
    coordinator and worker actors when this driver started Ray) plus any extra pids, in a
    background thread. Reads /proc directly on Linux; elsewhere uses psutil (RSS only)."""

    def __init__(self, interval: float):
        self.interval = interval
        self.extra: set[int] = set()
        self.peak_rss = self.peak_pss = 0
        self.peak_procs = 0
        self.samples = 0
        self._proc = os.path.exists("/proc/self/smaps_rollup")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _pids(self) -> set[int]:
        if self._proc:
            return tree_pids() | self.extra
        import psutil
        me = psutil.Process()
        return {me.pid, *(c.pid for c in me.children(recursive=True))} | self.extra

    def sample(self) -> None:
        pids = self._pids()
        if self._proc:
            rss = pss = 0
            for pid in pids:
                r, p = _rss_pss_bytes(pid)
                rss, pss = rss + r, pss + p
        else:
            import psutil
            rss, pss = 0, 0
            for pid in pids:
                try:
                    rss += psutil.Process(pid).memory_info().rss
                except psutil.Error:
                    pass
        self.samples += 1
        if rss > self.peak_rss:
            self.peak_rss, self.peak_procs = rss, len(pids)
        self.peak_pss = max(self.peak_pss, pss)

    def _loop(self):
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.sample()


# --------------------------------------------------------------------------------- callbacks
class WorkerWatch:
    """run() callback: adds the worker actors' pids to the memory sampler (they are not
    descendants of this process when Ray was started elsewhere) and optionally attaches
    `py-spy record` to worker 0 from the start of round 0 to the end of the run."""

    def __init__(self, mem: MemSampler, pyspy_out: str | None):
        self.mem, self.pyspy_out, self.proc, self.worker_pids = mem, pyspy_out, None, []

    def on_start(self, cfg, info):
        self.worker_pids = [int(w["pid"]) for w in info.get("workers", []) if "pid" in w]
        self.mem.extra.update(self.worker_pids)
        if self.pyspy_out and self.worker_pids:
            import subprocess
            Path(self.pyspy_out).parent.mkdir(parents=True, exist_ok=True)
            self.proc = subprocess.Popen(["py-spy", "record", "--pid", str(self.worker_pids[0]), "--rate", "200",
                                          "--format", "raw", "--output", self.pyspy_out, "--nonblocking"],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def on_round(self, record):
        return None

    def on_end(self, result):
        self.stop()

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            import signal
            self.proc.send_signal(signal.SIGINT)       # py-spy writes its output on SIGINT
            try:
                self.proc.wait(timeout=30)
            except Exception:
                self.proc.kill()
        self.proc = None


# --------------------------------------------------------------------------------- check
def reference_check(W, wl, ds, cfg, records) -> dict:
    """Rerun fleetrec's cohorts with fleetrec's minibatch orders through a var_d-style loop
    (functional_call + vmap + grad_and_value on workload.RecAdapterModel, float32 FedAvg).

    Same arithmetic, independent code: the final adapter should agree to ~1e-6 and the
    per-round train losses to ~1e-6 (the accumulation orders differ slightly)."""
    import torch
    import torch.nn.functional as F
    from torch.func import functional_call, grad_and_value, vmap

    from fleetrec.simulator.cohort import DataView
    from fleetrec.simulator.coordinator import sample_cohort

    t0 = time.perf_counter()
    view = DataView(ds)
    bs, lr = cfg.train.batch_size, cfg.train.lr
    model = W.RecAdapterModel(wl)
    user_table = torch.from_numpy(np.asarray(wl.user_emb0).copy())
    lora_a, lora_b = wl.lora_a0.clone(), wl.lora_b0.clone()

    def loss_fn(params, iv, y, m):
        logits = functional_call(model, params, (iv,))
        per_ex = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
        return (per_ex * m).sum() / torch.clamp(m.sum(), min=1.0)

    step_fn = vmap(grad_and_value(loss_fn))
    losses = []
    for rnd in range(cfg.rounds):
        users = sample_cohort(cfg.seed, rnd, ds.num_clients, cfg.federation.clients_per_round)
        b = view.batch(users, 0, epochs=1, seed=cfg.seed, rnd=rnd)
        order = b.order[0]                                                   # (K, L) real rows first
        items = b.categorical["item_id"].gather(1, order)
        y_all = b.labels[..., 0].gather(1, order)
        m_all = b.mask.gather(1, order)
        K, L = items.shape
        S = -(-L // bs)
        pad = S * bs - L
        if pad:
            items = F.pad(items, (0, pad))
            y_all, m_all = F.pad(y_all, (0, pad)), F.pad(m_all, (0, pad))
        iv = wl.item_emb[items].view(K, S, bs, -1)
        y, m = y_all.view(K, S, bs), m_all.view(K, S, bs)
        uidx = torch.from_numpy(users)
        params = {"user_emb": user_table[uidx].clone(),
                  "lora_a": lora_a.expand(K, *lora_a.shape).clone(),
                  "lora_b": lora_b.expand(K, *lora_b.shape).clone()}
        loss_sum, steps = torch.zeros(K), torch.zeros(K)
        for s in range(S):
            g, loss = step_fn(params, iv[:, s], y[:, s], m[:, s])
            params = {k: params[k] - lr * g[k] for k in params}
            active = (m[:, s].sum(1) > 0).float()
            loss_sum += loss * active
            steps += active
        user_table[uidx] = params["user_emb"]
        w = b.n_rows.float()
        N = float(w.sum())
        lora_a = (w[:, None, None] * params["lora_a"]).sum(0) / N
        lora_b = (w[:, None, None] * params["lora_b"]).sum(0) / N
        losses.append(float((w * loss_sum / steps.clamp(min=1)).sum() / N))
    return {"reference_loop": "var_d-style vmap loop, fleetrec's cohorts and minibatch orders",
            "reference_train_loss": losses,
            "reference_seconds": time.perf_counter() - t0,
            "fleetrec_train_loss": [r.get("train/train_loss") for r in records],
            "lora_a": lora_a, "lora_b": lora_b}


# --------------------------------------------------------------------------------- main
def rss_anon(pid: int) -> int:
    """Private anonymous resident bytes of a process (/proc/PID/status RssAnon)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def emit_json(out: dict, json_out: str | None) -> dict:
    """Print the result as one JSON line (the last output) and optionally write it to a file."""
    line = json.dumps(out)
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(line + "\n")
    print(line, flush=True)
    return out


def _versions() -> dict:
    import ray
    import torch
    v = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
         "ray": ray.__version__}
    try:
        from importlib.metadata import version
        v["fleetrec"] = version("fleetrec")
    except Exception:
        pass
    return v


def _machine() -> dict:
    import torch
    m = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor(),
         "driver_torch_threads": torch.get_num_threads()}
    try:
        m["load_avg_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    try:
        m["memory_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    if torch.cuda.is_available():
        m["gpu"] = torch.cuda.get_device_name(0)
    return m


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    import torch

    from fleetrec.simulator.run import run

    t_start = time.perf_counter()
    W, wl, prep_s = load_workload(args.bench_dir, args.cache_dir, args.users, args.clients_per_round,
                                  args.rounds, args.seed, args.pretrain_users)
    t0 = time.perf_counter()
    ds = to_dataset(W, wl)
    backbone = write_backbone(wl, Path(args.cache_dir) /
                              f"backbone_U{args.users}_I{W.CFG['num_items']}_s{args.seed}.npz")
    convert_s = time.perf_counter() - t0
    cfg = build_config(args, W, backbone)

    started_ray = False
    if not ray.is_initialized():
        ray.init(num_cpus=args.num_cpus or os.cpu_count(), num_gpus=None if args.gpus_per_worker else 0,
                 include_dashboard=False, configure_logging=False, log_to_driver=True)
        started_ray = True
    try:
        with MemSampler(args.mem_interval) as mem:
            watch = WorkerWatch(mem, args.profile_worker)
            t_run = time.perf_counter()
            try:
                result = run(cfg, callbacks=[watch], dataset=ds)
            finally:
                watch.stop()
            run_s = time.perf_counter() - t_run
    finally:
        if started_ray:
            ray.shutdown()

    recs = result.records
    secs, med, cohort = timed_rounds(recs, WARMUP_ROUNDS)
    out = {
        "benchmark": "fleetrec_throughput",
        "client_updates_per_s": cohort / med,
        "seconds_per_round": med,
        "timed_round_s": secs,
        "warmup_round_s": [float(r["train_seconds"]) for r in recs[:WARMUP_ROUNDS]],
        "round_client_updates_per_s": [float(r["client_updates_per_s"]) for r in recs],
        "peak_rss_mb": mem.peak_rss / 2 ** 20,
        "peak_pss_mb": mem.peak_pss / 2 ** 20,
        "memory_note": "sum over the driver and all its descendant processes (Ray GCS, raylet, "
                       "coordinator, workers, idle Ray workers), peak over samples during run(); "
                       "RSS counts shared pages once per process, PSS splits them",
        "memory_processes_at_peak": mem.peak_procs,
        "memory_samples": mem.samples,
        "train_loss": [r.get("train/train_loss") for r in recs],
        "final_eval_seconds": recs[-1].get("eval_seconds"),
        "startup_seconds": result.info.get("startup_seconds"),
        "run_seconds": run_s,
        "workload_prepare_seconds": prep_s,
        "dataset_convert_seconds": convert_s,
        "total_seconds": time.perf_counter() - t_start,
        "config": {"users": args.users, "num_items": W.CFG["num_items"], "clients_per_round": args.clients_per_round,
                   "cohort": cohort, "warmup_rounds": WARMUP_ROUNDS, "timed_rounds": args.rounds,
                   "seed": args.seed, "pretrain_users": W.CFG["pretrain_users"], "workers": args.workers, "cpus_per_worker": args.cpus_per_worker,
                   "gpus_per_worker": args.gpus_per_worker, "cohort_size": args.cohort_size,
                   "batch_size": cfg.train.batch_size, "lr": cfg.train.lr, "local_epochs": cfg.train.local_epochs,
                   "examples": int(ds.rows_per_client(0).sum()), "ray_started_here": started_ray},
        "worker_devices": [w.get("device") for w in result.info.get("workers", [])],
        "worker_pids": watch.worker_pids,
        "versions": _versions(),
        "machine": _machine(),
    }
    if args.check:
        ref = reference_check(W, wl, ds, cfg, recs)
        st = result.server_state
        da = float((st["lora_a"].float() - ref.pop("lora_a")).abs().max())
        db = float((st["lora_b"].float() - ref.pop("lora_b")).abs().max())
        ref.update(max_abs_diff_lora_a=da, max_abs_diff_lora_b=db,
                   adapter_norm=float(torch.cat([st["lora_a"].flatten(), st["lora_b"].flatten()]).norm()))
        out["check"] = ref
    return emit_json(out, args.json_out)


if __name__ == "__main__":
    main()
