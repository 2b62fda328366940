"""fastmeta.ops pairwise_distance / contrastive_loss / contrastive_loss_all_pairs against the reference."""

import pytest
import torch
from torch.testing import assert_close

import fastmeta
from fastmeta import ops, reference

KERNELS = fastmeta.kernels_available()
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float64: dict(rtol=1e-11, atol=1e-11),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}


def pairs(B, D, dtype=torch.float32, device="cpu", requires_grad=False, scale=1.0):
    x1 = (torch.randn(B, D, dtype=torch.float64) * scale).to(dtype=dtype, device=device)
    x2 = (torch.randn(B, D, dtype=torch.float64) * scale).to(dtype=dtype, device=device)
    same = (torch.rand(B) < 0.5).to(device)
    return x1.requires_grad_(requires_grad), x2.requires_grad_(requires_grad), same


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,D", [(0, 4), (1, 1), (7, 5), (300, 128), (33, 129), (5, 0)])
def test_pairwise_distance_matches_reference(device, dtype, B, D):
    x1, x2, _ = pairs(B, D, dtype, device)
    got = ops.pairwise_distance(x1, x2)
    assert got.shape == (B,) and got.dtype == dtype
    assert_close(got, reference.pairwise_distance(x1, x2), **TOL[dtype])
    assert_close(
        reference.pairwise_distance(x1.double(), x2.double()),
        torch.nn.functional.pairwise_distance(x1.double(), x2.double(), eps=0.0),
        rtol=1e-6,
        atol=1e-6,
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("B,D", [(1, 3), (64, 16), (257, 130)])
@pytest.mark.parametrize("margin", [0.0, 1.0, 5.0])
def test_contrastive_loss_matches_reference(device, dtype, reduction, B, D, margin):
    x1, x2, same = pairs(B, D, dtype, device, scale=0.3)
    got = ops.contrastive_loss(x1, x2, same, margin, reduction)
    want = reference.contrastive_loss(x1, x2, same, margin, reduction)
    assert got.shape == want.shape and got.dtype == dtype
    assert_close(got, want, **TOL[dtype])


def test_contrastive_loss_is_the_textbook_formula():
    x1 = torch.tensor([[0.0, 0.0], [0.0, 0.0], [3.0, 4.0]], dtype=torch.float64)
    x2 = torch.tensor([[0.3, 0.4], [0.3, 0.4], [0.0, 0.0]], dtype=torch.float64)
    same = torch.tensor([1, 0, 0])
    # d = 0.5, 0.5, 5; same pair: d^2; different pairs: max(0, 2 - d)^2
    want = torch.tensor([0.25, 1.5**2, 0.0], dtype=torch.float64)
    assert_close(ops.contrastive_loss(x1, x2, same, 2.0, "none", eps=0.0), want)
    assert_close(reference.contrastive_loss(x1, x2, same, 2.0, "none", eps=0.0), want)


@pytest.mark.parametrize("same_dtype", [torch.bool, torch.int64, torch.float32])
def test_same_labels_of_any_dtype(device, same_dtype):
    x1, x2, same = pairs(9, 4, device=device)
    a = ops.contrastive_loss(x1, x2, same.to(same_dtype))
    assert_close(a, reference.contrastive_loss(x1, x2, same.float()))


def test_identical_points_give_finite_loss_and_gradient(device):
    x = torch.randn(6, 8, dtype=torch.float64, device=device)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    same = torch.tensor([1, 0, 1, 0, 1, 0], device=device)
    loss = ops.contrastive_loss(x1, x2, same, 1.0, "sum")
    g1, g2 = torch.autograd.grad(loss, (x1, x2))
    assert torch.isfinite(loss) and torch.isfinite(g1).all() and torch.isfinite(g2).all()
    assert_close(loss, torch.tensor(3 * 1e-12 + 3 * (1 - 1e-6) ** 2, dtype=torch.float64, device=device))
    d = ops.pairwise_distance(x1, x2)
    (gd,) = torch.autograd.grad(d.sum(), x1)
    assert torch.isfinite(gd).all()


def test_non_contiguous(device):
    base1, base2 = torch.randn(16, 40, device=device), torch.randn(40, 16, device=device)
    x1, x2 = base1[:, ::2], base2.t()[:, 5:25]
    same = (torch.rand(32, device=device) < 0.5)[::2]
    assert not x1.is_contiguous() and not x2.is_contiguous() and not same.is_contiguous()
    assert_close(ops.contrastive_loss(x1, x2, same, 2.0), reference.contrastive_loss(x1, x2, same, 2.0))
    assert_close(ops.pairwise_distance(x1, x2), reference.pairwise_distance(x1, x2))
    e = torch.randn(30, 12, device=device).t()
    labels = torch.randint(0, 3, (24,), device=device)[::2]
    assert_close(ops.contrastive_loss_all_pairs(e, labels), reference.contrastive_loss_all_pairs(e, labels))


@pytest.mark.parametrize("margin", [0.5, 3.0])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_pair_mode(device, margin, reduction):
    x1, x2, same = pairs(6, 5, torch.float64, device, requires_grad=True)

    def loss(a, b):
        return ops.contrastive_loss(a, b, same, margin, reduction)

    assert torch.autograd.gradcheck(loss, (x1, x2))
    assert torch.autograd.gradgradcheck(loss, (x1, x2))
    assert torch.autograd.gradcheck(ops.pairwise_distance, (x1, x2))
    assert torch.autograd.gradgradcheck(ops.pairwise_distance, (x1, x2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_pair_mode_gradients_match_reference(device, dtype):
    x1, x2, same = pairs(300, 64, dtype, device, requires_grad=True, scale=0.1)
    got = torch.autograd.grad(ops.contrastive_loss(x1, x2, same, 1.0, "sum"), (x1, x2))
    want = torch.autograd.grad(reference.contrastive_loss(x1, x2, same, 1.0, "sum"), (x1, x2))
    for a, b in zip(got, want):
        assert_close(a.float(), b.float(), **TOL[dtype])


# --------------------------------------------------------------------------------------------- all pairs


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,D,classes", [(2, 3, 1), (3, 1, 3), (50, 7, 4), (129, 64, 10)])
def test_all_pairs_matches_reference(device, dtype, N, D, classes):
    e = (torch.randn(N, D, dtype=torch.float64) * 0.5).to(dtype=dtype, device=device).requires_grad_()
    labels = torch.randint(0, classes, (N,), device=device)
    got = ops.contrastive_loss_all_pairs(e, labels, 1.5)
    want = reference.contrastive_loss_all_pairs(e, labels, 1.5)
    assert got.shape == () and got.dtype == dtype
    assert_close(got, want, **TOL[dtype])
    ga, gb = torch.autograd.grad(got, e)[0], torch.autograd.grad(want, e)[0]
    assert_close(ga.float(), gb.float(), **TOL[dtype])


def test_all_pairs_is_the_mean_over_pairs_of_the_pair_loss():
    """Definition check against pair mode: every i<j pair listed explicitly."""
    e = torch.randn(11, 4, dtype=torch.float64)
    labels = torch.randint(0, 3, (11,))
    i, j = torch.triu_indices(11, 11, offset=1)
    want = reference.contrastive_loss(e[i], e[j], labels[i] == labels[j], 2.0)
    assert_close(ops.contrastive_loss_all_pairs(e, labels, 2.0), want, rtol=1e-10, atol=1e-10)


def test_all_pairs_across_many_tiles(device):
    """N larger than two tiles (1024 on the CPU), ragged last tile: forward and gradient."""
    e = (torch.randn(2500, 8, dtype=torch.float64) * 0.3).to(device).requires_grad_()
    labels = torch.randint(0, 40, (2500,), device=device)
    got = ops.contrastive_loss_all_pairs(e, labels, 1.0)
    want = reference.contrastive_loss_all_pairs(e, labels, 1.0)
    assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert_close(torch.autograd.grad(got, e)[0], torch.autograd.grad(want, e)[0], rtol=1e-9, atol=1e-13)


def test_gradcheck_all_pairs(device):
    e = torch.randn(9, 3, dtype=torch.float64, device=device, requires_grad=True)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 2, 2, 1], device=device)
    assert torch.autograd.gradcheck(lambda x: ops.contrastive_loss_all_pairs(x, labels, 2.5), (e,))
    assert torch.autograd.gradgradcheck(lambda x: ops.contrastive_loss_all_pairs(x, labels, 2.5), (e,))


def test_nan_propagates(device):
    x1, x2, same = pairs(4, 3, device=device)
    x1[1, 2] = float("nan")
    out = ops.contrastive_loss(x1, x2, same, 1.0, "none")
    assert torch.isnan(out[1]) and torch.isfinite(out[[0, 2, 3]]).all()
    assert torch.isnan(ops.pairwise_distance(x1, x2)[1])
    e = torch.randn(5, 3, device=device)
    e[3, 0] = float("inf")
    assert not torch.isfinite(ops.contrastive_loss_all_pairs(e, torch.tensor([0, 1, 0, 1, 0], device=device)))


# -------------------------------------------------------------------------------------- opcheck / compile


@pytest.mark.skipif(not KERNELS, reason="needs the compiled kernels")
def test_opcheck(device):
    x1, x2, same = pairs(12, 5, device=device, requires_grad=True)
    s = same.float()
    torch.library.opcheck(torch.ops.fastmeta.pairwise_distance.default, (x1, x2, 1e-12))
    torch.library.opcheck(torch.ops.fastmeta.contrastive_loss.default, (x1, x2, s, 1.0, 1e-12))
    g = torch.randn(12, device=device)
    torch.library.opcheck(
        torch.ops.fastmeta.contrastive_loss_backward.default, (g, x1.detach(), x2.detach(), s, 1.0, 1e-12)
    )
    e = torch.randn(20, 6, device=device, requires_grad=True)
    labels = torch.randint(0, 3, (20,), device=device)
    torch.library.opcheck(torch.ops.fastmeta.contrastive_loss_all_pairs.default, (e, labels, 1.0, 1e-12))
    torch.library.opcheck(
        torch.ops.fastmeta.contrastive_loss_all_pairs_backward.default,
        (torch.tensor(0.7, device=device), e.detach(), labels, 1.0, 1e-12),
    )


@pytest.mark.skipif(not KERNELS, reason="needs the compiled kernels")
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])  # inductor: the default, what users get
def test_torch_compile_fullgraph(device, backend):
    x1, x2, same = pairs(32, 8, device=device, requires_grad=True)
    e = torch.randn(40, 8, device=device, requires_grad=True)
    labels = torch.randint(0, 4, (40,), device=device)

    def f(x1, x2, e):
        return ops.contrastive_loss(x1, x2, same, 1.0) + ops.contrastive_loss_all_pairs(e, labels, 2.0)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend=backend)
    got = torch.autograd.grad(compiled(x1, x2, e), (x1, x2, e))
    want = torch.autograd.grad(f(x1, x2, e), (x1, x2, e))
    for a, b in zip(got, want):
        assert_close(a, b)


def test_torch_func_grad_uses_the_reference():
    x1, x2, same = pairs(5, 3, torch.float64)
    got = torch.func.grad(lambda a: ops.contrastive_loss(a, x2, same, 2.0))(x1)
    want = torch.autograd.grad(reference.contrastive_loss(x1.requires_grad_(), x2, same, 2.0), x1)[0]
    assert_close(got, want)


# --------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("impl", [ops, reference], ids=["ops", "reference"])
def test_bad_input(impl):
    x1, x2, same = pairs(4, 3)
    e, labels = torch.randn(5, 2), torch.tensor([0, 1, 0, 1, 1])
    cases = [
        (ValueError, r"x2 has shape \[4, 2\]", lambda: impl.contrastive_loss(x1, x2[:, :2], same)),
        (ValueError, r"x1 must have shape \(B, D\)", lambda: impl.pairwise_distance(x1[0], x2[0])),
        (ValueError, r"same has shape \[3\]", lambda: impl.contrastive_loss(x1, x2, same[:3])),
        (TypeError, "x2 has dtype torch.float64", lambda: impl.contrastive_loss(x1, x2.double(), same)),
        (TypeError, "x1 has dtype torch.int64", lambda: impl.pairwise_distance(x1.long(), x2.long())),
        (ValueError, "margin must be >= 0", lambda: impl.contrastive_loss(x1, x2, same, -1.0)),
        (ValueError, "reduction must be one of", lambda: impl.contrastive_loss(x1, x2, same, 1.0, "avg")),
        (ValueError, r"labels has shape \[4\]", lambda: impl.contrastive_loss_all_pairs(e, labels[:4])),
        (TypeError, "labels has dtype torch.float32", lambda: impl.contrastive_loss_all_pairs(e, labels.float())),
        (ValueError, "at least 2 embeddings", lambda: impl.contrastive_loss_all_pairs(e[:1], labels[:1])),
        (ValueError, "margin must be >= 0", lambda: impl.contrastive_loss_all_pairs(e, labels, -0.5)),
    ]
    for exc, pattern, call in cases:
        with pytest.raises(exc, match=pattern):
            call()


def test_same_pairs_at_distance_zero_have_finite_gradient_without_eps(device):
    x = torch.randn(4, 3, dtype=torch.float64, device=device)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    same = torch.ones(4, device=device)
    for impl in (ops, reference):
        g1, g2 = torch.autograd.grad(impl.contrastive_loss(x1, x2, same, 1.0, "sum", eps=0.0), (x1, x2))
        assert_close(g1, torch.zeros_like(g1))
        assert_close(g2, torch.zeros_like(g2))
