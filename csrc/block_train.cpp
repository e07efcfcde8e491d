// The block in training composed in C++ (DESIGN.md section 4): functional.py's Python autograd Functions
// (_FirstConv, _BnReluConv, _Output) as torch::autograd::Functions calling the same primitives in the same
// order with the same arguments, through the dispatcher below autograd. A block call costs one operator
// call from Python; its backward keeps one node per convolution and one for the output, as the Python
// composition does (each node's weight gradients are accumulated and released before the next runs:
// docs/measurements.md, "Weight gradients one at a time"). Device-agnostic (registered
// CompositeImplicitAutograd): the primitives dispatch to their CPU or CUDA kernels. One composition, two
// families of primitives: the extension's kernels (backends "cpp" and "cuda") and, with
// primitives="triton_", the Triton backend's operators (Python kernels that launch Triton's compiled code;
// the nodes, the saved tensors and the backward's order are then C++, not Python). functional.py takes this
// path outside torch.compile and without synchronized batch norm; both paths give the same bits
// (tests/test_block_node.py).
//
// The block: a chain of L convolutions (2 or 3), each followed by batch norm and, all but the last, ReLU;
// a shortcut that is the input itself (kind 0), a 1x1 convolution (kind 1) or a 1x1 convolution and its
// batch norm (kind 2); then add and ReLU.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/rsqrt.h>
#include <ATen/ops/zeros.h>
#include <ATen/TensorOperators.h>
#include <ATen/record_function.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/library.h>

#include <array>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "replay.h"

namespace fused_resnet {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Opt = std::optional<Tensor>;
using T2 = std::tuple<Tensor, Tensor>;
using T4 = std::tuple<Tensor, Tensor, Tensor, Tensor>;
using T7 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

Opt opt(const Tensor& t) { return t.defined() ? Opt(t) : Opt(); }

// The primitives of one family: the extension's own kernels (fused_resnet::conv_fused, ...; ops.cpp declares
// them) or another backend's operators with the same schemas under a prefix (fused_resnet::triton_conv_fused,
// ...: fused_resnet/backends/triton/ops.py). Looked up once per family.
// bn_finalize(part_mean, part_m2, part_count, gamma, beta, eps, running_mean, running_var, momentum,
// num_batches_tracked)
using FinalizeSig = T4(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, double, const Opt&,
                       const Opt&, double, const Opt&);
// bn_fold(running_mean, running_var, gamma, beta, eps)
using FoldSig = T4(const Tensor&, const Tensor&, const Tensor&, const Tensor&, double);

struct Ops {
  std::string prefix;  // what block_train's `primitives` named: the nodes save it for their backward
  Prim<T7(const Tensor&, const Tensor&, const Opt&, int64_t, int64_t, const Opt&, const Opt&,
                              const Opt&, const Opt&, double, const Opt&, const Opt&, const Opt&, const Opt&,
                              const Opt&, const Opt&, const Opt&, int64_t, bool, bool, bool, at::ScalarType, bool)>
      conv_fused;
  Prim<FinalizeSig> bn_finalize;
  Prim<FoldSig> bn_fold;
  Prim<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Opt&, bool,
                                  at::ScalarType, const Opt&, const Opt&, const Opt&)>
      bn_act;
  Prim<T2(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&)>
      bn_backward_reduce;
  Prim<T2(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                              const Tensor&, const Tensor&, const Tensor&, int64_t, bool, bool)>
      bn_backward_apply;
};

// The families whose primitives replay their calls from C++ (replay.h), by the Python module that plans them.
const Replayer* replayer(const std::string& prefix) {
  static const Replayer triton("fused_resnet.backends.triton.replay");
  return prefix == "triton_" ? &triton : nullptr;
}

template <typename Sig>
Prim<Sig> op(const std::string& prefix, const char* name) {
  const std::string full = "fused_resnet::" + prefix + name;
  const auto handle = c10::Dispatcher::singleton().findSchema({full, ""});
  TORCH_CHECK(handle.has_value(), "block_train: no operator ", full, " (primitives=\"", prefix,
              "\"): the backend that defines it is not loaded");
  return {handle->typed<Sig>(), replayer(prefix)};
}

const Ops& ops(const std::string& prefix) {
  static std::mutex mutex;
  static std::map<std::string, Ops> families;  // a map's entries stay where they are: references outlive inserts
  std::lock_guard<std::mutex> lock(mutex);
  auto it = families.find(prefix);
  if (it == families.end()) {
    Ops o{prefix,
          op<T7(const Tensor&, const Tensor&, const Opt&, int64_t, int64_t, const Opt&, const Opt&, const Opt&,
                const Opt&, double, const Opt&, const Opt&, const Opt&, const Opt&, const Opt&, const Opt&, const Opt&,
                int64_t, bool, bool, bool, at::ScalarType, bool)>(prefix, "conv_fused"),
          op<FinalizeSig>(prefix, "bn_finalize"),
          op<FoldSig>(prefix, "bn_fold"),
          op<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Opt&, bool, at::ScalarType,
                    const Opt&, const Opt&, const Opt&)>(prefix, "bn_act"),
          op<T2(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&)>(prefix,
                                                                                           "bn_backward_reduce"),
          op<T2(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                const Tensor&, const Tensor&, int64_t, bool, bool)>(prefix, "bn_backward_apply")};
    it = families.emplace(prefix, o).first;
  }
  return it->second;
}

// What the Python side passes besides the differentiable tensors (block_train's schema in ops.cpp).
//   config: L, kind, (stride_i, padding_i) per chain conv, shortcut stride, batch_stats per chain BN, the
//           shortcut BN's batch_stats
//   eps_factors: (eps_i, factor_i) per chain BN, then the shortcut BN's; factor < 0: no running-stat update
// A BN's buffers: running mean and variance, and num_batches_tracked (undefined where absent).
struct Running {
  Opt mean, var, count;
};

struct Plan {
  int64_t L = 0, kind = 0, sc_stride = 1;
  std::array<int64_t, 3> stride{}, padding{};
  std::array<bool, 4> batch_stats{};  // chain BNs, then the shortcut's
  std::array<double, 4> eps{}, factor{};
  std::vector<Tensor> kernel_weights;  // the weights as the kernels read them (chain, then shortcut)
  std::vector<Running> running;  // chain BNs, then the shortcut's

  static int64_t size_for(int64_t L) { return 2 + 2 * L + 1 + L + 1; }
};

// block_train's differentiable tensors, flattened: x (the convolutions' input), x_res (the identity
// shortcut's), then (weight, bias, gamma, beta) per chain conv and its BN, then the shortcut's (weight,
// bias, gamma, beta). Absent ones are undefined.
constexpr int kX = 0, kXRes = 1;
inline int w_at(int i) { return 2 + 4 * i; }
inline int sc_at(int64_t L) { return 2 + 4 * static_cast<int>(L); }

struct Fold {  // bn_finalize's (scale, shift, mean, invstd)
  Tensor scale, shift, mean, invstd;
};

// A BN's normalizer: from the tiles' statistics (updating the running statistics when factor >= 0 and
// counting the batch in r.count when given, their version counters bumped as an in-place PyTorch op would), or
// from the running statistics (an eval-mode BN: bn_fold, one launch).
Fold normalize(const Ops& o, const Tensor& pm, const Tensor& pm2, const Tensor& pc, bool batch_stats,
               const Tensor& gamma, const Tensor& beta, double eps, const Running& r, double factor) {
  if (!batch_stats) {
    auto [scale, shift, mean, invstd] = o.bn_fold.call(*r.mean, *r.var, gamma, beta, eps);
    return {scale, shift, mean, invstd};
  }
  const bool update = factor >= 0;
  auto [scale, shift, mean, invstd] = o.bn_finalize.call(pm, pm2, pc, gamma, beta, eps, update ? r.mean : Opt(),
                                                         update ? r.var : Opt(), factor, update ? r.count : Opt());
  if (update)
    for (const Opt* t : {&r.mean, &r.var, &r.count})
      if (t->has_value() && !(*t)->is_inference()) torch::autograd::impl::bump_version(**t);
  return {scale, shift, mean, invstd};
}

T2 bn_backward(const Ops& o, const Tensor& grad, const Tensor& mask_src, const Tensor& z, const Tensor& mean,
               const Tensor& invstd, const Tensor& scale, bool batch_stats, bool want_gm, Tensor& sum_g,
               Tensor& sum_gx) {
  std::tie(sum_g, sum_gx) = o.bn_backward_reduce.call(grad, mask_src, z, as_f32(mean), as_f32(invstd));
  return o.bn_backward_apply.call(grad, mask_src, z, as_f32(mean), as_f32(invstd), as_f32(scale), sum_g, sum_gx,
                                  z.size(0) * z.size(2) * z.size(3), batch_stats, want_gm);
}

std::tuple<Tensor, Tensor, Tensor> conv_backward(const Tensor& grad, const Tensor& x, const Tensor& w, int64_t stride,
                                                 int64_t padding, std::array<bool, 3> mask) {
  return at::convolution_backward(grad, x, w, at::IntArrayRef{w.size(0)}, {stride, stride}, {padding, padding},
                                  {1, 1}, false, {0, 0}, 1, mask);
}

Tensor cast(const Tensor& t, at::ScalarType dtype) { return t.scalar_type() == dtype ? t : t.to(dtype); }

// A node's differentiable inputs by slot; absent ones (undefined) are not inputs of the node at all (an
// autograd Function cannot take an undefined tensor), so each slot maps to its input index or -1.
struct Slots {
  std::vector<int64_t> pos;
  std::vector<Tensor> inputs;

  Slots(std::initializer_list<Tensor> slots) {
    for (const Tensor& t : slots) {
      pos.push_back(t.defined() ? static_cast<int64_t>(inputs.size()) : -1);
      if (t.defined()) inputs.push_back(t);
    }
  }
};

std::vector<Tensor> unpack(at::TensorList inputs, const std::vector<int64_t>& pos) {
  std::vector<Tensor> v(pos.size());
  for (size_t i = 0; i < pos.size(); ++i)
    if (pos[i] >= 0) v[i] = inputs[pos[i]];
  return v;
}

// Every node's set-up, in one saved entry: its slots (see Slots), its non-tensor parameters, and no zero
// tensors made for the gradients of outputs nothing used (the statistics, an absent shortcut): its backward
// reads only those it needs and checks them.
void save_node(AutogradContext* ctx, const Ops& o, const std::vector<int64_t>& pos, size_t inputs,
               std::initializer_list<int64_t> params) {
  std::vector<int64_t> v{static_cast<int64_t>(inputs), static_cast<int64_t>(pos.size())};
  v.insert(v.end(), pos.begin(), pos.end());
  v.insert(v.end(), params);
  ctx->saved_data["node"] = std::move(v);
  ctx->saved_data["prims"] = o.prefix;
  ctx->set_materialize_grads(false);
}

constexpr const char* kDoubleBackward =
    "fused_resnet: the fused block's backward is not differentiable (double backward, e.g. a gradient penalty "
    "through the block): run that model unconverted (eager modules)";

// What every node's backward shares: its primitives, which slots need a gradient, its parameters, and its
// results in the node's input order.
struct Grads {
  ReplayScope scope;  // the gate asked once for this backward's primitive calls
  AutogradContext* ctx;
  const Ops& o;
  std::vector<int64_t> v;  // as save_node wrote it
  variable_list g;         // per slot

  explicit Grads(AutogradContext* c)
      : ctx(c), o(ops(c->saved_data["prims"].toStringRef())), v(c->saved_data["node"].toIntVector()), g(v[1]) {}
  int64_t pos(size_t slot) const { return v[2 + slot]; }
  int64_t param(size_t i) const { return v[2 + v[1] + i]; }
  bool needs(int slot) const { return pos(slot) >= 0 && ctx->needs_input_grad(pos(slot)); }
  // One per input, and one (none) for the non-tensor argument. Under create_graph=True the results carry a
  // node that raises when differentiated (functional.DOUBLE_BACKWARD's message): the primitives ran below
  // autograd, so a second derivative through them would be silently partial.
  variable_list result() const {
    variable_list out(v[0] + 1);
    for (size_t i = 0; i < g.size(); ++i)
      if (pos(i) >= 0) out[pos(i)] = g[i];
    if (!at::GradMode::is_enabled()) return out;
    for (Tensor& t : out)
      if (t.defined()) t = t.detach().requires_grad_();
    return torch::autograd::DelayedError(kDoubleBackward, static_cast<int64_t>(out.size())).apply(std::move(out));
  }
};

// A convolution's gradients (input, weight, bias) where `need` asks. With `bias_before_bs` (a batch-statistics
// BN follows the convolution) the bias gradient is exactly 0: the bias shifts the batch mean by itself.
std::tuple<Tensor, Tensor, Tensor> conv_grads(const Tensor& grad, const Tensor& x, const Tensor& w, int64_t stride,
                                              int64_t padding, std::array<bool, 3> need, bool bias_before_bs) {
  auto [dx, dw, db] = conv_backward(grad, x, w, stride, padding, {need[0], need[1], need[2] && !bias_before_bs});
  if (bias_before_bs && need[2]) db = at::zeros({w.size(0)}, w.options());
  return {dx, dw, db};
}

// _FirstConv: Z = conv(x) + b and its BN's per-tile statistics (not differentiable). Slots: x, w, b.
struct FirstArgs {
  const Ops& o;  // the primitives
  std::vector<int64_t> pos;
  Tensor kernel_weight;
  int64_t stride, padding;
  bool batch_stats;
};

class FirstConv : public torch::autograd::Function<FirstConv> {
 public:
  static variable_list forward(AutogradContext* ctx, at::TensorList inputs, const FirstArgs& a) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const std::vector<Tensor> v = unpack(inputs, a.pos);
    const Tensor &x = v[0], &w = v[1], &b = v[2];
    RECORD_USER_SCOPE("fused_resnet::K1 conv+stats");
    auto [z, s, pm, pm2, pc, sc_pm, sc_pm2] = a.o.conv_fused.call(
        x, a.kernel_weight, opt(b), a.stride, a.padding, {}, {}, {}, {}, 0.0, {}, {}, {}, {}, {}, {}, {}, 1, false, false,
        a.batch_stats, x.scalar_type(), false);
    ctx->save_for_backward({x, w});
    save_node(ctx, a.o, a.pos, inputs.size(), {a.stride, a.padding, a.batch_stats});
    ctx->mark_non_differentiable({pm, pm2, pc});
    return {z, pm, pm2, pc};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    Grads r(ctx);
    if (!grads[0].defined()) return r.result();  // nothing downstream used the output
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &w = saved[1];
    const bool bs = r.param(2);
    RECORD_USER_SCOPE("fused_resnet::B conv backward");
    std::tie(r.g[0], r.g[1], r.g[2]) =
        conv_grads(grads[0], x, w, r.param(0), r.param(1), {r.needs(0), r.needs(1), r.needs(2)}, bs);
    return r.result();
  }
};

// _BnReluConv: the previous BN (finalize, running statistics) and ReLU in the prologue of the next chain
// convolution, which takes its own BN's statistics; for the last, the shortcut convolution too (apart, with
// its statistics when a BN follows it). Slots: z_prev, gamma, beta, w, b, sc_x, sc_w, sc_b.
struct BnReluConvArgs {
  const Ops& o;  // the primitives
  std::vector<int64_t> pos;
  Tensor part_mean, part_m2, part_count, kernel_weight, sc_kernel_weight;
  Running running;
  int64_t stride, padding, sc_stride;
  bool bs_prev, bs_next, sc_stats;
  double eps, factor;
};

class BnReluConv : public torch::autograd::Function<BnReluConv> {
 public:
  static variable_list forward(AutogradContext* ctx, at::TensorList inputs, const BnReluConvArgs& a) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const std::vector<Tensor> v = unpack(inputs, a.pos);
    const Tensor &z_prev = v[0], &gamma = v[1], &beta = v[2], &w = v[3], &b = v[4], &sc_x = v[5], &sc_w = v[6],
                 &sc_b = v[7];
    const bool with_sc = sc_w.defined();
    const Ops& o = a.o;
    Fold f;
    {
      RECORD_USER_SCOPE("fused_resnet::F bn_finalize");
      f = normalize(o, a.part_mean, a.part_m2, a.part_count, a.bs_prev, gamma, beta, a.eps, a.running, a.factor);
    }
    RECORD_USER_SCOPE(with_sc ? "fused_resnet::K bn+relu>conv+stats+conv1x1" : "fused_resnet::K bn+relu>conv+stats");
    auto [z, s, pm, pm2, pc, sc_pm, sc_pm2] = o.conv_fused.call(
        z_prev, a.kernel_weight, opt(b), a.stride, a.padding, {}, {}, {}, {}, 0.0, as_f32(f.mean), as_f32(f.scale),
        as_f32(f.shift), {}, opt(sc_x), with_sc ? Opt(a.sc_kernel_weight) : Opt(), opt(sc_b), a.sc_stride, true, false,
        a.bs_next, z_prev.scalar_type(), a.sc_stats);
    ctx->save_for_backward({z_prev, w, f.mean, f.invstd, f.scale, f.shift, sc_x, sc_w});
    save_node(ctx, a.o, a.pos, inputs.size(), {a.stride, a.padding, a.sc_stride, a.bs_prev, a.bs_next, a.sc_stats,
                                               static_cast<int64_t>(gamma.scalar_type())});
    ctx->mark_non_differentiable({pm, pm2, pc, sc_pm, sc_pm2});
    return {z, pm, pm2, pc, s, sc_pm, sc_pm2};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    Grads r(ctx);
    if (!grads[0].defined()) return r.result();  // nothing downstream used the output
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &z = saved[0], &w = saved[1], &mean = saved[2], &invstd = saved[3], &scale = saved[4],
                 &shift = saved[5], &sc_x = saved[6], &sc_w = saved[7];
    const bool bs_prev = r.param(3), bs_next = r.param(4), sc_stats = r.param(5);
    const auto pd = static_cast<at::ScalarType>(r.param(6));
    Tensor y, dy;
    {
      RECORD_USER_SCOPE("fused_resnet::B conv backward (input recomputed)");
      y = r.o.bn_act.call(z, as_f32(mean), as_f32(scale), as_f32(shift), {}, true, z.scalar_type(), {}, {}, {});
      std::tie(dy, r.g[3], r.g[4]) =
          conv_grads(grads[0], y, w, r.param(0), r.param(1), {true, r.needs(3), r.needs(4)}, bs_next);
    }
    {
      RECORD_USER_SCOPE("fused_resnet::B relu+bn backward");
      Tensor sg, sgx;
      std::tie(r.g[0], std::ignore) = bn_backward(r.o, dy, y, z, mean, invstd, scale, bs_prev, false, sg, sgx);
      if (r.needs(1)) r.g[1] = cast(sgx, pd);
      if (r.needs(2)) r.g[2] = cast(sg, pd);
    }
    y.reset();
    dy.reset();
    if (sc_w.defined() && grads[4].defined()) {
      RECORD_USER_SCOPE("fused_resnet::B shortcut conv backward");
      std::tie(r.g[5], r.g[6], r.g[7]) =
          conv_grads(grads[4], sc_x, sc_w, r.param(2), 0, {r.needs(5), r.needs(6), r.needs(7)}, sc_stats);
    }
    return r.result();
  }
};

// _Output: the last BN (finalize), the shortcut -- X, conv(X), or BN(conv(X)) with its own finalize -- the
// add and the ReLU in one kernel. Slots: z, gamma, beta, s, sc_gamma, sc_beta.
struct OutputArgs {
  const Ops& o;  // the primitives
  std::vector<int64_t> pos;
  Tensor part_mean, part_m2, part_count, sc_part_mean, sc_part_m2;
  Running running, sc_running;
  int64_t kind;
  bool bs, sc_bs;
  double eps, factor, sc_eps, sc_factor;
};

class Output : public torch::autograd::Function<Output> {
 public:
  static Tensor forward(AutogradContext* ctx, at::TensorList inputs, const OutputArgs& a) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const std::vector<Tensor> v = unpack(inputs, a.pos);
    const Tensor &z = v[0], &gamma = v[1], &beta = v[2], &s = v[3], &sc_gamma = v[4], &sc_beta = v[5];
    const Ops& o = a.o;
    Fold f, fs;
    {
      RECORD_USER_SCOPE("fused_resnet::F bn_finalize");
      f = normalize(o, a.part_mean, a.part_m2, a.part_count, a.bs, gamma, beta, a.eps, a.running, a.factor);
    }
    const bool sc_bn = a.kind == 2;
    if (sc_bn) {
      RECORD_USER_SCOPE("fused_resnet::F shortcut bn_finalize");
      fs = normalize(o, a.sc_part_mean, a.sc_part_m2, a.part_count, a.sc_bs, sc_gamma, sc_beta, a.sc_eps,
                     a.sc_running, a.sc_factor);
    }
    const at::ScalarType out_dtype = c10::promoteTypes(z.scalar_type(), s.scalar_type());
    Tensor out;
    {
      RECORD_USER_SCOPE(sc_bn ? "fused_resnet::K bn+bn+add+relu" : "fused_resnet::K bn+add+relu");
      out = o.bn_act.call(z, as_f32(f.mean), as_f32(f.scale), as_f32(f.shift),
                          cast(s, sc_bn ? z.scalar_type() : out_dtype), true, out_dtype,
                          sc_bn ? Opt(as_f32(fs.mean)) : Opt(), sc_bn ? Opt(as_f32(fs.scale)) : Opt(),
                          sc_bn ? Opt(as_f32(fs.shift)) : Opt());
    }
    // s itself only for its BN's backward (the identity's and a plain conv's gradient is the masked grad).
    ctx->save_for_backward({z, out, f.mean, f.invstd, f.scale, sc_bn ? s : Tensor(), fs.mean, fs.invstd, fs.scale});
    save_node(ctx, a.o, a.pos, inputs.size(), {a.kind, a.bs, a.sc_bs, static_cast<int64_t>(gamma.scalar_type()),
                                               static_cast<int64_t>(s.scalar_type())});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    Grads r(ctx);
    if (!grads[0].defined()) return r.result();  // nothing downstream used the output
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &z = saved[0], &out = saved[1], &mean = saved[2], &invstd = saved[3], &scale = saved[4],
                 &s = saved[5];
    const int64_t kind = r.param(0);
    const bool bs = r.param(1), sc_bs = r.param(2);
    const auto pd = static_cast<at::ScalarType>(r.param(3)), s_dtype = static_cast<at::ScalarType>(r.param(4));
    const Tensor grad = grads[0].contiguous(conv_output_format(out));
    Tensor gm, sg, sgx;
    {
      RECORD_USER_SCOPE("fused_resnet::B relu+bn backward");
      std::tie(r.g[0], gm) = bn_backward(r.o, grad, out, z, mean, invstd, scale, bs, kind != 2, sg, sgx);
    }
    if (r.needs(1)) r.g[1] = cast(sgx, pd);
    if (r.needs(2)) r.g[2] = cast(sg, pd);
    if (kind == 2) {
      RECORD_USER_SCOPE("fused_resnet::B shortcut relu+bn backward");
      Tensor ssg, ssgx;
      std::tie(r.g[3], std::ignore) =
          bn_backward(r.o, grad, out, s, saved[6], saved[7], saved[8], sc_bs, false, ssg, ssgx);
      if (r.needs(4)) r.g[4] = cast(ssgx, pd);
      if (r.needs(5)) r.g[5] = cast(ssg, pd);
    } else if (r.needs(3)) {
      r.g[3] = cast(gm, s_dtype);
    }
    return r.result();
  }
};

Tensor block_train(const c10::List<Opt>& tensors, at::TensorList kernel_weights, const c10::List<Opt>& running_means,
                   const c10::List<Opt>& running_vars, const c10::List<Opt>& batch_counts, at::IntArrayRef config,
                   at::ArrayRef<double> eps_factors, c10::string_view primitives) {
  const char* name = "block_train";
  TORCH_CHECK(config.size() >= 2 && (config[0] == 2 || config[0] == 3) && config[1] >= 0 && config[1] <= 2, name,
              ": config must start with the chain length (2 or 3) and the shortcut kind (0, 1 or 2)");
  Plan p;
  p.L = config[0], p.kind = config[1];
  const int64_t L = p.L;
  TORCH_CHECK(static_cast<int64_t>(config.size()) == Plan::size_for(L), name, ": config must have ",
              Plan::size_for(L), " entries for a chain of ", L, ", got ", config.size());
  TORCH_CHECK(static_cast<int64_t>(eps_factors.size()) == 2 * (L + 1), name, ": eps_factors must have ", 2 * (L + 1),
              " entries, got ", eps_factors.size());
  TORCH_CHECK(static_cast<int64_t>(tensors.size()) == sc_at(L) + 4, name, ": tensors must have ", sc_at(L) + 4,
              " entries for a chain of ", L, ", got ", tensors.size());
  TORCH_CHECK(static_cast<int64_t>(kernel_weights.size()) == L + (p.kind != 0), name, ": kernel_weights must have ",
              L + (p.kind != 0), " entries, got ", kernel_weights.size());
  for (size_t size : {running_means.size(), running_vars.size(), batch_counts.size()})
    TORCH_CHECK(static_cast<int64_t>(size) == L + 1, name, ": running_means, running_vars and batch_counts must have ",
                L + 1, " entries");
  for (int64_t i = 0; i < L; ++i) p.stride[i] = config[2 + 2 * i], p.padding[i] = config[3 + 2 * i];
  p.sc_stride = config[2 + 2 * L];
  for (int64_t i = 0; i < L; ++i) p.batch_stats[i] = config[3 + 2 * L + i] != 0;
  p.batch_stats[3] = config[3 + 3 * L] != 0;
  for (int64_t i = 0; i <= L; ++i) {
    const int64_t at = i < L ? i : 3;
    p.eps[at] = eps_factors[2 * i], p.factor[at] = eps_factors[2 * i + 1];
  }
  p.kernel_weights = kernel_weights.vec();
  p.running.reserve(L + 1);
  for (int64_t i = 0; i <= L; ++i)
    p.running.push_back({running_means.get(i), running_vars.get(i), batch_counts.get(i)});
  std::vector<Tensor> v;
  v.reserve(tensors.size());
  for (const Opt& t : tensors) v.push_back(t.has_value() ? *t : Tensor());
  const int sc = sc_at(L);
  TORCH_CHECK(v[kX].defined() && (p.kind != 0 || v[kXRes].defined()), name, ": x (and x_res for the identity) needed");
  for (int64_t i = 0; i < L; ++i) {
    const int b = w_at(static_cast<int>(i));
    TORCH_CHECK(v[b].defined() && v[b + 2].defined() && v[b + 3].defined(), name, ": chain conv ", i,
                " needs its weight and its BN's gamma and beta");
    TORCH_CHECK(p.batch_stats[i] || (p.running[i].mean.has_value() && p.running[i].var.has_value()), name, ": BN ", i,
                " without batch statistics needs running statistics");
  }
  TORCH_CHECK(p.kind == 0 || v[sc].defined(), name, ": the shortcut convolution needs its weight");
  TORCH_CHECK(p.kind != 2 || (v[sc + 2].defined() && v[sc + 3].defined() &&
                              (p.batch_stats[3] || (p.running[L].mean.has_value() && p.running[L].var.has_value()))),
              name, ": the shortcut's BN needs gamma, beta and (without batch statistics) running statistics");

  const Ops& prims = ops(std::string(primitives));  // an unknown family fails here, before anything runs
  ReplayScope scope;                                 // the gate asked once for the forward's primitive calls

  // The chain: FirstConv, then one BnReluConv per further convolution (the last with the shortcut), Output.
  const Tensor& x = v[kX];
  Slots first{x, v[w_at(0)], v[w_at(0) + 1]};
  variable_list k = FirstConv::apply(at::TensorList(first.inputs),
                                     FirstArgs{prims, first.pos, p.kernel_weights[0], p.stride[0], p.padding[0],
                                               p.batch_stats[0]});
  Tensor s, sc_pm, sc_pm2;
  for (int64_t i = 1; i < L; ++i) {
    const int prev = w_at(static_cast<int>(i) - 1), cur = w_at(static_cast<int>(i));
    const bool with_sc = i == L - 1 && p.kind != 0;
    Slots slots{k[0], v[prev + 2], v[prev + 3], v[cur], v[cur + 1], with_sc ? x : Tensor(), with_sc ? v[sc] : Tensor(),
                with_sc ? v[sc + 1] : Tensor()};
    BnReluConvArgs a{prims, slots.pos, k[1], k[2], k[3], p.kernel_weights[i], with_sc ? p.kernel_weights[L] : Tensor(),
                     p.running[i - 1], p.stride[i], p.padding[i], with_sc ? p.sc_stride : 1,
                     p.batch_stats[i - 1], p.batch_stats[i], with_sc && p.kind == 2 && p.batch_stats[3], p.eps[i - 1],
                     p.factor[i - 1]};
    k = BnReluConv::apply(at::TensorList(slots.inputs), a);
    if (with_sc) s = k[4], sc_pm = k[5], sc_pm2 = k[6];
  }
  const int last = w_at(static_cast<int>(L) - 1);
  const bool sc_bn = p.kind == 2;
  Slots out{k[0], v[last + 2], v[last + 3], p.kind == 0 ? v[kXRes] : s, sc_bn ? v[sc + 2] : Tensor(),
            sc_bn ? v[sc + 3] : Tensor()};
  OutputArgs a{prims, out.pos, k[1], k[2], k[3], sc_pm, sc_pm2, p.running[L - 1], sc_bn ? p.running[L] : Running{},
               p.kind, p.batch_stats[L - 1], p.batch_stats[3], p.eps[L - 1], p.factor[L - 1], p.eps[3], p.factor[3]};
  return Output::apply(at::TensorList(out.inputs), a);
}

// fused_resnet::triton_conv_fused through its Replayer (replay.h): all seven results
// (replayed_triton_conv_fused), or the first alone (replayed_triton_conv_out: a replayed call then makes no
// tensor for the six others -- at inference all empty -- and the caller wraps one result for Python, not seven).
template <bool kFirstOnly>
std::conditional_t<kFirstOnly, Tensor, T7> replayed_triton_conv(
    const Tensor& x, const Tensor& weight, const Opt& bias, int64_t stride, int64_t padding, const Opt& bn_mean,
    const Opt& bn_var, const Opt& bn_gamma, const Opt& bn_beta, double bn_eps, const Opt& in_mean,
    const Opt& in_scale, const Opt& in_shift, const Opt& residual, const Opt& sc_x, const Opt& sc_weight,
    const Opt& sc_bias, int64_t sc_stride, bool sc_separate, bool relu, bool stats, at::ScalarType out_dtype,
    bool sc_stats) {
  const auto& conv = ops("triton_").conv_fused;
  const auto args = std::forward_as_tuple(x, weight, bias, stride, padding, bn_mean, bn_var, bn_gamma, bn_beta, bn_eps,
                                          in_mean, in_scale, in_shift, residual, sc_x, sc_weight, sc_bias, sc_stride,
                                          sc_separate, relu, stats, out_dtype, sc_stats);
  if constexpr (kFirstOnly)
    return std::apply([&](const auto&... a) { return conv.first(a...); }, args);
  else
    return std::apply([&](const auto&... a) { return conv.call(a...); }, args);
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_resnet, CompositeImplicitAutograd, m) { m.impl("block_train", &block_train); }
TORCH_LIBRARY_IMPL(fused_resnet, CompositeExplicitAutograd, m) {
  m.impl("replayed_triton_conv_fused", &replayed_triton_conv<false>);
  m.impl("replayed_triton_conv_out", &replayed_triton_conv<true>);
}

}  // namespace fused_resnet
