"""`fleetrec data list|describe|prepare NAME-OR-CONFIG [key=value ...]`: list, summarize or pre-build a data source.

NAME-OR-CONFIG is a registered source name (`epinions`, `movielens_100k`, ...) whose options are given
as key=value pairs (values parsed as YAML scalars/lists), or a path to an experiment YAML whose `data:`
block is used (key=value pairs are then experiment overrides, e.g. `data.max_clients=100`).
`prepare` builds the dataset (filling the Parquet cache of real sources) and prints the build time;
with `--out DIR [--buckets N]` it also writes the sharded layout of `fleetrec.datasets.prepared`
(rows bucketed by owner, N = 64 by default), which a run reads with `data: {name: prepared, path: DIR}`.
From an experiment YAML the layout holds the clients that run federates (after `data.hold_out`) and
the reference values it reports; `describe` also prints the summary of `fleetrec.datasets.describe.describe(ds)`.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import yaml

from fleetrec.datasets import SOURCES, DataConfig
from fleetrec.datasets.describe import describe
from fleetrec.datasets.federated import DataError
from fleetrec.simulator.config import load
from fleetrec.simulator.config_loader import ConfigError, build

USAGE = ("usage: fleetrec data describe|prepare NAME-OR-CONFIG [key=value ...] [--seed N] [--out DIR [--buckets N]]\n"
         "  NAME: a data source (see `fleetrec data list`), options as key=value\n"
         "  CONFIG: an experiment YAML; key=value are overrides like data.max_clients=100")



def _parse_kv(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"expected key=value, got {item!r}")
        k, raw = item.split("=", 1)
        try:
            out[k.strip()] = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            out[k.strip()] = raw
    return out


def resolve(target: str, options: list[str], seed: int | None = None, experiment: bool = False):
    """(DataConfig, seed) for a source name + key=value options, or an experiment YAML + overrides
    (with `experiment`: the ExperimentConfig, None for a source name, as a third item)."""
    if target in SOURCES:
        kv = _parse_kv(options)
        cfg = build(DataConfig, {"name": target, **kv}, "data")
        return (cfg, 0 if seed is None else seed) + ((None,) if experiment else ())
    path = Path(target)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        exp = load(path, list(options))
        return (exp.data, exp.seed if seed is None else seed) + ((exp,) if experiment else ())
    raise ConfigError(f"{target!r} is neither a data source ({', '.join(SOURCES.names())}) "
                      "nor an experiment YAML file")


def _bad(message: str) -> int:
    """Bad command-line input: one line naming what is wrong (then the usage), exit code 2."""
    print(f"fleetrec data: {message}\n{USAGE}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    seed = None
    if "--seed" in argv:
        i = argv.index("--seed")
        try:
            seed = int(argv[i + 1])
        except (IndexError, ValueError):
            return _bad("--seed needs an integer")
        del argv[i:i + 2]
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    verb = argv[0]
    if verb == "list":
        for name, cls in SOURCES.items():
            doc = (cls.__doc__ or "").strip().splitlines()
            print(f"{name}: {doc[0] if doc else cls.__name__}")
        return 0
    if verb not in ("describe", "prepare"):
        return _bad(f"unknown verb {verb!r}; expected describe, prepare or list")
    out = buckets = None
    for flag in ("--out", "--buckets"):
        if flag in argv:
            i = argv.index(flag)
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                return _bad(f"{flag} needs a value")
            value = argv[i + 1]
            del argv[i:i + 2]
            if flag == "--out":
                out = Path(value)
            else:
                try:
                    buckets = int(value)
                except ValueError:
                    return _bad(f"--buckets: got {value!r}, expected an integer >= 1")
                if buckets < 1:
                    return _bad(f"--buckets: got {buckets}, expected an integer >= 1")
    if (out is not None or buckets is not None) and verb != "prepare":
        return _bad("--out / --buckets go with prepare")
    if buckets is not None and out is None:
        return _bad("--buckets needs --out DIR")
    if len(argv) < 2:
        return _bad(f"{verb} needs a data source name or an experiment YAML")
    try:
        cfg, seed_, exp = resolve(argv[1], argv[2:], seed, experiment=True)
        t0 = time.perf_counter()
        if out is not None and exp is not None:       # what the run federates (hold-out applied)
            from fleetrec.simulator.run import federated_dataset
            import dataclasses
            ds = federated_dataset(dataclasses.replace(exp, seed=seed_))
        else:
            ds = cfg.build(seed_)
        dt = time.perf_counter() - t0
        if out is not None:
            written = write_layout(ds, out, 64 if buckets is None else buckets, exp,
                                   seed=None if seed_pinned(cfg) else seed_)
        if verb == "describe":
            text = describe(ds)
    except (DataError, ConfigError) as e:
        print(f"fleetrec data {verb}: {e}", file=sys.stderr)
        return 2
    if verb == "describe":
        print(text)
    else:
        print(f"prepared {ds.name}: {ds.num_clients} clients, {ds.num_rows} rows")
        if out is not None:
            print(f"wrote {written} ({64 if buckets is None else buckets} buckets); run from it with the "
                  f"override \"data={{name: prepared, path: {written}}}\"")
    print(f"built in {dt:.3f} s (seed {seed_})")
    return 0


def seed_pinned(data_cfg) -> bool:
    """Whether a data config's rows and hold-out do not depend on the experiment seed (`data.seed`
    and, with a hold-out, `data.hold_out.seed` set)."""
    import dataclasses
    fields = {f.name for f in dataclasses.fields(data_cfg)}
    pinned = "seed" in fields and data_cfg.seed is not None
    return pinned and (not data_cfg.hold_out.active or data_cfg.hold_out.seed is not None)


def write_layout(ds, out: Path, buckets: int, exp=None, seed: int | None = None) -> Path:
    """The sharded layout of `ds` with the reference values a run of `exp` (or of a default
    pointwise run) reports, computed here from all rows. `seed`: what its rows were drawn with
    (None: they do not depend on the experiment seed)."""
    from fleetrec.datasets.prepared import PreparedDataset, write
    from fleetrec.simulator.run import reference_key, reference_values
    if isinstance(ds, PreparedDataset):
        raise DataError(f"{out}: the source is a prepared dataset already ({ds.path})")
    ks = exp.algorithm.ranking_ks() if exp is not None else None
    approx = exp is not None and exp.eval.pooled_auc == "histogram"
    ref = {**reference_key(ks, approx), **reference_values(ds, ks, approx)}     # as an in-memory run reports them
    return write(ds, out, buckets, reference=ref, seed=seed).resolve()


if __name__ == "__main__":
    raise SystemExit(main())
