"""The Triton launches as torch.library custom ops with fake implementations, so a model holding fused
blocks compiles with ``torch.compile(fullgraph=True)`` without graph breaks.

``custom_op`` rather than ``triton_op``: ``triton_op`` hands fake tensors to the Triton interpreter, so
it cannot run in CI; one registration path for CPU and GPU keeps what CI tests what the GPU runs.
"""

from typing import Optional

import torch
from torch import Tensor

from .bn import launch_bn_add_relu, launch_bn_backward_apply, launch_bn_backward_reduce, launch_bn_finalize
from .conv import conv_plan, launch_conv, output_memory_format


@torch.library.custom_op("fused_resnet::triton_conv_fused", mutates_args=())
def conv_fused_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: int, padding: int,
                  bn_mean: Optional[Tensor], bn_var: Optional[Tensor], bn_gamma: Optional[Tensor],
                  bn_beta: Optional[Tensor], bn_eps: float, in_mean: Optional[Tensor], in_scale: Optional[Tensor],
                  in_shift: Optional[Tensor], residual: Optional[Tensor], sc_x: Optional[Tensor],
                  sc_weight: Optional[Tensor], sc_bias: Optional[Tensor], sc_stride: int, sc_separate: bool,
                  relu: bool, stats: bool, out_dtype: torch.dtype,
                  sc_stats: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return launch_conv(x, weight, bias, stride, padding, bn_mean, bn_var, bn_gamma, bn_beta, bn_eps, in_mean, in_scale,
                       in_shift, residual, sc_x, sc_weight, sc_bias, sc_stride, sc_separate, relu, stats,
                       out_dtype, sc_stats)


@conv_fused_op.register_fake
def _conv_fused_fake(x, weight, bias, stride, padding, bn_mean, bn_var, bn_gamma, bn_beta, bn_eps, in_mean, in_scale,
                     in_shift, residual, sc_x, sc_weight, sc_bias, sc_stride, sc_separate, relu, stats, out_dtype,
                     sc_stats):
    torch._check(x.dim() == 4 and weight.dim() == 4, lambda: "conv_fused: x and weight must be 4-D")
    torch._check(x.shape[1] == weight.shape[1], lambda: "conv_fused: x's channels must match weight's")
    p, q, m, cfg = conv_plan(x, weight, stride, padding)
    k = weight.shape[0]
    fmt = output_memory_format(x)
    out = torch.empty((x.shape[0], k, p, q), dtype=out_dtype, device=x.device, memory_format=fmt)
    separate = sc_weight is not None and sc_separate
    sc = torch.empty_like(out) if separate else x.new_empty((0,), dtype=torch.float32)
    tiles = (m + cfg.BLOCK_M - 1) // cfg.BLOCK_M

    def part(used: bool, *shape) -> Tensor:
        return x.new_empty(shape if used else (0,), dtype=torch.float32)

    sc_stats = sc_stats and separate
    stats = stats or sc_stats
    return (out, sc, part(stats, tiles, k), part(stats, tiles, k), part(stats, tiles), part(sc_stats, tiles, k),
            part(sc_stats, tiles, k))


@torch.library.custom_op("fused_resnet::triton_bn_finalize", mutates_args=("running_mean", "running_var"))
def bn_finalize_op(part_mean: Tensor, part_m2: Tensor, part_count: Tensor, gamma: Tensor, beta: Tensor,
                   eps: float, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                   momentum: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return launch_bn_finalize(part_mean, part_m2, part_count, gamma, beta, eps, running_mean, running_var,
                              momentum)


@bn_finalize_op.register_fake
def _bn_finalize_fake(part_mean, part_m2, part_count, gamma, beta, eps, running_mean, running_var, momentum):
    c = part_mean.shape[1]
    torch._check(gamma.shape == (c,), lambda: "bn_finalize: gamma must have one entry per channel")
    return tuple(part_mean.new_empty((c,)) for _ in range(4))


@torch.library.custom_op("fused_resnet::triton_bn_add_relu", mutates_args=())
def bn_add_relu_op(z: Tensor, mean: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor], relu: bool,
                   out_dtype: torch.dtype, res_mean: Optional[Tensor], res_scale: Optional[Tensor],
                   res_shift: Optional[Tensor]) -> Tensor:
    return launch_bn_add_relu(z, mean, scale, shift, residual, relu, out_dtype, res_mean, res_scale, res_shift)


@bn_add_relu_op.register_fake
def _bn_add_relu_fake(z, mean, scale, shift, residual, relu, out_dtype, res_mean, res_scale, res_shift):
    return torch.empty(z.shape, dtype=out_dtype, device=z.device, memory_format=output_memory_format(z))


@torch.library.custom_op("fused_resnet::triton_bn_backward_reduce", mutates_args=())
def bn_backward_reduce_op(grad: Tensor, mask_src: Tensor, z: Tensor, mean: Tensor,
                          invstd: Tensor) -> tuple[Tensor, Tensor]:
    return launch_bn_backward_reduce(grad, mask_src, z, mean, invstd)


@bn_backward_reduce_op.register_fake
def _bn_backward_reduce_fake(grad, mask_src, z, mean, invstd):
    c = z.shape[1]
    return z.new_empty((c,), dtype=torch.float32), z.new_empty((c,), dtype=torch.float32)


@torch.library.custom_op("fused_resnet::triton_bn_backward_apply", mutates_args=())
def bn_backward_apply_op(grad: Tensor, mask_src: Tensor, z: Tensor, mean: Tensor, invstd: Tensor, scale: Tensor,
                         sum_g: Tensor, sum_gx: Tensor, count: int, batch_stats: bool,
                         want_gm: bool) -> tuple[Tensor, Tensor]:
    return launch_bn_backward_apply(grad, mask_src, z, mean, invstd, scale, sum_g, sum_gx, count, batch_stats,
                                    want_gm)


@bn_backward_apply_op.register_fake
def _bn_backward_apply_fake(grad, mask_src, z, mean, invstd, scale, sum_g, sum_gx, count, batch_stats, want_gm):
    fmt = output_memory_format(z)
    dz = torch.empty(z.shape, dtype=z.dtype, device=z.device, memory_format=fmt)
    gm = (torch.empty(z.shape, dtype=grad.dtype, device=z.device, memory_format=fmt) if want_gm
          else z.new_empty((0,), dtype=torch.float32))
    return dz, gm
