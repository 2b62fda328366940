#!/usr/bin/env bash
# On a machine with an NVIDIA GPU and its own torch: build the extension in place, run the CUDA tests and the
# GPU benchmark, and print the tables last. Usage: bash benchmarks/gpu_check.sh [OUTDIR]   (< 9.5 minutes: build < 4,
# tests < 2.5, benchmark < 3; on the device tool: `bash benchmarks/gpu_check.sh "$OUT"` with timeout_s=570)
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:-${OUT:-/tmp/fastmeta-gpu}}
mkdir -p "$OUTDIR"
PY=${PYTHON:-python3}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)} PYTHONPATH=$PWD FASTMETA_REQUIRE_KERNELS=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUTDIR/gpu.txt"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUTDIR/gpu.txt"

echo "== build"
start=$(date +%s)
timeout 240 $PY setup.py build_ext --inplace >"$OUTDIR/build.log" 2>&1 || { tail -40 "$OUTDIR/build.log"; exit 1; }
echo "built in $(( $(date +%s) - start )) s"

echo "== tests (CUDA and CPU)"
timeout 150 $PY -m pytest -q tests -p no:cacheprovider -rf 2>&1 | tee "$OUTDIR/tests.log" | tail -25
tests_rc=${PIPESTATUS[0]}

echo "== benchmark"
for op in fast_weight_update:60 contrastive:45; do
  timeout "${op#*:}" $PY -m fastmeta bench --device cuda --op "${op%:*}" --min-time 0.3 --json "$OUTDIR/bench_${op%:*}.json" \
    | tee "$OUTDIR/bench_${op%:*}.md"
done
timeout 75 $PY -m fastmeta bench --device cuda --op maml --rounds 2 --json "$OUTDIR/bench_maml.json" \
  | tee "$OUTDIR/bench_maml.md"
echo "tests exit code: $tests_rc"
exit "$tests_rc"
