"""The sub-commands behind ``python -m fused_resnet``: check, bench, report, profile, kernels."""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
import time
from typing import Optional, Sequence

import torch

from . import reference
from .backends import available_backends, get_backend
from .modules import convert, resnet18
from .testing import compare_models, randomize_

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
OFFLINE_PROVIDER = "fused-triton-offline"
NOT_RUN = "not run (host time only)"


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _modes_for(device: str, dtype: torch.dtype, requested: Optional[str]) -> list[tuple[str, bool]]:
    """(backend, training) pairs to check: every mode each backend can serve on ``device``."""
    names = [requested] if requested else available_backends()
    return [(n, train) for n in names for train in (True, False)
            if get_backend(n).supports(device, dtype, train) is None]


def cmd_check(args: argparse.Namespace) -> int:
    device, dtype = args.device, DTYPES[args.dtype]
    print(f"fused_resnet check: device={device} dtype={args.dtype} batch={args.batch} size={args.size} "
          f"torch={torch.__version__} backends={available_backends()}")
    net = resnet18().eval()  # auto: the fastest backend here; the checks below cover each backend
    x = torch.rand((1, 1, 224, 224))
    print("\nThe seed ResNet-18 built from fused blocks, a (1, 1, 224, 224) input:")
    with torch.no_grad():
        for name, layer in net.named_children():
            x = layer(x)
            print(f"{name:>16}  output shape:\t {x.shape}")

    modes = _modes_for(device, dtype, args.backend)
    if not modes:
        print(f"\nno backend can run {args.dtype} {device} tensors here")
        return 1
    torch.manual_seed(0)
    seed = randomize_(reference.resnet18())
    x = torch.randn(args.batch, 1, args.size, args.size)
    print(f"\nFused ResNet-18 vs the seed reference in float64, input {tuple(x.shape)}. Every quantity (the\n"
          f"output, each gradient, in training each running statistic) passes when its relative error\n"
          f"||fused - ref|| / ||ref|| is at most its bound, max(2 x eager's own error, the dtype's floor).\n"
          f"'output error' is the output's; 'tightest' is the quantity closest to its bound (often a\n"
          f"gradient, so it can exceed the output's error and still pass).")
    header = (f"{'backend':>8} {'mode':>6} {'quantities':>10} {'output error':>13} {'tightest error':>15} "
              f"{'its bound':>10}  tightest quantity")
    print(header)
    print("-" * len(header))
    failed = 0
    for name, train in modes:
        fused = convert(copy.deepcopy(seed), backend=name)
        start = time.perf_counter()
        checks = compare_models(fused, seed, x, train=train, dtype=dtype, device=device)
        worst = max(checks, key=lambda c: c.fused_err / c.bound if c.bound else float("inf"))
        out = next(c for c in checks if c.name == "output")
        bad = [c for c in checks if not c.ok]
        failed += len(bad)
        verdict = "PASS" if not bad else f"FAIL ({len(bad)})"
        print(f"{name:>8} {'train' if train else 'eval':>6} {len(checks):>10} {out.fused_err:>13.2e} "
              f"{worst.fused_err:>15.2e} {worst.bound:>10.2e}  {worst.name}  {verdict} "
              f"[{time.perf_counter() - start:.1f}s]")
        for c in bad:
            print(f"{'':>16} FAIL {c.name}: {c.fused_err:.3e} > {c.bound:.3e} (eager {c.eager_err:.3e})")
    print("\nall checks passed" if not failed else f"\n{failed} checks failed")
    return 0 if not failed else 1


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import providers, suite

    device = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = suite(args.suite, device)
    print(f"fused_resnet bench: device={device} suite={args.suite} ({len(cases)} cases) torch={torch.__version__}")
    with contextlib.ExitStack() as stack:
        if OFFLINE_PROVIDER in {p for c in cases for p in providers(device, c, args.suite)}:
            from .backends.triton.offline import offline_launches
            stack.enter_context(offline_launches(keep=False))
            # The offline Triton rows' activations are never computed (uninitialised memory): denormals in
            # them would slow the CPU's convolution gradients (aten's, eager runs them too) 3x at 8 channels.
            stack.callback(torch.set_flush_denormal, False)
            torch.set_flush_denormal(True)
        rows = _bench_rows(args, cases)
    print()
    print(markdown_table(rows))
    if args.json:
        import json
        with open(args.json, "w") as f:
            json.dump({"rows": rows}, f, indent=1)
        print(f"\nwrote {args.json}")
    wrong = sorted({f"{r['case']} {r['mode']} {r['provider']}" for r in rows if _wrong(r)})
    if wrong:
        print(f"\n{len(wrong)} providers disagreed with the reference: " + ", ".join(wrong))
    return 1 if wrong else 0


def _wrong(row: dict) -> bool:
    return row.get("check", "ok") not in ("ok", NOT_RUN)


def _bench_rows(args: argparse.Namespace, cases: list) -> list[dict]:
    from .bench import as_row, check_case, measure_interleaved, prepare, providers, yardstick

    device = args.device
    rows = []
    for i, case in enumerate(cases, 1):
        # Build every provider first, then time them in interleaved rounds (eager's speedup is taken
        # from the same rounds).
        prepared, checked = {}, {}
        for provider in providers(device, case, args.suite):
            if args.providers and provider not in args.providers.split(",") and provider != "eager" \
                    and not any(yardstick(p) == provider for p in args.providers.split(",")):
                continue
            print(f"  [{i}/{len(cases)}] {case.id} {provider}: prepare ...", end="", flush=True)
            try:
                prepared[provider] = prepare(provider, case, device)
                prepared[provider][0](prepared[provider][1][0])  # compiles now, not inside a round
                checked[provider] = check_case(provider, case, device) if provider not in ("eager", OFFLINE_PROVIDER) \
                    else []
            except Exception as exc:  # a provider that cannot compile here is reported, not fatal
                print(f" failed: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}")
                prepared.pop(provider, None)
                continue
            print(" ok" if not checked[provider] else f" WRONG RESULT: {'; '.join(checked[provider])}")
        timings = measure_interleaved(prepared, case, device, iters=args.iters, rounds=args.rounds)
        for provider, timing in timings.items():
            base = timings.get(yardstick(provider))
            rows.append(as_row(provider, case, timing, base.median_ms if base else None))
            rows[-1]["check"] = NOT_RUN if provider == OFFLINE_PROVIDER else "; ".join(checked[provider]) or "ok"
            print(f"  [{i}/{len(cases)}] {case.id} {provider}: {timing.median_ms:.3f} ms")
    return rows


def _ms(v: Optional[float]) -> str:
    return "" if v is None or v != v else f"{v:.3f}"


def markdown_table(rows: list[dict], predicted: Optional[dict] = None) -> str:
    """Speedup table: one line per case and provider. ``host us`` is the host time of one call (on CUDA
    the time to enqueue it); ``device ms`` the GPU's busy time per call (its kernels' durations, what the
    call costs when the host keeps up; runs before it was measured leave it blank); ``predicted ms`` the
    model of ``fused_resnet.predict`` (GPU runs, Triton)."""
    predicted = predicted or {}
    lines = ["| case | mode | dtype | format | provider | median ms (p20-p80) | speedup vs eager | host us | "
             "device ms | floor ms | of floor | predicted ms |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        provider = r["provider"] + (" (WRONG RESULT)" if _wrong(r) else "")
        host = r.get("host_us", float("nan"))
        pred = predicted.get((r["case"], r["mode"], r["dtype"], r["format"])) if r["provider"] == "fused-triton" \
            else None
        lines.append(f"| {r['case']} | {r['mode']} | {r['dtype']} | {r['format']} | {provider} | "
                     f"{r['median_ms']:.3f} ({r['p20_ms']:.3f}-{r['p80_ms']:.3f}) | "
                     f"{r['speedup_vs_eager']:.2f}x | {host:.0f} | {_ms(r.get('device_ms'))} | {r['floor_ms']:.3f} | "
                     f"{100 * r['floor_fraction']:.0f}% | {'' if pred is None else f'{pred:.3f}'} |")
    return "\n".join(lines)


def speedup_matrix(rows: list[dict]) -> str:
    """The README's compact view: one line per case (case, mode, dtype, format), eager's median, and each
    other provider's speedup over its yardstick -- eager, or eager in a CUDA graph for ``+graph`` (a wrong
    result marked, a provider that did not run blank; a case only eager ran left out)."""
    cases: dict[tuple, dict[str, dict]] = {}
    providers: list[str] = []
    for r in rows:
        cases.setdefault((r["case"], r["mode"], r["dtype"], r["format"]), {})[r["provider"]] = r
        if r["provider"] != "eager" and r["provider"] not in providers:
            providers.append(r["provider"])
    lines = ["| case | mode | dtype | format | eager ms | " + " | ".join(providers) + " |",
             "|---|---|---|---|---|" + "---|" * len(providers)]
    for (case, mode, dtype, fmt), by in cases.items():
        if not set(by) - {"eager"}:
            continue  # a case no other provider ran (a run cut short): nothing to compare
        eager = by.get("eager")
        cells = []
        for p in providers:
            r = by.get(p)
            cells.append("" if r is None else f"{r['speedup_vs_eager']:.2f}x" +
                         (" (wrong)" if _wrong(r) else ""))
        eager_ms = "" if eager is None else f"{eager['median_ms']:.3f}"
        lines.append(f"| {case} | {mode} | {dtype} | {fmt} | {eager_ms} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def backend_comparison(rows: list[dict], ratio_pair: tuple[str, str] = ("fused-cuda", "fused-triton"),
                       within: float = 0.10) -> str:
    """Per case, the fused backends side by side: the fastest one (what ``auto`` should pick there) and,
    where both of ``ratio_pair`` ran, the first's time over the second's and whether it is within
    ``within`` of it or faster. Empty when no case has two fused providers."""
    cases: dict[tuple, dict[str, float]] = {}
    for r in rows:
        if r["provider"].startswith("fused-") and "+" not in r["provider"]:  # +sync, +graph: other setups
            cases.setdefault((r["case"], r["mode"], r["dtype"], r["format"]), {})[r["provider"]] = r["median_ms"]
    a, b = ratio_pair
    lines = [f"| case | mode | dtype | format | fastest fused | {a} / {b} |", "|---|---|---|---|---|---|"]
    for (case, mode, dtype, fmt), times in cases.items():
        if len(times) < 2:
            continue
        fastest = min(times, key=times.get)
        ratio = ""
        if a in times and b in times:
            x = times[a] / times[b]
            verdict = "faster" if x < 1 - within else ("within" if x <= 1 + within else "outside") + \
                f" {100 * within:.0f}%"
            ratio = f"{x:.2f} ({verdict})"
        lines.append(f"| {case} | {mode} | {dtype} | {fmt} | {fastest} | {ratio} |")
    return "\n".join(lines) if len(lines) > 2 else ""


AUTO_MODES = {"eval": "eval", "train-fwdbwd": "train"}  # benchmark mode -> auto's mode


def auto_choices(rows: list[dict], margin: float = 0.03) -> dict[tuple, str]:
    """auto's per-shape choices from benchmark rows: per block case, mode, dtype and format, the fastest
    fused backend if it beats eager by more than ``margin``, else the seed route (the measurements are
    noisy; a fused path no faster than eager is not worth taking). Keys as ``backends.measured_choice``:
    (device type, mode, dtype, format, in_channels, out_channels, stride, height, width, batch)."""
    from .backends import SEED_ROUTE
    from .cases import BlockCase

    groups: dict[tuple, dict[str, float]] = {}
    for r in rows:
        block = BlockCase.from_id(r["case"])
        if block is None or r["mode"] not in AUTO_MODES:
            continue
        device = r.get("device_type") or ("cpu" if str(r.get("device", "")).startswith("cpu") else "cuda")
        key = (device, AUTO_MODES[r["mode"]], r["dtype"], r["format"], block.in_channels, block.out_channels,
               block.stride, block.size, block.width or block.size, block.batch)
        groups.setdefault(key, {})[r["provider"]] = r["median_ms"]
    choices = {}
    for key, times in groups.items():
        fused = {p[len("fused-"):]: t for p, t in times.items() if p.startswith("fused-") and "+" not in p}
        if "eager" not in times or not fused:
            continue
        best = min(fused, key=fused.get)
        choices[key] = best if fused[best] <= times["eager"] * (1 - margin) else SEED_ROUTE
    return choices


def write_auto_table(path: str, choices: dict[tuple, str], source: str) -> None:
    """Rewrite the auto table module at ``path``: entries for the device types in ``choices`` are
    replaced, the others kept."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_auto_table", path)
    old, sources = {}, {}
    if spec and spec.loader and os.path.exists(path):
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        old, sources = dict(module.BY_SHAPE), dict(module.SOURCES)
    devices = {key[0] for key in choices}
    table = {k: v for k, v in old.items() if k[0] not in devices} | choices
    sources = {d: s for d, s in sources.items() if d not in devices} | {d: source for d in devices}
    lines = ['"""auto\'s choice per measured block shape: generated by `python -m fused_resnet report RESULTS',
             '--auto-table fused_resnet/backends/auto_table.py` from the runs in SOURCES; do not edit by hand.',
             "",
             "Key: (device type, mode, dtype, format, in_channels, out_channels, stride, height, width, batch);",
             'value: a backend name, or "seed" for the seed route (no fused backend beat eager by the margin).',
             '"""', "", "SOURCES = {"]
    lines += [f"    {d!r}: {s!r}," for d, s in sorted(sources.items())] + ["}", "", "BY_SHAPE = {"]
    lines += [f"    {k!r}: {v!r}," for k, v in sorted(table.items())] + ["}", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def load_rows(path: str) -> list[dict]:
    """Rows from a pytest-benchmark JSON (extra_info of each benchmark) or a ``bench --json`` file."""
    import json
    with open(path) as f:
        if path.endswith(".jsonl"):
            return [json.loads(line) for line in f if line.strip()]
        data = json.load(f)
    if "rows" in data:
        return data["rows"]
    return [b["extra_info"] for b in data.get("benchmarks", []) if b.get("extra_info", {}).get("provider")]


def cmd_report(args: argparse.Namespace) -> int:
    from .plot import speedup_chart

    rows = load_rows(args.results)
    if not rows:
        print(f"no benchmark rows in {args.results}")
        return 1
    stem = os.path.splitext(args.out or args.results)[0]
    env = rows[0]
    title = (f"{env.get('device')} - torch {env.get('torch')} - triton {env.get('triton')} - "
             f"CUDA {env.get('cuda')} - {env.get('date')}")
    predicted = {}
    if args.kernels:
        import json

        from .predict import predictions
        with open(args.kernels) as f:
            predicted = predictions(json.load(f), rows)
    from .bench import CEILINGS_HOW
    table = (f"Measured on {title}.\n\n" + markdown_table(rows, predicted) + "\n\n" + CEILINGS_HOW +
             " Host us: the host time of one call (on a GPU, the time it takes to enqueue its work)."
             " Device ms: the GPU's busy time per call, its kernels' durations (torch.profiler); where the median"
             " is close to the host time and far above this, the case measures the host, not the kernels." +
             (" Predicted: the launch-by-launch model of `fused_resnet/predict.py` from the compiled kernels' "
              "occupancy (`--kernels`)." if predicted else "") + "\n")
    side_by_side = backend_comparison(rows)
    if side_by_side:
        table += "\nFused backends side by side (time ratio; below 1 is faster):\n\n" + side_by_side + "\n"
    with open(stem + ".md", "w") as f:
        f.write(table)
    fused = [r for r in rows if r["provider"] != "eager"]
    speedup_chart(stem + ".png", [f"{r['case']} {r['mode']} {r['dtype']} {r['format']} {r['provider']}"
                                  for r in fused], [r["speedup_vs_eager"] for r in fused], title)
    print(table)
    print(f"wrote {stem}.md and {stem}.png")
    if args.readme:
        here = os.path.dirname(args.readme) or "."
        from .bench import GRAPH
        graphs = any(r["provider"].endswith(GRAPH) for r in rows)
        compact = (f"Measured on {title}. Speedup over eager (higher is faster"
                   + ("; `+graph`: the step captured in a CUDA graph, over eager captured alike" if graphs else "")
                   + "); every figure with its p20-p80, "
                   f"host time and roofline in [{os.path.basename(stem)}.md]({os.path.relpath(stem + '.md', here)})."
                   f"\n\n{speedup_matrix(rows)}\n")
        _update_readme(args.readme, compact, os.path.relpath(stem + ".png", here))
        print(f"updated the results section of {args.readme}")
    if args.auto_table:
        choices = auto_choices(rows, args.auto_margin)
        write_auto_table(args.auto_table, choices, args.results)
        print(f"wrote {len(choices)} per-shape choices for auto to {args.auto_table}")
    return 0


README_BEGIN, README_END = "<!-- results:begin -->", "<!-- results:end -->"


def _update_readme(readme: str, table: str, plot: str) -> None:
    """Replace the README's generated results section (between the markers) with ``table``."""
    from .kernel_report import replace_section

    replace_section(readme, README_BEGIN, README_END,
                    f"\n_Generated by `python -m fused_resnet report ... --readme README.md`; do not edit by hand._\n\n"
                    f"{table}\n![speedup over eager]({plot})\n")


def cmd_profile(args: argparse.Namespace) -> int:
    from . import profiling
    from .bench import BenchCase, build_model, make_step
    from .cases import BlockCase

    profiling.ENABLED = True
    device = args.device
    os.makedirs(args.out, exist_ok=True)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    block = BlockCase(64, 64, 56, 8) if device == "cuda" else BlockCase(16, 16, 14, 2)
    dtype = "bfloat16" if device == "cuda" else "float32"
    providers = ["eager"] + [f"fused-{b}" for b in available_backends()
                             if not (b == "triton" and device == "cpu")]
    print(f"fused_resnet profile: device={device}, one block {block.id} {dtype} channels_last, and one "
          f"ResNet-18 training step; traces in {args.out}/")
    for provider in providers:
        for mode in ("eval", "train-fwdbwd"):
            backend = provider[len("fused-"):] if provider != "eager" else None
            if backend and get_backend(backend).supports(device, torch.bfloat16 if device == "cuda"
                                                         else torch.float32, mode != "eval") is not None:
                continue
            case = BenchCase(block, mode, dtype, "nhwc")
            step, inputs = make_step(build_model(provider, case, device), case, device)
            step(inputs[0])  # compile and warm up outside the trace
            with torch.profiler.profile(activities=activities) as prof:
                step(inputs[1])
                if device == "cuda":
                    torch.cuda.synchronize()
            path = os.path.join(args.out, f"block-{provider}-{mode}.json")
            prof.export_chrome_trace(path)
            kernels = _launched(prof, device)
            print(f"\n{provider:>14} {mode:<13} {sum(kernels.values()):>3} "
                  f"{'kernels' if device == 'cuda' else 'leaf ops'} per block  ({path})")
            for name, n in kernels.most_common():
                print(f"{'':>16}{n:>3} x {name[:110]}")
        case = BenchCase.for_model("resnet18", 64 if device == "cuda" else 32, 8 if device == "cuda" else 2,
                                   "train-fwdbwd", dtype, "nhwc")
        if provider != "eager" and get_backend(provider[len("fused-"):]).supports(
                device, torch.bfloat16 if device == "cuda" else torch.float32, True) is not None:
            continue
        step, inputs = make_step(build_model(provider, case, device), case, device)
        step(inputs[0])
        with torch.profiler.profile(activities=activities) as prof:
            step(inputs[1])
        path = os.path.join(args.out, f"resnet18-{provider}-train-step.json")
        prof.export_chrome_trace(path)
        print(f"\n{provider:>14} ResNet-18 training step: {sum(_launched(prof, device).values())} "
              f"{'kernels' if device == 'cuda' else 'leaf ops'}  ({path})")
    return 0


def _launched(prof, device: str):
    """Kernels (CUDA) or leaf operators (CPU) recorded by a profiler run, by name."""
    from collections import Counter

    events = prof.events()
    if device == "cuda":
        return Counter(e.name for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    return Counter(e.name for e in events if not e.cpu_children and not e.name.startswith("fused_resnet::")
                   and not e.name.startswith("aten::empty") and e.name not in ("aten::view", "aten::as_strided"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fused_resnet", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    check = sub.add_parser("check", help="shapes of the seed ResNet-18, and every backend vs the reference")
    check.add_argument("--device", default=_default_device(), choices=["cpu", "cuda"])
    check.add_argument("--dtype", default="float32", choices=list(DTYPES))
    check.add_argument("--backend", default=None, help="check one backend (default: every available one)")
    check.add_argument("--batch", type=int, default=2)
    check.add_argument("--size", type=int, default=32, help="input height and width (the chapter trains at 96)")
    check.set_defaults(func=cmd_check)

    bench = sub.add_parser("bench", help="time eager, torch.compile and the fused backends; print speedups")
    bench.add_argument("--device", default=_default_device(), choices=["cpu", "cuda"])
    bench.add_argument("--suite", default="short", choices=["quick", "short", "default", "full", "host"],
                       help="host: tiny blocks whose time is host time (with --threads 1 on the CPU)")
    bench.add_argument("--providers", default="", help="comma-separated subset (eager always runs)")
    bench.add_argument("--iters", type=int, default=30)
    bench.add_argument("--rounds", type=int, default=5,
                       help="interleaved rounds the iterations are split into (each round times every provider)")
    bench.add_argument("--json", default=None, help="also write the rows here")
    bench.add_argument("--threads", type=int, default=None,
                       help="torch.set_num_threads first (the host suite runs on one thread)")
    bench.set_defaults(func=cmd_bench)

    report = sub.add_parser("report", help="markdown table and PNG plot from benchmark JSON")
    report.add_argument("results", help="pytest-benchmark JSON (--benchmark-json), --bench-rows JSON lines, "
                                        "or bench --json output")
    report.add_argument("--out", default=None, help="output stem (default: beside the results)")
    report.add_argument("--kernels", default=None,
                        help="a `kernels --json` report of the same cases: adds the predicted column")
    report.add_argument("--readme", default=None, help="also regenerate this README's results section")
    report.add_argument("--auto-table", default=None,
                        help="also rewrite auto's per-shape choices (fused_resnet/backends/auto_table.py) "
                             "for the device types measured here")
    report.add_argument("--auto-margin", type=float, default=0.03,
                        help="a fused backend is auto's choice for a shape only when faster than eager by "
                             "more than this fraction (default 0.03)")
    report.set_defaults(func=cmd_report)

    profile = sub.add_parser("profile", help="torch.profiler traces and kernels per block, eager vs fused")
    profile.add_argument("--device", default=_default_device(), choices=["cpu", "cuda"])
    profile.add_argument("--out", default="profile", help="folder for the Chrome traces")
    profile.set_defaults(func=cmd_profile)

    kernels = sub.add_parser("kernels", help="compile every Triton kernel variant ahead of time (no GPU needed) "
                                             "and read registers, spills, shared memory, tensor-core and "
                                             "async-copy instructions, main loops; and the CUDA extension's")
    kernels.add_argument("--arch", type=int, default=90, choices=[80, 90], help="sm_80 (A100) or sm_90 (H100)")
    kernels.add_argument("--suite", default="kernels",
                         help="the cases whose launches are listed: 'kernels' (the seed stage shapes at batch 32, "
                              "bf16 and fp32, eval and training) or a benchmark suite name")
    kernels.add_argument("--variants", default=None,
                         help="compile the LaunchSpec lines of this file instead (FUSED_RESNET_RECORD_LAUNCHES)")
    kernels.add_argument("--jobs", type=int, default=max(1, min(16, os.cpu_count() or 1)))
    kernels.add_argument("--json", default=None, help="also write the table here")
    kernels.add_argument("--quiet", action="store_true", help="print the summary and failures only")
    kernels.add_argument("--markdown", default=None, help="also write the full tables here (docs/kernels.md)")
    kernels.add_argument("--readme", default=None, help="also regenerate this README's kernel section (a summary)")
    kernels.set_defaults(func=cmd_kernels)
    return parser


def cmd_kernels(args: argparse.Namespace) -> int:
    from .kernel_report import main as kernels_main
    return kernels_main(args)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = parser._subparsers._group_actions[0].choices  # check is the default sub-command
    if not argv or (argv[0] not in commands and argv[0] not in ("-h", "--help")):
        argv = ["check", *argv]
    args = parser.parse_args(argv)
    return args.func(args)
