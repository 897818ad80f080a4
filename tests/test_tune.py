"""`fleetrec tune`: search-space validation, an 8-trial ASHA sweep with one MLflow parent run and
eight child runs, trials (coordinator and workers included) inside their placement groups,
resume, and a smoke run of every file in tune_spaces/."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from fleetrec.simulator.config_loader import ConfigError, read_yaml
from fleetrec.simulator.tune import tune_sweep
from fleetrec.simulator.tune_space import NoSchedulerConfig, load_sweep
from tests.conftest import tiny_overrides

SPACES_DIR = Path(__file__).resolve().parents[1] / "tune_spaces"
SPACES = sorted(SPACES_DIR.glob("*.yaml"))


def _tiny(space: Path, **extra) -> list[str]:
    """Tiny base-config overrides for any space: small data, one 0.5-CPU worker, few rounds."""
    sweep_raw = yaml.safe_load(space.read_text())
    base_path = space.parent / sweep_raw["base"]
    base_path = base_path if base_path.is_file() else SPACES_DIR.parent / sweep_raw["base"]
    # a pre-trained backbone fits the full data's vocabularies, not a 23-client slice: random init
    pre = ["model.backbone="] if (read_yaml(base_path).get("model") or {}).get("backbone") else []
    base = load_sweep(space, pre).base_cfg
    fields = {f.name for f in dataclasses.fields(base.data)}
    ov = {"rounds": 3, "resources.workers": 1, "resources.cpus_per_worker": 0.5,
          "federation.clients_per_round": 20, "tracking.progress": False, **extra}
    if base.data.name == "synthetic_per_user":
        ov.update({k: v for k, v in dict(o.split("=", 1) for o in tiny_overrides()).items()
                   if k.startswith("data.") and k.split(".", 1)[1] not in sweep_raw.get("space", {})})
    elif "max_clients" in fields:
        ov["data.max_clients"] = 23
    elif "num_clients" in fields:
        ov["data.num_clients"] = 23
    return pre + [f"{k}={v}" for k, v in ov.items()]


def _write(tmp_path: Path, text: str, name: str = "s.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


BASE = f"base: {Path(__file__).resolve().parents[1] / 'configs' / 'quickstart.yaml'}\n"


# ------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("text, message", [
    ("space: {train.lr: {uniform: [0.1, 1]}}\nnum_sample: 3\n", "num_sample: unknown key"),
    ("space: {train.lr: {uniform: [0.1, 1]}}\nnum_samples: many\n", "num_samples: got 'many', expected an integer"),
    ("space: {train.lr: {uniform: [0.1, 1]}}\nscheduler: {name: asha, grace_period: 0}\n", "scheduler.grace_period"),
    ("space: {train.lr: {uniform: [0.1, 1]}}\nscheduler: {name: hyperband}\n", "scheduler.name: got 'hyperband'"),
    ("space: {train.lr: {uniform: [1, 0.1]}}\n", "space.train.lr: uniform: expected lo < hi"),
    ("space: {train.lr: {loguniform: [0, 1]}}\n", "space.train.lr: loguniform: expected lo > 0"),
    ("space: {train.lr: {uniform: [0.1, 1], choice: [1]}}\n", "space.train.lr: expected exactly one of"),
    ("space: {train.lr: {normal: [0, 1]}}\n", "space.train.lr.normal: unknown key"),
    ("space: {train.lrate: {uniform: [0.1, 1]}}\n", "space.train.lrate: not a key of the base config"),
    ("space: {model.dim: {uniform: [4, 16]}}\n", "space.model.dim: value 4.0 gives a bad config: model.dim: got 4.0, expected an integer"),
    ("space: {train.optimizer: {choice: [sgd, lion]}}\n", "space.train.optimizer: value 'lion'"),
    ("space: {train.lr: {uniform: [0.1, 1]}}\nsearch_alg: grid\n", "search_alg grid needs grid or choice"),
    ("space: {train.lr: {uniform: [0.1, 1]}}\nmetric: auc\n", "metric: got 'auc'"),
    ("space: {}\n", "space: expected a mapping"),
])
def test_bad_space_is_one_line_naming_the_path(tmp_path, text, message):
    with pytest.raises(ConfigError) as e:
        load_sweep(_write(tmp_path, BASE + text))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_optional_search_algs_need_their_package(tmp_path):
    for alg in ("optuna", "hyperopt"):
        try:
            __import__(alg)
            continue
        except ImportError:
            pass
        with pytest.raises(ConfigError, match=f"search_alg: {alg} needs the {alg} package"):
            load_sweep(_write(tmp_path, BASE + f"search_alg: {alg}\nspace: {{train.lr: {{uniform: [0.1, 1]}}}}\n"))


def test_base_is_relative_to_the_yaml_or_the_repo_root(tmp_path):
    s = load_sweep(_write(tmp_path, "base: configs/quickstart.yaml\nspace: {train.lr: {choice: [0.1, 1]}}\n"))
    assert s.base_path.name == "quickstart.yaml" and s.name == "s"
    with pytest.raises(ConfigError, match="base: config file 'nope.yaml' not found"):
        load_sweep(_write(tmp_path, "base: nope.yaml\nspace: {train.lr: {choice: [0.1]}}\n"))


def test_resources_per_trial_come_from_the_base_config(tmp_path):
    s = load_sweep(_write(tmp_path, BASE + "space: {train.lr: {choice: [0.1]}}\n"),
                   ["resources.workers=3", "resources.cpus_per_worker=0.5", "resources.gpus_per_worker=0.25"])
    assert s.bundles() == [{"CPU": 0.0}] + [{"CPU": 0.5, "GPU": 0.25}] * 3
    assert s.tracking_uri.startswith("sqlite:////")            # absolute: trials run in other processes


def test_cli_tune_help_and_check(capsys):
    from fleetrec.simulator.cli import main
    with pytest.raises(SystemExit):
        main(["tune", "--help"])
    assert "--resume" in capsys.readouterr().out
    assert main(["tune", str(SPACES_DIR / "quickstart.yaml"), "--check"]) == 0
    assert "resources per trial" in capsys.readouterr().err
    assert main(["tune", str(SPACES_DIR / "quickstart.yaml"), "train.lr=fast", "--check"]) == 2
    assert "train.lr: got 'fast'" in capsys.readouterr().err


# ------------------------------------------------------------------------------ sweeps
def test_quickstart_sweep_asha_and_mlflow(ray_session, tmp_path):
    """8 trials of the shipped quickstart space on tiny data: ASHA stops some trials early;
    MLflow holds one parent run and eight child runs with sampled params and per-round metrics."""
    from mlflow.tracking import MlflowClient
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    space = SPACES_DIR / "quickstart.yaml"
    ov = _tiny(space, rounds=3, **{"tracking.mlflow": True, "tracking.tracking_uri": uri,
                                   "tracking.experiment": "sweep"})
    sweep = load_sweep(space, ov, storage_path=str(tmp_path / "tune_results"))
    assert sweep.cfg.num_samples == 8 and sweep.cfg.scheduler.name == "asha"
    res = tune_sweep(sweep, verbose=0)
    assert len(res.trials) == 8 and all(t["error"] is None for t in res.trials)
    rounds = [t["rounds_run"] for t in res.trials]
    assert max(rounds) == 3 and min(rounds) < 3, rounds          # ASHA stopped at least one trial
    assert res.best and res.best_config is not None

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("sweep")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == res.parent_run_id]
    assert len(parents) == 1 and parents[0].info.run_id == res.parent_run_id and len(children) == 8
    by_trial = {t["trial_id"]: t for t in res.trials}
    for c in children:
        t = by_trial[c.data.tags["tune.trial_id"]]
        assert c.info.status == "FINISHED"
        for k in ("train.lr", "algorithm.server_lr"):
            assert float(c.data.params[k]) == pytest.approx(t["config"][k], rel=1e-5)   # params: 6 digits
            assert float(c.data.params[f"sampled.{k}"]) == pytest.approx(t["config"][k])
        steps = [m.step for m in client.get_metric_history(c.info.run_id, "val/auc")]
        assert steps == list(range(t["rounds_run"]))
        assert c.data.tags["tune.stopped_early"] == str(t["rounds_run"] < 3).lower()
        assert c.data.tags["sweep"] == sweep.name and c.info.run_name.startswith("lr=")    # named by its sample
    p = client.get_run(res.parent_run_id)
    assert p.info.status == "FINISHED"
    assert p.data.params["sweep.rounds"] == "3" and "rounds=3" in p.data.params["sweep.cli_overrides"]
    assert p.data.tags["tune.best_trial_id"] == res.best["trial_id"]
    best = [c for c in children if c.data.tags["tune.trial_id"] == res.best["trial_id"]]
    assert [c.data.tags.get("tune.best") for c in children].count("true") == 1 and len(best) == 1
    assert best[0].data.tags["tune.best"] == "true" and p.data.tags["tune.best_run_id"] == best[0].info.run_id
    link = f"[{best[0].info.run_name}](#/experiments/{exp.experiment_id}/runs/{best[0].info.run_id})"
    assert link in p.data.tags["mlflow.note.content"]             # the parent's description links its best child
    assert p.data.metrics["best/val/auc"] == pytest.approx(res.best["best"])
    assert p.data.metrics["tune/trials"] == 8 and p.data.metrics["tune/stopped_early"] >= 1
    arts = {a.path for a in client.list_artifacts(res.parent_run_id)}
    assert {"best_config.yaml", "trials.json", "quickstart.yaml"} <= arts
    plots = {a.path for a in client.list_artifacts(res.parent_run_id, "plots")}
    assert plots == {"plots/learning_curves.png", "plots/val_auc_vs_train.lr.png",
                     "plots/val_auc_vs_algorithm.server_lr.png"}
    best_yaml = yaml.safe_load(Path(client.download_artifacts(res.parent_run_id, "best_config.yaml", str(tmp_path))).read_text())
    assert best_yaml["train"]["lr"] == pytest.approx(res.best["config"]["train.lr"])


def test_trial_coordinator_and_workers_are_in_the_trial_placement_group(ray_session, tmp_path):
    """The trial loop, the coordinator it starts and the workers the coordinator starts all run
    in the trial's placement group, so concurrent trials never oversubscribe the cluster."""
    import ray
    from ray import tune
    from tests.conftest import tiny_config

    sweep = load_sweep(_write(tmp_path, BASE + "space: {train.lr: {choice: [0.1]}}\n"),
                       tiny_overrides(**{"rounds": 1, "resources.workers": 2}))

    def pg_id():
        pg = ray.util.get_current_placement_group()
        return pg.id.hex() if pg else None

    def probe(config):
        from fleetrec.simulator.run import run
        _, coord = run(tiny_config(rounds=1), keep_actors=True)
        coord_pg = ray.get(coord.__ray_call__.remote(lambda self: pg_id()))
        worker_pgs = ray.get(coord.__ray_call__.remote(
            lambda self: ray.get([w.__ray_call__.remote(lambda s: pg_id()) for w in self.workers])))
        ray.kill(coord)
        tune.report({"trial_pg": pg_id(), "coord_pg": coord_pg, "worker_pgs": json.dumps(worker_pgs)})

    fn = tune.with_resources(probe, tune.PlacementGroupFactory(sweep.bundles()))
    grid = tune.Tuner(fn, run_config=tune.RunConfig(storage_path=str(tmp_path / "r"), verbose=0)).fit()
    m = grid[0].metrics
    assert grid[0].error is None
    assert m["trial_pg"] and m["coord_pg"] == m["trial_pg"]
    assert json.loads(m["worker_pgs"]) == [m["trial_pg"]] * 2


@pytest.mark.parametrize("space", SPACES, ids=[p.stem for p in SPACES])
def test_every_shipped_space_runs_one_trial_and_resumes(ray_session, tmp_path, space):
    sweep = load_sweep(space, _tiny(space, rounds=1, **{"tracking.mlflow": True,
                                                       "tracking.tracking_uri": f"sqlite:///{tmp_path / 'm.db'}"}),
                       storage_path=str(tmp_path / "tune_results"))
    sweep.cfg = dataclasses.replace(sweep.cfg, num_samples=1, scheduler=NoSchedulerConfig())
    res = tune_sweep(sweep, verbose=0)
    assert len(res.trials) >= 1 and all(t["error"] is None and t["rounds_run"] == 1 for t in res.trials)
    with pytest.raises(ConfigError, match="already exists: pass --resume"):
        tune_sweep(sweep, verbose=0)
    again = tune_sweep(sweep, resume=True, verbose=0)         # nothing left to run: same trials, same parent run
    assert again.parent_run_id == res.parent_run_id
    assert {t["trial_id"] for t in again.trials} == {t["trial_id"] for t in res.trials}


def test_resume_needs_a_sweep(ray_session, tmp_path):
    sweep = load_sweep(SPACES_DIR / "quickstart.yaml", ["tracking.mlflow=false"], storage_path=str(tmp_path))
    with pytest.raises(ConfigError, match="--resume: no sweep to resume"):
        tune_sweep(sweep, resume=True, verbose=0)


def test_a_metric_the_runs_do_not_report_is_refused_by_check(tmp_path):
    """A misspelled metric used to pass --check and kill the sweep with a 74-line TuneError."""
    space = tmp_path / "s.yaml"
    for metric, why in (("val/acu", "eval.metric: got 'acu', expected one of auc"),
                        ("val/recall@20", "eval.metric")):
        space.write_text(BASE + f"metric: {metric}\nspace:\n  train.lr: {{loguniform: [0.01, 0.1]}}\n")
        with pytest.raises(ConfigError, match=rf"s.yaml: metric: got '{metric}', which the base config's runs do "
                                              rf"not report \({why}"):
            load_sweep(space)
    space.write_text(BASE + "metric: val/gauc\nspace:\n  train.lr: {loguniform: [0.01, 0.1]}\n")
    assert load_sweep(space).cfg.metric == "val/gauc"


def test_the_sweep_metric_also_selects_each_runs_best_round(tmp_path):
    """A sweep ranked on val/gauc over a config whose eval.metric is auc used to report each
    trial's best/* at its best-AUC round (and early-stop on AUC); one ranked on val/logloss (min)
    would have kept eval.mode max and picked the worst round. The sweep's metric and mode now
    replace eval's, --check says so; where they already agree nothing in the base changes (the
    suites' stage fingerprints stay valid)."""
    from fleetrec.simulator.tune_report import describe
    s = load_sweep(_write(tmp_path, BASE + "metric: val/gauc\nspace:\n  train.lr: {loguniform: [0.01, 0.1]}\n"))
    assert s.base_cfg.eval.metric == "gauc" and s.trial_config({"train.lr": 0.05}).eval.metric == "gauc"
    assert s.replaced_eval_metric == "auc (max)"
    assert ("each run's best round and early stop: val/gauc (max; the sweep's metric and mode replace the base "
            "config's eval.metric auc (max))") in describe(s)
    low = load_sweep(_write(tmp_path, BASE + "metric: val/logloss\nmode: min\nspace:\n  train.lr: {choice: [0.1]}\n"))
    assert (low.base_cfg.eval.metric, low.base_cfg.eval.mode) == ("logloss", "min")
    assert low.trial_config({"train.lr": 0.1}).eval.mode == "min"                # what the trials are built from
    assert low.base_data["eval"] == {**read_yaml(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")
                                     ["eval"], "metric": "logloss", "mode": "min"}
    with pytest.raises(ConfigError, match=r"mode: got 'max' with metric 'val/logloss', which is lower-is-better"):
        load_sweep(_write(tmp_path, BASE + "metric: val/logloss\nspace:\n  train.lr: {choice: [0.1]}\n"))
    same = load_sweep(_write(tmp_path, BASE + "metric: val/auc\nspace:\n  train.lr: {loguniform: [0.01, 0.1]}\n"))
    assert same.replaced_eval_metric is None
    assert same.base_data["eval"] == read_yaml(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")["eval"]
    assert "best round and early stop" not in describe(same)


def test_rounds_before_the_first_evaluation_report_nan_and_asha_waits_for_one(tmp_path, monkeypatch):
    """With eval.every > 1 a sweep used to die at its first round: Tune requires the metric in every
    report. Rounds before the first evaluation now report NaN (skipped by ASHA and the summary), later
    ones repeat the last value, and an ASHA rung that would come before any evaluation is refused."""
    import math
    from ray import tune
    from fleetrec.simulator.tune_trial import TuneReport
    sent = []
    monkeypatch.setattr(tune, "report", sent.append)
    rep = TuneReport("val/auc")
    rep.rounds = 4
    for rec in ({"round": 0}, {"round": 1, "val/auc": 0.6}, {"round": 2}, {"round": 3, "val/auc": 0.7}):
        rep.on_round(rec)
    vals = [s["val/auc"] for s in sent]
    assert math.isnan(vals[0]) and vals[1:] == [0.6, 0.6, 0.7] and all(s["rounds"] == 4 for s in sent)
    space = "space: {train.lr: {uniform: [0.1, 1]}}\n"
    with pytest.raises(ConfigError, match=r"scheduler.grace_period: got 1, expected >= the base config's eval.every "
                                          r"\(2\): ASHA's first rung would judge trials before their first evaluation"):
        load_sweep(_write(tmp_path, BASE + "overrides: [eval.every=2]\nscheduler: {name: asha, grace_period: 1}\n" + space))
    assert load_sweep(_write(tmp_path, BASE + "overrides: [eval.every=2]\nscheduler: {name: asha, grace_period: 2}\n"
                             + space)).base_cfg.eval.every == 2
