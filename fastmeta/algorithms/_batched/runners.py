"""The runners, `runner(params, x) -> y` for T tasks at once, and `runner(model, strategy)`, which picks one.

- `TracedModel` (also `BatchedModel`): the model's plan (plan.py) run step by step for all tasks at once.
- `VmapModel`: torch.func.vmap over tasks of torch.func.functional_call (models without BatchNorm).
- `LoopModel`: functional_call once per task.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.fx
from torch import Tensor, nn

from fastmeta.algorithms._batched import layers  # layers._per_task, read there so that a patch of it applies here
from fastmeta.algorithms._batched.calls import _Dep
from fastmeta.algorithms._batched.layout import Activation, Grouped
from fastmeta.algorithms._batched.plan import _Plan, _Step, _traced, _why_not_traced

_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class TracedModel:
    """Any model torch.fx can trace, run over T tasks node by node (see the package docstring): layers with
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
        first = next((i for i, s in enumerate(self.steps) if _reads(s) & adapted), len(self.steps))
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


def _reads(step: _Step) -> set[str]:
    """The parameters a step reads: its layer's, and those its arguments fetch (a forward that calls
    F.linear(x, self.weight) reads `weight` through a get_attr node)."""
    names = set(step.param_names)

    def note(a: torch.fx.Node) -> torch.fx.Node:
        if a.op == "get_attr":
            names.add(a.target)
        return a

    torch.fx.node.map_arg((step.args, step.kwargs), note)
    return names


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


class _Functional:
    """A runner through torch.func.functional_call of the model (VmapModel, LoopModel)."""

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
        per_task = {n: layers._split(params, n, p, T) for n, p in self.model.named_parameters()}
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
        dims = {n: 0 if layers._per_task(params, n, shapes[n]) else None for n in params}
        call: Callable[..., Tensor] = lambda p, b, x: torch.func.functional_call(self.model, (p, b), (x,))  # noqa: E731
        return torch.func.vmap(call, in_dims=(dims, None, 0), randomness="different")(params, self._buffers(), x)


def _has_batchnorm(model: nn.Module) -> bool:
    """Whether the model holds a BatchNorm (not exact under vmap)."""
    return any(isinstance(m, _BATCHNORM) for m in model.modules())


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
