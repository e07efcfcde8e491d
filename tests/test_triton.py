"""The Triton backend's primitives against the torch primitives (under the interpreter without a GPU),
its launch count, and how it fits torch.compile, autocast and CUDA graphs."""

import copy

import pytest
import torch

import fused_resnet
from fused_resnet import reference
from fused_resnet.backends import get_backend
from fused_resnet.backends.torch_ref import TorchBackend
from fused_resnet.backends.triton.configs import reachable_conv_configs
from fused_resnet.cases import seed_block_cases
from fused_resnet.testing import FLOORS, randomize_, rel_err

from tests.conftest import HAS_CUDA

pytestmark = pytest.mark.skipif("triton" not in fused_resnet.available_backends(),
                                reason="Triton needs a GPU or TRITON_INTERPRET=1")
REF = TorchBackend()
FMT = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}


def test_padding_is_applied_after_the_prologue():
    """A padded position contributes 0, not relu(in_shift): with scale 0 and shift 1 the prologue makes
    every real input 1, so a border output sums fewer taps than an interior one."""
    be = get_backend("triton")
    x = torch.randn(1, 16, 5, 5)
    w = torch.ones(16, 16, 3, 3)
    out = be.conv_fused(x, w, None, stride=1, padding=1, in_mean=torch.zeros(16), in_scale=torch.zeros(16),
                        in_shift=torch.ones(16)).out
    assert out[0, 0, 2, 2].item() == 9 * 16 and out[0, 0, 0, 0].item() == 4 * 16 and out[0, 0, 0, 2].item() == 6 * 16


# aten operations that never launch a kernel on a GPU: allocation and metadata.
NO_KERNEL_OPS = {"aten::empty", "aten::empty_strided", "aten::promote_types", "aten::view", "aten::as_strided",
                 "aten::detach", "aten::alias"}


@pytest.mark.parametrize("use_1x1conv", [False, True])
def test_eval_block_launches_exactly_two_kernels(use_1x1conv, unpoisoned):
    """What a user's run launches: two Triton kernels and nothing else -- no fold kernels, no copies, no
    casts, no fills. Proven on the CPU in a dry run (the launchers allocate and choose configurations,
    no kernel runs) with the profiler listing every aten operation, nested ones included; on a GPU the
    profiler's CUDA kernel list must show the same two."""
    from fused_resnet.backends.triton import counting, recording
    device = "cuda" if HAS_CUDA else "cpu"
    blk = randomize_(fused_resnet.Residual(4, 8 if use_1x1conv else 4, use_1x1conv, 2 if use_1x1conv else 1,
                                           backend="triton")).to(device).eval()
    x = torch.randn(2, 4, 6, 6, device=device)
    with torch.no_grad(), counting() as launched:
        blk(x)
    assert sum(launched.values()) == 2, launched
    with torch.no_grad(), recording(execute=False) as rec, torch.profiler.profile() as prof:
        blk(x)
    ops = {e.name for e in prof.events() if e.name.startswith("aten::")}
    assert len(rec.launches) == 2 and ops <= NO_KERNEL_OPS, (rec.launches, ops - NO_KERNEL_OPS)
    if HAS_CUDA:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof, torch.no_grad():
            blk(x)
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        assert len(kernels) == 2, [e.name for e in kernels]


def test_poisoned_outputs_are_fills_a_user_never_runs():
    """The test configuration's NaN poisoning adds one fill per output: the reason launch counts are taken
    with it off (``unpoisoned``)."""
    from fused_resnet.backends.triton import recording
    blk = randomize_(fused_resnet.Residual(4, 4, backend="triton")).eval()
    with torch.no_grad(), recording(execute=False), torch.profiler.profile() as prof:
        blk(torch.randn(2, 4, 6, 6))
    assert sum(e.name == "aten::fill_" for e in prof.events()) == 2


def _config_id(cfg):
    return f"{cfg.BLOCK_M}x{cfg.BLOCK_N}x{cfg.BLOCK_K}-w{cfg.num_warps}-s{cfg.num_stages}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("cfg", reachable_conv_configs(), ids=_config_id)
def test_every_reachable_tile_configuration(cfg, dtype):
    """Every configuration the tile table or the heuristic can give a convolution of the benchmark
    suites (on an H100 or an A100) runs under the interpreter, in every fused path, on a problem with
    two tiles in each dimension, ragged edges and a reduction of two channel chunks per tap."""
    from fused_resnet.backends.triton.configs import forced_conv_config
    from tests.test_primitives import VARIANTS, check_conv_variant
    shape = (3, cfg.BLOCK_K + 8, 7, 7, cfg.BLOCK_N + 8)  # (n, c, h, w, k): M = 147 rows
    be = get_backend("triton")
    with forced_conv_config(cfg):
        for variant in VARIANTS:
            check_conv_variant(be, "cpu", dtype, variant, shape, "nhwc")


def test_auto_uses_triton_for_cuda_eval():
    from fused_resnet.backends import resolve_backend
    if HAS_CUDA:
        assert resolve_backend("auto", torch.empty(1, 1, 1, 1, device="cuda"), False).name == "triton"
    assert resolve_backend("auto", torch.empty(1, 1, 1, 1), False).name != "triton"


def test_compiled_model_with_fused_blocks_has_no_graph_breaks():
    device = "cuda" if HAS_CUDA else "cpu"
    seed = torch.nn.Sequential(reference.Residual(4, 4), reference.Residual(4, 8, True, 2))
    randomize_(seed)
    model = fused_resnet.convert(copy.deepcopy(seed), backend="triton").to(device).eval()
    seed = seed.to(device).eval()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager" if not HAS_CUDA else "inductor")
    x = torch.randn(2, 4, 7, 7, device=device)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), seed(x), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_compiled_with_dynamic_shapes_follows_the_batch(training):
    """torch.compile(dynamic=True): the fake convolution picks the launcher's tile (and with it the shape of
    its statistics) from the sizes, which it specialises; each batch size gives eager's result."""
    device = "cuda" if HAS_CUDA else "cpu"
    seed = randomize_(reference.Residual(4, 8, True, 2)).to(device).train(training)
    model = fused_resnet.convert(copy.deepcopy(seed), backend="triton").train(training)
    compiled = torch.compile(model, fullgraph=True, dynamic=True,
                             backend="aot_eager" if not HAS_CUDA else "inductor")
    for n in (2, 3):
        x = torch.randn(n, 4, 8, 8, device=device)
        torch.testing.assert_close(compiled(x), seed(x), rtol=2e-3, atol=2e-3)
    if training:
        for name, b in seed.named_buffers():
            torch.testing.assert_close(model.get_buffer(name), b, rtol=2e-3, atol=2e-3, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="autocast on CUDA needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("use_1x1conv", [False, True])
def test_autocast_matches_eager_autocast(dtype, use_1x1conv):
    cin, cout, s = (64, 128, 2) if use_1x1conv else (64, 64, 1)
    seed = randomize_(reference.Residual(cin, cout, use_1x1conv, s)).cuda().eval()
    fused = fused_resnet.convert(copy.deepcopy(seed), backend="triton")
    x = torch.randn(8, cin, 28, 28, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
        want, got = seed(x), fused(x)
    assert got.dtype == want.dtype
    ref64 = copy.deepcopy(seed).double()(x.double())
    assert rel_err(got, ref64) <= max(2 * rel_err(want, ref64), FLOORS[dtype])


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="CUDA graphs need a GPU")
def test_eval_forward_captures_in_a_cuda_graph():
    blk = randomize_(fused_resnet.Residual(64, 128, True, 2, backend="triton")).cuda().eval()
    x = torch.randn(4, 64, 28, 28, device="cuda")
    with torch.no_grad():
        blk(x)  # compile the kernels outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = blk(x)
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(y, blk(x))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="seed shapes are GPU-sized")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", seed_block_cases(batches=(4,)),
                         ids=lambda c: c.id)
def test_eval_block_at_seed_shapes(case, dtype):
    from fused_resnet.testing import compare_models, failures
    seed = reference.Residual(case.in_channels, case.out_channels, case.use_1x1conv, case.stride)
    fused = fused_resnet.Residual(case.in_channels, case.out_channels, case.use_1x1conv, case.stride,
                                  backend="triton")
    randomize_(seed)
    for fmt in (torch.contiguous_format, torch.channels_last):
        checks = compare_models(fused, seed, torch.randn(case.input_shape), train=False, dtype=dtype,
                                device="cuda", grads=False, memory_format=fmt)
        assert not failures(checks), failures(checks)


@pytest.mark.parametrize("fmt", list(FMT))
@pytest.mark.parametrize("variant", ["bias-stats", "bn-relu", "prologue-shortcut-stats", "shortcut-nobias-scstats"])
def test_triton_operators_pass_opcheck(variant, fmt):
    """The Triton operators (``fused_resnet::triton_*``: what torch.compile traces and what the C++ training
    composition calls) against their schemas and fake implementations, with the arguments the extension's
    own operators are checked with (tests/test_ops.py)."""
    from tests.test_ops import CONV_VARIANTS, _conv_args, opcheck_primitives
    from fused_resnet.backends.triton import ops
    device = "cuda" if HAS_CUDA else "cpu"
    args = _conv_args(device, torch.float32, FMT[fmt], **CONV_VARIANTS[variant])
    opcheck_primitives(ops.PREFIX, args)
    if ops.replayed_conv_fused_op is not None:  # the convolution as eager calls it (replay.py)
        torch.library.opcheck(ops.replayed_conv_fused_op, args)
        torch.library.opcheck(ops.replayed_conv_out_op, args)  # its first result alone: eager inference's


def test_tuned_entries_key_the_training_variant_apart(monkeypatch):
    """A ``TUNED_CONV`` entry for the training variant (prologue and/or statistics) serves the training
    composition's convolutions and not inference's; the fake implementation predicts the statistics rows
    its tile gives, and the statistics are right."""
    from fused_resnet.backends.triton import configs, launch, ops
    from fused_resnet.backends.torch_ref import merge_stats
    be = get_backend("triton")
    device = "cuda" if HAS_CUDA else "cpu"
    x, w = torch.randn(2, 8, 6, 6, device=device), torch.randn(8, 8, 3, 3, device=device) / 8
    model = configs.device_model(x.device)
    eval_cfg = configs.conv_config(8, 8, 72, 36, 3, torch.float32, model)
    train_cfg = configs.ConvConfig(128 if eval_cfg.BLOCK_M == 64 else 64, eval_cfg.BLOCK_N, eval_cfg.BLOCK_K, 8, 4, 2)
    monkeypatch.setitem(configs.TUNED_CONV, (8, 8, 36, 3, torch.float32, model.arch, True), train_cfg)
    bn = (torch.randn(8, device=device), torch.rand(8, device=device) + 0.5, torch.randn(8, device=device),
          torch.randn(8, device=device), 1e-5)
    with launch.recording() as rec:
        train = be.conv_fused(x, w, None, stride=1, padding=1, stats=True)
        be.conv_fused(x, w, None, stride=1, padding=1, bn=bn, relu=True)
    blocks = [dict(spec.constexprs)["BLOCK_M"] for spec, _, _ in rec.launches]
    assert blocks == [train_cfg.BLOCK_M, eval_cfg.BLOCK_M]
    assert train.part_mean.shape == (-(-72 // train_cfg.BLOCK_M), 8)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fake = ops.conv_fused_op(mode.from_tensor(x), mode.from_tensor(w), None, 1, 1, None, None, None, None, 0.0,
                                 None, None, None, None, None, None, None, 1, False, False, True, torch.float32, False)
    assert [tuple(t.shape) for t in fake[2:5]] == [tuple(t.shape) for t in train[2:5]]
    mean, m2, count = merge_stats(train.part_mean, train.part_m2, train.part_count)
    ref = torch.nn.functional.conv2d(x.double(), w.double(), padding=1)
    torch.testing.assert_close(mean.double(), ref.mean(dim=(0, 2, 3)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m2.double() / count, ref.var(dim=(0, 2, 3), unbiased=False), rtol=1e-4, atol=1e-5)
