"""Measurement: providers (eager, torch.compile, each fused backend), timing with CUDA events over
rotating inputs, peak memory, and the roofline floor of each case. Used by the pytest-benchmark suite
(``benchmarks/``) and by ``python -m fused_resnet bench``.
"""

from __future__ import annotations

import datetime
import statistics
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Callable, Optional, Union

import torch
from torch import nn

from . import reference
from .cases import BlockCase, BottleneckCase
from .modules import convert
from .testing import randomize_

MODES = ("eval", "train-fwd", "train-fwdbwd")
FORMATS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
GRAPH = "+graph"  # provider suffix: the step captured in a CUDA graph and replayed (graphed_step)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
L2_ROTATION_BYTES = 256 << 20  # rotate inputs over more than any L2 (H100: 50 MB)


MODELS = ("resnet18", "resnet50")


@dataclass(frozen=True)
class BenchCase:
    """A block case -- the seed's ``Residual`` (``BlockCase``) or torchvision's ``Bottleneck``
    (``BottleneckCase``) -- or, with ``model``, a whole model on the block's batch and size: ``resnet18``
    the seed's (1 input channel), ``resnet50`` torchvision's (3); in one mode, dtype and memory format."""

    block: Union[BlockCase, BottleneckCase]
    mode: str
    dtype: str = "bfloat16"
    fmt: str = "nhwc"
    model: str = ""

    @property
    def what(self) -> str:
        return f"{self.model}-{self.block.size}-b{self.block.batch}" if self.model else self.block.id

    @property
    def id(self) -> str:
        return f"{self.what}-{self.mode}-{self.dtype}-{self.fmt}"

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        b = self.block
        if self.model:
            return (b.batch, 1 if self.model == "resnet18" else 3, b.size, b.size)
        return b.input_shape

    @classmethod
    def for_model(cls, model: str, size: int, batch: int, mode: str, dtype: str = "bfloat16",
                  fmt: str = "nhwc") -> "BenchCase":
        return cls(BlockCase(1, 64, size, batch), mode, dtype, fmt, model=model)


SUITES = ("quick", "short", "default", "full", "host")


def suite(name: str, device: str) -> list[BenchCase]:
    """The benchmark case sets: ``quick`` (a tiny smoke run, CI), ``short`` (the CLI's), ``default``
    (what a GPU run covers in minutes: the head shape 56x56x64 batch 64 in every mode; the whole
    ResNet-18 (batch 32) and ResNet-50 (inference at batch 256, a training step at 64); the seed shapes
    and ResNet-50's Bottleneck stage shapes at batch 32, bf16 channels_last, eval and training; the head
    shape's eval in every dtype and format), ``full`` (every combination of DESIGN.md section 6), ``host``
    (tiny blocks whose time is host time)."""
    from .cases import SEED_BATCHES, bottleneck_cases, seed_block_cases

    if name == "host":  # tiny blocks: the time of a call is its host time (run it on one thread). Batch
        # one: there ATen's CPU convolution takes its direct path (at batch 2 oneDNN's per-call set-up,
        # tens of microseconds, would be most of what is timed, in eager and in the fused CPU kernel alike).
        return [BenchCase(b, m, "float32", f) for b in (BlockCase(8, 8, 4, 1),
                                                        BlockCase(8, 16, 4, 1, use_1x1conv=True, stride=2))
                for m in ("eval", "train-fwdbwd") for f in ("nchw",)]
    if name == "quick":
        tiny = BlockCase(8, 8, 8, 2)
        return [BenchCase(tiny, m, "float32", "nhwc") for m in MODES] + [
            BenchCase(BlockCase(8, 16, 8, 2, use_1x1conv=True, stride=2), "eval", "float32", "nchw"),
            BenchCase(BottleneckCase(16, 8, 8, 2, stride=2, downsample=True), "train-fwdbwd", "float32", "nhwc")]
    if name == "short":  # python -m fused_resnet bench: a minute or two on either device
        if device == "cpu":
            blocks = [BlockCase(64, 64, 24, 8), BlockCase(64, 128, 24, 8, use_1x1conv=True, stride=2)]
            return [BenchCase(b, m, "float32", "nchw") for b in blocks for m in ("eval", "train-fwdbwd")]
        blocks = [BlockCase(64, 64, 56, 64), BlockCase(128, 256, 28, 64, use_1x1conv=True, stride=2)]
        return [BenchCase(b, m, "bfloat16", "nhwc") for b in blocks for m in MODES]
    if device == "cpu":  # what a CPU run can afford: the 96-resize shapes at batch 8, fp32
        from .cases import SEED_STAGES_96
        blocks = seed_block_cases(batches=(8,), stages=SEED_STAGES_96)
        return [BenchCase(b, m, "float32", "nchw") for b in blocks for m in ("eval", "train-fwdbwd")]
    if name == "default":  # most valuable first: a run cut short keeps these
        cases = [BenchCase(HEAD_BLOCK, m, "bfloat16", "nhwc") for m in MODES]
        cases += [BenchCase.for_model("resnet18", 224, 32, m) for m in ("eval", "train-fwdbwd")]
        cases += [BenchCase.for_model("resnet50", 224, 256, "eval"), BenchCase.for_model("resnet50", 224, 64,
                                                                                          "train-fwdbwd")]
        cases += [BenchCase(b, m, "bfloat16", "nhwc") for b in seed_block_cases(batches=(32,))
                  for m in ("eval", "train-fwdbwd")]
        cases += [BenchCase(b, m, "bfloat16", "nhwc") for b in bottleneck_cases(32) for m in ("eval", "train-fwdbwd")]
        cases += [BenchCase(HEAD_BLOCK, "eval", d, f) for d in DTYPES for f in FORMATS]
        return list(dict.fromkeys(cases))
    if name == "full":
        blocks = seed_block_cases(batches=SEED_BATCHES) + [b for n in SEED_BATCHES for b in bottleneck_cases(n)]
        cases = [BenchCase(b, m, d, f) for b in blocks for m in MODES for d in DTYPES for f in FORMATS]
        return cases + [BenchCase.for_model(m, 224, n, mode) for m in MODELS for n in SEED_BATCHES for mode in MODES]
    raise ValueError(f"unknown suite {name!r}; expected one of {SUITES}")


def environment(device: str) -> dict:
    """Device name, versions and date stored beside every figure."""
    import triton

    info = {"device": "cpu", "device_type": device, "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "date": datetime.date.today().isoformat()}
    if device == "cuda":
        info["device"] = torch.cuda.get_device_name()
        info["sms"] = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    else:
        import platform
        info["device"] = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return info


# ------------------------------------------------------------------------------------------- providers
HEAD_BLOCK = BlockCase(64, 64, 56, 64)  # the target shape of DESIGN.md section 6


def providers(device: str, case: BenchCase, suite_name: str = "full") -> list[str]:
    """Providers that can run ``case`` on ``device``: eager, torch.compile variants, fused backends.

    Compiling costs tens of seconds per case (max-autotune minutes), so outside the ``full`` suite
    torch.compile runs on the head shape and the whole models (ResNet-18, ResNet-50), max-autotune on the
    head shape's eval.
    """
    from .backends import available_backends, get_backend

    names = ["eager"]
    head = case.block == HEAD_BLOCK or bool(case.model)
    if suite_name in ("full", "quick") or head:
        names.append("compile")
    if device == "cuda" and (suite_name == "full" or (head and case.mode == "eval" and not case.model)):
        names.append("compile-max-autotune")
    training = case.mode != "eval"
    if suite_name == "host" and device == "cpu":
        from .backends.triton.offline import possible
        if possible():
            # The Triton path a GPU call takes, up to the driver's launch call: Triton compiles each
            # variant for sm_90 and the launches are recorded, not run (backends/triton/offline.py).
            names.append("fused-triton-offline")
    for be in available_backends():
        if be == "triton" and device == "cpu":
            continue  # the Triton interpreter is a test tool, not a CPU implementation
        if get_backend(be).supports(device, DTYPES[case.dtype], training) is None:
            names.append(f"fused-{be}")
            # synchronized batch norm's cost in a group of one (target: under 3%), on the head shape
            if case.mode == "train-fwdbwd" and (case.block == HEAD_BLOCK or suite_name == "quick") \
                    and not case.model and be != "torch":
                names.append(f"fused-{be}+sync")
    if device == "cuda" and case.mode in ("eval", "train-fwdbwd") and (suite_name == "full" or head):
        # the same models captured in CUDA graphs: what a host-bound caller gets by replaying its step
        names += [name + GRAPH for name in names if name == "eager" or (name.startswith("fused-")
                                                                        and not name.endswith("+sync"))]
    return names


def one_process_group(device: str) -> None:
    """Initialise torch.distributed as a group of one process (NCCL on CUDA, gloo on the CPU), unless a
    process group exists: the ``+sync`` providers measure synchronized batch norm's own cost there."""
    import os
    import tempfile

    import torch.distributed as dist
    if dist.is_initialized():
        return
    path = os.path.join(tempfile.mkdtemp(prefix="fused_resnet_pg_"), "init")
    dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=f"file://{path}", rank=0,
                            world_size=1)


def build_model(provider: str, case: BenchCase, device: str) -> nn.Module:
    if provider.endswith(GRAPH):  # the model of the provider it captures (the step is ``graphed_step``)
        return build_model(provider[:-len(GRAPH)], case, device)
    b = case.block
    torch.manual_seed(0)
    if case.model == "resnet18":
        seed = randomize_(reference.resnet18())
    elif case.model == "resnet50":
        seed = randomize_(reference.resnet50())
    elif isinstance(b, BottleneckCase):
        seed = randomize_(reference.bottleneck_block(b.inplanes, b.planes, b.stride, b.downsample))
    else:
        seed = randomize_(reference.Residual(b.in_channels, b.out_channels, b.use_1x1conv, b.stride))
    seed = seed.to(device=device, dtype=DTYPES[case.dtype], memory_format=FORMATS[case.fmt])
    seed.train(case.mode != "eval")
    if provider == "eager":
        return seed
    if provider.endswith("+sync"):  # synchronized batch norm in a group of one process: what sync costs
        one_process_group(device)
        return convert(seed, backend=provider[len("fused-"):-len("+sync")], sync_batchnorm=True)
    if provider == "fused-triton-offline":
        return convert(seed, backend="triton")
    if provider.startswith("fused-"):
        return convert(seed, backend=provider[len("fused-"):])
    if provider == "compile":
        return torch.compile(seed)
    if provider == "compile-max-autotune":
        return torch.compile(seed, mode="max-autotune")
    raise ValueError(f"unknown provider {provider!r}")


def make_step(model: nn.Module, case: BenchCase, device: str) -> tuple[Callable[[torch.Tensor], None], list]:
    """(step(x), inputs): one call of the case's mode, and enough input tensors to rotate through."""
    b = case.block
    dtype = DTYPES[case.dtype]
    shape = case.input_shape
    one = torch.empty(shape, dtype=dtype).element_size() * torch.Size(shape).numel()
    count = max(2, min(32, L2_ROTATION_BYTES // max(one, 1))) if device == "cuda" else 2
    inputs = [torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=FORMATS[case.fmt])
              for _ in range(count)]
    if case.mode == "eval":
        def step(x):
            with torch.no_grad():
                model(x)
    elif case.mode == "train-fwd":
        def step(x):
            model(x)
    else:
        grad = None

        def step(x):
            nonlocal grad
            x.requires_grad_(True)
            out = model(x)
            if grad is None:
                grad = torch.randn_like(out)
            out.backward(grad)
            x.grad = None
    return step, inputs


# ---------------------------------------------------------------------------------------------- timing
@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    peak_mem_mb: float
    samples: int
    host_us: float = float("nan")  # median host time per call (enqueue time on CUDA)
    device_ms: float = float("nan")  # GPU busy time per call (``device_time_ms``); NaN on the CPU
    extra: dict = field(default_factory=dict)


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def _samples(step: Callable, inputs: list, device: str, iters: int,
             offset: int = 0) -> tuple[list[float], float, list[float]]:
    """``iters`` timed calls of ``step``: their times (ms each), the peak memory they added (MiB; NaN on the
    CPU), and their host times (us each: on CUDA the time the call takes to enqueue its work, measured
    without synchronising inside it; on the CPU the whole call, where a tiny case makes it host time)."""
    host = []
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for i, (start, end) in enumerate(events):
            start.record()
            t0 = time.perf_counter()
            step(inputs[(offset + i) % len(inputs)])
            host.append((time.perf_counter() - t0) * 1e6)
            end.record()
        torch.cuda.synchronize()
        return ([s.elapsed_time(e) for s, e in events], (torch.cuda.max_memory_allocated() - base) / 2**20, host)
    times = []
    for i in range(iters):
        t0 = time.perf_counter()
        step(inputs[(offset + i) % len(inputs)])
        times.append((time.perf_counter() - t0) * 1e3)
    return times, float("nan"), [t * 1e3 for t in times]


def device_time_ms(step: Callable, inputs: list, device: str, iters: int = 5) -> float:
    """The GPU's busy time per call: the summed durations of the kernels (and copies) one call of ``step``
    runs, read by torch.profiler (CUPTI) over ``iters`` calls -- what the call would take if the host kept
    up. Where the host cannot (a small batch: eager's 56x56x64 block took 0.22 ms on the first GPU run,
    ten times its roofline floor), the median measures the host and this the kernels. NaN on the CPU, or
    where the profiler gives no device times."""
    if device != "cuda":
        return float("nan")
    from torch.profiler import ProfilerActivity, profile
    try:
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for i in range(iters):
                step(inputs[i % len(inputs)])
            torch.cuda.synchronize()
        total_us = sum(getattr(e, "self_device_time_total", 0.0) for e in prof.key_averages())
    except Exception:  # a profiler that cannot start here: the column stays empty, the timing stands
        return float("nan")
    return total_us / iters / 1e3 if total_us > 0 else float("nan")


def _timing(times: list[float], peak: float, host: list[float]) -> Timing:
    return Timing(statistics.median(times), _quantile(times, 0.2), _quantile(times, 0.8), peak, len(times),
                  statistics.median(host))


def time_step(step: Callable, inputs: list, device: str, warmup: int = 5, iters: int = 50) -> Timing:
    """Median and p20/p80 of ``step`` over rotating inputs: CUDA events on a GPU, perf_counter on the CPU."""
    for i in range(warmup):
        step(inputs[i % len(inputs)])
    return _timing(*_samples(step, inputs, device, iters))


def capture(run: Callable[[], object], reset: Optional[Callable[[], None]] = None, warmups: int = 3):
    """(graph, what ``run`` returned while captured): ``run`` called ``warmups`` times on a side stream
    first (JIT compiles, autotuning and first allocations stay out of the graph; ``reset`` after each),
    then captured once in a CUDA graph on the current device."""
    if not torch.cuda.is_available():
        raise RuntimeError("CUDA graphs need a CUDA device")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmups):
            run()
            if reset is not None:
                reset()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = run()
    return graph, result


def graph_time_ms(call: Callable[[int], None], calls: int = 24, replays: int = 11) -> float:
    """GPU time per ``call(i)`` (CUDA): ``calls`` calls (i = 0 .. calls-1, so a caller can rotate inputs
    past L2) captured in one CUDA graph, the graph replayed and timed with events; the median over replays
    divided by ``calls``. No host time between the kernels: a call's Python and launches would otherwise
    be what is measured -- the second GPU run's tuner timed every candidate of every layer at 48-59 us,
    the host's time per convolution call on that machine, for kernels of about 10 us."""
    graph, _ = capture(lambda: [call(i) for i in range(calls)], warmups=1)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    del graph
    return statistics.median(times)


def time_interleaved(prepared: dict[str, tuple[Callable, list]], device: str, warmup: int = 5, iters: int = 50,
                     rounds: int = 5) -> dict[str, Timing]:
    """Several providers of one case timed in turn, ``rounds`` times over, each round adding
    ``iters / rounds`` samples to each: slow drift of a shared machine (clock, other tenants) then falls
    on every provider alike instead of on whichever ran last."""
    for step, inputs in prepared.values():
        for i in range(warmup):
            step(inputs[i % len(inputs)])
    rounds = max(1, min(rounds, iters))
    times: dict[str, list[float]] = {name: [] for name in prepared}
    hosts: dict[str, list[float]] = {name: [] for name in prepared}
    peaks: dict[str, float] = {name: float("nan") for name in prepared}
    for r in range(rounds):
        n = iters // rounds + (1 if r < iters % rounds else 0)
        for name, (step, inputs) in prepared.items():
            got, peak, host = _samples(step, inputs, device, n, offset=len(times[name]))
            times[name] += got
            hosts[name] += host
            peaks[name] = peak if peaks[name] != peaks[name] else max(peaks[name], peak)
    return {name: _timing(times[name], peaks[name], hosts[name]) for name in prepared}


# -------------------------------------------------------------------------------------------- roofline
def blocks_of(case: BenchCase) -> list[Union[BlockCase, BottleneckCase]]:
    """The residual blocks a case runs: its own block, or the blocks of the model for an input of the
    case's size (the stem and head are left out: they are the same for every provider)."""
    if not case.model:
        return [case.block]
    size, n = case.block.size // 4, case.block.batch
    blocks = []
    if case.model == "resnet18":
        for i, (c, stride) in enumerate([(64, 1), (128, 2), (256, 2), (512, 2)]):
            cin = c if i == 0 else c // 2
            blocks.append(BlockCase(cin, c, size, n, use_1x1conv=i > 0, stride=stride))
            size = (size - 1) // stride + 1
            blocks.append(BlockCase(c, c, size, n))
        return blocks
    inplanes = 64
    for planes, count, stride in [(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)]:
        blocks.append(BottleneckCase(inplanes, planes, size, n, stride, downsample=True))
        size, inplanes = (size - 1) // stride + 1, 4 * planes
        blocks += [BottleneckCase(inplanes, planes, size, n) for _ in range(count - 1)]
    return blocks


def _convs(b: Union[BlockCase, BottleneckCase]) -> list[tuple[int, int, int, int, int]]:
    """(positions N*P*Q, in channels, out channels, kernel, input positions N*H*W) of a block's convs."""
    n, c, h, w = b.input_shape
    _, k, p, q = b.out_shape
    m, m_in = n * p * q, n * h * w
    if isinstance(b, BottleneckCase):
        width = b.planes
        convs = [(m_in, c, width, 1, m_in), (m, width, width, 3, m_in), (m, width, k, 1, m)]
        return convs + ([(m, c, k, 1, m_in)] if b.downsample else [])
    return [(m, c, k, 3, m_in), (m, k, k, 3, m)] + ([(m, c, k, 1, m_in)] if b.use_1x1conv else [])


def case_flops(case: BenchCase) -> float:
    fwd = sum(2.0 * m * cin * cout * kern * kern for b in blocks_of(case) for m, cin, cout, kern, _ in _convs(b))
    return {"eval": fwd, "train-fwd": fwd, "train-fwdbwd": 3 * fwd}[case.mode]


def case_bytes(case: BenchCase) -> float:
    """Fewest bytes the case must move: each block's input read and output written once, and its
    weights; in training also the activations saved for backward (written forward, read backward: one
    per chain convolution), the incoming gradient and dX."""
    size = torch.empty(0, dtype=DTYPES[case.dtype]).element_size()
    total = 0
    for b in blocks_of(case):
        x, out = _numel(b.input_shape), _numel(b.out_shape)
        convs = _convs(b)
        weights = sum(cin * cout * kern * kern for _, cin, cout, kern, _ in convs)
        chain = len(convs) - (1 if getattr(b, "downsample", False) or getattr(b, "use_1x1conv", False) else 0)
        saved = sum(m * cout for m, _, cout, _, _ in convs[:chain])
        fwd = x + out + weights + (saved if case.mode != "eval" else 0)
        total += fwd if case.mode != "train-fwdbwd" else fwd + saved + out + x + weights
    return float(total * size)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


CEILINGS_HOW = (
    "Floors come from ceilings measured once per run and device so that no provider can beat them: the "
    "bandwidth is the best of device copies (bytes read plus written) and read-only reductions at several "
    "sizes; the matrix rate is the best of square matrix products at several sizes (A B and A B^T) and of "
    "large 3x3 convolutions in both layouts, counted at their direct-convolution FLOPs (so an algorithm "
    "that does fewer, such as Winograd, raises the ceiling instead of beating it). A case's floor is the "
    "larger of its FLOPs over the rate and its fewest bytes over the bandwidth.")


@lru_cache(maxsize=None)
def device_ceilings(device: str, dtype: str) -> tuple[float, float, float]:
    """(bandwidth in bytes/s, matrix rate in FLOP/s, one launch in us) of this device: see CEILINGS_HOW.
    Each is the best sample of several (a ceiling, not a median)."""
    t = DTYPES[dtype] if device == "cuda" else torch.float32
    cuda = device == "cuda"
    iters = 10 if cuda else 3

    def best_ms(fn) -> float:
        for _ in range(2):
            fn(None)
        return min(_samples(fn, [None], device, iters)[0])

    bandwidth = 0.0
    for nbytes in ((1 << 26, 1 << 28, 1 << 30) if cuda else (1 << 24, 1 << 26)):
        a = torch.empty(nbytes, dtype=torch.uint8, device=device)
        b_ = torch.empty_like(a)
        bandwidth = max(bandwidth, 2 * nbytes / (best_ms(lambda _: b_.copy_(a)) / 1e3))
        f = a.view(torch.float32)
        bandwidth = max(bandwidth, nbytes / (best_ms(lambda _: f.sum()) / 1e3))
        del a, b_, f
    rate = 0.0
    for n in ((2048, 4096, 8192) if cuda else (256, 512, 1024)):
        x = torch.randn(n, n, device=device, dtype=t)
        rate = max(rate, 2 * n**3 / (best_ms(lambda _: torch.mm(x, x)) / 1e3),
                   2 * n**3 / (best_ms(lambda _: torch.mm(x, x.t())) / 1e3))
    batch, c, size = (64, 256, 28) if cuda else (4, 64, 24)
    w = torch.randn(c, c, 3, 3, device=device, dtype=t)
    for fmt in FORMATS.values():
        xi = torch.randn(batch, c, size, size, device=device, dtype=t).contiguous(memory_format=fmt)
        wi = w.contiguous(memory_format=fmt)
        with torch.no_grad():
            ms = best_ms(lambda _: torch.nn.functional.conv2d(xi, wi, padding=1))
        rate = max(rate, 2 * batch * size * size * c * c * 9 / (ms / 1e3))
    one = torch.zeros(1, device=device)
    launch_us = best_ms(lambda _: [one.add_(1) for _ in range(100)]) * 10  # ms per 100 launches -> us per launch
    return bandwidth, rate, launch_us


def roofline(case: BenchCase, device: str, median_ms: float) -> dict:
    bandwidth, rate, launch_us = device_ceilings(device, case.dtype)
    flops, nbytes = case_flops(case), case_bytes(case)
    floor_ms = max(flops / rate, nbytes / bandwidth) * 1e3
    return {"flops": flops, "bytes": nbytes, "copy_GBps": bandwidth / 1e9, "matmul_TFLOPs": rate / 1e12,
            "launch_us": launch_us, "floor_ms": floor_ms,
            "bound": "compute" if flops / rate > nbytes / bandwidth else "memory",
            "floor_fraction": floor_ms / median_ms if median_ms > 0 else float("nan")}


def check_case(provider: str, case: BenchCase, device: str, draws: Optional[int] = None) -> list[str]:
    """Check ``provider`` on ``case`` before it is timed: its output (and, for train-fwdbwd, the input
    gradient) against the seed model in float64 on the same device, with the tests' rule (DESIGN.md
    section 5: at most max(2 x eager's error, the dtype's floor); ``testing.compare_models``): where the
    output is a ReLU's, an element whose zero/nonzero decision differs from the reference's -- a
    pre-activation within rounding of zero -- gets no upstream gradient, and gradients in the coarse
    dtypes (bfloat16, float32 as TF32) take the median of three draws. The second GPU run found the need:
    the 1x1 block's TF32 input gradient at 8 channels measured 2.18e-3 against a bound of 2e-3, eager's
    cuDNN having run that tiny convolution in full float32. Returns the failures."""
    from .testing import TF32_FLOOR, floor_for, rel_err

    dtype = DTYPES[case.dtype]
    floor = floor_for(dtype, torch.device(device))
    train_bwd = case.mode == "train-fwdbwd"
    if draws is None:
        draws = 3 if train_bwd and (dtype == torch.bfloat16 or floor == TF32_FLOOR) else 1
    models = [build_model("eager", case, device).to(torch.float64), build_model("eager", case, device),
              build_model(provider, case, device)]
    dtypes = (torch.float64, dtype, dtype)
    per_draw = []
    for draw in range(draws):
        torch.manual_seed(1 + draw)
        x = torch.randn(case.input_shape, device=device, dtype=torch.float64)
        xs, outs = [], []
        for model, model_dtype in zip(models, dtypes):
            # A leaf of its own per model (x.to(float64) would be x itself, and a later cast of it not a leaf).
            xi = x.to(model_dtype).contiguous(memory_format=FORMATS[case.fmt]).detach().requires_grad_(train_bwd)
            with torch.set_grad_enabled(case.mode != "eval"):
                outs.append(model(xi))
            xs.append(xi)
        errs = {"output": [rel_err(out.detach(), outs[0].detach()) for out in outs[1:]]}
        if train_bwd:
            ref_out = outs[0]
            g = torch.randn(ref_out.shape, device=device, dtype=torch.float64, generator=torch.Generator(
                device=device).manual_seed(100 + draw))
            relu_output = bool((ref_out.detach() >= 0).all())
            errs["grad input"] = []
            for xi, out in zip(xs[1:], outs[1:]):
                upstream = g * ((out.detach().double() > 0) == (ref_out.detach() > 0)) if relu_output else g
                out.backward(upstream.to(out.dtype))
                ref_grad, = torch.autograd.grad(ref_out, xs[0], upstream, retain_graph=True)
                errs["grad input"].append(rel_err(xi.grad, ref_grad))
        per_draw.append(errs)
    failures = []
    for key in per_draw[0]:
        checks = sorted(((d[key][1], max(2 * d[key][0], floor), d[key][0]) for d in per_draw),
                        key=lambda c: c[0] / c[1])
        f, bound, e = checks[len(checks) // 2]
        if not f <= bound:
            failures.append(f"{key}: error {f:.2e} > bound {bound:.2e} (eager {e:.2e})"
                            + (f", median of {draws} draws" if draws > 1 else ""))
    return failures


def prepare(provider: str, case: BenchCase, device: str) -> tuple[Callable, list]:
    """(step, inputs) of ``provider`` on ``case``: build the model once, time it as often as needed."""
    if provider.endswith(GRAPH):
        return graphed_step(build_model(provider, case, device), case, device)
    return make_step(build_model(provider, case, device), case, device)


def yardstick(provider: str) -> str:
    """The provider whose time a provider's speedup is taken against: eager, or for ``X+graph`` eager
    captured the same way."""
    return "eager" + GRAPH if provider.endswith(GRAPH) else "eager"


def graphed_step(model: nn.Module, case: BenchCase, device: str) -> tuple[Callable[[torch.Tensor], None], list]:
    """(step(x), inputs) of ``model`` captured in a CUDA graph: a call copies x into the graph's input and
    replays it, so it costs the kernels and not the host's Python and launches -- how a host-bound step
    (small batches, a slow host) is run in practice. eval captures the forward (no grad); train-fwdbwd
    the forward and backward: the input and parameter gradients are written, not accumulated (as after
    ``zero_grad(set_to_none=True)``), and the running statistics move on every replay. Before it is
    returned, one replay is checked against an uncaptured copy of the model on the same input."""
    import copy

    from .testing import floor_for, rel_err

    if case.mode not in ("eval", "train-fwdbwd"):
        raise ValueError(f"a CUDA graph step replays eval or train-fwdbwd, not {case.mode}")
    _, inputs = make_step(model, case, device)
    train = case.mode == "train-fwdbwd"
    reference_model = copy.deepcopy(model)
    static_x = inputs[0].clone().requires_grad_(train)
    torch.manual_seed(3)
    upstream = None

    def run():
        nonlocal upstream
        with torch.set_grad_enabled(train):
            out = model(static_x)
        if train:
            if upstream is None:
                upstream = torch.randn_like(out)
            out.backward(upstream)
        return out

    def reset():
        model.zero_grad(set_to_none=True)
        static_x.grad = None

    graph, static_out = capture(run, reset)

    def step(x):
        with torch.no_grad():
            static_x.copy_(x)
        graph.replay()

    step(inputs[-1])
    x = inputs[-1].clone().requires_grad_(train)
    with torch.set_grad_enabled(train):
        want = reference_model(x)
    if train:
        want.backward(upstream)
    floor = floor_for(DTYPES[case.dtype], torch.device(device))
    errors = {"output": rel_err(static_out, want)}
    if train:
        errors["input gradient"] = rel_err(static_x.grad, x.grad)
    bad = {k: e for k, e in errors.items() if not e <= floor}
    if bad:
        raise RuntimeError("the CUDA graph's replay disagrees with the uncaptured model: "
                           + ", ".join(f"{k} error {e:.2e} > {floor:.0e}" for k, e in bad.items()))
    step.graph, step.output = graph, static_out  # the graph kept alive with the step; its output buffer
    return step, inputs


def measure(provider: str, case: BenchCase, device: str, iters: int = 50, warmup: int = 5,
            prepared: Optional[tuple[Callable, list]] = None) -> Timing:
    step, inputs = prepared or prepare(provider, case, device)
    timing = time_step(step, inputs, device, warmup=warmup, iters=iters)
    timing.device_ms = device_time_ms(step, inputs, device)
    timing.extra = {**roofline(case, device, timing.median_ms), **environment(device)}
    return timing


def measure_interleaved(prepared: dict[str, tuple[Callable, list]], case: BenchCase, device: str,
                        iters: int = 50, warmup: int = 5, rounds: int = 5) -> dict[str, Timing]:
    """``measure`` for several providers of one case at once, timed in interleaved rounds."""
    timings = time_interleaved(prepared, device, warmup=warmup, iters=iters, rounds=rounds)
    env = environment(device)
    for name, timing in timings.items():
        timing.device_ms = device_time_ms(*prepared[name], device)
        timing.extra = {**roofline(case, device, timing.median_ms), **env}
    return timings


def as_row(provider: str, case: BenchCase, timing: Timing, eager_ms: Optional[float]) -> dict:
    row = {"case": case.what, "mode": case.mode, "dtype": case.dtype, "format": case.fmt,
           "provider": provider, **{k: v for k, v in asdict(timing).items() if k != "extra"}, **timing.extra}
    row["speedup_vs_eager"] = eager_ms / timing.median_ms if eager_ms else float("nan")
    return row
