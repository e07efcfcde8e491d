"""The compiled extension (``csrc/``, built as ``fused_resnet._C``): thin wrappers over
``torch.ops.fused_resnet.*`` with their fake (meta) and autograd registrations, and the two backends
that use them, ``"cpp"`` (CPU tensors) and ``"cuda"`` (CUDA tensors).

The package imports and works where nothing was compiled: ``has_ops()`` is then False and neither
backend is available.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch
from torch import Tensor

from .base import BNFold, ConvOut, as_f32
from .packing import channels_dense_weight
from .torch_ref import TorchBackend, relu_grad

if os.environ.get("FUSED_RESNET_NO_EXTENSION", "").lower() in ("1", "true", "yes", "on"):
    _LOAD_ERROR: Optional[str] = "FUSED_RESNET_NO_EXTENSION is set"
else:
    try:
        from .. import _C  # noqa: F401  (loading the library registers the ops)
        _LOAD_ERROR = None
    except ImportError as exc:  # nothing compiled, or built against another torch
        _LOAD_ERROR = str(exc)


def has_ops() -> bool:
    """Whether the compiled operators are loaded."""
    return _LOAD_ERROR is None


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether ``fused_resnet::op`` has a kernel for ``dispatch_key`` ("CPU", "CUDA") in this build."""
    return has_ops() and torch._C._dispatch_has_kernel_for_dispatch_key(f"fused_resnet::{op}", dispatch_key)


def fast_caller(op: torch._ops.OpOverload):
    """``op``'s calls through ``fused_resnet._C.call`` (csrc/fast_call.cpp): plain tensors, numbers, dtypes
    and lists of them converted without torch.ops' argument parsing (its __torch_function__ checks and
    generic converters: ~36K instructions for a 23-argument call), the operator still called through the
    dispatcher. Any other call (a tensor subclass, a torch function mode, keywords) goes to ``op`` itself.
    ``op`` where the extension is not built."""
    call = getattr(_C, "call", None) if has_ops() else None
    if call is None or op._overloadname != "default":
        return op
    return functools.partial(call, _C.resolve(op._schema.name, op))


def _dense_format(t: Tensor) -> torch.memory_format:
    """The layout the C++ kernels produce for ``t``: NHWC when ``t`` is dense channels_last, else NCHW."""
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def bn_act(z: Tensor, mean: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor] = None,
           relu: bool = True, out_dtype: Optional[torch.dtype] = None,
           res_bn: Optional[tuple[Tensor, Tensor, Tensor]] = None) -> Tensor:
    """``act((z - mean[c]) * scale[c] + shift[c] (+ r))`` by the compiled kernel of ``z``'s device, ``r``
    the residual or, with ``res_bn = (res_mean, res_scale, res_shift)``, its own batch norm."""
    out_dtype = out_dtype or z.dtype
    want = z.dtype if res_bn is not None else out_dtype  # the dtype the kernel reads the residual in
    if residual is not None and residual.dtype != want:
        residual = residual.to(want)
    r_mean, r_scale, r_shift = res_bn if res_bn is not None else (None, None, None)
    return torch.ops.fused_resnet.bn_act.default(z, mean, scale, shift, residual, relu, out_dtype, r_mean, r_scale,
                                                 r_shift)


if has_ops():

    @torch.library.register_fake("fused_resnet::bn_act")
    def _bn_act_fake(z, mean, scale, shift, residual, relu, out_dtype, res_mean=None, res_scale=None, res_shift=None):
        torch._check(z.dim() == 4, lambda: f"bn_act: z must be 4-D, got {z.dim()}-D")
        torch._check(all(v.shape == (z.shape[1],) for v in (mean, scale, shift)),
                     lambda: "bn_act: mean, scale and shift must have one entry per channel of z")
        torch._check(residual is None or residual.shape == z.shape,
                     lambda: "bn_act: residual must have z's shape")
        return torch.empty(z.shape, dtype=out_dtype, device=z.device, memory_format=_dense_format(z))

    def _bn_act_setup(ctx, inputs, output):
        z, mean, scale, shift, residual, relu, out_dtype, res_mean, res_scale, res_shift = inputs
        ctx.relu, ctx.has_residual, ctx.res_bn = relu, residual is not None, res_scale is not None
        ctx.save_for_backward(z, mean, scale, output, residual if res_scale is not None else None, res_mean,
                              res_scale)

    def _bn_act_backward(ctx, grad):
        z, mean, scale, out, residual, res_mean, res_scale = ctx.saved_tensors
        gm = relu_grad(grad.float(), out) if ctx.relu else grad.float()
        dz = (gm * scale.view(1, -1, 1, 1)).to(z.dtype)
        dshift = gm.sum(dim=(0, 2, 3))
        dscale = (gm * (z.float() - mean.view(1, -1, 1, 1))).sum(dim=(0, 2, 3))
        dres = drm = drs = drsh = None
        if ctx.res_bn:  # r' = (r - res_mean) * res_scale + res_shift
            dres = (gm * res_scale.view(1, -1, 1, 1)).to(residual.dtype)
            drsh = dshift
            drm = -dshift * res_scale
            drs = (gm * (residual.float() - res_mean.view(1, -1, 1, 1))).sum(dim=(0, 2, 3))
        elif ctx.has_residual:
            dres = gm.to(out.dtype)
        return dz, -dshift * scale, dscale, dshift, dres, None, None, drm, drs, drsh

    torch.library.register_autograd("fused_resnet::bn_act", _bn_act_backward, setup_context=_bn_act_setup)


if has_ops():

    @torch.library.register_fake("fused_resnet::conv_fused")
    def _conv_fused_fake(x, weight, bias, stride, padding, bn_mean, bn_var, bn_gamma, bn_beta, bn_eps, in_mean,
                         in_scale, in_shift, residual, sc_x, sc_weight, sc_bias, sc_stride, sc_separate, relu, stats,
                         out_dtype, sc_stats=False):
        torch._check(x.dim() == 4 and weight.dim() == 4 and x.shape[1] == weight.shape[1],
                     lambda: "conv_fused: x (N, C, H, W) and weight (K, C, k, k) must agree on C")
        n, _, h, w = x.shape
        k, kh = weight.shape[0], weight.shape[2]
        p, q = (h + 2 * padding - kh) // stride + 1, (w + 2 * padding - kh) // stride + 1
        out = torch.empty((n, k, p, q), dtype=out_dtype, device=x.device, memory_format=_dense_format(x))
        separate = sc_weight is not None and sc_separate
        sc = torch.empty_like(out) if separate else x.new_empty((0,), dtype=torch.float32)
        sc_stats = sc_stats and separate
        stats = stats or sc_stats
        tiles = (n * p * q + STATS_TILE_ROWS - 1) // STATS_TILE_ROWS

        def part(used: bool, *shape) -> Tensor:
            return x.new_empty(shape if used else (0,), dtype=torch.float32)

        return (out, sc, part(stats, tiles, k), part(stats, tiles, k), part(stats, tiles), part(sc_stats, tiles, k),
                part(sc_stats, tiles, k))

    @torch.library.register_fake("fused_resnet::bn_finalize")
    def _bn_finalize_fake(part_mean, part_m2, part_count, gamma, beta, eps, running_mean, running_var, momentum,
                          num_batches_tracked=None):
        c = part_mean.shape[1]
        torch._check(gamma.shape == (c,), lambda: "bn_finalize: gamma must have one entry per channel")
        return tuple(part_mean.new_empty((c,)) for _ in range(4))

    @torch.library.register_fake("fused_resnet::bn_fold")
    def _bn_fold_fake(running_mean, running_var, gamma, beta, eps):
        c = running_mean.shape[0]
        torch._check(gamma.shape == (c,), lambda: "bn_fold: gamma must have one entry per channel")
        return tuple(running_mean.new_empty((c,), dtype=torch.float32) for _ in range(4))

    @torch.library.register_fake("fused_resnet::bn_backward_reduce")
    def _bn_backward_reduce_fake(grad, mask_src, z, mean, invstd):
        torch._check(grad.shape == z.shape, lambda: "bn_backward_reduce: grad must have z's shape")
        return z.new_empty((z.shape[1],), dtype=torch.float32), z.new_empty((z.shape[1],), dtype=torch.float32)

    @torch.library.register_fake("fused_resnet::bn_backward_apply")
    def _bn_backward_apply_fake(grad, mask_src, z, mean, invstd, scale, sum_g, sum_gx, count, batch_stats, want_gm):
        fmt = _dense_format(z)
        dz = torch.empty(z.shape, dtype=z.dtype, device=z.device, memory_format=fmt)
        gm = (torch.empty(z.shape, dtype=grad.dtype, device=z.device, memory_format=fmt) if want_gm
              else z.new_empty((0,)))
        return dz, gm


    @torch.library.register_fake("fused_resnet::im2col")
    def _im2col_fake(x, kernel, stride, padding):
        torch._check(x.dim() == 4, lambda: f"im2col: x must be 4-D, got {x.dim()}-D")
        n, c, h, w = x.shape
        p, q = (h + 2 * padding - kernel) // stride + 1, (w + 2 * padding - kernel) // stride + 1
        return x.new_empty((n * p * q, c * kernel * kernel))


def im2col(x: Tensor, kernel: int, stride: int = 1, padding: int = 0) -> Tensor:
    """The gather ``conv_fused`` performs, as an ``(N * P * Q, C * kernel * kernel)`` matrix (rows
    ``(n, p, q)``, columns in ``F.unfold``'s order, zeros in the padding), computed with the index math the
    CUDA convolution kernel uses (``csrc/conv_geometry.h``)."""
    return torch.ops.fused_resnet.im2col.default(x, kernel, stride, padding)


STATS_TILE_ROWS = 64  # csrc/conv_fused_common.h: kStatsTileRows
# conv_fused's eager calls (inference, the Python Functions' path): two per block call
_conv_fused_fast = fast_caller(torch.ops.fused_resnet.conv_fused.default) if has_ops() else None
OPS = ("bn_act", "conv_fused", "bn_finalize", "bn_fold", "bn_backward_reduce", "bn_backward_apply")


class _ExtensionBackend(TorchBackend):
    """Primitives compiled in ``csrc/`` for one device type. A primitive whose kernel this build lacks for
    the device comes from the torch backend, and the backend then counts as incomplete (``auto`` skips
    it)."""

    device_type = "?"
    dispatch_key = "?"

    def __init__(self) -> None:
        self.native = {op for op in OPS if has_kernel(op, self.dispatch_key)}
        self.complete = self.native == set(OPS)
        # The training block composed in C++ over these primitives (csrc/block_train.cpp).
        self.block_node = self.complete and has_kernel("block_train", "CompositeImplicitAutograd")

    def kernel_weight(self, weight: Tensor) -> Tensor:
        """A convolution weight as this backend's convolution kernel reads it best."""
        if self.device_type == "cuda" and not torch.compiler.is_compiling():
            # Channels-contiguous weights: what the kernel's cp.async loop reads (backends/packing.py).
            return channels_dense_weight(weight)
        return weight

    def available(self) -> bool:
        if self.device_type == "cuda" and not torch.cuda.is_available():
            return False
        return bool(self.native)

    def supports(self, device_type: str, dtype: torch.dtype, training: bool) -> Optional[str]:
        if device_type != self.device_type:
            return f"it runs {self.device_type} tensors, got a {device_type} tensor"
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return f"it supports float32, float16 and bfloat16, got {dtype}"
        return None

    def bn_act(self, z, mean, scale, shift, residual=None, relu=True, out_dtype=None, res_bn=None) -> Tensor:
        if "bn_act" not in self.native:
            return super().bn_act(z, mean, scale, shift, residual, relu, out_dtype, res_bn)
        res_bn = tuple(as_f32(v) for v in res_bn) if res_bn is not None else None
        return bn_act(z, as_f32(mean), as_f32(scale), as_f32(shift), residual, relu, out_dtype, res_bn)

    def conv_fused(self, x, weight, bias, *, stride, padding, bn=None, in_mean=None, in_scale=None, in_shift=None,
                   residual=None, sc_x=None, sc_weight=None, sc_bias=None, sc_stride=1, sc_separate=False,
                   relu=False, stats=False, out_dtype=None, sc_stats=False) -> ConvOut:
        if "conv_fused" not in self.native:
            return super().conv_fused(x, weight, bias, stride=stride, padding=padding, bn=bn, in_mean=in_mean,
                                      in_scale=in_scale, in_shift=in_shift, residual=residual, sc_x=sc_x,
                                      sc_weight=sc_weight, sc_bias=sc_bias, sc_stride=sc_stride,
                                      sc_separate=sc_separate, relu=relu, stats=stats, out_dtype=out_dtype,
                                      sc_stats=sc_stats)
        out_dtype = out_dtype or x.dtype
        weight = self.kernel_weight(weight)
        sc_weight = self.kernel_weight(sc_weight) if sc_weight is not None else None
        mean, var, gamma, beta, eps = bn if bn is not None else (None, None, None, None, 0.0)
        if in_scale is not None:
            in_mean, in_scale, in_shift = as_f32(in_mean), as_f32(in_scale), as_f32(in_shift)
        if residual is not None and residual.dtype != out_dtype:
            residual = residual.to(out_dtype)
        op = torch.ops.fused_resnet.conv_fused.default if torch.compiler.is_compiling() else _conv_fused_fast
        return ConvOut(*op(x, weight, bias, stride, padding, mean, var, gamma, beta, float(eps), in_mean, in_scale,
                           in_shift, residual, sc_x, sc_weight, sc_bias, sc_stride, sc_separate, relu, stats,
                           out_dtype, sc_stats))

    def bn_finalize(self, part_mean, part_m2, part_count, gamma, beta, eps, running_mean, running_var,
                    momentum, num_batches_tracked=None) -> BNFold:
        if "bn_finalize" not in self.native:
            return super().bn_finalize(part_mean, part_m2, part_count, gamma, beta, eps, running_mean, running_var,
                                       momentum, num_batches_tracked)
        return BNFold(*torch.ops.fused_resnet.bn_finalize.default(
            part_mean, part_m2, part_count, gamma, beta, float(eps), running_mean, running_var, float(momentum),
            num_batches_tracked))

    def bn_fold(self, running_mean, running_var, gamma, beta, eps) -> BNFold:
        if "bn_fold" not in self.native:
            return super().bn_fold(running_mean, running_var, gamma, beta, eps)
        return BNFold(*torch.ops.fused_resnet.bn_fold.default(running_mean, running_var, gamma, beta, float(eps)))

    def bn_backward_reduce(self, grad, mask_src, z, mean, invstd):
        if "bn_backward_reduce" not in self.native:
            return super().bn_backward_reduce(grad, mask_src, z, mean, invstd)
        return torch.ops.fused_resnet.bn_backward_reduce.default(grad, mask_src, z, as_f32(mean), as_f32(invstd))

    def bn_backward_apply(self, grad, mask_src, z, mean, invstd, scale, sum_g, sum_gx, count, batch_stats,
                          want_gm):
        if "bn_backward_apply" not in self.native:
            return super().bn_backward_apply(grad, mask_src, z, mean, invstd, scale, sum_g, sum_gx, count,
                                             batch_stats, want_gm)
        return torch.ops.fused_resnet.bn_backward_apply.default(
            grad, mask_src, z, as_f32(mean), as_f32(invstd), as_f32(scale),
            sum_g, sum_gx, int(count), bool(batch_stats), bool(want_gm))


class CppExtensionBackend(_ExtensionBackend):
    name, device_type, dispatch_key = "cpp", "cpu", "CPU"


class CudaExtensionBackend(_ExtensionBackend):
    name, device_type, dispatch_key = "cuda", "cuda", "CUDA"
