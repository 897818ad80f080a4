"""Client availability, dropout, stragglers and over-commitment on the virtual clock."""
from __future__ import annotations

import numpy as np
import pytest

from fleetrec.simulator.config_loader import ConfigError, build
from fleetrec.simulator.run import run
from fleetrec.simulator.system import SystemConfig, SystemModel


def _model(**kw):
    cfg = build(SystemConfig, kw)
    rows = np.full(1000, 40)
    return SystemModel(cfg, seed=3, num_clients=1000, train_rows=rows, bytes_per_client=1000, local_epochs=1)


def test_availability_half_completes_about_half_reproducibly():
    m = _model(availability=0.5)
    online = [len(m.available(r, 1000)) for r in range(20)]
    assert 450 < np.mean(online) < 550
    ids, rec = m.select(4, 1000, 600)            # asks for more than are online
    ids2, _ = m.select(4, 1000, 600)
    assert np.array_equal(ids, ids2) and 440 < rec["system/completed"] < 560
    assert not np.array_equal(ids, m.select(5, 1000, 600)[0])


def test_dropout_deadline_and_overcommit():
    m = _model(dropout=0.2, overcommit=1.5, speeds=[1.0, 0.1], bandwidths=[1e6, 1e6],
               profile_weights=[0.5, 0.5], deadline_s=1.0, rows_per_second=100)
    ids, rec = m.select(0, 1000, 100)
    assert rec["system/sampled"] == 150
    # slow devices need 40 / (0.1 * 100) = 4 s > 1 s deadline: all are stragglers
    assert np.all(m.profile[ids] == 0)
    assert rec["system/stragglers"] > 0
    assert rec["system/completed"] + rec["system/stragglers"] + rec["system/dropped_out"] <= rec["system/sampled"]
    assert rec["system/completed"] == len(ids) <= 100
    assert rec["system/dropped_out"] > 0 and rec["system/virtual_seconds"] == pytest.approx(1.0)


def test_overcommit_keeps_the_first_finishers():
    m = _model(overcommit=2.0, speeds=[1.0, 0.5], bandwidths=[1e6, 1e6], profile_weights=[0.5, 0.5])
    ids, rec = m.select(1, 1000, 50)
    assert rec["system/sampled"] == 100 and len(ids) == 50
    t = m.completion_time(ids)
    assert rec["system/virtual_seconds"] == pytest.approx(t.max())


def test_bad_profiles_and_trace_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"same non-zero length \(one entry per device profile; got 2, 1 and 1\)"):
        build(SystemConfig, {"speeds": [1.0, 2.0]})
    with pytest.raises(ConfigError, match=r"system.bandwidths: got \[1.0, 0.0\], expected every value > 0"):
        build(SystemConfig, {"speeds": [1.0, 2.0], "bandwidths": [1.0, 0.0], "profile_weights": [1.0, 1.0]})
    bad = tmp_path / "trace.csv"
    bad.write_text("1,0\n0,2\n")
    with pytest.raises(ConfigError, match="0/1 matrix with one row per client"):
        SystemModel(build(SystemConfig, {"availability_trace": str(bad)}), 0, 2, np.ones(2), 1, 1)


def test_trace_drives_availability(tmp_path):
    trace = tmp_path / "t.npy"
    np.save(trace, np.array([[1, 0], [0, 1], [1, 1]]))
    m = SystemModel(build(SystemConfig, {"availability_trace": str(trace)}), 0, 3, np.ones(3), 1, 1)
    assert m.available(0, 3).tolist() == [0, 2] and m.available(1, 3).tolist() == [1, 2]


def test_run_logs_sampled_completed_dropped(ray_session, tiny_cfg):
    res = run(tiny_cfg(**{"system.availability": 0.5, "system.dropout": 0.1, "rounds": 2,
                          "federation.clients_per_round": 37}))
    for r in res.records:
        assert r["system/completed"] == r["train/clients_trained"] < 37
        assert r["system/sampled"] == r["system/online"]
