"""The compiled extension (``csrc/``, built as ``fused_resnet._C``): thin wrappers over
``torch.ops.fused_resnet.*`` with their fake (meta) and autograd registrations, and the two backends
that use them, ``"cpp"`` (CPU tensors) and ``"cuda"`` (CUDA tensors).

The package imports and works where nothing was compiled: ``has_ops()`` is then False and neither
backend is available.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .torch_ref import TorchBackend

try:
    from .. import _C  # noqa: F401  (loading the library registers the ops)
    _LOAD_ERROR: Optional[str] = None
except ImportError as exc:  # nothing compiled, or built against another torch
    _LOAD_ERROR = str(exc)


def has_ops() -> bool:
    """Whether the compiled operators are loaded."""
    return _LOAD_ERROR is None


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether ``fused_resnet::op`` has a kernel for ``dispatch_key`` ("CPU", "CUDA") in this build."""
    return has_ops() and torch._C._dispatch_has_kernel_for_dispatch_key(f"fused_resnet::{op}", dispatch_key)


def _dense_format(t: Tensor) -> torch.memory_format:
    """The layout the C++ kernels produce for ``t``: NHWC when ``t`` is dense channels_last, else NCHW."""
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def bn_act(z: Tensor, mean: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor] = None,
           relu: bool = True, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """``act((z - mean[c]) * scale[c] + shift[c] (+ residual))`` by the compiled kernel of ``z``'s device."""
    out_dtype = out_dtype or z.dtype
    if residual is not None and residual.dtype != out_dtype:
        residual = residual.to(out_dtype)
    return torch.ops.fused_resnet.bn_act.default(z, mean, scale, shift, residual, relu, out_dtype)


if has_ops():

    @torch.library.register_fake("fused_resnet::bn_act")
    def _bn_act_fake(z, mean, scale, shift, residual, relu, out_dtype):
        torch._check(z.dim() == 4, lambda: f"bn_act: z must be 4-D, got {z.dim()}-D")
        torch._check(all(v.shape == (z.shape[1],) for v in (mean, scale, shift)),
                     lambda: "bn_act: mean, scale and shift must have one entry per channel of z")
        torch._check(residual is None or residual.shape == z.shape,
                     lambda: "bn_act: residual must have z's shape")
        return torch.empty(z.shape, dtype=out_dtype, device=z.device, memory_format=_dense_format(z))

    def _bn_act_setup(ctx, inputs, output):
        z, mean, scale, shift, residual, relu, out_dtype = inputs
        ctx.relu, ctx.has_residual = relu, residual is not None
        ctx.save_for_backward(z, mean, scale, output)

    def _bn_act_backward(ctx, grad):
        z, mean, scale, out = ctx.saved_tensors
        gm = grad.float() * (out > 0) if ctx.relu else grad.float()
        dz = (gm * scale.view(1, -1, 1, 1)).to(z.dtype)
        dshift = gm.sum(dim=(0, 2, 3))
        dscale = (gm * (z.float() - mean.view(1, -1, 1, 1))).sum(dim=(0, 2, 3))
        dres = gm.to(out.dtype) if ctx.has_residual else None
        return dz, -dshift * scale, dscale, dshift, dres, None, None

    torch.library.register_autograd("fused_resnet::bn_act", _bn_act_backward, setup_context=_bn_act_setup)


class _ExtensionBackend(TorchBackend):
    """Primitives compiled in ``csrc/`` for one device type; the ones not compiled yet come from the
    torch backend, so the backend is marked incomplete and ``auto`` does not pick it."""

    device_type = "?"
    dispatch_key = "?"
    complete = False

    def available(self) -> bool:
        if self.device_type == "cuda" and not torch.cuda.is_available():
            return False
        return has_kernel("bn_act", self.dispatch_key)

    def supports(self, device_type: str, dtype: torch.dtype, training: bool) -> Optional[str]:
        if device_type != self.device_type:
            return f"it runs {self.device_type} tensors, got a {device_type} tensor"
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return f"it supports float32, float16 and bfloat16, got {dtype}"
        return None

    def bn_act(self, z, mean, scale, shift, residual=None, relu=True, out_dtype=None) -> Tensor:
        return bn_act(z, mean.float(), scale.float(), shift.float(), residual, relu, out_dtype)


class CppExtensionBackend(_ExtensionBackend):
    name, device_type, dispatch_key = "cpp", "cpu", "CPU"


class CudaExtensionBackend(_ExtensionBackend):
    name, device_type, dispatch_key = "cuda", "cuda", "CUDA"
