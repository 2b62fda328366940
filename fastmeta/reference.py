"""Pure-PyTorch definitions of fastmeta's ops: the test oracle, and the fallback where the kernels are missing.

Each function here validates its arguments with the same messages as the kernels, then computes the op with
plain, differentiable PyTorch ops (half types in float32).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

Coef = float | Tensor | Sequence[Tensor | float]

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _coef_list(name: str, value: Coef | None, grads: Sequence[Tensor]) -> list[Tensor | float] | None:
    """One coefficient per parameter (None: none given), checked against grads[i] of shape (T, *S_i)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError(f"fast_weight_update: {name} must be a number or a sequence of tensors, got a bool")
    if isinstance(value, (int, float)):
        return [float(value)] * len(grads)
    if isinstance(value, Tensor):
        if value.dim() != 0:
            raise ValueError(
                f"fast_weight_update: {name} must be a number, a 0-d tensor or a sequence with one tensor per "
                f"parameter; got one tensor of shape {list(value.shape)}"
            )
        return [value] * len(grads)
    if not isinstance(value, Sequence):
        raise TypeError(f"fast_weight_update: {name} must be a number or a sequence, got {type(value).__name__}")
    if len(value) != len(grads):
        raise ValueError(
            f"fast_weight_update: {name} must be a number or have one entry per parameter ({len(grads)}), "
            f"got {len(value)}"
        )
    out: list[Tensor | float] = []
    for i, (c, g) in enumerate(zip(value, grads)):
        if isinstance(c, Tensor):
            try:
                shape = torch.broadcast_shapes(c.shape, g.shape)
            except RuntimeError:
                shape = None
            if shape != g.shape:
                raise ValueError(
                    f"fast_weight_update: {name}[{i}] has shape {list(c.shape)}, which does not broadcast to "
                    f"grads[{i}]'s shape {list(g.shape)}; expected [] (one value), {list(g.shape[1:])} (per "
                    f"element) or {list(g.shape)} (per task and element)"
                )
            _check_like(c, f"{name}[{i}]", grads[0])
            out.append(c)
        elif isinstance(c, (int, float)) and not isinstance(c, bool):
            out.append(float(c))
        else:
            raise TypeError(f"fast_weight_update: {name}[{i}] must be a tensor or a number, got {type(c).__name__}")
    return out


def _check_like(t: Tensor, name: str, ref: Tensor) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(
            f"fast_weight_update: {name} has dtype {t.dtype} but grads[0] has dtype {ref.dtype}; "
            "all tensors must share one dtype"
        )
    if t.device != ref.device:
        raise RuntimeError(
            f"fast_weight_update: {name} is on {t.device} but grads[0] is on {ref.device}; "
            "all tensors must be on one device"
        )


def check_fast_weight_update(params: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
    """Raises ValueError/TypeError/RuntimeError naming the argument if params/grads are not a valid pair."""
    if len(params) != len(grads):
        raise ValueError(
            f"fast_weight_update: params and grads must have the same length, got {len(params)} and {len(grads)}"
        )
    if not grads:
        return
    ref = grads[0]
    if ref.dtype not in _FLOATS:
        raise TypeError(
            f"fast_weight_update: grads[0] has dtype {ref.dtype}; supported: float32, float64, float16, bfloat16"
        )
    if ref.dim() < 1:
        raise ValueError("fast_weight_update: grads[0] must have a leading task dimension T, got a 0-d tensor")
    T = ref.shape[0]
    for i, (p, g) in enumerate(zip(params, grads)):
        _check_like(g, f"grads[{i}]", ref)
        _check_like(p, f"params[{i}]", ref)
        if g.dim() < 1 or g.shape[0] != T:
            raise ValueError(
                f"fast_weight_update: grads[{i}] has shape {list(g.shape)} but grads[0] has T={T} tasks; "
                "every grads[i] must have shape (T, *S_i)"
            )
        if p.shape != g.shape and p.shape != g.shape[1:]:
            raise ValueError(
                f"fast_weight_update: params[{i}] has shape {list(p.shape)} but grads[{i}] has shape "
                f"{list(g.shape)}; expected params[{i}] of shape {list(g.shape)} (per task) or "
                f"{list(g.shape[1:])} (shared)"
            )


def fast_weight_update(
    params: Sequence[Tensor], grads: Sequence[Tensor], lr: Coef, decay: Coef | None = None
) -> list[Tensor]:
    """new[i] = decay_i * params[i] - lr_i * grads[i] for T tasks at once: the reference definition.

    grads[i]: (T, *S_i). params[i]: (T, *S_i) per-task fast weights, or S_i shared by all tasks.
    lr, decay: a number, a 0-d tensor, or one tensor (or number) per parameter broadcastable to (T, *S_i);
    decay None means 1. Returns a list of (T, *S_i) tensors; half types are computed in float32.
    """
    check_fast_weight_update(params, grads)
    lrs = _coef_list("lr", lr, grads)
    if lrs is None:
        raise TypeError("fast_weight_update: lr must be a number or a sequence of tensors, got None")
    decays = _coef_list("decay", decay, grads)
    out = []
    for i, (p, g) in enumerate(zip(params, grads)):
        acc = torch.promote_types(g.dtype, torch.float32)
        p_, g_ = p.to(acc), g.to(acc)
        lr_i = lrs[i].to(acc) if isinstance(lrs[i], Tensor) else lrs[i]
        if decays is not None:
            d_i = decays[i].to(acc) if isinstance(decays[i], Tensor) else decays[i]
            p_ = d_i * p_
        new = p_ - lr_i * g_
        out.append(new.to(g.dtype))
    return out
