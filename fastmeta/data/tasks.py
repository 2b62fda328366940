"""TaskBatch: T tasks stacked along a leading dimension; LabeledBatch: an ordinary mini-batch of examples and their
classes (the pretraining stage of the baselines)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class TaskBatch:
    """T tasks, each with a support set (adapt on it) and a query set (evaluate the adapted model on it).

    Shapes: support_x (T, Ns, *x), support_y (T, Ns, *y), query_x (T, Nq, *x), query_y (T, Nq, *y). Every task
    has the same Ns and Nq (an N-way K-shot episode has Ns = N*K). For classification y holds class indices
    (T, N) of an integer dtype.
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor

    def __post_init__(self) -> None:
        for name in ("support_x", "support_y", "query_x", "query_y"):
            t = getattr(self, name)
            if not isinstance(t, Tensor):
                raise TypeError(f"TaskBatch: {name} must be a tensor, got {type(t).__name__}")
            if t.dim() < 2:
                raise ValueError(
                    f"TaskBatch: {name} must have a task and an example dimension (T, N, ...), got shape "
                    f"{tuple(t.shape)}"
                )
        T = self.support_x.shape[0]
        for name in ("support_y", "query_x", "query_y"):
            if getattr(self, name).shape[0] != T:
                raise ValueError(
                    f"TaskBatch: {name} has {getattr(self, name).shape[0]} tasks but support_x has {T} "
                    f"(shapes {tuple(self.support_x.shape)} and {tuple(getattr(self, name).shape)})"
                )
        for x, y in (("support_x", "support_y"), ("query_x", "query_y")):
            if getattr(self, x).shape[1] != getattr(self, y).shape[1]:
                raise ValueError(
                    f"TaskBatch: {x} has {getattr(self, x).shape[1]} examples per task but {y} has "
                    f"{getattr(self, y).shape[1]} (shapes {tuple(getattr(self, x).shape)} and "
                    f"{tuple(getattr(self, y).shape)})"
                )
        if self.support_x.shape[2:] != self.query_x.shape[2:]:
            raise ValueError(
                f"TaskBatch: support_x examples have shape {tuple(self.support_x.shape[2:])} but query_x examples "
                f"have {tuple(self.query_x.shape[2:])}"
            )
        devices = {t.device for t in self._tensors}
        if len(devices) > 1:
            raise ValueError(f"TaskBatch: all tensors must be on one device, got {sorted(map(str, devices))}")

    @property
    def _tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.support_x, self.support_y, self.query_x, self.query_y

    @property
    def num_tasks(self) -> int:
        """T, the number of tasks."""
        return self.support_x.shape[0]

    @property
    def device(self) -> torch.device:
        return self.support_x.device

    def __getitem__(self, tasks: slice) -> TaskBatch:
        """The tasks `tasks` (a slice) of the batch, as views: batch[lo:hi] has hi - lo tasks."""
        if not isinstance(tasks, slice):
            raise TypeError(f"TaskBatch: index with a slice of tasks (batch[lo:hi]), got {type(tasks).__name__}")
        return TaskBatch(*(t[tasks] for t in self._tensors))

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None, non_blocking: bool = False
    ) -> TaskBatch:
        """The batch on `device`, with floating-point tensors cast to `dtype` (integer labels keep theirs)."""

        def move(t: Tensor) -> Tensor:
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None, non_blocking=non_blocking)

        return TaskBatch(*map(move, self._tensors))

    def pin_memory(self) -> TaskBatch:
        """The batch in page-locked host memory (CPU tensors), from which `.to("cuda", non_blocking=True)`
        copies without making the host wait for the GPU."""
        return TaskBatch(*(t.pin_memory() for t in self._tensors))


@dataclass(frozen=True)
class LabeledBatch:
    """An ordinary mini-batch: x (B, *x) examples and y (B,) their class indices over all the classes of a
    split (not an episode's 0..n_way-1), as the pretrained baselines train on."""

    x: Tensor
    y: Tensor

    def __post_init__(self) -> None:
        for name in ("x", "y"):
            if not isinstance(getattr(self, name), Tensor):
                raise TypeError(f"LabeledBatch: {name} must be a tensor, got {type(getattr(self, name)).__name__}")
        if self.x.dim() < 1 or self.y.dim() != 1 or self.y.is_floating_point() or self.y.shape[0] != self.x.shape[0]:
            raise ValueError(
                f"LabeledBatch: x must be (B, ...) and y (B,) class indices, got x {tuple(self.x.shape)} and y "
                f"{self.y.dtype} {tuple(self.y.shape)}"
            )

    @property
    def device(self) -> torch.device:
        return self.x.device

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None, non_blocking: bool = False
    ) -> LabeledBatch:
        """The batch on `device`, x cast to `dtype` (the labels keep theirs)."""
        return LabeledBatch(
            self.x.to(device=device, dtype=dtype, non_blocking=non_blocking),
            self.y.to(device=device, non_blocking=non_blocking),
        )

    def pin_memory(self) -> LabeledBatch:
        return LabeledBatch(self.x.pin_memory(), self.y.pin_memory())
