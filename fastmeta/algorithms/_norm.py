"""Batch norm with batch statistics whose double backward takes fewer calls than ATen's.

Second-order MAML differentiates each batch norm's backward again. ATen's formula for that
(`batchnorm_double_backward`) takes about 110 calls per layer (its reductions over every dimension but the
channels run one dimension at a time), which made 2500 of the 3700 ATen calls of a ResNet-12 second-order step
(T=4, S=1, counted on the meta device): each a kernel launch on a GPU. Here the forward and the first backward
are ATen's (`native_batch_norm`, `native_batch_norm_backward`: one call each), and the backward's backward is
the derivative of

    x^ = (x - mean) * r,  r = (var + eps)^-1/2          (per channel, over the M = N * spatial elements)
    gb = sum(gy),  gw = sum(gy * x^),  gx = w * r * (gy - gb / M - x^ * gw / M)

in one call of fastmeta's kernel (`fastmeta::batch_norm_double_backward`: per channel one pass to sum, one to
write; csrc/batch_norm.h) when no further derivative is taken, as in second-order MAML's outer backward. Under
create_graph (a third derivative) and where the kernels do not run, it is the same formula written out in about
50 differentiable ops (fastmeta/reference.py batch_norm_double_backward): the same function as F.batch_norm's
gradients, and exact to third order, which ATen's batch norm does not have.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastmeta import ops

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
        ctx.save_for_backward(gy, x, w, mean, rstd)
        ctx.eps = eps
        return gx, gw, gb

    @staticmethod
    def backward(ctx, ggx, ggw, ggb):  # noqa: ANN001, ANN205
        gy, x, w, mean, rstd = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]  # the kernel unless create_graph asks for a further derivative
        grads = ops._batch_norm_double_backward(gy, x, w, mean, rstd, ggx, ggw, ggb, ctx.eps, needs)
        return (*grads, None, None, None, None)
