"""Shared by the learners' tests: random episodes, separable-class episodes and a short meta-training loop."""

import torch

from fastmeta.data import EpisodeSampler


def episodes(shape, n_way, k_shot, n_query, tasks, seed=0):
    """One TaskBatch of random float64 episodes with examples of `shape`."""
    data = torch.rand(n_way + 3, k_shot + n_query + 1, *shape, dtype=torch.float64)
    return EpisodeSampler(data, n_way, k_shot, n_query, tasks=tasks, seed=seed)[seed]


def separable_classes(n_way, k_shot, n_query, tasks, spread=1.0, noise=0.5, seed=1):
    """Episodes of 20 Gaussian classes in 8 dimensions (centres * spread, noise around them); labels are drawn
    per episode, so a learner must read each support set."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(20, 8, generator=g) * spread
    data = centres.unsqueeze(1) + noise * torch.randn(20, 10, 8, generator=g)
    return EpisodeSampler(data, n_way, k_shot, n_query, tasks=tasks, seed=seed)


def meta_train(step, params, sampler, steps, lr):
    """Adam on step(sampler[i]).loss for i < steps."""
    opt = torch.optim.Adam(params, lr)
    for i in range(steps):
        out = step(sampler[i])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
