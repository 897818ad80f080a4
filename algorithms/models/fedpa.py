"""FedPA's model: a pre-trained feature-embedding MLP adapted by user-level and group-level LoRA.

Written for one client's rows (vmapped over a cohort). There are no ID embeddings: the user
vector concatenates embeddings of the client's attributes (e.g. age_group, occupation), the
item vector concatenates embeddings of the row's categorical fields. Per layer l with input x:

    x' = g[0] * ReLU(W_l x + b_l) + g[1] * s * x A_u B_u + sum_f g[1+f] * s * x A_{f,v_f} B_{f,v_f}
    g  = softmax(V2 ReLU(V1 x + c1) + c2)   (gate "adaptive"; "equal": 1/G each; "sum": 1 each)

with s = lora_alpha / rank, (A_u, B_u) private to the client and (A_{f,v}, B_{f,v}) shared by
the clients whose attribute f equals v. The logit is w_o x_L + b_o. Backbone tensors (feature
tables, W_l, b_l, w_o, b_o) come from the stage-1 file `backbone`.

A group LoRA parameter here is the client's own row, shape (d_in, r) or (r, d_out); the
algorithm keeps the server table (V_f, ...) and hands each client its row (`group_params`).
"""
from __future__ import annotations

import json
import math
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fleetrec.algorithms.models.base import ModelConfig, RoleModule
from fleetrec.algorithms.protocol import FROZEN, GROUP, PRIVATE, SHARED, Tensors
from fleetrec.datasets.federated import DataError, DatasetSchema, FederatedDataset
from fleetrec.datasets.partition import select_open


@dataclass(frozen=True)
class PretrainConfig:
    """Stage 1 (`fleetrec pretrain CONFIG`): central training of the backbone on open clients."""
    open_fraction: float = 0.2        # share of clients (seeded hash order) that are open; the rest federate
    open_attribute: str = ""          # instead: the clients whose 0/1 client attribute is 1 are open (KuaiRand's
                                      # `open`: FedPA's division by user_active_degree); "" = open_fraction
    open_rule: str = "random"         # with open_fraction: random (seeded hash order) | most_active (the clients
                                      # with the most rows, as FedPA's official code: the private ones are sparse)
    epochs: int = 100                 # passes over the open clients' rows
    lr: float = 1e-3                  # Adam learning rate
    batch_size: int = 1024
    weight_decay: float = 0.0
    rows: str = "all"                 # all: every row of an open client (official code); train: its train split
    select: str = "train_auc"         # epoch kept: train_auc (best AUC on the rows trained on, official code) |
                                      # open_val_auc (best AUC on the open clients' validation rows; needs rows: train) | last

    CHECKS: ClassVar[dict] = {"open_fraction": "0..1", "epochs": ">=1", "lr": ">0", "batch_size": ">=1",
                              "weight_decay": ">=0", "rows": ("all", "train"), "open_rule": ("random", "most_active"),
                              "select": ("train_auc", "open_val_auc", "last")}

    def validate(self) -> str | None:
        if self.open_attribute and self.open_rule != "random":
            return "model.pretrain.open_rule: only used with open_fraction (open_attribute names the open clients)"
        if self.select == "open_val_auc" and self.rows != "train":
            return "model.pretrain.select: open_val_auc needs rows: train (else the validation rows are trained on)"
        return None


@dataclass(frozen=True)
class FedPAModelConfig(ModelConfig):
    name: str = "fedpa"
    backbone: str = ""                     # stage-1 file (.pt or .npz); "" = random init, everything trains (tests only)
    dim: int = 8                           # width of every feature embedding
    layers: tuple[int, ...] = (32, 8)      # hidden widths of the backbone MLP
    user_features: tuple[str, ...] = ()    # client attributes forming the user vector; () = all of them
    item_features: tuple[str, ...] = ()    # row categorical fields forming the item vector; () = all of them
    group_features: tuple[str, ...] = ()   # client attributes with a group-level LoRA per value
    rank: int = 4                          # LoRA rank r
    lora_alpha: float = 1.0                # LoRA scale s = lora_alpha / rank
    lora_init: str = "standard"            # standard: A ~ N(0, 1/r), B = 0; zeros: A = B = 0 (official code: adapters never move)
    user_lora: str = "private"             # private | shared (one LoRA averaged over clients) | none
    group_lora: bool = True                # group-level LoRA branches (needs group_features)
    gate: str = "adaptive"                 # adaptive: softmax gate MLP | equal: fixed weights 1/G | sum: weights 1
    gate_hidden: tuple[int, ...] = (8, 4)  # gate MLP width per layer (one entry per backbone layer)
    # adaptive gate at init: last layer zero, bias [b, 0, ...], so the backbone branch starts with weight
    # e^b / (e^b + G - 1) (b = 4, G = 4: 0.948); null = PyTorch's default init, as the official code
    # (~1/G per branch: the frozen backbone is scaled by ~1/4 at the start)
    gate_init_backbone_logit: float | None = None
    # the adaptive gate's MLPs: shared (averaged over the cohort, uploaded: the paper) | private (each
    # client keeps its own, nothing of the gate is sent -- with rank 1 the upload drops below 20% of
    # user-side FedAvg's, which the shared gate alone makes impossible: algorithms/FEDPA.md)
    gate_sharing: str = "shared"
    train_output_layer: bool = True        # output layer trained and averaged (code) or frozen (paper text)
    user_tables: str = "private"           # user attribute embeddings: private (FedPA) | shared (FedAvg) | frozen
    user_vector: bool = False              # an extra private vector added to the user representation (starts at 0)
    finetune_backbone: bool = False        # train and average W_l, b_l too (FedAvg full fine-tuning baseline)
    finetune_items: bool = False           # train and average the item feature tables too
    init_std: float = 0.1                  # std of the feature tables when there is no backbone file
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)

    CHECKS: ClassVar[dict] = {"dim": ">=1", "rank": ">=1", "lora_alpha": ">0", "init_std": ">=0",
                              "layers": ">=1", "gate_hidden": ">=1", "lora_init": ("standard", "zeros"), "user_lora": ("private", "shared", "none"),
                              "gate": ("adaptive", "equal", "sum"), "user_tables": ("private", "shared", "frozen"),
                              "gate_sharing": ("shared", "private")}

    def validate(self) -> str | None:
        if not self.layers or min(self.layers) < 1:
            return "model.layers: expected at least one positive width"
        if self.gate_init_backbone_logit is not None and self.gate != "adaptive":
            return (f"model.gate_init_backbone_logit: only used with model.gate=adaptive (got gate={self.gate!r}); "
                    "set it to null")
        if self.gate_sharing != "shared" and self.gate != "adaptive":
            return (f"model.gate_sharing: only used with model.gate=adaptive (got gate={self.gate!r}: no gate "
                    "parameters); set it to shared")
        if self.gate == "adaptive" and len(self.gate_hidden) != len(self.layers):
            return (f"model.gate_hidden: got {len(self.gate_hidden)} widths, expected one per layer "
                    f"({len(self.layers)})")
        if self.backbone and not Path(self.backbone).is_file():
            return (f"model.backbone: file {self.backbone!r} not found; create it with "
                    "`fleetrec pretrain CONFIG` or set model.backbone= (random init, tests only)")
        return None

    def pretrained_clients(self, ds: FederatedDataset) -> np.ndarray | None:
        """The open clients the backbone file was pre-trained on (its meta names the draw), which
        stage 2 holds out of the federation; None without a backbone or open clients."""
        if not self.backbone:
            return None
        _, meta = load_backbone(self.backbone)
        if not meta.get("open_clients"):
            return None
        if meta["total_clients"] != ds.num_clients:
            raise DataError(f"model.backbone: pre-trained on a dataset of {meta['total_clients']} clients, this "
                            f"data config builds {ds.num_clients}; pre-train with the same data config")
        then = meta.get("data_fingerprint")        # backbones written before it was recorded are not checked
        now = ds.fingerprint() if then else None
        if then and then != now:
            raise DataError(f"model.backbone: {self.backbone} was pre-trained on other rows than this data config "
                            f"builds (data fingerprint {then} then, {now} now); pre-train with the "
                            "same data config (a synthetic source draws new rows for every seed unless data.seed "
                            "is set)")
        return select_open(ds, meta["open_fraction"], meta["seed"], meta.get("open_attribute", ""),
                           meta.get("open_rule", "random"))

    @property
    def scale(self) -> float:
        return self.lora_alpha / self.rank


# ---------------------------------------------------------------------------- backbone files
def save_backbone(path: str | Path, tensors: Tensors, meta: dict) -> Path:
    """Write backbone tensors (+ JSON-able meta) as .pt (torch.save) or .npz."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.suffix == ".npz":
        arrays = {k: v.detach().cpu().numpy() for k, v in tensors.items()}
        np.savez(p, __meta__=np.array(json.dumps(meta)), **arrays)
    else:
        torch.save({"tensors": {k: v.detach().cpu() for k, v in tensors.items()}, "meta": meta}, p)
    return p


def load_backbone(path: str | Path) -> tuple[Tensors, dict]:
    """(tensors, meta) of a file `save_backbone` wrote; a file that is not one (damaged, empty, another
    format) is a DataError naming it."""
    p = Path(path)
    try:
        if p.suffix == ".npz":
            z = np.load(p, allow_pickle=False)
            meta = json.loads(str(z["__meta__"])) if "__meta__" in z else {}
            return {k: torch.from_numpy(np.array(z[k], dtype=np.float32)) for k in z.files if k != "__meta__"}, meta
        blob = torch.load(p, map_location="cpu", weights_only=True)
        return {k: v.float() for k, v in blob["tensors"].items()}, dict(blob.get("meta", {}))
    except (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError, RuntimeError,
            pickle.UnpicklingError, zipfile.BadZipFile) as e:
        raise DataError(f"model.backbone: cannot read {p} as a backbone file written by `fleetrec pretrain` "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else 'empty'})") from None


class FedPAModel(RoleModule):
    Config = FedPAModelConfig
    def __init__(self, cfg: FedPAModelConfig, schema: DatasetSchema):
        super().__init__()
        self.cfg = cfg
        attrs = {f.name: f.vocab for f in schema.client_categorical}
        rows = {f.name: f.vocab for f in schema.categorical}
        self.user_feats = list(cfg.user_features) or list(attrs)
        self.item_feats = list(cfg.item_features) or list(rows)
        self.group_feats = list(cfg.group_features) if cfg.group_lora else []
        for names, known, what in ((self.user_feats, attrs, "user_features"), (self.group_feats, attrs, "group_features"),
                                   (self.item_feats, rows, "item_features")):
            bad = [n for n in names if n not in known]
            if bad:
                raise ValueError(f"model.{what}: {bad[0]!r} is not in the dataset (has {', '.join(known)})")
        self.group_vocab = {f: attrs[f] for f in self.group_feats}
        d, r = cfg.dim, cfg.rank
        self.user = nn.ParameterDict({f: nn.Parameter(torch.randn(attrs[f], d) * cfg.init_std) for f in self.user_feats})
        self.item = nn.ParameterDict({f: nn.Parameter(torch.randn(rows[f], d) * cfg.init_std) for f in self.item_feats})
        widths = [d * (len(self.user_feats) + len(self.item_feats)), *cfg.layers]
        self.widths = widths
        self.w = nn.ParameterList()
        self.b = nn.ParameterList()
        for din, dout in zip(widths[:-1], widths[1:]):
            lin = nn.Linear(din, dout)
            self.w.append(nn.Parameter(lin.weight.detach().clone()))
            self.b.append(nn.Parameter(lin.bias.detach().clone()))
        head = nn.Linear(widths[-1], len(schema.tasks))
        self.out_w = nn.Parameter(head.weight.detach().clone())           # (T, d_L)
        self.out_b = nn.Parameter(head.bias.detach().clone())             # (T,)
        self.user_vec = nn.Parameter(torch.zeros(d * len(self.user_feats))) if cfg.user_vector else None
        L = len(cfg.layers)
        self.lora = nn.ParameterDict()      # user LoRA: ua{l} (d_in, r), ub{l} (r, d_out)
        self.group = nn.ParameterDict()     # group LoRA rows: g{l}_{f}_a (d_in, r), g{l}_{f}_b (r, d_out)
        self.group_params: dict[str, str] = {}    # full parameter name -> group feature
        for l in range(L):
            din, dout = widths[l], widths[l + 1]
            if cfg.user_lora != "none":
                self.lora[f"ua{l}"] = nn.Parameter(self._lora_a(din))
                self.lora[f"ub{l}"] = nn.Parameter(torch.zeros(r, dout))
            for f in self.group_feats:
                self.group[f"g{l}_{f}_a"] = nn.Parameter(torch.zeros(din, r))
                self.group[f"g{l}_{f}_b"] = nn.Parameter(torch.zeros(r, dout))
                self.group_params[f"group.g{l}_{f}_a"] = f
                self.group_params[f"group.g{l}_{f}_b"] = f
        self.n_branches = 1 + (cfg.user_lora != "none") + len(self.group_feats)
        self.gate = nn.ModuleList()
        if cfg.gate == "adaptive" and self.n_branches > 1:
            for l in range(L):
                h = cfg.gate_hidden[l]
                self.gate.append(nn.Sequential(nn.Linear(widths[l], h), nn.ReLU(), nn.Linear(h, self.n_branches)))
                if cfg.gate_init_backbone_logit is not None:    # backbone branch (index 0) weighted by the flag
                    with torch.no_grad():
                        self.gate[-1][2].weight.zero_()
                        self.gate[-1][2].bias.zero_()
                        self.gate[-1][2].bias[0] = cfg.gate_init_backbone_logit
        self.backbone_meta: dict = {}
        if cfg.backbone:
            self._load(cfg.backbone)

    def _lora_a(self, din: int, generator: torch.Generator | None = None, n: int | None = None) -> torch.Tensor:
        shape = (din, self.cfg.rank) if n is None else (n, din, self.cfg.rank)
        if self.cfg.lora_init == "zeros":
            return torch.zeros(shape)
        return torch.randn(shape, generator=generator) / math.sqrt(self.cfg.rank)

    def backbone_names(self) -> list[str]:
        names = [f"user.{f}" for f in self.user_feats] + [f"item.{f}" for f in self.item_feats]
        names += [f"w.{l}" for l in range(len(self.w))] + [f"b.{l}" for l in range(len(self.b))]
        return names + ["out_w", "out_b"]

    def backbone_tensors(self) -> Tensors:
        named = dict(self.named_parameters())
        return {k: named[k].detach().clone() for k in self.backbone_names()}

    def _load(self, path: str) -> None:
        tensors, meta = load_backbone(path)
        named = dict(self.named_parameters())
        for k in self.backbone_names():
            if k not in tensors:
                raise ValueError(f"model.backbone: {path} has no tensor {k!r}; pre-train with the same model config")
            if tuple(tensors[k].shape) != tuple(named[k].shape):
                raise ValueError(f"model.backbone: {path} tensor {k!r} has shape {tuple(tensors[k].shape)}, this "
                                 f"dataset and config need {tuple(named[k].shape)}; pre-train on the same data config")
            with torch.no_grad():
                named[k].copy_(tensors[k])
        self.backbone_meta = meta

    # ---- roles and state
    def roles(self) -> dict[str, str]:
        cfg = self.cfg
        pre = bool(cfg.backbone)       # no backbone file: everything trains (tests only)
        out = {}
        for name, _ in self.named_parameters():
            if name.startswith("user."):
                role = {"private": PRIVATE, "shared": SHARED, "frozen": FROZEN}[cfg.user_tables]
                out[name] = SHARED if role == FROZEN and not pre else role
            elif name.startswith("item."):
                out[name] = SHARED if cfg.finetune_items or not pre else FROZEN
            elif name.startswith(("w.", "b.")):
                out[name] = SHARED if cfg.finetune_backbone or not pre else FROZEN
            elif name.startswith("out_"):
                out[name] = SHARED if cfg.train_output_layer or not pre else FROZEN
            elif name.startswith("lora."):
                out[name] = PRIVATE if cfg.user_lora == "private" else SHARED
            elif name.startswith("group."):
                out[name] = GROUP
            elif name == "user_vec":
                out[name] = PRIVATE
            else:                       # gate MLPs
                out[name] = PRIVATE if cfg.gate_sharing == "private" else SHARED
        return out

    def init_private(self, normal: callable, client_ids: torch.Tensor) -> Tensors:
        """Fresh private tensors for K clients; `normal(shape_tail)` draws (K, *shape_tail).
        User LoRA A gets one draw per client (one call, so no two tensors share draws)."""
        roles, named = self.roles(), dict(self.named_parameters())
        out = {k: None for k, r in roles.items() if r == PRIVATE}
        a_names = [k for k in out if k.startswith("lora.ua")]
        if a_names and self.cfg.lora_init == "standard":
            sizes = [named[k].numel() for k in a_names]
            z = normal((sum(sizes),)) / math.sqrt(self.cfg.rank)                 # (K, sum)
            for k, part in zip(a_names, torch.split(z, sizes, dim=1)):
                out[k] = part.reshape(-1, *named[k].shape).contiguous()
        K = int(client_ids.shape[0]) if client_ids is not None else normal((1,)).shape[0]
        for k in out:
            if out[k] is None:         # tables (and a private gate) start from the model's, B and user_vec from zero
                v = named[k].detach()
                out[k] = (v.expand(K, *v.shape).clone() if k.startswith(("user.", "gate.")) else
                          torch.zeros(K, *v.shape))
        return out

    def init_group_tables(self, seed: int) -> Tensors:
        """Server tables (V_f, ...) of every group LoRA parameter: A rows ~ N(0, 1/r), B = 0."""
        g = torch.Generator().manual_seed(int(seed))
        named, out = dict(self.named_parameters()), {}
        for k, f in self.group_params.items():
            V, shape = self.group_vocab[f], named[k].shape
            out[k] = self._lora_a(shape[0], g, V) if k.endswith("_a") else torch.zeros(V, *shape)
        return out

    # ---- forward
    def _gate(self, l: int, x: torch.Tensor) -> torch.Tensor | float:
        if self.n_branches == 1 or self.cfg.gate == "sum":
            return 1.0
        if self.cfg.gate == "equal":
            return 1.0 / self.n_branches
        return torch.softmax(self.gate[l](x), dim=-1)                         # (B, G)

    def forward(self, categorical: Tensors, numeric: torch.Tensor, attrs: Tensors) -> torch.Tensor:
        # categorical: name -> (B,) ; attrs: name -> () for one client or (B,) for pooled rows
        iv = torch.cat([F.embedding(categorical[f], self.item[f]) for f in self.item_feats], -1)   # (B, n_i*d)
        B = iv.shape[0]
        u = torch.cat([F.embedding(attrs[f].reshape(-1), self.user[f]) for f in self.user_feats], -1)  # (1|B, n_u*d)
        if self.user_vec is not None:
            u = u + self.user_vec
        x = torch.cat([u.expand(B, u.shape[-1]), iv], -1)                      # (B, d_0)
        s = self.cfg.scale
        for l in range(len(self.w)):
            branches = [torch.relu(F.linear(x, self.w[l], self.b[l]))]         # (B, d_{l+1})
            if self.cfg.user_lora != "none":
                branches.append(s * (x @ self.lora[f"ua{l}"]) @ self.lora[f"ub{l}"])
            for f in self.group_feats:
                branches.append(s * (x @ self.group[f"g{l}_{f}_a"]) @ self.group[f"g{l}_{f}_b"])
            gate = self._gate(l, x)
            if isinstance(gate, float):
                x = gate * sum(branches) if len(branches) > 1 else branches[0]
            else:
                x = sum(gate[:, i:i + 1] * br for i, br in enumerate(branches))   # (B, d_{l+1})
        return F.linear(x, self.out_w, self.out_b)                              # (B, T)
