"""MAML and its family over a whole batch of tasks: second and first order (FOMAML), any number of inner
steps, learned inner learning rates (Meta-SGD, MAML++ LSLR), MAML++'s multi-step loss and ANIL.

    out = fastmeta.maml_step(model, batch, inner_lr=0.4, inner_steps=1)
    out.loss.backward()   # meta-gradient into model.parameters() (and a learned inner_lr module)

Every inner step adapts all T tasks at once: one forward of the support sets through `model` with per-task
weights (see `fastmeta.algorithms._batched`), one autograd.grad for all tasks, and one
`fastmeta.ops.fast_weight_update` for every adapted tensor of every task.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge

from fastmeta import ops
from fastmeta.algorithms._batched import BatchedModel, LoopModel, VmapModel, runner, tasks_first
from fastmeta.algorithms.common import per_task_fast_weights as _per_task_weights
from fastmeta.algorithms.common import query_accuracy as _accuracy
from fastmeta.data import TaskBatch

__all__ = ["maml_step", "adapt", "MAMLOutput", "AdaptedModel", "InnerLR", "MetaSGDLR", "LSLR", "msl_weights"]

LossFn = Callable[[Tensor, Tensor], Tensor]
Runner = BatchedModel | LoopModel | VmapModel

# Losses that take reduction="none": computed once over all T*N examples, then averaged per task.
_FLAT_LOSSES = {
    F.cross_entropy,
    F.nll_loss,
    F.mse_loss,
    F.l1_loss,
    F.smooth_l1_loss,
    F.huber_loss,
    F.binary_cross_entropy_with_logits,
}


class InnerLR(nn.Module):
    """Learned inner-loop learning rates for the parameters named in `names` (train them with the meta-optimiser)."""

    names: list[str]

    def forward(self, step: int) -> list[Tensor]:
        """The learning rate of each parameter in `names` at inner step `step` (0-based)."""
        raise NotImplementedError


class MetaSGDLR(InnerLR):
    """Meta-SGD (Li et al. 2017): one learned learning rate per element of each adapted parameter.

    Args:
        model: the model whose parameters adapt.
        init: the initial learning rate of every element.
        params: which parameters adapt (names or module prefixes, as `adapt_params`); None: all that require grad.
    """

    def __init__(self, model: nn.Module, init: float = 0.01, params: Iterable[str] | None = None) -> None:
        super().__init__()
        self.names = adapted_names(model, params)
        shapes = dict(model.named_parameters())
        self.lrs = nn.ParameterList([nn.Parameter(torch.full_like(shapes[n].detach(), init)) for n in self.names])

    def forward(self, step: int) -> list[Tensor]:
        return list(self.lrs)


class LSLR(InnerLR):
    """MAML++ learned per-layer per-step learning rates (Antoniou et al. 2019): one scalar per adapted parameter
    tensor and inner step, `lrs` of shape (inner_steps, len(names)). Steps past `inner_steps` (a longer
    adaptation at meta-test) use the last step's rates."""

    def __init__(
        self, model: nn.Module, inner_steps: int, init: float = 0.4, params: Iterable[str] | None = None
    ) -> None:
        super().__init__()
        _check_int("inner_steps", inner_steps, 1)
        self.names = adapted_names(model, params)
        ref = next(model.parameters())
        self.lrs = nn.Parameter(
            torch.full((inner_steps, len(self.names)), float(init), dtype=ref.dtype, device=ref.device)
        )

    def forward(self, step: int) -> list[Tensor]:
        return list(self.lrs[min(step, self.lrs.shape[0] - 1)].unbind(0))


def msl_weights(inner_steps: int, epoch: int, anneal_epochs: int = 15) -> Tensor:
    """MAML++ multi-step loss weights for `epoch`: uniform (1/S each) at epoch 0; the weights of the steps
    before the last shrink linearly to 0.03/S over `anneal_epochs` epochs while the last one grows. (S,)."""
    _check_int("inner_steps", inner_steps, 1)
    S = inner_steps
    decay = epoch / S / max(anneal_epochs, 1)
    floor = 0.03 / S
    w = torch.full((S,), 1.0 / S, dtype=torch.float64)
    w[:-1] = (w[:-1] - decay).clamp(min=floor)
    w[-1] = min(1.0 / S + decay * (S - 1), 1.0 - (S - 1) * floor)
    return w


@dataclass
class MAMLOutput:
    """What maml_step computed for a batch of T tasks.

    loss: the meta-objective, 0-d, differentiable: the mean over tasks of the query loss after adaptation (with
        multi_step_weights: sum_s w_s * that mean after step s).
    task_losses: (T,) each task's query loss after the last inner step (differentiable).
    accuracy: (T,) each task's query accuracy (classification: predictions (T, N, C), labels (T, N)), else None.
    support_losses: (T, inner_steps) each task's support loss before each inner step (detached).
    predictions: (T, Nq, ...) the adapted model's query predictions (detached).
    fast_weights: name -> (T, *S) each task's adapted weights (differentiable, as in the graph of `loss`).
    """

    loss: Tensor
    task_losses: Tensor
    accuracy: Tensor | None
    support_losses: Tensor
    predictions: Tensor
    fast_weights: dict[str, Tensor]


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
            raise ValueError(f"AdaptedModel: x must be a (T, N, ...) tensor, got {_describe(x)}")
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
            - k (an integer): the step runs k tasks at a time, each chunk differentiated as soon as its loss is
              computed (its gradients kept, scaled in backward; its graph freed before the next chunk's): peak
              memory of one chunk's graph instead of all T's, and nothing computed twice.
            - "steps": second-order memory that does not grow with inner_steps. The inner loop runs without a
              graph, keeping the fast weights of every ceil(sqrt(inner_steps))-th step; the final query loss is
              differentiated in forward already (its gradients kept, its graph freed), in chunks of tasks with
              at most as many query examples as the support sets of all tasks hold (one task for 75 queries
              against 5-image support sets). Backward sweeps the steps in reverse, rebuilding one step's graph
              at a time (the steps between two kept ones recomputed without a graph first) and taking its
              vector-Jacobian product with the adjoint of the step's output fast weights: the adjoint of its
              input fast weights and the gradients of the learned rates and of the shared (non-adapted)
              parameters. Peak: one step's graph or one query chunk's, whichever is larger, plus about
              2 * sqrt(inner_steps) sets of fast weights. Costs about two more inner loops without a graph
              (with multi_step_weights, one more query forward per weighted intermediate step). Random layers
              in the query draw per chunk, so with dropout the loss is not the plain step's for the same seed
              (it is exact for the masks drawn).
            - ("steps", k): both: chunks of k tasks (as k), each swept over its steps (as "steps") with the k
              tasks' query losses in one piece.
    """
    if not isinstance(batch, TaskBatch):
        raise TypeError(f"maml_step: batch must be a fastmeta.TaskBatch, got {type(batch).__name__}")
    _check_int("inner_steps", inner_steps, 0)
    if multi_step_weights is not None:
        if inner_steps < 1:
            raise ValueError("maml_step: multi_step_weights needs inner_steps >= 1")
        # constants read on the host at each step: held in host memory (a GPU tensor is copied once, here)
        multi_step_weights = torch.as_tensor(multi_step_weights, dtype=torch.float64, device="cpu").flatten()
        if multi_step_weights.numel() != inner_steps:
            raise ValueError(
                f"maml_step: multi_step_weights must have one weight per inner step ({inner_steps}), "
                f"got {multi_step_weights.numel()}"
            )
    sweep_steps, chunk = _parse_recompute(recompute)
    if torch.is_grad_enabled() and chunk is not None and chunk < batch.num_tasks:
        kwargs = dict(
            adapt_params=adapt_params,
            multi_step_weights=multi_step_weights,
            strategy=strategy,
            recompute=_SWEEP_WHOLE_QUERY if sweep_steps else None,
        )
        return _maml_step_recomputed(model, batch, inner_lr, inner_steps, first_order, loss_fn, chunk, kwargs)
    if torch.is_grad_enabled() and sweep_steps:
        sweep = _StepSweep(
            model, batch, inner_lr, inner_steps, first_order, loss_fn, adapt_params, multi_step_weights, strategy,
            whole_query=recompute is _SWEEP_WHOLE_QUERY,
        )  # fmt: skip
        return sweep.output(_SweptLoss.apply(sweep, *sweep.tensors))
    run, params, adapted, lr_of = _prepare("maml_step", model, batch.support_x, inner_lr, adapt_params, strategy)
    start = run.split(set(adapted))
    T = batch.num_tasks
    qfeat = run(params, batch.query_x, 0, start) if start else batch.query_x

    def query(fast: list[Tensor]) -> tuple[Tensor, Tensor]:
        p = {**params, **dict(zip(adapted, fast))}
        pred = tasks_first(run(p, qfeat, start))
        return pred, task_losses(loss_fn, pred, batch.query_y)

    create_graph = torch.is_grad_enabled() and not first_order
    fast = [params[n] for n in adapted]
    support_losses, loss = [], None
    for s, (fast, losses) in enumerate(
        _steps(run, params, adapted, batch.support_x, batch.support_y, start, lr_of, inner_steps, loss_fn, create_graph)
    ):
        support_losses.append(losses)
        if multi_step_weights is not None and s < inner_steps - 1 and multi_step_weights[s] != 0:
            w = float(multi_step_weights[s])
            loss = w * query(fast)[1].mean() + (0 if loss is None else loss)
    pred, per_task = query(fast)
    final = per_task.mean()
    if multi_step_weights is not None:
        final = float(multi_step_weights[-1]) * final
    loss = final if loss is None else loss + final
    return MAMLOutput(
        loss=loss,
        task_losses=per_task,
        accuracy=_accuracy(pred, batch.query_y),
        support_losses=torch.stack(support_losses, 1) if support_losses else per_task.new_zeros(T, 0).detach(),
        predictions=pred.detach(),
        fast_weights=_per_task_weights(params, adapted, fast, T),
    )


def _maml_step_recomputed(
    model: nn.Module,
    batch: TaskBatch,
    inner_lr: float | InnerLR,
    inner_steps: int,
    first_order: bool,
    loss_fn: LossFn,
    chunk: int,
    kwargs: dict,
) -> MAMLOutput:
    """maml_step `chunk` tasks at a time, each chunk differentiated as soon as its loss is computed (see
    maml_step's recompute=k)."""
    T = batch.num_tasks
    fields = (batch.support_x, batch.support_y, batch.query_x, batch.query_y)
    chunks = [TaskBatch(*(t[lo : lo + chunk] for t in fields)) for lo in range(0, T, chunk)]

    def run(sub: TaskBatch) -> MAMLOutput:
        return maml_step(model, sub, inner_lr, inner_steps, first_order, loss_fn, **kwargs)

    tensors = [p for p in model.parameters() if p.requires_grad]
    if isinstance(inner_lr, InnerLR):
        tensors += [p for p in inner_lr.parameters() if p.requires_grad]
    outs: list[MAMLOutput] = []
    loss = _ChunkedLoss.apply(run, chunks, outs, *tensors)
    predictions = torch.cat([o.predictions for o in outs])
    return MAMLOutput(
        loss=loss,
        task_losses=torch.cat([o.task_losses for o in outs]),
        accuracy=_accuracy(predictions, batch.query_y),
        support_losses=torch.cat([o.support_losses for o in outs]),
        predictions=predictions,
        fast_weights={n: torch.cat([o.fast_weights[n] for o in outs]) for n in outs[0].fast_weights},
    )


class _ChunkedLoss(torch.autograd.Function):
    """The meta-loss of chunks of tasks. Forward runs each chunk's step with its graph and differentiates it at
    once (the fused-loss trick: gradients computed where the loss is), keeping the gradients and freeing the graph
    before the next chunk, so one chunk's graph is alive at a time and nothing is computed twice; backward scales
    the kept gradients. `outs` receives each chunk's outputs, detached."""

    @staticmethod
    def forward(ctx, run, chunks, outs, *tensors):  # noqa: ANN001, ANN205
        ctx.save_for_backward(*tensors)  # (backward's version check: no parameter changed in place meanwhile)
        T = sum(sub.num_tasks for sub in chunks)
        total: list[Tensor | None] = [None] * len(tensors)
        loss = None
        with torch.enable_grad():
            for sub in chunks:
                out = run(sub)
                part = out.loss * (sub.num_tasks / T)
                if part.requires_grad and tensors:
                    _accumulate(total, torch.autograd.grad(part, tensors, allow_unused=True))
                outs.append(_detached(out))
                del out
                loss = part.detach() if loss is None else loss + part.detach()
        ctx.grads = total
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        _ = ctx.saved_tensors
        grads, ctx.grads = ctx.grads, None
        return (None, None, None, *(None if g is None else g * grad for g in grads))


def _detached(out: MAMLOutput) -> MAMLOutput:
    """out with every tensor detached (no graph kept alive through it)."""
    return MAMLOutput(
        loss=out.loss.detach(),
        task_losses=out.task_losses.detach(),
        accuracy=None if out.accuracy is None else out.accuracy.detach(),
        support_losses=out.support_losses.detach(),
        predictions=out.predictions.detach(),
        fast_weights={n: w.detach() for n, w in out.fast_weights.items()},
    )


def _checkpoint_interval(inner_steps: int) -> int:
    """recompute="steps" keeps the fast weights of every this many steps; backward recomputes the others (without
    a graph) one segment at a time, so that at most about 2 * sqrt(inner_steps) sets of T tasks' fast weights are
    alive at once, for about one more inner loop without a graph."""
    return max(1, math.ceil(math.sqrt(inner_steps)))


def _query_chunks(batch: TaskBatch, start: int) -> list[slice]:
    """The chunks of tasks whose query losses recompute="steps" differentiates one at a time: each with at most as
    many query examples as the support sets of all tasks (and at least one task), so that one chunk's query graph
    is about one inner step's or smaller. One chunk when the query features are one activation of all tasks
    (ANIL's body output, start > 0)."""
    T, nq = batch.num_tasks, batch.query_x.shape[1]
    k = T if start or nq == 0 else T * batch.support_x.shape[1] // nq
    k = max(1, k)
    return [slice(lo, min(lo + k, T)) for lo in range(0, T, k)] or [slice(0, T)]


class _StepSweep:
    """maml_step(recompute="steps"): `forward` runs the inner loop without a graph, keeping the fast weights of
    every `_checkpoint_interval` steps and the random state before each random computation, then differentiates
    the final query loss chunk by chunk of tasks (`_query_chunks`), keeping its gradients; `backward` scales them,
    then rebuilds one inner step at a time, in reverse (and the intermediate query losses of the multi-step loss,
    chunk by chunk), to compute the meta-gradient."""

    def __init__(
        self,
        model: nn.Module,
        batch: TaskBatch,
        inner_lr: float | InnerLR,
        inner_steps: int,
        first_order: bool,
        loss_fn: LossFn,
        adapt_params: Iterable[str] | Callable[[str], bool] | None,
        weights: Tensor | None,
        strategy: str,
        whole_query: bool = False,
    ) -> None:
        self.run, self.params, self.adapted, self.lr_of = _prepare(
            "maml_step", model, batch.support_x, inner_lr, adapt_params, strategy
        )
        self.start = self.run.split(set(self.adapted))
        self.batch, self.steps, self.first_order, self.loss_fn = batch, inner_steps, first_order, loss_fn
        # weights[s]: the weight of the query loss after step s + 1 (the last: after all steps, or with no step).
        self.weights = [0.0] * max(inner_steps - 1, 0) + [1.0] if weights is None else weights.tolist()
        self.every = _checkpoint_interval(inner_steps)
        # The meta-parameters: what backward returns gradients for.
        self.tensors = [p for p in self.params.values() if p.requires_grad]
        if isinstance(inner_lr, InnerLR):
            self.tensors += [p for p in inner_lr.parameters() if p.requires_grad]
        self.rng = _RNG(batch.support_x.device)
        # (Inside recompute=("steps", k) the k tasks' query is one chunk: the plain step that gave the loss drew its
        # random numbers so.)
        self.chunks = [slice(0, batch.num_tasks)] if whole_query else _query_chunks(batch, self.start)

    def lr(self, s: int, detach: bool) -> float | list[Tensor]:
        lr = self.lr_of(s)
        return [r.detach() for r in lr] if detach and isinstance(lr, list) else lr

    def query(
        self, params: dict[str, Tensor], fast: list[Tensor], qfeat: object, tasks: slice
    ) -> tuple[Tensor, Tensor]:
        """(t, Nq, ...) predictions and (t,) query losses of the t tasks `tasks` (a chunk), with fast weights
        `fast` (those tasks' (t, *S_i), or shared)."""
        x = qfeat if self.start else qfeat[tasks]  # (ANIL's features: one chunk of all tasks)
        pred = tasks_first(self.run({**params, **dict(zip(self.adapted, fast))}, x, self.start))
        return pred, task_losses(self.loss_fn, pred, self.batch.query_y[tasks])

    def query_grads(
        self, fast: list[Tensor] | None, weight: float, states: list | None, grad: Tensor | None
    ) -> tuple[list[Tensor | None], list[Tensor | None], list[Tensor | None], Tensor, Tensor, Tensor]:
        """Differentiates weight * (the mean query loss) with fast weights `fast` ((T, *S_i) each; None: the
        parameters themselves), chunk by chunk of tasks, times `grad`; the random state before each chunk is
        recorded into or set from `states`. Returns the gradients in `fast`, in `tensors` and in the query
        features' leaves, and the (detached) weighted loss, (T,) query losses and predictions."""
        T = self.batch.num_tasks
        adjoint: list[Tensor | None] = [None] * (0 if fast is None else len(fast))
        meta: list[Tensor | None] = [None] * len(self.tensors)
        qacc: list[Tensor | None] = [None] * len(self.qleaves)
        total, losses, preds = None, [], []
        for i, c in enumerate(self.chunks):
            if states is not None and len(states) > i:
                self.rng.set(states[i])
            elif states is not None:
                states.append(self.rng.get())
            leaves = [] if fast is None else [f[c].detach().requires_grad_() for f in fast]
            inputs = leaves if fast is not None else [self.params[n] for n in self.adapted]
            pred, task_loss = self.query(self.params, inputs, self.qfeat_leaves, c)
            loss = weight * task_loss.sum() / T
            grads = _grad(loss, leaves + self.tensors + self.qleaves, grad)
            for j, g in enumerate(grads[: len(leaves)]):
                if g is not None:
                    if adjoint[j] is None:
                        adjoint[j] = torch.zeros_like(fast[j])
                    adjoint[j][c] = g
            _accumulate(meta, grads[len(leaves) : len(leaves) + len(self.tensors)])
            _accumulate(qacc, grads[len(leaves) + len(self.tensors) :])
            del grads
            total = loss.detach() if total is None else total + loss.detach()
            losses.append(task_loss.detach())
            preds.append(pred.detach())
        return adjoint, meta, qacc, total, torch.cat(losses), torch.cat(preds)

    def forward(self) -> Tensor:
        """The meta-loss, in the order of the plain step's random computations; the inner loop without a graph.
        The final query loss is differentiated here, chunk by chunk (as fused-loss kernels do): its graph is never
        alive for all tasks at once, and backward need not rebuild it (only scale its gradients)."""
        run, b, start, S = self.run, self.batch, self.start, self.steps
        p = {n: t.detach() for n, t in self.params.items()}
        self.qbody_state = self.rng.get()
        self.qfeat = run(p, b.query_x, 0, start) if start else b.query_x
        self.sbody_state = self.rng.get()
        self.sfeat = run(p, b.support_x, 0, start) if start else b.support_x
        # Leaves in the features the query losses start from (ANIL: the body's), to collect their adjoints.
        self.qfeat_leaves, self.qleaves = _activation_leaves(self.qfeat) if start else (self.qfeat, [])
        fast = [p[n] for n in self.adapted]
        self.step_states, self.query_states, self.checkpoints = [], {}, {}
        support_losses, loss = [], None
        for s in range(S):
            self.step_states.append(self.rng.get())
            fast, losses = _step(run, p, self.adapted, self.sfeat, b.support_y, start, self.lr(s, True), fast,
                                 self.loss_fn, False)  # fmt: skip
            support_losses.append(losses)
            if (s + 1) % self.every == 0 and s + 1 < S:
                self.checkpoints[s + 1] = fast
            if s < S - 1 and self.weights[s] != 0:
                states = self.query_states[s + 1] = []
                for c in self.chunks:
                    states.append(self.rng.get())
                    part = self.weights[s] * self.query(p, [f[c] for f in fast], self.qfeat, c)[1].sum() / b.num_tasks
                    loss = part if loss is None else loss + part
        with torch.enable_grad():
            *self.query_gradients, final, self.task_losses, self.pred = self.query_grads(
                fast if S else None, self.weights[-1], None, None
            )
        self.final_fast = fast
        self.support_losses = torch.stack(support_losses, 1) if support_losses else b.query_x.new_zeros(b.num_tasks, 0)
        return final if loss is None else loss + final

    def output(self, loss: Tensor) -> MAMLOutput:
        T = self.batch.num_tasks
        fast, self.final_fast = self.final_fast, None  # (backward does not need them: kept only by the caller)
        return MAMLOutput(
            loss=loss,
            task_losses=self.task_losses,
            accuracy=_accuracy(self.pred, self.batch.query_y),
            support_losses=self.support_losses,
            predictions=self.pred,
            fast_weights=_per_task_weights(self.params, self.adapted, fast, T),
        )

    def backward(self, grad: Tensor) -> list[Tensor | None]:
        """The meta-gradient of each of `tensors`, times `grad`."""
        run, b, start, S = self.run, self.batch, self.start, self.steps
        params, tensors = self.params, self.tensors
        detached = {n: t.detach() for n, t in params.items()}
        sfeat, sleaves = _activation_leaves(self.sfeat) if start else (self.sfeat, [])
        sacc: list[Tensor | None] = [None] * len(sleaves)
        # The final query loss's gradients, taken in forward for a gradient of 1 (scaled one at a time, each
        # replacing its unscaled one).
        adjoint, meta, qacc = self.query_gradients
        self.query_gradients = None
        for gs in (adjoint, meta, qacc):
            for i, g in enumerate(gs):
                gs[i] = None if g is None else g * grad

        def fast_at(fast: list[Tensor] | None) -> tuple[list[Tensor], list[Tensor]]:
            """(fast weights to compute with, leaves to differentiate): the parameters themselves at step 0."""
            if fast is None:
                return [params[n] for n in self.adapted], []
            leaves = [f.detach().requires_grad_() for f in fast]
            return leaves, leaves

        def query_adjoint(fast: list[Tensor], s: int) -> list[Tensor | None]:
            """Adds the query loss after step s (weighted) to the gradients; returns its gradient in `fast`."""
            adj, m, q = self.query_grads(fast, self.weights[s - 1], self.query_states[s], grad)[:3]
            _accumulate(meta, m)
            _accumulate(qacc, q)
            return adj

        with torch.enable_grad(), self.rng.fork():
            for a in reversed(range(0, S, self.every)):
                stop = min(a + self.every, S)
                # This segment's fast weights, recomputed without a graph from its checkpoint.
                states = {a: self.checkpoints.pop(a, None)}
                with torch.no_grad():
                    for s in range(a, stop - 1):
                        self.rng.set(self.step_states[s])
                        states[s + 1] = _step(run, detached, self.adapted, self.sfeat, b.support_y, start,
                                              self.lr(s, True), states[s] if s else [detached[n] for n in
                                              self.adapted], self.loss_fn, False)[0]  # fmt: skip
                for s in reversed(range(a, stop)):
                    inputs, leaves = fast_at(states.pop(s))
                    self.rng.set(self.step_states[s])
                    fast, _ = _step(run, params, self.adapted, sfeat, b.support_y, start, self.lr(s, False), inputs,
                                    self.loss_fn, not self.first_order)  # fmt: skip
                    del inputs
                    grads = _grad_dropping_outputs(fast, leaves + tensors + sleaves, adjoint)
                    _accumulate(meta, grads[len(leaves) : len(leaves) + len(tensors)])
                    _accumulate(sacc, grads[len(leaves) + len(tensors) :])
                    adjoint = list(grads[: len(leaves)])
                    if s and self.weights[s - 1] != 0:
                        _accumulate(adjoint, query_adjoint([leaf.detach() for leaf in leaves], s))
                    del grads, leaves
            # The layers before `start` (ANIL's body): run once more with a graph, fed the features' adjoints.
            outs, adjoints = [], []
            for x, acc, state in ((b.query_x, qacc, self.qbody_state), (b.support_x, sacc, self.sbody_state)):
                if start and any(g is not None for g in acc):
                    self.rng.set(state)
                    ys = _activation_tensors(run(params, x, 0, start))
                    outs += [y for y, g in zip(ys, acc) if g is not None and y.requires_grad]
                    adjoints += [g for y, g in zip(ys, acc) if g is not None and y.requires_grad]
            if outs:
                _accumulate(meta, _grad(outs, tensors, adjoints))
        return meta


class _SweptLoss(torch.autograd.Function):
    """The meta-loss of maml_step(recompute="steps"): a value in forward, the reverse sweep in backward."""

    @staticmethod
    def forward(ctx, sweep, *tensors):  # noqa: ANN001, ANN205
        ctx.sweep = sweep
        ctx.save_for_backward(*tensors)  # (backward's version check: no parameter changed in place meanwhile)
        return sweep.forward()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        _ = ctx.saved_tensors
        grads = ctx.sweep.backward(grad)
        ctx.sweep = None  # the stored fast weights and features
        return (None, *grads)


def _grad(
    outputs: Tensor | list[Tensor], inputs: list[Tensor], grad_outputs: Tensor | list[Tensor | None]
) -> tuple[Tensor | None, ...]:
    """autograd.grad, None for the inputs the outputs do not depend on; None in grad_outputs: no gradient."""
    if isinstance(outputs, list):
        pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if g is not None and o.requires_grad]
        outputs, grad_outputs = [o for o, _ in pairs], [g for _, g in pairs]
        if not outputs:
            return (None,) * len(inputs)
    if not inputs:
        return ()
    return torch.autograd.grad(outputs, inputs, grad_outputs, allow_unused=True)


def _grad_dropping_outputs(
    outputs: list[Tensor], inputs: list[Tensor], grad_outputs: list[Tensor | None]
) -> tuple[Tensor | None, ...]:
    """_grad(outputs, inputs, grad_outputs), `outputs` emptied first (their gradient edges kept), so that their
    memory goes before the gradients are computed: a step's new fast weights, which its backward does not read
    (T sets of the adapted parameters: 190 MB for ResNet-12 and 4 tasks)."""
    pairs = [(get_gradient_edge(o), g) for o, g in zip(outputs, grad_outputs) if g is not None and o.requires_grad]
    outputs.clear()
    if not inputs:
        return ()
    if not pairs:
        return (None,) * len(inputs)
    return torch.autograd.grad([e for e, _ in pairs], inputs, [g for _, g in pairs], allow_unused=True)


def _accumulate(total: list[Tensor | None], grads: Sequence[Tensor | None]) -> None:
    for i, g in enumerate(grads):
        if g is not None:
            total[i] = g if total[i] is None else total[i] + g


def _map_tensors(x: object, fn: Callable[[Tensor], Tensor]) -> object:
    """x (a runner's activation: a tensor, a list of them, or an object holding them) with fn applied to each
    floating-point tensor in it, in a fixed order."""
    if isinstance(x, Tensor):
        return fn(x) if x.is_floating_point() or x.is_complex() else x
    if type(x) in (list, tuple):
        return type(x)(_map_tensors(v, fn) for v in x)
    if hasattr(x, "__dict__"):
        out = copy.copy(x)
        for k, v in vars(x).items():
            setattr(out, k, _map_tensors(v, fn))
        return out
    return x


def _activation_tensors(x: object) -> list[Tensor]:
    found: list[Tensor] = []
    _map_tensors(x, lambda t: found.append(t) or t)
    return found


def _activation_leaves(x: object) -> tuple[object, list[Tensor]]:
    """x with each of its tensors replaced by a detached copy that requires grad, and those leaves."""
    leaves: list[Tensor] = []

    def leaf(t: Tensor) -> Tensor:
        leaves.append(t.detach().requires_grad_())
        return leaves[-1]

    out = _map_tensors(x, leaf)
    if not leaves:
        raise TypeError(f"maml_step(recompute='steps'): found no tensor in the runner's {type(x).__name__} output")
    return out, leaves


class _RNG:
    """The random state of the CPU and of `device`: saved before random computations, set again to redo them."""

    def __init__(self, device: torch.device) -> None:
        self.device = None if device.type == "cpu" else device
        self.module = getattr(torch, device.type, None) if self.device is not None else None
        if self.module is not None and not hasattr(self.module, "get_rng_state"):
            self.module = None

    def get(self) -> tuple[Tensor, Tensor | None]:
        return torch.get_rng_state(), None if self.module is None else self.module.get_rng_state(self.device)

    def set(self, state: tuple[Tensor, Tensor | None]) -> None:
        torch.set_rng_state(state[0])
        if self.module is not None:
            self.module.set_rng_state(state[1], self.device)

    def fork(self) -> contextlib.AbstractContextManager:
        """Restores the random state on exit, so that recomputing leaves the caller's random stream as it was."""
        if self.module is None:
            return torch.random.fork_rng(devices=[])
        return torch.random.fork_rng(devices=[self.device], device_type=self.device.type)


# recompute=("steps", k) runs each chunk of k tasks as this: "steps" with the chunk's query losses in one piece.
_SWEEP_WHOLE_QUERY = object()


def _parse_recompute(recompute: object) -> tuple[bool, int | None]:
    """(sweep the inner steps, tasks per chunk or None) for maml_step's `recompute`."""
    if recompute is None:
        return False, None
    if isinstance(recompute, str) and recompute == "steps" or recompute is _SWEEP_WHOLE_QUERY:
        return True, None
    if isinstance(recompute, int) and not isinstance(recompute, bool):
        if recompute >= 1:
            return False, recompute
        raise ValueError(f"recompute must be an integer >= 1, got {recompute!r} (or 'steps', or ('steps', k))")
    if isinstance(recompute, tuple) and len(recompute) == 2 and recompute[0] == "steps":
        k = recompute[1]
        if isinstance(k, int) and not isinstance(k, bool) and k >= 1:
            return True, k
    raise ValueError(
        f"recompute must be an integer >= 1 (tasks per chunk), 'steps' or ('steps', k) with k >= 1, got {recompute!r}"
    )


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
) -> AdaptedModel:
    """Adapt `model` to T tasks (meta-testing): `inner_steps` steps on each support set (T, Ns, *x), (T, Ns, ...).

    Returns an `AdaptedModel` holding each task's fast weights; call it on (T, Nq, *x) queries. No graph to
    the model's parameters is kept, and the model is not modified. Arguments as in `maml_step`.
    """
    TaskBatch(support_x, support_y, support_x, support_y)  # shape checks
    _check_int("inner_steps", inner_steps, 0)
    run, params, adapted, lr_of = _prepare("adapt", model, support_x, inner_lr, adapt_params, strategy)
    with torch.no_grad():
        params = {n: p.detach() for n, p in params.items()}
        lr_of_detached = (lambda s: [lr.detach() for lr in lr_of(s)]) if isinstance(inner_lr, InnerLR) else lr_of
        start = run.split(set(adapted))
        fast = [params[n] for n in adapted]
        steps = _steps(run, params, adapted, support_x, support_y, start, lr_of_detached, inner_steps, loss_fn, False)
        losses = []
        for step_fast, step_losses in steps:
            fast = step_fast
            losses.append(step_losses)
        T = support_x.shape[0]
        fast_weights = _per_task_weights(params, adapted, fast, T)
        support_losses = torch.stack(losses, 1) if losses else support_x.new_zeros(T, 0)
    return AdaptedModel(run, params, fast_weights, start, support_losses)


def task_losses(loss_fn: LossFn, pred: Tensor, target: Tensor) -> Tensor:
    """(T,) loss_fn of each task: predictions (T, N, ...) against targets (T, N, ...)."""
    T = pred.shape[0]
    if loss_fn in _FLAT_LOSSES:
        flat = loss_fn(pred.flatten(0, 1), target.flatten(0, 1), reduction="none")
        if loss_fn in (F.cross_entropy, F.nll_loss) and not target.is_floating_point():
            valid = (target != -100).reshape(T, -1).sum(1)  # the default ignore_index leaves the mean
            return flat.reshape(T, -1).sum(1) / valid
        return flat.reshape(T, -1).mean(1)
    losses = [loss_fn(pred[t], target[t]) for t in range(T)]
    if losses and (not isinstance(losses[0], Tensor) or losses[0].dim() != 0):
        raise ValueError(f"loss_fn must return one 0-d loss per task, got {_describe(losses[0])}")
    return torch.stack(losses) if losses else pred.new_zeros(0)


def adapted_names(model: nn.Module, adapt_params: Iterable[str] | Callable[[str], bool] | None) -> list[str]:
    """The names of the parameters of `model` selected by `adapt_params` (names, module prefixes or a predicate;
    None: all that require grad), in the model's order."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise TypeError(
            "model is a DistributedDataParallel, which synchronises gradients only through its own forward: pass "
            "the module inside (model.module) and call fastmeta.distributed.all_reduce_gradients after backward, "
            "or wrap in DDP a module whose forward runs the meta-step (see fastmeta.distributed)"
        )
    all_names = [n for n, _ in model.named_parameters()]
    if adapt_params is None:
        names = [n for n, p in model.named_parameters() if p.requires_grad]
    elif callable(adapt_params):
        names = [n for n in all_names if adapt_params(n)]
    else:
        if isinstance(adapt_params, str):
            adapt_params = [adapt_params]
        wanted = list(adapt_params)
        names = [n for n in all_names if any(n == w or n.startswith(w.rstrip(".") + ".") for w in wanted)]
        unknown = [w for w in wanted if not any(n == w or n.startswith(w.rstrip(".") + ".") for n in all_names)]
        if unknown:
            raise ValueError(f"adapt_params: no parameter named or under {unknown}; the model has {all_names}")
    if not names:
        raise ValueError(f"adapt_params selects no parameter to adapt; the model has {all_names}")
    return names


def _prepare(
    fn: str,
    model: nn.Module,
    x: Tensor,
    inner_lr: float | InnerLR,
    adapt_params: Iterable[str] | Callable[[str], bool] | None,
    strategy: str,
) -> tuple[Runner, dict[str, Tensor], list[str], Callable[[int], float | list[Tensor]]]:
    if isinstance(inner_lr, InnerLR):
        adapted = adapted_names(model, inner_lr.names if adapt_params is None else adapt_params)
        if adapted != inner_lr.names:
            raise ValueError(
                f"{fn}: inner_lr was built for parameters {inner_lr.names} but adapt_params selects {adapted}"
            )
        lr_of: Callable[[int], float | list[Tensor]] = inner_lr
    elif isinstance(inner_lr, (int, float)) and not isinstance(inner_lr, bool):
        adapted = adapted_names(model, adapt_params)
        lr = float(inner_lr)
        lr_of = lambda s: lr  # noqa: E731
    else:
        raise TypeError(f"{fn}: inner_lr must be a number or an InnerLR module, got {type(inner_lr).__name__}")
    params = dict(model.named_parameters())
    p0 = params[adapted[0]]
    if x.device != p0.device:
        raise ValueError(f"{fn}: the tasks are on {x.device} but the model's parameters are on {p0.device}")
    return runner(model, strategy), params, adapted, lr_of


def _steps(
    run: Runner,
    params: dict[str, Tensor],
    adapted: list[str],
    x: Tensor,
    y: Tensor,
    start: int,
    lr_of: Callable[[int], float | list[Tensor]],
    inner_steps: int,
    loss_fn: LossFn,
    create_graph: bool,
) -> Iterator[tuple[list[Tensor], Tensor]]:
    """Yields (fast weights, (T,) support losses before the step) after each inner step."""
    feat = run(params, x, 0, start) if start else x
    fast = [params[n] for n in adapted]
    for s in range(inner_steps):
        fast, losses = _step(run, params, adapted, feat, y, start, lr_of(s), fast, loss_fn, create_graph)
        yield fast, losses


def _step(
    run: Runner,
    params: dict[str, Tensor],
    adapted: list[str],
    feat: object,
    y: Tensor,
    start: int,
    lr: float | list[Tensor],
    fast: list[Tensor],
    loss_fn: LossFn,
    create_graph: bool,
) -> tuple[list[Tensor], Tensor]:
    """One inner step of all T tasks from `fast` (shared S_i initial weights or per-task (T, *S_i) ones) on the
    support features `feat` (the output of layers :start): (new (T, *S_i) fast weights, (T,) support losses
    before the step, detached)."""
    T = y.shape[0]
    with torch.enable_grad():
        inputs = [f if f.dim() > params[n].dim() else f.expand(T, *f.shape) for n, f in zip(adapted, fast)]
        inputs = [i if i.requires_grad else i.detach().requires_grad_() for i in inputs]
        pred = run({**params, **dict(zip(adapted, inputs))}, feat, start, twice=create_graph)
        losses = task_losses(loss_fn, tasks_first(pred), y)
        grads = torch.autograd.grad(
            losses.sum(), inputs, create_graph=create_graph, allow_unused=True, materialize_grads=True
        )
    return ops.fast_weight_update(fast, grads, lr), losses.detach()


def _check_int(name: str, value: object, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _describe(x: object) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
