"""Algorithm plug-ins. `ALGORITHMS` is the explicit registry; `register` refuses a taken name."""
from __future__ import annotations

ALGORITHMS: dict[str, type] = {}


def register(name: str, algorithm: type) -> type:
    """Add an algorithm class. It must subclass `algorithms.protocol.AlgorithmBase` (declared
    capabilities and defaults) and have a `Config` whose default `name` is `name`."""
    from algorithms.protocol import AlgorithmBase
    if name in ALGORITHMS:
        raise ValueError(f"algorithm {name!r} is already registered ({ALGORITHMS[name].__name__})")
    if not (isinstance(algorithm, type) and issubclass(algorithm, AlgorithmBase)):
        raise TypeError(f"algorithm {name!r}: {algorithm!r} must subclass algorithms.protocol.AlgorithmBase")
    if algorithm.Config.name != name:
        raise ValueError(f"algorithm {name!r}: its Config's default name is {algorithm.Config.name!r}")
    ALGORITHMS[name] = algorithm
    return algorithm


def algorithms_supporting(mechanism: str) -> list[str]:
    """Registered algorithms that declare a privacy mechanism (algorithms.protocol.CENTRAL_DP, ...)."""
    return sorted(n for n, a in ALGORITHMS.items() if mechanism in a.PRIVACY)


def make_algorithm(config, setup):
    from algorithms.protocol import CENTRAL_DP
    cls = ALGORITHMS[config.name]
    if setup.privacy is not None and CENTRAL_DP not in cls.PRIVACY:   # the config loader refuses this first
        raise ValueError(f"privacy.enabled: algorithm {config.name!r} does not implement central DP")
    return cls(config, setup)


def _register_builtins() -> None:
    from algorithms.fedavg import FedAvg
    register("fedavg", FedAvg)
    from algorithms.fedpa import FedPA
    register("fedpa", FedPA)
    from algorithms.fedprox import FedProx
    register("fedprox", FedProx)
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
