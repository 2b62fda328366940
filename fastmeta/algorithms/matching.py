"""Matching networks (Vinyals, Blundell, Lillicrap, Kavukcuoglu & Wierstra 2016) over a batch of tasks."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastmeta.algorithms.common import TRAIN_SHOT, TRAIN_WAY, Learner, Option, ProtoOutput, classification_output
from fastmeta.algorithms.protonet import check_episodes, check_labels, embed_episodes
from fastmeta.data import TaskBatch

__all__ = ["FullContextEmbedding", "matching_log_probs", "matching_step"]


class FullContextEmbedding(nn.Module):
    """Vinyals et al.'s full-context embeddings of dimension `dim`, for T tasks at once.

    support (T, Ns, D): g(x_i, S) = g'(x_i) + the forward and backward states of a bidirectional LSTM over the
    support sequence. query (T, Nq, D): f(x, S) = the state after `steps` steps of an LSTM that reads g'(x) and
    attends (softmax of dot products) over g(S), plus g'(x)."""

    def __init__(self, dim: int, steps: int = 5) -> None:
        super().__init__()
        if steps < 1:
            raise ValueError(f"FullContextEmbedding: steps must be >= 1, got {steps}")
        self.dim, self.steps = dim, steps
        self.support_lstm = nn.LSTM(dim, dim, batch_first=True, bidirectional=True)
        self.query_cell = nn.LSTMCell(dim, 2 * dim)  # state [h, r]: the hidden state and the read-out

    def forward(self, support: Tensor, query: Tensor) -> tuple[Tensor, Tensor]:
        out, _ = self.support_lstm(support)  # (T, Ns, 2 D)
        g = support + out[..., : self.dim] + out[..., self.dim :]
        T, Nq, D = query.shape
        x = query.reshape(T * Nq, D)
        h = x.new_zeros(T * Nq, 2 * D)
        c = x.new_zeros(T * Nq, 2 * D)
        for _ in range(self.steps):
            h_hat, c = self.query_cell(x, (h, c))
            q = (h_hat[:, :D] + x).view(T, Nq, D)
            attention = torch.softmax(torch.bmm(q, g.transpose(1, 2)), -1)  # (T, Nq, Ns)
            r = torch.bmm(attention, g).reshape(T * Nq, D)
            h = torch.cat([q.reshape(T * Nq, D), r], 1)
        return g, q


def matching_log_probs(
    model: nn.Module,
    batch: TaskBatch,
    n_way: int | None = None,
    fce: FullContextEmbedding | None = None,
    scale: float = 1.0,
    strategy: str = "auto",
) -> Tensor:
    """Query log-probabilities (T, Nq, n_way): log sum_i a(x, x_i) onehot(y_i), where the attention a is the
    softmax over the task's support set of `scale` * the cosine similarity of the embeddings (Vinyals et al.:
    scale 1). Support and query are embedded together (one BatchNorm batch per task); with `fce`, through full-
    context embeddings. n_way: default 1 + the largest support label."""
    n_way = check_episodes(batch, "matching", n_way)
    check_labels(batch.support_y, n_way, "matching", "support_y")
    support, query = embed_episodes(model, batch, strategy)
    if fce is not None:
        support, query = fce(support, query)
    similarity = torch.bmm(F.normalize(query, dim=-1), F.normalize(support, dim=-1).transpose(1, 2))
    attention = torch.log_softmax(scale * similarity, -1)  # (T, Nq, Ns)
    # log sum over the support examples of each class, in log space (no log of a 0 probability)
    onehot = F.one_hot(batch.support_y.long(), n_way).to(support.dtype)  # (T, Ns, n_way)
    mask = torch.where(onehot > 0, 0.0, -math.inf).unsqueeze(1)  # (T, 1, Ns, n_way)
    return torch.logsumexp(attention.unsqueeze(-1) + mask, dim=2)


def matching_step(
    model: nn.Module,
    batch: TaskBatch,
    n_way: int | None = None,
    fce: FullContextEmbedding | None = None,
    scale: float = 1.0,
    strategy: str = "auto",
) -> ProtoOutput:
    """The matching-network loss of T tasks: the negative log-likelihood of query_y under
    matching_log_probs; `logits` of the result are those log-probabilities."""
    # log-probabilities as logits: their cross-entropy is the negative log-likelihood
    return classification_output(matching_log_probs(model, batch, n_way, fce, scale, strategy), batch.query_y)


def _build(config, backbone: nn.Module) -> tuple[nn.Module, nn.Module | None]:  # noqa: ANN001
    fce = FullContextEmbedding(backbone.embedding_size, steps=config.fce) if config.fce else None
    return backbone, fce


def _objective(config, model: nn.Module, fce: nn.Module | None, batch: TaskBatch) -> ProtoOutput:  # noqa: ANN001
    return matching_step(model, batch, config.train_way or config.n_way, fce=fce, scale=config.scale)


def _predict(config, model: nn.Module, fce: nn.Module | None, batch: TaskBatch, inner_steps: int) -> Tensor:  # noqa: ANN001
    with torch.no_grad():
        return matching_log_probs(model, batch, config.n_way, fce, config.scale)


MATCHING = Learner(
    name="matching",
    summary="matching networks: attention over the support set by cosine similarity",
    options=(
        TRAIN_WAY,
        TRAIN_SHOT,
        Option("fce", int, "full-context embeddings, with this many attention steps", valid=lambda v: v >= 1,
               bound=">= 1", metavar="STEPS"),
        Option("scale", float, "cosine similarities times this before the softmax (Vinyals et al.: 1)", default=1.0,
               valid=lambda v: v > 0, bound="> 0"),
    ),
    objective=_objective,
    predict=_predict,
    build=_build,
    head=False,
    tasks=("classification",),
)  # fmt: skip
