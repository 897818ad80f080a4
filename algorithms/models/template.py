"""The parameter template of the multi-task models (PF-MSMTrec, methods.md §1.2 option A).

Every parameter of an MTL model (models/mtl.py) gets a template role from its module name, and
BatchNorm tensors are recognised by their module name (`bn<i>`). Algorithms aggregate by these
roles (algorithms/pfmsm.py, algorithms/scenario.py); the naming rule lives here, with the models
that follow it.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

# Template roles (§1.2 option A). Task and tower roles carry the task name: "task:ctr", "tower:ctr".
GLOBAL = "global"          # aggregated across all clients
SCENARIO = "scenario"      # scenario experts, aggregated (personalized) across clients
PERSONAL = "personal"      # scenario experts kept by the client (aggregate_scenario_experts=False)
LOCAL = "local"            # gates, embeddings: never uploaded
TASK_PREFIX, TOWER_PREFIX = "task:", "tower:"


def task_role(task: str) -> str:
    return TASK_PREFIX + task


def tower_role(task: str) -> str:
    return TOWER_PREFIX + task


def template_roles(names: Iterable[str], tasks: Sequence[str],
                   aggregate_scenario_experts: bool = True) -> dict[str, str]:
    """Template role of every parameter name of an MTL model (§1.2 option A), from module names.

    `global_experts.*` / `bottom.*` -> "global" (all clients); `task_experts.<t>.*` -> "task:<name>"
    (clients having task t); `scenario_experts.*` -> "scenario" when `aggregate_scenario_experts`,
    else "personal"; `towers.<t>.*` -> "tower:<name>"; anything else (embeddings, gates) -> "local".
    """
    out = {}
    for name in names:
        parts = name.split(".")
        out[name] = _role_of(parts, tasks, aggregate_scenario_experts)
    return out


def _role_of(parts: list[str], tasks: Sequence[str], aggregate_scenario_experts: bool) -> str:
    for i, p in enumerate(parts):
        if p in ("towers", "task_experts"):
            t = tasks[int(parts[i + 1])]
            return tower_role(t) if p == "towers" else task_role(t)
        if p == "scenario_experts":
            return SCENARIO if aggregate_scenario_experts else PERSONAL
        if p in ("global_experts", "bottom"):
            return GLOBAL
    return LOCAL


_BN_RE = re.compile(r"(^|\.)bn\d*\.(weight|bias|running_mean|running_var|num_batches_tracked)$")


def bn_tensor(name: str) -> bool:
    """True for BatchNorm weight, bias and running statistics (modules named `bn<i>`, see mtl.py).

    Under `fedbn_mode="local_bn"` (FedBN) these tensors are never uploaded nor overwritten.
    """
    return _BN_RE.search(name) is not None
