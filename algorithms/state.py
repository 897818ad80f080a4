"""Typed algorithm state: frozen dataclasses of tensors, flattened to the engine's dicts only at
the checkpoint / Ray boundary.

The engine keeps an algorithm's server state and every client's personal state as flat
`name -> tensor` dicts: that is what checkpoints store, what workers ship and what the resume
check compares. Inside an algorithm the same state is a frozen dataclass whose fields are
tensors or `name -> tensor` groups::

    @dataclass(frozen=True)
    class MyServer(TensorState):
        alpha: torch.Tensor                  # flat key "alpha"
        prev: dict[str, torch.Tensor]        # flat keys "prev.<name>"

    s = MyServer.unflatten(state)            # in aggregate_train
    return s.replace(alpha=s.alpha + 1).flatten(), stats

`unflatten` refuses a missing or unknown key with one line naming it, so a typo or a stale
checkpoint cannot silently drop a piece of state. The flat keys are unambiguous: field names are
unique and a group's keys are "<group>.<name>".
"""
from __future__ import annotations

import dataclasses
import types
import typing

import torch

Tensors = dict[str, torch.Tensor]


class TensorState:
    """Base of an algorithm's typed state (subclass it as a frozen dataclass)."""

    @classmethod
    def _layout(cls) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
        """(required tensor fields, optional tensor fields, group fields)."""
        if "_layout_cache" not in cls.__dict__:
            hints = typing.get_type_hints(cls)
            tensors, optional, groups = [], [], []
            for f in dataclasses.fields(cls):
                kind = hints[f.name]
                if kind is torch.Tensor:
                    tensors.append(f.name)
                elif typing.get_origin(kind) in (typing.Union, types.UnionType) and \
                        set(typing.get_args(kind)) == {torch.Tensor, type(None)}:
                    optional.append(f.name)
                elif typing.get_origin(kind) is dict and typing.get_args(kind)[1] is torch.Tensor:
                    groups.append(f.name)
                else:
                    raise TypeError(f"{cls.__name__}.{f.name}: a state field is a tensor, an optional tensor "
                                    f"or dict[str, Tensor], got {kind}")
            cls._layout_cache = (tuple(tensors), tuple(optional), tuple(groups))
        return cls._layout_cache

    def flatten(self) -> Tensors:
        """The engine's flat dict: tensor field `x` as "x" (left out when None), group field `g` as "g.<name>"."""
        tensors, optional, groups = self._layout()
        out = {k: getattr(self, k) for k in tensors + optional if getattr(self, k) is not None}
        for g in groups:
            out.update({f"{g}.{n}": v for n, v in getattr(self, g).items()})
        return out

    @classmethod
    def unflatten(cls, flat: Tensors):
        """The typed state from the engine's dict; a missing tensor field or an unknown key is an error."""
        tensors, optional, groups = cls._layout()
        missing = [k for k in tensors if k not in flat]
        if missing:
            raise KeyError(f"{cls.__name__}: state has no {missing[0]!r} (keys: {sorted(flat)[:8]}...)")
        single = tensors + optional
        parts: dict = {k: flat.get(k) for k in single}
        parts.update({g: {} for g in groups})
        for key, v in flat.items():
            if key in single:
                continue
            head, dot, rest = key.partition(".")
            if not dot or head not in groups:
                raise KeyError(f"{cls.__name__}: unknown state key {key!r}; expected {list(single)} "
                               f"or one of the groups {[g + '.<name>' for g in groups]}")
            parts[head][rest] = v
        return cls(**parts)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)
