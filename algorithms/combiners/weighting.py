"""Loss-weighting combiners: the update is a weighted sum of task losses (or gradients).

equal (EW), uncertainty weighting (Kendall et al. 2018), DWA (Liu et al. 2019),
RLW (Lin et al. 2022) and GradNorm (Chen et al. 2018). Each returns (T,) weights; with
`grads` given, the combined gradient is weights @ grads, with `losses` the weighted loss.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from fleetrec.algorithms import rng
from fleetrec.algorithms.combiners.base import (CombineInput, Combined, Combiner, CombinerConfig,
                                                apply_weights, dtype_of, flat)


# ------------------------------------------------------------------------------------ equal
@dataclass(frozen=True)
class EqualConfig(CombinerConfig):
    name: str = "equal"


class Equal(Combiner):
    """Equal weighting: the mean of the task losses / gradients."""
    Config = EqualConfig

    def combine(self, inp: CombineInput) -> Combined:
        return apply_weights(torch.full((self.num_tasks,), 1.0 / self.num_tasks, dtype=dtype_of(inp)), inp)


# ------------------------------------------------------------------------ uncertainty weighting
@dataclass(frozen=True)
class UncertaintyConfig(CombinerConfig):
    name: str = "uncertainty"
    init_log_var: float = 0.0        # starting s_t = log sigma_t^2 for every task


class Uncertainty(Combiner):
    """Kendall et al.: total = sum_t ½·exp(-s_t)·L_t + ½·s_t with learned log-variances s.

    `loss` is differentiable in `log_vars`: backprop it (or add `parameters()` to the optimizer
    and call backward on `loss`) so s is learned; `weights` = ½·exp(-s) are detached.
    """
    HAS_HISTORY = True
    Config = UncertaintyConfig

    def __init__(self, num_tasks: int, config=None, seed: int = 0):
        super().__init__(num_tasks, config, seed)
        self.log_vars = torch.full((num_tasks,), float(self.config.init_log_var), requires_grad=True)

    def combine(self, inp: CombineInput) -> Combined:
        w = 0.5 * torch.exp(-self.log_vars)                                      # (T,)
        out = apply_weights(w, inp)
        if inp.losses is not None:
            out.loss = uncertainty_loss(inp.losses, self.log_vars)
        return out

    def parameters(self) -> list[torch.Tensor]:
        return [self.log_vars]

    def state_dict(self) -> dict:
        return {"log_vars": self.log_vars.detach().clone()}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.log_vars.copy_(state["log_vars"])

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"log_vars": self.log_vars.detach().clone()}

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():                       # in place: an optimizer may hold log_vars
            self.log_vars.copy_(state["log_vars"])


def uncertainty_loss(losses: torch.Tensor, log_vars: torch.Tensor) -> torch.Tensor:
    """sum_t ½·exp(-s_t)·L_t + ½·s_t  (Gaussian likelihood form, s = log sigma^2)."""
    return (0.5 * torch.exp(-log_vars) * losses + 0.5 * log_vars).sum()


# ------------------------------------------------------------------------------------- DWA
@dataclass(frozen=True)
class DWAConfig(CombinerConfig):
    name: str = "dwa"
    temperature: float = 2.0         # softmax temperature over the loss descent rates

    CHECKS: ClassVar[dict] = {"temperature": ">0"}


def dwa_weights(history: torch.Tensor, temperature: float) -> torch.Tensor:
    """(T,) weights from (E, T) per-epoch mean losses: softmax_t((L_t[-1] / L_t[-2]) / temp).

    Uniform before two epochs are recorded. The paper's weights are T times these (sum T);
    dividing by T keeps the mean-scale convention.
    """
    T = history.shape[1]
    if history.shape[0] < 2:
        return torch.full((T,), 1.0 / T, dtype=history.dtype)
    rate = history[-1] / history[-2]                                            # (T,)
    return torch.softmax(rate / temperature, dim=0)


class DWA(Combiner):
    """Dynamic Weight Average. Records the mean loss of every epoch from the losses it is given;
    the weights of epoch e use the recorded means of epochs e-1 and e-2."""
    HAS_HISTORY = True
    Config = DWAConfig

    def __init__(self, num_tasks: int, config=None, seed: int = 0):
        super().__init__(num_tasks, config, seed)
        self.history: list[torch.Tensor] = []         # per finished epoch: (T,) mean loss
        self._epoch, self._sum, self._count = None, torch.zeros(num_tasks, dtype=torch.float64), 0

    def combine(self, inp: CombineInput) -> Combined:
        if inp.losses is None:
            raise ValueError("dwa needs per-task losses")
        if self._epoch is not None and inp.epoch != self._epoch and self._count:
            self.history.append(self._sum / self._count)
            self._sum, self._count = torch.zeros_like(self._sum), 0
        self._epoch = inp.epoch
        self._sum += inp.losses.detach().double().cpu()
        self._count += 1
        hist = torch.stack(self.history[-2:]) if self.history else torch.zeros(0, self.num_tasks)
        return apply_weights(dwa_weights(hist.double(), self.config.temperature).to(dtype_of(inp)), inp)

    def state_dict(self) -> dict:
        return {"history": [h.clone() for h in self.history], "epoch": self._epoch,
                "sum": self._sum.clone(), "count": self._count}

    def load_state_dict(self, state: dict) -> None:
        self.history = [h.clone() for h in state["history"]]
        self._epoch, self._sum, self._count = state["epoch"], state["sum"].clone(), state["count"]

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The last two epoch means (all the weights read), how many there are, the running epoch
        (-1 before the first call) and its loss sum and count."""
        T = self.num_tasks
        last = torch.zeros(2, T, dtype=torch.float64)
        n = min(2, len(self.history))
        if n:
            last[2 - n:] = torch.stack(self.history[-n:]).double()
        return {"history": last, "history_len": torch.tensor(float(n), dtype=torch.float64),
                "epoch": torch.tensor(float(-1 if self._epoch is None else self._epoch), dtype=torch.float64),
                "sum": self._sum.clone(), "count": torch.tensor(float(self._count), dtype=torch.float64)}

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        n = int(state["history_len"])
        self.history = [h.clone() for h in state["history"][2 - n:]] if n else []
        epoch = int(state["epoch"])
        self._epoch = None if epoch < 0 else epoch
        self._sum, self._count = state["sum"].double().clone(), int(state["count"])


# ------------------------------------------------------------------------------------- RLW
@dataclass(frozen=True)
class RLWConfig(CombinerConfig):
    name: str = "rlw"


class RLW(Combiner):
    """Random loss weighting: softmax of standard-normal draws, a pure function of (seed, step)."""
    Config = RLWConfig

    def combine(self, inp: CombineInput) -> Combined:
        z = torch.randn(self.num_tasks, generator=rng.torch_generator(self.seed, rng.RLW, inp.step))
        return apply_weights(torch.softmax(z, dim=0).to(dtype_of(inp)), inp)


# -------------------------------------------------------------------------------- GradNorm
@dataclass(frozen=True)
class GradNormConfig(CombinerConfig):
    name: str = "gradnorm"
    alpha: float = 1.5               # restoring-force strength (paper's alpha)
    lr: float = 0.025                # step size of the weights' own optimizer (the paper's weight lr)
    optimizer: str = "adam"          # adam: the weights' own Adam (scale-free step ~lr) | sgd: w -= lr * dL_grad/dw
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    CHECKS: ClassVar[dict] = {"alpha": ">=0", "lr": ">0", "optimizer": ("adam", "sgd"),
                              "beta1": "0..0.9999", "beta2": "0..0.9999", "eps": ">0"}


class GradNorm(Combiner):
    """GradNorm (Chen et al. 2018). `grads` must be the per-task gradients of the LAST SHARED LAYER,
    `losses` the per-task losses. Returns the current weights (w / T, so they sum to one), then
    takes one step of the weights' own optimizer on

        L_grad = sum_t | w_t·||g_t|| - mean_s(w_s·||g_s||) · r_t^alpha |,   r_t = (L_t/L_t(0)) / mean

    with the target held constant, and renormalises w to sum to T, as in the paper. The paper
    (and LibMTL) give the weights an optimizer of their own, separate from the model's; with
    plain SGD the step is lr·||g_t||, which for embedding-row gradients (||g|| ~ 1e-4) does not
    move the weights at all, so the default is Adam (step ~ lr whatever the gradient scale).
    For the full shared gradient, backprop the returned `loss`.
    """
    HAS_HISTORY = True
    Config = GradNormConfig
    needs_grads = True

    def __init__(self, num_tasks: int, config=None, seed: int = 0):
        super().__init__(num_tasks, config, seed)
        self.w = torch.ones(num_tasks, dtype=torch.float64)
        self.initial_losses: torch.Tensor | None = None
        self.m = torch.zeros(num_tasks, dtype=torch.float64)     # Adam moments of the weights
        self.v = torch.zeros(num_tasks, dtype=torch.float64)
        self.t = 0

    def combine(self, inp: CombineInput) -> Combined:
        if inp.losses is None or inp.grads is None:
            raise ValueError("gradnorm needs losses and last-shared-layer grads")
        losses = inp.losses.detach().double().cpu()
        if self.initial_losses is None:
            self.initial_losses = losses.clone()
        out = apply_weights((self.w / self.num_tasks).to(dtype_of(inp)), inp)
        norms = flat(inp.grads).detach().double().norm(dim=1).cpu()
        g = gradnorm_weight_grad(self.w, norms, losses / self.initial_losses, self.config.alpha)
        c = self.config
        if c.optimizer == "sgd":
            w = self.w - c.lr * g
        else:
            self.t += 1
            self.m = c.beta1 * self.m + (1 - c.beta1) * g
            self.v = c.beta2 * self.v + (1 - c.beta2) * g * g
            m_hat, v_hat = self.m / (1 - c.beta1 ** self.t), self.v / (1 - c.beta2 ** self.t)
            w = self.w - c.lr * m_hat / (v_hat.sqrt() + c.eps)
        self.w = renormalize(w)
        return out

    def state_dict(self) -> dict:
        return {"w": self.w.clone(), "initial_losses": self.initial_losses, "m": self.m.clone(),
                "v": self.v.clone(), "t": self.t}

    def load_state_dict(self, state: dict) -> None:
        self.w, self.initial_losses = state["w"].clone(), state["initial_losses"]
        self.m, self.v, self.t = state["m"].clone(), state["v"].clone(), int(state["t"])

    def state_tensors(self) -> dict[str, torch.Tensor]:
        have = self.initial_losses is not None
        return {"w": self.w.clone(),
                "initial_losses": self.initial_losses.clone() if have else torch.zeros(self.num_tasks, dtype=torch.float64),
                "has_initial": torch.tensor(float(have), dtype=torch.float64),
                "m": self.m.clone(), "v": self.v.clone(), "t": torch.tensor(float(self.t), dtype=torch.float64)}

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        self.w = state["w"].double().clone()
        self.initial_losses = state["initial_losses"].double().clone() if float(state["has_initial"]) else None
        self.m, self.v, self.t = state["m"].double().clone(), state["v"].double().clone(), int(state["t"])


def gradnorm_weight_grad(w: torch.Tensor, norms: torch.Tensor, loss_ratio: torch.Tensor, alpha: float) -> torch.Tensor:
    """dL_grad/dw (T,) with the target held constant; norms = ||grad_W L_t|| (unweighted)."""
    G = w * norms                                                               # (T,) weighted grad norms
    r = loss_ratio / loss_ratio.mean()                                          # (T,) relative inverse rate
    target = G.mean() * r ** alpha                                              # (T,) held constant
    return torch.sign(G - target) * norms                                       # d|G_t - c_t|/dw_t


def renormalize(w: torch.Tensor) -> torch.Tensor:
    """Positive weights summing to T (the paper's renormalisation after every step)."""
    w = w.clamp_min(1e-6)
    return w * (w.numel() / w.sum())


def gradnorm_step(w: torch.Tensor, norms: torch.Tensor, loss_ratio: torch.Tensor,
                  alpha: float, lr: float) -> torch.Tensor:
    """One plain-SGD GradNorm update of (T,) weights summing to T (`optimizer: sgd`)."""
    return renormalize(w - lr * gradnorm_weight_grad(w, norms, loss_ratio, alpha))
