"""Where a maml_step's time goes: torch.profiler over second-order meta-steps of Conv4 (Omniglot 28x28, T=32) and
ResNet-12 (64-160-320-640, 3x32x32, T=4), 5-way 1-shot, 15 queries, S=1; the top ops by device time (by CPU time
on a machine without a GPU) as markdown tables.

    python benchmarks/gpu_profile.py [--device cuda] [--steps 3] [--top 15]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import fastmeta
from fastmeta.models import Conv4

sys.path.insert(0, os.path.dirname(__file__))
import maml_resnet12  # noqa: E402


def conv4_step(device: str, tasks: int = 32):  # noqa: ANN201
    torch.manual_seed(0)
    model = Conv4(5).to(device)
    sx, qx = torch.rand(tasks, 5, 1, 28, 28, device=device), torch.rand(tasks, 75, 1, 28, 28, device=device)
    sy = torch.arange(5, device=device).repeat(tasks, 1)
    qy = torch.arange(5, device=device).repeat_interleave(15).repeat(tasks, 1)
    batch = fastmeta.TaskBatch(sx, sy, qx, qy)
    params = list(model.parameters())

    def run() -> None:
        loss = fastmeta.maml_step(model, batch, 0.4, 1, loss_fn=F.cross_entropy).loss
        torch.autograd.grad(loss, params)

    return run


def wall_time(run, steps: int) -> float:  # noqa: ANN001
    """Seconds a step, over `steps` consecutive steps (the device synchronised before and after)."""
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        run()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=3, help="profiled meta-steps (after one warm-up)")
    p.add_argument("--top", type=int, default=15)
    a = p.parse_args()
    cuda = a.device.startswith("cuda")
    workloads = {
        "Conv4 T=32 S=1 2nd order": conv4_step(a.device),
        "ResNet-12 T=4 S=1 2nd order": maml_resnet12.step("fastmeta", maml_resnet12.Config(device=a.device), 1),
    }
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    key = "cuda_time_total" if cuda else "cpu_time_total"
    print(f"fastmeta {fastmeta.__version__}, torch {torch.__version__}, {a.device}", end="")
    print(f" ({torch.cuda.get_device_name(a.device)})" if cuda else "")
    for name, run in workloads.items():
        run()
        if cuda:
            torch.cuda.synchronize()
        with profile(activities=activities) as prof:
            for _ in range(a.steps):
                run()
            if cuda:
                torch.cuda.synchronize()
        print(f"\n### {name}: {a.steps} meta-steps, top {a.top} ops by {key}\n")
        averages = prof.key_averages()
        print(averages.table(sort_by=key, row_limit=a.top, max_name_column_width=60))
        if cuda:  # host-bound or device-bound: the device's busy time against a step's wall time
            busy = sum(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) for e in averages)
            wall = wall_time(run, a.steps)
            print(
                f"device busy {busy / 1e3 / a.steps:.2f} ms a step, wall {wall * 1e3:.2f} ms a step without the "
                f"profiler ({busy / 1e6 / a.steps / wall:.0%} busy)"
            )


if __name__ == "__main__":
    main()
