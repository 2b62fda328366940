"""The sinusoid regression tasks of Finn et al. (2017): y = A sin(x - phase), A in [0.1, 5], phase in [0, pi],
x uniform in [-5, 5]."""

from __future__ import annotations

import math

import torch

from fastmeta.data.episodes import _mix, shard_range
from fastmeta.data.tasks import TaskBatch

__all__ = ["SinusoidTasks"]


class SinusoidTasks(torch.utils.data.Dataset):
    """Item i: a TaskBatch of `tasks` sinusoids with k_shot support and n_query query points each, x and y of
    shape (T, K, 1). Item i depends only on (seed, i), its task j only on (seed, i, j); `shard=(rank,
    world_size)` keeps this process's tasks (see EpisodeSampler). `amplitude` and `phase` ranges as in Finn et al."""

    def __init__(
        self,
        k_shot: int = 10,
        n_query: int = 10,
        tasks: int = 25,
        seed: int = 0,
        length: int = 10**6,
        amplitude: tuple[float, float] = (0.1, 5.0),
        phase: tuple[float, float] = (0.0, math.pi),
        x_range: tuple[float, float] = (-5.0, 5.0),
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        for name, value, low in (("k_shot", k_shot, 1), ("n_query", n_query, 1), ("tasks", tasks, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"SinusoidTasks: {name} must be an integer >= {low}, got {value!r}")
        self.k_shot, self.n_query, self.tasks, self.seed, self.length = k_shot, n_query, tasks, seed, length
        self.amplitude, self.phase, self.x_range = amplitude, phase, x_range
        self.task_ids = shard_range(tasks, *shard)

    def __len__(self) -> int:
        return self.length

    def sample(self, i: int) -> tuple[TaskBatch, torch.Tensor, torch.Tensor]:
        """(batch, amplitudes (T,), phases (T,)) of item i."""
        T, n = len(self.task_ids), self.k_shot + self.n_query
        amp, phase, x = torch.empty(T, 1, 1), torch.empty(T, 1, 1), torch.empty(T, n, 1)
        episode = _mix(self.seed, i)
        for t, j in enumerate(self.task_ids):
            g = torch.Generator().manual_seed(_mix(episode, j))
            amp[t].uniform_(*self.amplitude, generator=g)
            phase[t].uniform_(*self.phase, generator=g)
            x[t].uniform_(*self.x_range, generator=g)
        y = amp * torch.sin(x - phase)
        k = self.k_shot
        return TaskBatch(x[:, :k], y[:, :k], x[:, k:], y[:, k:]), amp.view(T), phase.view(T)

    def __getitem__(self, i: int) -> TaskBatch:
        return self.sample(i)[0]
