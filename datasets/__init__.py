"""Data sources: real public datasets, synthetic generators, partitioners -> FederatedDataset."""
from __future__ import annotations

SOURCES: dict[str, type] = {}


def register_source(name: str, config_cls: type) -> type:
    if name in SOURCES:
        raise ValueError(f"data source {name!r} is already registered")
    SOURCES[name] = config_cls
    return config_cls


def _register_builtins() -> None:
    from datasets.synthetic import SyntheticPerUserConfig
    register_source("synthetic_per_user", SyntheticPerUserConfig)
    from datasets.synthetic_scenario import SyntheticMultiScenarioConfig
    register_source("synthetic_multi_scenario", SyntheticMultiScenarioConfig)
    from datasets.real import REAL_SOURCES
    for name, cls in REAL_SOURCES.items():
        register_source(name, cls)
    from datasets.amazon import AMAZON_SOURCES
    for name, cls in AMAZON_SOURCES.items():
        register_source(name, cls)
    from datasets.kuairand import KuaiRandConfig
    register_source("kuairand", KuaiRandConfig)
    from datasets.aliexpress import AliExpressConfig
    register_source("aliexpress", AliExpressConfig)
    from datasets.tenrec import TenrecConfig
    register_source("tenrec", TenrecConfig)
    from datasets.census_income import CensusIncomeConfig
    register_source("census_income", CensusIncomeConfig)
    from datasets.ali_ccp import AliCcpConfig
    register_source("ali_ccp", AliCcpConfig)
    from datasets.graphs import MF_SOURCES
    for name, cls in MF_SOURCES.items():
        register_source(name, cls)


_register_builtins()
