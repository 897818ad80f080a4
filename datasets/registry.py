"""Named registries and tagged-union configs: the one mechanism behind every `name:` key in a YAML.

This module sits at the bottom of the package (it imports nothing of fleetrec), so data sources,
models, combiners, algorithms and the simulator all use the same registry:

- `Registry(kind, builtins={name: "module:attr"})`: built-in entries are imported on first use,
  so looking up one algorithm does not import every other one (nor SciPy, nor Ray).
  `register(name, obj)` adds a plug-in and refuses a taken name; `registry[name]` fails with a
  message that lists what is registered.
- `TaggedUnion`: base of a config dataclass whose `name` field picks the concrete dataclass from
  a registry (`REGISTRY`); the config loader dispatches on it.
"""
from __future__ import annotations

import importlib
from typing import Callable, ClassVar, Generic, Iterator, TypeVar

T = TypeVar("T")


class UnknownName(KeyError):
    """A name that no entry of a registry has; the message lists the registered names."""

    def __str__(self) -> str:        # KeyError would quote the whole message
        return str(self.args[0])


class Registry(Generic[T]):
    """name -> entry, with lazily imported built-ins and the registry's contract checked on entry.

    `config_of(entry)` gives the config dataclass an entry is configured by (the entry itself for
    data sources, `entry.Config` for algorithms, models and combiners). With `base` (a class, or a
    function returning it, for a base defined after the registry), an entry must be a subclass
    of it whose config's default `name` is the name it is registered under.
    """

    def __init__(self, kind: str, builtins: dict[str, str] | None = None, *,
                 config_of: Callable[[T], type] | None = None, base: type | Callable[[], type] | None = None):
        self.kind = kind
        self._pending: dict[str, str] = dict(builtins or {})
        self._entries: dict[str, T] = {}
        self._config_of = config_of or (lambda entry: entry)
        self._base = base

    def _check(self, name: str, entry: T) -> None:
        if self._base is None:
            return
        base = self._base if isinstance(self._base, type) else self._base()
        if not (isinstance(entry, type) and issubclass(entry, base)):
            raise TypeError(f"{self.kind} {name!r}: {entry!r} must subclass {base.__module__}.{base.__qualname__}")
        default = getattr(self._config_of(entry), "name", name)
        if default != name:
            raise ValueError(f"{self.kind} {name!r}: its config's default name is {default!r}")

    def register(self, name: str, entry: T) -> T:
        if name in self._entries or name in self._pending:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._check(name, entry)
        self._entries[name] = entry
        return entry

    def _load(self, name: str) -> T:
        module, _, attr = self._pending[name].partition(":")
        entry = getattr(importlib.import_module(module), attr)
        self._check(name, entry)
        self._entries[name] = entry
        del self._pending[name]
        return entry

    def _load_all(self) -> None:
        for name in list(self._pending):
            if name in self._pending:          # loading one module may register others
                self._load(name)

    def __getitem__(self, name: str) -> T:
        if name in self._entries:
            return self._entries[name]
        if name in self._pending:
            return self._load(name)
        raise UnknownName(f"unknown {self.kind} {name!r}; registered: {', '.join(self.names())}")

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._pending

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries) + len(self._pending)

    def names(self) -> list[str]:
        return sorted([*self._entries, *self._pending])

    def items(self) -> list[tuple[str, T]]:
        self._load_all()
        return sorted(self._entries.items())

    def config(self, name: str) -> type:
        return self._config_of(self[name])

    def configs(self) -> dict[str, type]:
        """name -> config dataclass of every entry (the variants of a tagged-union config)."""
        return {name: self._config_of(entry) for name, entry in self.items()}


class TaggedUnion:
    """Base of a config dataclass whose `name` field picks the concrete dataclass from `REGISTRY`.

    The YAML block `{name: mmoe, experts: 4}` under a field typed `ModelConfig` is built as the
    config dataclass registered under `mmoe`; an unknown name is refused with the list of names.
    """
    REGISTRY: ClassVar[Registry]

    @classmethod
    def variants(cls) -> dict[str, type]:
        return cls.REGISTRY.configs()
