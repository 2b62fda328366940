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
from fastmeta.algorithms.matching import FullContextEmbedding, matching_log_probs, matching_step
from fastmeta.algorithms.protonet import ProtoOutput, protonet_logits, protonet_step
from fastmeta.algorithms.reptile import ReptileOutput, reptile_step

__all__ = [
    "maml_step",
    "reptile_step",
    "protonet_step",
    "protonet_logits",
    "ProtoOutput",
    "matching_step",
    "matching_log_probs",
    "FullContextEmbedding",
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
