"""pytest-benchmark of the contrastive ops: pair mode against the eager and compiled reference, all pairs against
the reference, KeOps and pytorch-metric-learning where installed (benchmarks/contrastive_peers.py).
Run: pytest benchmarks --benchmark-group-by=group [--device cuda]."""

import os
import sys

import pytest
import torch

from fastmeta._bench import kernels as bench
from fastmeta._bench import small

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import contrastive_peers as peers  # noqa: E402

# FASTMETA_BENCH_SMALL=1: toy sizes (the same methods, each called once under --benchmark-disable)
PAIR_BATCH = 256 if small() else bench.PAIR_BATCH
ALL_PAIRS_SIZES = [64, 128] if small() else [1024, 4096]


@pytest.mark.parametrize("method", ["fastmeta", "reference", "torch.compile(reference)"])
def test_pair_mode(benchmark, device, method):
    fn = bench.contrastive_methods(device, PAIR_BATCH)[method]
    fn()  # compile outside the timing
    benchmark.group = f"contrastive pair mode B={PAIR_BATCH} D={bench.EMBED_DIM} forward+backward"
    benchmark(_synced(fn, device))


@pytest.mark.parametrize("method", ["fastmeta", "reference", "keops", "pml"])
@pytest.mark.parametrize("N", ALL_PAIRS_SIZES)
def test_all_pairs(benchmark, device, method, N):
    why = peers.missing(method)
    if why:
        pytest.skip(why)
    if method == "keops":
        peers.check_keops(device)
    fn = peers.step(method, N, bench.EMBED_DIM, device)
    fn()  # KeOps compiles its formulas on first use
    benchmark.group = f"contrastive all pairs N={N} D={bench.EMBED_DIM} forward+backward"
    benchmark.pedantic(_synced(fn, device), rounds=5, warmup_rounds=1)


def _synced(fn, device):
    if not device.startswith("cuda"):
        return fn

    def run():
        fn()
        torch.cuda.synchronize()

    return run
