"""Second-order MAML on ResNet-12: seconds per meta-step and peak memory, fastmeta against what people use.

    python benchmarks/maml_resnet12.py                                   # 64-160-320-640, 3x32x32, T=4, S=1 and 5
    python benchmarks/maml_resnet12.py --widths 8 16 32 64 --tasks 2 --steps 1   # a toy run (seconds)
    python benchmarks/maml_resnet12.py --methods fastmeta loop --steps 1 --no-memory

One meta-step: adapt each of T 5-way 1-shot tasks (15 queries per class) with S second-order SGD steps, the mean
query loss, and its gradient to the model's parameters. Methods:
  fastmeta     fastmeta.maml_step (the traced, task-batched runner)
  fastmeta-chunks  fastmeta.maml_step(recompute=1): one task at a time, each differentiated as soon as its loss
               is computed (one task's graph alive, as torchopt's example does it)
  loop         the usual per-task loop: functional_call, autograd.grad(create_graph=True), subtraction
  vmap         torch.func.vmap over tasks of torch.func.grad steps, BatchNorm written with elementary ops (vmap's
               batch-norm rule is not exact to second order; this is how a vmap user gets exact statistics)
  learn2learn  l2l.algorithms.MAML: clone() and adapt() per task
  higher       higher.innerloop_ctx with a differentiable SGD, per task
  torchopt     torchopt.MetaSGD per task, extract/recover_state_dict, backward per task (its MAML example)
  query-floor  not a method: the work every exact method does whatever its inner loop, the query sets' forward
               and backward (to each task's own weights, as the loop does it: functional_call per task, NCHW),
               with no inner step; its loss is at the initial weights. loop / query-floor bounds what any exact
               method can gain over the loop here (the inner steps are the rest of the loop's time).
A peer that is not installed is skipped with the reason. Seconds: median over interleaved rounds in this process
(glibc keeps freed memory, see fastmeta._bench.kernels.keep_freed_memory). Peak memory: in a fresh process per row (this
script with --row): after a small warm-up step, the high-water mark of the resident set over the resident set
just before the step (glibc told to return freed blocks above 128 KiB, so the resident set follows what is
alive); --one-process, for a quick check of the script: all rows' peaks in one such process, one after
another. The loss column shows that every method computes the same meta-loss.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

import fastmeta
from fastmeta._bench import kernels as bench
from fastmeta._bench import not_importable
from fastmeta._bench.memory import device_peak, probe_lines
from fastmeta.models import ResNet12

METHODS = ("fastmeta", "fastmeta-chunks", "loop", "vmap", "learn2learn", "higher", "torchopt", "query-floor")
PEERS = {"learn2learn": "learn2learn", "higher": "higher", "torchopt": "torchopt"}
N_WAY, K_SHOT, QUERIES = 5, 1, 15


@dataclass(frozen=True)
class Config:
    widths: tuple[int, ...] = (64, 160, 320, 640)
    image_size: int = 32
    tasks: int = 4
    inner_lr: float = 0.1
    device: str = "cpu"


def missing(method: str) -> str | None:
    """Why `method` cannot run here (its package is not installed), or None."""
    return not_importable(PEERS[method]) if method in PEERS else None


def make(c: Config, tasks: int | None = None) -> tuple[nn.Module, fastmeta.TaskBatch]:
    """The model and random episodes (timings and memory do not depend on the values)."""
    torch.manual_seed(0)
    model = ResNet12(N_WAY, 3, widths=c.widths, image_size=c.image_size)
    g = torch.Generator().manual_seed(0)
    T = tasks or c.tasks
    sx = torch.rand(T, N_WAY * K_SHOT, 3, c.image_size, c.image_size, generator=g)
    qx = torch.rand(T, N_WAY * QUERIES, 3, c.image_size, c.image_size, generator=g)
    sy = torch.arange(N_WAY).repeat_interleave(K_SHOT).repeat(T, 1)
    qy = torch.arange(N_WAY).repeat_interleave(QUERIES).repeat(T, 1)
    return model.to(c.device), fastmeta.TaskBatch(sx, sy, qx, qy).to(c.device)


def _batch_norm(x: Tensor, w: Tensor, b: Tensor, eps: float = 1e-5) -> Tensor:
    """Batch norm with batch statistics in elementary ops (exact under vmap to any order)."""
    mean = x.mean((0, 2, 3), keepdim=True)
    var = (x - mean).square().mean((0, 2, 3), keepdim=True)
    return (x - mean) * torch.rsqrt(var + eps) * w.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)


def resnet12_functional(p: dict[str, Tensor], x: Tensor) -> Tensor:
    """ResNet12's forward (fastmeta.models, no drop) from its named parameters, batch norm in elementary ops."""

    def conv_bn(x: Tensor, conv: str, bn: str, padding: int) -> Tensor:
        return _batch_norm(F.conv2d(x, p[conv + ".weight"], padding=padding), p[bn + ".weight"], p[bn + ".bias"])

    for i in range(1, 5):
        k = f"features.block{i}."
        out = F.leaky_relu(conv_bn(x, k + "conv1", k + "bn1", 1), 0.1)
        out = F.leaky_relu(conv_bn(out, k + "conv2", k + "bn2", 1), 0.1)
        out = conv_bn(out, k + "conv3", k + "bn3", 1) + conv_bn(x, k + "shortcut.0", k + "shortcut.1", 0)
        x = F.max_pool2d(F.leaky_relu(out, 0.1), 2)
    return F.linear(x.mean((2, 3)), p["head.weight"], p["head.bias"])


def _loop_loss(model: nn.Module, b: fastmeta.TaskBatch, lr: float, steps: int) -> Tensor:
    params = dict(model.named_parameters())
    losses = []
    for t in range(b.num_tasks):
        fast = params
        for _ in range(steps):
            loss = F.cross_entropy(functional_call(model, fast, (b.support_x[t],)), b.support_y[t])
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
            fast = {n: p - lr * g for (n, p), g in zip(fast.items(), grads)}
        losses.append(F.cross_entropy(functional_call(model, fast, (b.query_x[t],)), b.query_y[t]))
    return torch.stack(losses).mean()


def _vmap_loss(model: nn.Module, b: fastmeta.TaskBatch, lr: float, steps: int) -> Tensor:
    def task(p: dict[str, Tensor], sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> Tensor:
        for _ in range(steps):
            g = grad(lambda p: F.cross_entropy(resnet12_functional(p, sx), sy))(p)
            p = {n: w - lr * g[n] for n, w in p.items()}
        return F.cross_entropy(resnet12_functional(p, qx), qy)

    params = dict(model.named_parameters())
    return vmap(task, in_dims=(None, 0, 0, 0, 0))(params, b.support_x, b.support_y, b.query_x, b.query_y).mean()


def _learn2learn_loss(model: nn.Module, b: fastmeta.TaskBatch, lr: float, steps: int) -> Tensor:
    import learn2learn as l2l

    maml = l2l.algorithms.MAML(model, lr=lr, first_order=False)
    losses = []
    for t in range(b.num_tasks):
        learner = maml.clone()
        for _ in range(steps):
            learner.adapt(F.cross_entropy(learner(b.support_x[t]), b.support_y[t]))
        losses.append(F.cross_entropy(learner(b.query_x[t]), b.query_y[t]))
    return torch.stack(losses).mean()


def _higher_loss(model: nn.Module, b: fastmeta.TaskBatch, lr: float, steps: int) -> Tensor:
    import higher

    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for t in range(b.num_tasks):
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
            for _ in range(steps):
                diffopt.step(F.cross_entropy(fmodel(b.support_x[t]), b.support_y[t]))
            losses.append(F.cross_entropy(fmodel(b.query_x[t]), b.query_y[t]))
    return torch.stack(losses).mean()


def _torchopt_step(model: nn.Module, b: fastmeta.TaskBatch, lr: float, steps: int) -> float:
    """torchopt's MAML example with its MetaSGD; see torchopt_loop. The loss."""
    import torchopt

    return torchopt_loop(model, torchopt.MetaSGD(model, lr=lr), b, steps)


def torchopt_loop(model: nn.Module, inner: object, b: fastmeta.TaskBatch, steps: int) -> float:
    """torchopt's MAML example with the meta-optimiser `inner` (MetaSGD, MetaAdam...) built on `model`: adapt
    in place, backward per task (gradients into .grad), restore the model and the optimiser. The loss."""
    import torchopt

    net_state, opt_state = torchopt.extract_state_dict(model), torchopt.extract_state_dict(inner)
    total = 0.0
    for t in range(b.num_tasks):
        for _ in range(steps):
            inner.step(F.cross_entropy(model(b.support_x[t]), b.support_y[t]))
        loss = F.cross_entropy(model(b.query_x[t]), b.query_y[t]) / b.num_tasks
        loss.backward()
        total += loss.item()
        torchopt.recover_state_dict(model, net_state)
        torchopt.recover_state_dict(inner, opt_state)
    return total


def step(method: str, c: Config, steps: int, tasks: int | None = None) -> Callable[[], float]:
    """One meta-step (forward and backward to the model's parameters) of `method`; returns the meta-loss."""
    model, b = make(c, tasks)
    params = list(model.parameters())
    if method == "query-floor":
        fast = [{n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()} for _ in b.query_x]

        def floor() -> float:
            per_task = [
                F.cross_entropy(functional_call(model, f, (x,)), y) for f, x, y in zip(fast, b.query_x, b.query_y)
            ]
            loss = torch.stack(per_task).mean()
            torch.autograd.grad(loss, [w for f in fast for w in f.values()])
            return loss.item()

        return floor
    losses = {"loop": _loop_loss, "vmap": _vmap_loss, "learn2learn": _learn2learn_loss, "higher": _higher_loss}

    def run() -> float:
        if method == "torchopt":
            model.zero_grad(set_to_none=True)
            return _torchopt_step(model, b, c.inner_lr, steps)
        if method == "fastmeta":
            loss = fastmeta.maml_step(model, b, c.inner_lr, steps).loss
        elif method == "fastmeta-chunks":
            loss = fastmeta.maml_step(model, b, c.inner_lr, steps, recompute=1).loss
        else:
            loss = losses[method](model, b, c.inner_lr, steps)
        torch.autograd.grad(loss, params)
        return loss.item()

    return run


def measure_memory(method: str, c: Config, steps: int) -> int:
    """(In the row's own process.) Peak bytes of one meta-step over the resident set before it (on a GPU: over
    the memory allocated before it)."""
    step(method, c, 1, tasks=1)()  # loads the code and libraries used on first call
    run = step(method, c, steps)
    gc.collect()
    return device_peak(run, c.device)


def peak_memory(method: str, c: Config, steps: int, threads: int | None) -> int:
    """measure_memory in a fresh process of this script."""
    return peak_memories([(method, steps)], c, threads)[0]


def peak_memories(rows: list[tuple[str, int]], c: Config, threads: int | None) -> list[int]:
    """measure_memory of each (method, S) of `rows`, one after another in one fresh process of this script."""
    argv = [os.path.abspath(__file__), "--config", json.dumps(asdict(c))]
    for method, steps in rows:
        argv += ["--row", method, str(steps)]
    what = ", ".join(f"{method} S={steps}" for method, steps in rows)
    return probe_lines(argv + (["--threads", str(threads)] if threads else []), what, len(rows))


def run(
    c: Config,
    steps: list[int],
    methods: list[str],
    memory: bool,
    min_time: float,
    rounds: int,
    threads: int | None,
    one_process: bool = False,
) -> list[dict]:
    """Rows of (S, method, seconds, peak bytes, loss); the methods of one S are timed in interleaved rounds. The
    peaks: a fresh process a row, or (one_process) all in one."""
    rows = []
    for s in steps:
        ready = [m for m in methods if missing(m) is None]
        for m in methods:
            if m not in ready:
                print(f"skipped {m}: {missing(m)}", file=sys.stderr)
        calls = {m: step(m, c, s) for m in ready}
        loss = {m: f() for m, f in calls.items()}  # also a warm-up
        medians = bench.interleaved_medians(calls, c.device, min_time, rounds, max_reps=20, min_reps=1, warmup=0)
        for m in ready:
            row = {"steps": s, "method": m, "seconds": medians[m], "loss": loss[m]}
            if memory and not one_process:
                row["peak_bytes"] = peak_memory(m, c, s, threads)
            rows.append(row)
            print(f"S={s} {m}: {medians[m]:.3f} s", file=sys.stderr, flush=True)
    if memory and one_process:
        for row, peak in zip(rows, peak_memories([(r["method"], r["steps"]) for r in rows], c, threads)):
            row["peak_bytes"] = peak
    return rows


def table(c: Config, rows: list[dict]) -> str:
    """Markdown, with each method's time and memory against fastmeta's on the same S."""
    size = f"3x{c.image_size}x{c.image_size}"
    head = f"ResNet-12 {'-'.join(map(str, c.widths))}, {size}, T={c.tasks}, 5-way 1-shot 15q, second order, {c.device}"
    lines = [
        head,
        "",
        "| S | method | s/step | vs fastmeta | vs loop | peak MB | vs fastmeta | loss |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    ref = {r["steps"]: r for r in rows if r["method"] == "fastmeta"}
    loop = {r["steps"]: r for r in rows if r["method"] == "loop"}
    for r in rows:
        f, lp = ref.get(r["steps"]), loop.get(r["steps"])
        speed = f"{r['seconds'] / f['seconds']:.2f}x" if f else "-"
        vs_loop = f"{lp['seconds'] / r['seconds']:.2f}x" if lp else "-"
        peak = f"{r['peak_bytes'] / 2**20:.0f}" if "peak_bytes" in r else "-"
        mem = f"{r['peak_bytes'] / f['peak_bytes']:.2f}x" if f and "peak_bytes" in r and "peak_bytes" in f else "-"
        lines.append(
            f"| {r['steps']} | {r['method']} | {r['seconds']:.3f} | {speed} | {vs_loop} | {peak} | {mem} "
            f"| {r['loss']:.6f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--widths", nargs=4, type=int, default=[64, 160, 320, 640])
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--tasks", type=int, default=4, help="T, tasks per meta-step")
    p.add_argument("--steps", nargs="+", type=int, default=[1, 5], help="S, inner steps (one table block each)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--no-memory", action="store_true", help="times only (no subprocess per row)")
    p.add_argument(
        "--one-process",
        action="store_true",
        help="all rows' peak memory in one fresh process, one after another (a quick check: a row's peak may then "
        "be hidden by what earlier rows left)",
    )
    p.add_argument("--min-time", type=float, default=2.0, help="seconds per method and round, at least one step")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (peak memory: CUDA's allocated bytes)")
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--row", nargs=2, action="append", metavar=("METHOD", "S"), help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.row:
        c = Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(a.config).items()})
        for method, s in a.row:
            print(measure_memory(method, c, int(s)), flush=True)
        return
    bench.keep_freed_memory()
    c = Config(tuple(a.widths), a.image_size, a.tasks, device=a.device)
    rows = run(c, a.steps, a.methods, not a.no_memory, a.min_time, a.rounds, a.threads, a.one_process)
    print(table(c, rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"config": asdict(c), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
