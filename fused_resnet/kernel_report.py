"""Kernel quality without a GPU (DESIGN.md section 7b): compile every Triton kernel variant a workload
launches ahead of time, with the JIT's own argument specialisation, for sm_80 or sm_90, and read the
machine code the GPU would run; read the CUDA extension's kernels from the built library the same way.

Per kernel variant: registers, stack, spill instructions (LDL/STL), shared memory, CTAs per SM (from
registers, shared memory and threads), tensor-core instructions (HMMA/HGMMA), async copies
(LDGSTS, UTMALDG/UBLKCP), loops and the loops that hold tensor-core instructions (a convolution should
have one main loop), and subroutine calls (64-bit division and the like) inside those loops.

The variants come from a dry run (``launch.recording(execute=False)``) of the benchmark suite's cases
under the Triton interpreter -- the launchers allocate and choose configurations exactly as on the
modelled GPU, nothing executes -- or from a file of ``LaunchSpec`` lines (the test suite records one:
``FUSED_RESNET_RECORD_LAUNCHES=path``). Compilation runs in worker processes with the interpreter off,
so the same module checks another Triton release (CI compiles every variant with the GPU machine's
Triton 3.6 too: ``PYTHONPATH=that-triton python -m fused_resnet kernels --variants FILE``).

    python -m fused_resnet kernels [--arch 90] [--suite kernels] [--jobs 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Iterable, Optional

# Per-SM limits by architecture: registers, shared memory for CTAs, resident threads, resident CTAs.
SM_LIMITS = {80: (65536, 164 * 1024, 2048, 32), 86: (65536, 100 * 1024, 1536, 16),
             89: (65536, 100 * 1024, 1536, 24), 90: (65536, 228 * 1024, 2048, 32)}
H100_SMS = 132

MMA_OPS = ("HMMA", "HGMMA", "IMMA", "DMMA")
ASYNC_OPS = ("LDGSTS", "UTMALDG", "UBLKCP", "UTMAPF")


# ------------------------------------------------------------------------------------------ SASS reading
def tools_dir() -> str:
    """cuobjdump ships inside the Triton wheel (triton/backends/nvidia/bin)."""
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def _cuobjdump(args: list[str]) -> str:
    exe = os.path.join(tools_dir(), "cuobjdump")
    return subprocess.run([exe, *args], capture_output=True, text=True, check=True).stdout


_INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_FUNC = re.compile(r"Function : (\S+)")
_RES = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


@dataclass
class SassStats:
    """What the compiler made of one kernel."""

    registers: int = 0
    stack: int = 0
    static_shared: int = 0
    launch_shared: int = 0   # dynamic shared memory the launch adds (not in the binary: the launch's own figure)
    threads: int = 256       # per CTA, as launched
    instructions: int = 0
    spills: int = 0          # local-memory loads and stores (LDL/STL)
    mma: int = 0             # tensor-core instructions
    async_copies: int = 0    # cp.async (LDGSTS) and TMA
    wide_stores: int = 0     # global stores of 8 or 16 bytes (STG.E.64/.128)
    loops: int = 0
    mma_loops: int = 0       # loops holding tensor-core instructions: the GEMM main loops
    calls: int = 0           # subroutine calls (64-bit integer division, slow-path float division)
    calls_in_mma_loops: int = 0


def sass_stats(binary: str, arch: int) -> dict[str, SassStats]:
    """Per kernel of a cubin or a library (its sm_<arch> code), from cuobjdump's SASS and resource usage."""
    sass = _cuobjdump(["-sass", "-arch", f"sm_{arch}", binary])
    stats: dict[str, SassStats] = {}
    functions: dict[str, list[tuple[int, str, str]]] = {}
    current = None
    for line in sass.splitlines():
        m = _FUNC.search(line)
        if m:
            current = m.group(1)
            functions[current] = []
            continue
        m = _INSN.search(line)
        if m and current is not None:
            functions[current].append((int(m.group(1), 16), m.group(3), m.group(4)))
    for name, insns in functions.items():
        s = SassStats(instructions=len(insns))
        ops = [op.split(".")[0] for _, op, _ in insns]
        s.spills = sum(op in ("LDL", "STL") for op in ops)
        s.mma = sum(op in MMA_OPS for op in ops)
        s.async_copies = sum(op in ASYNC_OPS for op in ops)
        s.wide_stores = sum(op.startswith("STG") and op.endswith((".64", ".128")) for _, op, _ in insns)
        # Subroutine calls (64-bit integer division, slow-path float division). A CALL to the instruction
        # just past the next one is not a subroutine: it is how the compiler leaves a loop.
        calls = {a for a, o, rest in insns if o.split(".")[0] == "CALL" and not _call_is_loop_exit(a, rest)}
        s.calls = len(calls)
        # A loop is a branch back to an earlier address: its body is [target, branch].
        for addr, op, operands in insns:
            if op.split(".")[0] != "BRA":
                continue
            target = re.search(r"0x([0-9a-f]+)", operands)
            if target is None or int(target.group(1), 16) >= addr:
                continue
            lo = int(target.group(1), 16)
            body = [(a, o.split(".")[0]) for a, o, _ in insns if lo <= a <= addr]
            s.loops += 1
            if any(o in MMA_OPS for _, o in body):
                s.mma_loops += 1
                s.calls_in_mma_loops += sum(a in calls for a, _ in body)
        stats[name] = s
    res = _cuobjdump(["-res-usage", "-arch", f"sm_{arch}", binary])
    for m in _RES.finditer(res):
        if m.group(1) in stats:
            st = stats[m.group(1)]
            st.registers, st.stack, st.static_shared = int(m.group(2)), int(m.group(3)), int(m.group(4))
    return stats


def _call_is_loop_exit(addr: int, operands: str) -> bool:
    target = re.search(r"0x([0-9a-f]+)", operands)
    return target is not None and addr < int(target.group(1), 16) <= addr + 0x40


def ctas_per_sm(registers: int, threads: int, shared: int, arch: int) -> int:
    """Resident CTAs per SM: the tightest of registers (allocated per warp in units of 256), shared
    memory (1 KB reserved per CTA), threads and the CTA limit."""
    regs, smem, max_threads, max_ctas = SM_LIMITS.get(arch, SM_LIMITS[80])
    warps = -(-threads // 32)
    per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_regs = regs // (per_warp * warps)
    by_smem = smem // (shared + 1024) if shared else max_ctas
    return max(0, min(by_regs, by_smem, max_threads // threads, max_ctas))


# ------------------------------------------------------------------------------- compiling a Triton variant
def _standin(arg: list):
    import torch
    kind = arg[0]
    if kind == "tensor":
        t = torch.empty(65, dtype=getattr(torch, arg[1]))
        return t[:64] if arg[2] else t[1:]  # the data pointer's 16-byte alignment is what is specialised
    if kind == "int":
        return int(arg[1])
    if kind == "none":
        return None
    return 1.5


def compile_spec(spec: dict, arch: int):
    """Compile one recorded variant for sm_<arch> as the JIT would (its binder decides the signature,
    the constants and the divisibility attributes): Triton's compiled kernel (``.asm["ptx"]``,
    ``["cubin"]``, ``.metadata``). Runs with the Triton interpreter off."""
    import importlib

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    module, qualname = spec["kernel"].split(":")
    fn = getattr(importlib.import_module(module), qualname)
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kwargs = dict(spec["constexprs"], num_warps=spec["num_warps"], num_stages=spec["num_stages"])
    kwargs["debug"] = fn.debug or knobs.runtime.debug  # as JITFunction.run adds them
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*[_standin(a) for a in spec["args"]], **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


def compile_variant(spec: dict, arch: int) -> dict:
    """``compile_spec``, its machine code read: the metrics, or {"error": ...}."""
    import triton

    try:
        compiled = compile_spec(spec, arch)
        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
            f.write(compiled.asm["cubin"])
            path = f.name
        try:
            (name, st), = sass_stats(path, arch).items()
        finally:
            os.unlink(path)
        shared = max(compiled.metadata.shared, st.static_shared)
        threads = compiled.metadata.num_warps * 32
        return {**asdict(st), "shared": shared, "threads": threads, "triton": triton.__version__,
                "ctas_per_sm": ctas_per_sm(st.registers, threads, shared, arch)}
    except Exception as exc:  # reported per variant; the caller decides whether it is fatal
        return {"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]}


def _compile_worker(item: tuple[dict, int]) -> dict:
    return compile_variant(*item)


def _ptx_worker(item: tuple[dict, int]) -> str:
    return compile_spec(*item).asm["ptx"]


def compile_all(specs: list[dict], arch: int, jobs: int, ptx: bool = False) -> list:
    """Compile ``specs`` in ``jobs`` processes with the interpreter off: each one's metrics
    (``compile_variant``), or with ``ptx`` its PTX text."""
    import multiprocessing

    worker = _ptx_worker if ptx else _compile_worker
    if jobs <= 1 and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return [worker((s, arch)) for s in specs]
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"  # inherited by the workers: compile, do not interpret
    try:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=max(1, jobs), mp_context=ctx) as pool:
            return list(pool.map(worker, [(s, arch) for s in specs]))
    finally:  # this process may be interpreting (tests): leave it so
        if before is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = before


# ------------------------------------------------------------------------------- listing a workload's variants
@dataclass
class Launch:
    case: str
    kernel: str
    spec: dict       # this launch's own arguments (sizes included)
    grid: list
    config: str = ""
    variant: str = ""  # what its compilation depends on: launches with one variant share one binary


def kernel_suite(name: str):
    """The cases the report covers: ``kernels`` is the seed stage shapes at batch 32 in bf16 and fp32,
    channels_last, eval and training (forward and backward); ``tests`` the block tests' small shapes;
    any benchmark suite name works too."""
    from .bench import DTYPES, FORMATS, BenchCase, suite
    from .cases import SMALL_BLOCK_CASES, seed_block_cases

    if name == "tests":  # the block tests' shapes in every dtype and layout: what a GPU test run launches most
        return [BenchCase(b, mode, dtype, fmt) for b in SMALL_BLOCK_CASES for mode in ("eval", "train-fwdbwd")
                for dtype in DTYPES for fmt in FORMATS]
    if name == "kernels":
        return [BenchCase(b, mode, dtype, "nhwc") for b in seed_block_cases(batches=(32,))
                for dtype in ("bfloat16", "float32") for mode in ("eval", "train-fwdbwd")]
    return suite(name, "cuda")


def record_cases(cases, arch: int) -> list[Launch]:
    """Dry-run each case through the Triton backend on CPU tensors (interpreter mode: nothing executes)
    with ``arch``'s configurations, and list its launches."""
    import torch

    from .backends.triton import configs, launch
    from .bench import build_model, make_step

    if not configs.interpreting():
        raise RuntimeError("recording runs in interpreter mode (TRITON_INTERPRET=1): CPU tensors")
    model = configs.H100 if arch >= 90 else configs.A100
    launches: list[Launch] = []
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = True  # as on the GPU by default: fp32 runs as TF32
    try:
        for case in cases:
            with configs.modelled_device(model), launch.recording(execute=False) as rec:
                net = build_model("fused-triton", case, "cpu")
                step, inputs = make_step(net, case, "cpu")
                step(inputs[0])
            for spec, grid, key in rec.launches:
                launches.append(Launch(case.id, spec.short_name, spec.to_json(), list(grid), _config_label(spec),
                                       repr(key)))
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    return launches


def _config_label(spec) -> str:
    c = dict(spec.constexprs)
    if "BLOCK_M" in c:
        return f"{c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']} w{spec.num_warps} s{spec.num_stages}"
    return f"w{spec.num_warps}"


def _record_main(argv: list[str]) -> int:
    """Subprocess entry: ``python -m fused_resnet.kernel_report record CASES.pkl ARCH OUT.jsonl``."""
    import pickle
    cases_path, arch, out = argv[0], int(argv[1]), argv[2]
    with open(cases_path, "rb") as f:
        cases = pickle.load(f)
    launches = record_cases(cases, arch)
    with open(out, "w") as f:
        for l in launches:
            f.write(json.dumps(asdict(l)) + "\n")
    return 0


def record_launches(cases, arch: int) -> list[Launch]:
    """``record_cases`` in this process when it interprets Triton, else in a child process that does: a
    process with a GPU runs Triton compiled (TRITON_INTERPRET is read once, at import), and recording
    needs the interpreter's CPU tensors."""
    import pickle

    from .backends.triton import configs

    if configs.interpreting():
        return record_cases(cases, arch)
    with tempfile.TemporaryDirectory() as tmp:
        cases_path, out = os.path.join(tmp, "cases.pkl"), os.path.join(tmp, "launches.jsonl")
        with open(cases_path, "wb") as f:
            pickle.dump(list(cases), f)
        subprocess.run([sys.executable, "-m", "fused_resnet.kernel_report", "record", cases_path, str(arch), out],
                       env=dict(os.environ, TRITON_INTERPRET="1"), check=True)
        with open(out) as f:
            return [Launch(**json.loads(line)) for line in f if line.strip()]


def spec_key(spec: dict) -> str:
    return json.dumps(spec, sort_keys=True)


# --------------------------------------------------------------------------------------- the CUDA extension
def extension_library() -> Optional[str]:
    try:
        from . import _C
    except ImportError:
        return None
    return _C.__file__


def extension_stats(arch: int) -> dict[str, SassStats]:
    """The CUDA extension's kernels (demangled-ish names) from the built library, or {} without one; the
    convolution's threads and dynamic shared memory as its launches give them (``cuda_conv_config``)."""
    lib = extension_library()
    if lib is None:
        return {}
    try:
        stats = sass_stats(lib, arch)
    except subprocess.CalledProcessError:  # a CPU-only build: no device code
        return {}
    config = cuda_conv_config()
    for name, st in stats.items():
        if config is not None and "conv_bn_act_kernel" in name:
            st.threads = config["threads"]
            st.launch_shared = config["simt_smem" if "simt" in short_cuda_name(name) else "tc_smem"]
    return stats


def cuda_conv_config() -> Optional[dict]:
    """The CUDA convolution's launch configuration (csrc/ops.cpp, ``cuda_conv_config``), or None where the
    extension has no CUDA kernels."""
    import torch

    from .backends import extension

    if not extension.has_kernel("cuda_conv_config", "CompositeImplicitAutograd"):
        return None
    keys = ("threads", "tc_smem", "simt_smem", "block_m", "block_n", "slice_bytes", "stages")
    return dict(zip(keys, torch.ops.fused_resnet.cuda_conv_config()))


def short_cuda_name(mangled: str) -> str:
    """A readable name for an extension kernel: the function and its template arguments, no namespaces."""
    try:
        name = subprocess.run(["c++filt", mangled], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return mangled
    name = name.replace("(anonymous namespace)::", "")
    depth, end = 0, len(name)
    for i, ch in enumerate(name):  # drop the parameter list: the "(" outside the template arguments
        depth += (ch == "<") - (ch == ">")
        if ch == "(" and depth == 0:
            end = i
            break
    name = re.sub(r"^void ", "", name[:end])
    name = re.sub(r"[A-Za-z_0-9]+::", "", name)
    return name.replace("(Loop)0", "simt").replace("(Loop)1", "tensor-core").replace("(Loop)2", "tensor-core+cp.async")


# ------------------------------------------------------------------------------------------------ the report
COLUMNS = ("case", "kernel", "config", "regs", "stack", "spills", "smem KB", "CTAs/SM", "waves", "MMA",
           "async", "MMA loops")


def _row(l: Launch, m: dict) -> list[str]:
    if "error" in m:
        return [l.case, l.kernel, l.config, "ERROR: " + m["error"]] + [""] * (len(COLUMNS) - 4)
    grid = 1
    for g in l.grid:
        grid *= g
    waves = grid / max(1, m["ctas_per_sm"] * H100_SMS)
    return [l.case, l.kernel, l.config, str(m["registers"]), str(m["stack"]), str(m["spills"]),
            f"{m['shared'] / 1024:.1f}", str(m["ctas_per_sm"]), f"{waves:.2f}", str(m["mma"]),
            str(m["async_copies"]), str(m["mma_loops"])]


def markdown(rows: list[list[str]], columns: Iterable[str] = COLUMNS) -> str:
    columns = list(columns)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def report(launches: list[Launch], arch: int, jobs: int) -> tuple[list[list[str]], dict[str, dict]]:
    """Compile the distinct variants of ``launches`` and return the table rows (one per case and
    distinct kernel variant) and the metrics per variant."""
    unique = {}
    for l in launches:
        unique.setdefault(l.variant or spec_key(l.spec), l.spec)
    keys = list(unique)
    metrics = dict(zip(keys, compile_all([unique[k] for k in keys], arch, jobs)))
    rows, seen = [], set()
    for l in launches:
        m = metrics[l.variant or spec_key(l.spec)]
        k = (l.case, l.variant or spec_key(l.spec), tuple(l.grid))
        if k not in seen:
            seen.add(k)
            rows.append(_row(l, m))
    return rows, metrics


def extension_rows(arch: int) -> list[list[str]]:
    rows = []
    for name, s in sorted(extension_stats(arch).items(), key=lambda kv: short_cuda_name(kv[0])):
        shared = s.static_shared + s.launch_shared
        rows.append([short_cuda_name(name), str(s.registers), str(s.stack), str(s.spills),
                     f"{shared / 1024:.1f}", str(ctas_per_sm(s.registers, s.threads, shared, arch)),
                     str(s.mma), str(s.async_copies), str(s.mma_loops), str(s.calls), str(s.calls_in_mma_loops)])
    return rows


EXTENSION_COLUMNS = ("kernel", "regs", "stack", "spills", "smem KB", "CTAs/SM", "MMA", "async",
                     "MMA loops", "calls", "calls in MMA loops")


def summary(launches: list[Launch], metrics: dict[str, dict]) -> list[list[str]]:
    """One row per (kernel, configuration, dtype): how many variants, the most registers and shared
    memory, the fewest CTAs per SM, spills in total, and the tensor-core main loops seen."""
    groups: dict[tuple, list[dict]] = {}
    for l in launches:
        m = metrics[l.variant or spec_key(l.spec)]
        if "error" in m:
            continue
        dtype = next((a[1] for a in l.spec["args"] if a[0] == "tensor"), "?")
        groups.setdefault((l.kernel, l.config, dtype), {})[l.variant or spec_key(l.spec)] = m
    rows = []
    for (kernel, config, dtype), ms in sorted(groups.items()):
        ms = list(ms.values())
        loops = sorted({m["mma_loops"] for m in ms})
        rows.append([kernel, config, dtype, str(len(ms)), str(max(m["registers"] for m in ms)),
                     str(sum(m["spills"] for m in ms)), f"{max(m['shared'] for m in ms) / 1024:.0f}",
                     str(min(m["ctas_per_sm"] for m in ms)), str(sum(m["mma"] > 0 for m in ms)),
                     "/".join(map(str, loops))])
    return rows


SUMMARY_COLUMNS = ("kernel", "config", "dtype", "variants", "max regs", "spills", "max smem KB", "min CTAs/SM",
                   "on tensor cores", "MMA loops")
README_BEGIN, README_END = "<!-- kernels:begin -->", "<!-- kernels:end -->"


def main(args: argparse.Namespace) -> int:
    import datetime

    import triton

    arch = args.arch
    if args.variants:
        with open(args.variants) as f:
            specs = [json.loads(line) for line in f if line.strip()]
        from .backends.triton.launch import LaunchSpec
        launches = [Launch("(recorded)", s["kernel"].rsplit(":", 1)[-1], s, [1], _config_label(LaunchSpec.from_json(s)))
                    for s in specs]
    else:
        launches = record_launches(kernel_suite(args.suite), arch)
    rows, metrics = report(launches, arch, args.jobs)
    failed = {(l.kernel, l.config): metrics[l.variant or spec_key(l.spec)]["error"] for l in launches
              if "error" in metrics[l.variant or spec_key(l.spec)]}
    title = (f"Triton {triton.__version__}, sm_{arch}: {len(metrics)} kernel variants of the `{args.suite}` cases "
             f"compiled ahead of time, {len(failed)} failed")
    print(title)
    if not args.quiet:
        print(markdown(rows))
    ext = [] if args.variants else extension_rows(arch)
    if ext and not args.quiet:
        print(f"\nCUDA extension ({extension_library()}), sm_{arch}:")
        print(markdown(ext, EXTENSION_COLUMNS))
    if args.json:
        structured = [{"case": l.case, "kernel": l.kernel, "grid": l.grid, "spec": l.spec,
                       "metrics": metrics[l.variant or spec_key(l.spec)]} for l in launches]
        with open(args.json, "w") as f:
            json.dump({"arch": arch, "triton": triton.__version__, "columns": COLUMNS, "rows": rows,
                       "extension_columns": EXTENSION_COLUMNS, "extension_rows": ext, "launches": structured}, f)
    generated = (f"_Generated by `python -m fused_resnet kernels --arch {arch}` on {datetime.date.today()}: "
                 f"{title}; no GPU involved._")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(f"# Kernel report, sm_{arch}\n\n{generated}\n\nEvery launch of every case: `config` is BLOCK_M x "
                    f"BLOCK_N x BLOCK_K, warps, pipeline stages; `waves` the grid over (CTAs per SM x 132 SMs).\n\n"
                    f"{markdown(rows)}\n")
            if ext:
                f.write(f"\n## The CUDA extension, sm_{arch}\n\nEvery instantiation in the built library; calls are "
                        f"subroutine calls (64-bit division, slow-path float division).\n\n"
                        f"{markdown(ext, EXTENSION_COLUMNS)}\n")
        print(f"wrote {args.markdown}")
    if args.readme:
        replace_section(args.readme, README_BEGIN, README_END,
                        f"\n{generated}\n\n{markdown(summary(launches, metrics), SUMMARY_COLUMNS)}\n")
        print(f"updated the kernel section of {args.readme}")
    for (kernel, config), error in list(failed.items())[:20]:
        print(f"FAILED {kernel} {config}: {error}")
    return 1 if failed else 0


def replace_section(path: str, begin: str, end: str, body: str) -> None:
    """Replace what lies between the markers ``begin`` and ``end`` of the file at ``path`` (a README's
    generated section) with ``body``; an error names the markers when the file lacks them."""
    with open(path) as f:
        text = f.read()
    if begin not in text or end not in text:
        raise SystemExit(f"{path} has no {begin} ... {end} section")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    with open(path, "w") as f:
        f.write(head + begin + body + end + tail)


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "record":
    sys.exit(_record_main(sys.argv[2:]))
