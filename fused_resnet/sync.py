"""Synchronized batch norm across processes (DESIGN.md section 4b), on torch.distributed.

A fused block synchronizes a batch norm's statistics when it was converted with ``sync_batchnorm=True``
(over ``process_group``, default the world) or when that batch norm is an ``nn.SyncBatchNorm`` (over its
own ``process_group``). Forward: the BN's per-tile partials are merged locally into one (mean, M2, count)
per channel, exchanged with one ``all_gather`` per BN and merged in rank order by the usual finalize
(Chan's formula: deterministic, exact for unequal per-rank batches), so the running statistics take the
global count. Backward: the per-channel sums of the BN backward are all-reduced, one collective per BN.
Eval mode never communicates; without an initialised process group, or in a group of one process, the
block runs the unsynchronized path, bit for bit. Gloo on CPUs, NCCL on GPUs: any torch.distributed
backend with all_gather and all_reduce.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["SyncGroup", "group_of", "gather_partials", "all_reduce_sums"]


class SyncGroup:
    """Which process group a block's batch norms synchronize over (``None``: the default group, the
    world). A holder, so that copying a model shares the group (a ProcessGroup cannot be copied) and
    pickling keeps the world (a custom group cannot be pickled: convert again after loading)."""

    def __init__(self, group: Optional[object] = None):
        self.group = group

    def __deepcopy__(self, memo) -> "SyncGroup":
        return self

    def __reduce__(self):
        if self.group is not None:
            raise TypeError("a block synchronized over a custom process group cannot be pickled: save the "
                            "state_dict, or convert(..., sync_batchnorm=True, process_group=...) after loading")
        return (SyncGroup, ())

    def __repr__(self) -> str:
        return "SyncGroup(world)" if self.group is None else f"SyncGroup({self.group!r})"


def group_of(bn: Optional[nn.Module], block: nn.Module) -> Optional[object]:
    """The process group ``bn`` synchronizes over in this call, or None when it does not: not training,
    not asked to, no initialised process group, or a group of one process. Raises when this process is
    not a member of the group it was asked to synchronize over."""
    if bn is None or not bn.training:
        return None
    if isinstance(bn, nn.SyncBatchNorm):
        group = bn.process_group
    else:
        spec = getattr(block, "sync_batchnorm", None)
        if spec is None:
            return None
        group = spec.group
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = group if group is not None else dist.group.WORLD
    if dist.get_rank(group) < 0:
        raise RuntimeError(f"{getattr(block, 'kind', type(block).__name__)}: sync_batchnorm over a process group "
                           f"this process (global rank {dist.get_rank()}) is not a member of")
    return group if dist.get_world_size(group) > 1 else None


_CHECKED: set[tuple] = set()


def _check_channels(channels: int, group, device: torch.device) -> None:
    """Once per (group, channel count): every rank must synchronize the same number of channels (a
    mismatch would otherwise fail inside the collective, or hang)."""
    key = (id(group), channels)
    if key in _CHECKED or torch.compiler.is_compiling():  # checked by the first eager call, or not at all
        return
    mine = torch.tensor([channels], dtype=torch.int64, device=device)
    theirs = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(theirs, mine, group=group)
    counts = [int(t.item()) for t in theirs]
    if len(set(counts)) != 1:
        raise RuntimeError(f"sync_batchnorm: the ranks synchronize batch norms of different channel counts "
                           f"{counts} (rank order): every rank must run the same model")
    _CHECKED.add(key)


def gather_partials(mean: Tensor, m2: Tensor, count: Tensor, group) -> tuple[Tensor, Tensor, Tensor]:
    """Exchange each rank's merged (mean (C,), M2 (C,), count (1,)) with one all_gather; returns them as
    per-rank partials (W, C), (W, C), (W,) in rank order, for the usual finalize to merge."""
    c = mean.shape[0]
    _check_channels(c, group, mean.device)
    payload = torch.cat([mean.float(), m2.float(), count.float().reshape(1)])
    gathered = [torch.empty_like(payload) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, payload, group=group)
    parts = torch.stack(gathered)
    return parts[:, :c].contiguous(), parts[:, c:2 * c].contiguous(), parts[:, 2 * c].contiguous()


def all_reduce_sums(sum_g: Tensor, sum_gx: Tensor, group) -> tuple[Tensor, Tensor]:
    """The per-channel backward sums over every rank's positions: one all_reduce of both."""
    c = sum_g.shape[0]
    both = torch.cat([sum_g, sum_gx])
    dist.all_reduce(both, op=dist.ReduceOp.SUM, group=group)
    return both[:c], both[c:]
