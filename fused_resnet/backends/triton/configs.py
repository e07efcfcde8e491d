"""Tile configurations of the Triton kernels: one place.

On a GPU the configuration is a pure function of the problem (shape and dtype): a table of tuned
entries for the seed's shapes, falling back on a heuristic. It must stay a pure function, because the
number of statistics tiles a launch writes depends on BLOCK_M and the fake (meta) implementation used by
``torch.compile`` has to predict it. Under the interpreter one small configuration serves everything
(within what the GPU compiler accepts: every ``tl.dot`` dimension >= 16, powers of two).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class ConvConfig:
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    GROUP_M: int
    num_warps: int
    num_stages: int


INTERPRETER_CONV = ConvConfig(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=1)

# Tuned entries, keyed by (in_channels, out_channels, output positions per image, kernel size, dtype).
# Filled from `python benchmarks/tune_conv.py` runs on the GPU named beside each entry (none yet); the heuristic
# below serves every shape not listed.
TUNED_CONV: dict[tuple[int, int, int, int, torch.dtype], ConvConfig] = {}


def _pow2_at_least_16(n: int, cap: int) -> int:
    p = 16
    while p < n and p < cap:
        p *= 2
    return p


def conv_config(in_channels: int, out_channels: int, m: int, positions: int, kernel: int,
                dtype: torch.dtype) -> ConvConfig:
    """The tile configuration for an implicit GEMM of ``m`` rows (N*P*Q), ``out_channels`` columns and
    ``in_channels * kernel**2`` reduction, on the device (or the interpreter)."""
    if interpreting():
        return INTERPRETER_CONV
    tuned = TUNED_CONV.get((in_channels, out_channels, positions, kernel, dtype))
    if tuned is not None:
        return tuned
    # Heuristic: wide tiles along N for wide layers; K tiles of 64 (16-bit) or 32 (fp32) channels, fewer
    # where the layer has fewer; BLOCK_M=64 when the GEMM is too short to fill the machine with 128.
    block_n = 128 if out_channels >= 128 else 64
    cap_k = 32 if dtype == torch.float32 else 64
    block_k = _pow2_at_least_16(in_channels, cap_k)
    block_m = 128 if m >= 128 * 132 // max(1, out_channels // block_n) else 64
    warps = 8 if block_m * block_n >= 128 * 128 else 4
    stages = 4 if dtype != torch.float32 else 3
    return ConvConfig(block_m, block_n, block_k, GROUP_M=8, num_warps=warps, num_stages=stages)


ELEMENTWISE_BLOCK_INTERP = (32, 16)   # (rows, channels) tiles of the per-channel elementwise kernels


def elementwise_config(channels: int) -> tuple[int, int, int]:
    """(BLOCK_R rows, BLOCK_C channels, num_warps) for the per-channel elementwise/reduction kernels."""
    if interpreting():
        return (*ELEMENTWISE_BLOCK_INTERP, 4)
    block_c = min(128, _pow2_at_least_16(channels, 128))
    return (max(16, 8192 // block_c // 4), block_c, 4)
