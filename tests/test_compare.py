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
