"""The bad-input corpus: every case goes through the `fleetrec` command line in an empty temporary
folder and must exit with its code (2: bad input) and one line on stderr naming what is wrong,
before anything starts -- no Ray, no MLflow run, no cache, no checkpoint: the folder holds only the
case's own input files afterwards.

Cases: the hand-written ones in tests/bad_inputs/cases.yaml (YAML files, overrides, tune spaces,
suites, data files, CLI arguments), plus one generated case per range / choice check of every
config class the loader knows (the experiment blocks, every registered algorithm, model, data
source and combiner), each on a tiny valid config of that kind with one value out of range.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CASES = yaml.safe_load((ROOT / "tests" / "bad_inputs" / "cases.yaml").read_text())


def _bad_value(rule):
    """A value that breaks a CHECKS rule (the loader's rules: choices, lo..hi, >x, >=x, <=x)."""
    if isinstance(rule, tuple):
        return "not_a_choice"
    if ".." in rule:
        return float(rule.split("..")[1]) + 1
    op, bound = (rule[:2], rule[2:]) if rule[1] == "=" else (rule[:1], rule[1:])
    b = float(bound)
    return {">=": b - 1, ">": b, "<=": b + 1, "<": b}[op]


def _typed(value, field_type):
    if "tuple" in str(field_type) and not isinstance(value, str):      # a list of widths: one bad item
        return f"[{int(value)}]"
    if isinstance(value, float) and "int" in str(field_type) and "float" not in str(field_type):
        return int(value)
    return value


def _checks(cls) -> list[tuple[str, object, object]]:
    hints = {f.name: f.type for f in dataclasses.fields(cls)}
    return [(k, rule, hints.get(k)) for k, rule in getattr(cls, "CHECKS", {}).items() if k in hints]


def generated_cases() -> list[dict]:
    from fleetrec.algorithms import ALGORITHMS
    from fleetrec.algorithms.combiners import COMBINERS
    from fleetrec.algorithms.models import MODELS
    from fleetrec.datasets import SOURCES
    from fleetrec.simulator.config import ExperimentConfig
    out = []

    def add(prefix: str, cls, base: list[str], tag: str = ""):
        for key, rule, tp in _checks(cls):
            value = _typed(_bad_value(rule), tp)
            dotted = f"{prefix}{key}"
            out.append({"id": f"check-{tag}{dotted}", "argv": ["run", "c.yaml", *base, f"{dotted}={value}"],
                        "files": {"c.yaml": "name: bad_input\n"}, "exit": 2, "message": dotted})

    add("", ExperimentConfig, [])
    for f in dataclasses.fields(ExperimentConfig):
        if dataclasses.is_dataclass(f.type if isinstance(f.type, type) else None) or f.name in (
                "train", "federation", "resources", "eval", "tracking", "checkpoint", "privacy", "system"):
            block = type(getattr(ExperimentConfig(), f.name))
            if f.name not in ("data", "model", "algorithm"):
                add(f"{f.name}.", block, [])
    for name, algo in sorted(ALGORITHMS.items()):
        example = next(iter(algo.EXAMPLES.values()))
        base = [f"{k}={v}" for k, v in example.items()] + [f"algorithm.name={name}"]
        add("algorithm.", algo.Config, base, f"{name}:")
    seen_models, seen_sources = set(), set()
    for name, algo in sorted(ALGORITHMS.items()):
        example = next(iter(algo.EXAMPLES.values()))
        base = [f"{k}={v}" for k, v in example.items()] + [f"algorithm.name={name}"]
        model, source = example.get("model.name", "per_user"), example.get("data.name", "synthetic_per_user")
        if model not in seen_models:
            seen_models.add(model)
            add("model.", MODELS.config(model), base, f"{model}:")
        if source not in seen_sources:
            seen_sources.add(source)
            add("data.", SOURCES.config(source), base, f"{source}:")
    for name in sorted(SOURCES.names()):         # every data source through `fleetrec data describe`
        for key, rule, tp in _checks(SOURCES.config(name)):
            value = _typed(_bad_value(rule), tp)
            out.append({"id": f"data-{name}-{key}", "argv": ["data", "describe", name, f"{key}={value}"],
                        "exit": 2, "message": key})
    pm = ALGORITHMS["pmtrec"]
    pm_base = [f"{k}={v}" for k, v in next(iter(pm.EXAMPLES.values())).items()] + ["algorithm.name=pmtrec"]
    for name in sorted(COMBINERS.names()):
        for key, rule, tp in _checks(COMBINERS.config(name)):
            value = _typed(_bad_value(rule), tp)
            dotted = f"algorithm.combiner.{key}"
            out.append({"id": f"combiner-{name}-{key}",
                        "argv": ["run", "c.yaml", *pm_base, f"algorithm.combiner.name={name}", f"{dotted}={value}"],
                        "files": {"c.yaml": "name: bad_input\n"}, "exit": 2, "message": dotted})
    ids = [c["id"] for c in out]
    assert len(ids) == len(set(ids)), "generated case ids must be unique"
    return out


ALL = CASES + generated_cases()


def test_every_width_list_of_every_model_is_checked():
    """A model's layer widths (tuple[int, ...] fields) are range-checked, item by item, by the loader:
    a negative width is refused with one line instead of crashing inside a Ray actor."""
    import typing
    from fleetrec.algorithms.models import MODELS
    for name in MODELS.names():
        cls = MODELS.config(name)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if hints[f.name] == tuple[int, ...]:
                assert f.name in cls.CHECKS, f"model {name}: add a CHECKS rule for {f.name}"


def test_the_corpus_is_large_and_named_uniquely():
    ids = [c["id"] for c in ALL]
    assert len(ids) == len(set(ids)) and len(ids) >= 150, len(ids)


@pytest.mark.parametrize("case", ALL, ids=[c["id"] for c in ALL])
def test_bad_input_exits_with_one_line_and_writes_nothing(case, tmp_path, monkeypatch, capsys):
    import ray
    from fleetrec.simulator.cli import main
    work = tmp_path / "w"
    work.mkdir()
    for name, text in (case.get("files") or {}).items():
        p = work / name
        p.parent.mkdir(parents=True, exist_ok=True)
        if text.startswith("bytes:"):
            p.write_bytes(bytes.fromhex(text[len("bytes:"):]))
        else:
            p.write_text(text)
    for src in ("configs", "suites", "tune_spaces"):      # shipped files the cases may name, read only
        (work / src).symlink_to(ROOT / src)
    before = {p.relative_to(work) for p in work.rglob("*")}
    monkeypatch.chdir(work)
    monkeypatch.setenv("FLEETREC_CACHE", str(work / ".cache"))
    was_up = ray.is_initialized()
    rc = main([str(a) for a in case["argv"]])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == case["exit"], (rc, err[-3:])
    assert err and case["message"] in err[0], err[:3]
    assert ray.is_initialized() == was_up, "a bad input started Ray"
    after = {p.relative_to(work) for p in work.rglob("*")}
    assert after == before, sorted(map(str, after - before))


# ------------------------------------------------------------------------------ mutated configs
SHIPPED = sorted((ROOT / "configs").glob("*.yaml"))
MUTANTS = [float("nan"), float("inf"), -1, 0, 10 ** 30, -1e-9, "", "x", True, [], [1, -2], {"a": 1}, None]


def _mutations():
    from hypothesis import strategies as st
    return st.tuples(st.sampled_from(SHIPPED), st.integers(0, 10 ** 6), st.sampled_from(MUTANTS + ["<delete>"]))


def test_mutated_shipped_configs_load_or_fail_with_one_line():
    """One key of a shipped config swapped for a value of another type, out of range, non-finite,
    empty, or deleted: the loader either builds a valid config or raises ConfigError with one line
    naming a key -- never another exception (which would surface later as a traceback)."""
    from hypothesis import given, settings
    from fleetrec.simulator.config import from_dict
    from fleetrec.simulator.config_loader import ConfigError, flatten, read_yaml

    @settings(max_examples=300, deadline=None, derandomize=True)
    @given(_mutations())
    def check(case):
        path, pick, value = case
        flat = flatten(read_yaml(path))
        key = sorted(flat)[pick % len(flat)]
        over = {k: v for k, v in flat.items() if k != key}
        if value != "<delete>":
            over[key] = value
        tree: dict = {}
        for k, v in over.items():
            node = tree
            *parents, leaf = k.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = v
        try:
            from_dict(tree, str(path))
        except ConfigError as e:
            text = str(e)
            assert len(text.splitlines()) == 1, text
            assert "." in text or ":" in text, text
    check()
