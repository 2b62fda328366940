"""Benchmarks of fastmeta's kernels against their reference and what users would write instead.

`python -m fastmeta bench` prints the table; benchmarks/ runs the same workloads under pytest-benchmark.
"""

from __future__ import annotations

import ctypes
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from fastmeta import ops, reference
from fastmeta._bench.memory import step_peak_memory
from fastmeta.models import MLP, Conv4

# The parameters of fastmeta.models.Conv4 (4 x [conv3x3 64, BatchNorm, ReLU, maxpool] on 1x28x28, 5-way head):
# 18 tensors, 112,261 floats; and of the sinusoid MLP 1-40-40-1: 6 tensors, 1,761 floats.
CONV4_SHAPES = [tuple(p.shape) for p in Conv4(5, in_channels=1, hidden=64, image_size=28).parameters()]
MLP_SHAPES = [tuple(p.shape) for p in MLP((1, 40, 40, 1)).parameters()]


@dataclass(frozen=True)
class Workload:
    name: str
    shapes: list[tuple[int, ...]]
    tasks: int
    shared: bool  # params are the shared initial weights S_i (first inner step) rather than (T, *S_i)
    per_element_lr: bool  # Meta-SGD: lr[i] of shape S_i; else one float

    @property
    def label(self) -> str:
        lr = "per-element lr" if self.per_element_lr else "scalar lr"
        return f"{self.name} T={self.tasks} {'shared' if self.shared else 'per-task'} params, {lr}"


WORKLOADS = [
    Workload("conv4", CONV4_SHAPES, 1, False, False),
    Workload("conv4", CONV4_SHAPES, 32, False, False),
    Workload("conv4", CONV4_SHAPES, 32, True, False),
    Workload("conv4", CONV4_SHAPES, 32, True, True),
    Workload("mlp", MLP_SHAPES, 25, True, False),
    Workload("mlp", MLP_SHAPES, 25, True, True),
]

LR = 0.4


def make_inputs(w: Workload, device: str, requires_grad: bool) -> dict:
    """Random params, grads, lr (and upstream gradients) of workload `w` on `device`."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> Tensor:
        return torch.randn(shape, generator=g).to(device).requires_grad_(requires_grad)

    params = [rand(*s) if w.shared else rand(w.tasks, *s) for s in w.shapes]
    grads = [rand(w.tasks, *s) for s in w.shapes]
    lr = [(torch.rand(s, generator=g) * 0.1).to(device).requires_grad_(requires_grad) for s in w.shapes]
    grad_outs = [torch.randn(w.tasks, *s, generator=g).to(device) for s in w.shapes]
    return {"params": params, "grads": grads, "lr": lr if w.per_element_lr else LR, "grad_outs": grad_outs}


def methods(w: Workload, x: dict) -> dict[str, Callable[[], list[Tensor]]]:
    """The update as fastmeta, the reference, a per-parameter loop, torch._foreach_* and (where it applies)
    one elementwise op over pre-flattened buffers (the floor for one pass), each returning the new weights."""
    params, grads, lr = x["params"], x["grads"], x["lr"]
    out = {
        "fastmeta": lambda: ops.fast_weight_update(params, grads, lr),
        "reference": lambda: reference.fast_weight_update(params, grads, lr),
    }
    if w.per_element_lr:
        out["loop"] = lambda: [p - a * g for p, g, a in zip(params, grads, lr)]
        out["foreach"] = lambda: torch._foreach_addcmul(params, grads, lr, value=-1.0)
    else:
        out["loop"] = lambda: [p - lr * g for p, g in zip(params, grads)]
        out["foreach"] = lambda: torch._foreach_add(params, grads, alpha=-lr)
    if not params[0].requires_grad:
        T = w.tasks
        with torch.no_grad():
            fp = torch.cat([p.reshape(-1) if w.shared else p.reshape(T, -1) for p in params], dim=-1)
            fg = torch.cat([g.reshape(T, -1) for g in grads], dim=1)
            if w.per_element_lr:
                fl = torch.cat([a.reshape(-1) for a in lr])
                out["flat"] = lambda: [torch.addcmul(fp, fg, fl, value=-1.0)]
            else:
                out["flat"] = lambda: [torch.sub(fp, fg, alpha=lr)]
    return out


def with_backward(fn: Callable[[], list[Tensor]], grad_outs: list[Tensor]) -> Callable[[], None]:
    """Forward and backward of the update with the given upstream gradients."""

    def run() -> None:
        torch.autograd.backward(fn(), grad_outs)

    return run


def keep_freed_memory() -> bool:
    """Asks glibc to keep freed memory (up to 32 MB a block) instead of returning it to the OS.

    Without this, whether a method's outputs land on recycled or fresh (page-faulting) memory depends on the
    heap's history: the same kernel then measured 1.6 ms or 5 ms per call (conv4, T=32) depending on what ran
    before it. With it, every method is timed on warm memory, as PyTorch's caching allocator does on GPUs.
    Affects only this (benchmark) process; returns False where it does not apply (not glibc).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
    except (OSError, AttributeError):
        return False


def measure(
    fn: Callable[[], object],
    device: str,
    min_time: float = 0.3,
    max_reps: int = 2000,
    min_reps: int = 20,
    warmup: int = 5,
) -> list[float]:
    """Seconds per call of fn, warm: at least min_reps calls and min_time seconds, at most max_reps calls
    (CUDA synchronised around each call)."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    warm_until = time.perf_counter() + min(0.1, min_time / 3)  # thread pool, caches and allocator reach steady state
    for i in range(max_reps):
        fn()
        if i + 1 >= warmup and time.perf_counter() > warm_until:
            break
    sync()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (time.perf_counter() - start < min_time or len(times) < min_reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def run_fast_weight_update(
    device: str = "cpu", workloads: list[Workload] | None = None, min_time: float = 0.3, rounds: int = 3
) -> list[dict]:
    """Times every method on every workload, forward alone and forward+backward: one row per measurement, the
    median over `rounds` interleaved rounds (see interleaved_medians)."""
    rows = []
    for w in workloads or WORKLOADS:
        for mode in ("forward", "forward+backward"):
            x = make_inputs(w, device, requires_grad=mode != "forward")
            calls = {
                name: fn if mode == "forward" else with_backward(fn, x["grad_outs"])
                for name, fn in methods(w, x).items()
            }
            leaves = x["params"] + x["grads"] + (x["lr"] if isinstance(x["lr"], list) else [])

            def clear_grads(leaves: list[Tensor] = leaves) -> None:
                for t in leaves:
                    t.grad = None

            for name, seconds in interleaved_medians(calls, device, min_time, rounds, clear_grads).items():
                rows.append({"workload": w.label, "mode": mode, "method": name, "seconds": seconds})
    return rows


def interleaved_medians(
    calls: dict[str, Callable[[], object]],
    device: str,
    min_time: float,
    rounds: int,
    after: Callable[[], None] = lambda: None,
    **measure_args: int,
) -> dict[str, float]:
    """Median seconds per call of each of `calls`, measured in `rounds` interleaved rounds (methods take turns,
    so that a slow spell of a noisy machine hits all of them); `after` runs after each measurement."""
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            samples[name] += measure(call, device, min_time / rounds, **measure_args)
            after()
    return {name: statistics.median(times) for name, times in samples.items()}


def format_table(rows: list[dict]) -> str:
    """Markdown table: median time, speed-up of fastmeta over each other method, and peak memory where measured."""
    memory = any("peak_bytes" in r for r in rows)
    head = "| workload | mode | method | median | fastmeta speed-up |" + (
        " peak memory over inputs |" if memory else ""
    )
    lines = [head, "|---|---|---|---:|---:|" + ("---:|" if memory else "")]
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["workload"], r["mode"]), []).append(r)
    for (workload, mode), group in groups.items():
        ours = next((r["seconds"] for r in group if r["method"] == "fastmeta"), None)
        for r in group:
            ratio = f"{r['seconds'] / ours:.2f}x" if ours and r["method"] != "fastmeta" else ""
            line = f"| {workload} | {mode} | {r['method']} | {_fmt(r['seconds'])} | {ratio} |"
            if memory:
                line += f" {r['peak_bytes'] / 2**20:.0f} MiB |" if "peak_bytes" in r else " |"
            lines.append(line)
    return "\n".join(lines)


def _fmt(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.1f} us"


def bytes_moved(w: Workload, element_size: int = 4) -> int:
    """Bytes the forward update must read and write at least: grads, params, lr in; new weights out."""
    S = sum(torch.Size(s).numel() for s in w.shapes)
    return element_size * (2 * w.tasks * S + (S if w.shared else w.tasks * S) + (S if w.per_element_lr else 0))


def copy_bandwidth(numel: int, device: str) -> float:
    """Bytes per second of a same-sized copy (read + write) on `device`: the roofline for an elementwise op."""
    a = torch.randn(numel, device=device)
    b = torch.empty_like(a)
    t = statistics.median(measure(lambda: b.copy_(a), device))
    return 2 * a.numel() * a.element_size() / t


# ---------------------------------------------------------------------------------------------- contrastive

PAIR_BATCH, EMBED_DIM = 65536, 128
ALL_PAIRS_SIZES = (4096, 8192)
REFERENCE_MAX_N = 16384  # the reference's N x N matrices: N=16384 takes about 6 GB, N=32768 does not fit in 20 GB


def _pair_inputs(B: int, D: int, device: str) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(B, D, generator=g).to(device).requires_grad_()
    x2 = torch.randn(B, D, generator=g).to(device).requires_grad_()
    return x1, x2, (torch.rand(B, generator=g) < 0.5).to(device)


def contrastive_methods(device: str, B: int = PAIR_BATCH, D: int = EMBED_DIM) -> dict[str, Callable[[], None]]:
    """Forward+backward of the mean pair-mode contrastive loss: fastmeta, the eager reference, and
    torch.compile of the reference (the strongest alternative a user has; compiled before timing)."""
    x1, x2, same = _pair_inputs(B, D, device)
    compiled = torch.compile(reference.contrastive_loss)

    def step(loss_fn: Callable) -> Callable[[], None]:
        def run() -> None:
            torch.autograd.grad(loss_fn(x1, x2, same, 1.0), (x1, x2))

        return run

    return {
        "fastmeta": step(ops.contrastive_loss),
        "reference": step(reference.contrastive_loss),
        "torch.compile(reference)": step(compiled),
    }


def all_pairs_inputs(N: int, D: int, device: str, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Random embeddings (N, D), requiring grad, and labels (N,) of N // 16 classes (16 a class on average)."""
    g = torch.Generator().manual_seed(0)
    e = torch.randn(N, D, generator=g, dtype=dtype).to(device).requires_grad_()
    return e, torch.randint(0, max(2, N // 16), (N,), generator=g).to(device)


def all_pairs_step(method: str, N: int, D: int, device: str) -> Callable[[], None]:
    """Forward+backward of the all-pairs contrastive loss of N embeddings by `method` (fastmeta or reference)."""
    e, labels = all_pairs_inputs(N, D, device)
    fn = {"fastmeta": ops.contrastive_loss_all_pairs, "reference": reference.contrastive_loss_all_pairs}[method]
    return lambda: torch.autograd.grad(fn(e, labels, 1.0), e)


def peak_memory(method: str, N: int, D: int, device: str) -> int:
    """Peak memory (bytes) of one all-pairs forward+backward over what its inputs already hold (see
    step_peak_memory)."""
    return step_peak_memory(device, "all_pairs", method=method, N=N, D=D)


def run_contrastive(
    device: str = "cpu",
    min_time: float = 0.6,
    rounds: int = 3,
    memory: bool = True,
    pair_batch: int = PAIR_BATCH,
    all_pairs_sizes: tuple[int, ...] = ALL_PAIRS_SIZES,
) -> list[dict]:
    """Pair mode (B pairs) and all pairs (N embeddings), D=128, forward+backward: time and peak memory."""
    rows = []
    calls = contrastive_methods(device, pair_batch)
    medians = interleaved_medians(calls, device, min_time, rounds, max_reps=200, min_reps=5, warmup=2)
    label = f"pair mode B={pair_batch} D={EMBED_DIM}"
    for name, seconds in medians.items():
        rows.append({"workload": label, "mode": "forward+backward", "method": name, "seconds": seconds})
    for N in all_pairs_sizes:
        for method in ("fastmeta", "reference") if N <= REFERENCE_MAX_N else ("fastmeta",):
            step = all_pairs_step(method, N, EMBED_DIM, device)
            times = measure(step, device, min_time, max_reps=10, min_reps=3, warmup=1)
            row = {
                "workload": f"all pairs N={N} D={EMBED_DIM}",
                "mode": "forward+backward",
                "method": method,
                "seconds": statistics.median(times),
            }
            if memory:
                row["peak_bytes"] = peak_memory(method, N, EMBED_DIM, device)
            rows.append(row)
    return rows


def bandwidth_table(rows: list[dict], workloads: list[Workload], device: str) -> str:
    """Markdown: fastmeta's forward bandwidth on each workload (bytes read and written at least / its median time
    in `rows`) against a copy of the same bytes on `device`."""
    lines = ["| workload | fastmeta | copy | fastmeta / copy |", "|---|---:|---:|---:|"]
    for w in workloads:
        t = next(
            r["seconds"] for r in rows if (r["workload"], r["mode"], r["method"]) == (w.label, "forward", "fastmeta")
        )
        moved = bytes_moved(w)
        copy = copy_bandwidth(moved // 8, device)  # a copy of moved/2 bytes moves `moved` bytes
        lines.append(f"| {w.label} | {moved / t / 1e9:.0f} GB/s | {copy / 1e9:.0f} GB/s | {moved / t / copy:.0%} |")
    return "\n".join(lines)
