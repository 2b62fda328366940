"""Tasks for meta-learning: a batch of T tasks (each a support set to adapt on and a query set to evaluate), the
episode sampler that makes them from labelled data, Omniglot, the sinusoid task family, and the image datasets
few-shot papers report on (mini-ImageNet, CIFAR-FS, FC100, CUB-200-2011, image folders) in their distributed
layouts; DATASETS: every dataset a run can use, with its traits (fastmeta.data.registry)."""

from fastmeta.data.episodes import ClassBatches, EpisodeSampler, shard_range
from fastmeta.data.fewshot import FEWSHOT, EpisodeTransform, FewShotDataset, FewShotSplit, load_fewshot
from fastmeta.data.omniglot import Omniglot, load_omniglot, omniglot_split
from fastmeta.data.registry import DATASETS, DatasetSpec, register_dataset
from fastmeta.data.sinusoid import SinusoidTasks
from fastmeta.data.tasks import LabeledBatch, TaskBatch

__all__ = [
    "TaskBatch",
    "LabeledBatch",
    "EpisodeSampler",
    "ClassBatches",
    "SinusoidTasks",
    "Omniglot",
    "load_omniglot",
    "omniglot_split",
    "shard_range",
    "FEWSHOT",
    "EpisodeTransform",
    "FewShotDataset",
    "FewShotSplit",
    "load_fewshot",
    "DATASETS",
    "DatasetSpec",
    "register_dataset",
]
