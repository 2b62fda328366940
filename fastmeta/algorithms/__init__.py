"""Meta-learning algorithms built on fastmeta's ops."""

from fastmeta.algorithms.baselines import BASELINE, BASELINEPP, METABASELINE, fit_heads
from fastmeta.algorithms.common import ClassificationOutput, Learner, Option, ProtoOutput
from fastmeta.algorithms.imaml import IMAML, conjugate_gradient, imaml_adapt, imaml_step
from fastmeta.algorithms.inner import LSLR, InnerLR, MAMLOutput, MetaSGDLR, PerStepBN, task_losses
from fastmeta.algorithms.inner_opt import SGD, Adam, InnerOptimizer
from fastmeta.algorithms.maml import AdaptedModel, adapt, maml_step, msl_weights
from fastmeta.algorithms.maml_learners import ANIL, FOMAML, MAML, MAMLPP, METASGD, PRETRAIN
from fastmeta.algorithms.matching import MATCHING, FullContextEmbedding, matching_log_probs, matching_step
from fastmeta.algorithms.meta_lstm import META_LSTM, MetaLSTM, meta_lstm_step
from fastmeta.algorithms.protonet import PROTONET, protonet_logits, protonet_step
from fastmeta.algorithms.reptile import REPTILE, ReptileOutput, reptile_step
from fastmeta.algorithms.siamese import SIAMESE, nearest_support_logits, siamese_step
from fastmeta.algorithms.snail import SNAIL, SNAIL_LEARNER, snail_step

# Every learner `python -m fastmeta train --algo NAME` knows, by name, in the order the help lists them. A new
# learner: declare a Learner in its module (see README, "Adding a learner") and add it here.
LEARNERS: dict[str, Learner] = {
    learner.name: learner
    for learner in (
        *(MAML, FOMAML, METASGD, ANIL, MAMLPP, IMAML, REPTILE, PRETRAIN, META_LSTM, SNAIL_LEARNER),
        *(PROTONET, MATCHING, SIAMESE, BASELINE, BASELINEPP, METABASELINE),
    )
}

__all__ = [
    "maml_step",
    "reptile_step",
    "protonet_step",
    "protonet_logits",
    "ProtoOutput",
    "ClassificationOutput",
    "Learner",
    "Option",
    "LEARNERS",
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
    "imaml_step",
    "imaml_adapt",
    "conjugate_gradient",
    "fit_heads",
    "task_losses",
    "msl_weights",
    "MAMLOutput",
    "AdaptedModel",
    "InnerLR",
    "MetaSGDLR",
    "LSLR",
    "PerStepBN",
    "SGD",
    "Adam",
    "InnerOptimizer",
]
