"""Every place an op's derivative is written (listed at the top of fastmeta/ops.py), run on the same inputs and
compared: a formula fixed in one place and not in another fails here."""

import pytest
import torch
from torch.testing import assert_close

import fastmeta
from fastmeta import ops, reference

KERNELS = fastmeta.kernels_available()
pytestmark = pytest.mark.skipif(not KERNELS, reason="the kernel paths need the compiled kernels")
SHAPES = [(3, 4), (5,), (2, 1, 3)]
T = 3


def _inputs(shared: bool, seed: int = 0):
    """float64 params (shared S_i or per task), grads, per-element lrs and per-task decays, all requiring grad."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()

    params = [r(*s) if shared else r(T, *s) for s in SHAPES]
    grads = [r(T, *s) for s in SHAPES]
    lrs = [r(*s) for s in SHAPES]  # Meta-SGD: per element
    decays = [r(T, *s) for s in SHAPES]  # Meta-LSTM forget gate: per task and element
    weights = [torch.randn(T, *s, generator=g, dtype=torch.float64) for s in SHAPES]  # the cotangent
    return params, grads, lrs, decays, weights


def _vjp(fn, params, grads, lrs, decays, weights, create_graph=False):
    out = fn(params, grads, lrs, decays)
    loss = sum((o * w).sum() for o, w in zip(out, weights))
    return torch.autograd.grad(loss, params + grads + lrs + decays, create_graph=create_graph)


@pytest.mark.parametrize("shared", [False, True], ids=["per-task params", "shared params"])
def test_every_backward_path_agrees(shared):
    params, grads, lrs, decays, weights = _inputs(shared)
    leaves = params + grads + lrs + decays
    want = _vjp(reference.fast_weight_update, params, grads, lrs, decays, weights)  # the definition

    # 1. C++ autograd, plain backward: the fused backward kernel (csrc/cpu/fast_weight_update.cpp backward_kernel).
    kernel = _vjp(ops.fast_weight_update, params, grads, lrs, decays, weights)
    # 2. C++ autograd under create_graph: its ATen formulas (csrc/autograd/fast_weight_update.cpp).
    formulas = _vjp(ops.fast_weight_update, params, grads, lrs, decays, weights, create_graph=True)
    # 3. The backward op called directly, as _FastWeightUpdate.backward does without grad mode.
    n = len(params)
    direct = torch.ops.fastmeta.fast_weight_update_backward(weights, params, grads, lrs, decays, 1.0, 1.0, [True] * 4)
    # 4. The Python formula (_FastWeightUpdate.backward under grad mode: double backward inside torch.func).
    python = ops._backward_formula(weights, params, grads, lrs, decays, 1.0, 1.0, [True] * 4)
    # 5. torch.func.grad: _FastWeightUpdate (setup_context, backward).
    functional = torch.func.grad(
        lambda ts: sum((o * w).sum() for o, w in zip(ops.fast_weight_update(*_split(ts, n)), weights))
    )([t.detach() for t in leaves])
    for name, got in [
        ("kernel", kernel),
        ("C++ formulas", formulas),
        ("backward op", [t for part in direct for t in part]),
        ("python formula", [t for part in python for t in part]),
        ("torch.func.grad", functional),
    ]:
        assert len(got) == len(want), name
        for i, (a, b) in enumerate(zip(got, want)):
            assert_close(a, b, rtol=1e-12, atol=1e-12, msg=lambda m, name=name, i=i: f"{name}, input {i}: {m}")

    # 6. Forward mode: _FastWeightUpdate.jvp, checked by <w, J t> = <J^T w, t> against the reference's VJP.
    tangents = [torch.randn_like(t) for t in leaves]
    _, jvp_out = torch.func.jvp(
        lambda *ts: tuple(ops.fast_weight_update(*_split(ts, n))), tuple(t.detach() for t in leaves), tuple(tangents)
    )
    lhs = sum((w * j).sum() for w, j in zip(weights, jvp_out))
    rhs = sum((g * t).sum() for g, t in zip(want, tangents))
    assert_close(lhs, rhs, rtol=1e-12, atol=1e-12)

    # 7. Double backward: differentiating each first-order gradient again, against the reference's.
    probe = [torch.randn_like(t) for t in leaves]

    def second(fn):
        first = _vjp(fn, params, grads, lrs, decays, weights, create_graph=True)
        total = sum((f * p).sum() for f, p in zip(first, probe))
        return torch.autograd.grad(total, leaves, allow_unused=True, materialize_grads=True)

    for a, b in zip(second(ops.fast_weight_update), second(reference.fast_weight_update)):
        assert_close(a, b, rtol=1e-12, atol=1e-12)


def _split(ts, n):
    ts = list(ts)
    return ts[:n], ts[n : 2 * n], ts[2 * n : 3 * n], ts[3 * n : 4 * n]


def test_contrastive_backward_paths_agree():
    g = torch.Generator().manual_seed(1)
    x1, x2 = (torch.randn(6, 4, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))
    same = torch.tensor([1, 0, 1, 0, 0, 1])
    e = torch.randn(9, 4, generator=g, dtype=torch.float64).requires_grad_()
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2])
    cases = [
        ("pairwise_distance", lambda mod, a, b: mod.pairwise_distance(a, b).square().sum(), (x1, x2)),
        ("contrastive_loss", lambda mod, a, b: mod.contrastive_loss(a, b, same, 2.0, "sum"), (x1, x2)),
        ("all pairs", lambda mod, a: mod.contrastive_loss_all_pairs(a, labels, 2.5), (e,)),
    ]
    for name, f, inputs in cases:
        want = torch.autograd.grad(f(reference, *inputs), inputs, create_graph=True)
        kernel = torch.autograd.grad(f(ops, *inputs), inputs)  # the backward kernels
        double = torch.autograd.grad(f(ops, *inputs), inputs, create_graph=True)  # through the reference
        functional = torch.func.grad(lambda *ts, f=f: f(ops, *ts), argnums=tuple(range(len(inputs))))(
            *(t.detach() for t in inputs)
        )
        for label, got in (("kernel", kernel), ("double-backward path", double), ("torch.func", functional)):
            for a, b in zip(got, want):
                assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m, n=name, lb=label: f"{n}, {lb}: {m}")
        probe = [torch.randn_like(t) for t in inputs]
        hv = torch.autograd.grad(sum((d * p).sum() for d, p in zip(double, probe)), inputs)
        hv_want = torch.autograd.grad(sum((d * p).sum() for d, p in zip(want, probe)), inputs)
        for a, b in zip(hv, hv_want):
            assert_close(a, b, rtol=1e-10, atol=1e-12)
