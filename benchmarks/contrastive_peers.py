"""All-pairs contrastive loss: fastmeta against KeOps and pytorch-metric-learning, time and peak memory.

    python benchmarks/contrastive_peers.py                                # N = 1024, 4096, 8192; D=128; float32
    python benchmarks/contrastive_peers.py --sizes 16384 --methods fastmeta keops

One step: the mean contrastive loss over all pairs of N embeddings (N, D) with labels (N,), forward and backward
to the embeddings. Methods:
  fastmeta   fastmeta.ops.contrastive_loss_all_pairs: the pair matrix in tiles, never stored (O(N) memory)
  reference  fastmeta.reference.contrastive_loss_all_pairs: N x N matrices, as torch.cdist users write it
  keops      the same loss as one KeOps LazyTensor reduction (the pair matrix symbolic, O(N) memory; KeOps
             compiles each formula on first use and caches it on disk). Before any timing it is checked against
             fastmeta in float64, value and gradient; a mismatch stops the script.
  pml        pytorch-metric-learning's ContrastiveLoss(pos_margin=0, neg_margin=margin) on LpDistance(
             normalize_embeddings=False): the same pairs (all ordered pairs i != j) and distances, but its own loss
             (d and max(0, m - d), not squared; each averaged over its non-zero terms), so its value differs.
             It stores the N x N distances and the indices of every pair (int64).
A method whose package is not installed is skipped with the reason. Seconds: median over interleaved rounds in
this process. Peak memory: in a fresh process per row (this script with --row), after a warm-up at N=64: the
high-water mark of the resident set over the resident set before the step (on a GPU: CUDA's allocated bytes).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from collections.abc import Callable

import torch
from torch import Tensor

from fastmeta import ops, reference
from fastmeta._bench import kernels as bench
from fastmeta._bench import not_importable
from fastmeta._bench.memory import device_peak, probe

METHODS = ("fastmeta", "reference", "keops", "pml")
PEERS = {"keops": "pykeops.torch", "pml": "pytorch_metric_learning"}
REFERENCE_MAX_N = bench.REFERENCE_MAX_N  # larger N x N matrices do not fit in this machine's memory
PML_MAX_N = 8192  # pml's pair indices alone take 32 N^2 bytes (8 GiB at N=16384)


def missing(method: str) -> str | None:
    """Why `method` cannot run here (its package is not importable), or None."""
    return not_importable(PEERS[method]) if method in PEERS else None


def keops_loss(embeddings: Tensor, labels: Tensor, margin: float = 1.0, eps: float = reference.EPS) -> Tensor:
    """fastmeta's all-pairs contrastive loss written as one KeOps reduction over i, j (linear memory).

    Sums L_ij = same_ij (s_ij + eps) + (1 - same_ij) max(0, margin - sqrt(s_ij + eps))^2, s_ij = ||e_i - e_j||^2,
    over all ordered pairs, i = j included (each contributes eps, removed after), and halves it: the mean over
    i < j. Labels are compared as small floats (their ranks among the distinct labels), exact in any float type.
    """
    from pykeops.torch import LazyTensor

    n = embeddings.shape[0]
    ranks = torch.unique(labels, return_inverse=True)[1].to(embeddings.dtype)
    x_i, x_j = LazyTensor(embeddings[:, None, :]), LazyTensor(embeddings[None, :, :])
    l_i, l_j = LazyTensor(ranks[:, None, None]), LazyTensor(ranks[None, :, None])
    sq = x_i.sqdist(x_j) + eps
    same = (0.5 - (l_i - l_j).abs()).step()
    pair = same * sq + (1 - same) * (margin - sq.sqrt()).relu() ** 2
    total = pair.sum(dim=1).sum()
    return (total - n * eps) / (n * (n - 1))


def pml_loss(embeddings: Tensor, labels: Tensor, margin: float = 1.0) -> Tensor:
    """pytorch-metric-learning's contrastive loss over all pairs (its own formula; see the module docstring)."""
    from pytorch_metric_learning.distances import LpDistance
    from pytorch_metric_learning.losses import ContrastiveLoss

    loss = ContrastiveLoss(pos_margin=0, neg_margin=margin, distance=LpDistance(normalize_embeddings=False))
    return loss(embeddings, labels)


LOSSES: dict[str, Callable[..., Tensor]] = {
    "fastmeta": ops.contrastive_loss_all_pairs,
    "reference": reference.contrastive_loss_all_pairs,
    "keops": keops_loss,
    "pml": pml_loss,
}


def step(method: str, N: int, D: int, device: str) -> Callable[[], float]:
    """One forward+backward of `method`'s loss on fresh inputs of N x D; returns the loss."""
    e, labels = bench.all_pairs_inputs(N, D, device)
    fn = LOSSES[method]

    def run() -> float:
        loss = fn(e, labels, 1.0)
        torch.autograd.grad(loss, e)
        return loss.item()

    return run


def check_keops(device: str) -> None:
    """Raises unless keops_loss equals fastmeta's loss and gradient (float64, N=300, D=17)."""
    e, labels = bench.all_pairs_inputs(300, 17, device, torch.float64)
    ours = ops.contrastive_loss_all_pairs(e, labels, 1.0)
    theirs = keops_loss(e, labels, 1.0)
    g_ours, g_theirs = (torch.autograd.grad(x, e)[0] for x in (ours, theirs))
    torch.testing.assert_close(theirs, ours, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_theirs, g_ours, rtol=1e-9, atol=1e-13)


def measure_memory(method: str, N: int, D: int, device: str) -> int:
    """(In the row's own process.) Peak bytes of one step over what was resident (allocated) before it."""
    step(method, 64, D, device)()  # loads the code and libraries used on first call
    run = step(method, N, D, device)
    gc.collect()
    return device_peak(run, device)


def peak_memory(method: str, N: int, D: int, device: str, threads: int | None) -> int:
    """measure_memory in a fresh process of this script."""
    argv = [os.path.abspath(__file__), "--row", method, str(N), "--dim", str(D), "--device", device]
    return probe(argv + (["--threads", str(threads)] if threads else []), f"{method} N={N}")


def runnable(method: str, N: int) -> str | None:
    """Why `method` is left out at N (not installed, or its N x N storage would not fit), or None."""
    if method == "reference" and N > REFERENCE_MAX_N:
        return f"its N x N matrices at N={N} do not fit"
    if method == "pml" and N > PML_MAX_N:
        return f"its pair indices at N={N} take {32 * N * N / 2**30:.0f} GiB"
    return missing(method)


def run(
    sizes: list[int], D: int, methods: list[str], device: str, memory: bool, min_time: float, rounds: int,
    threads: int | None,
) -> list[dict]:  # fmt: skip
    """Rows of (N, method, seconds, loss, peak bytes); the methods of one N are timed in interleaved rounds."""
    if "keops" in methods and missing("keops") is None:
        check_keops(device)
    rows = []
    for N in sizes:
        ready = []
        for m in methods:
            why = runnable(m, N)
            if why:
                print(f"skipped {m} at N={N}: {why}", file=sys.stderr)
            else:
                ready.append(m)
        calls = {m: step(m, N, D, device) for m in ready}
        loss = {m: f() for m, f in calls.items()}  # also a warm-up (and KeOps' compilation)
        medians = bench.interleaved_medians(calls, device, min_time, rounds, max_reps=50, min_reps=1, warmup=0)
        for m in ready:
            row = {"N": N, "D": D, "method": m, "seconds": medians[m], "loss": loss[m]}
            if memory:
                row["peak_bytes"] = peak_memory(m, N, D, device, threads)
            rows.append(row)
            print(f"N={N} {m}: {medians[m] * 1e3:.1f} ms", file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict], device: str) -> str:
    """Markdown, each method's time and memory against fastmeta's at the same N."""
    lines = [
        f"All-pairs contrastive loss, forward+backward, float32, {device}",
        "",
        "| N | D | method | median | vs fastmeta | peak MiB | vs fastmeta | loss |",
        "|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    ours = {r["N"]: r for r in rows if r["method"] == "fastmeta"}
    for r in rows:
        f = ours.get(r["N"])
        speed = f"{r['seconds'] / f['seconds']:.2f}x" if f and r is not f else ""
        peak = f"{r['peak_bytes'] / 2**20:.0f}" if "peak_bytes" in r else "-"
        measured = f and r is not f and "peak_bytes" in r and f.get("peak_bytes", 0) > 0
        mem = f"{r['peak_bytes'] / f['peak_bytes']:.2f}x" if measured else ""
        lines.append(
            f"| {r['N']} | {r['D']} | {r['method']} | {r['seconds'] * 1e3:.2f} ms | {speed} | {peak} | {mem} "
            f"| {r['loss']:.6f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", nargs="+", type=int, default=[1024, 4096, 8192], help="N, embeddings per step")
    p.add_argument("--dim", type=int, default=128, help="D, the embedding size")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--no-memory", action="store_true", help="times only (no subprocess per row)")
    p.add_argument("--min-time", type=float, default=2.0, help="seconds per method and N over all rounds")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--row", nargs=2, metavar=("METHOD", "N"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.row:
        print(measure_memory(a.row[0], int(a.row[1]), a.dim, a.device))
        return
    bench.keep_freed_memory()
    rows = run(a.sizes, a.dim, a.methods, a.device, not a.no_memory, a.min_time, a.rounds, a.threads)
    print(table(rows, a.device))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
