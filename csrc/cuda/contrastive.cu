// CUDA kernels of the pairwise distance and the contrastive loss, pair mode and all-pairs mode.
//
// Pair mode: a group of G threads (G a power of two <= 32, sized to D) per row, 16-byte vector loads where D
// and the pointers allow, a shuffle reduction of the squared distance within the group. The backward recomputes
// the squared distance, keeping the first kCacheUnits vectors of each thread's share of the row in registers,
// and writes g1 and g2 = -g1 in the same kernel: one pass over the inputs (a second over the uncached rest).
//
// All-pairs mode: the pairs are tiled into kTile x kTile blocks (tile pairs I <= J, looped on the host); per tile
// pair G_IJ = E_I E_J^T by at::mm in the accumulation type, then an elementwise kernel over the tile. Forward:
// per-pair losses (strict upper triangle on diagonal tiles) summed per block and added to that block's own
// double partial sum (launches are ordered on the stream: deterministic), one final block sums the partials.
// Backward: the tile is overwritten by the coefficients C_IJ (full symmetric tile with zero diagonal on the
// diagonal); the embeddings are held as Eaug = [E, 1, 0...] (row stride padded to kPadCols), so that
// C_IJ Eaug_J gives C_IJ E_J and the row sums of C_IJ in one product (C_IJ^T Eaug_I: the column sums), and
// gE_I += 2 (rowsum o E_I - C_IJ E_J) is one small kernel. Memory: O(N * D + kTile^2), never N x N.
//
// Loss terms follow the CPU kernels (csrc/cpu/contrastive.cpp): NaN propagates through the hinge and the
// clamp of the squared distance (max(0, x) written so that NaN passes).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/core/ScalarType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <tuple>

#include "../checks.h"
#include "reduce.cuh"

namespace fastmeta {
namespace {

using at::Tensor;

// Threads per block of every kernel here.
constexpr int kThreads = 256;
// Most blocks of a grid-stride launch.
constexpr int64_t kMaxGrid = int64_t(1) << 20;
// Vectors per thread of a row that the pair backward keeps in registers between its two passes.
constexpr int kCacheUnits = 4;
// All-pairs tile: tile x tile pairs per matrix product (a 16 MiB float32 tile; 2048 x 2048 x D products keep
// the GPU busy for any but tiny D).
constexpr int64_t kTile = 2048;
// Blocks of the all-pairs forward tile kernel: each owns one partial-sum slot.
constexpr int kReduceBlocks = 1024;
// Row stride of Eaug (all-pairs backward): D + 1 rounded up to this many elements.
constexpr int64_t kPadCols = 8;


template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

__device__ __forceinline__ float dev_sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double dev_sqrt(double x) { return sqrt(x); }

// max(0, m - d), with NaN propagating.
template <typename acc_t>
__device__ __forceinline__ acc_t hinge(acc_t margin, acc_t d) {
  const acc_t h = margin - d;
  return (h > acc_t(0) || h != h) ? h : acc_t(0);
}

using cuda::block_sum;
using cuda::group_sum;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int grid_size(int64_t blocks) { return static_cast<int>(std::min<int64_t>(std::max<int64_t>(blocks, 1), kMaxGrid)); }

// ------------------------------------------------------------------------------------------------ pair mode

// Elements per 16-byte vector of scalar_t.
template <typename scalar_t>
constexpr int vec_elems() {
  return static_cast<int>(16 / sizeof(scalar_t));
}

// Whether rows of D elements at all of `ptrs` allow 16-byte vector access.
template <typename scalar_t>
bool vec_ok(int64_t D, std::initializer_list<const void*> ptrs) {
  if (D % vec_elems<scalar_t>() != 0) return false;
  for (const void* p : ptrs)
    if (p != nullptr && reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  return true;
}

// Threads per row: the smallest power of two >= the vectors of a row, at most a warp.
int group_for(int64_t units) {
  int G = 1;
  while (G < 32 && G < units) G <<= 1;
  return G;
}

// d_b (same == nullptr) or L_b per row b. V: elements per load (1 or a 16-byte vector; then D % V == 0).
template <typename scalar_t, typename acc_t, int V>
__global__ void __launch_bounds__(kThreads) pair_forward_kernel(
    const scalar_t* __restrict__ x1, const scalar_t* __restrict__ x2, const scalar_t* __restrict__ same,
    scalar_t* __restrict__ out, int64_t B, int64_t D, int G, acc_t margin, acc_t eps) {
  using VecT = Vec<scalar_t, V>;
  const int64_t units = D / V;
  const int lane = static_cast<int>(threadIdx.x) & (G - 1);
  const int64_t rows_per_block = kThreads / G;
  // The loop bound is uniform over the block, so that every lane reaches the shuffles.
  for (int64_t r0 = static_cast<int64_t>(blockIdx.x) * rows_per_block; r0 < B;
       r0 += static_cast<int64_t>(gridDim.x) * rows_per_block) {
    const int64_t row = r0 + static_cast<int64_t>(threadIdx.x) / G;
    const bool valid = row < B;
    acc_t sq = 0;
    if (valid) {
      const VecT* __restrict__ a = reinterpret_cast<const VecT*>(x1 + row * D);
      const VecT* __restrict__ b = reinterpret_cast<const VecT*>(x2 + row * D);
      for (int64_t u = lane; u < units; u += G) {
        const VecT va = a[u], vb = b[u];
#pragma unroll
        for (int k = 0; k < V; ++k) {
          const acc_t t = static_cast<acc_t>(va.v[k]) - static_cast<acc_t>(vb.v[k]);
          sq += t * t;
        }
      }
    }
    sq = group_sum(sq, G);
    if (valid && lane == 0) {
      const acc_t sqe = sq + eps;
      const acc_t d = dev_sqrt(sqe);
      if (same == nullptr) {
        out[row] = static_cast<scalar_t>(d);
      } else {
        const acc_t s = static_cast<acc_t>(same[row]);
        const acc_t h = hinge(margin, d);
        out[row] = static_cast<scalar_t>(s * sqe + (acc_t(1) - s) * h * h);
      }
    }
  }
}

// g1[b] = 2 grad_b c_b (x1[b] - x2[b]), g2[b] = -g1[b], c_b = s_b - (1 - s_b) h_b / d_b.
template <typename scalar_t, typename acc_t, int V>
__global__ void __launch_bounds__(kThreads) pair_backward_kernel(
    const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x1, const scalar_t* __restrict__ x2,
    const scalar_t* __restrict__ same, scalar_t* __restrict__ g1, scalar_t* __restrict__ g2, int64_t B, int64_t D,
    int G, acc_t margin, acc_t eps) {
  using VecT = Vec<scalar_t, V>;
  const int64_t units = D / V;
  const int lane = static_cast<int>(threadIdx.x) & (G - 1);
  const int64_t rows_per_block = kThreads / G;
  for (int64_t r0 = static_cast<int64_t>(blockIdx.x) * rows_per_block; r0 < B;
       r0 += static_cast<int64_t>(gridDim.x) * rows_per_block) {
    const int64_t row = r0 + static_cast<int64_t>(threadIdx.x) / G;
    const bool valid = row < B;
    const VecT* __restrict__ a = reinterpret_cast<const VecT*>(x1 + (valid ? row : 0) * D);
    const VecT* __restrict__ b = reinterpret_cast<const VecT*>(x2 + (valid ? row : 0) * D);
    // Differences of this thread's first kCacheUnits vectors (in the order the forward sums them).
    acc_t diff[kCacheUnits][V];
    acc_t sq = 0;
    if (valid) {
#pragma unroll
      for (int c = 0; c < kCacheUnits; ++c) {
        const int64_t u = lane + static_cast<int64_t>(c) * G;
        if (u < units) {
          const VecT va = a[u], vb = b[u];
#pragma unroll
          for (int k = 0; k < V; ++k) {
            const acc_t t = static_cast<acc_t>(va.v[k]) - static_cast<acc_t>(vb.v[k]);
            diff[c][k] = t;
            sq += t * t;
          }
        }
      }
      for (int64_t u = lane + static_cast<int64_t>(kCacheUnits) * G; u < units; u += G) {
        const VecT va = a[u], vb = b[u];
#pragma unroll
        for (int k = 0; k < V; ++k) {
          const acc_t t = static_cast<acc_t>(va.v[k]) - static_cast<acc_t>(vb.v[k]);
          sq += t * t;
        }
      }
    }
    sq = group_sum(sq, G);
    if (valid) {
      const acc_t d = dev_sqrt(sq + eps);
      const acc_t s = static_cast<acc_t>(same[row]);
      const acc_t c = s - (s == acc_t(1) ? acc_t(0) : (acc_t(1) - s) * hinge(margin, d) / d);
      const acc_t coef = acc_t(2) * static_cast<acc_t>(grad[row]) * c;
      VecT* __restrict__ o1 = reinterpret_cast<VecT*>(g1 + row * D);
      VecT* __restrict__ o2 = reinterpret_cast<VecT*>(g2 + row * D);
#pragma unroll
      for (int cu = 0; cu < kCacheUnits; ++cu) {
        const int64_t u = lane + static_cast<int64_t>(cu) * G;
        if (u < units) {
          VecT w1, w2;
#pragma unroll
          for (int k = 0; k < V; ++k) {
            const acc_t v = coef * diff[cu][k];
            w1.v[k] = static_cast<scalar_t>(v);
            w2.v[k] = static_cast<scalar_t>(-v);
          }
          o1[u] = w1;
          o2[u] = w2;
        }
      }
      for (int64_t u = lane + static_cast<int64_t>(kCacheUnits) * G; u < units; u += G) {
        const VecT va = a[u], vb = b[u];
        VecT w1, w2;
#pragma unroll
        for (int k = 0; k < V; ++k) {
          const acc_t v = coef * (static_cast<acc_t>(va.v[k]) - static_cast<acc_t>(vb.v[k]));
          w1.v[k] = static_cast<scalar_t>(v);
          w2.v[k] = static_cast<scalar_t>(-v);
        }
        o1[u] = w1;
        o2[u] = w2;
      }
    }
  }
}

// out: d (same undefined) or L. B > 0.
template <typename scalar_t>
void launch_pair_forward(
    const Tensor& x1, const Tensor& x2, const Tensor* same, const Tensor& out, double margin, double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kV = vec_elems<scalar_t>();
  const int64_t B = x1.size(0), D = x1.size(1);
  const scalar_t* a = x1.const_data_ptr<scalar_t>();
  const scalar_t* b = x2.const_data_ptr<scalar_t>();
  const scalar_t* s = same != nullptr ? same->const_data_ptr<scalar_t>() : nullptr;
  scalar_t* o = out.data_ptr<scalar_t>();
  const bool vec = vec_ok<scalar_t>(D, {a, b});
  const int G = group_for(vec ? D / kV : D);
  const int grid = grid_size(ceil_div(B, kThreads / G));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const acc_t m = static_cast<acc_t>(margin), e = static_cast<acc_t>(eps);
  if (vec) {
    pair_forward_kernel<scalar_t, acc_t, kV><<<grid, kThreads, 0, stream>>>(a, b, s, o, B, D, G, m, e);
  } else {
    pair_forward_kernel<scalar_t, acc_t, 1><<<grid, kThreads, 0, stream>>>(a, b, s, o, B, D, G, m, e);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// B > 0, D > 0.
template <typename scalar_t>
void launch_pair_backward(
    const Tensor& grad, const Tensor& x1, const Tensor& x2, const Tensor& same, const Tensor& g1, const Tensor& g2,
    double margin, double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kV = vec_elems<scalar_t>();
  const int64_t B = x1.size(0), D = x1.size(1);
  const scalar_t* go = grad.const_data_ptr<scalar_t>();
  const scalar_t* a = x1.const_data_ptr<scalar_t>();
  const scalar_t* b = x2.const_data_ptr<scalar_t>();
  const scalar_t* s = same.const_data_ptr<scalar_t>();
  scalar_t* o1 = g1.data_ptr<scalar_t>();
  scalar_t* o2 = g2.data_ptr<scalar_t>();
  const bool vec = vec_ok<scalar_t>(D, {a, b, o1, o2});
  const int G = group_for(vec ? D / kV : D);
  const int grid = grid_size(ceil_div(B, kThreads / G));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const acc_t m = static_cast<acc_t>(margin), e = static_cast<acc_t>(eps);
  if (vec) {
    pair_backward_kernel<scalar_t, acc_t, kV><<<grid, kThreads, 0, stream>>>(go, a, b, s, o1, o2, B, D, G, m, e);
  } else {
    pair_backward_kernel<scalar_t, acc_t, 1><<<grid, kThreads, 0, stream>>>(go, a, b, s, o1, o2, B, D, G, m, e);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

Tensor pairwise_distance_cuda(const Tensor& x1_, const Tensor& x2_, double eps) {
  const char* op = "pairwise_distance";
  check_pair_inputs(x1_, x2_, nullptr, 0.0, eps, op);
  TORCH_CHECK(x1_.is_cuda(), op, ": the CUDA kernel got tensors on ", x1_.device());
  const c10::cuda::CUDAGuard guard(x1_.device());
  const Tensor x1 = x1_.contiguous(), x2 = x2_.contiguous();
  Tensor out = at::empty({x1.size(0)}, x1.options());
  if (x1.size(0) == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x1.scalar_type(), "pairwise_distance_cuda", [&] {
    launch_pair_forward<scalar_t>(x1, x2, nullptr, out, 0.0, eps);
  });
  return out;
}

Tensor contrastive_loss_cuda(const Tensor& x1_, const Tensor& x2_, const Tensor& same_, double margin, double eps) {
  const char* op = "contrastive_loss";
  check_pair_inputs(x1_, x2_, &same_, margin, eps, op);
  TORCH_CHECK(x1_.is_cuda(), op, ": the CUDA kernel got tensors on ", x1_.device());
  const c10::cuda::CUDAGuard guard(x1_.device());
  const Tensor x1 = x1_.contiguous(), x2 = x2_.contiguous(), same = same_.contiguous();
  Tensor out = at::empty({x1.size(0)}, x1.options());
  if (x1.size(0) == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x1.scalar_type(), "contrastive_loss_cuda", [&] {
    launch_pair_forward<scalar_t>(x1, x2, &same, out, margin, eps);
  });
  return out;
}

std::tuple<Tensor, Tensor> contrastive_loss_backward_cuda(
    const Tensor& grad_, const Tensor& x1_, const Tensor& x2_, const Tensor& same_, double margin, double eps) {
  const char* op = "contrastive_loss_backward";
  check_pair_inputs(x1_, x2_, &same_, margin, eps, op);
  TORCH_CHECK_VALUE(
      grad_.sizes() == same_.sizes() && grad_.scalar_type() == x1_.scalar_type(), op, ": grad has shape ",
      shape_str(grad_.sizes()), " and dtype ", dtype_str(grad_.scalar_type()), ", expected those of same");
  TORCH_CHECK(grad_.device() == x1_.device(), op, ": grad is on ", grad_.device(), " but x1 is on ", x1_.device());
  TORCH_CHECK(x1_.is_cuda(), op, ": the CUDA kernel got tensors on ", x1_.device());
  const c10::cuda::CUDAGuard guard(x1_.device());
  const Tensor x1 = x1_.contiguous(), x2 = x2_.contiguous(), same = same_.contiguous(), grad = grad_.contiguous();
  Tensor g1 = at::empty(x1.sizes(), x1.options()), g2 = at::empty(x2.sizes(), x2.options());
  if (x1.numel() == 0) return {g1, g2};  // B == 0 or D == 0: nothing to write
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x1.scalar_type(), "contrastive_loss_backward_cuda", [&] {
    launch_pair_backward<scalar_t>(grad, x1, x2, same, g1, g2, margin, eps);
  });
  return {g1, g2};
}

// ------------------------------------------------------------------------------------------- all-pairs mode

// norms[i] = sum_k e[i * ld + k]^2 for k < D: one warp per row.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    row_sq_norm_kernel(const acc_t* __restrict__ e, int64_t N, int64_t D, int64_t ld, acc_t* __restrict__ norms) {
  constexpr int64_t kRowsPerBlock = kThreads / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  for (int64_t r0 = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock; r0 < N;
       r0 += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    const int64_t row = r0 + threadIdx.x / 32;
    const bool valid = row < N;
    acc_t s = 0;
    if (valid)
      for (int64_t k = lane; k < D; k += 32) {
        const acc_t v = e[row * ld + k];
        s += v * v;
      }
    s = group_sum(s, 32);
    if (valid && lane == 0) norms[row] = s;
  }
}

// max(0, n_i + n_j - 2 G_ij), NaN propagating.
template <typename acc_t>
__device__ __forceinline__ acc_t clamped_sq(acc_t ni, acc_t nj, acc_t g) {
  const acc_t sq = ni + nj - acc_t(2) * g;
  return (sq > acc_t(0) || sq != sq) ? sq : acc_t(0);
}

// Loss of a pair with squared distance sq (as the CPU kernel: the class selects the term).
template <typename acc_t>
__device__ __forceinline__ acc_t pair_loss(acc_t sq, bool same, acc_t margin, acc_t eps) {
  sq += eps;
  if (same) return sq;
  const acc_t h = hinge(margin, dev_sqrt(sq));
  return h * h;
}

// dL/d(sq) of a pair.
template <typename acc_t>
__device__ __forceinline__ acc_t pair_dloss(acc_t sq, bool same, acc_t margin, acc_t eps) {
  if (same) return acc_t(1);
  const acc_t d = dev_sqrt(sq + eps);
  return -hinge(margin, d) / d;
}

// Sum of the losses of tile (i0 + a, j0 + b), a < ni, b < nj (b > a on a diagonal tile), from the dot products
// g (ni x nj, row-major), added to partials[blockIdx.x]. Rows of the tile are spread over the blocks.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) all_pairs_forward_tile_kernel(
    const acc_t* __restrict__ g, int64_t ni, int64_t nj, int64_t i0, int64_t j0, bool diagonal,
    const acc_t* __restrict__ norms, const int64_t* __restrict__ labels, acc_t margin, acc_t eps,
    double* __restrict__ partials) {
  acc_t sum = 0;
  for (int64_t a = blockIdx.x; a < ni; a += gridDim.x) {
    const int64_t i = i0 + a;
    const acc_t n_i = norms[i];
    const int64_t y_i = labels[i];
    const acc_t* __restrict__ row = g + a * nj;
    for (int64_t b = (diagonal ? a + 1 : 0) + threadIdx.x; b < nj; b += kThreads) {
      const int64_t j = j0 + b;
      sum += pair_loss(clamped_sq(n_i, norms[j], row[b]), y_i == labels[j], margin, eps);
    }
  }
  sum = block_sum<kThreads>(sum);
  if (threadIdx.x == 0) partials[blockIdx.x] += static_cast<double>(sum);
}

// out = sum(partials[0 : count]) / pairs, in one block.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    all_pairs_finish_kernel(const double* __restrict__ partials, int count, double pairs, scalar_t* __restrict__ out) {
  double v = 0;
  for (int k = threadIdx.x; k < count; k += kThreads) v += partials[k];
  v = block_sum<kThreads>(v);
  if (threadIdx.x == 0) *out = static_cast<scalar_t>(static_cast<acc_t>(v / pairs));
}

// Overwrites the dot products c (ni x nj) of tile (I, J) by C_ij = grad / pairs * dL_ij/d(sq_ij) (0 for i == j).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) all_pairs_coef_tile_kernel(
    acc_t* __restrict__ c, int64_t ni, int64_t nj, int64_t i0, int64_t j0, bool diagonal,
    const acc_t* __restrict__ norms, const int64_t* __restrict__ labels, const acc_t* __restrict__ grad,
    double pairs, acc_t margin, acc_t eps) {
  const acc_t scale = static_cast<acc_t>(static_cast<double>(grad[0]) / pairs);
  for (int64_t a = blockIdx.x; a < ni; a += gridDim.x) {
    const int64_t i = i0 + a;
    const acc_t n_i = norms[i];
    const int64_t y_i = labels[i];
    acc_t* __restrict__ row = c + a * nj;
    for (int64_t b = threadIdx.x; b < nj; b += kThreads) {
      const int64_t j = j0 + b;
      row[b] = diagonal && a == b
          ? acc_t(0)
          : scale * pair_dloss(clamped_sq(n_i, norms[j], row[b]), y_i == labels[j], margin, eps);
    }
  }
}

// ge[row0 + a, k] += 2 (r[a, D] * eaug[row0 + a, k] - r[a, k]) for a < rows, k < D, where r = C Eaug (rows x ld):
// r[a, D] is the row sum of C, r[a, :D] = (C E)[a]. ge: (N, D) contiguous; eaug and r: row stride ld.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) all_pairs_accumulate_kernel(
    acc_t* __restrict__ ge, const acc_t* __restrict__ r, const acc_t* __restrict__ eaug, int64_t row0, int64_t rows,
    int64_t D, int64_t ld) {
  const int64_t total = rows * D;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t a = e / D, k = e - a * D;
    const int64_t i = row0 + a;
    ge[i * D + k] += acc_t(2) * (r[a * ld + D] * eaug[i * ld + k] - r[a * ld + k]);
  }
}

// Calls f(i0, ni, j0, nj, diagonal) for every tile pair I <= J of the N x N pair matrix.
template <typename F>
void for_each_tile_pair(int64_t N, F&& f) {
  for (int64_t i0 = 0; i0 < N; i0 += kTile)
    for (int64_t j0 = i0; j0 < N; j0 += kTile) f(i0, std::min(kTile, N - i0), j0, std::min(kTile, N - j0), i0 == j0);
}

// Squared norms of the first D columns of the rows of e (N rows, row stride ld).
template <typename acc_t>
Tensor row_sq_norms(const Tensor& e, int64_t N, int64_t D, int64_t ld) {
  Tensor norms = at::empty({N}, e.options());
  const int grid = grid_size(ceil_div(N, kThreads / 32));
  row_sq_norm_kernel<acc_t><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      e.const_data_ptr<acc_t>(), N, D, ld, norms.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return norms;
}

// The (ni x nj) dot products E_I E_J^T of rows of e, into a view of buf.
Tensor tile_dots(const Tensor& buf, const Tensor& e, int64_t i0, int64_t ni, int64_t j0, int64_t nj) {
  Tensor g = buf.narrow(0, 0, ni * nj).view({ni, nj});
  if (e.size(1) == 0) {
    g.zero_();
  } else {
    at::mm_out(g, e.narrow(0, i0, ni), e.narrow(0, j0, nj).t());
  }
  return g;
}

template <typename scalar_t>
void launch_all_pairs_forward(
    const Tensor& embeddings, const Tensor& labels, double margin, double eps, const Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t N = embeddings.size(0), D = embeddings.size(1);
  // Embeddings in the accumulation type (no copy for float32/float64), contiguous (N, D).
  const Tensor e = embeddings.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  const Tensor norms = row_sq_norms<acc_t>(e, N, D, D);
  const int64_t tile = std::min(N, kTile);
  const Tensor buf = at::empty({tile * tile}, e.options());
  const Tensor partials = at::zeros({kReduceBlocks}, e.options().dtype(c10::kDouble));
  const acc_t* n = norms.const_data_ptr<acc_t>();
  const int64_t* y = labels.const_data_ptr<int64_t>();
  double* p = partials.data_ptr<double>();
  const acc_t m = static_cast<acc_t>(margin), ep = static_cast<acc_t>(eps);
  for_each_tile_pair(N, [&](int64_t i0, int64_t ni, int64_t j0, int64_t nj, bool diagonal) {
    const Tensor g = tile_dots(buf, e, i0, ni, j0, nj);
    const int grid = static_cast<int>(std::min<int64_t>(ni, kReduceBlocks));
    all_pairs_forward_tile_kernel<acc_t><<<grid, kThreads, 0, stream>>>(
        g.const_data_ptr<acc_t>(), ni, nj, i0, j0, diagonal, n, y, m, ep, p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const double pairs = static_cast<double>(N) * static_cast<double>(N - 1) / 2;
  all_pairs_finish_kernel<scalar_t, acc_t>
      <<<1, kThreads, 0, stream>>>(p, kReduceBlocks, pairs, out.data_ptr<scalar_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

Tensor contrastive_loss_all_pairs_cuda(const Tensor& embeddings_, const Tensor& labels_, double margin, double eps) {
  const char* op = "contrastive_loss_all_pairs";
  check_all_pairs_inputs(embeddings_, labels_, margin, eps, op);
  TORCH_CHECK(embeddings_.is_cuda(), op, ": the CUDA kernel got tensors on ", embeddings_.device());
  const c10::cuda::CUDAGuard guard(embeddings_.device());
  const Tensor embeddings = embeddings_.contiguous(), labels = labels_.contiguous();
  Tensor out = at::empty({}, embeddings.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, embeddings.scalar_type(), "contrastive_loss_all_pairs_cuda",
      [&] { launch_all_pairs_forward<scalar_t>(embeddings, labels, margin, eps, out); });
  return out;
}

// Returns gE in the accumulation type. D > 0.
template <typename acc_t>
Tensor all_pairs_backward_acc(
    const Tensor& grad, const Tensor& embeddings, const Tensor& labels, double margin, double eps) {
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t N = embeddings.size(0), D = embeddings.size(1);
  const int64_t ld = ceil_div(D + 1, kPadCols) * kPadCols;
  const auto acc_opts = embeddings.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  // Eaug = [E, 1, 0 ...]: C Eaug_J = [C E_J, rowsum(C), 0 ...].
  Tensor eaug = at::zeros({N, ld}, acc_opts);
  eaug.narrow(1, 0, D).copy_(embeddings);
  eaug.narrow(1, D, 1).fill_(1);
  const Tensor e = eaug.narrow(1, 0, D);  // (N, D), row stride ld
  const Tensor norms = row_sq_norms<acc_t>(eaug, N, D, ld);
  const Tensor g = grad.to(acc_opts).contiguous();  // one value, on the device
  Tensor ge = at::zeros({N, D}, acc_opts);
  const int64_t tile = std::min(N, kTile);
  const Tensor cbuf = at::empty({tile * tile}, acc_opts);
  const Tensor rbuf = at::empty({tile * ld}, acc_opts);
  const acc_t* n = norms.const_data_ptr<acc_t>();
  const int64_t* y = labels.const_data_ptr<int64_t>();
  const acc_t* gp = g.const_data_ptr<acc_t>();
  const acc_t* ep = eaug.const_data_ptr<acc_t>();
  acc_t* gep = ge.data_ptr<acc_t>();
  const double pairs = static_cast<double>(N) * static_cast<double>(N - 1) / 2;
  const acc_t m = static_cast<acc_t>(margin), eps_acc = static_cast<acc_t>(eps);
  // gE_rows += 2 (rowsum o E_rows - C E_other), with r = C Eaug_other.
  auto accumulate = [&](const Tensor& r, int64_t row0, int64_t rows) {
    const int grid = grid_size(ceil_div(rows * D, kThreads));
    all_pairs_accumulate_kernel<acc_t>
        <<<grid, kThreads, 0, stream>>>(gep, r.const_data_ptr<acc_t>(), ep, row0, rows, D, ld);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  for_each_tile_pair(N, [&](int64_t i0, int64_t ni, int64_t j0, int64_t nj, bool diagonal) {
    const Tensor c = tile_dots(cbuf, e, i0, ni, j0, nj);
    const int grid = grid_size(ni);
    all_pairs_coef_tile_kernel<acc_t><<<grid, kThreads, 0, stream>>>(
        c.data_ptr<acc_t>(), ni, nj, i0, j0, diagonal, n, y, gp, pairs, m, eps_acc);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // Rows I: C_IJ Eaug_J. On a diagonal tile C is the full symmetric tile: this covers both orders of a pair.
    Tensor r = rbuf.narrow(0, 0, ni * ld).view({ni, ld});
    at::mm_out(r, c, eaug.narrow(0, j0, nj));
    accumulate(r, i0, ni);
    if (!diagonal) {
      // Rows J: C_IJ^T Eaug_I (the column sums of C_IJ in column D).
      Tensor rt = rbuf.narrow(0, 0, nj * ld).view({nj, ld});
      at::mm_out(rt, c.t(), eaug.narrow(0, i0, ni));
      accumulate(rt, j0, nj);
    }
  });
  return ge;
}

Tensor contrastive_loss_all_pairs_backward_cuda(
    const Tensor& grad, const Tensor& embeddings_, const Tensor& labels_, double margin, double eps) {
  const char* op = "contrastive_loss_all_pairs_backward";
  check_all_pairs_inputs(embeddings_, labels_, margin, eps, op);
  TORCH_CHECK_VALUE(grad.numel() == 1, op, ": grad must hold one value, got shape ", shape_str(grad.sizes()));
  TORCH_CHECK_TYPE(
      is_supported_float(grad.scalar_type()), op, ": grad has dtype ", dtype_str(grad.scalar_type()),
      "; supported: float32, float64, float16, bfloat16");
  TORCH_CHECK(embeddings_.is_cuda(), op, ": the CUDA kernel got tensors on ", embeddings_.device());
  const c10::cuda::CUDAGuard guard(embeddings_.device());
  const int64_t N = embeddings_.size(0), D = embeddings_.size(1);
  if (D == 0) return at::empty({N, 0}, embeddings_.options());
  const Tensor embeddings = embeddings_.contiguous(), labels = labels_.contiguous();
  Tensor ge;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, embeddings.scalar_type(), "contrastive_loss_all_pairs_backward_cuda", [&] {
        ge = all_pairs_backward_acc<at::opmath_type<scalar_t>>(grad, embeddings, labels, margin, eps);
      });
  return ge.to(embeddings.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmeta, CUDA, m) {
  m.impl("pairwise_distance", &pairwise_distance_cuda);
  m.impl("contrastive_loss", &contrastive_loss_cuda);
  m.impl("contrastive_loss_backward", &contrastive_loss_backward_cuda);
  m.impl("contrastive_loss_all_pairs", &contrastive_loss_all_pairs_cuda);
  m.impl("contrastive_loss_all_pairs_backward", &contrastive_loss_all_pairs_backward_cuda);
}

}  // namespace fastmeta
