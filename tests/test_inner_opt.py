"""Inner-loop optimisers (fastmeta.SGD with momentum, fastmeta.Adam): the reference definitions against
torch.optim's steps, the fused implementation against the reference (values, gradcheck, gradgradcheck), and
maml_step / adapt / reptile_step with them against a plain per-task loop in float64; bad input."""

import pytest
import torch
import torch.nn.functional as F
from test_maml import MODELS, assert_grads_close, classification_batch, conv4, grads_of, mlp, regression_batch
from torch.func import functional_call
from torch.testing import assert_close

import fastmeta
from fastmeta import reference
from fastmeta.algorithms.inner_opt import inner_opt_of

D64 = torch.float64
OPTS = {
    "momentum": fastmeta.SGD(momentum=0.9),
    "nesterov": fastmeta.SGD(momentum=0.5, nesterov=True, weight_decay=0.01),
    "adam": fastmeta.Adam(),
    "adam-wd": fastmeta.Adam(betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1),
}


def reference_step(opt, fast, grads, lr, state, s):
    """One step by the reference definitions; returns (new fast, new state list)."""
    if isinstance(opt, fastmeta.Adam):
        p, m, v = reference.adam_update(fast, grads, lr, *state, s + 1, opt.betas, opt.eps, opt.weight_decay)
        return p, [m, v]
    p, b = reference.sgd_update(fast, grads, lr, state[0] if state else None, opt.momentum, opt.nesterov,
                                opt.weight_decay)  # fmt: skip
    return p, [b] if b is not None else []


def torch_optim(opt, params, lr):
    if isinstance(opt, fastmeta.Adam):
        return torch.optim.Adam(params, lr=lr, betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=opt.momentum, nesterov=opt.nesterov, weight_decay=opt.weight_decay)


@pytest.mark.parametrize("name", OPTS)
def test_reference_is_torch_optim_per_task(name):
    """The reference's T tasks, each against torch.optim on its own copy, over 4 steps of fresh gradients."""
    opt, g = OPTS[name], torch.Generator().manual_seed(1)
    shapes, T, lr = [(3, 4), (5,), ()], 3, 0.05
    init = [torch.randn(s, generator=g, dtype=D64) for s in shapes]
    grads = [[torch.randn(T, *s, generator=g, dtype=D64) for s in shapes] for _ in range(4)]
    grads[0][1][:, 2] = 0  # an exactly zero gradient element: Adam's sqrt(0)
    fast, state = init, opt.init(init).tensors
    for s, gs in enumerate(grads):
        fast, state = reference_step(opt, fast, gs, lr, state, s)
    for t in range(T):
        ps = [p.clone().requires_grad_() for p in init]
        o = torch_optim(opt, ps, lr)
        for gs in grads:
            for p, gi in zip(ps, gs):
                p.grad = gi[t].clone()
            o.step()
        for p, f in zip(ps, fast):
            assert_close(f[t], p.detach(), rtol=1e-12, atol=1e-12)


def _random_case(seed, shared=True, per_element_lr=False, T=3, dtype=D64):
    g = torch.Generator().manual_seed(seed)
    shapes = [(2, 3, 3), (4,), (1,), (5, 1)]
    fast = [torch.randn(s if shared else (T, *s), generator=g, dtype=dtype) for s in shapes]
    grads = [torch.randn(T, *s, generator=g, dtype=dtype) for s in shapes]
    lr = [torch.rand(s, generator=g, dtype=dtype) * 0.1 for s in shapes] if per_element_lr else 0.07
    return fast, grads, lr


@pytest.mark.parametrize("name", OPTS)
@pytest.mark.parametrize("shared,per_element_lr", [(True, False), (False, True), (True, True)])
def test_fused_steps_equal_the_reference(name, shared, per_element_lr):
    opt = OPTS[name]
    fast, grads, lr = _random_case(0, shared, per_element_lr)
    state = opt.init(fast)
    ref_fast, ref_state = fast, [list(x) for x in state.tensors]
    for s in range(3):
        fast = opt.step(fast, grads, lr, state, s)
        ref_fast, ref_state = reference_step(opt, ref_fast, grads, lr, ref_state, s)
        for a, b in zip(fast, ref_fast):
            assert_close(a, b, rtol=1e-12, atol=1e-12)
        for xs, ys in zip(state.tensors, ref_state):
            for a, b in zip(xs, ys):
                assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["nesterov", "adam-wd"])
def test_fused_steps_gradcheck_and_gradgradcheck(name):
    """Two steps' weights as a function of the initial weights, the two steps' gradients and per-element rates:
    first and second derivatives against finite differences in float64."""
    opt = OPTS[name]
    fast, grads, lr = _random_case(3, shared=True, per_element_lr=True, T=2)
    fast, lr = fast[:2], lr[:2]
    grads2 = [g.flip(0) * 0.5 for g in grads[:2]]
    grads = grads[:2]
    n = len(fast)

    def two_steps(*tensors):
        f, g1, g2, r = tensors[:n], tensors[n : 2 * n], tensors[2 * n : 3 * n], tensors[3 * n :]
        state = opt.init(list(f))
        out = opt.step(list(f), list(g1), list(r), state, 0)
        out = opt.step(out, list(g2), list(r), state, 1)
        return tuple(out)

    inputs = tuple(t.clone().requires_grad_() for t in (*fast, *grads, *grads2, *lr))
    assert torch.autograd.gradcheck(two_steps, inputs)
    assert torch.autograd.gradgradcheck(two_steps, inputs)


def loop_meta_loss(model, batch, lr, steps, first_order, loss_fn, opt, adapted=None):
    """The definition: a per-task loop of autograd.grad steps through the reference update (no fused op)."""
    params = dict(model.named_parameters())
    adapted = list(params) if adapted is None else adapted
    T, total = batch.num_tasks, 0
    for t in range(T):
        fast = [params[n] for n in adapted]
        state = [list(x) for x in opt.init([p.detach() for p in fast]).tensors]

        def f(x, fast):
            return functional_call(model, {**params, **dict(zip(adapted, fast))}, (x,))

        for s in range(steps):
            loss = loss_fn(f(batch.support_x[t], fast), batch.support_y[t])
            g = torch.autograd.grad(loss, fast, create_graph=not first_order)
            g = [gi.detach() if first_order else gi for gi in g]
            new, state = reference_step(opt, fast, [gi.unsqueeze(0) for gi in g], lr, state, s)  # T = 1
            fast = [p.squeeze(0) for p in new]
            state = [[x.squeeze(0) for x in xs] for xs in state]
        total = total + loss_fn(f(batch.query_x[t], fast), batch.query_y[t]) / T
    return total


@pytest.mark.parametrize("name", ["momentum", "adam"])
@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("steps,first_order", [(1, False), (3, False), (2, True)])
def test_meta_gradient_equals_a_per_task_loop(name, model_name, steps, first_order):
    make, make_batch, loss_fn, lr = MODELS[model_name]
    opt = OPTS[name]
    lr = lr / 10 if name == "adam" else lr
    torch.manual_seed(0)
    model, batch = make(), make_batch()
    params = list(model.parameters())
    out = fastmeta.maml_step(model, batch, lr, steps, first_order, loss_fn, inner_opt=opt)
    want = loop_meta_loss(model, batch, lr, steps, first_order, loss_fn, opt)
    assert_close(out.loss, want, rtol=1e-10, atol=1e-12)
    got = grads_of(out.loss, params)
    assert_grads_close(got, grads_of(want, params))
    assert all(torch.isfinite(g).all() for g in got)  # conv biases before BN: v ~ 0


def test_adam_with_anil_chunks_and_a_learned_rate():
    """inner_opt with adapt_params (ANIL), recompute=k (chunks: each its own state) and Meta-SGD's rates."""
    torch.manual_seed(0)
    model, batch = conv4(), classification_batch(T=4)
    opt = fastmeta.Adam()
    params = list(model.parameters())
    a = fastmeta.maml_step(model, batch, 0.01, 2, inner_opt=opt, adapt_params=["head"])
    want = loop_meta_loss(model, batch, 0.01, 2, False, F.cross_entropy, opt, adapted=["head.weight", "head.bias"])
    assert_close(a.loss, want, rtol=1e-10, atol=1e-12)
    b = fastmeta.maml_step(model, batch, 0.01, 2, inner_opt=opt)
    want_grads = grads_of(b.loss, params)
    c = fastmeta.maml_step(model, batch, 0.01, 2, inner_opt=opt, recompute=2)
    c.loss.backward()
    assert_grads_close([p.grad for p in params], want_grads)
    rates = fastmeta.MetaSGDLR(model, init=0.01).to(D64)
    d = fastmeta.maml_step(model, batch, rates, 2, inner_opt=opt)
    assert_close(d.loss, b.loss, rtol=1e-10, atol=1e-12)  # the same rates, as learned ones
    assert grads_of(d.loss, list(rates.parameters()))[0].abs().sum() > 0


@pytest.mark.parametrize("name", ["nesterov", "adam"])
def test_adapt_and_reptile_use_the_same_steps(name):
    opt = OPTS[name]
    torch.manual_seed(0)
    model, batch = mlp(), regression_batch()
    out = fastmeta.maml_step(model, batch, 0.01, 3, loss_fn=F.mse_loss, inner_opt=opt)
    adapted = fastmeta.adapt(model, batch.support_x, batch.support_y, 0.01, 3, F.mse_loss, inner_opt=opt)
    for n, w in out.fast_weights.items():
        assert_close(adapted.fast_weights[n], w.detach(), rtol=1e-12, atol=1e-12)
    r = fastmeta.reptile_step(model, batch, 0.01, 3, F.mse_loss, inner_opt=opt)
    for n, w in out.fast_weights.items():
        assert_close(r.fast_weights[n], w.detach(), rtol=1e-12, atol=1e-12)
    plain = fastmeta.maml_step(model, batch, 0.01, 3, loss_fn=F.mse_loss, inner_opt=fastmeta.SGD())
    assert_close(plain.loss, fastmeta.maml_step(model, batch, 0.01, 3, loss_fn=F.mse_loss).loss)


def test_bad_inner_optimisers_are_clear_errors():
    with pytest.raises(ValueError, match="SGD: momentum must be >= 0"):
        fastmeta.SGD(momentum=-0.1)
    with pytest.raises(ValueError, match="SGD: nesterov needs a momentum > 0"):
        fastmeta.SGD(nesterov=True)
    with pytest.raises(ValueError, match=r"Adam: betas\[0\] must be in \[0.0, 1.0\)"):
        fastmeta.Adam(betas=(1.0, 0.9))
    with pytest.raises(ValueError, match="Adam: betas must be a pair"):
        fastmeta.Adam(betas=0.9)
    with pytest.raises(ValueError, match="Adam: eps must be a finite number"):
        fastmeta.Adam(eps=float("nan"))
    model, batch = mlp(), regression_batch()
    with pytest.raises(TypeError, match="inner_opt must be None, fastmeta.SGD"):
        fastmeta.maml_step(model, batch, 0.01, 1, loss_fn=F.mse_loss, inner_opt=torch.optim.SGD(model.parameters()))
    with pytest.raises(ValueError, match="recompute='steps' does not carry an inner optimiser's state"):
        fastmeta.maml_step(model, batch, 0.01, 1, loss_fn=F.mse_loss, inner_opt=fastmeta.Adam(), recompute="steps")
    with pytest.raises(ValueError, match="inner_opt must be one of sgd, momentum, adam, got 'rmsprop'"):
        inner_opt_of("rmsprop")
    with pytest.raises(ValueError, match="adam_update: step must be an integer >= 1"):
        reference.adam_update([torch.zeros(2)], [torch.zeros(1, 2)], 0.1, [torch.zeros(2)], [torch.zeros(2)], 0)


@pytest.mark.parametrize("algo", ["maml", "reptile"])
def test_command_line_trains_and_tests_with_the_inner_optimiser(tmp_path, capsys, algo):
    from fastmeta.cli import main

    out = tmp_path / "run"
    tiny = ["--iterations", "4", "--val-every", "2", "--val-episodes", "1", "--test-episodes", "0"]
    assert main(["train", "--algo", algo, "--inner-opt", "adam", "--inner-lr", "0.003", "--out", str(out)] + tiny) == 0
    state = torch.load(out / "best.pt", weights_only=False)
    assert state["config"]["options"]["inner_opt"] == "adam"
    capsys.readouterr()
    assert main(["eval", str(out / "best.pt"), "--episodes", "5"]) == 0
    assert f"{algo} sinusoid 10-shot, test split, 5 tasks" in capsys.readouterr().out
    if algo == "maml":
        code = main(["train", "--inner-opt", "momentum", "--recompute", "steps", "--out", str(tmp_path / "x")] + tiny)
        assert code == 2
        assert "recompute steps does not carry --inner-opt momentum's state yet" in capsys.readouterr().err
