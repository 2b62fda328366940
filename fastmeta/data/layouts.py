"""The distributed layouts of the few-shot image datasets (documented in fastmeta.data.fewshot's docstring): how
each is recognised under a root folder (`_find`) and read, by listing its image files per part and class (`_scan_*`)
or by unpickling its already-decoded arrays (the mini-ImageNet and CIFAR-100 pickles, arrays and dicts only)."""

from __future__ import annotations

import csv
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from fastmeta.data.fewshot import DatasetInfo

PARTS = ("train", "val", "test")

# FC100 (Oreshkin et al. 2018): CIFAR-100's 20 superclasses, 12 / 4 / 4, so train and test share no superclass.
FC100_COARSE = {
    "train": (1, 2, 3, 4, 5, 6, 9, 10, 15, 17, 18, 19),
    "val": (8, 11, 13, 16),
    "test": (0, 7, 12, 14),
}


@dataclass
class _Scan:
    """An image-file layout's contents: per part, (class, image paths) in order; `extra`: split files, part of
    the cache key."""

    parts: dict[str, list[tuple[str, list[str]]]]
    extra: list[Path]


@dataclass(frozen=True)
class _Layout:
    """A distributed layout: what it looks for, how to tell it is there, and how to read it (`scan` for image files,
    `read` and `key_files` for arrays)."""

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


def _read_split_csv(path: Path) -> list[tuple[str, str]]:
    """The (file name, class) rows of one of Ravi & Larochelle's csv files (header filename,label)."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or [h.strip() for h in rows[0]] != ["filename", "label"]:
        raise ValueError(f"{path}: expected the header 'filename,label', got {','.join(rows[0]) if rows else ''!r}")
    pairs = [(row[0].strip(), row[1].strip()) for row in rows[1:] if len(row) == 2]
    if not pairs:
        raise ValueError(f"{path}: no rows of filename,label")
    return pairs


def _files_by_name(folder: Path, exts: set[str]) -> dict[str, list[str]]:
    """Every image file under `folder` (any depth, hidden folders skipped), by file name: its paths."""
    found: dict[str, list[str]] = {}
    for top, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for n in names:
            if not n.startswith(".") and os.path.splitext(n)[1].lower() in exts:
                found.setdefault(n, []).append(os.path.join(top, n))
    return found


def _scan_mini_csv(base: Path) -> _Scan:
    """Ravi & Larochelle's train/val/test.csv over images found by file name: in images/ (flat, or in class
    folders) or, without images/, anywhere under `base` (mirrors that store the images in class folders of
    their own split: only the csv files say which class is in which part)."""
    listed, files = {}, []
    for part in PARTS:
        path = base / f"{part}.csv"
        if not path.is_file():
            raise FileNotFoundError(f"mini-ImageNet csv layout: no {part}.csv in {base}")
        files.append(path)
        listed[part] = _read_split_csv(path)
    owner: dict[str, str] = {}  # file name -> the part that lists it first
    twice = []
    for part in PARTS:
        for name, _ in listed[part]:
            if name in owner:
                twice.append((name, owner[name], part))
            owner.setdefault(name, part)
    if twice:
        name, first, then = twice[0]
        where = f"{first}.csv" if first == then else f"{first}.csv and {then}.csv"
        raise ValueError(
            f"mini-ImageNet csv layout: {len(twice)} file(s) listed twice in {base}'s csv files (the first: {name}, "
            f"in {where}); each image belongs to one class of one part"
        )
    where = base / "images" if (base / "images").is_dir() else base
    found = _files_by_name(where, _extensions())
    missing = [(n, p) for p in PARTS for n, _ in listed[p] if n not in found]
    if missing:
        total = sum(len(rows) for rows in listed.values())
        raise FileNotFoundError(
            f"mini-ImageNet csv layout: {len(missing)} of the {total} files listed in train/val/test.csv are not "
            f"under {where}; the first: {missing[0][0]} ({missing[0][1]}.csv)"
        )
    ambiguous = [(n, found[n]) for p in PARTS for n, _ in listed[p] if len(found[n]) > 1]
    if ambiguous:
        raise ValueError(
            f"mini-ImageNet csv layout: {len(ambiguous)} listed file name(s) are found at several places under "
            f"{where}, the first: {ambiguous[0][0]} at {' and '.join(ambiguous[0][1])}"
        )
    parts = {}
    for part in PARTS:
        by_class: dict[str, list[str]] = {}
        for name, label in listed[part]:
            by_class.setdefault(label, []).append(found[name][0])
        parts[part] = sorted(by_class.items())
    return _Scan(parts, files)


def _scan_cifarfs(base: Path) -> _Scan:
    data = base / "data"
    if not data.is_dir():
        raise FileNotFoundError(f"CIFAR-FS layout: no data/ folder in {base}")
    parts, files = {}, []
    for part in PARTS:
        # Bertinetto et al.'s splits/bertinetto/, or the same files beside or inside data/ (as mirrors have them)
        tried = [base / "splits" / "bertinetto" / f"{part}.txt", base / f"{part}.txt", data / f"{part}.txt"]
        path = next((t for t in tried if t.is_file()), None)
        if path is None:
            raise FileNotFoundError(
                f"CIFAR-FS layout: no split file {tried[0]} (splits/bertinetto/{part}.txt, or {part}.txt beside or "
                "inside data/)"
            )
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
# The layouts of the datasets of fastmeta.data.fewshot.FEWSHOT.

_FOLDER = _Layout(
    "folder", "train/<class>/*, val/<class>/*, test/<class>/* (any image format PIL reads)",
    lambda b: any((b / p).is_dir() for p in PARTS), scan=_scan_folder,
)  # fmt: skip
_MINI_PICKLE = _Layout(
    "pickle", "mini-imagenet-cache-train.pkl, mini-imagenet-cache-validation.pkl, mini-imagenet-cache-test.pkl",
    lambda b: any(p.is_file() for p in _mini_pickle_files(b)), read=_read_mini_pickles, key_files=_mini_pickle_files,
)  # fmt: skip
_MINI_CSV = _Layout(
    "csv", "train.csv, val.csv, test.csv (header filename,label; Ravi & Larochelle) with the images they name in "
    "images/ (flat or in class folders) or in any folders beside the csv files",
    lambda b: any((b / f"{p}.csv").is_file() for p in PARTS), scan=_scan_mini_csv,
)  # fmt: skip
_CIFARFS = _Layout(
    "bertinetto", "data/<class>/*.png with splits/bertinetto/train.txt, val.txt, test.txt (a class name a line; or "
    "the same files beside or inside data/)",
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
