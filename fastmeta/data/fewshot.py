"""The image datasets few-shot papers report on, read from the files a user already has, in the layouts they are
distributed in, decoded once to uint8 and cached.

    data = load_fewshot("miniimagenet", "~/data/mini-imagenet")           # 84x84; cifarfs and fc100: 32x32
    episodes = data.episodes("train", n_way=5, k_shot=1, n_query=15, tasks=4, seed=0, augment=True)
    batch = episodes[0]                                                     # TaskBatch, support_x (4, 5, 3, 84, 84)

Layouts read (`root`: the dataset's folder, or the folder that holds it):
- folder: `train/<class>/*`, `val/<class>/*`, `test/<class>/*` (any image format PIL reads).
- miniimagenet: `mini-imagenet-cache-{train,validation,test}.pkl` (dicts of `image_data` (N, 84, 84, 3) uint8
  and `class_dict` {class: [indices]}); or Ravi & Larochelle's `images/*.jpg` with `train.csv`, `val.csv`,
  `test.csv` (header `filename,label`).
- cifarfs: `data/<class>/*.png` with `splits/bertinetto/{train,val,test}.txt` (a class name a line).
- fc100: CIFAR-100's python pickles (`cifar-100-python/{train,test,meta}`), split by superclass (Oreshkin et al.).
- cub: `CUB_200_2011/images/<NNN.name>/*.jpg`, Chen et al.'s split of the sorted classes: i % 2 == 0 train,
  i % 4 == 1 val, i % 4 == 3 test.

Resizing (`resize`): "square" resizes every image to image_size x image_size (Lanczos), as Ravi & Larochelle's and
MAML's mini-ImageNet scripts did (the default of miniimagenet, cifarfs, fc100); "crop" resizes the shorter side to
image_size and keeps the centre square, as torchvision's Resize(size) + CenterCrop(size) (the default of cub and
folder, whose images are not square). JPEGs much larger than image_size are decoded at 1/2, 1/4 or 1/8 scale by
libjpeg (PIL's `draft`), still at least image_size, before the Lanczos resize: 3x faster on ImageNet-sized files.

Each split is stored class-major, (C, E, 3, S, S) uint8 with E the largest class, zero-padded past each class's
count (CUB has 41 to 60 images a class): every image is kept, and EpisodeSampler draws only valid ones. Episodes
are normalised with the per-channel mean and std of the dataset's own train split (computed once, exactly, at
decoding). The cache (in `$FASTMETA_CACHE` or ~/.cache/fastmeta) is keyed by the files' names, sizes and times,
this module's source, its DECODE_VERSION and Pillow's version; a newer cache of the same dataset folder replaces
older ones.
"""

from __future__ import annotations

import csv
import hashlib
import os
import pickle
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fastmeta.data import cache
from fastmeta.data.episodes import EpisodeSampler

__all__ = [
    "FEWSHOT",
    "DatasetInfo",
    "EpisodeTransform",
    "FewShotDataset",
    "FewShotSplit",
    "load_fewshot",
    "random_crop_flip",
]

DECODE_VERSION = 1  # bump when what a cache holds changes; the module's source is part of the key as well
PARTS = ("train", "val", "test")
TRAINING = ("train", "trainval")  # the parts whose episodes may be augmented

# FC100 (Oreshkin et al. 2018): CIFAR-100's 20 superclasses, 12 / 4 / 4, so train and test share no superclass.
FC100_COARSE = {
    "train": (1, 2, 3, 4, 5, 6, 9, 10, 15, 17, 18, 19),
    "val": (8, 11, 13, 16),
    "test": (0, 7, 12, 14),
}


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
# Layouts: where the files are and which class each image belongs to.


@dataclass
class _Scan:
    """An image-file layout's contents: per part, (class, image paths) in order; `extra`: split files, part of
    the cache key."""

    parts: dict[str, list[tuple[str, list[str]]]]
    extra: list[Path]


@dataclass(frozen=True)
class _Layout:
    name: str
    expects: str  # what it looks for, relative to the dataset's folder
    present: Callable[[Path], bool]  # some of it is there (then the rest must be, or it is an error)
    scan: Callable[[Path], _Scan] | None = None  # image files
    read: Callable[[Path], dict[str, list[tuple[str, np.ndarray]]]] | None = None  # arrays (n, H, W, 3) uint8
    key_files: Callable[[Path], list[Path]] | None = None  # for `read` layouts


def _extensions() -> set[str]:
    from PIL import Image

    Image.init()
    return {e.lower() for e in Image.registered_extensions()}


def _images_in(folder: Path, exts: set[str]) -> list[str]:
    """The image files in `folder`, sorted by name, as strings (pathlib costs seconds on 60,000 files)."""
    with os.scandir(folder) as entries:
        names = [e.name for e in entries if not e.name.startswith(".") and os.path.splitext(e.name)[1].lower() in exts]
    return [os.path.join(folder, n) for n in sorted(names)]


def _class_folders(folder: Path, what: str) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"{what}: no folder {folder}")
    dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not dirs:
        raise FileNotFoundError(f"{what}: no class folders in {folder}")
    return dirs


def _with_images(dirs: list[Path], what: str) -> list[tuple[str, list[str]]]:
    exts = _extensions()
    out = []
    for d in dirs:
        files = _images_in(d, exts)
        if not files:
            raise ValueError(f"{what}: class folder {d} has no images (files PIL reads, such as .jpg or .png)")
        out.append((d.name, files))
    return out


def _scan_folder(base: Path) -> _Scan:
    parts = {p: _with_images(_class_folders(base / p, "folder layout"), "folder layout") for p in PARTS}
    return _Scan(parts, [])


def _scan_mini_csv(base: Path) -> _Scan:
    images = base / "images"
    if not images.is_dir():
        raise FileNotFoundError(f"mini-ImageNet csv layout: no images/ folder in {base}")
    parts, files = {}, []
    for part in PARTS:
        path = base / f"{part}.csv"
        if not path.is_file():
            raise FileNotFoundError(f"mini-ImageNet csv layout: no {part}.csv in {base} (next to images/)")
        files.append(path)
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        if not rows or [h.strip() for h in rows[0]] != ["filename", "label"]:
            raise ValueError(f"{path}: expected the header 'filename,label', got {','.join(rows[0]) if rows else ''!r}")
        by_class: dict[str, list[str]] = {}
        folder = os.path.join(images, "")
        for row in rows[1:]:
            if len(row) == 2:
                by_class.setdefault(row[1].strip(), []).append(folder + row[0].strip())
        if not by_class:
            raise ValueError(f"{path}: no rows of filename,label")
        parts[part] = sorted(by_class.items())
    return _Scan(parts, files)


def _scan_cifarfs(base: Path) -> _Scan:
    data, splits = base / "data", base / "splits" / "bertinetto"
    if not data.is_dir():
        raise FileNotFoundError(f"CIFAR-FS layout: no data/ folder in {base}")
    parts, files = {}, []
    for part in PARTS:
        path = splits / f"{part}.txt"
        if not path.is_file():
            raise FileNotFoundError(f"CIFAR-FS layout: no split file {path} (splits/bertinetto/{part}.txt)")
        files.append(path)
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        for n in names:
            if not (data / n).is_dir():
                raise FileNotFoundError(f"CIFAR-FS layout: {path} names class {n!r}, but there is no folder {data / n}")
        parts[part] = _with_images([data / n for n in names], "CIFAR-FS layout")
    return _Scan(parts, files)


def _scan_cub(base: Path) -> _Scan:
    dirs = _class_folders(base / "images", "CUB-200-2011 layout")
    # Chen et al. 2019 (write_CUB_filelist.py) over the sorted class folders
    rule = {"train": lambda i: i % 2 == 0, "val": lambda i: i % 4 == 1, "test": lambda i: i % 4 == 3}
    picked = {p: [d for i, d in enumerate(dirs) if rule[p](i)] for p in PARTS}
    for p, ds in picked.items():
        if not ds:
            raise ValueError(f"CUB-200-2011 layout: {len(dirs)} class folders in {base / 'images'} leave none for {p}")
    return _Scan({p: _with_images(ds, "CUB-200-2011 layout") for p, ds in picked.items()}, [])


MINI_PICKLES = {"train": "train", "val": "validation", "test": "test"}


def _mini_pickle_files(base: Path) -> list[Path]:
    return [base / f"mini-imagenet-cache-{MINI_PICKLES[p]}.pkl" for p in PARTS]


def _read_mini_pickles(base: Path) -> dict[str, list[tuple[str, np.ndarray]]]:
    out = {}
    for part, path in zip(PARTS, _mini_pickle_files(base)):
        if not path.is_file():
            raise FileNotFoundError(f"mini-ImageNet pickle layout: no {path.name} in {base}")
        d = _str_keys(_unpickle(path))
        images, classes = d.get("image_data"), d.get("class_dict")
        if (
            not isinstance(images, np.ndarray)
            or images.ndim != 4
            or images.shape[3] != 3
            or not isinstance(classes, dict)
        ):
            raise ValueError(
                f"{path}: expected a dict with image_data (N, H, W, 3) uint8 and class_dict {{class: [indices]}}, got "
                f"keys {sorted(d)}"
            )
        out[part] = [(_text(c), images[np.asarray(idx, dtype=np.int64)]) for c, idx in sorted(classes.items())]
    return out


def _fc100_files(base: Path) -> list[Path]:
    return [base / n for n in ("train", "test", "meta")]


def _read_fc100(base: Path) -> dict[str, list[tuple[str, np.ndarray]]]:
    for path in _fc100_files(base):
        if not path.is_file():
            raise FileNotFoundError(f"FC100 (CIFAR-100 python) layout: no {path.name} in {base}")
    meta = _str_keys(_unpickle(base / "meta"))
    fine_names = [_text(n) for n in meta.get("fine_label_names", [])]
    data, fine, coarse = [], [], []
    for name in ("train", "test"):
        d = _str_keys(_unpickle(base / name))
        if not all(k in d for k in ("data", "fine_labels", "coarse_labels")):
            raise ValueError(f"{base / name}: expected data, fine_labels and coarse_labels, got keys {sorted(d)}")
        data.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        fine.append(np.asarray(d["fine_labels"]))
        coarse.append(np.asarray(d["coarse_labels"]))
    x, y, z = np.concatenate(data), np.concatenate(fine), np.concatenate(coarse)
    if len(fine_names) != 100:
        raise ValueError(f"{base / 'meta'}: expected 100 fine_label_names, got {len(fine_names)}")
    out = {}
    for part, superclasses in FC100_COARSE.items():
        labels = sorted(set(y[np.isin(z, superclasses)].tolist()))
        out[part] = [(fine_names[c], x[y == c]) for c in labels]
    return out


class _ArraysOnly(pickle.Unpickler):
    """Unpickles dicts, lists, numbers, strings and numpy arrays, nothing else: a pickle can run any code it
    names, and a dataset file from a mirror should not."""

    NUMPY = ("numpy", "numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric", "numpy._core.numeric")
    ALLOWED = {("_codecs", "encode"), ("collections", "OrderedDict")} | {
        (m, n) for m in NUMPY for n in ("_reconstruct", "ndarray", "dtype", "scalar", "_frombuffer")
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a dataset pickle (arrays and dicts only)")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            d = _ArraysOnly(f, encoding="latin1").load()  # latin1: Python 2 pickles (CIFAR-100's) with numpy arrays
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as e:
        raise ValueError(f"{path}: not a readable dataset pickle ({type(e).__name__}: {e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(d).__name__}")
    return d


def _str_keys(d: dict) -> dict:
    return {_text(k): v for k, v in d.items()}


def _text(s: object) -> str:
    return s.decode("latin1") if isinstance(s, bytes) else str(s)


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


_FOLDER = _Layout(
    "folder", "train/<class>/*, val/<class>/*, test/<class>/* (any image format PIL reads)",
    lambda b: any((b / p).is_dir() for p in PARTS), scan=_scan_folder,
)  # fmt: skip
_MINI_PICKLE = _Layout(
    "pickle", "mini-imagenet-cache-train.pkl, mini-imagenet-cache-validation.pkl, mini-imagenet-cache-test.pkl",
    lambda b: any(p.is_file() for p in _mini_pickle_files(b)), read=_read_mini_pickles, key_files=_mini_pickle_files,
)  # fmt: skip
_MINI_CSV = _Layout(
    "csv", "images/*.jpg with train.csv, val.csv, test.csv (header filename,label; Ravi & Larochelle)",
    lambda b: (b / "images").is_dir() and any((b / f"{p}.csv").is_file() for p in PARTS), scan=_scan_mini_csv,
)  # fmt: skip
_CIFARFS = _Layout(
    "bertinetto", "data/<class>/*.png with splits/bertinetto/train.txt, val.txt, test.txt (a class name a line)",
    lambda b: (b / "data").is_dir() or (b / "splits" / "bertinetto").is_dir(), scan=_scan_cifarfs,
)  # fmt: skip
_FC100 = _Layout(
    "cifar-100-python", "cifar-100-python/train, test and meta (torchvision's CIFAR100 download)",
    lambda b: (b / "meta").is_file() and ((b / "train").is_file() or (b / "test").is_file()), read=_read_fc100,
    key_files=_fc100_files,
)  # fmt: skip
_CUB = _Layout(
    "cub", "CUB_200_2011/images/<NNN.name>/*.jpg (Caltech's CUB_200_2011.tgz)",
    lambda b: (b / "images").is_dir(), scan=_scan_cub,
)  # fmt: skip

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


def _find(info: DatasetInfo, root: Path) -> tuple[_Layout, Path]:
    """The layout and folder of `info` at `root`, or in the one folder directly inside it that has one."""
    if not root.is_dir():
        raise FileNotFoundError(f"{info.title}: no folder {root}")
    for layout in info.layouts:
        if layout.present(root):
            return layout, root
    inside = [(layout, d) for d in sorted(root.iterdir()) if d.is_dir() for layout in info.layouts if layout.present(d)]
    folders = sorted({str(d) for _, d in inside})
    if len(folders) == 1:
        return inside[0]
    if len(folders) > 1:
        raise ValueError(
            f"{info.title}: several folders in {root} look like it: {', '.join(folders)}; pass one of them"
        )
    tried = "\n".join(f"  - {layout.name}: {layout.expects}" for layout in info.layouts)
    raise FileNotFoundError(
        f"{info.title} not found in {root} nor in any folder directly inside it; the layouts tried:\n{tried}\n"
        f"(usually obtained from: {info.source})"
    )


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
                data, path = _build(info, layout, base, scan, size, resize, workers, progress, path, prefix)
    splits = {p: FewShotSplit(s["images"], s["counts"], list(s["classes"])) for p, s in data["splits"].items()}
    counts = "/".join(str(len(splits[p])) for p in PARTS)
    if info.classes is not None and counts != "/".join(map(str, info.classes)) and progress and path not in _NOTED:
        _NOTED.add(path)  # once a process (a run loads each part)
        print(
            f"note: {info.title} in {base} has {counts} train/val/test classes, not the standard "
            f"{'/'.join(map(str, info.classes))}",
            file=sys.stderr,
        )
    return FewShotDataset(
        name, data["layout"], str(base), size, resize, splits,
        tuple(data["mean"].tolist()), tuple(data["std"].tolist()),
        augment_padding=max(1, round(info.padding * size / info.image_size)),
        cache_file=None if path is None else str(path),
    )  # fmt: skip


def _build(
    info: DatasetInfo,
    layout: _Layout,
    base: Path,
    scan: _Scan | None,
    size: int,
    resize: str,
    workers: int | None,
    progress: bool,
    path: Path,
    prefix: str,
) -> tuple[dict, Path | None]:
    """Decodes the dataset and writes its cache at `path` (removing older caches of `prefix`): (the cache's
    contents, its path or None where it could not be written)."""
    if scan is not None:
        splits = _decode_scan(scan, size, resize, workers, progress, info.title)
    else:
        splits = _from_arrays(layout.read(base), size, resize, info.title, progress)
    mean, std = _mean_std(splits["train"])
    data = {
        "version": DECODE_VERSION,
        "layout": layout.name,
        "splits": {p: {"images": s.images, "counts": s.counts, "classes": s.classes} for p, s in splits.items()},
        "mean": mean,
        "std": std,
    }
    if not cache.save_cached(data, path):
        return data, None
    for old in path.parent.glob(f"{prefix}*.pt"):  # the same folder, size and resize, older files or code
        if old != path:
            old.unlink(missing_ok=True)
    return data, path


_NOTED: set = set()


def _code_version() -> str:
    """This module's source as imported, DECODE_VERSION and the decoder's version: a change to any re-decodes."""
    import PIL

    return f"{DECODE_VERSION}|{PIL.__version__}|{_SOURCE}"


_SOURCE = hashlib.sha1(Path(__file__).read_bytes()).hexdigest()[:12]  # the code running, not a later edit of it


def _from_cache(path: Path) -> dict | None:
    data = cache.load_cached(path, mmap=True)
    try:
        if data is None or data["version"] != DECODE_VERSION:
            return None
        for p in PARTS:
            s = data["splits"][p]
            if not (isinstance(s["images"], Tensor) and isinstance(s["counts"], Tensor) and len(s["classes"])):
                return None
        return data if isinstance(data["mean"], Tensor) and isinstance(data["std"], Tensor) else None
    except (KeyError, TypeError):
        return None


# ---------------------------------------------------------------------------------------------------------------
# Decoding.


def _decode_file(path: str | Path, size: int, resize: str) -> np.ndarray:
    """One image file as (size, size, 3) uint8 RGB."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.draft("RGB", (size, size))  # JPEG: decode at a reduced scale that is still >= size (else no-op)
            return _resized(im.convert("RGB"), size, resize)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # UnidentifiedImageError: OSError
        raise ValueError(f"cannot decode image {path}: {e}") from None


def _resized(im: object, size: int, resize: str) -> np.ndarray:
    from PIL import Image

    w, h = im.size
    if (w, h) != (size, size):
        if resize == "square":
            im = im.resize((size, size), Image.LANCZOS)
        else:  # torchvision's Resize(size) then CenterCrop(size)
            nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
            im = im.resize((nw, nh), Image.LANCZOS)
            left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
            im = im.crop((left, top, left + size, top + size))
    return np.asarray(im, dtype=np.uint8)


class _Bar:
    """tqdm on stderr where installed, else a line at the start and one at the end."""

    def __init__(self, total: int, text: str, show: bool) -> None:
        self.bar, self.show, self.text, self.start = None, show, text, time.time()
        if not show:
            return
        try:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=text, unit="img", file=sys.stderr, dynamic_ncols=True)
        except ImportError:
            print(f"{text}: {total} images (once; pip install tqdm for a progress bar)", file=sys.stderr, flush=True)
        self.lock = threading.Lock()

    def update(self, n: int) -> None:
        if self.bar is not None:
            with self.lock:
                self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.show:
            print(f"{self.text}: done in {time.time() - self.start:.1f} s", file=sys.stderr, flush=True)


def _decode_scan(
    scan: _Scan, size: int, resize: str, workers: int | None, progress: bool, title: str
) -> dict[str, FewShotSplit]:
    """Every image of `scan`, decoded by `workers` threads (PIL releases the GIL while decoding and resizing)
    straight into the class-major uint8 tensors."""
    splits, jobs = {}, []
    for part, classes in scan.parts.items():
        E = max(len(paths) for _, paths in classes)
        images = torch.zeros(len(classes), E, 3, size, size, dtype=torch.uint8)
        target = images.numpy()  # the same memory
        for c, (_, paths) in enumerate(classes):
            jobs += [(p, target[c, e]) for e, p in enumerate(paths)]
        counts = torch.tensor([len(paths) for _, paths in classes], dtype=torch.int64)
        splits[part] = FewShotSplit(images, counts, [name for name, _ in classes])
    bar = _Bar(len(jobs), f"decoding {title}", progress)

    def run(chunk: list[tuple[str, np.ndarray]]) -> None:
        for p, out in chunk:
            out[...] = _decode_file(p, size, resize).transpose(2, 0, 1)
        bar.update(len(chunk))

    workers = workers or len(os.sched_getaffinity(0))
    chunks = [jobs[i : i + 64] for i in range(0, len(jobs), 64)]
    try:
        if workers <= 1:
            for chunk in chunks:
                run(chunk)
        else:
            with ThreadPoolExecutor(workers) as pool:
                futures = [pool.submit(run, chunk) for chunk in chunks]
                done, _ = wait(futures, return_when=FIRST_EXCEPTION)
                for f in futures:
                    f.cancel()
                for f in done:
                    f.result()  # the first error, if any
    finally:
        bar.close()
    return splits


def _from_arrays(
    parts: dict[str, list[tuple[str, np.ndarray]]], size: int, resize: str, title: str, progress: bool
) -> dict[str, FewShotSplit]:
    """Already-decoded arrays (n, H, W, 3) per class, resized where they are not size x size."""
    from PIL import Image

    splits = {}
    total = sum(len(a) for classes in parts.values() for _, a in classes)
    same = all(a.shape[1:3] == (size, size) for classes in parts.values() for _, a in classes)
    bar = _Bar(total, f"resizing {title} to {size}", progress and not same)
    for part, classes in parts.items():
        E = max(len(a) for _, a in classes)
        images = torch.zeros(len(classes), E, 3, size, size, dtype=torch.uint8)
        for c, (_, a) in enumerate(classes):
            if a.shape[1:3] != (size, size):
                a = np.stack([_resized(Image.fromarray(np.ascontiguousarray(x)), size, resize) for x in a])
                bar.update(len(a))
            images[c, : len(a)] = torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))
        counts = torch.tensor([len(a) for _, a in classes], dtype=torch.int64)
        splits[part] = FewShotSplit(images, counts, [name for name, _ in classes])
    bar.close()
    return splits


def _mean_std(split: FewShotSplit) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std (float64, of pixels in [0, 1]) of the valid images of `split`, exact (from
    histograms of the uint8 values)."""
    hist = torch.zeros(3, 256, dtype=torch.float64)
    for c, n in enumerate(split.counts.tolist()):
        x = split.images[c, :n]
        for ch in range(3):
            hist[ch] += torch.bincount(x[:, ch].reshape(-1), minlength=256).double()
    v = torch.arange(256, dtype=torch.float64) / 255
    total = hist.sum(1)
    mean = (hist * v).sum(1) / total
    std = ((hist * v**2).sum(1) / total - mean**2).clamp_min(0).sqrt()
    return mean, std.clamp_min(1 / 255)  # images of one colour (synthetic data) must not divide by 0
