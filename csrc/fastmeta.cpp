// Every fastmeta schema, defined once, and the Python module stub that loads them.
#include <Python.h>
#include <torch/library.h>

// Importing fastmeta._C runs the static registrations below and in the kernel files.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "fastmeta's compiled kernels", -1, nullptr};
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) return nullptr;
#ifdef FASTMETA_WITH_CUDA
  PyModule_AddIntConstant(m, "with_cuda", 1);
#else
  PyModule_AddIntConstant(m, "with_cuda", 0);
#endif
  return m;
}

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
}
