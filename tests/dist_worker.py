"""Meta-gradients of one sharded meta-batch, for tests/test_distributed.py: run under torchrun (rank 0 saves
them to argv[1]) or imported and called in one process (the single-process oracle)."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fastmeta import MetaSGDLR, distributed, maml_step, reptile_step
from fastmeta.algorithms import protonet_step, siamese_step
from fastmeta.algorithms.matching import FullContextEmbedding, matching_step
from fastmeta.algorithms.meta_lstm import MetaLSTM, meta_lstm_step
from fastmeta.algorithms.snail import SNAIL, snail_step
from fastmeta.data import EpisodeSampler
from fastmeta.models import Conv4

MODES = ("maml", "fomaml", "metasgd", "reptile", "protonet", "siamese", "matching", "snail", "metalstm")


class MetaStep(nn.Module):
    """What a DDP user wraps: a module whose forward runs the meta-step and returns the loss."""

    def __init__(self, model: nn.Module, scale: float) -> None:
        super().__init__()
        self.model, self.scale = model, scale

    def forward(self, batch):  # noqa: ANN001, ANN201
        return maml_step(self.model, batch, 0.1, 2).loss * self.scale


def meta_gradients(tasks: int) -> dict:
    """{mode: [grad of each parameter]} for one step on a meta-batch of `tasks` tasks, this rank's share of it,
    summed over the ranks (float64, a Conv4 with BatchNorm, 2 inner steps)."""
    rank, size = distributed.world()
    data = torch.rand(10, 5, 1, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    batch = EpisodeSampler(data, 3, 1, 2, tasks=tasks, seed=5, shard=(rank, size))[7]
    share = batch.num_tasks / tasks
    torch.manual_seed(0)
    model = Conv4(n_way=3, in_channels=1, hidden=4, image_size=16).double()
    lrs = MetaSGDLR(model, init=0.1).double()
    fce = FullContextEmbedding(3, steps=2).double()  # matching networks' embeddings of the Conv4's logits
    snail = SNAIL(3, 1, Conv4(n_way=None, hidden=4, image_size=16), 4).double()
    meta_lstm = MetaLSTM(Conv4(n_way=3, hidden=2, image_size=16), hidden=4).double()
    own = {"metasgd": [model, lrs], "matching": [model, fce], "snail": [snail], "metalstm": [meta_lstm]}
    objectives = {  # every mode but Reptile: a loss to backpropagate (metric learners embed with the Conv4's logits)
        "maml": lambda: maml_step(model, batch, 0.1, 2),
        "fomaml": lambda: maml_step(model, batch, 0.1, 2, first_order=True),
        "metasgd": lambda: maml_step(model, batch, lrs, 2),
        "protonet": lambda: protonet_step(model, batch),
        "siamese": lambda: siamese_step(model, batch),
        "matching": lambda: matching_step(model, batch, fce=fce, scale=5.0),
        "snail": lambda: snail_step(snail, batch),
        "metalstm": lambda: meta_lstm_step(meta_lstm, batch, 2),
    }
    results: dict = {}
    for mode in MODES:
        params = [p for module in own.get(mode, [model]) for p in module.parameters()]
        for p in params:
            p.grad = None
        if mode == "reptile":
            loss = reptile_step(model, batch, 0.1, 2).task_losses.mean()
        else:
            out = objectives[mode]()
            out.loss.backward()
            loss = out.loss.detach()
        total = distributed.all_reduce_gradients(params, share, (loss * share).view(1))
        results[mode] = [p.grad.clone() for p in params]
        results[mode + " loss"] = total.item()
    if size > 1:
        for p in model.parameters():
            p.grad = None
        ddp = DistributedDataParallel(MetaStep(model, share * size))  # DDP averages: scale to the weighted sum
        ddp(batch).backward()
        results["ddp"] = [p.grad.clone() for p in model.parameters()]
        try:
            maml_step(DistributedDataParallel(model), batch, 0.1, 1)
            results["ddp error"] = None
        except TypeError as e:
            results["ddp error"] = str(e)
    results["tasks seen"] = batch.num_tasks
    if size > 1:  # a gradient on one rank only counts as zero on the others; none anywhere stays None
        some, none = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(3))
        some.grad = torch.ones(2) if rank == 1 else None
        distributed.all_reduce_gradients([some, none], 1.0)
        results["presence"] = (some.grad.tolist(), none.grad is None)
        results["any rank"] = (distributed.any_rank(rank == 1), distributed.any_rank(False))
    return results


if __name__ == "__main__":
    rank, size = distributed.init_from_env("gloo")
    # "separate": host values through a gloo group of their own, the path of NCCL jobs (whose gradients are on GPUs)
    distributed._SEPARATE_HOST_GROUP = sys.argv[3:] == ["separate"]
    found = meta_gradients(int(sys.argv[2]))
    found["world size"] = size
    gathered: list = [None] * size
    dist.all_gather_object(gathered, found["tasks seen"])
    found["tasks seen"] = gathered
    if rank == 0:
        torch.save(found, sys.argv[1])
    distributed.close()
