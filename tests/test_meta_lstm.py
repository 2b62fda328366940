"""Meta-LSTM: the batched meta-learner against a per-task, per-coordinate loop written from the paper."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import episodes, meta_train, separable_classes
from torch.func import functional_call

from fastmeta import TaskBatch
from fastmeta.algorithms.meta_lstm import MetaLSTM, meta_lstm_step, preprocess
from fastmeta.models import MLP, Conv4


def loop_meta_lstm(meta, batch, steps):
    """Ravi & Larochelle's update, one task at a time: theta <- f * theta - i * grad per coordinate."""
    learner = meta.learner
    theta0 = dict(learner.named_parameters())
    losses = []
    for t in range(batch.num_tasks):
        theta = dict(theta0)
        P = sum(p.numel() for p in theta.values())
        h = c = torch.zeros(P, meta.hidden, dtype=torch.float64)
        i_prev = f_prev = torch.zeros(P, 1, dtype=torch.float64)
        for _ in range(steps):
            loss = F.cross_entropy(functional_call(learner, theta, (batch.support_x[t],)), batch.support_y[t])
            grads = torch.autograd.grad(loss, list(theta.values()), retain_graph=True)
            g = torch.cat([x.reshape(-1) for x in grads]).detach()
            th = torch.cat([x.reshape(-1) for x in theta.values()]).unsqueeze(1)
            pre_loss = preprocess(loss.detach()).expand(P, 2)
            h, c = meta.cell(torch.cat([preprocess(g), pre_loss], 1), (h, c))
            i_prev = torch.sigmoid(meta.input_gate(torch.cat([h, th, i_prev], 1)))
            f_prev = torch.sigmoid(meta.forget_gate(torch.cat([h, th, f_prev], 1)))
            new = f_prev.squeeze(1) * th.squeeze(1) - i_prev.squeeze(1) * g
            theta = dict(zip(theta, new.split([p.numel() for p in theta.values()])))
            theta = {n: v.view_as(theta0[n]) for n, v in theta.items()}
        q = functional_call(learner, theta, (batch.query_x[t],))
        losses.append(F.cross_entropy(q, batch.query_y[t]))
    return torch.stack(losses)


@pytest.mark.parametrize(
    "make,shape",
    [(lambda: Conv4(3, 1, hidden=3, image_size=16), (1, 16, 16)), (lambda: MLP((6, 7, 3)), (6,))],
)
@pytest.mark.parametrize("steps,tasks", [(1, 1), (3, 3), (0, 2)])
def test_matches_a_per_task_loop(make, shape, steps, tasks):
    torch.manual_seed(0)
    meta = MetaLSTM(make(), hidden=4).double()
    with torch.no_grad():  # livelier gates than the paper's initialisation, so that every path matters
        meta.input_gate.bias.fill_(-1.0)
        meta.forget_gate.bias.fill_(1.0)
    batch = episodes(shape, 3, 2, 2, tasks)
    out = meta_lstm_step(meta, batch, steps)
    want = loop_meta_lstm(meta, batch, steps)
    torch.testing.assert_close(out.task_losses, want, rtol=1e-9, atol=1e-12)
    params = [p for p in meta.parameters()]
    got_g = torch.autograd.grad(out.loss, params, allow_unused=True)
    want_g = torch.autograd.grad(want.mean(), params, allow_unused=True)
    for (name, _), g, w in zip(meta.named_parameters(), got_g, want_g):
        if w is None:
            assert g is None or g.abs().max() == 0, name
        else:
            torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-12, msg=name)
    assert out.support_losses.shape == (tasks, steps)
    if steps:
        assert any(g is not None and g.abs().max() > 0 for g in got_g[-6:])  # the meta-learner gets gradients


def test_evaluation_under_no_grad_is_the_same():
    torch.manual_seed(0)
    meta = MetaLSTM(MLP((6, 7, 3))).double()
    batch = episodes((6,), 3, 1, 2, 2)
    with torch.no_grad():
        fast, losses = meta.adapt(batch.support_x, batch.support_y, 3)
    fast2, losses2 = meta.adapt(batch.support_x, batch.support_y, 3)
    for n in fast:
        torch.testing.assert_close(fast[n], fast2[n].detach())
        assert not fast[n].requires_grad
    torch.testing.assert_close(losses, losses2)


def test_preprocess():
    x = torch.tensor([1.0, -2.0, 1e-6, -1e-3, 0.0, math.exp(-10)], dtype=torch.float64)
    got = preprocess(x)
    want = [
        (0.0, 1.0),
        (math.log(2) / 10, -1.0),
        (-1.0, 1e-6 * math.exp(10)),
        (math.log(1e-3) / 10, -1.0),
        (-1.0, 0.0),
        (-1.0, 1.0),
    ]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))


def test_bad_input():
    meta = MetaLSTM(MLP((3, 2)))
    x = torch.rand(2, 4, 3)
    y = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="steps must be >= 0"):
        meta_lstm_step(meta, TaskBatch(x, y, x, y), -1)
    with pytest.raises(TypeError, match="TaskBatch"):
        meta_lstm_step(meta, (x, y, x, y))
    with pytest.raises(TypeError, match="MetaLSTM"):
        meta_lstm_step(MLP((3, 2)), TaskBatch(x, y, x, y))


def test_learns_to_adapt():
    """Meta-training raises the query accuracy after adaptation on episodes of separable classes with
    shuffled labels (only adaptation can tell which label is which)."""
    sampler = separable_classes(3, 2, 3, tasks=8, spread=2.0)
    torch.manual_seed(0)
    meta = MetaLSTM(MLP((8, 16, 3)))
    before = meta_lstm_step(meta, sampler[1000], 3).accuracy.mean()
    meta_train(lambda b: meta_lstm_step(meta, b, 3), meta.parameters(), sampler, 80, 1e-2)
    after = meta_lstm_step(meta, sampler[1000], 3).accuracy.mean()
    assert after > before + 0.2 and after > 0.75


def test_init_lr_sets_the_first_rate():
    """The input gate (the learned rate) starts at the paper's b_i in [-5, -4], or around logit(init_lr)."""
    torch.manual_seed(0)
    assert -5 <= MetaLSTM(MLP((3, 2))).input_gate.bias.item() <= -4
    for lr in (0.011, 0.1, 0.5):
        rate = torch.sigmoid(MetaLSTM(MLP((3, 2)), init_lr=lr).input_gate.bias).item()
        logit = math.log(lr / (1 - lr))
        assert 1 / (1 + math.exp(0.5 - logit)) <= rate <= 1 / (1 + math.exp(-0.5 - logit))
    for bad in (0.0, 1.0, -0.1, 2.0):
        with pytest.raises(ValueError, match="init_lr"):
            MetaLSTM(MLP((3, 2)), init_lr=bad)
