"""Pure-PyTorch definitions of fastmeta's ops: the test oracle, and the fallback where the kernels are missing.

Each function here validates its arguments with the same messages as the kernels, then computes the op with
plain, differentiable PyTorch ops (half types in float32).
"""

from __future__ import annotations

import math
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


def safe_sqrt(x: Tensor) -> Tensor:
    """sqrt(x) for x >= 0, with derivatives of every order that are finite: 0 where x == 0 (where sqrt's is
    infinite), so an exactly-zero gradient in Adam's second moment gives no NaN in a second-order step."""
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, torch.ones_like(x)).sqrt(), torch.zeros_like(x))


def _lr_list(lr: Coef, grads: Sequence[Tensor], who: str) -> list[Tensor | float]:
    lrs = _coef_list("lr", lr, grads)
    if lrs is None:
        raise TypeError(f"{who}: lr must be a number or a sequence of tensors, got None")
    return lrs


def sgd_update(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    lr: Coef,
    bufs: Sequence[Tensor] | None,
    momentum: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
) -> tuple[list[Tensor], list[Tensor] | None]:
    """One step of torch.optim.SGD (dampening 0) for T tasks at once: the reference definition.

    d = g + weight_decay * p; with momentum, buf = momentum * buf + d (buf starts at 0, so the first step's is
    d, as in torch.optim) and d = buf, or d + momentum * buf with nesterov; new p = p - lr * d.
    params[i]: (T, *S_i) or S_i shared; grads[i]: (T, *S_i); bufs[i]: (T, *S_i) or S_i (None without
    momentum); lr as in fast_weight_update. Returns (new params (T, *S_i), new bufs or None)."""
    check_fast_weight_update(params, grads)
    lrs = _lr_list(lr, grads, "sgd_update")
    new_p, new_b = [], [] if momentum else None
    for i, (p, g) in enumerate(zip(params, grads)):
        d = g + weight_decay * p if weight_decay else g
        if momentum:
            buf = momentum * bufs[i] + d
            new_b.append(buf)
            d = d + momentum * buf if nesterov else buf
        new_p.append(p - lrs[i] * d)
    return new_p, new_b


def adam_update(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    lr: Coef,
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    step: int,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Step `step` (1-based) of torch.optim.Adam (not amsgrad) for T tasks at once: the reference definition.

    d = g + weight_decay * p; m = b1 * m + (1 - b1) * d; v = b2 * v + (1 - b2) * d^2 (both start at 0);
    new p = p - lr / (1 - b1^step) * m / (sqrt(v) / sqrt(1 - b2^step) + eps), sqrt as `safe_sqrt`.
    Shapes as sgd_update's. Returns (new params, new m, new v), each (T, *S_i)."""
    check_fast_weight_update(params, grads)
    if not isinstance(step, int) or step < 1:
        raise ValueError(f"adam_update: step must be an integer >= 1, got {step!r}")
    lrs = _lr_list(lr, grads, "adam_update")
    b1, b2 = betas
    bc1, bc2 = 1 - b1**step, 1 - b2**step
    new_p, new_m, new_v = [], [], []
    for i, (p, g) in enumerate(zip(params, grads)):
        d = g + weight_decay * p if weight_decay else g
        m = b1 * exp_avgs[i] + (1 - b1) * d
        v = b2 * exp_avg_sqs[i] + (1 - b2) * d * d
        denom = safe_sqrt(v) / math.sqrt(bc2) + eps
        new_p.append(p - (lrs[i] / bc1) * m / denom)
        new_m.append(m)
        new_v.append(v)
    return new_p, new_m, new_v


# ---------------------------------------------------------------------------------------------- contrastive

EPS = 1e-12  # d = sqrt(||x1 - x2||^2 + eps): finite loss and gradient where x1 == x2
REDUCTIONS = ("mean", "sum", "none")


def _float_check(t: Tensor, name: str, op: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in _FLOATS:
        raise TypeError(f"{op}: {name} has dtype {t.dtype}; supported: float32, float64, float16, bfloat16")


def _check_margin_eps(margin: float, eps: float, op: str) -> None:
    if not margin >= 0:
        raise ValueError(f"{op}: margin must be >= 0, got {margin}")
    if not eps >= 0:
        raise ValueError(f"{op}: eps must be >= 0, got {eps}")


def check_reduction(reduction: str, op: str) -> None:
    """Raises ValueError unless reduction is "mean", "sum" or "none"."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_pairs(x1: Tensor, x2: Tensor, same: Tensor | None, op: str) -> None:
    """Raises naming the argument unless x1, x2 are (B, D) of one float dtype and device and same is (B,)."""
    _float_check(x1, "x1", op)
    if x1.dim() != 2:
        raise ValueError(f"{op}: x1 must have shape (B, D), got {list(x1.shape)}")
    if not isinstance(x2, Tensor) or x2.shape != x1.shape:
        raise ValueError(f"{op}: x2 has shape {list(getattr(x2, 'shape', []))} but x1 has shape {list(x1.shape)}")
    if x2.dtype != x1.dtype:
        raise TypeError(f"{op}: x2 has dtype {x2.dtype} but x1 has dtype {x1.dtype}")
    if x2.device != x1.device:
        raise RuntimeError(f"{op}: x2 is on {x2.device} but x1 is on {x1.device}")
    if same is not None:
        if not isinstance(same, Tensor) or same.shape != x1.shape[:1]:
            shape = list(getattr(same, "shape", []))
            raise ValueError(f"{op}: same has shape {shape}, expected [{x1.shape[0]}] (one label per pair)")
        if same.device != x1.device:
            raise RuntimeError(f"{op}: same is on {same.device} but x1 is on {x1.device}")


def check_all_pairs(embeddings: Tensor, labels: Tensor, op: str = "contrastive_loss_all_pairs") -> None:
    """Raises naming the argument unless embeddings is (N >= 2, D) float and labels (N,) integer, one device."""
    _float_check(embeddings, "embeddings", op)
    if embeddings.dim() != 2:
        raise ValueError(f"{op}: embeddings must have shape (N, D), got {list(embeddings.shape)}")
    if embeddings.shape[0] < 2:
        raise ValueError(f"{op}: needs at least 2 embeddings to form a pair, got {embeddings.shape[0]}")
    if not isinstance(labels, Tensor) or labels.shape != embeddings.shape[:1]:
        shape = list(getattr(labels, "shape", []))
        raise ValueError(f"{op}: labels has shape {shape}, expected [{embeddings.shape[0]}] (one label per embedding)")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{op}: labels has dtype {labels.dtype}, expected an integer dtype")
    if labels.device != embeddings.device:
        raise RuntimeError(f"{op}: labels is on {labels.device} but embeddings is on {embeddings.device}")


def _pair_loss(sq: Tensor, same: Tensor, margin: float, eps: float) -> Tensor:
    """L = same * d^2 + (1 - same) * max(0, margin - d)^2 from sq = ||x1 - x2||^2, d = sqrt(sq + eps).

    The hinge term is taken only where same < 1, so that same pairs at distance 0 have a finite gradient
    even with eps = 0."""
    d2 = sq + eps
    dissimilar = same < 1
    hinge = torch.relu(margin - torch.where(dissimilar, d2, 1.0).sqrt())
    return same * d2 + torch.where(dissimilar, (1 - same) * hinge * hinge, 0.0)


def pairwise_distance(x1: Tensor, x2: Tensor, eps: float = EPS) -> Tensor:
    """d_b = sqrt(||x1_b - x2_b||^2 + eps): (B, D), (B, D) -> (B,), computed in float32 for half types."""
    check_pairs(x1, x2, None, "pairwise_distance")
    _check_margin_eps(0.0, eps, "pairwise_distance")
    acc = torch.promote_types(x1.dtype, torch.float32)
    diff = x1.to(acc) - x2.to(acc)
    return ((diff * diff).sum(1) + eps).sqrt().to(x1.dtype)


def contrastive_loss(
    x1: Tensor, x2: Tensor, same: Tensor, margin: float = 1.0, reduction: str = "mean", eps: float = EPS
) -> Tensor:
    """Contrastive loss of Hadsell, Chopra & LeCun (2006) over B pairs.

    L_b = same_b * d_b^2 + (1 - same_b) * max(0, margin - d_b)^2, d_b = sqrt(||x1_b - x2_b||^2 + eps).
    same_b = 1 for a pair of the same class (pulled together), 0 for different classes (pushed past the margin).
    Beware: the widely copied form (1 - y) d^2 + y max(0, m - d)^2 uses y = 1 for DISSIMILAR pairs.
    x1, x2: (B, D); same: (B,) bool, integer or float. Returns the mean or sum (0-d) or the (B,) losses.
    """
    op = "contrastive_loss"
    check_pairs(x1, x2, same, op)
    _check_margin_eps(margin, eps, op)
    check_reduction(reduction, op)
    acc = torch.promote_types(x1.dtype, torch.float32)
    diff = x1.to(acc) - x2.to(acc)
    losses = _pair_loss((diff * diff).sum(1), same.to(acc), margin, eps).to(x1.dtype)
    return losses.mean() if reduction == "mean" else losses.sum() if reduction == "sum" else losses


def contrastive_loss_all_pairs(embeddings: Tensor, labels: Tensor, margin: float = 1.0, eps: float = EPS) -> Tensor:
    """Mean contrastive loss over all N(N-1)/2 pairs i < j of embeddings (N, D), same = (labels_i == labels_j).

    The reference materialises the N x N distance matrix (squared distances by the matrix-product trick,
    ||e_i||^2 + ||e_j||^2 - 2 e_i.e_j clamped at 0, as torch.cdist computes them): O(N^2) memory.
    """
    op = "contrastive_loss_all_pairs"
    check_all_pairs(embeddings, labels, op)
    _check_margin_eps(margin, eps, op)
    acc = torch.promote_types(embeddings.dtype, torch.float32)
    e = embeddings.to(acc)
    norms = (e * e).sum(1)
    sq = (norms[:, None] + norms[None, :] - 2 * (e @ e.T)).clamp_min(0)
    same = (labels[:, None] == labels[None, :]).to(acc)
    n = e.shape[0]
    upper = torch.triu(torch.ones(n, n, dtype=torch.bool, device=e.device), diagonal=1)
    return _pair_loss(sq[upper], same[upper], margin, eps).mean().to(embeddings.dtype)


def batch_norm_double_backward(
    gy: Tensor, x: Tensor, weight: Tensor | None, ggx: Tensor | None, ggw: Tensor | None, ggb: Tensor | None,
    eps: float, needs: tuple[bool, bool, bool] = (True, True, True),
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:  # fmt: skip
    """Batch norm's double backward (training mode): the gradients (d_gy, d_x, d_weight) w.r.t. (gy, x, weight)
    of <ggx, gx> + <ggw, gw> + <ggb, gb>, where (gx, gw, gb) is batch norm's backward at x (N, C, *spatial) for
    the upstream gradient gy (x's shape), weight (C,) or None. Missing upstream gradients count as zeros; outputs
    not in `needs` (and d_weight without a weight) are None. Per channel, with x^ = (x - mean) r,
    r = (var + eps)^-1/2, M elements, s = w r, sums S:

        A     = S(ggx gy) - S(ggx) mean(gy) - S(ggx x^) S(gy x^) / M
        v     = ggw gy - s / M (ggx S(gy x^) + gy S(ggx x^))
        d gy  = s (ggx - mean(ggx) - x^ mean(ggx x^)) + ggw x^ + ggb
        d x   = r (v - mean(v) - x^ mean(v x^)) - s r A x^ / M
        d w   = r A

    (d x: v is the derivative w.r.t. x^ at fixed r, taken through x^(x); the last term through r(x).) The
    statistics are recomputed from x, in differentiable ops (half types in float32), so a further derivative is
    exact too; the kernel (fastmeta::batch_norm_double_backward) reads the forward's saved ones instead.
    """
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
    s = r if weight is None else r * weight.view(shape).to(r.dtype)
    d_gy = v = d_x = d_w = None
    if ggx is not None:
        s_ggx, s_gg, s_gy = total(ggx), total(ggx * normed), total(gy * normed)
        if needs[1] or needs[2]:
            A = total(ggx * gy) - s_ggx * (total(gy) / M) - s_gg * s_gy / M
            d_w = (r * A).view(-1) if weight is not None and needs[2] else None
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
        None if d_w is None else d_w.to(weight.dtype),
    )
