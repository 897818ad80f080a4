"""The MLflow UI as a user sees it, in headless Chromium: a tiny scenario run and a 2-trial sweep
into a fresh store, `fleetrec ui` on it, then the page behind the link it prints (the runs list),
the run's metric charts, its scenario x task table and the sweep parent linking its best child,
each as rendered DOM and as a screenshot.

    python benchmarks/ui_screenshots.py              # screenshots into docs/ui/ (runs list, scenario table, sweep)
    python benchmarks/ui_screenshots.py --out DIR

`tests/test_browser.py` runs the same steps and checks what each page shows. Needs a Chromium
binary (`chromium` on PATH, or FLEETREC_CHROMIUM); Debian/Ubuntu: `apt-get install chromium`.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY_SWEEP = ["rounds=2", "data.num_clients=37", "data.num_items=40", "data.rows_min=5", "data.rows_max=30",
              "federation.clients_per_round=20", "model.dim=8", "model.hidden=[8]", "resources.cpus_per_worker=0.5",
              "tracking.mlflow=true", "tracking.progress=false"]
TINY_SCENARIO_RUN = ["rounds=2", "data.rows=[600,400,300,200]", "resources.workers=1", "resources.cpus_per_worker=0.5",
                     "tracking.mlflow=true", "tracking.progress=false"]


def chromium() -> str | None:
    return os.environ.get("FLEETREC_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def make_store(root: Path, overrides: list[str] = ()) -> dict:
    """A 2-round PF-MSMTrec run on the synthetic scenarios, logged to a store under `root` (its
    artifacts too: the working dir is `root` while it runs). Returns uri, experiment and run ids."""
    from fleetrec.simulator.config import load
    from fleetrec.simulator.run import run
    from fleetrec.simulator.tracking import MlflowLogger
    root.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    here = os.getcwd()
    os.chdir(root)
    try:
        cfg = load(REPO / "configs" / "pf_msmtrec_synthetic.yaml",
                   [*TINY_SCENARIO_RUN, f"tracking.tracking_uri={uri}", *overrides])
        logger = MlflowLogger(cfg)
        run(cfg, [logger])
    finally:
        os.chdir(here)
    from mlflow import MlflowClient
    r = MlflowClient(uri).get_run(logger.run_id)
    return {"uri": uri, "experiment_id": r.info.experiment_id, "run_id": r.info.run_id, "run_name": r.info.run_name,
            **make_sweep(root, uri)}


def make_sweep(root: Path, uri: str) -> dict:
    """Two trials of the shipped quickstart space (2 rounds, tiny data) into the same store: the
    sweep parent, its best child and that child's name (its sampled values)."""
    from fleetrec.simulator.tune import tune_sweep
    from fleetrec.simulator.tune_space import load_sweep
    sweep = load_sweep(REPO / "tune_spaces" / "quickstart.yaml", [*TINY_SWEEP, f"tracking.tracking_uri={uri}"],
                       storage_path=str(root / "tune_results"), num_samples=2)
    res = tune_sweep(sweep, verbose=0)
    from mlflow import MlflowClient
    client = MlflowClient(uri)
    parent = client.get_run(res.parent_run_id)
    best = client.get_run(parent.data.tags["tune.best_run_id"])
    return {"sweep_experiment_id": parent.info.experiment_id, "sweep_run_id": parent.info.run_id,
            "best_child_id": best.info.run_id, "best_child_name": best.info.run_name}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(uri: str, port: int, timeout_s: float = 300.0) -> tuple[subprocess.Popen, list[str]]:
    """`fleetrec ui` on the store; returns the process once the UI answers, and the links it printed
    (its stderr is read all along, so the server never blocks on a full pipe)."""
    import threading
    proc = subprocess.Popen([sys.executable, "-m", "fleetrec.simulator.cli", "ui", "--backend-store-uri", uri,
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    links: list[str] = []

    def read():
        for line in proc.stderr:
            if line.startswith("  ") and "#/experiments/" in line:     # fleetrec's one line per experiment
                links.extend(re.findall(r"http://\S+#/experiments/\S+", line))
    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as resp:
                if resp.status == 200:
                    return proc, links
        except OSError:
            time.sleep(0.5)
    stop(proc)
    raise RuntimeError(f"fleetrec ui did not answer on port {port} within {timeout_s:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    import signal
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)


def _browser(url: str, *args: str, budget_ms: int = 30000) -> subprocess.CompletedProcess:
    exe = chromium()
    if exe is None:
        raise RuntimeError("no Chromium: install chromium or set FLEETREC_CHROMIUM")
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
           "--window-size=1400,900", f"--virtual-time-budget={budget_ms}", *args, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def dom(url: str, until: str | None = None, tries: int = 3) -> str:
    """The page's DOM after its scripts ran (Chromium's virtual time, so waiting costs little).
    With `until`: loaded again (longer each time) until the DOM holds that text -- the charts
    fetch their data from the server in real time, which a busy machine can stretch."""
    text = ""
    for k in range(tries):
        text = _browser(url, "--dump-dom", budget_ms=30000 * (k + 1)).stdout
        if until is None or until in text:
            break
    return text


def screenshot(url: str, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    _browser(url, f"--screenshot={path}")
    return path


def pages(store: dict, port: int, links: list[str]) -> dict[str, str]:
    """The pages a reader opens: the runs list (the printed link), the run's model metrics, the
    scenario x task table of its best round, and the sweep parent's overview (its description links
    the best child)."""
    base = f"http://127.0.0.1:{port}/#/experiments/{store['experiment_id']}/runs/{store['run_id']}"
    q = "?workflowType=machine_learning"
    return {"runs": links[0] if links else f"http://127.0.0.1:{port}/#/experiments/{store['experiment_id']}{q}",
            "metrics": f"{base}/model-metrics{q}", "scenario_table": f"{base}/artifacts/scenarios/best_round.json{q}",
            "sweep": f"http://127.0.0.1:{port}/#/experiments/{store['sweep_experiment_id']}/runs/{store['sweep_run_id']}{q}"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(REPO / "docs" / "ui"))
    p.add_argument("--work", default=None, help="folder for the store (default: a temporary one)")
    args = p.parse_args(argv)
    import tempfile
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        store = make_store(work / "store")
        port = free_port()
        proc, links = serve(store["uri"], port)
        try:
            for name, url in pages(store, port, links).items():
                if name != "metrics":      # its charts fetch their data in real time: often blank in a shot
                    print(screenshot(url, Path(args.out) / f"{name}.png"))
        finally:
            stop(proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
