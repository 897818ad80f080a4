"""One loader from YAML / dicts to frozen dataclass trees, with errors that name the dotted path.

Rules every config dataclass follows:
- fields with defaults are the YAML keys; past this loader nobody sees a dict;
- `CHECKS: ClassVar[dict]` maps a field to a check: ">0", ">=1", "<=1", "0..1" (inclusive)
  or a tuple of allowed values;
- a field typed with a `TaggedUnion` subclass (fleetrec.datasets.registry) is a tagged union:
  its YAML block's `name` key picks the dataclass from the class's registry.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from fleetrec.datasets.registry import TaggedUnion


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class _StrictLoader(yaml.SafeLoader):
    """Safe YAML that refuses duplicate keys (YAML would keep the last one silently) and aliases
    (`*name`: a few hundred bytes of nested aliases expand into gigabytes)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, "anchors and aliases (*name) are not supported; "
                                              "write the values out", self.peek_event().start_mark)
        return super().compose_node(parent, index)


def _mapping_without_duplicates(loader, node):
    seen = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r} (also on line {seen[key]})",
                                                    key_node.start_mark)
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def yaml_value(text: str):
    """YAML text -> Python value, with the strict loader (no duplicate keys, no aliases)."""
    return yaml.load(text, Loader=_StrictLoader)


class ConfigError(ValueError):
    """A bad config value: one line naming the file, the dotted key, the value and what is allowed."""


def _describe(tp) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp))
    if origin is tuple:
        return "a list"
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _check(value, rule, path: str):
    if isinstance(value, tuple) and not isinstance(rule, tuple):    # a numeric rule holds for every item
        for i, v in enumerate(value):
            _check(v, rule, f"{path}[{i}]")
        return
    ok = True
    if isinstance(rule, tuple):
        ok = value in rule
        allowed = "one of " + ", ".join(repr(r) for r in rule)
    elif ".." in rule:
        ends = rule.split("..")
        lo, hi = (float(x) for x in ends)
        ok = lo <= value <= hi
        allowed = f"a value in [{ends[0]}, {ends[1]}]"         # as written: 4294967295, not 4.29497e+09
    else:
        op, bound = (rule[:2], rule[2:]) if rule[1] == "=" else (rule[:1], rule[1:])
        b = float(bound)
        ok = {">=": value >= b, "<=": value <= b, ">": value > b, "<": value < b}[op]
        allowed = f"a value {op} {bound}"
    if not ok:
        raise ConfigError(f"{path}: got {value!r}, expected {allowed}")


def _convert(value, tp, path: str):
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for arm in get_args(tp):
            try:
                return _convert(value, arm, path)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{path}: got {value!r}, expected {_describe(tp)}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{path}: got {value!r}, expected null")
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ConfigError(f"{path}: got {value!r}, expected {_describe(tp)}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: got {value!r}, expected a list")
        args = get_args(tp)
        item_tp = args[0] if len(args) == 2 and args[1] is Ellipsis else None
        if item_tp is None:
            if len(args) != len(value):
                raise ConfigError(f"{path}: got {len(value)} items, expected {len(args)}")
            return tuple(_convert(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        return tuple(_convert(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{path}: got {value!r}, expected a finite number")
            return float(value)
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            return float(value)          # YAML 1.1 reads 1e-5 (no dot) as a string
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{path}: got {value!r}, expected {_describe(tp)}")


def build(cls, data, path: str = ""):
    """Build dataclass `cls` from a mapping, rejecting unknown keys, bad types and ranges."""
    where = path or "config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: got {data!r}, expected a mapping of keys")
    if issubclass(cls, TaggedUnion):
        default = next((f.default for f in dataclasses.fields(cls) if f.name == "name"), None)
        name = data.get("name", default)
        if not isinstance(name, str) or name not in cls.REGISTRY:
            raise ConfigError(f"{_join(path, 'name')}: got {name!r}, expected one of "
                              + ", ".join(cls.REGISTRY.names()))
        cls = cls.REGISTRY.config(name)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(f"{_join(path, unknown[0])}: unknown key; allowed keys are "
                          + ", ".join(sorted(fields)))
    kwargs = {k: _convert(v, hints[k], _join(path, k)) for k, v in data.items()}
    checks = getattr(cls, "CHECKS", {})
    for k, rule in checks.items():
        value = kwargs.get(k, getattr(cls, k, None) if k not in fields else _default(fields[k]))
        if value is not None:
            _check(value, rule, _join(path, k))
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        msg = validate()
        if msg:    # a message that names this block or a key under it needs no second prefix
            raise ConfigError(msg if path and msg.startswith((f"{path}.", f"{path}:")) else f"{where}: {msg}")
    return obj


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


# ---------------------------------------------------------------------------- YAML and overrides
def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        data = yaml_value(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{p}:{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        raise ConfigError(f"{p}: the file is empty; expected a mapping of config keys (see configs/quickstart.yaml)")
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides (value parsed as a YAML scalar or list) to a nested dict."""
    out = _deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.path=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml_value(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {key}: {part} is not a mapping")
            node = nxt
        node[parts[-1]] = value
    return out


def _deepcopy(d):
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d


def to_dict(obj) -> Any:
    """Dataclass tree -> plain dict (tagged unions keep their `name`), for YAML and MLflow."""
    if dataclasses.is_dataclass(obj):
        out = {}
        for f in dataclasses.fields(obj):
            if f.init:
                out[f.name] = to_dict(getattr(obj, f.name))
        return out
    if isinstance(obj, tuple):
        return [to_dict(v) for v in obj]
    return obj


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out
