"""The MLflow UI in a real browser (headless Chromium): the link `fleetrec ui` prints opens the runs
list with the run in it, the run's page lays out its metric chart sections, its scenario x task
table renders, and the sweep parent's overview links its best child by name
(benchmarks/ui_screenshots.py has the steps; it also writes the screenshots in docs/ui/).
Skips without Chromium, unless FLEETREC_REQUIRE_BROWSER=1 (CI installs it and requires the test)."""
from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("ui_screenshots", REPO / "benchmarks" / "ui_screenshots.py")
ui = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ui)

if ui.chromium() is None and os.environ.get("FLEETREC_REQUIRE_BROWSER") != "1":
    pytest.skip("no Chromium on this machine (apt-get install chromium); CI installs it", allow_module_level=True)


def test_the_ui_shows_runs_chart_sections_the_scenario_table_and_the_best_trial(ray_session, tmp_path):
    assert ui.chromium() is not None, "FLEETREC_REQUIRE_BROWSER=1 but no Chromium"
    store = ui.make_store(tmp_path / "store")
    port = ui.free_port()
    proc, links = ui.serve(store["uri"], port)
    try:
        assert sorted(links) == sorted(f"http://127.0.0.1:{port}/#/experiments/{e}?workflowType=machine_learning"
                                       for e in {store["experiment_id"], store["sweep_experiment_id"]})
        links = [u for u in links if f"/experiments/{store['experiment_id']}?" in u]
        urls = ui.pages(store, port, links)
        runs = ui.dom(urls["runs"])
        assert store["run_name"] in runs and "Model training" in runs          # the runs list, not the GenAI page
        assert re.search(r">synthetic_multi_scenario \(", runs)              # the logged dataset's column
        charts = ui.dom(urls["metrics"], until="draggable-chart-cards-grid")
        assert ">val/scenario_mean<" in charts and ">best/test/scenario_mean<" in charts   # chart sections
        assert "draggable-chart-cards-grid" in charts and ">Model training<" in charts
        # (whether the plots inside are drawn is not checked: the UI fetches their data in real time
        # and draws only visible cards, which headless Chromium's virtual time does not wait for)
        table = ui.dom(urls["scenario_table"])
        for header in (">split<", ">scenario<", ">click/auc<", ">like/auc<"):
            assert header in table, header
        assert table.count(">s3<") >= 2                                         # a row per scenario and split
        sweep = ui.dom(urls["sweep"], until=store["best_child_name"])
        link = f'href="#/experiments/{store["sweep_experiment_id"]}/runs/{store["best_child_id"]}"'
        assert link in sweep and f">{store['best_child_name']}<" in sweep        # the parent links its best child
        assert re.fullmatch(r"lr=[0-9.e-]+·server_lr=[0-9.e-]+", store["best_child_name"])   # named by its sample
    finally:
        ui.stop(proc)
