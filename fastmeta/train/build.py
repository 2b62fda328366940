"""What a run's configuration builds: its model (the learner around its backbone), its episodes of each part,
and batches moved to the run's device."""

from __future__ import annotations

import torch
from torch import nn

from fastmeta.models import from_config
from fastmeta.train.config import RunConfig

__all__ = ["build_model", "datasets", "to_device"]


def build_model(
    config: RunConfig, device: str | torch.device = "cpu", model_config: dict | None = None
) -> tuple[nn.Module, nn.Module | None]:
    """The run's model (on `device`; `model_config`: a checkpoint's backbone, else the config's), as the learner
    builds it around its backbone, and the other module it learns, if any (its `aux`: Meta-SGD's inner rates,
    the full-context embeddings of matching networks)."""
    model, aux = config.learner.build(config, from_config(model_config or config.model_config()))
    return model.to(device), aux if aux is None else aux.to(device)


def datasets(
    config: RunConfig, part: str = "train", shard: tuple[int, int] = (0, 1), episodes: bool = False
) -> torch.utils.data.Dataset:
    """Episodes of one part: "train" (meta-training), "val" or "test" (a different seed for each part); for a
    learner that trains on classes (Learner.batches), its training parts are LabeledBatch mini-batches
    (fastmeta.data.ClassBatches) unless `episodes` (evaluation on them). shard: (rank, world_size), this
    process's tasks of each meta-batch."""
    seed = config.seed * 1000 + {"train": 0, "val": 1, "trainval": 0, "test": 2}[part]
    training = part in ("train", "trainval")  # the run's training episodes: --train-shot and --train-way apply
    if training and config.learner.batches == "classes" and not episodes:
        return config.spec.class_batches(config, part, config.batch_size, seed, shard)
    k_shot = config.get("train_shot") or config.k_shot if training else config.k_shot
    n_way = config.get("train_way") or config.n_way if training else config.n_way
    try:
        return config.spec.episodes(config, part, n_way, k_shot, seed, shard)
    except ValueError as e:
        if k_shot == config.k_shot:
            raise
        raise ValueError(f"train_shot={k_shot} (the training episodes' k_shot): {e}") from None


def to_device(batch, device: torch.device | str):  # noqa: ANN001, ANN202
    """The batch on `device`; to a GPU through pinned memory without waiting (a plain copy from pageable memory
    waits for everything queued on the device before it)."""
    if torch.device(device).type == "cuda" and batch.device.type == "cpu":
        return batch.pin_memory().to(device, non_blocking=True)
    return batch.to(device)
