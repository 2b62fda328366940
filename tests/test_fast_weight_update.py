"""fastmeta.ops.fast_weight_update: kernels against the reference, autograd, torch.func, compile, bad input."""

import os
import subprocess
import sys

import pytest
import torch
from torch.testing import assert_close

import fastmeta
from fastmeta import ops, reference
from fastmeta.ops import fast_weight_update as fwu

CONV4 = [(64, 1, 3, 3), (64,), (64,), (64,)] + [(64, 64, 3, 3), (64,), (64,), (64,)] * 3 + [(5, 64), (5,)]
MLP = [(40, 1), (40,), (40, 40), (40,), (1, 40), (1,)]
ODD = [(3, 5, 7), (1,), (13,), (), (2, 1, 9)]
EMPTY = [(0, 3), (5,), (4, 0)]
SHAPE_SETS = {"conv4": CONV4, "mlp": MLP, "odd": ODD, "zero-size": EMPTY}
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float16: dict(rtol=1e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=1e-2, atol=1e-2),
}
KERNELS = fastmeta.kernels_available()


def make(shapes, T, shared, dtype=torch.float32, device="cpu", requires_grad=False):
    params = [torch.randn((*(() if shared else (T,)), *s), dtype=dtype, device=device) for s in shapes]
    grads = [torch.randn((T, *s), dtype=dtype, device=device) for s in shapes]
    for t in params + grads:
        t.requires_grad_(requires_grad)
    return params, grads


def coefs(form, grads, requires_grad=False, positive=True):
    """lr/decay in one of the documented forms, for grads[i] of shape (T, *S_i)."""
    dtype, device = grads[0].dtype, grads[0].device

    def t(shape):
        x = torch.rand(shape, dtype=dtype, device=device) + (0.1 if positive else -0.5)
        return x.requires_grad_(requires_grad)

    if form == "none":
        return None
    if form == "float":
        return 0.37
    if form == "tensor0d":
        return t(())
    if form == "per_layer":
        return [t(()) for _ in grads]
    if form == "numbers":
        return [0.1 * (i + 1) for i in range(len(grads))]
    if form == "per_element":
        return [t(g.shape[1:]) for g in grads]
    if form == "per_task_element":
        return [t(g.shape) for g in grads]
    if form == "per_task":  # (T, 1, ..., 1): broadcast, expanded by ops
        return [t((g.shape[0],) + (1,) * (g.dim() - 1)) for g in grads]
    if form == "leading_one":  # (1, *S)
        return [t((1, *g.shape[1:])) for g in grads]
    raise ValueError(form)


LR_FORMS = ["float", "tensor0d", "per_layer", "numbers", "per_element", "per_task_element", "per_task", "leading_one"]
DECAY_FORMS = ["none", "float", "per_layer", "per_element", "per_task_element"]


def test_kernels_are_loaded():
    if os.environ.get("FASTMETA_DISABLE_KERNELS") == "1":
        pytest.skip("kernels disabled by FASTMETA_DISABLE_KERNELS=1")
    info = fastmeta.kernels_info()
    assert info["available"], info["error"]
    assert KERNELS
    assert hasattr(torch.ops.fastmeta, "fast_weight_update")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")
def test_cuda_kernels_are_loaded_where_a_gpu_is_visible():
    from conftest import _require_cuda_kernels

    _require_cuda_kernels()
    assert fastmeta.kernels_available("cuda")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shapes", SHAPE_SETS.values(), ids=SHAPE_SETS.keys())
@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_task"])
def test_forward_matches_reference(device, dtype, shapes, T, shared):
    params, grads = make(shapes, T, shared, dtype, device)
    out = fwu(params, grads, 0.4)
    ref = reference.fast_weight_update(params, grads, 0.4)
    assert len(out) == len(ref)
    for o, r, g in zip(out, ref, grads):
        assert o.shape == g.shape and o.dtype == dtype and o.device == g.device
        assert_close(o, r, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lr_form", LR_FORMS)
@pytest.mark.parametrize("decay_form", DECAY_FORMS)
def test_coefficient_forms_match_reference(device, dtype, lr_form, decay_form):
    params, grads = make(ODD + MLP[:2], 3, shared=lr_form != "per_task", dtype=dtype, device=device)
    lr, decay = coefs(lr_form, grads), coefs(decay_form, grads)
    out = fwu(params, grads, lr, decay)
    ref = reference.fast_weight_update(params, grads, lr, decay)
    for o, r in zip(out, ref):
        assert_close(o, r, **TOL[dtype])


def test_matches_plain_formula():
    """The reference itself against the textbook formula, so the oracle is not checked only against itself."""
    p, g = torch.randn(2, 3, dtype=torch.float64), torch.randn(4, 2, 3, dtype=torch.float64)
    lr, d = torch.rand(2, 3, dtype=torch.float64), torch.rand((), dtype=torch.float64)
    expected = d * p.unsqueeze(0) - lr.unsqueeze(0) * g
    assert_close(fwu([p], [g], [lr], [d])[0], expected, rtol=1e-14, atol=1e-14)
    assert_close(reference.fast_weight_update([p], [g], [lr], [d])[0], expected, rtol=1e-14, atol=1e-14)
    assert_close(fwu([p], [g], 0.5)[0], p - 0.5 * g)


def test_empty_list(device):
    assert fwu([], [], 0.1) == []
    assert fwu([], [], [], []) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_non_contiguous_inputs(device, dtype):
    T = 4
    base_p = torch.randn(7, 6, dtype=dtype, device=device)
    base_g = torch.randn(6, T, 7, dtype=dtype, device=device)
    p = base_p.t()  # (6, 7) shared, transposed
    g = base_g.transpose(0, 1)  # (T, 6, 7)
    p2 = torch.randn(T, 10, 3, dtype=dtype, device=device)[:, ::2]  # (T, 5, 3) strided
    g2 = torch.randn(T, 5, 6, dtype=dtype, device=device)[..., ::2]
    lr = [torch.rand(7, 6, dtype=dtype, device=device).t(), torch.rand(T, 5, 3, dtype=dtype, device=device)]
    assert not p.is_contiguous() and not g.is_contiguous() and not p2.is_contiguous()
    out = fwu([p, p2], [g, g2], lr)
    ref = reference.fast_weight_update([p, p2], [g, g2], lr)
    for o, r in zip(out, ref):
        assert_close(o, r, **TOL[dtype])


def test_large_tensor_spanning_many_work_units(device):
    """One tensor much bigger than a work unit, shared over tasks, beside tiny ones."""
    shapes = [(3, 70001), (1,), (2, 2)]
    params, grads = make(shapes, 3, shared=True, device=device)
    lr = coefs("per_element", grads)
    for o, r in zip(fwu(params, grads, lr), reference.fast_weight_update(params, grads, lr)):
        assert_close(o, r)


# ---------------------------------------------------------------------------------------------- autograd


@pytest.mark.parametrize(
    "lr_form,decay_form,shared",
    [("float", "none", False), ("per_element", "float", True), ("per_task_element", "per_task_element", False)],
)
@pytest.mark.parametrize("T", [1, 7, 40])
def test_gradients_of_large_tensors(device, lr_form, decay_form, shared, T):
    """Tensors larger than a work unit (whole rows, pieces of rows, column blocks) next to tiny ones."""
    shapes = [(70001,), (3, 1500), (5,), (2, 33000)]
    params, grads = make(shapes, T, shared, torch.float32, device, requires_grad=True)
    lr, decay = coefs(lr_form, grads, requires_grad=True), coefs(decay_form, grads, requires_grad=True)
    leaves = params + grads + [c for c in (lr, decay) if isinstance(c, list) for c in c]
    gos = [torch.randn_like(g) for g in grads]
    got = torch.autograd.grad(fwu(params, grads, lr, decay), leaves, gos)
    want = torch.autograd.grad(reference.fast_weight_update(params, grads, lr, decay), leaves, gos)
    for a, b in zip(got, want):
        assert_close(a, b, rtol=1e-4, atol=1e-4)


def _flat_inputs(shapes, T, shared, lr_form, decay_form, dtype=torch.float64, device="cpu"):
    params, grads = make(shapes, T, shared, dtype, device, requires_grad=True)
    lr = coefs(lr_form, grads, requires_grad=True)
    decay = coefs(decay_form, grads, requires_grad=True)
    leaves = params + grads
    for c in (lr, decay):
        if isinstance(c, torch.Tensor):
            leaves.append(c)
        elif isinstance(c, list):
            leaves += [x for x in c if isinstance(x, torch.Tensor)]
    return params, grads, lr, decay, leaves


GRAD_CASES = [
    ("float", "none", True),
    ("float", "none", False),
    ("per_layer", "per_layer", True),
    ("per_element", "per_element", True),
    ("per_task_element", "per_task_element", False),
    ("per_task", "float", True),
    ("tensor0d", "per_element", False),
]


@pytest.mark.parametrize("lr_form,decay_form,shared", GRAD_CASES)
def test_gradients_match_reference(device, lr_form, decay_form, shared):
    params, grads, lr, decay, leaves = _flat_inputs(ODD + EMPTY, 3, shared, lr_form, decay_form, device=device)
    gos = [torch.randn_like(g) for g in grads]
    got = torch.autograd.grad(fwu(params, grads, lr, decay), leaves, gos, allow_unused=True)
    want = torch.autograd.grad(reference.fast_weight_update(params, grads, lr, decay), leaves, gos, allow_unused=True)
    for a, b in zip(got, want):
        assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("lr_form,decay_form,shared", GRAD_CASES[:5])
def test_gradients_low_precision(device, dtype, lr_form, decay_form, shared):
    params, grads, lr, decay, leaves = _flat_inputs(MLP, 8, shared, lr_form, decay_form, dtype, device)
    gos = [torch.randn_like(g) for g in grads]
    got = torch.autograd.grad(fwu(params, grads, lr, decay), leaves, gos, allow_unused=True)
    want = torch.autograd.grad(reference.fast_weight_update(params, grads, lr, decay), leaves, gos, allow_unused=True)
    tol = {torch.float32: dict(rtol=1e-4, atol=1e-4)}.get(dtype, dict(rtol=2e-2, atol=5e-2))
    for a, b in zip(got, want):
        assert_close(a.float(), b.float(), **tol)


@pytest.mark.parametrize("lr_form,decay_form,shared", GRAD_CASES)
def test_gradcheck_and_gradgradcheck(device, lr_form, decay_form, shared):
    shapes = [(2, 3), (1,), (), (0, 2)]
    params, grads, lr, decay, leaves = _flat_inputs(shapes, 2, shared, lr_form, decay_form, device=device)

    def fn(*xs):
        it = iter(xs)
        p = [next(it) for _ in params]
        g = [next(it) for _ in grads]

        def re(c):
            if isinstance(c, torch.Tensor):
                return next(it)
            if isinstance(c, list):
                return [next(it) if isinstance(x, torch.Tensor) else x for x in c]
            return c

        return tuple(fwu(p, g, re(lr), re(decay)))

    assert torch.autograd.gradcheck(fn, leaves)
    assert torch.autograd.gradgradcheck(fn, leaves)


def test_only_some_inputs_require_grad(device):
    params, grads = make(MLP, 3, True, torch.float64, device)
    params[0].requires_grad_(True)
    lr = coefs("per_element", grads)
    lr[2].requires_grad_(True)
    out = fwu(params, grads, lr)
    gp, gl = torch.autograd.grad(sum(o.sum() for o in out), [params[0], lr[2]])
    assert_close(gp, torch.full_like(params[0], 3.0))
    assert_close(gl, -grads[2].sum(0))


def test_unused_outputs_get_zero_gradient():
    params, grads = make(MLP, 2, True, torch.float64, requires_grad=True)
    out = fwu(params, grads, 0.1)
    (g,) = torch.autograd.grad(out[0].sum(), [params[1]], allow_unused=True, materialize_grads=True)
    assert_close(g, torch.zeros_like(params[1]))


def test_second_order_maml_meta_gradient():
    """One inner step of MAML on an MLP through the op: meta-gradient equals the reference path's."""
    torch.manual_seed(1)
    w = [
        torch.randn(8, 1, dtype=torch.float64, requires_grad=True),
        torch.randn(8, dtype=torch.float64, requires_grad=True),
        torch.randn(1, 8, dtype=torch.float64, requires_grad=True),
    ]
    lrs = [torch.full(x.shape, 0.05, dtype=torch.float64, requires_grad=True) for x in w]
    xs, ys = torch.randn(4, 5, 1, dtype=torch.float64), torch.randn(4, 5, 1, dtype=torch.float64)
    xq, yq = torch.randn(4, 6, 1, dtype=torch.float64), torch.randn(4, 6, 1, dtype=torch.float64)

    def forward(params, x):  # params per task: (T, ...) ; x: (T, N, 1)
        h = torch.tanh(x @ params[0].transpose(1, 2) + params[1].unsqueeze(1))
        return h @ params[2].transpose(1, 2)

    def meta_grad(update):
        T = xs.shape[0]
        fast = [x.expand(T, *x.shape) for x in w]
        inner = ((forward(fast, xs) - ys) ** 2).mean(dim=(1, 2)).sum()
        g = torch.autograd.grad(inner, fast, create_graph=True)
        new = update(w, list(g), lrs)
        outer = ((forward(new, xq) - yq) ** 2).mean()
        return torch.autograd.grad(outer, w + lrs)

    got = meta_grad(fwu)
    want = meta_grad(reference.fast_weight_update)
    for a, b in zip(got, want):
        assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert any(a.abs().sum() > 0 for a in got)


# ------------------------------------------------------------------------------------- torch.func / compile


def test_torch_func_grad_and_double_grad(device):
    w = torch.randn(3, 4, dtype=torch.float64, device=device)
    lr = torch.rand(4, dtype=torch.float64, device=device)

    def f(impl, w, lr):
        return (impl([w], [w * w], [lr])[0] ** 2).sum()

    for argnums in (0, 1):
        got = torch.func.grad(lambda *a: f(fwu, *a), argnums=argnums)(w, lr)
        want = torch.func.grad(lambda *a: f(reference.fast_weight_update, *a), argnums=argnums)(w, lr)
        assert_close(got, want)
    hess = torch.func.hessian(lambda lr: f(fwu, w, lr))(lr)
    hess_ref = torch.func.hessian(lambda lr: f(reference.fast_weight_update, w, lr))(lr)
    assert_close(hess, hess_ref)


def test_vmap(device):
    B, T = 4, 3
    p = torch.randn(B, 5, 2, device=device)  # batched shared params
    g = torch.randn(B, T, 5, 2, device=device)
    p2 = torch.randn(T, 7, device=device)  # unbatched per-task params
    g2 = torch.randn(B, T, 7, device=device)
    lr = torch.rand(5, 2, device=device)

    def f(p, g, g2):
        return tuple(fwu([p, p2], [g, g2], [lr, torch.tensor(0.2, device=device)]))

    out = torch.func.vmap(f)(p, g, g2)
    assert_close(out[0], p.unsqueeze(1) - lr * g)
    assert_close(out[1], p2 - 0.2 * g2)
    # vmap over a non-leading dim, of the raw op too
    gt = g.movedim(0, 2)
    out = torch.func.vmap(lambda p, g: fwu([p], [g], 0.3)[0], in_dims=(0, 2))(p, gt)
    assert_close(out, p.unsqueeze(1) - 0.3 * g)
    raw = torch.func.vmap(lambda p, g: torch.ops.fastmeta.fast_weight_update([p], [g], [], [], 0.3, 1.0)[0])(p, g)
    assert_close(raw, p.unsqueeze(1) - 0.3 * g)


def test_grad_of_vmap_matches_reference():
    lr = torch.rand(5, dtype=torch.float64)
    p, g = torch.randn(4, 2, 5, dtype=torch.float64), torch.randn(4, 2, 5, dtype=torch.float64)

    def loss(impl, lr):
        return torch.func.vmap(lambda p, g: impl([p], [g], [lr])[0])(p, g).pow(2).sum()

    assert_close(
        torch.func.grad(lambda lr_: loss(fwu, lr_))(lr),
        torch.func.grad(lambda lr_: loss(reference.fast_weight_update, lr_))(lr),
    )


@pytest.mark.skipif(not KERNELS, reason="needs the compiled kernels")
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])  # inductor: the default, what users get
@pytest.mark.parametrize("lr_form", ["float", "per_element"])
def test_torch_compile_fullgraph(device, lr_form, backend):
    params, grads = make(MLP, 3, True, torch.float32, device, requires_grad=True)
    lr = coefs(lr_form, grads, requires_grad=True)
    leaves = params + grads + (lr if isinstance(lr, list) else [])

    def step(params, grads, lr):
        return sum((o * o).sum() for o in fwu(params, grads, lr))

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    got = torch.autograd.grad(compiled(params, grads, lr), leaves)
    want = torch.autograd.grad(step(params, grads, lr), leaves)
    for a, b in zip(got, want):
        assert_close(a, b)


@pytest.mark.skipif(not KERNELS, reason="needs the compiled kernels")
@pytest.mark.parametrize("lr_form,decay_form,shared", GRAD_CASES[:5])
def test_opcheck(device, lr_form, decay_form, shared):
    params, grads, lr, decay, _ = _flat_inputs(ODD, 3, shared, lr_form, decay_form, torch.float32, device)
    lrs, lr_s = ops._coefs("lr", lr, grads)
    decays, decay_s = ops._coefs("decay", decay, grads)
    args = (params, grads, lrs, decays, lr_s, decay_s)
    torch.library.opcheck(torch.ops.fastmeta.fast_weight_update.default, args)
    gos = [torch.randn_like(g) for g in grads]
    detached = [[t.detach() for t in ts] for ts in (gos, params, grads, lrs, decays)]
    for mask in ([True, True, True, True], [True, False, False, False], [False, True, True, False]):
        torch.library.opcheck(torch.ops.fastmeta.fast_weight_update_backward.default, (*detached, lr_s, decay_s, mask))


# ------------------------------------------------------------------------------------------- bad input


IMPLS = [pytest.param(fwu, id="ops"), pytest.param(reference.fast_weight_update, id="reference")]


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_input_messages(impl):
    p, g = make([(3, 4), (5,)], 2, shared=True)
    cases = [
        (ValueError, "params and grads must have the same length", lambda: impl(p, g[:1], 0.1)),
        (ValueError, r"params\[1\] has shape \[7\]", lambda: impl([p[0], torch.randn(7)], g, 0.1)),
        (ValueError, r"grads\[1\] has shape", lambda: impl(p, [g[0], torch.randn(3, 5)], 0.1)),
        (ValueError, "leading task dimension", lambda: impl([torch.randn(())], [torch.randn(())], 0.1)),
        (TypeError, r"grads\[1\] has dtype torch.float64", lambda: impl(p, [g[0], g[1].double()], 0.1)),
        (TypeError, r"params\[0\] has dtype torch.float16", lambda: impl([p[0].half(), p[1]], g, 0.1)),
        (
            TypeError,
            "grads\\[0\\] has dtype torch.int64",
            lambda: impl([torch.ones(3, dtype=torch.long)], [torch.ones(2, 3, dtype=torch.long)], 1),
        ),
        (ValueError, "lr must be a number or have one entry per parameter", lambda: impl(p, g, [torch.tensor(0.1)])),
        (ValueError, r"lr\[0\] has shape \[4, 3\]", lambda: impl(p, g, [torch.rand(4, 3), torch.rand(5)])),
        (ValueError, r"decay\[1\] has shape \[2, 2\]", lambda: impl(p, g, 0.1, [torch.rand(()), torch.rand(2, 2)])),
        (
            TypeError,
            r"lr\[1\] has dtype torch.float64",
            lambda: impl(p, g, [torch.rand(()), torch.rand((), dtype=torch.float64)]),
        ),
        (ValueError, "one tensor of shape", lambda: impl(p, g, torch.rand(3))),
        (TypeError, "lr must be", lambda: impl(p, g, None)),
        (TypeError, r"lr\[1\] must be a tensor or a number", lambda: impl(p, g, [0.1, "x"])),
    ]
    for exc, pattern, call in cases:
        with pytest.raises(exc, match=pattern):
            call()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible: CUDA test skipped")
def test_mixed_devices_raise():
    p, g = make([(3,)], 2, shared=True)
    with pytest.raises(RuntimeError, match=r"params\[0\] is on cpu"):
        fwu(p, [g[0].cuda()], 0.1)


# --------------------------------------------------------------------------------------- build / fallback


def _python(code, **env):
    """Runs `code` in a fresh interpreter, from a folder where `import fastmeta` finds the package under test."""
    pkg_parent = os.path.dirname(os.path.dirname(fastmeta.__file__))
    full_env = {**os.environ, **env, "PYTHONPATH": pkg_parent}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=300, cwd=pkg_parent
    )


def test_disabled_kernels_fall_back_to_reference_silently():
    code = (
        "import warnings; warnings.simplefilter('error')\n"
        "import torch, fastmeta\n"
        "assert not fastmeta.kernels_available()\n"
        "p, g = [torch.randn(3)], [torch.randn(2, 3)]\n"
        "torch.testing.assert_close(fastmeta.ops.fast_weight_update(p, g, 0.5)[0], p[0] - 0.5 * g[0])\n"
        "print('ok')\n"
    )
    r = _python(code, FASTMETA_DISABLE_KERNELS="1", FASTMETA_REQUIRE_KERNELS="0")
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_require_kernels_turns_missing_kernels_into_import_error():
    r = _python("import fastmeta", FASTMETA_DISABLE_KERNELS="1", FASTMETA_REQUIRE_KERNELS="1")
    assert r.returncode != 0
    assert "ImportError" in r.stderr and "FASTMETA_REQUIRE_KERNELS=1" in r.stderr


def test_version_mismatch_is_reported(monkeypatch):
    from fastmeta import _kernels

    monkeypatch.delenv("FASTMETA_DISABLE_KERNELS", raising=False)
    monkeypatch.setattr(torch, "__version__", "0.0.1-not-this-one")
    error, _, _ = _kernels._load()
    if error is not None and "not built" in error:
        pytest.skip("no build info: kernels not built")
    assert error is not None and "0.0.1-not-this-one" in error and "rebuild" in error


# --------------------------------------------------------------------------- dispatch: subclasses and modes


class _Logged(torch.Tensor):
    """A tensor subclass with its own __torch_function__ (must not take the direct C++ entry)."""

    calls: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.calls.append(getattr(func, "__name__", str(func)))
        return super().__torch_function__(func, types, args, kwargs or {})


def test_tensor_subclass_and_torch_function_mode_see_the_op():
    p, g = torch.randn(3), torch.randn(2, 3)
    _Logged.calls.clear()
    out = fwu([p.as_subclass(_Logged)], [g.as_subclass(_Logged)], 0.5)
    assert_close(out[0].as_subclass(torch.Tensor), p - 0.5 * g)
    if KERNELS:
        assert any("fast_weight_update" in c for c in _Logged.calls), _Logged.calls

    seen = []

    class Mode(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with Mode():
        out = fwu([p], [g], 0.5)
    assert_close(out[0], p - 0.5 * g)
    if KERNELS:
        assert any("fast_weight_update" in s for s in seen), seen


def test_parameters_take_the_kernel_and_get_gradients():
    p = torch.nn.Parameter(torch.randn(4, 3))
    g = torch.randn(5, 4, 3)
    out = fwu([p], [g], 0.1)
    out[0].sum().backward()
    assert_close(p.grad, torch.full_like(p, 5.0))


# --------------------------------------------------------------------------- outputs: one allocation, own tensors


@pytest.mark.skipif(not KERNELS, reason="the outputs of the kernels")
def test_outputs_share_one_allocation_but_are_tensors_of_their_own(device):
    import copy
    import io
    import pickle

    params, grads = make([(300, 100), (7,), (0, 3), (5, 5)], 2, shared=True, device=device)
    out = fwu(params, grads, 0.1)
    storages = [o.untyped_storage() for o in out]
    assert len({s.data_ptr() for s in storages if s.nbytes()}) == 3  # apart, each its own storage
    assert [s.nbytes() for s in storages] == [o.numel() * o.element_size() for o in out]
    assert all(o.is_contiguous() and o.data_ptr() % 64 == 0 for o in out if o.numel())
    want = [o.clone() for o in out]
    # In-place use of one output leaves the others (and their version counters) alone.
    versions = [o._version for o in out]
    out[1].add_(1.0)
    assert [o._version for o in out] == [versions[0], versions[1] + 1, versions[2], versions[3]]
    assert_close(out[1], want[1] + 1.0)
    for o, w in ((out[0], want[0]), (out[3], want[3])):
        assert_close(o, w)
    # torch.save and pickle write one output's bytes, not the block's.
    buf = io.BytesIO()
    torch.save(out[3], buf)
    assert len(buf.getvalue()) < 4096 < out[0].numel() * out[0].element_size()
    assert torch.equal(torch.load(io.BytesIO(buf.getvalue())), out[3])
    assert torch.equal(pickle.loads(pickle.dumps(out[3].cpu())), out[3].cpu())
    assert torch.equal(copy.deepcopy(out[3]), out[3])
    # One output outlives the others (the block is freed with the last of them).
    keep = out[3]
    del out, storages
    junk = [torch.full((300, 100), 7.0, device=device) for _ in range(8)]  # reuse freed memory, if it were
    assert_close(keep, want[3])
    del junk
    # A larger resize is refused cleanly; the same size is fine.
    with pytest.raises(RuntimeError, match="not resizable"):
        keep.resize_(1000)
    keep.resize_(2, 5, 5)


@pytest.mark.skipif(not KERNELS, reason="the outputs of the kernels")
def test_outputs_under_autograd_with_in_place_use():
    params, grads = make([(4, 3), (3,)], 2, shared=True, requires_grad=True)
    out = fwu(params, grads, 0.5)
    loss = (out[1] * out[1]).sum()  # saves out[1] only
    out[0].mul_(2.0)  # in place on another output: out[1]'s saved value is untouched
    g = torch.autograd.grad(loss, grads[1])[0]
    assert_close(g, -0.5 * 2 * out[1])
    out = fwu(params, grads, 0.5)
    loss = (out[0] * out[0]).sum()
    out[0].add_(1.0)  # the saved tensor itself: autograd says so
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(loss, grads[0])


@pytest.mark.skipif(not KERNELS, reason="the kernels' backward outputs")
def test_backward_outputs_are_tensors_of_their_own():
    params, grads = make([(4, 3), (3,)], 2, shared=False)
    lrs = [torch.rand(4, 3), torch.rand(3)]
    gp, gg, gl, gd = torch.ops.fastmeta.fast_weight_update_backward(
        [torch.ones_like(g) for g in grads], params, grads, lrs, [], 0.0, 1.0, [True, True, True, False]
    )
    outs = gp + gg + gl
    assert gd == [] and len(outs) == 6
    assert len({o.untyped_storage().data_ptr() for o in outs}) == 6
    assert [o.untyped_storage().nbytes() for o in outs] == [o.numel() * o.element_size() for o in outs]
    assert_close(gl[0], -grads[0].sum(0))
