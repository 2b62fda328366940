"""Siamese networks (Koch, Zemel & Salakhutdinov 2015) trained with fastmeta's fused contrastive loss, and
N-way one-shot classification by the nearest support embedding, over a batch of tasks."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fastmeta import ops
from fastmeta.algorithms.common import TRAIN_SHOT, TRAIN_WAY, Learner, Option, ProtoOutput, classification_output
from fastmeta.algorithms.protonet import check_episodes, embed, squared_distances
from fastmeta.data import TaskBatch

__all__ = ["siamese_step", "nearest_support_logits"]

MODES = ("all_pairs", "pairs")


def nearest_support_logits(support: Tensor, support_y: Tensor, query: Tensor, n_way: int) -> Tensor:
    """Minus the Euclidean distance from each query embedding to the nearest support embedding of each class:
    support (T, Ns, D), support_y (T, Ns), query (T, Nq, D) -> (T, Nq, n_way) (-inf for a class with no
    support example). argmax is the nearest-neighbour class."""
    distance = squared_distances(query, support).sqrt()  # (T, Nq, Ns)
    member = torch.nn.functional.one_hot(support_y.long(), n_way).bool()  # (T, Ns, n_way)
    masked = torch.where(member.unsqueeze(1), distance.unsqueeze(-1), math.inf)  # (T, Nq, Ns, n_way)
    return -masked.amin(2)


def siamese_step(
    model: nn.Module,
    batch: TaskBatch,
    margin: float = 1.0,
    mode: str = "all_pairs",
    n_way: int | None = None,
    strategy: str = "auto",
) -> ProtoOutput:
    """The contrastive loss of T tasks, each embedded by `model` as one batch (support and query together).

    mode "all_pairs": every pair of the task's Ns + Nq examples (fastmeta.ops.contrastive_loss_all_pairs,
    linear memory). mode "pairs": each query against each support example (fastmeta.ops.contrastive_loss).
    Same class = pulled together, different = pushed past `margin`. The result's logits (T, Nq, n_way) and
    accuracy are those of classifying each query by its nearest support embedding (nearest_support_logits).
    """
    n_way = check_episodes(batch, "siamese", n_way)
    if mode not in MODES:
        raise ValueError(f"siamese: mode must be one of {MODES}, got {mode!r}")
    Ns = batch.support_x.shape[1]
    z = embed(model, torch.cat([batch.support_x, batch.query_x], 1), strategy)
    support, query = z[:, :Ns], z[:, Ns:]
    if mode == "all_pairs":
        labels = torch.cat([batch.support_y, batch.query_y], 1)
        losses = torch.stack([ops.contrastive_loss_all_pairs(z[t], labels[t], margin) for t in range(z.shape[0])])
    else:
        T, Nq, D = query.shape
        x1 = query.unsqueeze(2).expand(T, Nq, Ns, D).reshape(-1, D)
        x2 = support.unsqueeze(1).expand(T, Nq, Ns, D).reshape(-1, D)
        same = batch.query_y.unsqueeze(2) == batch.support_y.unsqueeze(1)  # (T, Nq, Ns)
        losses = ops.contrastive_loss(x1, x2, same.reshape(-1), margin, reduction="none").view(T, Nq * Ns).mean(1)
    logits = nearest_support_logits(support.detach(), batch.support_y, query.detach(), n_way)
    return classification_output(logits, batch.query_y, losses)


def _predict(config, model: nn.Module, aux: nn.Module | None, batch: TaskBatch, inner_steps: int) -> Tensor:  # noqa: ANN001
    with torch.no_grad():
        return siamese_step(model, batch, config.margin, config.pairs, config.n_way).logits


SIAMESE = Learner(
    name="siamese",
    summary="Siamese networks: a contrastive loss through fastmeta.ops, queries classified by the nearest "
    "support embedding (--backbone koch --image-size 105: Koch et al.'s network)",
    options=(
        TRAIN_WAY,
        TRAIN_SHOT,
        Option("margin", float, "contrastive margin", default=1.0, valid=lambda v: v > 0, bound="> 0"),
        Option("pairs", str, "every pair of an episode (all_pairs) or each query with each support example (pairs)",
               default="all_pairs", choices=("all_pairs", "pairs")),
    ),
    objective=lambda config, model, aux, batch: siamese_step(
        model, batch, config.margin, config.pairs, config.train_way or config.n_way
    ),  # a loss to backpropagate; the options are attributes of config
    predict=_predict,  # query logits of a test batch: siamese_step(...).logits under torch.no_grad()
    head=False,  # an embedding network: the backbone without an n_way head, tested on any n_way
    tasks=("classification",),
)  # fmt: skip
