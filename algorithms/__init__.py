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
    from algorithms.pmtrec import FedAvgMF, PMTRecMF
    register("pmtrec", PMTRecMF)
    register("fedavg_mf", FedAvgMF)
    from algorithms import scenario
    from algorithms.pfmsm import PFMSMTrec
    for cls in (scenario.ScenarioLocal, scenario.ScenarioCentralized, scenario.ScenarioFedAvg,
                scenario.ScenarioFedProx, scenario.ScenarioFedBN, scenario.ScenarioFedPer,
                scenario.ScenarioDitto, PFMSMTrec):
        register(cls.Config.name, cls)


_register_builtins()
