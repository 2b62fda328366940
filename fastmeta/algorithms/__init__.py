"""Meta-learning algorithms built on fastmeta's ops."""

from fastmeta.algorithms.maml import (
    LSLR,
    AdaptedModel,
    InnerLR,
    MAMLOutput,
    MetaSGDLR,
    adapt,
    maml_step,
    msl_weights,
    task_losses,
)
from fastmeta.algorithms.reptile import ReptileOutput, reptile_step

__all__ = [
    "maml_step",
    "reptile_step",
    "ReptileOutput",
    "adapt",
    "task_losses",
    "msl_weights",
    "MAMLOutput",
    "AdaptedModel",
    "InnerLR",
    "MetaSGDLR",
    "LSLR",
]
