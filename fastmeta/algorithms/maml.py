"""MAML and its family over a whole batch of tasks, the public API: second and first order (FOMAML), any number
of inner steps, learned inner learning rates (Meta-SGD, MAML++ LSLR: `fastmeta.algorithms.inner`), MAML++'s
multi-step loss (`msl_weights`) and ANIL; `adapt` for meta-testing.

    out = fastmeta.maml_step(model, batch, inner_lr=0.4, inner_steps=1)
    out.loss.backward()   # meta-gradient into model.parameters() (and a learned inner_lr module)

This module checks the arguments and reads them into an `InnerLoop`; every inner step adapts all T tasks at
once (`fastmeta.algorithms.inner`), and `fastmeta.algorithms.recompute` computes the meta-loss, plainly or, under
`recompute`, in less memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastmeta.algorithms._batched import tasks_first
from fastmeta.algorithms.common import per_task_fast_weights as _per_task_weights
from fastmeta.algorithms.inner import (
    InnerLoop,
    InnerLR,
    LossFn,
    MAMLOutput,
    PerStepBN,
    PreparedLoop,
    Runner,
    _step,
    check_int,
    describe,
)
from fastmeta.algorithms.inner_opt import InnerOptimizer
from fastmeta.algorithms.recompute import meta_step, parse_recompute
from fastmeta.data import TaskBatch

__all__ = ["maml_step", "adapt", "AdaptedModel", "msl_weights"]


def msl_weights(inner_steps: int, epoch: int, anneal_epochs: int = 15) -> Tensor:
    """MAML++ multi-step loss weights for `epoch`: uniform (1/S each) at epoch 0; the weights of the steps
    before the last shrink linearly to 0.03/S over `anneal_epochs` epochs while the last one grows. (S,)."""
    check_int("inner_steps", inner_steps, 1)
    S = inner_steps
    decay = epoch / S / max(anneal_epochs, 1)
    floor = 0.03 / S
    w = torch.full((S,), 1.0 / S, dtype=torch.float64)
    w[:-1] = (w[:-1] - decay).clamp(min=floor)
    w[-1] = min(1.0 / S + decay * (S - 1), 1.0 - (S - 1) * floor)
    return w


class AdaptedModel:
    """`model` adapted to T tasks by `adapt`: call it on (T, N, *x) inputs to predict with each task's weights."""

    def __init__(
        self,
        run: Runner,
        params: dict[str, Tensor],
        fast_weights: dict[str, Tensor],
        start: int,
        support_losses: Tensor | None = None,
    ) -> None:
        self._run = run
        self._params = params
        self._start = start
        self.fast_weights = fast_weights
        """name -> (T, *S) each task's adapted weights (detached)."""
        self.support_losses = support_losses
        """(T, inner_steps) each task's support loss before each step."""

    @property
    def num_tasks(self) -> int:
        return next(iter(self.fast_weights.values())).shape[0] if self.fast_weights else 0

    def __call__(self, x: Tensor) -> Tensor:
        """(T, N, *out) predictions for inputs x of shape (T, N, *x), task t with its own fast weights."""
        if not isinstance(x, Tensor) or x.dim() < 2:
            raise ValueError(f"AdaptedModel: x must be a (T, N, ...) tensor, got {describe(x)}")
        if self.fast_weights and x.shape[0] != self.num_tasks:
            raise ValueError(f"AdaptedModel: x has {x.shape[0]} tasks but the model was adapted to {self.num_tasks}")
        with torch.no_grad():
            p = {**self._params, **self.fast_weights}
            if self._start:
                x = self._run(self._params, x, 0, self._start)
            return tasks_first(self._run(p, x, self._start))


def maml_step(
    model: nn.Module,
    batch: TaskBatch,
    inner_lr: float | InnerLR = 0.4,
    inner_steps: int = 1,
    first_order: bool = False,
    loss_fn: LossFn = F.cross_entropy,
    *,
    adapt_params: Iterable[str] | Callable[[str], bool] | None = None,
    multi_step_weights: Sequence[float] | Tensor | None = None,
    strategy: str = "auto",
    recompute: int | str | tuple[str, int] | None = None,
    inner_opt: InnerOptimizer | None = None,
    per_step_bn: PerStepBN | None = None,
) -> MAMLOutput:
    """One meta-step of MAML over the T tasks of `batch`: adapt to each support set, evaluate on its query set.

    Each task starts from `model`'s parameters and takes `inner_steps` gradient steps on its support loss,
    fast_weights <- fast_weights - inner_lr * grad; the result's `loss` (the mean query loss after adaptation)
    backpropagates to `model`'s parameters and to a learned `inner_lr`. The meta-gradient equals that of a
    per-task loop of autograd.grad(create_graph=True) steps.

    Args:
        model: the network, called on (N, *x) inputs. Models made of nn.Sequential and standard layers run all
            tasks batched (see `strategy`); BatchNorm uses each task's own batch statistics (support and query
            separately, as in Finn et al.'s code) and never updates running statistics.
        batch: the tasks: support_x (T, Ns, *x), support_y (T, Ns, ...), query_x (T, Nq, *x), query_y.
        inner_lr: a number, or a learned `InnerLR` module (MetaSGDLR per element, LSLR per layer and step).
        inner_steps: gradient steps per task (0: evaluate the initial weights).
        first_order: FOMAML: treat the inner gradients as constants (no second-order terms).
        loss_fn: loss_fn(predictions (N, ...), targets (N, ...)) -> one task's mean loss (0-d). F.cross_entropy,
            F.mse_loss and the other torch.nn.functional losses with `reduction` run for all tasks in one call.
        adapt_params: which parameters adapt in the inner loop (names or module prefixes such as "head", or a
            predicate on names); the others are shared by all tasks (ANIL: adapt the head only). Default: every
            parameter that requires grad (or the ones `inner_lr` was built for).
        multi_step_weights: MAML++ multi-step loss, (inner_steps,) weights of the query loss after each step
            (see `msl_weights`).
        strategy: "auto" (batched where the model allows it, else vmap without BatchNorm, else a loop),
            "batched", "vmap" or "loop".
        recompute: save memory; the same loss and meta-gradient (to `model`'s parameters and a learned
            inner_lr), but only `loss` is differentiable, once, and (part of) its gradient is computed during
            this call, so call it to train; task_losses, predictions and fast_weights come back detached. Under
            torch.no_grad the plain step runs. Dropout and other randomness draw the same numbers when
            recomputed as in forward (the RNG state is saved and restored).
            - k (an integer): k tasks at a time, each chunk differentiated as soon as its loss is computed: peak
              memory of one chunk's graph instead of all T's, and nothing computed twice.
            - "steps": second-order memory that does not grow with inner_steps: the inner loop runs without a
              graph and backward rebuilds one step's graph at a time, in reverse. Peak: one step's graph or one
              query chunk's, plus about 2 * sqrt(inner_steps) sets of fast weights; about two more inner loops
              without a graph. With dropout in the query, the loss is exact for the masks drawn per chunk.
            - ("steps", k): both: chunks of k tasks, each swept over its steps.
            How each works and what it costs: the docstring of `fastmeta.algorithms.recompute`.
        inner_opt: the inner update rule: None (plain SGD, as above), `fastmeta.SGD(momentum=0.9,
            nesterov=False)` or `fastmeta.Adam(betas=(0.9, 0.999), eps=1e-8)`, torch.optim's rules with
            inner_lr as their lr and each task's own state; differentiable like the plain step. (Not with
            recompute="steps" yet.)
        per_step_bn: MAML++'s per-step BatchNorm weights and biases, a `fastmeta.PerStepBN(model, inner_steps)`
            (train its parameters with the meta-optimiser): inner step s and the query after it use its row s,
            and the BatchNorm weights do not adapt (adapt_params defaults to every other parameter).

    Returns: a `MAMLOutput` (loss, (T,) task_losses, accuracy, (T, inner_steps) support_losses, predictions,
        fast_weights).
    """
    if not isinstance(batch, TaskBatch):
        raise TypeError(f"maml_step: batch must be a fastmeta.TaskBatch, got {type(batch).__name__}")
    loop = InnerLoop(inner_lr, inner_steps, first_order, loss_fn, adapt_params, strategy, inner_opt, per_step_bn)
    weights = _step_weights(multi_step_weights, inner_steps)
    sweep, chunk = parse_recompute(recompute)
    if sweep and loop.inner_opt is not None:
        raise ValueError(
            "maml_step: recompute='steps' does not carry an inner optimiser's state yet; with inner_opt use "
            "recompute=k (k tasks at a time) or none"
        )
    # Here, not deeper: the runner's warning about an unbatched model names the caller of maml_step.
    at = loop.prepare("maml_step", model, batch.support_x)
    return meta_step(at, batch, weights, sweep, chunk)


def _step_weights(weights: Sequence[float] | Tensor | None, inner_steps: int) -> Tensor | None:
    """maml_step's multi_step_weights checked, as (inner_steps,) float64 on the CPU (None stays None)."""
    if weights is None:
        return None
    if inner_steps < 1:
        raise ValueError("maml_step: multi_step_weights needs inner_steps >= 1")
    # constants read on the host at each step: held in host memory (a GPU tensor is copied once, here)
    weights = torch.as_tensor(weights, dtype=torch.float64, device="cpu").flatten()
    if weights.numel() != inner_steps:
        raise ValueError(
            f"maml_step: multi_step_weights must have one weight per inner step ({inner_steps}), got {weights.numel()}"
        )
    return weights


def adapt(
    model: nn.Module,
    support_x: Tensor,
    support_y: Tensor,
    inner_lr: float | InnerLR = 0.4,
    inner_steps: int = 1,
    loss_fn: LossFn = F.cross_entropy,
    *,
    adapt_params: Iterable[str] | Callable[[str], bool] | None = None,
    strategy: str = "auto",
    inner_opt: InnerOptimizer | None = None,
    per_step_bn: PerStepBN | None = None,
) -> AdaptedModel:
    """Adapt `model` to T tasks (meta-testing): `inner_steps` steps on each support set (T, Ns, *x), (T, Ns, ...).

    Returns an `AdaptedModel` holding each task's fast weights; call it on (T, Nq, *x) queries. No graph to
    the model's parameters is kept, and the model is not modified. Arguments as in `maml_step`.
    """
    TaskBatch(support_x, support_y, support_x, support_y)  # shape checks
    loop = InnerLoop(
        inner_lr, inner_steps, loss_fn=loss_fn, adapt_params=adapt_params, strategy=strategy, inner_opt=inner_opt,
        per_step_bn=per_step_bn,
    )  # fmt: skip
    return adapt_prepared(loop.prepare("adapt", model, support_x), support_x, support_y)


def adapt_prepared(at: PreparedLoop, support_x: Tensor, support_y: Tensor, lam: float = 0.0) -> AdaptedModel:
    """`adapt` with the inner loop `at` (InnerLoop.prepare): its steps without a graph on the support sets
    (T, Ns, *x), (T, Ns, ...); lam > 0: on the support loss plus lam/2 ||fast - initial||^2 (iMAML)."""
    with torch.no_grad():
        at = at.detached()
        feat, fast, state, losses = at.features(support_x), at.initial(), at.initial_state(), []
        for s in range(at.loop.inner_steps):
            fast, step_losses = _step(at, feat, support_y, s, fast, False, state, lam)
            losses.append(step_losses)
        T = support_x.shape[0]
        fast_weights = _per_task_weights(at.params, at.adapted, fast, T)
        support_losses = torch.stack(losses, 1) if losses else support_x.new_zeros(T, 0)
    return AdaptedModel(at.run, at.params_at(None), fast_weights, at.start, support_losses)
