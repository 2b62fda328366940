"""Omniglot (Lake et al. 2015): 1623 handwritten characters of 50 alphabets, 20 drawings each, decoded once into
memory as uint8 and split the standard ways.

Reads a torchvision-style folder (`<root>/omniglot-py/images_background/<alphabet>/<character>/*.png`, and
images_evaluation), the same folders directly under <root>, or the original release's zips
(`<root>/images_background.zip`, `images_evaluation.zip`). No checksum is enforced: re-encoded copies of the
images are fine.
"""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fastmeta.data import cache

__all__ = ["Omniglot", "load_omniglot", "omniglot_split", "SPLITS"]

SETS = ("images_background", "images_evaluation")
# Vinyals et al. (2016): 1200 characters (x4 rotations) for meta-training, the other 423 for meta-testing. Of
# the 1200, the last 100 are held out for validation ("train" and "val"); "trainval" is all 1200.
SPLITS = {
    "vinyals": {"train": (0, 1100), "val": (1100, 1200), "trainval": (0, 1200), "test": (1200, 1623)},
    "lake": {"train": (0, 864), "val": (864, 964), "trainval": (0, 964), "test": (964, 1623)},
}


@dataclass
class Omniglot:
    """All characters: images (1623, 20, 1, S, S) uint8 (ink 255, paper 0) and names "<set>/<alphabet>/<char>",
    ordered images_background then images_evaluation, alphabets and characters sorted by name."""

    images: Tensor
    names: list[str]


def _where(root: Path) -> tuple[str, Path] | None:
    for base in (root / "omniglot-py", root):
        if all((base / s).is_dir() for s in SETS):
            return "folder", base
        if all((base / f"{s}.zip").is_file() for s in SETS):
            return "zip", base
    return None


def load_omniglot(
    root: str | os.PathLike, image_size: int = 28, cache_dir: str | os.PathLike | None = None
) -> Omniglot:
    """Every Omniglot image, resized to image_size x image_size (antialiased), from `root` (see the module doc).

    The decoded images are cached as a .pt file in `cache_dir` (default ~/.cache/fastmeta, or
    $FASTMETA_CACHE), written atomically, so later loads take a fraction of a second. Raises FileNotFoundError
    where the files are not there, and ValueError naming the zip, or the image (the file, or the member and its
    zip), that does not read or decode; nothing is cached then.
    """
    root = Path(root).expanduser()
    found = _where(root)
    if found is None:
        raise FileNotFoundError(
            f"Omniglot not found under {root}: looked for {root}/omniglot-py/images_background/ and "
            f"images_evaluation/ (torchvision's layout), the same two folders directly in {root}, and "
            f"{root}/images_background.zip with images_evaluation.zip. Get them with "
            f"torchvision.datasets.Omniglot('{root}', background=True, download=True) (and background=False), "
            "or from github.com/brendenlake/omniglot (python/images_background.zip, python/images_evaluation.zip)."
        )
    kind, base = found
    cache_dir = cache.cache_dir(cache_dir)
    stamp = "-".join(
        str(int(p.stat().st_mtime)) + "_" + str(p.stat().st_size)
        for p in ((base / f"{s}.zip") if kind == "zip" else (base / s) for s in SETS)
    )
    digest = hashlib.sha1(f"{base.resolve()}|{stamp}".encode()).hexdigest()[:12]
    key = f"omniglot-{image_size}-{digest}.pt"
    cached = cache_dir / key
    data = cache.load_cached(cached)
    if data is not None and isinstance(data.get("images"), Tensor) and isinstance(data.get("names"), list):
        return Omniglot(data["images"], data["names"])  # else missing or unreadable: decode again
    names, images = [], []
    for s in SETS:
        fix = _fix(kind, base, s)
        for name, pngs in sorted(_characters(kind, base, s).items()):
            names.append(f"{s}/{name}")
            images.append(np.stack([_decode(png, image_size, where, fix) for where, png in pngs]))
    counts = {len(x) for x in images}
    if counts != {20}:
        raise ValueError(f"Omniglot under {base}: expected 20 drawings of every character, found counts {counts}")
    out = Omniglot(torch.from_numpy(np.stack(images)).unsqueeze(2), names)
    cache.save_cached({"images": out.images, "names": out.names}, cached)  # a read-only home: no cache
    return out


def _characters(kind: str, base: Path, s: str) -> dict[str, list[tuple[str, bytes]]]:
    """ "alphabet/character" -> (where, bytes) of its PNG files, sorted by file name; where: the file's path, or
    "<member> in <zip>", for the errors."""
    chars: dict[str, list[tuple[str, str, bytes]]] = {}
    if kind == "folder":
        for png in (base / s).glob("*/*/*.png"):
            try:
                data = png.read_bytes()
            except OSError as e:  # unreadable (permissions, an I/O error): a line naming it, not a traceback
                raise ValueError(f"cannot read image {png}: {e.strerror or e}") from None
            chars.setdefault(f"{png.parent.parent.name}/{png.parent.name}", []).append((png.name, str(png), data))
    else:
        path = base / f"{s}.zip"
        try:
            with zipfile.ZipFile(path) as z:
                for info in z.infolist():
                    parts = info.filename.split("/")
                    if len(parts) == 4 and parts[3].endswith(".png"):
                        try:
                            data = z.read(info)
                        except NotImplementedError as e:  # e.g. Deflate64, which 7-Zip and Windows may write
                            raise ValueError(
                                f"{info.filename} in {path} uses a compression method Python cannot read ({e}): "
                                f"extract it with another tool (7-Zip, unzip) so that {base / s}/<alphabet>/"
                                "<character>/*.png exist (then delete the zips), or zip it again with the standard "
                                "(deflate) method"
                            ) from None
                        chars.setdefault(f"{parts[1]}/{parts[2]}", []).append(
                            (parts[3], f"{info.filename} in {path}", data)
                        )
        except (zipfile.BadZipFile, zlib.error, EOFError) as e:  # a truncated download, or not a zip at all
            raise ValueError(
                f"{path} is not a readable zip file ({e}): download it again from github.com/brendenlake/omniglot "
                f"(python/{s}.zip), or get the extracted folders with torchvision.datasets.Omniglot('{base}', "
                "download=True)"
            ) from None
    return {k: [(where, b) for _, where, b in sorted(v)] for k, v in chars.items()}


def _fix(kind: str, base: Path, s: str) -> str:
    """What to do about a damaged file of set `s`."""
    if kind == "zip":
        return (
            f"download {s}.zip again from github.com/brendenlake/omniglot (python/{s}.zip), or get the extracted "
            f"folders with torchvision.datasets.Omniglot('{base}', download=True)"
        )
    return f"replace it with the same file from a fresh download (github.com/brendenlake/omniglot, python/{s}.zip)"


def _decode(png: bytes, size: int, where: str = "<bytes>", fix: str = "") -> np.ndarray:
    """One PNG's bytes as (size, size) uint8, ink high. Bytes that do not decode (not an image, truncated,
    damaged) raise ValueError naming `where` (the file, or "<member> in <zip>") and saying `fix`."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise ImportError("decoding Omniglot needs Pillow: pip install pillow (it comes with torchvision)") from None

    try:
        with Image.open(io.BytesIO(png)) as im:
            im = im.convert("L")
            if im.size != (size, size):
                im = im.resize((size, size), Image.LANCZOS)
            return 255 - np.asarray(im, dtype=np.uint8)  # ink high, paper 0
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # UnidentifiedImageError: OSError
        why = "not an image Pillow can identify" if isinstance(e, UnidentifiedImageError) else str(e) or repr(e)
        raise ValueError(f"cannot decode image {where} ({why}){': ' + fix if fix else ''}") from None


def omniglot_split(
    data: Omniglot, split: str = "vinyals", part: str = "train", rotations: bool | None = None
) -> Tensor:
    """Class-major images (C, 20, 1, S, S) uint8 of one part ("train", "val", "trainval" or "test") of a split
    ("vinyals" or "lake"). rotations (default: True for vinyals): each character at 0, 90, 180 and 270
    degrees, as four classes (C = 4 x characters)."""
    if split not in SPLITS:
        raise ValueError(f"omniglot_split: split must be one of {sorted(SPLITS)}, got {split!r}")
    if part not in SPLITS[split]:
        raise ValueError(f"omniglot_split: part must be one of {sorted(SPLITS[split])}, got {part!r}")
    lo, hi = SPLITS[split][part]
    x = data.images[lo:hi]
    if rotations is None:
        rotations = split == "vinyals"
    if rotations:
        x = torch.stack([torch.rot90(x, k, dims=(-2, -1)) for k in range(4)], 1).flatten(0, 1)
    return x.contiguous()
