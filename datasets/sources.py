"""The YAML `data:` block: `name` picks a data source, whose config builds a FederatedDataset.

`SOURCES` is the one registry of data sources: name -> its config dataclass (a `DataConfig`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fleetrec.datasets.registry import Registry, TaggedUnion

_D = "fleetrec.datasets."
SOURCES: Registry[type] = Registry("data source", {
    "synthetic_per_user": _D + "synthetic:SyntheticPerUserConfig",
    "synthetic_multi_scenario": _D + "synthetic_scenario:SyntheticMultiScenarioConfig",
    "movielens_100k": _D + "movielens:MovieLens100kConfig",
    "movielens_1m": _D + "movielens:MovieLens1MConfig",
    "epinions": _D + "real:EpinionsConfig",
    "ciao": _D + "real:CiaoConfig",
    "filmtrust": _D + "real:FilmTrustConfig",
    "amazon": _D + "amazon:AmazonConfig",
    "amazon_video_games": _D + "amazon:AmazonVideoGamesConfig",
    "amazon_office_products": _D + "amazon:AmazonOfficeProductsConfig",
    "kuairand": _D + "kuairand:KuaiRandConfig",
    "aliexpress": _D + "aliexpress:AliExpressConfig",
    "tenrec": _D + "tenrec:TenrecConfig",
    "census_income": _D + "census_income:CensusIncomeConfig",
    "ali_ccp": _D + "ali_ccp:AliCcpConfig",
    "mf_synthetic": _D + "graphs:MFSyntheticConfig",
    "mf_epinions": _D + "graphs:MFEpinionsConfig",
    "mf_ciao": _D + "graphs:MFCiaoConfig",
    "mf_amazon": _D + "graphs:MFAmazonConfig",
}, base=lambda: DataConfig)


def register_source(name: str, config_cls: type) -> type:
    """Add a data source: a `DataConfig` subclass whose `build(seed)` returns a FederatedDataset."""
    return SOURCES.register(name, config_cls)


@dataclass(frozen=True)
class DataConfig(TaggedUnion):
    name: str = "synthetic_per_user"

    REGISTRY: ClassVar[Registry] = SOURCES

    def client_layout(self) -> str | None:
        """centralized (one client holds every user) or federated (client = user) for sources that
        offer both (`data.layout`); None for sources with one fixed layout."""
        return None

    def build(self, seed: int):
        raise TypeError(f"{type(self).__name__} must define build(seed)")
