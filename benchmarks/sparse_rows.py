"""Dense versus per-client row subsets of the shared item table, one FedAvg cohort, in-process.

Builds the MovieLens-100k FedAvg experiment (configs/fedavg_movielens.yaml, read from the
shared data folder), takes a cohort of --clients clients and times `FedAvg.train_cohort` with
`algorithm.sparse_rows` true and false, alternating, --repeats times each (weight decay 0, the
condition under which the row-subset path is used and exact). Prints one JSON line with the
fastest time of each and their ratio.

    python benchmarks/sparse_rows.py
    python benchmarks/sparse_rows.py --clients 200 --threads 2
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import _machine, _versions, emit_json  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "configs" / "fedavg_movielens.yaml"))
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json-out", default=None)
    a = p.parse_args(argv)
    from fleetrec.algorithms import make_algorithm
    from fleetrec.simulator.cohort import DataView
    from fleetrec.simulator.config import load, make_setup
    torch.set_num_threads(a.threads)
    algos = {}
    for sparse in (True, False):
        cfg = load(a.config, ["train.weight_decay=0", f"algorithm.sparse_rows={str(sparse).lower()}"])
        ds = cfg.data.build(cfg.seed)
        algos[sparse] = make_algorithm(cfg.algorithm, make_setup(cfg, ds))
    view = DataView(ds)
    step = max(1, ds.num_clients // a.clients)
    clients = np.arange(0, ds.num_clients, step)[:a.clients]
    times: dict[bool, list[float]] = {True: [], False: []}
    for rep in range(a.repeats):
        batch = view.batch(clients, 0, epochs=cfg.train.local_epochs, seed=cfg.seed, rnd=rep)
        for sparse, algo in algos.items():
            state = algo.init_server()
            plan = algo.configure_train(rep, state, torch.from_numpy(clients))
            personal = algo.init_personal(torch.from_numpy(clients))
            t0 = time.perf_counter()
            algo.train_cohort(plan, batch, personal)
            times[sparse].append(time.perf_counter() - t0)
    out = {"benchmark": "sparse_rows", "config": Path(a.config).name, "clients": len(clients),
           "max_rows_per_client": int(batch.n_rows.max()), "threads": a.threads, "repeats": a.repeats,
           "row_subset_seconds": min(times[True]), "dense_seconds": min(times[False]),
           "speedup": min(times[False]) / min(times[True]), "versions": _versions(), "machine": _machine()}
    return emit_json(out, a.json_out)


if __name__ == "__main__":
    main()
