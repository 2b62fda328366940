"""Episodes: N-way K-shot tasks with Q queries per class, drawn from any labelled data, batched into TaskBatch;
and ClassBatches, ordinary shuffled mini-batches of the same data (the pretrained baselines' first stage)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from fastmeta.data.tasks import LabeledBatch, TaskBatch

__all__ = ["EpisodeSampler", "ClassBatches", "shard_range"]


class EpisodeSampler(torch.utils.data.Dataset):
    """Item i is a TaskBatch of `tasks` N-way K-shot episodes: support (T, N*K, *x), query (T, N*Q, *x).

    Each task draws `n_way` distinct classes and, from each, `k_shot + n_query` distinct examples; its labels
    are 0..n_way-1 in the order the classes were drawn, support and query grouped by class. Episode i depends
    only on (seed, i): reproducible, and the same whichever DataLoader worker makes it (use
    `DataLoader(sampler, batch_size=None, num_workers=...)`). Task j of episode i depends only on (seed, i, j),
    so `shard=(rank, world_size)` gives each process its own part of the same tasks
    (`shard_range(tasks, rank, world_size)`): the union over the ranks is the unsharded batch.

    Args:
        data: either a class-major tensor (C, E, *x), E examples of each of C classes (uint8 images are scaled
            to [0, 1] floats), or any dataset whose items are (x, label) (labels from `data.targets` when it
            has them, else read once).
        length: the number of episodes (len(sampler)); indices past it are still valid.
        shard: (rank, world_size): this process's tasks of each batch of `tasks` (torch.distributed).
        class_sizes: for a class-major tensor, the number of valid examples of each class (C,): class c's are
            data[c, :class_sizes[c]], the rest padding that is never drawn (default: all E of every class).
        transform: `transform(x, generator) -> x`, applied to each task's examples x (n_way, k_shot + n_query,
            *x) (floats; uint8 already scaled to [0, 1]) with a generator seeded by (seed, i, j) alone, e.g.
            normalisation and augmentation (`fastmeta.data.EpisodeTransform`). It does not change which
            examples are drawn.
    """

    def __init__(
        self,
        data: Tensor | torch.utils.data.Dataset,
        n_way: int,
        k_shot: int,
        n_query: int,
        tasks: int = 1,
        seed: int = 0,
        length: int = 10**6,
        shard: tuple[int, int] = (0, 1),
        class_sizes: Sequence[int] | Tensor | None = None,
        transform: Callable[[Tensor, torch.Generator], Tensor] | None = None,
    ) -> None:
        for name, value, low in (
            ("n_way", n_way, 1),
            ("k_shot", k_shot, 1),
            ("n_query", n_query, 0),
            ("tasks", tasks, 1),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"EpisodeSampler: {name} must be an integer >= {low}, got {value!r}")
        self.data, self.n_way, self.k_shot, self.n_query, self.tasks = data, n_way, k_shot, n_query, tasks
        self.seed, self.length, self.transform = seed, length, transform
        self.task_ids = shard_range(tasks, *shard)
        if isinstance(data, Tensor):
            if data.dim() < 2:
                raise ValueError(
                    f"EpisodeSampler: a tensor must be class-major (C, E, ...), got shape {tuple(data.shape)}"
                )
            self.class_sizes = _class_sizes("EpisodeSampler", data, class_sizes)
            self.by_class: list[Tensor] | None = None
        else:
            if class_sizes is not None:
                raise ValueError("EpisodeSampler: class_sizes is for a class-major tensor, not a dataset")
            labels = _labels(data)
            classes = sorted(set(labels))
            index = {c: i for i, c in enumerate(classes)}
            members: list[list[int]] = [[] for _ in classes]
            for i, y in enumerate(labels):
                members[index[y]].append(i)
            self.by_class = [torch.tensor(m) for m in members]
            self.class_sizes = [len(m) for m in members]
        C = len(self.class_sizes)
        if n_way > C:
            raise ValueError(f"EpisodeSampler: n_way={n_way} is more than the {C} classes in the data")
        need = k_shot + n_query
        enough = sum(size >= need for size in self.class_sizes)
        if enough < n_way:
            raise ValueError(
                f"EpisodeSampler: k_shot + n_query = {need} examples per class, but only {enough} classes have that "
                f"many (the smallest has {min(self.class_sizes)}); n_way={n_way} needs {n_way} of them"
            )
        self.eligible = torch.tensor([i for i, size in enumerate(self.class_sizes) if size >= need])

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> TaskBatch:
        n, k, q = self.n_way, self.k_shot, self.n_query
        picks = []  # per task: (n_way classes, (n_way, k+q) example indices)
        episode = _mix(self.seed, i)
        for j in self.task_ids:
            g = torch.Generator().manual_seed(_mix(episode, j))
            classes = self.eligible[torch.randperm(len(self.eligible), generator=g)[:n]]
            examples = torch.stack(
                [torch.randperm(self.class_sizes[c], generator=g)[: k + q] for c in classes.tolist()]
            )
            picks.append((classes, examples, _mix(_mix(episode, j), 1)))
        x = torch.stack([self._gather(c, e, s) for c, e, s in picks])  # (T, n, k+q, *x)
        y = torch.arange(n).view(1, n, 1).expand(len(picks), n, k + q)
        flat = lambda t, a, b: t[:, :, a:b].reshape(t.shape[0], -1, *t.shape[3:])  # noqa: E731
        return TaskBatch(flat(x, 0, k), flat(y, 0, k), flat(x, k, k + q), flat(y, k, k + q))

    def _gather(self, classes: Tensor, examples: Tensor, transform_seed: int) -> Tensor:
        if self.by_class is None:
            x = self.data[classes.unsqueeze(1), examples]
        else:
            items = [self.data[int(self.by_class[c][e])][0] for c, row in zip(classes.tolist(), examples) for e in row]
            x = torch.stack([torch.as_tensor(t) for t in items]).view(*examples.shape, *torch.as_tensor(items[0]).shape)
        x = x.float().div_(255) if x.dtype == torch.uint8 else x
        if self.transform is not None:  # its own stream: the draws above are the same with or without it
            x = self.transform(x, torch.Generator().manual_seed(transform_seed))
        return x


class ClassBatches(torch.utils.data.Dataset):
    """Item i is a LabeledBatch of `batch_size` examples of a class-major tensor (C, E, *x) with their class
    indices 0..C-1: epoch e = i // (steps per epoch) visits every example once in an order drawn from (seed, e)
    alone, in batches of batch_size (the remainder of each epoch is left out), so item i depends only on
    (seed, i) and a resumed run sees the same batches. uint8 images are scaled to [0, 1] floats; `transform`
    as in EpisodeSampler, applied to the batch (B, *x) with a generator seeded by (seed, i).

    class_sizes: class c's examples are data[c, :class_sizes[c]] (the rest is padding). shard: (rank,
    world_size): this process's contiguous part of every batch (the union over the ranks is the batch)."""

    def __init__(
        self,
        data: Tensor,
        batch_size: int,
        seed: int = 0,
        length: int = 10**6,
        shard: tuple[int, int] = (0, 1),
        class_sizes: Sequence[int] | Tensor | None = None,
        transform: Callable[[Tensor, torch.Generator], Tensor] | None = None,
    ) -> None:
        if not isinstance(data, Tensor) or data.dim() < 2:
            raise ValueError(f"ClassBatches: data must be a class-major tensor (C, E, ...), got {_shape_of(data)}")
        sizes = _class_sizes("ClassBatches", data, class_sizes)
        total = sum(sizes)
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or not 1 <= batch_size <= total:
            raise ValueError(f"ClassBatches: batch_size must be an integer in [1, {total}], got {batch_size!r}")
        self.data, self.batch_size, self.seed, self.length, self.transform = data, batch_size, seed, length, transform
        self.part = shard_range(batch_size, *shard)
        self.share = len(self.part) / batch_size
        self.num_classes = len(sizes)
        self.classes = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))  # (total,)
        starts = torch.tensor([0, *sizes[:-1]]).cumsum(0)
        self.within = torch.arange(total) - starts[self.classes]  # each example's index in its class
        self.steps_per_epoch = total // batch_size

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> LabeledBatch:
        epoch, step = divmod(i, self.steps_per_epoch)
        order = torch.randperm(len(self.classes), generator=torch.Generator().manual_seed(_mix(self.seed, epoch)))
        pick = order[step * self.batch_size : (step + 1) * self.batch_size][self.part.start : self.part.stop]
        c, e = self.classes[pick], self.within[pick]
        x = self.data[c, e]
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.clone()
        if self.transform is not None:
            x = self.transform(x, torch.Generator().manual_seed(_mix(_mix(self.seed, i), 2)))
        return LabeledBatch(x, c)


def _class_sizes(who: str, data: Tensor, class_sizes: Sequence[int] | Tensor | None) -> list[int]:
    """The number of valid examples of each class of a class-major tensor (C, E, ...): all E, or `class_sizes`
    checked (C sizes in [0, E])."""
    if class_sizes is None:
        return [data.shape[1]] * data.shape[0]
    sizes = [int(n) for n in (class_sizes.tolist() if isinstance(class_sizes, Tensor) else class_sizes)]
    if len(sizes) != data.shape[0] or not all(0 <= n <= data.shape[1] for n in sizes):
        raise ValueError(
            f"{who}: class_sizes must give each of the {data.shape[0]} classes a size in [0, {data.shape[1]}], got "
            f"{len(sizes)} sizes from {min(sizes, default=None)} to {max(sizes, default=None)}"
        )
    return sizes


def _shape_of(data: object) -> str:
    return f"shape {tuple(data.shape)}" if isinstance(data, Tensor) else type(data).__name__


def _labels(data: torch.utils.data.Dataset) -> Sequence:
    targets = getattr(data, "targets", None)
    if targets is not None:
        return targets.tolist() if isinstance(targets, Tensor) else list(targets)
    return [int(data[i][1]) for i in range(len(data))]


def shard_range(tasks: int, rank: int, world_size: int) -> range:
    """The tasks of a meta-batch of `tasks` that process `rank` of `world_size` owns: a contiguous block,
    sizes differing by at most one. Every rank owns at least one (tasks >= world_size)."""
    if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
        raise ValueError(f"shard: need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}")
    if tasks < world_size:
        raise ValueError(
            f"shard: a meta-batch of {tasks} tasks cannot be split over {world_size} processes (each needs at least "
            "one task): use a meta-batch of at least the world size"
        )
    return range(rank * tasks // world_size, (rank + 1) * tasks // world_size)


def _mix(seed: int, i: int) -> int:
    """A 63-bit seed for episode i (splitmix64 of seed and index: nearby pairs give unrelated streams)."""
    z = (seed * 0x9E3779B97F4A7C15 + i + 1) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF
