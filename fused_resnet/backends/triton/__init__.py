"""The Triton backend: implicit-GEMM convolutions with BN, residual, shortcut and ReLU fused in
(``conv.py``), the batch-norm finalize, apply and backward kernels (``bn.py``), registered as custom
ops (``ops.py``), tile configurations in ``configs.py``, every launch through ``launch.py``.

Inference runs in two launches per block; training forward in three heavy kernels and two finalizes.
The convolution gradients use ``aten.convolution_backward`` (cuDNN), inherited from the base backend.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..base import Backend, BNFold, ConvOut, as_f32
from ..packing import channels_dense_weight
from . import bn as bn_kernels, conv as conv_kernels, ops, replay
from .configs import interpreting
from .launch import LAUNCHES, counting, executing, offline_active, recording

__all__ = ["TritonBackend", "LAUNCHES", "counting", "recording"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class TritonBackend(Backend):
    name = "triton"
    primitives = ops.PREFIX

    def __init__(self) -> None:
        from ..extension import fast_caller, has_kernel
        self._block_node = has_kernel("block_train", "CompositeImplicitAutograd")
        # fused_resnet::replayed_triton_conv_fused / _out where the extension has them (conv_fused below), called
        # through fused_resnet._C.call (extension.fast_caller: no torch.ops argument parsing)
        full, out = ops.replayed_conv_fused_op, ops.replayed_conv_out_op
        self._replayed_conv = fast_caller(full) if replay.ENABLED and full is not None else None
        self._replayed_conv_out = fast_caller(out) if replay.ENABLED and out is not None else None
        self._no_output: dict[int, Tensor] = {}  # per device index (CPU: -1): an out-only call's empty fields

    # Training composed in C++ over this backend's operators (ops.py) where the extension is built: the
    # Python autograd Functions cost more host time than the kernels take at small shapes. Not in a dry run
    # (the C++ nodes compute the convolution gradients themselves, with aten).
    @property
    def block_node(self) -> bool:
        return self._block_node and executing()

    @block_node.setter
    def block_node(self, value: bool) -> None:
        self._block_node = value

    def kernel_weight(self, weight: Tensor) -> Tensor:
        """Channels-contiguous (backends/packing.py, cached per weight version): block_train hands the
        convolution operator the weight it reads, so a call's launches read only its arguments (what lets
        replay.py replay them)."""
        return weight if torch.compiler.is_compiling() else channels_dense_weight(weight)

    def available(self) -> bool:
        return torch.cuda.is_available() or interpreting() or offline_active()

    def supports(self, device_type: str, dtype: torch.dtype, training: bool) -> Optional[str]:
        if device_type == "cpu" and not (interpreting() or offline_active()):
            return "it runs CUDA tensors (CPU tensors only under TRITON_INTERPRET=1)"
        if device_type not in ("cuda", "cpu"):
            return f"it runs CUDA tensors, got a {device_type} tensor"
        if dtype not in _DTYPES:
            return f"it supports float32, float16 and bfloat16, got {dtype}"
        if dtype == torch.bfloat16 and interpreting() and executing():
            return "the Triton interpreter computes bfloat16 dot products wrongly; bfloat16 runs on the GPU"
        return None

    # Eager calls go to the launchers: the convolution through its replayed operator where the extension has
    # it (after a key's second call C++ allocates and launches, replay.py), the others directly (the operator
    # layer costs host time a call should not pay). Under torch.compile the operators (``ops.py``) stand in,
    # with their fake implementations.
    def conv_fused(self, x, weight, bias, *, stride, padding, bn=None, in_mean=None, in_scale=None, in_shift=None,
                   residual=None, sc_x=None, sc_weight=None, sc_bias=None, sc_stride=1, sc_separate=False,
                   relu=False, stats=False, out_dtype=None, sc_stats=False) -> ConvOut:
        mean, var, gamma, beta, eps = bn if bn is not None else (None, None, None, None, 0.0)
        if in_scale is not None:
            in_mean, in_scale, in_shift = (as_f32(v) for v in (in_mean, in_scale, in_shift))
        compiling = torch.compiler.is_compiling()
        replayed = self._replayed_conv is not None and not compiling
        if replayed:  # a plan reads only the call's arguments: the packed weights are passed, not looked up
            weight = channels_dense_weight(weight)
            sc_weight = channels_dense_weight(sc_weight) if sc_weight is not None else None
        args = (x, weight, bias, stride, padding, mean, var, gamma, beta, float(eps), in_mean, in_scale, in_shift,
                residual, sc_x, sc_weight, sc_bias, sc_stride, sc_separate, relu, stats, out_dtype or x.dtype, sc_stats)
        if compiling:
            return ConvOut(*ops.conv_fused_op(*args))
        if replayed:
            if stats or sc_stats or (sc_weight is not None and sc_separate) or self._replayed_conv_out is None:
                return ConvOut(*self._replayed_conv(*args))
            # Only `out` is asked for (inference): the other fields one shared empty tensor, as launch_conv
            # gives eager callers.
            none = self._no_output.get(x.get_device())
            if none is None:
                none = self._no_output[x.get_device()] = torch.empty(0, device=x.device, dtype=torch.float32)
            return ConvOut(self._replayed_conv_out(*args), none, none, none, none, none, none)
        return ConvOut(*conv_kernels.launch_conv(*args, distinct_placeholders=False))

    def bn_finalize(self, part_mean, part_m2, part_count, gamma, beta, eps, running_mean, running_var,
                    momentum, num_batches_tracked=None) -> BNFold:
        fn = ops.bn_finalize_op if torch.compiler.is_compiling() else bn_kernels.launch_bn_finalize
        return BNFold(*fn(part_mean, part_m2, part_count, gamma, beta, float(eps), running_mean, running_var,
                          float(momentum), num_batches_tracked))

    def bn_fold(self, running_mean, running_var, gamma, beta, eps) -> BNFold:
        fn = ops.bn_fold_op if torch.compiler.is_compiling() else bn_kernels.launch_bn_fold
        return BNFold(*fn(running_mean, running_var, gamma, beta, float(eps)))

    def bn_merge(self, part_mean, part_m2, part_count):
        if torch.compiler.is_compiling():
            return super().bn_merge(part_mean, part_m2, part_count)
        return bn_kernels.launch_bn_merge(part_mean, part_m2, part_count)

    def bn_act(self, z, mean, scale, shift, residual=None, relu=True, out_dtype=None, res_bn=None) -> Tensor:
        fn = ops.bn_act_op if torch.compiler.is_compiling() else bn_kernels.launch_bn_add_relu
        r_mean, r_scale, r_shift = (as_f32(v) for v in res_bn) if res_bn is not None else (None, None, None)
        return fn(z, as_f32(mean), as_f32(scale), as_f32(shift), residual, relu, out_dtype or z.dtype, r_mean, r_scale,
                  r_shift)

    def conv_backward(self, grad, x, weight, stride, padding, output_mask):
        if not executing():  # a dry run lists Triton launches: the cuDNN gradients need not run either
            return (torch.empty_like(x) if output_mask[0] else None,
                    torch.empty_like(weight) if output_mask[1] else None,
                    weight.new_empty(weight.shape[0]) if output_mask[2] else None)
        return super().conv_backward(grad, x, weight, stride, padding, output_mask)

    def bn_backward_reduce(self, grad, mask_src, z, mean, invstd):
        fn = ops.bn_backward_reduce_op if torch.compiler.is_compiling() else bn_kernels.launch_bn_backward_reduce
        return fn(grad, mask_src, z, mean, invstd)

    def bn_backward_apply(self, grad, mask_src, z, mean, invstd, scale, sum_g, sum_gx, count, batch_stats,
                          want_gm):
        fn = ops.bn_backward_apply_op if torch.compiler.is_compiling() else bn_kernels.launch_bn_backward_apply
        return fn(grad, mask_src, z, as_f32(mean), as_f32(invstd), as_f32(scale), sum_g, sum_gx, int(count),
                  bool(batch_stats), bool(want_gm))
