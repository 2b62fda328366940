"""pytest-benchmark of the batched metric learners (all T episodes in one call, each with its own BatchNorm
statistics) against the per-episode loop users write. One training step: embed, loss, backward.
Run: pytest benchmarks/test_bench_metric.py --benchmark-group-by=group."""

import pytest
import torch
import torch.nn.functional as F

from fastmeta import reference
from fastmeta._bench import small
from fastmeta.algorithms import matching_step, protonet_step, siamese_step
from fastmeta.data import EpisodeSampler
from fastmeta.models import Conv4

T, N_WAY, K_SHOT, N_QUERY = 16, 5, 1, 5  # Omniglot 5-way 1-shot, 16 episodes a step
if small():  # FASTMETA_BENCH_SMALL=1: 2 episodes a step
    T = 2


def loop_step(algo, model, batch):
    """What users write: one episode at a time, Snell et al.'s / Vinyals et al.'s / Koch et al.'s loss."""
    losses = []
    for t in range(batch.num_tasks):
        sx, sy, qx, qy = batch.support_x[t], batch.support_y[t], batch.query_x[t], batch.query_y[t]
        z = model(torch.cat([sx, qx]))
        zs, zq = z[: len(sx)], z[len(sx) :]
        if algo == "protonet":
            protos = torch.stack([zs[sy == c].mean(0) for c in range(N_WAY)])
            losses.append(F.cross_entropy(-torch.cdist(zq, protos).pow(2), qy))
        elif algo == "matching":
            a = torch.softmax(F.normalize(zq, dim=1) @ F.normalize(zs, dim=1).T, 1)
            losses.append(F.nll_loss((a @ F.one_hot(sy, N_WAY).float()).log(), qy))
        else:
            losses.append(reference.contrastive_loss_all_pairs(z, torch.cat([sy, qy])))
    return torch.stack(losses).mean()


BATCHED = {
    "protonet": lambda m, b: protonet_step(m, b, N_WAY).loss,
    "matching": lambda m, b: matching_step(m, b, N_WAY).loss,
    "siamese": lambda m, b: siamese_step(m, b, n_way=N_WAY).loss,
}


@pytest.mark.parametrize("method", ["fastmeta", "per-episode loop"])
@pytest.mark.parametrize("algo", list(BATCHED))
def test_metric_step(benchmark, device, algo, method):
    data = torch.rand(40, 20, 1, 28, 28)
    batch = EpisodeSampler(data, N_WAY, K_SHOT, N_QUERY, tasks=T, seed=0)[0].to(device)
    model = Conv4(None).to(device)
    loss_of = BATCHED[algo] if method == "fastmeta" else lambda m, b: loop_step(algo, m, b)
    torch.testing.assert_close(BATCHED[algo](model, batch), loop_step(algo, model, batch), rtol=1e-4, atol=1e-5)

    def step():
        model.zero_grad(set_to_none=True)
        loss_of(model, batch).backward()
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    benchmark.group = f"{algo} step, {T} episodes {N_WAY}-way {K_SHOT}-shot {N_QUERY} queries, Conv4"
    benchmark.pedantic(step, rounds=10, warmup_rounds=2)
