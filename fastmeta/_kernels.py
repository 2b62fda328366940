"""Loads fastmeta._C (the compiled kernels) once, or says why it could not.

FASTMETA_DISABLE_KERNELS=1 skips the kernels (the pure-PyTorch reference runs instead, silently);
FASTMETA_REQUIRE_KERNELS=1 turns a missing or mismatched build into an ImportError instead of a warning.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import warnings

import torch

from fastmeta._fingerprint import source_fingerprint

REBUILD = (
    "rebuild them with `pip install --no-build-isolation --force-reinstall --no-deps .` in fastmeta's source folder"
)
REBUILD_IN_PLACE = "rebuild them with `python setup.py build_ext --inplace` in fastmeta's source folder"
HERE = os.path.dirname(os.path.abspath(__file__))
_NOT_BUILT = "fastmeta was imported from"


def _build_folder() -> str:
    """The folder of the kernels this package loads: its own (built in place, or an installed package), else,
    for a source folder that was installed but not built in place (say `pytest` run in it after `pip install .`),
    the installed copy's."""
    if any(name.startswith("_C.") for name in os.listdir(HERE)):
        return HERE
    import importlib.metadata

    for dist in importlib.metadata.distributions(name="fastmeta"):
        for f in dist.files or []:
            if f.parent.name == "fastmeta" and f.name.startswith("_C.") and f.name.endswith((".so", ".pyd")):
                return os.path.dirname(str(f.locate()))
    raise ImportError(
        f"{_NOT_BUILT} {HERE}, which holds no built kernels, and no installed build was found; "
        "build in place with `python setup.py build_ext --inplace`, or install with `pip install .`"
    )


def _module(folder: str, name: str):  # noqa: ANN202
    """fastmeta.<name> from `folder`: this package's own, or the installed build's file of that name."""
    if folder == HERE:
        return importlib.import_module(f"fastmeta.{name}")
    suffixes = (".py",) if name == "_build_info" else (".so", ".pyd")
    files = [f for f in os.listdir(folder) if f.split(".")[0] == name and f.endswith(suffixes)]
    if not files:
        raise ImportError(f"no {name} in {folder}")
    spec = importlib.util.spec_from_file_location(f"fastmeta.{name}", os.path.join(folder, files[0]))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[f"fastmeta.{name}"] = module
    return module


def stale_sources(built: str | None, csrc: str) -> str | None:
    """Why kernels built from sources of fingerprint `built` are not those of the `csrc` folder, or None."""
    if not os.path.isdir(csrc) or built == source_fingerprint(csrc):
        return None
    return f"fastmeta's kernels were built from other sources than {os.path.normpath(csrc)}"


def _load() -> tuple[str | None, bool, str | None]:
    """(why the kernels are unavailable or None, whether they include CUDA, why they are stale or None)."""
    if os.environ.get("FASTMETA_DISABLE_KERNELS") == "1":
        return "fastmeta's kernels are disabled by FASTMETA_DISABLE_KERNELS=1", False, None
    try:
        folder = _build_folder()
        info = _module(folder, "_build_info")
    except ImportError as e:
        message = str(e)
        return (
            (message if message.startswith(_NOT_BUILT) else f"fastmeta's kernels are not built; {REBUILD}"),
            False,
            None,
        )
    rebuild = REBUILD_IN_PLACE if folder == HERE else REBUILD
    if info.TORCH_VERSION != torch.__version__:
        return (
            (
                f"fastmeta's kernels were built against torch {info.TORCH_VERSION} but torch "
                f"{torch.__version__} is installed; {rebuild}"
            ),
            False,
            None,
        )
    try:
        _C = _module(folder, "_C")
    except (ImportError, OSError) as e:
        return f"fastmeta's kernels failed to load ({e}); {rebuild}", False, None
    # The sources beside the imported package, where it is a source folder (an installed package has none).
    stale = stale_sources(getattr(info, "SOURCE_FINGERPRINT", None), os.path.join(HERE, os.pardir, "csrc"))
    return None, bool(_C.with_cuda), None if stale is None else f"{stale} ({folder}); {rebuild}"


ERROR, WITH_CUDA, STALE = _load()
AVAILABLE = ERROR is None
# The ops' direct entry points (see csrc/fastmeta.cpp): same dispatch as torch.ops, less per-call overhead.
call_fast_weight_update = None
if AVAILABLE:
    from fastmeta._C import fast_weight_update as call_fast_weight_update  # noqa: F401

if STALE is not None:  # the kernels load, but a test of the sources beside them would run an older binary
    if os.environ.get("FASTMETA_REQUIRE_KERNELS") == "1":
        raise ImportError(f"{STALE} (FASTMETA_REQUIRE_KERNELS=1 makes this an error)")
    warnings.warn(f"{STALE}.", RuntimeWarning, stacklevel=2)
if not AVAILABLE:
    if os.environ.get("FASTMETA_REQUIRE_KERNELS") == "1":
        raise ImportError(f"{ERROR} (FASTMETA_REQUIRE_KERNELS=1 makes this an error)")
    if os.environ.get("FASTMETA_DISABLE_KERNELS") != "1":
        warnings.warn(f"{ERROR}. Using the pure-PyTorch reference (slower).", RuntimeWarning, stacklevel=2)


def supports(device: torch.device) -> bool:
    """Whether the compiled kernels run on `device`."""
    return AVAILABLE and (device.type == "cpu" or (device.type == "cuda" and WITH_CUDA))


def runs(t: torch.Tensor) -> bool:
    """supports(t.device), without making a torch.device (a quarter of the Python cost of a small update)."""
    return AVAILABLE and (t.is_cpu or (WITH_CUDA and t.is_cuda))
