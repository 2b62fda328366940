"""fastmeta::batch_norm_double_backward (batch norm's backward differentiated again) against the reference, and
its use by the runner's batch norm (fastmeta/algorithms/_norm.py)."""

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode

import fastmeta
from fastmeta import reference
from fastmeta.algorithms import _norm

KERNELS = fastmeta.kernels_available()
needs_kernels = pytest.mark.skipif(not KERNELS, reason="needs the compiled kernels")
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
TOL = {
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=1e-1, atol=1e-1),  # 8-bit mantissas, the CPU's saved statistics rounded too
}
EPS = 1e-5


def inputs(shape, dtype, device, layout="contiguous", weight=True, ggx=True, ggw=True, ggb=True):
    """(gy, x, weight, mean, rstd, ggx, ggw, ggb) with the forward's saved statistics, x not centred."""

    def make(*s):
        return (torch.randn(s, dtype=torch.float64) * 1.5 + 0.7).to(dtype=dtype, device=device)

    x, gy, gg = make(*shape), make(*shape), make(*shape)
    if layout == "channels_last":
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        x, gy, gg = (t.contiguous(memory_format=fmt) for t in (x, gy, gg))
    elif layout == "strided":  # every second element of a larger tensor, and gy transposed in memory
        x = torch.cat([x, make(*shape)], -1)[..., : shape[-1]]
        gy = gy.transpose(0, -1).contiguous().transpose(0, -1)
    C = shape[1]
    w = make(C) if weight else None
    _, mean, rstd = torch.ops.aten.native_batch_norm(x, w, None, None, None, True, 0.0, EPS)
    return gy, x, w, mean, rstd, gg if ggx else None, make(C) if ggw else None, make(C) if ggb else None


def expected(gy, x, w, mean, rstd, ggx, ggw, ggb):
    """The reference in float64, missing outputs as zeros (the kernel returns all three); without a weight,
    d_weight is the gradient w.r.t. a weight of ones."""
    d = lambda t: None if t is None else t.double()  # noqa: E731
    w = torch.ones(x.shape[1], dtype=torch.float64, device=x.device) if w is None else w
    out = reference.batch_norm_double_backward(d(gy), d(x), d(w), d(ggx), d(ggw), d(ggb), EPS)
    likes = (gy, x, x.new_empty(x.shape[1]))
    return [torch.zeros_like(t, dtype=torch.float64) if o is None else o for o, t in zip(out, likes)]


SHAPES = [(5, 7, 6, 6), (2, 3), (4, 5, 9), (2, 3, 4, 5, 3), (1, 4, 1, 1), (3, 1, 5, 5), (33, 6, 7, 3), (5, 130, 3)]


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(device, shape, dtype):
    args = inputs(shape, dtype, device)
    got = torch.ops.fastmeta.batch_norm_double_backward(*args)
    for g, e, like in zip(got, expected(*args), (args[0], args[1], args[2])):
        assert g.shape == like.shape and g.dtype == dtype and g.device == like.device
        tol = dict(TOL[dtype])  # half types: the saved statistics are rounded too, so relative to the scale
        tol["atol"] *= max(1.0, float(e.abs().max())) if dtype in (torch.float16, torch.bfloat16) else 1.0
        assert_close(g.double(), e, **tol)


@needs_kernels
@pytest.mark.parametrize("layout", ["channels_last", "strided"])
@pytest.mark.parametrize("shape", [(4, 6, 5, 7), (2, 3, 4, 5, 3)], ids=str)
def test_layouts(device, shape, layout):
    args = inputs(shape, torch.float64, device, layout)
    got = torch.ops.fastmeta.batch_norm_double_backward(*args)
    for g, e in zip(got, expected(*args)):
        assert_close(g, e, **TOL[torch.float64])
    if layout == "channels_last" and device == "cpu":  # the CPU kernel keeps it (no copy of x and gy)
        assert not got[0].is_contiguous() and got[0].stride(1) == 1 and got[1].stride(1) == 1


@needs_kernels
@pytest.mark.parametrize("missing", ["weight", "ggx", "ggw", "ggb", "ggw+ggb", "ggx+ggb", "all"], ids=str)
def test_missing_arguments_count_as_zeros_and_ones(device, missing):
    names = ("weight", "ggx", "ggw", "ggb") if missing == "all" else missing.split("+")
    args = inputs((4, 5, 3, 3), torch.float64, device, **{n: False for n in names})
    got = torch.ops.fastmeta.batch_norm_double_backward(*args)
    for g, e in zip(got, expected(*args)):
        assert_close(g, e, **TOL[torch.float64])
    if args[2] is None:  # d_weight without a weight: (C,) in x's dtype
        assert got[2].shape == (5,) and got[2].dtype == torch.float64


@needs_kernels
@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (3, 0, 2, 2), (2, 4, 0)], ids=str)
def test_empty(device, shape):
    x = torch.randn(shape, device=device)
    C = shape[1]
    stats = torch.zeros(C, device=device), torch.ones(C, device=device)
    w = torch.randn(C, device=device)
    d_gy, d_x, d_w = torch.ops.fastmeta.batch_norm_double_backward(x, x, w, *stats, x, w, w)
    assert d_gy.shape == d_x.shape == shape and d_w.shape == (C,)
    assert torch.equal(d_w, torch.zeros_like(d_w))


@needs_kernels
def test_opcheck(device):
    args = inputs((4, 6, 5, 5), torch.float32, device)
    torch.library.opcheck(torch.ops.fastmeta.batch_norm_double_backward.default, args)
    args = inputs((3, 5, 4, 4), torch.float32, device, "channels_last", weight=False, ggw=False)
    torch.library.opcheck(torch.ops.fastmeta.batch_norm_double_backward.default, args)


@needs_kernels
@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.__setitem__(0, a[0][:, :-1]), "gy has shape"),
        (lambda a: a.__setitem__(5, a[5].double()), "ggx has dtype"),
        (lambda a: a.__setitem__(3, a[3][:-1]), r"mean must have shape \(C,\)"),
        (lambda a: a.__setitem__(4, a[4].view(1, -1)), r"rstd must have shape \(C,\)"),
        (lambda a: a.__setitem__(2, a[2].repeat(2)), r"weight must have shape \(C,\)"),
        (lambda a: a.__setitem__(6, a[6][:2]), r"ggw must have shape \(C,\)"),
        (lambda a: a.__setitem__(7, a[7].long()), "ggb must be a floating tensor"),
        (lambda a: a.__setitem__(1, a[1].int()), "x must be float16, bfloat16, float32 or float64"),
        (lambda a: [a.__setitem__(i, a[i].sum((0, 2, 3))) for i in (0, 1, 5)], r"x must have shape \(N, C"),
    ],
)
def test_bad_input(device, change, message):
    args = list(inputs((3, 4, 2, 2), torch.float32, device))
    change(args)
    if args[1].dim() == 1:
        args[1], args[0], args[5] = args[1][0], args[0][0], args[5][0]  # 0-d x
    with pytest.raises((ValueError, TypeError), match=message):
        torch.ops.fastmeta.batch_norm_double_backward(*args)


class _Calls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.name())
        return func(*args, **(kwargs or {}))


def _second_order(norm, x, w, b, create_graph=False):
    """Gradients w.r.t. (x, w, b) of a function of batch norm's gradients (what second-order MAML computes)."""
    y = norm(x, w, b)
    gx, gw = torch.autograd.grad((y.square() * torch.linspace(0, 1, y.numel()).view_as(y)).sum(), (x, w),
                                 create_graph=True)  # fmt: skip
    outer = (gx.sin() * x).sum() + (gw * gw).sum()
    return torch.autograd.grad(outer, (x, w, b), create_graph=create_graph, allow_unused=True)


@needs_kernels
@pytest.mark.parametrize("shape", [(5, 4, 6, 6), (6, 3), (3, 2, 4, 4, 2)], ids=str)
def test_runner_batch_norm_second_order_through_the_kernel(shape):
    """_norm.batch_norm differentiated twice calls the kernel once (no create_graph) and gives F.batch_norm's
    gradients in float64; under create_graph it takes the differentiable formula instead."""
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    w = torch.randn(shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.randn(shape[1], dtype=torch.float64, requires_grad=True)
    with _Calls() as calls:
        ours = _second_order(lambda *a: _norm.batch_norm(*a, EPS), x, w, b)
    assert calls.names.count("fastmeta::batch_norm_double_backward") == 1
    torchs = _second_order(lambda x, w, b: F.batch_norm(x, None, None, w, b, True, 0.0, EPS), x, w, b)
    for o, t in zip(ours, torchs):
        assert_close(o, t, rtol=1e-9, atol=1e-9)
    with _Calls() as calls:
        again = _second_order(lambda *a: _norm.batch_norm(*a, EPS), x, w, b, create_graph=True)
    assert "fastmeta::batch_norm_double_backward" not in calls.names
    for o, t in zip(again, ours):
        assert_close(o, t, rtol=1e-12, atol=1e-12)
