"""Peak memory and time of one second-order MAML meta-step (forward + backward) against the number of inner steps.

    python benchmarks/maml_memory.py                      # Conv4 and ResNet-12 rows at S = 1, 5, 10
    python benchmarks/maml_memory.py --small              # the same rows at toy sizes
    python benchmarks/maml_memory.py --models conv4 --steps 1 10 --methods plain steps

Methods: `plain` maml_step; `steps` maml_step(recompute="steps"); `chunks` maml_step(recompute=k) (k tasks at a
time); `steps+chunks` maml_step(recompute=("steps", k)); `loop` the usual per-task loop (functional_call,
autograd.grad(create_graph=True), subtraction; the mean of the tasks' query losses differentiated once);
`imaml` fastmeta.imaml_step (implicit MAML, lambda 2, 5 CG steps: no graph of the inner steps; a different
meta-gradient, that of the proximal inner problem, at the cost the issue compares with exact second order).

Each row runs in a fresh process (this script, called with --row), so that one row's allocations do not hide the
next one's peak (--one-process, for a quick check of the script: all rows in one such process, one after
another). The process first runs a small warm-up step (a 1-task, 1-step version of the same method, which
loads the code and libraries used on first call), then measures the resident set (VmRSS) just before the step and
its high-water mark (VmHWM, reset first through /proc/self/clear_refs) just after: the peak is the difference.
glibc is told to return every allocation above 128 KiB to the system when freed (a fixed mmap threshold), so the
resident set follows what is alive rather than what malloc kept. The seconds are the median over --repeats steps
(forward + backward to the model's parameters) with that allocator setting, on one thread by default.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

import fastmeta
from fastmeta._bench.memory import RETURN_FREED_MEMORY, resident_peak
from fastmeta.models import Conv4, ResNet12

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from maml_resnet12 import _loop_loss  # noqa: E402  (the same per-task loop as the ResNet-12 table)

METHODS = ("plain", "steps", "chunks", "steps+chunks", "loop", "imaml")

# name -> (model, channels, image size, tasks T, tasks per chunk k, inner rate); --small: toy sizes.
FULL = {
    "conv4": (lambda: Conv4(5, 1, hidden=64, image_size=28), 1, 28, 16, 4, 0.4),
    "resnet12": (lambda: ResNet12(5, 3, widths=(64, 160, 320, 640), image_size=32), 3, 32, 4, 1, 0.1),
}
SMALL = {
    "conv4": (lambda: Conv4(5, 1, hidden=8, image_size=16), 1, 16, 4, 2, 0.4),
    "resnet12": (lambda: ResNet12(5, 3, widths=(4, 8, 8, 8), image_size=16), 3, 16, 2, 1, 0.1),
}
N_WAY, K_SHOT, QUERIES = 5, 1, 15


def batch(channels: int, size: int, tasks: int) -> fastmeta.TaskBatch:
    """Random 5-way 1-shot episodes with 15 queries per class (timings and memory do not depend on the values)."""
    g = torch.Generator().manual_seed(0)
    sx = torch.rand(tasks, N_WAY * K_SHOT, channels, size, size, generator=g)
    qx = torch.rand(tasks, N_WAY * QUERIES, channels, size, size, generator=g)
    sy = torch.arange(N_WAY).repeat_interleave(K_SHOT).repeat(tasks, 1)
    qy = torch.arange(N_WAY).repeat_interleave(QUERIES).repeat(tasks, 1)
    return fastmeta.TaskBatch(sx, sy, qx, qy)


def meta_step(method: str, model: nn.Module, b: fastmeta.TaskBatch, lr: float, steps: int, k: int) -> Callable:
    """One meta-step by `method`: the loss, then its gradient to the model's parameters (returned)."""
    recompute = {"plain": None, "steps": "steps", "chunks": k, "steps+chunks": ("steps", k)}
    params = list(model.parameters())

    def run() -> tuple[Tensor, ...]:
        if method == "loop":
            loss = _loop_loss(model, b, lr, steps)
        elif method == "imaml":
            loss = fastmeta.imaml_step(model, b, lr, steps, lam=2.0, cg_steps=5).loss
        else:
            loss = fastmeta.maml_step(model, b, lr, steps, recompute=recompute[method]).loss
        return torch.autograd.grad(loss, params)

    return run


def measure_row(name: str, method: str, steps: int, small: bool, repeats: int) -> dict:
    """(In the row's own process.) Peak memory and seconds of one meta-step."""
    make, channels, size, tasks, k, lr = (SMALL if small else FULL)[name]
    torch.manual_seed(0)
    model = make()
    warm = batch(channels, size, 1)
    meta_step(method, model, warm, lr, 1, 1)()
    b = batch(channels, size, tasks)
    step = meta_step(method, model, b, lr, steps, k)
    del warm
    gc.collect()
    t0 = time.perf_counter()
    peak, grads = resident_peak(step)
    seconds = [time.perf_counter() - t0]
    del grads
    for _ in range(repeats - 1):
        t0 = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - t0)
    n_params = sum(p.numel() for p in model.parameters())
    return {
        "model": name,
        "method": method,
        "steps": steps,
        "tasks": tasks,
        "chunk": k,
        "peak_mb": peak / 2**20,
        "seconds": statistics.median(seconds),
        "fast_weights_mb": tasks * n_params * 4 / 2**20,  # one step's fast weights of all T tasks
    }


def run_rows(rows: list[tuple[str, str, int]], small: bool, repeats: int, threads: int | None) -> list[dict]:
    """measure_row of each (model, method, S) of `rows`, one after another in one fresh process of this script."""
    env = {**os.environ, **RETURN_FREED_MEMORY}
    args = [sys.executable, os.path.abspath(__file__), "--repeats", str(repeats)]
    for name, method, steps in rows:
        args += ["--row", name, method, str(steps)]
    args += ["--small"] if small else []
    args += ["--threads", str(threads)] if threads else []
    out = subprocess.run(args, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        what = ", ".join(f"{name} {method} S={steps}" for name, method, steps in rows)
        raise RuntimeError(f"row(s) {what} failed:\n{out.stderr[-3000:]}")
    return [json.loads(line) for line in out.stdout.strip().splitlines()[-len(rows) :]]


def table(rows: list[dict]) -> str:
    """Markdown: per row, the peak against the same method at the smallest S and against the loop at the same S."""
    lines = [
        "| model | T | S | method | s/step | peak MB | vs same method, min S | vs loop | time vs plain |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    by = {(r["model"], r["method"], r["steps"]): r for r in rows}
    for r in rows:
        m, s = r["model"], r["steps"]
        first = by.get((m, r["method"], min(x["steps"] for x in rows if x["model"] == m)))
        loop, plain = by.get((m, "loop", s)), by.get((m, "plain", s))
        method = r["method"] if "chunks" not in r["method"] else f"{r['method']} (k={r['chunk']})"
        lines.append(
            f"| {m} | {r['tasks']} | {s} | {method} | {r['seconds']:.2f} | {r['peak_mb']:.0f} | "
            f"{r['peak_mb'] / first['peak_mb']:.2f}x | "
            + (f"{r['peak_mb'] / loop['peak_mb']:.2f}x | " if loop else "- | ")
            + (f"{r['seconds'] / plain['seconds']:.2f}x |" if plain else "- |")
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(FULL), choices=list(FULL))
    p.add_argument("--steps", nargs="+", type=int, default=[1, 5, 10])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--small", action="store_true", help="toy sizes, for a quick check")
    p.add_argument("--repeats", type=int, default=1, help="timed steps per row (the first also measures memory)")
    # One thread by default: on a CPU shared with other work, OpenMP's spinning threads slow a step 20-50x.
    p.add_argument("--threads", type=int, default=1, help="torch threads per row (0: torch's default)")
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument(
        "--one-process",
        action="store_true",
        help="all rows in one fresh process, one after another (a quick check: a row's peak may then be hidden "
        "by what earlier rows left)",
    )
    p.add_argument("--row", nargs=3, action="append", metavar=("MODEL", "METHOD", "S"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.row:
        for name, method, s in a.row:
            print(json.dumps(measure_row(name, method, int(s), a.small, a.repeats)), flush=True)
        return
    wanted = [(name, method, s) for name in a.models for s in a.steps for method in a.methods]
    rows = []
    for group in [wanted] if a.one_process else [[row] for row in wanted]:
        rows += run_rows(group, a.small, a.repeats, a.threads)
        for r in rows[-len(group) :]:
            print(
                f"{r['model']} S={r['steps']} {r['method']}: {r['seconds']:.2f} s, {r['peak_mb']:.0f} MB",
                file=sys.stderr,
                flush=True,
            )
    print(table(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
