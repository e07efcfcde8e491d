"""Tune the Triton convolution's tile configuration for the seed's shapes on this GPU, and print the
entries for ``TUNED_CONV`` in fused_resnet/backends/triton/configs.py (with the GPU and date beside).

    python benchmarks/tune_conv.py [--dtype bfloat16] [--batch 64]

Each candidate is installed in the table, the fused convolution of each seed layer (K1: conv1 with
folded BN; K2: conv2 with the residual or the 1x1 shortcut) is timed with CUDA events over rotating
inputs, and the fastest candidate per key is kept.
"""

import argparse
import datetime
import itertools
import sys

import torch


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("tune_conv needs a CUDA GPU")
        return 1
    from fused_resnet.backends import get_backend
    from fused_resnet.backends.triton import configs
    from fused_resnet.bench import time_step
    from fused_resnet.cases import SEED_STAGES_224

    dtype = getattr(torch, args.dtype)
    be = get_backend("triton")
    candidates = [configs.ConvConfig(bm, bn, bk, 8, w, s)
                  for bm, bn, bk, w, s in itertools.product((64, 128), (64, 128), (32, 64), (4, 8), (3, 4))
                  if not (bm == 64 and bn == 64 and w == 8)]
    entries = []
    for c, size in SEED_STAGES_224:
        for cin, stride in ((c, 1), (c // 2, 2)) if c > 64 else ((c, 1),):
            x = torch.randn(args.batch, cin, size * stride, size * stride, device="cuda", dtype=dtype)
            x = x.contiguous(memory_format=torch.channels_last)
            w = torch.randn(c, cin, 3, 3, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
            p = (x.shape[2] - 1) // stride + 1
            key = (cin, c, p * p, 3, dtype)
            best = None
            for cfg in candidates:
                configs.TUNED_CONV[key] = cfg
                try:
                    ms = time_step(lambda _: be.conv_fused(x, w, None, stride=stride, padding=1, relu=True),
                                   [None], "cuda", warmup=3, iters=20).median_ms
                except Exception as exc:  # a configuration this GPU cannot compile (shared memory, registers)
                    print(f"  {key[:3]} {cfg}: {type(exc).__name__}")
                    continue
                if best is None or ms < best[0]:
                    best = (ms, cfg)
            configs.TUNED_CONV[key] = best[1]
            entries.append((key, best))
            print(f"{cin}->{c} {p}x{p} stride {stride}: {best[0]:.3f} ms with {best[1]}", flush=True)
    print(f"\n# {torch.cuda.get_device_name()}, torch {torch.__version__}, {datetime.date.today()}, batch "
          f"{args.batch}, channels_last")
    for (cin, c, pq, k, dt), (ms, cfg) in entries:
        print(f"    ({cin}, {c}, {pq}, {k}, torch.{args.dtype}): ConvConfig({cfg.BLOCK_M}, {cfg.BLOCK_N}, "
              f"{cfg.BLOCK_K}, {cfg.GROUP_M}, {cfg.num_warps}, {cfg.num_stages}),  # {ms:.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
