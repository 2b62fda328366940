"""The inner loop the gradient-based learners share (maml_step, adapt, reptile_step; the Meta-LSTM reads its
task losses and output): its settings (`InnerLoop`), the learned inner rates (`InnerLR`, `MetaSGDLR`, `LSLR`),
the parameters that adapt, each task's loss, and one inner step of all T tasks at once.

    loop = InnerLoop(inner_lr=0.4, inner_steps=1)       # how each task adapts
    at = loop.prepare("maml_step", model, support_x)    # ... this model: its runner, parameters and rates
    fast, losses = _step(at, at.features(support_x), support_y, 0, at.initial(), create_graph=True)

`_step` runs one forward of the support sets through the model with per-task weights (see
`fastmeta.algorithms._batched`), one autograd.grad for all tasks, and one `fastmeta.ops.fast_weight_update` for
every adapted tensor of every task.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastmeta import ops
from fastmeta.algorithms._batched import BatchedModel, LoopModel, VmapModel, runner, tasks_first
from fastmeta.algorithms.inner_opt import SGD, InnerOptimizer, InnerState

__all__ = [
    "InnerLoop", "PreparedLoop", "MAMLOutput", "InnerLR", "MetaSGDLR", "LSLR", "PerStepBN", "LossFn", "AdaptParams",
    "task_losses", "adapted_names",
]  # fmt: skip

LossFn = Callable[[Tensor, Tensor], Tensor]
AdaptParams = Iterable[str] | Callable[[str], bool] | None
Runner = BatchedModel | LoopModel | VmapModel
LearningRate = float | list[Tensor]  # one inner step's rate: a number, or one tensor per adapted parameter

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


@dataclass
class MAMLOutput:
    """What maml_step (or meta_lstm_step) computed for a batch of T tasks.

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
        check_int("inner_steps", inner_steps, 1)
        self.names = adapted_names(model, params)
        ref = next(model.parameters())
        self.lrs = nn.Parameter(
            torch.full((inner_steps, len(self.names)), float(init), dtype=ref.dtype, device=ref.device)
        )

    def forward(self, step: int) -> list[Tensor]:
        return list(self.lrs[min(step, self.lrs.shape[0] - 1)].unbind(0))


class PerStepBN(nn.Module):
    """MAML++'s per-step batch-norm weights and biases (BNWB; Antoniou et al. 2019): every BatchNorm layer of
    `model` gets its affine weight and bias once per inner step, `rows` (inner_steps, C) each, initialised from
    the layer's own. They are meta-learned (train them with the meta-optimiser) and do not adapt in the inner
    loop: inner step s's support forward, and the query forward after it, use row s; steps past `inner_steps` (a
    longer adaptation at test) the last row. The layer's own weight and bias are then unused. (MAML++'s per-step
    running statistics, BNRS, change nothing here: their code normalises with batch statistics at every step,
    training and test, as fastmeta's inner loop does, and only tracks the running ones.)"""

    def __init__(self, model: nn.Module, inner_steps: int) -> None:
        super().__init__()
        check_int("PerStepBN: inner_steps", inner_steps, 1)
        layers = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.names = [f"{n}.{w}" for n, m in layers if m.affine for w in ("weight", "bias")]
        if not self.names:
            raise ValueError("PerStepBN: the model has no BatchNorm layer with affine weights")
        params = dict(model.named_parameters())
        self.rows = nn.ParameterList(
            [nn.Parameter(params[n].detach().unsqueeze(0).repeat(inner_steps, 1).clone()) for n in self.names]
        )
        self.inner_steps = inner_steps

    def forward(self, step: int) -> dict[str, Tensor]:
        """name -> the (C,) weight or bias that inner step `step` (0-based) uses."""
        i = min(max(step, 0), self.inner_steps - 1)
        return {n: r[i] for n, r in zip(self.names, self.rows)}

    def check(self, fn: str, model: nn.Module) -> None:
        """Raises naming `fn` unless these rows were made for `model`'s BatchNorm layers."""
        params = dict(model.named_parameters())
        wrong = [n for n, r in zip(self.names, self.rows) if n not in params or r.shape[1:] != params[n].shape]
        if wrong:
            raise ValueError(f"{fn}: per_step_bn was made for another model (its {wrong[0]!r} is not this model's)")


@dataclass(frozen=True)
class InnerLoop:
    """How each task adapts: `inner_steps` steps fast_weights <- fast_weights - inner_lr * grad of `loss_fn` on
    its support set, for the parameters `adapt_params` selects, the model run by `strategy` (the arguments of
    maml_step, adapt and reptile_step; see maml_step). first_order: the inner gradients are constants (FOMAML).
    inner_opt: the update rule (None: plain SGD; `fastmeta.SGD` with momentum, `fastmeta.Adam`). per_step_bn:
    MAML++'s per-step BatchNorm weights (`PerStepBN`; then those layers' weights do not adapt). Checks
    inner_steps and inner_opt on creation; `prepare` checks the rest against a model."""

    inner_lr: float | InnerLR = 0.4
    inner_steps: int = 1
    first_order: bool = False
    loss_fn: LossFn = F.cross_entropy
    adapt_params: AdaptParams = None
    strategy: str = "auto"
    inner_opt: InnerOptimizer | None = None
    per_step_bn: PerStepBN | None = None

    def __post_init__(self) -> None:
        check_int("inner_steps", self.inner_steps, 0)
        if self.per_step_bn is not None and not isinstance(self.per_step_bn, PerStepBN):
            raise TypeError(f"per_step_bn must be None or a fastmeta.PerStepBN, got {type(self.per_step_bn).__name__}")
        if self.inner_opt is not None and not isinstance(self.inner_opt, InnerOptimizer):
            raise TypeError(
                "inner_opt must be None, fastmeta.SGD(...) or fastmeta.Adam(...), got "
                f"{type(self.inner_opt).__name__} (a torch.optim optimizer updates the model, not the fast weights)"
            )
        if self.inner_opt == SGD():
            object.__setattr__(self, "inner_opt", None)  # plain SGD: the one-call step

    def prepare(self, fn: str, model: nn.Module, x: Tensor) -> PreparedLoop:
        """This loop on `model`, for tasks on x's device; `fn` names the caller in error messages. (Call it from
        the public function itself: the runner's warning about an unbatched model points two frames above.)"""
        inner_lr, bn = self.inner_lr, self.per_step_bn
        per_step = set() if bn is None else set(bn.names)
        if bn is not None:
            bn.check(fn, model)
        if isinstance(inner_lr, InnerLR):
            adapted = adapted_names(model, inner_lr.names if self.adapt_params is None else self.adapt_params)
            if adapted != inner_lr.names:
                raise ValueError(
                    f"{fn}: inner_lr was built for parameters {inner_lr.names} but adapt_params selects {adapted}"
                )
            lr_of: Callable[[int], LearningRate] = inner_lr
        elif isinstance(inner_lr, (int, float)) and not isinstance(inner_lr, bool):
            selects = self.adapt_params
            if selects is None and per_step:  # every parameter that requires grad but the per-step ones
                grads = {n for n, p in model.named_parameters() if p.requires_grad}
                selects = lambda n: n in grads and n not in per_step  # noqa: E731
            adapted = adapted_names(model, selects)
            lr = float(inner_lr)
            lr_of = lambda s: lr  # noqa: E731
        else:
            raise TypeError(f"{fn}: inner_lr must be a number or an InnerLR module, got {type(inner_lr).__name__}")
        both = per_step.intersection(adapted)
        if both:
            raise ValueError(
                f"{fn}: with per_step_bn the BatchNorm weights are per step and meta-learned, not adapted, but "
                f"{sorted(both)[0]!r} is selected to adapt (adapt_params or inner_lr's parameters)"
            )
        params = dict(model.named_parameters())
        p0 = params[adapted[0]]
        if x.device != p0.device:
            raise ValueError(f"{fn}: the tasks are on {x.device} but the model's parameters are on {p0.device}")
        run = runner(model, self.strategy)
        # layers that read a per-step weight run at every step, as the adapted ones do
        return PreparedLoop(self, run, params, adapted, lr_of, run.split(set(adapted) | per_step), bn)


@dataclass(frozen=True)
class PreparedLoop:
    """An InnerLoop ready to run on one model: its runner, its parameters (name -> tensor, as in the model),
    the names of those that adapt (in the model's order), the rate of each step, and `start`: the layers :start
    use no adapted parameter (ANIL's body), so they run once, not at every step. step_params(s): the parameters
    that differ by inner step (MAML++'s per-step BatchNorm weights), name -> tensor, or None."""

    loop: InnerLoop
    run: Runner
    params: dict[str, Tensor]
    adapted: list[str]
    lr_of: Callable[[int], LearningRate]
    start: int
    step_params: Callable[[int], dict[str, Tensor]] | None = None

    def params_at(self, step: int | None = None) -> dict[str, Tensor]:
        """The parameters inner step `step` (0-based; None: the last) computes with, before the fast weights."""
        if self.step_params is None:
            return self.params
        return {**self.params, **self.step_params(self.loop.inner_steps - 1 if step is None else step)}

    def detached(self) -> PreparedLoop:
        """The same loop with the parameters and the learned rates detached (an inner loop without a graph)."""
        lr_of, step_params = self.lr_of, self.step_params
        if isinstance(self.loop.inner_lr, InnerLR):
            lr_of = lambda s: [lr.detach() for lr in self.lr_of(s)]  # noqa: E731
        if step_params is not None:
            step_params = lambda s: {n: p.detach() for n, p in self.step_params(s).items()}  # noqa: E731
        params = {n: p.detach() for n, p in self.params.items()}
        return replace(self, params=params, lr_of=lr_of, step_params=step_params)

    def features(self, x: Tensor) -> object:
        """The input of the adapted layers for x (T, N, *x): the output of layers :start (x itself if none)."""
        return self.run(self.params, x, 0, self.start) if self.start else x

    def initial(self) -> list[Tensor]:
        """The adapted parameters themselves (S_i each, shared by all tasks): the fast weights before step 0."""
        return [self.params[n] for n in self.adapted]

    def initial_state(self) -> InnerState | None:
        """The tasks' inner optimiser state before step 0 (None: plain SGD, or a rule that keeps none)."""
        opt = self.loop.inner_opt
        return None if opt is None else opt.init([p.detach() for p in self.initial()])

    def meta_parameters(self) -> list[Tensor]:
        """What the meta-gradient reaches: the parameters that require grad, then a learned inner_lr's."""
        tensors = [p for p in self.params.values() if p.requires_grad]
        if isinstance(self.loop.inner_lr, InnerLR):
            tensors += [p for p in self.loop.inner_lr.parameters() if p.requires_grad]
        if self.loop.per_step_bn is not None:
            tensors += [p for p in self.loop.per_step_bn.parameters() if p.requires_grad]
        return tensors

    def predict(self, fast: list[Tensor], feat: object, step: int | None = None) -> Tensor:
        """(T, N, ...) predictions from the features `feat` (see `features`) with fast weights `fast`, those after
        inner step `step` (0-based; None: the last; it picks the per-step parameters)."""
        p = {**self.params_at(step), **dict(zip(self.adapted, fast))}
        return tasks_first(self.run(p, feat, self.start))


def _step(
    at: PreparedLoop,
    feat: object,
    y: Tensor,
    s: int,
    fast: list[Tensor],
    create_graph: bool,
    state: InnerState | None = None,
    lam: float = 0.0,
) -> tuple[list[Tensor], Tensor]:
    """Inner step `s` of all T tasks from `fast` (shared S_i initial weights or per-task (T, *S_i) ones) on the
    support features `feat` (`at.features` of the support sets) and targets y (T, Ns, ...): (new (T, *S_i) fast
    weights, (T,) support losses before the step, detached). create_graph: keep the step differentiable.
    state: the inner optimiser's (`at.initial_state()` before step 0), advanced in place. lam: the step is on
    the support loss plus the proximal term lam/2 ||fast - initial||^2 (iMAML's inner problem)."""
    T = y.shape[0]
    lr = at.lr_of(s)
    with torch.enable_grad():
        inputs = [f if f.dim() > at.params[n].dim() else f.expand(T, *f.shape) for n, f in zip(at.adapted, fast)]
        inputs = [i if i.requires_grad else i.detach().requires_grad_() for i in inputs]
        pred = at.run({**at.params_at(s), **dict(zip(at.adapted, inputs))}, feat, at.start, twice=create_graph)
        losses = task_losses(at.loop.loss_fn, tasks_first(pred), y)
        grads = torch.autograd.grad(
            losses.sum(), inputs, create_graph=create_graph, allow_unused=True, materialize_grads=True
        )
    if lam:
        grads = [g + lam * (f - c) for g, f, c in zip(grads, fast, at.initial())]
    if at.loop.inner_opt is None:
        return ops.fast_weight_update(fast, grads, lr), losses.detach()
    return at.loop.inner_opt.step(fast, grads, lr, state, s), losses.detach()


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
        raise ValueError(f"loss_fn must return one 0-d loss per task, got {describe(losses[0])}")
    return torch.stack(losses) if losses else pred.new_zeros(0)


def adapted_names(model: nn.Module, adapt_params: AdaptParams) -> list[str]:
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


def check_int(name: str, value: object, minimum: int) -> None:
    """ValueError unless value is an integer (not a bool) >= minimum."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def describe(x: object) -> str:
    """A tensor's shape or an object's type, for error messages."""
    return f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
