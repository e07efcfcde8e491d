"""The Triton backend: implicit-GEMM convolutions with BN, residual, shortcut and ReLU fused in
(``conv.py``), registered as custom ops (``ops.py``), tile configurations in ``configs.py``.

Inference runs entirely in these kernels (two launches per block). Primitives this backend does not
implement natively yet come from the torch backend: they serve eval mode with gradients enabled (the
backward of fine-tuning with frozen BN).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..base import ConvOut
from ..torch_ref import TorchBackend
from .configs import interpreting
from .counters import LAUNCHES, counting

__all__ = ["TritonBackend", "LAUNCHES", "counting"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class TritonBackend(TorchBackend):
    name = "triton"

    def available(self) -> bool:
        return torch.cuda.is_available() or interpreting()

    def supports(self, device_type: str, dtype: torch.dtype, training: bool) -> Optional[str]:
        if training:
            return "training mode (batch statistics) is not implemented in Triton yet"
        if device_type == "cpu" and not interpreting():
            return "it runs CUDA tensors (CPU tensors only under TRITON_INTERPRET=1)"
        if device_type not in ("cuda", "cpu"):
            return f"it runs CUDA tensors, got a {device_type} tensor"
        if dtype not in _DTYPES:
            return f"it supports float32, float16 and bfloat16, got {dtype}"
        if dtype == torch.bfloat16 and interpreting():
            return "the Triton interpreter computes bfloat16 dot products wrongly; bfloat16 runs on the GPU"
        return None

    def conv_fused(self, x, weight, bias, *, stride, padding, bn=None, in_scale=None, in_shift=None,
                   residual=None, sc_x=None, sc_weight=None, sc_bias=None, sc_stride=1, sc_separate=False,
                   relu=False, stats=False, out_dtype=None) -> ConvOut:
        from .ops import conv_fused_op

        mean, var, gamma, beta, eps = bn if bn is not None else (None, None, None, None, 0.0)
        if in_scale is not None:
            in_scale, in_shift = in_scale.float().contiguous(), in_shift.float().contiguous()
        return ConvOut(*conv_fused_op(
            x, weight, bias, stride, padding, mean, var, gamma, beta, float(eps), in_scale, in_shift, residual,
            sc_x, sc_weight, sc_bias, sc_stride, sc_separate, relu, stats, out_dtype or x.dtype))
