"""The declarations of MAML (second order), first-order MAML, Meta-SGD, ANIL, MAML++ and the joint-training
baseline: how fastmeta.train builds, trains and tests each (the algorithm itself is in fastmeta.algorithms.maml)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastmeta.algorithms.common import (
    EVAL_INNER_STEPS,
    INIT_LR,
    INNER_LR,
    INNER_OPT,
    INNER_STEPS,
    TRAIN_SHOT,
    ZERO_HEAD,
    Learner,
    Option,
    Settings,
    zero_head,
    zero_head_after_step,
)
from fastmeta.algorithms.inner import LSLR, MAMLOutput, MetaSGDLR, PerStepBN
from fastmeta.algorithms.inner_opt import inner_opt_of
from fastmeta.algorithms.maml import adapt, maml_step, msl_weights
from fastmeta.data import TaskBatch

__all__ = [
    "MAML", "FOMAML", "METASGD", "ANIL", "MAMLPP", "PRETRAIN", "GRADIENT_OPTIONS", "RECOMPUTE", "recompute_of",
    "predict_by_adapting", "build_with_head", "mamlpp_settings", "MAMLPPState",
]  # fmt: skip

# What a learner that adapts a network with a head by gradient steps reads.
GRADIENT_OPTIONS = (INNER_LR, INNER_STEPS, EVAL_INNER_STEPS, TRAIN_SHOT, ZERO_HEAD, INNER_OPT)


def recompute_of(text: str) -> int | str | tuple[str, int] | None:
    """maml_step's `recompute` from the command line's --recompute: none, steps, k or steps,k."""
    text = text.strip()
    if text == "none":
        return None
    if text == "steps":
        return "steps"
    steps, _, k = text.rpartition(",")
    if steps.strip() not in ("", "steps") or not k.strip().isdigit() or int(k) < 1:
        raise ValueError(f"recompute must be none, steps, an integer k >= 1 or steps,k; got {text!r}")
    return ("steps", int(k)) if steps.strip() else int(k)


def _valid_recompute(text: str) -> bool:
    try:
        recompute_of(text)
    except ValueError:
        return False
    return True


RECOMPUTE = Option(
    "recompute", str, "save memory in meta-training, the same meta-gradient (maml_step's recompute): steps "
    "(one inner step's graph at a time: memory flat in --inner-steps), k (k tasks' graph at a time, no extra "
    "time), steps,k (both) or none", default="none", valid=_valid_recompute,
    bound="none, steps, an integer k >= 1 or steps,k", metavar="none|steps|K|steps,K", same_result=True,
)  # fmt: skip


def _inner_lr(config: Settings, aux: nn.Module | None) -> float | nn.Module:
    """Meta-SGD's learned rates where the run has them, else the fixed inner_lr."""
    return config.inner_lr if aux is None else aux


def predict_by_adapting(
    config: Settings,
    model: nn.Module,
    aux: nn.Module | None,
    batch: TaskBatch,
    inner_steps: int,
    adapt_params: list[str] | None = None,
) -> Tensor:
    """Query predictions after `inner_steps` gradient steps on each task's support set (of the parameters
    `adapt_params` names; None: all)."""
    lr = _inner_lr(config, aux)
    adapted = adapt(model, batch.support_x, batch.support_y, lr, inner_steps, config.loss_fn, adapt_params=adapt_params)
    with torch.no_grad():
        return adapted(batch.query_x)


def _predict_head_only(
    config: Settings, model: nn.Module, aux: nn.Module | None, batch: TaskBatch, inner_steps: int
) -> Tensor:
    return predict_by_adapting(config, model, aux, batch, inner_steps, adapt_params=["head"])


def build_with_head(config: Settings, backbone: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    """The backbone as it is, its head zeroed under --zero-head."""
    if config.zero_head:
        zero_head(backbone)
    return backbone, None


def _maml(first_order: bool, adapt_params: list[str] | None = None):  # noqa: ANN202
    def objective(config: Settings, model: nn.Module, aux: nn.Module | None, batch: TaskBatch) -> MAMLOutput:
        lr, recompute = _inner_lr(config, aux), recompute_of(config.recompute)
        return maml_step(
            model, batch, lr, config.inner_steps, first_order, config.loss_fn, adapt_params=adapt_params,
            recompute=recompute, inner_opt=inner_opt_of(config.inner_opt),
        )  # fmt: skip

    return objective


def _build_metasgd(config: Settings, backbone: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    model, _ = build_with_head(config, backbone)
    return model, MetaSGDLR(model, init=config.init_lr)


def _pretrain(config: Settings, model: nn.Module, aux: nn.Module | None, batch: TaskBatch) -> MAMLOutput:
    """Joint training on every point of every task, no adaptation (Finn et al.'s baseline)."""
    x = torch.cat([batch.support_x, batch.query_x], 1)
    y = torch.cat([batch.support_y, batch.query_y], 1)
    every_point = type(batch)(batch.support_x, batch.support_y, x, y)
    return maml_step(model, every_point, config.inner_lr, 0, False, config.loss_fn)


def _gradient_learner(
    name: str,
    summary: str,
    first_order: bool = False,
    build=build_with_head,
    rate: Option = INNER_LR,  # noqa: ANN001
    head_only: bool = False,
) -> Learner:
    """A learner of the MAML family: maml_step in training, adaptation at test, the zeroing trick's hook.
    rate: the option that sets its inner rate (a fixed step size, or the initial value of learned ones).
    head_only: only the head adapts in the inner loop (ANIL); the body is shared by the tasks."""
    options = tuple(rate if o is INNER_LR else o for o in GRADIENT_OPTIONS)
    return Learner(
        name=name,
        summary=summary,
        options=(*options, RECOMPUTE),
        objective=_maml(first_order=first_order, adapt_params=["head"] if head_only else None),
        predict=_predict_head_only if head_only else predict_by_adapting,
        build=build,
        after_step=zero_head_after_step,
        renamed={} if rate is INNER_LR else {"inner_lr": rate.name},
    )


MAML = _gradient_learner("maml", "MAML (Finn et al. 2017), second order")
FOMAML = _gradient_learner("fomaml", "first-order MAML", first_order=True)
METASGD = _gradient_learner(
    "metasgd",
    "Meta-SGD (Li et al. 2017): learned per-element inner rates, starting at --init-lr",
    build=_build_metasgd,
    rate=INIT_LR,
)
ANIL = _gradient_learner(
    "anil",
    "ANIL (Raghu et al. 2020): MAML, second order, with only the head adapted in the inner loop (the body's "
    "features are computed once per task)",
    head_only=True,
)
PRETRAIN = Learner(
    name="pretrain",
    summary="the joint-training baseline (regression): trained on all tasks' points at once, fine-tuned by "
    "--eval-inner-steps steps at test",
    options=(INNER_LR, EVAL_INNER_STEPS),
    objective=_pretrain,
    predict=predict_by_adapting,
    tasks=("regression",),
)


# --- MAML++ (Antoniou et al. 2019) ---------------------------------------------------------------------------


class MAMLPPState(nn.Module):
    """What MAML++ learns beside the model (a run's `aux`): `lslr`, per-layer per-step inner rates of the
    parameters that adapt, and `bn`, per-step BatchNorm weights and biases (`PerStepBN`); and `iteration`, the
    meta-steps taken (the annealing schedules read it; saved with the weights, kept on the host)."""

    def __init__(self, model: nn.Module, inner_steps: int, init_lr: float) -> None:
        super().__init__()
        self.bn = PerStepBN(model, inner_steps)
        adapted = [n for n, p in model.named_parameters() if p.requires_grad and n not in self.bn.names]
        self.lslr = LSLR(model, inner_steps, init_lr, params=adapted)
        self.iteration = 0

    def get_extra_state(self) -> dict:
        return {"iteration": self.iteration}

    def set_extra_state(self, state: dict) -> None:
        self.iteration = int(state["iteration"])


def mamlpp_settings(
    inner_steps: int, iteration: int, epoch_iterations: int, first_order_epochs: int, msl_epochs: int
) -> tuple[bool, Tensor | None]:
    """MAML++'s annealing at meta-step `iteration` (epochs of `epoch_iterations` meta-steps): (first order?,
    multi-step loss weights (inner_steps,) or None). Derivative-order annealing: first order during the first
    `first_order_epochs` epochs; the multi-step loss (`msl_weights`) during the first `msl_epochs`, then the
    final query loss alone."""
    epoch = iteration // epoch_iterations
    msl = msl_weights(inner_steps, epoch, msl_epochs) if epoch < msl_epochs and inner_steps > 1 else None
    return epoch < first_order_epochs, msl


def _build_mamlpp(config: Settings, backbone: nn.Module) -> tuple[nn.Module, nn.Module]:
    return backbone, MAMLPPState(backbone, config.inner_steps, config.inner_lr)


def _mamlpp(config: Settings, model: nn.Module, aux: MAMLPPState, batch: TaskBatch) -> MAMLOutput:
    args = (config.inner_steps, aux.iteration, config.epoch_iterations, config.first_order_epochs, config.msl_epochs)
    first_order, msl = mamlpp_settings(*args)
    aux.iteration += 1
    return maml_step(
        model, batch, aux.lslr, config.inner_steps, first_order, config.loss_fn, multi_step_weights=msl,
        per_step_bn=aux.bn, recompute=recompute_of(config.recompute),
    )  # fmt: skip


def _mamlpp_predict(config: Settings, model: nn.Module, aux: MAMLPPState, batch: TaskBatch, steps: int) -> Tensor:
    adapted = adapt(model, batch.support_x, batch.support_y, aux.lslr, steps, config.loss_fn, per_step_bn=aux.bn)
    with torch.no_grad():
        return adapted(batch.query_x)


def _count(name: str, help: str, default: int, low: int) -> Option:  # noqa: A002
    return Option(name, int, help, default=default, valid=lambda v: v >= low, bound=f">= {low}")


# Defaults: MAML++'s released configurations (Omniglot: 8 tasks, rate 0.1, 5 steps; mini-ImageNet: 2 tasks,
# rate 0.01, 5 steps, 48 filters; epochs of 500 meta-steps, the multi-step loss annealed over 10 epochs, second
# order from the start (their first_order_to_second_order_epoch is -1), the meta rate cosine-annealed).
MAMLPP = Learner(
    name="mamlpp",
    summary="MAML++ (Antoniou et al. 2019): LSLR, per-step batch-norm weights, the annealed multi-step loss, "
    "derivative-order annealing (--first-order-epochs), cosine meta learning rate",
    options=(
        INNER_LR.but(default=0.1, help="the learned per-layer per-step inner rates' initial value"),
        INNER_STEPS.but(default=5, per_domain={}),
        EVAL_INNER_STEPS.but(default=5, per_domain={}),
        TRAIN_SHOT,
        RECOMPUTE,
        _count("epoch_iterations", "meta-steps in an epoch of the annealing schedules", 500, 1),
        _count("msl_epochs", "epochs of the multi-step loss (its weights annealed to the last step)", 10, 0),
        _count("first_order_epochs", "epochs of first-order meta-gradients before second order", 0, 0),
    ),
    objective=_mamlpp,
    predict=_mamlpp_predict,
    build=_build_mamlpp,
    tasks=("classification",),
    schedule="cosine",
    defaults={"characters": {"meta_batch": 8}, "natural": {"meta_batch": 2, "hidden": 48}},
)
