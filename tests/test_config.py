"""The config loader: unknown keys, wrong types, out-of-range values and broken YAML give
one line naming the file and dotted key; the CLI exits 2 with no traceback."""
from __future__ import annotations

import subprocess
import sys

import pytest

from fleetrec.simulator.cli import main
from fleetrec.simulator.config import ExperimentConfig, from_dict, load
from fleetrec.simulator.config_loader import ConfigError, apply_overrides, flatten, to_dict


@pytest.mark.parametrize("data, message", [
    ({"roundz": 3}, "roundz: unknown key; allowed keys are"),
    ({"train": {"lr": "fast"}}, "train.lr: got 'fast', expected a number"),
    ({"train": {"lr": -1}}, "train.lr: got -1.0, expected a value > 0"),
    ({"train": {"optimizer": "lbfgs"}}, "train.optimizer: got 'lbfgs', expected one of 'sgd', 'adam'"),
    ({"rounds": 2.5}, "rounds: got 2.5, expected an integer"),
    ({"resources": {"workers": True}}, "resources.workers: got True, expected an integer"),
    ({"algorithm": {"name": "fedsgd"}}, "algorithm.name: got 'fedsgd', expected one of"),
    ({"algorithm": {"name": "fedavg", "mu": 1}}, "algorithm.mu: unknown key"),
    ({"data": {"num_clients": 0}}, "data.num_clients: got 0, expected a value >= 1"),
    ({"data": {"rows_min": 10, "rows_max": 5}}, "data.rows_max: got 5, expected >= rows_min"),
    ({"model": {"hidden": "wide"}}, "model.hidden: got 'wide', expected a list"),
    ({"federation": []}, "federation: got [], expected a mapping"),
])
def test_bad_values_name_the_dotted_path(data, message):
    with pytest.raises(ConfigError) as e:
        from_dict(data, "exp.yaml")
    text = str(e.value)
    assert text.startswith("exp.yaml: ") and message in text and "\n" not in text


def test_defaults_and_round_trip():
    cfg = from_dict({})
    assert isinstance(cfg, ExperimentConfig)
    again = from_dict(to_dict(cfg))
    assert again == cfg
    flat = flatten(to_dict(cfg))
    assert flat["train.lr"] == cfg.train.lr and flat["algorithm.name"] == "fedavg"


def test_overrides_go_through_the_same_loader():
    cfg = load(None, ["rounds=7", "train.lr=0.5", "model.hidden=[4, 4]", "resources.address=auto"])
    assert cfg.rounds == 7 and cfg.train.lr == 0.5 and cfg.model.hidden == (4, 4)
    assert cfg.resources.address == "auto"
    with pytest.raises(ConfigError, match="train.lr: got 'abc'"):
        load(None, ["train.lr=abc"])
    with pytest.raises(ConfigError, match="expected key.path=value"):
        apply_overrides({}, ["rounds"])


def test_broken_yaml_names_the_file_and_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("rounds: 3\ntrain:\n  lr: [0.1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: line \d+: not valid YAML"):
        load(p)
    p.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        load(p)


def test_cli_bad_config_exits_2_with_one_line(tmp_path, capsys):
    p = tmp_path / "exp.yaml"
    p.write_text("rounds: 3\ntrain:\n  batch_size: 0\n")
    assert main(["run", str(p)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"fleetrec: error: {p}: train.batch_size: got 0, expected a value >= 1"
    assert main(["run", "rounds=-1"]) == 2
    assert "rounds: got -1" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_console_script_exit_code_and_help(tmp_path):
    p = tmp_path / "exp.yaml"
    p.write_text("federation:\n  clients_per_round: many\n")
    r = subprocess.run([sys.executable, "-m", "fleetrec.simulator.cli", "run", str(p)], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
    assert "federation.clients_per_round: got 'many', expected an integer" in r.stderr
    h = subprocess.run([sys.executable, "-m", "fleetrec.simulator.cli", "--help"], capture_output=True, text=True)
    assert h.returncode == 0
    for verb in ("run", "ui"):
        assert any(line.strip().startswith(verb + " ") for line in h.stdout.splitlines())


def test_exponent_floats_without_a_dot_are_numbers(tmp_path):
    p = tmp_path / "e.yaml"
    p.write_text("privacy:\n  delta: 1e-5\ntrain:\n  lr: 5E-2\n")
    cfg = load(p, ["privacy.clip=1e6"])
    assert cfg.privacy.delta == 1e-5 and cfg.train.lr == 0.05 and cfg.privacy.clip == 1e6
    with pytest.raises(ConfigError, match="train.lr: got '1e-5x'"):
        load(p, ["train.lr=1e-5x"])


def test_every_verb_in_help_dispatches():
    """Each verb listed by --help reaches its handler (its own --help exits 0)."""
    from fleetrec.simulator.cli import VERBS
    for verb in VERBS:
        r = subprocess.run([sys.executable, "-m", "fleetrec.simulator.cli", verb, "--help"], capture_output=True, text=True)
        assert r.returncode == 0, (verb, r.stderr[-300:])


def test_eval_metric_accepts_scoped_names_and_a_missing_one_stops_at_the_first_evaluation(ray_session, tiny_cfg):
    from fleetrec.simulator.run import run
    for ok in ("auc", "click/auc", "scenario_mean/auc", "scenario_mean/click/logloss"):
        tiny_cfg(**{"eval.metric": ok})
    for bad in ("auk", "scenario mean/auc", "/auc", "click/"):
        with pytest.raises(ConfigError, match="eval.metric"):
            tiny_cfg(**{"eval.metric": bad})
    # per-user data has no scenario means: the run says so instead of never choosing a best round
    with pytest.raises(ConfigError, match=r"eval.metric: got 'scenario_mean/auc'.*no val/scenario_mean/auc; "
                                          r"expected one of .*\bauc\b"):
        run(tiny_cfg(**{"eval.metric": "scenario_mean/auc", "rounds": 1}))


@pytest.mark.parametrize("text, message", [
    ("rounds: 3\nrounds: 4\n", "line 2: not valid YAML (duplicate key 'rounds' (also on line 1))"),
    ("a: &x [1, 2]\nb: *x\n", "line 2: not valid YAML (anchors and aliases (*name) are not supported"),
    ("", "the file is empty"),
])
def test_yaml_refuses_duplicate_keys_aliases_and_empty_files(tmp_path, text, message):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load(p)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_non_utf8_yaml_and_non_finite_floats_are_one_line_errors(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"c.yaml: not UTF-8 text \(byte 9"):
        load(p)
    for bad in (".inf", "-.inf", ".nan"):
        with pytest.raises(ConfigError, match=rf"train.lr: got {'nan' if 'nan' in bad else '-?inf'}, expected a finite number"):
            load(None, [f"train.lr={bad}"])


def test_resources_a_local_cluster_cannot_place_are_refused_before_any_actor(ray_session, tiny_cfg):
    """Instead of waiting forever for a worker Ray cannot place."""
    from fleetrec.simulator.run import run
    with pytest.raises(ConfigError, match=r"resources.workers x resources.cpus_per_worker: the workers need 6 CPU, "
                                          r"this machine's Ray cluster has 2"):
        run(tiny_cfg(**{"resources.workers": 3, "resources.cpus_per_worker": 2}))
    with pytest.raises(ConfigError, match=r"the workers need 0.5 GPU, this machine's Ray cluster has 0"):
        run(tiny_cfg(**{"resources.gpus_per_worker": 0.25}))
    with pytest.raises(ConfigError, match="resources.gpus_per_worker: got 1.5"):
        tiny_cfg(**{"resources.gpus_per_worker": 1.5})


def test_values_that_used_to_crash_after_ray_started_are_refused_up_front(tiny_cfg):
    from fleetrec.simulator.run import check_address
    with pytest.raises(ConfigError, match=r"seed: got 123456789012345678901234, expected a value in \[0, 4294967295\]"):
        tiny_cfg(seed=123456789012345678901234)
    with pytest.raises(ConfigError, match="tracking.experiment: got an empty name"):
        tiny_cfg(**{"tracking.experiment": ""})
    with pytest.raises(ConfigError, match=r"resources.address: nothing answers at 127.0.0.1:9 within 1 s"):
        check_address("127.0.0.1:9", timeout_s=1)
    with pytest.raises(ConfigError, match="resources.address: got 'nonsense', expected host:port"):
        check_address("nonsense")
    check_address("auto")
