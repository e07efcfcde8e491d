"""The primitive set every backend implements (DESIGN.md section 2).

A backend supplies these primitives and nothing else; the block itself is composed once, in
``fused_resnet.functional``. Shapes: activations are (N, C, H, W) in any memory format; per-channel
vectors are float32 of length C unless said otherwise.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor


# Tests set this: outputs that kernels allocate start as NaN, so an unwritten element cannot pass.
POISON_OUTPUTS = False


def new_output(shape, dtype: torch.dtype, device: torch.device,
               memory_format: torch.memory_format = torch.contiguous_format) -> Tensor:
    """Allocate a kernel's output (poisoned with NaN when ``POISON_OUTPUTS``)."""
    out = torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)
    return out.fill_(float("nan")) if POISON_OUTPUTS else out


def as_f32(v: Tensor) -> Tensor:
    """A per-channel vector as contiguous float32: itself when it already is (most calls; a no-op
    ``.float()`` still dispatches an operator, which a block call pays several times over)."""
    return v if v.dtype == torch.float32 and v.is_contiguous() else v.float().contiguous()


class ConvOut(NamedTuple):
    """What ``conv_fused`` returns. Fields a call did not ask for are empty tensors."""

    out: Tensor          # the epilogue's result, in ``out_dtype``
    shortcut: Tensor     # conv(sc_x) + sc_bias when ``sc_separate``; else empty
    part_mean: Tensor    # (T, C) float32 per-tile channel means of the pre-residual output, when ``stats``
    part_m2: Tensor      # (T, C) float32 per-tile sums of squared deviations from ``part_mean``
    part_count: Tensor   # (T,) float32 number of output positions each tile covers
    sc_part_mean: Tensor  # (T, C) the same statistics of the separate shortcut, when ``sc_stats``
    sc_part_m2: Tensor


class BNFold(NamedTuple):
    """Per-channel results of ``bn_finalize``: ``y = (z - mean) * scale + shift`` normalises ``z``
    (``scale = gamma * invstd``, ``shift = beta``). Subtracting the mean first keeps the precision a
    folded ``z * scale + (beta - mean * scale)`` loses when |mean| >> std (a large conv bias)."""

    scale: Tensor
    shift: Tensor
    mean: Tensor
    invstd: Tensor


class Backend:
    """Interface of a backend. Subclasses override every primitive they fuse.

    ``supports`` answers why a backend cannot serve an input (or ``None`` when it can); ``complete``
    says whether the backend implements all primitives natively (only complete backends take part in
    ``backend="auto"``).
    """

    name: str = "?"
    complete: bool = True
    # Whether the training block runs composed in C++ (torch.ops.fused_resnet.block_train: C++ autograd
    # nodes over this backend's primitives), rather than as functional.py's three Python autograd Functions;
    # ``primitives`` names them for block_train: "" the extension's operators, else the prefix of this
    # backend's operators of the same schemas (``fused_resnet::<prefix>conv_fused``, ...).
    block_node: bool = False
    primitives: str = ""

    def available(self) -> bool:
        """Whether this installation can run the backend at all (a library loaded, a compiler present)."""
        return True

    def kernel_weight(self, weight: Tensor) -> Tensor:
        """A convolution weight as this backend's convolution reads it (what block_train hands its
        ``conv_fused``); the weight itself unless a backend repacks it."""
        return weight

    def supports(self, device_type: str, dtype: torch.dtype, training: bool) -> Optional[str]:
        """Why this backend cannot run an input of ``dtype`` on ``device_type`` (in training mode or not),
        or ``None`` when it can."""
        return None

    def conv_fused(
        self,
        x: Tensor,
        weight: Tensor,
        bias: Optional[Tensor],
        *,
        stride: int,
        padding: int,
        bn: Optional[tuple[Tensor, Tensor, Tensor, Tensor, float]] = None,
        in_mean: Optional[Tensor] = None,
        in_scale: Optional[Tensor] = None,
        in_shift: Optional[Tensor] = None,
        residual: Optional[Tensor] = None,
        sc_x: Optional[Tensor] = None,
        sc_weight: Optional[Tensor] = None,
        sc_bias: Optional[Tensor] = None,
        sc_stride: int = 1,
        sc_separate: bool = False,
        relu: bool = False,
        stats: bool = False,
        out_dtype: Optional[torch.dtype] = None,
        sc_stats: bool = False,
    ) -> ConvOut:
        """``out = act(affine(conv(prologue(x), weight) + bias) [+ conv(sc_x) + sc_bias] [+ residual])``.

        - prologue: ``relu((x - in_mean) * in_scale + in_shift)`` per input channel when given; the
          convolution's zero padding is applied after it (a padded position contributes 0).
        - affine: when ``bn = (running_mean, running_var, gamma, beta, eps)`` is given, the batch norm is
          folded in the epilogue: ``(z - mean) * gamma / sqrt(var + eps) + beta``, in float32.
        - shortcut: the 1x1 convolution of ``sc_x`` at stride ``sc_stride`` (+ ``sc_bias`` when given),
          added to the output, or returned on its own when ``sc_separate``.
        - stats: per-tile (count, mean, M2) of the output before residual, shortcut and ReLU;
          ``sc_stats`` (with ``sc_separate``): the same of the shortcut, over the same tiles (for a batch
          norm that follows the shortcut convolution), and the counts even without ``stats``.
        """
        raise NotImplementedError

    def bn_finalize(self, part_mean: Tensor, part_m2: Tensor, part_count: Tensor, gamma: Tensor,
                    beta: Tensor, eps: float, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                    momentum: float, num_batches_tracked: Optional[Tensor] = None) -> BNFold:
        """Merge per-tile statistics (Chan et al.) into batch mean/variance, fold them with gamma/beta and,
        when running stats are given, update them in place as ``BatchNorm2d`` does (unbiased variance);
        count the batch in ``num_batches_tracked`` (one int64 element) when it is given, in the same
        kernel (no launch of its own)."""
        raise NotImplementedError

    def bn_fold(self, running_mean: Tensor, running_var: Tensor, gamma: Tensor, beta: Tensor,
                eps: float) -> BNFold:
        """A BN's fixed statistics folded with gamma and beta, in float32 (float64 for float64 inputs): what a
        block in training normalises with where a BN is in eval mode. One launch in the compiled backends."""
        from .torch_ref import bn_fold
        return bn_fold(running_mean, running_var, gamma, beta, eps)

    def bn_merge(self, part_mean: Tensor, part_m2: Tensor, part_count: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Merge per-tile statistics (Chan et al.) into one row: per-channel mean (C,), M2 (C,) and the
        count (1,) -- what a process contributes to a synchronized batch norm. Deterministic."""
        from .torch_ref import merge_stats
        mean, m2, count = merge_stats(part_mean, part_m2, part_count)
        return mean, m2, count.reshape(1)

    def bn_act(self, z: Tensor, mean: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor] = None,
               relu: bool = True, out_dtype: Optional[torch.dtype] = None,
               res_bn: Optional[tuple[Tensor, Tensor, Tensor]] = None) -> Tensor:
        """``act((z - mean) * scale + shift [+ r])`` per channel, with ``r`` the residual, or, when ``res_bn
        = (res_mean, res_scale, res_shift)`` is given, its own batch norm ``(residual - res_mean) * res_scale
        + res_shift`` (a shortcut convolution followed by BN)."""
        raise NotImplementedError

    def bn_backward_reduce(self, grad: Tensor, mask_src: Tensor, z: Tensor, mean: Tensor,
                           invstd: Tensor) -> tuple[Tensor, Tensor]:
        """Per-channel ``sum(gm)`` and ``sum(gm * xhat)`` with ``gm = where(mask_src <= 0, 0, grad)`` and
        ``xhat = (z - mean) * invstd``; float32. ``gm`` is a select, as ReLU's own backward (aten's
        threshold_backward): a masked-out gradient is zero even when it is not finite, and a NaN
        ``mask_src`` passes its gradient."""
        raise NotImplementedError

    def bn_backward_apply(self, grad: Tensor, mask_src: Tensor, z: Tensor, mean: Tensor, invstd: Tensor,
                          scale: Tensor, sum_g: Tensor, sum_gx: Tensor, count: int, batch_stats: bool,
                          want_gm: bool) -> tuple[Tensor, Tensor]:
        """``dz`` of ReLU after BN, and ``gm = where(mask_src <= 0, 0, grad)`` when ``want_gm`` (else empty).

        With batch statistics ``dz = scale * (gm - sum_g / count - xhat * sum_gx / count)``; with fixed
        (running) statistics ``dz = scale * gm``."""
        raise NotImplementedError

    def conv_backward(self, grad: Tensor, x: Tensor, weight: Tensor, stride: int, padding: int,
                      output_mask: tuple[bool, bool, bool]) -> tuple[Optional[Tensor], ...]:
        """Gradients of a biased convolution for (input, weight, bias), each where ``output_mask`` asks."""
        return torch.ops.aten.convolution_backward(
            grad, x, weight, [weight.shape[0]], [stride, stride], [padding, padding], [1, 1], False, [0, 0],
            1, list(output_mask))
