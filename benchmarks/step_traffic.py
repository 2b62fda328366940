"""What one meta-step asks of a GPU, counted without one: kernel calls and bytes moved, fastmeta against vmap and
the loop.

    python benchmarks/step_traffic.py                 # Conv4 (T=32) and ResNet-12 (T=4) rows, a markdown table
    python benchmarks/step_traffic.py --top 12        # and each method's 12 ops that move the most bytes

Each step runs on the meta device (shapes only, no arithmetic: seconds on any machine) with the runner's CUDA
layout (every convolution one grouped convolution over the tasks). A TorchDispatchMode sees every ATen call
below autograd and vmap, as a GPU would receive them: `calls` counts those that are not views (each is at least
one kernel launch and its host-side dispatch), `GB` the bytes of their tensor inputs and outputs (a lower bound
on memory traffic: a kernel reads its inputs and writes its outputs at least once), `convolutions` the
convolution and convolution_backward calls. What it does not see: how fast each kernel runs (cuDNN's choice of
algorithm), the Python time between calls, and whether the device overlaps them. A model for choosing what to
measure on a GPU, not a measurement.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent))

import maml_resnet12  # noqa: E402

from fastmeta import _kernels  # noqa: E402
from fastmeta._bench import maml as conv4_bench  # noqa: E402
from fastmeta.algorithms import _batched  # noqa: E402

_VIEWS = {
    "view", "_unsafe_view", "reshape", "permute", "expand", "slice", "select", "narrow", "transpose", "t",
    "unsqueeze", "squeeze", "detach", "alias", "as_strided", "split", "split_with_sizes", "unbind", "chunk",
    "promote_types", "unfold", "lift_fresh",
}  # fmt: skip
_CONVOLUTIONS = {"convolution", "convolution_backward"}


class Traffic(TorchDispatchMode):
    """Per ATen op (not views): calls and bytes of tensor inputs and outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: dict[str, list[int]] = defaultdict(lambda: [0, 0])

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if func is torch.ops.aten._local_scalar_dense.default:
            return 0.0  # .item() of a meta tensor: the benchmarks' steps return their loss as a number
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name not in _VIEWS:
            tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
            entry = self.ops[name]
            entry[0] += 1
            entry[1] += sum(t.numel() * t.element_size() for t in tensors)
        return out


def count(make_step: Callable[[], Callable[[], object]]) -> dict[str, list[int]]:
    """ops of the second call of the step (the first one builds what is cached: the traced plan)."""
    run = make_step()
    with Traffic():  # (its .item() of a meta tensor)
        run()
    with Traffic() as traffic:
        run()
    return dict(traffic.ops)


def workloads(small: bool = False) -> list[tuple[str, dict[str, Callable[[], Callable[[], object]]]]]:
    """small: 2 tasks, a ResNet-12 of widths 4-8-8-8, S=1 only (to check the script in seconds)."""
    rows = []
    for S, first_order in ((1, False),) if small else ((1, False), (1, True), (5, False)):
        w = conv4_bench.MamlWorkload("conv4", 2 if small else 32, S, first_order)
        steps = {m: (lambda m=m, w=w: conv4_bench.step(m, w, "meta")) for m in ("fastmeta", "vmap", "loop")}
        rows.append((w.label, steps))
    config = maml_resnet12.Config(device="meta", **({"widths": (4, 8, 8, 8), "tasks": 2} if small else {}))
    for S in (1,) if small else (1, 5):
        widths = "-".join(map(str, config.widths))
        label = f"ResNet-12 {widths} 3x32x32, 5-way 1-shot 15q, T={config.tasks}, S={S}, 2nd order"
        steps = {m: (lambda m=m, S=S: maml_resnet12.step(m, config, S)) for m in ("fastmeta", "vmap", "loop")}
        rows.append((label, steps))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=0, help="also list each method's N ops that move the most bytes")
    parser.add_argument("--small", action="store_true", help="toy sizes (2 tasks), S=1: checks the script")
    args = parser.parse_args(argv)
    # The runner's CUDA layout on the meta device, and the kernels' fake implementations for the fastmeta ops.
    _batched.layout.GROUPED_ALWAYS.add("meta")
    _kernels.runs = lambda t: True
    print("| workload | method | calls | GB | convolutions | calls vs fastmeta | GB vs fastmeta |")
    print("|---|---|---:|---:|---:|---:|---:|")
    tops = []
    for label, steps in workloads(args.small):
        base = None
        for method, make_step in steps.items():
            ops = count(make_step)
            calls = sum(c for c, _ in ops.values())
            gb = sum(b for _, b in ops.values()) / 1e9
            convs = sum(ops.get(n, (0, 0))[0] for n in _CONVOLUTIONS)
            base = base or (calls, gb)
            print(
                f"| {label} | {method} | {calls} | {gb:.2f} | {convs} | {calls / base[0]:.2f}x | {gb / base[1]:.2f}x |"
            )
            tops.append((label, method, ops))
    for label, method, ops in tops[: len(tops) if args.top else 0]:
        print(f"\n{label}, {method}: the {args.top} ops that move the most bytes (calls, GB)")
        for name, (c, b) in sorted(ops.items(), key=lambda kv: -kv[1][1])[: args.top]:
            print(f"  {name:36s} {c:6d} {b / 1e9:8.2f}")


if __name__ == "__main__":
    main()
