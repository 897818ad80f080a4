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

Writes into `--out`: `compare.md` and `compare.csv` (the table); `compare.png`, mean ± std per group,
one panel per metric -- bars, or a line over the values when the groups are a swept number
(`--group-by sampled.privacy.local.scale`: rows and points in numeric order); `compare_curves.png`,
the validation learning curve of the first metric per group (mean over seeds, ±std band); and, for
scenario runs, `compare_scenarios.png`, grouped bars of test AUC per scenario x task (scenario names
from the runs). With `--log` they are recorded as an MLflow run tagged `fleetrec.compare`.

Length: selecting, grouping, the table with its tests and the three figures are one verb's steps,
each short; split, the figures would need the grouping's types from here anyway.
"""
from __future__ import annotations

import csv
import fnmatch
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fleetrec.simulator.config_loader import ConfigError

ALPHA = 0.05
FILES = ("compare.md", "compare.csv", "compare.png", "compare_scenarios.png", "compare_curves.png")


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


def _sd(values) -> float:
    """Sample standard deviation over seeds; 0 for a single seed."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _cell(values: list[float]) -> str:
    if not values:
        return "-"
    sd = _sd(values)
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


def numeric_values(groups: list[Group]) -> list[float] | None:
    """The groups' names as numbers when every one is a number (a sweep grouped by a sampled value,
    e.g. `--group-by sampled.privacy.local.scale`), else None."""
    try:
        xs = [float(g.name) for g in groups]
    except ValueError:
        return None
    return xs if len(groups) >= 2 and all(math.isfinite(x) for x in xs) else None


def _save(plt, fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _axes(n: int, width: float):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, n, figsize=(width * n, 3.8), squeeze=False)
    return plt, fig, axes[0]


def _colors(plt, n: int) -> list:
    """n colours, none repeated: tab10 up to ten groups, tab20 up to twenty (its pairs are light and
    dark shades of one hue), then evenly spaced samples of a continuous map."""
    if n <= 20:
        cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
        return [cmap(i) for i in range(n)]
    cmap = plt.get_cmap("turbo")
    return [cmap(i / (n - 1)) for i in range(n)]


def figure(groups: list[Group], metrics: list[str], path: Path, xlabel: str | None = None) -> None:
    """One panel per metric, mean ± std over seeds: bars per group, or, when the groups are the
    values of a swept number (`xlabel` names it), a line over those values (log axis when they
    are positive and span a factor of 8 or more)."""
    xs = numeric_values(groups)
    plt, fig, axes = _axes(len(metrics), 4.5 if xs else max(4.0, 1.2 * len(groups)))
    for ax, m in zip(axes, metrics):
        vals = [list(g.values(m).values()) for g in groups]
        means = [np.mean(v) if v else math.nan for v in vals]
        sds = [_sd(v) for v in vals]
        if xs:
            ax.errorbar(xs, means, yerr=sds, marker="o", capsize=3, color="#4c78a8")
            if min(xs) > 0 and max(xs) / min(xs) >= 8:        # ranks 1..16, temperatures 0.1..1e6
                ax.set_xscale("log")
            ax.set_xticks(xs, [g.name for g in groups], fontsize=8)
            ax.minorticks_off()
            if xlabel:
                ax.set_xlabel(xlabel, fontsize=9)
        else:
            ax.bar(range(len(groups)), means, yerr=sds, capsize=3, color="#4c78a8")
            ax.set_xticks(range(len(groups)), [g.name for g in groups], rotation=45, ha="right", fontsize=8)
            finite = [x for x in means if not math.isnan(x)]
            if finite:
                lo, hi = min(finite), max(finite)
                pad = (hi - lo) * 0.5 + 1e-3
                ax.set_ylim(lo - pad - max(sds), hi + pad + max(sds))
        ax.set_title(m[len("best/"):], fontsize=9)
    _save(plt, fig, path)


_SCENARIO_BEST = re.compile(r"^best/test/s(\d+)/([^/]+)/auc$")
MAX_SCENARIO_BARS = 60


def scenario_cells(groups: list[Group]) -> list[tuple[str, str, list[list[float]]]]:
    """(label, metric, per-group seed values) for each scenario x task test AUC the runs have,
    scenarios in index order, labelled with the names the runs logged (`scenario.s<k>` params)."""
    keys: dict[tuple[int, str], str] = {}
    names: dict[int, str] = {}
    for g in groups:
        for r in g.runs:
            for k in r.data.metrics:
                m = _SCENARIO_BEST.match(k)
                if m:
                    keys[(int(m.group(1)), m.group(2))] = k
            for p, v in r.data.params.items():
                if p.startswith("scenario.s") and p[len("scenario.s"):].isdigit():
                    names.setdefault(int(p[len("scenario.s"):]), v)
    return [(f"{names.get(s, f's{s}')} · {task}", key, [list(g.values(key).values()) for g in groups])
            for (s, task), key in sorted(keys.items())]


def scenario_figure(groups: list[Group], path: Path) -> bool:
    """Grouped bars, one cluster per scenario x task (test AUC at the best round), one bar per
    group; False (nothing written) when the runs have no per-scenario metrics."""
    cells = scenario_cells(groups)
    if not cells:
        return False
    shown = cells[:MAX_SCENARIO_BARS]
    plt, fig, (ax,) = _axes(1, min(40.0, max(6.0, 0.25 * len(shown) * len(groups))))   # matplotlib: < 2^16 px
    width = 0.8 / len(groups)
    lo = 1.0
    colors = _colors(plt, len(groups))
    for j, g in enumerate(groups):
        means = [np.mean(c[2][j]) if c[2][j] else math.nan for c in shown]
        sds = [_sd(c[2][j]) for c in shown]
        ax.bar([i + j * width for i in range(len(shown))], means, width=width, yerr=sds, capsize=1, label=g.name,
               color=colors[j])
        lo = min([lo] + [x for x in means if not math.isnan(x)])
    ax.set_xticks([i + width * (len(groups) - 1) / 2 for i in range(len(shown))], [c[0] for c in shown],
                  rotation=45, ha="right", fontsize=7)
    ax.set_ylim(max(0.0, lo - 0.05), 1.0)
    more = f" (first {len(shown)} of {len(cells)})" if len(cells) > len(shown) else ""
    ax.set(ylabel="test AUC at the best round", title=f"scenario x task{more}")
    ax.legend(fontsize=7, ncol=max(1, len(groups) // 8))
    _save(plt, fig, path)
    return True


def curve(client, group: Group, key: str) -> tuple[list[int], list[float], list[float]]:
    """The per-round history of `key` over the group's seeds (each seed's newest run): steps, mean
    and std at each step that at least one seed reached (runs that stopped early end sooner)."""
    newest = {}
    for r in sorted(group.runs, key=lambda r: r.info.start_time or 0):
        newest[r.data.tags.get("seed", r.info.run_id)] = r
    at: dict[int, list[float]] = {}
    for r in newest.values():
        for m in client.get_metric_history(r.info.run_id, key):
            at.setdefault(int(m.step), []).append(float(m.value))
    steps = sorted(at)
    return (steps, [float(np.mean(at[s])) for s in steps],
            [_sd(at[s]) for s in steps])


def curves_figure(client, groups: list[Group], metric: str, path: Path) -> str | None:
    """Validation learning curves of `metric` (`best/test/auc` -> `val/auc` per round), one line per
    group, mean over seeds with a ±std band; returns the key drawn, None when no run logged it."""
    parts = metric.split("/", 2)
    if len(parts) < 3:                           # best/best_round and the like: no per-round history
        return None
    key = "val/" + parts[2]
    lines = [(g.name, curve(client, g, key)) for g in groups]
    if not any(steps for _, (steps, _m, _s) in lines):
        return None
    plt, fig, (ax,) = _axes(1, 7.0)
    colors = _colors(plt, len(lines))
    for (name, (steps, mean, sd)), color in zip(lines, colors):
        if steps:
            rounds = [s + 1 for s in steps]          # rounds counted from 1, as the progress bar does
            ax.plot(rounds, mean, label=name, lw=1.2, color=color)
            ax.fill_between(rounds, np.subtract(mean, sd), np.add(mean, sd), alpha=0.15, color=color)
    ax.set(xlabel="round", ylabel=f"{key} (mean over seeds)")
    ax.legend(fontsize=7, ncol=max(1, len(groups) // 8))
    _save(plt, fig, path)
    return key


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
    xs = numeric_values(groups)
    if xs:                                       # a swept number: rows in its order, not as text
        groups = [g for _, g in sorted(zip(xs, groups), key=lambda t: t[0])]
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
    figure(groups, picked, d / "compare.png", xlabel=group_by.removeprefix("sampled."))
    files = list(FILES[:3])
    for f in FILES[3:]:                          # a figure of an earlier comparison would mislead
        (d / f).unlink(missing_ok=True)
    if scenario_figure(groups, d / "compare_scenarios.png"):
        files.append("compare_scenarios.png")
    if curves_figure(client, groups, picked[0], d / "compare_curves.png"):
        files.append("compare_curves.png")
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
            for f in files:
                mlflow.log_artifact(str(d / f))
    return md
