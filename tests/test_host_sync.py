"""No meta-step waits for the device: on a GPU the host issues a step's kernels while earlier ones run, unless
something reads a device value (`.item()`, `bool(t)`, `float(t)`, a data-dependent shape such as `nonzero`).
One such read per step makes the host wait for the whole queue, each step.

Checked without a GPU: each step runs on the meta device (shapes, no values) with the runner's CUDA layout
(every convolution grouped over the tasks) and fastmeta's kernels where a GPU would run them, under a dispatch
mode that fails on any ATen call that would read a value back to the host. A value read of a meta tensor would
fail anyway; the mode says which call and from where.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import fastmeta
from fastmeta import _kernels
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
    monkeypatch.setattr(_batched, "GROUPED_ALWAYS", _batched.GROUPED_ALWAYS | {"meta"})
    if _kernels.AVAILABLE:  # the kernels' fake implementations, as on a GPU (else the reference ops)
        monkeypatch.setattr(_kernels, "runs", lambda t: True)
    return "meta"


T = 3


def episodes(shape: tuple[int, ...], n_way: int = 5, shot: int = 1, queries: int = 2) -> fastmeta.TaskBatch:
    def labels(k: int) -> torch.Tensor:
        return torch.arange(n_way).repeat_interleave(k).repeat(T, 1).to("meta")

    return fastmeta.TaskBatch(
        torch.empty(T, n_way * shot, *shape, device="meta"),
        labels(shot),
        torch.empty(T, n_way * queries, *shape, device="meta"),
        labels(queries),
    )


def conv4(n_way: int | None = 5) -> nn.Module:
    return Conv4(n_way, hidden=4).to("meta")


class TwoPaths(nn.Module):
    """Not an nn.Sequential: the runner traces it."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.a(x)) * torch.sigmoid(self.b(x)))


def _sinusoid() -> fastmeta.TaskBatch:
    return fastmeta.TaskBatch(*(torch.empty(T, 10, 1, device="meta") for _ in range(4)))


def _lslr_msl() -> torch.Tensor:
    model = conv4()
    lr = LSLR(model, 2).to("meta")
    return maml_step(model, episodes((1, 28, 28)), lr, 2, multi_step_weights=msl_weights(2, 3)).loss


def _meta_sgd() -> torch.Tensor:
    model = conv4()
    return maml_step(model, episodes((1, 28, 28)), MetaSGDLR(model).to("meta"), 2).loss


def _matching_fce() -> torch.Tensor:
    model = conv4(None)
    fce = FullContextEmbedding(model.embedding_size, steps=2).to("meta")
    return matching_step(model, episodes((1, 28, 28)), 5, fce).loss


def _snail() -> torch.Tensor:
    embedding = conv4(None)
    model = SNAIL(5, 1, embedding, embedding.embedding_size).to("meta")
    return snail_step(model, episodes((1, 28, 28), queries=1), "auto").loss


def _meta_lstm() -> torch.Tensor:
    return meta_lstm_step(MetaLSTM(conv4(), hidden=4).to("meta"), episodes((1, 28, 28)), steps=2).loss


def _reptile() -> None:
    reptile_step(conv4(), episodes((1, 28, 28)), 0.1, 3)


def _adapt() -> None:  # meta-testing: predictions only, nothing to backpropagate
    batch = episodes((1, 28, 28))
    assert adapt(conv4(), batch.support_x, batch.support_y, 0.4, 2)(batch.query_x).shape == (T, 10, 5)


STEPS = {
    "maml conv4 2nd order": lambda: maml_step(conv4(), episodes((1, 28, 28)), 0.4, 2).loss,
    "maml conv4 1st order": lambda: maml_step(conv4(), episodes((1, 28, 28)), 0.4, 2, True).loss,
    "maml conv4 lslr msl": _lslr_msl,
    "meta-sgd conv4": _meta_sgd,
    "maml recompute steps": lambda: maml_step(conv4(), episodes((1, 28, 28)), 0.4, 3, recompute="steps").loss,
    "maml recompute 1": lambda: maml_step(conv4(), episodes((1, 28, 28)), 0.4, 2, recompute=1).loss,
    "maml recompute steps,2": lambda: maml_step(conv4(), episodes((1, 28, 28)), 0.4, 2, recompute=("steps", 2)).loss,
    "maml anil": lambda: maml_step(conv4(), episodes((1, 28, 28)), 0.4, 2, adapt_params=["head"]).loss,
    "maml resnet12 dropblock": lambda: (
        maml_step(ResNet12(5, widths=(4, 8, 8, 8), drop_rate=0.1).to("meta"), episodes((3, 32, 32)), 0.4, 1).loss
    ),
    "maml traced model": lambda: maml_step(TwoPaths().to("meta"), episodes((6,)), 0.4, 2).loss,
    "maml sinusoid mse": lambda: maml_step(MLP().to("meta"), _sinusoid(), 0.01, 3, loss_fn=F.mse_loss).loss,
    "adapt": _adapt,
    "reptile": _reptile,
    "protonet": lambda: protonet_step(conv4(None), episodes((1, 28, 28)), 5).loss,
    "matching fce": _matching_fce,
    "siamese all pairs": lambda: siamese_step(conv4(None), episodes((1, 28, 28)), n_way=5).loss,
    "siamese pairs": lambda: siamese_step(conv4(None), episodes((1, 28, 28)), mode="pairs", n_way=5).loss,
    "snail": _snail,
    "meta-lstm": _meta_lstm,
}


@pytest.mark.parametrize("name", list(STEPS))
def test_step_and_backward_never_read_device_values(name: str, gpu_layout: str) -> None:
    with NoHostRead():
        loss = STEPS[name]()
        if loss is not None:
            assert loss.device.type == gpu_layout
            loss.backward()


def test_the_check_catches_a_read(gpu_layout: str) -> None:
    """The mode fails on a value read: n_way inferred from the labels must read them."""
    with NoHostRead(), pytest.raises(AssertionError, match="_local_scalar_dense"):
        protonet_step(conv4(None), episodes((1, 28, 28)))
