"""Siamese networks: the batched contrastive step against a per-episode loop over the reference ops."""

import pytest
import torch
from helpers import episodes, meta_train, separable_classes

from fastmeta import TaskBatch, reference
from fastmeta.algorithms.siamese import nearest_support_logits, siamese_step
from fastmeta.models import MLP, Conv4, KochNet, from_config


def loop_siamese(model, batch, margin, mode):
    losses = []
    for t in range(batch.num_tasks):
        sx, sy, qx, qy = batch.support_x[t], batch.support_y[t], batch.query_x[t], batch.query_y[t]
        z = model(torch.cat([sx, qx])).flatten(1)
        zs, zq = z[: len(sx)], z[len(sx) :]
        if mode == "all_pairs":
            losses.append(reference.contrastive_loss_all_pairs(z, torch.cat([sy, qy]), margin))
        else:
            pairs = [(i, j) for i in range(len(qx)) for j in range(len(sx))]
            same = torch.tensor([float(qy[i] == sy[j]) for i, j in pairs], dtype=z.dtype)
            x1, x2 = zq[[i for i, _ in pairs]], zs[[j for _, j in pairs]]
            losses.append(reference.contrastive_loss(x1, x2, same, margin))
    return torch.stack(losses)


@pytest.mark.parametrize(
    "make,shape",
    [(lambda: Conv4(None, 1, hidden=5, image_size=16), (1, 16, 16)), (lambda: MLP((6, 7, 5)), (6,))],
)
@pytest.mark.parametrize("n_way,k_shot,n_query,tasks", [(4, 2, 3, 3), (3, 1, 1, 1), (5, 3, 2, 2)])
@pytest.mark.parametrize("mode,margin", [("all_pairs", 1.0), ("pairs", 1.0), ("all_pairs", 0.3), ("pairs", 2.5)])
def test_matches_a_per_episode_loop(make, shape, n_way, k_shot, n_query, tasks, mode, margin):
    model = make().double()
    batch = episodes(shape, n_way, k_shot, n_query, tasks)
    out = siamese_step(model, batch, margin, mode, n_way)
    want = loop_siamese(model, batch, margin, mode)
    torch.testing.assert_close(out.task_losses, want, rtol=1e-9, atol=1e-12)
    params = list(model.parameters())
    for g, w in zip(torch.autograd.grad(out.loss, params), torch.autograd.grad(want.mean(), params)):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-10)  # the last bias: exactly 0 in exact arithmetic
    assert out.logits.shape == (tasks, n_way * n_query, n_way)


def test_nearest_support_logits():
    g = torch.Generator().manual_seed(0)
    support, query = torch.randn(3, 6, 4, generator=g), torch.randn(3, 5, 4, generator=g)
    labels = torch.tensor([[0, 1, 2, 0, 1, 2], [2, 2, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1]])
    got = nearest_support_logits(support, labels, query, 4)
    for t in range(3):
        for q in range(5):
            for c in range(4):
                d = [(query[t, q] - support[t, i]).norm() for i in range(6) if labels[t, i] == c]
                want = -min(d) if d else -torch.inf
                assert got[t, q, c].item() == pytest.approx(float(want), rel=1e-5, abs=1e-5)


def test_bad_input():
    x = torch.rand(2, 4, 3)
    y = torch.tensor([[0, 1, 0, 1], [1, 0, 1, 0]])
    with pytest.raises(ValueError, match="mode must be one of"):
        siamese_step(MLP((3, 2)), TaskBatch(x, y, x, y), mode="triplet")
    with pytest.raises(ValueError, match="query_y must hold class indices"):
        siamese_step(MLP((3, 2)), TaskBatch(x, y, x, y.float()))
    with pytest.raises(TypeError, match="TaskBatch"):
        siamese_step(MLP((3, 2)), (x, y, x, y))


@pytest.mark.parametrize("mode", ["all_pairs", "pairs"])
def test_learns_separable_classes(mode):
    sampler = separable_classes(5, 1, 4, tasks=8)
    torch.manual_seed(0)
    model = MLP((8, 32, 16))
    before = siamese_step(model, sampler[1000], mode=mode).accuracy.mean()
    meta_train(lambda b: siamese_step(model, b, mode=mode), model.parameters(), sampler, 60, 1e-2)
    after = siamese_step(model, sampler[1000], mode=mode).accuracy.mean()
    assert after > before + 0.1 and after > 0.8


def test_koch_network():
    for batch_norm in (False, True):
        model = KochNet(image_size=105, embedding_size=32, batch_norm=batch_norm)
        out = model(torch.rand(3, 1, 105, 105))
        assert out.shape == (3, 32) and (out > 0).all() and (out < 1).all()  # sigmoid features
        again = from_config(model.config)
        again.load_state_dict(model.state_dict())
        torch.testing.assert_close(again(torch.ones(2, 1, 105, 105)), model(torch.ones(2, 1, 105, 105)))
    with pytest.raises(ValueError, match="image_size 64 is too small"):
        KochNet(image_size=64)
    KochNet(image_size=65, embedding_size=4)(torch.rand(1, 1, 65, 65))
