"""The decoded-image cache shared by the dataset loaders: where it lives, keys from the files' sizes and times,
and .pt files written atomically (a temporary file, then a rename) and read back without trusting them."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

__all__ = ["cache_dir", "file_stamp", "load_cached", "locked", "save_cached"]


def cache_dir(given: str | os.PathLike | None = None) -> Path:
    """`given`, else $FASTMETA_CACHE, else ~/.cache/fastmeta."""
    return Path(given or os.environ.get("FASTMETA_CACHE") or Path.home() / ".cache" / "fastmeta").expanduser()


def file_stamp(paths: Iterable[str | os.PathLike], base: str | os.PathLike | None = None) -> str:
    """A short hash of each path's name (relative to `base`), size and modification time: it changes when a file
    is added, removed, renamed or rewritten. A missing file raises FileNotFoundError (naming it). Plain os.stat
    on strings: 60,000 files take a fraction of a second."""
    h = hashlib.sha1()
    prefix = os.path.join(os.fspath(base), "") if base is not None else ""
    for p in paths:
        p = os.fspath(p)
        st = os.stat(p)
        name = p[len(prefix) :] if prefix and p.startswith(prefix) else p
        h.update(f"{name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:12]


def load_cached(path: Path, mmap: bool = False) -> dict | None:
    """The dict saved at `path`, or None when it is missing or unreadable (then the caller decodes again).
    mmap: map the file's tensors instead of reading them (instant; pages are read as they are touched)."""
    if not path.is_file():
        return None
    try:
        data = torch.load(path, weights_only=True, mmap=mmap)
    except (OSError, RuntimeError, ValueError, EOFError):
        return None
    return data if isinstance(data, dict) else None


def save_cached(data: dict, path: Path) -> bool:
    """torch.save to a temporary file in the same folder, then rename it over `path`: readers see the old file or
    the new one, never half of one. False (no cache) where the folder cannot be written, e.g. a read-only home."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(data, tmp)
        os.replace(tmp, path)
        return True
    except OSError:
        tmp.unlink(missing_ok=True)
        return False


@contextlib.contextmanager
def locked(lock: Path) -> Iterator[None]:
    """Holds an exclusive lock (flock on the file `lock`, made if missing) while the block runs, so that
    processes building the same cache take turns: the first decodes, the next finds its file. No lock where
    the folder cannot be written or flock is missing (then each decodes; the atomic rename keeps the file whole)."""
    try:
        import fcntl

        lock.parent.mkdir(parents=True, exist_ok=True)
        f = open(lock, "a")  # noqa: SIM115
    except (ImportError, OSError):
        yield
        return
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
