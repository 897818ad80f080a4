"""PF-MSMTrec and its scenario baselines (algorithms/pfmsm.py, algorithms/scenario.py) on tiny
synthetic scenario data: in-process round trips of both halves, and end to end on Ray."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fleetrec.algorithms import make_algorithm
from fleetrec.algorithms import pfmsm_math as pm
from fleetrec.algorithms.pfmsm import PFMSMServer
from fleetrec.algorithms.scenario import SCENARIO_EXAMPLE, DittoPersonal, ScenarioPersonal
from fleetrec.simulator.cohort import DataView
from fleetrec.simulator.config import from_dict, make_setup
from fleetrec.simulator.config_loader import ConfigError, apply_overrides
from tests.in_process import InProcess

# the registry-wide example of the scenario algorithms, in one worker, without dropout
TINY = {**SCENARIO_EXAMPLE, "rounds": 2, "tracking.mlflow": False, "tracking.progress": False,
        "algorithm.name": "pf_msmtrec", "model.dropout": 0.0, "resources.workers": 1}


def own(sim) -> dict:
    """The clients' own model tensors (K, ...) from the typed personal state."""
    return sim.client.own_model(sim.personal)


def tiny(**extra):
    over = {**TINY, **extra}
    return from_dict(apply_overrides({}, [f"{k}={v}" for k, v in over.items()]), "tiny")


class Sim(InProcess):
    """Both halves of a scenario algorithm in one process on the tiny example."""

    def __init__(self, **extra):
        super().__init__(tiny(**extra))


def test_local_only_never_changes_other_clients():
    sim = Sim(**{"algorithm.name": "scenario_local"})
    before = {k: v.clone() for k, v in sim.personal.items()}
    scores0 = sim.scores()
    sim.round(0, ids=[0])
    assert sim.state == {} and sim.server.traffic() == (0, 0)
    w = "global_experts.0.lin0.weight"
    assert not torch.equal(own(sim)[w][0], ScenarioPersonal.unflatten(before).m[w][0])   # client 0 trained
    for k, v in sim.personal.items():
        assert torch.equal(v[1:], before[k][1:]), k                     # clients 1, 2 untouched
    scores1 = sim.scores()
    assert not torch.equal(scores1[0], scores0[0]) and torch.equal(scores1[1:], scores0[1:])


def test_fedavg_server_state_is_row_weighted_mean_of_client_models():
    sim = Sim(**{"algorithm.name": "scenario_fedavg", "algorithm.embedding_average": "dense"})
    sim.round(0)
    n = torch.from_numpy(sim.ds.rows_per_client(0)).double()
    for name in ("global_experts.0.lin0.weight", "towers.1.head.bias", "embed.emb.item_id.weight",
                 "global_experts.0.bn0.running_mean"):
        ends = own(sim)[name].double()
        expect = (n.view(-1, *[1] * (ends.dim() - 1)) * ends).sum(0) / n.sum()
        torch.testing.assert_close(sim.state[name].double(), expect, rtol=1e-5, atol=1e-6)
    # integer BatchNorm counters are never averaged
    assert not any(k.endswith("num_batches_tracked") for k in sim.state)


def test_fedavg_averages_an_embedding_row_over_the_clients_that_used_it():
    """Per-row FedAvg (default): row r of an embedding table is Σ_k n_k·[k used r]·θ_kr / Σ_k n_k·[k used r]
    over the clients whose training rows hold r; a row nobody used keeps its value. Every scenario's
    own row of the `scenario` table is then exactly that client's copy."""
    sim = Sim(**{"algorithm.name": "scenario_fedavg", "train.weight_decay": 0.01})
    start = {k: v.clone() for k, v in sim.state.items()}
    sim.round(0)
    n = torch.from_numpy(sim.ds.rows_per_client(0)).double()
    from fleetrec.datasets.federated import TRAIN
    items = sim.ds.column("item_id")[sim.ds.column("split") == TRAIN]
    owner = sim.ds.column("client")[sim.ds.column("split") == TRAIN]
    name = "embed.emb.item_id.weight"
    ends = own(sim)[name].double()
    vocab = ends.shape[1]
    used = torch.zeros(3, vocab, dtype=torch.float64)
    for c in range(3):
        used[c, np.unique(items[owner == c])] = 1
    w = n.unsqueeze(1) * used                                              # (K, vocab)
    expect = torch.where((w.sum(0) > 0).unsqueeze(1), (w.unsqueeze(2) * ends).sum(0) / w.sum(0).clamp_min(1e-30).unsqueeze(1),
                         start[name].double())
    torch.testing.assert_close(sim.state[name].double(), expect, rtol=1e-5, atol=1e-6)
    partly = used.sum(0) < 3                                               # rows some client did not use
    assert bool(partly.any())
    dense = (n.view(-1, 1, 1) * ends).sum(0) / n.sum()
    assert not torch.allclose(sim.state[name].double()[partly], dense[partly])
    # no weight decay on embedding tables: a client's unused rows did not move
    for c in range(3):
        torch.testing.assert_close(ends[c][used[c] == 0], start[name].double()[used[c] == 0], rtol=0, atol=0)
    scen = "embed.emb.scenario.weight"
    own_rows = torch.stack([own(sim)[scen][c, c] for c in range(3)])
    torch.testing.assert_close(sim.state[scen], own_rows, rtol=1e-6, atol=1e-7)
    # with l2 decay on embeddings (Adam's coupled form) the unused rows move
    l2 = Sim(**{"algorithm.name": "scenario_fedavg", "train.weight_decay": 0.01, "algorithm.embedding_decay": "l2"})
    l2.round(0)
    c = int((used == 0).sum(1).argmax())
    moved = own(l2)[name][c].double()[used[c] == 0] - start[name].double()[used[c] == 0]
    assert float(moved.abs().max()) > 1e-4


def test_fedavg_with_one_scenario_equals_local_only():
    one = {"data.rows": "[300]", "federation.clients_per_round": 1}
    fed, loc = Sim(**{"algorithm.name": "scenario_fedavg"}, **one), Sim(**{"algorithm.name": "scenario_local"}, **one)
    for r in range(2):
        fed.round(r)
        loc.round(r)
    torch.testing.assert_close(fed.scores(), loc.scores())
    assert fed.state["towers.0.head.weight"].abs().sum() > 0


def test_fedbn_and_fedper_keep_their_tensors_local():
    bn = Sim(**{"algorithm.name": "scenario_fedbn"})
    per = Sim(**{"algorithm.name": "scenario_fedper"})
    assert bn.server.shared_names and not any(pm.bn_tensor(n) for n in bn.server.shared_names)
    assert not any(n.startswith("towers.") for n in per.server.shared_names)
    assert any(n.startswith("towers.") for n in bn.server.shared_names)


def test_pfmsm_personalized_copies_differ_and_alpha_moves():
    sim = Sim()
    init = sim.state["alpha"].clone()
    for r in range(3):
        stats = sim.round(r)
    w = PFMSMServer.unflatten(sim.state).pers["global_experts.0.lin0.weight"]
    assert not torch.allclose(w[0], w[1]) and not torch.allclose(w[1], w[2])
    alpha = sim.state["alpha"]
    assert not torch.allclose(alpha, init) and len(set(alpha.tolist())) == 3
    assert ((alpha >= 0) & (alpha <= 1)).all()
    assert stats["pfmsm/alpha/2"] == pytest.approx(float(alpha[2]))
    assert stats["pfmsm/beta/1"] == pytest.approx(float(sim.state["beta"][1].mean()))
    assert not torch.allclose(sim.state["beta"], torch.full_like(sim.state["beta"], 0.1))


def test_pfmsm_expert_aggregation_is_the_personalized_conflict_averse_update():
    sim = Sim()
    start = {k: v.clone() for k, v in sim.state.items()}
    sim.round(0)
    names = sim.server.expert_groups[pm.GLOBAL]
    ids = sorted(sim.last_acc.per_client)
    deltas = {n: torch.stack([sim.last_acc.per_client[c][n] for c in ids]).float() for n in names}
    G = pm.flatten_group(deltas, names)
    d = pm.conflict_averse_delta(G, 0.4)
    assert names and sim.server.expert_groups.keys() == {pm.GLOBAL}
    s = pm.flatten_group({n: PFMSMServer.unflatten(start).pers[n] for n in names}, names)
    expect = s + G + 0.1 * d.unsqueeze(0)                                 # α = 0.1 in round 0
    got = pm.flatten_group({n: PFMSMServer.unflatten(sim.state).pers[n] for n in names}, names)
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sim.state[f"prev_d.{pm.GLOBAL}"], d)
    # the client's own end state is start + Δ: the copy differs from it by exactly α d
    ends = pm.flatten_group({n: own(sim)[n] for n in names}, names)
    torch.testing.assert_close(got - ends, 0.1 * d.expand_as(got), rtol=1e-4, atol=1e-6)


def test_pfmsm_ablation_flags_change_what_is_uploaded():
    base = Sim().server
    up = set(base.shared_names)
    assert not any(pm.bn_tensor(n) or n.startswith(("embed.", "gates.")) for n in up)
    # the template (default): task- and scenario-specific experts stay local; global experts are uploaded
    assert set(base.expert_groups) == {"global"}
    assert not any(n.startswith(("task_experts.", "scenario_experts.")) for n in up)
    shared_rule = Sim(**{"algorithm.specific_parts": "aggregated"}).server
    assert {"global", "task:click", "task:like", "scenario"} <= set(shared_rule.expert_groups)

    no_bn = set(Sim(**{"algorithm.fedbn_mode": "aggregate"}).server.shared_names)
    assert no_bn - up and all(pm.bn_tensor(n) for n in no_bn - up)
    no_tower = Sim(**{"algorithm.tower_aggregation": "none"}).server
    assert set(no_tower.shared_names) == {n for n in up if not n.startswith("towers.")}
    assert no_tower.traffic()[0] < base.traffic()[0]
    no_template = Sim(**{"algorithm.template": "false"}).server
    assert set(no_template.shared_names) == set(shared_rule.shared_names) > up
    assert list(no_template.expert_groups) == ["global"]
    local_scen = Sim(**{"model.aggregate_scenario_experts": "false", "algorithm.specific_parts": "aggregated"}).server
    assert not any(n.startswith("scenario_experts.") for n in local_scen.shared_names)


def test_pfmsm_template_keeps_specific_experts_on_the_client_and_differs_from_no_template():
    """Under the template a client's task- and scenario-expert tensors are exactly its own local
    training result (never overwritten by the server), so `template=false`, which aggregates
    them, gives other models."""
    sim, flat = Sim(), Sim(**{"algorithm.template": "false"})
    for r in range(2):
        sim.round(r)
        flat.round(r)
    start = sim.client.client_start(sim.state, sim.personal, 1, 1)
    for n in sim.server.all_names:
        if n.startswith(("task_experts.", "scenario_experts.")):
            assert torch.equal(start[n], own(sim)[n][1]), n
    assert not torch.allclose(sim.scores(), flat.scores())


def test_pfmsm_beta_hypergradient_uses_the_attention_direction_not_beta_times_it():
    """Round 0 stores v_c = (a V)_c, the derivative of θ_c = θ^start + Δ_c + β_c v_c with respect to
    β_c; round 1 steps β by −cos(Δ_c^(1), v_c^(0)) with SGD (lr 0.01, momentum 0.9, wd 1e-4)."""
    sim = Sim()
    sim.round(0)
    layer, names = next(iter(sim.server.tower_layers.items()))
    ids = sorted(sim.last_acc.per_client)
    G0 = pm.flatten_group({n: torch.stack([sim.last_acc.per_client[c][n] for c in ids]).float() for n in names}, names)
    torch.testing.assert_close(sim.state[f"prev_dir.{layer}"], pm.tower_attention(G0), rtol=1e-5, atol=1e-7)
    beta0, v0 = sim.state["beta"].clone(), sim.state[f"prev_dir.{layer}"].clone()
    sim.round(1)
    G1 = pm.flatten_group({n: torch.stack([sim.last_acc.per_client[c][n] for c in ids]).float() for n in names}, names)
    j = list(sim.server.tower_layers).index(layer)
    grad = pm.hypergrad(G1, v0)
    expect, _ = pm.momentum_step(beta0[:, j], torch.zeros(len(ids)), grad, 0.01, 0.9, 1e-4)
    torch.testing.assert_close(sim.state["beta"][:, j], expect, rtol=1e-5, atol=1e-7)
    # the step is of the order of lr, whatever the size of the deltas
    assert float((sim.state["beta"][:, j] - beta0[:, j]).abs().max()) > 1e-3


@pytest.mark.parametrize("flags", [{"algorithm.conflict_coordination": "false"},
                                   {"algorithm.personalized": "false"},
                                   {"algorithm.tower_aggregation": "fallback"},
                                   {"algorithm.fedbn_mode": "server_norm"}])
def test_pfmsm_variants_run_and_differ_from_default(flags):
    a, b = Sim(), Sim(**flags)
    for r in range(2):
        a.round(r)
        b.round(r)
    sb = b.scores()
    assert torch.isfinite(sb).all()
    assert not torch.allclose(a.scores(), sb)
    if flags.get("algorithm.personalized") == "false":
        w = PFMSMServer.unflatten(b.state).pers["global_experts.0.lin0.weight"]
        torch.testing.assert_close(w[0], w[2])                            # one result for every client


def test_ditto_evaluates_the_personal_model():
    sim = Sim(**{"algorithm.name": "scenario_ditto", "algorithm.ditto_lambda": 0.5})
    sim.round(0)
    w = "towers.0.head.weight"
    ditto = DittoPersonal.unflatten(sim.personal)
    assert not torch.allclose(ditto.p[w], ditto.m[w])
    glob = sim.client.client_start(sim.state, sim.personal, 0, 0)
    pers = sim.client.eval_tensors(sim.state, sim.personal, 0, 0)
    assert torch.equal(pers[w], ditto.p[w][0]) and not torch.equal(pers[w], glob[w])


def test_centralized_needs_every_scenario_in_one_call():
    sim = Sim(**{"algorithm.name": "scenario_centralized"})
    with pytest.raises(ValueError, match="resources.workers=1"):
        sim.round(0, ids=[0, 1])
    sim.round(0)
    s = sim.scores()
    assert torch.isfinite(s).all() and sim.state["towers.0.head.weight"].abs().sum() > 0


@pytest.mark.parametrize("model", [["model.name=shared_bottom", "model.bottom=[8]", "model.tower=[4]"],
                                   ["model.name=ple", "model.levels=[8]", "model.num_task_experts=1",
                                    "model.num_shared_experts=1", "model.tower=[4]"]])
def test_pfmsm_runs_on_shared_bottom_and_ple(model):
    over = {k: v for k, v in TINY.items() if not k.startswith("model.")}
    cfg = from_dict(apply_overrides({}, [f"{k}={v}" for k, v in over.items()] + model), "tiny")
    ds = cfg.data.build(0)
    algo = make_algorithm(cfg.algorithm, make_setup(cfg, ds))
    groups = set(algo.expert_groups)
    assert "global" in groups and algo.tower_layers
    state, ids = algo.init_server(), np.arange(ds.num_clients)
    personal = algo.init_personal(torch.from_numpy(ids))
    batch = DataView(ds).batch(ids, 0, epochs=1, seed=0, rnd=0)
    up = algo.train_cohort(algo.configure_train(0, state, None), batch, personal)
    new, _ = algo.aggregate_train(0, state, up.acc)
    name = next(n for n in algo.expert_groups["global"] if n.endswith("weight"))
    assert not torch.equal(PFMSMServer.unflatten(new).pers[name], PFMSMServer.unflatten(state).pers[name])


def test_bad_config_names_the_key():
    with pytest.raises(ConfigError, match="algorithm.fedbn_mode"):
        tiny(**{"algorithm.fedbn_mode": "bogus"})
    with pytest.raises(ConfigError, match="algorithm.tower_aggregation"):
        tiny(**{"algorithm.tower_aggregation": "mean"})
    over = [f"{k}={v}" for k, v in TINY.items() if not k.startswith("model.")] + ["model.name=per_user"]
    cfg = from_dict(apply_overrides({}, over), "tiny")
    with pytest.raises(ValueError, match="model.name"):
        make_algorithm(cfg.algorithm, make_setup(cfg, cfg.data.build(0)))


def test_synthetic_multi_scenario_is_seeded_and_heterogeneity_matters():
    cfg = tiny().data
    a, b = cfg.build(3), cfg.build(3)
    assert np.array_equal(a.column("click"), b.column("click")) and a.num_clients == 3
    assert a.schema.scenario == "scenario" and a.schema.tasks == ("click", "like")
    from fleetrec.simulator.ceiling import ceiling
    assert 0.5 < ceiling(a)["bayes_auc"]["click/test"] <= 1.0
    from dataclasses import replace
    same = replace(cfg, heterogeneity=0.0, rows=(4000, 4000)).build(0)
    rate = lambda ds: [ds.column("click")[ds.offsets[c]:ds.offsets[c + 1]].mean() for c in range(2)]
    assert abs(np.subtract(*rate(same))) < 0.05
    with pytest.raises(ConfigError, match="data.rows"):
        tiny(**{"data.rows": "[300,5]"})


def test_end_to_end_on_ray_reports_per_scenario_metrics(ray_session):
    from fleetrec.simulator.run import run
    cfg = tiny(**{"rounds": 2, "resources.workers": 2, "algorithm.fedbn_mode": "server_norm"})
    result = run(cfg)
    rec = result.records[-1]
    for c in range(3):
        for task in ("click", "like"):
            assert 0.0 <= rec[f"test/s{c}/{task}/auc"] <= 1.0 and rec[f"test/s{c}/{task}/logloss"] > 0
        assert f"pfmsm/alpha/{c}" in rec
    means = [rec[f"test/s{c}/auc"] for c in range(3)]
    assert rec["test/scenario_mean/auc"] == pytest.approx(np.mean(means))
    assert rec["train/clients_trained"] == 3 and rec["bytes_up"] > 0


def test_alpha_beta_momentum_is_server_state_so_a_fresh_server_continues_it():
    """Four rounds by one server object equal four rounds where the server half is rebuilt every
    round (a resumed run): the α / β momentum buffers are in the server state, and they move."""
    extra = {"algorithm.name": "pf_msmtrec", "algorithm.alpha_lr": 1.0}
    kept, rebuilt = Sim(**extra), Sim(**extra)
    for rnd in range(4):
        kept.round(rnd)
        rebuilt.server = make_algorithm(rebuilt.cfg.algorithm, make_setup(rebuilt.cfg, rebuilt.ds))
        rebuilt.round(rnd)
    assert float(kept.state["alpha_momentum"].abs().max()) > 0
    for k in kept.state:
        torch.testing.assert_close(rebuilt.state[k], kept.state[k], atol=0, rtol=0, msg=k)
