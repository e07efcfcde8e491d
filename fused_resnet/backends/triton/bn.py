"""Batch-norm kernels of the training path (DESIGN.md section 4): the statistics finalize, the
BN-apply + residual + ReLU pass, and the fused ReLU+BN backward (reduce, then apply).

Activations are addressed as (rows = N*H*W, channels) with strides (sn, sc, shw): any layout whose
(H, W) plane is dense -- NCHW and channels_last both -- so channels_last tiles read channel-contiguous
and NCHW tiles row-contiguous. Every reduction is per tile, then merged in a fixed order: no atomics,
so results repeat bit for bit. Reductions over many tiles (a convolution at batch 64 and 56x56 leaves
~1,600 statistics tiles) run in two levels: chunks of tiles merged in parallel, then the chunks.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .launch import SIZE_ARGS


@triton.jit
def _merge_rows(pmean_ptr, pm2_ptr, pcount_ptr, t_begin, t_end, cols, col_ok, C, BLOCK_T: tl.constexpr):
    """Chan et al.'s merge of the partial (mean, M2, count) rows [t_begin, t_end) of the columns
    ``cols``, relative to the first row's mean (shifted sums: a mean far from zero costs no digits).
    Returns (count, mean, M2) per column."""
    shift = tl.load(pmean_ptr + t_begin * C + cols, mask=col_ok, other=0.0)
    n_acc = tl.zeros_like(shift)
    mean_acc = tl.zeros_like(shift)
    m2_acc = tl.zeros_like(shift)
    for t0 in range(t_begin, t_end, BLOCK_T):
        ts = t0 + tl.arange(0, BLOCK_T)
        t_ok = ts < t_end
        mask = t_ok[:, None] & col_ok[None, :]
        cnt = tl.load(pcount_ptr + ts, mask=t_ok, other=0.0)
        mu = tl.load(pmean_ptr + ts[:, None] * C + cols[None, :], mask=mask, other=0.0) - shift[None, :]
        q = tl.load(pm2_ptr + ts[:, None] * C + cols[None, :], mask=mask, other=0.0)
        # The chunk's rows at once, then the chunk into the running total.
        n_b = tl.sum(cnt, axis=0)
        mean_b = tl.sum(cnt[:, None] * mu, axis=0) / n_b
        dev = tl.where(mask, mu - mean_b[None, :], 0.0)
        m2_b = tl.sum(q, axis=0) + tl.sum(cnt[:, None] * dev * dev, axis=0)
        n_new = n_acc + n_b
        delta = mean_b - mean_acc
        mean_acc += delta * (n_b / n_new)
        m2_acc += m2_b + delta * delta * (n_acc * n_b / n_new)
        n_acc = n_new
    return n_acc, mean_acc + shift, m2_acc


@triton.jit(do_not_specialize=SIZE_ARGS)
def bn_merge_kernel(pmean_ptr, pm2_ptr, pcount_ptr, omean_ptr, om2_ptr, ocount_ptr, T, C,
                    ROWS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """First level: program (i, j) merges rows [i * ROWS, (i + 1) * ROWS) of channel block j into row i."""
    chunk = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    t_begin = chunk * ROWS
    count, mean, m2 = _merge_rows(pmean_ptr, pm2_ptr, pcount_ptr, t_begin, tl.minimum(t_begin + ROWS, T), cols,
                                  col_ok, C, BLOCK_T)
    tl.store(omean_ptr + chunk * C + cols, mean, mask=col_ok)
    tl.store(om2_ptr + chunk * C + cols, m2, mask=col_ok)
    if tl.program_id(1) == 0:
        tl.store(ocount_ptr + chunk, tl.max(count, axis=0))


@triton.jit(do_not_specialize=SIZE_ARGS)
def bn_finalize_kernel(
    pmean_ptr, pm2_ptr, pcount_ptr, gamma_ptr, beta_ptr, rmean_ptr, rvar_ptr, tracked_ptr,
    scale_ptr, shift_ptr, mean_ptr, invstd_ptr,
    T, C, eps, momentum,
    UPDATE: tl.constexpr, COUNT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    if COUNT:  # BatchNorm2d's num_batches_tracked.add_(1), once per call (a scalar store: one thread writes)
        if tl.program_id(0) == 0:
            tl.store(tracked_ptr, tl.load(tracked_ptr) + 1)
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    n_acc, mean_acc, m2_acc = _merge_rows(pmean_ptr, pm2_ptr, pcount_ptr, 0, T, cols, col_ok, C, BLOCK_T)
    invstd = tl.rsqrt(m2_acc / n_acc + eps)
    gamma = tl.load(gamma_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    beta = tl.load(beta_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    scale = gamma * invstd
    tl.store(scale_ptr + cols, scale, mask=col_ok)
    tl.store(shift_ptr + cols, beta, mask=col_ok)
    tl.store(mean_ptr + cols, mean_acc, mask=col_ok)
    tl.store(invstd_ptr + cols, invstd, mask=col_ok)
    if UPDATE:
        # As BatchNorm2d: running_var takes the unbiased variance.
        rm = tl.load(rmean_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        rv = tl.load(rvar_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        rm = rm * (1.0 - momentum) + mean_acc * momentum
        rv = rv * (1.0 - momentum) + (m2_acc / (n_acc - 1.0)) * momentum
        tl.store(rmean_ptr + cols, rm.to(rmean_ptr.dtype.element_ty), mask=col_ok)
        tl.store(rvar_ptr + cols, rv.to(rvar_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def bn_fold_kernel(rmean_ptr, rvar_ptr, gamma_ptr, beta_ptr, scale_ptr, shift_ptr, mean_ptr, invstd_ptr, C, eps,
                   BLOCK_C: tl.constexpr):
    """A BN's running statistics folded with gamma and beta: bn_finalize_kernel's arithmetic for one tile of
    count 1 (what a block in training normalises with where a BN is in eval mode)."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    mean = tl.load(rmean_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    var = tl.load(rvar_ptr + cols, mask=col_ok, other=1.0).to(tl.float32)
    invstd = tl.rsqrt(var + eps)
    gamma = tl.load(gamma_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    beta = tl.load(beta_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(scale_ptr + cols, gamma * invstd, mask=col_ok)
    tl.store(shift_ptr + cols, beta, mask=col_ok)
    tl.store(mean_ptr + cols, mean, mask=col_ok)
    tl.store(invstd_ptr + cols, invstd, mask=col_ok)


@triton.jit
def _tile(rows, pid_c, M, C, HW, BLOCK_C: tl.constexpr):
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < M)[:, None] & (cols < C)[None, :]
    n = (rows // HW).to(tl.int64)
    hw = (rows % HW).to(tl.int64)
    return cols, mask, n, hw


@triton.jit
def _offsets(n, hw, cols, sn, sc, shw):
    return n[:, None] * sn + hw[:, None] * shw + cols[None, :].to(tl.int64) * sc


@triton.jit(do_not_specialize=SIZE_ARGS)
def bn_add_relu_kernel(
    z_ptr, mean_ptr, scale_ptr, shift_ptr, res_ptr, rmean_ptr, rscale_ptr, rshift_ptr, out_ptr,
    M, C, HW, szn, szc, szhw, srn, src, srhw, son, soc, sohw,
    HAS_RES: tl.constexpr, RES_BN: tl.constexpr, RELU: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """act((z - mean) * scale + shift + r) with r the residual, or its own batch norm
    (residual - res_mean) * res_scale + res_shift (a shortcut convolution followed by BN)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols, mask, n, hw = _tile(rows, tl.program_id(1), M, C, HW, BLOCK_C)
    col_ok = cols < C
    z = tl.load(z_ptr + _offsets(n, hw, cols, szn, szc, szhw), mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + cols, mask=col_ok, other=0.0)
    scale = tl.load(scale_ptr + cols, mask=col_ok, other=0.0)
    shift = tl.load(shift_ptr + cols, mask=col_ok, other=0.0)
    y = (z - mean[None, :]) * scale[None, :] + shift[None, :]
    if HAS_RES:
        r = tl.load(res_ptr + _offsets(n, hw, cols, srn, src, srhw), mask=mask, other=0.0).to(tl.float32)
        if RES_BN:
            r_mean = tl.load(rmean_ptr + cols, mask=col_ok, other=0.0)
            r_scale = tl.load(rscale_ptr + cols, mask=col_ok, other=0.0)
            r_shift = tl.load(rshift_ptr + cols, mask=col_ok, other=0.0)
            r = (r - r_mean[None, :]) * r_scale[None, :] + r_shift[None, :]
        y += r
    if RELU:
        y = tl.maximum(y, 0.0, propagate_nan=tl.PropagateNan.ALL)
    tl.store(out_ptr + _offsets(n, hw, cols, son, soc, sohw), y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=SIZE_ARGS)
def bn_relu_backward_reduce_kernel(
    g_ptr, mask_ptr, z_ptr, mean_ptr, invstd_ptr, psum_ptr, psumx_ptr,
    M, C, HW, sgn, sgc, sghw, smn, smc, smhw, szn, szc, szhw,
    ROWS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Program (i, j): per-channel sums of gm and gm * xhat over rows [i * ROWS, (i + 1) * ROWS)."""
    pid_r = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    mean = tl.load(mean_ptr + cols, mask=col_ok, other=0.0)
    invstd = tl.load(invstd_ptr + cols, mask=col_ok, other=0.0)
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    accx = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for r0 in range(pid_r * ROWS, pid_r * ROWS + ROWS, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        _, mask, n, hw = _tile(rows, tl.program_id(1), M, C, HW, BLOCK_C)
        g = tl.load(g_ptr + _offsets(n, hw, cols, sgn, sgc, sghw), mask=mask, other=0.0).to(tl.float32)
        src = tl.load(mask_ptr + _offsets(n, hw, cols, smn, smc, smhw), mask=mask, other=0.0)
        gm = tl.where(src <= 0, 0.0, g)  # ReLU's backward as threshold_backward: NaN passes
        z = tl.load(z_ptr + _offsets(n, hw, cols, szn, szc, szhw), mask=mask, other=0.0).to(tl.float32)
        acc += gm
        accx += gm * ((z - mean[None, :]) * invstd[None, :])
    tl.store(psum_ptr + pid_r * C + cols, tl.sum(acc, axis=0), mask=col_ok)
    tl.store(psumx_ptr + pid_r * C + cols, tl.sum(accx, axis=0), mask=col_ok)


@triton.jit(do_not_specialize=SIZE_ARGS)
def sum_partials_kernel(psum_ptr, psumx_ptr, sum_ptr, sumx_ptr, T, C,
                        ROWS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program (i, j): column sums of rows [i * ROWS, (i + 1) * ROWS) of channel block j, into row i."""
    chunk = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    accx = tl.zeros((BLOCK_C,), dtype=tl.float32)
    t_end = tl.minimum(chunk * ROWS + ROWS, T)
    for t0 in range(chunk * ROWS, t_end, BLOCK_T):
        ts = t0 + tl.arange(0, BLOCK_T)
        mask = (ts < t_end)[:, None] & col_ok[None, :]
        acc += tl.sum(tl.load(psum_ptr + ts[:, None] * C + cols[None, :], mask=mask, other=0.0), axis=0)
        accx += tl.sum(tl.load(psumx_ptr + ts[:, None] * C + cols[None, :], mask=mask, other=0.0), axis=0)
    tl.store(sum_ptr + chunk * C + cols, acc, mask=col_ok)
    tl.store(sumx_ptr + chunk * C + cols, accx, mask=col_ok)


@triton.jit(do_not_specialize=SIZE_ARGS)
def bn_relu_backward_apply_kernel(
    g_ptr, mask_ptr, z_ptr, mean_ptr, invstd_ptr, scale_ptr, sum_ptr, sumx_ptr, dz_ptr, gm_ptr,
    M, C, HW, inv_count, sgn, sgc, sghw, smn, smc, smhw, szn, szc, szhw, sdn, sdc, sdhw,
    BATCH_STATS: tl.constexpr, WANT_GM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols, mask, n, hw = _tile(rows, tl.program_id(1), M, C, HW, BLOCK_C)
    col_ok = cols < C
    g = tl.load(g_ptr + _offsets(n, hw, cols, sgn, sgc, sghw), mask=mask, other=0.0).to(tl.float32)
    src = tl.load(mask_ptr + _offsets(n, hw, cols, smn, smc, smhw), mask=mask, other=0.0)
    gm = tl.where(src <= 0, 0.0, g)  # ReLU's backward as threshold_backward: NaN passes
    scale = tl.load(scale_ptr + cols, mask=col_ok, other=0.0)
    if BATCH_STATS:
        z = tl.load(z_ptr + _offsets(n, hw, cols, szn, szc, szhw), mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + cols, mask=col_ok, other=0.0)
        invstd = tl.load(invstd_ptr + cols, mask=col_ok, other=0.0)
        mean_g = tl.load(sum_ptr + cols, mask=col_ok, other=0.0) * inv_count
        mean_gx = tl.load(sumx_ptr + cols, mask=col_ok, other=0.0) * inv_count
        xhat = (z - mean[None, :]) * invstd[None, :]
        dz = scale[None, :] * (gm - mean_g[None, :] - xhat * mean_gx[None, :])
    else:
        dz = scale[None, :] * gm
    out_off = _offsets(n, hw, cols, sdn, sdc, sdhw)
    tl.store(dz_ptr + out_off, dz.to(dz_ptr.dtype.element_ty), mask=mask)
    if WANT_GM:
        tl.store(gm_ptr + out_off, gm.to(gm_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------- launchers
from typing import Optional  # noqa: E402

import torch  # noqa: E402

from ..base import new_output  # noqa: E402
from .configs import device_model, elementwise_config, reduce_rows  # noqa: E402
from .conv import output_memory_format  # noqa: E402
from .launch import cdiv, launch, next_power_of_2  # noqa: E402

BLOCK_T = 32            # partial rows a merge step reads at once
MERGE_ROWS = 128        # rows one first-level program merges; a single level below this many
FINALIZE_BLOCK_C = 64


def plane_strides(t: torch.Tensor) -> Optional[tuple[int, int, int]]:
    """(stride_n, stride_c, stride_hw) when t's (H, W) plane is dense (NCHW, channels_last), else None."""
    _, _, h, w = t.shape
    sn, sc, sh, sw = t.stride()
    if w == 1:
        return sn, sc, sh
    if h == 1 or sh == w * sw:
        return sn, sc, sw
    return None


def _planar(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    strides = plane_strides(t)
    if strides is None:
        t = t.contiguous(memory_format=output_memory_format(t))
        strides = plane_strides(t)
    return t, strides


def _grid(m: int, c: int) -> tuple[tuple[int, int], int, int, int]:
    block_r, block_c, warps = elementwise_config(c)
    return (cdiv(m, block_r), cdiv(c, block_c)), block_r, block_c, warps


def launch_bn_merge(part_mean, part_m2, part_count):
    """All tiles merged into one row, in one program per channel block: (mean (C,), M2 (C,), count (1,))."""
    t, c = part_mean.shape
    dev = part_mean.device
    mean, m2 = new_output((1, c), torch.float32, dev), new_output((1, c), torch.float32, dev)
    count = new_output((1,), torch.float32, dev)
    rows = max(BLOCK_T, next_power_of_2(t))
    launch(bn_merge_kernel, (1, cdiv(c, FINALIZE_BLOCK_C)), (part_mean, part_m2, part_count, mean, m2, count, t, c),
           dict(ROWS=rows, BLOCK_T=BLOCK_T, BLOCK_C=FINALIZE_BLOCK_C), num_warps=4, device=dev)
    return mean.view(c), m2.view(c), count


def launch_bn_finalize(part_mean, part_m2, part_count, gamma, beta, eps, running_mean, running_var, momentum,
                       num_batches_tracked=None):
    t, c = part_mean.shape
    dev = part_mean.device
    block_c = FINALIZE_BLOCK_C
    if t > MERGE_ROWS:  # first level: chunks of MERGE_ROWS tiles in parallel
        chunks = cdiv(t, MERGE_ROWS)
        merged = (new_output((chunks, c), torch.float32, dev), new_output((chunks, c), torch.float32, dev),
                  new_output((chunks,), torch.float32, dev))
        launch(bn_merge_kernel, (chunks, cdiv(c, block_c)),
               (part_mean, part_m2, part_count, *merged, t, c),
               dict(ROWS=MERGE_ROWS, BLOCK_T=BLOCK_T, BLOCK_C=block_c), num_warps=4, device=dev)
        part_mean, part_m2, part_count = merged
        t = chunks
    outs = [new_output((c,), torch.float32, dev) for _ in range(4)]
    update, count = running_mean is not None, num_batches_tracked is not None
    if count:
        _check_batch_count(num_batches_tracked, dev)
    launch(bn_finalize_kernel, (cdiv(c, block_c),),
           (part_mean, part_m2, part_count, gamma, beta,
            running_mean if update else None, running_var if update else None,
            num_batches_tracked if count else None, *outs, t, c, float(eps), float(momentum)),
           dict(UPDATE=update, COUNT=count, BLOCK_T=BLOCK_T, BLOCK_C=block_c), num_warps=4, device=dev)
    return tuple(outs)


FOLD_BLOCK_C = 128


def launch_bn_fold(running_mean, running_var, gamma, beta, eps):
    c = running_mean.shape[0]
    dev = running_mean.device
    for name, t in (("running_var", running_var), ("gamma", gamma), ("beta", beta)):
        if t.shape != (c,) or t.device != dev:
            raise RuntimeError(f"bn_fold: {name} must have shape ({c},) on {dev}, got {tuple(t.shape)} on {t.device}")
    vecs = [t if t.is_contiguous() else t.contiguous() for t in (running_mean, running_var, gamma, beta)]
    outs = [new_output((c,), torch.float32, dev) for _ in range(4)]
    if c:
        launch(bn_fold_kernel, (cdiv(c, FOLD_BLOCK_C),), (*vecs, *outs, c, float(eps)), dict(BLOCK_C=FOLD_BLOCK_C),
               num_warps=4, device=dev)
    return tuple(outs)


def _check_batch_count(tracked, device) -> None:
    """bn_finalize's num_batches_tracked, as the extension's check_bn_finalize has it."""
    if tracked.dtype != torch.int64 or tracked.numel() != 1 or tracked.device != device:
        raise RuntimeError(f"bn_finalize: num_batches_tracked must be one int64 element on {device}, got "
                           f"{tracked.dtype} of shape {tuple(tracked.shape)} on {tracked.device}")


def launch_bn_add_relu(z, mean, scale, shift, residual, relu, out_dtype, res_mean=None, res_scale=None,
                       res_shift=None):
    n, c, h, w = z.shape
    z, zs = _planar(z)
    out = new_output(z.shape, out_dtype, z.device, output_memory_format(z))
    _, os_ = _planar(out)
    if residual is not None:
        residual, rs = _planar(residual)
    else:
        rs = (0, 0, 0)
    res_bn = residual is not None and res_scale is not None
    grid, block_r, block_c, warps = _grid(n * h * w, c)
    launch(bn_add_relu_kernel, grid,
           (z, mean, scale, shift, residual,  # unused pointers as None: constexprs, nothing to read
            res_mean if res_bn else None, res_scale if res_bn else None, res_shift if res_bn else None, out,
            n * h * w, c, h * w, *zs, *rs, *os_),
           dict(HAS_RES=residual is not None, RES_BN=res_bn, RELU=bool(relu), BLOCK_R=block_r, BLOCK_C=block_c),
           num_warps=warps, device=z.device)
    return out


def launch_bn_backward_reduce(grad, mask_src, z, mean, invstd):
    n, c, h, w = z.shape
    grad, gs = _planar(grad)
    mask_src, ms = _planar(mask_src)
    z, zs = _planar(z)
    m = n * h * w
    _, block_r, block_c, warps = _grid(m, c)
    dev = z.device
    rows = reduce_rows(m, cdiv(c, block_c), block_r, device_model(dev).sms)
    tiles = cdiv(m, rows)
    psum = new_output((tiles, c), torch.float32, dev)
    psumx = new_output((tiles, c), torch.float32, dev)
    launch(bn_relu_backward_reduce_kernel, (tiles, cdiv(c, block_c)),
           (grad, mask_src, z, mean, invstd, psum, psumx, m, c, h * w, *gs, *ms, *zs),
           dict(ROWS=rows, BLOCK_R=block_r, BLOCK_C=block_c), num_warps=warps, device=dev)
    if tiles == 1:  # one program summed every row (a small layer, where the call is host time): done
        return psum.view(c), psumx.view(c)
    while True:  # merge the partial rows, MERGE_ROWS per program, until one row is left
        chunks = cdiv(tiles, MERGE_ROWS)
        shape = (chunks, c) if chunks > 1 else (c,)
        sums, sumsx = new_output(shape, torch.float32, dev), new_output(shape, torch.float32, dev)
        launch(sum_partials_kernel, (chunks, cdiv(c, block_c)), (psum, psumx, sums, sumsx, tiles, c),
               dict(ROWS=MERGE_ROWS, BLOCK_T=BLOCK_T, BLOCK_C=block_c), num_warps=4, device=dev)
        if chunks == 1:
            return sums, sumsx
        psum, psumx, tiles = sums, sumsx, chunks


def launch_bn_backward_apply(grad, mask_src, z, mean, invstd, scale, sum_g, sum_gx, count, batch_stats, want_gm):
    n, c, h, w = z.shape
    grad, gs = _planar(grad)
    mask_src, ms = _planar(mask_src)
    z, zs = _planar(z)
    fmt = output_memory_format(z)
    dz = new_output(z.shape, z.dtype, z.device, fmt)
    gm = new_output(z.shape, grad.dtype, z.device, fmt) if want_gm else torch.empty(0, device=z.device)
    _, ds = _planar(dz)
    grid, block_r, block_c, warps = _grid(n * h * w, c)
    launch(bn_relu_backward_apply_kernel, grid,
           (grad, mask_src, z, mean, invstd, scale, sum_g, sum_gx, dz, gm if want_gm else None,
            n * h * w, c, h * w, 1.0 / count, *gs, *ms, *zs, *ds),
           dict(BATCH_STATS=bool(batch_stats), WANT_GM=bool(want_gm), BLOCK_R=block_r, BLOCK_C=block_c),
           num_warps=warps, device=z.device)
    return dz, gm
