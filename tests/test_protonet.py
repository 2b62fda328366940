"""Prototypical networks: batched over tasks against a plain per-episode loop, in float64."""

import pytest
import torch
import torch.nn.functional as F
from helpers import episodes, meta_train, separable_classes

from fastmeta import TaskBatch
from fastmeta.algorithms.protonet import class_prototypes, protonet_logits, protonet_step, squared_distances
from fastmeta.models import MLP, Conv4


def loop_protonet(model, batch, n_way):
    """Snell et al.'s computation, one episode at a time: embed support and query together, class means,
    minus squared Euclidean distances, cross-entropy."""
    logits, losses = [], []
    for t in range(batch.num_tasks):
        sx, sy, qx, qy = batch.support_x[t], batch.support_y[t], batch.query_x[t], batch.query_y[t]
        z = model(torch.cat([sx, qx]))
        zs, zq = z[: len(sx)], z[len(sx) :]
        protos = torch.stack([zs[sy == c].mean(0) for c in range(n_way)])
        lg = -((zq.unsqueeze(1) - protos.unsqueeze(0)) ** 2).sum(-1)
        logits.append(lg)
        losses.append(F.cross_entropy(lg, qy))
    return torch.stack(logits), torch.stack(losses)


@pytest.mark.parametrize(
    "make,shape,strategy",
    [
        (lambda: Conv4(None, 1, hidden=5, image_size=16), (1, 16, 16), "auto"),
        (lambda: Conv4(None, 3, hidden=4, image_size=17), (3, 17, 17), "loop"),
        (lambda: MLP((6, 7, 5)), (6,), "auto"),
    ],
)
@pytest.mark.parametrize("n_way,k_shot,n_query,tasks", [(4, 2, 3, 3), (3, 1, 1, 1), (5, 3, 2, 2)])
def test_matches_a_per_episode_loop(make, shape, strategy, n_way, k_shot, n_query, tasks):
    model = make().double()
    batch = episodes(shape, n_way, k_shot, n_query, tasks)
    out = protonet_step(model, batch, n_way, strategy=strategy)
    want_logits, want_losses = loop_protonet(model, batch, n_way)
    torch.testing.assert_close(out.logits, want_logits.detach(), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out.task_losses, want_losses, rtol=1e-9, atol=1e-12)
    params = list(model.parameters())
    got = torch.autograd.grad(out.loss, params)
    want = torch.autograd.grad(want_losses.mean(), params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-12)
    assert out.accuracy.shape == (tasks,)
    torch.testing.assert_close(out.accuracy, (want_logits.argmax(-1) == batch.query_y).double().mean(1).float())


def test_n_way_defaults_to_the_support_labels():
    model = MLP((3, 4)).double()
    batch = episodes((3,), 4, 2, 2, 2)
    torch.testing.assert_close(protonet_logits(model, batch), protonet_logits(model, batch, 4))


@pytest.mark.parametrize("T,nq,c,d", [(1, 1, 1, 1), (3, 7, 5, 9), (2, 0, 3, 4), (2, 33, 20, 64)])
def test_squared_distances(T, nq, c, d):
    q, p = torch.randn(T, nq, d, dtype=torch.float64), torch.randn(T, c, d, dtype=torch.float64)
    want = ((q.unsqueeze(2) - p.unsqueeze(1)) ** 2).sum(-1)
    torch.testing.assert_close(squared_distances(q, p), want)
    same = squared_distances(p, p).diagonal(dim1=1, dim2=2)
    assert (same >= 0).all() and same.abs().max() < 1e-12  # clamped, never negative from rounding
    q32 = torch.randn(T, nq, d)[:, :, ::1].transpose(1, 2).contiguous().transpose(1, 2)  # non-contiguous
    torch.testing.assert_close(
        squared_distances(q32, p.float()),
        ((q32.unsqueeze(2) - p.float().unsqueeze(1)) ** 2).sum(-1),
        rtol=1e-4,
        atol=1e-4,
    )


def test_class_prototypes_and_bad_input():
    z = torch.arange(12.0).view(1, 4, 3)
    protos = class_prototypes(z, torch.tensor([[1, 0, 1, 0]]), 2)
    torch.testing.assert_close(protos, torch.stack([(z[0, 1] + z[0, 3]) / 2, (z[0, 0] + z[0, 2]) / 2]).unsqueeze(0))
    with pytest.raises(ValueError, match="a support example of each of the 3 classes"):
        class_prototypes(z, torch.tensor([[1, 0, 1, 0]]), 3)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 2\), got \[0, 2\]"):
        class_prototypes(z, torch.tensor([[1, 0, 2, 0]]), 2)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 2\), got \[-1, 1\]"):
        class_prototypes(z, torch.tensor([[1, -1, 1, 0]]), 2)
    with pytest.raises(ValueError, match="support must be"):
        class_prototypes(z[0], torch.tensor([1, 0, 1, 0]), 2)
    x = torch.rand(2, 4, 3)
    with pytest.raises(ValueError, match="support_y must hold class indices"):
        protonet_step(MLP((3, 2)), TaskBatch(x, torch.rand(2, 4), x, torch.zeros(2, 4, dtype=torch.long)))
    with pytest.raises(TypeError, match="TaskBatch"):
        protonet_step(MLP((3, 2)), (x, x, x, x))


def test_learns_separable_classes():
    """A few steps on episodes of well-separated Gaussian classes raise the query accuracy."""
    sampler = separable_classes(5, 1, 4, tasks=8)
    model = MLP((8, 32, 16))
    before = protonet_step(model, sampler[1000], 5).accuracy.mean()
    meta_train(lambda b: protonet_step(model, b, 5), model.parameters(), sampler, 60, 1e-2)
    after = protonet_step(model, sampler[1000], 5).accuracy.mean()
    assert after > before + 0.1 and after > 0.8
