"""Tracing and planning: a model's torch.fx graph, turned into the steps that run it for all tasks (a `_Plan`).

`_traced(model)` traces the model once per model and mode (cached) and plans its graph: one `_Step` per node,
except chains fused into one step (BatchNorm -> ReLU -> max-pool; ReLU or LeakyReLU -> max-pool). `_step` picks
each node's step: a module with parameters runs as the layer `layers.LAYERS` names for its type, a parameter-free
module over all tasks (calls._PER_EXAMPLE) or per task, a function or method call as calls.py says. A node that
has no task-batched form raises TypeError, and the model runs under vmap or a per-task loop (runners.py).
"""

from __future__ import annotations

import os
import traceback
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from fastmeta.algorithms._batched.calls import (
    _MAX_POOLS,
    _PER_EXAMPLE,
    _SHAPE_ATTRS,
    _constant,
    _each_task,
    _flatten,
    _function_fn,
    _is_monotone_activation,
    _method_fn,
    _no_inplace,
)
from fastmeta.algorithms._batched.layers import LAYERS, _Layer
from fastmeta.algorithms._batched.layout import _channelwise, _examplewise


@dataclass
class _Step:
    """One or more graph nodes computed together: fn(args, kwargs, params, T, twice) -> the value of `node`."""

    node: torch.fx.Node
    fn: Callable[..., object]
    args: tuple
    kwargs: dict
    param_names: list[str]


class _Tracer(torch.fx.Tracer):
    """symbolic_trace's tracer that also keeps `per_example` modules and those of a type in layers.LAYERS whole,
    and remembers where tracing stopped."""

    def __init__(self) -> None:
        super().__init__()
        self.path_stack: list[str] = []
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return getattr(m, "per_example", False) is True or type(m) in LAYERS or super().is_leaf_module(m, qualname)

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


def _deps_of(args: object, dep: dict[torch.fx.Node, bool]) -> bool:
    """Whether any node in args differs between tasks."""
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
    """The one node that reads n, or None."""
    return users[n][0] if len(users[n]) == 1 else None


def _is_relu(model: nn.Module, n: torch.fx.Node | None) -> bool:
    """Whether n is a ReLU: nn.ReLU, or F.relu / torch.relu of one argument."""
    if n is None:
        return False
    if n.op == "call_module":
        return type(model.get_submodule(n.target)) is nn.ReLU
    return n.op == "call_function" and n.target in (F.relu, torch.relu) and len(n.args) == 1
    # (F.relu(x, inplace=...) only as a keyword, which changes nothing here)


def _max_pool(model: nn.Module, n: torch.fx.Node | None) -> nn.Module | None:
    """n's module if n is a max-pool module (no indices) called on one input, else None."""
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
        return _module_step(model, n, users, fused, step)
    if n.op == "call_method":
        return step(_method_fn(n))
    return step(_function_fn(n))


def _module_step(model: nn.Module, n: torch.fx.Node, users: dict, fused: set, step: Callable[..., _Step]) -> _Step:
    """The step of a call_module node: the module's layer (layers.LAYERS) if it has one, else a parameter-free
    module run once over all tasks where it acts on each example or channel on its own, or once per task."""
    m = model.get_submodule(n.target)
    prefix = n.target + "."
    if len(n.args) != 1 or n.kwargs or not isinstance(n.args[0], torch.fx.Node):
        raise TypeError(f"module '{n.target}' ({type(m).__name__}) is called with more than one input")
    kind = type(m)
    layer_type = LAYERS.get(kind)
    if layer_type is not None and layer_type.accepts(m):
        if layer_type.fuses_relu_pool:
            relu = _single_user(n, users)
            pool_node = _single_user(relu, users) if _is_relu(model, relu) else None
            pool = _max_pool(model, pool_node)
            if pool is not None:  # BatchNorm -> ReLU -> max-pool: one layer (pooled before the ReLU: they commute)
                fused.update({relu, pool_node})
                layer = layer_type(m, prefix, pool=pool)
                return step(_layer_fn(layer), pool_node, layer.param_names)
        layer = layer_type(m, prefix)
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


def _layer_fn(layer: _Layer) -> Callable[..., object]:
    """A layer as a step's fn(args, kwargs, params, T, twice)."""
    return lambda a, k, p, T, twice: layer(a[0].value, p, T, twice)


# ---- the cache: one plan per model and mode ------------------------------------------------------------------------

_TRACED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (fingerprint, plan, why not)


def _fingerprint(model: nn.Module) -> tuple:
    """What a traced graph depends on besides the code: the modules and their training flags."""
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
    """None if the model traces and plans, else why not."""
    return _traced(model)[1]
