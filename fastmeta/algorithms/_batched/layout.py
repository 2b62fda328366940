"""Activation layouts: how the T tasks' values of one graph node are held, and which layout a convolution uses.

An `Activation` is one of
- a (T, N, ...) tensor (tasks first),
- a list of T tensors of shape (N, ...) (one per task: views, or per-task convolutions' outputs), or
- a `Grouped` (N, T*C, *spatial) tensor (task t's channels at t*C:(t+1)*C: one grouped convolution over the tasks).

The layout decision (`_grouped_layout`, `_wide_tiny`) reads the settings below at each call, so a changed setting
takes effect at once (tests and benchmarks set them on `fastmeta.algorithms._batched`, which forwards them here).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Activation = "Tensor | list[Tensor] | Grouped"  # (T, N, ...), T tensors of shape (N, ...), or (N, T*C, ...)

# Convolutions of per-task sets smaller than this run as one grouped convolution over all tasks (on (N, T*C, H, W)
# activations, with one batch norm over T*C channels); larger ones run per task in channels-last layout. Measured
# on a 2-core CPU, Conv4, T=32: the grouped form halves a first-order inner step on 5-image support sets and
# saves 12% of a second-order one, while per-task channels-last convolutions and pooling are the faster for
# 75-image query sets.
GROUPED_MAX_EXAMPLES = 16
# Except on wide, tiny maps, where oneDNN's channels-last convolution is the slower one: a 3x3 convolution
# forward + backward of 75 images at 4x4, 320 -> 640 and 640 -> 640 channels, took 1.2x-1.5x as long in
# channels-last as in NCHW (2-core CPU, 1 and 2 threads; ResNet-12's last block); at 8x8 they were even, at 16x16
# and above channels-last won. Conv4's 64-channel layers never reach this. Such convolutions also run per task
# on small sets rather than grouped: 4 tasks of 5 images at 4x4, 640 -> 640 channels, forward + backward took
# 156 ms grouped and 101 ms per task in NCHW, and a ResNet-12 second-order step (T=4, S=1) went from 7.04 to
# 6.86 s (medians of 4 interleaved runs, 2026-11-30).
NCHW_MAX_PIXELS, NCHW_MIN_CHANNELS = 16, 256
# The layout choice is per device. On CUDA every convolution runs as one grouped convolution over all tasks,
# whatever the set size: that is what vmap does, and vmap beat the per-task runner on an H100's Conv4 rows. Not
# measured here (no GPU): a switch to revisit with measurements, not a measured choice like the CPU's.
GROUPED_ALWAYS = {"cuda"}


def _wide_tiny(x: Activation, in_channels: int) -> bool:
    """Whether a 2-d convolution of in_channels on x runs best in NCHW on this CPU (see NCHW_MAX_PIXELS)."""
    if not isinstance(x, Grouped) and len(x) == 0:
        return False
    t = x.x if isinstance(x, Grouped) else x[0]
    if t.device.type != "cpu" or t.dim() != 4:
        return False
    return t.shape[2] * t.shape[3] <= NCHW_MAX_PIXELS and in_channels >= NCHW_MIN_CHANNELS


def _grouped_layout(x: Activation) -> bool:
    """Whether a convolution on x runs as one grouped convolution over all tasks (else per task)."""
    t = x.x if isinstance(x, Grouped) else x[0] if isinstance(x, list) else x
    return t.device.type in GROUPED_ALWAYS or _examples(x) < GROUPED_MAX_EXAMPLES


class Grouped:
    """Activations of T tasks laid out as (N, T*C, *spatial): example-major, task t's channels at t*C:(t+1)*C."""

    def __init__(self, x: Tensor, T: int) -> None:
        self.x, self.T = x, T

    @staticmethod
    def of(x: Activation, T: int) -> Grouped:
        """x in the grouped layout: (T, N, C, ...) or T x (N, C, ...) -> (N, T*C, ...) (a copy)."""
        if isinstance(x, Grouped):
            return x
        x = torch.stack(x, 1) if isinstance(x, list) else x.transpose(0, 1)  # (N, T, C, *spatial)
        return Grouped(x.reshape(x.shape[0], T * x.shape[2], *x.shape[3:]), T)

    def tasks_first(self) -> Tensor:
        """(N, T*C, ...) -> a (T, N, C, ...) view."""
        n, tc = self.x.shape[:2]
        return self.x.view(n, self.T, tc // self.T, *self.x.shape[2:]).transpose(0, 1)


def tasks_first(x: Activation) -> Tensor:
    """Activations as one (T, N, ...) tensor."""
    if isinstance(x, Grouped):
        return x.tasks_first()
    return torch.stack(x) if isinstance(x, list) else x


def _tasks(x: Activation) -> list[Tensor]:
    """Activations as T tensors of shape (N, ...) (views where x is a tensor)."""
    if isinstance(x, Grouped):
        x = x.tasks_first()
    return x if isinstance(x, list) else list(x.unbind(0))


def _examples(x: Activation) -> int:
    """N, the examples per task."""
    if isinstance(x, Grouped):
        return x.x.shape[0]
    return x[0].shape[0] if isinstance(x, list) else x.shape[1]


def _task_shape(x: Activation) -> torch.Size:
    """The shape of one task's tensor."""
    if isinstance(x, Grouped):
        n, tc, *spatial = x.x.shape
        return torch.Size((n, tc // x.T, *spatial))
    return x[0].shape if isinstance(x, list) else x.shape[1:]


def _shift(d: int) -> int:
    """A dim of one task's tensor as a dim of the (T, N, ...) tensor."""
    return d + 1 if d >= 0 else d


def _channels_last(x: Tensor) -> Tensor:
    """x (N, C, H, W) in channels-last layout; with C == 1 a view with the same data (no copy)."""
    if x.shape[1] == 1 and x.is_contiguous():
        n, _, h, w = x.shape
        return x.as_strided(x.shape, (h * w, 1, w, 1), x.storage_offset())
    return x.contiguous(memory_format=torch.channels_last)


def _channelwise(fn: Callable[[Tensor], Tensor], x: Activation) -> Activation:
    """fn, which acts on each channel of each example, on all tasks at once (in x's layout)."""
    if isinstance(x, Grouped):
        return Grouped(fn(x.x), x.T)
    if isinstance(x, list):
        return [fn(t) for t in x]
    return fn(x.flatten(0, 1)).unflatten(0, x.shape[:2])


def _pointwise(fn: Callable[[Tensor], Tensor], x: Activation) -> Activation:
    """fn, which acts on each element, on all tasks at once (in x's layout)."""
    if isinstance(x, Grouped):
        return Grouped(fn(x.x), x.T)
    return [fn(t) for t in x] if isinstance(x, list) else fn(x)


def _examplewise(fn: Callable[[Tensor], Tensor], x: Activation) -> Activation:
    """fn, which acts on each example on its own (all its channels together), on all tasks at once."""
    if isinstance(x, list):
        return [fn(t) for t in x]
    x = tasks_first(x)
    return fn(x.flatten(0, 1)).unflatten(0, x.shape[:2])
