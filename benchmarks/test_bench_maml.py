"""pytest-benchmark of fastmeta.maml_step against a per-task loop and torch.func.vmap (one meta-step: adapt T
tasks, query loss, backward). Run: pytest benchmarks/test_bench_maml.py --benchmark-group-by=group."""

import pytest
import torch

from fastmeta._bench import maml as bench_maml
from fastmeta._bench import small

TASKS = 2 if small() else None  # FASTMETA_BENCH_SMALL=1: 2 tasks a step instead of the workload's T


@pytest.mark.parametrize("method", bench_maml.METHODS + ("fastmeta recompute",))
@pytest.mark.parametrize("workload", bench_maml.WORKLOADS, ids=lambda w: w.label.replace(" ", "_").replace(",", ""))
def test_maml_step(benchmark, device, workload, method):
    if method not in bench_maml.methods_for(workload):
        pytest.skip(f"{method} is timed on the second-order S=5 workloads only")
    fn = bench_maml.step(method, workload, device, tasks=TASKS)
    if device.startswith("cuda"):
        inner = fn

        def fn():
            inner()
            torch.cuda.synchronize()

    benchmark.group = workload.label
    rounds = 20 if workload.name == "sinusoid" else 2
    benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1)
