"""Tile configurations of the Triton kernels: one place.

The configuration is a pure function of the problem (shape, dtype) and of the device it runs on (its
architecture and number of SMs): a table of tuned entries for the seed's shapes over a wave-aware
heuristic. It must stay a pure function: the number of statistics tiles a launch writes depends on
BLOCK_M, and the fake (meta) implementation used by ``torch.compile`` has to predict it.

CPU tensors (the Triton interpreter in tests, and the dry runs that list a workload's kernel variants)
take the configuration of a modelled GPU, an H100 unless ``modelled_device`` says otherwise, so the
interpreter runs the configurations the GPU gets. ``forced_conv_config`` injects one configuration
(tests run every reachable one under the interpreter; the tuner times candidates).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator, Optional

import torch


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class DeviceModel:
    """What the configuration depends on: compute capability (major * 10 + minor) and SM count."""

    arch: int
    sms: int

    @property
    def shared_bytes(self) -> int:
        """Shared memory one CTA may use (opt-in maximum)."""
        return {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}.get(self.arch, 99 * 1024)


H100 = DeviceModel(90, 132)
A100 = DeviceModel(80, 108)
_MODELLED: list[DeviceModel] = [H100]


@contextmanager
def modelled_device(model: DeviceModel) -> Iterator[None]:
    """CPU tensors take ``model``'s configurations inside the block (default: an H100)."""
    _MODELLED.append(model)
    try:
        yield
    finally:
        _MODELLED.pop()


@lru_cache(maxsize=None)
def _cuda_model(index: int) -> DeviceModel:
    props = torch.cuda.get_device_properties(index)
    return DeviceModel(props.major * 10 + props.minor, props.multi_processor_count)


def device_model(device: torch.device) -> DeviceModel:
    if device.type == "cuda":
        return _cuda_model(device.index if device.index is not None else torch.cuda.current_device())
    return _MODELLED[-1]


@dataclass(frozen=True)
class ConvConfig:
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    GROUP_M: int
    num_warps: int
    num_stages: int

    def shared_bytes(self, dtype: torch.dtype) -> int:
        """Shared memory of the pipelined operand ring: (BLOCK_M + BLOCK_N) x BLOCK_K per stage."""
        return self.num_stages * (self.BLOCK_M + self.BLOCK_N) * self.BLOCK_K * _itemsize(dtype)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# A 3x3 convolution runs as one flattened loop over taps x channel chunks. Triton has been reported to
# miscompile that loop form at 8 warps (pytorch/pytorch#177823, triton-lang/triton#1254), so it is capped
# at 4; a 1x1 convolution (one tap) may take 8.
MAX_WARPS_FLATTENED = 4

# Tuned entries, keyed by (in_channels, out_channels, output positions per image, kernel size, dtype,
# architecture as major * 10 + minor, training). ``training``: the training composition's variant (a BN +
# ReLU prologue and/or a statistics epilogue: more registers live than inference's folded epilogue, so
# its best tile may differ). Filled from `python -m benchmarks.tune_conv [--mode train]` runs on the GPU
# named beside each entry (none yet; it prints only entries that beat the current choice); the heuristic
# below serves every shape, variant and architecture not listed.
class _Table(dict):
    """A dict whose every change bumps ``launch.EPOCH``: operator calls replayed from C++ (replay.py) were
    planned with the entries of their time."""

    def _changed(self, result=None):
        from .launch import EPOCH
        EPOCH[0] += 1
        return result

    def __setitem__(self, key, value):
        self._changed(super().__setitem__(key, value))

    def __delitem__(self, key):
        self._changed(super().__delitem__(key))

    def __ior__(self, other):
        return self._changed(super().__ior__(other))

    def update(self, *args, **kwargs):
        self._changed(super().update(*args, **kwargs))

    def setdefault(self, key, default=None):
        return self._changed(super().setdefault(key, default))

    def pop(self, *args):
        return self._changed(super().pop(*args))

    def popitem(self):
        return self._changed(super().popitem())

    def clear(self):
        self._changed(super().clear())


TUNED_CONV: dict[tuple[int, int, int, int, torch.dtype, int, bool], ConvConfig] = _Table()

_FORCED: list[ConvConfig] = []


@contextmanager
def forced_conv_config(cfg: ConvConfig) -> Iterator[None]:
    """Every convolution inside the block runs with ``cfg`` (tests, the tuner)."""
    _FORCED.append(cfg)
    try:
        yield
    finally:
        _FORCED.pop()


def _pow2_at_least_16(n: int, cap: int) -> int:
    p = 16
    while p < n and p < cap:
        p *= 2
    return p


# Relative throughput of a tile shape on the tensor cores, per output element: bigger tiles reuse each
# loaded operand more often. A coarse model, used only to trade tile size against filling the machine.
_TILE_EFFICIENCY = {(128, 128): 1.0, (128, 64): 0.9, (64, 128): 0.88, (64, 64): 0.7}


def conv_tile_candidates(kernel: int, dtype: torch.dtype) -> list[tuple[int, int, int]]:
    """(BLOCK_M, BLOCK_N, num_warps) the heuristic chooses among: the tiles that compile without spills
    for every fused variant (``python -m fused_resnet kernels``, sm_90, Triton 3.8: 16-bit 128x64 tiles
    take up to ~240 registers at 4 warps; a float32 (TF32) epilogue with a residual holds its
    [BLOCK_M, BLOCK_N] tile of 64-bit pointers too, and 128x64 or 64x128 float32 tiles spill there)."""
    if dtype == torch.float32:
        return [(64, 64, 4)]
    if kernel == 1:
        return [(128, 128, 8), (128, 64, 4), (64, 128, 4), (64, 64, 4)]
    return [(128, 64, 4), (64, 128, 4), (64, 64, 4)]


def conv_config(in_channels: int, out_channels: int, m: int, positions: int, kernel: int,
                dtype: torch.dtype, device: DeviceModel = H100, training: bool = False) -> ConvConfig:
    """The tile configuration of an implicit GEMM of ``m`` rows (N*P*Q), ``out_channels`` columns and
    ``in_channels * kernel**2`` reduction, on ``device``; ``training``: the training variant (prologue
    and/or statistics), which may have its own tuned entry.

    Wave-aware: each candidate tile's time is modelled as the number of waves its tiles make on the
    SMs over the tile's efficiency, so a layer with few tiles (7x7x512 at batch 32: 100 CTAs of 128x128
    for 132 SMs) takes smaller tiles that fill the machine."""
    if _FORCED:
        return _FORCED[-1]
    tuned = TUNED_CONV.get((in_channels, out_channels, positions, kernel, dtype, device.arch, training))
    if tuned is not None:
        return tuned
    return _modelled_conv_config(in_channels, out_channels, m, positions, kernel, dtype, device)


@lru_cache(maxsize=4096)  # a pure function, asked at every launch: ~15 us of host time per call uncached
def _modelled_conv_config(in_channels: int, out_channels: int, m: int, positions: int, kernel: int,
                          dtype: torch.dtype, device: DeviceModel) -> ConvConfig:
    # K tiles of 128 bytes of channels (64 x 16-bit, 32 x fp32), fewer where the layer has fewer.
    cap_k = 32 if dtype == torch.float32 else 64
    block_k = _pow2_at_least_16(in_channels, cap_k)
    best = None
    for block_m, block_n, warps in conv_tile_candidates(kernel, dtype):
        tiles = -(-m // block_m) * -(-out_channels // block_n)
        per_sm = 2 if block_m * block_n <= 128 * 64 else 1  # CTAs resident per SM (registers, shared memory)
        waves = -(-tiles // (device.sms * per_sm))
        cost = waves * block_m * block_n / _TILE_EFFICIENCY[(block_m, block_n)] / per_sm
        if best is None or cost < best[0]:
            best = (cost, block_m, block_n, warps)
    _, block_m, block_n, warps = best
    stages = 4 if dtype != torch.float32 else 3
    cfg = ConvConfig(block_m, block_n, block_k, GROUP_M=8, num_warps=warps, num_stages=stages)
    while cfg.num_stages > 2 and cfg.shared_bytes(dtype) > device.shared_bytes:
        cfg = ConvConfig(block_m, block_n, block_k, 8, warps, cfg.num_stages - 1)
    return cfg


def elementwise_config(channels: int) -> tuple[int, int, int]:
    """(BLOCK_R rows, BLOCK_C channels, num_warps) for the per-channel elementwise/reduction kernels."""
    block_c = min(128, _pow2_at_least_16(channels, 128))
    return (max(16, 8192 // block_c // 4), block_c, 4)


def reduce_rows(rows_total: int, channel_blocks: int, block_r: int, sms: int) -> int:
    """Activation rows one backward-reduce program sums: BLOCK_R x 1, 2, 4, 8 or 16 (five compiled
    variants at most), the most that still gives every SM four programs. The second GPU run's ncu at
    56x56x64 batch 32 found 512 rows per program -- 196 programs on 132 SMs -- at 9% occupancy and 39%
    of the memory bandwidth (31 us); at 7x7x512 that was 16 programs. More, shorter programs leave more
    partial rows to merge, which costs little (one more small launch at most)."""
    want = 4 * sms
    rows = block_r
    for k in range(1, 5):
        if -(-rows_total // (block_r << k)) * channel_blocks < want:
            break
        rows = block_r << k
    return rows


def reachable_conv_configs(dtypes=(torch.float32, torch.float16, torch.bfloat16),
                           devices: Optional[list[DeviceModel]] = None) -> list[ConvConfig]:
    """Every configuration the table or the heuristic can give a convolution of the benchmark suites'
    cases (and of small test shapes) on the modelled devices: what the interpreter tests must run."""
    from ...bench import SUITES, suite
    from .conv import block_conv_problems

    devices = devices or [H100, A100]
    problems = set()
    for name in SUITES:
        for case in suite(name, "cuda"):
            problems.update(block_conv_problems(case))
    found = set(TUNED_CONV.values())
    for device in devices:
        for dtype in dtypes:
            for cin, cout, m, positions, kernel in problems:
                found.add(conv_config(cin, cout, m, positions, kernel, dtype, device))
    return sorted(found, key=lambda c: (c.BLOCK_M, c.BLOCK_N, c.BLOCK_K, c.num_warps, c.num_stages))
