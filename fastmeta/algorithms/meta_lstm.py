"""The Meta-LSTM optimizer of Ravi & Larochelle (2017) over a batch of tasks.

An LSTM whose cell state is the learner's parameters: for every coordinate (one parameter element of one
task), theta_t = f_t * theta_{t-1} - i_t * grad_t, where the input gate i_t (a learned rate) and the forget
gate f_t (a learned decay) come from a small LSTM that reads the preprocessed gradient and loss. All
coordinates share the meta-learner's weights (the paper's coordinate-wise sharing), so it is a batch of
T * P rows for P learner parameters, and the update of all tensors of all tasks is one
fastmeta.ops.fast_weight_update with per-task, per-element lr = i_t and decay = f_t.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastmeta import ops
from fastmeta.algorithms._batched import runner, tasks_first
from fastmeta.algorithms.common import (
    EVAL_INNER_STEPS,
    INIT_LR,
    INNER_STEPS,
    TRAIN_SHOT,
    ZERO_HEAD,
    Learner,
    zero_head,
)
from fastmeta.algorithms.common import per_task_fast_weights as _per_task_weights
from fastmeta.algorithms.common import query_accuracy as _accuracy
from fastmeta.algorithms.inner import LossFn, MAMLOutput, task_losses
from fastmeta.data import TaskBatch

__all__ = ["MetaLSTM", "preprocess", "meta_lstm_step"]


def preprocess(x: Tensor, p: float = 10.0) -> Tensor:
    """The gradient preprocessing of Andrychowicz et al. (2016): x (...) -> (..., 2), (log|x| / p, sign x)
    where |x| >= e^-p, else (-1, e^p x). Puts gradients and losses of any magnitude on a common scale."""
    big = x.abs() >= math.exp(-p)
    log = x.abs().clamp_min(math.exp(-p)).log() / p
    first = torch.where(big, log, torch.full_like(x, -1.0))
    second = torch.where(big, x.sign(), x * math.exp(p))
    return torch.stack([first, second], -1)


class MetaLSTM(nn.Module):
    """Ravi & Larochelle's meta-learner for `learner` (whose parameters are the initial cell state theta_0,
    meta-learned with the rest).

    Layer 1: an LSTM cell (hidden size `hidden`) over each coordinate's preprocessed (gradient, loss), 4 inputs.
    Layer 2, the meta-learner cell: i_t = sigmoid(W_i [h_t, theta_{t-1}, i_{t-1}] + b_i),
    f_t = sigmoid(W_f [h_t, theta_{t-1}, f_{t-1}] + b_f), theta_t = f_t theta_{t-1} - i_t grad_t. b_f starts
    in [4, 6] (f near 1: keep the weights) and b_i in [-5, -4] (a small rate, about 0.011), as in the paper;
    `init_lr` centres b_i on logit(init_lr) instead (+- 0.5), so the first updates take that rate.
    Gradients and losses enter as inputs without second derivatives (the paper's simplification)."""

    def __init__(self, learner: nn.Module, hidden: int = 20, init_lr: float | None = None) -> None:
        if init_lr is not None and not 0 < init_lr < 1:
            raise ValueError(f"MetaLSTM: init_lr is a sigmoid gate's initial value, in (0, 1), got {init_lr}")
        super().__init__()
        self.learner = learner
        self.hidden = hidden
        self.cell = nn.LSTMCell(4, hidden)
        self.input_gate = nn.Linear(hidden + 2, 1)
        self.forget_gate = nn.Linear(hidden + 2, 1)
        with torch.no_grad():
            self.input_gate.weight.uniform_(-0.01, 0.01)
            self.forget_gate.weight.uniform_(-0.01, 0.01)
            centre = -4.5 if init_lr is None else math.log(init_lr / (1 - init_lr))
            self.input_gate.bias.uniform_(centre - 0.5, centre + 0.5)
            self.forget_gate.bias.uniform_(4, 6)

    def predict(self, fast_weights: dict[str, Tensor], x: Tensor, strategy: str = "auto") -> Tensor:
        """The learner with each task's fast weights (name -> (T, *S)) on x (T, N, *x) -> (T, N, ...)."""
        return tasks_first(runner(self.learner, strategy)(fast_weights, x))

    def adapt(
        self,
        support_x: Tensor,
        support_y: Tensor,
        steps: int,
        loss_fn: LossFn = F.cross_entropy,
        strategy: str = "auto",
    ) -> tuple[dict[str, Tensor], Tensor]:
        """Fast weights of T tasks after `steps` meta-learner updates on their support sets (T, Ns, ...):
        (name -> (T, *S), support losses (T, steps) before each update, detached). Differentiable with respect
        to the meta-learner and the learner's initial weights."""
        if steps < 0:
            raise ValueError(f"MetaLSTM.adapt: steps must be >= 0, got {steps}")
        run = runner(self.learner, strategy)
        T = support_x.shape[0]
        named = dict(self.learner.named_parameters())
        names = list(named)
        shared = list(named.values())
        fast: list[Tensor] = shared  # the first update starts every task from the shared theta_0
        sizes = [p.numel() for p in shared]
        rows = T * sum(sizes)
        h = shared[0].new_zeros(rows, self.hidden)
        c = shared[0].new_zeros(rows, self.hidden)
        i_prev = shared[0].new_zeros(rows, 1)
        f_prev = shared[0].new_zeros(rows, 1)
        support_losses = []
        outer = torch.is_grad_enabled()  # else (evaluation) each step's fast weights are new leaves
        for _ in range(steps):
            per_task = list(_per_task_weights(named, names, fast, T).values())
            with torch.enable_grad():  # the inner gradients, also when called under no_grad (evaluation)
                inputs = per_task if outer else [f.detach().requires_grad_() for f in per_task]
                pred = tasks_first(run(dict(zip(names, inputs)), support_x))
                losses = task_losses(loss_fn, pred, support_y)
                # retain_graph: the graph up to these fast weights is also the query loss's
                grads = [g.detach() for g in torch.autograd.grad(losses.sum(), inputs, retain_graph=True)]
            support_losses.append(losses.detach())
            g_flat = torch.cat([g.reshape(T, -1) for g in grads], 1)  # (T, P)
            theta = torch.cat([f.reshape(T, -1) for f in per_task], 1).reshape(rows, 1)
            loss_in = preprocess(losses.detach()).unsqueeze(1).expand(T, g_flat.shape[1], 2)
            x = torch.cat([preprocess(g_flat), loss_in], -1).reshape(rows, 4)
            h, c = self.cell(x, (h, c))
            i_prev = torch.sigmoid(self.input_gate(torch.cat([h, theta, i_prev], 1)))
            f_prev = torch.sigmoid(self.forget_gate(torch.cat([h, theta, f_prev], 1)))
            lrs = [t.reshape(g.shape) for t, g in zip(i_prev.view(T, -1).split(sizes, 1), grads)]
            decays = [t.reshape(g.shape) for t, g in zip(f_prev.view(T, -1).split(sizes, 1), grads)]
            fast = ops.fast_weight_update(fast, grads, lrs, decays)
        stacked = torch.stack(support_losses, 1) if support_losses else shared[0].new_zeros(T, 0)
        return _per_task_weights(named, names, fast, T), stacked


def meta_lstm_step(
    meta: MetaLSTM,
    batch: TaskBatch,
    steps: int = 5,
    loss_fn: LossFn = F.cross_entropy,
    strategy: str = "auto",
) -> MAMLOutput:
    """One meta-training step: adapt T tasks with `meta` (MetaLSTM.adapt), then the mean query loss of the
    adapted learners; its backward reaches the meta-learner and the learner's initial weights."""
    if not isinstance(batch, TaskBatch):
        raise TypeError(f"meta_lstm_step: batch must be a fastmeta.TaskBatch, got {type(batch).__name__}")
    if not isinstance(meta, MetaLSTM):
        raise TypeError(f"meta_lstm_step: meta must be a fastmeta MetaLSTM, got {type(meta).__name__}")
    fast, support_losses = meta.adapt(batch.support_x, batch.support_y, steps, loss_fn, strategy)
    pred = meta.predict(fast, batch.query_x, strategy)
    losses = task_losses(loss_fn, pred, batch.query_y)
    return MAMLOutput(losses.mean(), losses, _accuracy(pred, batch.query_y), support_losses, pred.detach(), fast)


def _build(config, backbone: nn.Module) -> tuple[nn.Module, nn.Module | None]:  # noqa: ANN001
    """The learner inside its meta-learner: one module, one state dict."""
    model = MetaLSTM(backbone, hidden=20, init_lr=config.init_lr)
    if config.zero_head:
        zero_head(model.learner)
    return model, None


def _predict(config, model: MetaLSTM, aux: nn.Module | None, batch: TaskBatch, inner_steps: int) -> Tensor:  # noqa: ANN001
    with torch.no_grad():  # the inner gradients are still taken; no graph is kept across the steps
        fast = model.adapt(batch.support_x, batch.support_y, inner_steps, config.loss_fn)[0]
        return model.predict(fast, batch.query_x)


def _clip(config, params: list[Tensor]) -> None:  # noqa: ANN001
    torch.nn.utils.clip_grad_norm_(params, 0.25)  # Ravi & Larochelle clip the meta-gradient's norm to 0.25


def _zero_head_after_step(config, model: MetaLSTM) -> None:  # noqa: ANN001
    if config.zero_head:
        zero_head(model.learner)  # its learner's head: the head's part of the initial cell state theta_0


# It reads T * P coordinates (P = 112k for a Conv4) through its LSTM at every update, so it takes fewer tasks per
# step on images, and the paper's 5 updates; its init_lr is the input gate's initial value, the learned rate.
META_LSTM = Learner(
    name="metalstm",
    summary="Ravi & Larochelle's LSTM meta-learner: its input and forget gates are the per-task, per-element "
    "rate and decay of fastmeta.ops.fast_weight_update; --inner-steps updates",
    options=(
        INIT_LR.but(
            help="the input gate's initial value, the first updates' rate (the paper's 0.011: b_i in [-5, -4])",
            default=0.011, per_domain={}, valid=lambda v: 0 < v < 1,
            bound="in (0, 1) (the Meta-LSTM's first rate is its input gate)",
        ),
        INNER_STEPS.but(default=5, per_domain={"functions": 1}),
        EVAL_INNER_STEPS.but(default=5, per_domain={"functions": 1}),
        TRAIN_SHOT,
        ZERO_HEAD,
    ),
    objective=lambda config, model, aux, batch: meta_lstm_step(model, batch, config.inner_steps, config.loss_fn),
    predict=_predict,
    build=_build,
    defaults={"characters": {"meta_batch": 8}},
    after_backward=_clip,
    after_step=_zero_head_after_step,
    renamed={"inner_lr": "init_lr"},
)  # fmt: skip
