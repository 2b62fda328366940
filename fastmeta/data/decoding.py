"""Decoding a few-shot dataset's images into class-major uint8 tensors (resized per `resize`, by threads, with a
progress bar) and the cache that keeps them: its contents, the version of the code that decides them, reading and
writing it."""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import TypedDict

import numpy as np
import torch
from torch import Tensor

from fastmeta.data import cache
from fastmeta.data.layouts import PARTS, _Layout, _Scan

DECODE_VERSION = 1  # bump when what a cache holds changes; the modules' source is part of the key as well
# the modules whose code decides what a cache holds: the loader, the layouts and the decoding
_KEYED = ("fewshot.py", "layouts.py", "decoding.py")


class _Split(TypedDict):
    """One part as the cache holds it: images (C, E, 3, S, S) uint8, counts (C,) int64, the C class names."""

    images: Tensor
    counts: Tensor
    classes: list[str]


# ---------------------------------------------------------------------------------------------------------------
# The cache.


def _build(
    title: str,
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
        splits = _decode_scan(scan, size, resize, workers, progress, title)
    else:
        splits = _from_arrays(layout.read(base), size, resize, title, progress)
    mean, std = _mean_std(splits["train"])
    data = {
        "version": DECODE_VERSION,
        "layout": layout.name,
        "splits": splits,
        "mean": mean,
        "std": std,
    }
    if not cache.save_cached(data, path):
        return data, None
    for old in path.parent.glob(f"{prefix}*.pt"):  # the same folder, size and resize, older files or code
        if old != path:
            old.unlink(missing_ok=True)
    return data, path


def _code_version() -> str:
    """The source of the modules that decide what a cache holds (as imported), DECODE_VERSION and the decoder's
    version: a change to any re-decodes."""
    import PIL

    return f"{DECODE_VERSION}|{PIL.__version__}|{_SOURCE}"


def _source_hash(names: tuple[str, ...]) -> str:
    """A hash of the files `names` of this package folder."""
    h = hashlib.sha1()
    for name in names:
        h.update(name.encode() + b"\0" + (Path(__file__).parent / name).read_bytes() + b"\0")
    return h.hexdigest()[:12]


_SOURCE = _source_hash(_KEYED)  # the code running (read at import), not a later edit of it


def _from_cache(path: Path) -> dict | None:
    """The cache at `path`, memory-mapped, or None where it is missing, unreadable or of another DECODE_VERSION."""
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
) -> dict[str, _Split]:
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
        splits[part] = _Split(images=images, counts=counts, classes=[name for name, _ in classes])
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
) -> dict[str, _Split]:
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
        splits[part] = _Split(images=images, counts=counts, classes=[name for name, _ in classes])
    bar.close()
    return splits


def _mean_std(split: _Split) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std (float64, of pixels in [0, 1]) of the valid images of `split`, exact (from
    histograms of the uint8 values)."""
    hist = torch.zeros(3, 256, dtype=torch.float64)
    for c, n in enumerate(split["counts"].tolist()):
        x = split["images"][c, :n]
        for ch in range(3):
            hist[ch] += torch.bincount(x[:, ch].reshape(-1), minlength=256).double()
    v = torch.arange(256, dtype=torch.float64) / 255
    total = hist.sum(1)
    mean = (hist * v).sum(1) / total
    std = ((hist * v**2).sum(1) / total - mean**2).clamp_min(0).sqrt()
    return mean, std.clamp_min(1 / 255)  # images of one colour (synthetic data) must not divide by 0
