"""Backbones of few-shot learning, each an nn.Sequential of a `features` body and a `head` (ANIL:
adapt_params=["head"]); maml_step runs them batched over tasks (Conv4, MLP and KochNet as a chain of layers,
ResNet-12 through its traced graph)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Conv4", "MLP", "KochNet", "ResNet12", "DropBlock", "MODELS", "BACKBONES", "Backbone", "from_config"]


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


class DropBlock(nn.Module):
    """DropBlock (Ghiasi et al. 2018): in training, zero `block_size` x `block_size` squares of each feature map,
    placed at random so that about `drop_rate` of the activations are dropped, and rescale each example by
    (elements / kept elements); the identity in eval mode or with drop_rate 0. x (N, C, H, W) -> same shape.

    The rescaling is per example (MetaOptNet's code rescales by the whole batch's count), so that each example's
    output depends on that example alone: the task-batched runner calls it once on all tasks' examples
    (`per_example`)."""

    per_example = True  # fastmeta.algorithms._batched: acts on each example on its own, random or not

    def __init__(self, drop_rate: float = 0.1, block_size: int = 5) -> None:
        super().__init__()
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"DropBlock: drop_rate must be in [0, 1), got {drop_rate}")
        if block_size < 1:
            raise ValueError(f"DropBlock: block_size must be at least 1, got {block_size}")
        self.drop_rate, self.block_size = drop_rate, block_size

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.drop_rate == 0.0:
            return x
        n, c, h, w = x.shape
        bs = min(self.block_size, h, w)
        # A block's corner is drawn where the whole block fits; gamma keeps the expected dropped fraction at
        # drop_rate. Corner (i, j) drops rows i..i+bs-1 and columns j..j+bs-1: a max over a bs window.
        gamma = self.drop_rate / bs**2 * (h * w) / ((h - bs + 1) * (w - bs + 1))
        corners = (torch.rand(n, c, h - bs + 1, w - bs + 1, device=x.device) < gamma).to(x.dtype)
        dropped = F.max_pool2d(F.pad(corners, (bs - 1,) * 4), bs, 1)
        keep = 1.0 - dropped
        scale = keep[0].numel() / keep.sum((1, 2, 3), keepdim=True).clamp(min=1.0)
        return x * (keep * scale)

    def extra_repr(self) -> str:
        return f"drop_rate={self.drop_rate}, block_size={self.block_size}"


class ResidualBlock(nn.Module):
    """A ResNet-12 block: 3 x [conv3x3 (no bias), BatchNorm] with LeakyReLU(0.1) between them, a shortcut
    conv1x1 + BatchNorm, their sum, LeakyReLU(0.1), maxpool 2, then an optional drop (dropout or DropBlock).
    x (N, in_channels, H, W) -> (N, out_channels, H // 2, W // 2)."""

    def __init__(self, in_channels: int, out_channels: int, drop: nn.Module | None = None) -> None:
        super().__init__()

        def bn() -> nn.BatchNorm2d:
            return nn.BatchNorm2d(out_channels, track_running_stats=False)

        self.conv1, self.bn1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), bn()
        self.conv2, self.bn2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), bn()
        self.conv3, self.bn3 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), bn()
        self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), bn())
        self.act = nn.LeakyReLU(0.1)
        self.pool = nn.MaxPool2d(2)
        self.drop = drop if drop is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.drop(self.pool(self.act(out + self.shortcut(x))))


class ResNet12(nn.Sequential):
    """ResNet-12 of MetaOptNet (Lee et al. 2019) and TADAM (Oreshkin et al. 2018): 4 residual blocks of widths
    `widths` (64-160-320-640), each 3 x [conv3x3, BatchNorm, LeakyReLU(0.1)] (the last LeakyReLU after adding a
    conv1x1 + BatchNorm shortcut) and maxpool 2; then global average pooling to widths[-1] features and, with
    `n_way`, a linear head. Input (N, in_channels, S, S), S >= 16 (84 for miniImageNet, 32 for CIFAR-FS/FC100);
    output (N, n_way), or with n_way=None (no head: nn.Identity) the (N, widths[-1]) embedding.

    BatchNorm uses batch statistics and keeps no running statistics (track_running_stats=False), as Conv4 and
    MAML's code: under maml_step each task's support and query sets are normalised by their own statistics.
    drop_rate > 0 adds MetaOptNet's regularisation after each block: dropout after blocks 1-2 and, with
    `drop_block` (default), DropBlock of `block_size` squares after blocks 3-4 (plain dropout there otherwise).
    Off by default. Both act per example, so the model still runs task-batched.
    """

    def __init__(
        self,
        n_way: int | None = 5,
        in_channels: int = 3,
        widths: tuple[int, ...] | list[int] = (64, 160, 320, 640),
        image_size: int = 84,
        drop_rate: float = 0.0,
        drop_block: bool = True,
        block_size: int = 5,
    ) -> None:
        widths = [int(w) for w in widths]
        if len(widths) != 4 or min(widths) < 1:
            raise ValueError(f"ResNet12: widths must be 4 positive channel counts, got {widths}")
        if image_size < 16:
            raise ValueError(f"ResNet12: image_size must be at least 16 (4 poolings by 2), got {image_size}")
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"ResNet12: drop_rate must be in [0, 1), got {drop_rate}")
        blocks: OrderedDict[str, nn.Module] = OrderedDict()
        channels = in_channels
        for i, width in enumerate(widths):
            drop: nn.Module | None = None
            if drop_rate > 0:
                drop = DropBlock(drop_rate, block_size) if drop_block and i >= 2 else nn.Dropout(drop_rate)
            blocks[f"block{i + 1}"] = ResidualBlock(channels, width, drop)
            channels = width
        blocks["pool"] = nn.AdaptiveAvgPool2d(1)
        blocks["flatten"] = nn.Flatten()
        features = nn.Sequential(blocks)
        head = nn.Identity() if n_way is None else nn.Linear(channels, n_way)
        super().__init__(OrderedDict(features=features, head=head))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu", a=0.1)
        self.embedding_size = channels  # the features' output size
        self.config = {
            "model": "ResNet12",
            "n_way": n_way,
            "in_channels": in_channels,
            "widths": widths,
            "image_size": image_size,
            "drop_rate": drop_rate,
            "drop_block": drop_block,
            "block_size": block_size,
        }


# Every model a checkpoint can name ("model" in its config), by that name: the class, called with the rest of the
# config as keyword arguments. A new backbone: its class (with a `config` dict naming it), an entry here and one in
# BACKBONES.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "Conv4": Conv4,
    "MLP": lambda sizes: MLP(tuple(sizes)),
    "KochNet": KochNet,
    "ResNet12": ResNet12,
}


def from_config(config: dict) -> nn.Module:
    """The model a checkpoint's `config` describes (as in its `.config`)."""
    kind = config.get("model")
    if kind not in MODELS:
        raise ValueError(f"unknown model {kind!r} in the checkpoint's config")
    return MODELS[kind](**{k: v for k, v in config.items() if k != "model"})


@dataclass(frozen=True)
class Backbone:
    """A network a classifying run can build (`--backbone NAME`). config(hidden, image_size, channels, n_way):
    its from_config dict for a run's --hidden and --image-size, the dataset's image channels and the head's
    outputs (None: no head, an embedding network). embedding_only: it has no head, so only the learners that
    read embeddings use it."""

    config: Callable[[int, int, int, int | None], dict]
    embedding_only: bool = False


BACKBONES: dict[str, Backbone] = {
    "conv4": Backbone(
        lambda hidden, size, channels, n_way: {
            "model": "Conv4", "n_way": n_way, "in_channels": channels, "hidden": hidden, "image_size": size,
        }
    ),
    "koch": Backbone(  # Koch et al.'s Siamese network, for 105x105 images
        lambda hidden, size, channels, n_way: {
            "model": "KochNet", "in_channels": channels, "image_size": size, "embedding_size": 4096,
        },
        embedding_only=True,
    ),
    "resnet12": Backbone(  # MetaOptNet's ResNet-12, widths 64-160-320-640
        lambda hidden, size, channels, n_way: {
            "model": "ResNet12", "n_way": n_way, "in_channels": channels, "image_size": size,
        }
    ),
}  # fmt: skip
