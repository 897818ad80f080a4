"""`fleetrec data describe|prepare NAME-OR-CONFIG [key=value ...]`: summarize or pre-build a data source.

NAME-OR-CONFIG is a registered source name (`epinions`, `movielens_100k`, ...) whose options are given
as key=value pairs (values parsed as YAML scalars/lists), or a path to an experiment YAML whose `data:`
block is used (key=value pairs are then experiment overrides, e.g. `data.max_clients=100`).
`prepare` builds the dataset (filling the Parquet cache of real sources) and prints the build time;
`describe` also prints the summary of `describe(ds)`.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from datasets.federated import SPLIT_NAMES, TEST, TRAIN, VAL, FederatedDataset

USAGE = ("usage: fleetrec data describe|prepare NAME-OR-CONFIG [key=value ...] [--seed N]\n"
         "  NAME: a data source (see `fleetrec data list`), options as key=value\n"
         "  CONFIG: an experiment YAML; key=value are overrides like data.max_clients=100")


def _q(values: np.ndarray) -> str:
    if len(values) == 0:
        return "-"
    q = np.quantile(values, [0.0, 0.25, 0.5, 0.75, 1.0])
    return " / ".join(f"{v:g}" for v in q)


def describe(ds: FederatedDataset) -> str:
    """A plain-text summary: sizes, rows per client quantiles, label rates per task (and scenario), vocabs."""
    lines = [f"dataset {ds.name}: {ds.num_clients} clients, {ds.num_rows} rows"]
    split = ds.column("split")
    counts = [int((split == s).sum()) for s in (TRAIN, VAL, TEST)]
    lines.append("rows per split: " + ", ".join(f"{SPLIT_NAMES[s]} {c}" for s, c in zip((TRAIN, VAL, TEST), counts)))
    per_client = np.diff(ds.offsets)
    lines.append(f"rows per client (min / q25 / median / q75 / max): {_q(per_client)}")
    lines.append(f"train rows per client (min / q25 / median / q75 / max): {_q(ds.rows_per_client(TRAIN))}")
    lines.append("tasks (positive rate train / val / test):")
    for t in ds.schema.tasks:
        y = ds.column(t)
        rates = [f"{y[split == s].mean():.4f}" if (split == s).any() else "-" for s in (TRAIN, VAL, TEST)]
        lines.append(f"  {t}: {y.mean():.4f} ({' / '.join(rates)})")
    if ds.schema.scenario:
        sc = ds.client_attr(ds.schema.scenario)
        labels = (ds.client_attrs.column("label").to_pylist() if "label" in ds.client_attrs.column_names
                  else [str(v) for v in range(ds.num_clients)])
        lines.append(f"scenarios ({ds.schema.scenario}): rows and positive rate per task")
        client = ds.column("client")
        row_sc = sc[client]
        for code in np.unique(sc):
            m = row_sc == code
            name = labels[int(np.flatnonzero(sc == code)[0])]
            rates = ", ".join(f"{t} {ds.column(t)[m].mean():.4f}" for t in ds.schema.tasks)
            lines.append(f"  {int(code)} {name}: {int(m.sum())} rows; {rates}")
    lines.append("categorical fields (vocab): " + ", ".join(f"{f.name} {f.vocab}" for f in ds.schema.categorical))
    if ds.schema.numeric:
        lines.append("numeric fields: " + ", ".join(ds.schema.numeric))
    if ds.schema.client_categorical:
        lines.append("client attributes (vocab): "
                     + ", ".join(f"{f.name} {f.vocab}" for f in ds.schema.client_categorical))
    return "\n".join(lines)


def _parse_kv(items: list[str]) -> dict:
    import yaml
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"fleetrec data: expected key=value, got {item!r}\n{USAGE}")
        k, raw = item.split("=", 1)
        try:
            out[k.strip()] = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            out[k.strip()] = raw
    return out


def resolve(target: str, options: list[str], seed: int | None = None):
    """(DataConfig, seed) for a source name + key=value options, or an experiment YAML + overrides."""
    from datasets import SOURCES
    from datasets.sources import DataConfig
    if target in SOURCES:
        from simulator.config_loader import build
        kv = _parse_kv(options)
        cfg = build(DataConfig, {"name": target, **kv}, "data")
        return cfg, 0 if seed is None else seed
    path = Path(target)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        from simulator.config import load
        exp = load(path, list(options))
        return exp.data, exp.seed if seed is None else seed
    raise SystemExit(f"fleetrec data: {target!r} is neither a data source ({', '.join(sorted(SOURCES))}) "
                     f"nor an experiment YAML file\n{USAGE}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    seed = None
    if "--seed" in argv:
        i = argv.index("--seed")
        try:
            seed = int(argv[i + 1])
        except (IndexError, ValueError):
            raise SystemExit(f"fleetrec data: --seed needs an integer\n{USAGE}") from None
        del argv[i:i + 2]
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    verb = argv[0]
    if verb == "list":
        from datasets import SOURCES
        for name, cls in sorted(SOURCES.items()):
            doc = (cls.__doc__ or "").strip().splitlines()
            print(f"{name}: {doc[0] if doc else cls.__name__}")
        return 0
    if verb not in ("describe", "prepare") or len(argv) < 2:
        raise SystemExit(USAGE)
    from datasets.federated import DataError
    from simulator.config_loader import ConfigError
    try:
        cfg, seed_ = resolve(argv[1], argv[2:], seed)
        t0 = time.perf_counter()
        ds = cfg.build(seed_)
        dt = time.perf_counter() - t0
    except (DataError, ConfigError) as e:
        print(f"fleetrec data {verb}: {e}", file=sys.stderr)
        return 2
    if verb == "describe":
        print(describe(ds))
    else:
        print(f"prepared {ds.name}: {ds.num_clients} clients, {ds.num_rows} rows")
    print(f"built in {dt:.3f} s (seed {seed_})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
