"""One rank of the synchronized batch-norm tests (tests/test_distributed.py): spawned processes on gloo.

Each rank trains its slice of one global batch for two SGD steps with every fused backend, then runs
eval, and saves what it saw. The test compares each rank's results with one process training the plain
model on the whole batch in float64.
"""

from __future__ import annotations

import copy
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

import fused_resnet  # noqa: E402
from fused_resnet import reference  # noqa: E402
from fused_resnet.testing import randomize_  # noqa: E402

LR = 0.1
CHANNELS = 4


def tiny_model(channels: int = CHANNELS) -> nn.Module:
    """The chapter's blocks (identity and 1x1 stride 2) and torchvision's Bottleneck with its downsample:
    every batch norm the fused composition synchronizes (chain BNs, the shortcut's)."""
    torch.manual_seed(0)
    return randomize_(nn.Sequential(reference.Residual(channels, channels), reference.Residual(channels, 8, True, 2),
                                    reference.bottleneck_block(8, 2, 2, downsample=True)))


def global_batch(sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch (inputs, output gradients): rank r takes rows sum(sizes[:r]) ... of each."""
    gen = torch.Generator().manual_seed(1)
    n = sum(sizes)
    return (torch.randn(n, CHANNELS, 8, 8, generator=gen, dtype=torch.float64),
            torch.randn(n, 8, 2, 2, generator=gen, dtype=torch.float64))


def train(model: nn.Module, x: torch.Tensor, g: torch.Tensor, average=None) -> dict:
    """Two SGD steps on the loss sum(out * g), then an eval forward: outputs, input gradients, parameter
    gradients (after ``average``, if given) and buffers after each step."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    record: dict = {}
    model.train()
    for step in range(2):
        opt.zero_grad()
        xi = x.clone().requires_grad_()
        out = model(xi)
        (out * g).sum().backward()
        if average is not None:
            average(model)
        module = getattr(model, "module", getattr(model, "_orig_mod", model))  # under DDP, or compiled
        record[f"{step} output"] = out.detach().clone()
        record[f"{step} grad input"] = xi.grad.clone()
        for name, p in module.named_parameters():
            record[f"{step} grad {name}"] = p.grad.clone()
        opt.step()
        for name, b in module.named_buffers():
            record[f"{step} {name}"] = b.clone()
    model.eval()
    with torch.no_grad():
        record["eval output"] = model(x).clone()
    return record


def _average_by_hand(model: nn.Module) -> None:
    world = dist.get_world_size()
    for p in model.parameters():
        dist.all_reduce(p.grad)
        p.grad /= world


def run(rank: int, world: int, init_file: str, sizes: list[int], mode: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        if mode == "errors":
            _errors(rank)
            return
        if mode == "compile":
            _compiled(rank, sizes, out_dir)
            return
        x, g = global_batch(sizes)
        lo = sum(sizes[:rank])
        x, g = x[lo:lo + sizes[rank]].float(), g[lo:lo + sizes[rank]].float()
        for backend in fused_resnet.available_backends():
            be = fused_resnet.backends.get_backend(backend)
            if be.supports("cpu", torch.float32, True) is not None:
                continue
            if mode == "keyword":  # BatchNorm2d children, sync by the keyword, gradients averaged by DDP
                model = fused_resnet.convert(tiny_model(), backend=backend, sync_batchnorm=True)
                record = train(nn.parallel.DistributedDataParallel(model), x, g)
            else:  # nn.SyncBatchNorm children (before conversion and after), gradients averaged by hand
                model = tiny_model()
                if mode == "syncbn-before":
                    model = fused_resnet.convert(nn.SyncBatchNorm.convert_sync_batchnorm(model), backend=backend)
                else:
                    model = nn.SyncBatchNorm.convert_sync_batchnorm(fused_resnet.convert(model, backend=backend))
                assert sum(isinstance(m, nn.SyncBatchNorm) for m in model.modules()) == 8
                record = train(model, x, g, average=_average_by_hand)
            torch.save(record, os.path.join(out_dir, f"{backend}-rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _errors(rank: int) -> None:
    """Bad use gets a clear error: a process group this rank is not in; different channel counts."""
    only_zero = dist.new_group([0])
    model = fused_resnet.convert(tiny_model(), backend="torch", sync_batchnorm=True, process_group=only_zero)
    x = torch.randn(2, CHANNELS, 8, 8)
    if rank == 1:
        try:
            model(x)
        except RuntimeError as exc:
            assert "not a member" in str(exc), exc
        else:
            raise AssertionError("a rank outside the process group trained without an error")
    else:
        model(x)  # a group of one: nothing to synchronize
    mismatched = fused_resnet.convert(tiny_model(CHANNELS + 2 * rank), backend="torch", sync_batchnorm=True)
    try:
        mismatched(torch.randn(2, CHANNELS + 2 * rank, 8, 8))
    except RuntimeError as exc:
        assert "different channel counts" in str(exc), exc
    else:
        raise AssertionError("ranks with different channel counts synchronized without an error")


def _compiled(rank: int, sizes: list[int], out_dir: str) -> None:
    """torch.compile(fullgraph=True) of a synchronized model: the collectives trace (dynamo turns them into
    functional collectives); same results as eager."""
    x, g = global_batch(sizes)
    lo = sum(sizes[:rank])
    x, g = x[lo:lo + sizes[rank]].float(), g[lo:lo + sizes[rank]].float()
    eager = train(fused_resnet.convert(tiny_model(), backend="torch", sync_batchnorm=True), x, g)
    compiled = train(torch.compile(fused_resnet.convert(tiny_model(), backend="torch", sync_batchnorm=True),
                                   fullgraph=True, backend="aot_eager"), x, g)
    torch.save({"eager": eager, "compiled": compiled}, os.path.join(out_dir, f"compile-rank{rank}.pt"))
