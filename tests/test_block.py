"""The composition against the seed reference: every available backend, train and eval, forward and
every gradient, identity and 1x1-stride-2 blocks, odd shapes, NCHW and channels_last.

Half-precision gradient checks stay at small shapes on purpose: where a pre-activation lies within
rounding of zero, float16 can flip a ReLU mask element (in eager as in fused code), which moves a
gradient's relative error by |g_i|/||g|| at once; at these sizes flips are rare, so the comparison
measures the arithmetic rather than the luck of the draw."""

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fused_resnet
from fused_resnet import reference
from fused_resnet.cases import SMALL_BLOCK_CASES
from fused_resnet.testing import compare_models, failures, randomize_, rel_err

from tests.conftest import DEVICES, backends_for, device_dtype_params

FORMATS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}


def _pair(case, backend):
    ref = randomize_(reference.Residual(case.in_channels, case.out_channels, case.use_1x1conv, case.stride))
    fused = fused_resnet.Residual(case.in_channels, case.out_channels, case.use_1x1conv, case.stride,
                                  backend=backend)
    return fused, ref


def _params(training):
    return [pytest.param(dev, dt, be, id=f"{dev_id}-{be}")
            for p in device_dtype_params() for dev, dt in [p.values] for dev_id in [p.id]
            for be in backends_for(dev, training)]


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("case", SMALL_BLOCK_CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("device,dtype,backend", _params(True))
def test_block_matches_reference(device, dtype, backend, train, case, fmt):
    fused, ref = _pair(case, backend)
    x = torch.randn(case.input_shape)
    checks = compare_models(fused, ref, x, train=train, dtype=dtype, device=device,
                            memory_format=FORMATS[fmt])
    names = {c.name for c in checks}
    assert "grad input" in names and "grad bn1.weight" in names and "grad conv2.bias" in names
    assert not failures(checks), "\n".join(failures(checks))


@pytest.mark.parametrize("device,dtype,backend", _params(False))
def test_inference_without_grad(device, dtype, backend):
    """The two-kernel path (no autograd): same result as the reference in eval mode."""
    case = SMALL_BLOCK_CASES[1]
    fused, ref = _pair(case, backend)
    checks = compare_models(fused, ref, torch.randn(case.input_shape), train=False, dtype=dtype,
                            device=device, grads=False)
    assert [c.name for c in checks] == ["output"]
    assert not failures(checks), "\n".join(failures(checks))


@pytest.mark.parametrize("momentum", [0.1, 0.3, None])
@pytest.mark.parametrize("device,dtype,backend", _params(True))
def test_running_statistics_after_several_steps(device, dtype, backend, momentum):
    case = SMALL_BLOCK_CASES[1]
    fused, ref = _pair(case, backend)
    for bn in (ref.bn1, ref.bn2):
        bn.momentum = momentum
    fused.load_state_dict(ref.state_dict())
    fused.bn1.momentum = fused.bn2.momentum = momentum
    checks = compare_models(fused, ref, torch.randn(case.input_shape), train=True, dtype=dtype,
                            device=device, steps=3)
    stats = {c.name for c in checks}
    assert {"bn1.running_mean", "bn2.running_var", "bn2.num_batches_tracked"} <= stats
    assert not failures(checks), "\n".join(failures(checks))


class _CounterAdds(TorchDispatchMode):
    """Counts in-place additions to int64 tensors (what BatchNorm2d's num_batches_tracked.add_(1) is)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._overloadpacket is torch.ops.aten.add_ and args[0].dtype == torch.int64:
            self.calls += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("device,dtype,backend", [p for p in _params(True) if p.values[2] != "torch"])
def test_batches_are_counted_in_the_finalize_kernel(device, dtype, backend, momentum):
    """num_batches_tracked counts each training batch of every BN (as eager's) with no operator of its own:
    bn_finalize's kernel counts it; with momentum=None (the factor is 1 / count) the host counts it, one
    add_ per BN and batch. Its version counter moves as an in-place operator's would."""
    case = next(c for c in SMALL_BLOCK_CASES if c.use_1x1conv)
    fused, _ = _pair(case, backend)
    fused = fused.to(device, dtype).train()
    bns = [m for m in fused.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in bns:
        bn.momentum = momentum
    versions = [bn.num_batches_tracked._version for bn in bns]
    x = torch.randn(case.input_shape, device=device, dtype=dtype, requires_grad=True)
    with _CounterAdds() as adds:
        for _ in range(3):
            fused(x).sum().backward()
    assert [int(bn.num_batches_tracked) for bn in bns] == [3] * len(bns)
    assert adds.calls == (0 if momentum is not None else 3 * len(bns))
    assert all(bn.num_batches_tracked._version >= v + 3 for bn, v in zip(bns, versions))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend", [p.values[2] for p in _params(True)
                                     if p.values[0] == "cuda" and p.values[1] == torch.float32
                                     and p.values[2] in ("triton", "cuda")])
def test_float32_follows_the_tf32_switch(backend, train):
    """cuDNN's TF32 switch (on by default in PyTorch, off in the other tests) is followed as eager's
    convolutions follow it: on, the block matches the reference within the TF32 floor, gradients too
    (three draws, compare_models); on and off give different bits, and off is float32-exact."""
    case = SMALL_BLOCK_CASES[2]  # 13 channels: 117 products per output, enough for TF32 to round
    fused, ref = _pair(case, backend)
    x = torch.randn(case.input_shape)
    torch.backends.cudnn.allow_tf32 = True  # the autouse fixture restores it
    checks = compare_models(fused, ref, x, train=train, dtype=torch.float32, device="cuda")
    assert not failures(checks), "\n".join(failures(checks))
    fused.load_state_dict(ref.state_dict())
    fused = fused.cuda().eval()
    outs = {}
    for tf32 in (True, False):
        torch.backends.cudnn.allow_tf32 = tf32
        with torch.no_grad():
            outs[tf32] = fused(x.cuda()).cpu()
    assert not torch.equal(outs[True], outs[False])
    want = ref.double().eval()(x.double())
    assert rel_err(outs[False], want) < 1e-5 < rel_err(outs[True], want)


@pytest.mark.parametrize("device", DEVICES)
def test_running_stats_update_matches_batchnorm_exactly_in_float64(device):
    ref = randomize_(reference.Residual(3, 6, True, 2)).double().to(device)
    fused = fused_resnet.Residual(3, 6, True, 2, backend="torch").double().to(device)
    fused.load_state_dict(ref.state_dict())
    for _ in range(3):
        x = torch.randn(2, 3, 9, 11, dtype=torch.float64, device=device)
        ref(x), fused(x)
    for (name, a), (_, b) in zip(ref.named_buffers(), fused.named_buffers()):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("device,dtype,backend", _params(False))
def test_nan_in_one_sample_stays_in_that_sample(device, dtype, backend):
    fused, _ = _pair(SMALL_BLOCK_CASES[0], backend)
    fused = fused.to(device=device, dtype=dtype).eval()
    x = torch.randn(3, 5, 7, 7, device=device, dtype=dtype)
    with torch.no_grad():
        clean = fused(x)
        x[1, 2, 3, 4] = float("nan")
        dirty = fused(x)
    assert torch.isnan(dirty[1]).any()
    assert torch.isfinite(dirty[0]).all() and torch.isfinite(dirty[2]).all()
    torch.testing.assert_close(dirty[[0, 2]], clean[[0, 2]], rtol=0, atol=0)


@pytest.mark.parametrize("frozen", [False, True], ids=["batch-stats", "frozen-bn"])
@pytest.mark.parametrize("device,dtype,backend", _params(True))
def test_nan_in_training_propagates_as_in_eager(device, dtype, backend, frozen):
    """The training path's BN + add + ReLU (K3) and the backward's recompute of Y1 keep NaN as torch.relu
    does, so the output and every gradient are NaN exactly where eager's are. With batch statistics one
    NaN reaches every channel's statistics; with frozen BN (running statistics) it stays in its sample,
    and a ReLU that turned NaN into 0 would show as finite outputs and a finite conv2 weight gradient."""
    fused, ref = _pair(SMALL_BLOCK_CASES[1], backend)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(SMALL_BLOCK_CASES[1].input_shape)
    x[1, 0, 2, 3] = float("nan")
    masks = []
    for model in (ref, fused):
        model = model.to(device=device, dtype=dtype).train()
        if frozen:
            model.bn1.eval(), model.bn2.eval()
        xi = x.to(device=device, dtype=dtype).requires_grad_()
        out = model(xi)
        out.backward(torch.ones_like(out))
        masks.append([torch.isnan(out), torch.isnan(xi.grad)] + [torch.isnan(p.grad) for p in model.parameters()])
    names = ["output", "grad input"] + [f"grad {n}" for n, _ in fused.named_parameters()]
    assert masks[0][0].any()
    for name, want, got in zip(names, *masks):
        if not frozen and name in ("grad conv1.bias", "grad conv2.bias"):
            # A bias before a batch-statistics BN has an exactly zero gradient, which the fused backward
            # returns without summing (NaN or not); the other gradients carry the NaN.
            assert not got.any()
            continue
        assert torch.equal(got, want), f"{name}: NaN at {int(got.sum())} places, eager {int(want.sum())}"


@pytest.mark.parametrize("device,dtype,backend", _params(True))
def test_frozen_batch_norm_in_a_training_block(device, dtype, backend):
    """Fine-tuning with BN frozen (block.train(), bn.eval()): running statistics, not batch ones."""
    case = SMALL_BLOCK_CASES[1]
    fused, ref = _pair(case, backend)
    fused.load_state_dict(ref.state_dict())

    class Frozen(torch.nn.Module):
        def __init__(self, blk):
            super().__init__()
            self.blk = blk

        def forward(self, x):
            self.blk.bn1.eval()
            return self.blk(x)

    checks = compare_models(Frozen(fused), Frozen(ref), torch.randn(case.input_shape), train=True,
                            dtype=dtype, device=device)
    assert not failures(checks), "\n".join(failures(checks))


def test_seed_resnet18_matches_reference():
    seed = randomize_(reference.resnet18())
    fused = fused_resnet.convert(copy.deepcopy(seed))
    x = torch.randn(2, 1, 32, 32)
    for train in (True, False):
        checks = compare_models(fused, seed, x, train=train, dtype=torch.float32, device="cpu")
        assert len(checks) > 60
        assert not failures(checks), "\n".join(failures(checks))
