"""Triton operator calls replayed from C++: the Triton backend's host path without its Python.

The training block composed in C++ (csrc/block_train.cpp, ``primitives="triton_"``) calls the Triton
backend's operators (ops.py) a dozen times per step, eager inference its convolution operator twice per
block (``fused_resnet::replayed_triton_conv_out``: its first result alone; ``replayed_triton_conv_fused``
where a call wants the statistics too). Each call's Python -- the launcher's plan, its
allocations, the direct-launch key, the dispatcher's boxing into Python -- cost more host time than the
kernels take at small shapes. So csrc/replay.cpp keys each call on everything the launcher's decisions
read from its arguments (every tensor's dtype, device, sizes, strides and address modulo 16, which
arguments are the same tensor or overlap, every other argument's value) and on the state ``gate()``
reports; the second call of a key runs the Python launcher under a capture (below; the first only marks
the key, so a workload of ever new shapes pays nothing for captures), later calls of that key allocate
the same outputs (the small ones carved from one allocation per call) and call the same compiled kernels
from C++ with the current addresses -- through Triton's C launch where ``_callee`` knows its argument
order, else the call ``launch._run``'s direct path makes, with addresses where it passes tensors.

A capture records the launcher's allocations (a dispatch mode sees every aten call: an allocation or a
view is allowed, anything else -- a copy, a fill, reading a value -- makes the call not replayable) and
its launches, each tensor argument traced to an input (itself, or at an offset into the one input that
holds it) or an allocation. A call that cannot be replayed exactly (a launch on another device than the
current one, a tensor from elsewhere such as a cache) stays on the Python path for that key.

Off (every call takes the Python path) while ``gate()`` says so: ``FUSED_RESNET_TRITON_REPLAY=0``, direct
launches off, a launch recorder or counter, a launch hook, a forced or modelled configuration, poisoned
outputs, the interpreter, a dispatch mode (it must see the operator calls). The epoch of the state a plan
depends on (``launch.EPOCH``: the driver's compiled kernels, the tile table) is part of every key.
"""

from __future__ import annotations

import functools
import os
import threading
from typing import Any, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _get_current_dispatch_mode_stack

from .. import base
from . import configs, launch

ENABLED = os.environ.get("FUSED_RESNET_TRITON_REPLAY", "1") != "0"

_aten = torch.ops.aten
_ALLOCATIONS = {_aten.empty.memory_format, _aten.empty_strided.default, _aten.new_empty.default,
                _aten.new_empty_strided.default, _aten.empty_like.default}

_TABLE: list = [None]  # the tile table the plans were recorded with
_dispatch_depth = torch._C._len_torch_dispatch_stack


def bump_epoch() -> None:
    """Plans recorded so far no longer apply (another tile table; ``launch.forget_direct_launches`` bumps it
    for another driver)."""
    launch.EPOCH[0] += 1


def gate() -> Optional[tuple]:
    """What csrc/replay.cpp asks before each call: None (take the Python path) or (the state token of the
    key, the current stream, the launch enter and exit hooks to pass Triton's launcher)."""
    if not (ENABLED and launch.DIRECT) or launch._RECORDERS or launch._COUNTING or configs._FORCED \
            or len(configs._MODELLED) != 1 or base.POISON_OUTPUTS or not _compiled():
        return None
    if _dispatch_depth() and not _modes_see_allocations_only():
        return None
    if configs.TUNED_CONV is not _TABLE[0]:  # another table assigned (a test, a tuner)
        _TABLE[0] = configs.TUNED_CONV
        bump_epoch()
    driver, runtime = launch._runtime()
    if not launch._hooks_idle(runtime):  # a hook that runs (a profiler's)
        return None
    drv = driver.active
    device = drv.get_current_device()
    token = (launch.EPOCH[0] * 1024 + device) * 2 + bool(launch.tf32_allowed())
    return token, drv.get_current_stream(device), runtime.launch_enter_hook, runtime.launch_exit_hook


@functools.lru_cache(maxsize=None)
def _compiled() -> bool:
    """Whether the kernels were decorated for compiling (not for the interpreter: nothing to replay)."""
    from .conv import conv_bn_act_kernel
    return hasattr(conv_bn_act_kernel, "device_caches")


def _modes_see_allocations_only() -> bool:
    """Whether every active dispatch mode declares it needs to see only allocations (``SEES_ALLOCATIONS_ONLY``,
    as the offline check's does); any other must see the operator calls themselves."""
    return all(getattr(m, "SEES_ALLOCATIONS_ONLY", False) for m in _get_current_dispatch_mode_stack())


class _Capture(TorchDispatchMode):
    """One operator call's allocations and launches (see the module)."""

    def __init__(self) -> None:
        super().__init__()
        self.args: Optional[tuple] = None
        self.out: Any = None
        self.allocations: list[torch.Tensor] = []
        self.launches: list[tuple] = []
        self.bad: Optional[str] = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _ALLOCATIONS:
            self.allocations.append(out)
        elif not func.is_view and self.bad is None:
            self.bad = f"it runs {func}"
        return out

    def launched(self, kernel, grid: tuple, args: tuple, entry: Optional[tuple]) -> None:
        """From ``launch.launch``: ``entry`` is the compiled kernel and argument tail it called, or None."""
        if entry is None:
            self.bad = self.bad or f"{kernel.fn.__name__} took Triton's own launch path"
        else:
            self.launches.append((entry, tuple(grid) + (1,) * (3 - len(grid)), args))

    def plan(self) -> tuple:
        """(allocations, outputs, launches) as csrc/replay.cpp reads them, or raises ValueError."""
        if self.bad or self.args is None:
            raise ValueError(self.bad or "no launcher ran")
        allocs = self.allocations
        bases = [(a.untyped_storage().data_ptr(), a.untyped_storage().nbytes()) for a in allocs]
        inputs = [(i, a, a.data_ptr(), _extent(a)) for i, a in enumerate(self.args) if isinstance(a, torch.Tensor)]

        def trace(t: torch.Tensor) -> tuple:
            """(0, input index, byte offset) or (1, allocation index, byte offset) of what ``t`` addresses:
            an input itself, else the one input or allocation whose bytes hold it."""
            for i, a, _, _ in inputs:
                if a is t:
                    return (0, i, 0)
            p, nbytes = t.data_ptr(), _extent(t)
            spans = [(0, i, start, extent) for i, _, start, extent in inputs]
            spans += [(1, j, start, extent) for j, (start, extent) in enumerate(bases)]
            holders = [(kind, i, p - start) for kind, i, start, extent in spans
                       if start <= p <= start + extent - nbytes]
            if len(holders) != 1:  # none: a tensor from elsewhere (a cache); several: inputs sharing memory
                raise ValueError(f"a launch reads a tensor held by {len(holders)} of the call's inputs and allocations")
            return holders[0]

        outputs = []
        for o in (self.out if isinstance(self.out, (tuple, list)) else (self.out,)):
            if o.numel() == 0:
                outputs.append((2, 0, 0, tuple(o.shape), o.stride(), o.dtype))
                continue
            kind, j, _ = trace(o)
            if kind != 1 or o.dtype != allocs[j].dtype:
                raise ValueError("an output is not a view of an allocation of its dtype")
            outputs.append((1, j, o.storage_offset(), tuple(o.shape), o.stride(), o.dtype))
        launches = []
        for (compiled, tail), grid, args in self.launches:
            spec = []
            for a in args:
                if isinstance(a, torch.Tensor):
                    if a.numel() == 0:
                        raise ValueError("a launch passes an empty tensor")
                    spec.append(trace(a))
                else:
                    spec.append((2, a, 0))
            launches.append((*_callee(compiled.run), compiled.function, compiled.packed_metadata, tuple(tail),
                             *grid, tuple(spec)))
        return (tuple((tuple(a.shape), a.stride(), a.dtype) for a in allocs), tuple(outputs), tuple(launches))


# Whether a plan calls Triton's C launch function itself (``_callee``); FUSED_RESNET_TRITON_C_LAUNCH=0: the
# launcher object, as ``CompiledKernel.run`` is called.
C_LAUNCH = os.environ.get("FUSED_RESNET_TRITON_C_LAUNCH", "1") != "0"


def _callee(run) -> tuple:
    """(callee, head, mid, packed): what csrc/replay.cpp calls for a launch whose ``CompiledKernel.run`` is
    ``run``, as (grid, stream, function, *head, kernel metadata, launch metadata, enter hook, exit hook, *mid,
    then the kernel's arguments, as one tuple when ``packed``). Triton's ``CudaLauncher.__call__`` is a
    Python frame per launch (it allocates the scratch buffers a kernel asks for, then calls the C ``launch``
    in a release's own argument order); for a launcher of a release whose order is known (3.6, 3.8) and a
    kernel that needs no scratch memory, the C ``launch`` is called directly with the arguments that frame
    would pass it. Anything else (another release, another launcher class -- a subclass, another
    backend's --, scratch memory, an instrumented launcher, an attribute missing): ``run`` itself, with
    ``CompiledKernel.run``'s arguments. offline.py's checks run the real ``__call__`` against this."""
    plain = (run, (), (), False)
    cls = type(run)
    if not C_LAUNCH or cls.__name__ != "CudaLauncher" or cls.__module__ != "triton.backends.nvidia.driver":
        return plain
    if not all(hasattr(run, a) for a in ("launch", "launch_cooperative_grid", "launch_pdl")) \
            or getattr(run, "global_scratch_size", 1) or getattr(run, "profile_scratch_size", 1) \
            or getattr(run, "gsan_enabled", False):
        return plain
    release = c_launch_release()
    coop, pdl = run.launch_cooperative_grid, run.launch_pdl
    if release == (3, 6):
        return run.launch, (coop, pdl, None, None), (), False
    if release == (3, 8) and hasattr(run, "arg_annotations") and hasattr(run, "kernel_signature"):
        return run.launch, (coop, pdl), (None, None, run.arg_annotations, run.kernel_signature), True
    return plain


@functools.lru_cache(maxsize=None)
def c_launch_release() -> Optional[tuple]:
    """The running Triton release when ``_callee`` knows its C launch's argument order, else None."""
    import triton
    try:
        release = tuple(int(p) for p in triton.__version__.split(".")[:2])
    except ValueError:
        return None
    return release if release in ((3, 6), (3, 8)) else None


def _extent(t: torch.Tensor) -> int:
    """Bytes from ``t.data_ptr()`` to the end of its last element."""
    if t.numel() == 0:
        return 0
    return (sum((s - 1) * st for s, st in zip(t.shape, t.stride())) + 1) * t.element_size()


_PENDING: dict[int, _Capture] = {}  # thread ident -> the capture its next operator call runs under


def begin() -> None:
    """This thread's next operator call (the C++ side makes it next) runs under a capture."""
    _PENDING[threading.get_ident()] = _Capture()


def end() -> Optional[tuple]:
    """The plan of the call made since ``begin()``, or None when it cannot be replayed."""
    cap = _PENDING.pop(threading.get_ident(), None)
    try:
        return cap.plan() if cap is not None else None
    except ValueError:
        return None


def capturing(launcher):
    """An operator kernel: ``launcher`` itself, under the capture ``begin()`` asked for."""

    @functools.wraps(launcher)
    def kernel(*args, **kwargs):
        cap = _PENDING.get(threading.get_ident()) if _PENDING else None
        if cap is None or cap.args is not None or kwargs:  # a plan names arguments by position
            return launcher(*args, **kwargs)
        cap.args = args
        me = threading.get_ident()
        launch._CAPTURES[me] = cap
        try:
            with cap:
                cap.out = launcher(*args)
        finally:
            del launch._CAPTURES[me]
        return cap.out

    return kernel
