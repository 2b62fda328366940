// CUDA kernel of batch norm's double backward (csrc/batch_norm.h has the formula): one launch for the whole
// layer, one block per channel. The block sums S(ggx), S(ggx x^), S(gy x^), S(ggx gy), S(gy) over the channel's
// M = N * L elements of the contiguous (N, C, L) inputs, thread 0 turns them into the channel's coefficients,
// and the block writes d_gy and d_x (the second read of the channel's inputs mostly from L2). In place of the
// ~50 launches (~70 passes over a tensor of x's size) of the same formula written in ATen ops. Other layouts are
// made contiguous first.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <tuple>

#include "../batch_norm.h"
#include "reduce.cuh"

namespace fastmeta {
namespace {

using at::Tensor;
using cuda::block_sum;

constexpr int kThreads = 256;

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) double_backward_kernel(
    const scalar_t* __restrict__ gy, const scalar_t* __restrict__ x, const scalar_t* __restrict__ ggx,
    scalar_t* __restrict__ d_gy, scalar_t* __restrict__ d_x, acc_t* __restrict__ d_w, const acc_t* __restrict__ mean,
    const acc_t* __restrict__ rstd, const acc_t* __restrict__ w, const acc_t* __restrict__ ggw,
    const acc_t* __restrict__ ggb, int N, int64_t C, int L) {
  // i, n and l in 32 bits (a channel's M = N * L < 2^31 - 256, checked on the host): a 64-bit division per element
  // would be emulated in tens of instructions
  const int64_t c = blockIdx.x;
  const int M = N * L;
  const acc_t mu = mean[c], r = rstd[c];
  acc_t s1 = 0, s2 = 0, s3 = 0, s4 = 0, s5 = 0;
  for (int i = threadIdx.x; i < M; i += kThreads) {
    const int n = i / L;
    const int64_t e = (n * C + c) * L + (i - n * L);
    const acc_t g = static_cast<acc_t>(gy[e]), gg = static_cast<acc_t>(ggx[e]);
    const acc_t h = (static_cast<acc_t>(x[e]) - mu) * r;
    s1 += gg;
    s2 += gg * h;
    s3 += g * h;
    s4 += gg * g;
    s5 += g;
  }
  s1 = block_sum<kThreads>(s1);
  s2 = block_sum<kThreads>(s2);
  s3 = block_sum<kThreads>(s3);
  s4 = block_sum<kThreads>(s4);
  s5 = block_sum<kThreads>(s5);
  __shared__ BnCoefs<acc_t> shared;
  if (threadIdx.x == 0) {
    shared = bn_coefs<acc_t>(
        mu, r, w ? w[c] : acc_t(1), ggw ? ggw[c] : acc_t(0), ggb ? ggb[c] : acc_t(0), static_cast<acc_t>(M), s1,
        s2, s3, s4, s5);
    d_w[c] = shared.d_w;
  }
  __syncthreads();
  const BnCoefs<acc_t> k = shared;
  for (int i = threadIdx.x; i < M; i += kThreads) {
    const int n = i / L;
    const int64_t e = (n * C + c) * L + (i - n * L);
    const acc_t g = static_cast<acc_t>(gy[e]), gg = static_cast<acc_t>(ggx[e]);
    const acc_t h = (static_cast<acc_t>(x[e]) - k.mean) * k.r;
    d_gy[e] = static_cast<scalar_t>(k.gy_ggx * gg + k.gy_xh * h + k.gy_c);
    d_x[e] = static_cast<scalar_t>(k.x_gy * g + k.x_ggx * gg + k.x_xh * h + k.x_c);
  }
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_double_backward_cuda(
    const Tensor& gy_, const Tensor& x_, const std::optional<Tensor>& weight_, const Tensor& mean_,
    const Tensor& rstd_, const std::optional<Tensor>& ggx_, const std::optional<Tensor>& ggw_,
    const std::optional<Tensor>& ggb_) {
  const BnOptional in = unpack_batch_norm_double_backward(gy_, x_, weight_, mean_, rstd_, ggx_, ggw_, ggb_);
  const c10::cuda::CUDAGuard guard(x_.device());
  const int64_t N = x_.size(0), C = x_.size(1), L = x_.numel() / std::max<int64_t>(N * C, 1);
  TORCH_CHECK_VALUE(
      N * L <= std::numeric_limits<int>::max() - kThreads, "batch_norm_double_backward: x has ", N * L,
      " elements per channel; the CUDA kernel takes at most 2^31 - 257");
  const Tensor x = x_.contiguous(), gy = gy_.contiguous();
  const Tensor ggx = in.ggx.defined() ? in.ggx.contiguous() : at::zeros_like(x);
  Tensor d_gy = at::empty_like(x), d_x = at::empty_like(x);
  const auto w_dtype = in.weight.defined() ? in.weight.scalar_type() : x.scalar_type();
  Tensor d_w;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_double_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc = c10::CppTypeToScalarType<acc_t>::value;
    const BnChannels<acc_t> p(mean_, rstd_, in);
    Tensor dw = at::zeros({C}, x.options().dtype(acc));
    if (x.numel() > 0) {
      double_backward_kernel<scalar_t, acc_t><<<C, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          gy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), ggx.const_data_ptr<scalar_t>(),
          d_gy.data_ptr<scalar_t>(), d_x.data_ptr<scalar_t>(), dw.data_ptr<acc_t>(), p.mean, p.r, p.w, p.ggw,
          p.ggb, static_cast<int>(N), C, static_cast<int>(L));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    d_w = dw.to(w_dtype);
  });
  return {d_gy, d_x, d_w};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmeta, CUDA, m) { m.impl("batch_norm_double_backward", &batch_norm_double_backward_cuda); }

}  // namespace fastmeta
