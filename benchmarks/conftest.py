import pytest
import torch

from fastmeta._bench import kernels as bench

bench.keep_freed_memory()  # see its docstring: timings without page-fault luck


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", help="device to benchmark on: cpu or cuda")


@pytest.fixture
def device(request):
    d = request.config.getoption("--device")
    if d.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("no CUDA device visible")
    return d
