// Multi-tensor apply for fastmeta's CUDA kernels: one launch covers many tensors of a list.
//
// Like NVIDIA apex's and ATen's MultiTensorApply.cuh: the host fills a table of per-tensor metadata and a
// block -> (tensor, chunk) map, passes it BY VALUE as a kernel argument (so it lands in the kernel's parameter
// space, no host-device copy), launches when the table is full, and continues with a fresh table (carrying
// over the tensor whose chunks were cut by the launch). Kernel arguments are limited to 4 KB, so tables are
// sized per op: see the static_asserts in the users.
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>
#include <limits>

namespace fastmeta {
namespace cuda {

// Threads per block of every fastmeta multi-tensor kernel.
constexpr int kBlockSize = 256;
// Elements each thread handles per loop step (one 4-wide vector when aligned, else 4 strided scalars).
constexpr int kILP = 4;

// Table of up to MaxTensors tensors (op-specific metadata `Meta` each) and up to MaxBlocks blocks.
// Block b of a launch works on chunk block_chunk[b] of tensor tensors[block_tensor[b]].
template <typename Meta, int MaxTensors, int MaxBlocks>
struct ChunkTable {
  static_assert(MaxTensors <= 256, "block_tensor is a uint8_t");
  static constexpr int kMaxTensors = MaxTensors;
  static constexpr int kMaxBlocks = MaxBlocks;
  Meta tensors[MaxTensors];
  int32_t block_chunk[MaxBlocks];
  uint8_t block_tensor[MaxBlocks];
};

// Walks tensors 0..n-1 and launches kernels over all their chunks, table by table.
//   chunks_of(i) -> int64_t: number of chunks (= blocks) of tensor i; 0 skips the tensor.
//   fill(Meta& m, i): writes tensor i's metadata into a table slot.
//   launch(const Table& table, int blocks): launches one kernel with `blocks` blocks over the table.
template <typename Table, typename ChunksOf, typename Fill, typename Launch>
void multi_tensor_apply(int64_t n, ChunksOf&& chunks_of, Fill&& fill, Launch&& launch) {
  Table table{};
  int tensors = 0, blocks = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t chunks = chunks_of(i);
    if (chunks <= 0) continue;
    TORCH_CHECK(
        chunks <= std::numeric_limits<int32_t>::max(), "fastmeta: tensor ", i, " has too many chunks (", chunks,
        ")");
    fill(table.tensors[tensors], i);
    ++tensors;
    for (int64_t c = 0; c < chunks; ++c) {
      table.block_tensor[blocks] = static_cast<uint8_t>(tensors - 1);
      table.block_chunk[blocks] = static_cast<int32_t>(c);
      ++blocks;
      const bool last_chunk = c == chunks - 1;
      if (blocks == Table::kMaxBlocks || (last_chunk && tensors == Table::kMaxTensors)) {
        launch(table, blocks);
        blocks = 0;
        if (last_chunk) {
          tensors = 0;
        } else {
          // The current tensor has chunks left: it becomes slot 0 of the next table.
          table.tensors[0] = table.tensors[tensors - 1];
          tensors = 1;
        }
      }
    }
  }
  if (blocks > 0) launch(table, blocks);
}

}  // namespace cuda
}  // namespace fastmeta
