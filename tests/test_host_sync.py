"""No meta-step waits for the device: on a GPU the host issues a step's kernels while earlier ones run, unless
something reads a device value (`.item()`, `bool(t)`, `float(t)`, a data-dependent shape such as `nonzero`).
One such read per step makes the host wait for the whole queue, each step.

Checked without a GPU: each step runs on the meta device (shapes, no values) with the runner's CUDA layout
(every convolution grouped over the tasks) and fastmeta's kernels where a GPU would run them, under a dispatch
mode that fails on any ATen call that would read a value back to the host. A value read of a meta tensor would
fail anyway; the mode says which call and from where. On a machine with a GPU the same steps run on it under
torch's sync debug mode, which also sees the kernels' host code.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from fastmeta import TaskBatch, _kernels
from fastmeta.algorithms import (
    LSLR,
    SNAIL,
    FullContextEmbedding,
    MetaLSTM,
    MetaSGDLR,
    _batched,
    adapt,
    maml_step,
    matching_step,
    meta_lstm_step,
    msl_weights,
    protonet_step,
    reptile_step,
    siamese_step,
    snail_step,
)
from fastmeta.models import MLP, Conv4, ResNet12

# ATen calls that make the host wait for a CUDA device: a value read back, or an output whose shape depends on
# values (the host must learn it before allocating).
_READS = {
    "_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero", "nonzero_static", "masked_select",
    "_unique", "_unique2", "unique_dim", "unique_consecutive", "unique_dim_consecutive", "repeat_interleave",
    "bincount", "histc", "_assert_async",
}  # fmt: skip


class NoHostRead(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        on_device = any(isinstance(a, torch.Tensor) and not a.is_cpu for a in tree_flatten((args, kwargs))[0])
        if on_device and func.overloadpacket.__name__ in _READS:
            raise AssertionError(f"{func} reads a device value on the host (a GPU would stall here)")
        return func(*args, **(kwargs or {}))


@pytest.fixture
def gpu_layout(monkeypatch: pytest.MonkeyPatch) -> str:
    """The meta device, laid out and dispatched as CUDA would be."""
    monkeypatch.setattr(_batched.layout, "GROUPED_ALWAYS", _batched.layout.GROUPED_ALWAYS | {"meta"})
    if _kernels.AVAILABLE:  # the kernels' fake implementations, as on a GPU (else the reference ops)
        monkeypatch.setattr(_kernels, "runs", lambda t: True)
    return "meta"


T = 3


# Each case builds its model and episodes on `dev` and returns the step to check: a call that runs one step and
# its backward (the building is left out of the check: moving a model to a GPU is a copy the host waits for).
Case = Callable[[str], Callable[[], None]]


def episodes(dev: str, shape: tuple[int, ...], n_way: int = 5, shot: int = 1, queries: int = 2) -> TaskBatch:
    def labels(k: int) -> torch.Tensor:
        return torch.arange(n_way).repeat_interleave(k).repeat(T, 1).to(dev)

    x = torch.randn(T, n_way * (shot + queries), *shape).to(dev)
    return TaskBatch(x[:, : n_way * shot], labels(shot), x[:, n_way * shot :], labels(queries))


def conv4(dev: str, n_way: int | None = 5) -> nn.Module:
    return Conv4(n_way, hidden=4).to(dev)


class TwoPaths(nn.Module):
    """Not an nn.Sequential: the runner traces it."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.a(x)) * torch.sigmoid(self.b(x)))


def _backward(step: Callable[[], object]) -> Callable[[], None]:
    def run() -> None:
        step().loss.backward()

    return run


def _maml(model: Callable[[str], nn.Module], shape: tuple[int, ...], *args, **kwargs) -> Case:  # noqa: ANN002, ANN003
    def case(dev: str) -> Callable[[], None]:
        m, batch = model(dev), episodes(dev, shape)
        return _backward(lambda: maml_step(m, batch, *args, **kwargs))

    return case


def _learned_lr(make_lr: Callable[[nn.Module], nn.Module], **kwargs) -> Case:  # noqa: ANN003
    def case(dev: str) -> Callable[[], None]:
        m, batch = conv4(dev), episodes(dev, (1, 28, 28))
        lr = make_lr(m).to(dev)
        return _backward(lambda: maml_step(m, batch, lr, 2, **kwargs))

    return case


def _sinusoid(dev: str) -> Callable[[], None]:
    m, batch = MLP().to(dev), TaskBatch(*(torch.randn(T, 10, 1).to(dev) for _ in range(4)))
    return _backward(lambda: maml_step(m, batch, 0.01, 3, loss_fn=F.mse_loss))


def _embedding(step: Callable[[nn.Module, TaskBatch], object], queries: int = 2) -> Case:
    def case(dev: str) -> Callable[[], None]:
        m, batch = conv4(dev, None), episodes(dev, (1, 28, 28), queries=queries)
        return _backward(lambda: step(m, batch))

    return case


def _matching_fce(dev: str) -> Callable[[], None]:
    m, batch = conv4(dev, None), episodes(dev, (1, 28, 28))
    fce = FullContextEmbedding(m.embedding_size, steps=2).to(dev)
    return _backward(lambda: matching_step(m, batch, 5, fce))


def _snail(dev: str) -> Callable[[], None]:
    embedding = conv4(dev, None)
    m, batch = SNAIL(5, 1, embedding, embedding.embedding_size).to(dev), episodes(dev, (1, 28, 28), queries=1)
    return _backward(lambda: snail_step(m, batch))


def _meta_lstm(dev: str) -> Callable[[], None]:
    m, batch = MetaLSTM(conv4(dev), hidden=4).to(dev), episodes(dev, (1, 28, 28))
    return _backward(lambda: meta_lstm_step(m, batch, steps=2))


def _reptile(dev: str) -> Callable[[], None]:
    m, batch = conv4(dev), episodes(dev, (1, 28, 28))

    def run() -> None:  # writes the Reptile direction into .grad: no backward
        reptile_step(m, batch, 0.1, 3)

    return run


def _adapt(dev: str) -> Callable[[], None]:  # meta-testing: predictions only, nothing to backpropagate
    m, batch = conv4(dev), episodes(dev, (1, 28, 28))

    def run() -> None:
        assert adapt(m, batch.support_x, batch.support_y, 0.4, 2)(batch.query_x).shape == (T, 10, 5)

    return run


def _resnet12(dev: str) -> nn.Module:
    return ResNet12(5, widths=(4, 8, 8, 8), drop_rate=0.1).to(dev)


CONV = (1, 28, 28)
STEPS: dict[str, Case] = {
    "maml conv4 2nd order": _maml(conv4, CONV, 0.4, 2),
    "maml conv4 1st order": _maml(conv4, CONV, 0.4, 2, True),
    "maml conv4 lslr msl": _learned_lr(lambda m: LSLR(m, 2), multi_step_weights=msl_weights(2, 3)),
    "meta-sgd conv4": _learned_lr(MetaSGDLR),
    "maml recompute steps": _maml(conv4, CONV, 0.4, 3, recompute="steps"),
    "maml recompute 1": _maml(conv4, CONV, 0.4, 2, recompute=1),
    "maml recompute steps,2": _maml(conv4, CONV, 0.4, 2, recompute=("steps", 2)),
    "maml anil": _maml(conv4, CONV, 0.4, 2, adapt_params=["head"]),
    "maml resnet12 dropblock": _maml(_resnet12, (3, 32, 32), 0.4, 1),
    "maml traced model": _maml(lambda dev: TwoPaths().to(dev), (6,), 0.4, 2),
    "maml sinusoid mse": _sinusoid,
    "adapt": _adapt,
    "reptile": _reptile,
    "protonet": _embedding(lambda m, b: protonet_step(m, b, 5)),
    "matching fce": _matching_fce,
    "siamese all pairs": _embedding(lambda m, b: siamese_step(m, b, n_way=5)),
    "siamese pairs": _embedding(lambda m, b: siamese_step(m, b, mode="pairs", n_way=5)),
    "snail": _snail,
    "meta-lstm": _meta_lstm,
}


@pytest.mark.parametrize("name", list(STEPS))
def test_step_and_backward_never_read_device_values(name: str, gpu_layout: str) -> None:
    run = STEPS[name](gpu_layout)
    with NoHostRead():
        run()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible: CUDA test skipped")
@pytest.mark.parametrize("name", list(STEPS))
def test_on_cuda_no_step_synchronizes(name: str) -> None:
    """The same on a GPU, with the real kernels: torch's sync debug mode fails on any synchronising call
    (stream or device synchronisation, a blocking copy, nonzero), from Python, ATen or fastmeta's kernels."""
    run = STEPS[name]("cuda")
    run()  # the first step may initialise things lazily (cuDNN, cuBLAS, the allocator)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run()
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_the_check_catches_a_read(gpu_layout: str) -> None:
    """The mode fails on a value read: n_way inferred from the labels must read them."""
    m, batch = conv4(gpu_layout, None), episodes(gpu_layout, CONV)
    with NoHostRead(), pytest.raises(AssertionError, match="_local_scalar_dense"):
        protonet_step(m, batch)
