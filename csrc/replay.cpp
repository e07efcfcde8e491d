// Replayer (replay.h): operator calls replayed from C++, the plans recorded by
// fused_resnet/backends/triton/replay.py. Everything here runs holding the GIL: the plans hold Python
// objects (Triton's compiled launchers), and a replayed launch is a call of one.
#include "replay.h"

#include <Python.h>
#include <torch/csrc/Dtype.h>

#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>
#include <c10/util/hash.h>

#include <bit>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <type_traits>
#include <unordered_map>
#include <vector>

namespace fused_resnet {
namespace {

struct Gil {
  PyGILState_STATE state = PyGILState_Ensure();
  ~Gil() { PyGILState_Release(state); }
};

// An owned reference, released only while the GIL is held (a plan dies in Replayer::call or never: the
// cache outlives the interpreter, whose objects must not be touched at exit).
struct Ref {
  PyObject* p = nullptr;
  Ref() = default;
  explicit Ref(PyObject* o) : p(o) {}
  Ref(const Ref&) = delete;
  Ref& operator=(const Ref&) = delete;
  ~Ref() { Py_XDECREF(p); }
};

[[noreturn]] void python_error(const char* what) {
  PyObject *type = nullptr, *value = nullptr, *trace = nullptr;
  PyErr_Fetch(&type, &value, &trace);
  std::string message = "unknown error";
  if (type != nullptr) message = reinterpret_cast<PyTypeObject*>(type)->tp_name;
  if (value != nullptr) {
    if (PyObject* s = PyObject_Str(value)) {
      if (const char* c = PyUnicode_AsUTF8(s); c != nullptr && *c != 0) message += std::string(": ") + c;
      Py_DECREF(s);
    }
  }
  Py_XDECREF(type);
  Py_XDECREF(value);
  Py_XDECREF(trace);
  PyErr_Clear();
  TORCH_CHECK(false, "fused_resnet (Triton replay): ", what, ": ", message);
}

std::vector<int64_t> ints(PyObject* tuple) {
  std::vector<int64_t> v(PyTuple_GET_SIZE(tuple));
  for (size_t i = 0; i < v.size(); ++i) v[i] = PyLong_AsLongLong(PyTuple_GET_ITEM(tuple, i));
  return v;
}

at::ScalarType dtype_of(PyObject* o) {
  TORCH_CHECK(THPDtype_Check(o), "fused_resnet (Triton replay): a plan's dtype is not a torch.dtype");
  return reinterpret_cast<THPDtype*>(o)->scalar_type;
}

// A call's small buffers (per-tile statistics, per-channel vectors) share one allocation: an allocation costs
// a call more host time than carving tensors out of one. Each starts at a multiple of kPoolAlign bytes (the
// launches' pointers were specialised on 16-byte alignment; the allocator's own blocks are 512-aligned).
// Larger buffers -- activations -- keep allocations of their own, so none outlives its own last use.
constexpr int64_t kPoolMaxBytes = 64 << 10;
constexpr int64_t kPoolAlign = 256;

// A plan, as replay.py's _Capture.plan() gives it; the PyObject pointers are borrowed from `source`.
struct Plan {
  enum Kind { kInput = 0, kAllocation = 1, kValue = 2 };
  struct Arg {
    int kind;
    int64_t index, offset;  // an input's stack index or an allocation's, and a byte offset
    PyObject* value;        // kValue
  };
  // Called as (grid, stream, function, *head, metadata, None, enter hook, exit hook, *mid, then the kernel's
  // arguments and tail, as one tuple when packed): replay.py's _callee says which callee takes which form.
  struct Launch {
    PyObject *callee, *head, *mid;
    bool packed;
    PyObject *function, *metadata, *tail;
    int64_t grid[3];
    std::vector<Arg> args;
  };
  struct Alloc {
    std::vector<int64_t> sizes, strides;
    at::ScalarType dtype;
    int64_t pool_offset;  // a small buffer's byte offset in the call's pool; -1: an allocation of its own
  };
  struct Out {
    int kind;  // kAllocation: a view of allocation `index`; kValue: an empty tensor of its own
    int64_t index, offset;
    std::vector<int64_t> sizes, strides;
    at::ScalarType dtype;
  };

  Ref source;  // None: this key's calls cannot be replayed
  std::vector<Alloc> allocs;
  int64_t pool_bytes = 0;  // the small buffers', in one allocation per call
  bool pooled = false;     // whether there is one (an empty buffer counts: its tensor needs a storage)
  std::vector<Out> outs;
  std::vector<Launch> launches;

  bool replayable() const { return source.p != Py_None; }

  explicit Plan(PyObject* p) : source(p) {
    if (p == Py_None) return;
    PyObject* a = PyTuple_GET_ITEM(p, 0);
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(a); ++i) {
      PyObject* e = PyTuple_GET_ITEM(a, i);
      Alloc alloc{ints(PyTuple_GET_ITEM(e, 0)), ints(PyTuple_GET_ITEM(e, 1)), dtype_of(PyTuple_GET_ITEM(e, 2)), -1};
      TORCH_CHECK(alloc.sizes.size() == alloc.strides.size(), "fused_resnet (Triton replay): a malformed plan");
      const int64_t nbytes = static_cast<int64_t>(
          at::detail::computeStorageNbytes(alloc.sizes, alloc.strides, c10::elementSize(alloc.dtype)));
      if (nbytes <= kPoolMaxBytes) {
        alloc.pool_offset = pool_bytes;
        pool_bytes += (nbytes + kPoolAlign - 1) / kPoolAlign * kPoolAlign;
        pooled = true;
      }
      allocs.push_back(std::move(alloc));
    }
    PyObject* o = PyTuple_GET_ITEM(p, 1);
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(o); ++i) {
      PyObject* e = PyTuple_GET_ITEM(o, i);
      outs.push_back({static_cast<int>(PyLong_AsLong(PyTuple_GET_ITEM(e, 0))),
                      PyLong_AsLongLong(PyTuple_GET_ITEM(e, 1)), PyLong_AsLongLong(PyTuple_GET_ITEM(e, 2)),
                      ints(PyTuple_GET_ITEM(e, 3)), ints(PyTuple_GET_ITEM(e, 4)), dtype_of(PyTuple_GET_ITEM(e, 5))});
    }
    PyObject* l = PyTuple_GET_ITEM(p, 2);
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(l); ++i) {
      PyObject* e = PyTuple_GET_ITEM(l, i);
      TORCH_CHECK(PyTuple_GET_SIZE(e) == 11 && PyTuple_Check(PyTuple_GET_ITEM(e, 1)) &&
                      PyTuple_Check(PyTuple_GET_ITEM(e, 2)) && PyTuple_Check(PyTuple_GET_ITEM(e, 6)),
                  "fused_resnet (Triton replay): a malformed launch in a plan");
      Launch launch{PyTuple_GET_ITEM(e, 0),
                    PyTuple_GET_ITEM(e, 1),
                    PyTuple_GET_ITEM(e, 2),
                    PyObject_IsTrue(PyTuple_GET_ITEM(e, 3)) == 1,
                    PyTuple_GET_ITEM(e, 4),
                    PyTuple_GET_ITEM(e, 5),
                    PyTuple_GET_ITEM(e, 6),
                    {PyLong_AsLongLong(PyTuple_GET_ITEM(e, 7)), PyLong_AsLongLong(PyTuple_GET_ITEM(e, 8)),
                     PyLong_AsLongLong(PyTuple_GET_ITEM(e, 9))},
                    {}};
      PyObject* spec = PyTuple_GET_ITEM(e, 10);
      for (Py_ssize_t j = 0; j < PyTuple_GET_SIZE(spec); ++j) {
        PyObject* s = PyTuple_GET_ITEM(spec, j);
        const int kind = static_cast<int>(PyLong_AsLong(PyTuple_GET_ITEM(s, 0)));
        PyObject* what = PyTuple_GET_ITEM(s, 1);
        launch.args.push_back({kind, kind == kValue ? 0 : PyLong_AsLongLong(what),
                               PyLong_AsLongLong(PyTuple_GET_ITEM(s, 2)), kind == kValue ? what : nullptr});
      }
      launches.push_back(std::move(launch));
    }
    TORCH_CHECK(!PyErr_Occurred(), "fused_resnet (Triton replay): a malformed plan");
  }
};

struct KeyHash {
  size_t operator()(const std::vector<int64_t>& k) const {
    size_t h = 0;
    for (int64_t v : k) h = c10::hash_combine(h, std::hash<int64_t>{}(v));
    return h;
  }
};

// Every operator's plans, keyed by the operator (its schema's address) and the call (see key()); null: a key
// called once so far.
constexpr size_t kMaxPlans = 4096;  // a workload of ever new shapes starts afresh
std::mutex plans_mutex;
auto& plans = *new std::unordered_map<std::vector<int64_t>, std::shared_ptr<Plan>, KeyHash>();

// What a launcher's decisions read from the arguments; false for an argument kind it cannot key. `k` is
// cleared first (callers reuse one buffer: no allocation per call once it has grown).
bool key(const c10::OperatorHandle& op, const torch::jit::Stack& stack, int64_t token, std::vector<int64_t>& k) {
  k.clear();
  k.push_back(reinterpret_cast<intptr_t>(&op.schema()));
  k.push_back(token);
  // The tensor arguments seen so far (stack index, the tensor, its bytes [begin, end)): which earlier argument
  // a tensor is, or whose bytes it overlaps, if any. A plan traced each launch argument to one input -- by
  // identity, else by the one input whose bytes hold it -- which stays right for any call whose arguments
  // overlap as the recorded call's did (tensors in one storage but apart, such as a call's outputs carved
  // from one allocation, share nothing).
  struct Seen {
    size_t index;
    const c10::TensorImpl* impl;
    uintptr_t begin, end;
  };
  constexpr size_t kMaxTensors = 32;
  Seen seen[kMaxTensors];
  size_t n_seen = 0;
  for (size_t i = 0; i < stack.size(); ++i) {
    const c10::IValue& v = stack[i];
    if (v.isTensor()) {
      const at::Tensor& t = v.toTensor();
      if (!t.defined()) {
        k.push_back(-1);
        continue;
      }
      if (!t.has_storage()) return false;  // not a plain dense tensor: the operator itself takes the call
      const auto begin = reinterpret_cast<uintptr_t>(t.const_data_ptr());
      const uintptr_t end = t.numel() == 0 ? begin : begin + at::detail::computeStorageNbytes(
                                                                  t.sizes(), t.strides(), t.element_size());
      int64_t shares = -1;
      for (size_t j = 0; j < n_seen && shares < 0; ++j)
        if (seen[j].impl == t.unsafeGetTensorImpl() || (begin < seen[j].end && seen[j].begin < end))
          shares = static_cast<int64_t>(seen[j].index);
      if (n_seen == kMaxTensors) return false;  // more tensors than any primitive takes: not keyed
      seen[n_seen++] = {i, t.unsafeGetTensorImpl(), begin, end};
      k.push_back(1);
      k.push_back(shares);
      k.push_back(static_cast<int64_t>(t.scalar_type()));
      k.push_back(static_cast<int64_t>(t.device().type()));
      k.push_back(t.device().index());
      k.push_back(t.dim());
      k.insert(k.end(), t.sizes().begin(), t.sizes().end());
      k.insert(k.end(), t.strides().begin(), t.strides().end());
      k.push_back(static_cast<int64_t>(reinterpret_cast<uintptr_t>(t.const_data_ptr()) & 15));
    } else if (v.isNone()) {
      k.push_back(0);
    } else if (v.isInt()) {
      k.push_back(2);
      k.push_back(v.toInt());
    } else if (v.isDouble()) {
      k.push_back(3);
      k.push_back(std::bit_cast<int64_t>(v.toDouble()));
    } else if (v.isBool()) {
      k.push_back(4);
      k.push_back(v.toBool());
    } else {
      return false;
    }
  }
  return true;
}

PyObject* address(const at::Tensor& t, int64_t offset) {
  return PyLong_FromUnsignedLongLong(reinterpret_cast<uintptr_t>(t.const_data_ptr()) + offset);
}

// The plan's allocations and launches with this call's tensors; the stack then holds the first `wanted`
// results.
void run(const Plan& plan, torch::jit::Stack& stack, PyObject* gate, size_t wanted) {
  at::Device device(at::kCPU);
  for (const c10::IValue& v : stack)
    if (v.isTensor() && v.toTensor().defined()) {
      device = v.toTensor().device();
      break;
    }
  // The pool: the small buffers, and the storage of empty outputs (none when the plan has no small buffer:
  // then an empty output is an allocation of its own).
  at::Tensor pool;
  if (plan.pooled) pool = at::empty({plan.pool_bytes}, at::TensorOptions().dtype(at::kByte).device(device));
  const c10::DispatchKeySet keys(c10::computeDispatchKey(std::nullopt, at::kStrided, device));
  auto carve = [&](c10::IntArrayRef sizes, c10::IntArrayRef strides, at::ScalarType dtype, int64_t byte_offset) {
    at::Tensor t = at::detail::make_tensor<c10::TensorImpl>(c10::Storage(pool.storage()), keys,
                                                           c10::scalarTypeToTypeMeta(dtype));
    t.unsafeGetTensorImpl()->set_sizes_and_strides(sizes, strides, byte_offset / c10::elementSize(dtype));
    return t;
  };
  std::vector<at::Tensor> allocs;
  allocs.reserve(plan.allocs.size());
  for (const Plan::Alloc& a : plan.allocs)
    allocs.push_back(a.pool_offset >= 0
                         ? carve(a.sizes, a.strides, a.dtype, a.pool_offset)
                         : at::empty_strided(a.sizes, a.strides, at::TensorOptions().dtype(a.dtype).device(device)));
  PyObject *stream = PyTuple_GET_ITEM(gate, 1), *enter = PyTuple_GET_ITEM(gate, 2), *exit = PyTuple_GET_ITEM(gate, 3);
  for (const Plan::Launch& l : plan.launches) {
    const Py_ssize_t n_args = static_cast<Py_ssize_t>(l.args.size()), n_tail = PyTuple_GET_SIZE(l.tail);
    const Py_ssize_t n_head = PyTuple_GET_SIZE(l.head), n_mid = PyTuple_GET_SIZE(l.mid);
    const Py_ssize_t n_kernel = n_args + n_tail, n_front = 9 + n_head + n_mid;
    Ref call(PyTuple_New(n_front + (l.packed ? 1 : n_kernel)));
    PyObject* t = call.p;
    Py_ssize_t at = 0;
    auto put = [&](PyObject* borrowed) {
      Py_INCREF(borrowed);
      PyTuple_SET_ITEM(t, at++, borrowed);
    };
    for (int i = 0; i < 3; ++i) PyTuple_SET_ITEM(t, at++, PyLong_FromLongLong(l.grid[i]));
    put(stream);
    put(l.function);
    for (Py_ssize_t i = 0; i < n_head; ++i) put(PyTuple_GET_ITEM(l.head, i));
    for (PyObject* o : {l.metadata, Py_None, enter, exit}) put(o);
    for (Py_ssize_t i = 0; i < n_mid; ++i) put(PyTuple_GET_ITEM(l.mid, i));
    PyObject* kernel = t;  // the kernel's arguments: in the call itself, or in a tuple of their own
    Py_ssize_t k = at;
    if (l.packed) {
      kernel = PyTuple_New(n_kernel);
      if (kernel == nullptr) python_error("building a launch");
      PyTuple_SET_ITEM(t, at, kernel);
      k = 0;
    }
    for (Py_ssize_t i = 0; i < n_args; ++i) {
      const Plan::Arg& a = l.args[i];
      PyObject* value = a.value;
      if (a.kind == Plan::kInput)
        value = address(stack[a.index].toTensor(), a.offset);
      else if (a.kind == Plan::kAllocation)
        value = address(allocs[a.index], a.offset);
      else
        Py_INCREF(value);
      PyTuple_SET_ITEM(kernel, k + i, value);
    }
    for (Py_ssize_t i = 0; i < n_tail; ++i) {
      PyObject* value = PyTuple_GET_ITEM(l.tail, i);
      Py_INCREF(value);
      PyTuple_SET_ITEM(kernel, k + n_args + i, value);
    }
    if (PyErr_Occurred()) python_error("building a launch");
    Ref result(PyObject_Call(l.callee, t, nullptr));
    if (result.p == nullptr) python_error("a launch");
  }
  stack.clear();
  for (const Plan::Out& o : plan.outs) {
    if (stack.size() == wanted) break;
    if (o.kind == Plan::kValue) {  // an empty output
      stack.emplace_back(pool.defined() ? carve(o.sizes, o.strides, o.dtype, 0)
                                        : at::empty_strided(o.sizes, o.strides,
                                                            at::TensorOptions().dtype(o.dtype).device(device)));
      continue;
    }
    // o.offset counts elements from the allocation's first, which a pooled allocation's storage does not start at
    const at::Tensor& a = allocs[o.index];
    const bool whole = o.offset == 0 && a.sizes().equals(o.sizes) && a.strides().equals(o.strides);
    stack.emplace_back(whole ? a : a.as_strided(o.sizes, o.strides, a.storage_offset() + o.offset));
  }
}

// A replay module's functions (gate, begin, end), imported on first use and kept for the process. Holds the GIL.
struct Protocol {
  PyObject *gate, *begin, *end;
};

const Protocol& protocol(const std::string& name) {
  static auto& loaded = *new std::map<std::string, Protocol>();
  auto it = loaded.find(name);
  if (it != loaded.end()) return it->second;
  Ref module(PyImport_ImportModule(name.c_str()));
  if (module.p == nullptr) python_error("importing the replay module");
  Protocol p{};
  for (auto [slot, attr] : {std::pair{&p.gate, "gate"}, {&p.begin, "begin"}, {&p.end, "end"}}) {
    *slot = PyObject_GetAttrString(module.p, attr);
    if (*slot == nullptr) python_error(attr);
  }
  return loaded.emplace(name, p).first->second;
}

// The gate's answer for the scopes alive on this thread (an owned reference), once asked.
thread_local int scope_depth = 0;
thread_local PyObject* scoped_gate = nullptr;

}  // namespace

ReplayScope::ReplayScope() { ++scope_depth; }

ReplayScope::~ReplayScope() {
  if (--scope_depth == 0 && scoped_gate != nullptr) {
    Gil gil;
    Py_CLEAR(scoped_gate);
  }
}

void Replayer::call(const c10::OperatorHandle& op, torch::jit::Stack& stack, size_t wanted) const {
  Gil gil;
  const Protocol& py = protocol(module_);
  PyObject *begin_fn = py.begin, *end_fn = py.end;
  Ref gate;
  if (scope_depth > 0 && scoped_gate != nullptr) {
    Py_INCREF(scoped_gate);
    gate.p = scoped_gate;
  } else {
    gate.p = PyObject_CallNoArgs(py.gate);
    if (gate.p == nullptr) python_error("gate()");
    if (scope_depth > 0) {
      Py_INCREF(gate.p);
      scoped_gate = gate.p;
    }
  }
  thread_local std::vector<int64_t> key_buffer;  // reused: a call allocates nothing for its key
  std::vector<int64_t>& k = key_buffer;
  if (gate.p == Py_None || !key(op, stack, PyLong_AsLongLong(PyTuple_GET_ITEM(gate.p, 0)), k)) {
    op.callBoxed(stack);
    return;
  }
  std::shared_ptr<Plan> plan;
  bool seen = false;
  {
    std::remove_reference_t<decltype(plans)> dropped;  // released after the lock (releasing may run Python)
    std::lock_guard<std::mutex> lock(plans_mutex);
    auto it = plans.find(k);
    seen = it != plans.end();
    if (seen) {
      plan = it->second;
    } else {  // a key's first call only marks it: a workload of ever new shapes never pays for a capture
      if (plans.size() >= kMaxPlans) plans.swap(dropped);
      plans.emplace(k, nullptr);
    }
  }
  if (!seen) {
    op.callBoxed(stack);
    return;
  }
  if (plan == nullptr) {  // the second call of this key: the operator itself, recording its plan
    std::vector<int64_t> recorded_key(k);  // the operator's Python may replay calls of its own (the buffer)
    Ref began(PyObject_CallNoArgs(begin_fn));
    if (began.p == nullptr) python_error("begin()");
    try {
      op.callBoxed(stack);
    } catch (...) {
      Ref ended(PyObject_CallNoArgs(end_fn));  // discards the capture
      PyErr_Clear();
      throw;
    }
    PyObject* recorded = PyObject_CallNoArgs(end_fn);
    if (recorded == nullptr) python_error("end()");
    auto fresh = std::make_shared<Plan>(recorded);
    std::remove_reference_t<decltype(plans)> dropped;
    std::lock_guard<std::mutex> lock(plans_mutex);
    if (plans.size() >= kMaxPlans) plans.swap(dropped);
    plans.insert_or_assign(std::move(recorded_key), std::move(fresh));
    return;
  }
  if (!plan->replayable()) {
    op.callBoxed(stack);
    return;
  }
  run(*plan, stack, gate.p, wanted);
}

}  // namespace fused_resnet
