// Every fastmeta schema, defined once, and the Python module fastmeta._C.
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/library.h>

#include <vector>

TORCH_LIBRARY(fastmeta, m) {
  // new[i] = decay_i * params[i] - lr_i * grads[i]. lrs/decays: empty (use the scalar lr/decay for every
  // parameter) or one tensor per parameter, of shape [], S_i or (T, *S_i). params[i]: (T, *S_i) or S_i.
  m.def(
      "fast_weight_update(Tensor[] params, Tensor[] grads, Tensor[] lrs, Tensor[] decays, float lr, "
      "float decay) -> Tensor[]");
  // Gradients of fast_weight_update w.r.t. (params, grads, lrs, decays), each reduced to its input's shape.
  // output_mask selects which of the four lists to compute; the others come back empty.
  m.def(
      "fast_weight_update_backward(Tensor[] grad_outs, Tensor[] params, Tensor[] grads, Tensor[] lrs, "
      "Tensor[] decays, float lr, float decay, bool[4] output_mask) -> (Tensor[], Tensor[], Tensor[], Tensor[])");

  // Row-wise Euclidean distance d_b = sqrt(||x1_b - x2_b||^2 + eps): (B, D), (B, D) -> (B,).
  m.def("pairwise_distance(Tensor x1, Tensor x2, float eps) -> Tensor");
  // Per-pair contrastive loss (Hadsell et al. 2006), same = 1 for a pair of one class:
  // L_b = same_b * d_b^2 + (1 - same_b) * max(0, margin - d_b)^2: (B, D), (B, D), (B,) -> (B,).
  m.def("contrastive_loss(Tensor x1, Tensor x2, Tensor same, float margin, float eps) -> Tensor");
  // Gradients of sum_b grad_b * L_b w.r.t. x1 and x2.
  m.def(
      "contrastive_loss_backward(Tensor grad, Tensor x1, Tensor x2, Tensor same, float margin, float eps) "
      "-> (Tensor, Tensor)");
  // Mean of L over the N(N-1)/2 pairs i < j of embeddings (N, D), same = (labels_i == labels_j): a 0-d tensor.
  // Tiled: memory O(N * D + tile^2), never N x N.
  m.def("contrastive_loss_all_pairs(Tensor embeddings, Tensor labels, float margin, float eps) -> Tensor");
  // Gradient of grad * contrastive_loss_all_pairs w.r.t. embeddings (grad: 0-d), recomputed tile by tile.
  m.def(
      "contrastive_loss_all_pairs_backward(Tensor grad, Tensor embeddings, Tensor labels, float margin, "
      "float eps) -> Tensor");

  // Batch norm's double backward (training mode): the gradients (d_gy, d_x, d_weight) w.r.t. (gy, x, weight) of
  // <ggx, gx> + <ggw, gw> + <ggb, gb>, where (gx, gw, gb) is batch norm's backward at x (N, C, *spatial) for the
  // upstream gradient gy, with the forward's saved mean and rstd (C,). Undefined ggx/ggw/ggb count as zeros, an
  // undefined weight as ones (d_weight is then the gradient w.r.t. those ones); d_weight is (C,) in weight's
  // dtype (x's without one). Not differentiable (fastmeta/reference.py batch_norm_double_backward is).
  m.def(
      "batch_norm_double_backward(Tensor gy, Tensor x, Tensor? weight, Tensor mean, Tensor rstd, Tensor? ggx, "
      "Tensor? ggw, Tensor? ggb) -> (Tensor, Tensor, Tensor)");
}

namespace {

// Tensors of a list or tuple holding only plain tensors (or Parameters); false for anything else.
bool unpack_tensors(PyObject* seq, std::vector<at::Tensor>& out) {
  if (!PyList_Check(seq) && !PyTuple_Check(seq)) return false;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  PyObject** items = PySequence_Fast_ITEMS(seq);
  out.reserve(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (!THPVariable_CheckExact(items[i])) return false;
    out.push_back(THPVariable_Unpack(items[i]));
  }
  return true;
}

// fastmeta._C.fast_weight_update(params, grads, lrs, decays, lr, decay): the op through the dispatcher (so
// autograd, devices and dispatch modes behave as with torch.ops), without torch.ops' per-argument parsing,
// which costs about 0.4 us per tensor. Returns NotImplemented for tensor subclasses or a torch function mode:
// the caller then goes through torch.ops.
PyObject* call_fast_weight_update(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 6) {
    PyErr_SetString(PyExc_TypeError, "fast_weight_update(params, grads, lrs, decays, lr, decay) takes 6 arguments");
    return nullptr;
  }
  if (at::impl::torch_function_mode_enabled()) Py_RETURN_NOTIMPLEMENTED;
  std::vector<at::Tensor> lists[4];
  for (int k = 0; k < 4; ++k)
    if (!unpack_tensors(args[k], lists[k])) Py_RETURN_NOTIMPLEMENTED;
  const double lr = PyFloat_AsDouble(args[4]);
  if (lr == -1.0 && PyErr_Occurred()) return nullptr;
  const double decay = PyFloat_AsDouble(args[5]);
  if (decay == -1.0 && PyErr_Occurred()) return nullptr;
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastmeta::fast_weight_update", "")
                       .typed<std::vector<at::Tensor>(
                           at::TensorList, at::TensorList, at::TensorList, at::TensorList, double, double)>();
  std::vector<at::Tensor> out;
  {
    pybind11::gil_scoped_release no_gil;
    out = op.call(lists[0], lists[1], lists[2], lists[3], lr, decay);
  }
  PyObject* result = PyList_New(static_cast<Py_ssize_t>(out.size()));
  if (result == nullptr) return nullptr;
  for (size_t i = 0; i < out.size(); ++i) {
    PyObject* t = THPVariable_Wrap(std::move(out[i]));
    if (t == nullptr) {
      Py_DECREF(result);
      return nullptr;
    }
    PyList_SET_ITEM(result, static_cast<Py_ssize_t>(i), t);
  }
  return result;
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"fast_weight_update", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(call_fast_weight_update)),
     METH_FASTCALL, "fast_weight_update(params, grads, lrs, decays, lr, decay) through the dispatcher"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

// Importing fastmeta._C also runs the static op registrations of this and the kernel files.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "fastmeta's compiled kernels", -1, methods};
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) return nullptr;
#ifdef FASTMETA_WITH_CUDA
  PyModule_AddIntConstant(m, "with_cuda", 1);
#else
  PyModule_AddIntConstant(m, "with_cuda", 0);
#endif
  return m;
}
