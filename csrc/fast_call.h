// fused_resnet._C's Python functions (fast_call.cpp): resolve and call, the package's operators called
// without torch.ops' argument parsing.
#pragma once

#include <Python.h>

namespace fused_resnet {

PyMethodDef* fast_call_methods();

}  // namespace fused_resnet
