"""Where a worker's time goes inside one round of the reference workload, in-process (no Ray).

Replays what `fleetrec.simulator.worker.Worker.train` does for worker 0 of --workers (its share of each
round's cohort, in chunks of --cohort-size) with --threads torch threads, and times the phases
by wrapping the engine's functions (nothing in the engine is modified):

    batch_gather    DataView.batch: row indices, minibatch-order keys + argsort, row gathers
    personal_io     gathering the cohort's personal state and scattering it back
    step_rows       per-step gather of the minibatch rows (vectorized._step_rows)
    vmap_grad       the vmapped forward (loss of every client) per step
    backward        torch.autograd.grad of the summed client losses per step
    optimizer       CohortOptimizer.step per step
    loop_other      the rest of train_cohort_sgd (loss bookkeeping, active mask)
    fold            train_cohort after local training (weighted fold into the accumulator, where)

Prints one JSON line with seconds per round (median over the timed rounds) for each phase.
`--cprofile PATH` also writes a cProfile dump of the timed rounds.

    python benchmarks/profile_cohort.py
    python benchmarks/profile_cohort.py --cprofile /tmp/prof.out && python -m pstats /tmp/prof.out
"""
from __future__ import annotations

import argparse
import cProfile
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, default=5000)
    p.add_argument("--clients-per-round", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (after 1 warm-up)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--workers", type=int, default=2, help="profile worker 0 of this many")
    p.add_argument("--cohort-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=1, help="torch threads (a worker uses floor(cpus_per_worker))")
    p.add_argument("--bench-dir", default=str(throughput.DEFAULT_BENCH_DIR))
    p.add_argument("--cache-dir", default=str(throughput.OUT / "workload"))
    p.add_argument("--cprofile", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)

    import fleetrec.algorithms.vectorized as vec
    from fleetrec.algorithms import make_algorithm
    from fleetrec.algorithms.protocol import Accumulator, Setup
    from fleetrec.simulator.cohort import DataView
    from fleetrec.simulator.coordinator import sample_cohort, split_by_owner
    from fleetrec.simulator.placement import Placement

    W, wl, _ = throughput.load_workload(a.bench_dir, a.cache_dir, a.users, a.clients_per_round, a.rounds, a.seed)
    ds = throughput.to_dataset(W, wl)
    backbone = throughput.write_backbone(wl, Path(a.cache_dir) / f"backbone_U{a.users}_I{W.CFG['num_items']}_s{a.seed}.npz")
    targs = throughput.parse_args(["--users", str(a.users), "--clients-per-round", str(a.clients_per_round),
                                   "--rounds", str(a.rounds), "--seed", str(a.seed), "--workers", str(a.workers),
                                   "--cohort-size", str(a.cohort_size)])
    cfg = throughput.build_config(targs, W, backbone)

    T = defaultdict(float)

    def timed(name, fn):
        def wrapper(*args, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                T[name] += time.perf_counter() - t0
        return wrapper

    orig_vmap, orig_opt = vec.vmap, vec.CohortOptimizer
    vec._step_rows = timed("step_rows", vec._step_rows)
    vec.vmap = lambda *x, **k: timed("vmap_grad", orig_vmap(*x, **k))
    torch.autograd.grad = timed("backward", torch.autograd.grad)   # this process only

    class TimedOpt(orig_opt):
        def step(self, *x, **k):
            return timed("optimizer", super().step)(*x, **k)
    vec.CohortOptimizer = TimedOpt
    vec.train_cohort_sgd = timed("train_cohort_sgd", vec.train_cohort_sgd)
    import fleetrec.algorithms.fedavg as fedavg
    fedavg.train_cohort_sgd = vec.train_cohort_sgd

    setup = Setup(schema=ds.schema, num_clients=ds.num_clients, seed=cfg.seed, train=cfg.train, model=cfg.model)
    server = make_algorithm(cfg.algorithm, setup)
    algo = make_algorithm(cfg.algorithm, setup)
    state = server.init_server()
    view = DataView(ds)
    personal = algo.init_personal(torch.from_numpy(Placement(ds.num_clients, a.workers).owned(0)))

    rounds, prof = [], cProfile.Profile() if a.cprofile else None
    for rnd in range(1 + a.rounds):
        T.clear()
        if prof and rnd == 1:
            prof.enable()
        t_round = time.perf_counter()
        cohort = sample_cohort(cfg.seed, rnd, ds.num_clients, cfg.federation.clients_per_round)
        plan = server.configure_train(rnd, state, torch.from_numpy(cohort))
        mine = np.sort(split_by_owner(cohort, a.workers)[0])
        acc = Accumulator()
        for s in range(0, len(mine), a.cohort_size):
            ids = mine[s:s + a.cohort_size]
            slots = torch.from_numpy(ids // a.workers)
            t0 = time.perf_counter()
            batch = view.batch(ids, 0, epochs=cfg.train.local_epochs, seed=cfg.seed, rnd=rnd)
            T["batch_gather"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            pers = {k: v[slots] for k, v in personal.items()}
            T["personal_io"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            update = algo.train_cohort(plan, batch, pers)
            T["train_cohort"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            for k, v in update.personal.items():
                personal[k][slots] = v
            T["personal_io"] += time.perf_counter() - t0
            acc.merge(update.acc)
        T["worker_total"] = time.perf_counter() - t_round
        # the other workers' shares are not trained here: aggregate worker 0's part only
        state, _ = server.aggregate_train(rnd, state, acc)
        if prof and rnd == a.rounds:
            prof.disable()
        T["loop_other"] = (T["train_cohort_sgd"] - T["step_rows"] - T["vmap_grad"] - T["backward"]
                           - T["optimizer"])
        T["fold"] = T["train_cohort"] - T["train_cohort_sgd"]
        rounds.append(dict(T, clients=len(mine)))
    if prof:
        prof.dump_stats(a.cprofile)
    timed_rounds = rounds[1:] or rounds
    keys = ["batch_gather", "personal_io", "step_rows", "vmap_grad", "backward", "optimizer", "loop_other", "fold",
            "train_cohort", "worker_total"]
    med = {k: statistics.median(r.get(k, 0.0) for r in timed_rounds) for k in keys}
    out = {"benchmark": "fleetrec_profile_cohort", "seconds_per_round_median": med,
           "share_of_worker_total": {k: med[k] / med["worker_total"] for k in keys[:7]},
           "warmup_round": {k: rounds[0].get(k, 0.0) for k in keys},
           "clients_on_worker0": [r["clients"] for r in rounds],
           "minibatch_steps": int(np.ceil(np.diff(wl.offsets).max() / cfg.train.batch_size)),
           "config": vars(a), "torch_threads": torch.get_num_threads()}
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
