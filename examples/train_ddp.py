"""Data-parallel training with fused blocks and synchronized batch norm, one process per device.

    torchrun --nproc-per-node 2 examples/train_ddp.py                        # CPU processes: gloo
    torchrun --nproc-per-node 8 examples/train_ddp.py --device cuda --model resnet50 --size 224 --batch 64

The model (the chapter's ResNet-18, or torchvision's ResNet-50 structure built by the package) is
converted with ``sync_batchnorm=True``: in training each fused block normalises with the statistics of
the global batch (one all_gather per batch norm forward, one all_reduce backward) while its batch norms
stay ``BatchNorm2d``, which DDP accepts on any device. The keyword covers the fused blocks; the stem's
batch norm is PyTorch's own, so on GPUs the example also applies ``nn.SyncBatchNorm.
convert_sync_batchnorm`` (the fused blocks synchronize over a SyncBatchNorm's group as well), and on
CPUs, where PyTorch's SyncBatchNorm does not run, the stem normalises per process. The data is a
synthetic task that a ResNet learns in a few dozen steps (a bright square whose position is the class),
each process drawing its own batches. At the end every process checks that the synchronized running
statistics are the other processes', bit for bit.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
from torch import nn

import fused_resnet
from fused_resnet import reference


def batch(n: int, channels: int, size: int, classes: int, gen: torch.Generator, device: str):
    """Noise images with a bright square whose grid position is the label."""
    labels = torch.randint(0, classes, (n,), generator=gen)
    x = 0.5 * torch.randn(n, channels, size, size, generator=gen)
    cells = int(classes ** 0.5 + 0.999)
    step = size // cells
    for i, c in enumerate(labels.tolist()):
        r, q = divmod(c, cells)
        x[i, :, r * step:(r + 1) * step, q * step:(q + 1) * step] += 2.0
    return x.to(device), labels.to(device)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", default="resnet18", choices=["resnet18", "resnet50"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8, help="images per process and step")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--backend", default="auto", help="the fused backend (auto: the fastest here)")
    args = parser.parse_args()

    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = args.device
    if device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    torch.manual_seed(0)  # the same initial weights on every process (DDP also broadcasts rank 0's)
    classes, channels = (10, 1) if args.model == "resnet18" else (16, 3)
    model = reference.resnet18(channels, classes) if args.model == "resnet18" else reference.resnet50(classes)
    model = fused_resnet.convert(model, backend=args.backend, sync_batchnorm=True)
    if args.device == "cuda":  # the stem's batch norm too (PyTorch's SyncBatchNorm runs on GPUs only)
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device=device, memory_format=torch.channels_last)
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[torch.cuda.current_device()]
                                              if args.device == "cuda" else None)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(1000 + rank)  # each process its own data
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        x, y = batch(args.batch, channels, args.size, classes, gen, device)
        loss = nn.functional.cross_entropy(ddp(x.contiguous(memory_format=torch.channels_last)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if rank == 0 and (step % 10 == 0 or step == 1 or step == args.steps):
            seconds = time.perf_counter() - start
            print(f"step {step:4d}  loss {loss.item():.4f}  {step * args.batch * world / seconds:8.1f} images/s "
                  f"({world} processes)", flush=True)

    # Synchronized batch norm: every process holds the same running statistics (the fused blocks', and on
    # GPUs every batch norm's).
    synced = [m for m in model.modules() if isinstance(m, (fused_resnet.Residual, fused_resnet.FusedBlock))
              or isinstance(m, nn.SyncBatchNorm)]
    stats = torch.cat([b.flatten().float() for m in synced for n, b in m.named_buffers() if "running" in n])
    gathered = [torch.empty_like(stats) for _ in range(world)]
    dist.all_gather(gathered, stats)
    same = all(torch.equal(g, gathered[0]) for g in gathered)
    if rank == 0:
        print(f"running statistics identical on all {world} processes: {same}")
    dist.destroy_process_group()
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
