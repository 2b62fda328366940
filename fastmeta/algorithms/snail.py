"""SNAIL, the simple neural attentive meta-learner (Mishra, Rohaninejad, Chen & Abbeel 2018), for N-way K-shot
classification over a batch of tasks.

Each query is classified at the end of a sequence of the task's N*K support examples, each an (embedding,
one-hot label) pair, followed by the query's (embedding, zeros): temporal convolutions (causal, dilated,
gated) and causal soft attention read the support pairs. The sequences of all queries of all tasks run as one
batch; every image is embedded once, each task's images as one BatchNorm batch."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastmeta.algorithms.common import Learner, ProtoOutput, classification_output
from fastmeta.algorithms.protonet import check_episodes, embed_episodes
from fastmeta.data import TaskBatch

__all__ = ["SNAIL", "snail_step", "DenseBlock", "TCBlock", "AttentionBlock"]


class DenseBlock(nn.Module):
    """A causal dilated convolution (kernel 2) with a gated activation, its output appended to its input:
    (B, L, C) -> (B, L, C + filters)."""

    def __init__(self, in_channels: int, filters: int, dilation: int) -> None:
        super().__init__()
        self.dilation = dilation
        self.conv = nn.Conv1d(in_channels, 2 * filters, kernel_size=2, dilation=dilation)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv(F.pad(x.transpose(1, 2), (self.dilation, 0)))  # left padding: causal
        f, g = h.chunk(2, 1)
        return torch.cat([x, (torch.tanh(f) * torch.sigmoid(g)).transpose(1, 2)], -1)


class TCBlock(nn.Module):
    """Dense blocks with dilations 1, 2, 4, ... up to the sequence length: (B, L, C) -> (B, L, C + n * filters),
    n = ceil(log2 L)."""

    def __init__(self, in_channels: int, seq_len: int, filters: int) -> None:
        super().__init__()
        layers = max(1, math.ceil(math.log2(seq_len)))
        self.blocks = nn.ModuleList(DenseBlock(in_channels + i * filters, filters, 2**i) for i in range(layers))
        self.out_channels = in_channels + layers * filters

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class AttentionBlock(nn.Module):
    """Causal single-head soft attention, its read-out appended: (B, L, C) -> (B, L, C + value_size)."""

    def __init__(self, in_channels: int, key_size: int, value_size: int) -> None:
        super().__init__()
        self.key = nn.Linear(in_channels, key_size)
        self.query = nn.Linear(in_channels, key_size)
        self.value = nn.Linear(in_channels, value_size)
        self.scale = 1 / math.sqrt(key_size)

    def forward(self, x: Tensor) -> Tensor:
        L = x.shape[1]
        logits = torch.bmm(self.query(x), self.key(x).transpose(1, 2)) * self.scale  # (B, L, L)
        future = torch.ones(L, L, dtype=torch.bool, device=x.device).triu(1)
        attention = torch.softmax(logits.masked_fill(future, -math.inf), -1)
        return torch.cat([x, torch.bmm(attention, self.value(x))], -1)


class SNAIL(nn.Module):
    """SNAIL for `n_way`-way `k_shot`-shot episodes on top of `embedding` (e.g. fastmeta.models.Conv4(None),
    output size `embedding_size`): attention(64, 32), TC(128), attention(256, 128), TC(128),
    attention(512, 256), then a linear layer to n_way logits (the paper's Omniglot architecture)."""

    def __init__(self, n_way: int, k_shot: int, embedding: nn.Module, embedding_size: int) -> None:
        super().__init__()
        if n_way < 1 or k_shot < 1:
            raise ValueError(f"SNAIL: n_way and k_shot must be >= 1, got {n_way} and {k_shot}")
        self.n_way, self.k_shot = n_way, k_shot
        self.embedding = embedding
        L, C = n_way * k_shot + 1, embedding_size + n_way
        self.attention1 = AttentionBlock(C, 64, 32)
        self.tc1 = TCBlock(C + 32, L, 128)
        self.attention2 = AttentionBlock(self.tc1.out_channels, 256, 128)
        self.tc2 = TCBlock(self.tc1.out_channels + 128, L, 128)
        self.attention3 = AttentionBlock(self.tc2.out_channels, 512, 256)
        self.out = nn.Linear(self.tc2.out_channels + 256, n_way)

    def forward(self, batch: TaskBatch, strategy: str = "auto") -> Tensor:
        """Query logits (T, Nq, n_way) of a batch of n_way-way k_shot-shot tasks."""
        check_episodes(batch, "SNAIL", self.n_way)
        T, Ns = batch.support_y.shape[:2]
        if Ns != self.n_way * self.k_shot:
            raise ValueError(
                f"SNAIL: built for {self.n_way}-way {self.k_shot}-shot sequences of {self.n_way * self.k_shot} support "
                f"examples, got {Ns}"
            )
        support, query = embed_episodes(self.embedding, batch, strategy)
        Nq, E = query.shape[1], query.shape[-1]
        labels = F.one_hot(batch.support_y.long(), self.n_way).to(query.dtype)
        support = torch.cat([support, labels], -1)  # (T, Ns, E + n_way)
        query = torch.cat([query, query.new_zeros(T, Nq, self.n_way)], -1)
        seq = torch.cat([support.unsqueeze(1).expand(T, Nq, Ns, E + self.n_way), query.unsqueeze(2)], 2)
        x = seq.reshape(T * Nq, Ns + 1, E + self.n_way)
        x = self.attention3(self.tc2(self.attention2(self.tc1(self.attention1(x)))))
        return self.out(x[:, -1]).view(T, Nq, self.n_way)


def snail_step(model: SNAIL, batch: TaskBatch, strategy: str = "auto") -> ProtoOutput:
    """The SNAIL loss of T tasks: cross-entropy of each query's prediction at the end of its sequence."""
    return classification_output(model(batch, strategy), batch.query_y)


def _predict(config, model: SNAIL, aux: nn.Module | None, batch: TaskBatch, inner_steps: int) -> Tensor:  # noqa: ANN001
    with torch.no_grad():
        return model(batch)


SNAIL_LEARNER = Learner(
    name="snail",
    summary="SNAIL: temporal convolutions and causal attention over the sequence of (image, label) support "
    "pairs, then the query",
    objective=lambda config, model, aux, batch: snail_step(model, batch),
    predict=_predict,
    build=lambda config, backbone: (SNAIL(config.n_way, config.k_shot, backbone, backbone.embedding_size), None),
    head=False,
    tasks=("classification",),
    built_for={
        "n_way": "its output layer has n_way logits",
        "k_shot": "its sequence of support pairs has a fixed length (so it also trains on the k_shot it tests)",
    },
)
