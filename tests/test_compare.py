"""`fleetrec compare`: groups MLflow runs by a tag, mean ± std over seeds, paired tests against a
baseline, Markdown / CSV / PNG written and (with --log) logged as a run."""
from __future__ import annotations

import csv

import pytest

from fleetrec.simulator.cli import main
from fleetrec.simulator.compare import compare
from fleetrec.simulator.config_loader import ConfigError


def _store(tmp_path):
    """Two configs x 3 seeds: `better` beats `base` by 0.02 AUC on every seed (+ noise), and `same`
    equals `base` up to alternating noise."""
    import mlflow
    from mlflow.tracking import MlflowClient
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("fleetrec")
    aucs = {"base": [0.70, 0.72, 0.71], "better": [0.721, 0.739, 0.731], "same": [0.701, 0.719, 0.711]}
    for config, values in aucs.items():
        for seed, auc in enumerate(values):
            r = client.create_run(exp, tags={"config": config, "seed": str(seed), "algorithm": "fedavg",
                                             "dataset": "epinions"}, run_name=f"{config}·seed{seed}")
            client.log_metric(r.info.run_id, "best/test/auc", auc)
            client.log_metric(r.info.run_id, "best/test/logloss", 1 - auc)
            client.set_terminated(r.info.run_id)
    # a killed attempt of base seed 0 (a trial restarted by --resume) with a wild value: never a seed
    r = client.create_run(exp, tags={"config": "base", "seed": "0", "algorithm": "fedavg", "dataset": "epinions"})
    client.log_metric(r.info.run_id, "best/test/auc", 0.1)
    client.set_terminated(r.info.run_id, "KILLED")
    mlflow.set_tracking_uri(uri)
    return uri


def test_table_over_seeds_with_paired_tests(tmp_path):
    uri = _store(tmp_path)
    md = compare(uri, baseline="base", out=tmp_path / "out")
    lines = md.splitlines()
    assert lines[0] == ("| group | runs | test/auc | test/logloss | vs base: test/auc | vs base: test/logloss |")
    rows = {l.split(" | ")[0].strip("| "): l for l in lines[2:]}
    assert set(rows) == {"base", "better", "same"}
    assert "| 3 | 0.7100 ± 0.0100 |" in rows["base"]
    # paired differences 0.021, 0.019, 0.021: t = 0.0203 / (0.00115 / sqrt 3) = 30.5, two-sided p = 0.00107
    assert "| +0.0203 (p=0.00107, 3 seeds): better | -0.0203 (p=0.00107, 3 seeds): better |" in rows["better"]
    assert "no difference" in rows["same"]
    assert (tmp_path / "out" / "compare.png").stat().st_size > 0
    with open(tmp_path / "out" / "compare.csv") as fh:
        assert [r[0] for r in csv.reader(fh)] == ["group", "base", "better", "same"]


def test_cli_filters_logs_and_refuses_what_matches_nothing(tmp_path, capsys):
    uri = _store(tmp_path)
    assert main(["compare", "--tracking-uri", uri, "--filter", "tags.config != 'same'", "--metrics", "best/test/auc",
                 "--out", str(tmp_path / "o"), "--log"]) == 0
    out = capsys.readouterr().out
    assert "better" in out and "same" not in out
    from mlflow.tracking import MlflowClient
    logged = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("fleetrec").experiment_id],
                                           filter_string="tags.`fleetrec.compare` = 'true'")
    assert len(logged) == 1 and logged[0].data.params["group_by"] == "config"
    assert main(["compare", "--tracking-uri", uri, "--filter", "tags.dataset = 'nowhere'"]) == 2
    assert main(["compare", "--tracking-uri", uri, "--metrics", "best/val/*"]) == 2
    with pytest.raises(ConfigError, match="--baseline 'nope' is not a group; groups: base, better, same"):
        compare(uri, baseline="nope", out=tmp_path / "x")
    with pytest.raises(ConfigError, match="run 'abc123': no such MLflow run in this store"):
        compare(uri, run_ids=["abc123"], out=tmp_path / "x")
    with pytest.raises(ConfigError, match="--filter 'tags.x ==== 3': "):
        compare(uri, filter_string="tags.x ==== 3", out=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_suite_rows_newest_run_per_seed_and_wilcoxon(tmp_path):
    """--suite: the children of `<suite>.<method>.seeds` sweeps, one row per method key (a suite whose
    name LIKE's `_` also matches is left out); a re-run seed counts once, with its newest run;
    --test wilcoxon gives the exact signed-rank p."""
    from mlflow.tracking import MlflowClient
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("fleetrec")
    ref = [0.70, 0.71, 0.72, 0.73]

    def seed_run(sweep, seed, auc, start):
        r = client.create_run(exp, start_time=start, tags={"sweep": sweep, "seed": str(seed)})
        client.log_metric(r.info.run_id, "best/test/auc", auc)
        client.set_terminated(r.info.run_id)

    for s, a in enumerate(ref):
        seed_run("s_1.ref.seeds", s, a, 1000 + s)
        seed_run("s_1.m.seeds", s, a + 0.01 * (s + 1), 1000 + s)
        seed_run("sx1.m.seeds", s, 0.1, 1000 + s)                 # another suite: `_` matches `x`
    seed_run("s_1.m.seeds", 0, 0.5, 999)                         # an older run of seed 0: not counted
    seed_run("s_1.m.tune", 0, 0.9, 1000)                         # a tune trial: not a seed run
    md = compare(uri, suite="s_1", baseline="ref", test="wilcoxon", out=tmp_path / "o")
    rows = {l.split(" | ")[0].strip("| "): l for l in md.splitlines()[2:]}
    assert set(rows) == {"ref", "m"}
    assert "| 5 | 0.7400 ± 0.0258 |" in rows["m"]                  # 5 runs, 4 seeds: 0.71, 0.73, 0.75, 0.77
    # every one of 4 differences positive: the exact two-sided p is 2 / 2^4
    assert "+0.0250 (Wilcoxon p=0.125, 4 seeds): no difference" in rows["m"]
    with pytest.raises(ConfigError, match="--test 'z': expected one of t, wilcoxon"):
        compare(uri, suite="s_1", test="z", out=tmp_path / "x")
    with pytest.raises(ConfigError, match="no runs match"):
        compare(uri, suite="nosuch", out=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_a_swept_number_sorts_numerically_and_draws_scenarios_and_curves(tmp_path):
    """Groups that are the values of a swept number come in numeric order (2 before 10); runs with
    per-scenario metrics get the scenario x task bars, labelled with the names they logged; the
    learning curve is the per-round mean and std over the seeds that reached each round."""
    from mlflow.tracking import MlflowClient

    from fleetrec.simulator.compare import Group, curve, scenario_cells
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("fleetrec")
    history = {0: [0.5, 0.6], 1: [0.7, 0.8, 0.9]}           # seed 1 ran one round longer
    for value in ("2", "10", "0.5"):
        for seed, vals in history.items():
            r = client.create_run(exp, tags={"sampled.model.rank": value, "seed": str(seed)})
            rid = r.info.run_id
            for step, v in enumerate(vals):
                client.log_metric(rid, "val/auc", v + float(value) / 100, step=step)
            client.log_metric(rid, "best/test/auc", max(vals) + float(value) / 100)
            client.log_metric(rid, "best/test/s0/like/auc", 0.6)
            client.log_metric(rid, "best/test/s1/like/auc", 0.7 + seed / 100)
            client.log_param(rid, "scenario.s0", "US")
            client.log_param(rid, "scenario.s1", "FR")
            client.set_terminated(rid)
    out = tmp_path / "o"
    md = compare(uri, group_by="sampled.model.rank", metrics=["best/test/auc"], baseline="2", out=out)
    assert [l.split(" | ")[0].strip("| ") for l in md.splitlines()[2:]] == ["0.5", "2", "10"]
    assert md.splitlines()[3] == "| 2 | 2 | 0.7700 ± 0.2121 | baseline |"     # rank 2: 0.62 and 0.92
    for f in ("compare.png", "compare_scenarios.png", "compare_curves.png"):
        assert (out / f).stat().st_size > 0, f
    runs = client.search_runs([exp], filter_string="tags.`sampled.model.rank` = '0.5'")
    steps, mean, sd = curve(client, Group("0.5", runs), "val/auc")
    assert steps == [0, 1, 2]
    assert mean == pytest.approx([0.605, 0.705, 0.905]) and sd == pytest.approx([0.1414214, 0.1414214, 0.0])
    cells = scenario_cells([Group("0.5", runs)])
    assert [(label, key) for label, key, _ in cells] == [("US · like", "best/test/s0/like/auc"),
                                                           ("FR · like", "best/test/s1/like/auc")]
    assert sorted(cells[1][2][0]) == pytest.approx([0.70, 0.71])
    # a metric without a split has no per-round history to draw (it used to raise IndexError)
    from fleetrec.simulator.compare import curves_figure
    assert curves_figure(client, [Group("0.5", runs)], "best/best_round", tmp_path / "c.png") is None
    # the plain store of the other tests has neither: written into the same folder, the two figures
    # of the comparison above are gone, not left to describe this one
    (tmp_path / "plain").mkdir()
    uri2 = _store(tmp_path / "plain")
    assert main(["compare", "--tracking-uri", uri2, "--out", str(out)]) == 0
    assert not (out / "compare_scenarios.png").exists()
    assert not (out / "compare_curves.png").exists()
