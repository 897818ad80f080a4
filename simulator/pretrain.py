"""FedPA stage 1: pre-train the backbone centrally on "open" clients; stage 2 federates the rest.

`pretrain(cfg)` builds the experiment's dataset, takes a deterministic fraction of its clients
(seeded hash order of the client ids, `model.pretrain.open_fraction`), or the clients flagged by a
0/1 client attribute (`model.pretrain.open_attribute`, e.g. KuaiRand's `open`), as open users, trains the
backbone only (feature tables + MLP + output layer, no adapters) on their rows with Adam,
keeps the best epoch by AUC on those rows (as the official code does; or on the open
clients' validation rows, `select: open_val_auc`), and writes the weights
to `model.backbone`. With MLflow tracking on, the file is logged as an artifact of its own run,
and stage 2 can name it as `model.backbone: runs:/<run id>/<file>` (fetched once into
`.fleetrec_cache/mlflow/`; see `fleetrec.simulator.artifacts`).

Stage 2's dataset is the same build minus the open clients (client ids renumbered 0..P-1, schema
and vocabularies unchanged, so the backbone's tables fit): `FedPAModelConfig.pretrained_clients`
names them from the backbone file and `fleetrec.simulator.run.federated_dataset` holds them out.

    fleetrec pretrain CONFIG [key=value ...]        (or python -m fleetrec.simulator.pretrain ...)
    python -m fleetrec.simulator.pretrain --run CONFIG [...] (stage 2 on the private clients)
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fleetrec.algorithms.metrics import pooled_auc
from fleetrec.algorithms.models.fedpa import FedPAModel, FedPAModelConfig, load_backbone, save_backbone, select_open
from fleetrec.datasets.federated import CLIENT, SPLIT, TRAIN, VAL, DataError, FederatedDataset
from fleetrec.simulator.config import ExperimentConfig, load
from fleetrec.simulator.config_loader import ConfigError, apply_overrides, flatten, read_yaml, to_dict


def _fedpa_model(cfg: ExperimentConfig) -> FedPAModelConfig:
    if not isinstance(cfg.model, FedPAModelConfig):
        raise ConfigError(f"model.name: got {cfg.model.name!r}, pre-training needs 'fedpa'")
    return cfg.model


def _rows(ds: FederatedDataset, clients: np.ndarray, splits: tuple[int, ...]) -> np.ndarray:
    client, split = ds.column(CLIENT), ds.column(SPLIT)
    return np.flatnonzero(np.isin(client, clients) & np.isin(split, splits))


def _tensors(ds: FederatedDataset, rows: np.ndarray) -> tuple[dict, dict, torch.Tensor]:
    cat = {f.name: torch.from_numpy(ds.column(f.name)[rows].astype(np.int64)) for f in ds.schema.categorical}
    owner = ds.column(CLIENT)[rows]
    attrs = {f.name: torch.from_numpy(ds.client_attr(f.name)[owner].astype(np.int64))
             for f in ds.schema.client_categorical}
    y = torch.from_numpy(np.stack([ds.column(t)[rows] for t in ds.schema.tasks], 1).astype(np.float32))
    return cat, attrs, y                                                      # (N,), (N,), (N, T)


def _scores(model, cat, attrs, n: int, bs: int = 8192) -> np.ndarray:
    out = []
    with torch.no_grad():
        for s in range(0, n, bs):
            sl = slice(s, s + bs)
            logits = model({k: v[sl] for k, v in cat.items()}, torch.zeros(0), {k: v[sl] for k, v in attrs.items()})
            out.append(torch.sigmoid(logits).numpy())
    return np.concatenate(out) if out else np.zeros((0, 1), np.float32)


def _auc(scores: np.ndarray, y: torch.Tensor) -> float:
    return float(np.nanmean([pooled_auc(scores[:, t], y[:, t].numpy()) for t in range(y.shape[1])]))


def train_backbone(cfg: ExperimentConfig, ds: FederatedDataset, opened: np.ndarray, log=None) -> tuple[dict, dict]:
    """Adam on the open clients' rows; returns (best backbone tensors, summary)."""
    mcfg = _fedpa_model(cfg)
    pcfg = mcfg.pretrain
    torch.manual_seed(cfg.seed)
    model = FedPAModel(dataclasses.replace(mcfg, backbone="", user_lora="none", group_lora=False), ds.schema)
    splits = (TRAIN,) if pcfg.rows == "train" else (0, 1, 2)
    rows = _rows(ds, opened, splits)
    cat, attrs, y = _tensors(ds, rows)
    private = np.setdiff1d(np.arange(ds.num_clients), opened)
    mon = _tensors(ds, _rows(ds, private, (VAL,)))                            # monitoring only, never selects
    sel = _tensors(ds, _rows(ds, opened, (VAL,))) if pcfg.select == "open_val_auc" else (cat, attrs, y)
    params = [p for n, p in model.named_parameters() if n in model.backbone_names()]
    opt = torch.optim.Adam(params, lr=pcfg.lr, weight_decay=pcfg.weight_decay)
    g = torch.Generator().manual_seed(cfg.seed)
    best, best_auc, best_epoch, best_mon = model.backbone_tensors(), -1.0, -1, float("nan")
    for epoch in range(pcfg.epochs):
        perm = torch.randperm(len(rows), generator=g)
        model.train()
        for s in range(0, len(rows), pcfg.batch_size):
            idx = perm[s:s + pcfg.batch_size]
            logits = model({k: v[idx] for k, v in cat.items()}, torch.zeros(0), {k: v[idx] for k, v in attrs.items()})
            loss = F.binary_cross_entropy_with_logits(logits, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        auc = _auc(_scores(model, sel[0], sel[1], len(sel[2])), sel[2])      # the selection metric
        mon_auc = _auc(_scores(model, mon[0], mon[1], len(mon[2])), mon[2]) if len(mon[2]) else float("nan")
        if log is not None:
            log({"pretrain/open_auc": auc, "pretrain/private_val_auc": mon_auc, "pretrain/loss": float(loss.detach())}, epoch)
        if pcfg.select == "last" or auc > best_auc:
            best, best_auc, best_epoch, best_mon = model.backbone_tensors(), auc, epoch, mon_auc
    return best, {"open_rows": int(len(rows)), "best_epoch": best_epoch, "open_auc": best_auc,
                  "private_val_auc": best_mon}


def pretrain(cfg: ExperimentConfig, out: str | Path | None = None) -> Path:
    """Stage 1: train the backbone on the open clients and write it to `out` (default model.backbone)."""
    mcfg = _fedpa_model(cfg)
    out = Path(out or mcfg.backbone)
    if not str(out):
        raise ConfigError("model.backbone: expected the path to write the pre-trained backbone to")
    ds = cfg.data.build(cfg.seed)
    pcfg = mcfg.pretrain
    opened = select_open(ds, pcfg.open_fraction, cfg.seed, pcfg.open_attribute, pcfg.open_rule)
    if len(opened) == 0:
        what = (f"open_attribute: no client has {pcfg.open_attribute} = 1" if pcfg.open_attribute else
                f"open_fraction: {pcfg.open_fraction} of {ds.num_clients} clients is none")
        raise ConfigError(f"model.pretrain.{what}; expected at least one open client")
    if len(opened) == ds.num_clients:
        raise ConfigError(f"model.pretrain.open_{'attribute' if pcfg.open_attribute else 'fraction'}: every client "
                          "is open; expected at least one private client for stage 2")
    track = _mlflow_run(cfg) if cfg.tracking.mlflow else None
    t0 = time.perf_counter()
    log = (lambda m, step: track.log_metrics(m, step=step)) if track else None
    try:
        tensors, summary = train_backbone(cfg, ds, opened, log)
        meta = {"open_clients": int(len(opened)), "private_clients": int(ds.num_clients - len(opened)),
                "total_clients": ds.num_clients, "open_fraction": pcfg.open_fraction, "open_rule": pcfg.open_rule,
                "open_attribute": pcfg.open_attribute, "seed": cfg.seed,
                "dataset": ds.name, "data_fingerprint": ds.fingerprint(),
                "seconds": time.perf_counter() - t0, **summary}
        if track:
            meta["mlflow_uri"] = f"runs:/{track.active_run().info.run_id}/{Path(out).name}"
        path = save_backbone(out, tensors, meta)
        if track:
            track.log_metrics({f"pretrain/best_{k}": float(v) for k, v in summary.items()})
            track.log_artifact(str(path))
    finally:
        if track:
            track.end_run()
    return path


def _mlflow_run(cfg: ExperimentConfig):
    import mlflow
    mlflow.set_tracking_uri(cfg.tracking.tracking_uri)
    from fleetrec.simulator.tracking import use_experiment
    use_experiment(cfg.tracking.experiment)
    mlflow.start_run(run_name=f"{cfg.tracking.run_name or cfg.name}-pretrain")
    mlflow.set_tags({"stage": "pretrain"})
    params = flatten({"data": to_dict(cfg.data), "model": to_dict(cfg.model), "seed": cfg.seed})
    mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
    return mlflow


def load_for_pretrain(path: str, overrides: list[str]) -> tuple[ExperimentConfig, str]:
    """The config with its backbone path set aside (the file does not exist yet) and that path."""
    data = apply_overrides(read_yaml(path), list(overrides))
    target = str((data.get("model") or {}).get("backbone") or "")
    if not target or target.startswith("runs:/"):
        raise ConfigError(f"{path}: model.backbone: expected the path to write the pre-trained backbone to"
                          + (f", got the MLflow artifact {target} (stage 2 reads those)" if target else ""))
    return load(path, [*overrides, "model.backbone="]), target


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fleetrec pretrain", description="FedPA stage 1: pre-train the backbone "
                                "on the open clients and write model.backbone.")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--run", action="store_true", help="instead run stage 2 on the private clients")
    args = p.parse_args(argv)
    try:
        if args.run:
            from fleetrec.simulator.run import run
            from fleetrec.simulator.tracking import default_callbacks
            cfg = load(args.config, args.overrides)
            run(cfg, default_callbacks(cfg))    # holds the open clients out
            return 0
        cfg, target = load_for_pretrain(args.config, args.overrides)
        path = pretrain(cfg, target)
        _, meta = load_backbone(path)
        print(f"backbone {path}: {meta['open_clients']} open clients, {meta['open_rows']} rows, "
              f"best epoch {meta['best_epoch']} open AUC {meta['open_auc']:.4f} (private users' validation AUC "
              f"{meta['private_val_auc']:.4f}, monitoring only)", file=sys.stderr)
        if meta.get("mlflow_uri"):
            print(f"logged to MLflow: stage 2 can load it with model.backbone={meta['mlflow_uri']}", file=sys.stderr)
        return 0
    except (ConfigError, DataError) as e:
        print(f"fleetrec: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
