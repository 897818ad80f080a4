"""The driver loop: `run(cfg)` is what `fleetrec run` and every Tune trial call.

It builds the dataset, puts it in the object store once, starts the coordinator (which
starts the workers), then asks for one round record per round and hands each record to the
callbacks (progress bar, MLflow, early stop). Best-validation selection happens here.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import ray

from simulator.config import ExperimentConfig


@dataclass
class RunResult:
    records: list[dict]
    best_round: int | None               # round with the best validation metric
    best: dict                           # the record of that round (its test metrics are the result)
    final: dict                          # the last evaluated record
    server_state: dict
    info: dict = field(default_factory=dict)
    run_id: str | None = None

    def summary(self) -> dict[str, float]:
        keys = [k for k in self.best if k.startswith(("val/", "test/"))]
        return {"best_round": self.best_round, **{k: self.best[k] for k in sorted(keys)}}


class Callback:
    """Driver-side consumer of round records. Return True from `on_round` to stop early."""

    def on_start(self, cfg: ExperimentConfig, info: dict) -> None: ...
    def on_round(self, record: dict) -> bool | None: ...
    def on_end(self, result: RunResult) -> None: ...


def ensure_ray(cfg: ExperimentConfig) -> None:
    if not ray.is_initialized():
        ray.init(address=cfg.resources.address, include_dashboard=False, log_to_driver=True,
                 configure_logging=False)


def _better(a: float, b: float | None, mode: str) -> bool:
    if math.isnan(a):
        return False
    return b is None or (a > b if mode == "max" else a < b)


def run(cfg: ExperimentConfig, callbacks: list[Callback] = (), dataset=None, keep_actors: bool = False):
    """Run one experiment. Returns a RunResult (and the coordinator handle if keep_actors)."""
    from simulator.coordinator import Coordinator
    ensure_ray(cfg)
    t0 = time.perf_counter()
    ds = dataset if dataset is not None else cfg.data.build(cfg.seed)
    ds_ref = ray.put(ds)
    coord = Coordinator.options(num_cpus=0).remote(cfg, [ds_ref])
    info = ray.get(coord.info.remote())
    info.update(dataset=ds.name, num_clients=ds.num_clients, num_rows=ds.num_rows, meta=ds.meta,
                startup_seconds=time.perf_counter() - t0)
    for cb in callbacks:
        cb.on_start(cfg, info)
    records, best, best_val, stale = [], None, None, 0
    metric = f"val/{cfg.eval.metric}"
    try:
        for rnd in range(cfg.rounds):
            due = (rnd + 1) % cfg.eval.every == 0 or rnd == cfg.rounds - 1
            rec = ray.get(coord.run_round.remote(rnd, due))
            records.append(rec)
            stop = False
            if metric in rec:
                if _better(rec[metric], best_val, cfg.eval.mode):
                    best, best_val, stale = rec, rec[metric], 0
                else:
                    stale += 1
                    stop = 0 < cfg.early_stop_patience <= stale
            for cb in callbacks:
                stop = bool(cb.on_round(rec)) or stop
            if stop:
                break
        evaluated = [r for r in records if metric in r]
        result = RunResult(records=records, best_round=best["round"] if best else None, best=best or {},
                           final=evaluated[-1] if evaluated else {},
                           server_state=ray.get(coord.server_state.remote()), info=info)
        for cb in callbacks:
            cb.on_end(result)
    finally:
        if not keep_actors:
            ray.kill(coord)
    return (result, coord) if keep_actors else result
