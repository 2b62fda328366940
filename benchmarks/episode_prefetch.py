"""Time outside the meta-step: episodes built between steps (as `fastmeta train` did) against built on a
background thread while the step runs (fastmeta.train.Prefetcher, as it does now).

    python benchmarks/episode_prefetch.py [--steps 12] [--rounds 3] [--threads 2] [--small]

mini-ImageNet-shaped episodes (84x84 RGB) sampled by the loaders' own EpisodeSampler and EpisodeTransform from a
class-major uint8 tensor of random images, as the decoded cache holds them (gather, to float, normalise, with
--augment's random crop and flip where a row says so), then `fastmeta.train.train_step` as the train command
runs it. Rows: MAML with Finn et al.'s settings (Conv4 32 channels, 4 tasks of 5-way 1-shot, 15 queries, 5
inner steps, second order) and ProtoNets 5-way 5-shot (Conv4 64 channels, one episode a step). Columns: the
step alone on episodes built beforehand, the loop with episodes built in turn, and with prefetching, each the
seconds per iteration (medians of interleaved rounds); "outside the step" is (loop - step) / loop.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fastmeta.data.episodes import EpisodeSampler
from fastmeta.data.fewshot import EpisodeTransform
from fastmeta.train import RunConfig, build_model, train_step
from fastmeta.train.prefetch import Prefetcher

MEAN, STD = (0.47, 0.45, 0.41), (0.28, 0.27, 0.29)  # about mini-ImageNet's


def _episodes(config: RunConfig, images: torch.Tensor, augment: bool) -> EpisodeSampler:
    padding = 8 if augment else None
    k_shot = config.k_shot
    return EpisodeSampler(
        images, config.n_way, k_shot, config.n_query, config.meta_batch, seed=0,
        transform=EpisodeTransform(MEAN, STD, padding),
    )  # fmt: skip


def _loop(config, model, aux, opt, episodes, start: int, steps: int, how: str) -> float:  # noqa: ANN001
    """Seconds per iteration of `steps` steps from episode `start`: how = "step" (episodes built beforehand,
    not timed), "inline" (built in turn) or "prefetch" (built one ahead on a thread)."""
    if how == "step":
        batches = [episodes[i] for i in range(start, start + steps)]
        t = time.perf_counter()
        for batch in batches:
            train_step(config, model, aux, opt, batch).read()
        return (time.perf_counter() - t) / steps
    t = time.perf_counter()
    if how == "inline":
        for i in range(start, start + steps):
            train_step(config, model, aux, opt, episodes[i]).read()
    else:
        with Prefetcher(episodes, start, start + steps) as p:
            for i in range(start, start + steps):
                train_step(config, model, aux, opt, p.get(i)).read()
    return (time.perf_counter() - t) / steps


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12, help="steps a measurement")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--small", action="store_true", help="toy sizes (32x32, 4 channels): checks the script")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    size = 32 if a.small else 84
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16 if a.small else 64, 20 if a.small else 100, 3, size, size), generator=g,
                           dtype=torch.uint8)  # fmt: skip

    def config(algo: str, hidden: int, **settings: object) -> RunConfig:
        hidden, toy = (4, {"image_size": size}) if a.small else (hidden, {})
        return RunConfig.make("miniimagenet", data="(random)", algo=algo, hidden=hidden, **settings, **toy)

    proto = config("protonet", 64, k_shot=5, meta_batch=1)
    rows = [
        ("MAML Finn settings, 5-way 1-shot, T=4, S=5, 2nd order", config("maml", 32, k_shot=1), False),
        ("ProtoNets 5-way 5-shot", proto, False),
        ("ProtoNets 5-way 5-shot, --augment", proto, True),
    ]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {a.steps} steps a measurement, "
          f"medians of {a.rounds} rounds, {size}x{size} images\n")  # fmt: skip
    print("| workload | step alone | episodes in turn | prefetched | outside the step: in turn | prefetched |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, config, augment in rows:
        model, aux = build_model(config)
        opt = torch.optim.Adam(list(model.parameters()) + (list(aux.parameters()) if aux else []), lr=1e-4)
        episodes = _episodes(config, images, augment)
        _loop(config, model, aux, opt, episodes, 0, 2, "inline")  # warm-up
        times: dict[str, list[float]] = {"step": [], "inline": [], "prefetch": []}
        start = 2
        for _ in range(a.rounds):
            for how in times:
                times[how].append(_loop(config, model, aux, opt, episodes, start, a.steps, how))
                start += a.steps
        step, inline, prefetch = (statistics.median(times[k]) for k in ("step", "inline", "prefetch"))
        print(
            f"| {label} | {step:.3f} s | {inline:.3f} s | {prefetch:.3f} s | {100 * (inline - step) / inline:.1f}% | "
            f"{100 * (prefetch - step) / prefetch:.1f}% |",
            flush=True,
        )


if __name__ == "__main__":
    main()
