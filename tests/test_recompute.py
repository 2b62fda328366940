"""maml_step(recompute="steps"), the reverse sweep over inner steps, and its combination with task chunks
(recompute=("steps", k)): the same loss and meta-gradients (model and learned-rate parameters) as the plain
step and as a plain per-task loop of autograd.grad steps, in float64; the other outputs; dropout (the same random
numbers in the rebuilt steps); bad values of `recompute`."""

import pytest
import torch
import torch.nn.functional as F
from test_maml import (
    CustomMLP,
    assert_grads_close,
    classification_batch,
    conv4,
    grads_of,
    layout,  # noqa: F401 (a fixture)
    loop_meta_loss,
    mlp,
    regression_batch,
)
from torch import nn
from torch.testing import assert_close

import fastmeta
from fastmeta.algorithms import recompute as maml_module
from fastmeta.models import ResNet12

D64 = torch.float64

MODELS = {
    "conv4-bn": (conv4, classification_batch, F.cross_entropy, 0.4),
    "mlp": (mlp, regression_batch, F.mse_loss, 0.01),
}


def learned_rates(kind, model, steps, lr, params=None):
    """(the InnerLR module, lr(step) -> {name: rate} for loop_meta_loss), rates perturbed so that each element,
    and with LSLR each step, has its own."""
    if kind == "metasgd":
        lrs = fastmeta.MetaSGDLR(model, init=lr, params=params)
        with torch.no_grad():
            for t in lrs.lrs:
                t.mul_(torch.rand_like(t) + 0.5)
        return lrs, lambda s: dict(zip(lrs.names, lrs.lrs))
    lrs = fastmeta.LSLR(model, inner_steps=steps, init=lr, params=params)
    with torch.no_grad():
        lrs.lrs.mul_(torch.rand_like(lrs.lrs) + 0.5)  # differ per step: a step-indexing bug changes the gradient
    return lrs, lambda s: dict(zip(lrs.names, lrs.lrs[s]))


def check(model, batch, inner_lr, steps, first_order, loss_fn, tensors, want=None, recompute="steps", **kw):
    """recompute's loss and meta-gradient against the plain step's and, if given, the loop's loss `want`."""
    plain = fastmeta.maml_step(model, batch, inner_lr, steps, first_order, loss_fn, **kw)
    out = fastmeta.maml_step(model, batch, inner_lr, steps, first_order, loss_fn, recompute=recompute, **kw)
    assert out.loss.requires_grad and out.loss.dim() == 0
    assert_close(out.loss, plain.loss, rtol=1e-12, atol=0)
    got = grads_of(out.loss, tensors)
    assert_grads_close(got, grads_of(plain.loss, tensors), rtol=1e-10)
    if want is not None:
        assert_close(out.loss, want, rtol=1e-10, atol=0)
        assert_grads_close(got, grads_of(want, tensors))
    return out, plain, got


@pytest.mark.parametrize("steps", [1, 2, 5])
@pytest.mark.parametrize("first_order", [False, True], ids=["2nd", "1st"])
@pytest.mark.parametrize("name", list(MODELS))
def test_matches_plain_step_and_loop(name, first_order, steps):
    make_model, make_batch, loss_fn, lr = MODELS[name]
    model, batch = make_model(), make_batch()
    want = loop_meta_loss(model, batch, lr, steps, first_order, loss_fn)
    check(model, batch, lr, steps, first_order, loss_fn, list(model.parameters()), want)


@pytest.mark.parametrize("every", [1, 2, 5], ids=lambda k: f"every{k}")
@pytest.mark.parametrize("kind", ["metasgd", "lslr"])
@pytest.mark.parametrize("first_order", [False, True], ids=["2nd", "1st"])
def test_learned_rates(first_order, kind, every, monkeypatch):
    """Every checkpoint interval: all fast weights kept (1), segments of 2 (the last one short), none kept (5)."""
    monkeypatch.setattr(maml_module, "_checkpoint_interval", lambda steps: every)
    model, batch = conv4(), classification_batch()
    steps = 5
    lrs, rate = learned_rates(kind, model, steps, 0.3)
    tensors = list(model.parameters()) + list(lrs.parameters())
    want = loop_meta_loss(model, batch, rate, steps, first_order, F.cross_entropy)
    got = check(model, batch, lrs, steps, first_order, F.cross_entropy, tensors, want)[2]
    assert all(g.abs().sum() > 0 for g in got[len(list(model.parameters())) :])  # the rates are meta-trained


@pytest.mark.parametrize("first_order", [False, True], ids=["2nd", "1st"])
def test_multi_step_loss_with_lslr(first_order, layout):  # noqa: F811
    model, batch = conv4(), classification_batch()
    steps = 4
    lrs, rate = learned_rates("lslr", model, steps, 0.3)
    w = fastmeta.msl_weights(steps, epoch=3, anneal_epochs=10)
    w[1] = 0.0  # a step without a query loss
    tensors = list(model.parameters()) + list(lrs.parameters())
    want = loop_meta_loss(model, batch, rate, steps, first_order, F.cross_entropy, msl=w.tolist())
    check(model, batch, lrs, steps, first_order, F.cross_entropy, tensors, want, multi_step_weights=w)


@pytest.mark.parametrize("name", list(MODELS))
def test_anil(name, layout):  # noqa: F811
    """The shared body is computed once per set (run.split); its meta-gradient comes through the features'
    adjoints, summed over the steps and the multi-step queries."""
    make_model, make_batch, loss_fn, lr = MODELS[name]
    model, batch = make_model(), make_batch()
    steps = 3
    w = fastmeta.msl_weights(steps, epoch=1, anneal_epochs=5)
    adapted = [n for n, _ in model.named_parameters() if n.startswith("head.")]
    params = list(model.parameters())
    want = loop_meta_loss(model, batch, lr, steps, False, loss_fn, adapted=adapted, msl=w.tolist())
    out, _, got = check(
        model, batch, lr, steps, False, loss_fn, params, want, adapt_params=["head"], multi_step_weights=w
    )
    assert set(out.fast_weights) == set(adapted)
    assert all(g.abs().sum() > 0 for g in got[:2])  # the body is meta-trained


def test_anil_with_metasgd_and_a_shared_layer_after_the_adapted_ones():
    """Adapting the first layer only: every later layer is shared, used in every step and query."""
    model, batch = mlp(), regression_batch()
    lrs, rate = learned_rates("metasgd", model, 3, 0.01, params=["l1"])
    tensors = list(model.parameters()) + list(lrs.parameters())
    want = loop_meta_loss(model, batch, rate, 3, False, F.mse_loss, adapted=lrs.names)
    got = check(model, batch, lrs, 3, False, F.mse_loss, tensors, want)[2]
    assert all(g.abs().sum() > 0 for g in got)


def test_zero_inner_steps():
    model, batch = conv4(), classification_batch()
    params = list(model.parameters())
    out = check(model, batch, 0.4, 0, False, F.cross_entropy, params, loop_meta_loss(model, batch, 0.4, 0, False,
                F.cross_entropy))[0]  # fmt: skip
    assert out.support_losses.shape == (batch.num_tasks, 0)


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_other_runners(strategy):
    model, batch = CustomMLP().to(D64), regression_batch()
    want = loop_meta_loss(model, batch, 0.01, 3, False, F.mse_loss)
    check(model, batch, 0.01, 3, False, F.mse_loss, list(model.parameters()), want, strategy=strategy)


def test_resnet12_with_batchnorm():
    """A model with residual blocks (not an nn.Sequential of known layers: the per-task loop runner)."""
    model = ResNet12(n_way=3, in_channels=1, widths=(2, 3, 3, 4), image_size=16).to(D64)
    batch = classification_batch(T=2)
    want = loop_meta_loss(model, batch, 0.2, 2, False, F.cross_entropy)
    check(model, batch, 0.2, 2, False, F.cross_entropy, list(model.parameters()), want)


def check_lslr_multi_step(batch, first_order, steps=3, **kw):
    """check() of a Conv4 with LSLR rates and the multi-step loss on `batch`, against the loop: (out, plain, the
    model, its rates, the tensors differentiated)."""
    model = conv4()
    lrs, rate = learned_rates("lslr", model, steps, 0.3)
    w = fastmeta.msl_weights(steps, epoch=2)
    tensors = list(model.parameters()) + list(lrs.parameters())
    want = loop_meta_loss(model, batch, rate, steps, first_order, F.cross_entropy, msl=w.tolist())
    out, plain, _ = check(model, batch, lrs, steps, first_order, F.cross_entropy, tensors, want,
                          multi_step_weights=w, **kw)  # fmt: skip
    return out, plain, model, lrs, tensors


@pytest.mark.parametrize("first_order", [False, True], ids=["2nd", "1st"])
def test_combined_with_task_chunks(first_order):
    batch = classification_batch(T=5)
    steps = 3
    # chunks of 2, 2 and 1 tasks
    out, plain, model, lrs, tensors = check_lslr_multi_step(batch, first_order, steps, recompute=("steps", 2))
    assert_close(out.support_losses, plain.support_losses, rtol=1e-12, atol=1e-14)
    assert_close(out.fast_weights, plain.fast_weights, rtol=1e-12, atol=1e-14)
    # ("steps", k) with k >= T is recompute="steps".
    check(model, batch, lrs, steps, first_order, F.cross_entropy, tensors, recompute=("steps", 5))


def test_outputs_are_the_plain_steps_detached():
    model, batch = conv4(), classification_batch(T=4)
    lrs, _ = learned_rates("lslr", model, 3, 0.3)
    plain = fastmeta.maml_step(model, batch, lrs, 3)
    out = fastmeta.maml_step(model, batch, lrs, 3, recompute="steps")
    for f in ("task_losses", "accuracy", "support_losses", "predictions"):
        assert_close(getattr(out, f), getattr(plain, f), rtol=1e-12, atol=1e-14)
        assert not getattr(out, f).requires_grad
    assert_close(out.fast_weights, plain.fast_weights, rtol=1e-12, atol=1e-14)
    assert all(not w.requires_grad for w in out.fast_weights.values())
    with torch.no_grad():  # the plain step
        evaluated = fastmeta.maml_step(model, batch, lrs, 3, recompute="steps")
    assert not evaluated.loss.requires_grad
    assert_close(evaluated.loss, plain.loss.detach(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("recompute", ["steps", 2, ("steps", 2)], ids=str)
def test_backward_checks_the_parameters_did_not_change(recompute):
    model, batch = mlp(), regression_batch()
    out = fastmeta.maml_step(model, batch, 0.01, 2, loss_fn=F.mse_loss, recompute=recompute)
    with torch.no_grad():
        model.l1.weight.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.loss.backward()


def dropout_mlp():
    return nn.Sequential(nn.Linear(1, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 16), nn.Tanh(),
                         nn.Dropout(0.3), nn.Linear(16, 1)).to(D64)  # fmt: skip


@pytest.mark.parametrize("recompute", ["steps", ("steps", 2), 2], ids=str)
def test_dropout_draws_the_same_masks_when_rebuilt(recompute, monkeypatch):
    """With the same seed, the recomputed step draws the plain step's dropout masks in forward and again in
    backward (its random state is saved per step and per chunk), so loss and meta-gradient are the plain
    step's (chunks: the plain steps of the chunks, one after the other); and the caller's random stream
    continues as after the plain step. ("steps" here with its query losses in one chunk of all tasks, as the plain
    step computes them: test_dropout_with_query_chunks has the chunked ones. ("steps", 2)'s query is in chunks
    of 2 tasks with the query losses of those 2 tasks in one piece, so that backward draws the masks that forward,
    the plain step of each chunk, drew.)"""
    monkeypatch.setattr(maml_module, "_checkpoint_interval", lambda steps: 2)  # steps recomputed in segments
    if recompute == "steps":
        monkeypatch.setattr(maml_module, "_query_chunks", lambda batch, start: [slice(0, batch.num_tasks)])
    model, batch = dropout_mlp(), regression_batch(T=3)
    lrs, _ = learned_rates("lslr", model, 3, 0.01)
    tensors = list(model.parameters()) + list(lrs.parameters())
    w = fastmeta.msl_weights(3, epoch=1)
    kw = dict(loss_fn=F.mse_loss, multi_step_weights=w)
    k = recompute if isinstance(recompute, int) else recompute[1] if isinstance(recompute, tuple) else 3
    fields = (batch.support_x, batch.support_y, batch.query_x, batch.query_y)
    torch.manual_seed(1)
    plain = fastmeta.maml_step(model, batch, lrs, 3, **kw)
    if k < batch.num_tasks:
        chunks = [fastmeta.TaskBatch(*(t[lo : lo + k] for t in fields)) for lo in range(0, batch.num_tasks, k)]
        torch.manual_seed(1)
        plain.loss = sum(fastmeta.maml_step(model, c, lrs, 3, **kw).loss * (c.num_tasks / 3) for c in chunks)
    want = grads_of(plain.loss, tensors)
    after_plain = torch.rand(3)
    torch.manual_seed(1)
    out = fastmeta.maml_step(model, batch, lrs, 3, recompute=recompute, **kw)
    got = grads_of(out.loss, tensors)
    assert_close(torch.rand(3), after_plain, rtol=0, atol=0)
    assert_close(out.loss, plain.loss, rtol=1e-12, atol=0)
    assert_grads_close(got, want, rtol=1e-10)
    torch.manual_seed(2)
    other = fastmeta.maml_step(model, batch, lrs, 3, **kw)
    assert not torch.allclose(other.loss, plain.loss)  # (the masks do matter)


def test_query_chunks():
    """Chunks of tasks with at most the support sets' examples of all tasks (and at least one task)."""
    batch = classification_batch(T=5, shots=1, queries=2)  # 15 support examples, 6 queries a task: 2 tasks a chunk
    assert maml_module._query_chunks(batch, 0) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    batch = classification_batch(T=3, shots=1, queries=15)  # 9 support examples, 45 queries a task: 1
    assert maml_module._query_chunks(batch, 0) == [slice(0, 1), slice(1, 2), slice(2, 3)]
    assert maml_module._query_chunks(classification_batch(T=3, shots=5, queries=1), 0) == [slice(0, 3)]
    assert maml_module._query_chunks(batch, 4) == [slice(0, 3)]  # ANIL's body features: one chunk


@pytest.mark.parametrize("first_order", [False, True], ids=["2nd", "1st"])
def test_query_losses_one_task_at_a_time(first_order):
    """Query sets much larger than the support sets (ResNet-12's 75 queries against 5 support examples): one
    task's query graph at a time, the multi-step loss's intermediate queries too; the same loss, meta-gradient
    and outputs as the plain step and the loop."""
    batch = classification_batch(T=3, shots=1, queries=4)
    assert len(maml_module._query_chunks(batch, 0)) == 3
    out, plain = check_lslr_multi_step(batch, first_order)[:2]
    for f in ("task_losses", "support_losses", "predictions"):
        assert_close(getattr(out, f), getattr(plain, f), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("steps", [0, 2])
def test_dropout_with_query_chunks(steps):
    """Query losses chunk by chunk, each chunk drawing its own dropout masks: the meta-gradient is the exact
    gradient of the loss with the masks drawn (a central difference along a random direction, with the same
    seed, so the same masks), in backward as in forward."""
    model, batch = dropout_mlp(), regression_batch(T=3, k=2, q=5)
    assert len(maml_module._query_chunks(batch, 0)) == 3
    lrs, _ = learned_rates("lslr", model, max(steps, 1), 0.01)
    tensors = list(model.parameters()) + list(lrs.parameters())
    w = fastmeta.msl_weights(steps, epoch=1) if steps else None

    def loss() -> torch.Tensor:
        torch.manual_seed(1)
        return fastmeta.maml_step(model, batch, lrs, steps, loss_fn=F.mse_loss, multi_step_weights=w,
                                  recompute="steps").loss  # fmt: skip

    got = grads_of(loss(), tensors)
    direction = [torch.randn_like(t) for t in tensors]
    eps = 1e-6
    values = []
    for sign in (1, -1):
        with torch.no_grad():
            for t, d in zip(tensors, direction):
                t.add_(sign * eps * d)
        values.append(loss().item())  # (with grad enabled: under no_grad the plain step runs)
        with torch.no_grad():
            for t, d in zip(tensors, direction):
                t.sub_(sign * eps * d)
    numeric = (values[0] - values[1]) / (2 * eps)
    analytic = sum((g * d).sum() for g, d in zip(got, direction)).item()
    assert numeric == pytest.approx(analytic, rel=1e-6)
    torch.manual_seed(2)
    other = fastmeta.maml_step(model, batch, lrs, steps, loss_fn=F.mse_loss, multi_step_weights=w)
    assert not torch.allclose(other.loss, loss())  # (the masks do matter)


def test_on_device(device, monkeypatch):
    """On the device the tasks are on, dropout included (the device's random state is saved and restored; the
    query losses in one chunk, so that the masks are the plain step's)."""
    monkeypatch.setattr(maml_module, "_query_chunks", lambda batch, start: [slice(0, batch.num_tasks)])
    model, batch = dropout_mlp().to(device), regression_batch(device=device)
    lrs, _ = learned_rates("lslr", model, 3, 0.01)
    tensors = list(model.parameters()) + list(lrs.parameters())
    torch.manual_seed(1)
    plain = fastmeta.maml_step(model, batch, lrs, 3, loss_fn=F.mse_loss)
    want = grads_of(plain.loss, tensors)
    torch.manual_seed(1)
    out = fastmeta.maml_step(model, batch, lrs, 3, loss_fn=F.mse_loss, recompute="steps")
    assert_close(out.loss, plain.loss, rtol=1e-12, atol=0)
    assert_grads_close(grads_of(out.loss, tensors), want, rtol=1e-10)


@pytest.mark.parametrize(
    "bad", [0, -1, 1.5, True, "step", "Steps", ("steps", 0), ("steps",), ("chunks", 2), ["steps", 2], (2, "steps")]
)
def test_bad_recompute_values(bad):
    model, batch = mlp(), regression_batch()
    with pytest.raises(ValueError, match="recompute must be an integer >= 1"):
        fastmeta.maml_step(model, batch, 0.01, 1, loss_fn=F.mse_loss, recompute=bad)
    if isinstance(bad, str) or isinstance(bad, tuple):
        with pytest.raises(ValueError, match="'steps' or \\('steps', k\\)"):
            fastmeta.maml_step(model, batch, 0.01, 1, loss_fn=F.mse_loss, recompute=bad)


def test_checkpoint_interval():
    assert [maml_module._checkpoint_interval(s) for s in (0, 1, 2, 4, 5, 10, 16, 17)] == [1, 1, 2, 2, 3, 4, 4, 5]


def test_task_chunks_run_each_step_once(monkeypatch):
    """recompute=k differentiates each chunk as soon as its loss is computed: every inner step runs once (with
    its graph), none again in backward; the gradients are the plain step's, for any gradient of the loss."""
    model, batch = conv4(), classification_batch(T=4)
    calls = []
    step = maml_module._step
    monkeypatch.setattr(maml_module, "_step", lambda *a, **k: calls.append(a[5]) or step(*a, **k))
    out = fastmeta.maml_step(model, batch, 0.4, 3, recompute=2)
    got = grads_of(-2.5 * out.loss, list(model.parameters()))
    assert calls == [True] * 6  # 2 chunks x 3 steps, all second order, in forward
    calls.clear()
    plain = fastmeta.maml_step(model, batch, 0.4, 3)
    assert_grads_close(got, grads_of(-2.5 * plain.loss, list(model.parameters())), rtol=1e-10)
