"""The sub-commands behind ``python -m fused_resnet``."""

from __future__ import annotations

import argparse
import copy
import sys
import time
from typing import Optional, Sequence

import torch

from . import reference
from .backends import available_backends, get_backend
from .modules import convert, resnet18
from .testing import compare_models, randomize_

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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
    print(f"\nFused ResNet-18 vs the seed reference in float64 (relative errors; bound = max(2 x eager's "
          f"error, floor)), input {tuple(x.shape)}:")
    header = f"{'backend':>8} {'mode':>6} {'checks':>6} {'output':>10} {'worst':>10} {'bound':>10}  worst quantity"
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
        print(f"{name:>8} {'train' if train else 'eval':>6} {len(checks):>6} {out.fused_err:>10.2e} "
              f"{worst.fused_err:>10.2e} {worst.bound:>10.2e}  {worst.name}  {verdict} "
              f"[{time.perf_counter() - start:.1f}s]")
        for c in bad:
            print(f"{'':>16} FAIL {c.name}: {c.fused_err:.3e} > {c.bound:.3e} (eager {c.eager_err:.3e})")
    print("\nall checks passed" if not failed else f"\n{failed} checks failed")
    return 0 if not failed else 1


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
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = parser._subparsers._group_actions[0].choices  # check is the default sub-command
    if not argv or (argv[0] not in commands and argv[0] not in ("-h", "--help")):
        argv = ["check", *argv]
    args = parser.parse_args(argv)
    return args.func(args)
