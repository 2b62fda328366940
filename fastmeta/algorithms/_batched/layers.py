"""The layers: modules with parameters, each run for T tasks at once with each task's own (or the shared) weights.

`LAYERS` maps a module type (exactly: subclasses are not matched) to the `_Layer` subclass that runs it; the
tracer keeps modules of those types whole, and the planner (plan.py) looks each `call_module` node's module up
there. A torch.nn module with parameters or buffers that is not in `LAYERS` (or that its layer's `accepts`
refuses) has no task-batched form: the model then runs under vmap or in a per-task loop (runners.py). To add a
layer type, write a `_Layer` subclass here and register it:

    @register_layer(nn.Bilinear)
    class _Bilinear(_Layer):
        def __call__(self, x, params, T, twice): ...   # x: the input of all T tasks, in any layout (layout.py)

Parameters: `params[self.prefix + "weight"]` is the shared tensor of the module's shape S, or a per-task
(T, *S) one; `_per_task`, `_split` and `_grouped_param` tell and reshape them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastmeta.algorithms import _conv, _norm
from fastmeta.algorithms._batched.layout import (
    Activation,
    Grouped,
    _channels_last,
    _grouped_layout,
    _tasks,
    _wide_tiny,
    tasks_first,
)

# ---- parameters: shared (S) or per task (T, *S) ------------------------------------------------------------------


def _per_task(params: dict[str, Tensor], name: str, module_param: Tensor) -> bool:
    """Whether params[name] holds one tensor per task: (T, *S) for the module's S-shaped parameter."""
    return params[name].dim() == module_param.dim() + 1


def _split(params: dict[str, Tensor], name: str, module_param: Tensor | None, T: int) -> list[Tensor | None]:
    """The weights of each task: views of a per-task tensor, or the shared one T times."""
    if module_param is None:
        return [None] * T
    p = params[name]
    return list(p.unbind(0)) if p.dim() == module_param.dim() + 1 else [p] * T


def _grouped_param(params: dict[str, Tensor], name: str, module_param: Tensor | None, T: int) -> Tensor | None:
    """The parameter of all T tasks concatenated along dim 0: (T*S_0, *S[1:])."""
    if module_param is None:
        return None
    p = params[name]
    if p.dim() == module_param.dim():
        p = p.expand(T, *p.shape)
    return p.reshape(T * p.shape[1], *p.shape[2:])


# ---- the table and the base class ----------------------------------------------------------------------------------


class _Layer:
    """One module with parameters, run for all T tasks: `layer(x, params, T, twice)` -> the output of all tasks.

    x: the module's input in any layout (a (T, N, ...) tensor, T tensors (N, ...), or a Grouped (N, T*C, ...));
    the output may be in any layout too. params: name -> the shared S tensor or a per-task (T, *S) one (names as in
    model.named_parameters(): self.prefix + "weight"). twice: the result will be differentiated twice (second-order
    inner steps), for layers with a cheaper double backward of their own."""

    fuses_relu_pool: ClassVar[bool] = False  # True: __init__ takes pool=, and the layer applies ReLU(pool(.))

    def __init__(self, module: nn.Module, prefix: str) -> None:
        self.module = module
        self.prefix = prefix
        self.param_names = [prefix + n for n, _ in module.named_parameters(recurse=False)]

    @staticmethod
    def accepts(module: nn.Module) -> bool:
        """Whether this layer runs `module` (else the model has no task-batched form)."""
        return True

    def __call__(self, x: Activation, params: dict[str, Tensor], T: int, twice: bool) -> Activation:
        raise NotImplementedError


LAYERS: dict[type[nn.Module], type[_Layer]] = {}
L = TypeVar("L", bound=type[_Layer])


def register_layer(*kinds: type[nn.Module]) -> Callable[[L], L]:
    """Class decorator: the decorated `_Layer` runs modules of exactly these types (LAYERS[kind] = the class)."""

    def register(cls: L) -> L:
        for kind in kinds:
            LAYERS[kind] = cls
        return cls

    return register


# ---- the layers ----------------------------------------------------------------------------------------------------


@register_layer(nn.Linear)
class _Linear(_Layer):
    """(T, N, ..., in) -> (T, N, ..., out): per-task weights (T, out, in) as one batched matmul."""

    def __call__(self, x: Activation, params: dict[str, Tensor], T: int, twice: bool) -> Activation:
        m = self.module
        w = params[self.prefix + "weight"]
        b = params[self.prefix + "bias"] if m.bias is not None else None
        x = tasks_first(x)
        if not _per_task(params, self.prefix + "weight", m.weight):
            if b is not None and b.dim() == 2:  # per-task bias, shared weight
                return F.linear(x, w) + b.view(T, *([1] * (x.dim() - 2)), -1)
            return F.linear(x, w, b)
        flat = x.reshape(T, -1, x.shape[-1])
        if b is None:
            y = torch.bmm(flat, w.transpose(1, 2))
        else:
            y = torch.baddbmm(b.unsqueeze(1) if b.dim() == 2 else b, flat, w.transpose(1, 2))
        return y.view(*x.shape[:-1], y.shape[-1])


@register_layer(nn.Conv1d, nn.Conv2d, nn.Conv3d)
class _Conv(_Layer):
    """Small per-task sets: one grouped convolution over the tasks, Grouped (N, T*C, ...) -> (N, T*C', ...); else
    one convolution per task (N, C, ...) -> (N, C', ...), channels-last on the CPU (see layout.py's settings)."""

    @staticmethod
    def accepts(module: nn.Module) -> bool:
        return module.padding_mode == "zeros"

    def __call__(self, x: Activation, params: dict[str, Tensor], T: int, twice: bool) -> Activation:
        m = self.module
        wide_tiny = _wide_tiny(x, m.in_channels)
        if _grouped_layout(x) and not wide_tiny:
            g = Grouped.of(x, T).x  # (N, T*C, *spatial)
            shared = not _per_task(params, self.prefix + "weight", m.weight) and (
                m.bias is None or not _per_task(params, self.prefix + "bias", m.bias)
            )
            if shared:  # the same weights for every task (the initial ones): an ordinary convolution over the
                # N*T images, each task's channels viewed as images of their own (no copy of the weights T times,
                # no sum of their gradients over the tasks)
                b = params[self.prefix + "bias"] if m.bias is not None else None
                y = self.conv(g.reshape(-1, g.shape[1] // T, *g.shape[2:]), params[self.prefix + "weight"], b,
                              m.groups, twice)  # fmt: skip
                return Grouped(y.view(g.shape[0], -1, *y.shape[2:]), T)
            w = _grouped_param(params, self.prefix + "weight", m.weight, T)
            b = _grouped_param(params, self.prefix + "bias", m.bias, T)
            return Grouped(self.conv(g, w, b, m.groups * T, twice), T)
        xs = _tasks(x)
        if xs and xs[0].device.type == "cpu" and xs[0].dim() == 4:
            xs = [t.contiguous() if wide_tiny else _channels_last(t) for t in xs]
        ws = _split(params, self.prefix + "weight", m.weight, T)
        bs = _split(params, self.prefix + "bias", m.bias, T)
        return [self.conv(t, w, b, m.groups, twice) for t, w, b in zip(xs, ws, bs)]

    def conv(self, x: Tensor, w: Tensor, b: Tensor | None, groups: int, twice: bool) -> Tensor:
        """The module's convolution of x (N, C, ...) with w, b and `groups` groups."""
        m = self.module
        if twice and groups > 1:  # ATen's double backward would run one convolution per group (see _conv)
            return _conv.conv(x, w, b, m.stride, m.padding, m.dilation, groups)
        fn = (F.conv1d, F.conv2d, F.conv3d)[len(m.kernel_size) - 1]
        return fn(x, w, b, m.stride, m.padding, m.dilation, groups)


@register_layer(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
class _BatchNorm(_Layer):
    """Per task and channel statistics: one batch norm over T*C channels of Grouped (N, T*C, ...) (a (T, N, C, ...)
    input is regrouped), or one per task of T x (N, C, ...). With `pool`: BatchNorm -> ReLU -> max-pool as one."""

    fuses_relu_pool = True

    def __init__(self, module: nn.Module, prefix: str, pool: nn.Module | None = None) -> None:
        super().__init__(module, prefix)
        self.pool = pool  # BatchNorm -> ReLU -> this max-pool, one layer: max-pooled, then ReLU (they commute)

    def __call__(self, x: Activation, params: dict[str, Tensor], T: int, twice: bool) -> Activation:
        m = self.module
        batch_stats = m.training or m.running_mean is None
        mean = None if batch_stats else m.running_mean
        var = None if batch_stats else m.running_var
        if isinstance(x, Tensor):  # (T, N, C, ...) -> one batch norm over T*C channels
            x = Grouped.of(x, T)
        if isinstance(x, Grouped):  # one batch norm over T*C channels: per task and channel statistics
            w = _grouped_param(params, self.prefix + "weight", m.weight, T)
            b = _grouped_param(params, self.prefix + "bias", m.bias, T)
            mean, var = (None, None) if batch_stats else (mean.repeat(T), var.repeat(T))
            return self.relu_pool(Grouped(_batch_norm(x.x, mean, var, w, b, batch_stats, m.eps, twice), T))
        ws = _split(params, self.prefix + "weight", m.weight, T)
        bs = _split(params, self.prefix + "bias", m.bias, T)
        return self.relu_pool(
            [_batch_norm(t, mean, var, w, b, batch_stats, m.eps, twice) for t, w, b in zip(_tasks(x), ws, bs)]
        )

    def relu_pool(self, x: Activation) -> Activation:
        """x, or ReLU(pool(x)) in x's layout when this layer holds a pool."""
        if self.pool is None:
            return x
        if isinstance(x, Grouped):
            return Grouped(F.relu(self.pool(x.x)), x.T)
        return [F.relu(self.pool(t)) for t in x]


def _batch_norm(
    x: Tensor, mean: Tensor | None, var: Tensor | None, w: Tensor | None, b: Tensor | None, batch_stats: bool,
    eps: float, twice: bool,
) -> Tensor:  # fmt: skip
    """F.batch_norm; with batch statistics, differentiated twice, through _norm (fewer calls in its double
    backward than ATen's: the same gradients)."""
    if batch_stats and twice:
        return _norm.batch_norm(x, w, b, eps)
    return F.batch_norm(x, mean, var, w, b, training=batch_stats, eps=eps)


@register_layer(nn.LayerNorm)
class _LayerNorm(_Layer):
    """(T, N, ..., *normalized_shape) -> the same shape, each task's affine weights (T, *shape) broadcast."""

    def __call__(self, x: Activation, params: dict[str, Tensor], T: int, twice: bool) -> Activation:
        m = self.module
        x = tasks_first(x)
        y = F.layer_norm(x, m.normalized_shape, None, None, m.eps)
        for name, op in (("weight", torch.mul), ("bias", torch.add)):
            if getattr(m, name, None) is not None:
                p = params[self.prefix + name]
                if p.dim() > len(m.normalized_shape):  # per task: (T, *shape) -> (T, 1, ..., *shape)
                    p = p.view(T, *([1] * (x.dim() - 1 - len(m.normalized_shape))), *m.normalized_shape)
                y = op(y, p)
        return y


@register_layer(nn.GroupNorm)
class _GroupNorm(_Layer):
    """Grouped (N, T*C, ...) -> one group norm with T*G groups; T x (N, C, ...) -> one per task."""

    def __call__(self, x: Activation, params: dict[str, Tensor], T: int, twice: bool) -> Activation:
        m = self.module
        if not isinstance(x, list):  # (N, T*C, ...): T*G groups never straddle two tasks
            x = Grouped.of(x, T)
            w = _grouped_param(params, self.prefix + "weight", m.weight, T)
            b = _grouped_param(params, self.prefix + "bias", m.bias, T)
            return Grouped(F.group_norm(x.x, T * m.num_groups, w, b, m.eps), T)
        ws = _split(params, self.prefix + "weight", m.weight, T)
        bs = _split(params, self.prefix + "bias", m.bias, T)
        return [F.group_norm(t, m.num_groups, w, b, m.eps) for t, w, b in zip(x, ws, bs)]
