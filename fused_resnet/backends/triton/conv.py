"""Implicit-GEMM convolution with fused prologue and epilogue (DESIGN.md sections 2-4).

GEMM view: rows m = (n, p, q) output positions (M = N*P*Q), columns k = output channels, reduction over
(r, s, c) = kernel taps x input channels. Each program owns a BLOCK_M x BLOCK_N output tile and runs ONE
loop over taps x channel chunks (flattened, so the software pipeline keeps loads in flight across taps:
at C = BLOCK_K a per-tap loop would run once per tap and never overlap a load with the MMAs). Each step
loads a [BLOCK_M, BLOCK_K] input tile (contiguous along channels in channels_last, the fast path) and a
[BLOCK_K, BLOCK_N] weight tile (contiguous along channels: weights are read in (K, R, S, C) order,
``backends/packing.py``), accumulating in float32. Offsets are 32-bit unless a tensor has 2^31 elements
or more (INDEX64).

Prologue (per input channel, as the tile is loaded): relu((x - in_mean) * in_scale + in_shift), then the
padding mask, so a padded position contributes 0 and not relu(in_shift).
Epilogue (per output channel): + bias; batch norm folded from running statistics in float32; per-tile
(count, mean, M2) statistics of that pre-activation; + the 1x1 shortcut convolution of a second input
(its own reduction, accumulated into the same tile after the main result is formed, so one accumulator
is live at a time) or its separate output; + residual; ReLU; store in the output dtype and strides.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .launch import SIZE_ARGS


@triton.jit
def _index(v, INDEX64: tl.constexpr):
    if INDEX64:
        return v.to(tl.int64)
    return v


@triton.jit
def _tile_offsets(n, p, q, rn, sn, sk, sp, sq, INDEX64: tl.constexpr):
    """Offsets of a [rows, columns] output-shaped tile; computed where used, so no [BLOCK_M, BLOCK_N]
    offset tensor stays live across a loop."""
    return n[:, None] * sn + _index(rn, INDEX64)[None, :] * sk + _index(p, INDEX64)[:, None] * sp \
        + _index(q, INDEX64)[:, None] * sq


@triton.jit
def _tile_moments(v, row_ok):
    """Per-column mean and M2 over the tile's valid rows (two passes: the deviations from the tile's own
    mean, so a large common offset costs no digits)."""
    count = tl.sum(row_ok.to(tl.float32), axis=0)
    mean = tl.sum(tl.where(row_ok[:, None], v, 0.0), axis=0) / count
    dev = tl.where(row_ok[:, None], v - mean[None, :], 0.0)
    return mean, tl.sum(dev * dev, axis=0)


@triton.jit
def _shortcut_dot(acc, scx_ptr, scw_ptr, sx_row, sw_col, ssc, sswc, rk, row_ok, col_ok, SC_C, BLOCK_K: tl.constexpr,
                  PRECISION: tl.constexpr):
    """acc + the 1x1 shortcut convolution's tile: rows at ``sx_row`` of the shortcut input, columns at
    ``sw_col`` of its weights, reduced over its SC_C channels in BLOCK_K chunks."""
    for c0 in range(0, SC_C, BLOCK_K):
        c = c0 + rk
        c_ok = c < SC_C
        a = tl.load(scx_ptr + sx_row[:, None] + c[None, :] * ssc, mask=row_ok[:, None] & c_ok[None, :], other=0.0)
        b = tl.load(scw_ptr + sw_col[None, :] + c[:, None] * sswc, mask=c_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit(do_not_specialize=SIZE_ARGS)
def conv_bn_act_kernel(
    x_ptr, w_ptr, out_ptr,
    bias_ptr, rmean_ptr, rvar_ptr, gamma_ptr, beta_ptr, eps,
    in_mean_ptr, in_scale_ptr, in_shift_ptr,
    res_ptr,
    scx_ptr, scw_ptr, scb_ptr, sco_ptr,
    pmean_ptr, pm2_ptr, pcount_ptr, scpmean_ptr, scpm2_ptr,
    N, C, H, W, K, P, Q, SC_C,
    sxn, sxc, sxh, sxw,
    swk, swc, swr, sws,
    son, sok, sop, soq,
    srn, srk, srp, srq,
    ssn, ssc, ssh, ssw,
    sswk, sswc,
    STRIDE: tl.constexpr, PAD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, SC_STRIDE: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_BN: tl.constexpr, HAS_PROLOGUE: tl.constexpr, HAS_RES: tl.constexpr,
    HAS_SC: tl.constexpr, HAS_SC_BIAS: tl.constexpr, SC_SEPARATE: tl.constexpr, SC_STATS: tl.constexpr,
    RELU: tl.constexpr, STATS: tl.constexpr,
    PRECISION: tl.constexpr, INDEX64: tl.constexpr,
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
    n = _index(rm // (P * Q), INDEX64)
    pq = rm % (P * Q)
    p = pq // Q
    q = pq % Q
    h0 = p * STRIDE - PAD
    w0 = q * STRIDE - PAD
    rk = tl.arange(0, BLOCK_K)
    x_row = n * sxn + _index(h0, INDEX64) * sxh + _index(w0, INDEX64) * sxw
    w_col = _index(rn, INDEX64) * swk

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    chunks = tl.cdiv(C, BLOCK_K)
    for step in range(0, KH * KW * chunks):
        tap = step // chunks
        c = (step - tap * chunks) * BLOCK_K + rk
        r = tap // KW
        s = tap - r * KW
        h = h0 + r
        w = w0 + s
        inside = row_ok & (h >= 0) & (h < H) & (w >= 0) & (w < W)
        c_ok = c < C
        a_mask = inside[:, None] & c_ok[None, :]
        a = tl.load(x_ptr + (x_row + r * sxh + s * sxw)[:, None] + c[None, :] * sxc, mask=a_mask, other=0.0)
        if HAS_PROLOGUE:
            mu = tl.load(in_mean_ptr + c, mask=c_ok, other=0.0)
            sc = tl.load(in_scale_ptr + c, mask=c_ok, other=0.0)
            sh = tl.load(in_shift_ptr + c, mask=c_ok, other=0.0)
            # NaN propagates through ReLU as in torch.relu (tl.maximum would drop it).
            af = tl.maximum((a.to(tl.float32) - mu[None, :]) * sc[None, :] + sh[None, :], 0.0,
                            propagate_nan=tl.PropagateNan.ALL)
            a = tl.where(a_mask, af, 0.0).to(w_ptr.dtype.element_ty)
        b = tl.load(w_ptr + w_col[None, :] + (r * swr + s * sws) + c[:, None] * swc,
                    mask=c_ok[:, None] & col_ok[None, :], other=0.0)
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
        tile_mean, tile_m2 = _tile_moments(src, row_ok)
        if HAS_BIAS and not HAS_BN:
            tile_mean += bias
        tl.store(pmean_ptr + pid_m * K + rn, tile_mean, mask=col_ok)
        tl.store(pm2_ptr + pid_m * K + rn, tile_m2, mask=col_ok)
        if pid_n == 0:
            tl.store(pcount_ptr + pid_m, tl.sum(row_ok.to(tl.float32), axis=0))

    sx_row = n * ssn + _index(p * SC_STRIDE, INDEX64) * ssh + _index(q * SC_STRIDE, INDEX64) * ssw
    sw_col = _index(rn, INDEX64) * sswk
    if HAS_SC:
        if not SC_SEPARATE:
            # The 1x1 shortcut, accumulated straight into the epilogue's result: one accumulator live.
            if HAS_SC_BIAS:
                z += tl.load(scb_ptr + rn, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            z = _shortcut_dot(z, scx_ptr, scw_ptr, sx_row, sw_col, ssc, sswc, rk, row_ok, col_ok, SC_C, BLOCK_K,
                              PRECISION)
    out_mask = row_ok[:, None] & col_ok[None, :]
    if HAS_RES:
        z += tl.load(res_ptr + _tile_offsets(n, p, q, rn, srn, srk, srp, srq, INDEX64), mask=out_mask,
                     other=0.0).to(tl.float32)
    if RELU:
        z = tl.maximum(z, 0.0, propagate_nan=tl.PropagateNan.ALL)
    tl.store(out_ptr + _tile_offsets(n, p, q, rn, son, sok, sop, soq, INDEX64), z.to(out_ptr.dtype.element_ty),
             mask=out_mask)
    if HAS_SC:
        if SC_SEPARATE:
            # Training keeps the shortcut apart (its own output for K3): computed once the main result is
            # stored, so again one accumulator is live.
            acc_sc = _shortcut_dot(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), scx_ptr, scw_ptr, sx_row, sw_col,
                                   ssc, sswc, rk, row_ok, col_ok, SC_C, BLOCK_K, PRECISION)
            if SC_STATS:  # the shortcut's own batch norm: its statistics, before its bias as above
                sc_mean, sc_m2 = _tile_moments(acc_sc, row_ok)
                if HAS_SC_BIAS:
                    sc_mean += tl.load(scb_ptr + rn, mask=col_ok, other=0.0).to(tl.float32)
                tl.store(scpmean_ptr + pid_m * K + rn, sc_mean, mask=col_ok)
                tl.store(scpm2_ptr + pid_m * K + rn, sc_m2, mask=col_ok)
            if HAS_SC_BIAS:
                acc_sc += tl.load(scb_ptr + rn, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(sco_ptr + _tile_offsets(n, p, q, rn, son, sok, sop, soq, INDEX64),
                     acc_sc.to(sco_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# ----------------------------------------------------------------------------------------------- launcher
from typing import Optional  # noqa: E402

import torch  # noqa: E402

from ..base import new_output  # noqa: E402
from ..packing import channels_dense_weight  # noqa: E402
from .configs import conv_config, device_model  # noqa: E402
from .launch import cdiv, launch, tf32_allowed  # noqa: E402


def output_memory_format(x: torch.Tensor) -> torch.memory_format:
    """The memory format eager's convolution gives for ``x``: channels_last in, channels_last out."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def conv_out_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def conv_plan(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int, training: bool = False):
    """(P, Q, M, config) of a launch: shared by the launcher and the fake implementation. ``training``: the
    training composition's variant (a prologue or statistics; ``is_training_variant``)."""
    n, c, h, w = x.shape
    k, _, kh, _ = weight.shape
    p, q = conv_out_size(h, kh, stride, padding), conv_out_size(w, kh, stride, padding)
    m = n * p * q
    return p, q, m, conv_config(c, k, m, p * q, kh, x.dtype, device_model(x.device), training)


def is_training_variant(in_scale, stats: bool, sc_stats: bool) -> bool:
    """Whether a convolution is the training composition's variant (its tile may be tuned apart): a BN +
    ReLU prologue or a statistics epilogue."""
    return in_scale is not None or bool(stats) or bool(sc_stats)


def block_conv_problems(case) -> set[tuple[int, int, int, int, int]]:
    """(in_channels, out_channels, M, positions, kernel) of the convolutions a benchmark case runs
    through ``conv_fused`` (what ``configs.reachable_conv_configs`` evaluates the heuristic on)."""
    from ...bench import _convs, blocks_of

    problems = set()
    for b in blocks_of(case):
        n = b.input_shape[0]
        for m, cin, cout, kern, _ in _convs(b):
            problems.add((cin, cout, m, m // n, kern))
    return problems


def _strides(t: Optional[torch.Tensor], dims: int = 4) -> tuple[int, ...]:
    return tuple(t.stride()) if t is not None else (0,) * dims


def _needs_int64(*tensors: Optional[torch.Tensor]) -> bool:
    return any(t is not None and t.numel() >= 2**31 for t in tensors)


def launch_conv(x, weight, bias, stride, padding, bn_mean, bn_var, bn_gamma, bn_beta, bn_eps, in_mean, in_scale, in_shift,
                residual, sc_x, sc_weight, sc_bias, sc_stride, sc_separate, relu, stats, out_dtype, sc_stats=False,
                distinct_placeholders=True):
    """Allocate the outputs and launch ``conv_bn_act_kernel``; returns (out, shortcut, mean, m2, count,
    shortcut mean, shortcut m2). The outputs a call did not ask for are empty placeholders: distinct ones
    for the custom op (its outputs must not alias), one shared one for eager callers (an allocation each
    is host time: six per call at inference)."""
    n, c, h, w = x.shape
    k, _, kh, kw = weight.shape
    p, q, m, cfg = conv_plan(x, weight, stride, padding, is_training_variant(in_scale, stats, sc_stats))
    weight = channels_dense_weight(weight)
    fmt = output_memory_format(x)
    dev = x.device
    out = new_output((n, k, p, q), out_dtype, dev, fmt)

    none = None if distinct_placeholders else torch.empty(0, device=dev, dtype=torch.float32)

    def empty() -> torch.Tensor:
        return torch.empty(0, device=dev, dtype=torch.float32) if none is None else none

    has_sc = sc_weight is not None
    sc_out = new_output((n, k, p, q), out_dtype, dev, fmt) if has_sc and sc_separate else empty()
    tiles_m = cdiv(m, cfg.BLOCK_M)
    sc_stats = bool(sc_stats) and has_sc and bool(sc_separate)
    stats = bool(stats) or sc_stats  # the shortcut's statistics share the main ones' tiles and counts
    if stats:
        pmean = new_output((tiles_m, k), torch.float32, dev)
        pm2 = new_output((tiles_m, k), torch.float32, dev)
        pcount = new_output((tiles_m,), torch.float32, dev)
    else:
        pmean, pm2, pcount = empty(), empty(), empty()
    if sc_stats:
        sc_pmean = new_output((tiles_m, k), torch.float32, dev)
        sc_pm2 = new_output((tiles_m, k), torch.float32, dev)
    else:
        sc_pmean, sc_pm2 = empty(), empty()
    if has_sc:
        sc_weight = channels_dense_weight(sc_weight)
        sc_c = sc_x.shape[1]
        sc_wstrides = sc_weight.stride()[:2]
    else:
        sc_c = 1
        sc_wstrides = (0, 0)
    # fp32 follows cuDNN's TF32 switch as eager's convolutions do; 16-bit inputs take the default (MMA).
    precision = "ieee" if (x.dtype == torch.float32 and not tf32_allowed()) else "tf32"
    grid = (tiles_m * cdiv(k, cfg.BLOCK_N),)
    # Pointers a variant does not use go to the kernel as None: Triton makes them constexprs, so the
    # launcher neither reads nor passes them (12 of 21 pointers at inference).
    args = (
        x, weight, out, bias, bn_mean, bn_var, bn_gamma, bn_beta, float(bn_eps), in_mean, in_scale, in_shift,
        residual, sc_x if has_sc else None, sc_weight if has_sc else None, sc_bias if has_sc else None,
        sc_out if has_sc and sc_separate else None,
        pmean if stats else None, pm2 if stats else None, pcount if stats else None,
        sc_pmean if sc_stats else None, sc_pm2 if sc_stats else None,
        n, c, h, w, k, p, q, sc_c,
        *x.stride(), *weight.stride(), *out.stride(), *_strides(residual), *_strides(sc_x if has_sc else None),
        *sc_wstrides,
    )
    constexprs = dict(
        STRIDE=stride, PAD=padding, KH=kh, KW=kw, SC_STRIDE=sc_stride,
        HAS_BIAS=bias is not None, HAS_BN=bn_mean is not None, HAS_PROLOGUE=in_scale is not None,
        HAS_RES=residual is not None, HAS_SC=has_sc, HAS_SC_BIAS=has_sc and sc_bias is not None,
        SC_SEPARATE=bool(sc_separate), SC_STATS=sc_stats, RELU=bool(relu),
        STATS=stats, PRECISION=precision, INDEX64=_needs_int64(x, out, residual, sc_x),
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, GROUP_M=cfg.GROUP_M,
    )
    launch(conv_bn_act_kernel, grid, args, constexprs, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
           device=dev)
    return out, sc_out, pmean, pm2, pcount, sc_pmean, sc_pm2
