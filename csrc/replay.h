// An operator call that can be replayed without its Python kernel: the Triton backend's primitives
// (fused_resnet/backends/triton/replay.py says how a plan is recorded and when replaying is off).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/boxing/impl/boxing.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdint>
#include <string>
#include <tuple>
#include <utility>

namespace fused_resnet {

// Replays calls of operators whose kernels implement replay.py's capture protocol: per call, the key
// (the arguments' dtypes, devices, sizes, strides, addresses modulo 16 and which overlap, every other
// argument's value, and the state token the Python gate reports) finds the plan an earlier call recorded --
// allocations and the compiled Triton launchers to call, with each tensor argument traced to an input or
// an allocation -- and runs it from C++. A key's first call runs the operator, its second too while
// recording the plan (a workload of ever new shapes never pays for recording); calls the gate turns away,
// and keys whose call could not be recorded exactly, run the operator as they are.
class Replayer {
 public:
  explicit Replayer(std::string module) : module_(std::move(module)) {}
  // `stack` holds the operator's arguments; it holds its results afterwards, as callBoxed leaves it -- a
  // replayed call only the first `wanted` of them (the caller reads no more: no tensor made for the rest).
  void call(const c10::OperatorHandle& op, torch::jit::Stack& stack, size_t wanted = SIZE_MAX) const;

 private:
  std::string module_;  // the Python module with gate(), begin() and end()
};

// While one is alive on a thread, the Replayer asks the Python gate once (its first call) rather than per
// call: what the gate reports cannot change while C++ runs one node's calls (no user code runs between
// them). Holds no lock; nests.
class ReplayScope {
 public:
  ReplayScope();
  ~ReplayScope();
  ReplayScope(const ReplayScope&) = delete;
  ReplayScope& operator=(const ReplayScope&) = delete;
};

// The typed result of a boxed call.
template <class Ret>
struct Unstack {
  static Ret get(torch::jit::Stack& s) { return std::move(s[0]).toTensor(); }
};
template <class... T>
struct Unstack<std::tuple<T...>> {
  static std::tuple<T...> get(torch::jit::Stack& s) { return get(s, std::index_sequence_for<T...>{}); }
  template <size_t... I>
  static std::tuple<T...> get(torch::jit::Stack& s, std::index_sequence<I...>) {
    return std::tuple<T...>{std::move(s[I]).toTensor()...};
  }
};

// One primitive of a family: the dispatcher's typed call, or a Replayer's when the family has one.
template <class Sig>
struct Prim;
template <class Ret, class... A>
struct Prim<Ret(A...)> {
  c10::TypedOperatorHandle<Ret(A...)> handle;
  const Replayer* replay = nullptr;

  Ret call(A... args) const {
    if (replay == nullptr) return handle.call(args...);
    torch::jit::Stack stack = c10::impl::boxArgs<A...>(args...);
    replay->call(handle, stack);
    return Unstack<Ret>::get(stack);
  }
  // The first result only (a replayed call makes none of the others).
  at::Tensor first(A... args) const {
    if (replay == nullptr) return std::get<0>(handle.call(args...));
    torch::jit::Stack stack = c10::impl::boxArgs<A...>(args...);
    replay->call(handle, stack, 1);
    return std::move(stack[0]).toTensor();
  }
};

}  // namespace fused_resnet
