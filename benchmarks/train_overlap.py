"""Meta-training steps per second: the training loop as built (each step's numbers read after the next step is
issued, episodes copied to the device from pinned memory without waiting) against reading each step at once
with a plain copy (what the loop did before, and what a `loss.item()` per step in a user's loop does).

    python benchmarks/train_overlap.py [--device cuda] [--steps 30] [--rounds 3] [--small]

Rows: MAML with the train command's defaults on sinusoid regression (MLP 1-40-40-1: a host-bound step on a
GPU) and on Omniglot-shaped episodes (Conv4, 5-way 1-shot, 28x28, T=32; random images, no data needed).
Each step is `fastmeta.train.train_step`, as `fastmeta train` runs it, with its optimiser. The time of `--steps`
consecutive steps (a device synchronisation at the end), medians of interleaved rounds. On a CPU both ways
are the same work, so the ratio stays near 1; on a GPU it shows what the host's wait cost.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fastmeta import TaskBatch
from fastmeta.train import RunConfig, build_model, datasets, to_device, train_step


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def run_steps(config: RunConfig, model, aux, opt, batches: list[TaskBatch], device: str, overlap: bool) -> float:  # noqa: ANN001
    """Seconds for len(batches) consecutive training steps."""
    _sync(device)
    t = time.perf_counter()
    unread = None
    for batch in batches:
        numbers = train_step(config, model, aux, opt, to_device(batch, device) if overlap else batch.to(device))
        if overlap:
            if unread is not None:
                unread.read()
            unread = numbers
        else:
            numbers.read()
    if unread is not None:
        unread.read()
    _sync(device)
    return time.perf_counter() - t


def workloads(small: bool) -> list[tuple[str, RunConfig, list[TaskBatch]]]:
    T = 2 if small else None
    sine = RunConfig.make("sinusoid", **({"meta_batch": T} if T else {}))
    g = torch.Generator().manual_seed(0)
    tasks, shape = T or 32, (1, 28, 28)
    omni = RunConfig.make("omniglot", data="(random images)", meta_batch=tasks, **({"hidden": 4} if small else {}))
    y = torch.arange(omni.n_way).repeat_interleave(omni.k_shot).repeat(tasks, 1)
    qy = torch.arange(omni.n_way).repeat_interleave(omni.n_query).repeat(tasks, 1)

    def episode() -> TaskBatch:
        return TaskBatch(
            torch.rand(tasks, y.shape[1], *shape, generator=g),
            y,
            torch.rand(tasks, qy.shape[1], *shape, generator=g),
            qy,
        )

    return [
        (f"MAML sinusoid MLP, T={sine.meta_batch}, S={sine.inner_steps}, 2nd order", sine, None),
        (f"MAML Conv4 5-way 1-shot 28x28, T={tasks}, S={omni.inner_steps}, 2nd order", omni, episode),
    ]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--small", action="store_true", help="toy sizes (2 tasks, 4 channels): checks the script")
    a = p.parse_args(argv)
    print(f"torch {torch.__version__}, {a.device}, {a.steps} steps a round, medians of {a.rounds} rounds\n")
    print("| workload | read at once | read one step late | steps/s as built | at once / as built |")
    print("|---|---:|---:|---:|---:|")
    for label, config, episode in workloads(a.small):
        model, aux = build_model(config, a.device)
        opt = torch.optim.Adam(list(model.parameters()) + (list(aux.parameters()) if aux else []), lr=1e-4)
        source = datasets(config, "train") if episode is None else None
        batches = [source[i] if episode is None else episode() for i in range(a.steps)]
        times: dict[bool, list[float]] = {False: [], True: []}
        run_steps(config, model, aux, opt, batches[:2], a.device, True)  # warm-up (allocator, cuDNN plans)
        for _ in range(a.rounds):
            for overlap in (False, True):
                times[overlap].append(run_steps(config, model, aux, opt, batches, a.device, overlap))
        at_once, late = (statistics.median(times[k]) for k in (False, True))
        print(
            f"| {label} | {at_once / a.steps * 1e3:.2f} ms | {late / a.steps * 1e3:.2f} ms | "
            f"{a.steps / late:.1f} | {at_once / late:.2f}x |",
            flush=True,
        )


if __name__ == "__main__":
    main()
