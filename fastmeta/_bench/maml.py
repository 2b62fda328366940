"""Benchmarks of fastmeta.maml_step against what users write instead: a per-task loop and torch.func.vmap.

One meta-step = adapt T tasks (inner_steps steps each) + query loss + backward to the initial weights.
`python -m fastmeta bench --op maml` prints the table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

import fastmeta
from fastmeta._bench.kernels import interleaved_medians
from fastmeta._bench.memory import step_peak_memory
from fastmeta.models import MLP, Conv4

METHODS = ("fastmeta", "loop", "vmap")
RECOMPUTE = 8  # "fastmeta recompute": maml_step(recompute=8), chunks of 8 tasks, each differentiated at once


def methods_for(w: MamlWorkload) -> tuple[str, ...]:
    """The methods timed on `w` (the memory-saving variant on the second-order S=5 rows)."""
    return METHODS + (("fastmeta recompute",) if w.inner_steps == 5 and not w.first_order else ())


@dataclass(frozen=True)
class MamlWorkload:
    name: str  # "sinusoid" (MLP 1-40-40-1, K=10+10, MSE) or "conv4" (Omniglot-sized 5-way 1-shot, 15 queries)
    tasks: int
    inner_steps: int
    first_order: bool

    @property
    def label(self) -> str:
        order = "1st" if self.first_order else "2nd"
        what = "sinusoid MLP 1-40-40-1, K=10+10" if self.name == "sinusoid" else "conv4 (BN) 5-way 1-shot 15q"
        return f"{what}, T={self.tasks}, S={self.inner_steps}, {order} order"

    @property
    def inner_lr(self) -> float:
        return 0.01 if self.name == "sinusoid" else 0.4


WORKLOADS = [
    MamlWorkload("sinusoid", 25, 5, False),
    MamlWorkload("sinusoid", 25, 5, True),
    MamlWorkload("conv4", 32, 1, False),
    MamlWorkload("conv4", 32, 1, True),
    MamlWorkload("conv4", 32, 5, False),
]


def make(w: MamlWorkload, device: str, tasks: int | None = None) -> tuple[nn.Module, fastmeta.TaskBatch, Callable]:
    """(model, batch, loss_fn) of workload `w` with random data (timings do not depend on the values)."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    T = tasks or w.tasks
    if w.name == "sinusoid":
        amp, phase = torch.rand(T, 1, 1, generator=g) * 4.9 + 0.1, torch.rand(T, 1, 1, generator=g) * torch.pi
        sx, qx = torch.rand(T, 10, 1, generator=g) * 10 - 5, torch.rand(T, 10, 1, generator=g) * 10 - 5
        batch = fastmeta.TaskBatch(sx, amp * torch.sin(sx - phase), qx, amp * torch.sin(qx - phase))
        return MLP((1, 40, 40, 1)).to(device), batch.to(device), F.mse_loss
    sx, qx = torch.randn(T, 5, 1, 28, 28, generator=g), torch.randn(T, 75, 1, 28, 28, generator=g)
    sy, qy = torch.arange(5).repeat(T, 1), torch.arange(5).repeat_interleave(15).repeat(T, 1)
    return Conv4(5).to(device), fastmeta.TaskBatch(sx, sy, qx, qy).to(device), F.cross_entropy


def loop_step(model: nn.Module, b: fastmeta.TaskBatch, lr: float, steps: int, first_order: bool, loss_fn) -> Tensor:  # noqa: ANN001
    """The usual per-task loop: functional_call, autograd.grad (create_graph for second order), subtraction."""
    params = dict(model.named_parameters())
    losses = []
    for t in range(b.num_tasks):
        fast = params
        for _ in range(steps):
            loss = loss_fn(functional_call(model, fast, (b.support_x[t],)), b.support_y[t])
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=not first_order)
            fast = {n: p - lr * g for (n, p), g in zip(fast.items(), grads)}
        losses.append(loss_fn(functional_call(model, fast, (b.query_x[t],)), b.query_y[t]))
    return torch.stack(losses).mean()


def _conv4_functional(p: list[Tensor], x: Tensor) -> Tensor:
    """Conv4 written for vmap with batch norm in elementary ops (vmap's batch-norm rule is not exact to second
    order; this is how a vmap user gets exact per-task statistics)."""
    for i in range(4):
        w, b, gamma, beta = p[4 * i : 4 * i + 4]
        x = F.conv2d(x, w, b, padding=1)
        mean = x.mean((0, 2, 3), keepdim=True)
        var = x.var((0, 2, 3), unbiased=False, keepdim=True)
        x = (x - mean) * torch.rsqrt(var + 1e-5) * gamma.view(1, -1, 1, 1) + beta.view(1, -1, 1, 1)
        x = F.max_pool2d(F.relu(x), 2)
    return F.linear(x.flatten(1), p[16], p[17])


def vmap_step(model: nn.Module, b: fastmeta.TaskBatch, lr: float, steps: int, first_order: bool, loss_fn) -> Tensor:  # noqa: ANN001
    """torch.func's MAML: vmap over tasks of an inner loop of torch.func.grad steps."""
    names = [n for n, _ in model.named_parameters()]
    conv = isinstance(model, Conv4)

    def forward(p: list[Tensor], x: Tensor) -> Tensor:
        return _conv4_functional(p, x) if conv else functional_call(model, dict(zip(names, p)), (x,))

    def task(p: list[Tensor], sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> Tensor:
        for _ in range(steps):
            g = grad(lambda p: loss_fn(forward(p, sx), sy))(p)
            p = [w - lr * (gi.detach() if first_order else gi) for w, gi in zip(p, g)]
        return loss_fn(forward(p, qx), qy)

    params = [p for _, p in model.named_parameters()]
    return vmap(task, in_dims=(None, 0, 0, 0, 0))(params, b.support_x, b.support_y, b.query_x, b.query_y).mean()


def step(method: str, w: MamlWorkload, device: str, tasks: int | None = None) -> Callable[[], None]:
    """One meta-step (forward and backward) of workload `w` by `method`."""
    model, b, loss_fn = make(w, device, tasks)
    args = (w.inner_lr, w.inner_steps, w.first_order, loss_fn)
    params = list(model.parameters())

    def run() -> None:
        if method == "fastmeta":
            loss = fastmeta.maml_step(model, b, *args).loss
        elif method == "fastmeta recompute":
            loss = fastmeta.maml_step(model, b, *args, recompute=RECOMPUTE).loss
        else:
            loss = {"loop": loop_step, "vmap": vmap_step}[method](model, b, *args)
        torch.autograd.grad(loss, params)

    return run


def peak_memory(method: str, w: MamlWorkload, device: str) -> int:
    """Peak memory (bytes) of one meta-step over what was resident before it (see memory.step_peak_memory)."""
    return step_peak_memory(
        device, "maml", method=method, name=w.name, tasks=w.tasks, inner_steps=w.inner_steps, first_order=w.first_order
    )


def run_maml(
    device: str = "cpu",
    workloads: list[MamlWorkload] | None = None,
    min_time: float = 1.0,
    rounds: int = 3,
    memory: bool = True,
) -> list[dict]:
    """Median seconds per meta-step of each method on each workload (interleaved rounds), and the peak memory
    of every step on CUDA (in this process: cheap), of the second-order S=5 steps on the CPU (a fresh process
    a row)."""
    rows = []
    for w in workloads or WORKLOADS:
        calls = {m: step(m, w, device) for m in methods_for(w)}
        medians = interleaved_medians(calls, device, min_time, rounds, max_reps=100, min_reps=1, warmup=1)
        for name, seconds in medians.items():
            row = {"workload": w.label, "mode": "meta-step", "method": name, "seconds": seconds}
            if memory and (device.startswith("cuda") or (w.inner_steps == 5 and not w.first_order)):
                row["peak_bytes"] = peak_memory(name, w, device)
            rows.append(row)
    return rows
