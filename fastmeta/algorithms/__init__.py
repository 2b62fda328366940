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
from fastmeta.algorithms.meta_lstm import MetaLSTM, meta_lstm_step
from fastmeta.algorithms.protonet import ProtoOutput, protonet_logits, protonet_step
from fastmeta.algorithms.reptile import ReptileOutput, reptile_step
from fastmeta.algorithms.siamese import nearest_support_logits, siamese_step
from fastmeta.algorithms.snail import SNAIL, snail_step

__all__ = [
    "maml_step",
    "reptile_step",
    "protonet_step",
    "protonet_logits",
    "ProtoOutput",
    "matching_step",
    "matching_log_probs",
    "FullContextEmbedding",
    "siamese_step",
    "MetaLSTM",
    "SNAIL",
    "snail_step",
    "meta_lstm_step",
    "nearest_support_logits",
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
