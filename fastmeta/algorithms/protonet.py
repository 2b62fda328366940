"""Prototypical networks (Snell, Swersky & Zemel 2017) over a batch of tasks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastmeta.algorithms._batched import runner, tasks_first
from fastmeta.algorithms.common import TRAIN_SHOT, TRAIN_WAY, Learner, ProtoOutput, classification_output
from fastmeta.data import TaskBatch

__all__ = [
    "ProtoOutput",
    "protonet_step",
    "protonet_logits",
    "class_prototypes",
    "squared_distances",
    "embed",
    "check_labels",
]


def check_episodes(batch: TaskBatch, who: str, n_way: int | None) -> int:
    """Raises naming the argument unless `batch` is a TaskBatch of classification episodes (support_y and
    query_y class indices (T, N)); returns n_way (default: 1 + the largest support label)."""
    if not isinstance(batch, TaskBatch):
        raise TypeError(f"{who}: batch must be a fastmeta.TaskBatch, got {type(batch).__name__}")
    for name in ("support_y", "query_y"):
        y = getattr(batch, name)
        if y.dim() != 2 or y.is_floating_point():
            raise ValueError(f"{who}: {name} must hold class indices (T, N), got {y.dtype} {tuple(y.shape)}")
    if n_way is None:  # (reads the labels: on a GPU the host waits for it; pass n_way to avoid that)
        return int(batch.support_y.max()) + 1 if batch.support_y.numel() else 0
    return n_way


def check_labels(labels: Tensor, n_way: int, who: str, name: str) -> None:
    """Raises naming `name` unless every label is in [0, n_way). Checked where the labels are in host memory:
    reading them on a GPU would make the host wait for it at every step, so there, as F.one_hot and
    F.cross_entropy do on CUDA, an out-of-range label ends in a device-side assert instead."""
    if labels.device.type != "cpu" or not labels.numel():
        return
    lo, hi = (int(v) for v in torch.aminmax(labels))
    if lo < 0 or hi >= n_way:
        raise ValueError(f"{who}: {name} must be in [0, {n_way}), got [{lo}, {hi}]")


def embed(model: nn.Module, x: Tensor, strategy: str = "auto") -> Tensor:
    """`model` applied to each task's examples x (T, N, *x) -> (T, N, D), all tasks in one batched call.
    BatchNorm in training mode (or without running statistics) normalises each task with its own batch
    statistics, as an episode alone would be."""
    if x.dim() < 3:
        raise ValueError(f"embed: x must be (T, N, *x), got shape {tuple(x.shape)}")
    run = runner(model, strategy)
    out = tasks_first(run(dict(model.named_parameters()), x))
    return out.reshape(out.shape[0], out.shape[1], -1)


def embed_episodes(model: nn.Module, batch: TaskBatch, strategy: str = "auto") -> tuple[Tensor, Tensor]:
    """(support (T, Ns, D), query (T, Nq, D)) embeddings, each task's support and query embedded together (one
    BatchNorm batch per episode, as in Snell et al.'s code)."""
    z = embed(model, torch.cat([batch.support_x, batch.query_x], 1), strategy)
    Ns = batch.support_x.shape[1]
    return z[:, :Ns], z[:, Ns:]


def class_prototypes(support: Tensor, labels: Tensor, n_way: int) -> Tensor:
    """The mean embedding of each class: support (T, Ns, D), labels (T, Ns) in [0, n_way) -> (T, n_way, D).
    Every class needs at least one support example (checked for labels in host memory, see check_labels; on
    a GPU a class without one gets a NaN prototype)."""
    if support.dim() != 3 or labels.shape != support.shape[:2]:
        raise ValueError(
            f"class_prototypes: support must be (T, Ns, D) and labels (T, Ns), got {tuple(support.shape)} and "
            f"{tuple(labels.shape)}"
        )
    check_labels(labels, n_way, "class_prototypes", "labels")
    onehot = F.one_hot(labels.long(), n_way).to(support.dtype)  # (T, Ns, n_way)
    counts = onehot.sum(1)  # (T, n_way)
    if counts.device.type == "cpu" and bool((counts == 0).any()):
        raise ValueError(f"class_prototypes: every task needs a support example of each of the {n_way} classes")
    return torch.bmm(onehot.transpose(1, 2), support) / counts.unsqueeze(-1)


def squared_distances(query: Tensor, prototypes: Tensor) -> Tensor:
    """||q - c||^2 for every query and prototype: query (T, Nq, D), prototypes (T, C, D) -> (T, Nq, C), as one
    batched matmul (|q|^2 + |c|^2 - 2 q.c), clamped at 0 against rounding."""
    sq = query.pow(2).sum(-1, keepdim=True) + prototypes.pow(2).sum(-1).unsqueeze(1)
    return torch.baddbmm(sq, query, prototypes.transpose(1, 2), alpha=-2).clamp_min(0)


def protonet_logits(model: nn.Module, batch: TaskBatch, n_way: int | None = None, strategy: str = "auto") -> Tensor:
    """Query logits (T, Nq, n_way): minus the squared distance of each query embedding to the class means of
    its task's support embeddings. Support and query of a task are embedded together (one batch, as in
    Snell et al.'s code). n_way: default 1 + the largest support label."""
    n_way = check_episodes(batch, "protonet", n_way)
    support, query = embed_episodes(model, batch, strategy)
    return -squared_distances(query, class_prototypes(support, batch.support_y, n_way))


def protonet_step(model: nn.Module, batch: TaskBatch, n_way: int | None = None, strategy: str = "auto") -> ProtoOutput:
    """The prototypical-network loss of T tasks: cross-entropy of the query logits (protonet_logits) against
    query_y; backward and an optimiser step train the embedding `model`."""
    return classification_output(protonet_logits(model, batch, n_way, strategy), batch.query_y)


def _predict(config, model: nn.Module, aux: nn.Module | None, batch: TaskBatch, inner_steps: int) -> Tensor:  # noqa: ANN001
    with torch.no_grad():
        return protonet_logits(model, batch, config.n_way)


PROTONET = Learner(
    name="protonet",
    summary="prototypical networks: a Conv4 embedding, queries classified by the nearest class mean "
    "(--train-way 60 trains on wider episodes than it tests, as Snell et al.)",
    options=(TRAIN_WAY, TRAIN_SHOT),
    objective=lambda config, model, aux, batch: protonet_step(model, batch, config.train_way or config.n_way),
    predict=_predict,
    head=False,
    tasks=("classification",),
)
