"""`fleetrec suite`: the suite YAML's checks, the paired tests by hand, and a tiny suite on the
synthetic MF data end to end (tune, seeds, report, MLflow, --resume, a changed suite refused)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from fleetrec.simulator.config_loader import ConfigError
from fleetrec.simulator.suite import load_suite
from fleetrec.simulator.suite_report import min_wilcoxon_p, paired_bootstrap, wilcoxon

ROOT = Path(__file__).resolve().parents[1]
SYNTH = ROOT / "suites" / "pmtrec_synthetic.yaml"


# ------------------------------------------------------------------------------ statistics
def test_wilcoxon_exact_p_values_by_hand():
    # 6 pairs, all differences positive and distinct: W- = 0, exact two-sided p = 2 / 2^6
    x, y = np.array([1.0, 2, 3, 4, 5, 6]), np.array([0.9, 1.8, 2.7, 3.6, 4.5, 5.4])
    assert wilcoxon(x, y) == pytest.approx(2 / 64)
    assert min_wilcoxon_p(6) == pytest.approx(2 / 64) and min_wilcoxon_p(5) == pytest.approx(0.0625)
    # five seeds can never be significant at 0.05, whatever the data
    assert wilcoxon(x[:5], y[:5]) == pytest.approx(0.0625)
    assert wilcoxon(x, x) == 1.0
    # one negative difference of the smallest rank: W- = 1 -> p = 2 * 2/64
    y2 = y.copy()
    y2[0] = 1.1
    assert wilcoxon(x, y2) == pytest.approx(4 / 64)


def _frame(users, values, metric="recall@20"):
    return pd.DataFrame({"user": users, metric: values})


def test_paired_bootstrap_over_users():
    g = np.random.default_rng(0)
    users = np.arange(400)
    ref = [_frame(users, g.random(400)) for _ in range(3)]
    same = paired_bootstrap(ref, ref, "recall@20", 500)
    assert same["diff"] == 0 and same["p"] == 1.0 and same["users"] == 400
    shifted = [_frame(users, f["recall@20"] + 0.05 + 0.01 * g.standard_normal(400)) for f in ref]
    out = paired_bootstrap(shifted, ref, "recall@20", 500)
    assert out["diff"] == pytest.approx(0.05, abs=0.003) and out["p"] == pytest.approx(1 / 501)
    assert out["ci95"][0] < out["diff"] < out["ci95"][1] and out["ci95"][0] > 0.04
    noise = [_frame(users, f["recall@20"] + 0.2 * g.standard_normal(400)) for f in ref]
    assert paired_bootstrap(noise, ref, "recall@20", 500)["p"] > 0.05
    # only users ranked in every run count; rows are matched by user id, not position
    part = [_frame(users[::-1][:300], f["recall@20"].to_numpy()[::-1][:300] + 0.05) for f in ref]
    out = paired_bootstrap(part, ref, "recall@20", 200)
    assert out["users"] == 300 and out["diff"] == pytest.approx(0.05)


# ------------------------------------------------------------------------------ the YAML
def _suite(tmp_path, text: str) -> Path:
    p = tmp_path / "s.yaml"
    p.write_text(text)
    return p


M = (f"methods:\n  a: {{config: {ROOT / 'configs/pmtrec_synthetic.yaml'}, space: {{train.lr: {{loguniform: [0.001, 0.01]}}}}}}\n"
     f"  b: {{config: {ROOT / 'configs/pmtrec_synthetic.yaml'}, overrides: ['algorithm.tasks=[bpr]']}}\n")


@pytest.mark.parametrize("text, message", [
    ("reference: a\n" + M + "budget: {trial: 3}\n", "budget.trial: unknown key"),
    ("reference: c\n" + M, "reference: got 'c', expected one of the methods: a, b"),
    ("reference: a\nmethods: {a: {config: x.yaml}}\n", "methods: expected a mapping of at least two"),
    ("reference: a\n" + M + "final: {seeds: [0]}\n", "final.seeds: expected at least two distinct seeds"),
    ("reference: a\n" + M + "metric: test/recall@20\n", "metric: got 'test/recall@20', expected a validation metric"),
    ("reference: a\n" + M + "metric: val/auc\n", "methods.a (tune stage): metric: got 'val/auc'"),
    ("reference: a\n" + M.replace("train.lr", "train.lrr"), "methods.a (tune stage): space.train.lrr: not a key"),
    ("reference: a\n" + M.replace("configs/pmtrec_synthetic.yaml, overrides", "nope.yaml, overrides"),
     "methods.b.config: config file"),
    ("reference: a\n" + M.replace("overrides:", "tuned_as: b, overrides:"),
     "methods.b.tuned_as: got 'b', expected another method of this suite that has a space"),
    ("reference: a\n" + M.replace("overrides:", "tuned_as: a, space: {train.lr: {uniform: [0.001, 0.01]}}, overrides:"),
     "methods.b: give either a space or tuned_as"),
])
def test_bad_suite_is_one_line_naming_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_suite(_suite(tmp_path, text))


def test_shipped_suites_load_and_give_every_method_the_same_budget():
    for path in sorted((ROOT / "suites").glob("*.yaml")):
        suite = load_suite(path)
        budgets = {json.dumps({k: m.tune_yaml[k] for k in ("num_samples", "search_alg", "seed", "scheduler")},
                              sort_keys=True) for m in suite.methods.values()}
        assert len(budgets) == 1, path
        rounds = {next(o for o in m.tune_yaml["overrides"] if o.startswith("rounds=")) for m in suite.methods.values()}
        assert rounds == {f"rounds={suite.cfg.budget.rounds}"}, path
        assert len(suite.cfg.final.seeds) >= 6, path    # >= 6: Wilcoxon can reach 0.05
        assert suite.per_user == all("@" in m for m in suite.cfg.report), path
        for m in suite.methods.values():          # the untuned config is the first trial of every method
            assert not (m.tune_yaml["space"] and m.cfg.tuned_as), (path, m.key)
            if not m.tune_yaml["space"] and not m.cfg.tuned_as:   # untuned only where nothing trains
                from fleetrec.simulator.suite import _sweep
                assert getattr(_sweep(suite, m, "tune", check=True).base_cfg.algorithm, "adapt", True) is False, \
                    (path, m.key)
            if m.tune_yaml["space"]:
                (point,) = m.tune_yaml["points_to_evaluate"]
                assert set(point) == set(m.tune_yaml["space"]), (path, m.key)


def test_an_ablation_reruns_at_the_tuned_values_of_its_method(tmp_path, monkeypatch):
    """`tuned_as`: no tune stage; its seeds stage carries the other method's best values (so its
    fingerprint changes when that method is retuned); refused until that method is tuned."""
    from fleetrec.simulator.suite import _borrowed_values, _seeds_yaml
    monkeypatch.chdir(tmp_path)
    suite = load_suite(_suite(tmp_path, "reference: a\n" + M.replace("overrides:", "tuned_as: a, overrides:")))
    b = suite.methods["b"]
    with pytest.raises(ConfigError, match=r"methods.b.tuned_as: the tune stage of a has not finished"):
        _borrowed_values(suite, b)
    suite.method_dir("a").mkdir(parents=True)
    (suite.method_dir("a") / "tune.json").write_text(json.dumps({"best": {"train.lr": 0.0042}, "trials": 6}))
    rec = _borrowed_values(suite, b)
    assert rec["best"] == {"train.lr": 0.0042} and rec["tuned_as"] == "a" and rec["trials"] == 0
    over = _seeds_yaml(suite, b, rec["best"])["overrides"]
    assert "algorithm.tasks=[bpr]" in over and "train.lr=0.0042" in over
    assert json.loads((suite.method_dir("b") / "tune.json").read_text())["tuned_as"] == "a"


def test_a_pointwise_report_is_built_from_the_stage_records_alone(tmp_path, monkeypatch):
    """The PF-MSMTrec suite's kind: AUC and log-loss (lower is better) over scenarios, no bootstrap,
    an ablation `tuned_as` its method. The report comes from tune.json / seeds.json only (no Tune
    folder, no MLflow run of the seeds), with Wilcoxon p-values computed by hand."""
    from fleetrec.simulator.suite_report import write_report
    monkeypatch.chdir(tmp_path)
    src = ROOT / "suites" / "pf_msmtrec_epinions.yaml"
    raw = yaml.safe_load(src.read_text())
    raw.update(results_dir="out", storage_path="state", tracking_uri=f"sqlite:///{tmp_path / 'm.db'}", experiment="t")
    raw["budget"]["rounds"] = 30
    raw["methods"] = {k: {**raw["methods"][k], "config": str(ROOT / "configs" / Path(raw["methods"][k]["config"]).name)}
                      for k in ("pf_msmtrec", "local", "no_template")}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    suite = load_suite(tmp_path / "s.yaml")
    assert not suite.per_user
    rng = np.random.default_rng(0)
    base = rng.normal(0.55, 0.01, 6)
    shift = {"pf_msmtrec": 0.0, "local": 0.01, "no_template": 0.0001}
    for key, d in shift.items():
        mdir = suite.method_dir(key)
        mdir.mkdir(parents=True)
        tune = {"best": {"train.lr": 0.01}, "trials": 8, "stopped_early": 8 if key == "pf_msmtrec" else 6} \
            if key != "no_template" else {"best": {"train.lr": 0.01}, "trials": 0, "tuned_as": "pf_msmtrec"}
        (mdir / "tune.json").write_text(json.dumps(tune))
        best = 40 if key == "local" else 3                # local's seed runs peak after the 30-round tuning cap
        runs = [{"seed": s, "run_id": f"{key}{s}", "best_round": best, "rounds_run": best + 9, "rounds_cap": 100,
                 "metrics": {"test/scenario_mean/auc": float(base[s] + d + (1e-4 * s if key == "no_template" else 0)),
                             "test/scenario_mean/interaction/auc": 0.5, "test/scenario_mean/like/auc": 0.6,
                             "test/scenario_mean/logloss": float(0.7 - d)}} for s in range(6)]
        (mdir / "seeds.json").write_text(json.dumps({"parent_run_id": "x", "runs": runs, "wall_s": 60.0}))
    md = write_report(suite, log=lambda s: None)
    assert "PF-MSMTrec w/o template 0.0 + 1.0" in md         # an ablation spends no tuning time of its own
    doc = json.loads((tmp_path / "out" / "pf_msmtrec_epinions.json").read_text())
    local = doc["methods"]["local"]["vs_reference"]
    # local is higher on all six seeds: the exact two-sided Wilcoxon p is 2/2^6
    assert local["test/scenario_mean/auc"]["wilcoxon_p"] == pytest.approx(2 / 64)
    assert local["test/scenario_mean/auc"]["verdict"] == "better"
    assert local["test/scenario_mean/logloss"]["verdict"] == "better"            # lower log-loss is better
    assert "bootstrap" not in local["test/scenario_mean/auc"]
    assert "| PF-MSMTrec w/o template | as PF-MSMTrec |" in md
    assert doc["methods"]["no_template"]["vs_reference"]["test/scenario_mean/auc"]["wilcoxon_p"] == pytest.approx(2 / 64)
    assert (tmp_path / "out" / "pf_msmtrec_epinions.png").is_file()
    # the tuning horizon: local peaks at round 41 > 30 and 2 of its 8 trials ran to the cap; the others are clean
    assert doc["horizon"] == {"local": {"median_best_round": 41, "tuning_cap": 30, "trials_to_cap": 2}}
    assert "**Tuning horizon.** The tuning trials stopped at 30 rounds. The seed runs peak after that, median best " \
           "round, for: local-only (round 41). Tuning trials still improving when the cap cut them: local-only 2/8." in md


def test_a_shared_pretrain_stage_runs_once_and_is_refused_when_changed(tmp_path, monkeypatch):
    """`pretrain:` -- stage 1 once into <state>/<suite>/pretrain/backbone.pt, which `{backbone}` names
    in method overrides; --check before it exists; a second sitting reuses it; a changed stage-1
    config is refused; `{backbone}` without the block is one line."""
    from fleetrec.simulator.suite import run_pretrain
    monkeypatch.chdir(tmp_path)
    cfg = ROOT / "configs" / "fedpa_synthetic.yaml"
    tiny = "[data.num_clients=60, data.rows_min=20, data.rows_max=30, model.pretrain.epochs=2]"
    text = (f"reference: a\nstorage_path: state\ntracking_uri: sqlite:///{tmp_path / 'm.db'}\nexperiment: t\n"
            f"pretrain: {{config: {cfg}, overrides: PRE}}\n"
            f"methods:\n  a: {{config: {cfg}, overrides: ['model.backbone={{backbone}}'], "
            "space: {train.lr: {choice: [0.01, 0.1]}}}\n"
            f"  b: {{config: {cfg}, overrides: ['model.backbone={{backbone}}', model.user_lora=none]}}\n"
            f"metric: val/auc\nreport: [auc]\noverrides: {tiny}\n")
    suite = load_suite(_suite(tmp_path, text.replace("PRE", "[]")))     # checked with a random init: no file yet
    backbone = "state/s/pretrain/backbone.pt"
    assert suite.pretrain.backbone == backbone and not Path(backbone).exists()
    assert f"model.backbone={backbone}" in suite.methods["b"].tune_yaml["overrides"]
    logs = []
    rec = run_pretrain(suite, logs.append)
    assert Path(backbone).is_file() and rec["meta"]["open_clients"] == 12 and rec["meta"]["best_epoch"] >= 0
    stamp = Path(backbone).stat().st_mtime_ns
    suite = load_suite(_suite(tmp_path, text.replace("PRE", "[]")))     # now checked with the real file
    assert run_pretrain(suite, logs.append)["sha256"] == rec["sha256"] and Path(backbone).stat().st_mtime_ns == stamp
    assert logs[-1].startswith("pretrain: done before")
    changed = load_suite(_suite(tmp_path, text.replace("PRE", "[model.pretrain.epochs=3]")))
    with pytest.raises(ConfigError, match="pre-trained with a different config or overrides"):
        run_pretrain(changed, logs.append)
    with pytest.raises(ConfigError, match=r"methods.a.overrides: \{backbone\} names the suite's pre-trained backbone"):
        load_suite(_suite(tmp_path, text.replace("pretrain: {config: " + str(cfg) + ", overrides: PRE}\n", "")))


def test_the_client_rate_floor_is_a_row_of_a_pointwise_auc_table(tmp_path, monkeypatch):
    """The reference's seed runs carry the no-model client-rate AUC of their data; the report adds
    it as a row, tested against the reference like a method (here lower on every seed: p = 2/2^6)."""
    from fleetrec.simulator.suite_report import FLOOR_LABEL, write_report
    monkeypatch.chdir(tmp_path)
    cfg = ROOT / "configs" / "fedpa_synthetic.yaml"
    text = (f"reference: a\nstorage_path: state\nresults_dir: out\ntracking_uri: sqlite:///{tmp_path / 'm.db'}\n"
            f"experiment: t\nmetric: val/auc\nreport: [auc, gauc]\nmethods:\n"
            f"  a: {{config: {cfg}, overrides: [model.backbone=], space: {{train.lr: {{choice: [0.01, 0.1]}}}}}}\n"
            f"  b: {{config: {cfg}, overrides: [model.backbone=, model.user_lora=none]}}\n")
    suite = load_suite(_suite(tmp_path, text))
    for key, d in (("a", 0.0), ("b", -0.01)):
        mdir = suite.method_dir(key)
        mdir.mkdir(parents=True)
        (mdir / "tune.json").write_text(json.dumps({"best": {}, "trials": 8}))
        runs = [{"seed": s, "run_id": f"{key}{s}", "best_round": 3, "rounds_run": 12, "rounds_cap": 100,
                 "metrics": {"test/auc": 0.70 + d + 0.001 * s, "test/gauc": 0.6}, "floor": {"test/auc": 0.65}}
                for s in range(6)]
        (mdir / "seeds.json").write_text(json.dumps({"parent_run_id": "x", "runs": runs}))
    md = write_report(suite, log=lambda s: None)
    row = next(line for line in md.splitlines() if FLOOR_LABEL in line)
    assert "0.6500 ± 0.0000" in row and "Wilcoxon p=0.031: worse" in row and "| - |" in row
    doc = json.loads((tmp_path / "out" / "s.json").read_text())
    assert doc["methods"]["_client_rate"]["vs_reference"]["test/auc"]["wilcoxon_p"] == pytest.approx(2 / 64)


def test_a_stage_fingerprint_does_not_depend_on_where_runs_are_logged(tmp_path, monkeypatch):
    """v4: the tracking URI (made absolute by the loader, so different on every checkout) is not
    part of what a stage's result depends on; v3 still hashes it, as the records it wrote did."""
    from fleetrec.simulator.suite import _sweep, fingerprint
    monkeypatch.chdir(tmp_path)
    prints = {}
    for where in ("a", "b"):
        suite = load_suite(SYNTH, [f"tracking.tracking_uri=sqlite:///{tmp_path / where / 'm.db'}"])
        sw = _sweep(suite, suite.methods["pmtrec"], "tune")
        prints[where] = (fingerprint(sw), fingerprint(sw, 3))
    assert prints["a"][0] == prints["b"][0] and prints["a"][1] != prints["b"][1]


def test_points_to_evaluate_are_checked(tmp_path):
    from fleetrec.simulator.tune_space import load_sweep
    base = f"base: {ROOT / 'configs' / 'quickstart.yaml'}\nspace: {{train.lr: {{loguniform: [0.01, 1.0]}}}}\n"
    p = tmp_path / "s.yaml"
    p.write_text(base + "points_to_evaluate: [{train.lrr: 0.1}]\n")
    with pytest.raises(ConfigError, match=r"points_to_evaluate\[0\]: 'train.lrr' is not a key of space"):
        load_sweep(p)
    p.write_text(base + "points_to_evaluate: [{train.lr: -1.0}]\n")
    with pytest.raises(ConfigError, match=r"points_to_evaluate\[0\]: gives a bad config: train.lr"):
        load_sweep(p)
    p.write_text(base + "points_to_evaluate: [{train.lr: 0.5}]\n")
    assert load_sweep(p).cfg.points_to_evaluate == [{"train.lr": 0.5}]


def test_cli_suite_check(capsys):
    from fleetrec.simulator.cli import main
    assert main(["suite", str(SYNTH), "--check"]) == 0
    assert "budget per method: 6 trials" in capsys.readouterr().err
    assert main(["suite", str(SYNTH), "suite.budget.trials=0", "--check"]) == 2
    assert "budget.trials: got 0" in capsys.readouterr().err


# ------------------------------------------------------------------------------ end to end
TINY = ["suite.budget.trials=2", "suite.budget.rounds=2", "suite.budget.grace_period=1", "suite.final.seeds=[0,1]",
        "suite.final.rounds=3", "suite.final.early_stop_patience=2", "data.num_users=50", "data.num_items=40",
        "resources.cpus_per_worker=0.5", "tracking.progress=false"]


def test_tiny_suite_end_to_end_resume_and_refusal(ray_session, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    from fleetrec.simulator.suite import run_suite
    monkeypatch.chdir(tmp_path)
    raw = yaml.safe_load(SYNTH.read_text())
    raw["results_dir"] = "out"
    raw["methods"] = {k: {**raw["methods"][k], "config": str(ROOT / "configs" / "pmtrec_synthetic.yaml")}
                      for k in ("pmtrec", "single")}             # two of the shipped methods keep it short
    src = tmp_path / "suite.yaml"
    src.write_text(yaml.safe_dump(raw, sort_keys=False))
    suite = load_suite(src, TINY)
    md = run_suite(suite, log=lambda s: None)
    assert "| PMTRec | 2 |" in md and "vs pmtrec: test/recall@20" in md and "bootstrap p" in md
    doc = json.loads((tmp_path / "out" / "pmtrec_synthetic.json").read_text())
    assert doc["command"].startswith("fleetrec suite suite.yaml suite.budget.trials=2")
    runs = doc["methods"]["single"]["runs"]
    assert [r["seed"] for r in runs] == [0, 1] and all(0 <= r["best_round"] < 3 for r in runs)
    stats = doc["methods"]["single"]["vs_reference"]["test/recall@20"]
    assert stats["seeds"] == [0, 1] and 0 <= stats["wilcoxon_p"] <= 1 and stats["bootstrap"]["users"] > 0
    assert "smallest Wilcoxon p is 0.5" in stats["verdict"] or stats["verdict"] in ("better", "worse")
    # the table's numbers are the runs' own: mean over seeds of best/test/recall_at_20 in MLflow
    client = MlflowClient(tracking_uri=suite.tracking_uri)
    vals = [client.get_run(r["run_id"]).data.metrics["best/test/recall_at_20"] for r in runs]
    assert np.mean(vals) == pytest.approx(np.mean([r["test/recall@20"] for r in runs]))
    assert f"{np.mean(vals):.4f}" in md
    for ext in ("md", "csv", "png"):
        assert (tmp_path / "out" / f"pmtrec_synthetic.{ext}").is_file()
    # `fleetrec compare`, as the report names it, rebuilds the method rows from the MLflow runs alone
    import shlex
    from fleetrec.simulator.cli import main as cli_main
    argv = shlex.split(doc["compare_command"])
    assert argv[:4] == ["fleetrec", "compare", "--suite", "pmtrec_synthetic"] and doc["compare_command"] in md
    assert cli_main([*argv[1:], "--out", str(tmp_path / "cmp")]) == 0
    rows = {l.split(" | ")[0].strip("| "): l for l in (tmp_path / "cmp" / "compare.md").read_text().splitlines()[2:]}
    assert set(rows) == {"pmtrec", "single"}
    for key in ("pmtrec", "single"):
        v = [r["test/recall@20"] for r in doc["methods"][key]["runs"]]
        assert f"| {np.mean(v):.4f} ± {np.std(v, ddof=1):.4f} |" in rows[key]
    assert f"(Wilcoxon p={stats['wilcoxon_p']:.3g}, 2 seeds)" in rows["single"]
    # seeds.json alone carries the report (a committed state folder continues on another machine)
    rec = json.loads((suite.method_dir("single") / "seeds.json").read_text())
    assert [r["seed"] for r in rec["runs"]] == [0, 1] and rec["fingerprint_version"] == 4
    assert rec["wall_s"] > 0 and rec["resumed"] is False and "Wall time per method on this machine" in md
    assert {r["seed"]: r["metrics"]["test/recall@20"] for r in rec["runs"]} == {r["seed"]: r["test/recall@20"] for r in runs}
    assert (suite.method_dir("single") / "per_user" / "seed1.csv.gz").is_file()
    tune_parent = doc["methods"]["single"]["tune"]["parent_run_id"]      # trial 0 = the untuned config
    tried = [r.data.params.get("sampled.train.lr") for r in client.search_runs(
        [client.get_run(tune_parent).info.experiment_id], f"tags.mlflow.parentRunId = '{tune_parent}'")]
    assert "0.005" in tried and len(tried) == 2
    pm_parent = doc["methods"]["pmtrec"]["tune"]["parent_run_id"]         # a list-valued choice, also as a preset point
    sampled = [json.loads(r.data.tags["tune.sampled"]) for r in client.search_runs(
        [client.get_run(pm_parent).info.experiment_id], f"tags.mlflow.parentRunId = '{pm_parent}'")]
    assert ["bpr", "social", "coview", "rating", "au"] in [v["algorithm.tasks"] for v in sampled]
    assert all(isinstance(v["algorithm.tasks"], list) for v in sampled)
    exp = client.get_experiment_by_name(suite.experiment)
    logged = client.search_runs([exp.experiment_id], "tags.`fleetrec.suite` = 'pmtrec_synthetic'")
    assert len(logged) == 1
    # a second sitting: nothing left to run (every stage is skipped), the report is rewritten
    lines = []
    with pytest.raises(ConfigError, match="pass --resume"):
        run_suite(load_suite(src, TINY), log=lines.append)
    assert run_suite(load_suite(src, TINY), resume=True, log=lines.append).count("| PMTRec |") == 1
    assert sum("stage done before" in s for s in lines) == 4
    # a changed budget under a finished stage is refused, naming the file
    with pytest.raises(ConfigError, match=r"tune.json: the tune stage of pmtrec was run with a different suite"):
        run_suite(load_suite(src, [*TINY, "train.batch_size=64"]), resume=True, log=lines.append)
    # an interrupted stage whose sweep changed since is refused before Tune restores the old sweep
    sd = suite.method_dir("single")
    assert json.loads((sd / "seeds.started.json").read_text())["fingerprint"] == \
        json.loads((sd / "seeds.json").read_text())["fingerprint"]      # the marker says what the Tune folder ran
    rec = json.loads((sd / "seeds.json").read_text())
    (sd / "seeds.json").unlink()                             # a record removed to run the stage with a longer patience:
    with pytest.raises(ConfigError, match=r"pmtrec_synthetic\.single\.seeds: the interrupted seeds stage of single "
                                          r"was started with a different suite"):     # the old folder is not reused
        run_suite(load_suite(src, [*TINY, "suite.final.early_stop_patience=3"]), resume=True, only=["single"],
                  log=lines.append)
    (sd / "seeds.started.json").unlink()                     # a folder that says nothing of what it ran is refused
    with pytest.raises(ConfigError, match=r"pmtrec_synthetic\.single\.seeds: a Tune folder with no record of which "
                                          r"sweep it ran \(seeds\.started\.json is missing\)"):
        run_suite(load_suite(src, TINY), resume=True, only=["single"], log=lines.append)
    (sd / "seeds.started.json").write_text(json.dumps({"fingerprint": rec["fingerprint"]}))    # as if cut off
    with pytest.raises(ConfigError, match=r"pmtrec_synthetic\.single\.seeds: the interrupted seeds stage of single "
                                          r"was started with a different suite or overrides"):
        run_suite(load_suite(src, [*TINY, "suite.final.early_stop_patience=3"]), resume=True, only=["single"],
                  log=lines.append)
    # the same suite continues it: Tune restores the finished trials, the record is written again
    run_suite(load_suite(src, TINY), resume=True, only=["single"], log=lines.append)
    again = json.loads((sd / "seeds.json").read_text())
    assert again["fingerprint"] == rec["fingerprint"] and (sd / "seeds.started.json").exists()
    assert again["resumed"] is True
    assert {r["seed"]: r["metrics"] for r in again["runs"]} == {r["seed"]: r["metrics"] for r in rec["runs"]}
