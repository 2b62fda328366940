// CPU kernel of batch norm's double backward (csrc/batch_norm.h has the formula): per channel, one pass summing
// S(ggx), S(ggx x^), S(gy x^), S(ggx gy), S(gy) and one pass writing d_gy and d_x, in place of the ~50 ATen
// calls (~70 passes over a tensor of x's size) of the same formula written in ops.
//
// Layouts: contiguous (N, C, L), a channel's elements in N runs of L, parallel over channels, both passes of a
// channel back to back; and channels-last (N, L, C) for 4-d and 5-d x, parallel over rows of C for each pass,
// the sums accumulated per block of rows and added in a fixed order (deterministic for any thread count).
// Anything else is made contiguous first; the outputs have x's layout.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "../batch_norm.h"
#include "simd.h"

namespace fastmeta {
namespace {

using at::Tensor;

constexpr int64_t kGrain = 32768;  // elements per parallel work unit
constexpr int64_t kRowBlock = 256;  // channels-last: rows per block of partial sums

// The five sums of one run of n elements of a channel (see the file's top), added to s[0..4]. 8 independent
// lanes per sum, so that the compiler vectorizes without reassociating.
template <typename scalar_t, typename acc_t>
FASTMETA_SIMD_CLONES void run_sums(
    const scalar_t* __restrict__ gy, const scalar_t* __restrict__ x, const scalar_t* __restrict__ ggx, int64_t n,
    acc_t mean, acc_t r, acc_t* s) {
  constexpr int kLanes = 8;
  acc_t s1[kLanes] = {}, s2[kLanes] = {}, s3[kLanes] = {}, s4[kLanes] = {}, s5[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      const acc_t g = static_cast<acc_t>(gy[k + j]), h = (static_cast<acc_t>(x[k + j]) - mean) * r;
      const acc_t gg = static_cast<acc_t>(ggx[k + j]);
      s1[j] += gg;
      s2[j] += gg * h;
      s3[j] += g * h;
      s4[j] += gg * g;
      s5[j] += g;
    }
  for (; k < n; ++k) {
    const acc_t g = static_cast<acc_t>(gy[k]), h = (static_cast<acc_t>(x[k]) - mean) * r;
    const acc_t gg = static_cast<acc_t>(ggx[k]);
    s1[0] += gg;
    s2[0] += gg * h;
    s3[0] += g * h;
    s4[0] += gg * g;
    s5[0] += g;
  }
  for (int j = 0; j < kLanes; ++j) {
    s[0] += s1[j];
    s[1] += s2[j];
    s[2] += s3[j];
    s[3] += s4[j];
    s[4] += s5[j];
  }
}

// d_gy and d_x of one run of n elements of a channel.
template <typename scalar_t, typename acc_t>
FASTMETA_SIMD_CLONES void run_outputs(
    scalar_t* __restrict__ d_gy, scalar_t* __restrict__ d_x, const scalar_t* __restrict__ gy,
    const scalar_t* __restrict__ x, const scalar_t* __restrict__ ggx, int64_t n, const BnCoefs<acc_t> k) {
  for (int64_t i = 0; i < n; ++i) {
    const acc_t g = static_cast<acc_t>(gy[i]), gg = static_cast<acc_t>(ggx[i]);
    const acc_t h = (static_cast<acc_t>(x[i]) - k.mean) * k.r;
    d_gy[i] = static_cast<scalar_t>(k.gy_ggx * gg + k.gy_xh * h + k.gy_c);
    d_x[i] = static_cast<scalar_t>(k.x_gy * g + k.x_ggx * gg + k.x_xh * h + k.x_c);
  }
}

// Channels-last: the five sums of one row of C channels, added to s[5 * c + j].
template <typename scalar_t, typename acc_t>
FASTMETA_SIMD_CLONES void row_sums(
    const scalar_t* __restrict__ gy, const scalar_t* __restrict__ x, const scalar_t* __restrict__ ggx, int64_t C,
    const acc_t* __restrict__ mean, const acc_t* __restrict__ r, acc_t* __restrict__ s) {
  for (int64_t c = 0; c < C; ++c) {
    const acc_t g = static_cast<acc_t>(gy[c]), gg = static_cast<acc_t>(ggx[c]);
    const acc_t h = (static_cast<acc_t>(x[c]) - mean[c]) * r[c];
    s[c] += gg;
    s[C + c] += gg * h;
    s[2 * C + c] += g * h;
    s[3 * C + c] += gg * g;
    s[4 * C + c] += g;
  }
}

// Channels-last: d_gy and d_x of one row of C channels; k holds the coefficients as 10 arrays of C (BnCoefs'
// order: mean, r, gy_ggx, gy_xh, gy_c, x_gy, x_ggx, x_xh, x_c).
template <typename scalar_t, typename acc_t>
FASTMETA_SIMD_CLONES void row_outputs(
    scalar_t* __restrict__ d_gy, scalar_t* __restrict__ d_x, const scalar_t* __restrict__ gy,
    const scalar_t* __restrict__ x, const scalar_t* __restrict__ ggx, int64_t C, const acc_t* __restrict__ k) {
  for (int64_t c = 0; c < C; ++c) {
    const acc_t g = static_cast<acc_t>(gy[c]), gg = static_cast<acc_t>(ggx[c]);
    const acc_t h = (static_cast<acc_t>(x[c]) - k[c]) * k[C + c];
    d_gy[c] = static_cast<scalar_t>(k[2 * C + c] * gg + k[3 * C + c] * h + k[4 * C + c]);
    d_x[c] = static_cast<scalar_t>(k[5 * C + c] * g + k[6 * C + c] * gg + k[7 * C + c] * h + k[8 * C + c]);
  }
}

template <typename scalar_t, typename acc_t>
void channels_first(
    const Tensor& gy, const Tensor& x, const Tensor& ggx, Tensor& d_gy, Tensor& d_x, acc_t* d_w,
    const BnChannels<acc_t>& p) {
  const int64_t N = x.size(0), C = x.size(1), L = x.numel() / std::max<int64_t>(N * C, 1), M = N * L;
  const scalar_t *g = gy.const_data_ptr<scalar_t>(), *xp = x.const_data_ptr<scalar_t>();
  const scalar_t* gg = ggx.const_data_ptr<scalar_t>();
  scalar_t *og = d_gy.data_ptr<scalar_t>(), *ox = d_x.data_ptr<scalar_t>();
  at::parallel_for(0, C, std::max<int64_t>(1, kGrain / std::max<int64_t>(M, 1)), [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      acc_t s[5] = {};
      for (int64_t n = 0; n < N; ++n) {
        const int64_t o = (n * C + c) * L;
        run_sums<scalar_t, acc_t>(g + o, xp + o, gg + o, L, p.mean[c], p.r[c], s);
      }
      const BnCoefs<acc_t> k = bn_coefs<acc_t>(
          p.mean[c], p.r[c], p.weight(c), p.gw(c), p.gb(c), static_cast<acc_t>(M), s[0], s[1], s[2], s[3], s[4]);
      d_w[c] = k.d_w;
      for (int64_t n = 0; n < N; ++n) {
        const int64_t o = (n * C + c) * L;
        run_outputs<scalar_t, acc_t>(og + o, ox + o, g + o, xp + o, gg + o, L, k);
      }
    }
  });
}

template <typename scalar_t, typename acc_t>
void channels_last(
    const Tensor& gy, const Tensor& x, const Tensor& ggx, Tensor& d_gy, Tensor& d_x, acc_t* d_w,
    const BnChannels<acc_t>& p) {
  const int64_t C = x.size(1), R = x.numel() / C;  // R = N * L rows of C channels
  const scalar_t *g = gy.const_data_ptr<scalar_t>(), *xp = x.const_data_ptr<scalar_t>();
  const scalar_t* gg = ggx.const_data_ptr<scalar_t>();
  scalar_t *og = d_gy.data_ptr<scalar_t>(), *ox = d_x.data_ptr<scalar_t>();
  const int64_t blocks = (R + kRowBlock - 1) / kRowBlock;
  std::vector<acc_t> partial(static_cast<size_t>(blocks * 5 * C), acc_t(0));
  at::parallel_for(0, blocks, std::max<int64_t>(1, kGrain / (kRowBlock * C)), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t row = b * kRowBlock; row < std::min(R, (b + 1) * kRowBlock); ++row)
        row_sums<scalar_t, acc_t>(g + row * C, xp + row * C, gg + row * C, C, p.mean, p.r, &partial[b * 5 * C]);
  });
  std::vector<acc_t> k(static_cast<size_t>(9 * C));
  for (int64_t c = 0; c < C; ++c) {
    acc_t s[5] = {};
    for (int64_t b = 0; b < blocks; ++b)
      for (int j = 0; j < 5; ++j) s[j] += partial[(b * 5 + j) * C + c];
    const BnCoefs<acc_t> q = bn_coefs<acc_t>(
        p.mean[c], p.r[c], p.weight(c), p.gw(c), p.gb(c), static_cast<acc_t>(R), s[0], s[1], s[2], s[3], s[4]);
    const acc_t values[9] = {q.mean, q.r, q.gy_ggx, q.gy_xh, q.gy_c, q.x_gy, q.x_ggx, q.x_xh, q.x_c};
    for (int j = 0; j < 9; ++j) k[j * C + c] = values[j];
    d_w[c] = q.d_w;
  }
  at::parallel_for(0, R, std::max<int64_t>(1, kGrain / C), [&](int64_t r0, int64_t r1) {
    for (int64_t row = r0; row < r1; ++row)
      row_outputs<scalar_t, acc_t>(og + row * C, ox + row * C, g + row * C, xp + row * C, gg + row * C, C, k.data());
  });
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_double_backward_cpu(
    const Tensor& gy_, const Tensor& x_, const std::optional<Tensor>& weight_, const Tensor& mean_,
    const Tensor& rstd_, const std::optional<Tensor>& ggx_, const std::optional<Tensor>& ggw_,
    const std::optional<Tensor>& ggb_) {
  const BnOptional in = unpack_batch_norm_double_backward(gy_, x_, weight_, mean_, rstd_, ggx_, ggw_, ggb_);
  const int64_t C = x_.size(1);
  const auto channels_last_format = x_.dim() == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::ChannelsLast3d;
  const bool last = (x_.dim() == 4 || x_.dim() == 5) && !x_.is_contiguous() && x_.is_contiguous(channels_last_format);
  const auto format = last ? channels_last_format : at::MemoryFormat::Contiguous;
  const Tensor x = x_.contiguous(format), gy = gy_.contiguous(format);
  const Tensor ggx = in.ggx.defined() ? in.ggx.contiguous(format) : at::zeros_like(x, format);
  Tensor d_gy = at::empty_like(x, format), d_x = at::empty_like(x, format);
  const auto w_dtype = in.weight.defined() ? in.weight.scalar_type() : x.scalar_type();
  Tensor d_w;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_double_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc = c10::CppTypeToScalarType<acc_t>::value;
    const BnChannels<acc_t> p(mean_, rstd_, in);
    Tensor dw = at::zeros({C}, x.options().dtype(acc));
    if (x.numel() > 0) {
      if (last)
        channels_last<scalar_t, acc_t>(gy, x, ggx, d_gy, d_x, dw.data_ptr<acc_t>(), p);
      else
        channels_first<scalar_t, acc_t>(gy, x, ggx, d_gy, d_x, dw.data_ptr<acc_t>(), p);
    }
    d_w = dw.to(w_dtype);
  });
  return {d_gy, d_x, d_w};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmeta, CPU, m) { m.impl("batch_norm_double_backward", &batch_norm_double_backward_cpu); }

}  // namespace fastmeta
