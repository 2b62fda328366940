"""Traced function and method calls: which ones run once over all tasks, in which activation layouts, and how.

A traced call's arguments that differ between tasks arrive as `_Dep`s (any layout, see layout.py); the others
(numbers, shapes, constant tensors) as they are. The tables below say what each function or method does to its
tensor (elementwise, per channel, of two tensors, along a `dim`); `_function_fn` and `_method_fn` run a call
once over all tasks where its table and the arguments' layouts allow, else once per task (`_each_task`: the same
function on each task's values, so still exact). A function not in any table runs per task: to batch one, add it
to the table that describes it.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from fastmeta.algorithms._batched.layout import (
    Activation,
    Grouped,
    _channelwise,
    _pointwise,
    _shift,
    _task_shape,
    _tasks,
    tasks_first,
)

# Parameter-free layers that act on each example on its own (so on (T*N, ...) as on each task's (N, ...)).
_PER_EXAMPLE = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh,
    nn.Softplus, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.Dropout3d, nn.AlphaDropout, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d,
    nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d,
)  # fmt: skip

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
        """Task t's value: (N, ...) from any layout (views)."""
        if self._tasks is None:
            v = self.value
            self._tasks = v if isinstance(v, list) else _tasks(v)
        return self._tasks[t]


def _is_monotone_activation(m: object) -> bool:
    """ReLU-like: max-pooling commutes with it (it is elementwise and non-decreasing)."""
    return type(m) is nn.ReLU or (type(m) is nn.LeakyReLU and m.negative_slope >= 0)


def _no_inplace(m: nn.Module) -> nn.Module:
    """m, or a copy that does not overwrite its input (activations may be views of other tasks' data)."""
    if getattr(m, "inplace", False):
        m = copy.copy(m)
        m.inplace = False
    return m


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
    """Each task's tensor flattened over its dims start..end: T x (N, ...) stays per task, else (T, N, ...)."""
    if isinstance(x, list):
        return [t.flatten(start, end) for t in x]
    return tasks_first(x).flatten(_shift(start), _shift(end))


def _shape_query(x: Activation, what: str, args: tuple) -> object:
    """x.size(*args), .dim(), .ndim, .shape, .dtype or .device of one task's tensor (N, ...)."""
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
    """Whether x is the per-task layout: a list of T tensors."""
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
    """The step fn(args, kwargs, params, T, twice) of a call_method node (x.relu(), x.view(...), ...)."""
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
    """The step fn(args, kwargs, params, T, twice) of a call_function node (F.relu(x), x + y, torch.cat, ...)."""
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
    """Whether torch.cat's tensors all differ between tasks (any layouts): one cat over all tasks."""
    tensors = args[0] if args else kwargs.get("tensors")
    return (
        isinstance(tensors, (list, tuple))
        and all(
            isinstance(v, _Dep) and (_is_tensors(v.value) or isinstance(v.value, (Tensor, Grouped))) for v in tensors
        )
        and "tensors" not in kwargs
        and "out" not in kwargs
    )
