// Operator schemas of the fused_resnet extension: one place. Kernels register per device in
// csrc/cpu/*.cpp and csrc/cuda/*.cu.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing fused_resnet._C loads this library, which runs the registrations below; the module itself
// is empty (the ops live in torch.ops.fused_resnet).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fused_resnet, m) {
  // out = act((z - mean[c]) * scale[c] + shift[c] (+ residual)), per channel c; float32 arithmetic; out in
  // out_dtype. Centring first keeps the precision a folded z * scale + shift' loses when |mean| >> std.
  m.def("bn_act(Tensor z, Tensor mean, Tensor scale, Tensor shift, Tensor? residual, bool relu, "
        "ScalarType out_dtype) -> Tensor");
}
