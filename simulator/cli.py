"""`fleetrec` command line: run an experiment, open the MLflow UI.

Bad input (config file, key, value, CLI argument) prints one line and exits with code 2.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

from datasets.federated import DataError
from simulator.config_loader import ConfigError

VERBS = {
    "run": "run an experiment (default configs/quickstart.yaml) with key.path=value overrides",
    "ui": "open the MLflow UI on the tracking store (default sqlite:///mlflow.db here)",
    "data": "describe or prepare (cache) a dataset: fleetrec data describe|prepare|list NAME-OR-CONFIG",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fleetrec", description="Simulate personalized federated and multi-task recommendation on Ray.",
        formatter_class=lambda prog: argparse.HelpFormatter(prog, max_help_position=12, width=120))
    sub = p.add_subparsers(dest="verb", metavar="VERB", title="verbs")
    r = sub.add_parser("run", help=VERBS["run"], description=VERBS["run"])
    r.add_argument("config", nargs="?", default=None, help="experiment YAML (default: configs/quickstart.yaml)")
    r.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. rounds=5 train.lr=0.05")
    d = sub.add_parser("data", help=VERBS["data"], description=VERBS["data"], add_help=False)
    d.add_argument("args", nargs=argparse.REMAINDER)
    u = sub.add_parser("ui", help=VERBS["ui"], description=VERBS["ui"])
    u.add_argument("--backend-store-uri", default="sqlite:///mlflow.db")
    u.add_argument("--port", type=int, default=5000)
    u.add_argument("--host", default="127.0.0.1")
    return p


def _split_config(config: str | None, overrides: list[str]) -> tuple[str | None, list[str]]:
    """`fleetrec run rounds=3` has no config file: the first positional is then an override."""
    if config is not None and "=" in config and not os.path.exists(config):
        return None, [config, *overrides]
    return config, overrides


def cmd_run(args) -> int:
    from simulator.config import load
    path, overrides = _split_config(args.config, args.overrides)
    cfg = load(path, overrides)
    from simulator.run import run
    from simulator.tracking import default_callbacks
    run(cfg, default_callbacks(cfg))
    return 0


def cmd_data(args) -> int:
    from datasets.describe import main as data_main
    return data_main(args.args)


def cmd_ui(args) -> int:
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", args.backend_store_uri,
           "--port", str(args.port), "--host", args.host]
    print("MLflow UI on http://%s:%d (Ctrl-C to stop)" % (args.host, args.port), file=sys.stderr)
    try:
        return subprocess.call(cmd)
    except KeyboardInterrupt:
        return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.verb is None:
        _parser().print_help()
        return 2
    try:
        return {"run": cmd_run, "ui": cmd_ui, "data": cmd_data}[args.verb](args)
    except (ConfigError, DataError) as e:
        print(f"fleetrec: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
