"""The Triton launches as torch.library custom ops with fake implementations, so a model holding fused
blocks compiles with ``torch.compile(fullgraph=True)`` without graph breaks.

``custom_op`` rather than ``triton_op``: ``triton_op`` hands fake tensors to the Triton interpreter, so
it cannot run in CI; one registration path for CPU and GPU keeps what CI tests what the GPU runs.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .conv import conv_plan, launch_conv, output_memory_format


@torch.library.custom_op("fused_resnet::triton_conv_fused", mutates_args=())
def conv_fused_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: int, padding: int,
                  bn_mean: Optional[Tensor], bn_var: Optional[Tensor], bn_gamma: Optional[Tensor],
                  bn_beta: Optional[Tensor], bn_eps: float, in_scale: Optional[Tensor],
                  in_shift: Optional[Tensor], residual: Optional[Tensor], sc_x: Optional[Tensor],
                  sc_weight: Optional[Tensor], sc_bias: Optional[Tensor], sc_stride: int, sc_separate: bool,
                  relu: bool, stats: bool, out_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return launch_conv(x, weight, bias, stride, padding, bn_mean, bn_var, bn_gamma, bn_beta, bn_eps, in_scale,
                       in_shift, residual, sc_x, sc_weight, sc_bias, sc_stride, sc_separate, relu, stats,
                       out_dtype)


@conv_fused_op.register_fake
def _conv_fused_fake(x, weight, bias, stride, padding, bn_mean, bn_var, bn_gamma, bn_beta, bn_eps, in_scale,
                     in_shift, residual, sc_x, sc_weight, sc_bias, sc_stride, sc_separate, relu, stats, out_dtype):
    torch._check(x.dim() == 4 and weight.dim() == 4, lambda: "conv_fused: x and weight must be 4-D")
    torch._check(x.shape[1] == weight.shape[1], lambda: "conv_fused: x's channels must match weight's")
    p, q, m, cfg = conv_plan(x, weight, stride, padding)
    k = weight.shape[0]
    fmt = output_memory_format(x)
    out = torch.empty((x.shape[0], k, p, q), dtype=out_dtype, device=x.device, memory_format=fmt)
    sc = (torch.empty_like(out) if sc_weight is not None and sc_separate
          else x.new_empty((0,), dtype=torch.float32))
    if stats:
        tiles = (m + cfg.BLOCK_M - 1) // cfg.BLOCK_M
        return (out, sc, x.new_empty((tiles, k), dtype=torch.float32),
                x.new_empty((tiles, k), dtype=torch.float32), x.new_empty((tiles,), dtype=torch.float32))
    return (out, sc, *(x.new_empty((0,), dtype=torch.float32) for _ in range(3)))
