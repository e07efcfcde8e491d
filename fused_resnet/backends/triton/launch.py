"""The one path every Triton kernel of the package is launched through.

A launch is counted (tests prove how many kernels a block launches), optionally recorded as a
``LaunchSpec`` (what the ahead-of-time compiler in ``fused_resnet.kernel_report`` rebuilds the variant
from: argument types and the properties the JIT specialises on, constexprs, warps, stages), and run on
the device of its tensors: Triton launches on the *current* CUDA device, so a model on cuda:1 while
cuda:0 is current is launched inside a guard for cuda:1.

``recording(execute=False)`` records without running anything: the launchers still allocate their
outputs and choose their configurations exactly as they would, which is how the variants a workload
launches are listed on a machine without a GPU (``python -m fused_resnet kernels``).

"The one path" up to a replay: operator calls that replay.py has planned launch the same compiled
kernels from C++ without coming here; a recorder or a counter turns replaying off while it is active.
"""

from __future__ import annotations

import functools
import operator
import os
import threading
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch

LAUNCHES: Counter = Counter()   # launches through ``launch`` (calls replayed from C++ do not count: replay.py)

# Kernel arguments the JIT must not specialise on: sizes that vary with the batch or the image (each
# distinct value equal to 1 or divisible by 16 would be another compilation). Channel counts and strides
# stay specialised: their divisibility is what lets the compiler vectorise channel-contiguous loads.
SIZE_ARGS = ("N", "H", "W", "P", "Q", "M", "T", "HW", "SC_H", "SC_W")

_INT32 = (-(2**31), 2**31 - 1)


# Host-side arithmetic of the launchers, in plain Python: Triton 3.8's ``triton.cdiv`` and
# ``triton.next_power_of_2`` are constexpr functions whose calls from host code cost microseconds each
# (argument unwrapping), some two dozen times per training block.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 0 else 0


@dataclass(frozen=True)
class LaunchSpec:
    """One kernel variant as the JIT sees it. ``args`` holds, per positional argument, ``("tensor",
    dtype, aligned16)``, ``("int", value)``, ``("float",)`` or ``("none",)`` (a pointer the variant does
    not use: a constexpr None to the JIT); ``constexprs`` the compile-time values."""

    kernel: str                      # "module:qualname"
    args: tuple
    constexprs: tuple                # sorted (name, value) pairs
    num_warps: int
    num_stages: int

    def to_json(self) -> dict:
        return {"kernel": self.kernel, "args": [list(a) for a in self.args],
                "constexprs": dict(self.constexprs), "num_warps": self.num_warps, "num_stages": self.num_stages}

    @classmethod
    def from_json(cls, d: dict) -> "LaunchSpec":
        return cls(d["kernel"], tuple(tuple(a) for a in d["args"]), tuple(sorted(d["constexprs"].items())),
                   d["num_warps"], d["num_stages"])

    @property
    def short_name(self) -> str:
        return self.kernel.rsplit(":", 1)[-1]


def _arg_spec(value: Any) -> tuple:
    if value is None:
        return ("none",)
    if isinstance(value, torch.Tensor):
        return ("tensor", str(value.dtype).removeprefix("torch."), value.data_ptr() % 16 == 0)
    if isinstance(value, bool):
        return ("int", int(value))
    if isinstance(value, int):
        return ("int", value)
    if isinstance(value, float):
        return ("float",)
    raise TypeError(f"unsupported kernel argument {type(value).__name__}")


def _variant_key(spec: LaunchSpec, arg_names: tuple) -> tuple:
    """What tells two launches' compilations apart: for ints, the JIT's specialisation (equal to 1,
    divisible by 16, 32 or 64 bits) unless the argument is a size it must not specialise on."""
    key = []
    for name, arg in zip(arg_names, spec.args):
        if arg[0] == "int":
            v = arg[1]
            width = 32 if _INT32[0] <= v <= _INT32[1] else 64
            key.append(("int", width) if name in SIZE_ARGS else ("int", width, v == 1, v % 16 == 0))
        else:
            key.append(arg)
    return (spec.kernel, tuple(key), spec.constexprs, spec.num_warps, spec.num_stages)


class Recorder:
    """Collects the distinct variants launched while active (first launch of each kept)."""

    def __init__(self, execute: bool = True) -> None:
        self.execute = execute
        self.variants: dict[tuple, LaunchSpec] = {}
        # every launch in order: its spec (with its own sizes), grid, and the key of its variant
        self.launches: list[tuple[LaunchSpec, tuple, tuple]] = []

    def add(self, kernel, grid: tuple, args: tuple, constexprs: dict, num_warps: int, num_stages: int) -> None:
        fn = getattr(kernel, "fn", kernel)
        spec = LaunchSpec(f"{fn.__module__}:{fn.__qualname__}", tuple(_arg_spec(a) for a in args),
                          tuple(sorted(constexprs.items())), num_warps, num_stages)
        key = _variant_key(spec, tuple(_param_names(kernel)))
        self.variants.setdefault(key, spec)
        self.launches.append((spec, tuple(grid), key))

    @property
    def specs(self) -> list[LaunchSpec]:
        return list(self.variants.values())


_RECORDERS: list[Recorder] = []


def _param_names(kernel) -> list[str]:
    names = getattr(kernel, "arg_names", None)
    if names is None:
        import inspect
        names = list(inspect.signature(getattr(kernel, "fn", kernel)).parameters)
    return list(names)


@contextmanager
def recording(execute: bool = True) -> Iterator[Recorder]:
    """Record every launch inside the block; with ``execute=False`` the kernels are not run at all."""
    rec = Recorder(execute)
    _RECORDERS.append(rec)
    try:
        yield rec
    finally:
        _RECORDERS.remove(rec)


def executing() -> bool:
    """False inside ``recording(execute=False)``: launches are listed, not run."""
    return all(rec.execute for rec in _RECORDERS)


_COUNTING: list[Counter] = []


@contextmanager
def counting() -> Iterator[Counter]:
    """Count the kernels launched inside the block: ``with counting() as c: ...; sum(c.values())``. Every
    launch inside goes through ``launch`` (no operator call is replayed from C++: ``replay.gate``)."""
    before = LAUNCHES.copy()
    result: Counter = Counter()
    _COUNTING.append(result)
    try:
        yield result
    finally:
        _COUNTING.remove(result)
        result.update(LAUNCHES - before)


# ------------------------------------------------------------------------------------------ direct launches
# ``kernel[grid](...)`` re-derives at every call what picks the compiled variant (each argument's
# specialisation, the cache key, the options): ~30 us of Python per launch on a CI-class CPU, a dozen
# launches per training block. The first launch of a variant goes through it; later launches whose
# arguments key the same call that compiled kernel's launcher directly, with the arguments Triton's own
# ``JITFunction.run`` passes it (the path ``CompiledKernel[grid]`` takes). The key is at least as fine as
# the JIT's: each tensor's dtype and 16-byte alignment, every other argument's value, the constexprs,
# warps, stages and device. Off under the interpreter (nothing compiled), while a launch hook is set (a
# profiler such as Proton reads the JIT path's launch metadata), with a Triton release not in
# CHECKED_TRITON, and with FUSED_RESNET_TRITON_DIRECT=0.

# Recorders of ``offline.offline_launches()`` (Triton compiling for a GPU this machine does not have).
OFFLINE: list = []


def offline_active() -> bool:
    """True while launches are recorded offline: the Triton backend takes CPU tensors as stand-ins."""
    return bool(OFFLINE)


# The Triton releases whose launch interface the offline check has passed (``JITFunction.run`` and
# ``CompiledKernel.run`` as used below); another release takes Triton's own path until checked.
CHECKED_TRITON = ((3, 6), (3, 7), (3, 8))


def _triton_checked() -> bool:
    import triton
    try:
        return tuple(int(p) for p in triton.__version__.split(".")[:2]) in CHECKED_TRITON
    except ValueError:
        return False


DIRECT = os.environ.get("FUSED_RESNET_TRITON_DIRECT", "1") != "0" and _triton_checked()
_DIRECT: dict[tuple, tuple] = {}      # key -> (compiled kernel, the constexpr/default tail of its arguments)
_NO_DIRECT: set = set()               # ids of kernels whose launch returned no compiled kernel (interpreter)
DIRECT_LAUNCHES: Counter = Counter()  # launches that took the direct path, per kernel (tests read it)
MAX_DIRECT = 4096                     # remembered variants-with-sizes before the table starts afresh
EPOCH = [0]                           # bumped whenever remembered compiled kernels stop applying
_CAPTURES: dict = {}                  # thread ident -> its replay capture in progress (replay.py)


# cuDNN's TF32 switch, read through the getter behind ``torch.backends.cudnn.allow_tf32`` (the property
# costs ~0.2 us more per read): what the convolution launcher decides fp32's precision from, and what
# replay.gate() keys plans on -- one function for both, so the two never disagree.
tf32_allowed = getattr(torch._C, "_get_cudnn_allow_tf32", None) or (lambda: torch.backends.cudnn.allow_tf32)


_LAYOUTS: dict[tuple, tuple] = {}      # (kernel, argument types) -> getters of its tensors and its other args
_dtype_of = operator.attrgetter("dtype")
_data_ptr = torch.Tensor.data_ptr


def forget_direct_launches() -> None:
    """Drop every remembered compiled kernel (another driver became active)."""
    EPOCH[0] += 1
    _DIRECT.clear()
    _NO_DIRECT.clear()
    _LAYOUTS.clear()


def _picker(indices: list[int]):
    """A function returning the tuple of ``args[i]`` for ``indices`` (``itemgetter`` returns a bare item
    for one index and needs at least one)."""
    if len(indices) == 1:
        i = indices[0]
        return lambda args: (args[i],)
    return operator.itemgetter(*indices) if indices else (lambda args: ())


def _direct_key(fn, args: tuple, constexprs: dict, num_warps: int, num_stages: int, device: int) -> tuple:
    types = tuple(map(type, args))
    layout = _LAYOUTS.get((id(fn), types))
    if layout is None:
        is_tensor = [issubclass(t, torch.Tensor) for t in types]
        layout = _LAYOUTS[(id(fn), types)] = (_picker([i for i, t in enumerate(is_tensor) if t]),
                                               _picker([i for i, t in enumerate(is_tensor) if not t]))
    tensors = layout[0](args)
    misaligned = functools.reduce(operator.or_, map(_data_ptr, tensors), 0) & 15
    # all 16-byte aligned (the usual case) in one test; else which ones are
    aligned = True if not misaligned else tuple(p & 15 == 0 for p in map(_data_ptr, tensors))
    return (id(fn), num_warps, num_stages, device, tuple(constexprs.items()), types, layout[1](args),
            tuple(map(_dtype_of, tensors)), aligned)


@functools.lru_cache(maxsize=None)
def _runtime():
    """Triton's driver config and runtime knobs (imported on the first launch)."""
    from triton import knobs
    from triton.runtime.driver import driver
    return driver, knobs.runtime


def _hooks_idle(runtime) -> bool:
    """No launch hook that runs is set (an empty hook chain is idle). Asked per launch: no generator."""
    enter, leave = runtime.launch_enter_hook, runtime.launch_exit_hook
    return (enter is None or not getattr(enter, "calls", True)) and (leave is None or not getattr(leave, "calls", True))


def _remember(key: tuple, fn, compiled, nargs: int, constexprs: dict) -> Optional[tuple]:
    """Keep ``compiled`` for ``key`` when it carries what a direct launch needs; returns the entry kept."""
    if not all(hasattr(compiled, a) for a in ("run", "function", "packed_metadata")):
        _NO_DIRECT.add(id(fn))
        return None
    import inspect
    params = list(inspect.signature(fn.fn).parameters.values())
    tail = tuple(constexprs[p.name] if p.name in constexprs else p.default for p in params[nargs:])
    if any(v is inspect.Parameter.empty for v in tail):
        _NO_DIRECT.add(id(fn))
        return None
    if len(_DIRECT) >= MAX_DIRECT:  # sizes key entries too: a workload of ever new shapes starts afresh
        _DIRECT.clear()
        _LAYOUTS.clear()
    entry = _DIRECT[key] = (compiled, tail)
    return entry


def _run(kernel, grid: tuple, args: tuple, constexprs: dict, num_warps: int, num_stages: int) -> Optional[tuple]:
    """Launch; returns the (compiled kernel, argument tail) a direct launch of these arguments calls, or
    None where there is none (the interpreter, direct launches off)."""
    if not DIRECT or id(kernel) in _NO_DIRECT:
        kernel[grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages)
        return None
    if not hasattr(kernel, "device_caches"):   # the interpreter's functions: nothing is compiled
        _NO_DIRECT.add(id(kernel))
        kernel[grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages)
        return None
    driver, runtime = _runtime()
    drv = driver.active
    device = drv.get_current_device()
    key = _direct_key(kernel, args, constexprs, num_warps, num_stages, device)
    entry = _DIRECT.get(key)
    if entry is None or not _hooks_idle(runtime):
        compiled = kernel[grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages)
        return _remember(key, kernel, compiled, len(args), constexprs) if entry is None else entry
    compiled, tail = entry
    n = len(grid)
    compiled.run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, drv.get_current_stream(device),
                 compiled.function, compiled.packed_metadata, None, runtime.launch_enter_hook,
                 runtime.launch_exit_hook, *args, *tail)
    DIRECT_LAUNCHES[kernel.fn.__name__] += 1
    return entry


def launch(kernel, grid: tuple, args: tuple, constexprs: dict, *, num_warps: int, num_stages: int = 1,
           device: Optional[torch.device] = None) -> None:
    """Launch ``kernel[grid](*args, **constexprs)`` on ``device`` (the inputs' device)."""
    fn = getattr(kernel, "fn", kernel)
    LAUNCHES[fn.__name__.removesuffix("_kernel")] += 1
    execute = True
    for rec in _RECORDERS:
        rec.add(kernel, grid, args, constexprs, num_warps, num_stages)
        execute = execute and rec.execute
    if not execute:
        return
    if device is not None and device.type == "cuda" and device.index is not None \
            and device.index != torch.cuda.current_device():
        with torch.cuda.device(device.index):
            _run(kernel, grid, args, constexprs, num_warps, num_stages)
        entry = None  # a replay launches on the current device
    else:
        entry = _run(kernel, grid, args, constexprs, num_warps, num_stages)
    if _CAPTURES:
        cap = _CAPTURES.get(threading.get_ident())
        if cap is not None:
            cap.launched(kernel, grid, args, entry)
