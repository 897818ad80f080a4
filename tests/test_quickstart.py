"""The quickstart learns: its test AUC (at the best validation round) is within 0.05 of the
generator's Bayes-optimal AUC."""
from __future__ import annotations

from fleetrec.simulator.config import load
from fleetrec.simulator.run import run


def test_quickstart_reaches_near_bayes_auc(ray_session):
    cfg = load(None, ["tracking.mlflow=false", "tracking.progress=false", "resources.cpus_per_worker=1"])
    result = run(cfg)
    bayes = result.info["ceiling"]["bayes_auc"]["test"]
    assert result.best["test/auc"] > bayes - 0.05, (result.best["test/auc"], bayes)
