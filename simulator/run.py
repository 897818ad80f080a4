"""The driver loop: `run(cfg)` is what `fleetrec run` and every Tune trial call.

It builds the dataset, puts it in the object store once, starts the coordinator (which
starts the workers), then asks for one round record per round and hands each record to the
callbacks (progress bar, MLflow, early stop). Best-validation selection happens here.

Length: the driver's checks before any actor starts (resources, the Ray address, a resumed
checkpoint's fit, the federated dataset and its hold-out) sit beside the loop they guard.
"""
from __future__ import annotations

import contextlib
import math
import os
import re
import socket
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import ray
import torch

from fleetrec.algorithms.evaluation import PER_USER
from fleetrec.datasets.federated import TRAIN, FederatedDataset
from fleetrec.datasets.partition import subset_clients
from fleetrec.datasets.prepared import PreparedDataset
from fleetrec.simulator import checkpoint
from fleetrec.simulator.ceiling import ceiling, client_rate_auc
from fleetrec.simulator.config import ExperimentConfig
from fleetrec.simulator.config_loader import ConfigError
from fleetrec.simulator.placement import Placement


@dataclass
class RunResult:
    records: list[dict]
    best_round: int | None               # round with the best validation metric
    best: dict                           # the record of that round (its test metrics are the result)
    final: dict                          # the last evaluated record
    server_state: dict
    info: dict = field(default_factory=dict)
    run_id: str | None = None
    best_per_user: dict | None = None    # eval.per_user: {"user": ids, "recall@20": values, ...} of the best round

    def summary(self) -> dict[str, float]:
        keys = [k for k in self.best if k.startswith(("val/", "test/"))]
        return {"best_round": self.best_round, **{k: self.best[k] for k in sorted(keys)}}


class Callback:
    """Driver-side consumer of round records. Return True from `on_round` to stop early.
    `state_dict` / `load_state_dict` carry what a resumed run needs (e.g. the MLflow run id)."""

    def on_start(self, cfg: ExperimentConfig, info: dict) -> None: ...
    def on_round(self, record: dict) -> bool | None: ...
    def on_end(self, result: RunResult) -> None: ...
    def on_abort(self, error: BaseException) -> None: ...   # the run failed or was interrupted

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...


def check_address(address: str | None, timeout_s: float = 3.0) -> None:
    """A Ray address `host:port` must answer: Ray itself retries an unreachable one for minutes."""
    if address in (None, "auto", "local") or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"resources.address: got {address!r}, expected host:port, 'auto' or null (a local cluster)")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ConfigError(f"resources.address: nothing answers at {address} within {timeout_s:g} s ({e.strerror or e}); "
                          "start the cluster (ray start --head) or use 'auto' / null") from None


def local_resources() -> dict:
    """The CPUs and GPUs a fresh local Ray cluster on this machine would have (Ray's own counting)."""
    try:
        from ray._private.utils import get_num_cpus
        cpus = float(get_num_cpus())
    except Exception:                       # a Ray without the helper: the affinity mask
        affinity = getattr(os, "sched_getaffinity", None)
        cpus = float(len(affinity(0)) if affinity else os.cpu_count() or 1)
    return {"CPU": cpus, "GPU": float(torch.cuda.device_count())}


def ensure_ray(cfg: ExperimentConfig) -> None:
    if not ray.is_initialized():
        check_address(cfg.resources.address)
        if cfg.resources.address in (None, "local") and not os.environ.get("RAY_ADDRESS"):
            check_fits(cfg, local_resources())      # before starting Ray: a local run that cannot place its workers
        ctx = ray.init(address=cfg.resources.address, include_dashboard=cfg.resources.dashboard, log_to_driver=True,
                       configure_logging=False)
        url = getattr(ctx, "dashboard_url", None)
        if cfg.resources.dashboard and url:
            print(f"Ray dashboard: http://{url} (actors: Coordinator, Worker)", file=sys.stderr)


def check_resume_fits(ck, cfg: ExperimentConfig, ds: FederatedDataset) -> None:
    """The checkpoint's tensors must be those this config builds (names, shapes, dtypes), checked
    in the driver before any actor starts."""
    from fleetrec.algorithms import make_algorithm
    from fleetrec.simulator.config import make_setup
    if len(ck.shards) != cfg.resources.workers:
        raise ConfigError(f"--resume: the checkpoint holds {len(ck.shards)} worker shards, resources.workers is "
                          f"{cfg.resources.workers}")
    place = Placement.build(cfg.resources.placement_policy, cfg.resources.workers, ds.rows_per_client(TRAIN))
    for i, shard in enumerate(ck.shards):
        for k, v in shard.items():
            if v.shape[0] != len(place.owned(i)):
                raise ConfigError(f"--resume: worker {i}'s personal tensor {k!r} holds {v.shape[0]} clients in the "
                                  f"checkpoint, {len(place.owned(i))} with this config's data and placement")
    algo = make_algorithm(cfg.algorithm, make_setup(cfg, ds))
    fresh = algo.init_server()
    personal = algo.init_personal(torch.arange(min(2, ds.num_clients)))
    for what, saved, built in [("server tensor", ck.server, fresh)] + [
            (f"worker {i}'s personal tensor", shard, personal) for i, shard in enumerate(ck.shards)]:
        if set(saved) != set(built):
            extra, missing = sorted(set(saved) - set(built)), sorted(set(built) - set(saved))
            raise ConfigError(f"--resume: the checkpoint's {what}s differ from what this config builds "
                              f"(only in the checkpoint: {extra[:5]}; only in the config: {missing[:5]})")
        for k, v in saved.items():
            want = built[k]
            a, b = (tuple(v.shape), tuple(want.shape)) if what == "server tensor" else (tuple(v.shape[1:]),
                                                                                     tuple(want.shape[1:]))
            if a != b or v.dtype != want.dtype:
                raise ConfigError(f"--resume: {what} {k!r} is {a} {str(v.dtype).replace('torch.', '')} in the "
                                  f"checkpoint, {b} {str(want.dtype).replace('torch.', '')} for this config")
    saved = ck.driver.get("data_fingerprint")          # same shapes, other rows: e.g. an edited data file
    if saved is not None and saved != ds.fingerprint():
        raise ConfigError(f"--resume: the data this config builds differs from the checkpoint's (content digest "
                          f"{saved} then, {ds.fingerprint()} now); was the file behind data.* changed?")


def check_fits(cfg: ExperimentConfig, cluster: dict) -> None:
    """A local cluster that cannot place every worker would wait forever: refuse in one line.
    (A remote cluster may add nodes, so there the workers wait for them.)"""
    if cfg.resources.address not in (None, "local") or (ray.is_initialized() and ray.util.get_current_placement_group() is not None):
        return
    res = cfg.resources
    for key, per, name in (("CPU", res.cpus_per_worker, "cpus_per_worker"), ("GPU", res.gpus_per_worker, "gpus_per_worker")):
        need, have = res.workers * per, cluster.get(key, 0.0)
        if need > have + 1e-9:
            raise ConfigError(f"resources.workers x resources.{name}: the workers need {need:g} {key}, this machine's "
                              f"Ray cluster has {have:g}; lower resources.workers or resources.{name}")


class Diverged(RuntimeError):
    """The run stopped because `train.stop_on_divergence` rounds in a row diverged (CLI exit 3)."""


def diverging(rec: dict) -> str | None:
    """Why a round record counts as diverging, or None: more than half of its client updates were
    dropped as non-finite, its training loss is not finite, or its evaluation scored rows as NaN."""
    dropped, trained = rec.get("train/updates_dropped", 0), rec.get("train/clients_trained", 0)
    if dropped and dropped > trained:
        return f"{int(dropped)} of {int(dropped + trained)} client updates were NaN or inf"
    loss = rec.get("train/train_loss")
    if loss is not None and not math.isfinite(loss):
        return f"the training loss was {loss}"
    for split in ("val", "test"):
        if rec.get(f"{split}/nonfinite_scores"):
            return f"the model scored {int(rec[f'{split}/nonfinite_scores'])} {split} rows as NaN or inf"
    return None


def _better(a: float, b: float | None, mode: str) -> bool:
    if math.isnan(a):
        return False
    return b is None or (a > b if mode == "max" else a < b)


def federated_dataset(cfg: ExperimentConfig) -> FederatedDataset:
    """The dataset a run federates: the data config's build, without the clients a pre-trained part
    of the model has already seen (`ModelConfig.pretrained_clients`: FedPA's open clients) or that
    `data.hold_out` names (the same clients, for a baseline), whose ids are renumbered 0..P-1 with
    schema and vocabularies unchanged."""
    ds = cfg.data.build(cfg.seed)
    if isinstance(ds, PreparedDataset):
        return _prepared_federation(cfg, ds)
    seen = cfg.model.pretrained_clients(ds)
    held = cfg.data.hold_out.select(ds, cfg.seed)
    if seen is not None and held is not None and not np.array_equal(seen, held):
        raise ConfigError(f"data.hold_out: holds out {len(held)} clients, but model.backbone was pre-trained on "
                          f"{len(seen)} others; drop data.hold_out (the backbone's open clients are held out) or "
                          "make it match model.pretrain")
    if seen is None and held is None:
        return ds
    pretrained, seen = seen is not None, held if seen is None else seen
    private = np.setdiff1d(np.arange(ds.num_clients), seen)
    coverage = open_coverage(ds, seen, private)
    out = subset_clients(ds, private)
    out.meta["open_item_coverage"] = coverage
    out.meta["held_out_clients"] = int(len(seen))
    low = {f: c for f, c in coverage.items() if c < COVERAGE_WARNING}
    if low and pretrained:      # (a model trained from scratch does not score through the open clients' rows)
        print("fleetrec: warning: model.pretrain.open_fraction: only "
              + ", ".join(f"{100 * c:.0f}% of the private test rows' {f}" for f, c in low.items())
              + " occur in the open clients' rows, so the rest score through untrained backbone embeddings",
              file=sys.stderr)
    return out


def _prepared_federation(cfg: ExperimentConfig, ds: PreparedDataset) -> PreparedDataset:
    """A prepared layout as the run's federation, refusing what it cannot honour with one line."""
    if cfg.data.hold_out.active:
        raise ConfigError(f"data.hold_out: the prepared layout {ds.path} holds the clients it was written with; "
                          "set data.hold_out in the config given to `fleetrec data prepare --out` instead")
    built = ds.manifest.get("seed")
    if built is not None and built != cfg.seed:
        raise ConfigError(f"seed: {cfg.seed}, but the prepared layout {ds.path} was drawn with seed {built} (its rows "
                          f"depend on it): prepare one per seed (`fleetrec data prepare CONFIG --seed {cfg.seed} --out "
                          "DIR`), or pin data.seed in the config given to prepare")
    if ds.meta.get("held_out_clients"):
        raise ConfigError(f"data.path: the prepared layout {ds.path} was written without {ds.meta['held_out_clients']} "
                          "held-out clients (FedPA's open clients or data.hold_out); running such a layout is not "
                          "supported yet: run this config from its source data")
    if cfg.model.pretrained_clients(ds) is not None:     # (raises when the backbone's clients do not fit)
        raise ConfigError(f"model.backbone: pre-trained on clients of this data; prepare the layout from this "
                          f"config so they are held out (not supported yet for {ds.path})")
    return ds


COVERAGE_WARNING = 0.5       # below this share of private test rows with a pre-trained item value: a warning


def open_coverage(ds: FederatedDataset, opened: np.ndarray, private: np.ndarray) -> dict[str, float]:
    """Per row categorical field: the share of the private clients' test rows whose value occurs in
    some open client's rows (the values the pre-trained backbone has seen)."""
    from fleetrec.datasets.federated import CLIENT, SPLIT, TEST
    client, split = ds.column(CLIENT), ds.column(SPLIT)
    in_open, test = np.isin(client, opened), np.isin(client, private) & (split == TEST)
    out = {}
    for f in ds.schema.categorical:
        col = ds.column(f.name)
        if test.any():
            out[f.name] = float(np.isin(col[test], np.unique(col[in_open])).mean())
    return out


def reference_values(ds, ks: tuple[int, ...] | None, approximate: bool) -> dict:
    """What a perfect model (`ceiling`) and a per-client bias alone (`floor`) score on the run's data.
    A prepared layout carries the values computed from all its rows when it was written; a run that
    asks for other ones (other K, the other pooled-AUC form) reports none, and says so."""
    if not isinstance(ds, PreparedDataset):
        return {"ceiling": ceiling(ds, ks or (20, 40), approximate=approximate),
                "floor": {} if ks else {"client_rate_auc": client_rate_auc(ds, approximate=approximate)}}
    ref = ds.manifest["reference"]
    want = reference_key(ks, approximate)
    if not ref:
        print(f"fleetrec: note: data.path={ds.path}: the layout carries no reference values (written without "
              "them); the ceiling and client-rate floor are not reported", file=sys.stderr)
        return {"ceiling": {}, "floor": {}}
    if {k: ref.get(k) for k in want} != want:
        print(f"fleetrec: note: data.path={ds.path}: its reference values were computed for ranking="
              f"{ref.get('ranking')} K={ref.get('ks')} approximate={ref.get('approximate')}, this run asks for ranking="
              f"{want['ranking']} K={want['ks']} approximate={approximate}; "
              "the ceiling and client-rate floor are not reported (prepare it again to have them)", file=sys.stderr)
        return {"ceiling": {}, "floor": {}}
    return {"ceiling": ref["ceiling"], "floor": ref["floor"]}


def reference_key(ks: tuple[int, ...] | None, approximate: bool) -> dict:
    """What a run's reference values depend on (a prepared layout stores them under this key)."""
    return {"ks": list(ks or (20, 40)), "approximate": approximate, "ranking": bool(ks)}


def _scenario_names(ds: FederatedDataset) -> list[str] | None:
    """The name of each client of a scenario federation (its `label`, e.g. `category:3`, or `s<k>`)."""
    if ds.schema.scenario is None:
        return None
    if "label" in ds.client_attrs.column_names:
        return [str(x) for x in ds.client_attrs.column("label").to_pylist()]
    return [f"s{c}" for c in range(ds.num_clients)]


def run(cfg: ExperimentConfig, callbacks: list[Callback] = (), dataset=None, keep_actors: bool = False,
        resume=None):
    """Run one experiment. Returns a RunResult (and the coordinator handle if keep_actors).

    `dataset`: None (built from `cfg.data`), a `FederatedDataset`, or a `ray.ObjectRef` to one (put
    once by the caller, so a large dataset is not held privately by the driver as well).
    `resume`: a `fleetrec.simulator.checkpoint.Checkpoint` to continue from (its round + 1 onwards).
    """
    if resume is None and cfg.checkpoint.every:
        checkpoint.refuse_foreign(cfg.checkpoint.dir)
    with checkpoint.held(cfg.checkpoint.dir) if cfg.checkpoint.every else contextlib.nullcontext():
        return _run(cfg, callbacks, dataset, keep_actors, resume)


def _run(cfg: ExperimentConfig, callbacks, dataset, keep_actors: bool, resume):
    from fleetrec.simulator.coordinator import Coordinator, start_workers
    ldp = cfg.privacy.local
    if ldp.enabled and ldp.mechanism != "none" and ldp.clip == 0:
        print(f"fleetrec: warning: privacy.local: {ldp.mechanism} noise without privacy.local.clip bounds nothing: "
              "no finite epsilon exists and none is logged", file=sys.stderr)
    t_build = time.perf_counter()
    built = dataset is None
    if built:                # data errors (a missing file, a bad column) before Ray starts
        dataset = federated_dataset(cfg)
    if resume is not None and not isinstance(dataset, ray.ObjectRef):
        check_resume_fits(resume, cfg, dataset)
    t_build = time.perf_counter() - t_build
    ensure_ray(cfg)
    check_fits(cfg, ray.cluster_resources())
    t0 = time.perf_counter() - t_build             # start-up: the data build and what follows, not Ray's own start
    if isinstance(dataset, PreparedDataset):      # a sharded layout: each worker reads its own clients' rows
        ds_ref = ds = dataset                     # (the handle is a folder and a manifest: passed by value)
    elif isinstance(dataset, ray.ObjectRef):      # already in the object store (large runs put it once)
        ds_ref = dataset
        ds = ray.get(ds_ref)
        if resume is not None:
            check_resume_fits(resume, cfg, ds)
    else:
        ds_ref = ray.put(dataset)
        # built here: read the object store's copy from now on, free the private one
        ds = ray.get(ds_ref) if built else dataset
    del dataset
    workers, placement = start_workers(cfg, ds, ds_ref)
    coord = Coordinator.options(num_cpus=0).remote(cfg, [ds_ref], workers, placement)
    approx = cfg.eval.pooled_auc == "histogram"      # reference AUCs by the evaluation's own approximation
    info: dict = {}
    finished = False
    try:
        info.update(ray.get(coord.info.remote()))
        info.update(dataset=ds.name, num_clients=ds.num_clients, num_rows=ds.num_rows, meta=ds.meta,
                    **reference_values(ds, cfg.algorithm.ranking_ks(), approx),
                    scenario_names=_scenario_names(ds),
                    startup_seconds=time.perf_counter() - t0,
                    worker_handles=list(workers))
        loop = _Loop(cfg, callbacks)
        if resume is not None:
            ray.get(coord.restore.remote(resume.server, resume.shards))
            loop.load_state_dict(resume.driver)
            info["resumed_from_round"] = resume.round
        for cb in callbacks:
            cb.on_start(cfg, info)
        data_fp = ds.fingerprint() if cfg.checkpoint.every else None
        for rnd in range(loop.next_round, cfg.rounds):
            due = (rnd + 1) % cfg.eval.every == 0 or rnd == cfg.rounds - 1
            rec = ray.get(coord.run_round.remote(rnd, due))
            stop = loop.record(rec)
            ck = cfg.checkpoint
            if ck.every and ((rnd + 1) % ck.every == 0 or rnd == cfg.rounds - 1 or stop):
                server, shards = ray.get(coord.snapshot.remote())
                checkpoint.save(ck.dir, rnd, cfg, server, shards, {**loop.state_dict(rnd), "data_fingerprint": data_fp},
                                ck.keep)
            if stop:
                break
        info["worker_recoveries"] = ray.get(coord.info.remote())["worker_recoveries"]
        result = loop.result(ray.get(coord.server_state.remote()), info)
        for cb in callbacks:
            cb.on_end(result)
        finished = True
    except BaseException as e:
        for cb in callbacks:
            cb.on_abort(e)
        raise
    finally:
        # the driver owns the workers: a handle kept in the result would keep them (and their CPUs)
        info.pop("worker_handles", None)
        if not keep_actors:
            actors = [coord, *workers]
            if finished:       # let them exit on their own first: a kill's SIGTERM landing in Ray's own
                # ActorHandle.__del__ printed "Exception ignored ... SystemExit" from the coordinator
                bye = [a.__ray_terminate__.remote() for a in actors]
                ray.wait(bye, num_returns=len(bye), timeout=2.0)
            for a in actors:
                ray.kill(a, no_restart=True)
        del workers
    return (result, coord) if keep_actors else result


class _Loop:
    """Round records, best-validation tracking and early stopping: the driver's state."""

    def __init__(self, cfg: ExperimentConfig, callbacks):
        self.cfg, self.callbacks = cfg, list(callbacks)
        self.metric = f"val/{cfg.eval.metric}"
        self.records: list[dict] = []
        self.best, self.best_val, self.stale, self.next_round = None, None, 0, 0
        self.best_per_user = None
        self.diverging: list[int] = []     # 1-based rounds that diverged
        self.streak = 0

    def _divergence(self, rec: dict) -> None:
        """Mark a diverging round in its record (`train/diverging` = 1) and stop the run after
        `train.stop_on_divergence` of them in a row."""
        why = diverging(rec)
        if why is None:
            self.streak = 0
            return
        rec["train/diverging"] = 1.0
        self.diverging.append(rec["round"] + 1)
        self.streak += 1
        k = self.cfg.train.stop_on_divergence
        if k and self.streak >= k:
            first, last = rec["round"] + 2 - self.streak, rec["round"] + 1
            where = (f"in round {last}" if self.streak == 1 else
                     f"in {self.streak} rounds in a row (rounds {first}-{last})")
            raise Diverged(f"the run diverged: {why} {where}; "
                           f"train.lr is {self.cfg.train.lr:g}: lower it, or set train.stop_on_divergence=0 to go on")

    def record(self, rec: dict) -> bool:
        per_user = rec.pop(PER_USER, None)      # kept for the best round only, never in the records
        self.records.append(rec)
        self.next_round = rec["round"] + 1
        stop = False
        dropped = rec.get("train/updates_dropped", 0)
        if dropped and rec.get("train/clients_trained", 1) == 0:    # nothing left to train on: diverged
            raise ConfigError(f"train.lr: in round {rec['round'] + 1} all {dropped} client updates were NaN or "
                              f"inf and were dropped, so the model cannot train on; train.lr is "
                              f"{self.cfg.train.lr:g} (a smaller one, or train.optimizer: adam, usually helps)")
        self._divergence(rec)
        if self.metric not in rec and any(k.startswith("val/") for k in rec):   # an evaluation without it
            have = sorted(k[len("val/"):] for k in rec if k.startswith("val/") and not re.match(r"val/s\d+/", k))
            raise ConfigError(f"eval.metric: got {self.cfg.eval.metric!r}, but this run's validation has no "
                              f"{self.metric}; expected one of {', '.join(have)}")
        if self.metric in rec:
            if _better(rec[self.metric], self.best_val, self.cfg.eval.mode):
                self.best, self.best_val, self.stale = rec, rec[self.metric], 0
                self.best_per_user = per_user
            else:
                self.stale += 1
                stop = 0 < self.cfg.early_stop_patience <= self.stale
        for cb in self.callbacks:
            stop = bool(cb.on_round(rec)) or stop
        return stop

    def state_dict(self, rnd: int) -> dict:
        per = None if self.best_per_user is None else {k: np.asarray(v).tolist() for k, v in self.best_per_user.items()}
        return {"round": rnd, "records": self.records, "best_round": self.best["round"] if self.best else None,
                "best_val": self.best_val, "stale": self.stale, "best_per_user": per,
                "callbacks": [cb.state_dict() for cb in self.callbacks]}

    def load_state_dict(self, d: dict) -> None:
        self.records = list(d["records"])
        self.next_round = d["round"] + 1
        self.best = next((r for r in self.records if r["round"] == d["best_round"]), None)
        self.best_val, self.stale = d["best_val"], d["stale"]
        per = d.get("best_per_user")
        self.best_per_user = None if per is None else {k: np.asarray(v, np.int64 if k == "user" else np.float64)
                                                       for k, v in per.items()}
        for cb, state in zip(self.callbacks, d.get("callbacks", [])):
            cb.load_state_dict(state)

    def result(self, server_state: dict, info: dict) -> RunResult:
        evaluated = [r for r in self.records if self.metric in r]
        return RunResult(records=self.records, best_round=self.best["round"] if self.best else None,
                         best=self.best or {}, final=evaluated[-1] if evaluated else {},
                         server_state=server_state, info=info, best_per_user=self.best_per_user)
