"""Builds fastmeta._C: the CPU kernels always, the CUDA kernels where nvcc and a CUDA build of torch are present
and either a GPU is visible or FORCE_CUDA=1 (which, without them, is an error rather than a CPU-only build)."""

import glob
import importlib.util
import os
import shutil

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cuda_home() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home is None:
        nvcc = shutil.which("nvcc")
        home = os.path.dirname(os.path.dirname(nvcc)) if nvcc else None
    return home


def _build_cuda() -> bool:
    force = os.environ.get("FORCE_CUDA", "0") == "1"
    home = _cuda_home()
    has_nvcc = home is not None and os.path.exists(os.path.join(home, "bin", "nvcc"))
    has_cuda_torch = torch.version.cuda is not None
    if force:
        if not has_nvcc:
            raise RuntimeError(
                "FORCE_CUDA=1 but nvcc was not found (CUDA_HOME="
                f"{home!r}); set CUDA_HOME to the CUDA toolkit, e.g. CUDA_HOME=/usr/local/cuda, or unset FORCE_CUDA"
            )
        if not has_cuda_torch:
            raise RuntimeError(
                f"FORCE_CUDA=1 but torch {torch.__version__} is a CPU-only build; install a CUDA build of torch"
            )
        return True
    return has_nvcc and has_cuda_torch and torch.cuda.is_available()


def _build_info(with_cuda: bool) -> str:
    """fastmeta/_build_info.py of this build: read at import to check that the kernels match the torch they run
    with and the sources beside the imported package (see fastmeta/_kernels.py)."""
    spec = importlib.util.spec_from_file_location("_fingerprint", os.path.join(ROOT, "fastmeta", "_fingerprint.py"))
    fingerprint = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fingerprint)
    return (
        "# Written by setup.py at build time, next to the kernels it describes.\n"
        f"TORCH_VERSION = {torch.__version__!r}\n"
        f"WITH_CUDA = {with_cuda!r}\n"
        f"CUDA_VERSION = {torch.version.cuda if with_cuda else None!r}\n"
        f"SOURCE_FINGERPRINT = {fingerprint.source_fingerprint(os.path.join(ROOT, 'csrc'))!r}\n"
    )


class _BuildExtension(BuildExtension):
    """Writes _build_info.py beside the built _C: into the build folder for `pip install .` (never into the
    source tree), into the source package for `build_ext --inplace`."""

    def run(self) -> None:
        super().run()
        target = os.path.join(os.path.dirname(self.get_ext_fullpath("fastmeta._C")), "_build_info.py")
        with open(target, "w") as f:
            f.write(_build_info(WITH_CUDA))


def _extension(with_cuda: bool):
    sources = ["csrc/fastmeta.cpp"] + sorted(glob.glob("csrc/autograd/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    # -fopenmp: at::parallel_for is inline OpenMP; without it the CPU kernels would run on one thread. The
    # libgomp.so.1 linked here is the one torch has already loaded (same soname): one thread pool.
    # -fno-math-errno: lets sqrt vectorize (nothing here reads errno).
    cxx = ["-O3", "-fvisibility=hidden", "-fopenmp", "-fno-math-errno"]
    link = ["-fopenmp"]
    if with_cuda:
        os.environ.setdefault("CUDA_HOME", _cuda_home())
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        nvcc = ["-O3", "-lineinfo", "-DFASTMETA_WITH_CUDA"]
        return CUDAExtension(
            "fastmeta._C",
            sources,
            extra_compile_args={"cxx": cxx + ["-DFASTMETA_WITH_CUDA"], "nvcc": nvcc},
            extra_link_args=link,
        )
    return CppExtension("fastmeta._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link)


WITH_CUDA = _build_cuda()
setup(
    packages=find_packages(include=["fastmeta", "fastmeta.*"]),
    ext_modules=[_extension(WITH_CUDA)],
    cmdclass={"build_ext": _BuildExtension.with_options(use_ninja=True)},
)
