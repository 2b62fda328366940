"""One meta-step of a run, as `fastmeta train` takes it: the learner's objective, its backward, the gradients
summed over processes, the optimiser step and the learner's hooks; and the step's logged numbers, read from the
device only when the loop needs them."""

from __future__ import annotations

import math

import torch
from torch import nn

from fastmeta import distributed
from fastmeta.train.config import RunConfig

__all__ = ["StepNumbers", "train_step"]


class StepNumbers:
    """A training step's logged loss and accuracy, on their way to the host, and whether the run stops.

    On a GPU they are copied without waiting and read() waits for that step alone: the loop reads a step's
    numbers after issuing the next one, so the host queues step k + 1 while the device still runs step k (a
    read right after each step would leave the device idle while the host issues the next)."""

    def __init__(self, values: torch.Tensor, stop: bool) -> None:
        self.stop, self.event = stop, None
        if values.is_cuda:
            self.values = values.to("cpu", non_blocking=True)  # into pinned memory, in order after the step
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.values = values.cpu()

    def read(self) -> dict:
        if self.event is not None:
            self.event.synchronize()
        loss, acc = self.values.tolist()
        return {"loss": loss, "accuracy": None if math.isnan(acc) else acc}


def train_step(
    config: RunConfig,
    model: nn.Module,
    aux: nn.Module | None,
    opt: torch.optim.Optimizer,
    batch,  # noqa: ANN001
    share: float = 1.0,
    stop: bool = False,
) -> StepNumbers:
    """One meta-step on this process's tasks; with several processes, the meta-gradient (and the logged loss
    and accuracy) are summed over them weighted by `share`, this process's fraction of the meta-batch, and
    `stop` is true on every process when it is on any (agreed on at once, through the host: see
    distributed.any_rank)."""
    learner = config.learner
    opt.zero_grad(set_to_none=True)
    out = learner.objective(config, model, aux, batch)
    if learner.writes_gradient:  # the objective has put the meta-gradient into .grad (Reptile's direction)
        loss = out.task_losses.mean()
    else:
        out.loss.backward()
        loss = out.loss.detach()
    acc = loss.new_full((), math.nan) if out.accuracy is None else out.accuracy.float().mean()
    values = torch.stack([loss.detach().double(), acc.detach().double()])
    params = [p for group in opt.param_groups for p in group["params"]]
    values = distributed.all_reduce_gradients(params, share, values * share)  # (one process: as they are)
    stop = distributed.any_rank(stop)
    if learner.after_backward is not None:
        learner.after_backward(config, params)
    opt.step()
    if learner.after_step is not None:
        learner.after_step(config, model)
    return StepNumbers(values, stop)
