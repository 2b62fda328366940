"""Run one model for T tasks at once, each task with its own (fast) weights or all sharing the initial ones.

Three runners share one call: `runner(params, x) -> y`, with x of shape (T, N, *in) and y of shape (T, N, *out).
Each entry of `params` (name -> tensor, as in model.named_parameters()) is either the shared S_i tensor or a
per-task (T, *S_i) one. Batch statistics (BatchNorm in training mode) are always per task, as in a per-task
loop, and running statistics are never updated.

- `BatchedModel`: models built from nn.Sequential and known layers. Linear layers with per-task weights are one
  batched matmul, convolutions run per task on channels-last slices (on this CPU faster than one grouped
  convolution and than vmap), parameter-free layers run once over all tasks, and a ReLU followed by max
  pooling is computed as pooling then ReLU (the same function, on a quarter of the elements). Exact to any
  order: nothing here relies on vmap's BatchNorm rule.
- `VmapModel`: other models without BatchNorm: torch.func.vmap over tasks of torch.func.functional_call.
- `LoopModel`: anything else: functional_call once per task.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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


class _PerExample(_Layer):
    def __init__(self, modules: list[nn.Module]) -> None:
        super().__init__(modules[0], "")
        self.modules = modules

    def apply(self, x: Tensor) -> Tensor:
        for m in self.modules:
            x = m(x)
        return x

    def __call__(self, x: Activation, params: dict[str, Tensor], T: int, twice: bool) -> Activation:
        if isinstance(x, Grouped):  # these layers act on each channel of each example: tasks stay apart
            return Grouped(self.apply(x.x), x.T)
        if isinstance(x, list):
            return [self.apply(t) for t in x]
        return self.apply(x.flatten(0, 1)).unflatten(0, x.shape[:2])


class _Flatten(_Layer):
    def __call__(self, x: Activation, params: dict[str, Tensor], T: int, twice: bool) -> Activation:
        m = self.module
        x = tasks_first(x) if isinstance(x, Grouped) else x
        if isinstance(x, list):
            return [t.flatten(m.start_dim, m.end_dim) for t in x]
        end = m.end_dim + 1 if m.end_dim >= 0 else m.end_dim
        return x.flatten(m.start_dim + 1, end)


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
        if _examples(x) < GROUPED_MAX_EXAMPLES:
            w = _grouped_param(params, self.prefix + "weight", m.weight, T)
            b = _grouped_param(params, self.prefix + "bias", m.bias, T)
            return Grouped(self.conv(Grouped.of(x, T).x, w, b, m.groups * T), T)
        xs = _tasks(x)
        if xs and xs[0].device.type == "cpu" and xs[0].dim() == 4:
            xs = [_channels_last(t) for t in xs]
        ws = _split(params, self.prefix + "weight", m.weight, T)
        bs = _split(params, self.prefix + "bias", m.bias, T)
        return [self.conv(t, w, b, m.groups) for t, w, b in zip(xs, ws, bs)]

    def conv(self, x: Tensor, w: Tensor, b: Tensor | None, groups: int) -> Tensor:
        m = self.module
        fn = (F.conv1d, F.conv2d, F.conv3d)[len(m.kernel_size) - 1]
        return fn(x, w, b, m.stride, m.padding, m.dilation, groups)


class _BatchNorm(_Layer):
    def __init__(self, module: nn.Module, prefix: str, pool: nn.Module | None = None) -> None:
        super().__init__(module, prefix)
        self.pool = pool  # BatchNorm -> ReLU -> this max-pool, computed as one layer

    def __call__(self, x: Activation, params: dict[str, Tensor], T: int, twice: bool) -> Activation:
        m = self.module
        batch_stats = m.training or m.running_mean is None
        mean = None if batch_stats else m.running_mean
        var = None if batch_stats else m.running_var
        fused = self.pool is not None and batch_stats and twice
        if isinstance(x, Grouped):  # one batch norm over T*C channels: per task and channel statistics
            w = _grouped_param(params, self.prefix + "weight", m.weight, T)
            b = _grouped_param(params, self.prefix + "bias", m.bias, T)
            if fused:
                return Grouped(_batch_norm_relu_pool(x.x, w, b, m.eps, self.pool), T)
            mean, var = (None, None) if batch_stats else (mean.repeat(T), var.repeat(T))
            return self.relu_pool(Grouped(F.batch_norm(x.x, mean, var, w, b, training=batch_stats, eps=m.eps), T))
        ws = _split(params, self.prefix + "weight", m.weight, T)
        bs = _split(params, self.prefix + "bias", m.bias, T)
        if fused:
            return [_batch_norm_relu_pool(t, w, b, m.eps, self.pool) for t, w, b in zip(_tasks(x), ws, bs)]
        return self.relu_pool(
            [F.batch_norm(t, mean, var, w, b, training=batch_stats, eps=m.eps) for t, w, b in zip(_tasks(x), ws, bs)]
        )

    def relu_pool(self, x: Activation) -> Activation:
        if self.pool is None:
            return x
        if isinstance(x, Grouped):
            return Grouped(F.relu(self.pool(x.x)), x.T)
        return [F.relu(self.pool(t)) for t in x]


def _batch_norm_relu_pool(x: Tensor, w: Tensor | None, b: Tensor | None, eps: float, pool: nn.Module) -> Tensor:
    """maxpool(relu(batch_norm(x))) with batch statistics, x (N, C, *spatial), pooling before the affine map.

    batch_norm is x * s + t per channel, and max-pooling commutes with it channel by channel: pooling of
    s * x is |s| times the pooling of sign(s) * x. Written so, only the statistics see the full-resolution
    input; second-order gradients (which differentiate the batch-norm backward again) then cost far less
    than through F.batch_norm's double backward (on a 2-core CPU, a second-order Conv4 inner step on 5-image
    support sets: 445 instead of 564 ms for T=32). The same function, so the same gradients.
    """
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    mean = x.mean(dims, keepdim=True)
    var = (x - mean).square().mean(dims, keepdim=True)  # two passes: ATen's one-pass var_mean is 20x slower here
    s = torch.rsqrt(var + eps)
    if w is not None:
        s = s * w.view(shape)
    if x.device.type == "cpu" and bool((s > 0).all()):  # (no host sync on accelerators)
        q = pool(x)
    else:
        sign = torch.where(s.detach() >= 0, 1.0, -1.0).to(x.dtype)
        q = pool(x * sign) * sign
    shift = -s * mean if b is None else b.view(shape) - s * mean
    return F.relu(torch.addcmul(shift, q, s))


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


def _sequential_leaves(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """(prefix, leaf) in execution order through nested nn.Sequential; raises TypeError on anything else."""
    if isinstance(module, nn.Sequential):
        if type(module).forward is not nn.Sequential.forward:
            raise TypeError(f"{type(module).__name__} overrides nn.Sequential.forward")
        out = []
        for name, child in module.named_children():
            out += _sequential_leaves(child, f"{prefix}{name}.")
        return out
    return [(prefix, module)]


def _plan(model: nn.Module) -> list[_Layer]:
    leaves = _sequential_leaves(model)
    layers: list[_Layer] = []
    i = 0
    while i < len(leaves):
        prefix, m = leaves[i]
        kind = type(m)
        if kind in _PER_EXAMPLE:
            group = [m]
            if kind is nn.ReLU and i + 1 < len(leaves) and type(leaves[i + 1][1]) in (nn.MaxPool1d, nn.MaxPool2d):
                if not leaves[i + 1][1].return_indices:
                    group = [leaves[i + 1][1], m]  # max-pool first: relu(maxpool(x)) == maxpool(relu(x))
                    i += 1
            layers.append(_PerExample(group))
        elif kind is nn.Flatten and m.start_dim >= 1:
            layers.append(_Flatten(m, prefix))
        elif kind is nn.Linear:
            layers.append(_Linear(m, prefix))
        elif kind in _CONV and m.padding_mode == "zeros":
            layers.append(_Conv(m, prefix))
        elif kind in _BATCHNORM:
            after = [type(leaf) for _, leaf in leaves[i + 1 : i + 3]]
            if after in ([nn.ReLU, nn.MaxPool1d], [nn.ReLU, nn.MaxPool2d], [nn.ReLU, nn.MaxPool3d]):
                pool = leaves[i + 2][1]
                if not pool.return_indices:
                    layers.append(_BatchNorm(m, prefix, pool))
                    i += 3
                    continue
            layers.append(_BatchNorm(m, prefix))
        elif kind is nn.LayerNorm:
            layers.append(_LayerNorm(m, prefix))
        else:
            raise TypeError(f"layer {prefix.rstrip('.') or 'model'} ({kind.__name__}) has no task-batched form")
        i += 1
    return layers


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, _BATCHNORM) for m in model.modules())


class BatchedModel:
    """`model` (nested nn.Sequential of known layers) run over T tasks; see the module docstring."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = _plan(model)

    @staticmethod
    def supports(model: nn.Module) -> str | None:
        """None if `model` can run batched, else why not."""
        try:
            _plan(model)
        except TypeError as e:
            return str(e)
        return None

    def split(self, adapted: set[str]) -> int:
        """How many leading layers use no adapted parameter (their output is the same for every inner step)."""
        for i, layer in enumerate(self.layers):
            if any(n in adapted for n in layer.param_names):
                return i
        return len(self.layers)

    def __call__(
        self, params: dict[str, Tensor], x: Activation, start: int = 0, stop: int | None = None, twice: bool = False
    ) -> Activation:
        """Layers start:stop on x; `twice`: the result will be differentiated twice (second-order inner steps)."""
        T = x.T if isinstance(x, Grouped) else len(x) if isinstance(x, list) else x.shape[0]
        for layer in self.layers[start:stop]:
            x = layer(x, params, T, twice)
        return x


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


def runner(model: nn.Module, strategy: str) -> BatchedModel | LoopModel | VmapModel:
    """The runner for `strategy` ("auto", "batched", "vmap" or "loop")."""
    if strategy == "loop":
        return LoopModel(model)
    if strategy == "vmap":
        if _has_batchnorm(model):
            raise ValueError(
                "strategy='vmap' is not exact for models with BatchNorm (vmap's batch-norm rule gives wrong "
                "second-order gradients); use strategy='batched' or 'loop'"
            )
        return VmapModel(model)
    why = BatchedModel.supports(model)
    if strategy == "batched":
        if why is not None:
            raise ValueError(f"strategy='batched' cannot run this model: {why}; use strategy='auto' or 'loop'")
        return BatchedModel(model)
    if strategy != "auto":
        raise ValueError(f"strategy must be 'auto', 'batched', 'vmap' or 'loop', got {strategy!r}")
    if why is None:
        return BatchedModel(model)
    return LoopModel(model) if _has_batchnorm(model) else VmapModel(model)
