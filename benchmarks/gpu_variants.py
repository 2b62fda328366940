"""A/B of the runner's choices on one device: maml_step as built against each choice undone, and vmap, in one
interleaved run (so the choices made without a GPU get measured on the first session that has one).

    python benchmarks/gpu_variants.py --device cuda [--min-time 0.5] [--rounds 3]

Variants (each replaces one piece of fastmeta.algorithms._batched for its calls only):
  as built              fastmeta.maml_step
  ATen double backward  grouped convolutions through F.conv2d, whose double backward runs one convolution per
                        group (what the runner did before its own, fastmeta.algorithms._conv)
  ATen batch-norm double backward
                        batch norms differentiated twice through F.batch_norm, whose double backward is ATen's
                        (~110 calls a layer), instead of fastmeta.algorithms._norm
  batch-norm double backward in ops
                        fastmeta.algorithms._norm with its double backward in ~50 ATen ops (the reference, as
                        under create_graph) instead of the kernel (fastmeta::batch_norm_double_backward)
  per-task large sets   the CPU's layout rule: sets of 16 or more examples (the query sets) per task, not grouped
  cudnn.benchmark       as built with torch.backends.cudnn.benchmark = True (cuDNN times its algorithms for each
                        shape on first use; torch's default is off); vmap likewise in its own row
  vmap                  torch.func.vmap over tasks, batch norm in elementary ops (the benchmarks' vmap method)
Rows: Conv4 (Omniglot 28x28, T=32) S=1 second and first order, S=5 second order; ResNet-12 (64-160-320-640,
3x32x32, T=4) S=1 second order. Medians of interleaved rounds; `vs as built` > 1 means the variant is slower.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from fastmeta import ops, reference
from fastmeta._bench import maml as conv4_bench
from fastmeta._bench.kernels import interleaved_medians
from fastmeta.algorithms import _batched, _conv

sys.path.insert(0, os.path.dirname(__file__))
import maml_resnet12  # noqa: E402


def _aten_conv(x: Tensor, w: Tensor, b: Tensor | None, stride, padding, dilation, groups: int) -> Tensor:  # noqa: ANN001
    return (F.conv1d, F.conv2d, F.conv3d)[w.dim() - 3](x, w, b, stride, padding, dilation, groups)


def _double_backward_in_ops(gy, x, w, mean, rstd, ggx, ggw, ggb, eps, needs):  # noqa: ANN001, ANN202
    return reference.batch_norm_double_backward(gy, x, w, ggx, ggw, ggb, eps, needs)


class _ATenNorm:
    """Stands in for fastmeta.algorithms._norm: F.batch_norm, whose double backward is ATen's."""

    @staticmethod
    def batch_norm(x: Tensor, w: Tensor | None, b: Tensor | None, eps: float) -> Tensor:
        return F.batch_norm(x, None, None, w, b, True, 0.0, eps)


PATCHES: dict[str, list[tuple[object, str, object]]] = {
    "as built": [],
    "ATen double backward": [(_conv, "conv", _aten_conv)],
    "ATen batch-norm double backward": [(_batched.layers, "_norm", _ATenNorm)],
    "batch-norm double backward in ops": [(ops, "_batch_norm_double_backward", _double_backward_in_ops)],
    "per-task large sets": [(_batched.layout, "GROUPED_ALWAYS", set())],
    # not a choice of the runner: cuDNN's autotuner (off by default in torch), for maml_step and vmap alike
    "cudnn.benchmark": [(torch.backends.cudnn, "benchmark", True)],
}


@contextlib.contextmanager
def patched(changes: list[tuple[object, str, object]]) -> Iterator[None]:
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in changes]
    for obj, name, value in changes:
        setattr(obj, name, value)
    try:
        yield
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)


def variant(run: Callable[[], object], changes: list[tuple[object, str, object]]) -> Callable[[], None]:
    def call() -> None:
        with patched(changes):
            run()

    return call


def workloads(device: str) -> list[tuple[str, Callable[[str], Callable[[], object]]]]:
    rows = []
    for S, first_order in ((1, False), (1, True), (5, False)):
        w = conv4_bench.MamlWorkload("conv4", 32, S, first_order)
        rows.append((w.label, lambda m, w=w: conv4_bench.step(m, w, device)))
    config = maml_resnet12.Config(device=device)
    rows.append((f"ResNet-12 T={config.tasks}, S=1, 2nd order", lambda m: maml_resnet12.step(m, config, 1)))
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--min-time", type=float, default=0.5, help="seconds of measurement per variant and row")
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args(argv)
    name = torch.cuda.get_device_name(a.device) if a.device.startswith("cuda") else "CPU"
    print(f"torch {torch.__version__}, {a.device} ({name})\n")
    print("| workload | variant | median | vs as built |")
    print("|---|---|---:|---:|")
    for label, make in workloads(a.device):
        ours = make("fastmeta")
        calls = {v: variant(ours, changes) for v, changes in PATCHES.items()}
        calls["vmap"] = make("vmap")
        calls["vmap, cudnn.benchmark"] = variant(calls["vmap"], PATCHES["cudnn.benchmark"])
        medians = interleaved_medians(calls, a.device, a.min_time, a.rounds, max_reps=50, min_reps=1, warmup=1)
        for v, seconds in medians.items():
            print(f"| {label} | {v} | {seconds * 1e3:.2f} ms | {seconds / medians['as built']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
