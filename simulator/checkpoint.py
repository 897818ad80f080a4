"""Checkpoints: everything a run needs to continue, written atomically every k rounds.

A checkpoint directory holds one folder per saved round (`round_000012/`: `config.yaml`, the
run's resolved config; `server.pt` with the server state, `worker_<i>.pt` with worker i's shard
of personal state, `driver.json` with the round records, best-round tracking and callback
state such as the MLflow run id) and `LATEST` naming the newest complete folder. The config
travels with every checkpoint, so a folder can never pair one run's state with another's
config; a new run refuses a folder that already holds checkpoints (`refuse_foreign`), a run
holds its folder while it runs so a concurrent one is refused (`held`), and
`--resume` refuses overrides that would change what the state means (`check_resume_overrides`). A folder is
written under a temporary name and renamed when complete, so a crash mid-write leaves the
previous checkpoint intact. Randomness is a pure function of (seed, round, client), so no
generator state needs saving.
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import yaml

from fleetrec.simulator.config_loader import ConfigError, to_dict


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 0                     # checkpoint every k rounds; 0 = never
    dir: str = "checkpoints"           # directory (relative to the working directory)
    keep: int = 2                      # newest checkpoints kept

    CHECKS: ClassVar[dict] = {"every": ">=0", "keep": ">=1"}


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save(directory: str | Path, rnd: int, cfg, server: dict, shards: list[dict], driver: dict,
         keep: int = 2) -> Path:
    """Write the checkpoint of a completed round `rnd` and prune old ones."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    final = d / f"round_{rnd:06d}"
    tmp = d / f".tmp_round_{rnd:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    (tmp / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    torch.save(server, tmp / "server.pt")
    for i, shard in enumerate(shards):
        torch.save(shard, tmp / f"worker_{i}.pt")
    (tmp / "driver.json").write_text(json.dumps(driver))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _atomic_write_text(d / "LATEST", final.name)
    for old in sorted(p for p in d.glob("round_*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


@dataclass
class Checkpoint:
    round: int
    server: dict
    shards: list[dict]
    driver: dict
    config: dict
    config_file: Path | None = None     # where `config` was read from


# what a damaged or foreign file raises on reading
_UNREADABLE = (OSError, ValueError, RuntimeError, KeyError, EOFError, pickle.UnpicklingError, yaml.YAMLError)


def _read(d: Path, folder: Path) -> Checkpoint:
    server = torch.load(folder / "server.pt", weights_only=True)
    shards = [torch.load(p, weights_only=True)
              for p in sorted(folder.glob("worker_*.pt"), key=lambda p: int(p.stem.split("_")[1]))]
    driver = json.loads((folder / "driver.json").read_text())
    own = folder / "config.yaml"                         # checkpoints before 2026-12 kept one at the top
    source = own if own.is_file() else d / "config.yaml"
    config = yaml.safe_load(source.read_text())
    return Checkpoint(round=driver["round"], server=server, shards=shards, driver=driver, config=config,
                      config_file=source)


def load(directory: str | Path, warn=print) -> Checkpoint:
    """Read the newest complete checkpoint. One the disk damaged is skipped for the previous one,
    saying so (`warn`); one clear error if none is readable."""
    d = Path(directory)
    latest = d / "LATEST"
    if not latest.is_file():
        raise ConfigError(f"{d}: no checkpoint to resume from (expected {latest})")
    newest = d / latest.read_text().strip()
    older = sorted((p for p in d.glob("round_*") if p.is_dir() and p.name < newest.name), reverse=True)
    errors = []
    for folder in [newest, *older]:
        try:
            ck = _read(d, folder)
        except _UNREADABLE as e:
            detail = str(e).splitlines()[0][:200] if str(e) else ""
            errors.append(f"{folder.name}: {type(e).__name__}{': ' + detail if detail else ''}")
            continue
        if folder != newest:
            warn(f"checkpoint {newest} is unreadable ({errors[0]}); resuming from {folder.name} instead",
                 file=sys.stderr)
        return ck
    raise ConfigError(f"{d}: no readable checkpoint ({'; '.join(errors)})")


def load_shard(directory: str | Path, index: int) -> dict:
    """Worker `index`'s shard of the newest complete checkpoint (reads that one file only)."""
    d = Path(directory)
    folder = d / (d / "LATEST").read_text().strip()
    try:
        return torch.load(folder / f"worker_{index}.pt", weights_only=True)
    except _UNREADABLE as e:
        raise ConfigError(f"{folder}: unreadable shard of worker {index} ({e})") from None


def refuse_foreign(directory: str | Path) -> None:
    """A new run must not write into a folder that holds another run's checkpoints."""
    d = Path(directory)
    if (d / "LATEST").is_file():
        raise ConfigError(f"checkpoint.dir: {d} already holds the checkpoints of a run (newest "
                          f"{(d / 'LATEST').read_text().strip()}); continue it with --resume {d}, or set another "
                          "checkpoint.dir")


LOCK = ".lock"


@contextlib.contextmanager
def held(directory: str | Path):
    """The run holds `directory` while it runs: a second run into it, new or `--resume`, is refused
    with one line instead of interleaving its checkpoints. An OS lock (flock) on `<dir>/.lock`, so a
    run killed in any way frees it; the file names the holder. A folder this made and left empty is
    removed again, so a run refused later on leaves nothing behind."""
    import fcntl
    d = Path(directory)
    made = not d.exists()
    d.mkdir(parents=True, exist_ok=True)
    f = d / LOCK
    fd = os.open(f, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 512).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise ConfigError(f"checkpoint.dir: {d} is in use by a run that is still going ({holder}); wait for it "
                          "to end, or set another checkpoint.dir") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
    try:
        yield
    finally:
        f.unlink(missing_ok=True)          # before the unlock: a waiting run then finds no stale name
        os.close(fd)
        if made and not any(d.iterdir()):
            d.rmdir()


# what `--resume DIR key=value` may change: the length of the run, where it is logged and shown,
# how often it is checkpointed, how Ray runs it (not how many workers hold the state)
KEEPS = "a resumed run keeps its data, model, algorithm and workers (it may change rounds, tracking, checkpointing)"
RESUME_SAFE = ("rounds", "early_stop_patience", "tracking.", "checkpoint.", "resources.address",
               "resources.max_restarts", "resources.dashboard", "resources.placement")


def refuse_unsafe_overrides(saved: dict, overrides) -> None:
    """Refuse, before the overrides are applied, a command-line override of a key a resume may not
    change (an `algorithm.name=` override would otherwise fail on the new algorithm's unknown keys)."""
    from fleetrec.simulator.config_loader import apply_overrides, flatten
    flat = flatten(saved)
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key.startswith(RESUME_SAFE):
            continue
        after = flatten(apply_overrides(saved, [item]))
        under = lambda d: {k: v for k, v in d.items() if k == key or k.startswith(key + ".")}
        if under(after) == under(flat):
            continue                  # the value it already has
        was = flat[key] if key in flat else ("a block" if under(flat) else "not set")
        raise ConfigError(f"--resume: {item} (command line) would change {key}, which is {was!r} in the checkpoint; "
                          + KEEPS)


def check_resume_overrides(saved: dict, resumed: dict) -> None:
    """Refuse a resume whose config differs from the checkpoint's in anything but RESUME_SAFE keys."""
    from fleetrec.simulator.config_loader import flatten
    a, b = flatten(saved), flatten(resumed)
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key) and not key.startswith(RESUME_SAFE):
            raise ConfigError(f"--resume: {key} is {a.get(key)!r} in the checkpoint and {b.get(key)!r} now; " + KEEPS)
