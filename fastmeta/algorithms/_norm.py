"""Batch norm with batch statistics whose double backward takes fewer calls than ATen's.

Second-order MAML differentiates each batch norm's backward again. ATen's formula for that
(`batchnorm_double_backward`) takes about 110 calls per layer (its reductions over every dimension but the
channels run one dimension at a time), which made 2500 of the 3700 ATen calls of a ResNet-12 second-order step
(T=4, S=1, counted on the meta device): each a kernel launch on a GPU. Here the forward and the first backward
are ATen's (`native_batch_norm`, `native_batch_norm_backward`: one call each), and the backward's backward is
the derivative of

    x^ = (x - mean) * r,  r = (var + eps)^-1/2          (per channel, over the M = N * spatial elements)
    gb = sum(gy),  gw = sum(gy * x^),  gx = w * r * (gy - gb / M - x^ * gw / M)

written out in about 40 elementwise ops and reductions (see _double_backward), themselves differentiable: the
same function as F.batch_norm's gradients, and exact to third order, which ATen's batch norm does not have.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_aten = torch.ops.aten


def batch_norm(x: Tensor, w: Tensor | None, b: Tensor | None, eps: float) -> Tensor:
    """F.batch_norm(x, None, None, w, b, training=True, eps=eps): x (N, C, *spatial) normalised per channel by
    its batch statistics, w and b (C,) or None; cheaper to differentiate twice (see the module's docstring)."""
    if torch._C._are_functorch_transforms_active():  # torch.func: torch's own (a Function would need vmap rules)
        return F.batch_norm(x, None, None, w, b, True, 0.0, eps)
    return _BatchNorm.apply(x, w, b, float(eps))


class _BatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor | None, b: Tensor | None, eps: float) -> Tensor:  # noqa: ANN001
        y, mean, rstd = _aten.native_batch_norm(x, w, b, None, None, True, 0.0, eps)
        ctx.save_for_backward(x, w, mean, rstd)
        ctx.eps, ctx.has_bias = eps, b is not None
        return y

    @staticmethod
    def backward(ctx, gy: Tensor) -> tuple[Tensor | None, ...]:  # noqa: ANN001
        x, w, mean, rstd = ctx.saved_tensors
        mask = (
            ctx.needs_input_grad[0],
            w is not None and ctx.needs_input_grad[1],
            ctx.has_bias and ctx.needs_input_grad[2],
        )
        gx, gw, gb = _BatchNormBackward.apply(gy, x, w, mean, rstd, ctx.eps, mask)
        return gx, gw, gb, None


class _BatchNormBackward(torch.autograd.Function):
    """(gx, gw, gb) of batch norm at x for the upstream gradient gy; its own backward differentiates them."""

    @staticmethod
    def forward(ctx, gy, x, w, mean, rstd, eps: float, mask: tuple[bool, bool, bool]):  # noqa: ANN001, ANN205
        gx, gw, gb = _aten.native_batch_norm_backward(gy, x, w, None, None, mean, rstd, True, eps, list(mask))
        ctx.save_for_backward(gy, x, w)
        ctx.eps = eps
        return gx, gw, gb

    @staticmethod
    def backward(ctx, ggx, ggw, ggb):  # noqa: ANN001, ANN205
        gy, x, w = ctx.saved_tensors
        grads = _double_backward(gy, x, w, ggx, ggw, ggb, ctx.eps, ctx.needs_input_grad[:3])
        return (*grads, None, None, None, None)


def _double_backward(gy, x, w, ggx, ggw, ggb, eps, needs):  # noqa: ANN001, ANN202
    """Gradients w.r.t. (gy, x, w) of <ggx, gx> + <ggw, gw> + <ggb, gb>, where (gx, gw, gb) is batch norm's
    backward at x for gy. Per channel, with x^ = (x - mean) r, r = (var + eps)^-1/2, M elements, w r = s, sums S:

        A     = S(ggx gy) - S(ggx) mean(gy) - S(ggx x^) S(gy x^) / M
        v     = ggw gy - s / M (ggx S(gy x^) + gy S(ggx x^))
        d gy  = s (ggx - mean(ggx) - x^ mean(ggx x^)) + ggw x^ + ggb
        d x   = r (v - mean(v) - x^ mean(v x^)) - s r A x^ / M
        d w   = r A

    (d x: v is the derivative w.r.t. x^ at fixed r, taken through x^(x); the last term through r(x).) Written in
    differentiable ops, so a further derivative is exact too. Missing upstream gradients count as zeros."""
    dtype, low = x.dtype, x.dtype in (torch.float16, torch.bfloat16)
    if low:  # the statistics in float32, as ATen's kernels keep them
        gy, x, ggx = gy.float(), x.float(), None if ggx is None else ggx.float()
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    M = x.numel() // x.shape[1]

    def total(t: Tensor) -> Tensor:
        return t.sum(dims, keepdim=True)

    centred = x - x.mean(dims, keepdim=True)
    r = torch.rsqrt(centred.square().mean(dims, keepdim=True) + eps)
    normed = centred * r
    s = r if w is None else r * w.view(shape).to(r.dtype)
    d_gy = v = d_x = d_w = None
    if ggx is not None:
        s_ggx, s_gg, s_gy = total(ggx), total(ggx * normed), total(gy * normed)
        if needs[1] or needs[2]:
            A = total(ggx * gy) - s_ggx * (total(gy) / M) - s_gg * s_gy / M
            d_w = (r * A).view(-1) if w is not None and needs[2] else None
            if needs[1]:
                v = (s / -M) * (ggx * s_gy + gy * s_gg)
                d_x = (s * r * A / -M) * normed
        if needs[0]:
            d_gy = s * (ggx - s_ggx / M - normed * (s_gg / M))
    if ggw is not None:
        gw = ggw.view(shape).to(normed.dtype)
        if needs[1]:
            v = gw * gy if v is None else v + gw * gy
        if needs[0]:
            d_gy = gw * normed if d_gy is None else d_gy + gw * normed
    if ggb is not None and needs[0]:
        gb = ggb.view(shape).to(normed.dtype)
        d_gy = gb.expand_as(normed) if d_gy is None else d_gy + gb
    if v is not None:
        d_v = r * (v - v.mean(dims, keepdim=True) - normed * (v * normed).mean(dims, keepdim=True))
        d_x = d_v if d_x is None else d_x + d_v
    return (
        None if d_gy is None else d_gy.to(dtype),
        None if d_x is None else d_x.to(dtype),
        None if d_w is None else d_w.to(w.dtype),
    )
