"""The Triton launches as operators of the ``fused_resnet`` namespace, with fake implementations.

Two callers: torch.compile (a model holding fused blocks compiles with ``fullgraph=True`` without graph
breaks) and the training block composed in C++ (``torch.ops.fused_resnet.block_train`` with
``primitives="triton_"``: csrc/block_train.cpp calls ``fused_resnet::triton_<primitive>`` through the
dispatcher, the same way it calls the extension's own kernels). The schemas are the extension's
(csrc/ops.cpp) under a ``triton_`` prefix, argument for argument, so one C++ composition serves both.

Defined with ``torch.library.Library`` and plain Python kernels, not ``custom_op``: the dispatcher then
calls the launcher directly (~3 us per call on a CI-class CPU; ``custom_op``'s wrapper costs ~10 us more,
a dozen times per training step). Not ``triton_op`` either: it hands fake tensors to the Triton
interpreter, so it cannot run in CI; one registration path for CPU and GPU keeps what CI tests what the
GPU runs. The kernels register for CPU (the interpreter's and the offline check's stand-ins) and CUDA;
each can run under replay.py's capture, which lets block_train replay a call's launches from C++.
"""

import torch

from ..extension import has_kernel
from .bn import (launch_bn_add_relu, launch_bn_backward_apply, launch_bn_backward_reduce, launch_bn_finalize,
                 launch_bn_fold)
from .conv import conv_plan, is_training_variant, launch_conv, output_memory_format
from .replay import capturing

PREFIX = "triton_"  # block_train's ``primitives`` argument for this backend

SCHEMAS = {
    "conv_fused": "(Tensor x, Tensor weight, Tensor? bias, int stride, int padding, Tensor? bn_mean, "
                  "Tensor? bn_var, Tensor? bn_gamma, Tensor? bn_beta, float bn_eps, Tensor? in_mean, "
                  "Tensor? in_scale, Tensor? in_shift, Tensor? residual, Tensor? sc_x, Tensor? sc_weight, "
                  "Tensor? sc_bias, int sc_stride, bool sc_separate, bool relu, bool stats, ScalarType out_dtype, "
                  "bool sc_stats=False) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    "bn_finalize": "(Tensor part_mean, Tensor part_m2, Tensor part_count, Tensor gamma, Tensor beta, float eps, "
                   "Tensor(a!)? running_mean, Tensor(b!)? running_var, float momentum, "
                   "Tensor(c!)? num_batches_tracked=None) -> (Tensor, Tensor, Tensor, Tensor)",
    "bn_fold": "(Tensor running_mean, Tensor running_var, Tensor gamma, Tensor beta, float eps) "
               "-> (Tensor, Tensor, Tensor, Tensor)",
    "bn_act": "(Tensor z, Tensor mean, Tensor scale, Tensor shift, Tensor? residual, bool relu, ScalarType out_dtype, "
              "Tensor? res_mean=None, Tensor? res_scale=None, Tensor? res_shift=None) -> Tensor",
    "bn_backward_reduce": "(Tensor grad, Tensor mask_src, Tensor z, Tensor mean, Tensor invstd) -> (Tensor, Tensor)",
    "bn_backward_apply": "(Tensor grad, Tensor mask_src, Tensor z, Tensor mean, Tensor invstd, Tensor scale, "
                         "Tensor sum_g, Tensor sum_gx, int count, bool batch_stats, bool want_gm) -> (Tensor, Tensor)",
}


# launch_conv's default: distinct placeholders (an operator's outputs must not alias one another)
KERNELS = {"conv_fused": launch_conv, "bn_finalize": launch_bn_finalize, "bn_fold": launch_bn_fold,
           "bn_act": launch_bn_add_relu,
           "bn_backward_reduce": launch_bn_backward_reduce, "bn_backward_apply": launch_bn_backward_apply}

_LIB = torch.library.Library("fused_resnet", "FRAGMENT")
for _name, _schema in SCHEMAS.items():
    _LIB.define(PREFIX + _name + _schema)
    for _key in ("CPU", "CUDA"):
        _LIB.impl(PREFIX + _name, capturing(KERNELS[_name]), _key)


def _op(name: str) -> torch._ops.OpOverload:
    return getattr(torch.ops.fused_resnet, PREFIX + name).default


conv_fused_op = _op("conv_fused")
bn_finalize_op = _op("bn_finalize")
bn_fold_op = _op("bn_fold")
bn_act_op = _op("bn_act")
bn_backward_reduce_op = _op("bn_backward_reduce")
bn_backward_apply_op = _op("bn_backward_apply")


@torch.library.register_fake(conv_fused_op)
def _conv_fused_fake(x, weight, bias, stride, padding, bn_mean, bn_var, bn_gamma, bn_beta, bn_eps, in_mean, in_scale,
                     in_shift, residual, sc_x, sc_weight, sc_bias, sc_stride, sc_separate, relu, stats, out_dtype,
                     sc_stats=False):
    torch._check(x.dim() == 4 and weight.dim() == 4, lambda: "conv_fused: x and weight must be 4-D")
    torch._check(x.shape[1] == weight.shape[1], lambda: "conv_fused: x's channels must match weight's")
    # The tile the launcher picks (and with it the number of statistics rows) depends on the sizes: under
    # dynamic shapes they are specialised here (a guard each; another size recompiles), never guessed.
    sized = [t.new_empty([int(d) for d in t.shape]) for t in (x, weight)]
    p, q, m, cfg = conv_plan(*sized, stride, padding, is_training_variant(in_scale, stats, sc_stats))
    k = weight.shape[0]
    fmt = output_memory_format(x)
    out = torch.empty((x.shape[0], k, p, q), dtype=out_dtype, device=x.device, memory_format=fmt)
    separate = sc_weight is not None and sc_separate
    sc = torch.empty_like(out) if separate else x.new_empty((0,), dtype=torch.float32)
    tiles = (m + cfg.BLOCK_M - 1) // cfg.BLOCK_M

    def part(used: bool, *shape) -> torch.Tensor:
        return x.new_empty(shape if used else (0,), dtype=torch.float32)

    sc_stats = sc_stats and separate
    stats = stats or sc_stats
    return (out, sc, part(stats, tiles, k), part(stats, tiles, k), part(stats, tiles), part(sc_stats, tiles, k),
            part(sc_stats, tiles, k))


# The extension's fused_resnet::replayed_triton_conv_fused (csrc/replay.h): this convolution, its calls
# replayed from C++; what the backend's eager inference calls. None where the extension is not built.
replayed_conv_fused_op = None
if has_kernel("replayed_triton_conv_fused", "CompositeExplicitAutograd"):
    replayed_conv_fused_op = torch.ops.fused_resnet.replayed_triton_conv_fused.default
    torch.library.register_fake(replayed_conv_fused_op)(_conv_fused_fake)

# fused_resnet::replayed_triton_conv_out: its first result (out) alone, for calls that want no other
# (inference): a replayed call makes no tensor for the six empty ones, and Python wraps one result.
replayed_conv_out_op = None
if has_kernel("replayed_triton_conv_out", "CompositeExplicitAutograd"):
    replayed_conv_out_op = torch.ops.fused_resnet.replayed_triton_conv_out.default

    @torch.library.register_fake(replayed_conv_out_op)
    def _conv_out_fake(*args, **kwargs):
        return _conv_fused_fake(*args, **kwargs)[0]


@torch.library.register_fake(bn_finalize_op)
def _bn_finalize_fake(part_mean, part_m2, part_count, gamma, beta, eps, running_mean, running_var, momentum,
                      num_batches_tracked=None):
    c = part_mean.shape[1]
    torch._check(gamma.shape == (c,), lambda: "bn_finalize: gamma must have one entry per channel")
    return tuple(part_mean.new_empty((c,)) for _ in range(4))


@torch.library.register_fake(bn_fold_op)
def _bn_fold_fake(running_mean, running_var, gamma, beta, eps):
    c = running_mean.shape[0]
    torch._check(gamma.shape == (c,), lambda: "bn_fold: gamma must have one entry per channel")
    return tuple(running_mean.new_empty((c,), dtype=torch.float32) for _ in range(4))


@torch.library.register_fake(bn_act_op)
def _bn_act_fake(z, mean, scale, shift, residual, relu, out_dtype, res_mean=None, res_scale=None, res_shift=None):
    return torch.empty(z.shape, dtype=out_dtype, device=z.device, memory_format=output_memory_format(z))


@torch.library.register_fake(bn_backward_reduce_op)
def _bn_backward_reduce_fake(grad, mask_src, z, mean, invstd):
    c = z.shape[1]
    return z.new_empty((c,), dtype=torch.float32), z.new_empty((c,), dtype=torch.float32)


@torch.library.register_fake(bn_backward_apply_op)
def _bn_backward_apply_fake(grad, mask_src, z, mean, invstd, scale, sum_g, sum_gx, count, batch_stats, want_gm):
    fmt = output_memory_format(z)
    dz = torch.empty(z.shape, dtype=z.dtype, device=z.device, memory_format=fmt)
    gm = (torch.empty(z.shape, dtype=grad.dtype, device=z.device, memory_format=fmt) if want_gm
          else z.new_empty((0,), dtype=torch.float32))
    return dz, gm
