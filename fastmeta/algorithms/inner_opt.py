"""Inner-loop optimisers beyond plain SGD, differentiable to any order: `SGD` with momentum (and Nesterov) and
`Adam`, with torch.optim's argument names, defaults and update rules, each task with its own state.

    out = fastmeta.maml_step(model, batch, inner_lr=0.01, inner_steps=5, inner_opt=fastmeta.Adam())

Every inner step updates every adapted tensor of every task, and its state, in a few calls of the fused
`fastmeta.ops.fast_weight_update` (new = decay * p - lr * g over all tensors and tasks at once; its exact first
and second derivatives are the kernel's): SGD with momentum takes two (the buffer, the weights), Nesterov three,
Adam three plus a few elementwise ops a tensor for its denominator. `fastmeta.reference.sgd_update` and
`adam_update` are the definitions they are tested against. A learned `inner_lr` (Meta-SGD's per-element rates,
MAML++'s LSLR) is the step size, as torch.optim's lr.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from fastmeta import ops
from fastmeta.reference import safe_sqrt

__all__ = ["SGD", "Adam", "InnerOptimizer", "InnerState", "inner_opt_of", "INNER_OPTS"]

LearningRate = float | list[Tensor]


class InnerState:
    """Each task's optimiser state through an inner loop: `tensors`, lists of per-parameter tensors (S_i shared
    zeros before the first step, (T, *S_i) after), replaced at every step."""

    def __init__(self, tensors: list[list[Tensor]]) -> None:
        self.tensors = tensors


class InnerOptimizer:
    """An inner-loop update rule: `init` the state for the initial weights, `step` one update of all tasks."""

    def init(self, params: list[Tensor]) -> InnerState | None:
        """The state before the first step (None: the rule keeps none)."""
        raise NotImplementedError

    def step(
        self, fast: list[Tensor], grads: list[Tensor], lr: LearningRate, state: InnerState | None, s: int
    ) -> list[Tensor]:
        """Step `s` (0-based) from `fast` (S_i shared or (T, *S_i)) with the tasks' gradients (T, *S_i): the new
        fast weights (T, *S_i); `state` is advanced in place."""
        raise NotImplementedError


def _check(name: str, value: object, lo: float, hi: float | None = None, closed: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < lo or (hi is not None and (value >= hi if not closed else value > hi)):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}{']' if closed else ')'}"
        raise ValueError(f"{name} must be {bound}, got {value!r}")
    return float(value)


def _with_decay(fast: list[Tensor], grads: list[Tensor], weight_decay: float) -> list[Tensor]:
    """grads + weight_decay * fast (L2 regularisation, as torch.optim's weight_decay), in one fused call."""
    if not weight_decay:
        return grads
    return ops.fast_weight_update(grads, [p.expand_as(g) for p, g in zip(fast, grads)], -weight_decay)


def _scaled(lr: LearningRate, scale: float) -> LearningRate:
    return lr * scale if isinstance(lr, (int, float)) else [r * scale for r in lr]


@dataclass(frozen=True)
class SGD(InnerOptimizer):
    """torch.optim.SGD's update (dampening 0) in the inner loop: with momentum, buf = momentum * buf + d and
    the step is lr * buf (lr * (d + momentum * buf) with nesterov), d = grad + weight_decay * weights. The
    default (no momentum, no decay) is maml_step's plain inner step."""

    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        _check("SGD: momentum", self.momentum, 0.0)
        _check("SGD: weight_decay", self.weight_decay, 0.0)
        if not isinstance(self.nesterov, bool):
            raise ValueError(f"SGD: nesterov must be a bool, got {self.nesterov!r}")
        if self.nesterov and self.momentum == 0:
            raise ValueError("SGD: nesterov needs a momentum > 0 (as torch.optim.SGD)")

    def init(self, params: list[Tensor]) -> InnerState | None:
        return InnerState([[torch.zeros_like(p) for p in params]]) if self.momentum else None

    def step(
        self, fast: list[Tensor], grads: list[Tensor], lr: LearningRate, state: InnerState | None, s: int
    ) -> list[Tensor]:
        d = _with_decay(fast, grads, self.weight_decay)
        if self.momentum:
            (bufs,) = state.tensors
            bufs = ops.fast_weight_update(bufs, d, -1.0, self.momentum)  # momentum * buf + d
            state.tensors = [bufs]
            d = ops.fast_weight_update(d, bufs, -self.momentum) if self.nesterov else bufs
        return ops.fast_weight_update(fast, d, lr)


@dataclass(frozen=True)
class Adam(InnerOptimizer):
    """torch.optim.Adam's update (not amsgrad) in the inner loop, each task with its own first and second
    moments (zero before its first step) and bias corrections by step: the step is
    lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps), t = 1, 2, ... The square root's derivative is 0
    where v is exactly 0 (a gradient element that is 0 at every step so far), where torch's is infinite."""

    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.betas, (tuple, list)) or len(self.betas) != 2:
            raise ValueError(f"Adam: betas must be a pair (beta1, beta2), got {self.betas!r}")
        for i, b in enumerate(self.betas):
            _check(f"Adam: betas[{i}]", b, 0.0, 1.0, closed=False)
        object.__setattr__(self, "betas", (float(self.betas[0]), float(self.betas[1])))
        _check("Adam: eps", self.eps, 0.0)
        _check("Adam: weight_decay", self.weight_decay, 0.0)

    def init(self, params: list[Tensor]) -> InnerState:
        return InnerState([[torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]])

    def step(
        self, fast: list[Tensor], grads: list[Tensor], lr: LearningRate, state: InnerState | None, s: int
    ) -> list[Tensor]:
        b1, b2 = self.betas
        t = s + 1
        d = _with_decay(fast, grads, self.weight_decay)
        m, v = state.tensors
        m = ops.fast_weight_update(m, d, -(1 - b1), b1)
        v = ops.fast_weight_update(v, [g * g for g in d], -(1 - b2), b2)
        state.tensors = [m, v]
        root = 1 / math.sqrt(1 - b2**t)
        direction = [mi / (safe_sqrt(vi) * root + self.eps) for mi, vi in zip(m, v)]
        return ops.fast_weight_update(fast, direction, _scaled(lr, 1 / (1 - b1**t)))


# The command line's --inner-opt: torch.optim's defaults, momentum 0.9 for "momentum".
INNER_OPTS = {"sgd": SGD(), "momentum": SGD(momentum=0.9), "adam": Adam()}


def inner_opt_of(name: str) -> InnerOptimizer:
    """The inner optimiser `--inner-opt name` names (sgd, momentum or adam)."""
    if name not in INNER_OPTS:
        raise ValueError(f"inner_opt must be one of {', '.join(INNER_OPTS)}, got {name!r}")
    return INNER_OPTS[name]
