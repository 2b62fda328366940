"""Backbones of few-shot learning, as nn.Sequential (so that maml_step runs them batched over tasks), each a
`features` body and a `head` (ANIL: adapt_params=["head"])."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

__all__ = ["Conv4", "MLP", "KochNet"]


class Conv4(nn.Sequential):
    """The standard few-shot backbone (Vinyals et al. 2016; Finn et al. 2017): 4 x [conv3x3 `hidden`,
    BatchNorm, ReLU, maxpool 2], then a linear head to `n_way` logits. Input (N, in_channels, S, S) in [0, 1];
    output (N, n_way). BatchNorm uses batch statistics (no running statistics), as in MAML's code.
    n_way=None: no head (nn.Identity), the embedding network of metric learners: output (N, hidden * (S//16)^2).
    """

    def __init__(self, n_way: int | None = 5, in_channels: int = 1, hidden: int = 64, image_size: int = 28) -> None:
        blocks: list[nn.Module] = []
        size = image_size
        for i in range(4):
            blocks += [
                nn.Conv2d(in_channels if i == 0 else hidden, hidden, 3, padding=1),
                nn.BatchNorm2d(hidden, track_running_stats=False),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            size //= 2
        if size < 1:
            raise ValueError(f"Conv4: image_size must be at least 16, got {image_size}")
        features = nn.Sequential(*blocks, nn.Flatten())
        head = nn.Identity() if n_way is None else nn.Linear(hidden * size * size, n_way)
        super().__init__(OrderedDict(features=features, head=head))
        self.embedding_size = hidden * size * size  # the features' output size
        self.config = {
            "model": "Conv4",
            "n_way": n_way,
            "in_channels": in_channels,
            "hidden": hidden,
            "image_size": image_size,
        }


class MLP(nn.Sequential):
    """Fully connected ReLU network, sizes (in, hidden..., out); the sinusoid model of Finn et al. is
    MLP((1, 40, 40, 1)). Input (N, in), output (N, out)."""

    def __init__(self, sizes: tuple[int, ...] = (1, 40, 40, 1)) -> None:
        if len(sizes) < 2:
            raise ValueError(f"MLP: sizes needs an input and an output size, got {sizes}")
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-2], sizes[1:-1]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        super().__init__(OrderedDict(features=nn.Sequential(*layers), head=nn.Linear(sizes[-2], sizes[-1])))
        self.config = {"model": "MLP", "sizes": list(sizes)}


class KochNet(nn.Sequential):
    """The Siamese backbone of Koch, Zemel & Salakhutdinov (2015) for 105x105 Omniglot: conv 64@10x10,
    maxpool, conv 128@7x7, maxpool, conv 128@4x4, maxpool, conv 256@4x4 (each with ReLU), then a sigmoid
    linear layer to `embedding_size` (4096 in the paper). Input (N, in_channels, S, S), output
    (N, embedding_size). Koch et al. add no BatchNorm; `batch_norm=True` adds one (batch statistics) after
    each convolution, which makes it train far faster."""

    def __init__(
        self, in_channels: int = 1, image_size: int = 105, embedding_size: int = 4096, batch_norm: bool = False
    ) -> None:
        layers: list[nn.Module] = []
        size, channels = image_size, in_channels
        for i, (out, k) in enumerate(((64, 10), (128, 7), (128, 4), (256, 4))):
            layers.append(nn.Conv2d(channels, out, k))
            size, channels = size - k + 1, out
            if batch_norm:
                layers.append(nn.BatchNorm2d(out, track_running_stats=False))
            layers.append(nn.ReLU())
            if i < 3:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            if size < 1:
                raise ValueError(f"KochNet: image_size {image_size} is too small (the paper uses 105; at least 65)")
        features = nn.Sequential(*layers, nn.Flatten())
        head = nn.Sequential(nn.Linear(channels * size * size, embedding_size), nn.Sigmoid())
        super().__init__(OrderedDict(features=features, head=head))
        self.embedding_size = embedding_size
        self.config = {
            "model": "KochNet",
            "in_channels": in_channels,
            "image_size": image_size,
            "embedding_size": embedding_size,
            "batch_norm": batch_norm,
        }


def from_config(config: dict) -> nn.Module:
    """The model a checkpoint's `config` describes (as in its `.config`)."""
    kind = config.get("model")
    args = {k: v for k, v in config.items() if k != "model"}
    if kind == "Conv4":
        return Conv4(**args)
    if kind == "MLP":
        return MLP(tuple(args["sizes"]))
    if kind == "KochNet":
        return KochNet(**args)
    raise ValueError(f"unknown model {kind!r} in the checkpoint's config")
