"""FedPA without Ray (one tiny Ray run at the end): adapter initialisation, group aggregation by
hand, frozen tensors, local DP noise, traffic counters, configs, stage-1 pre-training."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from algorithms import make_algorithm
from algorithms.fedpa import FedPA
from algorithms.models.fedpa import FedPAModel, load_backbone, save_backbone
from algorithms.protocol import Accumulator, Setup
from simulator.cohort import DataView
from simulator.config import from_dict, load
from simulator.config_loader import ConfigError, apply_overrides
from tests.conftest import SHARED_DATA, tiny_overrides

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("fedpa_*.yaml"))
CLIENTS = np.array([0, 3, 5, 11, 36])              # unequal sizes: padding and masking matter


def _cfg(*extra):
    base = [o for o in tiny_overrides() if not o.startswith("model.")]
    return from_dict(apply_overrides({}, base + ["model.name=fedpa", "model.group_features=[group_0,group_1]",
                                                 "algorithm.name=fedpa", "train.optimizer=adam", *extra]), "t")


def _setup(*extra):
    cfg = _cfg(*extra)
    ds = cfg.data.build(cfg.seed)
    algo = make_algorithm(cfg.algorithm, Setup(ds.schema, ds.num_clients, cfg.seed, cfg.train, cfg.model))
    return cfg, ds, algo


def _backbone(tmp_path, suffix=".pt") -> str:
    """A random backbone file for the tiny synthetic data (stands in for stage 1)."""
    cfg = _cfg()
    ds = cfg.data.build(cfg.seed)
    torch.manual_seed(123)
    model = FedPAModel(dataclasses.replace(cfg.model, user_lora="none", group_lora=False), ds.schema)
    return str(save_backbone(tmp_path / f"bb{suffix}", model.backbone_tensors(), {}))


def _round(cfg, ds, algo, state, clients=CLIENTS, rnd=0):
    personal = algo.init_personal(torch.from_numpy(clients))
    batch = DataView(ds).batch(clients, 0, epochs=cfg.train.local_epochs, seed=cfg.seed, rnd=rnd)
    upd = algo.train_cohort(algo.configure_train(rnd, state, torch.from_numpy(clients)), batch, personal)
    return personal, upd


def test_zero_b_keeps_lora_output_zero_at_step_0(tmp_path):
    bb = _backbone(tmp_path)
    cfg, ds, fedpa = _setup(f"model.backbone={bb}", "model.gate=sum")
    _, _, plain = _setup(f"model.backbone={bb}", "model.user_lora=none", "model.group_lora=false")
    batch = DataView(ds).batch(CLIENTS, 1)
    personal = fedpa.init_personal(torch.from_numpy(CLIENTS))
    assert personal["lora.ua0"].abs().sum() > 0                      # A is random, B = 0
    with_lora = fedpa.evaluate_cohort(fedpa.init_server(), batch, personal)
    backbone = plain.evaluate_cohort(plain.init_server(), batch, plain.init_personal(torch.from_numpy(CLIENTS)))
    assert torch.equal(with_lora, backbone)


@pytest.mark.parametrize("init", ["standard", "zeros"])
def test_adapters_move_after_one_round_only_with_standard_init(init):
    cfg, ds, algo = _setup(f"model.lora_init={init}", "train.lr=0.05")
    state = algo.init_server()
    personal, upd = _round(cfg, ds, algo, state)
    new, _ = algo.aggregate_train(0, state, upd.acc)
    moved_user = not torch.equal(upd.personal["lora.ub0"], personal["lora.ub0"])
    moved_group = not torch.equal(new["group.g0_group_0_b"], state["group.g0_group_0_b"])
    if init == "standard":
        assert moved_user and moved_group
        assert not torch.equal(upd.personal["lora.ua0"], personal["lora.ua0"])
    else:                                    # the official code's bug: both factors stay exactly zero
        assert not moved_user and not moved_group
        assert upd.personal["lora.ua0"].abs().sum() == 0


def test_group_mean_by_hand():
    cfg, ds, algo = _setup()
    state = algo.init_server()
    k = "group.g0_group_0_b"                 # group_0 has 4 values; clients here hold 0, 0, 2
    acc = Accumulator()
    vals = torch.stack([torch.full(state[k].shape[1:], v) for v in (1.0, 3.0, 5.0)])
    from algorithms import aggregate
    aggregate.fold_grouped(acc, {k: vals}, torch.ones(3, dtype=torch.float64), torch.tensor([0, 0, 2]), 4, "group_0")
    new, _ = algo.aggregate_train(0, {kk: v for kk, v in state.items()}, acc)
    assert torch.allclose(new[k][0], torch.full_like(new[k][0], 2.0))
    assert torch.allclose(new[k][2], torch.full_like(new[k][2], 5.0))
    assert torch.equal(new[k][1], state[k][1]) and torch.equal(new[k][3], state[k][3])   # nobody uploaded


def test_group_mean_is_over_same_value_clients_of_the_cohort():
    cfg, ds, algo = _setup("train.lr=0.05")
    state = algo.init_server()
    _, upd = _round(cfg, ds, algo, state)
    new, _ = algo.aggregate_train(0, state, upd.acc)
    k = "group.g1_group_1_a"
    values = ds.client_attr("group_1")[CLIENTS]
    rows = {}
    for c in CLIENTS:                         # each client alone: its own uploaded row
        _, one = _round(cfg, ds, algo, state, np.array([c]))
        rows[c] = one.acc.group_sums[k][ds.client_attr("group_1")[c]]
    for v in range(state[k].shape[0]):
        members = [c for c, cv in zip(CLIENTS, values) if cv == v]
        expect = torch.stack([rows[c] for c in members]).mean(0) if members else state[k][v].double()
        assert torch.allclose(new[k][v].double(), expect, atol=1e-6), v


def test_cohort_equals_clients_alone():
    cfg, ds, algo = _setup("train.lr=0.05")
    state = algo.init_server()
    personal, upd = _round(cfg, ds, algo, state)
    for i, c in enumerate(CLIENTS):
        _, one = _round(cfg, ds, algo, state, np.array([c]))
        for k, v in one.personal.items():
            assert torch.allclose(upd.personal[k][i], v[0], atol=1e-6), k


def test_frozen_tensors_bit_identical_after_training(tmp_path):
    bb = _backbone(tmp_path, ".npz")
    cfg, ds, algo = _setup(f"model.backbone={bb}", "train.lr=0.1")
    tensors, _ = load_backbone(bb)
    frozen = {k: v.clone() for k, v in algo.frozen.items()}
    assert set(frozen) >= {"w.0", "b.0", "w.1", "item.item_id"} and "out_w" not in frozen
    state = algo.init_server()
    for rnd in range(2):
        _, upd = _round(cfg, ds, algo, state, rnd=rnd)
        state, _ = algo.aggregate_train(rnd, state, upd.acc)
    assert not set(frozen) & (set(state) | set(upd.personal))
    for k, v in frozen.items():
        assert torch.equal(algo.frozen[k], v) and torch.equal(v, tensors[k]), k


def test_ldp_scale_zero_equals_noiseless():
    cfg, ds, a = _setup()
    _, _, b = _setup("algorithm.ldp.mechanism=laplace", "algorithm.ldp.scale=0.0")
    _, _, c = _setup("algorithm.ldp.mechanism=gaussian", "algorithm.ldp.scale=0.1")
    state = a.init_server()
    _, ua = _round(cfg, ds, a, state)
    _, ub = _round(cfg, ds, b, state)
    _, uc = _round(cfg, ds, c, state)
    for k in ua.acc.sums:
        assert torch.equal(ua.acc.sums[k], ub.acc.sums[k])
    for k in ua.acc.group_sums:
        assert torch.equal(ua.acc.group_sums[k], ub.acc.group_sums[k])
        assert not torch.equal(ua.acc.group_sums[k], uc.acc.group_sums[k])


@pytest.mark.parametrize("mechanism", ["gaussian", "laplace"])
def test_ldp_noise_matches_scale(mechanism):
    delta = 0.3
    _, _, algo = _setup(f"algorithm.ldp.mechanism={mechanism}", f"algorithm.ldp.scale={delta}")
    ids = torch.arange(4000)
    up = {"x": torch.zeros(4000, 25), "y": torch.zeros(4000, 25)}
    noisy = algo.privatize(up, 3, ids)
    x = noisy["x"].double()
    if mechanism == "gaussian":
        assert abs(float(x.std()) - delta) < 0.01 * delta * 3
    else:                                    # Laplace(b): E|x| = b, Var = 2 b^2
        assert abs(float(x.abs().mean()) - delta) < 0.03 * delta
        assert abs(float(x.var()) - 2 * delta ** 2) < 0.06 * 2 * delta ** 2
    assert abs(float(x.mean())) < 0.01
    assert not torch.equal(noisy["x"], noisy["y"])                      # own draws per tensor
    assert torch.equal(algo.privatize(up, 3, ids)["x"], noisy["x"])      # a pure function of (seed, round, client)
    assert not torch.equal(algo.privatize(up, 4, ids)["x"], noisy["x"])


def test_ldp_clip_bounds_each_tensor():
    _, _, algo = _setup("algorithm.ldp.clip=1.0")
    x = torch.randn(6, 10) * 5
    out = algo.privatize({"x": x}, 0, torch.arange(6))["x"]
    assert torch.all(out.norm(dim=1) <= 1.0 + 1e-5)


def _traffic(stem: str, bb: str, *extra):
    cfg = load(f"configs/fedpa_movielens{stem}.yaml", [f"model.backbone={bb}", *extra])
    ds = cfg.data.build(cfg.seed)
    return make_algorithm(cfg.algorithm, Setup(ds.schema, ds.num_clients, cfg.seed, cfg.train, cfg.model)).traffic()[0]


@pytest.mark.skipif(not (SHARED_DATA / "movielens-100k").is_dir(), reason="shared/data/movielens-100k absent")
def test_upload_bytes_against_fedavg_fine_tuning(tmp_path):
    """The counters on the MovieLens configs (a random backbone file stands in for stage 1, so the
    roles are those of a real run). FedPA sends gates + output layer + its own group rows."""
    cfg = load("configs/fedpa_movielens.yaml", ["model.backbone="])
    model = FedPAModel(dataclasses.replace(cfg.model, user_lora="none", group_lora=False), cfg.data.build(0).schema)
    bb = str(save_backbone(tmp_path / "ml.pt", model.backbone_tensors(), {}))
    fedpa = _traffic("", bb)
    full_user_side = _traffic("_fedavg_full", bb)                              # user tables + MLP + output
    full_model = _traffic("_fedavg_full", bb, "model.finetune_items=true")     # ... + item tables
    assert _traffic("_local", bb) == 0 and _traffic("_pretrained", bb) == 0
    print(f"bytes up per client: fedpa {fedpa}, fedavg user side {full_user_side} "
          f"({1 - fedpa / full_user_side:.0%} less), fedavg whole model {full_model} ({1 - fedpa / full_model:.0%} less)")
    assert fedpa < full_user_side
    assert fedpa <= 0.2 * full_model


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_fedpa_configs_load(path):
    cfg = load(path, ["model.backbone=", "data.max_clients=23"])
    assert cfg.model.name == "fedpa" and cfg.algorithm.name == "fedpa"


def test_missing_backbone_is_a_one_line_config_error():
    with pytest.raises(ConfigError) as e:
        load(CONFIGS[0], ["model.backbone=/nonexistent/bb.pt"])
    assert "fleetrec pretrain" in str(e.value) and "\n" not in str(e.value)


def test_pretrain_then_federate_private_clients(ray_session, tmp_path):
    from simulator.pretrain import federated_dataset, open_clients, pretrain
    from simulator.run import run
    out = tmp_path / "stage1.pt"
    cfg = _cfg("model.pretrain.epochs=2", "model.pretrain.open_fraction=0.3", "rounds=2")
    path = pretrain(cfg, out)
    tensors, meta = load_backbone(path)
    full = cfg.data.build(cfg.seed)
    opened = open_clients(full.num_clients, 0.3, cfg.seed)
    assert meta["open_clients"] == len(opened) == round(0.3 * full.num_clients)
    stage2 = _cfg("model.pretrain.open_fraction=0.3", "rounds=2", f"model.backbone={path}")
    ds = federated_dataset(stage2)
    assert ds.num_clients == full.num_clients - len(opened) == meta["private_clients"]
    private = np.setdiff1d(np.arange(full.num_clients), opened)
    assert np.array_equal(ds.client_attr("group_0"), full.client_attr("group_0")[private])
    with pytest.raises(ValueError, match="private clients"):       # the open clients must not federate
        FedPA(stage2.algorithm, Setup(full.schema, full.num_clients, 0, stage2.train, stage2.model))
    result = run(stage2, dataset=ds)
    assert result.records[-1]["train/clients_trained"] > 0 and result.best["val/clients"] == ds.num_clients
    assert result.info["bytes_up_per_client"] > 0


def test_pretrained_baseline_trains_and_sends_nothing():
    cfg, ds, algo = _setup("algorithm.adapt=false", "model.user_lora=none", "model.group_lora=false")
    state = algo.init_server()
    personal, upd = _round(cfg, ds, algo, state)
    new, stats = algo.aggregate_train(0, state, upd.acc)
    assert algo.traffic() == (0, 0) and stats["clients_trained"] == len(CLIENTS)
    assert all(torch.equal(new[k], state[k]) for k in state)
    assert all(torch.equal(upd.personal[k], personal[k]) for k in personal)
    assert 0 < stats["train_loss"] < 5


def test_local_finetuning_keeps_every_trained_tensor_private():
    cfg, ds, algo = _setup("algorithm.aggregate=false", "model.group_lora=false")
    state = algo.init_server()
    assert state == {} and algo.traffic() == (0, 0)
    personal, upd = _round(cfg, ds, algo, state)
    assert "gate.0.0.weight" in personal and "out_w" in personal
    assert not torch.equal(upd.personal["gate.0.0.weight"], personal["gate.0.0.weight"])
    assert upd.acc.sums == {} and upd.acc.group_sums == {}
