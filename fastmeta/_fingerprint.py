"""The fingerprint of the kernels' sources (csrc/): recorded by setup.py in the build, compared at import with the
sources beside the imported package, so that tests never run a binary built from other sources. Standard library
only: setup.py loads this file by path, before fastmeta (or its kernels) can be imported."""

from __future__ import annotations

import hashlib
import os

SUFFIXES = (".cpp", ".cu", ".cuh", ".h", ".hpp")


def source_fingerprint(csrc: str | os.PathLike) -> str:
    """sha256 over the relative paths and contents of the C++/CUDA files under `csrc`, in sorted order."""
    digest = hashlib.sha256()
    files = []
    for folder, _, names in os.walk(csrc):
        files += [os.path.join(folder, n) for n in names if n.endswith(SUFFIXES)]
    for path in sorted(files, key=lambda p: os.path.relpath(p, csrc)):
        digest.update(os.path.relpath(path, csrc).replace(os.sep, "/").encode() + b"\0")
        with open(path, "rb") as f:
            digest.update(f.read() + b"\0")
    return digest.hexdigest()
