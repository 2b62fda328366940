"""Loads fastmeta._C (the compiled kernels) once, or says why it could not.

FASTMETA_DISABLE_KERNELS=1 skips the kernels (the pure-PyTorch reference runs instead, silently);
FASTMETA_REQUIRE_KERNELS=1 turns a missing or mismatched build into an ImportError instead of a warning.
"""

from __future__ import annotations

import os
import warnings

import torch

REBUILD = (
    "rebuild them with `pip install --no-build-isolation --force-reinstall --no-deps .` in fastmeta's source folder"
)


def _load() -> tuple[str | None, bool]:
    """Returns (why the kernels are unavailable or None, whether they include CUDA)."""
    if os.environ.get("FASTMETA_DISABLE_KERNELS") == "1":
        return "fastmeta's kernels are disabled by FASTMETA_DISABLE_KERNELS=1", False
    try:
        from fastmeta import _build_info
    except ImportError:
        return f"fastmeta's kernels are not built; {REBUILD}", False
    if _build_info.TORCH_VERSION != torch.__version__:
        return (
            f"fastmeta's kernels were built against torch {_build_info.TORCH_VERSION} but torch "
            f"{torch.__version__} is installed; {REBUILD}"
        ), False
    try:
        _C = _import_C()
    except (ImportError, OSError) as e:
        message = str(e)
        return (
            message if message.startswith(_NOT_BUILT) else f"fastmeta's kernels failed to load ({e}); {REBUILD}"
        ), False
    return None, bool(_C.with_cuda)


_NOT_BUILT = "fastmeta was imported from"


def _import_C():  # noqa: N802, ANN202
    """fastmeta._C, from this package or, for a source folder that was installed but not built in place (say
    `python -m fastmeta` run in it after `pip install .`), from the installed copy of the same build."""
    try:
        from fastmeta import _C

        return _C
    except ImportError:
        here = os.path.dirname(os.path.abspath(__file__))
        if any(name.startswith("_C.") for name in os.listdir(here)):
            raise
        import importlib.metadata
        import importlib.util
        import sys

        files = [f for dist in importlib.metadata.distributions(name="fastmeta") for f in dist.files or []]
        for f in files:
            if f.parent.name == "fastmeta" and f.name.startswith("_C.") and f.name.endswith((".so", ".pyd")):
                spec = importlib.util.spec_from_file_location("fastmeta._C", str(f.locate()))
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
                sys.modules["fastmeta._C"] = module
                return module
        raise ImportError(
            f"{_NOT_BUILT} {here}, which holds no built kernels, and no installed build was found; "
            "build in place with `python setup.py build_ext --inplace`, or install with `pip install .`"
        ) from None


ERROR, WITH_CUDA = _load()
AVAILABLE = ERROR is None
# The ops' direct entry points (see csrc/fastmeta.cpp): same dispatch as torch.ops, less per-call overhead.
call_fast_weight_update = None
if AVAILABLE:
    from fastmeta._C import fast_weight_update as call_fast_weight_update  # noqa: F401

if not AVAILABLE:
    if os.environ.get("FASTMETA_REQUIRE_KERNELS") == "1":
        raise ImportError(f"{ERROR} (FASTMETA_REQUIRE_KERNELS=1 makes this an error)")
    if os.environ.get("FASTMETA_DISABLE_KERNELS") != "1":
        warnings.warn(f"{ERROR}. Using the pure-PyTorch reference (slower).", RuntimeWarning, stacklevel=2)


def supports(device: torch.device) -> bool:
    """Whether the compiled kernels run on `device`."""
    return AVAILABLE and (device.type == "cpu" or (device.type == "cuda" and WITH_CUDA))
