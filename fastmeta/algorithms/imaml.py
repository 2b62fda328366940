"""Implicit MAML (Rajeswaran et al. 2019) over a whole batch of tasks: `imaml_step` and `--algo imaml`.

Each task t solves the proximal inner problem phi_t = argmin_phi L_t^support(phi) + lam/2 ||phi - theta||^2
(approximately: `inner_steps` gradient steps from theta, all T tasks at once, as `adapt` runs them). At a
solution, d phi_t / d theta = (I + H_t / lam)^-1 with H_t the Hessian of the support loss at phi_t, so the
meta-gradient of the mean query loss is

    grad theta = 1/T sum_t (I + H_t / lam)^-1 g_t,      g_t = grad of task t's query loss at phi_t,

each solve by `cg_steps` iterations of conjugate gradient. The T tasks' systems are independent, so one
batched Hessian-vector product (one double backward through the support forward, for all tasks) serves every
task's CG iteration, and each task has its own step sizes. No graph of the inner steps is kept: memory does
not grow with inner_steps.

    out = fastmeta.imaml_step(model, batch, inner_lr=0.1, inner_steps=16, lam=2.0, cg_steps=5)
    out.loss.backward()   # the implicit meta-gradient into model.parameters()
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastmeta.algorithms._batched import tasks_first
from fastmeta.algorithms.common import (
    EVAL_INNER_STEPS,
    INNER_LR,
    INNER_OPT,
    INNER_STEPS,
    TRAIN_SHOT,
    ZERO_HEAD,
    Learner,
    Option,
    Settings,
    query_accuracy,
    zero_head_after_step,
)
from fastmeta.algorithms.inner import InnerLoop, LossFn, MAMLOutput, PreparedLoop, check_int, task_losses
from fastmeta.algorithms.inner_opt import InnerOptimizer, inner_opt_of
from fastmeta.algorithms.maml import AdaptedModel, adapt_prepared
from fastmeta.algorithms.maml_learners import build_with_head
from fastmeta.data import TaskBatch

__all__ = ["imaml_step", "imaml_adapt", "IMAML", "conjugate_gradient"]


def _check(
    fn: str, inner_lr: object, lam: object, cg_steps: object, damping: object, lam_damping: object = 0.0
) -> None:
    if not isinstance(inner_lr, (int, float)) or isinstance(inner_lr, bool) or not inner_lr >= 0:
        raise TypeError(
            f"{fn}: inner_lr must be a number >= 0 (learned rates get no implicit gradient), got {inner_lr!r}"
        )
    for name, value in (("lam", lam), ("damping", damping), ("lam_damping", lam_damping)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise ValueError(f"{fn}: {name} must be a finite number, got {value!r}")
    if not lam > 0:
        raise ValueError(f"{fn}: lam must be > 0 (the proximal term's strength), got {lam!r}")
    for name, value in (("damping", damping), ("lam_damping", lam_damping)):
        if value < 0:
            raise ValueError(f"{fn}: {name} must be >= 0, got {value!r}")
    check_int(f"{fn}: cg_steps", cg_steps, 0)


def _dot(a: list[Tensor], b: list[Tensor]) -> Tensor:
    """(T,) each task's inner product of two lists of (T, *S_i) tensors."""
    return sum((x * y).flatten(1).sum(1) for x, y in zip(a, b))


def _per_task(c: Tensor, like: Tensor) -> Tensor:
    """(T,) coefficients shaped to multiply (T, *S) tensors."""
    return c.reshape(-1, *([1] * (like.dim() - 1)))


def conjugate_gradient(matvec, b: list[Tensor], steps: int) -> list[Tensor]:  # noqa: ANN001
    """x with A x ~= b for T independent symmetric positive definite systems at once, by `steps` iterations of
    conjugate gradient from x = 0: b is a list of (T, *S_i) tensors (task t's right-hand side is their t-th
    rows), matvec(v) returns A v in the same form. A task whose residual reaches 0, or whose curvature
    p^T A p is not positive (A not positive definite there), stops where it is."""
    x = [torch.zeros_like(t) for t in b]
    r = [t.clone() for t in b]
    p = [t.clone() for t in b]
    rs = _dot(r, r)
    for _ in range(steps):
        ap = matvec(p)
        pap = _dot(p, ap)
        go = (pap > 0) & (rs > 0)
        alpha = torch.where(go, rs / torch.where(go, pap, 1), 0)
        x = [xi + _per_task(alpha, xi) * pi for xi, pi in zip(x, p)]
        r = [ri - _per_task(alpha, ri) * api for ri, api in zip(r, ap)]
        rs_new = _dot(r, r)
        beta = torch.where(go, rs_new / torch.where(rs > 0, rs, 1), 0)
        p = [ri + _per_task(beta, pi) * pi for ri, pi in zip(r, p)]
        rs = torch.where(go, rs_new, 0)
    return x


def imaml_step(
    model: nn.Module,
    batch: TaskBatch,
    inner_lr: float = 0.1,
    inner_steps: int = 16,
    lam: float = 2.0,
    cg_steps: int = 5,
    loss_fn: LossFn = F.cross_entropy,
    *,
    damping: float = 0.0,
    lam_damping: float = 0.0,
    strategy: str = "auto",
    inner_opt: InnerOptimizer | None = None,
) -> MAMLOutput:
    """One meta-step of implicit MAML over the T tasks of `batch`; `loss.backward()` leaves the implicit
    meta-gradient 1/T sum_t (I + H_t/lam)^-1 grad_phi L_t^query(phi_t) in the model's `.grad` (see the module's
    docstring), where `maml_step` leaves the exact one of the unrolled steps.

    Args:
        model, batch, loss_fn, strategy: as in `maml_step` (every parameter that requires grad adapts).
        inner_lr, inner_steps: each task's `inner_steps` steps on its support loss + lam/2 ||phi - theta||^2.
        lam: the proximal term's strength (Rajeswaran et al.'s lambda; large: phi stays near theta).
        cg_steps: conjugate-gradient iterations per task (0: the query gradient itself, first order).
        damping, lam_damping: solve ((1 + damping) I + H/(lam + lam_damping)) v = g instead (the paper's system
            is damping=lam_damping=0; the authors' released Omniglot code solves damping=1, lam_damping=10,
            which stays well conditioned where the inner problem is not solved and H is far from positive
            definite, as with a Conv4 after 16 steps at rate 0.1).
        inner_opt: the inner update rule, as in `maml_step` (None: SGD).

    Returns: a `MAMLOutput`: loss (0-d, the mean query loss; backward gives the implicit meta-gradient), task
        losses (T,), accuracy (T,) or None, support losses (T, inner_steps) before each step, predictions and
        fast_weights (name -> (T, *S)), all detached but `loss`.
    """
    if not isinstance(batch, TaskBatch):
        raise TypeError(f"imaml_step: batch must be a fastmeta.TaskBatch, got {type(batch).__name__}")
    _check("imaml_step", inner_lr, lam, cg_steps, damping, lam_damping)
    loop = InnerLoop(float(inner_lr), inner_steps, loss_fn=loss_fn, strategy=strategy, inner_opt=inner_opt)
    at = loop.prepare("imaml_step", model, batch.support_x)
    adapted = adapt_prepared(at, batch.support_x, batch.support_y, float(lam))
    det = at.detached()
    T, grad_mode = batch.num_tasks, torch.is_grad_enabled()
    with torch.enable_grad():
        phi = [adapted.fast_weights[n].detach().requires_grad_() for n in at.adapted]
        pred = det.predict(phi, det.features(batch.query_x))
        losses = task_losses(loss_fn, pred, batch.query_y)
        loss = losses.mean()
        track = grad_mode and any(p.requires_grad for p in at.initial()) and T > 0
        if track:
            g = torch.autograd.grad(loss, phi)
            system = (float(lam) + float(lam_damping), float(damping))
            v = _implicit(det, phi, g, batch, *system, cg_steps) if cg_steps else list(g)
            theta = at.initial()
            pull = sum((t * vi.sum(0)).sum() for t, vi in zip(theta, v) if t.requires_grad)
            loss = loss.detach() + (pull - pull.detach())
    return MAMLOutput(
        loss=loss if track else loss.detach(),
        task_losses=losses.detach(),
        accuracy=query_accuracy(pred.detach(), batch.query_y),
        support_losses=adapted.support_losses,
        predictions=pred.detach(),
        fast_weights={n: f.detach() for n, f in zip(at.adapted, phi)},
    )


def _implicit(
    at: PreparedLoop, phi: list[Tensor], g: tuple[Tensor, ...], batch: TaskBatch, lam: float, damp: float, cg: int
) -> list[Tensor]:
    """Each task's ((1 + damp) I + H_t/lam)^-1 g_t by `cg` CG iterations, H_t the support loss's Hessian at phi_t:
    one graph of the support gradient, differentiated again per iteration (all tasks at once)."""
    feat = at.features(batch.support_x)
    out = at.run({**at.params, **dict(zip(at.adapted, phi))}, feat, at.start, twice=True)
    support = task_losses(at.loop.loss_fn, tasks_first(out), batch.support_y)
    grads = torch.autograd.grad(support.sum(), phi, create_graph=True, allow_unused=True, materialize_grads=True)
    live = [i for i, gr in enumerate(grads) if gr.requires_grad]  # a tensor the loss is linear in has H = 0

    def matvec(v: list[Tensor]) -> list[Tensor]:
        hv = [torch.zeros_like(x) for x in v]
        if live:
            got = torch.autograd.grad(
                [grads[i] for i in live], [phi[i] for i in live], [v[i] for i in live],
                retain_graph=True, allow_unused=True, materialize_grads=True,
            )  # fmt: skip
            for i, h in zip(live, got):
                hv[i] = h
        return [(1 + damp) * x + h / lam for x, h in zip(v, hv)]

    return conjugate_gradient(matvec, [x.detach() for x in g], cg)


def imaml_adapt(
    model: nn.Module,
    support_x: Tensor,
    support_y: Tensor,
    inner_lr: float = 0.1,
    inner_steps: int = 16,
    lam: float = 2.0,
    loss_fn: LossFn = F.cross_entropy,
    *,
    strategy: str = "auto",
    inner_opt: InnerOptimizer | None = None,
) -> AdaptedModel:
    """iMAML's adaptation at meta-test: `inner_steps` steps on each task's support loss + lam/2 ||phi - theta||^2
    (support sets (T, Ns, *x), (T, Ns, ...); lam=0: plain `adapt`). Returns an `AdaptedModel`."""
    TaskBatch(support_x, support_y, support_x, support_y)  # shape checks
    if lam != 0:  # 0: plain adapt
        _check("imaml_adapt", inner_lr, lam, 0, 0.0)
    loop = InnerLoop(float(inner_lr), inner_steps, loss_fn=loss_fn, strategy=strategy, inner_opt=inner_opt)
    return adapt_prepared(loop.prepare("imaml_adapt", model, support_x), support_x, support_y, float(lam))


LAM = Option(
    "lam", float, "iMAML: the proximal term's strength lambda in each task's inner problem",
    default=2.0, valid=lambda v: 0 < v < math.inf, bound="> 0",
)  # fmt: skip
CG_DAMPING = Option(
    "cg_damping", float, "iMAML: solve ((1 + d) I + H/(lambda + lam_damping)) v = g (the authors' released code: 1; "
    "0 with --lam-damping 0: the paper's system)", default=1.0, valid=lambda v: 0 <= v < math.inf, bound=">= 0",
)  # fmt: skip
LAM_DAMPING = Option(
    "lam_damping", float, "iMAML: solve ((1 + cg_damping) I + H/(lambda + lam_damping)) v = g (the authors' "
    "released code: 10)", default=10.0, valid=lambda v: 0 <= v < math.inf, bound=">= 0",
)  # fmt: skip
CG_STEPS = Option(
    "cg_steps", int, "iMAML: conjugate-gradient iterations per task for the implicit meta-gradient",
    default=5, valid=lambda v: v >= 0, bound=">= 0",
)  # fmt: skip


def _objective(config: Settings, model: nn.Module, aux: nn.Module | None, batch: TaskBatch) -> MAMLOutput:
    return imaml_step(
        model, batch, config.inner_lr, config.inner_steps, config.lam, config.cg_steps, config.loss_fn,
        damping=config.cg_damping, lam_damping=config.lam_damping, inner_opt=inner_opt_of(config.inner_opt),
    )  # fmt: skip


def _predict(config: Settings, model: nn.Module, aux: nn.Module | None, batch: TaskBatch, inner_steps: int) -> Tensor:
    adapted = imaml_adapt(
        model, batch.support_x, batch.support_y, config.inner_lr, inner_steps, config.lam, config.loss_fn,
        inner_opt=inner_opt_of(config.inner_opt),
    )  # fmt: skip
    with torch.no_grad():
        return adapted(batch.query_x)


# Rajeswaran et al.'s Omniglot settings (their code's README): inner rate 0.1, 16 inner steps, lambda 2, 5 CG
# steps, 32 tasks a meta-batch, Adam 1e-3, and the damped system of their code ((2 I + H/12) v = g: on Omniglot
# the paper's undamped system lost validation accuracy as it trained, see benchmarks/RESULTS.md); the same
# proximal inner problem at test.
IMAML = Learner(
    name="imaml",
    summary="implicit MAML (Rajeswaran et al. 2019): proximal inner problem, meta-gradient by conjugate gradient "
    "(memory flat in --inner-steps)",
    options=(
        INNER_LR.but(default=0.1, per_domain={"functions": 0.01, "natural": 0.01}),
        INNER_STEPS.but(default=16, per_domain={"natural": 10}),
        EVAL_INNER_STEPS.but(default=16, per_domain={"functions": 1, "natural": 10}),
        TRAIN_SHOT,
        ZERO_HEAD,
        INNER_OPT,
        LAM,
        CG_STEPS,
        CG_DAMPING,
        LAM_DAMPING,
    ),
    objective=_objective,
    predict=_predict,
    build=build_with_head,
    after_step=zero_head_after_step,
)
