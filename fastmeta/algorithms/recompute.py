"""How maml_step computes its meta-loss over T tasks: `meta_step` runs the plain step (one graph through every
task's inner steps and query loss) or, under maml_step's `recompute`, the same loss and meta-gradient in less
memory.

recompute (maml_step's argument): the same loss and meta-gradient (to the model's parameters and a learned
inner_lr), but only `loss` is differentiable, once, and (part of) its gradient is computed during the call, so
call it to train; task_losses, predictions and fast_weights come back detached. Under torch.no_grad the plain
step runs. Dropout and other randomness draw the same numbers when recomputed as in forward (the RNG state is
saved and restored).

- k (an integer): the step runs k tasks at a time, each chunk differentiated as soon as its loss is computed (its
  gradients kept, scaled in backward; its graph freed before the next chunk's): peak memory of one chunk's graph
  instead of all T's, and nothing computed twice (`_ChunkedLoss`).
- "steps": second-order memory that does not grow with inner_steps (`_StepSweep`). The inner loop runs without a
  graph, keeping the fast weights of every ceil(sqrt(inner_steps))-th step (`_checkpoint_interval`); the final
  query loss is differentiated in forward already (its gradients kept, its graph freed), in chunks of tasks with
  at most as many query examples as the support sets of all tasks hold (`_query_chunks`: one task for 75 queries
  against 5-image support sets). Backward sweeps the steps in reverse, rebuilding one step's graph at a time (the
  steps between two kept ones recomputed without a graph first) and taking its vector-Jacobian product with the
  adjoint of the step's output fast weights: the adjoint of its input fast weights and the gradients of the
  learned rates and of the shared (non-adapted) parameters. Peak: one step's graph or one query chunk's,
  whichever is larger, plus about 2 * sqrt(inner_steps) sets of fast weights. Costs about two more inner loops
  without a graph (with multi_step_weights, one more query forward per weighted intermediate step). Random layers
  in the query draw per chunk, so with dropout the loss is not the plain step's for the same seed (it is exact
  for the masks drawn).
- ("steps", k): both: chunks of k tasks (as k), each swept over its steps (as "steps") with the k tasks' query
  losses in one piece.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fastmeta.algorithms._graph import (
    RNG,
    accumulate,
    activation_leaves,
    activation_tensors,
    grad,
    grad_dropping_outputs,
)
from fastmeta.algorithms.common import per_task_fast_weights as _per_task_weights
from fastmeta.algorithms.common import query_accuracy as _accuracy
from fastmeta.algorithms.inner import MAMLOutput, PreparedLoop, _step, task_losses
from fastmeta.data import TaskBatch

__all__ = ["meta_step", "parse_recompute"]

Grads = list[Tensor | None]


def parse_recompute(recompute: object) -> tuple[bool, int | None]:
    """(sweep the inner steps, tasks per chunk or None) for maml_step's `recompute`."""
    if recompute is None:
        return False, None
    if isinstance(recompute, str) and recompute == "steps":
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


def meta_step(
    at: PreparedLoop, batch: TaskBatch, weights: Tensor | None, sweep: bool = False, chunk: int | None = None
) -> MAMLOutput:
    """maml_step's output for `batch` with the inner loop `at`: the multi-step loss `weights` ((inner_steps,)
    float64 on the CPU, or None: the final query loss only); sweep, chunk: `parse_recompute`'s reading of
    `recompute` (the module docstring). Under torch.no_grad, the plain step."""
    if torch.is_grad_enabled() and chunk is not None and chunk < batch.num_tasks:
        return _in_chunks(at, batch, weights, sweep, chunk)
    if torch.is_grad_enabled() and sweep:
        return _swept(at, batch, weights)
    return _plain(at, batch, weights)


def _plain(at: PreparedLoop, batch: TaskBatch, weights: Tensor | None) -> MAMLOutput:
    """The plain step: every task's inner steps and query losses in one graph (second order unless first_order
    or under no_grad)."""
    T, S = batch.num_tasks, at.loop.inner_steps
    qfeat = at.features(batch.query_x)

    def query(fast: list[Tensor], step: int | None = None) -> tuple[Tensor, Tensor]:
        pred = at.predict(fast, qfeat, step)
        return pred, task_losses(at.loop.loss_fn, pred, batch.query_y)

    create_graph = torch.is_grad_enabled() and not at.loop.first_order
    sfeat, fast, state = at.features(batch.support_x), at.initial(), at.initial_state()
    support_losses, loss = [], None
    for s in range(S):
        fast, losses = _step(at, sfeat, batch.support_y, s, fast, create_graph, state)
        support_losses.append(losses)
        if weights is not None and s < S - 1 and weights[s] != 0:
            loss = float(weights[s]) * query(fast, s)[1].mean() + (0 if loss is None else loss)
    pred, per_task = query(fast)
    final = per_task.mean()
    if weights is not None:
        final = float(weights[-1]) * final
    loss = final if loss is None else loss + final
    return MAMLOutput(
        loss=loss,
        task_losses=per_task,
        accuracy=_accuracy(pred, batch.query_y),
        support_losses=torch.stack(support_losses, 1) if support_losses else per_task.new_zeros(T, 0).detach(),
        predictions=pred.detach(),
        fast_weights=_per_task_weights(at.params, at.adapted, fast, T),
    )


def _in_chunks(at: PreparedLoop, batch: TaskBatch, weights: Tensor | None, sweep: bool, chunk: int) -> MAMLOutput:
    """maml_step `chunk` tasks at a time, each chunk differentiated as soon as its loss is computed (recompute=k;
    with `sweep`, each chunk swept over its steps with its query losses in one piece: recompute=("steps", k))."""
    T = batch.num_tasks
    chunks = [batch[lo : lo + chunk] for lo in range(0, T, chunk)]

    def run(sub: TaskBatch) -> MAMLOutput:
        return _swept(at, sub, weights, whole_query=True) if sweep else _plain(at, sub, weights)

    outs: list[MAMLOutput] = []
    loss = _ChunkedLoss.apply(run, chunks, outs, *at.meta_parameters())
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
        total: Grads = [None] * len(tensors)
        loss = None
        with torch.enable_grad():
            for sub in chunks:
                out = run(sub)
                part = out.loss * (sub.num_tasks / T)
                if part.requires_grad and tensors:
                    accumulate(total, torch.autograd.grad(part, tensors, allow_unused=True))
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


def _swept(at: PreparedLoop, batch: TaskBatch, weights: Tensor | None, whole_query: bool = False) -> MAMLOutput:
    """maml_step(recompute="steps"): the loss's value now, its meta-gradient by a reverse sweep in backward."""
    sweep = _StepSweep(at, batch, weights, whole_query)
    return sweep.output(_SweptLoss.apply(sweep, *sweep.tensors))


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
    chunk by chunk), to compute the meta-gradient.

    `at` computes with the parameters and rates (backward's rebuilt steps), `frozen` with them detached (the
    steps without a graph). whole_query: the query losses of all tasks in one chunk (inside recompute=("steps",
    k), where the plain step that gave the loss drew its random numbers so)."""

    def __init__(self, at: PreparedLoop, batch: TaskBatch, weights: Tensor | None, whole_query: bool = False) -> None:
        self.at, self.frozen, self.batch = at, at.detached(), batch
        S = self.steps = at.loop.inner_steps
        # weights[s]: the weight of the query loss after step s + 1 (the last: after all steps, or with no step).
        self.weights = [0.0] * max(S - 1, 0) + [1.0] if weights is None else weights.tolist()
        self.every = _checkpoint_interval(S)
        self.tensors = at.meta_parameters()  # what backward returns gradients for
        self.rng = RNG(batch.support_x.device)
        self.chunks = [slice(0, batch.num_tasks)] if whole_query else _query_chunks(batch, at.start)

    def query(
        self, at: PreparedLoop, fast: list[Tensor], qfeat: object, tasks: slice, step: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """(t, Nq, ...) predictions and (t,) query losses of the t tasks `tasks` (a chunk), with fast weights
        `fast` (those tasks' (t, *S_i), or shared) after inner step `step` (None: the last)."""
        x = qfeat if at.start else qfeat[tasks]  # (ANIL's features: one chunk of all tasks)
        pred = at.predict(fast, x, step)
        return pred, task_losses(at.loop.loss_fn, pred, self.batch.query_y[tasks])

    def query_grads(
        self,
        fast: list[Tensor] | None,
        weight: float,
        states: list | None,
        grad_out: Tensor | None,
        step: int | None = None,
    ) -> tuple[Grads, Grads, Grads, Tensor, Tensor, Tensor]:
        """Differentiates weight * (the mean query loss) with fast weights `fast` ((T, *S_i) each; None: the
        parameters themselves), chunk by chunk of tasks, times `grad_out`; the random state before each chunk is
        recorded into or set from `states`. Returns the gradients in `fast`, in `tensors` and in the query
        features' leaves, and the (detached) weighted loss, (T,) query losses and predictions."""
        T = self.batch.num_tasks
        adjoint: Grads = [None] * (0 if fast is None else len(fast))
        meta: Grads = [None] * len(self.tensors)
        qacc: Grads = [None] * len(self.qleaves)
        total, losses, preds = None, [], []
        for i, c in enumerate(self.chunks):
            if states is not None and len(states) > i:
                self.rng.set(states[i])
            elif states is not None:
                states.append(self.rng.get())
            leaves = [] if fast is None else [f[c].detach().requires_grad_() for f in fast]
            inputs = leaves if fast is not None else self.at.initial()
            pred, task_loss = self.query(self.at, inputs, self.qfeat_leaves, c, step)
            loss = weight * task_loss.sum() / T
            grads = grad(loss, leaves + self.tensors + self.qleaves, grad_out)
            for j, g in enumerate(grads[: len(leaves)]):
                if g is not None:
                    if adjoint[j] is None:
                        adjoint[j] = torch.zeros_like(fast[j])
                    adjoint[j][c] = g
            accumulate(meta, grads[len(leaves) : len(leaves) + len(self.tensors)])
            accumulate(qacc, grads[len(leaves) + len(self.tensors) :])
            del grads
            total = loss.detach() if total is None else total + loss.detach()
            losses.append(task_loss.detach())
            preds.append(pred.detach())
        return adjoint, meta, qacc, total, torch.cat(losses), torch.cat(preds)

    def forward(self) -> Tensor:
        """The meta-loss, in the order of the plain step's random computations; the inner loop without a graph.
        The final query loss is differentiated here, chunk by chunk (as fused-loss kernels do): its graph is never
        alive for all tasks at once, and backward need not rebuild it (only scale its gradients)."""
        frozen, b, S = self.frozen, self.batch, self.steps
        self.qbody_state = self.rng.get()
        self.qfeat = frozen.features(b.query_x)
        self.sbody_state = self.rng.get()
        self.sfeat = frozen.features(b.support_x)
        # Leaves in the features the query losses start from (ANIL: the body's), to collect their adjoints.
        self.qfeat_leaves, self.qleaves = activation_leaves(self.qfeat) if frozen.start else (self.qfeat, [])
        fast = frozen.initial()
        self.step_states, self.query_states, self.checkpoints = [], {}, {}
        support_losses, loss = [], None
        for s in range(S):
            self.step_states.append(self.rng.get())
            fast, losses = _step(frozen, self.sfeat, b.support_y, s, fast, False)
            support_losses.append(losses)
            if (s + 1) % self.every == 0 and s + 1 < S:
                self.checkpoints[s + 1] = fast
            if s < S - 1 and self.weights[s] != 0:
                states = self.query_states[s + 1] = []
                for c in self.chunks:
                    states.append(self.rng.get())
                    part = (
                        self.weights[s]
                        * self.query(frozen, [f[c] for f in fast], self.qfeat, c, s)[1].sum()
                        / b.num_tasks
                    )
                    loss = part if loss is None else loss + part
        with torch.enable_grad():
            *self.query_gradients, final, self.task_losses, self.pred = self.query_grads(
                fast if S else None, self.weights[-1], None, None
            )
        self.final_fast = fast
        self.support_losses = torch.stack(support_losses, 1) if support_losses else b.query_x.new_zeros(b.num_tasks, 0)
        return final if loss is None else loss + final

    def output(self, loss: Tensor) -> MAMLOutput:
        """maml_step's output, with `loss` the _SweptLoss of this sweep."""
        T = self.batch.num_tasks
        fast, self.final_fast = self.final_fast, None  # (backward does not need them: kept only by the caller)
        return MAMLOutput(
            loss=loss,
            task_losses=self.task_losses,
            accuracy=_accuracy(self.pred, self.batch.query_y),
            support_losses=self.support_losses,
            predictions=self.pred,
            fast_weights=_per_task_weights(self.at.params, self.at.adapted, fast, T),
        )

    def backward(self, grad_out: Tensor) -> Grads:
        """The meta-gradient of each of `tensors`, times `grad_out`."""
        at, frozen, b, S, tensors = self.at, self.frozen, self.batch, self.steps, self.tensors
        sfeat, sleaves = activation_leaves(self.sfeat) if at.start else (self.sfeat, [])
        sacc: Grads = [None] * len(sleaves)
        # The final query loss's gradients, taken in forward for a gradient of 1 (scaled one at a time, each
        # replacing its unscaled one).
        adjoint, meta, qacc = self.query_gradients
        self.query_gradients = None
        for gs in (adjoint, meta, qacc):
            for i, g in enumerate(gs):
                gs[i] = None if g is None else g * grad_out

        def fast_at(fast: list[Tensor] | None) -> tuple[list[Tensor], list[Tensor]]:
            """(fast weights to compute with, leaves to differentiate): the parameters themselves at step 0."""
            if fast is None:
                return at.initial(), []
            leaves = [f.detach().requires_grad_() for f in fast]
            return leaves, leaves

        def query_adjoint(fast: list[Tensor], s: int) -> Grads:
            """Adds the query loss after step s (weighted) to the gradients; returns its gradient in `fast`."""
            adj, m, q = self.query_grads(fast, self.weights[s - 1], self.query_states[s], grad_out, s - 1)[:3]
            accumulate(meta, m)
            accumulate(qacc, q)
            return adj

        with torch.enable_grad(), self.rng.fork():
            for a in reversed(range(0, S, self.every)):
                stop = min(a + self.every, S)
                # This segment's fast weights, recomputed without a graph from its checkpoint.
                states = {a: self.checkpoints.pop(a, None)}
                with torch.no_grad():
                    for s in range(a, stop - 1):
                        self.rng.set(self.step_states[s])
                        fast = states[s] if s else frozen.initial()
                        states[s + 1] = _step(frozen, self.sfeat, b.support_y, s, fast, False)[0]
                for s in reversed(range(a, stop)):
                    inputs, leaves = fast_at(states.pop(s))
                    self.rng.set(self.step_states[s])
                    fast, _ = _step(at, sfeat, b.support_y, s, inputs, not at.loop.first_order)
                    del inputs
                    grads = grad_dropping_outputs(fast, leaves + tensors + sleaves, adjoint)
                    accumulate(meta, grads[len(leaves) : len(leaves) + len(tensors)])
                    accumulate(sacc, grads[len(leaves) + len(tensors) :])
                    adjoint = list(grads[: len(leaves)])
                    if s and self.weights[s - 1] != 0:
                        accumulate(adjoint, query_adjoint([leaf.detach() for leaf in leaves], s))
                    del grads, leaves
            accumulate(meta, self.body_grads(qacc, sacc))
        return meta

    def body_grads(self, qacc: Grads, sacc: Grads) -> Grads:
        """The gradients in `tensors` of the layers before `start` (ANIL's body), run once more with a graph on the
        query and support sets and fed their features' adjoints `qacc` and `sacc` (all None without a body)."""
        b, outs, adjoints = self.batch, [], []
        for x, acc, state in ((b.query_x, qacc, self.qbody_state), (b.support_x, sacc, self.sbody_state)):
            if self.at.start and any(g is not None for g in acc):
                self.rng.set(state)
                ys = activation_tensors(self.at.features(x))
                outs += [y for y, g in zip(ys, acc) if g is not None and y.requires_grad]
                adjoints += [g for y, g in zip(ys, acc) if g is not None and y.requires_grad]
        return grad(outs, self.tensors, adjoints) if outs else [None] * len(self.tensors)


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
