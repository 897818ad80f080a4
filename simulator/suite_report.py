"""The report of `fleetrec suite`: seed runs read back from MLflow, paired tests, the table and its files.

Length: reading the records, the statistics, the table with its no-model row and the files are one
report; splitting them would scatter the table's columns over modules.

Tests against the suite's reference method, per reported test metric:
- **Wilcoxon signed-rank over seeds** (SciPy, exact for small samples, two-sided) on the seeds
  both methods ran. With n paired seeds its smallest two-sided p-value is 2 / 2^n, so five seeds
  can never reach p < 0.05 (0.0625); the table says so where it is the reason.
- **Paired bootstrap over users** (ranking metrics, `eval.per_user`): d_u = the mean over shared
  seeds of (method - reference) on user u's test metric, over the users both ranked; B resamples
  of the users with replacement give a 95% interval of the mean difference and the two-sided
  p-value (1 + #{|mean* - d| >= |d|}) / (B + 1) of the resampled means centred on d.
A method "wins" on a metric when the difference has the right sign and every test that ran is
below `tests.alpha`; "loses" likewise; otherwise the table says "no significant difference".
"""
from __future__ import annotations

import csv
import datetime
import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fleetrec.simulator.compare import lower_is_better, min_wilcoxon_p, wilcoxon
from fleetrec.simulator.config_loader import ConfigError


@dataclass
class SeedRun:
    seed: int
    run_id: str
    metrics: dict[str, float]          # test/<metric> at the best validation round
    best_round: int | None             # 0-based
    rounds_run: int
    rounds_cap: int
    per_user: object = None            # pandas DataFrame (user, metrics...) or None
    floor: dict | None = None          # test/<metric> of the no-model client-rate heuristic on the run's data

    @property
    def at_cap(self) -> bool:
        return self.best_round is not None and self.best_round >= self.rounds_cap - 1


@dataclass
class MethodResult:
    key: str
    label: str
    tune: dict                         # the tune stage's JSON record (best values, trials, command)
    seeds_stage: dict
    runs: list[SeedRun] = field(default_factory=list)

    def values(self, metric: str) -> dict[int, float]:
        return {r.seed: r.metrics[metric] for r in self.runs if metric in r.metrics}


@dataclass
class _Bars:
    """One method as `compare.figure` draws it: `values("best/test/<m>")` = seed -> value."""
    name: str
    result: MethodResult

    def values(self, metric: str) -> dict[int, float]:
        return self.result.values(metric[len("best/"):])


# ------------------------------------------------------------------------------ statistics
def paired_bootstrap(method: list, reference: list, metric: str, samples: int, seed: int = 0) -> dict | None:
    """Mean per-user difference, its 95% interval and two-sided p over users (see the module doc).
    `method` / `reference`: per-user frames of the same seeds, in the same order."""
    import pandas as pd
    if not method or samples <= 0:
        return None
    diffs = []
    for a, b in zip(method, reference):
        j = pd.merge(a[["user", metric]], b[["user", metric]], on="user", suffixes=("_m", "_r"))
        diffs.append(j.set_index("user")[f"{metric}_m"] - j.set_index("user")[f"{metric}_r"])
    d = pd.concat(diffs, axis=1, join="inner").mean(axis=1).to_numpy()      # users ranked in every run
    if d.size == 0:
        return None
    g = np.random.default_rng(seed)
    means = np.empty(samples)
    for lo in range(0, samples, 256):                                        # (chunk, U) index draws
        hi = min(lo + 256, samples)
        means[lo:hi] = d[g.integers(0, d.size, size=(hi - lo, d.size))].mean(axis=1)
    obs = float(d.mean())
    p = (1 + int(np.sum(np.abs(means - obs) >= abs(obs)))) / (samples + 1) if obs != 0 else 1.0
    return {"diff": obs, "ci95": [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))],
            "p": float(p), "users": int(d.size)}


def compare_to_reference(m: MethodResult, ref: MethodResult, metric: str, suite) -> dict:
    a, b = m.values(metric), ref.values(metric)
    seeds = sorted(set(a) & set(b))
    out: dict = {"seeds": seeds}
    if len(seeds) < 2:
        out["verdict"] = "not tested (fewer than 2 paired seeds)"
        return out
    x, y = np.array([a[s] for s in seeds]), np.array([b[s] for s in seeds])
    out["diff"] = float((x - y).mean())
    out["wilcoxon_p"] = wilcoxon(x, y)
    tests = [out["wilcoxon_p"]]
    name = metric.split("/", 1)[1]
    if suite.per_user and suite.cfg.tests.bootstrap_samples:
        by_seed_m = {r.seed: r.per_user for r in m.runs if r.per_user is not None}
        by_seed_r = {r.seed: r.per_user for r in ref.runs if r.per_user is not None}
        both = [s for s in seeds if s in by_seed_m and s in by_seed_r]
        boot = paired_bootstrap([by_seed_m[s] for s in both], [by_seed_r[s] for s in both], name,
                                suite.cfg.tests.bootstrap_samples, suite.cfg.tests.seed)
        if boot is not None:
            out["bootstrap"] = boot
            tests.append(boot["p"])
    alpha = suite.cfg.tests.alpha
    better = out["diff"] < 0 if lower_is_better(metric) else out["diff"] > 0
    if all(p < alpha for p in tests):
        out["verdict"] = "better" if better else "worse"
    else:
        why = []
        if out["wilcoxon_p"] >= alpha and min_wilcoxon_p(len(seeds)) >= alpha:
            why.append(f"with {len(seeds)} seeds the smallest Wilcoxon p is {min_wilcoxon_p(len(seeds)):.3g}")
        out["verdict"] = "no significant difference" + (f" ({'; '.join(why)})" if why else "")
    return out


# ------------------------------------------------------------------------------ reading the runs
def _finished_children(client, parent: str) -> list:
    exp = client.get_run(parent).info.experiment_id
    runs = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent}'", max_results=10000,
                              order_by=["attributes.start_time DESC"])
    return [r for r in runs if r.info.status == "FINISHED" and r.data.tags.get("tune.superseded") != "true"]


def _seed_runs_from_mlflow(suite, client, parent: str) -> list[SeedRun]:
    """The seed runs of a seeds stage (newest finished run per seed) read back from MLflow."""
    from fleetrec.simulator.tracking import PER_USER_CSV, mlflow_name, read_per_user
    import tempfile
    runs, seen = [], set()
    for r in _finished_children(client, parent):
            seed = int(r.data.tags.get("seed", r.data.params.get("seed", -1)))
            if seed in seen:
                continue
            seen.add(seed)
            met = {f"test/{name}": float(r.data.metrics[k]) for name in suite.cfg.report
                   if (k := mlflow_name(f"best/test/{name}")) in r.data.metrics}
            per = None
            if suite.per_user:
                with tempfile.TemporaryDirectory() as tmp:
                    try:
                        per = read_per_user(client.download_artifacts(r.info.run_id, PER_USER_CSV, tmp))
                    except Exception:          # an MLflow store without the artifact: no bootstrap for it
                        per = None
            br = r.data.metrics.get("best/best_round")
            floor = r.data.params.get(f"data.{FLOOR_PARAM}.test")
            runs.append(SeedRun(seed, r.info.run_id, met, None if br is None else int(br),
                                int(r.data.metrics.get("run/rounds_run", 0)),
                                int(r.data.metrics.get("run/rounds_cap", suite.cfg.final.rounds)), per,
                                None if floor is None else {"test/auc": float(floor)}))
    return sorted(runs, key=lambda r: r.seed)


def record_seed_runs(suite, method_dir: Path, parent: str) -> list[dict]:
    """The finished seeds stage's runs as plain records for its `seeds.json` (per-user tables, for
    ranking metrics, as `per_user/seed<k>.csv.gz` in `method_dir`)."""
    from mlflow.tracking import MlflowClient
    out = []
    for r in _seed_runs_from_mlflow(suite, MlflowClient(tracking_uri=suite.tracking_uri), parent):
        if r.per_user is not None:
            (method_dir / "per_user").mkdir(exist_ok=True)
            r.per_user.to_csv(method_dir / "per_user" / f"seed{r.seed}.csv.gz", index=False, float_format="%.9g")
        out.append({"seed": r.seed, "run_id": r.run_id, "metrics": r.metrics, "best_round": r.best_round,
                    "rounds_run": r.rounds_run, "rounds_cap": r.rounds_cap,
                    **({"floor": r.floor} if r.floor else {})})
    return out


def collect(suite, client) -> dict[str, MethodResult]:
    """Every method whose seeds stage finished: its seed runs from `seeds.json` (or, for records
    written before it held them, from MLflow)."""
    import pandas as pd
    out = {}
    for key, m in suite.methods.items():
        d = suite.method_dir(key)
        if not (d / "seeds.json").is_file():
            continue
        tune, seeds = json.loads((d / "tune.json").read_text()), json.loads((d / "seeds.json").read_text())
        res = MethodResult(key, m.label, tune, seeds)
        if "runs" in seeds:
            for x in seeds["runs"]:
                f = d / "per_user" / f"seed{x['seed']}.csv.gz"
                per = pd.read_csv(f) if suite.per_user and f.is_file() else None
                res.runs.append(SeedRun(int(x["seed"]), x["run_id"], {k: float(v) for k, v in x["metrics"].items()},
                                        x["best_round"], int(x["rounds_run"]), int(x["rounds_cap"]), per,
                                        x.get("floor")))
        else:
            res.runs = _seed_runs_from_mlflow(suite, client, seeds["parent_run_id"])
        out[key] = res
    ref = out.get(suite.cfg.reference)
    if ref is not None and "auc" in suite.cfg.report and any(r.floor for r in ref.runs):
        out[FLOOR_KEY] = MethodResult(FLOOR_KEY, FLOOR_LABEL, {"trials": 0, "best": {}}, {}, [
            SeedRun(r.seed, r.run_id, dict(r.floor), None, 0, 0) for r in ref.runs if r.floor])
    return out


# The no-model row of every pointwise table with test AUC: each row scored by its client's smoothed
# training positive rate (simulator/ceiling.py), on the reference's seed runs' own data -- what a
# per-client bias alone scores, so a method's lead over it is what the model adds.
FLOOR_PARAM = "client_rate_auc"
FLOOR_KEY = "_client_rate"
FLOOR_LABEL = "client positive rate (no model)"


# ------------------------------------------------------------------------------ the table
def _cell(v: list[float]) -> str:
    if not v:
        return "-"
    sd = float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
    return f"{np.mean(v):.4f} ± {sd:.4f}"


def _fmt_p(p: float) -> str:
    """`=0.031` or `<0.001`, to follow a `p`."""
    return f"={p:.2g}" if p >= 1e-3 else "<0.001"


def _values_text(values: dict) -> str:
    from fleetrec.simulator.tune_space import short_value
    return ", ".join(f"{k.rsplit('.', 1)[-1]}={short_value(v)}" for k, v in values.items()) or "(none searched)"


def table(suite, results: dict[str, MethodResult]) -> tuple[list[str], list[list[str]], dict]:
    ref = results.get(suite.cfg.reference)
    metrics = [f"test/{m}" for m in suite.cfg.report]
    order = sorted(results, key=lambda k: (k != suite.cfg.reference, -np.mean(list(results[k].values(metrics[0]).values()) or [0])
                                                                        * (-1 if lower_is_better(metrics[0]) else 1)))
    header = ["method", "tuned (trials)", "best values", *metrics, "seeds", "best round (median; at cap)"]
    header += [f"vs {suite.cfg.reference}: {m}" for m in metrics]
    rows, stats = [], {}
    for key in order:
        r = results[key]
        brs = [x.best_round for x in r.runs if x.best_round is not None]
        tuned = (f"as {suite.methods[r.tune['tuned_as']].label}" if r.tune.get("tuned_as") in suite.methods
                 else str(r.tune.get("trials", 0) if key in suite.methods and suite.methods[key].tune_yaml["space"]
                          else 0))
        row = [r.label, tuned,
               _values_text(r.tune.get("best", {})), *[_cell(list(r.values(m).values())) for m in metrics],
               str(len(r.runs)), (f"{int(np.median(brs)) + 1 if brs else '-'}; {sum(x.at_cap for x in r.runs)}/{len(r.runs)}"
                                  if key != FLOOR_KEY else "-")]
        stats[key] = {}
        for m in metrics:
            if ref is None:
                row.append("reference not run yet")
                continue
            if key == suite.cfg.reference:
                row.append("reference")
                continue
            if key == FLOOR_KEY and not r.values(m):
                row.append("-")
                continue
            c = compare_to_reference(r, ref, m, suite)
            stats[key][m] = c
            if "diff" not in c:
                row.append(c["verdict"])
                continue
            txt = f"{c['diff']:+.4f}, Wilcoxon p{_fmt_p(c['wilcoxon_p'])}"
            if "bootstrap" in c:
                txt += f", bootstrap p{_fmt_p(c['bootstrap']['p'])}"
            row.append(f"{txt}: {c['verdict']}")
        rows.append(row)
    return header, rows, stats


def horizon_warnings(suite, results: dict[str, MethodResult]) -> dict[str, dict]:
    """Methods whose tuning horizon looks too short for them, by two counts from the stage records:
    the seed runs' median best round (1-based) beyond the tuning trials' round cap (the tuning judged
    every setting before the point where the chosen one peaks, so it favours settings that peak early),
    and tuning trials that ran to that cap (still improving within the patience when they were cut)."""
    cap, out = suite.cfg.budget.rounds, {}
    for key, r in results.items():
        if key == FLOOR_KEY or r.tune.get("tuned_as") or not r.tune.get("trials") or (
                key in suite.methods and not suite.methods[key].tune_yaml["space"]):
            continue
        brs = [x.best_round + 1 for x in r.runs if x.best_round is not None]
        median = int(np.median(brs)) if brs else None
        to_cap = max(0, int(r.tune["trials"]) - int(r.tune.get("stopped_early", r.tune["trials"]))
                     - int(r.tune.get("errored", 0)))
        if (median is not None and median > cap) or to_cap:
            out[key] = {"median_best_round": median, "tuning_cap": cap, "trials_to_cap": to_cap}
    return out


def _horizon_text(suite, results, warn: dict) -> list[str]:
    if not warn:
        return []
    cap = suite.cfg.budget.rounds
    late = [f"{results[k].label} (round {w['median_best_round']})" for k, w in warn.items()
            if w["median_best_round"] is not None and w["median_best_round"] > cap]
    cut = [f"{results[k].label} {w['trials_to_cap']}/{results[k].tune['trials']}" for k, w in warn.items() if w["trials_to_cap"]]
    text = f"**Tuning horizon.** The tuning trials stopped at {cap} rounds."
    if late:
        text += " The seed runs peak after that, median best round, for: " + "; ".join(late) + "."
    if cut:
        text += " Tuning trials still improving when the cap cut them: " + "; ".join(cut) + "."
    return ["", text + " For these methods a longer horizon could rank the settings differently, favouring "
            "settings that peak late; raise `budget.rounds` before reading their rows as fully tuned."]


def _minutes(seconds: float | None) -> str:
    return "?" if seconds is None else f"{seconds / 60:.1f}"


def stage_minutes(results: dict[str, MethodResult]) -> list[str]:
    """`label t + s` per method whose stage records hold their wall time (older records do not)."""
    out = []
    for r in results.values():
        t, s = r.tune.get("wall_s"), r.seeds_stage.get("wall_s")
        if t is None and s is None:
            continue
        if r.tune.get("tuned_as"):
            t = 0.0                                        # an ablation borrows its method's values: no trials
        out.append(f"{r.label} {_minutes(t)} + {_minutes(s)}")
    return out


def machine() -> dict:
    import torch
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return info


def write_report(suite, log) -> str:
    from mlflow.tracking import MlflowClient
    from fleetrec.simulator.compare import figure, markdown
    uri = suite.tracking_uri
    client = MlflowClient(tracking_uri=uri)
    results = collect(suite, client)
    if not results:
        raise ConfigError(f"{suite.dir}: no method has finished its seed runs yet; nothing to report")
    header, rows, stats = table(suite, results)
    missing = [k for k in suite.methods if k not in results]
    sc = suite.cfg
    md = [f"Suite `{suite.name}` — `{suite.command()}`", "",
          f"Budget per method: {sc.budget.trials} trials × ≤ {sc.budget.rounds} rounds ({sc.budget.search_alg} search, "
          f"ASHA); then seeds {list(sc.final.seeds)} with ≤ {sc.final.rounds} rounds and early stopping after "
          f"{sc.final.early_stop_patience} evaluations without a better {sc.metric}. Test metrics at the best "
          f"validation round, mean ± std over seeds. Tests vs `{sc.reference}` at α = {sc.tests.alpha:g}: Wilcoxon "
          "signed-rank over seeds" + (f", paired bootstrap over users ({sc.tests.bootstrap_samples} resamples)"
                                       if suite.per_user and sc.tests.bootstrap_samples else "") + ".", "",
          markdown(header, rows)]
    if missing:
        md += ["", f"Not finished yet (run `{suite.command()} --resume`): {', '.join(missing)}."]
    horizon = horizon_warnings(suite, results)
    md += _horizon_text(suite, results, horizon)
    timed = stage_minutes(results)
    if timed:
        md += ["", "Wall time per method on this machine, tune + seeds stages, minutes (a stage resumed after an "
               "interruption counts its last sitting only): " + "; ".join(timed) + "."]
    md += ["", "The same means and Wilcoxon p-values from the seed runs in MLflow (while that store is kept): "
           f"`{compare_command(suite)}`."]
    text = "\n".join(md)
    out = suite.results_dir
    out.mkdir(parents=True, exist_ok=True)
    stem = out / suite.name
    Path(f"{stem}.md").write_text(text + "\n")
    with open(f"{stem}.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([header, *rows])
    doc = {"suite": suite.name, "source": rel(suite.source), "command": suite.command(),
           "date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine(),
           "reference": sc.reference, "metric": sc.metric, "report": list(sc.report),
           "budget": vars(sc.budget), "final": {**vars(sc.final), "seeds": list(sc.final.seeds)},
           "tests": vars(sc.tests), "missing": missing, "compare_command": compare_command(suite), "horizon": horizon,
           "methods": {k: {"label": r.label, "config": rel(suite.methods[k].config_path) if k in suite.methods else None, "tune": r.tune,
                           "seeds_stage": r.seeds_stage, "vs_reference": stats.get(k, {}),
                           "runs": [{"seed": x.seed, "run_id": x.run_id, "best_round": x.best_round,
                                     "rounds_run": x.rounds_run, "at_cap": x.at_cap, **x.metrics} for x in r.runs]}
                       for k, r in results.items()}}
    Path(f"{stem}.json").write_text(json.dumps(doc, indent=1, default=str))
    figure([_Bars(results[k].label, results[k]) for k in results], [f"best/test/{m}" for m in sc.report],
           Path(f"{stem}.png"))
    _log(suite, client, uri, text, rows, header, stem)
    log(f"written: {stem}.md, .csv, .json, .png")
    return text


def compare_command(suite) -> str:
    """The `fleetrec compare` line that rebuilds the table's method rows from the MLflow runs."""
    import shlex
    from fleetrec.simulator.tracking import mlflow_name
    uri = suite.tracking_uri
    if uri.startswith("sqlite:///"):
        uri = "sqlite:///" + rel(uri[len("sqlite:///"):])
    metrics = " ".join(mlflow_name(f"best/test/{m}") for m in suite.cfg.report)
    return (f"fleetrec compare --suite {shlex.quote(suite.name)} --baseline {suite.cfg.reference} --test wilcoxon "
            f"--metrics {metrics} --tracking-uri {shlex.quote(uri)} --experiment {shlex.quote(suite.experiment)}")


def _log(suite, client, uri: str, text: str, rows, header, stem: Path) -> None:
    import mlflow
    mlflow.set_tracking_uri(uri)
    from fleetrec.simulator.tracking import use_experiment
    use_experiment(suite.experiment)
    with mlflow.start_run(run_name=f"suite·{suite.name}", tags={"fleetrec.suite": suite.name, "mlflow.note.content": text}):
        b = suite.cfg.budget
        mlflow.log_params({"reference": suite.cfg.reference, "metric": suite.cfg.metric, "trials": b.trials,
                           "trial_rounds": b.rounds, "seeds": json.dumps(list(suite.cfg.final.seeds)),
                           "final_rounds": suite.cfg.final.rounds, "command": suite.command()[:500]})
        mlflow.log_table({h: [r[i] for r in rows] for i, h in enumerate(header)}, artifact_file="suite_table.json")
        for ext in ("md", "csv", "json", "png"):
            mlflow.log_artifact(f"{stem}.{ext}")


def rel(p) -> str:
    """A path relative to the working directory when it is below it (for commands in reports)."""
    try:
        return str(Path(p).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)


def describe(suite) -> str:
    """What `fleetrec suite` will run, printed before it starts (and by --check)."""
    sc, b, f = suite.cfg, suite.cfg.budget, suite.cfg.final
    lines = [f"suite {suite.name}: {len(suite.methods)} methods, reference {sc.reference}; tune on {sc.metric} "
             f"({sc.mode}), report test/{', test/'.join(sc.report)}",
             f"budget per method: {b.trials} trials x <= {b.rounds} rounds, {b.search_alg} search (seed {b.seed}), "
             f"ASHA grace {b.grace_period}, reduction {b.reduction_factor:g}",
             f"seeds {list(f.seeds)}, <= {f.rounds} rounds, early stop after {f.early_stop_patience} evaluations; "
             f"tests: Wilcoxon over seeds" + (f" + paired bootstrap over users ({sc.tests.bootstrap_samples})"
                                              if suite.per_user and sc.tests.bootstrap_samples else ""),
             f"state {suite.dir}; results {suite.results_dir}"]
    if suite.pretrain:
        lines.append(f"  stage 1 once, shared: {rel(suite.pretrain.config_path)} -> {suite.pretrain.backbone}")
    for m in suite.methods.values():
        space = m.tune_yaml["space"]
        how = (f" searching {', '.join(space)}" if space else
               f" at the tuned values of {m.cfg.tuned_as}" if m.cfg.tuned_as else " (nothing searched)")
        lines.append(f"  {m.key}: {rel(m.config_path)}" + how)
    return "\n".join(lines)
