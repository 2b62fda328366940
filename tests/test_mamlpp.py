"""MAML++'s per-step batch norm (fastmeta.PerStepBN): the meta-gradient of maml_step(per_step_bn=...) against a
per-task loop in float64 that indexes each BatchNorm layer's weight and bias by the inner step (first and second
order, S = 1..5, with LSLR and the multi-step loss, every runner and recompute mode); adapt at test; bad input;
and --algo mamlpp through the command line."""

import pytest
import torch
import torch.nn.functional as F
from test_maml import CustomMLP, assert_grads_close, classification_batch, conv4, grads_of, regression_batch
from test_train import OMNIGLOT, run
from torch.func import functional_call
from torch.testing import assert_close

import fastmeta
from fastmeta.algorithms.maml_learners import mamlpp_settings

D64 = torch.float64


def loop_meta_loss(model, bn, batch, lr, steps, first_order, loss_fn, msl=None):
    """The definition, one task at a time: inner step s (and the query after it) with every BatchNorm weight and
    bias replaced by bn's row s; those are not adapted; lr: a number or lr(step) -> {name: rate}."""
    params = dict(model.named_parameters())
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    adapted = [n for n in params if n not in bn.names]
    rows = dict(zip(bn.names, bn.rows))
    T, total = batch.num_tasks, 0
    for t in range(T):
        fast = {n: params[n] for n in adapted}

        def f(x, fast, s):
            step = {n: r[min(s, r.shape[0] - 1)] for n, r in rows.items()}
            return functional_call(model, ({**params, **step, **fast}, buffers), (x,))

        for s in range(steps):
            loss = loss_fn(f(batch.support_x[t], fast, s), batch.support_y[t])
            g = torch.autograd.grad(loss, list(fast.values()), create_graph=not first_order)
            rates = lr(s) if callable(lr) else dict.fromkeys(adapted, lr)
            fast = {n: fast[n] - rates[n] * (gi.detach() if first_order else gi) for n, gi in zip(adapted, g)}
            if msl is not None and s < steps - 1:
                total = total + msl[s] * loss_fn(f(batch.query_x[t], fast, s), batch.query_y[t]) / T
        w = 1.0 if msl is None else msl[-1]
        total = total + w * loss_fn(f(batch.query_x[t], fast, max(steps - 1, 0)), batch.query_y[t]) / T
    return total


def models():
    torch.manual_seed(0)
    return {
        "conv4": (conv4(), classification_batch(), F.cross_entropy, 0.4),
        "traced-mlp": (CustomMLP(bn=True).to(D64), regression_batch(), F.mse_loss, 0.01),
    }


@pytest.mark.parametrize("steps", [1, 3, 5])
@pytest.mark.parametrize("first_order", [False, True], ids=["2nd", "1st"])
@pytest.mark.parametrize("name", ["conv4", "traced-mlp"])
def test_per_step_bn_meta_gradient_matches_the_loop(name, first_order, steps):
    model, batch, loss_fn, lr = models()[name]
    bn = fastmeta.PerStepBN(model, steps).to(D64)
    with torch.no_grad():  # rows that differ by step, so a wrong index shows
        for r in bn.rows:
            r.add_(torch.randn_like(r) * 0.3)
    out = fastmeta.maml_step(model, batch, lr, steps, first_order, loss_fn, per_step_bn=bn)
    want = loop_meta_loss(model, bn, batch, lr, steps, first_order, loss_fn)
    assert_close(out.loss, want, rtol=1e-10, atol=1e-12)
    tensors = [p for n, p in model.named_parameters() if n not in bn.names] + list(bn.rows)
    assert_grads_close(grads_of(out.loss, tensors), grads_of(want, tensors))
    unused = [p for n, p in model.named_parameters() if n in bn.names]  # the layers' own: replaced by the rows
    assert all(g.abs().max() == 0 for g in grads_of(out.loss, unused))
    assert set(out.fast_weights) == {n for n, _ in model.named_parameters()} - set(bn.names)


@pytest.mark.parametrize("recompute", [None, 2, "steps", ("steps", 2)])
def test_per_step_bn_with_lslr_the_multi_step_loss_and_recompute(recompute):
    """MAML++ as --algo mamlpp runs it: LSLR over the adapted parameters, the multi-step loss, per-step BN; the
    same meta-gradient in every recompute mode."""
    model, batch, loss_fn, _ = models()["conv4"]
    S = 3
    bn = fastmeta.PerStepBN(model, S).to(D64)
    adapted = [n for n, _ in model.named_parameters() if n not in bn.names]
    lslr = fastmeta.LSLR(model, S, init=0.3, params=adapted).to(D64)
    with torch.no_grad():
        lslr.lrs.add_(torch.rand_like(lslr.lrs) * 0.2)
        for r in bn.rows:
            r.add_(torch.randn_like(r) * 0.3)
    msl = fastmeta.msl_weights(S, epoch=3, anneal_epochs=10)
    out = fastmeta.maml_step(
        model, batch, lslr, S, False, loss_fn, multi_step_weights=msl, per_step_bn=bn, recompute=recompute
    )
    rates = lambda s: dict(zip(adapted, lslr(s)))  # noqa: E731
    want = loop_meta_loss(model, bn, batch, rates, S, False, loss_fn, msl=msl.tolist())
    assert_close(out.loss.detach(), want.detach(), rtol=1e-10, atol=1e-12)
    tensors = [dict(model.named_parameters())[n] for n in adapted] + list(bn.rows) + [lslr.lrs]
    if recompute is None:
        got = grads_of(out.loss, tensors)
    else:
        for p in tensors:
            p.grad = None
        out.loss.backward()
        got = [p.grad for p in tensors]
    assert_grads_close(got, grads_of(want, tensors))


def test_adapt_with_per_step_bn_predicts_as_the_loop():
    """At test: the query after S steps with row S - 1; a longer adaptation keeps using the last row."""
    model, batch, loss_fn, lr = models()["conv4"]
    bn = fastmeta.PerStepBN(model, 2).to(D64)
    with torch.no_grad():
        for r in bn.rows:
            r.add_(torch.randn_like(r) * 0.3)
    for steps in (2, 4):
        adapted = fastmeta.adapt(model, batch.support_x, batch.support_y, lr, steps, per_step_bn=bn)
        out = fastmeta.maml_step(model, batch, lr, steps, True, loss_fn, per_step_bn=bn)
        with torch.no_grad():
            assert_close(adapted(batch.query_x), out.predictions, rtol=1e-10, atol=1e-12)


def test_per_step_bn_bad_input():
    model, batch, loss_fn, lr = models()["conv4"]
    with pytest.raises(ValueError, match="no BatchNorm layer"):
        fastmeta.PerStepBN(conv4(bn=False), 2)
    with pytest.raises(ValueError, match="inner_steps must be an integer >= 1"):
        fastmeta.PerStepBN(model, 0)
    bn = fastmeta.PerStepBN(model, 1).to(D64)
    with pytest.raises(ValueError, match="with per_step_bn the BatchNorm weights are per step and meta-learned"):
        fastmeta.maml_step(model, batch, lr, 1, per_step_bn=bn, adapt_params=["features"])
    with pytest.raises(ValueError, match="per_step_bn was made for another model"):
        fastmeta.maml_step(conv4(channels=6), batch, lr, 1, per_step_bn=bn)
    with pytest.raises(TypeError, match="per_step_bn must be None or a fastmeta.PerStepBN"):
        fastmeta.maml_step(model, batch, lr, 1, per_step_bn=torch.nn.Linear(1, 1))


def test_mamlpp_settings_anneal_as_the_paper():
    """Derivative-order annealing (first order for the first epochs) and the multi-step loss's annealing, by
    iteration: an epoch is --epoch-iterations meta-steps."""
    first, msl = mamlpp_settings(inner_steps=5, iteration=0, epoch_iterations=100, first_order_epochs=2, msl_epochs=10)
    assert first and torch.allclose(msl, torch.full((5,), 0.2, dtype=D64))
    first, msl = mamlpp_settings(5, 250, 100, 2, 10)
    assert not first and torch.allclose(msl, fastmeta.msl_weights(5, 2, 10))
    assert mamlpp_settings(5, 1000, 100, 2, 10)[1] is None  # after msl_epochs: the final query loss alone


@pytest.mark.skipif(not OMNIGLOT.is_dir(), reason=f"the Omniglot zips are not at {OMNIGLOT}")
def test_mamlpp_runs_checkpoints_and_evaluates(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--algo", "mamlpp", "--dataset", "omniglot", "--data", str(OMNIGLOT), "--out", str(out)]
    args += ["--meta-batch", "2", "--iterations", "3", "--val-every", "3", "--val-episodes", "1"]
    args += ["--test-episodes", "2", "--hidden", "8", "--inner-steps", "2", "--epoch-iterations", "1"]
    code, _, err = run(args, capsys)
    assert code == 0, err
    state = torch.load(out / "best.pt", weights_only=False)
    assert state["aux"]["bn.rows.0"].shape == (2, 8) and state["aux"]["lslr.lrs"].shape[0] == 2
    code, stdout, err = run(["eval", str(out / "best.pt"), "--episodes", "2"], capsys)
    assert code == 0 and "mamlpp omniglot 5-way 1-shot, test split, 2 tasks" in stdout, err
