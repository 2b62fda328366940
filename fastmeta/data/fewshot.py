"""The image datasets few-shot papers report on, read from the files a user already has, in the layouts they are
distributed in, decoded once to uint8 and cached.

    data = load_fewshot("miniimagenet", "~/data/mini-imagenet")           # 84x84; cifarfs and fc100: 32x32
    episodes = data.episodes("train", n_way=5, k_shot=1, n_query=15, tasks=4, seed=0, augment=True)
    batch = episodes[0]                                                     # TaskBatch, support_x (4, 5, 3, 84, 84)

Layouts read (`root`: the dataset's folder, or the folder that holds it):
- folder: `train/<class>/*`, `val/<class>/*`, `test/<class>/*` (any image format PIL reads).
- miniimagenet: `mini-imagenet-cache-{train,validation,test}.pkl` (dicts of `image_data` (N, 84, 84, 3) uint8
  and `class_dict` {class: [indices]}); or Ravi & Larochelle's `train.csv`, `val.csv`, `test.csv` (header
  `filename,label`) with the images they name found by file name in `images/` (flat or in class folders) or, with
  no `images/`, in any folders beside the csv files (mirrors that store them in class folders of their own
  split, e.g. `train/<wnid>/`, `val/<wnid>/`: only the csv files decide the parts). A listed file that is missing,
  listed twice or found twice is an error naming the first and the count.
- cifarfs: `data/<class>/*.png` with `splits/bertinetto/{train,val,test}.txt` (a class name a line), or the same
  files beside or inside `data/`.
- fc100: CIFAR-100's python pickles (`cifar-100-python/{train,test,meta}`), split by superclass (Oreshkin et al.).
- cub: `CUB_200_2011/images/<NNN.name>/*.jpg` (with or without the archive's metadata files beside it), Chen et
  al.'s split of the sorted classes: i % 2 == 0 train, i % 4 == 1 val, i % 4 == 3 test.

A copy with other class counts than the split papers report (a partial download) loads with one warning naming
both.

Resizing (`resize`): "square" resizes every image to image_size x image_size (Lanczos), as Ravi & Larochelle's and
MAML's mini-ImageNet scripts did (the default of miniimagenet, cifarfs, fc100); "crop" resizes the shorter side to
image_size and keeps the centre square, as torchvision's Resize(size) + CenterCrop(size) (the default of cub and
folder, whose images are not square). JPEGs much larger than image_size are decoded at 1/2, 1/4 or 1/8 scale by
libjpeg (PIL's `draft`), still at least image_size, before the Lanczos resize: 3x faster on ImageNet-sized files.

Each split is stored class-major, (C, E, 3, S, S) uint8 with E the largest class, zero-padded past each class's
count (CUB has 41 to 60 images a class): every image is kept, and EpisodeSampler draws only valid ones. Episodes
are normalised with the per-channel mean and std of the dataset's own train split (computed once, exactly, at
decoding). The cache (in `$FASTMETA_CACHE` or ~/.cache/fastmeta) is keyed by the files' names, sizes and times,
the source of this module and of the two it uses, DECODE_VERSION and Pillow's version; a newer cache of the same
dataset folder replaces older ones.

This module is the public surface; the layouts are found and read in fastmeta.data.layouts, the images decoded and
cached (DECODE_VERSION) in fastmeta.data.decoding.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from fastmeta.data import cache
from fastmeta.data.decoding import _build, _code_version, _from_cache
from fastmeta.data.episodes import ClassBatches, EpisodeSampler
from fastmeta.data.layouts import _CIFARFS, _CUB, _FC100, _FOLDER, _MINI_CSV, _MINI_PICKLE, PARTS, _find, _Layout

__all__ = [
    "FEWSHOT",
    "DatasetInfo",
    "EpisodeTransform",
    "FewShotDataset",
    "FewShotSplit",
    "load_fewshot",
    "random_crop_flip",
]

TRAINING = ("train", "trainval")  # the parts whose episodes may be augmented


@dataclass
class FewShotSplit:
    """One part of a dataset: images (C, E, 3, S, S) uint8, class c's first counts[c] valid and the rest zero
    padding; counts (C,) int64; classes, the C class names."""

    images: Tensor
    counts: Tensor
    classes: list[str]

    def __len__(self) -> int:
        return len(self.classes)


@dataclass
class FewShotDataset:
    """A dataset's splits ("train", "val", "test") with the normalisation of its train split.

    mean, std: per channel, of the train split's images in [0, 1]. augment_padding: pixels of zero padding of
    the random crop of `episodes(..., augment=True)`."""

    name: str
    layout: str
    root: str
    image_size: int
    resize: str
    splits: dict[str, FewShotSplit]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    augment_padding: int = 0
    cache_file: str | None = field(default=None, compare=False)

    def part(self, part: str) -> FewShotSplit:
        """ "train", "val", "test", or "trainval" (the train and val classes together)."""
        if part == "trainval":
            a, b = self.splits["train"], self.splits["val"]
            E = max(a.images.shape[1], b.images.shape[1])
            pad = lambda x: F.pad(x, (0, 0, 0, 0, 0, 0, 0, E - x.shape[1]))  # noqa: E731
            return FewShotSplit(torch.cat([pad(a.images), pad(b.images)]), torch.cat([a.counts, b.counts]),
                                a.classes + b.classes)  # fmt: skip
        if part not in self.splits:
            raise ValueError(f"{self.name}: part must be one of {[*PARTS, 'trainval']}, got {part!r}")
        return self.splits[part]

    def episodes(
        self,
        part: str,
        n_way: int,
        k_shot: int,
        n_query: int,
        tasks: int = 1,
        seed: int = 0,
        augment: bool = False,
        shard: tuple[int, int] = (0, 1),
        length: int = 10**6,
    ) -> EpisodeSampler:
        """Episodes of `part`: item i is a TaskBatch with support_x (tasks, n_way * k_shot, 3, S, S) and query_x
        (tasks, n_way * n_query, 3, S, S), normalised with the train split's mean and std. augment (training
        parts only): each image randomly cropped from a zero-padded copy and flipped horizontally, drawn from
        the task's own seed, so item i stays a function of (seed, i)."""
        if augment and part not in TRAINING:
            raise ValueError(f"augment is for the training episodes ({', '.join(TRAINING)}), not {part!r}")
        split = self.part(part)
        need = k_shot + n_query
        small = [(c, int(n)) for c, n in zip(split.classes, split.counts.tolist()) if n < need]
        if small:
            c, n = small[0]
            more = f" (and {len(small) - 1} more classes)" if len(small) > 1 else ""
            raise ValueError(
                f"{self.name} {part}: class {c!r} has {n} images, fewer than k_shot + n_query = {need} "
                f"(k_shot={k_shot}, n_query={n_query}){more}"
            )
        transform = EpisodeTransform(self.mean, self.std, self.augment_padding if augment else None)
        return EpisodeSampler(
            split.images, n_way, k_shot, n_query, tasks, seed, length, shard, class_sizes=split.counts,
            transform=transform,
        )  # fmt: skip

    def batches(
        self, part: str, batch_size: int, seed: int = 0, augment: bool = False, shard: tuple[int, int] = (0, 1)
    ) -> ClassBatches:
        """Shuffled mini-batches of every image of `part` with its class index (ClassBatches), normalised and
        augmented as `episodes` does."""
        if augment and part not in TRAINING:
            raise ValueError(f"augment is for the training parts ({', '.join(TRAINING)}), not {part!r}")
        split = self.part(part)
        transform = EpisodeTransform(self.mean, self.std, self.augment_padding if augment else None)
        return ClassBatches(split.images, batch_size, seed, shard=shard, class_sizes=split.counts, transform=transform)


class EpisodeTransform:
    """An EpisodeSampler transform: x (..., 3, S, S) in [0, 1] -> (x - mean) / std (in place), after a random
    crop with `padding` pixels of zero padding and a random horizontal flip of each image when padding is not
    None. Deterministic given the generator."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], padding: int | None = None) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.padding = padding

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        if self.padding is not None:
            x = random_crop_flip(x, self.padding, generator)
        return x.sub_(self.mean).div_(self.std)  # x is the sampler's own copy


def random_crop_flip(x: Tensor, padding: int, generator: torch.Generator | None = None) -> Tensor:
    """Each image of x (..., C, H, W) cropped at a random offset from a copy zero-padded by `padding` on every
    side (torchvision's RandomCrop(size, padding)), then flipped left-right with probability 1/2; batched, one
    gather for the crop and the flip."""
    shape = x.shape
    x = x.reshape(-1, *shape[-3:])
    B, C, H, W = x.shape
    offsets = torch.randint(0, 2 * padding + 1, (B, 2), generator=generator)
    flip = torch.rand(B, generator=generator) < 0.5
    columns = torch.where(flip.view(B, 1), torch.arange(W - 1, -1, -1), torch.arange(W))
    rows = (offsets[:, :1] + torch.arange(H)).view(B, 1, H, 1)
    cols = (offsets[:, 1:] + columns).view(B, 1, 1, W)
    xp = F.pad(x, (padding, padding, padding, padding)) if padding > 0 else x
    x = xp[torch.arange(B).view(B, 1, 1, 1), torch.arange(C).view(1, C, 1, 1), rows, cols]  # (B, C, H, W)
    return x.reshape(shape)


# ---------------------------------------------------------------------------------------------------------------
# The datasets.


@dataclass(frozen=True)
class DatasetInfo:
    """A dataset's defaults and layouts. padding: the augmentation's crop padding at image_size (scaled with
    other sizes). way_shots: the (n_way, k_shot) episodes papers report, with 15 queries a class."""

    name: str
    title: str
    image_size: int
    resize: str
    padding: int
    layouts: tuple[_Layout, ...]
    classes: tuple[int, int, int] | None  # train, val, test classes of the full dataset (None: any)
    source: str
    way_shots: tuple[tuple[int, int], ...] = ((5, 1), (5, 5))


FEWSHOT: dict[str, DatasetInfo] = {
    "folder": DatasetInfo("folder", "image folders", 84, "crop", 8, (_FOLDER,), None, "any images, one folder a class"),
    "miniimagenet": DatasetInfo(
        "miniimagenet", "mini-ImageNet", 84, "square", 8, (_MINI_PICKLE, _MINI_CSV), (64, 16, 20),
        "Ravi & Larochelle's train/val/test.csv with the ImageNet images (images/), or the pickles of the "
        "MAML++ / learn2learn mirrors",
    ),
    "cifarfs": DatasetInfo(
        "cifarfs", "CIFAR-FS", 32, "square", 4, (_CIFARFS,), (64, 16, 20),
        "Bertinetto et al.'s split files (splits/bertinetto) over CIFAR-100 as PNG folders (data/<class>/)",
    ),
    "fc100": DatasetInfo(
        "fc100", "FC100", 32, "square", 4, (_FC100,), (60, 20, 20),
        "torchvision.datasets.CIFAR100(root, download=True) (cifar-100-python/)",
    ),
    "cub": DatasetInfo(
        "cub", "CUB-200-2011", 84, "crop", 8, (_CUB,), (100, 50, 50), "Caltech's CUB_200_2011.tgz, unpacked",
    ),
}  # fmt: skip


def load_fewshot(
    name: str,
    root: str | os.PathLike,
    image_size: int | None = None,
    resize: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> FewShotDataset:
    """The dataset `name` (a key of FEWSHOT: folder, miniimagenet, cifarfs, fc100, cub) from `root` (the
    dataset's folder, or the folder that holds it), every image at image_size x image_size (default per dataset:
    84 for miniimagenet, cub and folder, 32 for cifarfs and fc100), resized per `resize` ("square" or "crop";
    default per dataset, see the module doc).

    The first call decodes every image (`workers` threads, default: the CPUs; a progress bar on stderr) and
    writes a cache (`cache_dir`, else $FASTMETA_CACHE, else ~/.cache/fastmeta); later calls map the cache
    (a second or less). Raises FileNotFoundError or ValueError naming the missing file, the undecodable image or
    the layouts it tried."""
    if name not in FEWSHOT:
        raise ValueError(f"dataset must be one of {sorted(FEWSHOT)}, got {name!r}")
    info = FEWSHOT[name]
    size = info.image_size if image_size is None else image_size
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    resize = resize or info.resize
    if resize not in ("square", "crop"):
        raise ValueError(f"resize must be 'square' or 'crop', got {resize!r}")
    layout, base = _find(info, Path(root).expanduser())
    scan = layout.scan(base) if layout.scan is not None else None
    if scan is not None:
        files = [p for part in scan.parts.values() for _, paths in part for p in paths] + scan.extra
    else:
        files = layout.key_files(base)
    try:
        stamp = cache.file_stamp(files, base)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{info.title} ({layout.name} layout): no file {e.filename}") from None
    where = hashlib.sha1(str(base.resolve()).encode()).hexdigest()[:8]
    prefix = f"{name}-{size}-{resize}-{where}-"
    key = f"{stamp}|{_code_version()}"
    path = cache.cache_dir(cache_dir) / f"{prefix}{hashlib.sha1(key.encode()).hexdigest()[:12]}.pt"
    data = _from_cache(path)
    if data is None:
        # one process decodes (torchrun's ranks, parallel runs); the others wait, then read its cache
        with cache.locked(path.with_name(f".{prefix}lock")):
            data = _from_cache(path)
            if data is None:
                data, path = _build(info.title, layout, base, scan, size, resize, workers, progress, path, prefix)
    splits = {p: FewShotSplit(s["images"], s["counts"], list(s["classes"])) for p, s in data["splits"].items()}
    counts = "/".join(str(len(splits[p])) for p in PARTS)
    if info.classes is not None and counts != "/".join(map(str, info.classes)) and str(base) not in _WARNED:
        _WARNED.add(str(base))  # once a process (a run loads each part)
        warnings.warn(
            f"{info.title} in {base} has {counts} train/val/test classes, but the split papers report has "
            f"{'/'.join(map(str, info.classes))}: a partial copy, whose accuracies are not comparable to theirs",
            stacklevel=2,
        )
    return FewShotDataset(
        name, data["layout"], str(base), size, resize, splits,
        tuple(data["mean"].tolist()), tuple(data["std"].tolist()),
        augment_padding=max(1, round(info.padding * size / info.image_size)),
        cache_file=None if path is None else str(path),
    )  # fmt: skip


_WARNED: set[str] = set()  # the dataset folders already warned of
