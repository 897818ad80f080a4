"""MLflow artifacts named in a config: `model.backbone: runs:/<run id>/<file>` (e.g. of `fleetrec
pretrain`) is downloaded once and replaced by the local file's path before the config is built,
so that validation (the file exists, its shapes fit) and every worker see a plain path.
"""
from __future__ import annotations

import logging
from pathlib import Path

from fleetrec.simulator.config_loader import ConfigError

CACHE = Path(".fleetrec_cache") / "mlflow"


def resolve_backbone(data: dict, default_tracking_uri: str) -> dict:
    """The raw config mapping with a `runs:/` backbone replaced by its local copy."""
    model = data.get("model")
    uri = model.get("backbone") if isinstance(model, dict) else None
    if not (isinstance(uri, str) and uri.startswith("runs:/")):
        return data
    tracking = data.get("tracking") if isinstance(data.get("tracking"), dict) else {}
    local = fetch_backbone(uri, str(tracking.get("tracking_uri", default_tracking_uri)))
    return {**data, "model": {**model, "backbone": str(local)}}


def fetch_backbone(uri: str, tracking_uri: str, cache: Path | None = None) -> Path:
    """The local copy of the backbone artifact `runs:/<run id>/<path>` of the MLflow store at
    `tracking_uri`, downloaded once into `.fleetrec_cache/mlflow/<run id>/` (run artifacts do not
    change). A missing run or artifact is a ConfigError naming model.backbone."""
    parts = uri[len("runs:/"):].strip("/").split("/", 1)
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"model.backbone: {uri!r}: expected runs:/<run id>/<artifact path>, as `fleetrec "
                          "pretrain` prints it")
    run_id, artifact = parts
    dest = ((cache or CACHE) / run_id).resolve()        # absolute: workers need not share the driver's cwd
    local = dest / artifact
    if local.is_file():
        return local
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri[len("sqlite:///"):]).is_file():
        raise ConfigError(f"model.backbone: cannot fetch {uri}: no MLflow store at {tracking_uri} "
                          "(tracking.tracking_uri); expected the store `fleetrec pretrain` logged to")
    import mlflow
    from mlflow.exceptions import MlflowException
    quiet = [logging.getLogger(n) for n in ("mlflow", "alembic")]      # store set-up chatter, not errors
    levels = [q.level for q in quiet]
    try:
        for q in quiet:
            q.setLevel(logging.WARNING)
        got = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest), tracking_uri=tracking_uri)
    except (MlflowException, OSError) as e:
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise ConfigError(f"model.backbone: cannot fetch {uri} from the MLflow store {tracking_uri} "
                          f"(tracking.tracking_uri): {first}") from None
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)
    if not Path(got).is_file():
        raise ConfigError(f"model.backbone: {uri} is a folder of artifacts; expected the backbone file in it")
    return Path(got)
