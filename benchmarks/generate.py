"""How fast the seeded generators build a federation, and at what peak memory.

Builds `synthetic_per_user` (users = clients) at the given size in this process, once per
`--repeats`, and prints ONE JSON line as the last line of output: build seconds per repeat (the
whole `FederatedDataset`, sorted, validated, offsets computed), rows, and the process's peak RSS
(`ru_maxrss`, which includes the finished dataset itself).

    python benchmarks/generate.py --clients 10000000 --rows-min 12 --rows-max 12   # 120M rows
    python benchmarks/generate.py --clients 1000000                                 # the default 40-120 rows
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import _machine, _versions, emit_json  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=1_000_000)
    p.add_argument("--rows-min", type=int, default=40)
    p.add_argument("--rows-max", type=int, default=120)
    p.add_argument("--items", type=int, default=200)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    from fleetrec.datasets.synthetic import SyntheticPerUserConfig
    cfg = SyntheticPerUserConfig(num_clients=args.clients, num_items=args.items, rows_min=args.rows_min,
                                 rows_max=args.rows_max)
    seconds, rows = [], 0
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        ds = cfg.build(args.seed)
        seconds.append(time.perf_counter() - t0)
        rows = ds.num_rows
        del ds
    out = {"benchmark": "fleetrec_generate", "generator": "synthetic_per_user", "clients": args.clients,
           "rows": rows, "rows_per_client": [args.rows_min, args.rows_max], "items": args.items,
           "build_seconds": seconds, "rows_per_s": rows / min(seconds),
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "seed": args.seed, "versions": _versions(), "machine": _machine()}
    return emit_json(out, args.json_out)


if __name__ == "__main__":
    main()
