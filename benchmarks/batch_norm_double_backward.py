"""Batch norm's double backward: fastmeta's kernel against the same formula in ATen ops (the reference, what the
runner ran before the kernel) and ATen's own (torch's batch norm differentiated twice), per layer.

    python benchmarks/batch_norm_double_backward.py [--device cuda] [--min-time 0.3] [--rounds 5] [--small]

Shapes are the batch norms of second-order MAML's inner steps in the runner's grouped layout (N support images,
T*C channels): Conv4 5-way 1-shot at T=32 and ResNet-12 5-way 1-shot at T=4. Each method computes (d_gy, d_x,
d_w) from the same (gy, x, ggx, ggw, ggb), outside autograd. `GB/s` counts the kernel's least traffic (reads of
x, gy, ggx and writes of d_gy, d_x) over its time; `copy GB/s` is a same-sized copy's. Medians of interleaved
rounds, one thread on the CPU.
"""

from __future__ import annotations

import argparse

import torch
from torch import Tensor

from fastmeta import reference
from fastmeta._bench.kernels import copy_bandwidth, interleaved_medians

EPS = 1e-5
# (label, N, channels, spatial side)
SHAPES = [
    ("Conv4 layer 1, T=32", 5, 32 * 64, 28),
    ("Conv4 layer 3, T=32", 5, 32 * 64, 7),
    ("ResNet-12 block 1, T=4", 5, 4 * 64, 32),
    ("ResNet-12 block 4, T=4", 5, 4 * 640, 4),
]


def methods(N: int, C: int, side: int, device: str) -> dict[str, object]:
    g = torch.Generator(device).manual_seed(0)

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g, device=device)

    x, gy, ggx = rand(N, C, side, side), rand(N, C, side, side), rand(N, C, side, side)
    w, ggw, ggb = rand(C), rand(C), rand(C)
    _, mean, rstd = torch.ops.aten.native_batch_norm(x, w, None, None, None, True, 0.0, EPS)

    def kernel() -> object:
        return torch.ops.fastmeta.batch_norm_double_backward(gy, x, w, mean, rstd, ggx, ggw, ggb)

    def in_ops() -> object:
        return reference.batch_norm_double_backward(gy, x, w, ggx, ggw, ggb, EPS)

    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    gyr = gy.clone().requires_grad_()

    def aten() -> object:  # torch's: the backward of native_batch_norm_backward (its double backward)
        with torch.enable_grad():
            out = torch.ops.aten.native_batch_norm_backward(
                gyr, xr, wr, None, None, mean, rstd, True, EPS, [True, True, True]
            )
            return torch.autograd.grad(out, (gyr, xr, wr), (ggx, ggw, ggb))

    return {"fastmeta kernel": kernel, "formula in ATen ops": in_ops, "ATen double backward": aten}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--min-time", type=float, default=0.3)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--small", action="store_true", help="the same layers at 2 tasks (checks the script)")
    a = p.parse_args(argv)
    if a.device == "cpu":
        torch.set_num_threads(1)
    name = torch.cuda.get_device_name() if a.device == "cuda" else "CPU, 1 thread"
    print(f"batch norm's double backward, {name}, torch {torch.__version__}, float32\n")
    print("| layer (N, channels, HxW) | method | median | vs kernel | GB/s | copy GB/s |")
    print("|---|---|---:|---:|---:|---:|")
    for label, N, C, side in SHAPES:
        if a.small:
            C = 2 * C // (32 if "Conv4" in label else 4)
        calls = methods(N, C, side, a.device)
        with torch.no_grad():
            times = interleaved_medians(calls, a.device, a.min_time, a.rounds)
        numel = N * C * side * side
        copy = copy_bandwidth(numel, a.device) / 1e9
        base = times["fastmeta kernel"]
        for method, t in times.items():
            gbs = 5 * 4 * numel / t / 1e9
            print(
                f"| {label} ({N}, {C}, {side}x{side}) | {method} | {t * 1e3:.3f} ms | {t / base:.2f}x | {gbs:.0f} | "
                f"{copy:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
