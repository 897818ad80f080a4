"""Algorithm plug-ins. `ALGORITHMS` is the explicit registry; `register` refuses a taken name."""
from __future__ import annotations

ALGORITHMS: dict[str, type] = {}


def register(name: str, algorithm: type) -> type:
    if name in ALGORITHMS:
        raise ValueError(f"algorithm {name!r} is already registered ({ALGORITHMS[name].__name__})")
    ALGORITHMS[name] = algorithm
    return algorithm


def make_algorithm(config, setup):
    return ALGORITHMS[config.name](config, setup)


def _register_builtins() -> None:
    from algorithms.fedavg import FedAvg
    register("fedavg", FedAvg)
    from algorithms.fedpa import FedPA
    register("fedpa", FedPA)


_register_builtins()
