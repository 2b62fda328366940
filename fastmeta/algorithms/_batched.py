"""Run one model for T tasks at once, each task with its own (fast) weights or all sharing the initial ones.

Three runners share one call: `runner(params, x) -> y`, with x of shape (T, N, *in) and y of shape (T, N, *out).
Each entry of `params` (name -> tensor, as in model.named_parameters()) is either the shared S_i tensor or a
per-task (T, *S_i) one. Batch statistics (BatchNorm in training mode) are always per task, as in a per-task
loop, and running statistics are never updated.

- `TracedModel` (also named `BatchedModel`): any model torch.fx can trace. Its graph runs node by node for all
  tasks at once: Linear layers with per-task weights are one batched matmul; convolutions of small per-task
  sets are one grouped convolution over the tasks (layout (N, T*C, ...), with one batch or group norm over
  T*C channels), larger ones run per task on channels-last slices (on this CPU faster than one grouped
  convolution and than vmap); parameter-free layers and functions (activations, pooling, +, *, cat, flatten,
  mean, views) run once over all tasks; a ReLU or LeakyReLU followed by max-pooling is computed as pooling
  then the activation (the same function, on a quarter of the elements), and BatchNorm -> ReLU -> max-pool as
  one layer. Values in different layouts meet as per-task views. Anything else runs once per task inside the
  graph (the same function, so still exact). Exact to any order: nothing here relies on vmap's BatchNorm rule.
- `VmapModel`: torch.func.vmap over tasks of torch.func.functional_call (strategy="vmap", models without
  BatchNorm; "auto" for models that trace but hold a module with parameters and no batched form).
- `LoopModel`: functional_call once per task (strategy="loop"; "auto" for models that cannot be traced).
"""

from __future__ import annotations

import copy
import operator
import os
import traceback
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from fastmeta.algorithms import _conv, _norm

Activation = "Tensor | list[Tensor] | Grouped"  # (T, N, ...), T tensors of shape (N, ...), or (N, T*C, ...)

# Parameter-free layers that act on each example on its own (so on (T*N, ...) as on each task's (N, ...)).
_PER_EXAMPLE = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh,
    nn.Softplus, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.Dropout3d, nn.AlphaDropout, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d,
    nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d,
)  # fmt: skip
_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


# Convolutions of per-task sets smaller than this run as one grouped convolution over all tasks (on (N, T*C, H, W)
# activations, with one batch norm over T*C channels); larger ones run per task in channels-last layout. Measured
# on a 2-core CPU, Conv4, T=32: the grouped form halves a first-order inner step on 5-image support sets and
# saves 12% of a second-order one, while per-task channels-last convolutions and pooling are the faster for
# 75-image query sets.
GROUPED_MAX_EXAMPLES = 16
# Except on wide, tiny maps, where oneDNN's channels-last convolution is the slower one: a 3x3 convolution
# forward + backward of 75 images at 4x4, 320 -> 640 and 640 -> 640 channels, took 1.2x-1.5x as long in
# channels-last as in NCHW (2-core CPU, 1 and 2 threads; ResNet-12's last block); at 8x8 they were even, at 16x16
# and above channels-last won. Conv4's 64-channel layers never reach this. Such convolutions also run per task
# on small sets rather than grouped: 4 tasks of 5 images at 4x4, 640 -> 640 channels, forward + backward took
# 156 ms grouped and 101 ms per task in NCHW, and a ResNet-12 second-order step (T=4, S=1) went from 7.04 to
# 6.86 s (medians of 4 interleaved runs, 2026-11-30).
NCHW_MAX_PIXELS, NCHW_MIN_CHANNELS = 16, 256
# The layout choice is per device. On CUDA every convolution runs as one grouped convolution over all tasks,
# whatever the set size: that is what vmap does, and vmap beat the per-task runner on an H100's Conv4 rows. Not
# measured here (no GPU): a switch to revisit with measurements, not a measured choice like the CPU's.
GROUPED_ALWAYS = {"cuda"}


def _wide_tiny(x: Activation, in_channels: int) -> bool:
    """Whether a 2-d convolution of in_channels on x runs best in NCHW on this CPU (see NCHW_MAX_PIXELS)."""
    if not isinstance(x, Grouped) and len(x) == 0:
        return False
    t = x.x if isinstance(x, Grouped) else x[0]
    if t.device.type != "cpu" or t.dim() != 4:
        return False
    return t.shape[2] * t.shape[3] <= NCHW_MAX_PIXELS and in_channels >= NCHW_MIN_CHANNELS


def _grouped_layout(x: Activation) -> bool:
    """Whether a convolution on x runs as one grouped convolution over all tasks (else per task)."""
    t = x.x if isinstance(x, Grouped) else x[0] if isinstance(x, list) else x
    return t.device.type in GROUPED_ALWAYS or _examples(x) < GROUPED_MAX_EXAMPLES


class Grouped:
    """Activations of T tasks laid out as (N, T*C, *spatial): example-major, task t's channels at t*C:(t+1)*C."""

    def __init__(self, x: Tensor, T: int) -> None:
        self.x, self.T = x, T

    @staticmethod
    def of(x: Activation, T: int) -> Grouped:
        if isinstance(x, Grouped):
            return x
        x = torch.stack(x, 1) if isinstance(x, list) else x.transpose(0, 1)  # (N, T, C, *spatial)
        return Grouped(x.reshape(x.shape[0], T * x.shape[2], *x.shape[3:]), T)

    def tasks_first(self) -> Tensor:
        n, tc = self.x.shape[:2]
        return self.x.view(n, self.T, tc // self.T, *self.x.shape[2:]).transpose(0, 1)


def tasks_first(x: Activation) -> Tensor:
    """Activations as one (T, N, ...) tensor."""
    if isinstance(x, Grouped):
        return x.tasks_first()
    return torch.stack(x) if isinstance(x, list) else x


def _tasks(x: Activation) -> list[Tensor]:
    if isinstance(x, Grouped):
        x = x.tasks_first()
    return x if isinstance(x, list) else list(x.unbind(0))


def _examples(x: Activation) -> int:
    """N, the examples per task."""
    if isinstance(x, Grouped):
        return x.x.shape[0]
    return x[0].shape[0] if isinstance(x, list) else x.shape[1]


def _grouped_param(params: dict[str, Tensor], name: str, module_param: Tensor | None, T: int) -> Tensor | None:
    """The parameter of all T tasks concatenated along dim 0: (T*S_0, *S[1:])."""
    if module_param is None:
        return None
    p = params[name]
    if p.dim() == module_param.dim():
        p = p.expand(T, *p.shape)
    return p.reshape(T * p.shape[1], *p.shape[2:])


def _per_task(params: dict[str, Tensor], name: str, module_param: Tensor) -> bool:
    return params[name].dim() == module_param.dim() + 1


def _split(params: dict[str, Tensor], name: str, module_param: Tensor | None, T: int) -> list[Tensor | None]:
    """The weights of each task: views of a per-task tensor, or the shared one T times."""
    if module_param is None:
        return [None] * T
    p = params[name]
    return list(p.unbind(0)) if p.dim() == module_param.dim() + 1 else [p] * T


def _channels_last(x: Tensor) -> Tensor:
    """x (N, C, H, W) in channels-last layout; with C == 1 a view with the same data (no copy)."""
    if x.shape[1] == 1 and x.is_contiguous():
        n, _, h, w = x.shape
        return x.as_strided(x.shape, (h * w, 1, w, 1), x.storage_offset())
    return x.contiguous(memory_format=torch.channels_last)


class _Layer:
    def __init__(self, module: nn.Module, prefix: str) -> None:
        self.module = module
        self.prefix = prefix
        self.param_names = [prefix + n for n, _ in module.named_parameters(recurse=False)]

    def __call__(self, x: Activation, params: dict[str, Tensor], T: int, twice: bool) -> Activation:
        raise NotImplementedError


class _Linear(_Layer):
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


class _Conv(_Layer):
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
        m = self.module
        if twice and groups > 1:  # ATen's double backward would run one convolution per group (see _conv)
            return _conv.conv(x, w, b, m.stride, m.padding, m.dilation, groups)
        fn = (F.conv1d, F.conv2d, F.conv3d)[len(m.kernel_size) - 1]
        return fn(x, w, b, m.stride, m.padding, m.dilation, groups)


class _BatchNorm(_Layer):
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


class _LayerNorm(_Layer):
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


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, _BATCHNORM) for m in model.modules())


# ---- Any traceable model: its torch.fx graph, run for all tasks at once ---------------------------------------

# Functions and methods that act elementwise on one tensor (other arguments are numbers or flags): any layout.
_POINTWISE_FUNCTIONS = {
    F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.hardtanh,
    F.hardswish, F.hardsigmoid, F.softplus, F.sigmoid, torch.sigmoid, F.tanh, torch.tanh, torch.exp, torch.abs,
    torch.neg, operator.neg, torch.clamp, torch.square, torch.sqrt, F.dropout, F.alpha_dropout,
}  # fmt: skip
_POINTWISE_METHODS = {"relu", "sigmoid", "tanh", "exp", "abs", "neg", "clamp", "square", "sqrt", "contiguous"}
# Functions that act on each channel of each example: pooling.
_CHANNELWISE_FUNCTIONS = {
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
}  # fmt: skip
# Elementwise functions of two tensors (broadcasting).
_BINARY_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul, torch.div,
    torch.maximum, torch.minimum,
}  # fmt: skip
_BINARY_METHODS = {"add", "sub", "mul", "div"}
# Reductions and the like with a `dim` argument (position 1): run on (T, N, ...) with the dims shifted by one.
_DIM_FUNCTIONS = {torch.mean, torch.sum, torch.amax, torch.amin, F.softmax, F.log_softmax, torch.softmax}
_DIM_METHODS = {"mean", "sum", "amax", "amin", "softmax", "log_softmax"}
_SHAPE_ATTRS = {"shape", "ndim", "dtype", "device"}
_MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)


class _Dep:
    """An argument that differs between tasks (in any activation layout), as opposed to a constant."""

    def __init__(self, value: object) -> None:
        self.value = value
        self._tasks: list | None = None

    def task(self, t: int) -> object:
        if self._tasks is None:
            v = self.value
            self._tasks = v if isinstance(v, list) else _tasks(v)
        return self._tasks[t]


def _task_shape(x: Activation) -> torch.Size:
    """The shape of one task's tensor."""
    if isinstance(x, Grouped):
        n, tc, *spatial = x.x.shape
        return torch.Size((n, tc // x.T, *spatial))
    return x[0].shape if isinstance(x, list) else x.shape[1:]


def _shift(d: int) -> int:
    """A dim of one task's tensor as a dim of the (T, N, ...) tensor."""
    return d + 1 if d >= 0 else d


def _is_monotone_activation(m: object) -> bool:
    """ReLU-like: max-pooling commutes with it (it is elementwise and non-decreasing)."""
    return type(m) is nn.ReLU or (type(m) is nn.LeakyReLU and m.negative_slope >= 0)


class _GroupNorm(_Layer):
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


def _no_inplace(m: nn.Module) -> nn.Module:
    """m, or a copy that does not overwrite its input (activations may be views of other tasks' data)."""
    if getattr(m, "inplace", False):
        m = copy.copy(m)
        m.inplace = False
    return m


def _channelwise(fn: Callable[[Tensor], Tensor], x: Activation) -> Activation:
    """fn, which acts on each channel of each example, on all tasks at once."""
    if isinstance(x, Grouped):
        return Grouped(fn(x.x), x.T)
    if isinstance(x, list):
        return [fn(t) for t in x]
    return fn(x.flatten(0, 1)).unflatten(0, x.shape[:2])


def _pointwise(fn: Callable[[Tensor], Tensor], x: Activation) -> Activation:
    if isinstance(x, Grouped):
        return Grouped(fn(x.x), x.T)
    return [fn(t) for t in x] if isinstance(x, list) else fn(x)


def _examplewise(fn: Callable[[Tensor], Tensor], x: Activation) -> Activation:
    """fn, which acts on each example on its own (all its channels together), on all tasks at once."""
    if isinstance(x, list):
        return [fn(t) for t in x]
    x = tasks_first(x)
    return fn(x.flatten(0, 1)).unflatten(0, x.shape[:2])


@dataclass
class _Step:
    """One or more graph nodes computed together: fn(args, kwargs, params, T, twice) -> the value of `node`."""

    node: torch.fx.Node
    fn: Callable[..., object]
    args: tuple
    kwargs: dict
    param_names: list[str]


class _Tracer(torch.fx.Tracer):
    """symbolic_trace's tracer that also keeps `per_example` modules whole and remembers where tracing stopped."""

    def __init__(self) -> None:
        super().__init__()
        self.path_stack: list[str] = []
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return getattr(m, "per_example", False) is True or super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> object:
        self.path_stack.append(self.path_of_module(m))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self.path_stack[-1]
            raise
        finally:
            self.path_stack.pop()


def _trace(model: nn.Module) -> torch.fx.Graph:
    """The model's forward graph; raises TypeError naming the module and source line that stopped the trace."""
    tracer = _Tracer()
    try:
        return tracer.trace(model)
    except Exception as e:  # noqa: BLE001  (any error while tracing means: not traceable)
        frames = [f for f in traceback.extract_tb(e.__traceback__) if not f.filename.startswith(_TORCH_DIR)]
        where = f" at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno} `{frames[-1].line}`" if frames else ""
        module = f"in module '{tracer.failed_in}' " if tracer.failed_in else ""
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TypeError(
            f"{type(model).__name__} cannot be traced by torch.fx: {module}{where.lstrip()}: {first_line}"
        ) from e


_TORCH_DIR = os.path.dirname(torch.__file__)


class TracedModel:
    """Any model torch.fx can trace, run over T tasks node by node (see the module docstring): layers with
    parameters use each task's weights, parameter-free layers and functions run once over all tasks where the
    activation layout allows, and anything else runs once per task (the same function, so still exact).

    Steps are the graph's nodes in order, with BatchNorm -> ReLU -> max-pool and ReLU -> max-pool chains fused
    into one step each; `run(params, x, start, stop)` runs steps start:stop, where start and stop are cut points
    (exactly one value live across them)."""

    def __init__(self, model: nn.Module, plan: _Plan | None = None) -> None:
        self.model = model
        if plan is None:
            plan, why, _ = _traced(model)
            if plan is None:
                raise ValueError(why)
        self.steps, self.cuts, self.frees, self.dep = plan.steps, plan.cuts, plan.frees, plan.dep

    @property
    def layers(self) -> list[_Step]:
        return self.steps

    @staticmethod
    def supports(model: nn.Module) -> str | None:
        """None if `model` can run batched, else why not."""
        return _why_not_traced(model)

    def split(self, adapted: set[str]) -> int:
        """The last cut point before the first step that uses an adapted parameter (0 if none): the steps
        before it give the same output at every inner step (ANIL's shared body)."""
        first = next((i for i, s in enumerate(self.steps) if any(n in adapted for n in s.param_names)), len(self.steps))
        return max(k for k in range(first + 1) if self.cuts[k] is not None)

    def __call__(
        self, params: dict[str, Tensor], x: Activation, start: int = 0, stop: int | None = None, twice: bool = False
    ) -> Activation:
        """Steps start:stop on x; `twice`: the result will be differentiated twice (second-order inner steps)."""
        stop = len(self.steps) if stop is None else stop
        if self.cuts[start] is None or self.cuts[stop] is None:
            raise ValueError(f"TracedModel: steps {start}:{stop} do not start and end where one value is live")
        T = x.T if isinstance(x, Grouped) else len(x) if isinstance(x, list) else x.shape[0]
        env: dict[torch.fx.Node, object] = {self.cuts[start]: x}

        def value(n: torch.fx.Node) -> object:
            if n.op == "get_attr":
                return _attr(self.model, n.target, params, T)
            return _Dep(env[n]) if self.dep[n] else env[n]

        for i in range(start, stop):
            s = self.steps[i]
            args = torch.fx.node.map_arg(s.args, value)
            kwargs = torch.fx.node.map_arg(s.kwargs, value)
            env[s.node] = s.fn(args, kwargs, params, T, twice)
            for n in self.frees[i]:  # values no later step reads: let their memory go
                if n is not self.cuts[stop]:
                    env.pop(n, None)
        return env[self.cuts[stop]]


BatchedModel = TracedModel  # the name the algorithms import (it was the nn.Sequential-only runner)


def _attr(model: nn.Module, target: str, params: dict[str, Tensor], T: int) -> object:
    """A get_attr node's value: a parameter as T per-task tensors (a _Dep), anything else as it is."""
    if target in params:
        p = params[target]
        shared = model.get_parameter(target)
        return _Dep(list(p.unbind(0)) if p.dim() == shared.dim() + 1 else [p] * T)
    obj: object = model
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _deps_of(args: object, dep: dict[torch.fx.Node, bool]) -> bool:
    found = []
    torch.fx.node.map_arg(args, lambda n: found.append(dep[n]) or n)
    return any(found)


@dataclass
class _Plan:
    """How to run a traced graph: the steps, the live node at each cut point k (before step k; None where more
    than one value is live), the nodes whose last reader is each step, and which nodes differ between tasks.
    Holds the model's submodules but not the model (it is cached under the model, weakly)."""

    steps: list[_Step]
    cuts: list[torch.fx.Node | None]
    frees: list[list[torch.fx.Node]]
    dep: dict[torch.fx.Node, bool]


def _plan_graph(model: nn.Module, graph: torch.fx.Graph) -> _Plan:
    """The plan of `graph`; raises TypeError on a node without a task-batched form."""
    nodes = list(graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise TypeError(f"forward takes {len(placeholders)} inputs; the runner passes one")
    output = next(n for n in nodes if n.op == "output")
    if not isinstance(output.args[0], torch.fx.Node):
        raise TypeError(f"forward returns {type(output.args[0]).__name__}, not one tensor")
    param_names = {n for n, _ in model.named_parameters()}
    dep: dict[torch.fx.Node, bool] = {}
    for n in nodes:
        if n.op == "placeholder":
            dep[n] = True
        elif n.op == "get_attr":
            dep[n] = n.target in param_names
        elif n.op in ("call_method", "call_function"):
            shape_query = (n.op == "call_method" and n.target in ("size", "dim")) or (
                n.target is getattr and len(n.args) > 1 and n.args[1] in _SHAPE_ATTRS
            )
            dep[n] = not shape_query and _deps_of((n.args, n.kwargs), dep)
        elif n.op == "call_module":
            dep[n] = _deps_of((n.args, n.kwargs), dep)
    if not dep[output.args[0]]:
        raise TypeError("forward's output does not depend on its input")

    users = {n: [u for u in n.users] for n in nodes}
    fused: set[torch.fx.Node] = set()
    steps: list[_Step] = []
    for n in nodes:
        if n.op in ("placeholder", "get_attr", "output") or n in fused:
            continue
        step = _step(model, n, dep, users, fused)
        steps.append(step)

    # Cut points: the values made before step k (or the input) that step k or later reads.
    made_at = {placeholders[0]: -1}
    for i, s in enumerate(steps):
        made_at[s.node] = i
    reads: list[set[torch.fx.Node]] = []
    for s in steps:
        read: list[torch.fx.Node] = []
        torch.fx.node.map_arg((s.args, s.kwargs), read.append)
        reads.append({a for a in read if a.op != "get_attr"})
    last_read: dict[torch.fx.Node, int] = {}
    for i, r in enumerate(reads):
        for a in r:
            last_read[a] = i
    last_read[output.args[0]] = len(steps)
    cuts: list[torch.fx.Node | None] = []
    for k in range(len(steps) + 1):
        live = [a for a, j in last_read.items() if made_at.get(a, -1) < k <= j]
        cuts.append(live[0] if len(live) == 1 else None)
    frees: list[list[torch.fx.Node]] = [[] for _ in steps]
    for a, j in last_read.items():
        if j < len(steps):
            frees[j].append(a)
    return _Plan(steps, cuts, frees, dep)


def _single_user(n: torch.fx.Node, users: dict) -> torch.fx.Node | None:
    return users[n][0] if len(users[n]) == 1 else None


def _is_relu(model: nn.Module, n: torch.fx.Node | None) -> bool:
    if n is None:
        return False
    if n.op == "call_module":
        return type(model.get_submodule(n.target)) is nn.ReLU
    return n.op == "call_function" and n.target in (F.relu, torch.relu) and len(n.args) == 1
    # (F.relu(x, inplace=...) only as a keyword, which changes nothing here)


def _max_pool(model: nn.Module, n: torch.fx.Node | None) -> nn.Module | None:
    if n is None or n.op != "call_module":
        return None
    m = model.get_submodule(n.target)
    return m if isinstance(m, _MAX_POOLS) and not m.return_indices and len(n.args) == 1 and not n.kwargs else None


def _step(model: nn.Module, n: torch.fx.Node, dep: dict, users: dict, fused: set) -> _Step:
    """The step that computes node n (with the nodes fused into it); raises TypeError if n has no batched form."""

    def step(fn: Callable[..., object], node: torch.fx.Node = n, names: list[str] | None = None) -> _Step:
        return _Step(node, fn, n.args, dict(n.kwargs), names or [])

    if not _deps_of((n.args, n.kwargs), dep):  # the same for every task: run as written
        return step(_constant(n))
    if n.op == "call_module":
        m = model.get_submodule(n.target)
        prefix = n.target + "."
        if len(n.args) != 1 or n.kwargs or not isinstance(n.args[0], torch.fx.Node):
            raise TypeError(f"module '{n.target}' ({type(m).__name__}) is called with more than one input")
        layer: _Layer | None = None
        kind = type(m)
        if kind in _CONV and m.padding_mode == "zeros":
            layer = _Conv(m, prefix)
        elif kind is nn.Linear:
            layer = _Linear(m, prefix)
        elif kind in _BATCHNORM:
            relu = _single_user(n, users)
            pool = _max_pool(model, _single_user(relu, users)) if _is_relu(model, relu) else None
            if pool is not None:  # BatchNorm -> ReLU -> max-pool: one layer (pooled before the ReLU: they commute)
                fused.update({relu, _single_user(relu, users)})
                layer = _BatchNorm(m, prefix, pool)
                return step(_layer_fn(layer), _single_user(relu, users), layer.param_names)
            layer = _BatchNorm(m, prefix)
        elif kind is nn.LayerNorm:
            layer = _LayerNorm(m, prefix)
        elif kind is nn.GroupNorm:
            layer = _GroupNorm(m, prefix)
        if layer is not None:
            return step(_layer_fn(layer), names=layer.param_names)
        if kind is nn.Flatten:
            return step(lambda a, k, p, T, tw, m=m: _flatten(a[0].value, m.start_dim, m.end_dim))
        if next(m.parameters(), None) is not None or next(m.buffers(), None) is not None:
            raise TypeError(f"module '{n.target}' ({kind.__name__}) has no task-batched form")
        m = _no_inplace(m)
        if _is_monotone_activation(m):
            pool_node = _single_user(n, users)
            pool = _max_pool(model, pool_node)
            if pool is not None:  # max-pool first: the same function on a fraction of the elements
                fused.add(pool_node)
                return step(
                    lambda a, k, p, T, tw, m=m, pool=pool: _channelwise(lambda t: m(pool(t)), a[0].value), pool_node
                )
        if kind in _PER_EXAMPLE:
            return step(lambda a, k, p, T, tw, m=m: _channelwise(m, a[0].value))
        if getattr(m, "per_example", False) is True:
            return step(lambda a, k, p, T, tw, m=m: _examplewise(m, a[0].value))
        return step(lambda a, k, p, T, tw, m=m: _each_task(m, a, k, T))  # a parameter-free module: once per task
    if n.op == "call_method":
        return step(_method_fn(n))
    return step(_function_fn(n))


def _layer_fn(layer: _Layer) -> Callable[..., object]:
    return lambda a, k, p, T, twice: layer(a[0].value, p, T, twice)


def _constant(n: torch.fx.Node) -> Callable[..., object]:
    """A node whose value does not differ between tasks (shapes, constants): computed as written."""
    if n.op == "call_method":
        return lambda a, k, p, T, tw: getattr(a[0], n.target)(*a[1:], **k)
    if n.op == "call_module":
        raise TypeError(f"module '{n.target}' does not depend on the input")
    return lambda a, k, p, T, tw: n.target(*a, **k)


def _only_first_dep(args: tuple, kwargs: dict) -> bool:
    """args[0] differs between tasks, the other arguments are numbers, flags and the like (no tensors)."""
    rest: list = []
    torch.fx.node.map_aggregate((args[1:], kwargs), lambda v: rest.append(v) or v)
    return bool(args) and isinstance(args[0], _Dep) and not any(isinstance(v, (_Dep, Tensor)) for v in rest)


def _each_task(fn: Callable[..., object], args: tuple, kwargs: dict, T: int) -> list:
    """fn called once per task with that task's values: exact for any function, the loop's semantics."""

    def of(t: int) -> Callable[[object], object]:
        return lambda v: v.task(t) if isinstance(v, _Dep) else v

    return [
        fn(*torch.fx.node.map_aggregate(args, of(t)), **torch.fx.node.map_aggregate(kwargs, of(t))) for t in range(T)
    ]


def _flatten(x: Activation, start: int, end: int) -> Activation:
    if isinstance(x, list):
        return [t.flatten(start, end) for t in x]
    return tasks_first(x).flatten(_shift(start), _shift(end))


def _shape_query(x: Activation, what: str, args: tuple) -> object:
    shape = _task_shape(x)
    if what == "size":
        return shape[args[0]] if args else shape
    if what in ("dim", "ndim"):
        return len(shape)
    if what == "shape":
        return shape
    t = x.x if isinstance(x, Grouped) else x[0] if isinstance(x, list) else x
    return getattr(t, what)  # dtype, device


def _binary(fn: Callable[..., object], args: tuple, kwargs: dict, T: int) -> object:
    """An elementwise op of one or two task-dependent values (and numbers): batched where the layouts match."""
    deps = [a for a in args if isinstance(a, _Dep)]
    others = [a for a in (*args, *kwargs.values()) if not isinstance(a, _Dep)]
    if not any(isinstance(a, Tensor) for a in others):
        values = [d.value for d in deps]
        if len(values) == 1 and (isinstance(values[0], (Tensor, Grouped)) or _is_tensors(values[0])):
            return _pointwise(lambda t: fn(*[t if isinstance(a, _Dep) else a for a in args], **kwargs), values[0])
        if len(values) == 2:
            a, b = values
            same_grouped = isinstance(a, Grouped) and isinstance(b, Grouped) and a.x.shape == b.x.shape
            same_tensor = isinstance(a, Tensor) and isinstance(b, Tensor) and a.dim() == b.dim()
            if same_grouped or same_tensor:
                raw = iter([v.x if same_grouped else v for v in values])
                y = fn(*[next(raw) if isinstance(v, _Dep) else v for v in args], **kwargs)
                return Grouped(y, T) if same_grouped else y
    return _each_task(fn, args, kwargs, T)  # layouts differ: per task (views, no copies)


def _is_tensors(x: object) -> bool:
    return isinstance(x, list) and all(isinstance(t, Tensor) for t in x)


def _dim_op(fn: Callable[..., object], args: tuple, kwargs: dict, T: int) -> object:
    """fn(x, dim, ...) on the (T, N, ...) tensor with dim shifted; per task where dim is missing."""
    dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    x = args[0].value
    if dim is None or isinstance(x, list) or not _only_first_dep(args, kwargs):
        return _each_task(fn, args, kwargs, T)
    shifted = tuple(_shift(d) for d in dim) if isinstance(dim, (tuple, list)) else _shift(dim)
    if "dim" in kwargs:
        kwargs = {**kwargs, "dim": shifted}
    else:
        args = (args[0], shifted, *args[2:])
    return fn(tasks_first(x), *args[1:], **kwargs)


def _method_fn(n: torch.fx.Node) -> Callable[..., object]:
    name = n.target

    def run(args: tuple, kwargs: dict, params: dict, T: int, twice: bool) -> object:
        if not isinstance(args[0], _Dep):
            return _each_task(lambda s, *a, **k: getattr(s, name)(*a, **k), args, kwargs, T)
        x = args[0].value
        if name in ("size", "dim"):
            return _shape_query(x, name, args[1:])
        if _is_tensors(x) or isinstance(x, (Tensor, Grouped)):
            if name in _POINTWISE_METHODS and _only_first_dep(args, kwargs):
                return _pointwise(lambda t: getattr(t, name)(*args[1:], **kwargs), x)
            if name in _BINARY_METHODS:
                return _binary(lambda s, *a, **k: getattr(s, name)(*a, **k), args, kwargs, T)
            if name in _DIM_METHODS:
                return _dim_op(lambda s, *a, **k: getattr(s, name)(*a, **k), args, kwargs, T)
            if name == "flatten" and _only_first_dep(args, kwargs) and not isinstance(x, list):
                start = kwargs.get("start_dim", args[1] if len(args) > 1 else 0)
                end = kwargs.get("end_dim", args[2] if len(args) > 2 else -1)
                return _flatten(x, start, end)
            if name in ("view", "reshape") and _only_first_dep(args, kwargs) and not isinstance(x, list):
                shape = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:]
                return tasks_first(x).reshape(T, *shape)  # each task's block reshaped on its own
        return _each_task(lambda s, *a, **k: getattr(s, name)(*a, **k), args, kwargs, T)

    return run


def _function_fn(n: torch.fx.Node) -> Callable[..., object]:
    fn = n.target

    def run(args: tuple, kwargs: dict, params: dict, T: int, twice: bool) -> object:
        first = args[0].value if args and isinstance(args[0], _Dep) else None
        batchable = first is not None and (_is_tensors(first) or isinstance(first, (Tensor, Grouped)))
        if fn is getattr and first is not None and args[1] in _SHAPE_ATTRS:
            return _shape_query(first, args[1], ())
        if batchable and _only_first_dep(args, kwargs):
            if fn in _POINTWISE_FUNCTIONS:
                k = {**kwargs, "inplace": False} if "inplace" in kwargs else kwargs
                return _pointwise(lambda t: fn(t, *args[1:], **k), first)
            if fn in _CHANNELWISE_FUNCTIONS and not kwargs.get("return_indices", False):
                return _channelwise(lambda t: fn(t, *args[1:], **kwargs), first)
            if fn is torch.flatten:
                start = kwargs.get("start_dim", args[1] if len(args) > 1 else 0)
                end = kwargs.get("end_dim", args[2] if len(args) > 2 else -1)
                return _flatten(first, start, end)
            if fn is torch.reshape and not isinstance(first, list):
                return tasks_first(first).reshape(T, *kwargs.get("shape", args[1] if len(args) > 1 else ()))
            if fn is operator.getitem and not isinstance(first, list):
                idx = args[1] if isinstance(args[1], tuple) else (args[1],)
                return tasks_first(first)[(slice(None), *idx)]
        if fn in _BINARY_FUNCTIONS:
            return _binary(fn, args, kwargs, T)
        if batchable and fn in _DIM_FUNCTIONS:
            return _dim_op(fn, args, kwargs, T)
        if fn in (torch.cat, torch.concat) and _cat_batchable(args, kwargs):
            dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
            values = [v.value for v in args[0]]
            if all(_is_tensors(v) for v in values):
                return [torch.cat(ts, dim) for ts in zip(*values)]
            return torch.cat([tasks_first(v) for v in values], _shift(dim))
        return _each_task(fn, args, kwargs, T)

    return run


def _cat_batchable(args: tuple, kwargs: dict) -> bool:
    tensors = args[0] if args else kwargs.get("tensors")
    return (
        isinstance(tensors, (list, tuple))
        and all(
            isinstance(v, _Dep) and (_is_tensors(v.value) or isinstance(v.value, (Tensor, Grouped))) for v in tensors
        )
        and "tensors" not in kwargs
        and "out" not in kwargs
    )


_TRACED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (fingerprint, plan, why not)


def _fingerprint(model: nn.Module) -> tuple:
    # Tracing bakes in Python attributes read by forward, such as `self.training`: trace again when they change.
    return tuple((id(m), m.training) for m in model.modules())


def _traced(model: nn.Module) -> tuple[_Plan | None, str | None, bool]:
    """(the model's plan or None, why not, whether this model was seen for the first time), traced once per
    model and mode."""
    key = _fingerprint(model)
    cached = _TRACED.get(model)
    if cached is not None and cached[0] == key:
        return cached[1], cached[2], False
    try:
        graph = _trace(model)
    except TypeError as e:
        plan, why = None, str(e)
    else:
        try:
            plan, why = _plan_graph(model, graph), None
        except TypeError as e:
            plan, why = None, f"{type(model).__name__}: {e}"
    _TRACED[model] = (key, plan, why)
    return plan, why, cached is None


def _why_not_traced(model: nn.Module) -> str | None:
    return _traced(model)[1]


class _Functional:
    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def _buffers(self) -> dict[str, Tensor]:
        # Copies, so that BatchNorm in training mode does not update the model's running statistics.
        return {n: b.clone() for n, b in self.model.named_buffers()}

    def split(self, adapted: set[str]) -> int:
        return 0


class LoopModel(_Functional):
    """functional_call of `model` once per task, with that task's weights."""

    def __call__(
        self, params: dict[str, Tensor], x: Tensor, start: int = 0, stop: int | None = None, twice: bool = False
    ) -> Tensor:
        T = x.shape[0]
        buffers = self._buffers()
        per_task = {n: (_split(params, n, p, T)) for n, p in self.model.named_parameters()}
        outs = []
        for t in range(T):
            p = {n: per_task[n][t] for n in per_task}
            outs.append(torch.func.functional_call(self.model, (p, buffers), (x[t],)))
        return torch.stack(outs)


class VmapModel(_Functional):
    """torch.func.vmap over tasks of functional_call (models without BatchNorm)."""

    def __call__(
        self, params: dict[str, Tensor], x: Tensor, start: int = 0, stop: int | None = None, twice: bool = False
    ) -> Tensor:
        shapes = dict(self.model.named_parameters())
        dims = {n: 0 if _per_task(params, n, shapes[n]) else None for n in params}
        call: Callable[..., Tensor] = lambda p, b, x: torch.func.functional_call(self.model, (p, b), (x,))  # noqa: E731
        return torch.func.vmap(call, in_dims=(dims, None, 0), randomness="different")(params, self._buffers(), x)


def runner(model: nn.Module, strategy: str) -> TracedModel | LoopModel | VmapModel:
    """The runner for `strategy` ("auto", "batched", "vmap" or "loop").

    "auto" and "batched" run the model's traced graph for all tasks at once (`TracedModel`). A model that
    cannot be traced, or holds a module with parameters but no batched form, runs under "auto" in a per-task
    loop (under vmap if it traced and has no BatchNorm), with one warning per model naming the reason;
    "batched" refuses it with a ValueError giving the same reason."""
    if strategy == "loop":
        return LoopModel(model)
    if strategy == "vmap":
        if _has_batchnorm(model):
            raise ValueError(
                "strategy='vmap' is not exact for models with BatchNorm (vmap's batch-norm rule gives wrong "
                "second-order gradients); use strategy='batched' or 'loop'"
            )
        return VmapModel(model)
    if strategy not in ("auto", "batched"):
        raise ValueError(f"strategy must be 'auto', 'batched', 'vmap' or 'loop', got {strategy!r}")
    plan, why, first = _traced(model)
    if plan is not None:
        return TracedModel(model, plan)
    if strategy == "batched":
        raise ValueError(f"strategy='batched' cannot run this model: {why}; use strategy='auto' or 'loop'")
    fallback = VmapModel if not _has_batchnorm(model) and "cannot be traced" not in why else LoopModel
    if first:
        how = "task by task" if fallback is LoopModel else "under torch.func.vmap"
        # stacklevel: the caller of maml_step / adapt (runner <- _prepare <- maml_step <- caller)
        warnings.warn(f"fastmeta: {type(model).__name__} runs {how}, not batched: {why}", stacklevel=4)
    return fallback(model)
