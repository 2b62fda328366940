"""SNAIL: the batched sequences against one sequence per query, causality, and learning."""

import pytest
import torch
import torch.nn.functional as F
from helpers import episodes, meta_train, separable_classes

from fastmeta import TaskBatch
from fastmeta.algorithms.snail import SNAIL, AttentionBlock, DenseBlock, TCBlock, snail_step
from fastmeta.models import MLP, Conv4


def loop_snail(model, batch):
    """One sequence (support pairs, then one query) at a time."""
    out = []
    for t in range(batch.num_tasks):
        sx, sy, qx = batch.support_x[t], batch.support_y[t], batch.query_x[t]
        z = model.embedding(torch.cat([sx, qx])).flatten(1)
        zs, zq = z[: len(sx)], z[len(sx) :]
        rows = []
        for q in range(len(qx)):
            seq = torch.cat(
                [
                    torch.cat([zs, F.one_hot(sy, model.n_way).double()], 1),
                    torch.cat([zq[q : q + 1], torch.zeros(1, model.n_way, dtype=torch.float64)], 1),
                ]
            )
            x = seq.unsqueeze(0)
            for block in (model.attention1, model.tc1, model.attention2, model.tc2, model.attention3):
                x = block(x)
            rows.append(model.out(x[0, -1]))
        out.append(torch.stack(rows))
    return torch.stack(out)


@pytest.mark.parametrize(
    "make,shape,size",
    [(lambda: Conv4(None, 1, hidden=4, image_size=16), (1, 16, 16), 4), (lambda: MLP((6, 7, 5)), (6,), 5)],
)
@pytest.mark.parametrize("n_way,k_shot,n_query,tasks", [(3, 1, 2, 2), (2, 3, 1, 1), (5, 1, 1, 3)])
def test_matches_one_sequence_per_query(make, shape, size, n_way, k_shot, n_query, tasks):
    torch.manual_seed(0)
    model = SNAIL(n_way, k_shot, make(), size).double()
    batch = episodes(shape, n_way, k_shot, n_query, tasks)
    out = snail_step(model, batch)
    want = loop_snail(model, batch)
    torch.testing.assert_close(out.logits, want.detach(), rtol=1e-9, atol=1e-10)
    want_loss = F.cross_entropy(want.reshape(-1, n_way), batch.query_y.reshape(-1))
    params = list(model.parameters())
    for g, w in zip(torch.autograd.grad(out.loss, params), torch.autograd.grad(want_loss, params)):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize(
    "block", [lambda: DenseBlock(3, 4, 2), lambda: TCBlock(3, 9, 4), lambda: AttentionBlock(3, 5, 6)]
)
def test_blocks_are_causal(block):
    torch.manual_seed(0)
    b = block().double()
    x = torch.randn(2, 9, 3, dtype=torch.float64)
    y = b(x)
    for i in range(9):
        changed = x.clone()
        changed[:, i:] += torch.randn(2, 9 - i, 3, dtype=torch.float64)
        z = b(changed)
        torch.testing.assert_close(z[:, :i], y[:, :i])  # earlier outputs do not see later inputs
        assert (z[:, i] - y[:, i]).abs().max() > 1e-6  # and position i sees itself
    assert TCBlock(3, 9, 4).out_channels == 3 + 4 * 4  # dilations 1, 2, 4, 8


def test_bad_input():
    model = SNAIL(3, 1, MLP((4, 5)), 5)
    x, y = torch.rand(2, 3, 4), torch.tensor([[0, 1, 2], [2, 1, 0]])
    with pytest.raises(ValueError, match="3-way 1-shot sequences of 3 support examples, got 6"):
        snail_step(model, TaskBatch(torch.rand(2, 6, 4), torch.zeros(2, 6, dtype=torch.long), x, y))
    with pytest.raises(TypeError, match="TaskBatch"):
        snail_step(model, (x, y, x, y))
    with pytest.raises(ValueError, match="n_way and k_shot must be >= 1"):
        SNAIL(0, 1, MLP((4, 5)), 5)


def test_learns_from_the_support_labels():
    """Classes are separable, but their labels are drawn per episode: only reading the support pairs helps."""
    sampler = separable_classes(3, 1, 3, tasks=8, spread=2.0, noise=0.3)
    held_out = separable_classes(3, 1, 3, tasks=32, spread=2.0, noise=0.3, seed=2)[0]
    torch.manual_seed(0)
    model = SNAIL(3, 1, MLP((8, 32, 16)), 16)
    before = snail_step(model, held_out).accuracy.mean()
    meta_train(lambda b: snail_step(model, b), model.parameters(), sampler, 80, 2e-3)
    after = snail_step(model, held_out).accuracy.mean()
    assert after > before + 0.2 and after > 0.6
