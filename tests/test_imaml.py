"""Implicit MAML: batched conjugate gradient against a direct solve; on a quadratic inner problem the implicit
meta-gradient equals the closed form; on a small network it approaches finite differences of the proximal
problem's solution as it is solved to convergence; the batched step equals a per-task loop (BatchNorm
included); bad input; the learner through the command line."""

import pytest
import torch
import torch.nn.functional as F
from test_maml import assert_grads_close, classification_batch, conv4
from torch import nn
from torch.testing import assert_close

import fastmeta
from fastmeta.algorithms import conjugate_gradient

D64 = torch.float64


def meta_grads(model, out):
    model.zero_grad()
    out.loss.backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("steps", [1, 3, 8])
def test_conjugate_gradient_matches_a_direct_solve(steps):
    """T independent SPD systems over two tensors: after n = 8 steps CG is the solution; each step shrinks
    every task's A-norm error; a task with a zero right-hand side stays at 0."""
    g = torch.Generator().manual_seed(0)
    T, n = 4, 8
    m = torch.randn(T, n, n, generator=g, dtype=D64)
    A = m @ m.transpose(1, 2) + 0.5 * torch.eye(n, dtype=D64)
    b = torch.randn(T, n, generator=g, dtype=D64)
    b[2] = 0
    split = lambda v: [v[:, :3].reshape(T, 3, 1), v[:, 3:]]  # noqa: E731
    join = lambda xs: torch.cat([xs[0].reshape(T, 3), xs[1]], 1)  # noqa: E731
    x = join(conjugate_gradient(lambda v: split(torch.einsum("tij,tj->ti", A, join(v))), split(b), steps))
    exact = torch.linalg.solve(A, b)
    assert torch.equal(x[2], torch.zeros(n, dtype=D64))
    if steps == n:
        assert_close(x, exact, rtol=1e-7, atol=1e-9)
    else:
        err = lambda y: torch.einsum("ti,tij,tj->t", y - exact, A, y - exact)  # noqa: E731
        assert (err(x)[[0, 1, 3]] < err(torch.zeros_like(x))[[0, 1, 3]]).all()


def quadratic_batch(T=3, d=4, n=6, q=5):
    g = torch.Generator().manual_seed(3)
    sx, qx = torch.randn(T, n, d, generator=g, dtype=D64), torch.randn(T, q, d, generator=g, dtype=D64)
    sy, qy = torch.randn(T, n, 1, generator=g, dtype=D64), torch.randn(T, q, 1, generator=g, dtype=D64)
    return fastmeta.TaskBatch(sx, sy, qx, qy)


def test_quadratic_inner_problem_gives_the_closed_form():
    """A linear model with MSE: the proximal inner problem has the solution phi*(theta) = (H + lam I)^-1
    (lam theta + c) and d phi*/d theta = (I + H/lam)^-1 exactly; with the inner loop converged and as many CG
    steps as parameters, imaml_step's meta-gradient is the gradient of the query loss at phi*(theta)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 1, bias=False).double()
    batch, lam = quadratic_batch(), 2.0
    out = fastmeta.imaml_step(model, batch, 0.1, 400, lam, cg_steps=4, loss_fn=F.mse_loss)
    got = meta_grads(model, out)[0]

    theta = model.weight.detach().clone().requires_grad_()
    total = 0
    for t in range(batch.num_tasks):
        X, y = batch.support_x[t], batch.support_y[t]
        H = 2 / len(X) * X.T @ X
        c = 2 / len(X) * X.T @ y[:, 0]
        phi = torch.linalg.solve(H + lam * torch.eye(4, dtype=D64), lam * theta[0] + c)
        total = total + F.mse_loss(batch.query_x[t] @ phi, batch.query_y[t][:, 0])
    (want,) = torch.autograd.grad(total / batch.num_tasks, theta)
    assert_close(got, want, rtol=1e-8, atol=1e-10)
    assert_close(out.fast_weights["weight"][-1, 0], phi.detach(), rtol=1e-8, atol=1e-10)  # converged


def tiny_mlp():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()


def tiny_batch(T=2):
    g = torch.Generator().manual_seed(5)
    sx, qx = torch.randn(T, 6, 3, generator=g, dtype=D64), torch.randn(T, 4, 3, generator=g, dtype=D64)
    sy, qy = torch.randint(0, 2, (T, 6), generator=g), torch.randint(0, 2, (T, 4), generator=g)
    return fastmeta.TaskBatch(sx, sy, qx, qy)


def test_small_network_approaches_finite_differences_of_the_proximal_solution():
    """A nonlinear network: the meta-objective F(theta) = mean_t L_t^query(phi_t*(theta)), phi* the converged
    proximal inner solution; its directional derivatives by central differences (each point solved again)
    against imaml_step's meta-gradient, which gets closer as cg_steps grows (and is exact in the limit)."""
    model, batch, lam, lr, steps = tiny_mlp(), tiny_batch(), 3.0, 0.15, 300

    def objective():
        with torch.no_grad():
            return fastmeta.imaml_step(model, batch, lr, steps, lam, cg_steps=0).loss.item()

    g = torch.Generator().manual_seed(9)
    dirs = [[torch.randn(p.shape, generator=g, dtype=D64) for p in model.parameters()] for _ in range(3)]
    fd = []
    for u in dirs:
        vals = []
        for sign in (1, -1):
            with torch.no_grad():
                for p, ui in zip(model.parameters(), u):
                    p.add_(ui, alpha=sign * 1e-5)
            vals.append(objective())
            with torch.no_grad():
                for p, ui in zip(model.parameters(), u):
                    p.sub_(ui, alpha=sign * 1e-5)
        fd.append((vals[0] - vals[1]) / 2e-5)
    fd = torch.tensor(fd, dtype=D64)
    errors = []
    for cg in (0, 2, 40):
        grads = meta_grads(model, fastmeta.imaml_step(model, batch, lr, steps, lam, cg_steps=cg))
        got = torch.tensor([sum((gi * ui).sum() for gi, ui in zip(grads, u)).item() for u in dirs], dtype=D64)
        errors.append((got - fd).abs().max().item())
    assert errors[2] < 1e-6 * max(1.0, fd.abs().max().item()), errors
    assert errors[0] > 10 * errors[2], errors  # first order is measurably not the implicit gradient


@pytest.mark.parametrize("cg_steps", [0, 3])
def test_batched_step_equals_a_per_task_loop_with_batchnorm(cg_steps):
    """All tasks at once (one batched Hessian-vector product per CG step) equal each task alone, averaged:
    losses, accuracies, fast weights and the meta-gradient, BatchNorm's per-task statistics included."""
    model = conv4(channels=3, n_way=3).double()
    batch = classification_batch(T=3)
    out = fastmeta.imaml_step(model, batch, 0.3, 3, 1.5, cg_steps)
    got = meta_grads(model, out)
    want, losses = [torch.zeros_like(p) for p in model.parameters()], []
    for t in range(batch.num_tasks):
        one = fastmeta.imaml_step(model, batch[t : t + 1], 0.3, 3, 1.5, cg_steps)
        losses.append(one.task_losses)
        for w, gi in zip(want, meta_grads(model, one)):
            w += gi / batch.num_tasks
        for n, f in one.fast_weights.items():
            assert_close(out.fast_weights[n][t], f[0], rtol=1e-9, atol=1e-11)
    assert_close(out.task_losses, torch.cat(losses), rtol=1e-10, atol=1e-12)
    assert_close(out.loss.detach(), out.task_losses.mean())
    assert out.support_losses.shape == (3, 3) and out.accuracy.shape == (3,)
    assert_grads_close(got, want, rtol=1e-8)


def test_cg_zero_is_the_query_gradient_and_no_grad_evaluates():
    model, batch = tiny_mlp(), tiny_batch(3)
    out = fastmeta.imaml_step(model, batch, 0.1, 4, 2.0, cg_steps=0)
    grads = meta_grads(model, out)
    phi = [out.fast_weights[n].requires_grad_() for n, _ in model.named_parameters()]
    names = [n for n, _ in model.named_parameters()]
    total = 0  # one task at a time, by hand
    for t in range(3):
        pred = torch.func.functional_call(model, {n: f[t] for n, f in zip(names, phi)}, (batch.query_x[t],))
        total = total + F.cross_entropy(pred, batch.query_y[t]) / 3
    want = [w.sum(0) for w in torch.autograd.grad(total, phi)]
    assert_grads_close(grads, want, rtol=1e-10)
    with torch.no_grad():
        quiet = fastmeta.imaml_step(model, batch, 0.1, 4, 2.0)
    assert not quiet.loss.requires_grad
    assert_close(quiet.loss, out.loss.detach())


def test_inner_loop_solves_the_proximal_problem_and_adapt_matches():
    """More steps: the proximal objective's gradient at phi goes to 0; imaml_adapt reaches the same weights as
    the step's inner loop (and lam=0 is plain adapt)."""
    model, batch = tiny_mlp(), tiny_batch()
    out = fastmeta.imaml_step(model, batch, 0.15, 300, 3.0, cg_steps=0)
    adapted = fastmeta.imaml_adapt(model, batch.support_x, batch.support_y, 0.15, 300, 3.0)
    for n, f in out.fast_weights.items():
        assert_close(adapted.fast_weights[n], f)
    names = [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    for t in range(2):
        phi = {n: out.fast_weights[n][t].clone().requires_grad_() for n in names}
        loss = F.cross_entropy(torch.func.functional_call(model, phi, (batch.support_x[t],)), batch.support_y[t])
        loss = loss + 1.5 * sum(((phi[n] - params[n].detach()) ** 2).sum() for n in names)
        for gr in torch.autograd.grad(loss, list(phi.values())):
            assert gr.abs().max() < 1e-9
    plain = fastmeta.adapt(model, batch.support_x, batch.support_y, 0.15, 5)
    same = fastmeta.imaml_adapt(model, batch.support_x, batch.support_y, 0.15, 5, lam=0)
    for n, f in plain.fast_weights.items():
        assert torch.equal(same.fast_weights[n], f)


def test_with_an_adam_inner_loop():
    """inner_opt applies to the proximal inner problem; the meta-gradient is finite and differs from SGD's."""
    model, batch = tiny_mlp(), tiny_batch()
    sgd = meta_grads(model, fastmeta.imaml_step(model, batch, 0.05, 5, 2.0, 3))
    adam = meta_grads(model, fastmeta.imaml_step(model, batch, 0.05, 5, 2.0, 3, inner_opt=fastmeta.Adam()))
    assert all(torch.isfinite(a).all() for a in adam)
    assert any(not torch.allclose(a, s) for a, s in zip(adam, sgd))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"lam": 0.0}, "lam must be > 0"),
        ({"lam": float("nan")}, "lam must be a finite number"),
        ({"cg_steps": -1}, "cg_steps must be an integer >= 0"),
        ({"cg_steps": 1.5}, "cg_steps must be an integer >= 0"),
        ({"damping": -0.1}, "damping must be >= 0"),
        ({"inner_steps": -2}, "inner_steps must be an integer >= 0"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    model, batch = tiny_mlp(), tiny_batch()
    with pytest.raises(ValueError, match=match):
        fastmeta.imaml_step(model, batch, **kwargs)


def test_bad_types_are_named():
    model, batch = tiny_mlp(), tiny_batch()
    with pytest.raises(TypeError, match="inner_lr must be a number"):
        fastmeta.imaml_step(model, batch, inner_lr=fastmeta.MetaSGDLR(model))
    with pytest.raises(TypeError, match="batch must be a fastmeta.TaskBatch"):
        fastmeta.imaml_step(model, (batch.support_x, batch.support_y))


def test_memory_does_not_keep_the_inner_steps():
    """No graph of the inner loop: after the step, the loss's graph reaches the parameters directly."""
    model, batch = tiny_mlp(), tiny_batch()
    out = fastmeta.imaml_step(model, batch, 0.1, 20, 2.0, 2)
    seen, stack = set(), [out.loss.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        stack += [f for f, _ in fn.next_functions]
    assert len(seen) < 30  # a handful of nodes (mul, sum, add per parameter), not 20 steps' graphs
