"""Every dataset a run can use, declared once: its traits (what learners and backbones read: task kind, domain,
image channels and size), its default run settings, the settings only it reads and how its episodes are made.

The training loop, the command line and the learners look datasets up here and name none of them. A learner's
per-dataset defaults key on a dataset's `domain` (fastmeta.algorithms.common.Option.per_domain), a backbone's
input on its `channels`. Adding a dataset: README, "Adding a dataset".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastmeta.data.episodes import ClassBatches, EpisodeSampler
from fastmeta.data.fewshot import FEWSHOT, TRAINING, DatasetInfo, load_fewshot
from fastmeta.data.omniglot import load_omniglot, omniglot_split
from fastmeta.data.sinusoid import SinusoidTasks

__all__ = ["DatasetSpec", "DATASETS", "DOMAINS", "KINDS", "register_dataset", "dataset"]

KINDS = ("regression", "classification")  # what a run scores: MSE, or accuracy
# What learners' default settings depend on: functions (sinusoid-like regression), characters (Omniglot-like
# small grey images, one inner step at rate 0.4), natural (RGB photographs: Finn et al.'s mini-ImageNet settings,
# 5 inner steps at 0.01).
DOMAINS = ("functions", "characters", "natural")

Settings = Any  # a fastmeta.train.RunConfig, read for data, image_size, split, augment, n_query, meta_batch
# (settings, part, n_way, k_shot, seed, shard) -> episodes indexed by step (each a TaskBatch of meta_batch tasks)
Episodes = Callable[[Settings, str, int, int, int, "tuple[int, int]"], Any]
# (settings, part, batch_size, seed, shard) -> ClassBatches: ordinary mini-batches of the part's examples with
# their class indices (the pretrained baselines' first stage)
Batches = Callable[[Settings, str, int, int, "tuple[int, int]"], ClassBatches]


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset's declaration.

    kind: "regression" or "classification" (KINDS). domain: what learners' defaults key on (DOMAINS).
    channels: image channels (None: not images). image_size: the side images are resized to by default.
    defaults: run settings of its own (Finn et al.'s, with fewer iterations). reads: the run settings only some
    datasets read that this one does (an error for the others). episodes: see `Episodes`. baseline: the learner
    a run's test is compared with, where a run of it sits beside it. fewshot: the image-dataset description
    (layouts, class counts) for the datasets of fastmeta.data.fewshot. batches: see `Batches` (None: the
    dataset has no classes to pretrain on).
    """

    name: str
    kind: str
    domain: str
    episodes: Episodes
    channels: int | None = None
    image_size: int | None = None
    defaults: dict[str, object] = field(default_factory=dict)
    reads: tuple[str, ...] = ()
    baseline: str | None = None
    fewshot: DatasetInfo | None = None
    batches: Batches | None = None

    def class_batches(
        self, config: Settings, part: str, batch_size: int, seed: int = 0, shard: tuple[int, int] = (0, 1)
    ) -> ClassBatches:
        """`batches` of `part` (their num_classes: the classes a pretrained head needs); ValueError naming the
        learner where the dataset has none."""
        if self.batches is None:
            raise ValueError(
                f"--algo {config.algo} trains on the classes of a classification dataset's training part; "
                f"--dataset {self.name} has none"
            )
        return self.batches(config, part, batch_size, seed, shard)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"dataset {self.name}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.domain not in DOMAINS:
            raise ValueError(f"dataset {self.name}: domain must be one of {DOMAINS}, got {self.domain!r}")

    @property
    def settings(self) -> dict[str, object]:
        """Its default run settings, image_size included for image datasets."""
        size = {} if self.image_size is None else {"image_size": self.image_size}
        return {**size, **self.defaults}


DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    """Adds `spec` to DATASETS (`--dataset NAME` on the command line) and returns it."""
    if spec.name in DATASETS:
        raise ValueError(f"dataset {spec.name!r} is already registered")
    DATASETS[spec.name] = spec
    return spec


def dataset(name: object) -> DatasetSpec:
    """The registered dataset `name`; ValueError naming the choices otherwise."""
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {tuple(DATASETS)}, got {name!r}")
    return DATASETS[name]


def _sinusoid(config: Settings, part: str, n_way: int, k_shot: int, seed: int, shard: tuple[int, int]):  # noqa: ANN202
    return SinusoidTasks(k_shot, config.n_query, config.meta_batch, seed=seed, shard=shard)


def _omniglot_part(config: Settings, part: str):  # noqa: ANN202
    if config.data is None:
        raise FileNotFoundError(
            "omniglot needs --data PATH: a folder with omniglot-py/images_background/ and images_evaluation/ "
            "(torchvision's layout), or with images_background.zip and images_evaluation.zip"
        )
    return omniglot_split(load_omniglot(config.data, config.image_size), config.split, part)


def _omniglot(config: Settings, part: str, n_way: int, k_shot: int, seed: int, shard: tuple[int, int]):  # noqa: ANN202
    images = _omniglot_part(config, part)
    return EpisodeSampler(images, n_way, k_shot, config.n_query, config.meta_batch, seed=seed, shard=shard)


def _omniglot_batches(config: Settings, part: str, batch_size: int, seed: int, shard: tuple[int, int]):  # noqa: ANN202
    return ClassBatches(_omniglot_part(config, part), batch_size, seed, shard=shard)


def _fewshot_data(config: Settings):  # noqa: ANN202
    info = FEWSHOT[config.dataset]
    if config.data is None:
        layouts = "; or ".join(layout.expects for layout in info.layouts)
        raise FileNotFoundError(f"{config.dataset} needs --data PATH: the folder with {layouts}")
    return load_fewshot(config.dataset, config.data, config.image_size)


def _fewshot_batches(config: Settings, part: str, batch_size: int, seed: int, shard: tuple[int, int]):  # noqa: ANN202
    return _fewshot_data(config).batches(
        part, batch_size, seed, augment=config.augment and part in TRAINING, shard=shard
    )


def _fewshot(config: Settings, part: str, n_way: int, k_shot: int, seed: int, shard: tuple[int, int]):  # noqa: ANN202
    """The image datasets of fastmeta.data.fewshot: RGB episodes normalised by the train split's mean and std,
    augmented (--augment) only in the training parts."""
    data = _fewshot_data(config)
    augment = config.augment and part in TRAINING
    return data.episodes(part, n_way, k_shot, config.n_query, config.meta_batch, seed, augment=augment, shard=shard)


register_dataset(
    DatasetSpec(
        "sinusoid", "regression", "functions", _sinusoid,
        defaults=dict(k_shot=10, n_query=10, meta_batch=25, meta_lr=1e-3, iterations=20000, val_every=2000,
                      val_episodes=40, hidden=40),
        reads=("layers",),
        baseline="pretrain",  # Finn et al.'s: joint training on all tasks, fine-tuned at test
    )
)  # fmt: skip
register_dataset(
    DatasetSpec(
        "omniglot", "classification", "characters", _omniglot, channels=1, image_size=28,
        defaults=dict(n_way=5, k_shot=1, n_query=5, meta_batch=32, meta_lr=1e-3, iterations=20000, val_every=500,
                      val_episodes=8),
        reads=("data", "split", "n_way", "backbone", "image_size"),
        batches=_omniglot_batches,
    )
)  # fmt: skip
# mini-ImageNet, CIFAR-FS, FC100, CUB-200-2011, image folders: the standard 5-way episodes with 15 queries a class;
# Finn et al.'s mini-ImageNet meta-batch of 4 and 60k iterations
for _info in FEWSHOT.values():
    register_dataset(
        DatasetSpec(
            _info.name, "classification", "natural", _fewshot, channels=3, image_size=_info.image_size,
            defaults=dict(n_way=5, k_shot=1, n_query=15, meta_batch=4, meta_lr=1e-3, iterations=60000,
                          val_every=1000, val_episodes=25),
            reads=("data", "n_way", "backbone", "image_size", "augment"),
            fewshot=_info,
            batches=_fewshot_batches,
        )
    )  # fmt: skip
