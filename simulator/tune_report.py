"""After a sweep: the per-trial summary, the best trial, plots, the MLflow parent's summary and
the terminal report."""
from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fleetrec.simulator.config import ExperimentConfig
from fleetrec.simulator.config_loader import to_dict
from fleetrec.simulator.tune_space import Sweep, short_value, to_python, trial_label


@dataclass
class SweepResult:
    results: Any                       # ray.tune.ResultGrid
    best: dict                         # trial_id, name, config (sampled), metric value, rounds
    best_config: ExperimentConfig | None
    parent_run_id: str | None
    trials: list[dict]                 # per trial: id, config, rounds run, best metric, status
    exp_dir: Path


def _trials(sweep: Sweep, grid) -> list[dict]:
    sc, out = sweep.cfg, []
    for r in grid:
        df = r.metrics_dataframe
        curve = []
        if df is not None and sc.metric in df:
            curve = [(int(i), float(v)) for i, v in zip(df["training_iteration"], df[sc.metric])]
        vals = [v for _, v in curve if not math.isnan(v)]
        best = (max(vals) if sc.mode == "max" else min(vals)) if vals else float("nan")
        m = r.metrics or {}
        out.append({"trial_id": m.get("trial_id"), "config": {k: to_python(v) for k, v in (r.config or {}).items()},
                    "rounds_run": int(m.get("training_iteration", 0) or 0), "best": best, "curve": curve,
                    "error": None if r.error is None else str(r.error).splitlines()[0][:300],
                    "path": r.path})
    return out


def _plots(sweep: Sweep, trials: list[dict], d: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    metric, paths = sweep.cfg.metric, []
    done = [t for t in trials if not math.isnan(t["best"])]
    for key, dim in sweep.space.items():
        fig, ax = plt.subplots(figsize=(5, 3.5))
        xs = [t["config"].get(key) for t in done]
        ys = [t["best"] for t in done]
        numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
        if numeric:
            ax.scatter(xs, ys)
            if dim.kind() == "loguniform" or (dim.kind() in ("choice", "grid") and xs and min(xs) > 0
                                              and max(xs) / min(xs) >= 100):
                ax.set_xscale("log")
        else:
            labels = sorted({str(x) for x in xs})
            ax.scatter([labels.index(str(x)) for x in xs], ys)
            ax.set_xticks(range(len(labels)), labels)
        ax.set(xlabel=key, ylabel=f"best {metric}", title=f"{metric} vs {key}")
        fig.tight_layout()
        p = d / f"{metric.replace('/', '_')}_vs_{key}.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        paths.append(p)
    fig, ax = plt.subplots(figsize=(7, 4))
    for t in trials:
        if t["curve"]:
            ax.plot(*zip(*t["curve"]), marker=".",
                    label=trial_label(t["config"], ", "))
    ax.set(xlabel="round (training_iteration)", ylabel=metric, title="learning curves of all trials")
    if 0 < len(ax.lines) <= 12:
        ax.legend(fontsize=6)
    fig.tight_layout()
    p = d / "learning_curves.png"
    fig.savefig(p, dpi=100)
    plt.close(fig)
    return paths + [p]


def summarize(sweep: Sweep, grid, parent: str | None) -> SweepResult:
    sc = sweep.cfg
    trials = _trials(sweep, grid)
    scored = [t for t in trials if not math.isnan(t["best"])]
    best, best_cfg = {}, None
    if scored:
        t = (max if sc.mode == "max" else min)(scored, key=lambda t: t["best"])
        best = {k: t[k] for k in ("trial_id", "config", "best", "rounds_run", "path")}
        best_cfg = sweep.trial_config(t["config"], "best trial")
    if parent:
        _summarize_mlflow(sweep, parent, trials, best, best_cfg)
    return SweepResult(results=grid, best=best, best_config=best_cfg, parent_run_id=parent, trials=trials,
                       exp_dir=sweep.exp_dir)


def _summarize_mlflow(sweep: Sweep, parent: str, trials: list[dict], best: dict, best_cfg) -> None:
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=sweep.tracking_uri)
    sc = sweep.cfg
    exp_id = client.get_run(parent).info.experiment_id
    children = client.search_runs([exp_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'",
                                  max_results=10000, order_by=["attributes.start_time DESC"])
    by_trial = {t["trial_id"]: t for t in trials}
    seen = set()
    best_child = None
    for c in children:                 # newest first: an older run of a trial was a failed or resumed attempt
        tid = c.data.tags.get("tune.trial_id")
        if tid in seen:
            if c.info.status == "RUNNING":
                client.set_tag(c.info.run_id, "tune.superseded", "true")
                client.set_terminated(c.info.run_id, "KILLED")
            continue
        seen.add(tid)
        t = by_trial.get(tid)
        if t is None:
            continue
        rounds = sweep.base_cfg.rounds
        early = t["error"] is None and t["rounds_run"] < rounds
        client.set_tag(c.info.run_id, "tune.stopped_early", str(early).lower())
        client.log_metric(c.info.run_id, "tune/rounds_run", t["rounds_run"])
        status = "FAILED" if t["error"] else "FINISHED"
        if c.info.status != status:    # ASHA stopped it: its process ended mid-run
            client.set_terminated(c.info.run_id, status)
        if early:
            fill_best(client, c, sc.metric, sc.mode)
        if best and tid == best["trial_id"]:
            best_child = c
    client.log_metric(parent, "tune/trials", len(trials))
    client.log_metric(parent, "tune/stopped_early", sum(t["error"] is None and t["rounds_run"] < sweep.base_cfg.rounds
                                                        for t in trials))
    client.log_metric(parent, "tune/errored", sum(t["error"] is not None for t in trials))
    if best:
        from fleetrec.simulator.tracking import mlflow_name
        client.log_metric(parent, mlflow_name(f"best/{sc.metric}"), best["best"])
        client.set_tag(parent, "tune.best_trial_id", best["trial_id"])
        if best_child:
            client.set_tag(parent, "tune.best_run_id", best_child.info.run_id)
            client.set_tag(best_child.info.run_id, "tune.best", "true")
            client.set_tag(parent, "mlflow.note.content", best_note(sweep, exp_id, best_child, best["best"], len(trials)))
        for k, v in best["config"].items():
            client.log_param(parent, f"best.{k}", str(v)[:500])
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        if best_cfg is not None:
            p = d / "best_config.yaml"
            p.write_text(f"# best trial {best['trial_id']} of sweep {sweep.name}: {sc.metric} = {best['best']:.6f}\n"
                         + yaml.safe_dump(to_dict(best_cfg), sort_keys=False))
            client.log_artifact(parent, str(p))
        rows = [{"trial_id": t["trial_id"], **t["config"], "rounds_run": t["rounds_run"], f"best {sc.metric}": t["best"],
                 "error": t["error"] or ""} for t in trials]
        (d / "trials.json").write_text(json.dumps(rows, indent=1, default=str))
        client.log_artifact(parent, str(d / "trials.json"))
        for p in _plots(sweep, trials, d):
            client.log_artifact(parent, str(p), artifact_path="plots")
    client.set_terminated(parent, "FINISHED")


def best_note(sweep: Sweep, experiment_id: str, child, value: float, trials: int) -> str:
    """The parent run's description (Markdown, shown on its Overview page): what was swept, and a
    link to the best child run by its name (its sampled values)."""
    sc = sweep.cfg
    link = f"#/experiments/{experiment_id}/runs/{child.info.run_id}"
    return (f"Sweep {sweep.name}: {trials} trials over {', '.join(sweep.space)} on {sweep.base_path.name}, "
            f"{sc.mode} {sc.metric}.\n\nBest trial: [{child.info.run_name}]({link}), "
            f"{sc.metric} = {value:.4f}.")


def fill_best(client, run, metric: str, mode: str) -> None:
    """A trial ASHA stopped ended before its run could log its best-round summary: log `best/<key>`
    for every val/ and test/ metric at the round with the best `metric` so far (and
    `best/best_round`), read from the run's metric history, so stopped and finished trials compare
    in the MLflow table. Nothing when the run has a summary already or never evaluated."""
    import time
    from mlflow.entities import Metric
    from fleetrec.simulator.tracking import mlflow_name
    if any(k.startswith("best/") for k in run.data.metrics):
        return
    hist = [m for m in client.get_metric_history(run.info.run_id, mlflow_name(metric)) if m.value == m.value]
    if not hist:
        return
    pick = (max if mode == "max" else min)(hist, key=lambda m: (m.value, -m.step) if mode == "max" else (m.value, m.step))
    now = int(time.time() * 1000)
    out = [Metric("best/best_round", float(pick.step), now, 0)]
    for key in run.data.metrics:
        if key.startswith(("val/", "test/")):
            at = [m.value for m in client.get_metric_history(run.info.run_id, key) if m.step == pick.step]
            if at:
                out.append(Metric(f"best/{key}", float(at[-1]), now, 0))
    for lo in range(0, len(out), 900):                   # log_batch takes up to 1000 metrics
        client.log_batch(run.info.run_id, metrics=out[lo:lo + 900])


def describe(sweep: Sweep) -> str:
    sc = sweep.cfg
    lines = [f"sweep {sweep.name}: {sc.num_samples} samples, {sc.search_alg} search, scheduler "
             f"{sc.scheduler.name}, {sc.mode} {sc.metric}",
             f"base {sweep.base_path} ({sweep.base_cfg.rounds} rounds); resources per trial (placement group) "
             f"{sweep.bundles()}",
             f"results {sweep.exp_dir}; MLflow {sweep.tracking_uri} experiment {sweep.experiment!r}"]
    if sweep.replaced_eval_metric is not None:
        lines.append(f"each run's best round and early stop: {sc.metric} ({sc.mode}; the sweep's metric and mode "
                     f"replace the base config's eval.metric {sweep.replaced_eval_metric})")
    lines += [f"  {k}: {d.kind()} {list(getattr(d, d.kind()))}" for k, d in sweep.space.items()]
    return "\n".join(lines)


def report(result: SweepResult, sweep: Sweep) -> str:
    sc = sweep.cfg
    lines = ["", f"sweep {sweep.name}: {len(result.trials)} trials, "
                 f"{sum(t['error'] is None and t['rounds_run'] < sweep.base_cfg.rounds for t in result.trials)} stopped early, "
                 f"{sum(t['error'] is not None for t in result.trials)} errored"]
    if result.best:
        b = result.best
        lines.append(f"best trial {b['trial_id']}: {sc.metric} = {b['best']:.4f} "
                     f"({b['rounds_run']} rounds) with " + ", ".join(f"{k}={short_value(v)}" for k, v in b["config"].items()))
    if result.parent_run_id:
        lines.append(f"MLflow parent run {result.parent_run_id} (best config, plots); "
                     f"open it with: fleetrec ui --backend-store-uri {sweep.tracking_uri}")
    lines.append(f"resume with: fleetrec tune {sweep.source} --resume")
    return "\n".join(lines)
