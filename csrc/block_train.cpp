// The block in training as one autograd node in C++ (DESIGN.md section 4): the primitives functional.py's
// three Python autograd Functions call (_FirstConv, _BnReluConv, _Output), in the same order with the same
// arguments, but called through the dispatcher below autograd, so that a block call costs one operator
// call from Python and its backward one node. Device-agnostic (registered CompositeImplicitAutograd): the
// primitives dispatch to their CPU or CUDA kernels. functional.py takes this path for the compiled
// backends outside torch.compile and without synchronized batch norm; both paths give the same bits
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
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

#include "checks.h"

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

// The primitives, looked up once (ops.cpp declares them).
struct Ops {
  c10::TypedOperatorHandle<T7(const Tensor&, const Tensor&, const Opt&, int64_t, int64_t, const Opt&, const Opt&,
                              const Opt&, const Opt&, double, const Opt&, const Opt&, const Opt&, const Opt&,
                              const Opt&, const Opt&, const Opt&, int64_t, bool, bool, bool, at::ScalarType, bool)>
      conv_fused;
  c10::TypedOperatorHandle<T4(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, double,
                              const Opt&, const Opt&, double)>
      bn_finalize;
  c10::TypedOperatorHandle<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Opt&, bool,
                                  at::ScalarType, const Opt&, const Opt&, const Opt&)>
      bn_act;
  c10::TypedOperatorHandle<T2(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&)>
      bn_backward_reduce;
  c10::TypedOperatorHandle<T2(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                              const Tensor&, const Tensor&, const Tensor&, int64_t, bool, bool)>
      bn_backward_apply;
};

template <typename Sig>
c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

const Ops& ops() {
  static const Ops o{
      op<T7(const Tensor&, const Tensor&, const Opt&, int64_t, int64_t, const Opt&, const Opt&, const Opt&, const Opt&,
            double, const Opt&, const Opt&, const Opt&, const Opt&, const Opt&, const Opt&, const Opt&, int64_t, bool,
            bool, bool, at::ScalarType, bool)>("fused_resnet::conv_fused"),
      op<T4(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, double, const Opt&, const Opt&,
            double)>("fused_resnet::bn_finalize"),
      op<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Opt&, bool, at::ScalarType,
                const Opt&, const Opt&, const Opt&)>("fused_resnet::bn_act"),
      op<T2(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&)>(
          "fused_resnet::bn_backward_reduce"),
      op<T2(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
            const Tensor&, int64_t, bool, bool)>("fused_resnet::bn_backward_apply")};
  return o;
}

// What the Python side passes besides the differentiable tensors (block_train's schema in ops.cpp).
//   config: L, kind, (stride_i, padding_i) per chain conv, shortcut stride, batch_stats per chain BN, the
//           shortcut BN's batch_stats
//   eps_factors: (eps_i, factor_i) per chain BN, then the shortcut BN's; factor < 0: no running-stat update
struct Plan {
  int64_t L = 0, kind = 0, sc_stride = 1;
  std::array<int64_t, 3> stride{}, padding{};
  std::array<bool, 4> batch_stats{};  // chain BNs, then the shortcut's
  std::array<double, 4> eps{}, factor{};
  std::vector<Tensor> kernel_weights;  // the weights as the kernels read them (chain, then shortcut)
  std::vector<Opt> running_mean, running_var;
  std::vector<int64_t> pos;  // per flattened tensor (below), its index among the node's inputs, or -1 if absent

  static int64_t size_for(int64_t L) { return 2 + 2 * L + 1 + L + 1; }
};

// Differentiable tensors, flattened: x (the convolutions' input), x_res (the identity shortcut's), then
// (weight, bias, gamma, beta) per chain conv and its BN, then the shortcut's (weight, bias, gamma, beta).
// Absent ones are undefined here; the node's inputs are the present ones only (Plan::pos maps them).
constexpr int kX = 0, kXRes = 1;
inline int w_at(int i) { return 2 + 4 * i; }
inline int sc_at(int64_t L) { return 2 + 4 * static_cast<int>(L); }

struct Fold {  // bn_finalize's (scale, shift, mean, invstd)
  Tensor scale, shift, mean, invstd;
};

// A BN's normalizer: from the tiles' statistics (updating the running statistics when factor >= 0, their
// version counters bumped as an in-place PyTorch op would), or from the running statistics.
Fold normalize(const Tensor& pm, const Tensor& pm2, const Tensor& pc, bool batch_stats, const Tensor& gamma,
               const Tensor& beta, double eps, const Opt& rm, const Opt& rv, double factor) {
  if (!batch_stats) {  // functional.bn_fold's arithmetic
    const Tensor invstd = at::rsqrt(rv->to(at::kFloat) + eps);
    return {gamma.to(at::kFloat) * invstd, beta.to(at::kFloat), rm->to(at::kFloat), invstd};
  }
  const bool update = factor >= 0;
  auto [scale, shift, mean, invstd] = ops().bn_finalize.call(pm, pm2, pc, gamma, beta, eps, update ? rm : Opt(),
                                                             update ? rv : Opt(), factor);
  if (update)
    for (const Tensor& t : {*rm, *rv})
      if (!t.is_inference()) torch::autograd::impl::bump_version(t);
  return {scale, shift, mean, invstd};
}

T2 bn_backward(const Tensor& grad, const Tensor& mask_src, const Tensor& z, const Tensor& mean, const Tensor& invstd,
               const Tensor& scale, bool batch_stats, bool want_gm, Tensor& sum_g, Tensor& sum_gx) {
  std::tie(sum_g, sum_gx) = ops().bn_backward_reduce.call(grad, mask_src, z, as_f32(mean), as_f32(invstd));
  return ops().bn_backward_apply.call(grad, mask_src, z, as_f32(mean), as_f32(invstd), as_f32(scale), sum_g, sum_gx,
                                      z.size(0) * z.size(2) * z.size(3), batch_stats, want_gm);
}

std::tuple<Tensor, Tensor, Tensor> conv_backward(const Tensor& grad, const Tensor& x, const Tensor& w, int64_t stride,
                                                 int64_t padding, std::array<bool, 3> mask) {
  return at::convolution_backward(grad, x, w, at::IntArrayRef{w.size(0)}, {stride, stride}, {padding, padding},
                                  {1, 1}, false, {0, 0}, 1, mask);
}

Tensor cast(const Tensor& t, at::ScalarType dtype) { return t.scalar_type() == dtype ? t : t.to(dtype); }

class BlockTrain : public torch::autograd::Function<BlockTrain> {
 public:
  static Tensor forward(AutogradContext* ctx, at::TensorList inputs, const Plan& p) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    std::vector<Tensor> v(p.pos.size());
    for (size_t i = 0; i < v.size(); ++i)
      if (p.pos[i] >= 0) v[i] = inputs[p.pos[i]];
    const Ops& o = ops();
    const int64_t L = p.L;
    const Tensor& x = v[kX];
    const int sc = sc_at(L);
    const bool has_sc = p.kind != 0;
    std::vector<Tensor> z(L);
    std::vector<Fold> f(L);
    Tensor pm, pm2, pc, s, sc_pm, sc_pm2;
    {
      RECORD_USER_SCOPE("fused_resnet::K1 conv+stats");
      std::tie(z[0], std::ignore, pm, pm2, pc, std::ignore, std::ignore) = o.conv_fused.call(
          x, p.kernel_weights[0], opt(v[w_at(0) + 1]), p.stride[0], p.padding[0], {}, {}, {}, {}, 0.0, {}, {}, {},
          {}, {}, {}, {}, 1, false, false, p.batch_stats[0], x.scalar_type(), false);
    }
    for (int64_t i = 1; i < L; ++i) {
      const int b = w_at(static_cast<int>(i) - 1);
      f[i - 1] = normalize(pm, pm2, pc, p.batch_stats[i - 1], v[b + 2], v[b + 3], p.eps[i - 1], p.running_mean[i - 1],
                           p.running_var[i - 1], p.factor[i - 1]);
      const bool with_sc = i == L - 1 && has_sc;
      RECORD_USER_SCOPE(with_sc ? "fused_resnet::K bn+relu>conv+stats+conv1x1" : "fused_resnet::K bn+relu>conv+stats");
      std::tie(z[i], s, pm, pm2, pc, sc_pm, sc_pm2) = o.conv_fused.call(
          z[i - 1], p.kernel_weights[i], opt(v[w_at(static_cast<int>(i)) + 1]), p.stride[i], p.padding[i], {}, {}, {},
          {}, 0.0, as_f32(f[i - 1].mean), as_f32(f[i - 1].scale), as_f32(f[i - 1].shift), {}, with_sc ? Opt(x) : Opt(),
          with_sc ? Opt(p.kernel_weights[L]) : Opt(), with_sc ? opt(v[sc + 1]) : Opt(), with_sc ? p.sc_stride : 1, true,
          false, p.batch_stats[i], z[i - 1].scalar_type(), with_sc && p.kind == 2 && p.batch_stats[3]);
    }
    const int last = w_at(static_cast<int>(L) - 1);
    f[L - 1] = normalize(pm, pm2, pc, p.batch_stats[L - 1], v[last + 2], v[last + 3], p.eps[L - 1],
                         p.running_mean[L - 1], p.running_var[L - 1], p.factor[L - 1]);
    Fold fs;
    if (p.kind == 2)
      fs = normalize(sc_pm, sc_pm2, pc, p.batch_stats[3], v[sc + 2], v[sc + 3], p.eps[3], p.running_mean[L],
                     p.running_var[L], p.factor[3]);
    if (!has_sc) s = v[kXRes];
    const Tensor& zl = z[L - 1];
    const at::ScalarType out_dtype = c10::promoteTypes(zl.scalar_type(), s.scalar_type());
    Tensor out;
    {
      RECORD_USER_SCOPE(p.kind == 2 ? "fused_resnet::K bn+bn+add+relu" : "fused_resnet::K bn+add+relu");
      out = o.bn_act.call(zl, as_f32(f[L - 1].mean), as_f32(f[L - 1].scale), as_f32(f[L - 1].shift),
                          cast(s, p.kind == 2 ? zl.scalar_type() : out_dtype), true, out_dtype,
                          p.kind == 2 ? Opt(fs.mean) : Opt(), p.kind == 2 ? Opt(fs.scale) : Opt(),
                          p.kind == 2 ? Opt(fs.shift) : Opt());
    }
    // Saved: what the three Python nodes save, no more activations than eager.
    variable_list saved{x, out};
    for (int64_t i = 0; i < L; ++i) saved.insert(saved.end(), {z[i], f[i].mean, f[i].invstd, f[i].scale, f[i].shift});
    saved.insert(saved.end(), {p.kind == 2 ? s : Tensor(), fs.mean, fs.invstd, fs.scale});  // s: for its BN's backward
    for (int64_t i = 0; i < L; ++i) saved.push_back(v[w_at(static_cast<int>(i))]);
    saved.push_back(v[sc]);
    ctx->save_for_backward(saved);
    ctx->saved_data["config"] = std::vector<int64_t>{
        L, p.kind, p.stride[0], p.stride[1], p.stride[2], p.padding[0], p.padding[1], p.padding[2], p.sc_stride,
        p.batch_stats[0], p.batch_stats[1], p.batch_stats[2], p.batch_stats[3],
        static_cast<int64_t>(v[w_at(static_cast<int>(L) - 1) + 2].scalar_type()),
        static_cast<int64_t>(s.scalar_type())};
    ctx->saved_data["pos"] = p.pos;
    ctx->saved_data["inputs"] = static_cast<int64_t>(inputs.size());
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const Ops& o = ops();
    const std::vector<int64_t> c = ctx->saved_data["config"].toIntVector();
    const int64_t L = c[0], kind = c[1], sc_stride = c[8];
    const bool sc_bs = c[12];
    const auto pd = static_cast<at::ScalarType>(c[13]), s_dtype = static_cast<at::ScalarType>(c[14]);
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &out = saved[1];
    auto Z = [&](int64_t i) -> const Tensor& { return saved[2 + 5 * i]; };
    auto F = [&](int64_t i, int k) -> const Tensor& { return saved[2 + 5 * i + 1 + k]; };  // mean, invstd, scale, shift
    const int64_t sb = 2 + 5 * L;
    const Tensor &s = saved[sb], &s_mean = saved[sb + 1], &s_invstd = saved[sb + 2], &s_scale = saved[sb + 3];
    auto W = [&](int64_t i) -> const Tensor& { return saved[sb + 4 + i]; };  // i == L: the shortcut's
    const int sc = sc_at(L);
    const std::vector<int64_t> pos = ctx->saved_data["pos"].toIntVector();
    auto needs = [&](int idx) { return pos[idx] >= 0 && ctx->needs_input_grad(pos[idx]); };
    variable_list result(ctx->saved_data["inputs"].toInt() + 1);  // one per input, and one for the plan
    if (!grads[0].defined()) return result;
    variable_list g(pos.size());  // per flattened tensor
    const Tensor grad = grads[0].contiguous(conv_output_format(out));
    Tensor sg, sgx, ds, dz, gm;
    {
      RECORD_USER_SCOPE("fused_resnet::B relu+bn backward");
      std::tie(dz, gm) = bn_backward(grad, out, Z(L - 1), F(L - 1, 0), F(L - 1, 1), F(L - 1, 2), c[9 + L - 1],
                                     kind != 2, sg, sgx);
    }
    const int last = w_at(static_cast<int>(L) - 1);
    if (needs(last + 2)) g[last + 2] = cast(sgx, pd);
    if (needs(last + 3)) g[last + 3] = cast(sg, pd);
    if (kind == 2) {
      RECORD_USER_SCOPE("fused_resnet::B shortcut relu+bn backward");
      Tensor ssg, ssgx;
      std::tie(ds, std::ignore) = bn_backward(grad, out, s, s_mean, s_invstd, s_scale, sc_bs, false, ssg, ssgx);
      if (needs(sc + 2)) g[sc + 2] = cast(ssgx, pd);
      if (needs(sc + 3)) g[sc + 3] = cast(ssg, pd);
    } else if (kind == 0) {
      if (needs(kXRes)) g[kXRes] = cast(gm, s_dtype);
    } else {
      ds = cast(gm, s_dtype);
    }
    Tensor dx_sc;
    for (int64_t i = L - 1; i >= 1; --i) {
      const int wi = w_at(static_cast<int>(i));
      const bool bs = c[9 + i];
      Tensor y, dy;
      {
        RECORD_USER_SCOPE("fused_resnet::B conv backward (input recomputed)");
        y = o.bn_act.call(Z(i - 1), as_f32(F(i - 1, 0)), as_f32(F(i - 1, 2)), as_f32(F(i - 1, 3)), {}, true,
                          Z(i - 1).scalar_type(), {}, {}, {});
        std::tie(dy, g[wi], g[wi + 1]) = conv_backward(dz, y, W(i), c[2 + i], c[5 + i], {true, needs(wi), needs(wi + 1) && !bs});
      }
      if (bs && needs(wi + 1)) g[wi + 1] = at::zeros({W(i).size(0)}, W(i).options());
      {
        RECORD_USER_SCOPE("fused_resnet::B relu+bn backward");
        std::tie(dz, std::ignore) = bn_backward(dy, y, Z(i - 1), F(i - 1, 0), F(i - 1, 1), F(i - 1, 2), c[9 + i - 1],
                                                false, sg, sgx);
      }
      const int prev = w_at(static_cast<int>(i) - 1);
      if (needs(prev + 2)) g[prev + 2] = cast(sgx, pd);
      if (needs(prev + 3)) g[prev + 3] = cast(sg, pd);
      if (i == L - 1 && kind != 0 && ds.defined()) {
        RECORD_USER_SCOPE("fused_resnet::B shortcut conv backward");
        const bool sc_stats = kind == 2 && sc_bs;
        std::tie(dx_sc, g[sc], g[sc + 1]) =
            conv_backward(ds, x, W(L), sc_stride, 0, {needs(kX), needs(sc), needs(sc + 1) && !sc_stats});
        if (sc_stats && needs(sc + 1)) g[sc + 1] = at::zeros({W(L).size(0)}, W(L).options());
      }
    }
    {
      RECORD_USER_SCOPE("fused_resnet::B conv backward");
      const bool bs0 = c[9];
      std::tie(g[kX], g[w_at(0)], g[w_at(0) + 1]) =
          conv_backward(dz, x, W(0), c[2], c[5], {needs(kX), needs(w_at(0)), needs(w_at(0) + 1) && !bs0});
      if (bs0 && needs(w_at(0) + 1)) g[w_at(0) + 1] = at::zeros({W(0).size(0)}, W(0).options());
    }
    if (dx_sc.defined()) g[kX] = g[kX].defined() ? g[kX] + dx_sc : dx_sc;
    for (size_t i = 0; i < pos.size(); ++i)
      if (pos[i] >= 0) result[pos[i]] = g[i];
    return result;
  }
};

std::vector<Opt> optionals(const c10::List<Opt>& list) {
  std::vector<Opt> out;
  out.reserve(list.size());
  for (const Opt& t : list) out.push_back(t);
  return out;
}

Tensor block_train(const c10::List<Opt>& tensors, at::TensorList kernel_weights, const c10::List<Opt>& running_means,
                   const c10::List<Opt>& running_vars, at::IntArrayRef config, at::ArrayRef<double> eps_factors) {
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
  TORCH_CHECK(static_cast<int64_t>(running_means.size()) == L + 1 && static_cast<int64_t>(running_vars.size()) == L + 1,
              name, ": running_means and running_vars must have ", L + 1, " entries");
  for (int64_t i = 0; i < L; ++i) p.stride[i] = config[2 + 2 * i], p.padding[i] = config[3 + 2 * i];
  p.sc_stride = config[2 + 2 * L];
  for (int64_t i = 0; i < L; ++i) p.batch_stats[i] = config[3 + 2 * L + i] != 0;
  p.batch_stats[3] = config[3 + 3 * L] != 0;
  for (int64_t i = 0; i <= L; ++i) {
    const int64_t at = i < L ? i : 3;
    p.eps[at] = eps_factors[2 * i], p.factor[at] = eps_factors[2 * i + 1];
  }
  p.kernel_weights = kernel_weights.vec();
  p.running_mean = optionals(running_means);
  p.running_var = optionals(running_vars);
  std::vector<Tensor> v, inputs;
  v.reserve(tensors.size());
  for (const Opt& t : tensors) {
    v.push_back(t.has_value() ? *t : Tensor());
    p.pos.push_back(v.back().defined() ? static_cast<int64_t>(inputs.size()) : -1);
    if (v.back().defined()) inputs.push_back(v.back());
  }
  const int sc = sc_at(L);
  TORCH_CHECK(v[kX].defined() && (p.kind != 0 || v[kXRes].defined()), name, ": x (and x_res for the identity) needed");
  for (int64_t i = 0; i < L; ++i) {
    const int b = w_at(static_cast<int>(i));
    TORCH_CHECK(v[b].defined() && v[b + 2].defined() && v[b + 3].defined(), name, ": chain conv ", i,
                " needs its weight and its BN's gamma and beta");
    const Opt& rm = p.running_mean[i];
    TORCH_CHECK(p.batch_stats[i] || (rm.has_value() && p.running_var[i].has_value()), name, ": BN ", i,
                " without batch statistics needs running statistics");
  }
  TORCH_CHECK(p.kind == 0 || v[sc].defined(), name, ": the shortcut convolution needs its weight");
  TORCH_CHECK(p.kind != 2 || (v[sc + 2].defined() && v[sc + 3].defined() &&
                              (p.batch_stats[3] || (p.running_mean[L].has_value() && p.running_var[L].has_value()))),
              name, ": the shortcut's BN needs gamma, beta and (without batch statistics) running statistics");
  return BlockTrain::apply(at::TensorList(inputs), p);
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_resnet, CompositeImplicitAutograd, m) { m.impl("block_train", &block_train); }

}  // namespace fused_resnet
