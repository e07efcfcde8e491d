"""A small fused forward and backward for compute-sanitizer (memcheck): every backend that runs on
the GPU, identity and 1x1-stride-2 blocks, eval and train, channels_last (the CUDA conv's cp.async
loop: channels fill whole 16-byte vectors) and NCHW (its strided-gather loop). Exits non-zero if an
output is not finite.

    compute-sanitizer --tool memcheck python benchmarks/sanitize_case.py
"""

import sys

import torch

import fused_resnet
from fused_resnet.testing import randomize_


def main() -> int:
    bad = 0
    for backend in fused_resnet.available_backends():
        for (use_1x1, cin, cout, stride), fmt in [(b, f) for b in ((False, 16, 16, 1), (True, 16, 32, 2))
                                                  for f in (torch.channels_last, torch.contiguous_format)]:
            blk = randomize_(fused_resnet.Residual(cin, cout, use_1x1, stride, backend=backend)).cuda()
            blk = blk.to(memory_format=fmt)
            for train in (False, True):
                be = fused_resnet.backends.get_backend(backend)
                if be.supports("cuda", torch.float16, train) is not None:
                    continue
                blk.train(train).half()
                x = torch.randn(2, cin, 9, 11, device="cuda", dtype=torch.float16, requires_grad=True)
                out = blk(x.contiguous(memory_format=fmt))
                out.float().square().sum().backward()
                torch.cuda.synchronize()
                ok = torch.isfinite(out).all().item() and torch.isfinite(x.grad).all().item()
                layout = "nhwc" if fmt == torch.channels_last else "nchw"
                print(f"{backend:>7} {'1x1' if use_1x1 else 'id':>3} {layout} {'train' if train else 'eval':>5}: "
                      f"{'ok' if ok else 'NOT FINITE'}")
                bad += not ok
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
