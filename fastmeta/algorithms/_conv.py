"""Grouped convolution whose higher-order gradients stay grouped.

The task-batched runner computes T tasks' convolutions as one convolution with T times the groups. Its first
backward is one `convolution_backward` call, but ATen's double backward (`_convolution_double_backward`, what
second-order MAML runs) computes the weight gradient of a grouped convolution group by group: 32 tasks of Conv4
cost 32 convolutions, a narrow and a cat per layer, where vmap (which batches each call of the formula) costs
one. Here the backward is an autograd.Function whose own backward is written with the same two functions,
`convolution` and `convolution_backward`, each taking all groups in one call:

    y = conv(x, w) + b                       gx, gw, gb = convolution_backward(gy, x, w)
    d/dgy = conv(ggx, w) + conv(x, ggw) + ggb
    d/dw  = weight gradient of conv(ggx, .) at gy      (convolution_backward(gy, ggx, w)[1])
    d/dx  = input gradient of conv(., ggw) at gy       (convolution_backward(gy, x, ggw)[0])

so the gradients are the same functions as F.conv*d's, exact to any order (each backward is again one of the
two Functions).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

Spec = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], int]  # stride, padding, dilation, groups

_aten = torch.ops.aten


def conv(x: Tensor, w: Tensor, b: Tensor | None, stride: Any, padding: Any, dilation: Any, groups: int) -> Tensor:
    """conv{1,2,3}d(x, w, b, stride, padding, dilation, groups), x (N, C_in, *spatial), w (C_out, C_in/groups, *k),
    whose double backward runs one convolution per call instead of one per group."""
    n = w.dim() - 2
    if isinstance(padding, str) or torch._C._are_functorch_transforms_active():
        # "same"/"valid" padding, torch.func: torch's own convolution (exact too, with the per-group loop)
        return (torch.conv1d, torch.conv2d, torch.conv3d)[n - 1](x, w, b, stride, padding, dilation, groups)
    device = x.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        # as autocast does for F.conv*d (it does not see inside a Function)
        dtype = torch.get_autocast_dtype(device)
        x, w, b = (t.to(dtype) if t is not None and t.dtype == torch.float32 else t for t in (x, w, b))
    spec = (_tuple(stride, n), _tuple(padding, n), _tuple(dilation, n), int(groups))
    return _Convolution.apply(x, w, b, spec)


def _tuple(v: Any, n: int) -> tuple[int, ...]:
    return tuple(int(i) for i in v) if isinstance(v, (tuple, list)) else (int(v),) * n


def _forward(x: Tensor, w: Tensor, b: Tensor | None, spec: Spec) -> Tensor:
    stride, padding, dilation, groups = spec
    return _aten.convolution(x, w, b, stride, padding, dilation, False, [0] * len(stride), groups)


def _backward(gy: Tensor, x: Tensor, w: Tensor, spec: Spec, mask: list[bool]) -> tuple[Tensor | None, ...]:
    stride, padding, dilation, groups = spec
    bias_sizes = [w.shape[0]] if mask[2] else None
    out = _aten.convolution_backward(
        gy, x, w, bias_sizes, stride, padding, dilation, False, [0] * len(stride), groups, mask
    )
    return tuple(o if m else None for o, m in zip(out, mask))


class _Convolution(torch.autograd.Function):
    # forward(ctx, ...) rather than setup_context: torch.autograd.Function.apply binds a setup_context
    # Function's arguments with inspect.signature on every call (25 us each, ~25 calls a Conv4 meta-step). The
    # price is no torch.func support: conv() takes F.conv*d under torch.func transforms.

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, b: Tensor | None, spec: Spec) -> Tensor:
        ctx.save_for_backward(x, w)
        ctx.spec = spec
        ctx.set_materialize_grads(False)
        return _forward(x, w, b, spec)

    @staticmethod
    def backward(ctx: Any, gy: Tensor | None) -> tuple:
        if gy is None:
            return None, None, None, None
        x, w = ctx.saved_tensors
        mask = list(ctx.needs_input_grad[:3])
        gx, gw, gb = _ConvolutionBackward.apply(gy, x, w, ctx.spec, mask)
        return gx, gw, gb, None


class _ConvolutionBackward(torch.autograd.Function):
    """(gx, gw, gb) = convolution_backward(gy, x, w) for the entries of mask (None for the others)."""

    @staticmethod
    def forward(ctx: Any, gy: Tensor, x: Tensor, w: Tensor, spec: Spec, mask: list[bool]) -> tuple:
        ctx.save_for_backward(gy, x, w)
        ctx.spec = spec
        ctx.set_materialize_grads(False)
        return _backward(gy, x, w, spec, mask)

    @staticmethod
    def backward(ctx: Any, ggx: Tensor | None, ggw: Tensor | None, ggb: Tensor | None) -> tuple:
        gy, x, w = ctx.saved_tensors
        spec = ctx.spec
        need_gy, need_x, need_w = ctx.needs_input_grad[:3]
        d_gy = d_x = d_w = None
        if need_gy:
            terms = []
            if ggx is not None:
                terms.append(_Convolution.apply(ggx, w, None, spec))
            if ggw is not None:
                terms.append(_Convolution.apply(x, ggw, None, spec))
            if ggb is not None:
                terms.append(ggb.view(1, -1, *([1] * (gy.dim() - 2))).expand_as(gy))
            if terms:
                d_gy = terms[0]
                for t in terms[1:]:
                    d_gy = d_gy + t
        if need_x and ggw is not None:  # gw = wgrad(x, gy) is linear in x
            d_x = _ConvolutionBackward.apply(gy, x, ggw, spec, [True, False, False])[0]
        if need_w and ggx is not None:  # gx = igrad(gy, w) is linear in w
            d_w = _ConvolutionBackward.apply(gy, ggx, w, spec, [False, True, False])[1]
        return d_gy, d_x, d_w, None, None
