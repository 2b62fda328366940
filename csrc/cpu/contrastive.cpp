// CPU kernels of the pairwise distance and the contrastive loss, pair mode and all-pairs mode.
// All-pairs mode tiles the pairs (a matrix product per tile) and reduces online; its backward recomputes each
// tile instead of storing N x N, so memory stays O(N * D + tile^2).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "simd.h"

namespace fastmeta {
namespace {

using at::Tensor;

constexpr int64_t kGrain = 32768;  // elements per parallel work unit
constexpr int64_t kTile = 1024;  // all-pairs tile: tile x tile pairs per matrix product

// max(0, m - d), with NaN propagating (std::max would drop it).
template <typename acc_t>
inline acc_t hinge(acc_t margin, acc_t d) {
  const acc_t h = margin - d;
  return h > acc_t(0) || std::isnan(h) ? h : acc_t(0);
}

// sum_k (a_k - b_k)^2 in 16 independent lanes (so the compiler vectorizes it without reassociating).
template <typename scalar_t, typename acc_t>
FASTMETA_SIMD_CLONES acc_t squared_distance(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b, int64_t n) {
  constexpr int kLanes = 16;
  acc_t lane[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      const acc_t t = static_cast<acc_t>(a[k + j]) - static_cast<acc_t>(b[k + j]);
      lane[j] += t * t;
    }
  for (; k < n; ++k) {
    const acc_t t = static_cast<acc_t>(a[k]) - static_cast<acc_t>(b[k]);
    lane[0] += t * t;
  }
  acc_t s = 0;
  for (int j = 0; j < kLanes; ++j) s += lane[j];
  return s;
}

// out_a[k] = c * (a_k - b_k), out_b[k] = -out_a[k]
template <typename scalar_t, typename acc_t>
FASTMETA_SIMD_CLONES void scaled_difference(
    scalar_t* __restrict__ out_a, scalar_t* __restrict__ out_b, const scalar_t* __restrict__ a,
    const scalar_t* __restrict__ b, acc_t c, int64_t n) {
  for (int64_t k = 0; k < n; ++k) {
    const acc_t v = c * (static_cast<acc_t>(a[k]) - static_cast<acc_t>(b[k]));
    out_a[k] = static_cast<scalar_t>(v);
    out_b[k] = static_cast<scalar_t>(-v);
  }
}

int64_t row_grain(int64_t D) { return std::max<int64_t>(1, kGrain / std::max<int64_t>(D, 1)); }

// ------------------------------------------------------------------------------------------------ pair mode

Tensor pairwise_distance_cpu(const Tensor& x1_, const Tensor& x2_, double eps) {
  check_pair_inputs(x1_, x2_, nullptr, 0.0, eps, "pairwise_distance");
  const Tensor x1 = x1_.contiguous(), x2 = x2_.contiguous();
  const int64_t B = x1.size(0), D = x1.size(1);
  Tensor out = at::empty({B}, x1.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x1.scalar_type(), "pairwise_distance_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* a = x1.const_data_ptr<scalar_t>();
    const scalar_t* b = x2.const_data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, B, row_grain(D), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        o[r] = static_cast<scalar_t>(
            std::sqrt(squared_distance<scalar_t, acc_t>(a + r * D, b + r * D, D) + static_cast<acc_t>(eps)));
    });
  });
  return out;
}

Tensor contrastive_loss_cpu(const Tensor& x1_, const Tensor& x2_, const Tensor& same_, double margin, double eps) {
  check_pair_inputs(x1_, x2_, &same_, margin, eps, "contrastive_loss");
  const Tensor x1 = x1_.contiguous(), x2 = x2_.contiguous(), same = same_.contiguous();
  const int64_t B = x1.size(0), D = x1.size(1);
  Tensor out = at::empty({B}, x1.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x1.scalar_type(), "contrastive_loss_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* a = x1.const_data_ptr<scalar_t>();
    const scalar_t* b = x2.const_data_ptr<scalar_t>();
    const scalar_t* s = same.const_data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const acc_t m = static_cast<acc_t>(margin), e = static_cast<acc_t>(eps);
    at::parallel_for(0, B, row_grain(D), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const acc_t sq = squared_distance<scalar_t, acc_t>(a + r * D, b + r * D, D) + e;
        const acc_t h = hinge(m, std::sqrt(sq));
        const acc_t sr = static_cast<acc_t>(s[r]);
        o[r] = static_cast<scalar_t>(sr * sq + (acc_t(1) - sr) * h * h);
      }
    });
  });
  return out;
}

std::tuple<Tensor, Tensor> contrastive_loss_backward_cpu(
    const Tensor& grad_, const Tensor& x1_, const Tensor& x2_, const Tensor& same_, double margin, double eps) {
  const char* op = "contrastive_loss_backward";
  check_pair_inputs(x1_, x2_, &same_, margin, eps, op);
  TORCH_CHECK_VALUE(
      grad_.sizes() == same_.sizes() && grad_.scalar_type() == x1_.scalar_type(), op, ": grad has shape ",
      shape_str(grad_.sizes()), " and dtype ", dtype_str(grad_.scalar_type()), ", expected those of same");
  const Tensor x1 = x1_.contiguous(), x2 = x2_.contiguous(), same = same_.contiguous(), grad = grad_.contiguous();
  const int64_t B = x1.size(0), D = x1.size(1);
  Tensor g1 = at::empty_like(x1), g2 = at::empty_like(x2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x1.scalar_type(), "contrastive_loss_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* a = x1.const_data_ptr<scalar_t>();
    const scalar_t* b = x2.const_data_ptr<scalar_t>();
    const scalar_t* s = same.const_data_ptr<scalar_t>();
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    scalar_t* o1 = g1.data_ptr<scalar_t>();
    scalar_t* o2 = g2.data_ptr<scalar_t>();
    const acc_t m = static_cast<acc_t>(margin), e = static_cast<acc_t>(eps);
    at::parallel_for(0, B, row_grain(D), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const acc_t d = std::sqrt(squared_distance<scalar_t, acc_t>(a + r * D, b + r * D, D) + e);
        const acc_t sr = static_cast<acc_t>(s[r]);
        // dL/d(sq) = same - (1 - same) * max(0, m - d) / d; d >= sqrt(eps) keeps it finite for eps > 0.
        const acc_t c = sr - (sr == acc_t(1) ? acc_t(0) : (acc_t(1) - sr) * hinge(m, d) / d);
        scaled_difference<scalar_t, acc_t>(o1 + r * D, o2 + r * D, a + r * D, b + r * D, acc_t(2) * static_cast<acc_t>(g[r]) * c, D);
      }
    });
  });
  return {g1, g2};
}

// ------------------------------------------------------------------------------------------- all-pairs mode

// Embeddings in the accumulation type (float32 for half types) and their squared norms.
std::tuple<Tensor, Tensor> acc_embeddings(const Tensor& embeddings) {
  const auto acc_type = at::toOpMathType(embeddings.scalar_type());
  Tensor e = embeddings.to(acc_type).contiguous();
  Tensor norms = at::empty({e.size(0)}, e.options());
  AT_DISPATCH_FLOATING_TYPES(e.scalar_type(), "acc_embeddings", [&] {
    const scalar_t* p = e.const_data_ptr<scalar_t>();
    scalar_t* n = norms.data_ptr<scalar_t>();
    const int64_t D = e.size(1);
    const std::vector<scalar_t> zeros(D, scalar_t(0));
    at::parallel_for(0, e.size(0), row_grain(D), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) n[r] = squared_distance<scalar_t, scalar_t>(p + r * D, zeros.data(), D);
    });
  });
  return {e, norms};
}

// Calls f(row0, rows, col0, cols, diagonal) for every tile pair I <= J of an N x N pair matrix.
template <typename F>
void for_each_tile_pair(int64_t N, F&& f) {
  for (int64_t i0 = 0; i0 < N; i0 += kTile)
    for (int64_t j0 = i0; j0 < N; j0 += kTile) f(i0, std::min(kTile, N - i0), j0, std::min(kTile, N - j0), i0 == j0);
}

// Row kernels of the all-pairs tiles, branch-free so that they vectorize (selects, not branches; NaN kept by
// `x > 0 || x != x`). Pairs (i, j) for j in a tile row: g = e_i.e_j, nj = ||e_j||^2, same = labels_i == labels_j.

// same[c] = 1 where yj[c] == yi, else 0
template <typename acc_t>
FASTMETA_SIMD_CLONES void same_mask(acc_t* __restrict__ same, const int64_t* __restrict__ yj, int64_t yi, int64_t n) {
  for (int64_t c = 0; c < n; ++c) same[c] = yj[c] == yi ? acc_t(1) : acc_t(0);
}

// sq = max(0, ni + nj - 2 g) + eps, the squared distance by the matrix-product trick (plus eps)
template <typename acc_t>
inline acc_t pair_sq(acc_t ni, acc_t nj, acc_t g, acc_t eps) {
  const acc_t sq = ni + nj - acc_t(2) * g;
  return (sq > acc_t(0) || sq != sq ? sq : acc_t(0)) + eps;
}

template <typename acc_t>
inline acc_t pair_hinge(acc_t margin, acc_t d) {
  const acc_t h = margin - d;
  return h > acc_t(0) || h != h ? h : acc_t(0);
}

// sum over the row of L = same * d^2 + (1 - same) * max(0, m - d)^2, in 16 lanes
template <typename acc_t>
FASTMETA_SIMD_CLONES acc_t row_loss_sum(
    const acc_t* __restrict__ g, const acc_t* __restrict__ nj, const acc_t* __restrict__ same, acc_t ni,
    acc_t margin, acc_t eps, int64_t n) {
  constexpr int kLanes = 16;
  acc_t lane[kLanes] = {};
  int64_t c = 0;
  auto term = [&](int64_t k) {
    const acc_t sq = pair_sq(ni, nj[k], g[k], eps);
    const acc_t h = pair_hinge(margin, std::sqrt(sq));
    return same[k] * sq + (acc_t(1) - same[k]) * h * h;
  };
  for (; c + kLanes <= n; c += kLanes)
    for (int j = 0; j < kLanes; ++j) lane[j] += term(c + j);
  for (; c < n; ++c) lane[0] += term(c);
  acc_t s = 0;
  for (int j = 0; j < kLanes; ++j) s += lane[j];
  return s;
}

// g[c] <- scale * dL/d(sq) = scale * (same - (1 - same) * max(0, m - d) / d), in place; returns the row sum
template <typename acc_t>
FASTMETA_SIMD_CLONES acc_t row_coefficients(
    acc_t* __restrict__ g, const acc_t* __restrict__ nj, const acc_t* __restrict__ same, acc_t ni, acc_t margin,
    acc_t eps, acc_t scale, int64_t n) {
  constexpr int kLanes = 16;
  acc_t lane[kLanes] = {};
  int64_t c = 0;
  auto coef = [&](int64_t k) {
    const acc_t d = std::sqrt(pair_sq(ni, nj[k], g[k], eps));
    const acc_t v = scale * (same[k] - (acc_t(1) - same[k]) * pair_hinge(margin, d) / d);
    g[k] = v;
    return v;
  };
  for (; c + kLanes <= n; c += kLanes)
    for (int j = 0; j < kLanes; ++j) lane[j] += coef(c + j);
  for (; c < n; ++c) lane[0] += coef(c);
  acc_t s = 0;
  for (int j = 0; j < kLanes; ++j) s += lane[j];
  return s;
}

Tensor contrastive_loss_all_pairs_cpu(const Tensor& embeddings, const Tensor& labels_, double margin, double eps) {
  check_all_pairs_inputs(embeddings, labels_, margin, eps, "contrastive_loss_all_pairs");
  Tensor e, norms;  // not a structured binding: the lambdas below capture them (C++20 to capture a binding)
  std::tie(e, norms) = acc_embeddings(embeddings);
  const Tensor labels = labels_.contiguous();
  const int64_t N = e.size(0);
  Tensor out = at::empty({}, e.options());
  AT_DISPATCH_FLOATING_TYPES(e.scalar_type(), "contrastive_loss_all_pairs_cpu", [&] {
    using acc_t = scalar_t;
    const acc_t m = static_cast<acc_t>(margin), eps_ = static_cast<acc_t>(eps);
    const acc_t* n = norms.const_data_ptr<acc_t>();
    const int64_t* y = labels.const_data_ptr<int64_t>();
    double total = 0;  // tile sums added in a fixed order: deterministic
    std::vector<double> row_sums(kTile);
    for_each_tile_pair(N, [&](int64_t i0, int64_t ni, int64_t j0, int64_t nj, bool diagonal) {
      const Tensor g = at::mm(e.narrow(0, i0, ni), e.narrow(0, j0, nj).t());  // (ni, nj) dot products
      const acc_t* gp = g.const_data_ptr<acc_t>();
      at::parallel_for(0, ni, row_grain(nj), [&](int64_t r0, int64_t r1) {
        std::vector<acc_t> same(nj);
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t i = i0 + r, c0 = diagonal ? r + 1 : 0;  // diagonal tile: pairs j > i only
          same_mask(same.data(), y + j0 + c0, y[i], nj - c0);
          row_sums[r] = row_loss_sum(gp + r * nj + c0, n + j0 + c0, same.data(), n[i], m, eps_, nj - c0);
        }
      });
      for (int64_t r = 0; r < ni; ++r) total += row_sums[r];
    });
    const double pairs = static_cast<double>(N) * static_cast<double>(N - 1) / 2;
    out.fill_(total / pairs);
  });
  return out.to(embeddings.scalar_type());
}

Tensor contrastive_loss_all_pairs_backward_cpu(
    const Tensor& grad, const Tensor& embeddings, const Tensor& labels_, double margin, double eps) {
  const char* op = "contrastive_loss_all_pairs_backward";
  check_all_pairs_inputs(embeddings, labels_, margin, eps, op);
  TORCH_CHECK_VALUE(grad.numel() == 1, op, ": grad must hold one value, got shape ", shape_str(grad.sizes()));
  Tensor e, norms;
  std::tie(e, norms) = acc_embeddings(embeddings);
  const Tensor labels = labels_.contiguous();
  const int64_t N = e.size(0);
  // gE = 2 * (R o E - C E), C_ij = scale * dL_ij/d(sq_ij) (symmetric, zero diagonal), R_i = sum_j C_ij.
  Tensor ge = at::zeros_like(e);
  Tensor row_total = at::zeros({N}, e.options());
  AT_DISPATCH_FLOATING_TYPES(e.scalar_type(), "contrastive_loss_all_pairs_backward_cpu", [&] {
    using acc_t = scalar_t;
    const acc_t m = static_cast<acc_t>(margin), eps_ = static_cast<acc_t>(eps);
    const double pairs = static_cast<double>(N) * static_cast<double>(N - 1) / 2;
    const acc_t scale = static_cast<acc_t>(grad.item<double>() / pairs);
    const acc_t* n = norms.const_data_ptr<acc_t>();
    const int64_t* y = labels.const_data_ptr<int64_t>();
    acc_t* R = row_total.data_ptr<acc_t>();
    std::vector<acc_t> col_sums;
    for_each_tile_pair(N, [&](int64_t i0, int64_t ni, int64_t j0, int64_t nj, bool diagonal) {
      const Tensor ei = e.narrow(0, i0, ni), ej = e.narrow(0, j0, nj);
      Tensor c = at::mm(ei, ej.t());  // dot products, overwritten in place by the coefficients
      acc_t* cp = c.data_ptr<acc_t>();
      at::parallel_for(0, ni, row_grain(nj), [&](int64_t r0, int64_t r1) {
        std::vector<acc_t> same(nj);
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t i = i0 + r;
          same_mask(same.data(), y + j0, y[i], nj);
          R[i] += row_coefficients(cp + r * nj, n + j0, same.data(), n[i], m, eps_, scale, nj);
          if (diagonal) {  // (i, i) is not a pair: drop its coefficient
            R[i] -= cp[r * nj + r];
            cp[r * nj + r] = 0;
          }
        }
      });
      // gE_I -= 2 C E_J; off the diagonal the transposed pairs add gE_J -= 2 C^T E_I and their column sums.
      Tensor gi = ge.narrow(0, i0, ni);
      gi.addmm_(c, ej, 1, -2);
      if (!diagonal) {
        Tensor gj = ge.narrow(0, j0, nj);
        gj.addmm_(c.t(), ei, 1, -2);
        col_sums.assign(nj, acc_t(0));
        for (int64_t r = 0; r < ni; ++r)
          for (int64_t col = 0; col < nj; ++col) col_sums[col] += cp[r * nj + col];
        for (int64_t col = 0; col < nj; ++col) R[j0 + col] += col_sums[col];
      }
    });
    // gE += 2 R o E
    const acc_t* ep = e.const_data_ptr<acc_t>();
    acc_t* gp = ge.data_ptr<acc_t>();
    const int64_t D = e.size(1);
    at::parallel_for(0, N, row_grain(D), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t k = 0; k < D; ++k) gp[r * D + k] += acc_t(2) * R[r] * ep[r * D + k];
    });
  });
  return ge.to(embeddings.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmeta, CPU, m) {
  m.impl("pairwise_distance", &pairwise_distance_cpu);
  m.impl("contrastive_loss", &contrastive_loss_cpu);
  m.impl("contrastive_loss_backward", &contrastive_loss_backward_cpu);
  m.impl("contrastive_loss_all_pairs", &contrastive_loss_all_pairs_cpu);
  m.impl("contrastive_loss_all_pairs_backward", &contrastive_loss_all_pairs_backward_cpu);
}

}  // namespace fastmeta
