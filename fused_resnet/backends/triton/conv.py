"""Implicit-GEMM convolution with fused prologue and epilogue (DESIGN.md sections 2-4).

GEMM view: rows m = (n, p, q) output positions (M = N*P*Q), columns k = output channels, reduction over
(r, s, c) = kernel taps x input channels. Each program owns a BLOCK_M x BLOCK_N output tile and walks the
taps; for each tap it loads K-contiguous [BLOCK_M, BLOCK_K] input tiles (contiguous along channels in
channels_last, the fast path) and [BLOCK_K, BLOCK_N] weight tiles, accumulating in float32.

Prologue (per input channel, as the tile is loaded): relu(x * in_scale + in_shift), then the padding
mask, so a padded position contributes 0 and not relu(in_shift).
Epilogue (per output channel): + bias; batch norm folded from running statistics in float32; per-tile
(count, mean, M2) statistics of that pre-activation; + the 1x1 shortcut convolution of a second input
(its own reduction, into the same tile) or its separate output; + residual; ReLU; store in the output
dtype and strides.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def conv_bn_act_kernel(
    x_ptr, w_ptr, out_ptr,
    bias_ptr, rmean_ptr, rvar_ptr, gamma_ptr, beta_ptr, eps,
    in_mean_ptr, in_scale_ptr, in_shift_ptr,
    res_ptr,
    scx_ptr, scw_ptr, scb_ptr, sco_ptr,
    pmean_ptr, pm2_ptr, pcount_ptr,
    N, C, H, W, K, P, Q, SC_C, SC_H, SC_W,
    sxn, sxc, sxh, sxw,
    swk, swc, swr, sws,
    son, sok, sop, soq,
    srn, srk, srp, srq,
    ssn, ssc, ssh, ssw,
    sswk, sswc,
    STRIDE: tl.constexpr, PAD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, SC_STRIDE: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_BN: tl.constexpr, HAS_PROLOGUE: tl.constexpr, HAS_RES: tl.constexpr,
    HAS_SC: tl.constexpr, SC_SEPARATE: tl.constexpr, RELU: tl.constexpr, STATS: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    M = N * P * Q
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(K, BLOCK_N)
    # Grouped tile order: GROUP_M row tiles share their column tiles' weights while they sit in L2.
    pid = tl.program_id(0)
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % group_size
    pid_n = (pid % (GROUP_M * num_n)) // group_size

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rm < M
    col_ok = rn < K
    n = (rm // (P * Q)).to(tl.int64)
    pq = rm % (P * Q)
    p = pq // Q
    q = pq % Q
    rk = tl.arange(0, BLOCK_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r in tl.static_range(KH):
        for s in tl.static_range(KW):
            h = p * STRIDE - PAD + r
            w = q * STRIDE - PAD + s
            inside = row_ok & (h >= 0) & (h < H) & (w >= 0) & (w < W)
            x_row = x_ptr + n * sxn + h.to(tl.int64) * sxh + w.to(tl.int64) * sxw
            w_tap = w_ptr + rn[None, :].to(tl.int64) * swk + r * swr + s * sws
            for c0 in range(0, C, BLOCK_K):
                c = c0 + rk
                c_ok = c < C
                a_mask = inside[:, None] & c_ok[None, :]
                a = tl.load(x_row[:, None] + c[None, :].to(tl.int64) * sxc, mask=a_mask, other=0.0)
                if HAS_PROLOGUE:
                    mu = tl.load(in_mean_ptr + c, mask=c_ok, other=0.0)
                    sc = tl.load(in_scale_ptr + c, mask=c_ok, other=0.0)
                    sh = tl.load(in_shift_ptr + c, mask=c_ok, other=0.0)
                    # NaN propagates through ReLU as in torch.relu (tl.maximum would drop it).
                    af = tl.maximum((a.to(tl.float32) - mu[None, :]) * sc[None, :] + sh[None, :], 0.0,
                                    propagate_nan=tl.PropagateNan.ALL)
                    a = tl.where(a_mask, af, 0.0).to(w_ptr.dtype.element_ty)
                b = tl.load(w_tap + c[:, None].to(tl.int64) * swc, mask=c_ok[:, None] & col_ok[None, :], other=0.0)
                acc = tl.dot(a, b, acc, input_precision=PRECISION)

    z = acc
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rn, mask=col_ok, other=0.0).to(tl.float32)
        z += bias[None, :]
    if HAS_BN:
        mean = tl.load(rmean_ptr + rn, mask=col_ok, other=0.0).to(tl.float32)
        var = tl.load(rvar_ptr + rn, mask=col_ok, other=1.0).to(tl.float32)
        gamma = tl.load(gamma_ptr + rn, mask=col_ok, other=0.0).to(tl.float32)
        beta = tl.load(beta_ptr + rn, mask=col_ok, other=0.0).to(tl.float32)
        # Centre first: (z - mean) keeps the digits z * scale - mean * scale would cancel.
        z = (z - mean[None, :]) * (gamma * tl.rsqrt(var + eps))[None, :] + beta[None, :]
    if STATS:
        # Per-tile (count, mean, M2), merged later with Chan's formula: no atomics, so deterministic,
        # and no E[x^2] - E[x]^2 cancellation when |mean| >> std. The sums run over the convolution
        # before its bias (a shift that M2 ignores and the mean takes back at the end), so a large bias
        # costs no digits.
        src = acc if (HAS_BIAS and not HAS_BN) else z
        count = tl.sum(row_ok.to(tl.float32), axis=0)
        tile_mean = tl.sum(tl.where(row_ok[:, None], src, 0.0), axis=0) / count
        dev = tl.where(row_ok[:, None], src - tile_mean[None, :], 0.0)
        tile_m2 = tl.sum(dev * dev, axis=0)
        if HAS_BIAS and not HAS_BN:
            tile_mean += bias
        tl.store(pmean_ptr + pid_m * K + rn, tile_mean, mask=col_ok)
        tl.store(pm2_ptr + pid_m * K + rn, tile_m2, mask=col_ok)
        if pid_n == 0:
            tl.store(pcount_ptr + pid_m, count)

    out_mask = row_ok[:, None] & col_ok[None, :]
    if HAS_SC:
        # The 1x1 shortcut: its own reduction over the block input at the strided position.
        acc_sc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        sx_row = scx_ptr + n * ssn + (p * SC_STRIDE).to(tl.int64) * ssh + (q * SC_STRIDE).to(tl.int64) * ssw
        for c0 in range(0, SC_C, BLOCK_K):
            c = c0 + rk
            c_ok = c < SC_C
            a = tl.load(sx_row[:, None] + c[None, :].to(tl.int64) * ssc, mask=row_ok[:, None] & c_ok[None, :],
                        other=0.0)
            b = tl.load(scw_ptr + rn[None, :].to(tl.int64) * sswk + c[:, None].to(tl.int64) * sswc,
                        mask=c_ok[:, None] & col_ok[None, :], other=0.0)
            acc_sc = tl.dot(a, b, acc_sc, input_precision=PRECISION)
        acc_sc += tl.load(scb_ptr + rn, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if SC_SEPARATE:
            o_off = n[:, None] * son + rn[None, :].to(tl.int64) * sok + p[:, None] * sop + q[:, None] * soq
            tl.store(sco_ptr + o_off, acc_sc.to(sco_ptr.dtype.element_ty), mask=out_mask)
        else:
            z += acc_sc
    if HAS_RES:
        r_off = n[:, None] * srn + rn[None, :].to(tl.int64) * srk + p[:, None] * srp + q[:, None] * srq
        z += tl.load(res_ptr + r_off, mask=out_mask, other=0.0).to(tl.float32)
    if RELU:
        z = tl.maximum(z, 0.0, propagate_nan=tl.PropagateNan.ALL)
    o_off = n[:, None] * son + rn[None, :].to(tl.int64) * sok + p[:, None] * sop + q[:, None] * soq
    tl.store(out_ptr + o_off, z.to(out_ptr.dtype.element_ty), mask=out_mask)


# ----------------------------------------------------------------------------------------------- launcher
from typing import Optional  # noqa: E402

import torch  # noqa: E402

from ..base import new_output  # noqa: E402
from .configs import conv_config  # noqa: E402
from .counters import count_launch  # noqa: E402


def output_memory_format(x: torch.Tensor) -> torch.memory_format:
    """The memory format eager's convolution gives for ``x``: channels_last in, channels_last out."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def conv_out_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def conv_plan(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int):
    """(P, Q, M, config) of a launch: shared by the launcher and the fake implementation."""
    n, c, h, w = x.shape
    k, _, kh, _ = weight.shape
    p, q = conv_out_size(h, kh, stride, padding), conv_out_size(w, kh, stride, padding)
    m = n * p * q
    return p, q, m, conv_config(c, k, m, p * q, kh, x.dtype)


def _strides(t: Optional[torch.Tensor], dims: int = 4) -> tuple[int, ...]:
    return tuple(t.stride()) if t is not None else (0,) * dims


def launch_conv(x, weight, bias, stride, padding, bn_mean, bn_var, bn_gamma, bn_beta, bn_eps, in_mean, in_scale, in_shift,
                residual, sc_x, sc_weight, sc_bias, sc_stride, sc_separate, relu, stats, out_dtype):
    """Allocate the outputs and launch ``conv_bn_act_kernel``; returns (out, shortcut, mean, m2, count)."""
    n, c, h, w = x.shape
    k, _, kh, kw = weight.shape
    p, q, m, cfg = conv_plan(x, weight, stride, padding)
    fmt = output_memory_format(x)
    dev = x.device
    out = new_output((n, k, p, q), out_dtype, dev, fmt)
    def empty() -> torch.Tensor:  # a distinct placeholder per unused output (custom ops forbid aliasing)
        return torch.empty(0, device=dev, dtype=torch.float32)

    none = empty()
    has_sc = sc_weight is not None
    sc_out = new_output((n, k, p, q), out_dtype, dev, fmt) if has_sc and sc_separate else empty()
    if sc_out.numel() and tuple(sc_out.stride()) != tuple(out.stride()):
        raise AssertionError("shortcut output must share the output's strides")
    tiles_m = triton.cdiv(m, cfg.BLOCK_M)
    if stats:
        pmean = new_output((tiles_m, k), torch.float32, dev)
        pm2 = new_output((tiles_m, k), torch.float32, dev)
        pcount = new_output((tiles_m,), torch.float32, dev)
    else:
        pmean, pm2, pcount = empty(), empty(), empty()
    if has_sc:
        sc_c, sc_h, sc_w = sc_x.shape[1:]
        sc_wstrides = sc_weight.stride()[:2]
    else:
        sc_c = sc_h = sc_w = 1
        sc_wstrides = (0, 0)
    # fp32 follows cuDNN's TF32 switch as eager's convolutions do; 16-bit inputs take the default (MMA).
    precision = "ieee" if (x.dtype == torch.float32 and not torch.backends.cudnn.allow_tf32) else "tf32"
    grid = (tiles_m * triton.cdiv(k, cfg.BLOCK_N),)
    count_launch("conv_bn_act")
    conv_bn_act_kernel[grid](
        x, weight, out,
        bias if bias is not None else none,
        bn_mean if bn_mean is not None else none, bn_var if bn_var is not None else none,
        bn_gamma if bn_gamma is not None else none, bn_beta if bn_beta is not None else none, bn_eps,
        in_mean if in_mean is not None else none, in_scale if in_scale is not None else none,
        in_shift if in_shift is not None else none,
        residual if residual is not None else none,
        sc_x if has_sc else none, sc_weight if has_sc else none, sc_bias if has_sc else none, sc_out,
        pmean, pm2, pcount,
        n, c, h, w, k, p, q, sc_c, sc_h, sc_w,
        *x.stride(), *weight.stride(), *out.stride(), *_strides(residual), *_strides(sc_x if has_sc else None),
        *sc_wstrides,
        STRIDE=stride, PAD=padding, KH=kh, KW=kw, SC_STRIDE=sc_stride,
        HAS_BIAS=bias is not None, HAS_BN=bn_mean is not None, HAS_PROLOGUE=in_scale is not None,
        HAS_RES=residual is not None, HAS_SC=has_sc, SC_SEPARATE=bool(sc_separate), RELU=bool(relu),
        STATS=bool(stats), PRECISION=precision,
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, GROUP_M=cfg.GROUP_M,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out, sc_out, pmean, pm2, pcount
