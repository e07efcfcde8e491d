"""The primitives in plain PyTorch: the fallback for every device and the oracle each backend's
primitives are tested against. Arithmetic follows the kernels: float32 epilogues, statistics of the
float32 pre-activation, results stored in the requested dtype."""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Backend, BNFold, ConvOut



def _empty(device: torch.device) -> Tensor:
    """A placeholder for an output a call did not ask for: a distinct tensor each time (an autograd
    Function returning one tensor twice does not trace under torch.compile)."""
    return torch.empty(0, device=device)


def _acc(t: Tensor) -> Tensor:
    """``t`` in the accumulation dtype: float32, or float64 for float64 tensors (the torch backend also
    serves float64, which the kernels do not)."""
    return t if t.dtype == torch.float64 else t.float()


def _ch(v: Tensor) -> Tensor:
    """A per-channel vector as (1, C, 1, 1) in the accumulation dtype, broadcastable over NCHW."""
    return _acc(v).view(1, -1, 1, 1)


def bn_fold(mean: Tensor, var: Tensor, gamma: Tensor, beta: Tensor, eps: float) -> BNFold:
    """Fold fixed statistics with the affine parameters, in float32 (float64 for float64 inputs)."""
    invstd = torch.rsqrt(_acc(var) + eps)
    return BNFold(_acc(gamma) * invstd, _acc(beta), _acc(mean), invstd)


def tile_stats(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample (mean, M2, count) of a float32 (N, C, H, W) tensor: one tile per sample."""
    n, c = z.shape[:2]
    flat = z.transpose(0, 1).reshape(c, n, -1)
    mean = flat.mean(dim=2)
    m2 = ((flat - mean.unsqueeze(2)) ** 2).sum(dim=2)
    count = torch.full((n,), float(flat.shape[2]), dtype=z.dtype, device=z.device)
    return mean.t().contiguous(), m2.t().contiguous(), count


def relu_grad(grad: Tensor, forward_value: Tensor) -> Tensor:
    """ReLU's backward as aten's threshold_backward: zero where the forward value is <= 0, the gradient
    elsewhere (a NaN forward value passes it; a non-finite gradient where the ReLU was off is dropped)."""
    return torch.where(forward_value <= 0, 0.0, grad)


def merge_stats(part_mean: Tensor, part_m2: Tensor, part_count: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Chan's parallel merge of per-tile (mean, M2, count) into per-channel (mean, M2), plus the count."""
    w = part_count.unsqueeze(1)
    n = part_count.sum()
    mean = (part_mean * w).sum(dim=0) / n
    m2 = part_m2.sum(dim=0) + (w * (part_mean - mean) ** 2).sum(dim=0)
    return mean, m2, n


class TorchBackend(Backend):
    name = "torch"

    def conv_fused(self, x, weight, bias, *, stride, padding, bn=None, in_mean=None, in_scale=None, in_shift=None,
                   residual=None, sc_x=None, sc_weight=None, sc_bias=None, sc_stride=1, sc_separate=False,
                   relu=False, stats=False, out_dtype=None, sc_stats=False) -> ConvOut:
        out_dtype = out_dtype or x.dtype
        if in_scale is not None:
            x = torch.relu((_acc(x) - _ch(in_mean)) * _ch(in_scale) + _ch(in_shift)).to(weight.dtype)
        z = _acc(F.conv2d(x, weight, None, stride, padding))
        if bias is not None:
            z = z + _ch(bias)
        if bn is not None:
            fold = bn_fold(*bn)
            z = (z - _ch(fold.mean)) * _ch(fold.scale) + _ch(fold.shift)
        dev = z.device
        sc_stats = sc_stats and sc_weight is not None and sc_separate
        part = tile_stats(z) if stats or sc_stats else (_empty(dev), _empty(dev), _empty(dev))
        sc_out, sc_part = _empty(dev), (_empty(dev), _empty(dev))
        if sc_weight is not None:
            s = _acc(F.conv2d(sc_x, sc_weight, None, sc_stride))
            if sc_bias is not None:
                s = s + _ch(sc_bias)
            if sc_separate:
                sc_out = s.to(out_dtype)
                if sc_stats:
                    sc_part = tile_stats(s)[:2]
            else:
                z = z + s
        if residual is not None:
            z = z + _acc(residual)
        if relu:
            z = torch.relu(z)
        return ConvOut(z.to(out_dtype), sc_out, *part, *sc_part)

    def bn_finalize(self, part_mean, part_m2, part_count, gamma, beta, eps, running_mean, running_var,
                    momentum, num_batches_tracked=None) -> BNFold:
        mean, m2, n = merge_stats(part_mean, part_m2, part_count)
        fold = bn_fold(mean, m2 / n, gamma, beta, eps)
        with torch.no_grad():
            if running_mean is not None:
                running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
                unbiased = (m2 / (n - 1)).to(running_var.dtype)
                running_var.mul_(1 - momentum).add_(unbiased, alpha=momentum)
            if num_batches_tracked is not None:
                num_batches_tracked.add_(1)
        return fold

    def bn_act(self, z, mean, scale, shift, residual=None, relu=True, out_dtype=None, res_bn=None) -> Tensor:
        y = (_acc(z) - _ch(mean)) * _ch(scale) + _ch(shift)
        if residual is not None:
            r = _acc(residual)
            if res_bn is not None:
                r = (r - _ch(res_bn[0])) * _ch(res_bn[1]) + _ch(res_bn[2])
            y = y + r
        if relu:
            y = torch.relu(y)
        return y.to(out_dtype or z.dtype)

    def bn_backward_reduce(self, grad, mask_src, z, mean, invstd):
        gm = relu_grad(_acc(grad), mask_src)
        xhat = (_acc(z) - _ch(mean)) * _ch(invstd)
        return gm.sum(dim=(0, 2, 3)), (gm * xhat).sum(dim=(0, 2, 3))

    def bn_backward_apply(self, grad, mask_src, z, mean, invstd, scale, sum_g, sum_gx, count, batch_stats,
                          want_gm):
        gm = relu_grad(_acc(grad), mask_src)
        if batch_stats:
            xhat = (_acc(z) - _ch(mean)) * _ch(invstd)
            dz = _ch(scale) * (gm - _ch(sum_g / count) - xhat * _ch(sum_gx / count))
        else:
            dz = _ch(scale) * gm
        gm_out = gm.to(grad.dtype) if want_gm else _empty(grad.device)
        return dz.to(z.dtype), gm_out
