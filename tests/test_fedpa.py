"""FedPA without Ray (one tiny Ray run at the end): adapter initialisation, group aggregation by
hand, frozen tensors, local DP noise, traffic counters, configs, stage-1 pre-training."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from fleetrec.algorithms import make_algorithm
from fleetrec.algorithms.fedpa import FedPA
from fleetrec.algorithms.models.fedpa import FedPAModel, load_backbone, save_backbone
from fleetrec.algorithms.protocol import Accumulator, Setup
from fleetrec.datasets.federated import DataError
from fleetrec.simulator.cohort import DataView
from fleetrec.simulator.config import from_dict, load, make_setup
from fleetrec.simulator.config_loader import ConfigError, apply_overrides
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
    algo = make_algorithm(cfg.algorithm, make_setup(cfg, ds))     # privacy.local reaches the algorithm here
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
    with_lora = fedpa.score_cohort(fedpa.init_server(), batch, personal)
    backbone = plain.score_cohort(plain.init_server(), batch, plain.init_personal(torch.from_numpy(CLIENTS)))
    assert torch.equal(with_lora, backbone)


def test_gate_init_gives_the_backbone_branch_the_weight_the_flag_says():
    """gate_init_backbone_logit = b: every layer's gate starts at softmax([b, 0, ..., 0]) for any
    input, so the backbone branch weighs e^b / (e^b + G - 1); null keeps PyTorch's init (~1/G)."""
    import math
    _, ds, algo = _setup("model.gate_init_backbone_logit=4.0")
    model = algo.model
    G = model.n_branches
    assert G == 4                                                   # backbone, user LoRA, two group LoRAs
    x = torch.randn(7, model.gate[0][0].in_features)
    w = model._gate(0, x)
    torch.testing.assert_close(w[:, 0], torch.full((7,), math.exp(4) / (math.exp(4) + G - 1)))
    torch.testing.assert_close(w[:, 1:], torch.full((7, G - 1), 1 / (math.exp(4) + G - 1)))
    _, _, default = _setup()
    assert abs(float(default.model._gate(0, x)[:, 0].mean()) - 1 / G) < 0.15
    with pytest.raises(ConfigError, match="model.gate_init_backbone_logit: only used with model.gate=adaptive"):
        _cfg("model.gate_init_backbone_logit=4.0", "model.gate=sum")


def test_open_users_are_the_most_active_under_that_rule():
    """open_rule most_active: the round(fraction * C) clients with the most rows are open (ties by
    the seeded hash order), so every private client has at most as many rows as any open one."""
    from fleetrec.algorithms.models.fedpa import select_open
    _, ds, _ = _setup()
    rows = np.diff(ds.offsets)
    opened = select_open(ds, 0.2, 0, rule="most_active")
    private = np.setdiff1d(np.arange(ds.num_clients), opened)
    assert len(opened) == round(0.2 * ds.num_clients) and rows[private].max() <= rows[opened].min()
    assert not np.array_equal(opened, select_open(ds, 0.2, 0))      # the random rule differs
    with pytest.raises(ConfigError, match="model.pretrain.open_rule: only used with open_fraction"):
        _cfg("model.pretrain.open_rule=most_active", "model.pretrain.open_attribute=group_0")


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
    from fleetrec.algorithms import aggregate
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
    _, _, b = _setup("privacy.local.mechanism=laplace", "privacy.local.scale=0.0")
    _, _, c = _setup("privacy.local.mechanism=gaussian", "privacy.local.scale=0.1")
    state = a.init_server()
    _, ua = _round(cfg, ds, a, state)
    _, ub = _round(cfg, ds, b, state)
    _, uc = _round(cfg, ds, c, state)
    for k in ua.acc.sums:
        assert torch.equal(ua.acc.sums[k], ub.acc.sums[k])
    for k in ua.acc.group_sums:
        assert torch.equal(ua.acc.group_sums[k], ub.acc.group_sums[k])
        assert not torch.equal(ua.acc.group_sums[k], uc.acc.group_sums[k])
    for k in ua.personal:                    # the private state does not see the noise either
        assert torch.equal(ua.personal[k], ub.personal[k]) and torch.equal(ua.personal[k], uc.personal[k])
    new_a, _ = a.aggregate_train(0, state, ua.acc)
    new_b, _ = b.aggregate_train(0, state, ub.acc)
    assert all(torch.equal(new_a[k], new_b[k]) for k in new_a)     # the next server state: the same


# KuaiRand-Pure as in methods.md §3.2: 23 user features, 6 item features (vocabulary sizes)
KUAIRAND_USER = {"user_active_degree": 9, "is_live_streamer": 2, "is_video_author": 2, "follow_user_num_range": 8,
                 "fans_user_num_range": 9, "friend_user_num_range": 7, "register_days_range": 8,
                 **{f"onehot_feat{i}": v for i, v in ((0, 2), (1, 7), (2, 50), (4, 16), (5, 34), (6, 3), (7, 118),
                                                      (9, 7), (10, 5), (11, 5))},
                 **{f"onehot_feat{i}": 3 for i in range(12, 18)}}
KUAIRAND_ITEM = {"upload_type": 14, "music_type": 6, "tag": 111, "play_duration": 100, "comment_stay_duration": 100,
                 "complete_play_cnt": 100}


def _algo_on(stem: str, schema, bb: str, *extra):
    """The algorithm of configs/fedpa_movielens{stem}.yaml on `schema`, with backbone file `bb`."""
    cfg = load(f"configs/fedpa_movielens{stem}.yaml", ["model.backbone=", *extra])
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, backbone=bb))
    return make_algorithm(cfg.algorithm, Setup(schema, 100, cfg.seed, cfg.train, cfg.model))


def _random_backbone(cfg_model, schema, path) -> str:
    model = FedPAModel(dataclasses.replace(cfg_model, backbone="", user_lora="none", group_lora=False), schema)
    return str(save_backbone(path, model.backbone_tensors(), {}))


def test_upload_floats_on_the_spec_shapes_match_its_count(tmp_path):
    """methods.md §3.2 on KuaiRand-Pure's shapes (d_0 = 8 x 29 = 232, MLP 232-32-8, rank 4, gate
    (8, 4), two group features): group LoRA 2 x 1,216, gates 1,900 + 152, output layer 9 = 4,493
    floats per client per round, against 10,209 for FedAvg of the user side (user tables, MLP,
    output layer). The adaptive gate alone is over 20% of that, so no configuration that uploads
    the gate can send 80% less."""
    from fleetrec.datasets.federated import CategoricalField, DatasetSchema
    schema = DatasetSchema(categorical=tuple(CategoricalField(k, v) for k, v in KUAIRAND_ITEM.items()), numeric=(),
                           tasks=("click",),
                           client_categorical=tuple(CategoricalField(k, v) for k, v in KUAIRAND_USER.items()))
    groups = "model.group_features=[follow_user_num_range,register_days_range]"
    cfg = load("configs/fedpa_movielens.yaml", ["model.backbone=", groups])
    bb = _random_backbone(cfg.model, schema, tmp_path / "kr.pt")
    fedpa = _algo_on("", schema, bb, groups)
    assert fedpa.model.widths == [232, 32, 8]
    assert fedpa.upload_floats() == {"group_lora": 2 * ((232 + 32) * 4 + (32 + 8) * 4),
                                     "gate": (232 * 8 + 8 + 8 * 4 + 4) + (32 * 4 + 4 + 4 * 4 + 4), "output_layer": 9}
    assert fedpa.traffic()[0] == 4 * 4493
    full = _algo_on("_fedavg_full", schema, bb, groups).upload_floats()
    assert full == {"user_tables": 8 * sum(KUAIRAND_USER.values()), "backbone_mlp": 232 * 32 + 32 + 32 * 8 + 8,
                    "output_layer": 9}
    assert sum(full.values()) == 10209
    assert fedpa.upload_floats()["gate"] > 0.2 * sum(full.values())
    assert _algo_on("_fedavg_lora", schema, bb).upload_floats() == {"user_lora": (232 + 32) * 4 + (32 + 8) * 4,
                                                                    "output_layer": 9}
    # the option that gets there: a private gate and rank 1 -- group LoRA 2 x ((232 + 32) + (32 + 8)) + 9
    low = _algo_on("", schema, bb, groups, "model.gate_sharing=private", "model.rank=1").upload_floats()
    assert low == {"group_lora": 2 * ((232 + 32) + (32 + 8)), "output_layer": 9}
    assert sum(low.values()) < 0.2 * sum(full.values())


def test_a_private_gate_starts_from_the_models_gate_and_stays_on_the_client(tmp_path):
    bb = _backbone(tmp_path)
    cfg, ds, algo = _setup(f"model.backbone={bb}", "model.gate_sharing=private", "model.gate_init_backbone_logit=4.0")
    gates = [k for k, r in algo.model.roles().items() if k.startswith("gate.")]
    assert gates and all(algo.model.roles()[k] == "private" for k in gates)
    assert "gate" not in algo.upload_floats()
    personal, upd = _round(cfg, ds, algo, algo.init_server())
    named = dict(algo.model.named_parameters())
    for k in gates:                                   # every client starts from the same, the model's gate
        torch.testing.assert_close(personal[k][0], named[k].detach())
        torch.testing.assert_close(personal[k][-1], named[k].detach())
    with pytest.raises(ConfigError, match="model.gate_sharing: only used with model.gate=adaptive"):
        _cfg("model.gate_sharing=private", "model.gate=sum")


@pytest.mark.parametrize("dataset", ["movielens", "epinions"])
def test_upload_floats_on_the_shipped_configs(tmp_path, dataset):
    """The counters on the shipped configs (a random backbone file stands in for stage 1, so the
    roles are those of a real run): exact floats per part, 0 for local and pretrained, and the
    whole-model FedAvg (item tables too) sends over 5x more than FedPA."""
    folder = {"movielens": "movielens-100k", "epinions": "epinions"}[dataset]
    if not (SHARED_DATA / folder).is_dir():
        pytest.skip(f"shared/data/{folder} absent")
    base = load(f"configs/fedpa_{dataset}.yaml", ["model.backbone="])
    schema = base.data.build(base.seed).schema
    bb = _random_backbone(base.model, schema, tmp_path / "bb.pt")

    def up(stem, *extra):
        cfg = load(f"configs/fedpa_{dataset}{stem}.yaml", [f"model.backbone={bb}", *extra])
        return make_algorithm(cfg.algorithm, Setup(schema, 100, cfg.seed, cfg.train, cfg.model)).upload_floats()

    d0 = 8 * (len(schema.client_categorical) + len(schema.categorical))       # user + item fields, dim 8
    G = len(base.model.group_features)
    lora = (d0 + 32) * 4 + (32 + 8) * 4

    def gate(branches):                        # V1, c1, V2, c2 of layers 0 (d0 -> 8) and 1 (32 -> 4)
        return (d0 * 8 + 8 + 8 * branches + branches) + (32 * 4 + 4 + 4 * branches + branches)

    assert up("") == {"group_lora": G * lora, "gate": gate(2 + G), "output_layer": 9}
    assert up("_no_user_lora") == {"group_lora": G * lora, "gate": gate(1 + G), "output_layer": 9}
    assert up("_no_group_lora") == {"gate": gate(2), "output_layer": 9}
    assert up("_no_gate") == {"group_lora": G * lora, "output_layer": 9}
    assert up("_fedavg_lora") == {"user_lora": lora, "output_layer": 9}
    user_tables = 8 * sum(f.vocab for f in schema.client_categorical)
    full = up("_fedavg_full")
    assert full == {"user_tables": user_tables, "backbone_mlp": d0 * 32 + 32 + 32 * 8 + 8, "output_layer": 9}
    assert up("_local") == {} and up("_pretrained") == {}
    whole = sum(up("_fedavg_full", "model.finetune_items=true").values())
    fedpa = sum(up("").values())
    print(f"{dataset}: floats up per client per round: fedpa {fedpa}, fedavg user side {sum(full.values())} "
          f"({1 - fedpa / sum(full.values()):.1%} less), fedavg whole model {whole} ({1 - fedpa / whole:.1%} less)")
    assert fedpa < sum(full.values()) and fedpa * 5 < whole


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_fedpa_configs_load(path):
    from fleetrec.simulator.config_loader import read_yaml
    sized = (read_yaml(path).get("data") or {}).get("name") != "synthetic_per_user"   # it has num_clients instead
    cfg = load(path, ["model.backbone=", "data.max_clients=23" if sized else "data.num_clients=23"])
    assert cfg.model.name == "fedpa" and cfg.algorithm.name == "fedpa"


def test_missing_backbone_is_a_one_line_config_error():
    with pytest.raises(ConfigError) as e:
        load(CONFIGS[0], ["model.backbone=/nonexistent/bb.pt"])
    assert "fleetrec pretrain" in str(e.value) and "\n" not in str(e.value)


def test_pretrain_then_federate_private_clients(ray_session, tmp_path):
    from fleetrec.datasets.partition import open_clients
    from fleetrec.simulator.pretrain import pretrain
    from fleetrec.simulator.run import federated_dataset
    from fleetrec.simulator.run import run
    out = tmp_path / "stage1.pt"
    cfg = _cfg("model.pretrain.epochs=2", "model.pretrain.open_fraction=0.3", "rounds=2")
    path = pretrain(cfg, out)
    tensors, meta = load_backbone(path)
    full = cfg.data.build(cfg.seed)
    opened = open_clients(full.num_clients, 0.3, cfg.seed)
    assert meta["open_clients"] == len(opened) == round(0.3 * full.num_clients)
    assert meta["data_fingerprint"] == full.fingerprint()
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


@pytest.mark.parametrize("stem", ["", "_fedavg_full", "_fedavg_whole"])
def test_traffic_counter_is_what_one_client_contributes(tmp_path, stem):
    """The byte counter against the update a client actually produces: one client trained alone
    contributes every averaged tensor whole and exactly one row of each group tensor (its own
    value); their floats at float32 are `traffic()`'s bytes up."""
    base = load(f"configs/fedpa_movielens{stem}.yaml", ["model.backbone="])
    overrides = [f"model.{k}={v}" for k, v in (("user_lora", base.model.user_lora),
                                              ("group_lora", str(base.model.group_lora).lower()),
                                              ("user_tables", base.model.user_tables),
                                              ("finetune_backbone", str(base.model.finetune_backbone).lower()),
                                              ("finetune_items", str(base.model.finetune_items).lower()))]
    bb = _backbone(tmp_path)
    cfg, ds, algo = _setup(f"model.backbone={bb}", "train.lr=0.05", *overrides)
    state = algo.init_server()
    _, one = _round(cfg, ds, algo, state, np.array([CLIENTS[2]]))
    floats = sum(v.numel() for v in one.acc.sums.values())
    for k, table in one.acc.group_sums.items():
        sent = table.reshape(table.shape[0], -1).ne(0).any(1)
        assert int(sent.sum()) == 1, k                       # the client's own value only
        floats += table[0].numel()
    assert set(one.acc.sums) | set(one.acc.group_sums) == set(algo.global_names + algo.group_names)
    assert floats > 0 and algo.traffic()[0] == 4 * floats == 4 * sum(algo.upload_floats().values())


def test_fedpa_table_script_smoke(ray_session, tmp_path, capsys):
    """benchmarks/fedpa_table.py at a tiny budget on real MovieLens-100k (754 private users, one
    round): stage 1, three methods and a δ sweep whose δ = 0 entry is the noiseless run. The upload
    column comes from the runs' own per-round byte counters, and they show FedPA sending at least 80%
    fewer bytes per client than FedAvg fine-tuning of the whole model, and fewer than FedAvg of the
    user side."""
    if not (SHARED_DATA / "movielens-100k").is_dir():
        pytest.skip("shared/data/movielens-100k absent")
    import importlib.util
    import json
    spec = importlib.util.spec_from_file_location("fedpa_table", Path(__file__).resolve().parents[1]
                                                  / "benchmarks" / "fedpa_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    threads = torch.get_num_threads()
    try:
        assert mod.main(["--datasets", "movielens", "--seeds", "0", "--rounds", "1", "--pretrain-epochs", "1",
                         "--methods", "fedpa,fedavg_full,fedavg_whole", "--ldp", "0,0.5",
                         "--results", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)          # the script pins the driver to one thread
    blob = json.loads((tmp_path / "fedpa_movielens.json").read_text())
    runs = {r["method"]: r for r in blob["runs"]}
    assert set(runs) == {"fedpa", "fedavg_full", "fedavg_whole"}
    assert (tmp_path / "backbones" / "movielens_seed0_backbone.pt").is_file()
    for r in runs.values():
        assert r["bytes_up_per_client_round"] == 4 * r["upload_floats"] and r["client_rounds"] == r["clients"]
        assert 0.4 < r["test/auc"] < 1 and r["best_round"] == 0
    sent = {m: r["bytes_up_total"] / r["client_rounds"] for m, r in runs.items()}
    assert sent["fedpa"] <= 0.2 * sent["fedavg_whole"]
    assert sent["fedpa"] < sent["fedavg_full"] < sent["fedavg_whole"]
    full, whole = runs["fedavg_full"], runs["fedavg_whole"]     # rows touched: own attribute rows (4 fields x 8)
    assert runs["fedpa"]["touched_rows_floats"] is None
    assert full["touched_rows_floats"] == full["upload_floats"] - full["upload_parts"]["user_tables"] + 4 * 8
    assert full["touched_rows_floats"] < whole["touched_rows_floats"] < whole["upload_floats"]
    ldp = {r["delta"]: r for r in json.loads((tmp_path / "fedpa_ldp_movielens.json").read_text())["runs"]}
    assert ldp[0.0]["test/auc"] == runs["fedpa"]["test/auc"] and ldp[0.0]["reused_from"] == "fedpa"
    assert ldp[0.5]["bytes_up_per_client_round"] == runs["fedpa"]["bytes_up_per_client_round"]
    out = capsys.readouterr().out
    saving = 1 - runs["fedpa"]["upload_floats"] / runs["fedavg_whole"]["upload_floats"]
    assert f"FedPA sends {saving:.1%} fewer bytes per client per round than fedavg_whole." in out


def test_stage2_loads_the_backbone_by_mlflow_run_id(tmp_path, monkeypatch):
    """`fleetrec pretrain` with MLflow on logs the backbone and prints its runs:/ URI; a config that
    names that URI as model.backbone gets the same tensors (fetched once into the cache); a wrong
    run id or artifact name is one ConfigError naming model.backbone."""
    from fleetrec.simulator.pretrain import main as pretrain_main
    monkeypatch.chdir(tmp_path)                  # the cache and MLflow's artifact root live in the cwd
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking = ["tracking.mlflow=true", f"tracking.tracking_uri={uri}", "tracking.experiment=t"]
    base = [o for o in tiny_overrides() if not o.startswith(("model.", "tracking."))]
    cfg_file = tmp_path / "exp.yaml"
    cfg_file.write_text("model:\n  name: fedpa\n  group_features: [group_0]\nalgorithm:\n  name: fedpa\n")
    out = tmp_path / "bb.pt"
    assert pretrain_main([str(cfg_file), *base, *tracking, f"model.backbone={out}",
                          "model.pretrain.epochs=1", "model.pretrain.open_fraction=0.3"]) == 0
    tensors, meta = load_backbone(out)
    assert meta["mlflow_uri"].startswith("runs:/") and meta["mlflow_uri"].endswith("/bb.pt")
    cfg = load(cfg_file, [*base, *tracking, f"model.backbone={meta['mlflow_uri']}"])
    local = Path(cfg.model.backbone)
    assert local.is_absolute() and local.is_file() and local != out
    fetched, fetched_meta = load_backbone(local)
    assert fetched_meta == meta and all(torch.equal(fetched[k], v) for k, v in tensors.items())
    assert load(cfg_file, [*base, *tracking, f"model.backbone={meta['mlflow_uri']}"]).model.backbone == str(local)
    run_id = meta["mlflow_uri"].split("/")[1]
    for bad in (f"runs:/{run_id}/missing.pt", "runs:/0123456789abcdef0123456789abcdef/bb.pt", f"runs:/{run_id}"):
        with pytest.raises(ConfigError) as e:
            load(cfg_file, [*base, *tracking, f"model.backbone={bad}"])
        assert "model.backbone" in str(e.value) and "\n" not in str(e.value), bad
    with pytest.raises(ConfigError, match="no MLflow store"):           # and no empty store is created
        load(cfg_file, [*base, "tracking.tracking_uri=sqlite:///nowhere.db", f"model.backbone=runs:/{run_id}/x.pt"])
    assert not (tmp_path / "nowhere.db").exists()


@pytest.mark.parametrize("dataset", ["epinions", "kuairand"])
def test_baseline_configs_change_the_same_keys_on_every_dataset(dataset):
    """Each configs/fedpa_<dataset>_<method>.yaml differs from its dataset's FedPA config in exactly
    the keys (and values) that the MovieLens one differs from fedpa_movielens.yaml: the baselines
    and ablations mean the same thing on every dataset. The KuaiRand ones load like the others."""
    from fleetrec.simulator.config_loader import flatten, read_yaml
    folder = Path(__file__).resolve().parents[1] / "configs"

    def delta(stem: str, suffix: str) -> dict:
        base, var = flatten(read_yaml(folder / f"{stem}.yaml")), flatten(read_yaml(folder / f"{stem}{suffix}.yaml"))
        return {k: var.get(k) for k in set(base) | set(var)
                if k != "name" and not k.startswith("model.pretrain.") and base.get(k) != var.get(k)}

    suffixes = sorted(p.stem[len("fedpa_movielens"):] for p in folder.glob("fedpa_movielens_*.yaml"))
    assert sorted(p.stem[len(f"fedpa_{dataset}"):] for p in folder.glob(f"fedpa_{dataset}_*.yaml")) == suffixes
    for suffix in suffixes:
        assert delta(f"fedpa_{dataset}", suffix) == delta("fedpa_movielens", suffix), suffix
        assert load(folder / f"fedpa_{dataset}{suffix}.yaml", ["model.backbone="]).model.name == "fedpa"


def test_kuairand_open_users_are_fedpas_division(ray_session, tmp_path):
    """configs/fedpa_kuairand.yaml on a tiny folder in the official layout: stage 1 trains on the
    users the data flags `open` (FedPA's division by user_active_degree, not a hash fraction), the
    backbone has the paper's input width (8 x (23 + 6)), and stage 2 federates exactly the others."""
    from fleetrec.simulator.pretrain import load_for_pretrain, pretrain
    from fleetrec.simulator.run import federated_dataset
    from fleetrec.simulator.run import run
    from tests.test_datasets_kuairand_ml1m import write_feature_tables, write_logs
    root = write_feature_tables(write_logs(tmp_path / "kr", 30, 40, rows=(600, 150)), 30, 40, stats=True)
    bb = tmp_path / "bb.pt"
    common = [f"data.path={root}", "data.cache=false", "tracking.mlflow=false", "tracking.progress=false",
              "rounds=1", "resources.cpus_per_worker=0.5"]
    cfg, target = load_for_pretrain("configs/fedpa_kuairand.yaml", [*common, f"model.backbone={bb}",
                                                                    "model.pretrain.epochs=1"])
    full = cfg.data.build(cfg.seed)
    flag = full.client_attr("open")
    assert 0 < flag.sum() < full.num_clients
    tensors, meta = load_backbone(pretrain(cfg, target))
    assert meta["open_attribute"] == "open" and meta["open_clients"] == int(flag.sum())
    assert tensors["w.0"].shape == (32, 8 * 29)
    stage2 = load("configs/fedpa_kuairand.yaml", [*common, f"model.backbone={bb}"])
    ds = federated_dataset(stage2)
    assert ds.num_clients == int((flag == 0).sum()) and (ds.client_attr("open") == 0).all()
    result = run(stage2, dataset=ds)
    assert result.best["val/clients"] == ds.num_clients and result.info["bytes_up_per_client"] == 4 * 4493
    with pytest.raises(DataError, match="open_attribute: the data has no client attribute 'nope'"):
        pretrain(load("configs/fedpa_kuairand.yaml", [*common, "model.backbone=",
                                                       "model.pretrain.open_attribute=nope"]), tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()


def test_client_rate_heuristic_by_hand():
    """The model-free floor every pointwise run reports: each row scored by its client's smoothed
    training positive rate; pooled AUC checked against scikit-learn on the same scores."""
    from sklearn.metrics import roc_auc_score
    from fleetrec.datasets.federated import CLIENT, SPLIT, TEST, TRAIN
    from fleetrec.simulator.ceiling import client_rate_auc
    _, ds, _ = _setup()
    client, split, y = ds.column(CLIENT), ds.column(SPLIT), ds.column("click").astype(float)
    tr = split == TRAIN
    p = y[tr].mean()
    rate = np.array([(y[tr & (client == c)].sum() + p) / ((tr & (client == c)).sum() + 1) for c in range(ds.num_clients)])
    m = split == TEST
    got = client_rate_auc(ds)
    assert got["click/test"] == pytest.approx(roc_auc_score(y[m], rate[client[m]]), abs=1e-9)
    assert got["test"] == got["click/test"] and "val" in got


def test_item_coverage_of_private_test_rows_is_reported_and_warned(tmp_path, capsys):
    """Stage 2's dataset records, per row field, the share of private test rows whose value the open
    clients' rows contain (what the pre-trained backbone has seen); below 50% a warning names the key."""
    from fleetrec.algorithms.models.fedpa import select_open
    from fleetrec.datasets.federated import CLIENT, SPLIT, TEST
    from fleetrec.simulator.run import federated_dataset, open_coverage
    cfg = _cfg()
    ds = cfg.data.build(cfg.seed)
    model = FedPAModel(dataclasses.replace(cfg.model, user_lora="none", group_lora=False), ds.schema)
    meta = {"open_clients": 1, "total_clients": ds.num_clients, "open_fraction": 0.03, "seed": cfg.seed}
    bb = save_backbone(tmp_path / "bb.pt", model.backbone_tensors(), meta)
    opened = select_open(ds, 0.03, cfg.seed)
    private = np.setdiff1d(np.arange(ds.num_clients), opened)
    client, split, item = ds.column(CLIENT), ds.column(SPLIT), ds.column("item_id")
    test = np.isin(client, private) & (split == TEST)
    expect = np.isin(item[test], np.unique(item[np.isin(client, opened)])).mean()
    assert open_coverage(ds, opened, private)["item_id"] == pytest.approx(expect)
    out = federated_dataset(_cfg(f"model.backbone={bb}"))
    assert out.num_clients == len(private) and out.meta["open_item_coverage"]["item_id"] == pytest.approx(expect)
    err = capsys.readouterr().err
    assert (expect < 0.5) == ("model.pretrain.open_fraction: only" in err)


def test_a_backbone_pre_trained_on_other_rows_is_refused(tmp_path):
    """Stage 1 records a fingerprint of the rows it read; stage 2 on other rows with as many clients (a
    synthetic source redrawn by another run seed) is refused naming model.backbone, while the same rows
    under another run seed (data.seed pinned) federate."""
    from fleetrec.datasets.federated import DataError
    from fleetrec.simulator.run import federated_dataset
    cfg = _cfg("data.seed=0")
    ds = cfg.data.build(cfg.seed)
    model = FedPAModel(dataclasses.replace(cfg.model, user_lora="none", group_lora=False), ds.schema)
    meta = {"open_clients": 9, "total_clients": ds.num_clients, "open_fraction": 0.25, "seed": cfg.seed,
            "data_fingerprint": ds.fingerprint()}
    bb = save_backbone(tmp_path / "bb.pt", model.backbone_tensors(), meta)
    assert federated_dataset(_cfg(f"model.backbone={bb}", "data.seed=0", "seed=3")).num_clients == ds.num_clients - 9
    other = _cfg(f"model.backbone={bb}", "seed=3")
    assert other.data.build(other.seed).num_clients == ds.num_clients      # same count: only the rows differ
    with pytest.raises(DataError, match=r"model.backbone: .* was pre-trained on other rows than this data config"):
        federated_dataset(other)


def test_data_hold_out_gives_a_baseline_the_private_clients_of_fedpa(tmp_path):
    """`data.hold_out` with FedPA's open fraction and rule holds out the clients its backbone was
    pre-trained on, so a from-scratch baseline federates (and is tested on) exactly FedPA's rows; a
    hold-out that disagrees with the backbone is refused, naming the key."""
    from fleetrec.simulator.config_loader import ConfigError
    from fleetrec.simulator.run import federated_dataset
    cfg = _cfg()
    ds = cfg.data.build(cfg.seed)
    model = FedPAModel(dataclasses.replace(cfg.model, user_lora="none", group_lora=False), ds.schema)
    for rule in ("random", "most_active"):
        meta = {"open_clients": 9, "total_clients": ds.num_clients, "open_fraction": 0.25, "seed": cfg.seed,
                "open_rule": rule}
        bb = save_backbone(tmp_path / f"bb_{rule}.pt", model.backbone_tensors(), meta)
        fedpa = federated_dataset(_cfg(f"model.backbone={bb}"))
        base = [o for o in tiny_overrides() if not o.startswith("model.")]
        baseline = federated_dataset(from_dict(apply_overrides({}, base + [
            "model.name=fedrap", "data.hold_out.fraction=0.25", f"data.hold_out.rule={rule}"]), "baseline"))
        assert baseline.num_clients == fedpa.num_clients == ds.num_clients - 9
        assert baseline.table.equals(fedpa.table) and baseline.meta["held_out_clients"] == 9
        with pytest.raises(ConfigError, match="data.hold_out: holds out 4 clients, but model.backbone"):
            federated_dataset(_cfg(f"model.backbone={bb}", "data.hold_out.fraction=0.1"))
    from fleetrec.datasets.federated import DataError
    with pytest.raises(ConfigError, match="data.hold_out: set either fraction"):
        _cfg("data.hold_out.fraction=0.2", "data.hold_out.attribute=group_0")
    for frac, what in (("0.001", "holds out no client"), ("1.0", "holds out every client")):
        with pytest.raises(DataError, match=f"data.hold_out: fraction {frac} {what}"):
            federated_dataset(_cfg(f"data.hold_out.fraction={frac}"))


def test_fedrap_personal_and_global_item_parts_and_its_penalty():
    """FedRAP's model: a private additive item table and head, the shared item table C; the local loss
    adds -λ·mean((D−C)²) + μ·mean|C| per row (hand-computed); under fedavg only C is uploaded and
    averaged, and each client scores with its own D_u."""
    from fleetrec.algorithms.models.fedrap import FedRAPModel, FedRAPModelConfig
    from tests.in_process import InProcess
    base = [o for o in tiny_overrides() if not o.startswith("model.")]
    cfg = from_dict(apply_overrides({}, base + ["model.name=fedrap", "model.dim=4", "model.lam=0.5",
                                                "model.mu=0.2", "algorithm.weighting=uniform"]), "fedrap")
    sim = InProcess(cfg)
    assert set(sim.state) == {"item_common"} and set(sim.personal) == {"item_personal", "head.weight", "head.bias"}
    assert sim.client.traffic()[0] == sim.state["item_common"].numel() * 4
    m = FedRAPModel(FedRAPModelConfig(dim=4, lam=0.5, mu=0.2), sim.ds.schema)
    with torch.no_grad():
        m.item_personal.normal_()
    i = torch.tensor([0, 3, 3])
    logits, pen = m({"item_id": i}, torch.zeros(3, 0), {}, penalty=True)
    D, C = m.item_personal[i], m.item_common[i]
    torch.testing.assert_close(pen, -0.5 * ((D - C) ** 2).mean(-1) + 0.2 * C.abs().mean(-1))
    torch.testing.assert_close(logits, m.head(D + C))
    before = {k: v.clone() for k, v in sim.personal.items()}
    sim.round(0)
    moved = (sim.personal["item_personal"] - before["item_personal"]).flatten(1).abs().sum(1)
    assert (moved > 0).all()                                        # every client trained its own D_u
    assert not torch.allclose(sim.personal["head.weight"][0], sim.personal["head.weight"][1])
    with pytest.raises(Exception, match="model.item_field"):
        FedRAPModel(FedRAPModelConfig(item_field="movie"), sim.ds.schema)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_fedrap_trained_as_touched_rows_equals_dense(optimizer):
    """Under fedavg's sparse_rows each client trains only the rows of C and of its own D_u that its
    items touch (gathered, then written back): after two rounds of 2 local epochs every client's
    D_u and head and the server's C equal dense training's."""
    from tests.in_process import InProcess
    base = [o for o in tiny_overrides() if not o.startswith("model.")]
    sims = {}
    for sparse in (True, False):
        cfg = from_dict(apply_overrides({}, base + [
            "model.name=fedrap", "model.dim=4", "model.lam=0.5", "model.mu=0.2", "algorithm.weighting=uniform",
            f"algorithm.sparse_rows={str(sparse).lower()}", f"train.optimizer={optimizer}", "train.local_epochs=2",
            "train.lr=0.05"]), "fedrap")
        sims[sparse] = InProcess(cfg)
        for r in range(2):
            sims[sparse].round(r)
    assert set(sims[True].client._row_vocab(sims[True].view.batch(sims[True].ids[:3], 0))) == {"item_common", "item_personal"}
    assert sims[False].client._row_vocab(sims[False].view.batch(sims[False].ids[:3], 0)) == {}
    for k, v in sims[False].personal.items():
        torch.testing.assert_close(sims[True].personal[k], v, atol=1e-6, rtol=1e-5, msg=lambda m: f"{k}: {m}")
    torch.testing.assert_close(sims[True].state["item_common"], sims[False].state["item_common"], atol=1e-6, rtol=1e-5)
    assert not torch.equal(sims[True].personal["item_personal"], sims[True].client.init_personal(
        torch.from_numpy(sims[True].ids))["item_personal"])                  # it did train
