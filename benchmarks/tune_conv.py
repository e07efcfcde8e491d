"""Tune the Triton convolution's tile configuration for the seed's 3x3 layers on this GPU, and print the
entries for ``TUNED_CONV`` in fused_resnet/backends/triton/configs.py (keyed by architecture and variant,
inference or training; the GPU, versions and date printed beside them).

    python -m benchmarks.tune_conv [--dtype bfloat16] [--batch 32] [--mode eval|train] [--json OUT] [--budget-s 120]
    TRITON_INTERPRET=1 python -m benchmarks.tune_conv --smoke    # CPU: the script's mechanics only

Candidates are the tiles the kernel-quality tests hold to no spills (``configs.conv_tile_candidates``:
3x3 convolutions at most 4 warps) x BLOCK_K x pipeline stages, within the architecture's shared memory.
All of them are compiled first, in parallel (``fused_resnet kernels``' ahead-of-time compile fills
Triton's cache), then each seed layer's inference convolution (K1: folded BN + ReLU) is timed under
every candidate, interleaved with the current choice (the table's entry, else the heuristic's): on a
GPU as CUDA-graph replays of 24 calls over 4 input copies (``bench.graph_time_ms``: kernel time alone;
the second GPU run timed with events per call and measured only the host, ~50 us a call for every
candidate). An entry is printed only where a candidate beats it by more than ``--margin`` (default
3%): elsewhere the current choice stays. Every entry committed is run under the interpreter by the
tests (``reachable_conv_configs``).
"""

import argparse
import datetime
import itertools
import json
import os
import statistics
import sys
import time

import torch


def candidates(dtype: torch.dtype, shared_limit: int, smoke: bool):
    from fused_resnet.backends.triton import configs

    out = []
    for (bm, bn, warps), bk, stages in itertools.product(configs.conv_tile_candidates(3, dtype), (32, 64),
                                                         (2, 3, 4)):
        cfg = configs.ConvConfig(bm, bn, bk, 8, warps, stages)
        if cfg.shared_bytes(dtype) <= shared_limit:
            out.append(cfg)
    return out[:2] if smoke else out


def layers(batch: int, smoke: bool):
    """(in_channels, out_channels, input size, stride) of the seed's 3x3 convolutions."""
    from fused_resnet.cases import SEED_STAGES_224

    if smoke:
        return [(16, 16, 8, 1)]
    out = []
    for c, size in SEED_STAGES_224:
        out.append((c, c, size, 1))
        if c > 64:
            out.append((c // 2, c, size * 2, 2))
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--json", default=None, help="write the measurements and entries here")
    parser.add_argument("--budget-s", type=float, default=600.0, help="stop timing new layers after this")
    parser.add_argument("--margin", type=float, default=0.03, help="a candidate must beat the current choice by this")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per layer")
    parser.add_argument("--jobs", type=int, default=min(16, os.cpu_count() or 1), help="parallel compiles")
    parser.add_argument("--mode", default="eval", choices=["eval", "train"],
                        help="the convolution timed: eval's K1 (folded BN + ReLU in the epilogue), or training's "
                             "K2 (BN + ReLU of the input in the prologue, batch statistics in the epilogue), "
                             "each with its own entries in the table")
    parser.add_argument("--smoke", action="store_true", help="CPU under the Triton interpreter: one tiny layer, "
                                                             "two candidates (the mechanics, not the timings)")
    args = parser.parse_args()
    start = time.time()
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("--smoke runs under the Triton interpreter: set TRITON_INTERPRET=1")
            return 1
        device, dtype, batch, iters = "cpu", torch.float32, 1, 2
    else:
        if not torch.cuda.is_available():
            print("tune_conv needs a CUDA GPU (or --smoke on the CPU)")
            return 1
        device, dtype, batch, iters = "cuda", getattr(torch, args.dtype), args.batch, 20
    from fused_resnet.backends import get_backend
    from fused_resnet.backends.triton import configs, launch
    from fused_resnet.bench import graph_time_ms, time_step

    model = configs.device_model(torch.device(device))
    be = get_backend("triton")
    cands = candidates(dtype, model.shared_bytes, args.smoke)
    problems = []
    for cin, cout, size, stride in layers(batch, args.smoke):
        # input copies to rotate through, so repeated calls do not all hit L2
        x = [torch.randn(batch, cin, size, size, device=device, dtype=dtype).contiguous(
            memory_format=torch.channels_last) for _ in range(1 if args.smoke else 4)]
        w = (torch.randn(cout, cin, 3, 3, device=device, dtype=dtype) / (3 * cin ** 0.5)).contiguous(
            memory_format=torch.channels_last)
        bn = tuple(torch.rand(cout, device=device) + 0.5 for _ in range(4)) + (1e-5,)
        p = (size - 1) // stride + 1
        problems.append(((cin, cout, p * p, 3, dtype), x, w, bn, stride))

    def conv(x, w, bn, stride):
        if args.mode == "train":  # bn's first three as the input's (mean, scale, shift): the prologue
            return be.conv_fused(x, w, None, stride=stride, padding=1, in_mean=bn[0][:x.shape[1]],
                                 in_scale=bn[1][:x.shape[1]], in_shift=bn[2][:x.shape[1]], stats=True).out
        return be.conv_fused(x, w, None, stride=stride, padding=1, bn=bn, relu=True).out

    # Every (layer, candidate) variant compiled ahead for this architecture, in parallel, into Triton's
    # cache (with --smoke too: the compile is real, for the modelled sm_90, and must not fail).
    from fused_resnet.kernel_report import compile_all
    with launch.recording(execute=False) as rec:
        for _, x, w, bn, stride in problems:
            for cfg in cands:
                with configs.forced_conv_config(cfg):
                    conv(x[0], w, bn, stride)
    specs = [s.to_json() for s in rec.specs]
    failed = [r["error"] for r in compile_all(specs, model.arch, args.jobs) if "error" in r]
    print(f"compiled {len(specs)} variants ahead for sm_{model.arch} in {time.time() - start:.0f} s, "
          f"{len(failed)} failed" + (f": {failed[0]}" if failed else ""), flush=True)
    if failed and args.smoke:
        return 1

    results, entries = [], []
    training = args.mode == "train"
    for key, x, w, bn, stride in problems:
        if time.time() - start > args.budget_s:
            print(f"budget spent: {key[:3]} and later layers not tuned")
            break
        # the configuration a launch takes today: the table's entry if any, else the heuristic's
        current = configs.conv_config(key[0], key[1], batch * key[2], key[2], 3, dtype, model, training)
        times = {}
        for _ in range(args.rounds):
            for cfg in [None] + cands:
                with configs.forced_conv_config(cfg or current):
                    try:
                        if args.smoke:  # the interpreter: a host clock around each call
                            ms = time_step(lambda _: conv(x[0], w, bn, stride), [None], device, warmup=1,
                                           iters=iters).median_ms
                        else:
                            ms = graph_time_ms(lambda i: conv(x[i % len(x)], w, bn, stride))
                    except Exception as exc:  # a candidate this GPU cannot run (resources)
                        print(f"  {key[:3]} {cfg}: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}")
                        ms = float("inf")
                times.setdefault(cfg, []).append(ms)
        med = {cfg: statistics.median(v) for cfg, v in times.items()}
        base = med.pop(None)
        best_cfg = min(med, key=med.get)
        best = med[best_cfg]
        keep = best < base * (1 - args.margin) and best_cfg != current
        line = (f"{key[0]}->{key[1]} {int(key[2] ** 0.5)}x{int(key[2] ** 0.5)} stride {stride}: current "
                f"{current} {base:.3f} ms; best {best_cfg} {best:.3f} ms ({base / best:.2f}x)"
                + ("" if keep else " -- kept"))
        print(line, flush=True)
        results.append({"key": [*key[:4], str(dtype)], "current": str(current), "current_ms": base,
                        "best": str(best_cfg), "best_ms": best, "entry": keep})
        if keep:
            entries.append((key, best_cfg, best, base))
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter: timings meaningless)"
    print(f"\n# {name} (sm_{model.arch}), torch {torch.__version__}, triton "
          f"{__import__('triton').__version__}, {datetime.date.today()}, batch {batch}, channels_last, "
          f"{args.mode} convolution, {len(entries)} of {len(results)} layers beat the current choice")
    dt = str(dtype).removeprefix("torch.")
    for (cin, c, pq, k, _), cfg, ms, base in entries:
        print(f"    ({cin}, {c}, {pq}, {k}, torch.{dt}, {model.arch}, {training}): ConvConfig({cfg.BLOCK_M}, {cfg.BLOCK_N}, "
              f"{cfg.BLOCK_K}, {cfg.GROUP_M}, {cfg.num_warps}, {cfg.num_stages}),  # {ms:.3f} ms, was {base:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "arch": model.arch, "batch": batch, "dtype": dt, "mode": args.mode,
                       "layers": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
