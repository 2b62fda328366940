// Autograd for fast_weight_update, in C++ so that a differentiable call costs no Python overhead.
// Backward runs the fused backward kernel; under create_graph (double backward, torch.func.grad) it runs
// the same formulas as differentiable ATen ops instead, so higher-order gradients are exact.
#include <ATen/ExpandUtils.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/neg.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <array>

#include "../checks.h"

namespace fastmeta {
namespace {

using at::Tensor;
using at::TensorList;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::vector<Tensor> call_forward(
    TensorList params, TensorList grads, TensorList lrs, TensorList decays, double lr, double decay) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastmeta::fast_weight_update", "")
                       .typed<std::vector<Tensor>(TensorList, TensorList, TensorList, TensorList, double, double)>();
  return op.call(params, grads, lrs, decays, lr, decay);
}

BackwardLists call_backward(
    TensorList grad_outs, TensorList params, TensorList grads, TensorList lrs, TensorList decays, double lr,
    double decay, std::array<bool, 4> mask) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastmeta::fast_weight_update_backward", "")
          .typed<BackwardLists(
              TensorList, TensorList, TensorList, TensorList, TensorList, double, double, std::array<bool, 4>)>();
  return op.call(grad_outs, params, grads, lrs, decays, lr, decay, mask);
}

// Slice [begin, begin + len) of a flat list.
std::vector<Tensor> slice(const variable_list& v, size_t begin, size_t len) {
  return std::vector<Tensor>(v.begin() + begin, v.begin() + begin + len);
}

bool any_requires_grad(TensorList ts) {
  for (const auto& t : ts)
    if (t.requires_grad()) return true;
  return false;
}

class FastWeightUpdate : public torch::autograd::Function<FastWeightUpdate> {
 public:
  static variable_list forward(
      AutogradContext* ctx, TensorList params, TensorList grads, TensorList lrs, TensorList decays, double lr,
      double decay) {
    // grads are needed in backward only for d/dlr, params only for d/ddecay (and shapes: see backward).
    // params are kept (the model's or earlier fast weights, alive in the graph anyway): backward needs their shapes.
    const bool save_grads = any_requires_grad(lrs);
    variable_list saved;
    saved.insert(saved.end(), params.begin(), params.end());
    if (save_grads) saved.insert(saved.end(), grads.begin(), grads.end());
    saved.insert(saved.end(), lrs.begin(), lrs.end());
    saved.insert(saved.end(), decays.begin(), decays.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["n"] = static_cast<int64_t>(params.size());
    ctx->saved_data["n_lrs"] = static_cast<int64_t>(lrs.size());
    ctx->saved_data["n_decays"] = static_cast<int64_t>(decays.size());
    ctx->saved_data["save_grads"] = save_grads;
    ctx->saved_data["lr"] = lr;
    ctx->saved_data["decay"] = decay;
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_forward(params, grads, lrs, decays, lr, decay);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outs) {
    const auto n = static_cast<size_t>(ctx->saved_data["n"].toInt());
    const auto n_lrs = static_cast<size_t>(ctx->saved_data["n_lrs"].toInt());
    const auto n_decays = static_cast<size_t>(ctx->saved_data["n_decays"].toInt());
    const bool save_grads = ctx->saved_data["save_grads"].toBool();
    const double lr = ctx->saved_data["lr"].toDouble();
    const double decay = ctx->saved_data["decay"].toDouble();
    const variable_list saved = ctx->get_saved_variables();
    size_t at = 0;
    const auto params = slice(saved, at, n);
    at += n;
    // Without saved grads (no lr needs a gradient), grad_outs stand in for their shapes.
    const auto grads = save_grads ? slice(saved, at, n) : std::vector<Tensor>(grad_outs.begin(), grad_outs.end());
    at += save_grads ? n : 0;
    const auto lrs = slice(saved, at, n_lrs);
    at += n_lrs;
    const auto decays = slice(saved, at, n_decays);

    const std::array<bool, 4> mask = {
        ctx->needs_input_grad({{0, n}}), ctx->needs_input_grad({{n, 2 * n}}),
        n_lrs > 0 && ctx->needs_input_grad({{2 * n, 2 * n + n_lrs}}),
        n_decays > 0 && ctx->needs_input_grad({{2 * n + n_lrs, 2 * n + n_lrs + n_decays}})};

    std::vector<Tensor> gp, gg, gl, gd;
    if (at::GradMode::is_enabled()) {
      // Differentiable path: the same formulas in ATen ops, reduced with sum_to (autograd records them).
      for (size_t i = 0; i < n; ++i) {
        const Tensor& go = grad_outs[i];
        if (mask[0]) {
          Tensor v = n_decays ? at::mul(go, decays[i]) : (decay == 1.0 ? go : at::mul(go, decay));
          gp.push_back(at::sum_to(v, params[i].sym_sizes()));
        }
        if (mask[1]) gg.push_back(n_lrs ? at::neg(at::mul(go, lrs[i])) : at::mul(go, -lr));
        if (mask[2]) gl.push_back(at::sum_to(at::neg(at::mul(go, grads[i])), lrs[i].sym_sizes()));
        if (mask[3]) gd.push_back(at::sum_to(at::mul(go, params[i]), decays[i].sym_sizes()));
      }
    } else {
      // d(new)/d(params) is the identity where params are per task and decay is 1: pass grad_outs through,
      // as torch's own add does, instead of copying them.
      bool identity = mask[0] && n_decays == 0 && decay == 1.0;
      for (size_t i = 0; identity && i < n; ++i) identity = params[i].sizes() == grad_outs[i].sizes();
      std::array<bool, 4> kernel_mask = mask;
      kernel_mask[0] = mask[0] && !identity;
      if (kernel_mask[0] || kernel_mask[1] || kernel_mask[2] || kernel_mask[3])
        std::tie(gp, gg, gl, gd) = call_backward(grad_outs, params, grads, lrs, decays, lr, decay, kernel_mask);
      if (identity) gp.assign(grad_outs.begin(), grad_outs.end());
    }
    variable_list result;
    result.reserve(2 * n + n_lrs + n_decays + 2);
    auto append = [&](const std::vector<Tensor>& g, size_t count, bool needed) {
      for (size_t i = 0; i < count; ++i) result.push_back(needed ? g[i] : Tensor());
    };
    append(gp, n, mask[0]);
    append(gg, n, mask[1]);
    append(gl, n_lrs, mask[2]);
    append(gd, n_decays, mask[3]);
    result.emplace_back();  // lr (float)
    result.emplace_back();  // decay (float)
    return result;
  }
};

std::vector<Tensor> fast_weight_update_autograd(
    TensorList params, TensorList grads, TensorList lrs, TensorList decays, double lr, double decay) {
  if (!at::GradMode::is_enabled() ||
      !(any_requires_grad(params) || any_requires_grad(grads) || any_requires_grad(lrs) ||
        any_requires_grad(decays))) {
    // Nothing to differentiate: skip building a graph node (it costs about 0.5 us per tensor).
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_forward(params, grads, lrs, decays, lr, decay);
  }
  return FastWeightUpdate::apply(params, grads, lrs, decays, lr, decay);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmeta, Autograd, m) {
  m.impl("fast_weight_update", &fast_weight_update_autograd);
}

}  // namespace fastmeta
