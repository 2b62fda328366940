"""What several learners share: per-task query accuracy, the per-task fast-weight dict, and the output of the
learners that classify each query by its logits over the episode's classes."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

__all__ = ["ClassificationOutput", "ProtoOutput", "classification_output", "query_accuracy", "per_task_fast_weights"]


def query_accuracy(pred: Tensor, target: Tensor) -> Tensor | None:
    """(T,) each task's query accuracy, for classification (predictions (T, N, C), class indices (T, N)); else
    None (regression)."""
    if pred.dim() == 3 and target.dim() == 2 and not target.is_floating_point() and not target.is_complex():
        return (pred.detach().argmax(-1) == target).to(pred.dtype).mean(1)
    return None


def per_task_fast_weights(
    params: dict[str, Tensor], adapted: list[str], fast: list[Tensor], T: int
) -> dict[str, Tensor]:
    """name -> (T, *S): the fast weights, the shared initial ones expanded where no step was taken."""
    return {n: f if f.dim() > params[n].dim() else f.expand(T, *f.shape) for n, f in zip(adapted, fast)}


@dataclass
class ClassificationOutput:
    """What a learner that scores each query against the episode's classes computed for T tasks (prototypical,
    matching and Siamese networks, SNAIL).

    loss: mean query loss over the tasks (0-d, differentiable). task_losses: (T,), differentiable.
    accuracy: (T,) query accuracy. logits: (T, Nq, n_way) the query scores (detached; for protonet the
    negative squared distances to the prototypes).
    """

    loss: Tensor
    task_losses: Tensor
    accuracy: Tensor
    logits: Tensor


ProtoOutput = ClassificationOutput  # its first user's name, kept: public API


def classification_output(logits: Tensor, query_y: Tensor, losses: Tensor | None = None) -> ClassificationOutput:
    """The ClassificationOutput of query logits (T, Nq, C) against query_y (T, Nq): per-task mean cross-entropy
    (or the given per-task `losses`), their mean, accuracy, and the detached logits."""
    T, Nq, C = logits.shape
    if losses is None:
        per_example = F.cross_entropy(logits.reshape(T * Nq, C), query_y.reshape(-1).long(), reduction="none")
        losses = per_example.view(T, Nq).mean(1)
    accuracy = (logits.detach().argmax(-1) == query_y).float().mean(1)
    return ClassificationOutput(losses.mean(), losses, accuracy, logits.detach())
