// Host cost of building fast_weight_update's forward chunk tables (csrc/cuda/multi_tensor_apply.cuh), with the
// launch replaced by a sink: what caching launch metadata per shape signature could save per call. Runs on any
// machine (no GPU, no nvcc):
//
//   TI=$(python -c "import torch.utils.cpp_extension as c; print(' '.join('-I'+p for p in c.include_paths()))")
//   TL=$(python -c "import torch, os; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))")
//   g++ -O3 -std=c++17 $TI -Icsrc/cuda benchmarks/chunk_table_cost.cpp -L$TL -lc10 -Wl,-rpath,$TL -o /tmp/ctc
//   /tmp/ctc
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <vector>

#include "multi_tensor_apply.cuh"

namespace {
// The forward's table entry and sizes, as in csrc/cuda/fast_weight_update.cu.
struct FwdMeta {
  void* ptr[5];
  int64_t numel;
  uint32_t flags;
};
using FwdTable = fastmeta::cuda::ChunkTable<FwdMeta, 36, 320>;
constexpr int64_t kFwdChunk = 65536;
volatile int sink;
}  // namespace

int main() {
  // Conv4's 18 parameter tensors (64 filters, 5-way head): numel of one task's copy of each.
  const std::vector<int64_t> S = {576, 64, 64, 64, 36864, 64, 64, 64, 36864, 64, 64, 64, 36864, 64, 64, 64, 1600, 5};
  std::vector<char> buffer(1 << 20);
  for (const int64_t T : {1, 32}) {
    const int reps = 200000;
    const auto t0 = std::chrono::steady_clock::now();
    for (int r = 0; r < reps; ++r) {
      fastmeta::cuda::multi_tensor_apply<FwdTable>(
          static_cast<int64_t>(S.size()), [&](int64_t i) { return (T * S[i] + kFwdChunk - 1) / kFwdChunk; },
          [&](FwdMeta& m, int64_t i) {
            for (int k = 0; k < 5; ++k) m.ptr[k] = buffer.data() + 64 * k + i;
            m.numel = S[i];
            m.flags = reinterpret_cast<uintptr_t>(m.ptr[0]) % 16 == 0 ? 32u : 0u;
          },
          [&](const FwdTable& table, int blocks) { sink = blocks + table.block_tensor[0]; });
    }
    const auto t1 = std::chrono::steady_clock::now();
    std::printf(
        "Conv4, T=%ld: %.0f ns per call to build the tables of 18 tensors\n", static_cast<long>(T),
        std::chrono::duration<double, std::nano>(t1 - t0).count() / reps);
  }
}
