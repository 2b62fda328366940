"""pytest-benchmark of fast_weight_update against the reference, a per-parameter loop, torch._foreach_* and one
op over pre-flattened buffers. Run: pytest benchmarks --benchmark-group-by=group [--device cuda]."""

import pytest
import torch

from fastmeta._bench import kernels as bench


@pytest.mark.parametrize("method", ["fastmeta", "reference", "loop", "foreach", "flat"])
@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("workload", bench.WORKLOADS, ids=lambda w: w.label.replace(" ", "_").replace(",", ""))
def test_fast_weight_update(benchmark, device, workload, mode, method):
    x = bench.make_inputs(workload, device, requires_grad=mode != "forward")
    fns = bench.methods(workload, x)
    if method not in fns:
        pytest.skip(f"{method} does not apply to {mode}")
    fn = fns[method] if mode == "forward" else bench.with_backward(fns[method], x["grad_outs"])
    if device.startswith("cuda"):
        inner = fn

        def fn():
            inner()
            torch.cuda.synchronize()

    benchmark.group = f"{workload.label} {mode}"
    benchmark(fn)
