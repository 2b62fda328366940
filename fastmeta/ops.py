"""fastmeta's public ops: argument handling, dispatch to the compiled kernels (or the reference), and the
fake, vmap and functorch registrations that make them work under torch.compile and torch.func.

Where each op's math lives (a change to one is a change to all; tests/test_derivatives.py runs every derivative
below on the same inputs):

fast_weight_update, new = decay * params - lr * grads
    definition       fastmeta/reference.py fast_weight_update
    forward          csrc/cpu/fast_weight_update.cpp forward_kernel; csrc/cuda/fast_weight_update.cu
    backward         csrc/cpu/fast_weight_update.cpp backward_kernel; csrc/cuda/fast_weight_update.cu backward_kernel
                     (plain backward, through csrc/autograd/fast_weight_update.cpp)
    double backward  csrc/autograd/fast_weight_update.cpp FastWeightUpdate::backward, grad-mode branch (ATen ops)
    torch.func       _backward_formula (backward under grad mode), _FastWeightUpdate.jvp (forward mode),
                     _FastWeightUpdate.vmap / _vmap_op (batching rules)
batch_norm_double_backward (batch norm's backward differentiated again; fastmeta/algorithms/_norm.py)
    definition       fastmeta/reference.py batch_norm_double_backward (also the path under create_graph)
    kernel           csrc/batch_norm.h (the formula per channel); csrc/cpu/batch_norm.cpp; csrc/cuda/batch_norm.cu
pairwise_distance, contrastive_loss, contrastive_loss_all_pairs
    definition       fastmeta/reference.py (also the double backward and the torch.func path)
    forward          csrc/cpu/contrastive.cpp; csrc/cuda/contrastive.cu
    backward         csrc/cpu/contrastive.cpp *_backward_cpu; csrc/cuda/contrastive.cu *_backward_cuda;
                     _pairwise_distance_backward here (in ATen ops)

Argument checks run once on each path: the kernels check in C++ (csrc/checks.h), the reference in Python
(fastmeta/reference.py), with the same messages; arguments the kernels cannot see (a reduction, labels before
their conversion to int64, non-tensors) go to the reference's checks.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from fastmeta import _kernels, reference
from fastmeta.reference import EPS, Coef

__all__ = ["fast_weight_update", "pairwise_distance", "contrastive_loss", "contrastive_loss_all_pairs"]


def _coefs(name: str, value: Coef | None, grads: list[Tensor]) -> tuple[list[Tensor], float]:
    """(tensors, scalar) for the kernel: [] and the number when `value` is one number, else one tensor per
    parameter of shape [], S_i or (T, *S_i) (other broadcastable shapes are expanded to one of these)."""
    if value is None:
        return [], 1.0
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [], float(value)
    coefs = reference._coef_list(name, value, grads)  # validates, with the reference's messages
    out = []
    for c, g in zip(coefs, grads):
        if not isinstance(c, Tensor):
            c = torch.tensor(c, dtype=g.dtype, device=g.device)
        elif c.dim() and c.shape != g.shape and c.shape != g.shape[1:]:
            # e.g. (T, 1, 1) per task, (1, *S) or (C, 1, 1): expand (autograd reduces the gradient back).
            full = (1,) * (g.dim() - c.dim()) + tuple(c.shape)
            c = c.reshape(full[1:]).expand(g.shape[1:]) if full[0] == 1 else c.expand(g.shape)
        out.append(c)
    return out, 1.0


def fast_weight_update(
    params: Sequence[Tensor], grads: Sequence[Tensor], lr: Coef, decay: Coef | None = None
) -> list[Tensor]:
    """Fast weights of T tasks in one fused op: new[i] = decay_i * params[i] - lr_i * grads[i].

    Args:
        params: per parameter, (T, *S_i) per-task fast weights or S_i initial weights shared by all tasks.
        grads: per parameter, (T, *S_i) gradients of each task's inner loss.
        lr: a number (plain MAML); a 0-d tensor; or one tensor (or number) per parameter, broadcastable to
            (T, *S_i): 0-d per layer (MAML++), S_i per element (Meta-SGD), (T, *S_i) per task and element.
        decay: None (1), or the same forms as lr (weight decay; a Meta-LSTM forget gate).
    Returns:
        new fast weights, one (T, *S_i) tensor per parameter. Differentiable w.r.t. params, grads, lr and decay
        (to any order): shared params and broadcast coefficients get gradients reduced to their own shapes.
    """
    params = params if type(params) is list else list(params)
    grads = grads if type(grads) is list else list(grads)
    if not grads or not _kernels.runs(grads[0]):
        if grads and _kernels.AVAILABLE:
            _warn_no_kernel(grads[0].device)
        return reference.fast_weight_update(params, grads, lr, decay)
    functorch = torch._C._are_functorch_transforms_active()
    if not functorch and not torch.compiler.is_compiling():
        # Fast path: numbers, or tensors already in a form the kernel takes ([], S_i or (T, *S_i)), checked in C++.
        lr_args = _direct_coefs(lr)
        decay_args = ([], 1.0) if decay is None else _direct_coefs(decay)
        if lr_args is not None and decay_args is not None:
            try:
                out = _kernels.call_fast_weight_update(
                    params, grads, lr_args[0], decay_args[0], lr_args[1], decay_args[1]
                )
            except ValueError:
                out = NotImplemented  # other broadcastable shapes, or bad input: the general path below says which
            if out is not NotImplemented:
                return out
    if lr is None:
        raise TypeError("fast_weight_update: lr must be a number or a sequence of tensors, got None")
    lrs, lr_s = _coefs("lr", lr, grads)
    decays, decay_s = _coefs("decay", decay, grads)
    if functorch:
        n = len(params)
        return list(_FastWeightUpdate.apply(n, len(lrs), len(decays), lr_s, decay_s, *params, *grads, *lrs, *decays))
    return torch.ops.fastmeta.fast_weight_update(params, grads, lrs, decays, lr_s, decay_s)


def _direct_coefs(value: Coef | None) -> tuple[Sequence[Tensor], float] | None:
    """(tensors, scalar) for the direct kernel call, or None where `value` needs the general path."""
    if isinstance(value, float) or (isinstance(value, int) and not isinstance(value, bool)):
        return [], float(value)
    if isinstance(value, (list, tuple)):
        return value, 1.0  # the C++ entry declines (NotImplemented) any element that is not a tensor
    return None


_warned_devices: set[str] = set()


def _warn_no_kernel(device: torch.device) -> None:
    if device.type not in _warned_devices:
        _warned_devices.add(device.type)
        warnings.warn(
            f"fastmeta was built without kernels for {device.type}; using the pure-PyTorch reference there",
            RuntimeWarning,
            stacklevel=3,
        )


def _split(tensors: Sequence[Tensor], n: int, n_lrs: int, n_decays: int) -> tuple[list[Tensor], ...]:
    """(params, grads, lrs, decays) from their concatenation."""
    t = list(tensors)
    return t[:n], t[n : 2 * n], t[2 * n : 2 * n + n_lrs], t[2 * n + n_lrs : 2 * n + n_lrs + n_decays]


def _backward_formula(
    grad_outs: Sequence[Tensor],
    params: list[Tensor],
    grads: list[Tensor],
    lrs: list[Tensor],
    decays: list[Tensor],
    lr: float,
    decay: float,
    mask: Sequence[bool],
) -> tuple[list[Tensor], ...]:
    """The backward of fast_weight_update in differentiable ops (for double backward and torch.func)."""
    gp, gg, gl, gd = [], [], [], []
    for i, go in enumerate(grad_outs):
        if mask[0]:
            gp.append((go * decays[i] if decays else go * decay).sum_to_size(params[i].shape))
        if mask[1]:
            gg.append(-(go * lrs[i]) if lrs else go * -lr)
        if mask[2]:
            gl.append((-(go * grads[i])).sum_to_size(lrs[i].shape))
        if mask[3]:
            gd.append((go * params[i]).sum_to_size(decays[i].shape))
    return gp, gg, gl, gd


class _FastWeightUpdate(torch.autograd.Function):
    """fast_weight_update under torch.func transforms (the C++ autograd kernel serves plain autograd)."""

    @staticmethod
    def forward(n, n_lrs, n_decays, lr, decay, *tensors):  # noqa: ANN001, ANN205
        params, grads, lrs, decays = _split(tensors, n, n_lrs, n_decays)
        with torch._C._AutoDispatchBelowAutograd():
            return tuple(torch.ops.fastmeta.fast_weight_update(params, grads, lrs, decays, lr, decay))

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
        n, n_lrs, n_decays, lr, decay, *tensors = inputs
        ctx.meta = (n, n_lrs, n_decays, lr, decay)
        ctx.save_for_backward(*tensors)
        ctx.save_for_forward(*tensors)

    @staticmethod
    def jvp(ctx, *tangents):  # noqa: ANN001, ANN205
        """Forward mode (torch.func.jvp, jacfwd, hessian): d(new) = d*dp + dd*p - l*dg - dl*g."""
        n, n_lrs, n_decays, lr, decay = ctx.meta
        params, grads, lrs, decays = _split(ctx.saved_tensors, n, n_lrs, n_decays)
        tp, tg, tl, td = _split(tangents[5:], n, n_lrs, n_decays)
        out = []
        for i, g in enumerate(grads):
            t = torch.zeros_like(g)
            if tp[i] is not None:
                t = t + (tp[i] * decays[i] if decays else tp[i] * decay)
            if tg[i] is not None:
                t = t - (tg[i] * lrs[i] if lrs else tg[i] * lr)
            if lrs and tl[i] is not None:
                t = t - tl[i] * g
            if decays and td[i] is not None:
                t = t + td[i] * params[i]
            out.append(t)
        return tuple(out)

    @staticmethod
    def backward(ctx, *grad_outs):  # noqa: ANN001, ANN205
        n, n_lrs, n_decays, lr, decay = ctx.meta
        params, grads, lrs, decays = _split(ctx.saved_tensors, n, n_lrs, n_decays)
        needs = ctx.needs_input_grad[5:]
        mask = [any(needs[a:b]) for a, b in _ranges(n, n_lrs, n_decays)]
        if torch.is_grad_enabled():
            parts = _backward_formula(grad_outs, params, grads, lrs, decays, lr, decay, mask)
        else:
            parts = torch.ops.fastmeta.fast_weight_update_backward(
                list(grad_outs), params, grads, lrs, decays, lr, decay, mask
            )
        result: list[Tensor | None] = [None] * 5
        for part, (a, b), needed in zip(parts, _ranges(n, n_lrs, n_decays), mask):
            result += list(part) if needed else [None] * (b - a)
        return tuple(result)

    @staticmethod
    def vmap(info, in_dims, n, n_lrs, n_decays, lr, decay, *tensors):  # noqa: ANN001, ANN205
        params, grads, lrs, decays = _split(tensors, n, n_lrs, n_decays)
        dims = _split(in_dims[5:], n, n_lrs, n_decays)
        B = info.batch_size
        p, g, lrs, decays = _vmap_fold(B, dims, params, grads, lrs, decays)
        # Through the public op again: outer torch.func levels (grad of vmap) differentiate it.
        out = fast_weight_update(p, g, lrs or lr, decays or (decay if decay != 1.0 else None))
        return tuple(o.reshape(B, -1, *o.shape[1:]) for o in out), tuple([0] * len(out))


def _ranges(n: int, n_lrs: int, n_decays: int) -> list[tuple[int, int]]:
    return [(0, n), (n, 2 * n), (2 * n, 2 * n + n_lrs), (2 * n + n_lrs, 2 * n + n_lrs + n_decays)]


def _vmap_fold(
    B: int,
    dims: tuple[list, ...],
    params: list[Tensor],
    grads: list[Tensor],
    lrs: list[Tensor],
    decays: list[Tensor],
) -> tuple[list[Tensor], ...]:
    """Arguments of fast_weight_update over a vmap batch of size B, folded into the task dimension (B*T tasks)."""
    p_dims, g_dims, l_dims, d_dims = dims

    def full(t: Tensor, bdim: int | None, shape: torch.Size) -> Tensor:  # -> (B*T, *S)
        t = t.movedim(bdim, 0) if bdim is not None else t.unsqueeze(0)
        t = t.reshape(t.shape[0], *(1,) * (len(shape) + 1 - t.dim()), *t.shape[1:])  # broadcast from the right
        return t.expand(B, *shape).reshape(B * shape[0], *shape[1:])

    new_p, new_g, new_l, new_d = [], [], [], []
    for i, g in enumerate(grads):
        shape = g.shape if g_dims[i] is None else g.movedim(g_dims[i], 0).shape[1:]
        new_g.append(full(g, g_dims[i], shape))
        p, pd = params[i], p_dims[i]
        new_p.append(p if pd is None and p.dim() == len(shape) - 1 else full(p, pd, shape))
        for src, sdims, dst in ((lrs, l_dims, new_l), (decays, d_dims, new_d)):
            if src:
                c, cd = src[i], sdims[i]
                dst.append(c if cd is None and c.dim() < len(shape) else full(c, cd, shape))
    return new_p, new_g, new_l, new_d


def _vmap_op(info, in_dims, params, grads, lrs, decays, lr, decay):  # noqa: ANN001, ANN202
    """vmap rule of the raw op torch.ops.fastmeta.fast_weight_update (no autograd below vmap)."""
    dims = tuple([None] * len(x) if d is None else d for d, x in zip(in_dims[:4], (params, grads, lrs, decays)))
    B = info.batch_size
    out = torch.ops.fastmeta.fast_weight_update(*_vmap_fold(B, dims, params, grads, lrs, decays), lr, decay)
    return [o.reshape(B, -1, *o.shape[1:]) for o in out], [0] * len(out)


if _kernels.AVAILABLE:

    @torch.library.register_fake("fastmeta::fast_weight_update")
    def _fast_weight_update_fake(params, grads, lrs, decays, lr, decay):  # noqa: ANN001, ANN202
        torch._check(len(params) == len(grads), lambda: "fast_weight_update: params and grads differ in length")
        return [torch.empty_like(g, memory_format=torch.contiguous_format) for g in grads]

    @torch.library.register_fake("fastmeta::fast_weight_update_backward")
    def _fast_weight_update_backward_fake(grad_outs, params, grads, lrs, decays, lr, decay, mask):  # noqa: ANN001, ANN202
        def like(ts: list[Tensor], on: bool) -> list[Tensor]:
            return [torch.empty_like(t, memory_format=torch.contiguous_format) for t in ts] if on else []

        return like(params, mask[0]), like(grads, mask[1]), like(lrs, mask[2]), like(decays, mask[3])

    torch.library.register_vmap("fastmeta::fast_weight_update", _vmap_op)


# ---------------------------------------------------------------------------------------------- contrastive


def _use_kernel(t: Tensor) -> bool:
    """Whether `t`'s op runs the compiled kernel (torch.func transforms run the reference, which they trace)."""
    if not _kernels.runs(t):
        if _kernels.AVAILABLE:
            _warn_no_kernel(t.device)
        return False
    return not torch._C._are_functorch_transforms_active()


def _batch_norm_double_backward(
    gy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, rstd: Tensor, ggx: Tensor | None,
    ggw: Tensor | None, ggb: Tensor | None, eps: float, needs: tuple[bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:  # fmt: skip
    """Batch norm's backward differentiated again (training mode), for fastmeta.algorithms._norm: (d_gy, d_x,
    d_weight), None where not in `needs` (d_weight also without a weight). gy, x, ggx: (N, C, *spatial);
    weight, mean, rstd (the forward's saved statistics), ggw, ggb: (C,). The kernel when no input needs a
    gradient of its own (a further derivative), else the reference's differentiable formula."""
    further = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (gy, x, weight, ggx, ggw, ggb))
    if further or not _use_kernel(x):
        return reference.batch_norm_double_backward(gy, x, weight, ggx, ggw, ggb, eps, needs)
    d_gy, d_x, d_w = torch.ops.fastmeta.batch_norm_double_backward(gy, x, weight, mean, rstd, ggx, ggw, ggb)
    return d_gy if needs[0] else None, d_x if needs[1] else None, d_w if needs[2] and weight is not None else None


def _tensors(*args: object) -> bool:
    """Whether every argument is a tensor. The kernel path checks its arguments once, in C++ (csrc/checks.h,
    the same messages as the reference's checks); anything else goes to the reference, which says what is wrong."""
    return all(isinstance(a, Tensor) for a in args)


def _integral(t: Tensor) -> bool:
    return not (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool)


def pairwise_distance(x1: Tensor, x2: Tensor, eps: float = EPS) -> Tensor:
    """Row-wise Euclidean distance d_b = sqrt(||x1_b - x2_b||^2 + eps), fused: (B, D), (B, D) -> (B,)."""
    if not _tensors(x1, x2) or not _use_kernel(x1):
        return reference.pairwise_distance(x1, x2, eps)
    return torch.ops.fastmeta.pairwise_distance(x1, x2, float(eps))


def contrastive_loss(
    x1: Tensor, x2: Tensor, same: Tensor, margin: float = 1.0, reduction: str = "mean", eps: float = EPS
) -> Tensor:
    """Contrastive loss (Hadsell, Chopra & LeCun 2006) of B pairs, fused: one pass forward, one backward.

    L_b = same_b * d_b^2 + (1 - same_b) * max(0, margin - d_b)^2 with d_b = sqrt(||x1_b - x2_b||^2 + eps).
    same_b = 1 for a pair of the SAME class (pulled together), 0 for different classes (pushed apart past the
    margin). Beware: the widely copied form (1 - y) d^2 + y max(0, m - d)^2 uses y = 1 for DISSIMILAR pairs.
    x1, x2: (B, D); same: (B,) bool, integer or float. reduction: "mean" or "sum" (0-d) or "none" ((B,)).
    """
    if not _tensors(x1, x2, same) or not _use_kernel(x1):
        return reference.contrastive_loss(x1, x2, same, margin, reduction, eps)
    reference.check_reduction(reduction, "contrastive_loss")  # the one argument the kernel does not see
    losses = torch.ops.fastmeta.contrastive_loss(x1, x2, same.to(x1.dtype), float(margin), float(eps))
    if reduction == "none":
        return losses
    # Half types: reduce in float32, as the reference does.
    acc = losses.to(torch.promote_types(losses.dtype, torch.float32))
    return (acc.mean() if reduction == "mean" else acc.sum()).to(losses.dtype)


def contrastive_loss_all_pairs(embeddings: Tensor, labels: Tensor, margin: float = 1.0, eps: float = EPS) -> Tensor:
    """Mean contrastive loss over all N(N-1)/2 pairs i < j of embeddings (N, D), same = (labels_i == labels_j).

    Tiled (a matrix product per tile, reduced online; backward recomputes each tile): memory O(N * D + tile^2),
    never N x N. labels: (N,) integers. Returns a 0-d tensor in embeddings' dtype.
    """
    if not _tensors(embeddings, labels) or not _use_kernel(embeddings) or not _integral(labels):
        # (non-integer labels: the reference's error; the kernel would only see them after .long())
        return reference.contrastive_loss_all_pairs(embeddings, labels, margin, eps)
    return torch.ops.fastmeta.contrastive_loss_all_pairs(embeddings, labels.long(), float(margin), float(eps))


def _pairwise_distance_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    x1, x2, _ = inputs
    ctx.save_for_backward(x1, x2, output)


def _pairwise_distance_backward(ctx, grad):  # noqa: ANN001, ANN202
    x1, x2, d = ctx.saved_tensors
    acc = torch.promote_types(x1.dtype, torch.float32)
    g = (grad.to(acc) / d.to(acc)).unsqueeze(1) * (x1.to(acc) - x2.to(acc))
    return g.to(x1.dtype), (-g).to(x2.dtype), None


def _contrastive_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    x1, x2, same, margin, eps = inputs
    ctx.save_for_backward(x1, x2, same)
    ctx.margin, ctx.eps = margin, eps


def _contrastive_backward(ctx, grad):  # noqa: ANN001, ANN202
    x1, x2, same = ctx.saved_tensors
    if torch.is_grad_enabled():  # double backward: differentiate the reference, which is exact
        with torch.enable_grad():
            losses = reference.contrastive_loss(x1, x2, same, ctx.margin, "none", ctx.eps)
        g1, g2 = torch.autograd.grad(losses, (x1, x2), grad, create_graph=True)
    else:
        g1, g2 = torch.ops.fastmeta.contrastive_loss_backward(grad, x1, x2, same, ctx.margin, ctx.eps)
    return g1, g2, None, None, None


def _all_pairs_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    embeddings, labels, margin, eps = inputs
    ctx.save_for_backward(embeddings, labels)
    ctx.margin, ctx.eps = margin, eps


def _all_pairs_backward(ctx, grad):  # noqa: ANN001, ANN202
    embeddings, labels = ctx.saved_tensors
    if torch.is_grad_enabled():  # double backward through the (N x N) reference
        with torch.enable_grad():
            loss = reference.contrastive_loss_all_pairs(embeddings, labels, ctx.margin, ctx.eps)
        (g,) = torch.autograd.grad(loss, embeddings, grad, create_graph=True)
    else:
        g = torch.ops.fastmeta.contrastive_loss_all_pairs_backward(grad, embeddings, labels, ctx.margin, ctx.eps)
    return g, None, None, None


if _kernels.AVAILABLE:

    @torch.library.register_fake("fastmeta::pairwise_distance")
    def _pairwise_distance_fake(x1, x2, eps):  # noqa: ANN001, ANN202
        return x1.new_empty(x1.shape[:1])

    @torch.library.register_fake("fastmeta::contrastive_loss")
    def _contrastive_fake(x1, x2, same, margin, eps):  # noqa: ANN001, ANN202
        return x1.new_empty(x1.shape[:1])

    @torch.library.register_fake("fastmeta::contrastive_loss_backward")
    def _contrastive_backward_fake(grad, x1, x2, same, margin, eps):  # noqa: ANN001, ANN202
        return torch.empty_like(x1, memory_format=torch.contiguous_format), torch.empty_like(
            x2, memory_format=torch.contiguous_format
        )

    @torch.library.register_fake("fastmeta::contrastive_loss_all_pairs")
    def _all_pairs_fake(embeddings, labels, margin, eps):  # noqa: ANN001, ANN202
        return embeddings.new_empty(())

    @torch.library.register_fake("fastmeta::contrastive_loss_all_pairs_backward")
    def _all_pairs_backward_fake(grad, embeddings, labels, margin, eps):  # noqa: ANN001, ANN202
        return torch.empty_like(embeddings, memory_format=torch.contiguous_format)

    @torch.library.register_fake("fastmeta::batch_norm_double_backward")
    def _batch_norm_double_backward_fake(gy, x, weight, mean, rstd, ggx, ggw, ggb):  # noqa: ANN001, ANN202
        # the CPU kernel keeps a channels-last x's layout; otherwise the outputs are contiguous
        last = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
        keep = x.device.type == "cpu" and last and not x.is_contiguous() and x.is_contiguous(memory_format=last)
        fmt = last if keep else torch.contiguous_format
        d_w = x.new_empty(x.shape[1:2], dtype=x.dtype if weight is None else weight.dtype)
        return torch.empty_like(x, memory_format=fmt), torch.empty_like(x, memory_format=fmt), d_w

    torch.library.register_autograd(
        "fastmeta::pairwise_distance", _pairwise_distance_backward, setup_context=_pairwise_distance_setup
    )
    torch.library.register_autograd(
        "fastmeta::contrastive_loss", _contrastive_backward, setup_context=_contrastive_setup
    )
    torch.library.register_autograd(
        "fastmeta::contrastive_loss_all_pairs", _all_pairs_backward, setup_context=_all_pairs_setup
    )
