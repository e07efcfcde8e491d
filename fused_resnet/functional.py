"""The residual block family as one composition of backend primitives (DESIGN.md sections 1b, 3, 4).

A block is ``out = relu(chain(X) + shortcut(X))``: a chain of convolutions, each followed by batch norm
and, all but the last, ReLU; and a shortcut that is X itself or a strided 1x1 convolution with an
optional bias and an optional batch norm. The seed's ``Residual`` and torchvision's ``BasicBlock`` and
``Bottleneck`` are instances (``BlockLayout``). Autograd lives here, once, for every backend:

- inference (no gradient needed): one fused convolution per chain convolution, each batch norm folded
  in its epilogue; the last also computes the shortcut (its batch norm folded into its weights), the add
  and the ReLU. The seed block and BasicBlock are 2 launches, Bottleneck 3;
- training, or eval mode with gradients (fine-tuning with frozen BN): each convolution's epilogue takes
  its batch statistics, each BN + ReLU is the next convolution's prologue, the last convolution's kernel
  also computes the shortcut convolution (and its statistics when a BN follows), and one final kernel
  applies the last BN, the shortcut's BN, the add and the ReLU. One autograd node per convolution (and
  one for the output), so weight gradients are accumulated one at a time, as in eager;
- auto's seed route: the block's own modules in eager PyTorch, where that was measured fastest.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from .backends import Backend, BNFold, get_backend, resolve_backend
from .backends.packing import capturing
from . import sync
from . import profiling
from .profiling import stage

__all__ = ["BlockLayout", "block_forward", "check_input", "eager_forward"]

# FUSED_RESNET_BLOCK_NODE=0: training always takes the three Python autograd Functions, never the C++
# composition (an A/B of the two on one machine: gpu_run.sh's host step; a way around it, should it fail).
BLOCK_NODE = os.environ.get("FUSED_RESNET_BLOCK_NODE", "1") != "0"


@dataclass(frozen=True)
class BlockLayout:
    """Which submodules make a block: ``chain`` the (conv, bn) paths in order, ``shortcut`` the (conv,
    bn-or-None) paths of the shortcut, or None for the identity. Paths may be dotted
    (``"downsample.0"``)."""

    chain: tuple[tuple[str, str], ...]
    shortcut: Optional[tuple[str, Optional[str]]] = None

    def resolve(self, block: nn.Module):
        """The submodules, looked up by name on every call (a submodule replaced after conversion, as
        ``nn.SyncBatchNorm.convert_sync_batchnorm`` does, is seen), straight from ``_modules``: this runs
        on every block call."""
        paths = _PATHS.get(self)
        if paths is None:
            paths = _PATHS[self] = (tuple((c.split("."), b.split(".")) for c, b in self.chain),
                                    (self.shortcut[0].split("."), self.shortcut[1].split(".")
                                     if self.shortcut[1] is not None else None) if self.shortcut else None)
        chain = [(_sub(block, c), _sub(block, b)) for c, b in paths[0]]
        if paths[1] is None:
            return chain, None
        conv, bn = paths[1]
        return chain, (_sub(block, conv), _sub(block, bn) if bn is not None else None)


_PATHS: dict[BlockLayout, tuple] = {}


def _sub(block: nn.Module, names: list[str]) -> nn.Module:
    for name in names:
        block = block._modules[name]
    return block


def _out_size(size: int, conv: nn.Conv2d, axis: int) -> int:
    return (size + 2 * conv.padding[axis] - conv.kernel_size[axis]) // conv.stride[axis] + 1


def check_input(block: nn.Module, chain: list, x: Tensor, synced: frozenset = frozenset()) -> None:
    """Raise a clear error for an input the block cannot take, as ``nn.Conv2d``/``BatchNorm2d`` would
    (a batch norm in ``synced`` counts every process's values, as SyncBatchNorm does)."""
    conv = chain[0][0]
    weight = conv._parameters["weight"]
    if isinstance(x, Tensor):  # the common case, in a few comparisons: this runs on every block call
        s = x.shape
        if (len(s) == 4 and s[1] == conv.in_channels and s[2] >= 3 and s[3] >= 3 and x.dtype == weight.dtype
                and x.is_floating_point() and x.device == weight.device
                and (s[0] > 1 or s[0] == 1 and not any(bn.training for _, bn in chain))):
            # every convolution leaves at least one position, and every batch norm that takes batch
            # statistics two values (a batch of one in eval mode -- serving -- needs no more)
            return
    name = getattr(block, "kind", type(block).__name__)
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} expected a Tensor input, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} expected a 4D input (N, C, H, W), got a {x.dim()}D input of shape "
                         f"{tuple(x.shape)}")
    in_channels = conv.in_channels
    if x.shape[1] != in_channels:
        raise ValueError(f"{name} expected an input with {in_channels} channels, got {x.shape[1]} channels "
                         f"(input shape {tuple(x.shape)})")
    if not x.is_floating_point():
        raise RuntimeError(f"{name} expected a floating-point input, got dtype {x.dtype}")
    if x.device != weight.device:
        raise RuntimeError(f"{name}'s input is on {x.device} but its parameters are on {weight.device}: "
                           f"move one of them (module.to(device) or x.to(device))")
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise RuntimeError(f"{name}'s input has dtype {x.dtype} but its parameters have dtype {weight.dtype}: "
                           f"convert one of them (module.to(dtype) or x.to(dtype)) or run under torch.autocast")
    if x.numel() == 0:
        raise ValueError(f"{name} expected a non-empty input, got shape {tuple(x.shape)}")
    if x.shape[2] >= 3 and x.shape[3] >= 3 and x.shape[0] > 1:
        return  # every convolution leaves at least one position, and every batch norm two values
    h, w = x.shape[2], x.shape[3]
    for conv, bn in chain:
        h, w = _out_size(h, conv, 0), _out_size(w, conv, 1)
        if h < 1 or w < 1:
            raise ValueError(f"{name}: the input {tuple(x.shape)} is smaller than a convolution's kernel")
        if bn.training and x.shape[0] * h * w == 1 and id(bn) not in synced:
            raise ValueError(
                f"{name} in training mode needs more than 1 value per channel for batch statistics, got "
                f"a batch of one with output size {h}x{w} (input shape {tuple(x.shape)}); use a larger "
                f"batch or call .eval()")


def eager_forward(chain: list, shortcut, x: Tensor) -> Tensor:
    """The block in eager PyTorch with its own modules (auto's seed route): what the original's forward
    computes, operation for operation."""
    y = x
    for i, (conv, bn) in enumerate(chain):
        y = bn(conv(y))
        if i < len(chain) - 1:
            y = torch.relu(y)
    s = x
    if shortcut is not None:
        s = shortcut[0](x)
        if shortcut[1] is not None:
            s = shortcut[1](s)
    return torch.relu(y + s)


def _uses_batch_stats(bn: Optional[nn.Module]) -> bool:
    return bn is not None and (bn.training or bn._buffers.get("running_mean") is None)


def _bn_update(bn: Optional[nn.Module]) -> tuple[float, Optional[Tensor]]:
    """The running-stat factor exactly as ``BatchNorm2d.forward`` computes it (-1 when nothing is updated:
    eval mode, or no running statistics) and the batch counter ``bn_finalize`` increments in its kernel
    (``num_batches_tracked``; no launch of its own). With ``momentum=None`` the factor is 1 / count, so the
    batch is counted here, on the host, and no counter is passed."""
    if bn is None or not bn.training:
        return -1.0, None
    buffers = bn._buffers
    if buffers.get("running_mean") is None:
        return -1.0, None
    tracked = buffers.get("num_batches_tracked")
    if bn.momentum is None:
        if tracked is not None:
            tracked.add_(1)
        return 1.0 / float(tracked), None
    return bn.momentum, tracked


def _normalizer(be: Backend, part: tuple, batch_stats: bool, gamma: Tensor, beta: Tensor, eps: float,
                running_mean: Optional[Tensor], running_var: Optional[Tensor], factor: float,
                tracked: Optional[Tensor], group=None) -> tuple[BNFold, Optional[Tensor]]:
    """A BN's (scale, shift, mean, invstd): from the per-tile statistics ``part`` (updating the running
    statistics when ``factor >= 0``, and counting the batch in ``tracked`` when given), or from the running
    statistics. Synchronized over ``group``: this process's tiles merged into one row, every rank's row
    gathered and merged in rank order; then also the global count (a device tensor, for the backward), else
    None."""
    if not batch_stats:
        return be.bn_fold(running_mean, running_var, gamma, beta, eps), None
    count = None
    if group is not None:
        part = sync.gather_partials(*be.bn_merge(*part), group)
        count = part[2].sum()
    update = factor >= 0
    tracked = tracked if update else None
    fold = be.bn_finalize(*part, gamma, beta, eps, running_mean if update else None,
                          running_var if update else None, factor, tracked)
    if update and not torch.compiler.is_compiling():
        _updated(running_mean, running_var, *(() if tracked is None else (tracked,)))
    return fold, count


def _updated(*tensors: Tensor) -> None:
    """Bump the version counters of tensors a kernel wrote in place through their pointers, as an in-place
    PyTorch operation would: caches keyed on them (the eval shortcut's folded weights) see the change."""
    for t in tensors:
        torch.autograd.graph.increment_version(t)


def _bn_backward(be: Backend, grad: Tensor, mask_src: Tensor, z: Tensor, f: tuple, batch_stats: bool, group,
                 global_count: Optional[Tensor], want_gm: bool):
    """ReLU + BN backward: (dz, gm, sum_g, sum_gx). Synchronized: the sums all-reduced over the group
    and divided by the global count on the device (no host round trip); the sums returned are this
    process's own, the gradients of gamma and beta (DDP averages them across processes, as it does
    SyncBatchNorm's)."""
    mean, invstd, scale = f
    sg, sgx = be.bn_backward_reduce(grad, mask_src, z, mean, invstd)
    if group is not None and batch_stats:
        tg, tgx = sync.all_reduce_sums(sg, sgx, group)
        dz, gm = be.bn_backward_apply(grad, mask_src, z, mean, invstd, scale, tg / global_count,
                                      tgx / global_count, 1, batch_stats, want_gm)
    else:
        count = z.shape[0] * z.shape[2] * z.shape[3]
        dz, gm = be.bn_backward_apply(grad, mask_src, z, mean, invstd, scale, sg, sgx, count, batch_stats, want_gm)
    return dz, gm, sg, sgx


def _bn_params(bn: Optional[nn.Module]) -> tuple:
    if bn is None:
        return (None, None, None, None)
    p, b = bn._parameters, bn._buffers
    return (p.get("weight"), p.get("bias"), b.get("running_mean"), b.get("running_var"))


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


DOUBLE_BACKWARD = ("fused_resnet: the fused block's backward is not differentiable (double backward, e.g. a "
                   "gradient penalty through the block): run that model unconverted (eager modules)")


def _first_order(backward):
    """A backward whose results are not differentiable: under ``create_graph=True`` they carry a node that
    raises ``DOUBLE_BACKWARD`` when differentiated (PyTorch's ``once_differentiable``, with a message naming
    the block), never a silently partial second derivative."""
    def wrapper(ctx, *grads):
        if not torch.is_grad_enabled():
            return backward(ctx, *grads)
        with torch.no_grad():
            out = backward(ctx, *grads)
        err = torch._C._functions.DelayedError(DOUBLE_BACKWARD, len(out))
        return err(*[g.detach().requires_grad_() if isinstance(g, Tensor) else g for g in out])
    wrapper.__doc__ = backward.__doc__
    return wrapper


class _FirstConv(torch.autograd.Function):
    """The chain's first convolution (+ bias) and its BN's per-tile statistics (returned, not
    differentiable)."""

    @staticmethod
    def forward(ctx, backend_name: str, stride: int, padding: int, batch_stats: bool, x: Tensor, w: Tensor,
                b: Optional[Tensor]):
        be: Backend = get_backend(backend_name)
        with stage("K1 conv+stats"):
            k = be.conv_fused(x, w, b, stride=stride, padding=padding, stats=batch_stats)
        ctx.backend_name, ctx.stride, ctx.padding, ctx.batch_stats = backend_name, stride, padding, batch_stats
        ctx.save_for_backward(x, w)
        parts = (k.part_mean, k.part_m2, k.part_count)
        ctx.mark_non_differentiable(*parts)
        return (k.out, *parts)

    @staticmethod
    @_first_order
    def backward(ctx, dz: Tensor, *_):
        be: Backend = get_backend(ctx.backend_name)
        x, w = ctx.saved_tensors
        needs = ctx.needs_input_grad
        with stage("B conv backward"):
            dx, dw, db = be.conv_backward(dz, x, w, ctx.stride, ctx.padding,
                                          (needs[4], needs[5], needs[6] and not ctx.batch_stats))
        if ctx.batch_stats and needs[6]:
            # A conv bias followed by a batch-statistics BN shifts the batch mean by itself: its gradient,
            # sum(dZ), is exactly zero (eager returns rounding noise around it). Skip the reduction.
            db = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
        return None, None, None, None, dx, dw, db


class _BnReluConv(torch.autograd.Function):
    """The previous BN (finalize, running statistics) and ReLU applied in the prologue of the next chain
    convolution, which takes its own BN's statistics; for the last convolution, the shortcut convolution
    too (its result apart, with its statistics when a BN follows it). Backward: the convolution's
    gradients with its input recomputed from the previous pre-activation (not saved), then the previous
    ReLU + BN's."""

    @staticmethod
    def forward(ctx, backend_name: str, geometry: tuple[int, int, int], flags: tuple[bool, bool, bool], eps: float,
                factor: float, group, z: Tensor, part_mean: Tensor, part_m2: Tensor, part_count: Tensor,
                gamma: Tensor, beta: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                w: Tensor, b: Optional[Tensor], sc_x: Optional[Tensor], sc_w: Optional[Tensor],
                sc_b: Optional[Tensor], tracked: Optional[Tensor]):
        be: Backend = get_backend(backend_name)
        stride, padding, sc_stride = geometry
        bs_prev, bs_next, sc_bs = flags
        with stage("F bn_finalize"):
            f, ctx.global_count = _normalizer(be, (part_mean, part_m2, part_count), bs_prev, gamma, beta, eps,
                                              running_mean, running_var, factor, tracked, group)
        ctx.group = group
        with stage("K bn+relu>conv+stats" + ("+conv1x1" if sc_w is not None else "")):
            k = be.conv_fused(z, w, b, stride=stride, padding=padding, in_mean=f.mean, in_scale=f.scale,
                              in_shift=f.shift, sc_x=sc_x, sc_weight=sc_w, sc_bias=sc_b, sc_stride=sc_stride,
                              sc_separate=True, stats=bs_next, sc_stats=sc_bs)
        ctx.backend_name, ctx.geometry, ctx.flags, ctx.param_dtype = backend_name, geometry, flags, gamma.dtype
        ctx.save_for_backward(z, w, f.mean, f.invstd, f.scale, f.shift, sc_x, sc_w)
        outs = (k.part_mean, k.part_m2, k.part_count, k.sc_part_mean, k.sc_part_m2)
        ctx.mark_non_differentiable(*outs)
        return k.out, outs[0], outs[1], outs[2], k.shortcut, outs[3], outs[4]

    @staticmethod
    @_first_order
    def backward(ctx, dz: Tensor, _pm, _pm2, _pc, d_sc: Optional[Tensor], *_):
        be: Backend = get_backend(ctx.backend_name)
        z, w, mean, invstd, scale, shift, sc_x, sc_w = ctx.saved_tensors
        stride, padding, sc_stride = ctx.geometry
        bs_prev, bs_next, sc_bs = ctx.flags
        needs = ctx.needs_input_grad
        with stage("B conv backward (input recomputed)"):
            y = be.bn_act(z, mean, scale, shift, relu=True)
            dy, dw, db = be.conv_backward(dz, y, w, stride, padding, (True, needs[14], needs[15] and not bs_next))
        if bs_next and needs[15]:  # as in _FirstConv.backward: exactly zero
            db = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
        with stage("B relu+bn backward"):
            dz_prev, _, sg, sgx = _bn_backward(be, dy, y, z, (mean, invstd, scale), bs_prev, ctx.group,
                                               ctx.global_count, want_gm=False)
        del y, dy
        dx = dsw = dsb = None
        if sc_w is not None and d_sc is not None:
            with stage("B shortcut conv backward"):
                dx, dsw, dsb = be.conv_backward(d_sc, sc_x, sc_w, sc_stride, 0,
                                                (needs[16], needs[17], needs[18] and not sc_bs))
            if sc_bs and needs[18]:
                dsb = torch.zeros(sc_w.shape[0], dtype=sc_w.dtype, device=sc_w.device)
        pd = ctx.param_dtype
        return (None, None, None, None, None, None, dz_prev, None, None, None,
                _as(sgx, pd) if needs[10] else None, _as(sg, pd) if needs[11] else None, None, None,
                dw, db, dx, dsw, dsb, None)


class _Output(torch.autograd.Function):
    """The last BN (finalize), the shortcut -- X, conv(X), or BN(conv(X)) with its own finalize -- the
    add and the ReLU, in one kernel. Backward: the ReLU + last BN's, and the shortcut's share (its BN's
    backward too when it has one)."""

    @staticmethod
    def forward(ctx, backend_name: str, kind: str, flags: tuple[bool, bool], eps: float, sc_eps: float, factor: float,
                sc_factor: float, groups: tuple, z: Tensor, part_mean: Tensor, part_m2: Tensor, part_count: Tensor,
                gamma: Tensor, beta: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor], s: Tensor,
                sc_part_mean: Optional[Tensor], sc_part_m2: Optional[Tensor], sc_gamma: Optional[Tensor],
                sc_beta: Optional[Tensor], sc_running_mean: Optional[Tensor], sc_running_var: Optional[Tensor],
                tracked: Optional[Tensor], sc_tracked: Optional[Tensor]):
        be: Backend = get_backend(backend_name)
        bs, sc_bs = flags
        with stage("F bn_finalize"):
            f, ctx.global_count = _normalizer(be, (part_mean, part_m2, part_count), bs, gamma, beta, eps,
                                              running_mean, running_var, factor, tracked, groups[0])
        res_bn, fs, ctx.sc_global_count = None, None, None
        if kind == "conv+bn":
            with stage("F shortcut bn_finalize"):
                fs, ctx.sc_global_count = _normalizer(be, (sc_part_mean, sc_part_m2, part_count), sc_bs, sc_gamma,
                                                      sc_beta, sc_eps, sc_running_mean, sc_running_var, sc_factor,
                                                      sc_tracked, groups[1])
            res_bn = (fs.mean, fs.scale, fs.shift)
        ctx.groups = groups
        out_dtype = torch.promote_types(z.dtype, s.dtype)
        with stage("K bn+" + ("bn+" if res_bn else "") + "add+relu"):
            out = be.bn_act(z, f.mean, f.scale, f.shift, residual=s, relu=True, out_dtype=out_dtype, res_bn=res_bn)
        ctx.backend_name, ctx.kind, ctx.flags, ctx.param_dtype = backend_name, kind, flags, gamma.dtype
        ctx.s_dtype = s.dtype
        if fs is None:
            ctx.save_for_backward(z, out, f.mean, f.invstd, f.scale, None, None, None, None)
        else:
            ctx.save_for_backward(z, out, f.mean, f.invstd, f.scale, s, fs.mean, fs.invstd, fs.scale)
        return out

    @staticmethod
    @_first_order
    def backward(ctx, grad: Tensor):
        be: Backend = get_backend(ctx.backend_name)
        z, out, mean, invstd, scale, s, s_mean, s_invstd, s_scale = ctx.saved_tensors
        bs, sc_bs = ctx.flags
        needs = ctx.needs_input_grad
        grad = grad.contiguous(memory_format=_memory_format(out))
        with stage("B relu+bn backward"):
            dz, gm, sg, sgx = _bn_backward(be, grad, out, z, (mean, invstd, scale), bs, ctx.groups[0],
                                           ctx.global_count, want_gm=ctx.kind != "conv+bn")
        ds = dsg = dsb = None
        pd = ctx.param_dtype
        if ctx.kind == "conv+bn":
            with stage("B shortcut relu+bn backward"):
                ds, _, ssg, ssgx = _bn_backward(be, grad, out, s, (s_mean, s_invstd, s_scale), sc_bs, ctx.groups[1],
                                                ctx.sc_global_count, want_gm=False)
            dsg, dsb = _as(ssgx, pd) if needs[19] else None, _as(ssg, pd) if needs[20] else None
        elif needs[16]:
            ds = gm if gm.dtype == ctx.s_dtype else gm.to(ctx.s_dtype)
        return (None, None, None, None, None, None, None, None, dz, None, None, None,
                _as(sgx, pd) if needs[12] else None, _as(sg, pd) if needs[13] else None, None, None,
                ds, None, None, dsg, dsb, None, None, None, None)


def _memory_format(t: Tensor) -> torch.memory_format:
    return torch.channels_last if t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous() \
        else torch.contiguous_format


def block_forward(block: nn.Module, layout: BlockLayout, x: Tensor) -> Tensor:
    """Run ``block`` (whose submodules ``layout`` names) through the fused primitives of ``block.backend``.
    Each batch norm follows its own ``training`` flag, as in eager."""
    chain, shortcut = layout.resolve(block)
    bns = [bn for _, bn in chain]
    if shortcut is not None:
        bns.append(shortcut[1])
    training = learning = False
    for bn in bns:
        if bn is not None:
            learning = learning or bn.training
            training = training or _uses_batch_stats(bn)
    # Only a batch norm in training mode synchronizes (sync.group_of): eval asks nothing of torch.distributed.
    groups = [sync.group_of(bn, block) for bn in bns] if learning else [None] * len(bns)
    synced = learning and any(g is not None for g in groups)
    check_input(block, chain, x, frozenset(id(bn) for bn, g in zip(bns, groups) if g is not None) if synced
                else _NOTHING)
    device_type = x.device.type
    # A synchronized block never takes the seed route: plain BN modules there would not synchronize.
    backend = resolve_backend(block.backend, x, training, block, fused_only=synced, device_type=device_type)
    if backend is None:  # auto's seed route: the block's own modules, measured fastest here
        return eager_forward(chain, shortcut, x)
    weights = [conv._parameters["weight"] for conv, _ in chain]
    sc_weight = shortcut[0]._parameters["weight"] if shortcut is not None else None
    x_res = x
    if torch.is_autocast_enabled(device_type):
        # As eager under autocast: convolutions in the autocast dtype, batch norm parameters as they are,
        # and the identity shortcut added in its own dtype (type promotion picks the output's). The
        # primitives then run in those dtypes: autocast must not re-cast inside them.
        dtype = torch.get_autocast_dtype(device_type)
        x = x.to(dtype)
        weights = [w.to(dtype) for w in weights]
        sc_weight = sc_weight.to(dtype) if sc_weight is not None else None
        with torch.autocast(device_type, enabled=False):
            return _run(backend, block, chain, shortcut, x, x_res, weights, sc_weight, groups, training)
    return _run(backend, block, chain, shortcut, x, x_res, weights, sc_weight, groups, training)


_NOTHING: frozenset = frozenset()


def _run(be: Backend, block: nn.Module, chain: list, shortcut, x: Tensor, x_res: Tensor, weights: list,
         sc_weight: Optional[Tensor], groups: list, training: bool) -> Tensor:
    if not training and not (torch.is_grad_enabled() and _needs_grad(x, chain, shortcut)):
        return _inference(be, block, chain, shortcut, x, x_res, weights, sc_weight)
    return _training(be, chain, shortcut, x, x_res, weights, sc_weight, groups)


def _needs_grad(x: Tensor, chain: list, shortcut) -> bool:
    mods = [m for pair in chain for m in pair] + ([m for m in shortcut if m is not None] if shortcut else [])
    return x.requires_grad or any(p is not None and p.requires_grad for m in mods
                                  for p in (m.weight, getattr(m, "bias", None)))


def _training(be: Backend, chain: list, shortcut, x: Tensor, x_res: Tensor, weights: list,
              sc_weight: Optional[Tensor], groups: list) -> Tensor:
    # Where the extension is built, the same composition runs in C++ (csrc/block_train.cpp) over the backend's
    # primitives (the extension's kernels, or the Triton backend's operators): one operator call per block,
    # and the same three nodes as torch::autograd::Functions instead of Python ones. Here the Python
    # Functions stay: synchronized batch norm (its collectives are torch.distributed's), torch.compile
    # (which traces them), profiler ranges on (NVTX ranges come from Python), a Triton dry run (launches
    # listed, not run), and a package without its extension.
    if BLOCK_NODE and be.block_node and not (profiling.ENABLED or torch.compiler.is_compiling()) \
            and all(g is None for g in groups):
        return _training_node(be, chain, shortcut, x, x_res, weights, sc_weight)
    conv, bn = chain[0]
    bs = [_uses_batch_stats(b) for _, b in chain]
    z, pm, pm2, pc = _FirstConv.apply(be.name, conv.stride[0], conv.padding[0], bs[0], x, weights[0], conv.bias)
    s = sc_pm = sc_pm2 = None
    sc_conv, sc_bn = shortcut if shortcut is not None else (None, None)
    sc_bs = _uses_batch_stats(sc_bn)
    for i in range(1, len(chain)):
        prev_bn = chain[i - 1][1]
        conv, _ = chain[i]
        last = i == len(chain) - 1
        with_sc = last and sc_conv is not None
        factor, tracked = _bn_update(prev_bn)
        z, pm, pm2, pc, s, sc_pm, sc_pm2 = _BnReluConv.apply(
            be.name, (conv.stride[0], conv.padding[0], sc_conv.stride[0] if with_sc else 1),
            (bs[i - 1], bs[i], with_sc and sc_bn is not None and sc_bs), prev_bn.eps, factor,
            groups[i - 1], z, pm, pm2, pc, *_bn_params(prev_bn), weights[i], conv.bias,
            x if with_sc else None, sc_weight if with_sc else None, sc_conv.bias if with_sc else None, tracked)
    last_bn = chain[-1][1]
    kind = "identity" if sc_conv is None else "conv" if sc_bn is None else "conv+bn"
    factor, tracked = _bn_update(last_bn)
    sc_factor, sc_tracked = _bn_update(sc_bn)
    return _Output.apply(
        be.name, kind, (bs[-1], sc_bs), last_bn.eps, sc_bn.eps if sc_bn is not None else 0.0, factor, sc_factor,
        (groups[len(chain) - 1], groups[len(chain)] if sc_bn is not None else None),
        z, pm, pm2, pc, *_bn_params(last_bn), x_res if kind == "identity" else s,
        sc_pm if kind == "conv+bn" else None, sc_pm2 if kind == "conv+bn" else None, *_bn_params(sc_bn), tracked,
        sc_tracked)


def _training_node(be: Backend, chain: list, shortcut, x: Tensor, x_res: Tensor, weights: list,
                   sc_weight: Optional[Tensor]) -> Tensor:
    """``_training`` as one call of ``torch.ops.fused_resnet.block_train``: the same primitives in the same
    order (bit-identical results), composed in C++ (its Plan: the layout of the lists built here)."""
    sc_conv, sc_bn = shortcut if shortcut is not None else (None, None)
    kind = 0 if sc_conv is None else 1 if sc_bn is None else 2
    tensors = [x, x_res if kind == 0 else None]
    kernel_weights, means, variances, counts = [], [], [], []
    geometry, stats, eps_factors = [], [], []
    for (conv, bn), w in zip(chain, weights):
        p, b = bn._parameters, bn._buffers
        tensors += (w, conv._parameters.get("bias"), p["weight"], p["bias"])
        kernel_weights.append(be.kernel_weight(w))
        geometry += (conv.stride[0], conv.padding[0])
        stats.append(_uses_batch_stats(bn))
        means.append(b.get("running_mean"))
        variances.append(b.get("running_var"))
        factor, tracked = _bn_update(bn)
        counts.append(tracked)
        eps_factors += (bn.eps, factor)
    if sc_conv is None:
        tensors += (None, None, None, None)
        geometry.append(1)
    else:
        tensors += (sc_weight, sc_conv._parameters.get("bias"))
        kernel_weights.append(be.kernel_weight(sc_weight))
        geometry.append(sc_conv.stride[0])
    if sc_bn is None:
        if sc_conv is not None:
            tensors += (None, None)
        means.append(None)
        variances.append(None)
        counts.append(None)
        stats.append(False)
        eps_factors += (0.0, -1.0)
    else:
        p, b = sc_bn._parameters, sc_bn._buffers
        tensors += (p["weight"], p["bias"])
        means.append(b.get("running_mean"))
        variances.append(b.get("running_var"))
        stats.append(_uses_batch_stats(sc_bn))
        factor, tracked = _bn_update(sc_bn)
        counts.append(tracked)
        eps_factors += (sc_bn.eps, factor)
    block_train = _BLOCK_TRAIN[0] if _BLOCK_TRAIN else _block_train()
    return block_train(tensors, kernel_weights, means, variances, counts, [len(chain), kind, *geometry, *stats],
                       eps_factors, be.primitives)


_BLOCK_TRAIN: list = []  # fused_resnet::block_train through fused_resnet._C.call, made on the first call


def _block_train():
    from .backends.extension import fast_caller
    _BLOCK_TRAIN.append(fast_caller(torch.ops.fused_resnet.block_train.default))
    return _BLOCK_TRAIN[0]


def _inference(be: Backend, block: nn.Module, chain: list, shortcut, x: Tensor, x_res: Tensor, weights: list,
               sc_weight: Optional[Tensor]) -> Tensor:
    """One launch per chain convolution, BN folded in-kernel; the last adds the shortcut -- X, or its
    convolution with its BN folded into the weights -- and applies the ReLU."""
    y = x
    last = len(chain) - 1
    for i, ((conv, bn), w) in enumerate(zip(chain, weights)):
        p, b = conv._parameters, bn._buffers
        folded = (b["running_mean"], b["running_var"], bn._parameters["weight"], bn._parameters["bias"], bn.eps)
        if i < last:
            with stage(_INFER_LABELS[i]):
                y = be.conv_fused(y, w, p.get("bias"), stride=conv.stride[0], padding=conv.padding[0], bn=folded,
                                  relu=True).out
        elif shortcut is None:
            with stage(_INFER_LABELS[-1]):
                y = be.conv_fused(y, w, p.get("bias"), stride=conv.stride[0], padding=conv.padding[0], bn=folded,
                                  relu=True, residual=x_res,
                                  out_dtype=x.dtype if x.dtype == x_res.dtype else torch.promote_types(x.dtype, x_res.dtype)).out
        else:
            sc_w, sc_b = _shortcut_weights(block, shortcut, sc_weight)
            with stage(_INFER_LABELS[-1]):
                y = be.conv_fused(y, w, p.get("bias"), stride=conv.stride[0], padding=conv.padding[0], bn=folded,
                                  relu=True, sc_x=x, sc_weight=sc_w, sc_bias=sc_b,
                                  sc_stride=shortcut[0].stride[0]).out
    return y


_INFER_LABELS = ("K1 conv+bn+relu", "K2 conv+bn+relu", "K3 conv+bn+relu", "K conv+bn+shortcut+add+relu")


def _shortcut_weights(block: nn.Module, shortcut, weight: Tensor) -> tuple[Tensor, Optional[Tensor]]:
    """The shortcut convolution's (weight, bias) for inference, its batch norm (if any) folded in:
    ``w * gamma / sqrt(var + eps)`` per output channel, bias ``(b - mean) * that + beta``, computed in
    float32 from the parameters and cast to the convolution's dtype. Cached on the block, keyed on every
    input's address, version counter and strides (a ``.data`` view of the same storage keeps the other two):
    never stale; not cached while a CUDA graph records (``packing.capturing``)."""
    conv, bn = shortcut
    if bn is None:
        return weight, conv.bias
    tensors = (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
    if torch.compiler.is_compiling():
        return _fold_shortcut(conv, bn, weight.dtype)
    key = (weight.dtype, weight.device, bn.eps) + tuple(
        (t.data_ptr(), t._version, t.stride()) if t is not None else None for t in tensors)
    cached = block.__dict__.get("_folded_shortcut")
    if cached is None or cached[0] != key:
        cached = (key, *_fold_shortcut(conv, bn, weight.dtype))
        if not capturing(weight):
            block.__dict__["_folded_shortcut"] = cached
    return cached[1], cached[2]


def _fold_shortcut(conv: nn.Conv2d, bn: nn.Module, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    with torch.no_grad():
        a = bn.weight.float() * torch.rsqrt(bn.running_var.float() + bn.eps)
        bias = conv.bias.float() if conv.bias is not None else torch.zeros_like(a)
        w = (conv.weight.float() * a.view(-1, 1, 1, 1)).to(dtype)
        return w, (bias - bn.running_mean.float()) * a + bn.bias.float()
