"""Driver-side callbacks: progress bar + summary table, and the MLflow run of an experiment.

An MLflow run is made to be compared with others: it is named `<algorithm>·<dataset>·seed<k>`
(or `tracking.run_name`), tagged `algorithm`, `dataset`, `model`, `seed`, `config`, `git_commit`
(and `sweep` in a sweep), carries a one-line description and its dataset as an MLflow input
(name, digest of the data config, clients, rows); params are the config's active blocks with
floats rounded to 6 significant digits. Per-round counters of the simulation (seconds, client
updates/s, MB up / down, the system model's online / sampled / dropped clients) are metrics
under `round/` and `sim/`, plotted per round; MLflow's own `system/` prefix holds the real
CPU / memory samples of MLflow's system metrics (`tracking.system_metrics`).

Length: the terminal's and MLflow's views of one run (start lines, per-round records, summary,
failure reason) read the same records and are kept together.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from fleetrec.simulator.config import ExperimentConfig
from fleetrec.simulator.config_loader import flatten, to_dict
from fleetrec.simulator.run import Callback, RunResult

def mlflow_name(key: str) -> str:
    """A round-record key as an MLflow metric name (MLflow refuses '@'): val/recall@20 -> val/recall_at_20."""
    return key.replace("@", "_at_")


_ROUND = ("train_seconds", "eval_seconds", "client_updates_per_s", "clients_up", "cohort")   # -> round/<key>
_BYTES = ("bytes_up", "bytes_down")                                                       # -> round/mb_up, mb_down


def mlflow_metric(key: str, value: float) -> tuple[str, float]:
    """A round-record entry as the MLflow metric it is logged as."""
    if key in _ROUND:
        return f"round/{key}", value
    if key in _BYTES:
        return f"round/mb_{key[len('bytes_'):]}", value / 1e6
    if key.startswith("system/"):                  # the simulated system model's counters
        return mlflow_name("sim/" + key[len("system/"):]), value
    return mlflow_name(key), value


def git_commit() -> str:
    """The commit of the fleetrec checkout that runs (`+dirty` with uncommitted changes), or `unknown`."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# MLflow 3's UI opens an experiment on its GenAI (traces) view unless the experiment says it is
# model development, or the link asks for the runs: fleetrec does both.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
UI_QUERY = "workflowType=machine_learning"


def mark_experiment(client, experiment_id: str) -> None:
    """Tag an experiment as model development (once), so the UI opens it on its runs."""
    exp = client.get_experiment(experiment_id)
    if EXPERIMENT_KIND[0] not in (exp.tags or {}):
        retry_store_race(lambda: client.set_experiment_tag(experiment_id, *EXPERIMENT_KIND))


def use_experiment(name: str) -> str:
    """`mlflow.set_experiment(name)`, marked as model development; returns its id."""
    import mlflow
    exp = mlflow.set_experiment(name)
    mark_experiment(mlflow.MlflowClient(), exp.experiment_id)
    return exp.experiment_id


def ui_link(experiment_id: str, run_id: str | None = None, host: str = "127.0.0.1", port: int = 5000) -> str:
    """The `fleetrec ui` address of an experiment's runs, or of one run, on the runs view."""
    path = f"/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
    return f"http://{host}:{port}/#{path}?{UI_QUERY}"


def run_name(cfg: ExperimentConfig, dataset: str) -> str:
    return cfg.tracking.run_name or f"{cfg.algorithm.name}·{dataset}·seed{cfg.seed}"


def run_tags(cfg: ExperimentConfig, info: dict) -> dict[str, str]:
    dataset = info.get("dataset", cfg.data.name)
    return {"algorithm": cfg.algorithm.name, "dataset": dataset, "model": cfg.model.name, "seed": str(cfg.seed),
            "config": cfg.name, "git_commit": git_commit(),
            "mlflow.note.content": (f"{cfg.algorithm.name} on {dataset} ({info.get('num_clients')} clients, "
                                    f"{info.get('num_rows')} rows), model {cfg.model.name}, {cfg.rounds} rounds of "
                                    f"{cfg.federation.clients_per_round} clients, seed {cfg.seed}; config {cfg.name}")}


def active_params(cfg: ExperimentConfig) -> dict[str, str]:
    """The flattened config without the keys of switched-off blocks (their on/off key stays),
    floats rounded to 6 significant digits."""
    # (block prefix, on, a sub-block with its own switch)
    blocks = (("privacy.", cfg.privacy.enabled, "privacy.local."), ("privacy.local.", cfg.privacy.local.enabled, None),
              ("system.", cfg.system.active, None), ("checkpoint.", bool(cfg.checkpoint.every), None))
    keep = {"privacy.enabled", "privacy.local.mechanism", "system.availability", "checkpoint.every"}
    out = {}
    for k, v in flatten(to_dict(cfg)).items():
        if k not in keep and any(k.startswith(p) and not on and not (sub and k.startswith(sub))
                                 for p, on, sub in blocks):
            continue
        out[k] = (f"{v:.6g}" if isinstance(v, float) else str(v))[:500]
    return out


def log_dataset(cfg: ExperimentConfig, info: dict) -> None:
    """The dataset as an MLflow input: its name, a digest of what builds it (data config + seed),
    and its size."""
    import mlflow
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.meta_dataset import MetaDataset
    spec = json.dumps({"data": to_dict(cfg.data), "seed": cfg.seed}, sort_keys=True, default=str)
    ds = MetaDataset(source=CodeDatasetSource({"data_config": spec}), name=str(info.get("dataset", cfg.data.name)),
                     digest=hashlib.sha256(spec.encode()).hexdigest()[:16])
    tags = {"clients": str(info.get("num_clients")), "rows": str(info.get("num_rows"))}
    retry_store_race(lambda: mlflow.log_input(ds, context="training", tags=tags))


def retry_store_race(fn, attempts: int = 6, pause: float = 0.05):
    """`fn()`, again (up to `attempts` times, short growing pauses) when the tracking store
    refuses a row another process inserted at the same moment. Concurrent Tune trials or seed
    runs log the same dataset: both see it missing, both insert it, and the loser's insert
    fails on the store's unique key; at the next try it finds the row and reuses it."""
    import time
    from mlflow.exceptions import MlflowException
    for k in range(attempts):
        try:
            return fn()
        except MlflowException as e:
            text = f"{e} {e.__cause__ or ''}"
            if k == attempts - 1 or not ("UNIQUE constraint" in text or "IntegrityError" in text
                                         or "Duplicate entry" in text or "duplicate key" in text):
                raise
            time.sleep(pause * (k + 1))


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4f}"
    return str(v)


class ProgressBar(Callback):
    """The terminal: the dataset's reference lines at the start, one tqdm bar over rounds (its postfix
    shows the live validation metric and train loss) unless `bar` is off (`tracking.progress: false`),
    and the summary table at the end (with or without the bar)."""

    def __init__(self, stream=None, bar: bool = True):
        self.stream = stream or sys.stderr
        self.show_bar = bar
        self.bar = None

    def on_start(self, cfg: ExperimentConfig, info: dict) -> None:
        from tqdm import tqdm
        self.metric = f"val/{cfg.eval.metric}"
        bayes = info.get("ceiling", {}).get("bayes_auc")
        if bayes:
            print(f"dataset {info['dataset']}: {info['num_clients']} clients, {info['num_rows']} rows; "
                  f"Bayes-optimal AUC (a perfect model) val {bayes['val']:.4f} test {bayes['test']:.4f}",
                  file=self.stream)
        rate = info.get("floor", {}).get("client_rate_auc")
        if rate and "test" in rate:
            print(f"dataset {info['dataset']}: predicting each client's training positive rate (no model) scores "
                  f"pooled AUC val {rate.get('val', float('nan')):.4f} test {rate['test']:.4f}", file=self.stream)
        oracle = info.get("ceiling", {}).get("oracle_ranking")
        if oracle:
            print(f"dataset {info['dataset']}: a model knowing the true preferences scores "
                  + ", ".join(f"{k} {v:.4f}" for k, v in oracle.items() if k.startswith("test/")), file=self.stream)
        if not self.show_bar:
            return
        start = info.get("resumed_from_round", -1) + 1
        self.bar = tqdm(total=cfg.rounds, initial=start, desc=cfg.name, unit="round", file=self.stream,
                        dynamic_ncols=True)

    def on_round(self, record: dict) -> None:
        if self.bar is None:
            return
        post = {"loss": _fmt(record.get("train/train_loss", float("nan")))}
        if self.metric in record:
            post[self.metric] = _fmt(record[self.metric])
        post["upd/s"] = f"{record['client_updates_per_s']:.0f}"
        if record.get("train/diverging"):
            post["DIVERGING"] = f"{int(record.get('train/updates_dropped', 0))} updates dropped"
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(1)

    def on_abort(self, error: BaseException) -> None:
        if self.bar is not None:
            self.bar.close()

    def on_end(self, result: RunResult) -> None:
        if self.bar is not None:
            self.bar.close()
        print(summary_table(result), file=self.stream)


_PER_SCENARIO = re.compile(r"^(val|test)/s\d+/")


def _headline(key: str) -> int:
    """Sort rank of a metric in the summary: scenario means and ranking metrics lead."""
    name = key.split("/", 1)[1]
    if name.startswith("scenario_mean/"):
        return 0
    if name.startswith(("recall@", "ndcg@")):
        return 1
    return 2


def summary_table(result: RunResult) -> str:
    """The best round (counted from 1, like the progress bar) and its metrics, headline ones first;
    per-scenario values are counted, not listed (they are in MLflow and `RunResult.best`)."""
    best = result.best_round
    rows = [("best round (validation)", _fmt(None if best is None else best + 1))]
    metrics = {k: v for k, v in result.summary().items() if k != "best_round"}
    per_scenario = [k for k in metrics if _PER_SCENARIO.match(k)]
    shown = sorted((k for k in metrics if k not in per_scenario), key=lambda k: (_headline(k), k))
    rows += [(k, _fmt(metrics[k])) for k in shown]
    if per_scenario:
        rows.append(("per-scenario values", f"{len(per_scenario)} (in MLflow)"))
    dropped = sum(r.get("train/updates_dropped", 0) for r in result.records)
    if dropped:
        rows.append(("client updates dropped (NaN / inf)", str(dropped)))
    bad = [r["round"] + 1 for r in result.records if r.get("train/diverging")]
    if bad:
        rows.append(("diverging rounds (> half the updates dropped, or loss not finite)",
                     f"{len(bad)}: {', '.join(map(str, bad[:10]))}{' ...' if len(bad) > 10 else ''}"))
    recs = result.records
    if recs:
        secs = [r["train_seconds"] for r in recs]
        rows.append(("rounds run", str(len(recs))))
        rows.append(("median train s/round", f"{sorted(secs)[len(secs) // 2]:.3f}"))
        rows.append(("client updates/s (median)", f"{sorted(r['client_updates_per_s'] for r in recs)[len(recs) // 2]:.0f}"))
    if result.run_id:
        rows.append(("mlflow run", result.run_id))
    if result.info.get("mlflow_link"):
        rows.append(("open it (after `fleetrec ui`)", result.info["mlflow_link"]))
    width = max(len(k) for k, _ in rows)
    lines = ["", "summary", "-" * (width + 14)] + [f"{k.ljust(width)}  {v}" for k, v in rows]
    return "\n".join(lines)


class MlflowLogger(Callback):
    """One MLflow run per experiment: flattened config as params, per-round metrics, system
    metrics, and artifacts (resolved YAML, learning curve PNG, summary)."""

    def __init__(self, cfg: ExperimentConfig, parent_run_id: str | None = None):
        self.cfg = cfg
        self.parent = parent_run_id
        self.run_id = None
        self.scenario_names = None

    def state_dict(self) -> dict:
        return {"mlflow_run_id": self.run_id}

    def load_state_dict(self, state: dict) -> None:
        self.run_id = state.get("mlflow_run_id")

    def on_start(self, cfg: ExperimentConfig, info: dict) -> None:
        import mlflow
        t = cfg.tracking
        mlflow.set_tracking_uri(t.tracking_uri)
        self.experiment_id = use_experiment(t.experiment)
        sysm = {"log_system_metrics": True} if t.system_metrics else {}
        if self.run_id:                  # a resumed run continues its own MLflow run
            mlflow.start_run(run_id=self.run_id, **sysm)
            mlflow.set_tag("fleetrec.resumed_from_round", str(info.get("resumed_from_round")))
            return
        run = mlflow.start_run(run_name=run_name(cfg, info.get("dataset", cfg.data.name)),
                               nested=self.parent is not None, parent_run_id=self.parent, tags=run_tags(cfg, info),
                               **sysm)
        self.run_id = run.info.run_id
        mlflow.log_params(active_params(cfg))
        log_dataset(cfg, info)
        self.scenario_names = info.get("scenario_names")
        if self.scenario_names:               # s<k> in metric names -> the scenario it is
            mlflow.log_params({f"scenario.s{k}": name[:250] for k, name in enumerate(self.scenario_names[:200])})
        bayes = info.get("ceiling", {}).get("bayes_auc", {})
        mlflow.log_params({f"data.bayes_auc.{k}": f"{v:.6f}" for k, v in bayes.items()})
        rate = info.get("floor", {}).get("client_rate_auc", {})
        mlflow.log_params({f"data.client_rate_auc.{k}": f"{v:.6f}" for k, v in rate.items()})
        oracle = info.get("ceiling", {}).get("oracle_ranking", {})
        mlflow.log_params({f"data.oracle.{k.replace('@', '_at_')}": f"{v:.6f}" for k, v in oracle.items()})
        mlflow.log_metrics({"run/startup_seconds": info["startup_seconds"],
                            "run/mb_up_per_client": info["bytes_up_per_client"] / 1e6,
                            "run/mb_down_per_client": info["bytes_down_per_client"] / 1e6}, step=0)
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / "config.yaml"
            p.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
            mlflow.log_artifact(str(p))

    def on_abort(self, error: BaseException) -> None:
        import mlflow
        if self.run_id and mlflow.active_run() is not None:
            if not isinstance(error, KeyboardInterrupt):    # the reason, on the run's page
                mlflow.set_tag("fleetrec.failure", str(error)[:5000])
            mlflow.end_run(status="KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")

    def on_round(self, record: dict) -> None:
        import mlflow
        m = {}
        for k, v in record.items():
            if k == "round" or not isinstance(v, (int, float)) or (isinstance(v, float) and math.isnan(v)):
                continue
            name, value = mlflow_metric(k, float(v))
            m[name] = value
        mlflow.log_metrics(m, step=record["round"])
        frame = scenario_frame(record, self.scenario_names)
        if frame is not None:       # an evaluation of a scenario run: one table over rounds, a figure per round
            r = record["round"] + 1
            frame.insert(0, "round", r)
            mlflow.log_table(data=frame, artifact_file="scenarios/per_evaluation.json")
            mlflow.log_figure(scenario_figure(frame.drop(columns="round"), f"at round {r}"),
                              f"scenarios/round_{r:04d}_test_auc.png")

    def on_end(self, result: RunResult) -> None:
        import mlflow
        result.run_id = self.run_id
        result.info["mlflow_link"] = ui_link(self.experiment_id, self.run_id)
        best = {mlflow_name(f"best/{k}"): float(v) for k, v in result.summary().items() if v is not None}
        best["run/rounds_run"] = float(len(result.records))      # with rounds: did the best round sit at the cap?
        best["run/rounds_cap"] = float(self.cfg.rounds)
        mlflow.log_metrics(best)
        with tempfile.TemporaryDirectory() as d:
            png = Path(d) / "learning_curve.png"
            learning_curve(result.records, self.cfg.eval.metric, png)
            mlflow.log_artifact(str(png))
            if result.best_per_user is not None:   # eval.per_user: every user's test metrics at the best round
                csv = Path(d) / PER_USER_CSV.rsplit("/", 1)[1]
                write_per_user(result.best_per_user, csv)
                mlflow.log_artifact(str(csv), PER_USER_CSV.rsplit("/", 1)[0])
        frame = scenario_frame(result.best, self.scenario_names)
        if frame is not None:                 # scenario x task at the best round: a table and a figure
            mlflow.log_table(data=frame, artifact_file="scenarios/best_round.json")
            mlflow.log_figure(scenario_figure(frame), "scenarios/best_round_test_auc.png")
        mlflow.end_run()


PER_USER_CSV = "per_user/test.csv"   # artifact path of the best round's per-user test metrics


def write_per_user(per_user: dict, path: Path) -> None:
    """One row per user: `user`, then every metric (recall@20, ...), sorted by user id."""
    import pandas as pd
    pd.DataFrame(per_user).sort_values("user").to_csv(path, index=False, float_format="%.9g")


def read_per_user(path):
    import pandas as pd
    return pd.read_csv(path)


_SCENARIO_KEY = re.compile(r"^(val|test)/s(\d+)/([^/]+)/(auc|gauc|logloss)$")


def scenario_frame(best: dict, names: list[str] | None):
    """One row per (split, scenario) of the best round, one column per task metric; None without
    per-scenario metrics."""
    import pandas as pd
    rows: dict[tuple, dict] = {}
    for key, value in best.items():
        m = _SCENARIO_KEY.match(key)
        if m:
            split, k, task, metric = m.group(1), int(m.group(2)), m.group(3), m.group(4)
            name = names[k] if names and k < len(names) else f"s{k}"
            rows.setdefault((split, k, name), {})[f"{task}/{metric}"] = round(float(value), 6)
    if not rows:
        return None
    return pd.DataFrame([{"split": s, "scenario": f"s{k}", "name": n, **v} for (s, k, n), v in sorted(rows.items())])


def scenario_figure(frame, when: str = "at the best round"):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    test = frame[frame["split"] == "test"]
    cols = [c for c in test.columns if c.endswith("/auc")]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(test) * max(1, len(cols)) / 2), 3.6))
    width = 0.8 / max(1, len(cols))
    for j, c in enumerate(cols):
        ax.bar([i + j * width for i in range(len(test))], test[c], width=width, label=c)
    ax.set_xticks([i + width * (len(cols) - 1) / 2 for i in range(len(test))], list(test["name"]), rotation=30,
                  ha="right", fontsize=8)
    lo = float(test[cols].min().min()) if cols else 0.5
    ax.set_ylim(max(0.0, lo - 0.05), 1.0)
    ax.set(ylabel=f"test AUC {when}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    plt.close(fig)
    return fig


def learning_curve(records: list[dict], metric: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.5))
    a1.plot([r["round"] for r in records], [r.get("train/train_loss", float("nan")) for r in records])
    a1.set(xlabel="round", ylabel="train loss")
    for split in ("val", "test"):
        pts = [(r["round"], r[f"{split}/{metric}"]) for r in records if f"{split}/{metric}" in r]
        if pts:
            a2.plot(*zip(*pts), marker=".", label=split)
    a2.set(xlabel="round", ylabel=metric)
    a2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def default_callbacks(cfg: ExperimentConfig) -> list[Callback]:
    cbs: list[Callback] = []
    if cfg.tracking.mlflow:          # first, so the summary table can name the MLflow run
        cbs.append(MlflowLogger(cfg))
    cbs.append(ProgressBar(bar=cfg.tracking.progress))      # the summary table prints either way
    return cbs
