#!/usr/bin/env bash
# Builds the extension (CPU and CUDA kernels) against another torch release than this machine's 2.14.1, by default
# 2.11.0 (the lent GPU machine's), then runs the tests on the CPU against it. torch 2.14 compiles extensions as
# C++20 and 2.11 as C++17, so a source only the newer one accepts shows up here and not in a device session.
# Not part of .ci/run (about 15 min on 2 cores). Usage, from an activated venv that has torch 2.14.1 (whose CUDA
# libraries the other torch borrows, so only its wheel is downloaded, about 530 MB):
#   bash .ci/other_torch.sh [TORCH_VERSION] [pytest arguments, default: tests -n 2]
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:-2.11.0}
shift || true
[ $# -gt 0 ] || set -- tests -n 2
# torchvision's minor version is torch's plus 15 (2.11 -> 0.26, 2.14 -> 0.29)
minor=$(echo "$version" | cut -d. -f2)
vision="0.$((minor + 15)).*"
host_site=$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
python -c 'import torch, sys; sys.exit(0 if torch.version.cuda else 1)' \
  || { echo "run this from a venv with a CUDA build of torch (its CUDA libraries are borrowed)"; exit 1; }

work=${OTHER_TORCH_DIR:-/tmp/fastmeta-torch-$version}
mkdir -p "$work"
if [ ! -x "$work/venv/bin/python" ]; then
  python -m venv "$work/venv"
  "$work/venv/bin/pip" install -q --no-deps "torch==$version" "torchvision==$vision"
  "$work/venv/bin/pip" install -q filelock typing-extensions 'setuptools<82' sympy networkx jinja2 fsspec numpy \
    pybind11 ninja pytest pytest-xdist pytest-benchmark pillow tqdm
  # the CUDA libraries (nvidia-*) come from the host venv, after the other venv's own packages
  other_site=$("$work/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo "$host_site" >"$other_site/zz_host_cuda_libs.pth"
fi
py=$work/venv/bin/python
$py -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"

# the tests find Omniglot beside the repository (../shared/data/omniglot); the copy below is elsewhere
omniglot=$(cd .. && pwd)/shared/data/omniglot
[ -d "$omniglot" ] && export FASTMETA_OMNIGLOT=${FASTMETA_OMNIGLOT:-$omniglot}
# a clean copy of the tracked and untracked (not ignored) files, built in place there
rm -rf "$work/src" && mkdir -p "$work/src"
git ls-files -co --exclude-standard -z | xargs -0 cp --parents -t "$work/src"
cd "$work/src"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-2}
$py setup.py build_ext --inplace >build.log 2>&1 || { tail -40 build.log; exit 1; }
# a warning in our own sources (nvcc's "C++20 feature" among them) fails the check
if grep -E "^(\./|$PWD/)?csrc/[^:(]+[:(][0-9]+.*warning" build.log; then echo "!! warnings in csrc/ against torch $version"; exit 1; fi
echo "built against torch $version with no warning in csrc/"
FASTMETA_REQUIRE_KERNELS=1 $py -m pytest -q -p no:cacheprovider -rf --tb=short "$@"
