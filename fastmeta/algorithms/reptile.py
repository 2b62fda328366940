"""Reptile (Nichol, Achiam & Schulman 2018) over a batch of tasks."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastmeta.algorithms.common import (
    EVAL_INNER_STEPS,
    INNER_LR,
    INNER_OPT,
    INNER_STEPS,
    TRAIN_SHOT,
    ZERO_HEAD,
    Learner,
    zero_head_after_step,
)
from fastmeta.algorithms.common import query_accuracy as _accuracy
from fastmeta.algorithms.inner import InnerLoop, InnerLR, LossFn, task_losses
from fastmeta.algorithms.inner_opt import InnerOptimizer, inner_opt_of
from fastmeta.algorithms.maml import adapt_prepared
from fastmeta.algorithms.maml_learners import build_with_head, predict_by_adapting
from fastmeta.data import TaskBatch

__all__ = ["reptile_step", "ReptileOutput"]


@dataclass
class ReptileOutput:
    """What reptile_step computed for T tasks (all detached).

    task_losses: (T,) query loss after adaptation. accuracy: (T,) query accuracy (classification) or None.
    support_losses: (T, inner_steps) support loss before each inner step. fast_weights: name -> (T, *S).
    """

    task_losses: Tensor
    accuracy: Tensor | None
    support_losses: Tensor
    fast_weights: dict[str, Tensor]


def reptile_step(
    model: nn.Module,
    batch: TaskBatch,
    inner_lr: float | InnerLR = 0.1,
    inner_steps: int = 5,
    loss_fn: LossFn = F.cross_entropy,
    *,
    adapt_params: Iterable[str] | Callable[[str], bool] | None = None,
    strategy: str = "auto",
    inner_opt: InnerOptimizer | None = None,
) -> ReptileOutput:
    """One Reptile meta-step: adapt each task with `inner_steps` SGD steps on its support set (all T tasks
    batched, through fastmeta.ops.fast_weight_update), then add the Reptile direction
    theta - mean_t(fast_weights_t) to each adapted parameter's .grad.

    An optimiser step then moves the initial weights toward the tasks' adapted weights: with
    torch.optim.SGD(lr=epsilon), theta <- theta + epsilon * (mean_t phi_t - theta), Nichol et al.'s batched
    update; Adam on the same direction also works. The query sets are only evaluated (for the returned losses).
    inner_opt: the inner steps' rule (None: SGD; `fastmeta.SGD(momentum=...)`, `fastmeta.Adam()`: Nichol et
    al.'s inner loop was Adam).
    """
    if not isinstance(batch, TaskBatch):
        raise TypeError(f"reptile_step: batch must be a fastmeta.TaskBatch, got {type(batch).__name__}")
    loop = InnerLoop(
        inner_lr, inner_steps, loss_fn=loss_fn, adapt_params=adapt_params, strategy=strategy, inner_opt=inner_opt
    )
    adapted = adapt_prepared(loop.prepare("reptile_step", model, batch.support_x), batch.support_x, batch.support_y)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, fast in adapted.fast_weights.items():
            p = params[name]
            direction = p - fast.mean(0)
            p.grad = direction if p.grad is None else p.grad + direction
        pred = adapted(batch.query_x)
        losses = task_losses(loss_fn, pred, batch.query_y)
    return ReptileOutput(losses, _accuracy(pred, batch.query_y), adapted.support_losses, adapted.fast_weights)


# Nichol et al.'s settings: the outer step moves the weights by meta_lr (their epsilon, 1 annealed linearly to 0)
# times theta - mean(adapted weights), and with one inner step it is joint training; on Omniglot 5 tasks a step,
# 5 inner steps, 10-shot training episodes (SGD inner steps here, not their Adam), 10 test steps; for sinusoids
# their inner rate 0.02 (a 40-40 MLP: 1000 steps take the MSE after 10 test steps 4.0 -> 0.7).
REPTILE = Learner(
    name="reptile",
    summary="Reptile (Nichol et al. 2018): the weights move toward the tasks' adapted weights (SGD, --meta-lr "
    "the outer step, annealed linearly to 0)",
    options=(
        INNER_LR.but(default=0.1, per_domain={"functions": 0.02}),
        INNER_STEPS.but(default=5),
        EVAL_INNER_STEPS.but(default=10, per_domain={"functions": 1}),
        TRAIN_SHOT.but(default=10, per_domain={"functions": None}),
        ZERO_HEAD,
        INNER_OPT,
    ),
    objective=lambda config, model, aux, batch: reptile_step(
        model, batch, config.inner_lr, config.inner_steps, config.loss_fn, inner_opt=inner_opt_of(config.inner_opt)
    ),
    writes_gradient=True,
    predict=predict_by_adapting,
    build=build_with_head,
    defaults={"characters": {"meta_batch": 5, "meta_lr": 1.0}, "functions": {"meta_lr": 1.0}},
    optimizer="sgd",
    schedule="linear",
    after_step=zero_head_after_step,
)
