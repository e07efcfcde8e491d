"""The residual block as one composition of backend primitives (DESIGN.md sections 3 and 4).

Autograd lives here, once, for every backend:

- inference (no gradient needed): two fused convolutions, batch norm folded in their epilogues;
- training, or eval mode with gradients (fine-tuning with frozen BN): three heavy kernels and two
  finalizes forward; a backward built from the backward primitives plus convolution gradients, in two
  autograd nodes (K1, and the rest) so weight gradients are accumulated one at a time, as in eager;
- auto's seed route: the seed block's own forward, where that was measured fastest.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor, nn

from .backends import Backend, BNFold, ConvOut, get_backend, resolve_backend
from .backends.torch_ref import bn_fold
from .profiling import stage
from .reference import Residual as SeedResidual

__all__ = ["residual_forward", "check_input"]


def check_input(block: nn.Module, x: Tensor) -> None:
    """Raise a clear error for an input the block cannot take, as ``nn.Conv2d``/``BatchNorm2d`` would."""
    if not isinstance(x, Tensor):
        raise TypeError(f"Residual expected a Tensor input, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"Residual expected a 4D input (N, C, H, W), got a {x.dim()}D input of shape "
                         f"{tuple(x.shape)}")
    in_channels = block.conv1.in_channels
    if x.shape[1] != in_channels:
        raise ValueError(f"Residual expected an input with {in_channels} channels, got {x.shape[1]} channels "
                         f"(input shape {tuple(x.shape)})")
    if not x.is_floating_point():
        raise RuntimeError(f"Residual expected a floating-point input, got dtype {x.dtype}")
    weight = block.conv1.weight
    if x.device != weight.device:
        raise RuntimeError(f"Residual's input is on {x.device} but its parameters are on {weight.device}: "
                           f"move one of them (module.to(device) or x.to(device))")
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise RuntimeError(f"Residual's input has dtype {x.dtype} but its parameters have dtype {weight.dtype}: "
                           f"convert one of them (module.to(dtype) or x.to(dtype)) or run under torch.autocast")
    if x.numel() == 0:
        raise ValueError(f"Residual expected a non-empty input, got shape {tuple(x.shape)}")
    if block.training:
        stride = block.conv1.stride[0]
        ho, wo = (x.shape[2] - 1) // stride + 1, (x.shape[3] - 1) // stride + 1
        if x.shape[0] * ho * wo == 1:
            raise ValueError(
                f"Residual in training mode needs more than 1 value per channel for batch statistics, got "
                f"a batch of one with output size {ho}x{wo} (input shape {tuple(x.shape)}); use a larger "
                f"batch or call .eval()")


def _bn_update_factor(bn: nn.BatchNorm2d) -> float:
    """Count the batch and return the running-stat factor exactly as ``BatchNorm2d.forward`` does."""
    bn.num_batches_tracked.add_(1)
    if bn.momentum is None:
        return 1.0 / float(bn.num_batches_tracked)
    return bn.momentum


def _normalizer(be: Backend, k: ConvOut, batch_stats: bool, gamma: Tensor, beta: Tensor, eps: float,
                running_mean: Optional[Tensor], running_var: Optional[Tensor], factor: float) -> BNFold:
    """A BN's (scale, shift, mean, invstd): from the batch statistics of ``k`` (updating the running
    statistics when ``factor >= 0``), or from the running statistics."""
    if not batch_stats:
        return bn_fold(running_mean, running_var, gamma, beta, eps)
    update = factor >= 0
    return be.bn_finalize(k.part_mean, k.part_m2, k.part_count, gamma, beta, eps,
                          running_mean if update else None, running_var if update else None, factor)


class _Conv1Function(torch.autograd.Function):
    """K1: conv1 (+ bias) and BN1's per-tile statistics (returned, not differentiable). A node of its own so
    that, as in eager, the weight gradients of conv2 (and the shortcut) are accumulated and freed before
    conv1's is computed: one weight gradient alive at a time. (As one node, all of them were alive together
    at the end of the backward; at 3x3x512 on the CPU that peak made glibc trim and re-fault ~38 MB a step.)"""

    @staticmethod
    def forward(ctx, backend_name: str, stride: int, batch_stats: bool, x: Tensor, w1: Tensor,
                b1: Optional[Tensor]):
        be: Backend = get_backend(backend_name)
        with stage("K1 conv3x3+bias+stats"):
            k1 = be.conv_fused(x, w1, b1, stride=stride, padding=1, stats=batch_stats)
        ctx.backend_name, ctx.stride, ctx.batch_stats = backend_name, stride, batch_stats
        ctx.save_for_backward(x, w1)
        parts = (k1.part_mean, k1.part_m2, k1.part_count)
        ctx.mark_non_differentiable(*parts)
        return (k1.out, *parts)

    @staticmethod
    def backward(ctx, dz1: Tensor, *_):
        be: Backend = get_backend(ctx.backend_name)
        x, w1 = ctx.saved_tensors
        needs = ctx.needs_input_grad
        with stage("B conv1 backward"):
            dx, dw1, db1 = be.conv_backward(dz1, x, w1, ctx.stride, 1,
                                            (needs[3], needs[4], needs[5] and not ctx.batch_stats))
        if ctx.batch_stats and needs[5]:
            # A conv bias followed by a batch-statistics BN shifts the batch mean by itself: its gradient,
            # sum(dZ), is exactly zero (eager returns rounding noise around it). Skip the reduction.
            db1 = torch.zeros(w1.shape[0], dtype=w1.dtype, device=w1.device)
        return None, None, None, dx, dw1, db1


class _ResidualFunction(torch.autograd.Function):
    """After K1: F1, K2 (BN1+ReLU prologue, conv2 + statistics, 1x1 shortcut), F2, K3 (BN2 + shortcut +
    ReLU). With ``batch_stats=False`` the running statistics are used instead and nothing is updated (eval
    mode with gradients). Its backward returns dZ1 to K1's node and the shortcut's share of dX."""

    @staticmethod
    def forward(ctx, backend_name: str, stride: int, stats: tuple[bool, bool], eps1: float, eps2: float,
                factor1: float, factor2: float, x: Tensor, x_res: Optional[Tensor],
                z1: Tensor, part_mean: Tensor, part_m2: Tensor, part_count: Tensor,
                g1: Tensor, be1: Tensor, rm1: Tensor, rv1: Tensor,
                w2: Tensor, b2: Tensor, g2: Tensor, be2: Tensor, rm2: Tensor, rv2: Tensor,
                w3: Optional[Tensor], b3: Optional[Tensor]) -> Tensor:
        be: Backend = get_backend(backend_name)
        bs1, bs2 = stats
        with stage("F1 bn_finalize"):
            f1 = _normalizer(be, ConvOut(z1, None, part_mean, part_m2, part_count), bs1, g1, be1, eps1, rm1, rv1,
                             factor1)
        with stage("K2 bn+relu>conv3x3+bias+stats" + ("+conv1x1" if w3 is not None else "")):
            k2 = be.conv_fused(z1, w2, b2, stride=1, padding=1, in_mean=f1.mean, in_scale=f1.scale,
                               in_shift=f1.shift,
                               sc_x=x if w3 is not None else None, sc_weight=w3, sc_bias=b3, sc_stride=stride,
                               sc_separate=True, stats=bs2)
        with stage("F2 bn_finalize"):
            f2 = _normalizer(be, k2, bs2, g2, be2, eps2, rm2, rv2, factor2)
        # The identity shortcut is x itself, or under autocast x in its own dtype (passed separately:
        # the same tensor twice would stop torch.compile from tracing this Function).
        shortcut = k2.shortcut if w3 is not None else (x_res if x_res is not None else x)
        out_dtype = torch.promote_types(k2.out.dtype, shortcut.dtype)
        with stage("K3 bn+add+relu"):
            out = be.bn_act(k2.out, f2.mean, f2.scale, f2.shift, residual=shortcut, relu=True,
                            out_dtype=out_dtype)

        ctx.backend_name, ctx.stride, ctx.stats = backend_name, stride, stats
        ctx.res_dtype = x_res.dtype if x_res is not None else None
        ctx.param_dtype = g1.dtype
        ctx.save_for_backward(x if w3 is not None else None, z1, k2.out, out, w2, w3, f1.scale, f1.shift,
                              f1.mean, f1.invstd, f2.scale, f2.mean, f2.invstd)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        be: Backend = get_backend(ctx.backend_name)
        (x, z1, z2, out, w2, w3, a1, c1, mean1, invstd1, a2, mean2, invstd2) = ctx.saved_tensors
        needs = ctx.needs_input_grad
        stride, (bs1, bs2) = ctx.stride, ctx.stats
        grad = grad.contiguous(memory_format=_memory_format(out))

        # BN2 (+ the ReLU after the add): dZ2, and gm = ReLU's backward of grad for the shortcut.
        count2 = z2.shape[0] * z2.shape[2] * z2.shape[3]
        with stage("B2 relu+bn backward"):
            sg2, sgx2 = be.bn_backward_reduce(grad, out, z2, mean2, invstd2)
            dz2, gm = be.bn_backward_apply(grad, out, z2, mean2, invstd2, a2, sg2, sgx2, count2, bs2,
                                           want_gm=True)
        # conv2 on Y1 = relu(BN1(Z1)), recomputed rather than saved; Y1 also gives ReLU1's mask.
        with stage("B conv2 backward (Y1 recomputed)"):
            y1 = be.bn_act(z1, mean1, a1, c1, relu=True)
            dy1, dw2, db2 = be.conv_backward(dz2, y1, w2, 1, 1, (True, needs[17], needs[18] and not bs2))
        del dz2
        count1 = z1.shape[0] * z1.shape[2] * z1.shape[3]
        with stage("B1 relu+bn backward"):
            sg1, sgx1 = be.bn_backward_reduce(dy1, y1, z1, mean1, invstd1)
            dz1, _ = be.bn_backward_apply(dy1, y1, z1, mean1, invstd1, a1, sg1, sgx1, count1, bs1,
                                          want_gm=False)
        del y1, dy1
        dx = dx_res = dw3 = db3 = None
        if w3 is not None:
            with stage("B conv1x1 backward"):
                dx, dw3, db3 = be.conv_backward(gm, x, w3, stride, 0, (needs[7], needs[23], needs[24]))
        elif ctx.res_dtype is not None:
            dx_res = gm.to(ctx.res_dtype) if needs[8] else None
        elif needs[7]:
            dx = gm  # the identity shortcut's share; autograd adds conv1's

        if bs2 and needs[18]:  # as conv1's bias in _Conv1Function.backward: exactly zero
            db2 = torch.zeros_like(sg2, dtype=w2.dtype)
        pd = ctx.param_dtype
        return (None, None, None, None, None, None, None, dx, dx_res,
                dz1, None, None, None,
                sgx1.to(pd) if needs[13] else None, sg1.to(pd) if needs[14] else None, None, None,
                dw2, db2, sgx2.to(pd) if needs[19] else None, sg2.to(pd) if needs[20] else None, None, None,
                dw3, db3)


def _memory_format(t: Tensor) -> torch.memory_format:
    return torch.channels_last if t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous() \
        else torch.contiguous_format


def residual_forward(block: nn.Module, x: Tensor) -> Tensor:
    """Run a seed-structured ``Residual`` (conv1, bn1, conv2, bn2, optional conv3) through the fused
    primitives of ``block.backend``. Each batch norm follows its own ``training`` flag, as in eager."""
    check_input(block, x)
    conv1, conv2, conv3, bn1, bn2 = block.conv1, block.conv2, block.conv3, block.bn1, block.bn2
    stride = conv1.stride[0]
    device_type = x.device.type
    w1, w2, w3 = conv1.weight, conv2.weight, conv3.weight if conv3 is not None else None
    x_res = x if conv3 is None else None
    autocast = torch.is_autocast_enabled(device_type)
    if autocast:
        # As eager under autocast: convolutions in the autocast dtype, batch norm parameters as they are,
        # and the identity shortcut added in its own dtype (type promotion picks the output's).
        dtype = torch.get_autocast_dtype(device_type)
        x = x.to(dtype)
        w1, w2 = w1.to(dtype), w2.to(dtype)
        w3 = w3.to(dtype) if w3 is not None else None
    bs1 = bn1.training or bn1.running_mean is None
    bs2 = bn2.training or bn2.running_mean is None
    backend = resolve_backend(block.backend, x, bs1 or bs2, block)
    if backend is None:  # auto's seed route: the seed block's own forward, measured fastest here
        return SeedResidual.forward(block, x)
    b3 = conv3.bias if conv3 is not None else None
    params = (w1, conv1.bias, bn1.weight, bn1.bias, w2, conv2.bias, bn2.weight, bn2.bias, w3, b3)

    # The primitives run in the dtypes chosen above; autocast (when on) must not re-cast inside them.
    with torch.autocast(device_type, enabled=False) if autocast else contextlib.nullcontext():
        if not (bs1 or bs2) and not (torch.is_grad_enabled() and
                                     any(t is not None and t.requires_grad for t in (x, *params))):
            return _inference(backend, block, x, x_res, w1, w2, w3)
        factor1 = _bn_update_factor(bn1) if bn1.training and bn1.running_mean is not None else -1.0
        factor2 = _bn_update_factor(bn2) if bn2.training and bn2.running_mean is not None else -1.0
        z1, part_mean, part_m2, part_count = _Conv1Function.apply(backend.name, stride, bs1, x, w1, conv1.bias)
        return _ResidualFunction.apply(
            backend.name, stride, (bs1, bs2), bn1.eps, bn2.eps, factor1, factor2, x,
            x_res if x_res is not x else None, z1, part_mean, part_m2, part_count,
            bn1.weight, bn1.bias, bn1.running_mean, bn1.running_var,
            w2, conv2.bias, bn2.weight, bn2.bias, bn2.running_mean, bn2.running_var, w3, b3)


def _inference(be: Backend, block: nn.Module, x: Tensor, x_res: Optional[Tensor], w1: Tensor, w2: Tensor,
               w3: Optional[Tensor]) -> Tensor:
    """Two launches: K1 = relu(BN1(conv1(x))), K2 = relu(BN2(conv2(K1)) + shortcut), BN folded in-kernel."""
    bn1, bn2, conv3 = block.bn1, block.bn2, block.conv3
    with stage("K1 conv3x3+bn+relu"):
        y1 = be.conv_fused(x, w1, block.conv1.bias, stride=block.conv1.stride[0], padding=1,
                           bn=(bn1.running_mean, bn1.running_var, bn1.weight, bn1.bias, bn1.eps), relu=True).out
    out_dtype = torch.promote_types(x.dtype, x_res.dtype) if x_res is not None else x.dtype
    with stage("K2 conv3x3+bn+" + ("conv1x1" if w3 is not None else "identity") + "+add+relu"):
        return be.conv_fused(
            y1, w2, block.conv2.bias, stride=1, padding=1,
            bn=(bn2.running_mean, bn2.running_var, bn2.weight, bn2.bias, bn2.eps), residual=x_res,
            sc_x=x if w3 is not None else None, sc_weight=w3, sc_bias=conv3.bias if conv3 is not None else None,
            sc_stride=block.conv1.stride[0], relu=True, out_dtype=out_dtype).out
