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

__all__ = [
    "maml_step",
    "adapt",
    "task_losses",
    "msl_weights",
    "MAMLOutput",
    "AdaptedModel",
    "InnerLR",
    "MetaSGDLR",
    "LSLR",
]
