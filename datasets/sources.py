"""The YAML `data:` block: `name` picks a data source, whose config builds a FederatedDataset.

`SOURCES` is the one registry of data sources: name -> its config dataclass (a `DataConfig`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
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
    "prepared": _D + "prepared:PreparedConfig",
    "mf_synthetic": _D + "graphs:MFSyntheticConfig",
    "mf_epinions": _D + "graphs:MFEpinionsConfig",
    "mf_ciao": _D + "graphs:MFCiaoConfig",
    "mf_amazon": _D + "graphs:MFAmazonConfig",
}, base=lambda: DataConfig)


def register_source(name: str, config_cls: type) -> type:
    """Add a data source: a `DataConfig` subclass whose `build(seed)` returns a FederatedDataset."""
    return SOURCES.register(name, config_cls)


@dataclass(frozen=True)
class HoldOutConfig:
    """Clients held out of the federation (the `data.hold_out:` block of any source): e.g. the open
    clients a FedPA backbone was pre-trained on, so that a baseline federates the same private
    clients as FedPA and is tested on the same rows. Held-out clients are dropped and the rest
    renumbered 0..P-1; schema and vocabularies are unchanged."""
    fraction: float = 0.0             # share of clients held out; 0 = none
    rule: str = "random"              # random (seeded hash order) | most_active (the clients with the most rows)
    attribute: str = ""               # instead of a fraction: the clients whose 0/1 client attribute is 1
    seed: int | None = None           # seed of the random order; null = the experiment seed (as FedPA's stage 1)

    CHECKS: ClassVar[dict] = {"fraction": "0..1", "rule": ("random", "most_active")}

    def validate(self) -> str | None:
        if self.attribute and self.fraction > 0:
            return (f"set either fraction ({self.fraction}) or attribute ({self.attribute!r}), not both: the "
                    "attribute alone decides who is held out")
        return None

    @property
    def active(self) -> bool:
        return self.fraction > 0 or bool(self.attribute)

    def select(self, ds, seed: int):
        """Sorted ids of the held-out clients of `ds` (None when inactive); refuses holding out no
        client or every client."""
        if not self.active:
            return None
        from fleetrec.datasets.federated import DataError
        from fleetrec.datasets.partition import select_open
        held = select_open(ds, self.fraction, seed if self.seed is None else self.seed, self.attribute, self.rule,
                           attribute_key="data.hold_out.attribute")
        what = f"attribute {self.attribute!r}" if self.attribute else f"fraction {self.fraction}"
        if len(held) == 0:
            raise DataError(f"data.hold_out: {what} holds out no client of {ds.num_clients}; expected at least one")
        if len(held) == ds.num_clients:
            raise DataError(f"data.hold_out: {what} holds out every client; expected some to federate")
        return held


@dataclass(frozen=True)
class DataConfig(TaggedUnion):
    name: str = "synthetic_per_user"
    hold_out: HoldOutConfig = field(default_factory=HoldOutConfig)   # clients left out of the federation

    REGISTRY: ClassVar[Registry] = SOURCES

    def client_layout(self) -> str | None:
        """centralized (one client holds every user) or federated (client = user) for sources that
        offer both (`data.layout`); None for sources with one fixed layout."""
        return None

    def build(self, seed: int):
        raise TypeError(f"{type(self).__name__} must define build(seed)")
