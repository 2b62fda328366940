// Warp and block sums shared by fastmeta's CUDA kernels.
#pragma once

namespace fastmeta {
namespace cuda {

// Sum over aligned groups of G lanes (G a power of two <= 32), in every lane of the group. Every lane of the
// warp must call it with the same G.
template <typename acc_t>
__device__ __forceinline__ acc_t group_sum(acc_t v, int G) {
  for (int o = G >> 1; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over a block of Threads threads, valid in thread 0. Fixed order: deterministic. Every thread of the
// block must call it.
template <int Threads, typename acc_t>
__device__ acc_t block_sum(acc_t v) {
  static_assert(Threads % 32 == 0 && Threads / 32 <= 32, "block_sum assumes at most 32 full warps");
  __shared__ acc_t warp_sums[Threads / 32];
  v = group_sum(v, 32);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __syncthreads();  // warp_sums may still be read by an earlier call
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = acc_t(0);
  if (warp == 0) {
    v = lane < Threads / 32 ? warp_sums[lane] : acc_t(0);
    v = group_sum(v, 32);
  }
  return v;
}

}  // namespace cuda
}  // namespace fastmeta
