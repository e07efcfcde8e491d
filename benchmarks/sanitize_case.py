"""Small fused forward and backward passes for compute-sanitizer: identity and 1x1-stride-2 blocks, eval
and train, channels_last (the CUDA conv's cp.async loop: channels fill whole 16-byte vectors) and NCHW
(its strided-gather loop), fp16. Exits non-zero if an output or gradient is not finite.

    compute-sanitizer --tool memcheck python -m benchmarks.sanitize_case --backends cuda,triton
    compute-sanitizer --tool racecheck python -m benchmarks.sanitize_case --backends cuda --one-conv
    python -m benchmarks.sanitize_case --device cpu --backends cpp     # the script itself (CI's dry run)

``--one-conv`` runs a single CUDA ``conv_fused`` launch (racecheck is slow: one launch is its budget).
Run once without the sanitizer first, so the Triton kernels are compiled (and cached) outside it.
"""

import argparse
import sys

import torch

import fused_resnet
from fused_resnet.testing import randomize_


def one_conv() -> int:
    from fused_resnet.backends import get_backend
    x = torch.randn(2, 16, 9, 11, device="cuda", dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    w = torch.randn(16, 16, 3, 3, device="cuda", dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    out = get_backend("cuda").conv_fused(x, w, None, stride=1, padding=1, relu=True, stats=True).out
    torch.cuda.synchronize()
    ok = torch.isfinite(out).all().item()
    print(f"one CUDA conv_fused launch: {'ok' if ok else 'NOT FINITE'}")
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backends", default=",".join(fused_resnet.available_backends()))
    parser.add_argument("--one-conv", action="store_true")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu: float32, no sanitizer (proves the script, not the kernels)")
    args = parser.parse_args()
    if args.one_conv:
        return one_conv()
    bad = 0
    dev = args.device
    dtype = torch.float16 if dev == "cuda" else torch.float32
    backends = [b for b in args.backends.split(",") if b in fused_resnet.available_backends()]
    for backend in backends:
        for (use_1x1, cin, cout, stride), fmt in [(b, f) for b in ((False, 16, 16, 1), (True, 16, 32, 2))
                                                  for f in (torch.channels_last, torch.contiguous_format)]:
            blk = randomize_(fused_resnet.Residual(cin, cout, use_1x1, stride, backend=backend)).to(dev)
            blk = blk.to(memory_format=fmt)
            for train in (False, True):
                be = fused_resnet.backends.get_backend(backend)
                if be.supports(dev, dtype, train) is not None:
                    continue
                blk.train(train).to(dtype)
                x = torch.randn(2, cin, 9, 11, device=dev, dtype=dtype, requires_grad=True)
                out = blk(x.contiguous(memory_format=fmt))
                out.float().square().sum().backward()
                if dev == "cuda":
                    torch.cuda.synchronize()
                ok = torch.isfinite(out).all().item() and torch.isfinite(x.grad).all().item()
                layout = "nhwc" if fmt == torch.channels_last else "nchw"
                print(f"{backend:>7} {'1x1' if use_1x1 else 'id':>3} {layout} {'train' if train else 'eval':>5}: "
                      f"{'ok' if ok else 'NOT FINITE'}")
                bad += not ok
    if not backends:
        print(f"none of {args.backends} is available here")
        return 1
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
