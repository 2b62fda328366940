// Shared input checks and planning for fastmeta's ops. Device-agnostic: included by the CPU and CUDA kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <ATen/ops/empty.h>

#include "alloc.h"

#include <array>
#include <sstream>
#include <tuple>
#include <vector>

namespace fastmeta {

// How a coefficient (lr or decay) of one parameter broadcasts over its update of shape (T, *S).
enum class Bcast : int { Scalar = 0, PerElement = 1, PerTaskElement = 2 };

// Plan for one parameter tensor of fast_weight_update.
struct FwuPlan {
  int64_t tasks = 0;  // T
  int64_t numel = 0;  // prod(S): elements of one task's parameter
  bool shared = false;  // params[i] has shape S (shared over the tasks), not (T, *S)
  Bcast lr = Bcast::Scalar;
  Bcast decay = Bcast::Scalar;
};

inline std::string shape_str(c10::IntArrayRef s) {
  std::ostringstream os;
  os << s;
  return os.str();
}

// dtype as Python spells it, so that messages read the same from the kernels and the reference.
inline std::string dtype_str(c10::ScalarType t) {
  switch (t) {
    case c10::kFloat: return "torch.float32";
    case c10::kDouble: return "torch.float64";
    case c10::kHalf: return "torch.float16";
    case c10::kBFloat16: return "torch.bfloat16";
    case c10::kLong: return "torch.int64";
    case c10::kInt: return "torch.int32";
    default: return std::string("torch.") + c10::toString(t);
  }
}

inline bool is_supported_float(c10::ScalarType t) {
  return t == c10::kFloat || t == c10::kDouble || t == c10::kHalf || t == c10::kBFloat16;
}

// Checks that `t` (argument `name`, index `i`) has dtype and device of the reference tensor.
inline void check_like(
    const at::Tensor& t, const char* name, size_t i, const at::Tensor& ref, const char* op) {
  TORCH_CHECK(t.defined(), op, ": ", name, "[", i, "] is undefined");
  TORCH_CHECK_TYPE(
      t.scalar_type() == ref.scalar_type(), op, ": ", name, "[", i, "] has dtype ", dtype_str(t.scalar_type()),
      " but grads[0] has dtype ", dtype_str(ref.scalar_type()), "; all tensors must share one dtype");
  TORCH_CHECK(
      t.device() == ref.device(), op, ": ", name, "[", i, "] is on ", t.device(), " but grads[0] is on ",
      ref.device(), "; all tensors must be on one device");
}

// How coefficient `c` (argument `name`, index `i`) broadcasts over a (T, *S) update.
inline Bcast classify_coef(const at::Tensor& c, const at::Tensor& g, const char* name, size_t i, const char* op) {
  if (c.dim() == 0) return Bcast::Scalar;
  if (c.sizes() == g.sizes().slice(1)) return Bcast::PerElement;
  if (c.sizes() == g.sizes()) return Bcast::PerTaskElement;
  TORCH_CHECK_VALUE(
      false, op, ": ", name, "[", i, "] has shape ", shape_str(c.sizes()), "; expected [] (one value), ",
      shape_str(g.sizes().slice(1)), " (per element) or ", shape_str(g.sizes()), " (per task and element)");
}

// Validates the arguments of fast_weight_update(_backward) and returns one plan per parameter.
// params[i]: (T, *S_i) or S_i; grads[i]: (T, *S_i); lrs/decays: empty (scalar for all) or one tensor per
// parameter of shape [], S_i or (T, *S_i). All tensors share the dtype and device of grads[0].
inline std::vector<FwuPlan> plan_fast_weight_update(
    at::TensorList params, at::TensorList grads, at::TensorList lrs, at::TensorList decays,
    const char* op = "fast_weight_update") {
  const size_t n = params.size();
  TORCH_CHECK_VALUE(
      grads.size() == n, op, ": params and grads must have the same length, got ", n, " and ", grads.size());
  TORCH_CHECK_VALUE(
      lrs.empty() || lrs.size() == n, op, ": lr must be a number or have one entry per parameter (", n,
      "), got ", lrs.size());
  TORCH_CHECK_VALUE(
      decays.empty() || decays.size() == n, op, ": decay must be None, a number or have one entry per parameter (",
      n, "), got ", decays.size());
  std::vector<FwuPlan> plans(n);
  if (n == 0) return plans;
  const at::Tensor& ref = grads[0];
  TORCH_CHECK(ref.defined(), op, ": grads[0] is undefined");
  TORCH_CHECK_TYPE(
      is_supported_float(ref.scalar_type()), op, ": grads[0] has dtype ", dtype_str(ref.scalar_type()),
      "; supported: float32, float64, float16, bfloat16");
  TORCH_CHECK_VALUE(ref.dim() >= 1, op, ": grads[0] must have a leading task dimension T, got a 0-d tensor");
  const int64_t T = ref.size(0);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& g = grads[i];
    const at::Tensor& p = params[i];
    check_like(g, "grads", i, ref, op);
    check_like(p, "params", i, ref, op);
    TORCH_CHECK_VALUE(
        g.dim() >= 1 && g.size(0) == T, op, ": grads[", i, "] has shape ", shape_str(g.sizes()),
        " but grads[0] has T=", T, " tasks; every grads[i] must have shape (T, *S_i)");
    FwuPlan& plan = plans[i];
    plan.tasks = T;
    plan.numel = T == 0 ? c10::multiply_integers(g.sizes().slice(1)) : g.numel() / T;
    if (p.sizes() == g.sizes()) {
      plan.shared = false;
    } else if (p.sizes() == g.sizes().slice(1)) {
      plan.shared = true;
    } else {
      TORCH_CHECK_VALUE(
          false, op, ": params[", i, "] has shape ", shape_str(p.sizes()), " but grads[", i, "] has shape ",
          shape_str(g.sizes()), "; expected params[", i, "] of shape ", shape_str(g.sizes()), " (per task) or ",
          shape_str(g.sizes().slice(1)), " (shared)");
    }
    if (!lrs.empty()) {
      check_like(lrs[i], "lr", i, ref, op);
      plan.lr = classify_coef(lrs[i], g, "lr", i, op);
    }
    if (!decays.empty()) {
      check_like(decays[i], "decay", i, ref, op);
      plan.decay = classify_coef(decays[i], g, "decay", i, op);
    }
  }
  return plans;
}

using BackwardLists =
    std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>;

// Validates the arguments of fast_weight_update_backward (grad_outs[i] shaped like grads[i]), returns the plans
// and allocates the gradients that `mask` asks for: of params, grads, lrs and decays (empty lists otherwise).
inline std::vector<FwuPlan> plan_fast_weight_update_backward(
    at::TensorList grad_outs, at::TensorList params, at::TensorList grads, at::TensorList lrs,
    at::TensorList decays, const std::array<bool, 4>& mask, BackwardLists& out) {
  const char* op = "fast_weight_update_backward";
  auto plans = plan_fast_weight_update(params, grads, lrs, decays, op);
  TORCH_CHECK_VALUE(
      grad_outs.size() == grads.size(), op, ": grad_outs has ", grad_outs.size(), " entries, expected ",
      grads.size());
  for (size_t i = 0; i < grads.size(); ++i) {
    check_like(grad_outs[i], "grad_outs", i, grads[0], op);
    TORCH_CHECK_VALUE(
        grad_outs[i].sizes() == grads[i].sizes(), op, ": grad_outs[", i, "] has shape ",
        shape_str(grad_outs[i].sizes()), ", expected ", shape_str(grads[i].sizes()));
  }
  // The requested gradients, in one allocation (see alloc.h).
  const std::array<at::TensorList, 4> likes = {params, grads, lrs, decays};
  std::vector<c10::IntArrayRef> sizes;
  for (size_t k = 0; k < 4; ++k)
    if (mask[k])
      for (const auto& t : likes[k]) sizes.push_back(t.sizes());
  if (sizes.empty()) return plans;
  auto all = empty_many(sizes, grads[0].scalar_type(), grads[0].device());
  auto next = all.begin();
  std::array<std::vector<at::Tensor>*, 4> lists = {&std::get<0>(out), &std::get<1>(out), &std::get<2>(out), &std::get<3>(out)};
  for (size_t k = 0; k < 4; ++k)
    if (mask[k]) {
      lists[k]->assign(std::make_move_iterator(next), std::make_move_iterator(next + likes[k].size()));
      next += static_cast<std::ptrdiff_t>(likes[k].size());
    }
  return plans;
}

// ------------------------------------------------------------------------------------------- contrastive

inline void check_margin_eps(double margin, double eps, const char* op) {
  TORCH_CHECK_VALUE(margin >= 0, op, ": margin must be >= 0, got ", margin);
  TORCH_CHECK_VALUE(eps >= 0, op, ": eps must be >= 0, got ", eps);
}

// x1, x2: (B, D) of one supported float dtype and device; same: (B,) of that dtype (same[b] = 1: one class).
inline void check_pair_inputs(
    const at::Tensor& x1, const at::Tensor& x2, const at::Tensor* same, double margin, double eps, const char* op) {
  TORCH_CHECK_TYPE(
      is_supported_float(x1.scalar_type()), op, ": x1 has dtype ", dtype_str(x1.scalar_type()),
      "; supported: float32, float64, float16, bfloat16");
  TORCH_CHECK_VALUE(x1.dim() == 2, op, ": x1 must have shape (B, D), got ", shape_str(x1.sizes()));
  TORCH_CHECK_VALUE(
      x2.sizes() == x1.sizes(), op, ": x2 has shape ", shape_str(x2.sizes()), " but x1 has shape ",
      shape_str(x1.sizes()));
  TORCH_CHECK_TYPE(
      x2.scalar_type() == x1.scalar_type(), op, ": x2 has dtype ", dtype_str(x2.scalar_type()), " but x1 has dtype ",
      dtype_str(x1.scalar_type()));
  TORCH_CHECK(x2.device() == x1.device(), op, ": x2 is on ", x2.device(), " but x1 is on ", x1.device());
  if (same != nullptr) {
    TORCH_CHECK_VALUE(
        same->dim() == 1 && same->size(0) == x1.size(0), op, ": same has shape ", shape_str(same->sizes()),
        ", expected [", x1.size(0), "] (one label per pair)");
    TORCH_CHECK_TYPE(
        same->scalar_type() == x1.scalar_type(), op, ": same has dtype ", dtype_str(same->scalar_type()),
        " but x1 has dtype ", dtype_str(x1.scalar_type()));
    TORCH_CHECK(same->device() == x1.device(), op, ": same is on ", same->device(), " but x1 is on ", x1.device());
  }
  check_margin_eps(margin, eps, op);
}

// embeddings: (N, D) of a supported float dtype, N >= 2; labels: (N,) int64 on the same device.
inline void check_all_pairs_inputs(
    const at::Tensor& embeddings, const at::Tensor& labels, double margin, double eps, const char* op) {
  TORCH_CHECK_TYPE(
      is_supported_float(embeddings.scalar_type()), op, ": embeddings has dtype ",
      dtype_str(embeddings.scalar_type()), "; supported: float32, float64, float16, bfloat16");
  TORCH_CHECK_VALUE(
      embeddings.dim() == 2, op, ": embeddings must have shape (N, D), got ", shape_str(embeddings.sizes()));
  TORCH_CHECK_VALUE(
      embeddings.size(0) >= 2, op, ": needs at least 2 embeddings to form a pair, got ", embeddings.size(0));
  TORCH_CHECK_VALUE(
      labels.dim() == 1 && labels.size(0) == embeddings.size(0), op, ": labels has shape ",
      shape_str(labels.sizes()), ", expected [", embeddings.size(0), "] (one label per embedding)");
  TORCH_CHECK_TYPE(
      labels.scalar_type() == c10::kLong, op, ": labels has dtype ", dtype_str(labels.scalar_type()),
      ", expected torch.int64");
  TORCH_CHECK(
      labels.device() == embeddings.device(), op, ": labels is on ", labels.device(), " but embeddings is on ",
      embeddings.device());
  check_margin_eps(margin, eps, op);
}

// Contiguous versions of a tensor list (no copy for tensors that already are).
inline std::vector<at::Tensor> contiguous(at::TensorList ts) {
  std::vector<at::Tensor> out;
  out.reserve(ts.size());
  for (const auto& t : ts) out.push_back(t.contiguous());
  return out;
}

}  // namespace fastmeta
