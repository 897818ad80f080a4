"""PMTRec on MF (algorithms/pmtrec.py), its data (datasets/graphs.py) and the ranking-evaluation hook."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fleetrec.algorithms.combiners import RowBatch, gather_rows, pmtrec_combine, task_row_grads, touched_mask
from fleetrec.algorithms.fedavg_mf import FedAvgMF
from fleetrec.algorithms.mf import MFServer
from fleetrec.algorithms.mf_tasks import CentralRows
from fleetrec.algorithms.pmtrec import PMTRecMF
from fleetrec.datasets.graphs import MFSyntheticConfig, build_mf, kcore, to_federated
from fleetrec.simulator.cohort import DataView
from fleetrec.simulator.config import from_dict, load, make_setup
from fleetrec.simulator.config_loader import ConfigError, apply_overrides

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = {"data.num_users": 40, "data.num_items": 30, "data.rows_per_user": 8, "data.num_categories": 4}


def _cfg(path: str, **over):
    ov = {"tracking.mlflow": False, "tracking.progress": False, "resources.workers": 1,
          "resources.cpus_per_worker": 0.5, **TINY, **over}
    return load(CONFIGS / path, [f"{k}={v}" for k, v in ov.items()])


def _algo(cfg):
    ds = cfg.data.build(cfg.seed)
    algo = PMTRecMF(cfg.algorithm, make_setup(cfg, ds))
    algo.attach_data(ds)
    return algo, ds


def _main_batch(algo, ds, n=24, seed=3):
    g = torch.Generator().manual_seed(seed)
    dv = DataView(ds)
    rows = torch.randperm(ds.num_rows, generator=g)[:n]
    u, i = dv.categorical["user"][rows], dv.categorical["item"][rows]
    r = dv.numeric[rows, 0]
    j = torch.randint(algo.num_items, (n,), generator=g)
    return u, i, j, r, algo.trainer.sample(u, i, g)


# ------------------------------------------------------------------------------------------- data
def test_kcore_keeps_only_rows_whose_user_and_item_have_k_rows():
    g = np.random.default_rng(0)
    user, item = g.integers(0, 50, 600), g.integers(0, 40, 600)
    keep = kcore(user, item, 8)
    assert keep.any() and not keep.all()
    assert np.bincount(user[keep]).max() >= 8
    assert (np.bincount(user[keep])[np.unique(user[keep])] >= 8).all()
    assert (np.bincount(item[keep])[np.unique(item[keep])] >= 8).all()


def test_build_mf_filters_graphs_to_kept_rows_and_splits_per_user():
    user = np.array([5, 5, 5, 5, 9, 9, 9, 9, 7, 5])             # user 7 has 1 row: dropped by the 2-core
    item = np.array([1, 2, 3, 4, 1, 2, 3, 4, 1, 1])             # (5, 1) repeated: the last one is kept
    rating = np.arange(len(user), dtype=float) + 1
    trust = np.array([[5, 9, 7, 5], [9, 5, 5, 5]])              # 7's edge and the self-loop go
    pairs = np.array([[1, 2, 9], [2, 3, 1]])                     # item 9 does not exist
    d = build_mf("t", user, item, rating, trust=trust, item_category_per_row=np.full(len(user), 7),
                 item_pairs=pairs, k_core=2, max_users=None, val_fraction=0.25, test_fraction=0.25, seed=0)
    assert (d.num_users, d.num_items) == (2, 4)
    assert d.trust.tolist() == [[0, 1], [1, 0]]
    assert d.item_pairs.tolist() == [[0, 1], [1, 2]]
    assert d.rating[(d.user == 0) & (d.item == 0)].tolist() == [10.0]
    assert (d.item_category == 0).all() and d.num_categories == 1
    for u in range(2):
        assert np.bincount(d.split[d.user == u], minlength=3).tolist() == [2, 1, 1]
    fed = to_federated(d, "federated")
    assert fed.num_clients == 2 and set(fed.side) == {"trust", "item_category", "item_pairs"}
    assert to_federated(d, "centralized").num_clients == 1


def test_synthetic_trust_links_users_with_similar_taste():
    cfg = MFSyntheticConfig(num_users=300, num_items=200)
    d = cfg.mf(0)
    items_of = [set(d.item[d.user == u]) for u in range(d.num_users)]
    jac = lambda a, b: len(items_of[a] & items_of[b]) / len(items_of[a] | items_of[b])
    linked = np.mean([jac(a, b) for a, b in d.trust.T[:400]])
    g = np.random.default_rng(1)
    rand = np.mean([jac(a, b) for a, b in g.integers(0, d.num_users, (400, 2)) if a != b])
    assert linked > 1.5 * rand


# ------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("over, message", [
    ({"algorithm.tasks": "[rating, bpr]"}, "algorithm.tasks: the first task is the main task and must be 'bpr'"),
    ({"algorithm.tasks": "[bpr, friends]"}, "algorithm.tasks: unknown task 'friends'"),
    ({"algorithm.mode": "federated", "data.layout": "federated", "algorithm.tasks": "[bpr, social]"},
     "algorithm.tasks: task 'social' needs other users' or items' rows"),
    ({"algorithm.mode": "federated", "data.layout": "federated", "algorithm.tasks": "[bpr]",
      "algorithm.combiner": "{name: dwa}"}, "algorithm.combiner.name: 'dwa' keeps a history"),
    ({"algorithm.mode": "federated", "algorithm.tasks": "[bpr]"}, "algorithm.mode: 'federated' needs data.layout='federated'"),
    ({"eval.metric": "recall@30"}, "eval.metric: 'recall@30' needs 30 in algorithm.ks"),
    ({"eval.metric": "auc"}, "eval.metric: algorithm 'pmtrec' reports ranking metrics"),
    ({"eval.metric": "hits@20"}, "eval.metric: got 'hits@20'"),
    ({"algorithm.combiner": "{name: pmtrec, tau: 0}"}, "algorithm.combiner.tau: got 0"),
])
def test_bad_pmtrec_config_names_the_key(over, message):
    with pytest.raises(ConfigError) as e:
        _cfg("pmtrec_synthetic.yaml", **over)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_ranking_metric_on_a_pointwise_algorithm_is_refused():
    with pytest.raises(ConfigError, match="eval.metric: 'ndcg@20' is a ranking metric, but algorithm 'fedavg'"):
        from_dict(apply_overrides({}, ["eval.metric=ndcg@20"]))


def test_task_without_its_data_is_refused():
    cfg = _cfg("pmtrec_synthetic.yaml", **{"data.pairs_per_item": 0})
    with pytest.raises(ValueError, match="algorithm.tasks: task 'coview' needs data"):
        _algo(cfg)


# ------------------------------------------------------------------------------------------- gradients
def test_row_gradients_equal_dense_autograd_on_the_whole_tables():
    cfg = _cfg("pmtrec_synthetic.yaml")
    algo, ds = _algo(cfg)
    s = algo.init_server()
    u, i, j, r, aux = _main_batch(algo, ds)
    users, items = algo.trainer.task_ids(u, i, j, aux)
    head = {k: s[k].clone().requires_grad_(True) for k in ("W", "b")}
    Pr, Qr = gather_rows(s["P"], *users), gather_rows(s["Q"], *items)
    losses = algo.trainer.losses(CentralRows(Pr, Qr, head, u, i, j, r, aux))
    Gp, Gq = task_row_grads(losses, Pr.emb), task_row_grads(losses, Qr.emb)
    # reference: the same losses on leaf copies of the full tables, dense gradients
    P = s["P"].clone().requires_grad_(True)
    Q = s["Q"].clone().requires_grad_(True)
    full_p = RowBatch(rows=torch.arange(P.shape[0]), emb=P)
    full_q = RowBatch(rows=torch.arange(Q.shape[0]), emb=Q)
    ref = algo.trainer.losses(CentralRows(full_p, full_q, head, u, i, j, r, aux))
    assert len(ref) == len(cfg.algorithm.tasks) == 6
    for t, loss in enumerate(ref):
        gP, gQ = (torch.zeros_like(x) if g is None else g
                  for x, g in zip((P, Q), torch.autograd.grad(loss, (P, Q), retain_graph=True, allow_unused=True)))
        torch.testing.assert_close(gP[Pr.rows], Gp[t], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(gQ[Qr.rows], Gq[t], rtol=1e-5, atol=1e-7)
        outside_p = torch.ones(P.shape[0], dtype=torch.bool)
        outside_p[Pr.rows] = False
        outside_q = torch.ones(Q.shape[0], dtype=torch.bool)
        outside_q[Qr.rows] = False
        assert gP[outside_p].abs().max() == 0 and gQ[outside_q].abs().max() == 0
    # the social task touches only P, co-view only Q
    assert Gq[cfg.algorithm.tasks.index("social")].abs().max() == 0
    assert Gp[cfg.algorithm.tasks.index("coview")].abs().max() == 0
    assert Gp[cfg.algorithm.tasks.index("social")].abs().max() > 0


def test_huge_alpha_after_epoch_zero_trains_exactly_like_single_task_mf():
    """Task focusing with α→∞ (epoch ≥ 1) puts all weight on the main task for every row it
    touches; with tasks that touch only main-task rows, one full step equals single-task MF."""
    multi = _cfg("pmtrec_synthetic.yaml", **{"algorithm.tasks": "[bpr, rating, au]",
                                              "algorithm.combiner": "{name: pmtrec, alpha: 1.0e+30, tau: 1.0}"})
    single = _cfg("pmtrec_synthetic.yaml", **{"algorithm.tasks": "[bpr]", "algorithm.combiner": "{name: equal}"})
    (a, ds), (b, _) = _algo(multi), _algo(single)
    u, i, _, r, _ = _main_batch(a, ds)
    sa, sb = MFServer.unflatten(a.init_server()), MFServer.unflatten(b.init_server())   # stepped in place
    la = a.trainer.step(sa, u, i, r, epoch=3)
    b.trainer.step(sb, u, i, r, epoch=3)
    torch.testing.assert_close(sa.P, sb.P, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(sa.Q, sb.Q, rtol=1e-5, atol=1e-7)
    assert math.isfinite(la["train/rating_loss"])
    # at epoch 0 there is no focusing yet: the auxiliary tasks move the rows
    sa, sb = MFServer.unflatten(a.init_server()), MFServer.unflatten(b.init_server())
    a.trainer.step(sa, u, i, r, epoch=0)
    b.trainer.step(sb, u, i, r, epoch=0)
    assert (sa.P - sb.P).abs().max() > 1e-4


def test_infinite_tau_with_raw_combination_is_equal_weighting_on_shared_rows():
    """τ→∞ flattens the per-row softmax: on rows every task touches, raw_weighted PMTRec is the
    mean of the task gradients, i.e. the `equal` combiner."""
    flat = _cfg("pmtrec_synthetic.yaml", **{"algorithm.tasks": "[bpr, rating, au]",
                                             "algorithm.combiner": "{name: pmtrec, alpha: 1.0, tau: 1.0e+12, "
                                                                   "combine: raw_weighted}"})
    eq = _cfg("pmtrec_synthetic.yaml", **{"algorithm.tasks": "[bpr, rating, au]", "algorithm.combiner": "{name: equal}"})
    (a, ds), (b, _) = _algo(flat), _algo(eq)
    s = a.init_server()
    u, i, j, r, aux = _main_batch(a, ds)
    users, items = a.trainer.task_ids(u, i, j, aux)
    Pr, Qr = gather_rows(s["P"], *users), gather_rows(s["Q"], *items)
    losses = a.trainer.losses(CentralRows(Pr, Qr, {}, u, i, j, r, aux))
    Gp, Gq = task_row_grads(losses, Pr.emb), task_row_grads(losses, Qr.emb)
    tp, tq = touched_mask(Pr.rows, users), touched_mask(Qr.rows, items)
    L = torch.stack([x.detach() for x in losses])
    gp_a, gq_a = a.combine(L, Gp, Gq, tp, tq, epoch=2, step=1)
    gp_b, gq_b = b.combine(L, Gp, Gq, tp, tq, epoch=2, step=1)
    torch.testing.assert_close(gp_a, gp_b, rtol=1e-5, atol=1e-8)          # every task touches every user row
    all3 = tq.all(0)
    assert all3.any() and not all3.all()                                   # negatives are touched by bpr alone
    torch.testing.assert_close(gq_a[all3], gq_b[all3], rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(gq_a[~all3], 3 * gq_b[~all3], rtol=1e-5, atol=1e-8)   # weight 1 vs 1/3


# ------------------------------------------------------------------------------------------- federated
def test_federated_item_rows_from_per_task_sums_equal_the_per_row_rule_on_the_pooled_gradient():
    """Clients split over two cohorts upload per-task sums; the server's per-row combination equals
    PMTRec's rule applied to the per-task gradients of the pooled loss (one holder of all rows)."""
    cfg = _cfg("pmtrec_synthetic_federated.yaml", **{"data.num_users": 40})
    ds = cfg.data.build(cfg.seed)
    setup = make_setup(cfg, ds)
    algo = PMTRecMF(cfg.algorithm, setup)
    algo.attach_data(ds)
    state = algo.init_server()
    dv = DataView(ds)
    ids = np.arange(ds.num_clients)
    personal = algo.init_personal(torch.from_numpy(ids))
    plan = algo.configure_train(4, state, torch.from_numpy(ids))
    halves = [ids[:17], ids[17:]]
    acc = None
    for h in halves:
        up = algo.train_cohort(plan, dv.batch(h, 0), {k: v[h] for k, v in personal.items()})
        acc = up.acc if acc is None else acc.merge(up.acc)
    whole = algo.train_cohort(plan, dv.batch(ids, 0), personal).acc
    for t in range(len(cfg.algorithm.tasks)):
        torch.testing.assert_close(acc.sums[f"gq/{t}"], whole.sums[f"gq/{t}"], rtol=1e-4, atol=1e-7)
    new, _ = algo.aggregate_train(4, state, acc)
    # pooled reference: per-task gradients of the summed loss w.r.t. the whole item table
    batch = dv.batch(ids, 0)
    Q = state["Q"].clone().requires_grad_(True)
    p = personal["p"].clone().requires_grad_(True)
    head = {k: state[k].clone().requires_grad_(True) for k in ("W", "b")}
    losses, per_client, i, j = algo.trainer.client_losses(p, RowBatch(torch.arange(Q.shape[0]), Q), head, batch, 4)
    G = torch.stack([torch.autograd.grad(x, Q, retain_graph=True)[0] for x in losses]) / len(ids)
    touched = torch.stack([acc.sums[f"nq/{t}"] for t in range(len(losses))]) > 0
    rows = torch.nonzero(touched.any(0)).flatten()
    g_ref, _ = pmtrec_combine(G[:, rows], 4, cfg.algorithm.combiner, touched[:, rows])
    g_srv = algo.trainer.combine_item_rows(G, touched, per_client.sum(1) / len(ids), 4)
    torch.testing.assert_close(g_srv[rows], g_ref, rtol=1e-4, atol=1e-7)
    # and the server moved exactly the touched rows
    moved = (new["Q"] - state["Q"]).abs().sum(1) > 0
    assert torch.equal(moved, touched.any(0))


def _local(tasks, combiner="pmtrec", optimizer="adam", epochs=3):
    over = {"data": {"name": "mf_synthetic", "num_users": 30, "num_items": 20, "rows_per_user": 8, "layout": "federated"},
            "train": {"lr": 0.1, "optimizer": optimizer, "local_epochs": epochs}, "eval": {"metric": "recall@20"}}
    pm = from_dict(apply_overrides(over, ["algorithm.name=pmtrec", "algorithm.mode=federated", "algorithm.dim=4",
                                          "algorithm.local_update=local_steps", "algorithm.server_lr=1.0",
                                          f"algorithm.tasks={tasks}", f"algorithm.combiner={{name: {combiner}}}"]))
    fa = from_dict(apply_overrides(over, ["algorithm.name=fedavg_mf", "algorithm.dim=4"]))
    return pm, fa


def _rounds(cfg, algo_cls, ds, rounds=2):
    algo = algo_cls(cfg.algorithm, make_setup(cfg, ds))
    algo.attach_data(ds)
    state, ids = algo.init_server(), np.arange(ds.num_clients)
    personal = algo.init_personal(torch.from_numpy(ids))
    for rnd in range(rounds):
        batch = DataView(ds).batch(ids, 0, epochs=1, seed=cfg.seed, rnd=rnd)
        up = algo.train_cohort(algo.configure_train(rnd, state, torch.from_numpy(ids)), batch, personal)
        state, stats = algo.aggregate_train(rnd, state, up.acc)
        personal = up.personal
    return state, personal, stats


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_pmtrec_local_steps_with_bpr_alone_is_fedavg_mf(optimizer):
    """Equal local compute: PMTRec's FedAvg-style local steps on the one task [bpr] (the per-row
    combination of one task is that task's gradient) are FedAvg-MF, round for round."""
    pm, fa = _local("[bpr]", optimizer=optimizer)
    ds = pm.data.build(0)
    s1, p1, st1 = _rounds(pm, PMTRecMF, ds)
    s2, p2, st2 = _rounds(fa, FedAvgMF, ds)
    torch.testing.assert_close(s1["Q"], s2["Q"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(p1["p"], p2["p"], rtol=1e-5, atol=1e-6)
    assert st1["train/bpr_loss"] == pytest.approx(st2["train/bpr_loss"], rel=1e-5)
    assert not torch.allclose(s1["Q"], PMTRecMF(pm.algorithm, make_setup(pm, ds)).init_server()["Q"])


def test_pmtrec_local_steps_with_aux_tasks_combines_per_row():
    pm, _ = _local("[bpr, rating, au]", epochs=2)
    ds = pm.data.build(0)
    s, p, st = _rounds(pm, PMTRecMF, ds)
    eq, _ = _local("[bpr, rating, au]", combiner="equal", epochs=2)
    s_eq, _, st_eq = _rounds(eq, PMTRecMF, ds)
    assert {"train/bpr_loss", "train/rating_loss", "train/au_loss"} <= set(st)
    assert torch.isfinite(s["Q"]).all() and not torch.allclose(s["Q"], s_eq["Q"])   # the rule matters


@pytest.mark.parametrize("over, message", [
    (["algorithm.local_update=gradient", "train.local_epochs=3"], "train.local_epochs: federated PMTRec"),
    (["algorithm.combiner={name: pcgrad}"], "algorithm.combiner.name: 'pcgrad' is not implemented with local_update"),
    (["algorithm.tasks=[bpr, category]"], "algorithm.tasks: task 'category' is not implemented with local_update"),
])
def test_local_steps_refusals(over, message):
    base = ["data.name=mf_synthetic", "data.layout=federated", "algorithm.name=pmtrec", "algorithm.mode=federated",
            "algorithm.tasks=[bpr, rating]", "algorithm.local_update=local_steps", "eval.metric=recall@20"]
    with pytest.raises(ConfigError, match=message):
        from_dict(apply_overrides({}, base + over))


def test_fedavg_mf_central_dp_needs_the_cohort_average():
    base = ["data.name=mf_synthetic", "data.layout=federated", "algorithm.name=fedavg_mf", "eval.metric=recall@20",
            "privacy.enabled=true"]
    with pytest.raises(ConfigError, match="algorithm.item_average: with privacy.enabled"):
        from_dict(apply_overrides({}, base))
    assert from_dict(apply_overrides({}, base + ["algorithm.item_average=cohort"])).privacy.enabled


def test_fedavg_mf_local_item_copies_are_deduplicated_per_client():
    cfg = from_dict(apply_overrides({"data": {"name": "mf_synthetic", "num_users": 30, "num_items": 20,
                                              "rows_per_user": 8, "layout": "federated"},
                                     "algorithm": {"name": "fedavg_mf", "dim": 4, "item_average": "touched"},
                                     "train": {"lr": 0.1, "optimizer": "sgd", "local_epochs": 1},
                                     "eval": {"metric": "recall@20"}}, []))
    ds = cfg.data.build(0)
    algo = FedAvgMF(cfg.algorithm, make_setup(cfg, ds))
    algo.attach_data(ds)
    state = algo.init_server()
    ids = np.arange(ds.num_clients)
    personal = algo.init_personal(torch.from_numpy(ids))
    batch = DataView(ds).batch(ids, 0)
    up = algo.train_cohort(algo.configure_train(0, state, torch.from_numpy(ids)), batch, personal)
    # one SGD step: the summed deltas are -lr × the summed per-client gradients at the global Q
    Q = state["Q"].clone().requires_grad_(True)
    p = personal["p"].clone()
    i, j = batch.categorical["item"], algo.negatives(batch, 0)
    m = batch.mask
    x = (p[:, None, :] * (Q[i] - Q[j])).sum(-1)
    reg = cfg.algorithm.reg
    per = ((-torch.nn.functional.logsigmoid(x) + reg * (Q[i].pow(2).sum(-1) + Q[j].pow(2).sum(-1))) * m).sum(1) \
        / m.sum(1).clamp_min(1)
    (g,) = torch.autograd.grad(per.sum(), Q)
    torch.testing.assert_close(up.acc.sums["dQ"].float(), -0.1 * g, rtol=1e-4, atol=1e-6)


def test_packed_local_copies_by_hand():
    """Two clients, padded to L = 3: one packed row per (client, distinct item) of i and j."""
    from fleetrec.algorithms.mf import LocalCopies
    i = torch.tensor([[2, 2, 0], [1, 4, 4]])
    j = torch.tensor([[3, 2, 0], [1, 0, 0]])
    m = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])            # client 0: 2 rows, client 1: 1 row
    lc = LocalCopies.build(i, j, m, num_items=5)
    assert lc.items.tolist() == [2, 3, 1]                           # client 0: {2, 3}; client 1: {1}
    Q = torch.arange(10.0).reshape(5, 2)
    qi, qj = lc.rows(Q[lc.items])
    real = m > 0
    torch.testing.assert_close(qi[real], Q[i][real])
    torch.testing.assert_close(qj[real], Q[j][real])
    assert (qi[~real] == 0).all() and (qj[~real] == 0).all()        # padding reads the zero row
    up = lc.sums(torch.ones(3, 2), num_items=5)
    assert up["nQ"].tolist() == [0, 1, 1, 1, 0] and up["dQ"][:, 0].tolist() == [0, 1, 1, 1, 0]
    # client 0's rows (norm sqrt(2 * 2 * 9) = 6) scaled to norm 3 jointly; client 1's (norm 1) kept
    clipped = lc.clip_per_client(torch.tensor([[3.0, 3.0], [3.0, 3.0], [0.6, 0.8]]), clip=3.0)
    torch.testing.assert_close(clipped, torch.tensor([[1.5, 1.5], [1.5, 1.5], [0.6, 0.8]]))


# ------------------------------------------------------------------------------------------- engine
def _brute_force_per_user(P, Q, ds, split, ks) -> dict[int, dict[str, float]]:
    """Per-user Recall@K / NDCG@K by a plain loop over users (independent of algorithms/ranking.py)."""
    user, item, sp = ds.column("user"), ds.column("item"), ds.column("split")
    out = {}
    for u in np.unique(user[sp == split]):
        scores = (P[u] @ Q.T).numpy().astype(np.float64)
        scores[item[(user == u) & (sp < split)]] = -np.inf
        truth = set(item[(user == u) & (sp == split)].tolist())
        top = np.argsort(-scores, kind="stable")
        row = {}
        for k in ks:
            hit = [1.0 if t in truth else 0.0 for t in top[:k]]
            row[f"recall@{k}"] = sum(hit) / len(truth)
            dcg = sum(h / math.log2(r + 2) for r, h in enumerate(hit))
            row[f"ndcg@{k}"] = dcg / sum(1 / math.log2(r + 2) for r in range(min(k, len(truth))))
        out[int(u)] = row
    return out


def _user_table(ray_session, coord, state, ds, layout):
    """P as the engine holds it: server state (centralized) or every client's private row (federated)."""
    if layout == "centralized":
        return state["P"]
    pers = ray_session.get(coord.personal_state.remote(list(range(ds.num_clients))))
    return torch.stack([pers[c]["p"] for c in range(ds.num_clients)])


def _brute_force(P, Q, ds, split, ks):
    per = _brute_force_per_user(P, Q, ds, split, ks)
    return {k: float(np.mean([row[k] for row in per.values()])) for k in next(iter(per.values()))}


@pytest.mark.parametrize("layout", ["centralized", "federated"])
def test_per_user_test_metrics_of_the_best_round_match_a_brute_force_loop(ray_session, layout, tmp_path):
    """eval.per_user: the driver keeps every user's test metrics of the best round (global user ids,
    across workers and cohorts), logs them as per_user/test.csv, and they average to the logged means."""
    from mlflow.tracking import MlflowClient
    from fleetrec.simulator.run import run
    from fleetrec.simulator.tracking import PER_USER_CSV, MlflowLogger, read_per_user
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    path = "pmtrec_synthetic.yaml" if layout == "centralized" else "pmtrec_synthetic_federated.yaml"
    cfg = _cfg(path, **{"rounds": 1, "algorithm.ks": "[5, 10]", "eval.metric": "ndcg@10", "eval.per_user": True,
                        "resources.workers": 2, "federation.cohort_size": 7, "tracking.mlflow": True,
                        "tracking.tracking_uri": uri, "tracking.experiment": "t"})
    result, coord = run(cfg, [MlflowLogger(cfg)], keep_actors=True)
    try:
        ds = cfg.data.build(cfg.seed)
        state = result.server_state
        P = _user_table(ray_session, coord, state, ds, layout)
    finally:
        ray_session.kill(coord)
    ref = _brute_force_per_user(P, state["Q"], ds, 2, (5, 10))
    per = result.best_per_user
    assert sorted(per["user"].tolist()) == sorted(ref) and "val/ndcg@10" not in per
    for i, u in enumerate(per["user"].tolist()):
        for k in ("recall@5", "ndcg@10"):
            assert per[k][i] == pytest.approx(ref[u][k], rel=1e-5, abs=1e-7), (u, k)
    assert float(np.mean(per["ndcg@10"])) == pytest.approx(result.best["test/ndcg@10"], rel=1e-6)   # float32 sums
    assert all("per_user" not in k for r in result.records for k in r)
    frame = read_per_user(MlflowClient(tracking_uri=uri).download_artifacts(result.run_id, PER_USER_CSV, str(tmp_path)))
    assert frame["user"].tolist() == sorted(ref)
    assert frame["recall@5"].to_numpy() == pytest.approx([ref[u]["recall@5"] for u in sorted(ref)], rel=1e-6)


def test_per_user_is_refused_for_pointwise_algorithms():
    with pytest.raises(ConfigError, match="eval.per_user"):
        from_dict(apply_overrides({}, ["eval.per_user=true"]))


@pytest.mark.parametrize("layout", ["centralized", "federated"])
def test_ranking_metrics_through_the_engine_match_a_brute_force_loop(ray_session, layout):
    from fleetrec.simulator.run import run
    path = "pmtrec_synthetic.yaml" if layout == "centralized" else "pmtrec_synthetic_federated.yaml"
    cfg = _cfg(path, **{"rounds": 2, "eval.every": 1, "algorithm.ks": "[5, 10]", "eval.metric": "ndcg@10",
                        "resources.workers": 2, "federation.cohort_size": 7, "early_stop_patience": 0})
    result, coord = run(cfg, keep_actors=True)
    try:
        ds = cfg.data.build(cfg.seed)
        state = result.server_state
        P = _user_table(ray_session, coord, state, ds, layout)
        last = result.records[-1]
        for split, name in ((1, "val"), (2, "test")):
            ref = _brute_force(P, state["Q"], ds, split, (5, 10))
            for k, v in ref.items():
                assert last[f"{name}/{k}"] == pytest.approx(v, rel=1e-5, abs=1e-7), (name, k)
        assert result.best_round in (0, 1) and "val/ndcg@10" in result.best
    finally:
        ray_session.kill(coord)


def test_each_step_records_the_task_weights_and_the_share_of_conflicting_task_pairs():
    """`train/combiner/weight_<task>` is the weight the combiner gave each task and
    `train/combiner/conflict` the share of task pairs with a negative gradient inner product. With
    two tasks MGDA's min-norm point puts weight 0 on AU whenever g_bpr . g_au >= ||g_bpr||^2: the
    record shows it (the reason MGDA-UB trained exactly as single-task MF on Epinions)."""
    a, ds = _algo(_cfg("pmtrec_synthetic.yaml", **{"algorithm.tasks": "[bpr, au]",
                                                  "algorithm.combiner": "{name: mgda}"}))
    L = torch.tensor([1.0, 1.0])
    same_way = torch.tensor([[[1.0, 0.0]], [[1.5, 0.5]]])                 # dot 1.5 >= ||g_bpr||^2 = 1
    gp, _ = a.combine(L, same_way, None, None, None, epoch=1, step=1)
    torch.testing.assert_close(gp, same_way[0])
    assert a.diagnostics == pytest.approx({"train/combiner/weight_bpr": 1.0, "train/combiner/weight_au": 0.0,
                                           "train/combiner/conflict": 0.0})
    opposed = torch.tensor([[[1.0, 0.0]], [[-1.0, 1.0]]])                 # dot -1: conflict, both weighted
    a.combine(L, opposed, None, None, None, epoch=1, step=1)
    d = a.diagnostics
    assert d["train/combiner/conflict"] == 1.0 and 0 < d["train/combiner/weight_au"] < 1
    three, _ = _algo(_cfg("pmtrec_synthetic.yaml", **{"algorithm.tasks": "[bpr, rating, au]",
                                                      "algorithm.combiner": "{name: equal}"}))
    three.combine(torch.ones(3), torch.tensor([[[1.0, 0.0]], [[-1.0, 0.0]], [[0.0, 1.0]]]), None, None, None, 1, 1)
    assert three.diagnostics["train/combiner/conflict"] == pytest.approx(1 / 3)   # 1 pair of 3 opposes
    # a real step returns them with its losses (the round record averages them over steps)
    u, i, _, r, _ = _main_batch(a, ds)
    out = a.trainer.step(MFServer.unflatten(a.init_server()), u, i, r, epoch=1)
    assert set(out) == {"train/bpr_loss", "train/au_loss", "train/combiner/weight_bpr", "train/combiner/weight_au",
                        "train/combiner/conflict"}
    assert out["train/combiner/weight_bpr"] + out["train/combiner/weight_au"] == pytest.approx(1.0)
    # PMTRec's per-row weights: the mean over the touched rows
    p, _ = _algo(_cfg("pmtrec_synthetic.yaml", **{"algorithm.tasks": "[bpr, au]",
                                                 "algorithm.combiner": "{name: pmtrec, alpha: 1.0, tau: 1.0}"}))
    out = p.trainer.step(MFServer.unflatten(p.init_server()), u, i, r, epoch=1)
    assert 0 < out["train/combiner/weight_au"] < 1 and 0 <= out["train/combiner/conflict"] <= 1


def test_centralized_pmtrec_learns_on_synthetic_data_and_logs_to_mlflow(ray_session, tmp_path):
    from mlflow.tracking import MlflowClient
    from fleetrec.simulator.run import run
    from fleetrec.simulator.tracking import MlflowLogger
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = _cfg("pmtrec_synthetic.yaml", **{"rounds": 5, "data.num_users": 200, "data.num_items": 300,
                                           "data.rows_per_user": 15, "early_stop_patience": 0,
                                           "train.batch_size": 128, "tracking.mlflow": True,
                                           "tracking.tracking_uri": uri, "tracking.experiment": "t"})
    result = run(cfg, [MlflowLogger(cfg)])
    val = [r["val/recall@20"] for r in result.records]
    assert len(val) == 5 and val[-1] > 2 * val[0]
    oracle = result.info["ceiling"]["oracle_ranking"]          # a model knowing the true factors
    assert val[-1] < oracle["val/recall@20"] and oracle["val/recall@20"] > 5 * 20 / 300   # chance: about K / items
    # MLflow refuses '@' in metric names: ranking metrics are logged as recall_at_20
    hist = MlflowClient(tracking_uri=uri).get_metric_history(result.run_id, "val/recall_at_20")
    assert [m.value for m in hist] == pytest.approx(val)
    assert result.records[-1]["train/bpr_loss"] < result.records[0]["train/bpr_loss"]


# ------------------------------------------------------------------------------------------- Ciao / Amazon MF sources
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _needs(folder: str, file: str):
    return pytest.mark.skipif(not (SHARED_DATA / folder / file).is_file(),
                              reason=f"shared/data/{folder}/{file} is not available")


def _check_split_per_user(d):
    assert d.user.min() == 0 and d.user.max() == d.num_users - 1 and len(np.unique(d.user)) == d.num_users
    assert set(np.unique(d.split).tolist()) == {0, 1, 2}
    for u in np.unique(d.user)[:50]:
        assert (d.split[d.user == u] == 0).any()            # every user keeps training rows


@_needs("ciao", "ratings.csv.gz")
def test_mf_ciao_slice_has_ratings_and_categories_but_no_trust(tmp_path):
    from fleetrec.datasets.graphs import MFCiaoConfig
    d = MFCiaoConfig(max_users=600, cache_dir=str(tmp_path)).mf(0)
    assert 50 < d.num_users <= 600 and d.meta["has_rating"]
    assert d.rating.min() >= 0 and d.rating.max() <= 5 and len(np.unique(d.rating)) > 2
    assert (np.bincount(d.user) >= 10).all() and (np.bincount(d.item) >= 10).all()       # 10-core
    assert (d.item_category >= 0).all() and d.num_categories >= 2                         # every item has one
    assert d.trust.shape == (2, 0) and d.item_pairs is None
    _check_split_per_user(d)
    fed = to_federated(d, "centralized")
    assert fed.side["trust"].num_rows == 0 and "item_pairs" not in fed.side


@pytest.mark.parametrize("source,folder,file", [
    ("video_games", "amazon-video-games", "Video.txt.gz"),
    ("office_products", "amazon-office-products", "office_test_sequences.csv.gz")])
def test_mf_amazon_implicit_slice_has_no_ratings_categories_or_pairs(tmp_path, source, folder, file):
    if not (SHARED_DATA / folder / file).is_file():
        pytest.skip(f"shared/data/{folder}/{file} is not available")
    from fleetrec.datasets.graphs import MFAmazonConfig
    d = MFAmazonConfig(source=source, k_core=2, max_users=500, cache_dir=str(tmp_path)).mf(0)
    assert d.num_users > 50 and not d.meta["has_rating"] and (d.rating == 1.0).all()
    assert (d.item_category == -1).all() and d.num_categories == 0
    assert d.trust.shape == (2, 0) and d.item_pairs is None
    _check_split_per_user(d)


@_needs("amazon-video-games", "Video.txt.gz")
@pytest.mark.parametrize("tasks,missing", [("[bpr, rating]", "rating"), ("[bpr, coview]", "coview"),
                                           ("[bpr, category]", "category"), ("[bpr, social]", "social")])
def test_amazon_video_games_refuses_tasks_without_data(tmp_path, tasks, missing):
    cfg = load(CONFIGS / "pmtrec_amazon_video_games.yaml",
               ["tracking.mlflow=false", "tracking.progress=false", "data.k_core=2", "data.max_users=300",
                f"data.cache_dir={tmp_path}", f"algorithm.tasks={tasks}"])
    with pytest.raises(ValueError, match=f"algorithm.tasks: task '{missing}' needs data"):
        _algo(cfg)


@_needs("amazon-video-games", "Video.txt.gz")
def test_amazon_video_games_config_builds_and_attaches(tmp_path):
    cfg = load(CONFIGS / "pmtrec_amazon_video_games.yaml",
               ["tracking.mlflow=false", "tracking.progress=false", "data.k_core=2", "data.max_users=300",
                f"data.cache_dir={tmp_path}"])
    algo, ds = _algo(cfg)
    assert ds.meta["has_rating"] is False and algo.pairs is None and algo.num_users == ds.meta["num_users"]


def _write_official_toy(root: Path) -> None:
    """5-core reviews + metadata of category Toy: users u0..u3, items A..E; E has one review (cut by the 2-core),
    Z is in the metadata only."""
    import json
    reviews = [(u, a) for u in ("u0", "u1", "u2", "u3") for a in ("A", "B", "C", "D")] + [("u0", "E")]
    with open(root / "Toy_5.json", "w") as fh:
        for n, (u, a) in enumerate(reviews):
            fh.write(json.dumps({"reviewerID": u, "asin": a, "overall": 1 + n % 5, "unixReviewTime": n}) + "\n")
    meta = [{"asin": "A", "category": ["Toy", "Cars"], "also_view": ["B", "E", "Z"], "also_buy": ["C"]},
            {"asin": "B", "category": ["Toy", "Dolls"], "also_buy": ["A", "D"]},
            {"asin": "C", "category": ["Toy", "Cars"]},
            {"asin": "D", "category": ["Toy"]},
            {"asin": "E", "category": ["Toy", "Dolls"], "also_view": ["A"]},
            {"asin": "Z", "category": ["Toy", "Other"]}]
    with open(root / "meta_Toy.json", "w") as fh:
        fh.writelines(json.dumps(m) + "\n" for m in meta)


def test_mf_amazon_official_layout_keeps_pairs_among_kept_items_and_sets_categories(tmp_path):
    from fleetrec.datasets.amazon import AmazonConfig
    from fleetrec.datasets.graphs import MFAmazonConfig
    data = tmp_path / "toy"
    data.mkdir()
    _write_official_toy(data)
    cfg = MFAmazonConfig(source="official", path=str(data), cache_dir=str(tmp_path / "cache"), k_core=2,
                         val_fraction=0.25, test_fraction=0.25)
    d = cfg.mf(0)
    assert (d.num_users, d.num_items) == (4, 4) and d.meta["has_rating"]
    raw_items = AmazonConfig(path=str(data), cache=False).load_frame()
    assert len(np.unique(raw_items["item"])) == 5                       # E was parsed, the 2-core dropped it
    # pairs in item codes of A..D (0..3): A->B, A->C, B->A, B->D; E's and Z's pairs are gone
    assert d.item_pairs.tolist() == [[0, 0, 1, 1], [1, 2, 0, 3]]
    assert (d.item_pairs < d.num_items).all()
    # category level 1: A, C = Cars; B = Dolls; D has only the root (deepest = Toy)
    assert d.item_category[0] == d.item_category[2] != d.item_category[1] != d.item_category[3]
    assert (d.item_category >= 0).all() and d.num_categories == 3
    assert d.trust.shape == (2, 0)
    for u in range(4):
        assert np.bincount(d.split[d.user == u], minlength=3).tolist() == [2, 1, 1]
    fed = to_federated(d, "centralized")
    assert fed.side["item_pairs"].num_rows == 4 and fed.meta["has_rating"] is True


def test_mf_amazon_category_only_for_the_official_layout():
    with pytest.raises(ConfigError, match="data.category"):
        from_dict(apply_overrides({}, ["data.name=mf_amazon", "data.source=video_games", "data.category=Toy",
                                       "algorithm.name=pmtrec", "algorithm.mode=centralized", "eval.metric=recall@20"]))


def _history_combiners() -> list[str]:
    from fleetrec.algorithms.combiners import COMBINERS
    from fleetrec.algorithms.pmtrec import keeps_history
    names = [n for n in COMBINERS.names() if keeps_history(n)]
    assert {"uncertainty", "dwa", "gradnorm", "metabalance"} <= set(names) and "pmtrec" not in names
    return names


@pytest.mark.parametrize("combiner", _history_combiners())
def test_combiner_history_is_server_state_so_fresh_workers_continue_it(combiner):
    """Centralized PMTRec with a combiner that keeps history: three rounds by one algorithm object
    equal three rounds by a fresh object each round (what a resumed run or a restarted worker
    has), because the history travels in the server state; and the history does change."""
    cfg = _cfg("pmtrec_synthetic.yaml", **{"algorithm.combiner": f"{{name: {combiner}}}", "train.local_epochs": 2,
                                           "train.optimizer": "adam"})
    ds = cfg.data.build(cfg.seed)
    dv = DataView(ds)

    def fresh():
        algo = PMTRecMF(cfg.algorithm, make_setup(cfg, ds))
        algo.attach_data(ds)
        return algo

    def step(algo, state, rnd):
        batch = dv.batch(np.array([0]), 0, epochs=2, seed=cfg.seed, rnd=rnd)
        up = algo.train_cohort(algo.configure_train(rnd, state, torch.tensor([0])), batch, {})
        return algo.aggregate_train(rnd, state, up.acc)[0]

    one = fresh()
    kept = one.init_server()
    restarted = dict(kept)
    for rnd in range(3):
        kept = step(one, kept, rnd)
        restarted = step(fresh(), restarted, rnd)
    history = [k for k in kept if k.startswith("combiner")]
    assert history and any(not torch.equal(kept[k], one.init_server()[k]) for k in history)
    for k in kept:
        torch.testing.assert_close(restarted[k], kept[k], atol=0, rtol=0, msg=k)


def test_per_user_values_of_the_best_round_survive_the_driver_checkpoint():
    import json
    from fleetrec.algorithms.evaluation import PER_USER
    from fleetrec.simulator.run import _Loop
    cfg = _cfg("pmtrec_synthetic.yaml", **{"eval.metric": "recall@20", "early_stop_patience": 0})
    loop = _Loop(cfg, [])
    best = {"user": np.array([3, 1]), "recall@20": np.array([0.5, 0.25])}
    loop.record({"round": 0, "val/recall@20": 0.1, PER_USER: best})
    loop.record({"round": 1, "val/recall@20": 0.05, PER_USER: {"user": np.array([3]), "recall@20": np.array([0.0])}})
    assert loop.best_per_user is best and all(PER_USER not in r for r in loop.records)
    again = _Loop(cfg, [])
    again.load_state_dict(json.loads(json.dumps(loop.state_dict(1))))      # driver.json is JSON
    assert again.best_per_user["user"].tolist() == [3, 1] and again.best_per_user["user"].dtype == np.int64
    assert again.best_per_user["recall@20"].tolist() == [0.5, 0.25]
