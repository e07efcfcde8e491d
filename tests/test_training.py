"""Training mode across backends: BN statistics primitives, robustness, determinism, saved memory,
several optimiser steps of the seed ResNet-18, and torch.compile of a training step."""

import copy

import pytest
import torch

import fused_resnet
from fused_resnet import reference
from fused_resnet.backends import get_backend
from fused_resnet.backends.torch_ref import TorchBackend, tile_stats
from fused_resnet.testing import compare_models, failures, randomize_, rel_err

from tests.conftest import HAS_CUDA, assert_compiled_step_matches, backends_for, device_dtype_params

REF = TorchBackend()
DEVICE = "cuda" if HAS_CUDA else "cpu"
TRAIN_BACKENDS = [b for b in backends_for(DEVICE, True) if get_backend(b).complete]
FMT = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}


@pytest.mark.parametrize("backend", [b for b in TRAIN_BACKENDS if b != "torch"])
@pytest.mark.parametrize("update", [True, False])
def test_bn_finalize_matches_torch(backend, update):
    be = get_backend(backend)
    c = 37
    z = 3.0 + torch.randn(5, c, 7, 9, device=DEVICE)
    part = tile_stats(z)
    gamma, beta = 1 + 0.2 * torch.randn(c, device=DEVICE), 0.2 * torch.randn(c, device=DEVICE)
    rm, rv = torch.randn(c, device=DEVICE), 0.5 + torch.rand(c, device=DEVICE)
    rm2, rv2 = rm.clone(), rv.clone()
    tracked = torch.tensor(41, device=DEVICE)  # num_batches_tracked: counted in the kernel when given
    got = be.bn_finalize(*part, gamma, beta, 1e-5, rm if update else None, rv if update else None, 0.3,
                         tracked if update else None)
    want = REF.bn_finalize(*part, gamma, beta, 1e-5, rm2 if update else None, rv2 if update else None, 0.3)
    for a, b in zip(got, want):
        assert rel_err(a, b) <= 1e-6
    torch.testing.assert_close(rm, rm2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rv, rv2, rtol=1e-6, atol=1e-6)
    assert tracked.item() == (42 if update else 41)


@pytest.mark.parametrize("backend", [b for b in TRAIN_BACKENDS if b != "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_bn_fold_matches_torch(backend, dtype):
    """An eval-mode BN's fold (one launch): running statistics, gamma and beta read in their own dtype,
    (scale, shift, mean, invstd) in float32 as the torch backend computes them."""
    be = get_backend(backend)
    c = 37  # not a multiple of the kernels' channel blocks
    g = torch.Generator().manual_seed(3)
    rm, gamma, beta = (torch.randn(c, generator=g).to(DEVICE, dtype) for _ in range(3))
    rv = (0.05 + torch.rand(c, generator=g)).to(DEVICE, dtype)
    got = be.bn_fold(rm, rv, gamma, beta, 1e-3)
    want = REF.bn_fold(rm, rv, gamma, beta, 1e-3)
    for name, a, b in zip(("scale", "shift", "mean", "invstd"), got, want):
        assert a.dtype == torch.float32 and a.shape == (c,), name
        assert rel_err(a, b) <= 1e-6, name
    assert torch.equal(got[2], rm.float()) and torch.equal(got[1], beta.float())


@pytest.mark.parametrize("backend", [b for b in TRAIN_BACKENDS if b != "torch"])
@pytest.mark.parametrize("fmt", list(FMT))
@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_bn_elementwise_and_backward_primitives_match_torch(backend, fmt, device, dtype):
    be = get_backend(backend)
    if be.supports(device, dtype, True) is not None:
        pytest.skip(be.supports(device, dtype, True))
    c = 13
    shape = (3, c, 5, 7)

    def act(offset=0.0):
        return (offset + torch.randn(shape, device=device)).to(dtype).contiguous(memory_format=FMT[fmt])

    z, res, grad, mask_src = act(1.0), act(), act(), act()
    scale, shift = torch.randn(c, device=device), torch.randn(c, device=device)
    mean, invstd = 1 + 0.1 * torch.randn(c, device=device), 0.5 + torch.rand(c, device=device)
    tol = 1e-5 if dtype == torch.float32 else 5e-3
    for residual in (res, None):
        out = be.bn_act(z, mean, scale, shift, residual, relu=True)
        assert out.is_contiguous(memory_format=FMT[fmt])
        assert rel_err(out, REF.bn_act(z, mean, scale, shift, residual, relu=True)) <= tol
    sums = be.bn_backward_reduce(grad, mask_src, z, mean, invstd)
    sums_ref = REF.bn_backward_reduce(grad, mask_src, z, mean, invstd)
    for a, b in zip(sums, sums_ref):
        assert rel_err(a, b) <= 1e-5
    count = shape[0] * shape[2] * shape[3]
    for batch_stats in (True, False):
        dz, gm = be.bn_backward_apply(grad, mask_src, z, mean, invstd, scale, *sums_ref, count, batch_stats, True)
        dz_ref, gm_ref = REF.bn_backward_apply(grad, mask_src, z, mean, invstd, scale, *sums_ref, count,
                                               batch_stats, True)
        assert dz.is_contiguous(memory_format=FMT[fmt])
        assert rel_err(dz, dz_ref) <= tol and rel_err(gm, gm_ref) == 0.0


def test_reduce_rows_leave_every_sm_four_programs():
    """The Triton backward reduce's rows per program (``configs.reduce_rows``) at the shapes the second
    GPU run profiled, on an H100's 132 SMs: 56x56x64 batch 32 (100,352 rows, one channel block of 64)
    gets 128 rows -- 784 programs where 512 rows gave 196 -- and batch 64 gets 256; 7x7x512 batch 32
    (1,568 rows, four channel blocks of 128, BLOCK_R 16) the smallest tile; never more than 16 x BLOCK_R."""
    from fused_resnet.backends.triton.configs import reduce_rows
    assert reduce_rows(100352, 1, 32, 132) == 128
    assert reduce_rows(200704, 1, 32, 132) == 256
    assert reduce_rows(1568, 4, 16, 132) == 16
    assert reduce_rows(10 ** 9, 1, 32, 132) == 512
    assert reduce_rows(10, 1, 32, 132) == 32
    for m in (1, 1000, 10 ** 5, 10 ** 7):
        assert all(-(-m // reduce_rows(m, cb, 32, sms)) * cb >= min(4 * sms, -(-m // 32) * cb)
                   for cb in (1, 4) for sms in (8, 132))


@pytest.mark.skipif("triton" not in fused_resnet.available_backends(),
                    reason="Triton needs a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("steps", range(5), ids=lambda k: f"rows-x{1 << k}")
@pytest.mark.parametrize("fmt", list(FMT))
def test_triton_backward_reduce_at_every_rows_per_program(monkeypatch, steps, fmt):
    """Each of the five row counts ``reduce_rows`` can give (BLOCK_R x 1 .. 16) sums right, ragged last
    program included (2,304 rows: 2 programs at the largest)."""
    from fused_resnet.backends.triton import bn
    monkeypatch.setattr(bn, "reduce_rows", lambda m, cb, block_r, sms: block_r << steps)
    be = get_backend("triton")
    shape, c = (4, 13, 24, 24), 13
    z, grad, mask_src = ((off + torch.randn(shape, device=DEVICE)).contiguous(memory_format=FMT[fmt])
                         for off in (1.0, 0.0, 0.0))
    mean, invstd = 1 + 0.1 * torch.randn(c, device=DEVICE), 0.5 + torch.rand(c, device=DEVICE)
    for got, want in zip(be.bn_backward_reduce(grad, mask_src, z, mean, invstd),
                         REF.bn_backward_reduce(grad, mask_src, z, mean, invstd)):
        assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("backend", TRAIN_BACKENDS)
@pytest.mark.parametrize("fmt", list(FMT))
def test_relu_backward_is_a_select(backend, fmt):
    """gm = where(mask_src <= 0, 0, grad), as aten's threshold_backward: a non-finite gradient where the
    ReLU was off contributes nothing, and a NaN forward value passes its gradient. Shape with more
    positions than one channels_last reduction chunk (256 rows) and a ragged lane tail (HW = 90)."""
    be = get_backend(backend)
    c, shape = 6, (4, 6, 9, 10)
    mask_src = torch.randn(shape, device=DEVICE)
    mask_src[torch.rand(shape, device=DEVICE) < 0.05] = float("nan")
    mask_src = mask_src.contiguous(memory_format=FMT[fmt])
    z = (1.0 + torch.randn(shape, device=DEVICE)).contiguous(memory_format=FMT[fmt])
    grad = torch.randn(shape, device=DEVICE)
    off = mask_src <= 0
    grad[off & (torch.rand(shape, device=DEVICE) < 0.5)] = float("inf")
    grad[off & (torch.rand(shape, device=DEVICE) < 0.5)] = float("nan")
    grad = grad.contiguous(memory_format=FMT[fmt])
    mean, invstd = 1 + 0.1 * torch.randn(c, device=DEVICE), 0.5 + torch.rand(c, device=DEVICE)
    want_gm = torch.ops.aten.threshold_backward(grad, mask_src, 0.0)
    sums = be.bn_backward_reduce(grad, mask_src, z, mean, invstd)
    xhat = (z - mean[:, None, None]) * invstd[:, None, None]
    want = (want_gm.double().sum((0, 2, 3)), (want_gm.double() * xhat.double()).sum((0, 2, 3)))
    for got, ref in zip(sums, want):
        assert torch.isfinite(got).all() and rel_err(got, ref) <= 1e-5
    count = shape[0] * shape[2] * shape[3]
    dz, gm = be.bn_backward_apply(grad, mask_src, z, mean, invstd, torch.randn(c, device=DEVICE), *sums, count,
                                  True, True)
    assert torch.isfinite(dz).all()
    assert torch.equal(gm, want_gm)


@pytest.mark.parametrize("backend", TRAIN_BACKENDS)
def test_large_conv_bias_does_not_cancel(backend):
    """A conv bias of 1000 puts each channel's mean far from zero: plain E[x^2] - E[x]^2 in fp32 would
    lose the variance; the partial (count, mean, M2) merge does not."""
    ref = randomize_(reference.Residual(4, 8, True, 2))
    with torch.no_grad():
        ref.conv1.bias.add_(1000.0)
        ref.conv2.bias.add_(-500.0)
    fused = fused_resnet.Residual(4, 8, True, 2, backend=backend)
    checks = compare_models(fused, ref, torch.randn(4, 4, 9, 9), train=True, dtype=torch.float32, device=DEVICE)
    by_name = {c.name: c for c in checks}
    assert by_name["bn1.running_var"].fused_err < 1e-4 and by_name["output"].ok
    assert not failures(checks), failures(checks)


@pytest.mark.parametrize("backend", TRAIN_BACKENDS)
def test_training_is_bitwise_repeatable(backend, deterministic):
    ref = randomize_(reference.Residual(5, 10, True, 2))
    x = torch.randn(3, 5, 9, 9, device=DEVICE)
    g = torch.randn(3, 10, 5, 5, device=DEVICE)
    results = []
    for _ in range(2):
        blk = fused_resnet.convert(copy.deepcopy(ref), backend=backend).to(DEVICE).train()
        xi = x.clone().requires_grad_()
        out = blk(xi)
        out.backward(g)
        results.append([out, xi.grad, *[p.grad for p in blk.parameters()], *blk.buffers()])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def _saved_bytes(model, x):
    """Bytes of distinct storages the autograd graph keeps for backward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    return sum(seen.values()), out


@pytest.mark.parametrize("backend", TRAIN_BACKENDS)
@pytest.mark.parametrize("use_1x1conv", [False, True])
def test_saves_no_more_activation_memory_than_eager(backend, use_1x1conv):
    cin, cout, s = (8, 16, 2) if use_1x1conv else (8, 8, 1)
    ref = randomize_(reference.Residual(cin, cout, use_1x1conv, s)).to(DEVICE)
    fused = fused_resnet.convert(copy.deepcopy(ref), backend=backend)
    x = torch.randn(2, cin, 12, 12, device=DEVICE, requires_grad=True)
    eager_bytes, _ = _saved_bytes(ref, x)
    fused_bytes, out = _saved_bytes(fused, x)
    activation = out.numel() * out.element_size()
    # eager keeps X, Z1, Y1, Z2 and out (Y1 shared by ReLU and conv2); fused keeps X, Z1, Z2, out.
    assert fused_bytes <= eager_bytes - activation // 2, (fused_bytes, eager_bytes)


@pytest.mark.parametrize("backend", [b for b in TRAIN_BACKENDS if b == "triton"])
def test_training_forward_launch_count(backend):
    from fused_resnet.backends.triton import counting
    blk = randomize_(fused_resnet.Residual(4, 8, True, 2, backend=backend)).to(DEVICE).train()
    x = torch.randn(2, 4, 6, 6, device=DEVICE, requires_grad=True)
    with counting() as launched:
        blk(x)
    assert sum(launched.values()) == 5 and launched["conv_bn_act"] == 2 and launched["bn_finalize"] == 2, launched
    assert launched["bn_add_relu"] == 1


@pytest.mark.parametrize("backend", TRAIN_BACKENDS)
def test_three_sgd_steps_of_seed_resnet18(backend):
    """Parameters and running statistics after three SGD steps (momentum 0.9), against a float64 run of
    the seed model, with eager float32's own error as the yardstick (a batch of 4 at 16x16 leaves a few
    values per channel in the last stages: an ill-conditioned BN, so the yardstick matters)."""
    torch.manual_seed(0)
    seed = randomize_(reference.resnet18())
    models = {"ref64": copy.deepcopy(seed).double(), "eager": copy.deepcopy(seed).to(DEVICE),
              "fused": fused_resnet.convert(copy.deepcopy(seed), backend=backend).to(DEVICE)}
    x = torch.randn(3, 4, 1, 16, 16, dtype=torch.float64)
    target = torch.randint(0, 10, (3, 4))
    for name, model in models.items():
        device = "cpu" if name == "ref64" else DEVICE
        dtype = torch.float64 if name == "ref64" else torch.float32
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        model.train()
        for step in range(3):
            opt.zero_grad()
            out = model(x[step].to(device=device, dtype=dtype))
            torch.nn.functional.cross_entropy(out, target[step].to(device)).backward()
            opt.step()
    states = {k: m.state_dict() for k, m in models.items()}
    floor = 2e-3 if HAS_CUDA else 1e-5
    for key, ref in states["ref64"].items():
        eager_err, fused_err = rel_err(states["eager"][key], ref), rel_err(states["fused"][key], ref)
        assert fused_err <= max(2 * eager_err, floor), (key, fused_err, eager_err)


@pytest.mark.parametrize("backend", TRAIN_BACKENDS)
def test_compiled_training_step_has_no_graph_breaks(backend):
    seed = randomize_(torch.nn.Sequential(reference.Residual(4, 4), reference.Residual(4, 8, True, 2)))
    fused = fused_resnet.convert(copy.deepcopy(seed), backend=backend).to(DEVICE).train()
    seed = seed.to(DEVICE).train()
    assert_compiled_step_matches(fused, seed, torch.randn(2, 4, 7, 7, device=DEVICE))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="autocast on CUDA needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", TRAIN_BACKENDS)
def test_training_step_under_autocast(backend, dtype):
    seed = randomize_(reference.Residual(32, 64, True, 2)).cuda()
    fused = fused_resnet.convert(copy.deepcopy(seed), backend=backend)
    x = torch.randn(8, 32, 28, 28, device="cuda")
    outs = []
    for model in (seed, fused):
        xi = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=dtype):
            out = model(xi)
        out.float().square().mean().backward()
        outs.append((out, xi.grad, model.conv1.weight.grad, model.bn1.weight.grad))
    for a, b in zip(*outs):
        assert a.dtype == b.dtype
        assert rel_err(b, a) <= 5e-2


@pytest.mark.parametrize("block_node", [True, False], ids=["compiled-nodes", "python-functions"])
@pytest.mark.parametrize("backend", TRAIN_BACKENDS)
def test_double_backward_raises_a_clear_error(backend, block_node, monkeypatch):
    """The fused backward runs primitives autograd does not see: under create_graph=True the first-order
    gradients are right, and differentiating them raises an error naming the block -- never a silently
    partial second derivative (before: x.grad came back all zeros)."""
    be = get_backend(backend)
    if block_node and not be.block_node:
        pytest.skip(f"{backend} composes its training block in Python only")
    monkeypatch.setattr(be, "block_node", block_node)
    ref = randomize_(reference.Residual(4, 4)).to(DEVICE).train()
    fused = fused_resnet.convert(copy.deepcopy(ref), backend=backend)
    x = torch.randn(2, 4, 6, 6, device=DEVICE, requires_grad=True)
    g, = torch.autograd.grad(fused(x).square().sum(), x, create_graph=True)
    want, = torch.autograd.grad(ref(x).square().sum(), x)
    torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(RuntimeError, match="fused block's backward is not differentiable"):
        g.square().sum().backward()


@pytest.mark.parametrize("backend", [b for b in TRAIN_BACKENDS if b == "triton"])
@pytest.mark.parametrize("size", [4, 16])
def test_backward_reduce_merges_only_what_needs_merging(backend, size):
    """A layer whose rows one reduce program covers (the tiny, host-bound ones) takes no merge launch; a
    larger one merges its partial rows. Both give the torch reference's per-channel sums."""
    from fused_resnet.backends.triton import bn, counting
    be = get_backend(backend)
    z, grad, mask = (torch.randn(2, 8, size, size, device=DEVICE) for _ in range(3))
    mean, invstd = torch.randn(8, device=DEVICE), 0.5 + torch.rand(8, device=DEVICE)
    with counting() as launched:
        sg, sgx = be.bn_backward_reduce(grad, mask, z, mean, invstd)
    tiles = -(-2 * size * size // bn.elementwise_config(8)[0])
    assert launched["sum_partials"] == (0 if tiles == 1 else 1), (tiles, launched)
    want_g, want_gx = REF.bn_backward_reduce(grad.double(), mask.double(), z.double(), mean.double(), invstd.double())
    assert sg.shape == sgx.shape == (8,)
    torch.testing.assert_close(sg.double(), want_g, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sgx.double(), want_gx, rtol=1e-5, atol=1e-5)
