"""Backend registry: which implementations of the primitives exist here, and which one serves an input.

``"auto"`` walks ``AUTO_ORDER`` for the input's device and mode and takes the first complete backend that can
serve it; the order is fed by benchmark results (README, "Results"). ``FUSED_RESNET_BACKEND`` replaces
``"auto"`` for every module that did not name a backend.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import math
import os
from typing import Optional

import torch
from torch import Tensor

from .base import Backend, BNFold, ConvOut

__all__ = ["Backend", "BNFold", "ConvOut", "available_backends", "get_backend", "resolve_backend",
           "BACKEND_NAMES", "AUTO_ORDER", "SEED_ROUTE"]

# name -> (module, attribute); a backend whose module fails to import (no Triton, nothing compiled) is
# simply absent.
_MODULES = {
    "torch": ("fused_resnet.backends.torch_ref", "TorchBackend"),
    "triton": ("fused_resnet.backends.triton", "TritonBackend"),
    "cuda": ("fused_resnet.backends.extension", "CudaExtensionBackend"),
    "cpp": ("fused_resnet.backends.extension", "CppExtensionBackend"),
}
BACKEND_NAMES = tuple(_MODULES)

# Preference per (device type, mode) for "auto", from measurements; every list ends in "torch" or the seed
# route, so auto always succeeds. SEED_ROUTE is not a backend: where no fused backend was measured at least as fast
# as the seed block in eager PyTorch, auto runs the block's own seed forward (PyTorch's conv, BN, ReLU).
# CPU, float32 NCHW, batch 8, the 96-resize seed shapes, 2-core x86, torch 2.14.1, 2026-11-26 (providers
# timed in interleaved rounds; benchmarks/results/2026-11-26-cpu-x86-2core): eval, cpp 0.97-1.02x eager;
# train forward+backward, cpp 0.87-0.94x and torch 0.62-0.86x -- so CPU training takes the seed route.
# H100, bfloat16 channels_last, torch 2.11, Triton 3.6, 2026-11-26 (benchmarks/results/2026-11-26-h100):
# training, cuda 0.72-1.64x eager and triton 0.21-0.64x (whole ResNet-18/50: cuda 0.85x/0.72x) -- so an
# unmeasured training shape takes the seed route, and a synchronized (fused-only) block the cuda backend;
# eval, triton 0.64-1.57x (1.57x on ResNet-50 at batch 256, where the GPU rather than the host is busy).
SEED_ROUTE = "seed"
AUTO_ORDER = {
    ("cuda", "eval"): ("triton", "cuda", "torch"),
    ("cuda", "train"): (SEED_ROUTE, "cuda", "triton", "torch"),
    ("cpu", "eval"): ("cpp", "torch"),
    ("cpu", "train"): (SEED_ROUTE,),
}
_DEFAULT_ORDER = ("torch",)


class BackendUnavailable(RuntimeError):
    """A backend named explicitly does not exist here or cannot serve an input."""


_LOADED: dict[str, Optional[Backend]] = {}


def _load(name: str) -> Optional[Backend]:
    if name not in _LOADED:
        module, attr = _MODULES[name]
        try:
            backend = getattr(importlib.import_module(module), attr)()
        except ImportError:  # no Triton, nothing compiled
            backend = None
        _LOADED[name] = backend if backend is not None and backend.available() else None
    return _LOADED[name]


def available_backends() -> list[str]:
    """Names of the backends that exist in this installation (whatever the device)."""
    return [name for name in _MODULES if _load(name) is not None]


def get_backend(name: str) -> Backend:
    backend = _LOADED.get(name)  # the path taken under torch.compile: a plain lookup, traceable
    if backend is not None:
        return backend
    if name not in _MODULES:
        raise ValueError(f"unknown backend {name!r}; expected 'auto' or one of {list(_MODULES)}")
    backend = _load(name)
    if backend is None:
        raise BackendUnavailable(
            f"backend {name!r} is not available in this installation (available: {available_backends()})")
    return backend


def requested_backend(name: str) -> str:
    """The backend a module asks for: its own choice, or ``FUSED_RESNET_BACKEND`` when it chose auto."""
    if name == "auto":
        return os.environ.get("FUSED_RESNET_BACKEND", "auto") or "auto"
    return name


_MEASURED: Optional[dict[tuple, list[tuple[int, str]]]] = None


def measured_choice(device_type: str, mode: str, dtype: torch.dtype, shape: tuple) -> Optional[str]:
    """auto's choice for a block shape a committed benchmark run measured (``auto_table.BY_SHAPE``), at the
    measured batch nearest the input's (on a log scale); None for an unmeasured shape. ``shape`` is
    (format, in_channels, out_channels, stride, height, width, batch)."""
    global _MEASURED
    if _MEASURED is None:
        from .auto_table import BY_SHAPE
        index: dict[tuple, list[tuple[int, str]]] = {}
        for key, choice in BY_SHAPE.items():
            index.setdefault(key[:-1], []).append((key[-1], choice))
        _MEASURED = index
    *geometry, batch = shape
    found = _MEASURED.get((device_type, mode, str(dtype).removeprefix("torch."), *geometry))
    if not found:
        return None
    return min(found, key=lambda entry: abs(math.log(entry[0] / max(batch, 1))))[1]


@contextlib.contextmanager
def measured_table(index: dict[tuple, list[tuple[int, str]]]):
    """Use ``index`` as the per-shape table inside the block (keys as ``measured_choice``'s lookups,
    without the batch; values (batch, choice) lists): for tests and for trying a table out."""
    global _MEASURED
    before, _MEASURED = _MEASURED, index
    _resolve_cached.cache_clear()
    try:
        yield
    finally:
        _MEASURED = before
        _resolve_cached.cache_clear()


def resolve_backend_name(name: str, device_type: str, dtype: torch.dtype, training: bool,
                         shape: Optional[tuple] = None, fused_only: bool = False) -> str:
    """The backend that runs an input: the named one (an error says why it cannot), or auto's choice --
    the measured choice for this block shape (``measured_choice``) when there is one this installation
    can run, else the first that can in ``AUTO_ORDER`` (``SEED_ROUTE``: the seed's own forward; never with
    ``fused_only``). A constant for torch.compile: resolved once while tracing, never traced into.
    Remembered per argument set (a pure function of them and of this installation): no search on the
    hot path."""
    return _resolve_requested(requested_backend(name), device_type, dtype, training, shape, fused_only)


def _resolve_requested(name: str, device_type: str, dtype: torch.dtype, training: bool, shape: Optional[tuple],
                       fused_only: bool) -> str:
    """``resolve_backend_name`` for a name ``requested_backend`` already gave: a block call reads the
    environment once (~0.6 us a read while the variable is unset)."""
    return _resolve_cached(name, device_type, dtype, training, shape, fused_only)


@functools.lru_cache(maxsize=4096)
def _resolve_cached(name: str, device_type: str, dtype: torch.dtype, training: bool, shape: Optional[tuple],
                    fused_only: bool) -> str:
    if name != "auto":
        reason = get_backend(name).supports(device_type, dtype, training)
        if reason is not None:
            raise BackendUnavailable(f"backend {name!r} cannot run this input: {reason}")
        return name
    mode = "train" if training else "eval"
    measured = measured_choice(device_type, mode, dtype, shape) if shape is not None else None
    if measured is not None:
        if measured == SEED_ROUTE and not fused_only:
            return measured
        backend = _load(measured) if measured in _MODULES else None
        if backend is not None and backend.complete and backend.supports(device_type, dtype, training) is None:
            return measured
    order = AUTO_ORDER.get((device_type, mode), _DEFAULT_ORDER)
    if fused_only:  # then the device's other mode's order, minus the seed route
        other = AUTO_ORDER.get((device_type, "eval" if mode == "train" else "train"), ())
        order = [c for c in (*order, *other) if c != SEED_ROUTE]
    for candidate in order:
        if candidate == SEED_ROUTE:
            return candidate
        backend = _load(candidate)
        if backend is not None and backend.complete and backend.supports(device_type, dtype, training) is None:
            return candidate
    return "torch"


# What torch.compiler.assume_constant_result does, without importing torch._dynamo (and with it Triton,
# before an entry point could choose the interpreter) at package import.
resolve_backend_name._dynamo_marked_constant = True
_resolve_requested._dynamo_marked_constant = True


def block_shape(block, x: Tensor) -> Optional[tuple]:
    """(format, in_channels, out_channels, stride, height, width, batch): how ``measured_choice`` keys a
    seed-structured block's input. None under torch.compile: sizes may be symbolic there (dynamic shapes),
    and ``AUTO_ORDER`` decides rather than a guard on every size."""
    if torch.compiler.is_compiling() or not getattr(block, "auto_table", False):
        return None  # the table measures the seed block; other blocks take AUTO_ORDER
    n, c, h, w = x.shape
    fmt = "nchw" if x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last) else "nhwc"
    conv = block._modules["conv1"]  # not Module.__getattr__: this runs on every call of an auto block
    return (fmt, c, conv.out_channels, conv.stride[0], h, w, n)


def resolve_backend(name: str, x: Tensor, training: bool, block=None, fused_only: bool = False,
                    device_type: Optional[str] = None) -> Optional[Backend]:
    """The backend object that runs ``x`` (through ``block``, when given, for the per-shape choice), or
    None for the seed route: see ``resolve_backend_name``. ``device_type``: ``x.device.type``, when the
    caller has it."""
    name = requested_backend(name)
    # Only auto looks at the shape (its per-shape table): a named backend skips building the key.
    shape = block_shape(block, x) if block is not None and name == "auto" else None
    name = _resolve_requested(name, device_type or x.device.type, x.dtype, training, shape, fused_only)
    return None if name == SEED_ROUTE else get_backend(name)
