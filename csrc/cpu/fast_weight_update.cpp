// CPU kernels of fast_weight_update and its backward: all parameter tensors of all tasks in one parallel region.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <tuple>

#include "../checks.h"
#include "simd.h"

namespace fastmeta {
namespace {

using at::Tensor;

// Elements per parallel work unit: below this a region runs on one thread.
constexpr int64_t kGrain = 32768;

// Pointers of one coefficient row: a vector (per element) or one value.
template <typename scalar_t, typename acc_t>
struct Coef {
  const scalar_t* ptr;  // null for a scalar coefficient
  acc_t value;
};

template <bool LV, bool DV, typename scalar_t, typename acc_t>
FASTMETA_SIMD_CLONES void update_span(
    scalar_t* __restrict__ out, const scalar_t* __restrict__ p, const scalar_t* __restrict__ g,
    const scalar_t* __restrict__ l, acc_t lv, const scalar_t* __restrict__ d, acc_t dv, int64_t n) {
  for (int64_t k = 0; k < n; ++k) {
    const acc_t lk = LV ? static_cast<acc_t>(l[k]) : lv;
    const acc_t dk = DV ? static_cast<acc_t>(d[k]) : dv;
    out[k] = static_cast<scalar_t>(dk * static_cast<acc_t>(p[k]) - lk * static_cast<acc_t>(g[k]));
  }
}

// Backward row kernels. "coef" operands are a vector (V) or one value; every loop is branch-free.
// out[k] = c_k * x[k]   (c = -lr for d/dgrads, decay for per-task d/dparams)
template <bool V, typename scalar_t, typename acc_t>
FASTMETA_SIMD_CLONES void scale_span(
    scalar_t* __restrict__ out, const scalar_t* __restrict__ c, acc_t cv, acc_t sign, const scalar_t* __restrict__ x,
    int64_t n) {
  for (int64_t k = 0; k < n; ++k)
    out[k] = static_cast<scalar_t>(sign * (V ? static_cast<acc_t>(c[k]) : cv) * static_cast<acc_t>(x[k]));
}

// acc[k] += sign * c_k * x[k]   (sums over tasks: shared d/dparams, per-element d/dlr and d/ddecay)
template <bool V, typename scalar_t, typename acc_t>
FASTMETA_SIMD_CLONES void accumulate_span(
    acc_t* __restrict__ acc, const scalar_t* __restrict__ c, acc_t cv, acc_t sign, const scalar_t* __restrict__ x,
    int64_t n) {
  for (int64_t k = 0; k < n; ++k)
    acc[k] += sign * (V ? static_cast<acc_t>(c[k]) : cv) * static_cast<acc_t>(x[k]);
}

template <typename scalar_t, typename acc_t>
inline void scale_row(scalar_t* out, const scalar_t* c, acc_t cv, acc_t sign, const scalar_t* x, int64_t n) {
  c ? scale_span<true>(out, c, cv, sign, x, n) : scale_span<false>(out, c, cv, sign, x, n);
}

template <typename scalar_t, typename acc_t>
inline void accumulate_row(acc_t* acc, const scalar_t* c, acc_t cv, acc_t sign, const scalar_t* x, int64_t n) {
  c ? accumulate_span<true>(acc, c, cv, sign, x, n) : accumulate_span<false>(acc, c, cv, sign, x, n);
}

// Base pointer of a coefficient for task t, given how it broadcasts.
template <typename scalar_t>
inline const scalar_t* coef_row(const scalar_t* base, Bcast b, int64_t t, int64_t numel) {
  switch (b) {
    case Bcast::PerTaskElement: return base + t * numel;
    case Bcast::PerElement: return base;
    default: return nullptr;
  }
}

template <typename scalar_t>
void forward_kernel(
    const std::vector<FwuPlan>& plans, const std::vector<Tensor>& out, const std::vector<Tensor>& p,
    const std::vector<Tensor>& g, const std::vector<Tensor>& l, const std::vector<Tensor>& d, double lr,
    double decay) {
  using acc_t = at::opmath_type<scalar_t>;
  const size_t n = plans.size();
  // offsets[i]: first flat element of tensor i in the concatenation of all updates.
  std::vector<int64_t> offsets(n + 1, 0);
  for (size_t i = 0; i < n; ++i) offsets[i + 1] = offsets[i] + plans[i].tasks * plans[i].numel;
  at::parallel_for(0, offsets[n], kGrain, [&](int64_t begin, int64_t end) {
    size_t i = std::upper_bound(offsets.begin(), offsets.end(), begin) - offsets.begin() - 1;
    for (; begin < end && i < n; ++i) {
      const FwuPlan& pl = plans[i];
      const int64_t S = pl.numel;
      int64_t lo = begin - offsets[i];
      const int64_t hi = std::min(end, offsets[i + 1]) - offsets[i];
      scalar_t* o = out[i].data_ptr<scalar_t>();
      const scalar_t* pp = p[i].const_data_ptr<scalar_t>();
      const scalar_t* gp = g[i].const_data_ptr<scalar_t>();
      const scalar_t* lp = l.empty() ? nullptr : l[i].const_data_ptr<scalar_t>();
      const scalar_t* dp = d.empty() ? nullptr : d[i].const_data_ptr<scalar_t>();
      const acc_t lsc = pl.lr == Bcast::Scalar ? (lp ? static_cast<acc_t>(*lp) : static_cast<acc_t>(lr)) : acc_t(0);
      const acc_t dsc =
          pl.decay == Bcast::Scalar ? (dp ? static_cast<acc_t>(*dp) : static_cast<acc_t>(decay)) : acc_t(0);
      while (lo < hi) {
        const int64_t t = lo / S, s = lo % S, len = std::min(S - s, hi - lo);
        const scalar_t* lrow = lp ? coef_row(lp, pl.lr, t, S) : nullptr;
        const scalar_t* drow = dp ? coef_row(dp, pl.decay, t, S) : nullptr;
        scalar_t* orow = o + t * S + s;
        const scalar_t* prow = (pl.shared ? pp : pp + t * S) + s;
        const scalar_t* grow = gp + t * S + s;
        if (lrow && drow) {
          update_span<true, true>(orow, prow, grow, lrow + s, lsc, drow + s, dsc, len);
        } else if (lrow) {
          update_span<true, false>(orow, prow, grow, lrow + s, lsc, drow, dsc, len);
        } else if (drow) {
          update_span<false, true>(orow, prow, grow, lrow, lsc, drow + s, dsc, len);
        } else {
          update_span<false, false>(orow, prow, grow, lrow, lsc, drow, dsc, len);
        }
        lo += len;
      }
      begin = offsets[i + 1];
    }
  });
}

std::vector<Tensor> fast_weight_update_cpu(
    at::TensorList params, at::TensorList grads, at::TensorList lrs, at::TensorList decays, double lr,
    double decay) {
  const auto plans = plan_fast_weight_update(params, grads, lrs, decays);
  if (plans.empty()) return {};
  const auto out = empty_like_many(grads);
  const auto p = contiguous(params), g = contiguous(grads), l = contiguous(lrs), d = contiguous(decays);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grads[0].scalar_type(), "fast_weight_update_cpu", [&] {
    forward_kernel<scalar_t>(plans, out, p, g, l, d, lr, decay);
  });
  return out;
}

// Columns (elements of S) per backward work unit; each unit walks all T tasks of its columns.
constexpr int64_t kMaxBlockCols = 4096;

// Tasks [task0, task1) x columns [col0, col1) of one tensor. Jobs that sum over tasks span all tasks and at most
// block_cols columns (the width of the per-column accumulators).
struct BwdJob {
  size_t tensor;
  int64_t task0, task1, col0, col1;
  bool sums;
};

template <typename scalar_t>
void backward_kernel(
    const std::vector<FwuPlan>& plans, const std::array<bool, 4>& mask, const std::vector<Tensor>& go,
    const std::vector<Tensor>& p, const std::vector<Tensor>& g, const std::vector<Tensor>& l,
    const std::vector<Tensor>& d, double lr, double decay, const std::vector<Tensor>& gp,
    const std::vector<Tensor>& gg, const std::vector<Tensor>& gl, const std::vector<Tensor>& gd) {
  using acc_t = at::opmath_type<scalar_t>;
  const size_t n = plans.size();
  if (n == 0) return;
  const int64_t T = plans[0].tasks;
  const int64_t block_cols = std::max<int64_t>(64, std::min<int64_t>(kMaxBlockCols, kGrain / std::max<int64_t>(T, 1)));
  const bool need_p = mask[0], need_g = mask[1], need_l = mask[2] && !l.empty(), need_d = mask[3] && !d.empty();
  std::vector<BwdJob> jobs;
  for (size_t i = 0; i < n; ++i) {
    const FwuPlan& pl = plans[i];
    const int64_t S = pl.numel;
    const bool sums_over_tasks = (need_p && pl.shared) || (need_l && pl.lr != Bcast::PerTaskElement) ||
        (need_d && pl.decay != Bcast::PerTaskElement);
    if (sums_over_tasks) {  // column blocks, each over all tasks
      for (int64_t c = 0; c < S; c += block_cols) jobs.push_back({i, 0, T, c, std::min(S, c + block_cols), true});
    } else if (S >= kGrain) {  // elementwise, long rows: pieces of one row
      for (int64_t t = 0; t < T; ++t)
        for (int64_t c = 0; c < S; c += kGrain) jobs.push_back({i, t, t + 1, c, std::min(S, c + kGrain), false});
    } else if (S > 0) {  // elementwise, short rows: whole consecutive rows, contiguous in memory
      const int64_t rows = std::max<int64_t>(1, kGrain / S);
      for (int64_t t = 0; t < T; t += rows) jobs.push_back({i, t, std::min(T, t + rows), 0, S, false});
    }
  }
  // Per-job partial sums of scalar (0-d) lr and decay gradients, added in job order: deterministic.
  std::vector<acc_t> lr_part(jobs.size(), acc_t(0)), decay_part(jobs.size(), acc_t(0));
  const int64_t grain = 1;  // jobs hold about kGrain elements each
  at::parallel_for(0, static_cast<int64_t>(jobs.size()), grain, [&](int64_t jb, int64_t je) {
    std::vector<acc_t> acc_p(block_cols), acc_l(block_cols), acc_d(block_cols);
    for (int64_t j = jb; j < je; ++j) {
      const BwdJob& job = jobs[j];
      const FwuPlan& pl = plans[job.tensor];
      const size_t i = job.tensor;
      const int64_t S = pl.numel, c0 = job.col0, w = job.col1 - job.col0;
      const scalar_t* gop = go[i].const_data_ptr<scalar_t>();
      const scalar_t* pp = p[i].const_data_ptr<scalar_t>();
      const scalar_t* gpp = g[i].const_data_ptr<scalar_t>();
      const scalar_t* lp = l.empty() ? nullptr : l[i].const_data_ptr<scalar_t>();
      const scalar_t* dp = d.empty() ? nullptr : d[i].const_data_ptr<scalar_t>();
      const acc_t lsc = pl.lr == Bcast::Scalar ? (lp ? static_cast<acc_t>(*lp) : static_cast<acc_t>(lr)) : acc_t(0);
      const acc_t dsc =
          pl.decay == Bcast::Scalar ? (dp ? static_cast<acc_t>(*dp) : static_cast<acc_t>(decay)) : acc_t(0);
      if (job.sums) {
        TORCH_INTERNAL_ASSERT(w <= block_cols);
        std::fill(acc_p.begin(), acc_p.begin() + w, acc_t(0));
        std::fill(acc_l.begin(), acc_l.begin() + w, acc_t(0));
        std::fill(acc_d.begin(), acc_d.begin() + w, acc_t(0));
      }
      acc_t sum_l = 0, sum_d = 0;
      for (int64_t t = job.task0; t < job.task1; ++t) {
        const int64_t row = t * S + c0;
        const scalar_t* go_r = gop + row;
        const scalar_t* p_r = (pl.shared ? pp + c0 : pp + row);
        const scalar_t* g_r = gpp + row;
        const scalar_t* l_r = lp ? coef_row(lp, pl.lr, t, S) : nullptr;
        const scalar_t* d_r = dp ? coef_row(dp, pl.decay, t, S) : nullptr;
        if (l_r) l_r += c0;
        if (d_r) d_r += c0;
        if (need_g) scale_row(gg[i].data_ptr<scalar_t>() + row, l_r, lsc, acc_t(-1), go_r, w);
        if (need_p) {
          if (pl.shared) {
            accumulate_row(acc_p.data(), d_r, dsc, acc_t(1), go_r, w);
          } else {
            scale_row(gp[i].data_ptr<scalar_t>() + row, d_r, dsc, acc_t(1), go_r, w);
          }
        }
        if (need_l) {
          if (pl.lr == Bcast::PerTaskElement) {
            scale_row(gl[i].data_ptr<scalar_t>() + row, g_r, acc_t(0), acc_t(-1), go_r, w);
          } else {
            accumulate_row(acc_l.data(), g_r, acc_t(0), acc_t(-1), go_r, w);
          }
        }
        if (need_d) {
          if (pl.decay == Bcast::PerTaskElement) {
            scale_row(gd[i].data_ptr<scalar_t>() + row, p_r, acc_t(0), acc_t(1), go_r, w);
          } else {
            accumulate_row(acc_d.data(), p_r, acc_t(0), acc_t(1), go_r, w);
          }
        }
      }
      if (need_p && pl.shared) {
        scalar_t* out = gp[i].data_ptr<scalar_t>() + c0;
        for (int64_t k = 0; k < w; ++k) out[k] = static_cast<scalar_t>(acc_p[k]);
      }
      if (need_l && pl.lr != Bcast::PerTaskElement) {
        if (pl.lr == Bcast::PerElement) {
          scalar_t* out = gl[i].data_ptr<scalar_t>() + c0;
          for (int64_t k = 0; k < w; ++k) out[k] = static_cast<scalar_t>(acc_l[k]);
        } else {
          for (int64_t k = 0; k < w; ++k) sum_l += acc_l[k];
        }
      }
      if (need_d && pl.decay != Bcast::PerTaskElement) {
        if (pl.decay == Bcast::PerElement) {
          scalar_t* out = gd[i].data_ptr<scalar_t>() + c0;
          for (int64_t k = 0; k < w; ++k) out[k] = static_cast<scalar_t>(acc_d[k]);
        } else {
          for (int64_t k = 0; k < w; ++k) sum_d += acc_d[k];
        }
      }
      lr_part[j] = sum_l;
      decay_part[j] = sum_d;
    }
  });
  // Scalar lr/decay gradients: sum of the job partials, in job order. Zero-size tensors sum to 0.
  std::vector<acc_t> tot_l(n, acc_t(0)), tot_d(n, acc_t(0));
  for (size_t j = 0; j < jobs.size(); ++j) {
    tot_l[jobs[j].tensor] += lr_part[j];
    tot_d[jobs[j].tensor] += decay_part[j];
  }
  for (size_t i = 0; i < n; ++i) {
    if (need_l && plans[i].lr == Bcast::Scalar) *gl[i].data_ptr<scalar_t>() = static_cast<scalar_t>(tot_l[i]);
    if (need_d && plans[i].decay == Bcast::Scalar) *gd[i].data_ptr<scalar_t>() = static_cast<scalar_t>(tot_d[i]);
  }
}

BackwardLists fast_weight_update_backward_cpu(
    at::TensorList grad_outs, at::TensorList params, at::TensorList grads, at::TensorList lrs,
    at::TensorList decays, double lr, double decay, std::array<bool, 4> mask) {
  BackwardLists out;
  const auto plans = plan_fast_weight_update_backward(grad_outs, params, grads, lrs, decays, mask, out);
  // named references, not a structured binding: the dispatch lambda captures them (C++20 to capture a binding)
  auto &gp = std::get<0>(out), &gg = std::get<1>(out), &gl = std::get<2>(out), &gd = std::get<3>(out);
  if (plans.empty()) return out;
  const auto go = contiguous(grad_outs), p = contiguous(params), g = contiguous(grads), l = contiguous(lrs),
             d = contiguous(decays);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grads[0].scalar_type(), "fast_weight_update_backward_cpu",
      [&] { backward_kernel<scalar_t>(plans, mask, go, p, g, l, d, lr, decay, gp, gg, gl, gd); });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmeta, CPU, m) {
  m.impl("fast_weight_update", &fast_weight_update_cpu);
  m.impl("fast_weight_update_backward", &fast_weight_update_backward_cpu);
}

}  // namespace fastmeta
