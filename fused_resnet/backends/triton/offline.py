"""Triton's GPU launch path on a machine without a GPU: compile for real, record instead of launching.

``offline_launches()`` makes a stand-in CUDA driver Triton's active driver: the JIT binds, specialises
and compiles each kernel variant for sm_<arch> exactly as on a GPU, loads nothing, and hands each launch
(grid, the compiled variant, the launcher's arguments) to a recorder instead of the device. CPU tensors
stand in for CUDA ones (only their dtypes, data pointers and sizes are read). Two uses, both without a
GPU:

- proving that a direct launch (``launch._run``) passes the compiled launcher what ``kernel[grid](...)``
  passes it, for every kernel a block launches (``check_direct_launches``; the tests run it with CI's
  Triton, CI with the GPU machine's release too);
- timing the host side of a Triton block call, the path a GPU call takes up to the driver
  (``python -m fused_resnet bench --suite host``'s ``fused-triton`` rows).

Needs a process whose kernels were decorated with the interpreter off (``TRITON_INTERPRET`` unset when
``fused_resnet.backends.triton`` was imported) and no CUDA device (its kernels would share the JIT's
per-device cache with these). Relies on the driver interface ``JITFunction.run`` and ``CompiledKernel``
use, the same in Triton 3.6 and 3.8.
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import launch as _launch


@dataclass
class Launch:
    """One launch as the compiled kernel's launcher received it."""

    grid: tuple
    function: int            # the compiled variant (one handle per loaded kernel)
    kernel_metadata: Any
    hooks: tuple             # (enter, exit)
    args: tuple              # the kernel's arguments, constexprs included, in parameter order


@dataclass
class Recorder:
    launches: list[Launch] = field(default_factory=list)
    keep: bool = True        # False: count only (host timing)
    count: int = 0


class _Launcher:
    """Stands in for ``CudaLauncher``: same call, records instead of launching."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    def __call__(self, grid_x, grid_y, grid_z, stream, function, kernel_metadata, launch_metadata,
                 enter_hook, exit_hook, *args):
        rec = self.recorder
        rec.count += 1
        if rec.keep:
            rec.launches.append(Launch((grid_x, grid_y, grid_z), function, kernel_metadata,
                                       (enter_hook, exit_hook), args))


class _Utils:
    def __init__(self, arch: int) -> None:
        self.arch = arch
        self._handles = itertools.count(1)

    def load_binary(self, name, kernel, shared, device):
        handle = next(self._handles)
        return handle, handle, 0, 0, 1024       # module, function, registers, spills, max threads

    def unload_module(self, module) -> None:
        pass

    def get_device_properties(self, device) -> dict:
        from .configs import DeviceModel
        return {"max_shared_mem": DeviceModel(self.arch, 132).shared_bytes, "multiprocessor_count": 132,
                "max_num_regs": 65536, "warpSize": 32, "sm_clock_rate": 1, "mem_clock_rate": 1,
                "mem_bus_width": 1}


class _Driver:
    """The part of Triton's CUDA driver the JIT and compiled kernels call."""

    def __init__(self, arch: int, recorder: Recorder) -> None:
        self.arch = arch
        self.utils = _Utils(arch)
        recorder_launcher = _Launcher(recorder)
        self.launcher_cls = lambda src, metadata: recorder_launcher

    def get_current_device(self) -> int:
        return 0

    def set_current_device(self, device) -> None:
        pass

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_device_capability(self, device=None) -> tuple[int, int]:
        return divmod(self.arch, 10)

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget
        return GPUTarget("cuda", self.arch, 32)

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda

    def map_python_to_cpp_type(self, ty: str) -> str:
        from triton.backends.nvidia.driver import ty_to_cpp
        return ty_to_cpp(ty)


def possible() -> bool:
    """Whether ``offline_launches`` can run in this process (compiled kernels, no CUDA device)."""
    from . import conv
    return type(conv.conv_bn_act_kernel).__name__ == "JITFunction" and not torch.cuda.is_available()


@contextmanager
def offline_launches(arch: int = 90, keep: bool = True) -> Iterator[Recorder]:
    """Triton compiles for sm_<arch> and records every launch inside the block (see the module)."""
    from triton.runtime.driver import driver

    if not possible():
        raise RuntimeError("offline launches need the Triton kernels compiled, not interpreted (import "
                           "fused_resnet.backends.triton with TRITON_INTERPRET unset), and no CUDA device")
    recorder = Recorder(keep=keep)
    driver.set_active(_Driver(arch, recorder))
    _launch.forget_direct_launches()
    _launch.OFFLINE.append(recorder)
    _forget_backend_choices()
    try:
        yield recorder
    finally:
        _launch.OFFLINE.remove(recorder)
        _forget_backend_choices()
        _launch.forget_direct_launches()
        _reset_jit_caches()
        try:
            driver.reset_active()
        except RuntimeError:          # no real driver on this machine: leave none active
            driver._active = None


def _forget_backend_choices() -> None:
    """The Triton backend's availability and the backend choices change with ``launch.offline_active()``."""
    from .. import _LOADED, _resolve_cached
    _LOADED.pop("triton", None)
    _resolve_cached.cache_clear()


def _reset_jit_caches() -> None:
    """Drop the variants compiled offline from the JIT's per-device caches (their launcher records)."""
    from . import bn, conv
    for module in (bn, conv):
        for value in vars(module).values():
            caches = getattr(value, "device_caches", None)
            if caches is not None:
                caches.clear()


# ------------------------------------------------------------------------------------------------ the check
def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is b
    return type(a) is type(b) and a == b


def _block_cases(dtype: torch.dtype, gen: torch.Generator) -> Iterator[tuple[str, torch.nn.Module, torch.Tensor]]:
    """Both seed block kinds on the Triton backend, with an input each: channels last, NCHW, an input not
    16-byte aligned, and a larger image (more statistics tiles than one merge program takes: the two-level
    merge)."""
    import copy

    import fused_resnet
    from fused_resnet import reference
    from fused_resnet.testing import randomize_

    cases = [(1, 8, 8, "nhwc"), (2, 16, 8, "nhwc"), (1, 8, 96, "nhwc"), (2, 16, 8, "nchw"),
             (1, 8, 8, "misaligned")]
    for stride, out, size, layout in cases:
        seed = randomize_(reference.Residual(8, out, use_1x1conv=stride > 1, stride=stride), gen)
        block = fused_resnet.convert(copy.deepcopy(seed), backend="triton").to(dtype)
        x = torch.randn(2, 8, size, size, generator=gen).to(dtype)
        if layout == "misaligned":  # an input whose data starts 1 element into its storage (not 16-byte aligned)
            x = torch.cat([x.new_zeros(1), x.flatten()])[1:].view(x.shape)
        elif layout == "nhwc":
            x = x.to(memory_format=torch.channels_last)
        yield f"stride {stride} {size}x{size} {layout} {str(dtype).removeprefix('torch.')}", block, x


def _training_step(block: torch.nn.Module, x: torch.Tensor) -> None:
    block.train()
    y = block(x.detach().requires_grad_())
    y.float().square().sum().backward()


def _inference_call(block: torch.nn.Module, x: torch.Tensor) -> None:
    block.eval()
    with torch.no_grad():
        block(x)


def _block_steps(dtype: torch.dtype) -> Iterator[str]:
    """A training step and an inference call of each of ``_block_cases``, then the synchronized batch
    norm's merge of partial statistics."""
    from . import bn

    gen = torch.Generator().manual_seed(0)
    for name, block, x in _block_cases(dtype, gen):
        _training_step(block, x)
        yield f"{name} training"
        _inference_call(block, x)
        yield f"{name} inference"
    parts = torch.rand(300, 8, generator=gen), torch.rand(300, 8, generator=gen), torch.full((300,), 4.0)
    bn.launch_bn_merge(*parts)
    yield "batch-norm statistics merge"


def check_direct_launches(arch: int = 90) -> list[str]:
    """Every launch of a block's training step and inference call taken both ways: through
    ``kernel[grid](...)`` and through the direct path, with the same arguments. Returns the mismatches
    (empty when the two hand the compiled launcher the same variant, grid and arguments each time) and
    raises when the direct path was never taken."""
    problems: list[str] = []
    run = _launch._run
    direct_before = sum(_launch.DIRECT_LAUNCHES.values())

    def both_ways(kernel, grid, args, constexprs, num_warps, num_stages):
        n0 = len(rec.launches)
        old = _launch.DIRECT
        try:
            _launch.DIRECT = False
            run(kernel, grid, args, constexprs, num_warps, num_stages)
            _launch.DIRECT = True
            for _ in range(2):        # the first may compile and fill the cache; the second is direct
                run(kernel, grid, args, constexprs, num_warps, num_stages)
        finally:
            _launch.DIRECT = old
        jit, first, direct = rec.launches[n0:]
        del rec.launches[n0:]
        name = kernel.fn.__name__
        for label, other in (("first", first), ("direct", direct)):
            if (jit.grid, jit.function, jit.kernel_metadata, jit.hooks) != \
                    (other.grid, other.function, other.kernel_metadata, other.hooks):
                problems.append(f"{name}: {label} launch took another variant, grid or hooks than the JIT's")
            elif len(jit.args) != len(other.args) or not all(map(_same, jit.args, other.args)):
                problems.append(f"{name}: {label} launch passed other arguments than the JIT's")

    _launch._run = both_ways
    try:
        with offline_launches(arch) as rec:
            for dtype in (torch.float32, torch.bfloat16):
                for _ in _block_steps(dtype):
                    pass
    finally:
        _launch._run = run
    if sum(_launch.DIRECT_LAUNCHES.values()) == direct_before:
        problems.append("no launch took the direct path")
    from . import bn, conv
    kernels = {name for module in (bn, conv) for name in vars(module) if name.endswith("_kernel")}
    problems += [f"{name}: never launched by the check" for name in sorted(kernels - set(_launch.DIRECT_LAUNCHES))]
    return problems


class _KeepAlive(TorchDispatchMode):
    """Keeps every tensor an operator makes alive (no address is reused), so that launch arguments can be
    told apart by address. It needs to see allocations only: replaying stays on (``replay.gate``)."""

    SEES_ALLOCATIONS_ONLY = True

    def __init__(self) -> None:
        super().__init__()
        self.kept: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.kept.append(out)
        return out


def _dataflow(launches: list[Launch], fixed: set[int]) -> list[tuple]:
    """The launches with each pointer argument (a tensor, or the address a replay passes) named by its
    order of first appearance -- or by itself when it is one of ``fixed`` (the inputs and parameters)."""
    names: dict[int, int] = {}
    out = []
    for launch in launches:
        args = []
        for a in launch.args:
            if isinstance(a, torch.Tensor) or (type(a) is int and a >= 1 << 16):  # an address
                p = a.data_ptr() if isinstance(a, torch.Tensor) else a
                args.append(("input", p) if p in fixed else ("tensor", names.setdefault(p, len(names))))
            else:
                args.append(a)
        out.append((launch.grid, launch.function, launch.kernel_metadata, launch.hooks, tuple(args)))
    return out


def check_replayed_calls(arch: int = 90) -> list[str]:
    """Every launch of a block's training step composed in C++ (``block_train``) and of its inference call
    (``replayed_triton_conv_fused``), taken through the Python launchers and replayed from C++
    (replay.py): the same variants, grids and arguments, each pointer argument the same input or the same
    tensor of the call's data flow. Returns the mismatches; empty when they agree and the replayed calls
    ran no Python launcher."""
    from . import replay
    from .. import get_backend

    problems: list[str] = []
    enabled = replay.ENABLED
    try:
        with offline_launches(arch) as rec:
            if not get_backend("triton").block_node:
                return ["the C++ training composition is not available (the extension is not built)"]
            for dtype in (torch.float32, torch.bfloat16):
                for name, block, x in _block_cases(dtype, torch.Generator().manual_seed(0)):
                    fixed = {t.data_ptr() for t in [x, *block.parameters(), *block.buffers()]}
                    for mode, step in (("training", _training_step), ("inference", _inference_call)):
                        calls = []
                        # the Python path; then a key's first call (marks it), its second (records), replayed
                        for replaying in (False, True, True, True):
                            replay.ENABLED = replaying
                            n0, python = len(rec.launches), sum(_launch.LAUNCHES.values())
                            with _KeepAlive():
                                step(block, x)
                            calls.append((rec.launches[n0:], sum(_launch.LAUNCHES.values()) - python))
                        (reference, _), *_, (replayed, python) = calls
                        if python:
                            problems.append(f"{name} {mode}: {python} launches took the Python path, replayed")
                        if _dataflow(reference, fixed) != _dataflow(replayed, fixed):
                            problems.append(f"{name} {mode}: the replayed launches differ from the Python launchers'")
    finally:
        replay.ENABLED = enabled
    return problems


def main() -> int:
    import triton
    problems = check_direct_launches()
    for p in problems:
        print(p)
    print(f"direct Triton launches (Triton {triton.__version__}, offline, sm_90): "
          f"{'OK' if not problems else f'{len(problems)} mismatches'}; "
          f"{sum(_launch.DIRECT_LAUNCHES.values())} direct launches checked")
    replayed = check_replayed_calls()
    for p in replayed:
        print(p)
    print(f"training steps and inference calls replayed from C++ (Triton {triton.__version__}, offline, sm_90): "
          f"{'OK' if not replayed else f'{len(replayed)} mismatches'}")
    return 1 if problems or replayed else 0


if __name__ == "__main__":
    raise SystemExit(main())
