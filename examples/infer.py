"""Inference with a converted model, timed against eager.

    python examples/infer.py                                   # the chapter's ResNet-18, this machine's device
    python examples/infer.py --model resnet50 --batch 64 --size 224 --device cuda --dtype bfloat16

``fused_resnet.convert`` swaps the model's residual blocks for fused ones that share its parameters; in
eval mode each block is one fused convolution per chain convolution (batch norm folded in). The script
checks that the outputs agree and prints the time per batch of each (the median of timed calls after a
warm-up; CUDA events on a GPU) and the speedup.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import fused_resnet
from fused_resnet import reference
from fused_resnet.testing import randomize_, rel_err


def time_ms(model, x, iters: int, device: str) -> float:
    with torch.no_grad():
        for _ in range(3):
            model(x)
        times = []
        for _ in range(iters):
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                model(x)
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                model(x)
                times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18", choices=["resnet18", "resnet50"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    eager = randomize_(reference.resnet18() if args.model == "resnet18" else reference.resnet50())
    eager = eager.to(device=args.device, dtype=dtype, memory_format=torch.channels_last).eval()
    fused = fused_resnet.convert(copy.deepcopy(eager), backend=args.backend)
    channels = 1 if args.model == "resnet18" else 3
    x = torch.randn(args.batch, channels, args.size, args.size, device=args.device, dtype=dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        err = rel_err(fused(x), eager(x))
    blocks = sum(isinstance(m, (fused_resnet.Residual, fused_resnet.FusedBlock)) for m in fused.modules())
    print(f"{args.model}, {blocks} fused blocks, input {tuple(x.shape)} {args.dtype} channels_last on {args.device}; "
          f"outputs differ from eager by {err:.1e} (relative)")
    t_eager, t_fused = time_ms(eager, x, args.iters, args.device), time_ms(fused, x, args.iters, args.device)
    print(f"eager {t_eager:.2f} ms/batch, fused {t_fused:.2f} ms/batch: {t_eager / t_fused:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
