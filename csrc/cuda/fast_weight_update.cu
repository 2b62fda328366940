// CUDA kernels of fast_weight_update and its backward: all parameter tensors of all tasks in a few launches.
//
// Forward: a multi-tensor apply over the flat (T * S_i) updates, up to 64K elements per block (fewer where that
// would leave SMs idle: see elements_per_block), 4 per thread per step (one 16-byte-class vector access when
// every pointer allows it). Backward: a multi-tensor apply over columns: each thread owns 4 columns s of one
// tensor and walks the T tasks, keeping the sums over tasks in registers (acc type). 0-d (Scalar) lr/decay
// gradients: one partial sum per block in an acc-type scratch buffer, then a second multi-tensor kernel sums each
// tensor's partials in a fixed order: deterministic on a given device (the blocks follow its SM count).
// Arithmetic is not contracted into FMAs, so that results match the CPU kernels bit for bit (except the order of
// Scalar sums).
#include <ATen/DeviceGuard.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/ScalarType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "multi_tensor_apply.cuh"
#include "reduce.cuh"

namespace fastmeta {
namespace {

using at::Tensor;
using cuda::kBlockSize;
using cuda::kILP;

// Most elements of the update (over all tasks) per block of the forward kernel.
constexpr int64_t kFwdChunk = 65536;
// Elements a block covers per loop step.
constexpr int64_t kStep = static_cast<int64_t>(kBlockSize) * kILP;
static_assert(kFwdChunk % kStep == 0, "chunks must start at vector boundaries");
// Most elements (columns x tasks) per backward block; its column width is a multiple of kStep.
constexpr int64_t kBwdTarget = 65536;
// Blocks per SM a call aims at: with one 256-thread block on each of a few SMs, too few loads are in flight to
// use the memory bandwidth (H100, conv4 T=32: 69 blocks, 54 of them carrying nearly all the bytes, for 132
// SMs: 41% of a copy's rate).
constexpr int64_t kBlocksPerSM = 4;

// Elements per block for `total` elements: about kBlocksPerSM blocks per SM of the current device, in whole
// loop steps, at least one step and at most `most`.
int64_t elements_per_block(int64_t total, int64_t most) {
  static std::atomic<int> sms[64] = {};  // SMs per device, read once (0: not yet)
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  int count = device >= 0 && device < 64 ? sms[device].load(std::memory_order_relaxed) : 0;
  if (count == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
    if (device >= 0 && device < 64) sms[device].store(count, std::memory_order_relaxed);
  }
  const int64_t blocks = kBlocksPerSM * std::max(count, 1);
  const int64_t per_block = (total + blocks - 1) / blocks;
  return std::clamp((per_block + kStep - 1) / kStep * kStep, kStep, most);
}
// Kernel arguments are limited to 4096 bytes; tables take at most this, the rest is left to scalars.
constexpr size_t kMaxTableBytes = 4096 - 128;

// Per-tensor flags.
constexpr uint32_t kShared = 1u << 0;  // params[i] has shape S: shared over the tasks
constexpr int kLrShift = 1;  // bits 1-2: Bcast of lr
constexpr int kDecayShift = 3;  // bits 3-4: Bcast of decay
constexpr uint32_t kVecOk = 1u << 5;  // every pointer used allows kILP-wide vector access (see *_vec_ok)
constexpr uint32_t kNeedLr = 1u << 6;  // backward: compute the lr gradient
constexpr uint32_t kNeedDecay = 1u << 7;  // backward: compute the decay gradient

__host__ __device__ inline uint32_t mode_flags(Bcast lr, Bcast decay) {
  return (static_cast<uint32_t>(lr) << kLrShift) | (static_cast<uint32_t>(decay) << kDecayShift);
}
__device__ __forceinline__ Bcast lr_mode(uint32_t f) { return static_cast<Bcast>((f >> kLrShift) & 3u); }
__device__ __forceinline__ Bcast decay_mode(uint32_t f) { return static_cast<Bcast>((f >> kDecayShift) & 3u); }

// Rounded arithmetic that the compiler may not contract into FMAs (the CPU kernels round every product).
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }

template <typename T>
struct alignas(sizeof(T) * kILP) Vec {
  T v[kILP];
};

template <typename T>
bool vec_aligned(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % (sizeof(T) * kILP) == 0;
}

// Loads r[k] = ptr[idx[k]] where ok[k] (else 0). With VEC and `full`, idx[k] == idx[0] + k and ptr + idx[0] is
// vector-aligned: one vector load.
template <bool VEC, typename T>
__device__ __forceinline__ void load(
    T (&r)[kILP], const T* __restrict__ ptr, const int64_t (&idx)[kILP], const bool (&ok)[kILP], bool full) {
  if (VEC && full) {
    const Vec<T> v = *reinterpret_cast<const Vec<T>*>(ptr + idx[0]);
#pragma unroll
    for (int k = 0; k < kILP; ++k) r[k] = v.v[k];
  } else {
#pragma unroll
    for (int k = 0; k < kILP; ++k) r[k] = ok[k] ? ptr[idx[k]] : T();
  }
}

template <bool VEC, typename T>
__device__ __forceinline__ void store(
    T* __restrict__ ptr, const T (&r)[kILP], const int64_t (&idx)[kILP], const bool (&ok)[kILP], bool full) {
  if (VEC && full) {
    Vec<T> v;
#pragma unroll
    for (int k = 0; k < kILP; ++k) v.v[k] = r[k];
    *reinterpret_cast<Vec<T>*>(ptr + idx[0]) = v;
  } else {
#pragma unroll
    for (int k = 0; k < kILP; ++k)
      if (ok[k]) ptr[idx[k]] = r[k];
  }
}

// Converts scalar_t values to acc_t, stores them as scalar_t.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void to_acc(acc_t (&r)[kILP], const scalar_t (&v)[kILP]) {
#pragma unroll
  for (int k = 0; k < kILP; ++k) r[k] = static_cast<acc_t>(v[k]);
}
template <bool VEC, typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_acc(
    scalar_t* __restrict__ ptr, const acc_t (&r)[kILP], const int64_t (&idx)[kILP], const bool (&ok)[kILP],
    bool full) {
  scalar_t v[kILP];
#pragma unroll
  for (int k = 0; k < kILP; ++k) v[k] = static_cast<scalar_t>(r[k]);
  store<VEC>(ptr, v, idx, ok, full);
}

// Coefficient (lr or decay) values of kILP elements with flat indices idx and columns col.
template <bool VEC, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_coef(
    acc_t (&r)[kILP], const scalar_t* __restrict__ ptr, Bcast mode, acc_t scalar, const int64_t (&idx)[kILP],
    const int64_t (&col)[kILP], const bool (&ok)[kILP], bool full) {
  if (mode == Bcast::Scalar) {
#pragma unroll
    for (int k = 0; k < kILP; ++k) r[k] = scalar;
    return;
  }
  scalar_t v[kILP];
  if (mode == Bcast::PerTaskElement) {
    load<VEC>(v, ptr, idx, ok, full);
  } else {
    load<VEC>(v, ptr, col, ok, full);
  }
  to_acc(r, v);
}

using cuda::block_sum;

// ------------------------------------------------------------------------------------------------ forward

enum FwdPtr : int { kFOut = 0, kFParams, kFGrads, kFLr, kFDecay, kFNumPtrs };

struct FwdMeta {
  void* ptr[kFNumPtrs];  // lr/decay: null where given by the float arguments
  int64_t numel;  // S: elements of one task's parameter
  uint32_t flags;
};
using FwdTable = cuda::ChunkTable<FwdMeta, 36, 320>;
static_assert(sizeof(FwdTable) <= kMaxTableBytes, "forward table exceeds the kernel argument limit");

// One chunk [c0, c1) of the flat (T * S) update of one tensor. Element e is (task e / S, column e % S).
template <bool VEC, typename scalar_t, typename acc_t>
__device__ __forceinline__ void forward_chunk(
    const FwdMeta& m, int64_t T, int32_t chunk, int64_t size, acc_t lr, acc_t decay) {
  const int64_t S = m.numel;  // > 0: empty tensors get no blocks
  const int64_t total = T * S;
  const int64_t c0 = static_cast<int64_t>(chunk) * size;  // size: a multiple of kStep
  const int64_t c1 = c0 + size < total ? c0 + size : total;
  scalar_t* __restrict__ out = static_cast<scalar_t*>(m.ptr[kFOut]);
  const scalar_t* __restrict__ p = static_cast<const scalar_t*>(m.ptr[kFParams]);
  const scalar_t* __restrict__ g = static_cast<const scalar_t*>(m.ptr[kFGrads]);
  const scalar_t* __restrict__ l = static_cast<const scalar_t*>(m.ptr[kFLr]);
  const scalar_t* __restrict__ d = static_cast<const scalar_t*>(m.ptr[kFDecay]);
  const bool shared = (m.flags & kShared) != 0;
  const Bcast lm = lr_mode(m.flags), dm = decay_mode(m.flags);
  const acc_t lsc = lm == Bcast::Scalar ? (l != nullptr ? static_cast<acc_t>(l[0]) : lr) : acc_t(0);
  const acc_t dsc = dm == Bcast::Scalar ? (d != nullptr ? static_cast<acc_t>(d[0]) : decay) : acc_t(0);
  // The column e % S is needed only where an operand is indexed by it; it is advanced without divisions.
  const bool need_col = shared || lm == Bcast::PerElement || dm == Bcast::PerElement;
  int64_t e = c0 + static_cast<int64_t>(threadIdx.x) * (VEC ? kILP : 1);
  int64_t s = need_col ? e % S : 0;
  const int64_t s_step = need_col ? kStep % S : 0;  // column advance per loop step
  const int64_t s_lane = need_col ? static_cast<int64_t>(VEC ? 1 : kBlockSize) % S : 0;  // between k and k + 1
  for (; e < c1; e += kStep) {
    int64_t idx[kILP], col[kILP], pidx[kILP];
    bool ok[kILP];
    int64_t sk = s;
#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      idx[k] = e + (VEC ? k : static_cast<int64_t>(k) * kBlockSize);
      ok[k] = idx[k] < c1;
      col[k] = sk;
      pidx[k] = shared ? sk : idx[k];
      sk += s_lane;
      if (sk >= S) sk -= S;
    }
    const bool full = ok[kILP - 1];
    scalar_t pv[kILP], gv[kILP];
    load<VEC>(pv, p, pidx, ok, full);
    load<VEC>(gv, g, idx, ok, full);
    acc_t lk[kILP], dk[kILP];
    load_coef<VEC>(lk, l, lm, lsc, idx, col, ok, full);
    load_coef<VEC>(dk, d, dm, dsc, idx, col, ok, full);
    acc_t o[kILP];
#pragma unroll
    for (int k = 0; k < kILP; ++k)
      o[k] = sub_rn(mul_rn(dk[k], static_cast<acc_t>(pv[k])), mul_rn(lk[k], static_cast<acc_t>(gv[k])));
    store_acc<VEC>(out, o, idx, ok, full);
    s += s_step;
    if (s >= S) s -= S;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kBlockSize)
    forward_kernel(const FwdTable table, int64_t T, int64_t size, acc_t lr, acc_t decay) {
  const FwdMeta m = table.tensors[table.block_tensor[blockIdx.x]];
  const int32_t chunk = table.block_chunk[blockIdx.x];
  if (m.flags & kVecOk) {
    forward_chunk<true, scalar_t>(m, T, chunk, size, lr, decay);
  } else {
    forward_chunk<false, scalar_t>(m, T, chunk, size, lr, decay);
  }
}

template <typename scalar_t>
void launch_forward(
    const std::vector<FwuPlan>& plans, const std::vector<Tensor>& out, const std::vector<Tensor>& p,
    const std::vector<Tensor>& g, const std::vector<Tensor>& l, const std::vector<Tensor>& d, double lr,
    double decay) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = plans[0].tasks;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  int64_t all = 0;
  for (const FwuPlan& pl : plans) all += pl.tasks * pl.numel;
  const int64_t size = elements_per_block(all, kFwdChunk);
  auto chunks_of = [&](int64_t i) {
    const int64_t total = plans[i].tasks * plans[i].numel;
    return (total + size - 1) / size;
  };
  auto fill = [&](FwdMeta& m, int64_t i) {
    const FwuPlan& pl = plans[i];
    m.ptr[kFOut] = out[i].data_ptr();
    m.ptr[kFParams] = p[i].data_ptr();
    m.ptr[kFGrads] = g[i].data_ptr();
    m.ptr[kFLr] = l.empty() ? nullptr : l[i].data_ptr();
    m.ptr[kFDecay] = d.empty() ? nullptr : d[i].data_ptr();
    m.numel = pl.numel;
    const bool need_col = pl.shared || pl.lr == Bcast::PerElement || pl.decay == Bcast::PerElement;
    const bool vec_ok = vec_aligned<scalar_t>(m.ptr[kFOut]) && vec_aligned<scalar_t>(m.ptr[kFParams]) &&
        vec_aligned<scalar_t>(m.ptr[kFGrads]) && (pl.lr == Bcast::Scalar || vec_aligned<scalar_t>(m.ptr[kFLr])) &&
        (pl.decay == Bcast::Scalar || vec_aligned<scalar_t>(m.ptr[kFDecay])) && (!need_col || pl.numel % kILP == 0);
    m.flags = (pl.shared ? kShared : 0u) | mode_flags(pl.lr, pl.decay) | (vec_ok ? kVecOk : 0u);
  };
  auto launch = [&](const FwdTable& table, int blocks) {
    forward_kernel<scalar_t, acc_t>
        <<<blocks, kBlockSize, 0, stream>>>(table, T, size, static_cast<acc_t>(lr), static_cast<acc_t>(decay));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  cuda::multi_tensor_apply<FwdTable>(static_cast<int64_t>(plans.size()), chunks_of, fill, launch);
}

std::vector<Tensor> fast_weight_update_cuda(
    at::TensorList params, at::TensorList grads, at::TensorList lrs, at::TensorList decays, double lr,
    double decay) {
  const auto plans = plan_fast_weight_update(params, grads, lrs, decays);
  if (plans.empty()) return {};
  TORCH_CHECK(grads[0].is_cuda(), "fast_weight_update: the CUDA kernel got tensors on ", grads[0].device());
  const c10::cuda::CUDAGuard guard(grads[0].device());
  const auto out = empty_like_many(grads);  // under the guard: the caching allocator allocates on the current device
  const auto p = contiguous(params), g = contiguous(grads), l = contiguous(lrs), d = contiguous(decays);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grads[0].scalar_type(), "fast_weight_update_cuda", [&] {
    launch_forward<scalar_t>(plans, out, p, g, l, d, lr, decay);
  });
  return out;
}

// ----------------------------------------------------------------------------------------------- backward

enum BwdPtr : int {
  kBGradOut = 0,
  kBParams,
  kBGrads,
  kBLr,
  kBDecay,
  kBGradParams,  // null where not requested
  kBGradGrads,  // null where not requested
  kBGradLr,  // null where not requested or Scalar (then summed into the partials)
  kBGradDecay,  // likewise
  kBNumPtrs
};

struct BwdMeta {
  void* ptr[kBNumPtrs];
  int64_t numel;  // S
  int32_t slot;  // first partial-sum slot of this tensor's chunks (Scalar lr/decay gradients)
  uint32_t flags;
};
using BwdTable = cuda::ChunkTable<BwdMeta, 24, 320>;
static_assert(sizeof(BwdTable) <= kMaxTableBytes, "backward table exceeds the kernel argument limit");

// Columns [c0, c1) of one tensor, all T tasks. Partial sums of Scalar lr/decay gradients go to
// partials[slot + chunk] (lr) and partials[nslots + slot + chunk] (decay).
template <bool VEC, typename scalar_t, typename acc_t>
__device__ __forceinline__ void backward_chunk(
    const BwdMeta& m, int64_t T, int32_t chunk, int64_t width, acc_t lr, acc_t decay, acc_t* __restrict__ partials,
    int64_t nslots) {
  const int64_t S = m.numel;  // > 0: empty tensors get no blocks
  const int64_t c0 = static_cast<int64_t>(chunk) * width;
  const int64_t c1 = c0 + width < S ? c0 + width : S;
  const scalar_t* __restrict__ go = static_cast<const scalar_t*>(m.ptr[kBGradOut]);
  const scalar_t* __restrict__ p = static_cast<const scalar_t*>(m.ptr[kBParams]);
  const scalar_t* __restrict__ g = static_cast<const scalar_t*>(m.ptr[kBGrads]);
  const scalar_t* __restrict__ l = static_cast<const scalar_t*>(m.ptr[kBLr]);
  const scalar_t* __restrict__ d = static_cast<const scalar_t*>(m.ptr[kBDecay]);
  scalar_t* __restrict__ gp = static_cast<scalar_t*>(m.ptr[kBGradParams]);
  scalar_t* __restrict__ gg = static_cast<scalar_t*>(m.ptr[kBGradGrads]);
  scalar_t* __restrict__ gl = static_cast<scalar_t*>(m.ptr[kBGradLr]);
  scalar_t* __restrict__ gd = static_cast<scalar_t*>(m.ptr[kBGradDecay]);
  const bool shared = (m.flags & kShared) != 0;
  const Bcast lm = lr_mode(m.flags), dm = decay_mode(m.flags);
  const bool need_p = gp != nullptr, need_g = gg != nullptr;
  const bool need_l = (m.flags & kNeedLr) != 0, need_d = (m.flags & kNeedDecay) != 0;
  const acc_t lsc = lm == Bcast::Scalar ? (l != nullptr ? static_cast<acc_t>(l[0]) : lr) : acc_t(0);
  const acc_t dsc = dm == Bcast::Scalar ? (d != nullptr ? static_cast<acc_t>(d[0]) : decay) : acc_t(0);
  acc_t sum_l = acc_t(0), sum_d = acc_t(0);  // this thread's share of Scalar lr/decay gradients
  for (int64_t cb = c0 + static_cast<int64_t>(threadIdx.x) * (VEC ? kILP : 1); cb < c1; cb += kStep) {
    int64_t col[kILP];
    bool ok[kILP];
#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      col[k] = cb + (VEC ? k : static_cast<int64_t>(k) * kBlockSize);
      ok[k] = col[k] < c1;
    }
    const bool full = ok[kILP - 1];
    // Task-invariant operands: Scalar/PerElement coefficients, shared params.
    acc_t lk[kILP], dk[kILP];
    if (need_g && lm != Bcast::PerTaskElement) load_coef<VEC>(lk, l, lm, lsc, col, col, ok, full);
    if (need_p && dm != Bcast::PerTaskElement) load_coef<VEC>(dk, d, dm, dsc, col, col, ok, full);
    scalar_t pv[kILP];
    if (need_d && shared) load<VEC>(pv, p, col, ok, full);
    acc_t acc_p[kILP], acc_l[kILP], acc_d[kILP];
#pragma unroll
    for (int k = 0; k < kILP; ++k) acc_p[k] = acc_l[k] = acc_d[k] = acc_t(0);
    for (int64_t t = 0; t < T; ++t) {
      const int64_t row = t * S;
      int64_t idx[kILP];
#pragma unroll
      for (int k = 0; k < kILP; ++k) idx[k] = row + col[k];
      scalar_t gov[kILP];
      load<VEC>(gov, go, idx, ok, full);
      acc_t goa[kILP], o[kILP];
      to_acc(goa, gov);
      if (need_g) {
        if (lm == Bcast::PerTaskElement) load_coef<VEC>(lk, l, lm, lsc, idx, col, ok, full);
#pragma unroll
        for (int k = 0; k < kILP; ++k) o[k] = mul_rn(-lk[k], goa[k]);
        store_acc<VEC>(gg, o, idx, ok, full);
      }
      if (need_p) {
        if (dm == Bcast::PerTaskElement) load_coef<VEC>(dk, d, dm, dsc, idx, col, ok, full);
        if (shared) {
#pragma unroll
          for (int k = 0; k < kILP; ++k) acc_p[k] = add_rn(acc_p[k], mul_rn(dk[k], goa[k]));
        } else {
#pragma unroll
          for (int k = 0; k < kILP; ++k) o[k] = mul_rn(dk[k], goa[k]);
          store_acc<VEC>(gp, o, idx, ok, full);
        }
      }
      if (need_l) {
        scalar_t gv[kILP];
        load<VEC>(gv, g, idx, ok, full);
        if (lm == Bcast::PerTaskElement) {
#pragma unroll
          for (int k = 0; k < kILP; ++k) o[k] = mul_rn(-goa[k], static_cast<acc_t>(gv[k]));
          store_acc<VEC>(gl, o, idx, ok, full);
        } else {
#pragma unroll
          for (int k = 0; k < kILP; ++k) acc_l[k] = sub_rn(acc_l[k], mul_rn(goa[k], static_cast<acc_t>(gv[k])));
        }
      }
      if (need_d) {
        if (!shared) load<VEC>(pv, p, idx, ok, full);
        if (dm == Bcast::PerTaskElement) {
#pragma unroll
          for (int k = 0; k < kILP; ++k) o[k] = mul_rn(goa[k], static_cast<acc_t>(pv[k]));
          store_acc<VEC>(gd, o, idx, ok, full);
        } else {
#pragma unroll
          for (int k = 0; k < kILP; ++k) acc_d[k] = add_rn(acc_d[k], mul_rn(goa[k], static_cast<acc_t>(pv[k])));
        }
      }
    }
    if (need_p && shared) store_acc<VEC>(gp, acc_p, col, ok, full);
    if (need_l && lm == Bcast::PerElement) store_acc<VEC>(gl, acc_l, col, ok, full);
    if (need_d && dm == Bcast::PerElement) store_acc<VEC>(gd, acc_d, col, ok, full);
#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      if (ok[k]) {
        sum_l = add_rn(sum_l, acc_l[k]);
        sum_d = add_rn(sum_d, acc_d[k]);
      }
    }
  }
  // Block-uniform conditions: every thread of the block reaches block_sum or none does.
  if (need_l && lm == Bcast::Scalar) {
    const acc_t v = block_sum<kBlockSize>(sum_l);
    if (threadIdx.x == 0) partials[m.slot + static_cast<int64_t>(chunk)] = v;
  }
  if (need_d && dm == Bcast::Scalar) {
    const acc_t v = block_sum<kBlockSize>(sum_d);
    if (threadIdx.x == 0) partials[nslots + m.slot + static_cast<int64_t>(chunk)] = v;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kBlockSize) backward_kernel(
    const BwdTable table, int64_t T, int64_t width, acc_t lr, acc_t decay, acc_t* partials, int64_t nslots) {
  const BwdMeta m = table.tensors[table.block_tensor[blockIdx.x]];
  const int32_t chunk = table.block_chunk[blockIdx.x];
  if (m.flags & kVecOk) {
    backward_chunk<true, scalar_t>(m, T, chunk, width, lr, decay, partials, nslots);
  } else {
    backward_chunk<false, scalar_t>(m, T, chunk, width, lr, decay, partials, nslots);
  }
}

// Sums of partials into 0-d outputs: block b writes out[b] = sum(partials[first[b] : first[b] + count[b]]).
constexpr int kMaxSums = 128;
struct SumTable {
  void* out[kMaxSums];
  int64_t first[kMaxSums];
  int64_t count[kMaxSums];
};
static_assert(sizeof(SumTable) <= kMaxTableBytes, "sum table exceeds the kernel argument limit");

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kBlockSize) sum_partials_kernel(const SumTable table, const acc_t* partials) {
  const int64_t first = table.first[blockIdx.x], count = table.count[blockIdx.x];
  acc_t v = acc_t(0);
  for (int64_t k = threadIdx.x; k < count; k += kBlockSize) v += partials[first + k];
  v = block_sum<kBlockSize>(v);
  if (threadIdx.x == 0) *static_cast<scalar_t*>(table.out[blockIdx.x]) = static_cast<scalar_t>(v);
}

template <typename scalar_t>
void launch_backward(
    const std::vector<FwuPlan>& plans, bool need_l, bool need_d, const std::vector<Tensor>& go,
    const std::vector<Tensor>& p, const std::vector<Tensor>& g, const std::vector<Tensor>& l,
    const std::vector<Tensor>& d, double lr, double decay, const std::vector<Tensor>& gp,
    const std::vector<Tensor>& gg, const std::vector<Tensor>& gl, const std::vector<Tensor>& gd) {
  using acc_t = at::opmath_type<scalar_t>;
  const size_t n = plans.size();
  const int64_t T = plans[0].tasks;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  // Columns per block: its share of all elements (at most kBwdTarget) over the T tasks, in whole loop steps.
  int64_t all = 0;
  for (const FwuPlan& pl : plans) all += std::max<int64_t>(T, 1) * pl.numel;
  const int64_t steps = elements_per_block(all, kBwdTarget) / kStep;
  const int64_t width = kStep * std::max<int64_t>(1, steps / std::max<int64_t>(T, 1));
  auto chunks_of = [&](int64_t i) { return (plans[i].numel + width - 1) / width; };
  // One partial-sum slot per chunk of every tensor with a Scalar lr or decay gradient.
  std::vector<int64_t> slot(n, 0);
  int64_t nslots = 0;
  for (size_t i = 0; i < n; ++i) {
    slot[i] = nslots;
    if ((need_l && plans[i].lr == Bcast::Scalar) || (need_d && plans[i].decay == Bcast::Scalar))
      nslots += chunks_of(static_cast<int64_t>(i));
  }
  TORCH_CHECK(
      nslots <= std::numeric_limits<int32_t>::max(), "fast_weight_update_backward: too many chunks (", nslots, ")");
  Tensor partials;
  acc_t* partials_ptr = nullptr;
  if (nslots > 0) {
    partials = at::empty({2 * nslots}, go[0].options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    partials_ptr = partials.data_ptr<acc_t>();
  }
  auto fill = [&](BwdMeta& m, int64_t i) {
    const FwuPlan& pl = plans[i];
    const bool lr_out = need_l && pl.lr != Bcast::Scalar, decay_out = need_d && pl.decay != Bcast::Scalar;
    m.ptr[kBGradOut] = go[i].data_ptr();
    m.ptr[kBParams] = p[i].data_ptr();
    m.ptr[kBGrads] = g[i].data_ptr();
    m.ptr[kBLr] = l.empty() ? nullptr : l[i].data_ptr();
    m.ptr[kBDecay] = d.empty() ? nullptr : d[i].data_ptr();
    m.ptr[kBGradParams] = gp.empty() ? nullptr : gp[i].data_ptr();
    m.ptr[kBGradGrads] = gg.empty() ? nullptr : gg[i].data_ptr();
    m.ptr[kBGradLr] = lr_out ? gl[i].data_ptr() : nullptr;
    m.ptr[kBGradDecay] = decay_out ? gd[i].data_ptr() : nullptr;
    m.numel = pl.numel;
    m.slot = static_cast<int32_t>(slot[i]);
    // Rows t * S stay vector-aligned only if S is a multiple of kILP. Scalar coefficients are read as one value.
    bool vec_ok = pl.numel % kILP == 0;
    for (int k = 0; k < kBNumPtrs; ++k) {
      if ((k == kBLr && pl.lr == Bcast::Scalar) || (k == kBDecay && pl.decay == Bcast::Scalar)) continue;
      if (m.ptr[k] != nullptr && !vec_aligned<scalar_t>(m.ptr[k])) vec_ok = false;
    }
    m.flags = (pl.shared ? kShared : 0u) | mode_flags(pl.lr, pl.decay) | (vec_ok ? kVecOk : 0u) |
        (need_l ? kNeedLr : 0u) | (need_d ? kNeedDecay : 0u);
  };
  auto launch = [&](const BwdTable& table, int blocks) {
    backward_kernel<scalar_t, acc_t><<<blocks, kBlockSize, 0, stream>>>(
        table, T, width, static_cast<acc_t>(lr), static_cast<acc_t>(decay), partials_ptr, nslots);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  cuda::multi_tensor_apply<BwdTable>(static_cast<int64_t>(n), chunks_of, fill, launch);

  // Scalar lr/decay gradients: sums of their tensor's partials (none, for an empty tensor: 0).
  SumTable sums{};
  int entries = 0;
  auto flush = [&] {
    if (entries == 0) return;
    sum_partials_kernel<scalar_t, acc_t><<<entries, kBlockSize, 0, stream>>>(sums, partials_ptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    entries = 0;
  };
  auto add_sum = [&](const Tensor& out, int64_t first, int64_t count) {
    sums.out[entries] = out.data_ptr();
    sums.first[entries] = first;
    sums.count[entries] = count;
    if (++entries == kMaxSums) flush();
  };
  for (size_t i = 0; i < n; ++i) {
    const int64_t chunks = chunks_of(static_cast<int64_t>(i));
    if (need_l && plans[i].lr == Bcast::Scalar) add_sum(gl[i], slot[i], chunks);
    if (need_d && plans[i].decay == Bcast::Scalar) add_sum(gd[i], nslots + slot[i], chunks);
  }
  flush();
}

BackwardLists fast_weight_update_backward_cuda(
    at::TensorList grad_outs, at::TensorList params, at::TensorList grads, at::TensorList lrs,
    at::TensorList decays, double lr, double decay, std::array<bool, 4> mask) {
  const char* op = "fast_weight_update_backward";
  // The gradients are allocated while planning, by the caching allocator on the current device: make it theirs.
  const c10::OptionalDeviceGuard device_guard(at::device_of(grads));
  BackwardLists out;
  const auto plans = plan_fast_weight_update_backward(grad_outs, params, grads, lrs, decays, mask, out);
  // named references, not a structured binding: the dispatch lambda captures them (C++20 to capture a binding)
  auto &gp = std::get<0>(out), &gg = std::get<1>(out), &gl = std::get<2>(out), &gd = std::get<3>(out);
  const size_t n = plans.size();
  const bool need_l = mask[2] && !lrs.empty(), need_d = mask[3] && !decays.empty();
  if (n == 0 || !(mask[0] || mask[1] || need_l || need_d)) return out;
  TORCH_CHECK(grads[0].is_cuda(), op, ": the CUDA kernel got tensors on ", grads[0].device());
  const c10::cuda::CUDAGuard guard(grads[0].device());
  const auto go = contiguous(grad_outs), p = contiguous(params), g = contiguous(grads), l = contiguous(lrs),
             d = contiguous(decays);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grads[0].scalar_type(), "fast_weight_update_backward_cuda",
      [&] { launch_backward<scalar_t>(plans, need_l, need_d, go, p, g, l, d, lr, decay, gp, gg, gl, gd); });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmeta, CUDA, m) {
  m.impl("fast_weight_update", &fast_weight_update_cuda);
  m.impl("fast_weight_update_backward", &fast_weight_update_backward_cuda);
}

}  // namespace fastmeta
