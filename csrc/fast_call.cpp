// fused_resnet._C.call: the package's own operators called from Python without torch.ops' argument
// parsing. A torch.ops call checks every argument for __torch_function__ overrides and builds its stack
// through the schema's generic converters: ~30K instructions for the replayed convolution's 23 arguments,
// more than the replay itself. The calls the package makes per block (the Triton backend's replayed
// convolutions, block_train) pass plain tensors, numbers, dtypes and lists of them: those are converted
// here directly and the operator is called through the dispatcher (callBoxed: autograd, dispatch modes and
// the profiler's record functions as for torch.ops). Anything else -- a tensor subclass, an active torch
// function mode, keyword arguments, an argument of another kind -- declines: the operator's Python object
// takes the call as before.
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/Dtype.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <deque>
#include <mutex>
#include <string>

#include "fast_call.h"

namespace fused_resnet {
namespace {

struct Callee {
  c10::OperatorHandle op;
  PyObject* fallback;  // the operator's Python object (owned; callees live as long as the process)
  size_t nargs;
};

std::mutex callees_mutex;
// A deque keeps its elements in place as it grows; never destroyed (the handles outlive interpreter exit).
std::deque<Callee>* callees = new std::deque<Callee>();

PyTypeObject* parameter_type = nullptr;  // torch.nn.Parameter: its __torch_function__ is the disabled one

// A tensor as torch.ops would pass it: torch.Tensor or nn.Parameter exactly (no override to consult).
bool plain_tensor(PyObject* o) {
  PyTypeObject* t = Py_TYPE(o);
  return t == reinterpret_cast<PyTypeObject*>(THPVariableClass) || t == parameter_type;
}

bool to_tensor(PyObject* o, at::Tensor& out) {
  if (!plain_tensor(o)) return false;
  out = THPVariable_Unpack(o);
  return true;
}

// One argument into `out` by its schema type; false where this converter does not take it (the caller
// declines the whole call).
bool to_ivalue(PyObject* o, const c10::Argument& arg, c10::IValue& out) {
  const c10::TypePtr& type = arg.real_type();
  switch (type->kind()) {
    case c10::TypeKind::TensorType: {
      at::Tensor t;
      if (!to_tensor(o, t)) return false;
      out = std::move(t);
      return true;
    }
    case c10::TypeKind::OptionalType: {
      if (o == Py_None) {
        out = c10::IValue();
        return true;
      }
      if (type->expectRef<c10::OptionalType>().getElementType()->kind() != c10::TypeKind::TensorType) return false;
      at::Tensor t;
      if (!to_tensor(o, t)) return false;
      out = std::move(t);
      return true;
    }
    case c10::TypeKind::ScalarTypeType:
      if (!THPDtype_Check(o)) return false;
      out = static_cast<int64_t>(reinterpret_cast<THPDtype*>(o)->scalar_type);
      return true;
    case c10::TypeKind::IntType:  // an int or a bool, as torch.ops takes them
      if (!PyLong_Check(o)) return false;
      out = static_cast<int64_t>(PyLong_AsLongLong(o));
      return !PyErr_Occurred();
    case c10::TypeKind::FloatType:
      if (PyFloat_CheckExact(o)) {
        out = PyFloat_AS_DOUBLE(o);
        return true;
      }
      if (!PyLong_CheckExact(o)) return false;
      out = PyLong_AsDouble(o);
      return !PyErr_Occurred();
    case c10::TypeKind::BoolType:
      if (o != Py_True && o != Py_False) return false;
      out = o == Py_True;
      return true;
    case c10::TypeKind::StringType: {
      if (!PyUnicode_CheckExact(o)) return false;
      Py_ssize_t size = 0;
      const char* data = PyUnicode_AsUTF8AndSize(o, &size);
      if (data == nullptr) return false;
      out = std::string(data, static_cast<size_t>(size));
      return true;
    }
    case c10::TypeKind::ListType: {
      if (!PyList_CheckExact(o) && !PyTuple_CheckExact(o)) return false;
      PyObject** items = PySequence_Fast_ITEMS(o);
      const Py_ssize_t n = PySequence_Fast_GET_SIZE(o);
      const c10::TypePtr& elem = type->expectRef<c10::ListType>().getElementType();
      switch (elem->kind()) {
        case c10::TypeKind::TensorType: {
          c10::List<at::Tensor> list;
          list.reserve(n);
          at::Tensor t;
          for (Py_ssize_t i = 0; i < n; ++i) {
            if (!to_tensor(items[i], t)) return false;
            list.push_back(t);
          }
          out = std::move(list);
          return true;
        }
        case c10::TypeKind::OptionalType: {
          if (elem->expectRef<c10::OptionalType>().getElementType()->kind() != c10::TypeKind::TensorType) return false;
          c10::List<std::optional<at::Tensor>> list;
          list.reserve(n);
          at::Tensor t;
          for (Py_ssize_t i = 0; i < n; ++i) {
            if (items[i] == Py_None) {
              list.push_back(std::nullopt);
            } else {
              if (!to_tensor(items[i], t)) return false;
              list.push_back(t);
            }
          }
          out = std::move(list);
          return true;
        }
        case c10::TypeKind::IntType: {
          c10::List<int64_t> list;
          list.reserve(n);
          for (Py_ssize_t i = 0; i < n; ++i) {
            if (!PyLong_Check(items[i])) return false;
            list.push_back(PyLong_AsLongLong(items[i]));
          }
          out = std::move(list);
          return !PyErr_Occurred();
        }
        case c10::TypeKind::FloatType: {
          c10::List<double> list;
          list.reserve(n);
          for (Py_ssize_t i = 0; i < n; ++i) {
            if (PyFloat_CheckExact(items[i]))
              list.push_back(PyFloat_AS_DOUBLE(items[i]));
            else if (PyLong_CheckExact(items[i]))
              list.push_back(PyLong_AsDouble(items[i]));
            else
              return false;
          }
          out = std::move(list);
          return !PyErr_Occurred();
        }
        default:
          return false;
      }
    }
    default:
      return false;
  }
}

PyObject* wrap(c10::IValue& v) {
  if (v.isTensor()) return THPVariable_Wrap(std::move(v).toTensor());
  PyErr_SetString(PyExc_TypeError, "fused_resnet._C.call: the operator returned something other than tensors");
  return nullptr;
}

// _C.resolve(name, fallback) -> int: the operator `name` ("fused_resnet::...") and its Python object.
PyObject* resolve(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  const char* name = nullptr;
  PyObject* fallback = nullptr;
  if (!PyArg_ParseTuple(args, "sO", &name, &fallback)) return nullptr;
  const std::string full(name);
  const auto sep = full.find("::");
  TORCH_CHECK(sep != std::string::npos, "fused_resnet._C.resolve: expected namespace::name, got ", full);
  const auto handle = c10::Dispatcher::singleton().findSchema({full, ""});
  TORCH_CHECK(handle.has_value(), "fused_resnet._C.resolve: no operator ", full);
  if (parameter_type == nullptr) {
    PyObject* module = PyImport_ImportModule("torch.nn.parameter");
    if (module == nullptr) return nullptr;
    PyObject* cls = PyObject_GetAttrString(module, "Parameter");
    Py_DECREF(module);
    if (cls == nullptr) return nullptr;
    parameter_type = reinterpret_cast<PyTypeObject*>(cls);  // kept: a class lives as long as its module
  }
  Py_INCREF(fallback);
  std::lock_guard<std::mutex> lock(callees_mutex);
  callees->push_back({*handle, fallback, handle->schema().arguments().size()});
  return PyLong_FromSize_t(callees->size() - 1);
  END_HANDLE_TH_ERRORS
}

// _C.call(index, *args, **kwargs): the resolved operator called with args, or its fallback where declined.
PyObject* call(PyObject*, PyObject* args, PyObject* kwargs) {
  HANDLE_TH_ERRORS
  const Py_ssize_t n = PyTuple_GET_SIZE(args);
  if (n < 1 || !PyLong_CheckExact(PyTuple_GET_ITEM(args, 0))) {
    PyErr_SetString(PyExc_TypeError, "fused_resnet._C.call(index, *args): index from _C.resolve");
    return nullptr;
  }
  const size_t index = PyLong_AsSize_t(PyTuple_GET_ITEM(args, 0));
  if (PyErr_Occurred()) return nullptr;
  const Callee* c = nullptr;
  {
    std::lock_guard<std::mutex> lock(callees_mutex);
    if (index < callees->size()) c = &(*callees)[index];
  }
  if (c == nullptr) {
    PyErr_SetString(PyExc_IndexError, "fused_resnet._C.call: no such operator (resolve it first)");
    return nullptr;
  }
  const auto& schema = c->op.schema();
  torch::jit::Stack stack;
  bool take = (kwargs == nullptr || PyDict_GET_SIZE(kwargs) == 0) && static_cast<size_t>(n - 1) == c->nargs &&
              !at::impl::torch_function_mode_enabled();
  if (take) {
    stack.resize(c->nargs);
    for (size_t i = 0; i < c->nargs && take; ++i)
      take = to_ivalue(PyTuple_GET_ITEM(args, static_cast<Py_ssize_t>(i + 1)), schema.arguments()[i], stack[i]);
  }
  if (!take) {
    PyErr_Clear();  // a failed conversion's error: the fallback raises its own
    PyObject* rest = PyTuple_GetSlice(args, 1, n);
    if (rest == nullptr) return nullptr;
    PyObject* out = PyObject_Call(c->fallback, rest, kwargs);
    Py_DECREF(rest);
    return out;
  }
  c->op.callBoxed(stack);
  if (stack.size() == 1) return wrap(stack[0]);
  PyObject* out = PyTuple_New(static_cast<Py_ssize_t>(stack.size()));
  if (out == nullptr) return nullptr;
  for (size_t i = 0; i < stack.size(); ++i) {
    PyObject* item = wrap(stack[i]);
    if (item == nullptr) {
      Py_DECREF(out);
      return nullptr;
    }
    PyTuple_SET_ITEM(out, static_cast<Py_ssize_t>(i), item);
  }
  return out;
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"resolve", resolve, METH_VARARGS,
     "resolve(name, fallback) -> int: an operator for call(), and the callable that takes declined calls"},
    {"call", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(call)), METH_VARARGS | METH_KEYWORDS,
     "call(index, *args): the operator called with plain tensors, numbers, dtypes and lists of them without "
     "torch.ops' argument parsing; anything else goes to the fallback"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

PyMethodDef* fast_call_methods() { return methods; }

}  // namespace fused_resnet
