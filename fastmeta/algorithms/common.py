"""What several learners share: per-task query accuracy, the per-task fast-weight dict, the output of the
learners that classify each query by its logits over the episode's classes, and the shape of a learner's
declaration (Learner, Option) with the options several learners read."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastmeta.data import TaskBatch

__all__ = [
    "ClassificationOutput",
    "INIT_LR",
    "ProtoOutput",
    "classification_output",
    "query_accuracy",
    "per_task_fast_weights",
    "Learner",
    "Option",
    "zero_head",
]


def query_accuracy(pred: Tensor, target: Tensor) -> Tensor | None:
    """(T,) each task's query accuracy, for classification (predictions (T, N, C), class indices (T, N)); else
    None (regression)."""
    if pred.dim() == 3 and target.dim() == 2 and not target.is_floating_point() and not target.is_complex():
        return (pred.detach().argmax(-1) == target).to(pred.dtype).mean(1)
    return None


def per_task_fast_weights(
    params: dict[str, Tensor], adapted: list[str], fast: list[Tensor], T: int
) -> dict[str, Tensor]:
    """name -> (T, *S): the fast weights, the shared initial ones expanded where no step was taken."""
    return {n: f if f.dim() > params[n].dim() else f.expand(T, *f.shape) for n, f in zip(adapted, fast)}


@dataclass
class ClassificationOutput:
    """What a learner that scores each query against the episode's classes computed for T tasks (prototypical,
    matching and Siamese networks, SNAIL).

    loss: mean query loss over the tasks (0-d, differentiable). task_losses: (T,), differentiable.
    accuracy: (T,) query accuracy. logits: (T, Nq, n_way) the query scores (detached; for protonet the
    negative squared distances to the prototypes).
    """

    loss: Tensor
    task_losses: Tensor
    accuracy: Tensor
    logits: Tensor


ProtoOutput = ClassificationOutput  # its first user's name, kept: public API


def classification_output(logits: Tensor, query_y: Tensor, losses: Tensor | None = None) -> ClassificationOutput:
    """The ClassificationOutput of query logits (T, Nq, C) against query_y (T, Nq): per-task mean cross-entropy
    (or the given per-task `losses`), their mean, accuracy, and the detached logits."""
    T, Nq, C = logits.shape
    if losses is None:
        per_example = F.cross_entropy(logits.reshape(T * Nq, C), query_y.reshape(-1).long(), reduction="none")
        losses = per_example.view(T, Nq).mean(1)
    accuracy = (logits.detach().argmax(-1) == query_y).float().mean(1)
    return ClassificationOutput(losses.mean(), losses, accuracy, logits.detach())


# --- learner declarations -----------------------------------------------------------------------------------
# A learner is one record: its name, the options it reads, how it builds its model, its training objective, its
# test-time prediction and its hooks around the optimiser step. fastmeta.train and the command line loop over
# these records (fastmeta.algorithms.LEARNERS) and name no learner.

Settings = Any  # a fastmeta.train.RunConfig: the run's settings, and the learner's options as attributes
Objective = Callable[[Settings, nn.Module, "nn.Module | None", TaskBatch], Any]
Predict = Callable[[Settings, nn.Module, "nn.Module | None", TaskBatch, int], Tensor]
Build = Callable[[Settings, nn.Module], "tuple[nn.Module, nn.Module | None]"]


@dataclass(frozen=True)
class Option:
    """A setting a learner reads: `--name` on the command line (dashes for underscores), `config.name` in the
    learner's code. default: for every dataset but those of a domain in per_domain (a dataset's domain:
    fastmeta.data.registry.DOMAINS, "functions", "characters" or "natural"). valid, bound: a check and its text
    ("must be {bound}"). A bool option is a flag. same_result: it changes how the run computes, not what it
    trains (a resumed run may change it)."""

    name: str
    type: type
    help: str
    default: object = None
    per_domain: dict[str, object] = field(default_factory=dict)
    choices: tuple | None = None
    valid: Callable[[Any], bool] | None = None
    bound: str = ""
    metavar: str | None = None
    same_result: bool = False

    def default_for(self, domain: str) -> object:
        """Its default for the datasets of `domain`."""
        return self.per_domain.get(domain, self.default)

    def but(self, **changes: object) -> Option:
        """This option with other defaults, help or bounds (e.g. Reptile's inner rate)."""
        return replace(self, **changes)

    def check(self, value: object) -> None:
        """Raises ValueError naming the option unless `value` is of its type, finite and within its bounds."""
        if value is None:
            return
        if self.type is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, self.type) or (self.type is int and isinstance(value, bool)):
            raise ValueError(f"{self.name} must be a {self.type.__name__}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{self.name} must be a finite number, got {value}")
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"{self.name} must be one of {', '.join(map(str, self.choices))}; got {value!r}")
        if self.valid is not None and not self.valid(value):
            raise ValueError(f"{self.name} must be {self.bound}, got {value}")


def _same(config: Settings, model: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    return model, None


@dataclass(frozen=True)
class Learner:
    """One learner's declaration (see fastmeta/algorithms/*.py for each, README "Adding a learner").

    options: what it reads beyond the run's settings (fastmeta.train.RunConfig), with defaults.
    objective(config, model, aux, batch): the training objective of one meta-batch, an output with `.loss`
        (differentiable; the loop backpropagates it) and `.accuracy` ((T,) or None), or, with
        writes_gradient, one that has put the meta-gradient into `.grad` itself and has `.task_losses`.
    predict(config, model, aux, batch, inner_steps): test-time query predictions (T, Nq, ...), adapting with
        `inner_steps` where the learner adapts (it sets its own grad mode; nothing it returns needs a graph).
    build(config, backbone): the model it trains around the backbone (e.g. a wrapper) and a second module it
        learns (`aux`: Meta-SGD's rates, matching networks' FCE), or None.
    head: the backbone ends in an n_way linear head (False: an embedding network).
    tasks: "regression" and/or "classification": the datasets it runs on.
    defaults: per dataset domain ("functions", "characters", "natural"), run settings other than the dataset's
        own (e.g. fewer tasks per meta-batch).
    optimizer: "adam" or "sgd" (Reptile's outer step). schedule: the meta learning rate's default schedule.
    after_backward(config, params): between the meta-gradient (summed over processes) and the optimiser step.
    after_step(config, model): after the optimiser step.
    built_for: episode settings its model is built for ("n_way", "k_shot"), each with why: eval refuses others.
    renamed: options renamed since checkpoints were written, old name -> new (old checkpoints load; the old
        flag is an error that names the new one).
    batches: what it trains on: "episodes" (TaskBatch meta-batches) or "classes" (fastmeta.data.LabeledBatch
        mini-batches of `config.batch_size` examples of every training class, the pretrained baselines).
    initialize(config, model, aux): once, before a new run's first step (not on --resume), e.g. loading a
        pretrained backbone.
    """

    name: str
    summary: str
    objective: Objective
    predict: Predict
    options: tuple[Option, ...] = ()
    build: Build = _same
    head: bool = True
    tasks: tuple[str, ...] = ("regression", "classification")
    defaults: dict[str, dict[str, object]] = field(default_factory=dict)
    optimizer: str = "adam"
    schedule: str = "constant"
    writes_gradient: bool = False
    after_backward: Callable[[Settings, list[Tensor]], None] | None = None
    after_step: Callable[[Settings, nn.Module], None] | None = None
    built_for: dict[str, str] = field(default_factory=dict)
    renamed: dict[str, str] = field(default_factory=dict)
    batches: str = "episodes"
    initialize: Callable[[Settings, nn.Module, nn.Module | None], None] | None = None

    def __post_init__(self) -> None:
        if self.batches not in ("episodes", "classes"):
            raise ValueError(f"learner {self.name}: batches must be 'episodes' or 'classes', got {self.batches!r}")

    def option(self, name: str) -> Option | None:
        return next((o for o in self.options if o.name == name), None)

    @property
    def adapts(self) -> bool:
        """Whether it adapts to each task by steps at test time (reads eval_inner_steps)."""
        return self.option("eval_inner_steps") is not None


# Options several learners read: declared once, adjusted per learner with Option.but. On natural images
# (mini-ImageNet and the other RGB datasets) MAML's inner loop is Finn et al.'s there (rate 0.01, 5 steps in
# training, 10 at test), not Omniglot's single step at 0.4.
INNER_LR = Option(
    "inner_lr", float, "inner-loop learning rate", default=0.4, per_domain={"functions": 0.01, "natural": 0.01},
    valid=lambda v: v >= 0, bound=">= 0",
)  # fmt: skip
INNER_STEPS = Option(
    "inner_steps", int, "inner steps per task in meta-training", default=1, per_domain={"natural": 5},
    valid=lambda v: v >= 0, bound=">= 0",
)  # fmt: skip
EVAL_INNER_STEPS = Option(
    "eval_inner_steps", int, "inner steps per task at validation and test (eval --inner-steps overrides)",
    default=3, per_domain={"functions": 1, "natural": 10}, valid=lambda v: v >= 0, bound=">= 0",
)  # fmt: skip
INIT_LR = Option(
    "init_lr", float, "initial value of the learned inner-loop rates", default=0.4,
    per_domain={"functions": 0.01, "natural": 0.01}, valid=lambda v: v >= 0, bound=">= 0",
)  # fmt: skip
TRAIN_SHOT = Option(
    "train_shot", int, "support examples per class in training episodes (default: --k-shot; validation uses "
    "--k-shot)", valid=lambda v: v >= 1, bound=">= 1",
)  # fmt: skip
TRAIN_WAY = Option(
    "train_way", int, "classes per training episode (default: --n-way)", valid=lambda v: v >= 1, bound=">= 1"
)
ZERO_HEAD = Option(
    "zero_head", bool, "the zeroing trick: every task adapts from a zero head (Kao et al. 2022)", default=False
)
INNER_OPT = Option(
    "inner_opt", str, "the inner loop's update rule, in training and at test: sgd, momentum (SGD, momentum 0.9) "
    "or adam (torch.optim.Adam's defaults); each task keeps its own state; the rate is --inner-lr",
    default="sgd", choices=("sgd", "momentum", "adam"),
)  # fmt: skip


def zero_head(model: nn.Module) -> None:
    """The zeroing trick (Kao et al. 2022, "MAML is a noisy contrastive learner in classification"): set the
    head's weight and bias to 0, as after every meta-update of a --zero-head run. Each task then adapts from a
    zero head: for cross-entropy its first inner step makes row c of the head inner_lr * (the mean support feature
    of class c minus 1/n_way times that of all classes), a prototype-like classifier, and the meta-gradient
    carries no noise from a random initial head."""
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Linear):
        raise ValueError(f"zero_head: the model needs a linear `head`, {type(model).__name__} has none")
    with torch.no_grad():
        head.weight.zero_()
        if head.bias is not None:
            head.bias.zero_()


def zero_head_after_step(config: Settings, model: nn.Module) -> None:
    """--zero-head's hook: the head back to 0 after every meta-update."""
    if config.zero_head:
        zero_head(model)
