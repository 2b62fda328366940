"""A meta-step's fixed cost: its time when the arithmetic is negligible.

    python benchmarks/host_time.py [--tasks 32] [--rounds 15]

Conv4 with 2 channels on 16x16 images (5 support and 5 query images per task), one thread: what is left of a
step's time is Python, dispatch, autograd's bookkeeping and each library call's fixed cost (oneDNN's here,
cuDNN's on a GPU): what the host spends issuing the step, which a GPU cannot hide when its kernels are short.
fastmeta.maml_step against torch.func.vmap over tasks (the benchmarks' vmap method, batch norm in elementary
ops), second and first order, medians of interleaved rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import fastmeta
from fastmeta._bench.maml import vmap_step
from fastmeta.models import Conv4


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=32)
    p.add_argument("--rounds", type=int, default=15)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    model = Conv4(5, hidden=2, image_size=16)
    sx, qx = torch.randn(a.tasks, 5, 1, 16, 16, generator=g), torch.randn(a.tasks, 5, 1, 16, 16, generator=g)
    y = torch.arange(5).repeat(a.tasks, 1)
    batch = fastmeta.TaskBatch(sx, y, qx, y.clone())
    params = list(model.parameters())

    def step(method: str, steps: int, first_order: bool):  # noqa: ANN202
        def run() -> None:
            if method == "fastmeta":
                loss = fastmeta.maml_step(model, batch, 0.4, steps, first_order).loss
            else:
                loss = vmap_step(model, batch, 0.4, steps, first_order, F.cross_entropy)
            torch.autograd.grad(loss, params)

        return run

    print(f"torch {torch.__version__}, 1 thread, Conv4 (2 channels, 16x16), T={a.tasks}, 5+5 images a task\n")
    print("| inner steps | order | fastmeta | vmap | vmap / fastmeta |")
    print("|---:|---|---:|---:|---:|")
    for steps, first_order in ((1, False), (1, True), (5, False)):
        calls = {m: step(m, steps, first_order) for m in ("fastmeta", "vmap")}
        times: dict[str, list[float]] = {m: [] for m in calls}
        for call in calls.values():
            call()
            call()
        for _ in range(a.rounds):
            for m, call in calls.items():
                t = time.perf_counter()
                call()
                times[m].append(time.perf_counter() - t)
        ours, theirs = (statistics.median(times[m]) * 1e3 for m in ("fastmeta", "vmap"))
        order = "1st" if first_order else "2nd"
        print(f"| {steps} | {order} | {ours:.1f} ms | {theirs:.1f} ms | {theirs / ours:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
