// Batch norm's double backward (training mode, batch statistics): the input checks and the per-channel
// coefficients shared by the CPU and CUDA kernels. Device-agnostic.
//
// Per channel, over its M = N * prod(spatial) elements, with x^ = (x - mean) r (mean and r = rstd saved by the
// forward), s = w r, and the sums S1 = S(ggx), S2 = S(ggx x^), S3 = S(gy x^), S4 = S(ggx gy), S5 = S(gy):
//
//   A    = S4 - S1 S5 / M - S2 S3 / M
//   d_gy = s ggx + b1 x^ + (ggb - s S1 / M)                     b1 = ggw - s S2 / M
//   d_x  = r b1 gy + r b2 ggx - r (mean(v x^) + s A / M) x^ - r mean(v)
//                                                               b2 = -s S3 / M,  v = b1 gy + b2 ggx
//   d_w  = r A
//
// the gradients w.r.t. (gy, x, w) of <ggx, gx> + <ggw, gw> + <ggb, gb>, where (gx, gw, gb) is batch norm's
// backward at x for gy (fastmeta/reference.py batch_norm_double_backward writes the same in ATen ops). So one
// reduction and one elementwise pass over x, gy and ggx per channel.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/to.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <optional>

#include "checks.h"

#if defined(__CUDACC__)
#define FASTMETA_HOST_DEVICE __host__ __device__
#else
#define FASTMETA_HOST_DEVICE
#endif

namespace fastmeta {

// d_gy = gy_ggx * ggx + gy_xh * x^ + gy_c,  d_x = x_gy * gy + x_ggx * ggx + x_xh * x^ + x_c,  x^ = (x - mean) r
template <typename acc_t>
struct BnCoefs {
  acc_t mean, r;
  acc_t gy_ggx, gy_xh, gy_c;
  acc_t x_gy, x_ggx, x_xh, x_c;
  acc_t d_w;
};

// The coefficients of one channel from its sums (see the top of this file). M > 0.
template <typename acc_t>
FASTMETA_HOST_DEVICE inline BnCoefs<acc_t> bn_coefs(
    acc_t mean, acc_t r, acc_t w, acc_t ggw, acc_t ggb, acc_t M, acc_t S1, acc_t S2, acc_t S3, acc_t S4, acc_t S5) {
  BnCoefs<acc_t> k;
  const acc_t s = w * r, inv = acc_t(1) / M;
  const acc_t A = S4 - (S1 * S5 + S2 * S3) * inv;
  const acc_t b1 = ggw - s * S2 * inv, b2 = -s * S3 * inv;
  const acc_t mean_v = (b1 * S5 + b2 * S1) * inv, mean_vx = (b1 * S3 + b2 * S2) * inv;
  k.mean = mean;
  k.r = r;
  k.gy_ggx = s;
  k.gy_xh = b1;
  k.gy_c = ggb - s * S1 * inv;
  k.x_gy = r * b1;
  k.x_ggx = r * b2;
  k.x_xh = -r * (mean_vx + s * A * inv);
  k.x_c = -r * mean_v;
  k.d_w = r * A;
  return k;
}

// Checks the arguments of batch_norm_double_backward: x (N, C, *spatial); gy and ggx (optional) like x; mean and
// rstd (C,) on x's device; weight, ggw and ggb (optional) (C,) on x's device.
inline void check_batch_norm_double_backward(
    const at::Tensor& gy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mean, const at::Tensor& rstd,
    const at::Tensor& ggx, const at::Tensor& ggw, const at::Tensor& ggb) {
  const char* op = "batch_norm_double_backward";
  TORCH_CHECK_TYPE(
      is_supported_float(x.scalar_type()), op, ": x must be float16, bfloat16, float32 or float64, got ",
      dtype_str(x.scalar_type()));
  TORCH_CHECK_VALUE(x.dim() >= 2, op, ": x must have shape (N, C, *spatial), got ", shape_str(x.sizes()));
  const int64_t C = x.size(1);
  auto like_x = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK_VALUE(
        t.sizes() == x.sizes(), op, ": ", name, " has shape ", shape_str(t.sizes()), " but x has shape ",
        shape_str(x.sizes()));
    TORCH_CHECK_TYPE(
        t.scalar_type() == x.scalar_type(), op, ": ", name, " has dtype ", dtype_str(t.scalar_type()),
        " but x has dtype ", dtype_str(x.scalar_type()));
    TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device());
  };
  auto per_channel = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK_VALUE(
        t.dim() == 1 && t.size(0) == C, op, ": ", name, " must have shape (C,) = (", C, ",), got ",
        shape_str(t.sizes()));
    TORCH_CHECK_TYPE(
        is_supported_float(t.scalar_type()), op, ": ", name, " must be a floating tensor, got ",
        dtype_str(t.scalar_type()));
    TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device());
  };
  like_x(gy, "gy");
  if (ggx.defined()) like_x(ggx, "ggx");
  per_channel(mean, "mean");
  per_channel(rstd, "rstd");
  if (weight.defined()) per_channel(weight, "weight");
  if (ggw.defined()) per_channel(ggw, "ggw");
  if (ggb.defined()) per_channel(ggb, "ggb");
}

// The op's optional arguments, undefined where absent, after check_batch_norm_double_backward.
struct BnOptional {
  at::Tensor weight, ggx, ggw, ggb;
};

inline BnOptional unpack_batch_norm_double_backward(
    const at::Tensor& gy, const at::Tensor& x, const std::optional<at::Tensor>& weight, const at::Tensor& mean,
    const at::Tensor& rstd, const std::optional<at::Tensor>& ggx, const std::optional<at::Tensor>& ggw,
    const std::optional<at::Tensor>& ggb) {
  auto get = [](const std::optional<at::Tensor>& t) { return t ? *t : at::Tensor(); };
  BnOptional in{get(weight), get(ggx), get(ggw), get(ggb)};
  check_batch_norm_double_backward(gy, x, in.weight, mean, rstd, in.ggx, in.ggw, in.ggb);
  return in;
}

// The per-channel inputs in the accumulation type acc_t: contiguous (C,) tensors (converted where their dtype
// differs, and held here), read through pointers that are null for an absent weight, ggw or ggb.
template <typename acc_t>
struct BnChannels {
  at::Tensor held[5];
  const acc_t *mean, *r, *w, *ggw, *ggb;

  BnChannels(const at::Tensor& mean_, const at::Tensor& rstd, const BnOptional& in) {
    const at::Tensor* from[5] = {&mean_, &rstd, &in.weight, &in.ggw, &in.ggb};
    const acc_t* p[5];
    for (int i = 0; i < 5; ++i) {
      if (from[i]->defined()) held[i] = from[i]->to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
      p[i] = held[i].defined() ? held[i].template const_data_ptr<acc_t>() : nullptr;
    }
    mean = p[0], r = p[1], w = p[2], ggw = p[3], ggb = p[4];
  }
  acc_t weight(int64_t c) const { return w ? w[c] : acc_t(1); }
  acc_t gw(int64_t c) const { return ggw ? ggw[c] : acc_t(0); }
  acc_t gb(int64_t c) const { return ggb ? ggb[c] : acc_t(0); }
};

}  // namespace fastmeta
