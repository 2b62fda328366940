"""The task-batched runner of any traceable model (fastmeta.algorithms._batched) and fastmeta.models.ResNet12."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.testing import assert_close

import fastmeta
from fastmeta.algorithms import _batched
from fastmeta.models import DropBlock, ResNet12, from_config

D64 = torch.float64


def test_resnet12_shapes_and_config():
    model = ResNet12(5, widths=(4, 6, 8, 10), image_size=32)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    assert model.embedding_size == 10
    assert all(not m.track_running_stats for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 16  # 4 x (3 + shortcut)
    rebuilt = from_config(model.config)
    assert rebuilt.config == model.config
    rebuilt.load_state_dict(model.state_dict())  # the same parameter names and shapes
    embedding = ResNet12(None, in_channels=1, widths=(4, 6, 8, 10), image_size=28)
    assert embedding(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    assert isinstance(embedding.head, nn.Identity)
    default = ResNet12()
    assert [b.conv1.out_channels for b in list(default.features)[:4]] == [64, 160, 320, 640]
    assert default.embedding_size == 640
    with pytest.raises(ValueError, match="image_size"):
        ResNet12(image_size=8)
    with pytest.raises(ValueError, match="widths"):
        ResNet12(widths=(4, 6))


def test_dropblock():
    x = torch.ones(64, 4, 10, 10, dtype=D64)
    drop = DropBlock(0.2, 3)
    y = drop(x)
    assert 0.1 < (y == 0).double().mean() < 0.3
    assert_mean = y.sum((1, 2, 3)) / x[0].numel()
    torch.testing.assert_close(assert_mean, torch.ones_like(assert_mean))  # each example rescaled on its own
    assert torch.equal(drop.eval()(x), x)
    model = ResNet12(5, widths=(4, 6, 8, 10), image_size=32, drop_rate=0.1)
    assert sum(isinstance(m, DropBlock) for m in model.modules()) == 2
    assert sum(isinstance(m, nn.Dropout) for m in model.modules()) == 2
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)


# ---- the traced runner against a plain per-task loop, float64 -------------------------------------------------


def loop_meta_loss(model, batch, lr, steps, first_order, adapted=None):
    """The definition: per task, `steps` steps of autograd.grad on the support loss and a subtraction, then the
    query loss; their mean over tasks. lr: a number, or lr(step) -> {name: rate} (Meta-SGD, LSLR)."""
    params = dict(model.named_parameters())
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    adapted = list(params) if adapted is None else adapted
    total = 0
    for t in range(batch.num_tasks):
        fast = {n: params[n] for n in adapted}

        def f(x, fast):
            return functional_call(model, ({**params, **fast}, buffers), (x,))

        for s in range(steps):
            loss = F.cross_entropy(f(batch.support_x[t], fast), batch.support_y[t])
            g = torch.autograd.grad(loss, list(fast.values()), create_graph=not first_order)
            rates = lr(s) if callable(lr) else dict.fromkeys(adapted, lr)
            fast = {n: fast[n] - rates[n] * (gi.detach() if first_order else gi) for n, gi in zip(adapted, g)}
        total = total + F.cross_entropy(f(batch.query_x[t], fast), batch.query_y[t]) / batch.num_tasks
    return total


def grads_of(loss, tensors):
    return torch.autograd.grad(loss, tensors, allow_unused=True, materialize_grads=True)


def assert_grads_close(got, want, rtol=1e-9):
    """Each gradient within rtol of the largest entry of all of them (a conv bias before a norm has a gradient
    of ~0: rounding noise, which a per-tensor relative test would compare)."""
    scale = max(w.abs().max().item() for w in want)
    assert scale > 0
    for g, w in zip(got, want):
        assert_close(g, w, rtol=rtol, atol=rtol * scale)


def batch_of(shape, T=2, n_way=3, shots=1, queries=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    sx = torch.randn(T, n_way * shots, *shape, dtype=D64, generator=g)
    qx = torch.randn(T, n_way * queries, *shape, dtype=D64, generator=g)
    sy = torch.arange(n_way).repeat_interleave(shots).repeat(T, 1)
    qy = torch.arange(n_way).repeat_interleave(queries).repeat(T, 1)
    return fastmeta.TaskBatch(sx, sy, qx, qy)


def mixed_norm_signs(model):
    """Norm scales of both signs (max-pooling commutes with a negative scale only through a sign trick)."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.LayerNorm)):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.weight.shape, generator=g, dtype=D64) * 3 - 1.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g, dtype=D64) - 0.5)
    return model


class FunctionalNet(nn.Module):
    """A forward of functional calls with a skip connection: F.relu, F.leaky_relu, +, *, torch.cat, a learned
    scale read as an attribute, BatchNorm2d -> F.relu -> MaxPool2d, GroupNorm, mean, view, tanh."""

    def __init__(self, n_way=3):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4, track_running_stats=False)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 8).view(1, 8, 1, 1))
        self.gn = nn.GroupNorm(2, 8)
        self.fc = nn.Linear(8, n_way)

    def forward(self, x):
        h = self.pool(F.relu(self.bn(self.conv1(x))))
        skip = F.leaky_relu(self.conv2(h), 0.2) + h
        h = torch.cat([h, skip * 0.5], dim=1) * self.scale
        h = F.max_pool2d(self.gn(h), 2)
        h = h.mean((2, 3))
        return self.fc(torch.tanh(h.view(h.size(0), -1)))


class MixedLayouts(nn.Module):
    """Values in different layouts meet: a convolution's output (grouped or per task) and a linear layer's
    ((T, N, C) tensor) are added and concatenated; GroupNorm and LayerNorm on a linear layer's output."""

    def __init__(self, n_way=3):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc1 = nn.Linear(4 * 4 * 4, 4)
        self.gn = nn.GroupNorm(2, 4)
        self.ln = nn.LayerNorm(8)
        self.fc2 = nn.Linear(8, n_way)

    def forward(self, x):
        h = F.avg_pool2d(torch.tanh(self.conv(x)), 2)
        a = h.mean(dim=(2, 3))
        b = self.gn(self.fc1(torch.flatten(h, 1)))
        return self.fc2(self.ln(torch.cat([a + b, a * b], 1)).relu())


def resnet12():
    return mixed_norm_signs(ResNet12(3, in_channels=1, widths=(2, 3, 4, 5), image_size=16).to(D64))


def net1d():
    """Conv1d, BatchNorm1d -> ReLU -> MaxPool1d (fused), GroupNorm, LeakyReLU -> MaxPool1d, Flatten, Linear,
    LayerNorm, Tanh."""
    return mixed_norm_signs(
        nn.Sequential(
            nn.Conv1d(1, 3, 3, padding=1), nn.BatchNorm1d(3, track_running_stats=False), nn.ReLU(), nn.MaxPool1d(2),
            nn.Conv1d(3, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.LeakyReLU(0.1), nn.MaxPool1d(2),
            nn.Flatten(), nn.Linear(16, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3),
        ).to(D64)
    )  # fmt: skip


def net3d():
    """Conv3d, BatchNorm3d -> ReLU -> MaxPool3d (fused), Flatten, Linear, BatchNorm1d, ReLU, Linear."""
    return mixed_norm_signs(
        nn.Sequential(
            nn.Conv3d(1, 2, 3, padding=1), nn.BatchNorm3d(2, track_running_stats=False), nn.ReLU(), nn.MaxPool3d(2),
            nn.Flatten(), nn.Linear(16, 5), nn.BatchNorm1d(5, track_running_stats=False), nn.ReLU(), nn.Linear(5, 3),
        ).to(D64)
    )  # fmt: skip


MODELS = {
    "resnet12": (resnet12, (1, 16, 16)),
    "functional": (lambda: mixed_norm_signs(FunctionalNet().to(D64)), (1, 8, 8)),
    "mixed": (lambda: mixed_norm_signs(MixedLayouts().to(D64)), (1, 8, 8)),
    "1d": (net1d, (1, 16)),
    "3d": (net3d, (1, 4, 4, 4)),
}


@pytest.fixture(params=["grouped", "per-task"])
def layout(request, monkeypatch):
    """Convolutions of all tasks as one grouped convolution, or per task (channels-last on the CPU)."""
    monkeypatch.setattr(_batched.layout, "GROUPED_MAX_EXAMPLES", 10**9 if request.param == "grouped" else 0)
    return request.param


@pytest.mark.parametrize("steps", [1, 2, 5])
@pytest.mark.parametrize("first_order", [False, True], ids=["2nd", "1st"])
@pytest.mark.parametrize("name", list(MODELS))
def test_meta_gradient_matches_loop(name, first_order, steps, layout):
    make, shape = MODELS[name]
    model, batch = make(), batch_of(shape)
    assert isinstance(_batched.runner(model, "batched"), _batched.TracedModel)
    params = list(model.parameters())
    out = fastmeta.maml_step(model, batch, 0.3, steps, first_order, strategy="batched")
    want = loop_meta_loss(model, batch, 0.3, steps, first_order)
    assert_close(out.loss, want, rtol=1e-10, atol=0)
    assert_grads_close(grads_of(out.loss, params), grads_of(want, params))


@pytest.mark.parametrize("first_order", [False, True], ids=["2nd", "1st"])
def test_nchw_layout_matches_loop(first_order, monkeypatch):
    """Per-task convolutions in NCHW (as on wide tiny maps, ResNet-12's last block at full width)."""
    monkeypatch.setattr(_batched.layout, "GROUPED_MAX_EXAMPLES", 0)
    monkeypatch.setattr(_batched.layout, "NCHW_MAX_PIXELS", 10**9)
    monkeypatch.setattr(_batched.layout, "NCHW_MIN_CHANNELS", 0)
    model, batch = resnet12(), batch_of((1, 16, 16))
    params = list(model.parameters())
    out = fastmeta.maml_step(model, batch, 0.3, 2, first_order, strategy="batched")
    want = loop_meta_loss(model, batch, 0.3, 2, first_order)
    assert_grads_close(grads_of(out.loss, params), grads_of(want, params))


@pytest.mark.parametrize("first_order", [False, True], ids=["2nd", "1st"])
def test_grouped_then_per_task_nchw_matches_loop(first_order, monkeypatch):
    """Small support sets: grouped convolutions on the large maps, then per task in NCHW on the wide tiny ones
    (ResNet-12's last blocks at full width), so activations go from the grouped layout to per-task tensors."""
    monkeypatch.setattr(_batched.layout, "NCHW_MAX_PIXELS", 16)  # 4x4 maps and smaller: blocks 3 and 4 of a 16x16 input
    monkeypatch.setattr(_batched.layout, "NCHW_MIN_CHANNELS", 3)
    groups = []
    conv = _batched._Conv.conv
    monkeypatch.setattr(
        _batched._Conv, "conv", lambda self, x, w, b, g, *a: groups.append(g) or conv(self, x, w, b, g, *a)
    )
    model, batch = resnet12(), batch_of((1, 16, 16))
    params = list(model.parameters())
    out = fastmeta.maml_step(model, batch, 0.3, 2, first_order, strategy="batched")
    assert 2 in groups and 1 in groups  # both layouts ran
    want = loop_meta_loss(model, batch, 0.3, 2, first_order)
    assert_close(out.loss, want, rtol=1e-10, atol=0)
    assert_grads_close(grads_of(out.loss, params), grads_of(want, params))


# ---- the grouped convolution's own double backward (fastmeta.algorithms._conv) ---------------------------------


def derivatives(f, x, w, b, order):
    """Gradients w.r.t. (x, w[, b]) of order 1..order of a random functional of f(x, w, b), each order's taken of
    a random quadratic functional of the previous order's gradients."""
    g = torch.Generator().manual_seed(1)
    inputs = [t for t in (x, w, b) if t is not None]
    y = f(x, w, b)
    out = (y * torch.randn(y.shape, generator=g, dtype=y.dtype)).sum()
    result = []
    for _ in range(order):
        gs = torch.autograd.grad(out, inputs, create_graph=True, materialize_grads=True)
        result.append(gs)
        out = sum((d * torch.randn(d.shape, generator=g, dtype=d.dtype) + 0.1 * d * d).sum() for d in gs)
    return result


SPECS = [(1, 1, 1), (2, 0, 1), (2, 1, 2), ((1, 2, 1), (2, 0, 1), (2, 1, 1))]  # stride, padding, dilation


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("stride,padding,dilation", SPECS)
@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_grouped_conv_matches_torch_to_third_order(ndim, stride, padding, dilation, groups, bias):
    from fastmeta.algorithms._conv import conv

    stride, padding, dilation = (v[:ndim] if isinstance(v, tuple) else v for v in (stride, padding, dilation))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, *(7,) * ndim, dtype=D64, generator=g, requires_grad=True)
    w = torch.randn(9, 6 // groups, *(3,) * ndim, dtype=D64, generator=g, requires_grad=True)
    b = torch.randn(9, dtype=D64, generator=g, requires_grad=True) if bias else None
    torch_conv = (F.conv1d, F.conv2d, F.conv3d)[ndim - 1]
    want = derivatives(lambda x, w, b: torch_conv(x, w, b, stride, padding, dilation, groups), x, w, b, 3)
    got = derivatives(lambda x, w, b: conv(x, w, b, stride, padding, dilation, groups), x, w, b, 3)
    for got_k, want_k in zip(got, want):
        assert_grads_close(got_k, want_k, rtol=1e-12)


def test_grouped_conv_gradcheck_string_padding_and_torch_func():
    from fastmeta.algorithms._conv import conv

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 5, 5, dtype=D64, generator=g, requires_grad=True)
    w = torch.randn(6, 2, 3, 3, dtype=D64, generator=g, requires_grad=True)
    b = torch.randn(6, dtype=D64, generator=g, requires_grad=True)
    f = lambda x, w, b: conv(x, w, b, 2, 1, 1, 2)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))
    same = conv(x, w, b, 1, "same", 1, 2)  # string padding: torch's own convolution
    assert_close(same, F.conv2d(x, w, b, 1, "same", 1, 2))
    # Under torch.func (torch's own convolution there too): second-order grad and vmap of grad.
    loss = lambda conv2d: lambda w, x: conv2d(x, w, None, 1, 1, 1, 2).square().sum()  # noqa: E731
    ours, torchs = loss(conv), loss(F.conv2d)
    w, x, xs = w.detach(), x.detach(), torch.randn(3, 2, 4, 5, 5, dtype=D64, generator=g)
    grad2 = lambda f: torch.func.grad(lambda w, x: torch.func.grad(f)(w, x).square().sum())  # noqa: E731
    assert_close(grad2(ours)(w, x), grad2(torchs)(w, x))
    assert_close(
        torch.vmap(torch.func.grad(ours), (None, 0))(w, xs), torch.vmap(torch.func.grad(torchs), (None, 0))(w, xs)
    )


def test_grouped_conv_under_autocast_runs_in_its_dtype():
    """Autocast does not see inside an autograd.Function: conv() casts as it would for F.conv2d (float32 inputs
    to the autocast dtype), so mixed precision keeps its speed, and gradients reach the float32 leaves."""
    from fastmeta.algorithms._conv import conv

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 6, 6, generator=g, requires_grad=True)
    w = torch.randn(6, 2, 3, 3, generator=g, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = conv(x, w, None, 1, 1, 1, 2), F.conv2d(x, w, None, 1, 1, 1, 2)
        assert got.dtype == want.dtype == torch.bfloat16
        assert torch.equal(got, want)
        gx, gw = torch.autograd.grad(got.float().square().sum(), (x, w), create_graph=True)
        assert gx.dtype == gw.dtype == torch.float32
        assert all(
            d.dtype == torch.float32 for d in torch.autograd.grad((gx.square().sum() + gw.square().sum()), (x, w))
        )
        x64, w64 = x.detach().double(), w.detach().double()  # autocast leaves float64 alone, as for F.conv2d
        assert conv(x64, w64, None, 1, 1, 1, 2).dtype == torch.float64


def test_second_order_grouped_step_runs_one_convolution_per_call(monkeypatch):
    """ATen's double backward of a grouped convolution runs one convolution per group (per task here); the
    runner's takes all tasks in one call, so the number of convolution calls does not grow with T."""
    from torch.utils._python_dispatch import TorchDispatchMode

    monkeypatch.setattr(_batched.layout, "GROUPED_MAX_EXAMPLES", 10**9)

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.convolution, torch.ops.aten.convolution_backward):
                self.calls += 1
            return func(*args, **(kwargs or {}))

    def calls(T):
        model, batch = resnet12(), batch_of((1, 16, 16), T=T)
        params = list(model.parameters())
        with Count() as count:
            count.calls = 0
            grads_of(fastmeta.maml_step(model, batch, 0.3, 1, False, strategy="batched").loss, params)
        return count.calls

    assert calls(2) == calls(6)


def test_shared_weights_run_as_one_ordinary_convolution(monkeypatch):
    """Layers that do not adapt (ANIL's body) have the same weights in every task: in the grouped layout they run
    as one ordinary convolution over all N*T images (the module's groups, not T times them; no copy of the
    weights per task), with the meta-gradient of the grouped form."""
    from torch.utils._python_dispatch import TorchDispatchMode

    monkeypatch.setattr(_batched.layout, "GROUPED_MAX_EXAMPLES", 10**9)

    class Groups(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket is torch.ops.aten.convolution:
                self.groups.append(args[8])
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    body = [nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten()]
    model = nn.Sequential(*body, nn.Linear(4 * 4 * 4, 3)).to(torch.float64)
    batch, params = batch_of((1, 8, 8), T=3), list(model.parameters())

    def step():
        with Groups() as seen:
            seen.groups = []
            out = fastmeta.maml_step(model, batch, 0.3, 2, False, adapt_params=["5"], strategy="batched")
        return seen.groups, grads_of(out.loss, params)

    groups, grads = step()
    assert groups and set(groups) == {1}
    monkeypatch.setattr(_batched.layers, "_per_task", lambda params, name, module_param: True)  # the grouped form
    groups_before, want = step()
    assert set(groups_before) == {3}
    assert_grads_close(grads, want)


@pytest.mark.parametrize("kind", ["metasgd", "lslr"])
@pytest.mark.parametrize("name", ["resnet12", "functional"])
def test_learned_learning_rates(name, kind, layout):
    make, shape = MODELS[name]
    model, batch = make(), batch_of(shape)
    names = [n for n, _ in model.named_parameters()]
    if kind == "metasgd":
        lrs = fastmeta.MetaSGDLR(model, init=0.2)
        with torch.no_grad():
            for p in lrs.parameters():
                p.uniform_(0.1, 0.3)
        rates = lambda s: dict(zip(names, lrs.lrs))  # noqa: E731
    else:
        lrs = fastmeta.LSLR(model, inner_steps=2, init=0.2).to(D64)
        with torch.no_grad():
            lrs.lrs.uniform_(0.1, 0.3)
        rates = lambda s: dict(zip(names, lrs.lrs[s]))  # noqa: E731
    tensors = list(model.parameters()) + list(lrs.parameters())
    out = fastmeta.maml_step(model, batch, lrs, 2, strategy="batched")
    want = loop_meta_loss(model, batch, rates, 2, False)
    assert_close(out.loss, want, rtol=1e-10, atol=0)
    assert_grads_close(grads_of(out.loss, tensors), grads_of(want, tensors))


def test_tasks_stay_apart(layout):
    """Task 0's losses, predictions and fast weights do not change, bit for bit, when task 1's data (and so its
    weights and batch statistics) change."""
    model, batch = resnet12(), batch_of((1, 16, 16), T=3)
    other = fastmeta.TaskBatch(batch.support_x.clone(), batch.support_y, batch.query_x.clone(), batch.query_y)
    other.support_x[1] = other.support_x[1] * 3 + 1
    other.query_x[1] = other.query_x[1] * -2 + 0.5
    a = fastmeta.maml_step(model, batch, 0.3, 2, strategy="batched")
    b = fastmeta.maml_step(model, other, 0.3, 2, strategy="batched")
    assert a.task_losses[1] != b.task_losses[1]
    for t in (0, 2):
        assert torch.equal(a.task_losses[t], b.task_losses[t])
        assert torch.equal(a.predictions[t], b.predictions[t])
        assert all(torch.equal(a.fast_weights[n][t], b.fast_weights[n][t]) for n in a.fast_weights)
    # Per-task weights: changing task 1's weights leaves the other tasks' outputs as they were.
    run = _batched.runner(model, "batched")
    params = {n: f.detach().clone() for n, f in a.fast_weights.items()}
    y = _batched.tasks_first(run(params, batch.query_x))
    params["features.block1.conv1.weight"][1] += 0.5
    params["features.block2.bn2.weight"][1] *= -1
    z = _batched.tasks_first(run(params, batch.query_x))
    assert not torch.equal(y[1], z[1]) and torch.equal(y[0], z[0]) and torch.equal(y[2], z[2])


def test_split_is_a_cut_point():
    """ANIL: the body before the first adapted parameter runs once, and restarting there gives the same."""
    for make, shape in MODELS.values():
        model, batch = make(), batch_of(shape)
        run = _batched.runner(model, "batched")
        head = {n for n, _ in model.named_parameters()}.intersection(list(dict(model.named_parameters()))[-2:])
        k = run.split(head)
        assert 0 < k < len(run.layers) and run.split(set(dict(model.named_parameters()))) == 0
        p = dict(model.named_parameters())
        whole = _batched.tasks_first(run(p, batch.query_x))
        assert torch.equal(_batched.tasks_first(run(p, run(p, batch.query_x, 0, k), k)), whole)
    run = _batched.runner(resnet12(), "batched")
    assert run.split({"head.weight", "head.bias"}) == len(run.layers) - 1
    # Inside a residual block two values are live (the block's input and the main path): no cut there.
    assert run.split({"features.block1.conv2.weight"}) == 0
    model, batch = net1d(), batch_of((1, 16))  # ANIL's meta-gradient, the body run once
    out = fastmeta.maml_step(model, batch, 0.3, 2, adapt_params=["12"], strategy="batched")
    want = loop_meta_loss(model, batch, 0.3, 2, False, adapted=["12.weight", "12.bias"])
    assert_grads_close(grads_of(out.loss, list(model.parameters())), grads_of(want, list(model.parameters())))


def test_dropblock_resnet12_runs_batched():
    model = ResNet12(3, in_channels=1, widths=(2, 3, 4, 5), image_size=32, drop_rate=0.2).to(D64)
    batch = batch_of((1, 32, 32))
    assert isinstance(_batched.runner(model, "batched"), _batched.TracedModel)
    out = fastmeta.maml_step(model, batch, 0.3, 1, strategy="batched")
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.predictions.shape == (2, 6, 3)
    model.eval()  # no dropping: the loop's result exactly (and the mode change is traced again)
    params = list(model.parameters())
    out = fastmeta.maml_step(model, batch, 0.3, 1, strategy="batched")
    want = loop_meta_loss(model, batch, 0.3, 1, False)
    assert_grads_close(grads_of(out.loss, params), grads_of(want, params))


class DataDependent(nn.Module):
    """Python control flow on a tensor's value: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3, track_running_stats=False)
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        h = self.bn(self.conv(x))
        if h.mean() > 0:  # data-dependent
            h = -h
        return self.fc(F.relu(h).mean((2, 3)))


class WithPReLU(nn.Module):
    """Traceable, but PReLU has a parameter and no batched form."""

    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(4, 5), nn.PReLU(), nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


@pytest.mark.parametrize(
    "make, shape, why",
    [
        (DataDependent, (1, 6, 6), r"DataDependent cannot be traced by torch\.fx: .*test_runner\.py:\d+ `if h\.mean"),
        (WithPReLU, (4,), r"WithPReLU: module 'act' \(PReLU\) has no task-batched form"),
    ],
)  # fmt: skip
def test_untraceable_model_runs_in_a_loop_with_one_warning(make, shape, why):
    model, batch = make().to(D64), batch_of(shape)
    with pytest.warns(UserWarning, match=why) as record:
        out = fastmeta.maml_step(model, batch, 0.3, 2)
        fastmeta.maml_step(model, batch, 0.3, 2)  # no second warning for the same model
    assert len([w for w in record if "not batched" in str(w.message)]) == 1
    params = list(model.parameters())
    assert_grads_close(grads_of(out.loss, params), grads_of(loop_meta_loss(model, batch, 0.3, 2, False), params))
    with pytest.raises(ValueError, match="strategy='batched' cannot run this model: " + why):
        fastmeta.maml_step(model, batch, 0.3, 2, strategy="batched")


# ---- batch norm's own double backward (fastmeta.algorithms._norm) ----------------------------------------------


def _leaky(norm):
    """x -> leaky_relu(norm(x)): the upstream gradient of the norm then depends on x (as in a network)."""
    return lambda x, w, b: F.leaky_relu(norm(x, w, b), 0.1)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("shape", [(7, 3), (4, 3, 5), (3, 4, 5, 3), (2, 3, 3, 2, 4)])
def test_batch_norm_matches_torch_to_second_order_and_is_exact_to_third(shape, affine):
    from fastmeta.algorithms._norm import batch_norm

    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, dtype=D64, generator=g, requires_grad=True)
    w = torch.randn(shape[1], dtype=D64, generator=g, requires_grad=True) if affine else None
    b = torch.randn(shape[1], dtype=D64, generator=g, requires_grad=True) if affine else None
    ours = _leaky(lambda x, w, b: batch_norm(x, w, b, 1e-5))
    torchs = _leaky(lambda x, w, b: F.batch_norm(x, None, None, w, b, True, 0.0, 1e-5))
    assert_close(ours(x, w, b), torchs(x, w, b), rtol=1e-12, atol=0)
    for got_k, want_k in zip(derivatives(ours, x, w, b, 2), derivatives(torchs, x, w, b, 2)):
        assert_grads_close(got_k, want_k, rtol=1e-10)
    # Third order: torch's batch norm has none ("does not support 3rd+ order derivatives"); against finite
    # differences of the second.
    inputs = tuple(t for t in (x, w, b) if t is not None)

    def first(*ts):
        full = (*ts, None, None) if not affine else ts
        y = ours(*full)
        return torch.autograd.grad((y * y.cos()).sum(), ts, create_graph=True)

    assert torch.autograd.gradgradcheck(first, inputs)


def test_batch_norm_gradcheck_and_torch_func():
    from fastmeta.algorithms._norm import batch_norm

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 2, 3, dtype=D64, generator=g, requires_grad=True)
    w = torch.randn(3, dtype=D64, generator=g, requires_grad=True)
    b = torch.randn(3, dtype=D64, generator=g, requires_grad=True)
    f = lambda x, w, b: batch_norm(x, w, b, 1e-3)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, w, b)) and torch.autograd.gradgradcheck(f, (x, w, b))
    # torch.func: torch's own batch norm there; grad of grad as F.batch_norm's
    loss = lambda norm: lambda w, x: norm(x, w, None).tanh().square().sum()  # noqa: E731
    ours, torchs = loss(f), loss(lambda x, w, b: F.batch_norm(x, None, None, w, b, True, 0.0, 1e-3))
    grad2 = lambda h: torch.func.grad(lambda w, x: torch.func.grad(h)(w, x).square().sum())  # noqa: E731
    assert_close(grad2(ours)(w.detach(), x.detach()), grad2(torchs)(w.detach(), x.detach()))


def test_batch_norm_in_bfloat16_differentiates_twice_in_float32():
    """A bfloat16 input (float32 weights, as under autocast): the double backward's formula runs in float32 and
    gives what the float32 computation gives, to bfloat16's precision."""
    from fastmeta.algorithms._norm import batch_norm

    g = torch.Generator().manual_seed(0)
    x32 = torch.randn(6, 3, 4, 4, generator=g)
    w = torch.randn(3, generator=g, requires_grad=True)

    def second(x):
        y = batch_norm(x, w, None, 1e-5).float()
        (gw,) = torch.autograd.grad((y * y.sin()).sum(), (w,), create_graph=True)
        return gw, torch.autograd.grad(gw.square().sum(), (w,))[0]

    got, want = second(x32.bfloat16()), second(x32)
    assert all(a.dtype == torch.float32 and torch.isfinite(a).all() for a in got)
    for a, b in zip(got, want):
        assert_close(a, b, rtol=0.05, atol=0.05 * b.abs().max().item())


def test_second_order_step_batch_norm_takes_fewer_calls(monkeypatch):
    """The runner's batch norm, differentiated twice, against F.batch_norm's (ATen's double backward): the same
    meta-gradient in float64 with at most 4/5 of the ATen calls, views included (a small ResNet-12, 2 tasks)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls += 1
            return func(*args, **(kwargs or {}))

    model, batch = resnet12(), batch_of((1, 16, 16))
    params = list(model.parameters())

    def run():
        with Count() as count:
            count.calls = 0
            grads = grads_of(fastmeta.maml_step(model, batch, 0.3, 1, False, strategy="batched").loss, params)
        return count.calls, grads

    ours, our_grads = run()
    with monkeypatch.context() as m:
        m.setattr(_batched.layers, "_norm", type("Torch", (), {"batch_norm": staticmethod(
            lambda x, w, b, eps: F.batch_norm(x, None, None, w, b, True, 0.0, eps)
        )}))  # fmt: skip
        theirs, their_grads = run()
    assert ours <= 0.8 * theirs, (ours, theirs)
    assert_grads_close(our_grads, their_grads)
