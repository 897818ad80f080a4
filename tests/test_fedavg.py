"""FedAvg client and server halves without Ray: vectorized cohort vs a per-client loop,
hand-computed aggregation, NaN updates dropped."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fleetrec.algorithms import aggregate, make_algorithm
from fleetrec.algorithms.protocol import Accumulator, Setup
from fleetrec.simulator.cohort import DataView
from tests.conftest import tiny_config


def _setup(*extra):
    cfg = tiny_config(*extra)
    ds = cfg.data.build(cfg.seed)
    algo = make_algorithm(cfg.algorithm, Setup(ds.schema, ds.num_clients, cfg.seed, cfg.train, cfg.model))
    return cfg, ds, algo


def _reference_client(algo, state, personal, ds, client, cfg, rnd):
    """One client trained alone with plain autograd, minibatch by minibatch (torch's own optimizer and,
    for the learning-rate schedule, torch's ExponentialLR stepped after every batch, as FedRAP's code does)."""
    view = DataView(ds)
    b = view.batch(np.array([client]), 0, epochs=cfg.train.local_epochs, seed=cfg.seed, rnd=rnd)
    n = int(b.n_rows[0])
    params = {k: v.clone().requires_grad_(True) for k, v in {**state, **personal}.items()}
    opt_cls = torch.optim.Adam if cfg.train.optimizer == "adam" else torch.optim.SGD
    opt = opt_cls(params.values(), lr=cfg.train.lr * cfg.train.lr_round_decay ** rnd, weight_decay=cfg.train.weight_decay)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=cfg.train.lr_step_decay)
    for e in range(cfg.train.local_epochs):
        rows = b.order[e, 0, :n]
        for s in range(0, n, cfg.train.batch_size):
            r = rows[s:s + cfg.train.batch_size]
            cat = {k: v[0, r] for k, v in b.categorical.items()}
            attrs = {k: v[0] for k, v in b.client_attrs.items()}
            logits = torch.func.functional_call(algo.model, {**algo.frozen, **params},
                                                (cat, b.numeric[0, r], attrs))
            loss = F.binary_cross_entropy_with_logits(logits, b.labels[0, r])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return {k: v.detach() for k, v in params.items()}


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("weight_decay", [0.01, 0.0])   # 0.0: item table trained as per-client row subsets
@pytest.mark.parametrize("decay", [(1.0, 1.0), (0.8, 0.9)], ids=["constant_lr", "lr_schedule"])
def test_vectorized_cohort_equals_per_client_loop(optimizer, weight_decay, decay):
    """The schedule (per-step and per-round decay) is each client's own: a client with fewer rows
    sits steps out without advancing it, as a client trained alone would."""
    cfg, ds, algo = _setup(f"train.optimizer={optimizer}", "train.local_epochs=2", "train.lr=0.05",
                           f"train.weight_decay={weight_decay}", f"train.lr_step_decay={decay[0]}",
                           f"train.lr_round_decay={decay[1]}")
    assert bool(algo._row_vocab(DataView(ds).batch(np.array([0]), 0))) == (weight_decay == 0)
    state = algo.init_server()
    clients = np.array([0, 3, 5, 11, 36])            # unequal sizes: padding and masking matter
    personal = algo.init_personal(torch.from_numpy(clients))
    view = DataView(ds)
    batch = view.batch(clients, 0, epochs=cfg.train.local_epochs, seed=cfg.seed, rnd=4)
    assert len(set(batch.n_rows.tolist())) > 1
    plan = algo.configure_train(4, state, torch.from_numpy(clients))
    upd = algo.train_cohort(plan, batch, personal)
    weights = batch.n_rows.double()
    expected_sum = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in state.items()}
    for i, c in enumerate(clients):
        ref = _reference_client(algo, state, {k: v[i] for k, v in personal.items()}, ds, c, cfg, 4)
        torch.testing.assert_close(upd.personal["user_emb"][i], ref["user_emb"], atol=2e-5, rtol=1e-4)
        for k in state:
            expected_sum[k] += weights[i] * ref[k].double()
    total = float(weights.sum())
    for k in state:   # the weighted mean of the clients' shared tensors, as the server will see it
        torch.testing.assert_close(upd.acc.sums[k] / total, expected_sum[k] / total, atol=5e-5, rtol=1e-4)
    assert upd.acc.weight == pytest.approx(float(weights.sum()))


def test_fedavg_aggregate_is_hand_computed_weighted_mean():
    _, _, algo = _setup()
    name = algo.shared_names[0]
    state = algo.init_server()
    shape = state[name].shape
    x = torch.stack([torch.full(shape, 1.0), torch.full(shape, 4.0), torch.full(shape, -2.0)])  # (3, ...)
    w = torch.tensor([1.0, 2.0, 5.0])
    acc = Accumulator()
    aggregate.fold_weighted(acc, {k: (x if k == name else state[k].expand(3, *state[k].shape)) for k in state}, w)
    new, _ = algo.aggregate_train(0, state, acc)
    # (1*1 + 2*4 + 5*(-2)) / 8 = -1/8
    torch.testing.assert_close(new[name], torch.full(shape, -0.125))


def test_server_lr_scales_the_step():
    _, _, algo = _setup("algorithm.server_lr=0.5")
    state = algo.init_server()
    name = algo.shared_names[0]
    target = {k: v + 1.0 for k, v in state.items()}
    acc = Accumulator()
    aggregate.fold_weighted(acc, {k: v.unsqueeze(0) for k, v in target.items()}, torch.ones(1))
    new, _ = algo.aggregate_train(0, state, acc)
    torch.testing.assert_close(new[name], state[name] + 0.5)


def test_non_finite_update_is_dropped_and_counted():
    acc = Accumulator()
    x = torch.tensor([[1.0, 1.0], [float("nan"), 0.0], [3.0, math.inf], [5.0, 5.0]])
    keep = aggregate.fold_weighted(acc, {"p": x}, torch.tensor([1.0, 1.0, 1.0, 3.0]),
                                   {"train_loss": torch.tensor([0.5, 0.1, 0.2, 0.3])})
    assert keep.tolist() == [True, False, False, True]
    assert acc.dropped == 2 and acc.clients == 2 and acc.weight == 4.0
    torch.testing.assert_close(acc.sums["p"], torch.tensor([16.0, 16.0], dtype=torch.float64))
    assert acc.stats["train_loss"] == pytest.approx(0.5 + 0.9)


def test_accumulator_merge_is_order_independent():
    gen = torch.Generator().manual_seed(0)
    parts = []
    for _ in range(4):
        a = Accumulator()
        aggregate.fold_weighted(a, {"p": torch.randn(5, 3, generator=gen)}, torch.rand(5, generator=gen))
        parts.append(a)
    fwd, rev = Accumulator(), Accumulator()
    for p in parts:
        fwd.merge(p)
    for p in reversed(parts):
        rev.merge(p)
    torch.testing.assert_close(fwd.sums["p"], rev.sums["p"], atol=1e-12, rtol=0)


def test_traffic_counts_only_shared_tensors():
    _, _, algo = _setup()
    up, down = algo.traffic()
    expected = sum(algo.init_server()[k].numel() * 4 for k in algo.shared_names)
    assert up == down == expected
    assert "user_emb" not in algo.shared_names


def test_registry_refuses_a_taken_name():
    from fleetrec import algorithms
    with pytest.raises(ValueError, match="already registered"):
        algorithms.register("fedavg", object)
    assert algorithms.ALGORITHMS["fedavg"].__name__ == "FedAvg"


def _one_round(algo, ds, cfg, clients):
    from fleetrec.simulator.cohort import DataView
    state = algo.init_server()
    batch = DataView(ds).batch(clients, 0, epochs=cfg.train.local_epochs, seed=cfg.seed, rnd=0)
    plan = algo.configure_train(0, state, torch.from_numpy(clients))
    upd = algo.train_cohort(plan, batch, algo.init_personal(torch.from_numpy(clients)))
    return algo.aggregate_train(0, state, upd.acc)


def test_central_dp_with_no_clipping_and_tiny_noise_is_uniform_fedavg():
    from fleetrec.simulator.config import make_setup
    clients = np.arange(12)
    plain_cfg = tiny_config("algorithm.weighting=uniform", "federation.clients_per_round=12")
    dp_cfg = tiny_config("algorithm.weighting=uniform", "federation.clients_per_round=12", "privacy.enabled=true",
                         "privacy.clip=1e6", "privacy.noise_multiplier=1e-12")
    ds = plain_cfg.data.build(plain_cfg.seed)
    plain, _ = _one_round(make_algorithm(plain_cfg.algorithm, make_setup(plain_cfg, ds)), ds, plain_cfg, clients)
    dp_algo = make_algorithm(dp_cfg.algorithm, make_setup(dp_cfg, ds))
    private, metrics = _one_round(dp_algo, ds, dp_cfg, clients)
    for k in plain:
        torch.testing.assert_close(private[k], plain[k], atol=1e-5, rtol=1e-5)
    assert metrics["privacy/epsilon"] > 0


def test_central_dp_clips_and_reports_the_accountants_epsilon():
    from opacus.accountants import RDPAccountant
    from fleetrec.simulator.config import make_setup
    cfg = tiny_config("federation.clients_per_round=10", "privacy.enabled=true", "privacy.clip=0.01",
                      "privacy.noise_multiplier=1.3", "train.lr=1.0")
    ds = cfg.data.build(cfg.seed)
    algo = make_algorithm(cfg.algorithm, make_setup(cfg, ds))
    state = algo.init_server()
    new, metrics = _one_round(algo, ds, cfg, np.arange(10))
    acct = RDPAccountant()
    acct.step(noise_multiplier=1.3, sample_rate=10 / ds.num_clients)
    assert metrics["privacy/epsilon"] == pytest.approx(acct.get_epsilon(delta=1e-5))
    # each client's update has norm <= clip, so without noise the mean moves by <= clip;
    # with noise sigma*clip per coordinate over 10 clients the step stays of that order
    step = torch.cat([(new[k] - state[k]).flatten() for k in state]).norm()
    n_coords = sum(state[k].numel() for k in state)
    assert step < 0.01 + 5 * 1.3 * 0.01 * n_coords ** 0.5 / 10


def test_local_vocab_recodes_every_client_onto_its_own_rows():
    from fleetrec.algorithms import sparse_rows
    ids = torch.tensor([[7, 3, 7, 9], [2, 2, 2, 2], [5, 1, 8, 0]])
    vocab, rec = sparse_rows.local_vocab(ids)
    assert vocab.shape == (3, 4)
    assert torch.equal(vocab.gather(1, rec), ids)                      # the re-coding is exact
    assert vocab[0, :3].tolist() == [3, 7, 9] and vocab[1, 0] == 2      # sorted distinct ids first
    assert set(vocab[1].tolist()) == {2}                                # padding repeats a real id
    table = torch.arange(10.0).unsqueeze(1)
    delta = torch.zeros(3, 4, 1)
    delta[0, 1] = 1.0                                                   # client 0 moves row 7
    delta[2, 0] = 2.0                                                   # client 2 moves row 0
    s = sparse_rows.scatter_rows(10, vocab, delta)
    assert s[7, 0] == 1.0 and s[0, 0] == 2.0 and float(s.sum()) == 3.0
    assert torch.equal(sparse_rows.gather_rows(table, vocab)[0, :, 0], torch.tensor([3.0, 7.0, 9.0, 3.0]))


@pytest.mark.parametrize("dp", [False, True])
def test_sparse_rows_aggregate_equals_dense(dp):
    from fleetrec.simulator.config import make_setup
    extra = ["privacy.enabled=true", "privacy.clip=0.05", "privacy.noise_multiplier=0.5"] if dp else []
    clients = np.arange(0, 30, 2)
    out = {}
    for sparse in (True, False):
        cfg = tiny_config(f"algorithm.sparse_rows={str(sparse).lower()}", "train.optimizer=adam", *extra)
        ds = cfg.data.build(cfg.seed)
        algo = make_algorithm(cfg.algorithm, make_setup(cfg, ds))
        out[sparse] = _one_round(algo, ds, cfg, clients)[0]
    for k in out[False]:
        torch.testing.assert_close(out[True][k], out[False][k], atol=1e-6, rtol=1e-5)
