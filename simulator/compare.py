"""`fleetrec compare`: a method × metric table over seeds, read from MLflow runs, with paired tests.

Selects runs (run ids, an experiment, an MLflow filter such as `tags.dataset = 'epinions'`),
groups them by a tag (default `config`: one row per experiment config; `algorithm`, `model`, ...
work too) and, for each metric -- the best-round values `best/<split>/<name>` every run logs when
it ends -- prints mean ± std over the group's runs with their count. With `--baseline GROUP`,
every other group is compared with it by a paired test over the seeds both have (SciPy: t-test, or
`--test wilcoxon` for the signed-rank test the suites use), and the table says, per metric, whether
the group is better at p < 0.05 (log-loss: lower is better). A seed that has several finished runs
in a group counts once, with its newest run.

`--suite NAME` selects the seed runs of a `fleetrec suite` (the children of its `NAME.<method>.seeds`
sweeps) and makes one row per method key: `fleetrec compare --suite NAME --test wilcoxon --baseline
REF` gives the suite report's means and Wilcoxon p-values from the MLflow runs themselves.

Writes `compare.md`, `compare.csv` and `compare.png` (mean ± std per group, one panel per metric)
into `--out`, and with `--log` records them as an MLflow run tagged `fleetrec.compare`.
"""
from __future__ import annotations

import csv
import fnmatch
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fleetrec.simulator.config_loader import ConfigError

ALPHA = 0.05


@dataclass
class Group:
    name: str
    runs: list = field(default_factory=list)         # mlflow Run objects

    def values(self, metric: str) -> dict[str, float]:
        """seed -> value of `metric` of the seed's newest run (runs without the metric are left out;
        a run without a seed tag counts as a seed of its own)."""
        out = {}
        for r in sorted(self.runs, key=lambda r: r.info.start_time or 0):
            if metric in r.data.metrics:
                out[r.data.tags.get("seed", r.info.run_id)] = float(r.data.metrics[metric])
        return out


def lower_is_better(metric: str) -> bool:
    return metric.rsplit("/", 1)[-1] in ("logloss", "loss")


def wilcoxon(x: np.ndarray, y: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired samples (1.0 when every difference is 0)."""
    d = np.asarray(x, float) - np.asarray(y, float)
    if np.all(d == 0):
        return 1.0
    from scipy.stats import wilcoxon as _w
    return float(_w(x, y, zero_method="wilcox", alternative="two-sided").pvalue)


def min_wilcoxon_p(n: int) -> float:
    """The smallest two-sided Wilcoxon p that n paired seeds can give (every difference one sign)."""
    return 2.0 / 2 ** n if n else 1.0


TESTS = ("t", "wilcoxon")


def suite_filter(suite: str, filter_string: str) -> str:
    """The MLflow filter of a suite's seed runs (narrowed exactly by `suite_method`)."""
    like = f"tags.sweep LIKE '{suite.replace(chr(39), '')}.%.seeds'"
    return f"{like} AND {filter_string}" if filter_string.strip() else like


def suite_method(suite: str, run) -> str | None:
    """The method key of a seed run of `suite` (its sweep tag is `<suite>.<method>.seeds`), else None."""
    sweep = run.data.tags.get("sweep", "")
    head, tail = f"{suite}.", ".seeds"
    if sweep.startswith(head) and sweep.endswith(tail) and len(sweep) > len(head) + len(tail):
        return sweep[len(head):-len(tail)]
    return None


def select_runs(client, experiment: str | None, run_ids: list[str], filter_string: str) -> list:
    from mlflow.exceptions import MlflowException
    if run_ids:
        out = []
        for r in run_ids:
            try:
                out.append(client.get_run(r))
            except MlflowException:
                raise ConfigError(f"fleetrec compare: run {r!r}: no such MLflow run in this store "
                                  "(--tracking-uri names the store)") from None
        return out
    names = [experiment or "fleetrec"]
    exps = [client.get_experiment_by_name(n) for n in names]
    if any(e is None for e in exps):
        raise ConfigError(f"fleetrec compare: no MLflow experiment named {names[0]!r} in this store")
    try:
        runs = client.search_runs([e.experiment_id for e in exps], filter_string=filter_string, max_results=5000)
    except MlflowException as e:
        first = str(e.message).splitlines()[0]
        raise ConfigError(f"fleetrec compare: --filter {filter_string!r}: {first}") from None
    # finished runs only: a killed or superseded attempt (a trial restarted by --resume) is not a seed
    return [r for r in runs if r.data.tags.get("tune.parent") != "true" and "fleetrec.compare" not in r.data.tags
            and "fleetrec.suite" not in r.data.tags and r.info.status == "FINISHED"
            and r.data.tags.get("tune.superseded") != "true"]


def group_runs(runs: list, by: str, suite: str | None = None) -> list[Group]:
    groups: dict[str, Group] = {}
    for r in runs:
        if suite is not None:
            key = suite_method(suite, r)
            if key is None:                  # LIKE's `_` matched another suite's sweep
                continue
        else:
            key = r.data.tags.get(by) or r.data.params.get(by) or r.info.run_name or r.info.run_id
        groups.setdefault(key, Group(key)).runs.append(r)
    return [groups[k] for k in sorted(groups)]


def pick_metrics(groups: list[Group], patterns: list[str]) -> list[str]:
    have = sorted({m for g in groups for r in g.runs for m in r.data.metrics if m.startswith("best/")})
    if not have:
        raise ConfigError("fleetrec compare: the selected runs have no best/* metrics (runs log them when they end)")
    if patterns:
        picked = [m for p in patterns for m in have if fnmatch.fnmatchcase(m, p)]
        if not picked:
            raise ConfigError(f"fleetrec compare: --metrics {' '.join(patterns)} matches none of "
                              f"{', '.join(have[:12])}{' ...' if len(have) > 12 else ''}")
        return list(dict.fromkeys(picked))
    for headline in (["best/test/scenario_mean/auc", "best/test/scenario_mean/logloss"],
                     ["best/test/recall_at_20", "best/test/ndcg_at_20"],
                     ["best/test/auc", "best/test/gauc", "best/test/logloss"]):
        present = [m for m in headline if m in have]
        if present:
            return present
    return [m for m in have if m.startswith("best/test/")][:4] or have[:4]


def paired_test(group: Group, baseline: Group, metric: str, test: str = "t") -> tuple[float, float, int] | None:
    """(mean difference group - baseline, p-value, seeds) over the seeds both have; None below 2 seeds."""
    a, b = group.values(metric), baseline.values(metric)
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return None
    x, y = np.array([a[s] for s in seeds]), np.array([b[s] for s in seeds])
    diff = x - y
    if test == "wilcoxon":
        return float(diff.mean()), wilcoxon(x, y), len(seeds)
    if np.allclose(diff, diff[0]):                     # identical differences: the t statistic is undefined
        return float(diff.mean()), (0.0 if diff[0] != 0 else 1.0), len(seeds)
    from scipy.stats import ttest_rel
    return float(diff.mean()), float(ttest_rel(x, y).pvalue), len(seeds)


def _cell(values: list[float]) -> str:
    if not values:
        return "-"
    sd = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return f"{np.mean(values):.4f} ± {sd:.4f}"


def table(groups: list[Group], metrics: list[str], baseline: str | None,
          test: str = "t") -> tuple[list[str], list[list[str]]]:
    base = next((g for g in groups if g.name == baseline), None)
    if baseline is not None and base is None:
        raise ConfigError(f"fleetrec compare: --baseline {baseline!r} is not a group; groups: "
                          + ", ".join(g.name for g in groups))
    header = ["group", "runs"] + [m[len("best/"):] for m in metrics]
    if base is not None:
        header += [f"vs {base.name}: {m[len('best/'):]}" for m in metrics]
    rows = []
    for g in groups:
        row = [g.name, str(len(g.runs))] + [_cell(list(g.values(m).values())) for m in metrics]
        if base is not None:
            for m in metrics:
                if g is base:
                    row.append("baseline")
                    continue
                t = paired_test(g, base, m, test)
                if t is None:
                    row.append("fewer than 2 paired seeds")
                    continue
                d, p, n = t
                better = (d < 0) if lower_is_better(m) else (d > 0)
                verdict = "better" if better and p < ALPHA else ("worse" if not better and p < ALPHA else "no difference")
                word = "Wilcoxon p" if test == "wilcoxon" else "p"
                row.append(f"{d:+.4f} ({word}={p:.3g}, {n} seeds): {verdict}")
        rows.append(row)
    return header, rows


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def figure(groups: list[Group], metrics: list[str], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(metrics), figsize=(max(4.0, 1.2 * len(groups)) * len(metrics), 3.8), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        vals = [list(g.values(m).values()) for g in groups]
        means = [np.mean(v) if v else math.nan for v in vals]
        sds = [np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in vals]
        ax.bar(range(len(groups)), means, yerr=sds, capsize=3, color="#4c78a8")
        ax.set_xticks(range(len(groups)), [g.name for g in groups], rotation=45, ha="right", fontsize=8)
        ax.set_title(m[len("best/"):], fontsize=9)
        finite = [x for x in means if not math.isnan(x)]
        if finite:
            lo, hi = min(finite), max(finite)
            pad = (hi - lo) * 0.5 + 1e-3
            ax.set_ylim(lo - pad - max(sds), hi + pad + max(sds))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare(tracking_uri: str, experiment: str | None = None, run_ids: list[str] = (), filter_string: str = "",
            group_by: str = "config", metrics: list[str] = (), baseline: str | None = None,
            out: str | Path = "compare", log: bool = False, test: str = "t", suite: str | None = None) -> str:
    """Build the comparison, write its files into `out`, optionally log it; returns the Markdown table."""
    if test not in TESTS:
        raise ConfigError(f"fleetrec compare: --test {test!r}: expected one of {', '.join(TESTS)}")
    from mlflow.tracking import MlflowClient
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri[len("sqlite:///"):]).is_file():
        raise ConfigError(f"fleetrec compare: --tracking-uri {tracking_uri}: no MLflow store there (runs log to "
                          "tracking.tracking_uri of their config; this reads, it never creates a store)")
    client = MlflowClient(tracking_uri=tracking_uri)
    if suite is not None:
        if run_ids:
            raise ConfigError("fleetrec compare: --suite selects the suite's seed runs; give run ids or --suite, not both")
        filter_string = suite_filter(suite, filter_string)
    runs = select_runs(client, experiment, list(run_ids), filter_string)
    groups = group_runs(runs, group_by, suite)
    if not groups:
        raise ConfigError(f"fleetrec compare: no runs match (experiment {experiment or 'fleetrec'!r}, "
                          f"filter {filter_string!r})")
    picked = pick_metrics(groups, list(metrics))
    header, rows = table(groups, picked, baseline, test)
    md = markdown(header, rows)
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    (d / "compare.md").write_text(md + "\n")
    with open(d / "compare.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([header, *rows])
    figure(groups, picked, d / "compare.png")
    if log:
        import mlflow
        mlflow.set_tracking_uri(tracking_uri)
        from fleetrec.simulator.tracking import use_experiment
        use_experiment(experiment or "fleetrec")
        with mlflow.start_run(run_name=f"compare·{len(groups)} groups", tags={
                "fleetrec.compare": "true", "mlflow.note.content": f"{group_by} x {', '.join(picked)}"}):
            mlflow.log_params({"group_by": "suite method" if suite else group_by, "filter": filter_string[:500],
                               "baseline": str(baseline), "test": test,
                               "metrics": json.dumps(picked)[:500], "runs": len(runs)})
            for f in ("compare.md", "compare.csv", "compare.png"):
                mlflow.log_artifact(str(d / f))
    return md
