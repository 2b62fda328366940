"""Matching networks: batched over tasks against a plain per-episode loop, in float64."""

import pytest
import torch
import torch.nn.functional as F
from helpers import episodes, meta_train, separable_classes

from fastmeta import TaskBatch
from fastmeta.algorithms.matching import FullContextEmbedding, matching_log_probs, matching_step
from fastmeta.models import MLP, Conv4


def loop_matching(model, batch, n_way, scale=1.0, fce=None):
    """Vinyals et al.'s classifier, one episode at a time:
    p(y | x, S) = sum_i softmax_i(cos(f(x), g(x_i))) [y_i = y]."""
    out = []
    for t in range(batch.num_tasks):
        sx, sy, qx = batch.support_x[t], batch.support_y[t], batch.query_x[t]
        z = model(torch.cat([sx, qx]))
        zs, zq = z[: len(sx)].flatten(1), z[len(sx) :].flatten(1)
        if fce is not None:
            zs, zq = (v[0] for v in fce(zs[None], zq[None]))
        cos = torch.stack([torch.stack([F.cosine_similarity(q, s, dim=0) for s in zs]) for q in zq])  # (Nq, Ns)
        a = torch.softmax(scale * cos, -1)
        probs = torch.stack([a[:, sy == c].sum(1) for c in range(n_way)], -1)
        out.append(probs.log())
    return torch.stack(out)


@pytest.mark.parametrize(
    "make,shape",
    [(lambda: Conv4(None, 1, hidden=5, image_size=16), (1, 16, 16)), (lambda: MLP((6, 7, 5)), (6,))],
)
@pytest.mark.parametrize("n_way,k_shot,n_query,tasks", [(4, 2, 3, 3), (3, 1, 1, 1), (5, 3, 2, 2)])
@pytest.mark.parametrize("scale", [1.0, 7.5])
def test_matches_a_per_episode_loop(make, shape, n_way, k_shot, n_query, tasks, scale):
    model = make().double()
    batch = episodes(shape, n_way, k_shot, n_query, tasks)
    out = matching_step(model, batch, n_way, scale=scale)
    want = loop_matching(model, batch, n_way, scale)
    torch.testing.assert_close(out.logits, want.detach(), rtol=1e-9, atol=1e-10)
    want_loss = F.nll_loss(want.reshape(-1, n_way), batch.query_y.reshape(-1))
    params = list(model.parameters())
    for g, w in zip(torch.autograd.grad(out.loss, params), torch.autograd.grad(want_loss, params)):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(out.logits.exp().sum(-1), torch.ones(tasks, n_way * n_query, dtype=torch.float64))


def test_full_context_embeddings_batch_over_tasks():
    """Full-context embeddings of T tasks at once equal each task's alone, with gradients, and change the
    classifier (they are not a no-op)."""
    torch.manual_seed(0)
    model = MLP((6, 8, 5)).double()
    fce = FullContextEmbedding(5, steps=3).double()
    batch = episodes((6,), 3, 2, 2, 4)
    out = matching_step(model, batch, 3, fce=fce)
    want = loop_matching(model, batch, 3, fce=fce)
    torch.testing.assert_close(out.logits, want.detach(), rtol=1e-9, atol=1e-10)
    want_loss = F.nll_loss(want.reshape(-1, 3), batch.query_y.reshape(-1))
    params = list(model.parameters()) + list(fce.parameters())
    for g, w in zip(torch.autograd.grad(out.loss, params), torch.autograd.grad(want_loss, params)):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-12)
    assert (out.logits - matching_log_probs(model, batch, 3)).abs().max() > 1e-3
    with pytest.raises(ValueError, match="steps must be >= 1"):
        FullContextEmbedding(5, steps=0)


def test_bad_input():
    x = torch.rand(2, 4, 3)
    y = torch.tensor([[0, 1, 0, 1], [1, 0, 1, 0]])
    with pytest.raises(ValueError, match="support_y must hold class indices"):
        matching_step(MLP((3, 2)), TaskBatch(x, y.float(), x, y))
    with pytest.raises(ValueError, match=r"support_y must be in \[0, 2\)"):
        matching_step(MLP((3, 2)), TaskBatch(x, y + 1, x, y), n_way=2)
    with pytest.raises(TypeError, match="TaskBatch"):
        matching_step(MLP((3, 2)), (x, y, x, y))


def test_learns_separable_classes():
    sampler = separable_classes(5, 1, 4, tasks=8)
    torch.manual_seed(0)
    model = MLP((8, 32, 16))
    before = matching_step(model, sampler[1000], 5, scale=10).accuracy.mean()
    meta_train(lambda b: matching_step(model, b, 5, scale=10), model.parameters(), sampler, 60, 1e-2)
    after = matching_step(model, sampler[1000], 5, scale=10).accuracy.mean()
    assert after > before + 0.1 and after > 0.8
