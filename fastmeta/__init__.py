"""fastmeta: fast meta-learning for PyTorch, with fused C++/CUDA kernels and pure-PyTorch references."""

from fastmeta import data, distributed, models, ops, reference
from fastmeta._kernels import AVAILABLE as _AVAILABLE
from fastmeta._kernels import ERROR as _ERROR
from fastmeta._kernels import STALE as _STALE
from fastmeta._kernels import WITH_CUDA as _WITH_CUDA
from fastmeta.algorithms import (
    LSLR,
    SGD,
    Adam,
    AdaptedModel,
    InnerLR,
    MAMLOutput,
    MetaSGDLR,
    PerStepBN,
    ReptileOutput,
    adapt,
    imaml_adapt,
    imaml_step,
    maml_step,
    msl_weights,
    reptile_step,
)
from fastmeta.data import EpisodeSampler, SinusoidTasks, TaskBatch

__version__ = "0.1.0"
__all__ = [
    "ops",
    "reference",
    "data",
    "distributed",
    "models",
    "EpisodeSampler",
    "SinusoidTasks",
    "reptile_step",
    "ReptileOutput",
    "kernels_available",
    "kernels_info",
    "TaskBatch",
    "maml_step",
    "adapt",
    "imaml_step",
    "imaml_adapt",
    "MAMLOutput",
    "AdaptedModel",
    "InnerLR",
    "SGD",
    "Adam",
    "MetaSGDLR",
    "LSLR",
    "PerStepBN",
    "msl_weights",
]


def kernels_available(device: str = "cpu") -> bool:
    """Whether fastmeta's compiled kernels are loaded for `device` ("cpu" or "cuda")."""
    import torch

    from fastmeta._kernels import supports

    return supports(torch.device(device))


def kernels_info() -> dict:
    """What was built and loaded: {"available", "cuda", "error", "stale"} (error: why the kernels are unavailable;
    stale: why the loaded kernels are not those of the sources beside this package, or None)."""
    return {"available": _AVAILABLE, "cuda": _WITH_CUDA, "error": _ERROR, "stale": _STALE}
