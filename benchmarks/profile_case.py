"""One step of the head shape (the seed's 56x56x64 block, bf16 channels_last; ``--shape`` another identity
block) per backend and mode, inside the CUDA profiler's range, for Nsight Compute (gpu_run.sh's ncu step):

    ncu --clock-control none --profile-from-start off --set basic --print-summary per-kernel \
        python -m benchmarks.profile_case --backends eager,triton,cuda
    python -m benchmarks.profile_case --device cpu --backends cpp      # the script itself (CI's dry run)

Each block runs a few warm-up steps first (Triton compiles, cuDNN picks its algorithms) outside the
range; NVTX ranges name the backend and mode of the kernels that follow.
"""

import argparse
import copy
import sys

import torch

import fused_resnet
from fused_resnet import reference
from fused_resnet.testing import randomize_


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backends", default="eager,triton,cuda",
                        help="eager (the seed's modules) and fused backend names")
    parser.add_argument("--modes", default="eval,train")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--shape", default="64,56", help="channels,size of an identity block (default the head "
                                                         "shape; e.g. 512,7 for the last stage)")
    parser.add_argument("--iters", type=int, default=1, help="profiled steps per backend and mode")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu: float32 NCHW at 16x16, no profiler (proves the script)")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("profile_case needs a CUDA GPU (or --device cpu)")
        return 1
    dtype = torch.bfloat16 if cuda else torch.float32
    fmt = torch.channels_last if cuda else torch.contiguous_format
    channels, size = (int(v) for v in args.shape.split(","))
    size = size if cuda else min(size, 16)
    torch.manual_seed(0)
    seed = randomize_(reference.Residual(channels, channels)).to(args.device, dtype).to(memory_format=fmt)
    x = torch.randn(args.batch, channels, size, size, device=args.device, dtype=dtype).contiguous(
        memory_format=fmt)
    ran = 0
    for name in args.backends.split(","):
        if name != "eager" and name not in fused_resnet.available_backends():
            print(f"{name}: not available here, skipped")
            continue
        block = seed if name == "eager" else fused_resnet.convert(copy.deepcopy(seed), backend=name)
        for mode in args.modes.split(","):
            block.train(mode == "train")

            def step():
                xi = x.detach().requires_grad_(mode == "train")
                with torch.set_grad_enabled(mode == "train"):
                    out = block(xi)
                    if mode == "train":
                        out.backward(torch.ones_like(out))
                return out

            for _ in range(3):
                step()
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.profiler.start()
            for _ in range(args.iters):
                if cuda:
                    torch.cuda.nvtx.range_push(f"{name} {mode}")
                out = step()
                if cuda:
                    torch.cuda.nvtx.range_pop()
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.profiler.stop()
            ok = bool(torch.isfinite(out).all())
            print(f"{name} {mode}: {'ok' if ok else 'NOT FINITE'}")
            ran += ok
    return 0 if ran else 1


if __name__ == "__main__":
    sys.exit(main())
