"""`fleetrec` command line: run an experiment, open the MLflow UI.

Bad input (config file, key, value, CLI argument) prints one line and exits with code 2.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from fleetrec.datasets.federated import DataError
from fleetrec.simulator.config_loader import ConfigError

VERBS = {
    "run": "run an experiment (default configs/quickstart.yaml) with key.path=value overrides",
    "ui": "open the MLflow UI on the tracking store (default sqlite:///mlflow.db here)",
    "data": "describe or prepare (cache) a dataset: fleetrec data describe|prepare|list NAME-OR-CONFIG",
    "pretrain": "stage 1 of FedPA: pre-train the backbone on the open users of CONFIG",
    "tune": "hyperparameter sweep with Ray Tune: fleetrec tune SPACE.yaml [key.path=value ...]",
    "compare": "method x metric table over seeds from MLflow runs (mean ± std, paired tests): Markdown, CSV, PNG",
    "suite": "fair comparison: tune every method on one budget, rerun the best on N seeds, paired tests, table",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fleetrec", description="Simulate personalized federated and multi-task recommendation on Ray.",
        formatter_class=lambda prog: argparse.HelpFormatter(prog, max_help_position=12, width=120))
    sub = p.add_subparsers(dest="verb", metavar="VERB", title="verbs")
    r = sub.add_parser("run", help=VERBS["run"], description=VERBS["run"])
    r.add_argument("config", nargs="?", default=None, help="experiment YAML (default: configs/quickstart.yaml)")
    r.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. rounds=5 train.lr=0.05")
    r.add_argument("--resume", metavar="DIR", default=None,
                   help="continue the run checkpointed in DIR (its config; overrides such as rounds=N apply)")
    r.add_argument("--dashboard", action="store_true",
                   help="start Ray's dashboard with the local cluster and print its URL (= resources.dashboard=true)")
    d = sub.add_parser("data", help=VERBS["data"], description=VERBS["data"], add_help=False)
    d.add_argument("args", nargs=argparse.REMAINDER)
    t = sub.add_parser("tune", help=VERBS["tune"],
                       description="Run (or --resume) a Ray Tune sweep described by a search-space YAML "
                                   "(see tune_spaces/README.md); overrides apply to its base config.")
    t.add_argument("space", help="search-space YAML, e.g. tune_spaces/quickstart.yaml")
    t.add_argument("overrides", nargs="*", help="key.path=value overrides of the base config, e.g. rounds=5")
    t.add_argument("--resume", action="store_true", help="continue the interrupted sweep in <storage_path>/<name>")
    t.add_argument("--name", default=None, help="sweep name (default: the YAML's name, else its file stem)")
    t.add_argument("--storage-path", default=None, help="Tune results folder (default: the YAML's, ./tune_results)")
    t.add_argument("--check", action="store_true", help="validate the YAML and print the sweep; run nothing")
    t.add_argument("--samples", type=int, default=None, metavar="N", help="number of trials (replaces num_samples)")
    pt = sub.add_parser("pretrain", help=VERBS["pretrain"], description=VERBS["pretrain"], add_help=False)
    pt.add_argument("args", nargs=argparse.REMAINDER)
    c = sub.add_parser("compare", help=VERBS["compare"], description=VERBS["compare"])
    c.add_argument("runs", nargs="*", help="run ids (default: every run of --experiment that matches --filter)")
    c.add_argument("--experiment", default=None, help="MLflow experiment (default: fleetrec)")
    c.add_argument("--filter", default="", help="MLflow search filter, e.g. \"tags.dataset = 'epinions'\"")
    c.add_argument("--group-by", default="config", help="tag that makes a row: config (default), algorithm, model, ...")
    c.add_argument("--metrics", nargs="+", default=[], help="metric names or patterns, e.g. 'best/test/*auc' "
                   "(default: the headline ones)")
    c.add_argument("--baseline", default=None, help="group the others are tested against (paired over seeds)")
    c.add_argument("--test", default="t", help="paired test: t (default) or wilcoxon "
                   "(signed-rank, as suites report)")
    c.add_argument("--suite", default=None, metavar="NAME", help="the seed runs of suite NAME, one row per method")
    c.add_argument("--out", default="compare", help="folder for compare.md / .csv / .png (default ./compare)")
    c.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    c.add_argument("--log", action="store_true", help="also log the comparison as an MLflow run")
    s = sub.add_parser("suite", help=VERBS["suite"],
                       description="Run (or --resume) a comparison suite (see suites/README.md): every method is "
                                   "tuned with the same budget, its best configuration rerun on the suite's seeds "
                                   "with early stopping, and the report tests each against the reference method.")
    s.add_argument("suite", help="suite YAML, e.g. suites/pmtrec_epinions.yaml")
    s.add_argument("overrides", nargs="*", help="suite.<key>=value edits the suite (suite.budget.trials=2); "
                   "other key.path=value apply to every method's config (data.max_users=500)")
    s.add_argument("--resume", action="store_true", help="skip finished stages, continue interrupted sweeps")
    s.add_argument("--check", action="store_true", help="validate the suite and every method's sweeps; run nothing")
    s.add_argument("--only", nargs="+", default=[], metavar="METHOD", help="run the stages of these methods only")
    s.add_argument("--report", action="store_true", help="only (re)write the report from the finished stages")
    u = sub.add_parser("ui", help=VERBS["ui"], description=VERBS["ui"])
    u.add_argument("--backend-store-uri", default="sqlite:///mlflow.db")
    u.add_argument("--port", type=int, default=5000)
    u.add_argument("--host", default="127.0.0.1")
    u.add_argument("--workers", type=int, default=1, help="server processes (default 1: one reader on this "
                   "machine; MLflow's own default of 4 starts slowly on a busy laptop)")
    return p


def _split_config(config: str | None, overrides: list[str]) -> tuple[str | None, list[str]]:
    """`fleetrec run rounds=3` has no config file: the first positional is then an override."""
    if config is not None and "=" in config and not os.path.exists(config):
        return None, [config, *overrides]
    if config is not None and not os.path.exists(config) and not config.endswith((".yaml", ".yml")):
        raise ConfigError(f"{config!r}: neither a config file (no such file) nor an override key.path=value")
    return config, overrides


def cmd_run(args) -> int:
    from fleetrec.simulator.config import from_dict, load
    from fleetrec.simulator.config_loader import apply_overrides, to_dict
    path, overrides = _split_config(args.config, args.overrides)
    if args.dashboard:
        overrides = [*overrides, "resources.dashboard=true"]
    resume = None
    if args.resume:
        from fleetrec.simulator import checkpoint
        if path:
            raise ConfigError(f"--resume {args.resume}: the config comes from the checkpoint; "
                              f"give overrides only, not {path}")
        resume = checkpoint.load(args.resume)
        where = str(resume.config_file or args.resume)
        saved = to_dict(from_dict(resume.config, where))
        checkpoint.refuse_unsafe_overrides(saved, overrides)
        overrides = [f"checkpoint.dir={args.resume}", *overrides]   # keep checkpointing where it was
        cfg = from_dict(apply_overrides(resume.config, overrides), where)
        checkpoint.check_resume_overrides(saved, to_dict(cfg))
    else:
        cfg = load(path, overrides)
    from fleetrec.simulator.coordinator import WorkerLost
    from fleetrec.simulator.run import Diverged, run
    from fleetrec.simulator.tracking import default_callbacks
    try:
        run(cfg, default_callbacks(cfg), resume=resume)
    except Diverged as e:
        print(f"fleetrec: run stopped: {e}", file=sys.stderr)
        return 3
    except WorkerLost as e:                   # raised in the coordinator: Ray wraps it with its trace
        import ray
        reason = e.cause if isinstance(e, ray.exceptions.RayTaskError) else e
        ck = cfg.checkpoint
        where = f"; continue it with: fleetrec run --resume {ck.dir}" if (Path(ck.dir) / "LATEST").is_file() else ""
        print(f"fleetrec: run failed: {reason}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        ck = cfg.checkpoint
        where = (f"continue it with: fleetrec run --resume {ck.dir}" if ck.every and (Path(ck.dir) / "LATEST").is_file()
                 else "no checkpoint to continue from" + ("" if ck.every else " (checkpoint.every is 0)"))
        print(f"fleetrec: interrupted; the MLflow run (if any) is marked KILLED; {where}", file=sys.stderr)
        return 130
    return 0


def cmd_compare(args) -> int:
    from fleetrec.simulator.compare import compare
    print(compare(args.tracking_uri, args.experiment, args.runs, args.filter, args.group_by, args.metrics,
                  args.baseline, args.out, args.log, args.test, args.suite))
    from fleetrec.simulator.compare import FILES
    written = [f for f in FILES if (Path(args.out) / f).is_file()]
    print(f"written: {args.out}/{', '.join(written)}", file=sys.stderr)
    return 0


def cmd_tune(args) -> int:
    from fleetrec.simulator.tune import SweepInterrupted, tune_sweep
    from fleetrec.simulator.tune_report import describe, report
    from fleetrec.simulator.tune_space import load_sweep
    sweep = load_sweep(args.space, args.overrides, name=args.name, storage_path=args.storage_path,
                       num_samples=args.samples)
    print(describe(sweep), file=sys.stderr)
    if args.check:
        return 0
    try:
        print(report(tune_sweep(sweep, resume=args.resume), sweep), file=sys.stderr)
    except SweepInterrupted as e:
        print(f"fleetrec: {e}", file=sys.stderr)
        return 130
    return 0


def cmd_suite(args) -> int:
    from fleetrec.simulator.suite import load_suite, run_suite
    from fleetrec.simulator.suite_report import describe
    from fleetrec.simulator.tune import SweepInterrupted
    suite = load_suite(args.suite, args.overrides)
    print(describe(suite), file=sys.stderr)
    if args.check:
        return 0
    try:
        print(run_suite(suite, resume=args.resume, only=args.only, report_only=args.report))
    except SweepInterrupted as e:
        print(f"fleetrec: {e}; continue the suite with: {suite.command()} --resume", file=sys.stderr)
        return 130
    return 0


def cmd_ui(args) -> int:
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", args.backend_store_uri,
           "--port", str(args.port), "--host", args.host, "--workers", str(args.workers)]
    print("MLflow UI on http://%s:%d (Ctrl-C to stop)" % (args.host, args.port), file=sys.stderr)
    for line in experiment_links(args.backend_store_uri, args.host, args.port):
        print(line, file=sys.stderr)
    try:
        return subprocess.call(cmd)
    except KeyboardInterrupt:
        return 0


def experiment_links(store: str, host: str, port: int, limit: int = 8) -> list[str]:
    """One line per experiment of the store (newest first): its name and the link to its runs."""
    try:
        from mlflow import MlflowClient
        from fleetrec.simulator.tracking import mark_experiment, ui_link
        client = MlflowClient(tracking_uri=store)
        exps = [e for e in client.search_experiments(max_results=limit + 1, order_by=["last_update_time DESC"])
                if e.name != "Default" or client.search_runs([e.experiment_id], max_results=1)]
    except Exception as e:                                   # an unreadable store: the UI itself will say why
        return [f"(could not list the experiments of {store}: {e})"]
    out = []
    for e in exps[:limit]:
        mark_experiment(client, e.experiment_id)             # older experiments too open on their runs
        out.append(f"  {e.name}: {ui_link(e.experiment_id, host=host, port=port)}")
    return out


PASS_THROUGH = {"data": "fleetrec.simulator.data_cli", "pretrain": "fleetrec.simulator.pretrain"}   # verbs with their own parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # MLflow's INFO lines (store tables created, experiment created, system metrics started and
    # stopped) say nothing a user asked for; its warnings and errors still print. Set before MLflow
    # is imported, here and (through the environment) in Ray's worker and trial processes.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")   # one bar per artifact a suite reads
    if argv and argv[0] in PASS_THROUGH:          # argparse's REMAINDER would swallow their --help
        import importlib
        return importlib.import_module(PASS_THROUGH[argv[0]]).main(argv[1:])
    args = _parser().parse_args(argv)
    if args.verb is None:
        _parser().print_help()
        return 2
    try:
        return {"run": cmd_run, "ui": cmd_ui, "tune": cmd_tune, "compare": cmd_compare,
                "suite": cmd_suite}[args.verb](args)
    except (ConfigError, DataError) as e:
        print(f"fleetrec: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
