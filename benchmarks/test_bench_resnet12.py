"""pytest-benchmark of second-order MAML on ResNet-12 (64-160-320-640, 3x32x32, T=4, 5-way 1-shot, 15 queries):
fastmeta.maml_step against the per-task loop, vmap with exact BatchNorm, learn2learn, higher and torchopt (skipped
when not installed). Run: pytest benchmarks/test_bench_resnet12.py --benchmark-group-by=group. The table with
peak memory: python benchmarks/maml_resnet12.py."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import maml_resnet12  # noqa: E402


@pytest.mark.parametrize("method", maml_resnet12.METHODS)
@pytest.mark.parametrize("steps", [1, 5], ids=lambda s: f"S={s}")
def test_maml_resnet12(benchmark, device, steps, method):
    if device != "cpu":
        pytest.skip("the ResNet-12 comparison runs on the CPU")
    why = maml_resnet12.missing(method)
    if why is not None:
        pytest.skip(why)
    # FASTMETA_BENCH_SMALL=1: a toy network, for checking that the suite runs (tests/test_readme.py)
    small = os.environ.get("FASTMETA_BENCH_SMALL") == "1"
    config = maml_resnet12.Config(widths=(4, 8, 8, 8), tasks=2) if small else maml_resnet12.Config()
    fn = maml_resnet12.step(method, config, steps)
    benchmark.group = f"maml ResNet-12 T=4 S={steps} 2nd order"
    benchmark.pedantic(fn, rounds=2, warmup_rounds=1)
