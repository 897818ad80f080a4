"""The package layout: import names under `fleetrec.`, layers that only point down, no circles,
one registry mechanism, one table of random streams."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fleetrec.datasets.registry import Registry, UnknownName

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"datasets": 0, "algorithms": 1, "simulator": 2}      # a module imports only its layer and lower ones
OLD_NAMES = ("simulator", "algorithms", "datasets")


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return "fleetrec." + ".".join(parts)


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, under `if TYPE_CHECKING:`) of every import statement of a file."""
    tree = ast.parse(path.read_text(), str(path))
    typing_only = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno, id(node) in typing_only) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out += [(f"{node.module}.{a.name}", node.lineno, id(node) in typing_only) for a in node.names]
    return out


def _package_graph() -> tuple[dict[str, Path], dict[str, set[str]]]:
    files = {_module(p): p for top in LAYERS for p in (ROOT / top).rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        for name, line, typing_only in _imports(path):
            while name not in files and "." in name:        # `from pkg.mod import name` -> pkg.mod
                name = name.rsplit(".", 1)[0]
            if name in files and name != mod:
                src, dst = mod.split(".")[1], name.split(".")[1]
                assert LAYERS[dst] <= LAYERS[src], f"{path.relative_to(ROOT)}:{line} imports {name}: " \
                    f"{src} may only import {', '.join(k for k, v in LAYERS.items() if v <= LAYERS[src])}"
                if not typing_only:
                    graph[mod].add(name)
    return files, graph


def test_imports_point_down_the_layers_and_form_no_circle():
    files, graph = _package_graph()
    assert len(files) > 50
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(v: str) -> None:                             # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not circles, "import circles: " + "; ".join(" <-> ".join(c) for c in circles)


def test_nothing_imports_the_bare_folder_names():
    """`simulator`, `algorithms`, `datasets` are folders, not import names: everything imports
    `fleetrec.<folder>` (a bare `datasets` is Hugging Face's)."""
    bad = []
    for path in ROOT.rglob("*.py"):
        if any(part.startswith(".") or part in ("build", "fleetrec.egg-info") for part in path.relative_to(ROOT).parts):
            continue
        for name, line, _ in _imports(path):
            if name.split(".")[0] in OLD_NAMES:
                bad.append(f"{path.relative_to(ROOT)}:{line} {name}")
    assert not bad, bad


def test_fleetrec_coexists_with_a_package_named_datasets(tmp_path):
    """A stand-in for Hugging Face `datasets` on the path: `import datasets` is that package, and
    fleetrec (its data CLI included) still works, run from a folder outside the checkout."""
    stub = tmp_path / "site" / "datasets"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("HUGGING_FACE_STAND_IN = True\ndef load_dataset(*a, **k):\n    return None\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    code = ("import importlib.util, datasets\n"
            "assert datasets.HUGGING_FACE_STAND_IN, datasets.__file__\n"
            "from fleetrec.datasets import SOURCES\n"
            "assert 'epinions' in SOURCES\n"
            "assert datasets.HUGGING_FACE_STAND_IN\n"
            "for name in ('simulator', 'algorithms'):\n"
            "    assert importlib.util.find_spec(name) is None, name\n")
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True)
    listed = subprocess.run([sys.executable, "-m", "fleetrec.simulator.cli", "data", "list"], cwd=tmp_path, env=env,
                            capture_output=True, text=True)
    assert listed.returncode == 0, listed.stderr
    assert "synthetic_per_user:" in listed.stdout and "epinions:" in listed.stdout


def test_looking_up_one_algorithm_imports_only_that_one():
    code = ("import sys\n"
            "from fleetrec.algorithms import ALGORITHMS\n"
            "assert 'fedavg' in ALGORITHMS and 'pf_msmtrec' in ALGORITHMS\n"
            "ALGORITHMS['fedavg']\n"
            "loaded = [m for m in ('fleetrec.algorithms.pmtrec', 'fleetrec.algorithms.pfmsm', 'scipy', 'ray', 'mlflow')\n"
            "          if m in sys.modules]\n"
            "assert not loaded, loaded\n")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_registry_refuses_taken_names_and_lists_the_registered_ones():
    reg: Registry[type] = Registry("widget", {"lazy": "fractions:Fraction"}, config_of=lambda e: e)
    reg.register("plain", int)
    with pytest.raises(ValueError, match="widget 'plain' is already registered"):
        reg.register("plain", float)
    with pytest.raises(ValueError, match="widget 'lazy' is already registered"):
        reg.register("lazy", float)                         # a built-in not yet imported counts too
    with pytest.raises(UnknownName) as e:
        reg["nope"]
    assert str(e.value) == "unknown widget 'nope'; registered: lazy, plain"
    from fractions import Fraction
    assert reg["lazy"] is Fraction and reg.names() == ["lazy", "plain"] and len(reg) == 2
    assert reg.configs() == {"lazy": Fraction, "plain": int}


def test_every_registry_entry_meets_its_contract():
    """Each registry's check runs on its built-ins when they are imported: algorithms and models
    subclass their base and carry a Config of the same name, combiners carry theirs, sources are
    DataConfigs."""
    from fleetrec.algorithms import ALGORITHMS, AlgorithmBase
    from fleetrec.algorithms.combiners import COMBINERS, Combiner
    from fleetrec.algorithms.models import MODELS, RoleModule
    from fleetrec.datasets import SOURCES, DataConfig
    for name, cls in ALGORITHMS.items():
        assert issubclass(cls, AlgorithmBase) and cls.Config.name == name
    for name, cls in MODELS.items():
        assert issubclass(cls, RoleModule) and cls.Config.name == name
    for name, cls in COMBINERS.items():
        assert issubclass(cls, Combiner) and cls.Config.name == name
    for name, cls in SOURCES.items():
        assert issubclass(cls, DataConfig) and cls.name == name


def test_random_stream_ids_are_distinct():
    from fleetrec.algorithms import rng
    streams = {k: v for k, v in vars(rng).items() if k.isupper() and not k.startswith("_") and isinstance(v, int)}
    assert len(streams) >= 15
    assert len(set(streams.values())) == len(streams), streams
    assert all(0 < v < 7000 for v in streams.values())     # the data generators' seeds are 7000-9999


def test_no_long_file_without_a_stated_reason():
    """A module over 360 lines says at its top why it is one file (a `Length:` line in its docstring)."""
    long = []
    for top in LAYERS:
        for path in (ROOT / top).rglob("*.py"):
            text = path.read_text()
            n = len(text.splitlines())
            doc = ast.get_docstring(ast.parse(text)) or ""
            if n > 360 and not any(line.startswith("Length:") for line in doc.splitlines()):
                long.append(f"{path.relative_to(ROOT)} ({n} lines)")
    assert not long, long
