"""Triton's GPU launch path on a machine without a GPU: compile for real, record instead of launching.

``offline_launches()`` makes a stand-in CUDA driver Triton's active driver: the JIT binds, specialises
and compiles each kernel variant for sm_<arch> exactly as on a GPU, loads nothing, and builds each
variant's launcher as Triton's own ``CudaLauncher`` -- its ``__call__`` runs as on a GPU -- whose C
``launch`` records its arguments (grid, the compiled variant, everything else in the release's order)
instead of launching. CPU tensors stand in for CUDA ones (only their dtypes, data pointers and sizes are
read). Two uses, both without a GPU:

- proving that a direct launch (``launch._run``) passes the compiled launcher what ``kernel[grid](...)``
  passes it, for every kernel a block launches (``check_direct_launches``), and that a replayed call
  (replay.py) hands the C launch what the Python launchers' calls did (``check_replayed_calls``); the
  tests run them with CI's Triton, CI with the GPU machine's release too;
- timing the host side of a Triton block call, the path a GPU call takes up to the driver
  (``python -m fused_resnet bench --suite host``'s ``fused-triton`` rows).

Needs a process whose kernels were decorated with the interpreter off (``TRITON_INTERPRET`` unset when
``fused_resnet.backends.triton`` was imported) and no CUDA device (its kernels would share the JIT's
per-device cache with these). Relies on the driver interface ``JITFunction.run`` and ``CompiledKernel``
use, the same in Triton 3.6 and 3.8, and on how their ``CudaLauncher`` is built (``_real_launcher``).
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import launch as _launch


@dataclass
class Launch:
    """One launch as Triton's C launch received it."""

    grid: tuple
    function: int            # the compiled variant (one handle per loaded kernel)
    args: tuple              # the rest in the release's order: launch flags, metadata, hooks, scratch, the
                             # kernel's arguments (constexprs included, in parameter order); see _recording_launch


@dataclass
class Recorder:
    launches: list[Launch] = field(default_factory=list)
    keep: bool = True        # False: count only (host timing)
    count: int = 0


def _recording_launch(recorder: Recorder):
    """Stands in for the C ``launch`` of Triton's ``CudaLauncher``: records its arguments instead of
    launching. Their order is the release's own (replay.py's ``_callee``); what both releases share is the
    grid, the stream and the compiled function first. The rest is kept in order, the kernel's arguments
    unpacked where a release passes them as one tuple (3.8), so launches compare argument by argument."""

    def launch(*raw):
        recorder.count += 1
        if recorder.keep:
            rest = raw[5:-1] + tuple(raw[-1]) if raw and isinstance(raw[-1], tuple) else raw[5:]
            # The launch metadata is for launch hooks only: the JIT computes it per launch, the direct paths
            # (launch._run, replays: only while no hook runs) pass None.
            rest = tuple(None if type(a).__name__ == "LazyDict" else a for a in rest)
            recorder.launches.append(Launch(tuple(raw[:3]), raw[4], rest))

    return launch


def _real_launcher(recorder: Recorder):
    """``launcher_cls`` for the stand-in driver: Triton's own ``CudaLauncher``, so that its ``__call__`` runs
    as on a GPU, built without compiling its C module (3.6 compiles one per signature: the build is
    replaced by one whose ``launch`` records; 3.8 takes the driver's ``utils.launch``, which records)."""
    from triton.backends.nvidia import driver as nvidia

    record = _recording_launch(recorder)

    class _Module:
        launch = staticmethod(record)

    def make(src, metadata):
        patched = {"compile_module_from_src": lambda *args, **kwargs: _Module, "library_dirs": lambda: []}
        # 3.8 annotates the signature with types of its C utilities module (None until that loads)
        patched.update({name: stand_in for name, stand_in in (
            ("PyKernelArg", lambda nested_tuple, type: ("kernel-arg", type, nested_tuple)),
            ("ARG_CONSTEXPR", "constexpr"), ("ARG_KERNEL", "kernel"), ("ARG_TUPLE", "tuple"))
            if getattr(nvidia, name, 0) is None})
        saved = {name: getattr(nvidia, name) for name in patched if hasattr(nvidia, name)}
        try:
            for name in saved:
                setattr(nvidia, name, patched[name])
            return nvidia.CudaLauncher(src, metadata)
        finally:
            for name, value in saved.items():
                setattr(nvidia, name, value)

    return make, record


class _Utils:
    def __init__(self, arch: int, launch) -> None:
        self.arch = arch
        self._handles = itertools.count(1)
        self.launch = launch  # Triton 3.8's launchers call the driver's generic C launch

    def build_signature_metadata(self, kernel_signature) -> tuple:  # 3.8: a C object, passed to launch as is
        return ("signature", tuple(kernel_signature))

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
        self.launcher_cls, record = _real_launcher(recorder)
        self.utils = _Utils(arch, record)

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


def _frozen_step(block: torch.nn.Module, x: torch.Tensor) -> None:
    """A training step through eval-mode batch norms (fine-tuning with frozen statistics): bn_fold's calls."""
    block.eval()
    y = block(x.detach().requires_grad_())
    y.float().square().sum().backward()


def _inference_call(block: torch.nn.Module, x: torch.Tensor) -> None:
    block.eval()
    with torch.no_grad():
        block(x)


def _block_steps(dtype: torch.dtype) -> Iterator[str]:
    """A training step and an inference call of each of ``_block_cases`` (of the first two, a training step
    through frozen batch norms too), then the synchronized batch norm's merge of partial statistics."""
    from . import bn

    gen = torch.Generator().manual_seed(0)
    for i, (name, block, x) in enumerate(_block_cases(dtype, gen)):
        _training_step(block, x)
        yield f"{name} training"
        _inference_call(block, x)
        yield f"{name} inference"
        if i < 2:
            _frozen_step(block, x)
            yield f"{name} training, batch norms frozen"
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
            if (jit.grid, jit.function) != (other.grid, other.function):
                problems.append(f"{name}: {label} launch took another variant or grid than the JIT's")
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
        out.append((launch.grid, launch.function, tuple(args)))
    return out


def check_replayed_calls(arch: int = 90) -> list[str]:
    """Every launch of a block's training step composed in C++ (``block_train``; with its batch norms in
    training mode and in eval mode) and of its inference call
    (``replayed_triton_conv_out``), taken through the Python launchers and replayed from C++
    (replay.py): the same variants, grids and arguments, each pointer argument the same input or the same
    tensor of the call's data flow. Returns the mismatches; empty when they agree and the replayed calls
    ran no Python launcher -- nor, where replay.py calls Triton's C ``launch`` directly (3.6, 3.8), the
    ``CudaLauncher.__call__`` frame it skips."""
    from triton.backends.nvidia import driver as nvidia

    from . import replay
    from .. import get_backend

    problems: list[str] = []
    enabled = replay.ENABLED
    frames = [0]
    call = nvidia.CudaLauncher.__call__

    def counted(self, *args, **kwargs):
        frames[0] += 1
        return call(self, *args, **kwargs)

    nvidia.CudaLauncher.__call__ = counted
    try:
        with offline_launches(arch) as rec:
            direct_c = replay.C_LAUNCH and replay.c_launch_release() is not None
            if not get_backend("triton").block_node:
                return ["the C++ training composition is not available (the extension is not built)"]
            for dtype in (torch.float32, torch.bfloat16):
                for name, block, x in _block_cases(dtype, torch.Generator().manual_seed(0)):
                    fixed = {t.data_ptr() for t in [x, *block.parameters(), *block.buffers()]}
                    for mode, step in (("training", _training_step), ("frozen-BN training", _frozen_step),
                                       ("inference", _inference_call)):
                        calls = []
                        # the Python path; then a key's first call (marks it), its second (records), replayed
                        for replaying in (False, True, True, True):
                            replay.ENABLED = replaying
                            n0, python, f0 = len(rec.launches), sum(_launch.LAUNCHES.values()), frames[0]
                            with _KeepAlive():
                                step(block, x)
                            calls.append((rec.launches[n0:], sum(_launch.LAUNCHES.values()) - python,
                                          frames[0] - f0))
                        (reference, _, _), *_, (replayed, python, skipped) = calls
                        if python:
                            problems.append(f"{name} {mode}: {python} launches took the Python path, replayed")
                        if direct_c and skipped:
                            problems.append(f"{name} {mode}: {skipped} replayed launches went through "
                                            "CudaLauncher.__call__, not its C launch")
                        if _dataflow(reference, fixed) != _dataflow(replayed, fixed):
                            problems.append(f"{name} {mode}: the replayed launches differ from the Python launchers'")
    finally:
        replay.ENABLED = enabled
        nvidia.CudaLauncher.__call__ = call
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
