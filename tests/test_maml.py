"""fastmeta.maml_step and adapt: the meta-gradient against a plain per-task loop (itself checked against finite
differences), in float64, for a Conv4 with BatchNorm and an MLP, first and second order, learned learning rates,
MAML++'s multi-step loss, ANIL, every runner; plus outputs, meta-testing and bad input."""

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.testing import assert_close

import fastmeta
from fastmeta import ops
from fastmeta.algorithms import _batched

D64 = torch.float64


def conv4(channels=4, n_way=3, bn=True, in_channels=1, bn_signs="mixed"):
    """Conv4 (4 x [conv3x3, BatchNorm, ReLU, maxpool 2]) on 16x16 inputs, with a named head for ANIL.

    bn_signs="mixed": BatchNorm scales of both signs (a negative scale changes which element a max-pool after
    the ReLU picks); "positive": the default init (ones)."""
    layers = []
    for i in range(4):
        layers += [nn.Conv2d(in_channels if i == 0 else channels, channels, 3, padding=1)]
        if bn:
            layers += [nn.BatchNorm2d(channels, track_running_stats=False)]
            if bn_signs == "mixed":
                nn.init.uniform_(layers[-1].weight, -1.5, 1.5)
        layers += [nn.ReLU(), nn.MaxPool2d(2)]
    body = nn.Sequential(*layers, nn.Flatten())
    return nn.Sequential(OrderedDict(features=body, head=nn.Linear(channels, n_way))).to(D64)


@pytest.fixture(params=["grouped", "per-task"])
def layout(request, monkeypatch):
    """Convolutions of all tasks as one grouped convolution, or per task (channels-last on the CPU)."""
    monkeypatch.setattr(_batched.layout, "GROUPED_MAX_EXAMPLES", 10**9 if request.param == "grouped" else 0)
    return request.param


def mlp(hidden=8):
    return nn.Sequential(
        OrderedDict(
            l1=nn.Linear(1, hidden), a1=nn.ReLU(), l2=nn.Linear(hidden, hidden), a2=nn.Tanh(), head=nn.Linear(hidden, 1)
        )
    ).to(D64)


class CustomMLP(nn.Module):
    """Not an nn.Sequential: runs batched through its traced graph."""

    def __init__(self, bn=False):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(1, 8), nn.Linear(8, 1)
        self.bn = nn.BatchNorm1d(8) if bn else None

    def forward(self, x):
        h = self.fc1(x)
        if self.bn is not None:
            h = self.bn(h)
        return self.fc2(torch.relu(h))


class DataDependent(CustomMLP):
    """Python control flow on a tensor's value: torch.fx cannot trace it, so it runs in a loop."""

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(h.relu() if h.sum() > 0 else h)


def classification_batch(T=3, n_way=3, shots=2, queries=3, size=16, device="cpu", channels=1):
    sx = torch.randn(T, n_way * shots, channels, size, size, dtype=D64, device=device)
    qx = torch.randn(T, n_way * queries, channels, size, size, dtype=D64, device=device)
    sy = torch.arange(n_way, device=device).repeat_interleave(shots).repeat(T, 1)
    qy = torch.arange(n_way, device=device).repeat_interleave(queries).repeat(T, 1)
    return fastmeta.TaskBatch(sx, sy, qx, qy)


def regression_batch(T=4, k=5, q=6, device="cpu"):
    a, p = torch.rand(T, 1, 1, dtype=D64) * 4 + 1, torch.rand(T, 1, 1, dtype=D64) * 3
    sx, qx = torch.rand(T, k, 1, dtype=D64) * 10 - 5, torch.rand(T, q, 1, dtype=D64) * 10 - 5
    return fastmeta.TaskBatch(*(t.to(device) for t in (sx, a * torch.sin(sx + p), qx, a * torch.sin(qx + p))))


def loop_meta_loss(model, batch, lr, steps, first_order, loss_fn, adapted=None, msl=None, params=None):
    """The definition: a plain per-task loop of autograd.grad steps and subtractions (no fastmeta code).

    lr: a number, or lr(step) -> {name: lr}. Returns the meta-loss (mean over tasks of the query loss)."""
    params = dict(model.named_parameters()) if params is None else params
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    adapted = list(params) if adapted is None else adapted
    T = batch.num_tasks
    total = 0
    for t in range(T):
        fast = {n: params[n] for n in adapted}

        def f(x, fast):
            return functional_call(model, ({**params, **fast}, buffers), (x,))

        for s in range(steps):
            loss = loss_fn(f(batch.support_x[t], fast), batch.support_y[t])
            g = torch.autograd.grad(loss, list(fast.values()), create_graph=not first_order)
            rates = lr(s) if callable(lr) else dict.fromkeys(adapted, lr)
            fast = {n: fast[n] - rates[n] * (gi.detach() if first_order else gi) for n, gi in zip(adapted, g)}
            if msl is not None and s < steps - 1:
                total = total + msl[s] * loss_fn(f(batch.query_x[t], fast), batch.query_y[t]) / T
        w = 1.0 if msl is None else msl[-1]
        total = total + w * loss_fn(f(batch.query_x[t], fast), batch.query_y[t]) / T
    return total


def grads_of(loss, tensors):
    return torch.autograd.grad(loss, tensors, allow_unused=True, materialize_grads=True)


def assert_grads_close(got, want, rtol=1e-8):
    """Each gradient within rtol of the largest entry over all of them (a conv bias before BatchNorm has a
    gradient of ~0, pure rounding, so a per-tensor relative test would compare noise)."""
    scale = max(w.abs().max().item() for w in want)
    assert scale > 0
    for g, w in zip(got, want):
        assert_close(g, w, rtol=rtol, atol=rtol * scale)


MODELS = {
    "conv4-bn": (conv4, classification_batch, F.cross_entropy, 0.4),
    "mlp": (mlp, regression_batch, F.mse_loss, 0.01),
}


@pytest.mark.parametrize("steps", [1, 5])
@pytest.mark.parametrize("first_order", [False, True], ids=["2nd", "1st"])
@pytest.mark.parametrize("name", list(MODELS))
def test_meta_gradient_matches_loop(name, first_order, steps, layout):
    make_model, make_batch, loss_fn, lr = MODELS[name]
    model, batch = make_model(), make_batch()
    params = list(model.parameters())
    out = fastmeta.maml_step(model, batch, lr, steps, first_order, loss_fn)
    want_loss = loop_meta_loss(model, batch, lr, steps, first_order, loss_fn)
    assert_close(out.loss, want_loss, rtol=1e-10, atol=0)
    assert_grads_close(grads_of(out.loss, params), grads_of(want_loss, params))


@pytest.mark.parametrize("strategy", ["batched", "loop", "vmap"])
def test_every_runner_matches_loop(strategy):
    model, batch = mlp(), regression_batch()
    out = fastmeta.maml_step(model, batch, 0.01, 2, False, F.mse_loss, strategy=strategy)
    want = loop_meta_loss(model, batch, 0.01, 2, False, F.mse_loss)
    assert_grads_close(grads_of(out.loss, list(model.parameters())), grads_of(want, list(model.parameters())))


def test_loop_runner_with_batchnorm_matches_loop():
    model, batch = conv4(), classification_batch()
    out = fastmeta.maml_step(model, batch, 0.4, 2, strategy="loop")
    want = loop_meta_loss(model, batch, 0.4, 2, False, F.cross_entropy)
    assert_grads_close(grads_of(out.loss, list(model.parameters())), grads_of(want, list(model.parameters())))


@pytest.mark.parametrize("bn", [False, True])
def test_custom_module_picks_an_exact_runner(bn):
    model = CustomMLP(bn).to(D64)
    batch = regression_batch()
    out = fastmeta.maml_step(model, batch, 0.01, 2, False, F.mse_loss)
    want = loop_meta_loss(model, batch, 0.01, 2, False, F.mse_loss)
    assert_grads_close(grads_of(out.loss, list(model.parameters())), grads_of(want, list(model.parameters())))
    assert isinstance(_batched.runner(model, "auto"), _batched.TracedModel)


class FunctionalHead(nn.Module):
    """Parameters read through get_attr (F.linear(x, self.w)), after a module layer: the batched runner must see
    that the steps reading them adapt (it once took such a model for a shared body and did not adapt it)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(1, 6)
        self.w = nn.Parameter(torch.randn(1, 6) * 0.5)
        self.b = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return F.linear(torch.tanh(self.body(x)), self.w, self.b)


@pytest.mark.parametrize("make", [lambda: nn.Linear(1, 1), FunctionalHead], ids=["bare-linear", "functional"])
@pytest.mark.parametrize("adapt_params", [None, ["w", "b"]], ids=["all", "head"])
def test_parameters_read_by_get_attr_adapt(make, adapt_params):
    torch.manual_seed(0)
    model, batch = make().to(D64), regression_batch()
    if adapt_params and isinstance(model, nn.Linear):
        adapt_params = ["weight"]
    out = fastmeta.maml_step(model, batch, 0.01, 2, False, F.mse_loss, adapt_params=adapt_params)
    want = loop_meta_loss(model, batch, 0.01, 2, False, F.mse_loss, adapted=adapt_params)
    assert isinstance(_batched.runner(model, "auto"), _batched.TracedModel)
    assert_close(out.loss, want, rtol=1e-10, atol=0)
    assert_grads_close(grads_of(out.loss, list(model.parameters())), grads_of(want, list(model.parameters())))


@pytest.mark.parametrize("name", list(MODELS))
def test_meta_gradient_matches_finite_differences(name, layout):
    """The loop oracle and maml_step both agree with central differences of the meta-loss (second order)."""
    make_model, make_batch, loss_fn, lr = MODELS[name]
    model, batch = make_model(), make_batch(T=2)
    params = list(model.parameters())
    out = fastmeta.maml_step(model, batch, lr, 2, False, loss_fn)
    got = grads_of(out.loss, params)
    oracle = grads_of(loop_meta_loss(model, batch, lr, 2, False, loss_fn), params)
    for _ in range(3):
        v = [torch.randn_like(p) for p in params]
        h = 1e-6  # small: max-pooling and ReLU make the meta-loss piecewise smooth
        with torch.no_grad():
            for p, d in zip(params, v):
                p.add_(h * d)
            up = fastmeta.maml_step(model, batch, lr, 2, False, loss_fn).loss
            for p, d in zip(params, v):
                p.sub_(2 * h * d)
            down = fastmeta.maml_step(model, batch, lr, 2, False, loss_fn).loss
            for p, d in zip(params, v):
                p.add_(h * d)
        fd = (up - down) / (2 * h)
        for g in (got, oracle):
            directional = sum((gi * d).sum() for gi, d in zip(g, v))
            assert_close(directional, fd, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("kind", ["metasgd", "lslr"])
@pytest.mark.parametrize("first_order", [False, True], ids=["2nd", "1st"])
@pytest.mark.parametrize("name", list(MODELS))
def test_learned_learning_rates(name, first_order, kind, layout):
    make_model, make_batch, loss_fn, lr = MODELS[name]
    model, batch = make_model(), make_batch()
    steps = 3
    if kind == "metasgd":
        lrs = fastmeta.MetaSGDLR(model, init=lr)
        with torch.no_grad():
            for t in lrs.lrs:
                t.mul_(torch.rand_like(t) + 0.5)

        def rate(s):
            return dict(zip(lrs.names, lrs.lrs))
    else:
        lrs = fastmeta.LSLR(model, inner_steps=steps, init=lr)
        with torch.no_grad():
            lrs.lrs.mul_(torch.rand_like(lrs.lrs) + 0.5)

        def rate(s):
            return dict(zip(lrs.names, lrs.lrs[s]))

    tensors = list(model.parameters()) + list(lrs.parameters())
    out = fastmeta.maml_step(model, batch, lrs, steps, first_order, loss_fn)
    want = loop_meta_loss(model, batch, rate, steps, first_order, loss_fn)
    got = grads_of(out.loss, tensors)
    assert_grads_close(got, grads_of(want, tensors))
    assert all(g.abs().sum() > 0 for g in got[len(list(model.parameters())) :])  # the rates are meta-trained


@pytest.mark.parametrize("name", list(MODELS))
def test_anil_adapts_the_head_only(name, layout):
    make_model, make_batch, loss_fn, lr = MODELS[name]
    model, batch = make_model(), make_batch()
    params = list(model.parameters())
    out = fastmeta.maml_step(model, batch, lr, 3, False, loss_fn, adapt_params=["head"])
    assert set(out.fast_weights) == {"head.weight", "head.bias"}
    adapted = [n for n, _ in model.named_parameters() if n.startswith("head.")]
    want = loop_meta_loss(model, batch, lr, 3, False, loss_fn, adapted=adapted)
    got = grads_of(out.loss, params)
    assert_grads_close(got, grads_of(want, params))
    assert all(g.abs().sum() > 0 for g in got[:2])  # the shared body is meta-trained too
    # The body's output is computed once per set, not once per step.
    run = _batched.runner(model, "auto")
    assert run.split({"head.weight", "head.bias"}) == len(run.layers) - 1


def test_anil_with_predicate_and_metasgd():
    model, batch = conv4(), classification_batch()
    lrs = fastmeta.MetaSGDLR(model, init=0.3, params=lambda n: n.startswith("head"))
    out = fastmeta.maml_step(model, batch, lrs, 2)
    want = loop_meta_loss(model, batch, lambda s: dict(zip(lrs.names, lrs.lrs)), 2, False, F.cross_entropy, lrs.names)
    tensors = list(model.parameters()) + list(lrs.parameters())
    assert_grads_close(grads_of(out.loss, tensors), grads_of(want, tensors))


@pytest.mark.parametrize("first_order", [False, True], ids=["2nd", "1st"])
def test_multi_step_loss(first_order, layout):
    model, batch = conv4(), classification_batch()
    w = fastmeta.msl_weights(4, epoch=3, anneal_epochs=10)
    out = fastmeta.maml_step(model, batch, 0.4, 4, first_order, multi_step_weights=w)
    want = loop_meta_loss(model, batch, 0.4, 4, first_order, F.cross_entropy, msl=w.tolist())
    assert_close(out.loss, want, rtol=1e-10, atol=0)
    params = list(model.parameters())
    assert_grads_close(grads_of(out.loss, params), grads_of(want, params))


def test_msl_weights():
    w0 = fastmeta.msl_weights(5, epoch=0)
    assert_close(w0, torch.full((5,), 0.2, dtype=D64))
    w = fastmeta.msl_weights(5, epoch=7, anneal_epochs=10)
    assert w[-1] > 0.2 and (w[:-1] < 0.2).all() and (w[:-1] >= 0.03 / 5).all()
    late = fastmeta.msl_weights(5, epoch=1000, anneal_epochs=10)
    assert_close(late.sum(), torch.tensor(1.0, dtype=D64))
    assert_close(late[:-1], torch.full((4,), 0.006, dtype=D64))


def test_outputs():
    model, batch = conv4(), classification_batch(T=4)
    out = fastmeta.maml_step(model, batch, 0.4, 2)
    T, nq = 4, batch.query_x.shape[1]
    assert out.loss.dim() == 0 and out.loss.requires_grad
    assert out.task_losses.shape == (T,) and out.task_losses.requires_grad
    assert_close(out.loss, out.task_losses.mean())
    assert out.predictions.shape == (T, nq, 3) and not out.predictions.requires_grad
    want_acc = (out.predictions.argmax(-1) == batch.query_y).to(D64).mean(1)
    assert_close(out.accuracy, want_acc)
    for t in range(T):
        assert_close(out.task_losses[t], F.cross_entropy(out.predictions[t], batch.query_y[t]))
    assert out.support_losses.shape == (T, 2) and not out.support_losses.requires_grad
    assert set(out.fast_weights) == {n for n, _ in model.named_parameters()}
    assert all(out.fast_weights[n].shape == (T, *p.shape) for n, p in model.named_parameters())
    reg = fastmeta.maml_step(mlp(), regression_batch(), 0.01, 1, loss_fn=F.mse_loss)
    assert reg.accuracy is None


def test_zero_inner_steps_is_the_initial_model():
    model, batch = mlp(), regression_batch()
    out = fastmeta.maml_step(model, batch, 0.01, 0, loss_fn=F.mse_loss)
    want = torch.stack([F.mse_loss(model(batch.query_x[t]), batch.query_y[t]) for t in range(batch.num_tasks)])
    assert_close(out.task_losses, want)
    assert out.support_losses.shape == (batch.num_tasks, 0)


def test_inner_update_goes_through_the_op(monkeypatch):
    calls = []
    real = ops.fast_weight_update

    def spy(params, grads, lr, decay=None):
        calls.append(len(params))
        return real(params, grads, lr, decay)

    monkeypatch.setattr(ops, "fast_weight_update", spy)
    model, batch = conv4(), classification_batch()
    fastmeta.maml_step(model, batch, 0.4, 3)
    assert calls == [len(list(model.parameters()))] * 3  # one call per step for all tensors of all tasks


def test_batchnorm_eval_mode_uses_running_stats_and_nothing_is_updated(layout):
    model = conv4()
    model.features[1] = nn.BatchNorm2d(4).to(D64)  # with running statistics
    with torch.no_grad():
        model.features[1].running_mean.uniform_(-1, 1)
        model.features[1].running_var.uniform_(0.5, 2)
    before = {n: b.clone() for n, b in model.named_buffers()}
    batch = classification_batch()
    params = list(model.parameters())
    for mode in (True, False):
        model.train(mode)
        out = fastmeta.maml_step(model, batch, 0.4, 2)
        want = loop_meta_loss(model, batch, 0.4, 2, False, F.cross_entropy)
        assert_close(out.loss, want, rtol=1e-10, atol=0)
        assert_grads_close(grads_of(out.loss, params), grads_of(want, params))
    for n, b in model.named_buffers():
        assert torch.equal(b, before[n]), n


@pytest.mark.parametrize("bn_signs", ["positive", "mixed"])
def test_rgb_input(layout, bn_signs):
    model, batch = conv4(in_channels=3, bn_signs=bn_signs), classification_batch(channels=3)
    out = fastmeta.maml_step(model, batch, 0.4, 1)
    want = loop_meta_loss(model, batch, 0.4, 1, False, F.cross_entropy)
    assert_grads_close(grads_of(out.loss, list(model.parameters())), grads_of(want, list(model.parameters())))


def test_generic_loss_function_matches_flat_path():
    model, batch = conv4(), classification_batch()
    a = fastmeta.maml_step(model, batch, 0.4, 2)
    b = fastmeta.maml_step(model, batch, 0.4, 2, loss_fn=lambda p, y: F.cross_entropy(p, y))
    assert_close(a.task_losses, b.task_losses)
    assert_grads_close(grads_of(a.loss, list(model.parameters())), grads_of(b.loss, list(model.parameters())))


def test_adapt_for_meta_testing(layout):
    model, batch = conv4(), classification_batch()
    before = [p.detach().clone() for p in model.parameters()]
    lrs = fastmeta.LSLR(model, inner_steps=2, init=0.3)
    with torch.no_grad():  # rates that differ per step and per tensor, so that using the wrong ones shows
        lrs.lrs.copy_(torch.linspace(0.05, 0.4, lrs.lrs.numel(), dtype=lrs.lrs.dtype).view_as(lrs.lrs))
    adapted = fastmeta.adapt(model, batch.support_x, batch.support_y, lrs, inner_steps=4)  # longer than trained
    pred = adapted(batch.query_x)
    assert pred.shape == (batch.num_tasks, batch.query_x.shape[1], 3) and not pred.requires_grad
    assert all(not w.requires_grad for w in adapted.fast_weights.values())
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b) and p.grad is None
    steps = lambda s: dict(zip(lrs.names, lrs.lrs[min(s, 1)].tolist()))  # noqa: E731  steps past 2: the last rates
    for t in range(batch.num_tasks):
        fast = dict(model.named_parameters())
        for s in range(4):
            loss = F.cross_entropy(functional_call(model, fast, (batch.support_x[t],)), batch.support_y[t])
            g = torch.autograd.grad(loss, list(fast.values()))
            fast = {n: fast[n] - steps(s)[n] * gi for (n, _), gi in zip(fast.items(), g)}
        assert_close(pred[t], functional_call(model, fast, (batch.query_x[t],)))
    with pytest.raises(ValueError, match="x has 2 tasks but the model was adapted to 3"):
        adapted(batch.query_x[:2])


def test_maml_step_under_no_grad_evaluates():
    model, batch = mlp(), regression_batch()
    want = fastmeta.maml_step(model, batch, 0.01, 2, loss_fn=F.mse_loss)
    with torch.no_grad():
        out = fastmeta.maml_step(model, batch, 0.01, 2, loss_fn=F.mse_loss)
    assert not out.loss.requires_grad
    assert_close(out.task_losses, want.task_losses.detach())


def test_float32_meta_gradient():
    model, batch = conv4().float(), classification_batch().to(dtype=torch.float32)
    params = list(model.parameters())
    out = fastmeta.maml_step(model, batch, 0.4, 1)
    want = loop_meta_loss(model, batch, 0.4, 1, False, F.cross_entropy)
    assert out.loss.dtype == torch.float32
    assert_grads_close(grads_of(out.loss, params), grads_of(want, params), rtol=2e-3)


def test_on_device(device, layout):
    model, batch = conv4().to(device), classification_batch(device=device)
    params = list(model.parameters())
    out = fastmeta.maml_step(model, batch, 0.4, 2)
    want = loop_meta_loss(model, batch, 0.4, 2, False, F.cross_entropy)
    assert_grads_close(grads_of(out.loss, params), grads_of(want, params))


@pytest.mark.parametrize("first_order", [False, True], ids=["2nd", "1st"])
def test_under_autocast(device, layout, first_order):
    """Mixed precision (bfloat16 autocast): every convolution of the step, forward and backward, runs in
    bfloat16, the gradients of the float32 model are float32 and finite, and the first-order meta-gradient is the
    loop's under the same autocast up to bfloat16 rounding. (Second-order ones differ from float32 by their own
    size here, in the loop as in fastmeta: nothing to compare.)"""
    from torch.utils._python_dispatch import TorchDispatchMode

    class ConvDtypes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.convolution, torch.ops.aten.convolution_backward):
                self.seen.add(args[0].dtype)
            return func(*args, **(kwargs or {}))

    model, batch = conv4().float().to(device), classification_batch(device=device).to(dtype=torch.float32)
    params = list(model.parameters())
    with torch.autocast(device, dtype=torch.bfloat16), ConvDtypes() as convs:
        convs.seen = set()
        out = fastmeta.maml_step(model, batch, 0.4, 2, first_order)
        got = grads_of(out.loss, params)
    assert convs.seen == {torch.bfloat16}
    assert all(g.dtype == torch.float32 and g.isfinite().all() for g in got)
    if first_order:
        with torch.autocast(device, dtype=torch.bfloat16):
            want = loop_meta_loss(model, batch, 0.4, 2, first_order, F.cross_entropy)
        assert_close(out.loss, want, rtol=2e-2, atol=0)
        assert_grads_close(got, grads_of(want, params), rtol=5e-2)


def test_task_batch_checks():
    x, y = torch.randn(3, 4, 2), torch.zeros(3, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="query_x has 2 tasks but support_x has 3"):
        fastmeta.TaskBatch(x, y, x[:2], y[:2])
    with pytest.raises(ValueError, match="support_x has 4 examples per task but support_y has 3"):
        fastmeta.TaskBatch(x, y[:, :3], x, y)
    with pytest.raises(ValueError, match="support_x examples have shape"):
        fastmeta.TaskBatch(x, y, torch.randn(3, 4, 5), y)
    with pytest.raises(ValueError, match="support_y must have a task and an example dimension"):
        fastmeta.TaskBatch(x, y[0], x, y)
    with pytest.raises(TypeError, match="query_y must be a tensor"):
        fastmeta.TaskBatch(x, y, x, [0, 1])
    b = fastmeta.TaskBatch(x, y, x, y).to(dtype=torch.float64)
    assert b.support_x.dtype == torch.float64 and b.support_y.dtype == torch.long and b.num_tasks == 3


def test_bad_arguments():
    model, batch = mlp(), regression_batch()
    with pytest.raises(TypeError, match="batch must be a fastmeta.TaskBatch"):
        fastmeta.maml_step(model, (batch.support_x, batch.support_y), 0.1)
    with pytest.raises(ValueError, match="inner_steps must be an integer >= 0, got -1"):
        fastmeta.maml_step(model, batch, 0.1, -1)
    with pytest.raises(ValueError, match="inner_steps must be an integer >= 0, got 1.5"):
        fastmeta.maml_step(model, batch, 0.1, 1.5)
    with pytest.raises(TypeError, match="inner_lr must be a number or an InnerLR module, got str"):
        fastmeta.maml_step(model, batch, "0.1")
    with pytest.raises(ValueError, match="one weight per inner step \\(2\\), got 3"):
        fastmeta.maml_step(model, batch, 0.1, 2, multi_step_weights=[0.3, 0.3, 0.4])
    with pytest.raises(ValueError, match="no parameter named or under \\['body'\\]"):
        fastmeta.maml_step(model, batch, 0.1, adapt_params=["body"])
    with pytest.raises(ValueError, match="strategy must be 'auto', 'batched', 'vmap' or 'loop', got 'fast'"):
        fastmeta.maml_step(model, batch, 0.1, strategy="fast")
    with pytest.raises(ValueError, match="loss_fn must return one 0-d loss per task"):
        fastmeta.maml_step(model, batch, 0.1, loss_fn=lambda p, y: (p - y) ** 2)
    lrs = fastmeta.MetaSGDLR(model, params=["head"])
    with pytest.raises(ValueError, match="inner_lr was built for parameters"):
        fastmeta.maml_step(model, batch, lrs, adapt_params=["l1"])
    with pytest.raises(ValueError, match="strategy='vmap' is not exact for models with BatchNorm"):
        fastmeta.maml_step(conv4(), classification_batch(), 0.1, strategy="vmap")
    with pytest.raises(ValueError, match="strategy='batched' cannot run this model: DataDependent cannot be traced"):
        fastmeta.maml_step(DataDependent().to(D64), batch, 0.1, strategy="batched")
    with pytest.raises(ValueError, match="inner_steps must be an integer >= 1"):
        fastmeta.LSLR(model, inner_steps=0)


@pytest.mark.parametrize("first_order", [False, True], ids=["2nd", "1st"])
def test_recompute_gives_the_same_step(first_order, layout):
    model, batch = conv4(), classification_batch(T=5)
    lrs = fastmeta.LSLR(model, inner_steps=3, init=0.3)
    tensors = list(model.parameters()) + list(lrs.parameters())
    kw = dict(multi_step_weights=fastmeta.msl_weights(3, epoch=2))
    a = fastmeta.maml_step(model, batch, lrs, 3, first_order, **kw)
    b = fastmeta.maml_step(model, batch, lrs, 3, first_order, recompute=2, **kw)  # chunks of 2, 2 and 1 tasks
    assert_close(b.loss, a.loss, rtol=1e-12, atol=0)
    for f in ("task_losses", "accuracy", "support_losses", "predictions"):
        assert_close(getattr(b, f), getattr(a, f), rtol=1e-12, atol=1e-14)
    assert_close(b.fast_weights, a.fast_weights, rtol=1e-12, atol=1e-14)
    assert_grads_close(grads_of(b.loss, tensors), grads_of(a.loss, tensors), rtol=1e-10)
    assert not b.task_losses.requires_grad
    with pytest.raises(ValueError, match="recompute must be an integer >= 1, got 0"):
        fastmeta.maml_step(model, batch, 0.4, 1, recompute=0)


@pytest.mark.parametrize("adapt_params", [None, ["head"]], ids=["all", "anil"])
def test_adapt_predicts_what_maml_step_evaluates(adapt_params, layout):
    model, batch = conv4(), classification_batch()
    out = fastmeta.maml_step(model, batch, 0.4, 3, adapt_params=adapt_params)
    adapted = fastmeta.adapt(model, batch.support_x, batch.support_y, 0.4, 3, adapt_params=adapt_params)
    assert_close(adapted(batch.query_x), out.predictions, rtol=1e-10, atol=1e-12)
    assert set(adapted.fast_weights) == set(out.fast_weights)
