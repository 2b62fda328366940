import pytest
import torch

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible: CUDA test skipped"),
    ),
]


@pytest.fixture(params=DEVICES)
def device(request):
    if request.param == "cuda":
        _require_cuda_kernels()
    return request.param


def _require_cuda_kernels() -> None:
    """On a machine with a visible GPU, a CUDA case fails (not skips) without the CUDA kernels: else it would
    compare the reference with itself and pass."""
    import os

    import fastmeta

    if os.environ.get("FASTMETA_DISABLE_KERNELS") != "1" and not fastmeta.kernels_available("cuda"):
        info = fastmeta.kernels_info()
        pytest.fail(f"a GPU is visible but fastmeta's CUDA kernels are not loaded: {info['error'] or 'CPU-only build'}")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _decoded_data_cache(tmp_path_factory):
    """Decoded datasets go to a cache of this test session (also for the CLI runs and subprocesses the tests start),
    never to the user's ~/.cache/fastmeta or $FASTMETA_CACHE: a test must see what the current decoding produces."""
    import os

    saved = os.environ.get("FASTMETA_CACHE")
    os.environ["FASTMETA_CACHE"] = str(tmp_path_factory.mktemp("fastmeta-cache"))
    yield
    if saved is None:
        del os.environ["FASTMETA_CACHE"]
    else:
        os.environ["FASTMETA_CACHE"] = saved
