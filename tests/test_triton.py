"""The Triton backend's primitives against the torch primitives (under the interpreter without a GPU),
its launch count, and how it fits torch.compile, autocast and CUDA graphs."""

import copy
import itertools

import pytest
import torch

import fused_resnet
from fused_resnet import reference
from fused_resnet.backends import get_backend
from fused_resnet.backends.torch_ref import TorchBackend, merge_stats
from fused_resnet.cases import seed_block_cases
from fused_resnet.testing import FLOORS, randomize_, rel_err

from tests.conftest import HAS_CUDA, device_dtype_params

pytestmark = pytest.mark.skipif("triton" not in fused_resnet.available_backends(),
                                reason="Triton needs a GPU or TRITON_INTERPRET=1")
REF = TorchBackend()
FMT = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}


def _tol(dtype):
    # The kernel and the torch primitive both accumulate in fp32; they differ by the order of sums
    # (and TF32 on a GPU), and by one rounding of the stored result.
    if dtype == torch.float32:
        return 2e-3 if HAS_CUDA else 1e-5
    return FLOORS[dtype]


def _vec(c, device, offset=0.0, scale=0.3):
    return offset + scale * torch.randn(c, device=device)


# (name, kernel, stride, options): each row exercises one fused path of conv_bn_act_kernel.
VARIANTS = [
    ("bias", 3, 1, dict(bias=True)),
    ("bias-stats-s2", 3, 2, dict(bias=True, stats=True)),
    ("bn-relu", 3, 1, dict(bias=True, bn=True, relu=True)),
    ("bn-residual-relu", 3, 1, dict(bias=True, bn=True, residual=True, relu=True)),
    ("bn-shortcut-relu", 3, 1, dict(bias=True, bn=True, shortcut="add", relu=True)),
    ("prologue-stats-shortcut", 3, 1, dict(bias=True, prologue=True, stats=True, shortcut="separate")),
    ("1x1-s2", 1, 2, dict(bias=True, relu=True)),
]
SHAPES = [(2, 5, 7, 7, 5), (2, 3, 9, 11, 24), (3, 13, 5, 5, 16)]


@pytest.mark.parametrize("fmt", list(FMT))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("variant", VARIANTS, ids=[v[0] for v in VARIANTS])
@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_conv_fused_matches_torch(device, dtype, variant, shape, fmt):
    _, kernel, stride, opt = variant
    n, c, h, w, k = shape
    be = get_backend("triton")
    x = torch.randn(n, c, h, w, device=device, dtype=dtype).contiguous(memory_format=FMT[fmt])
    weight = (torch.randn(k, c, kernel, kernel, device=device) / (c * kernel * kernel) ** 0.5).to(dtype)
    pad = kernel // 2
    p, q = (h + 2 * pad - kernel) // stride + 1, (w + 2 * pad - kernel) // stride + 1
    kw = dict(stride=stride, padding=pad, relu=opt.get("relu", False), stats=opt.get("stats", False))
    bias = _vec(k, device, scale=0.5).to(dtype) if opt.get("bias") else None
    if opt.get("bn"):
        kw["bn"] = (_vec(k, device), 0.5 + torch.rand(k, device=device), _vec(k, device, 1.0), _vec(k, device),
                    1e-5)
    if opt.get("prologue"):
        kw["in_mean"], kw["in_scale"], kw["in_shift"] = _vec(c, device), _vec(c, device, 1.0), _vec(c, device, 0.5)
    if opt.get("residual"):
        kw["residual"] = torch.randn(n, k, p, q, device=device, dtype=dtype).contiguous(memory_format=FMT[fmt])
    if opt.get("shortcut"):
        sc_c = c + 2
        kw["sc_x"] = torch.randn(n, sc_c, h * stride, w * stride, device=device, dtype=dtype)
        kw["sc_x"] = kw["sc_x"].contiguous(memory_format=FMT[fmt])
        kw["sc_weight"] = (torch.randn(k, sc_c, 1, 1, device=device) / sc_c ** 0.5).to(dtype)
        kw["sc_bias"] = _vec(k, device).to(dtype)
        kw["sc_stride"] = stride
        kw["sc_separate"] = opt["shortcut"] == "separate"
    got = be.conv_fused(x, weight, bias, **kw)
    want = REF.conv_fused(x, weight, bias, **kw)
    tol = _tol(dtype)
    assert got.out.dtype == dtype and got.out.shape == want.out.shape
    assert got.out.is_contiguous(memory_format=FMT[fmt]), "output must keep the input's memory format"
    assert rel_err(got.out, want.out) <= tol
    if opt.get("shortcut") == "separate":
        assert rel_err(got.shortcut, want.shortcut) <= tol
    if kw["stats"]:
        mean, m2, count = merge_stats(got.part_mean, got.part_m2, got.part_count)
        mean_ref, m2_ref, count_ref = merge_stats(want.part_mean, want.part_m2, want.part_count)
        assert count.item() == count_ref.item() == n * p * q
        assert rel_err(mean, mean_ref) <= tol and rel_err(m2, m2_ref) <= tol


def test_padding_is_applied_after_the_prologue():
    """A padded position contributes 0, not relu(in_shift): with scale 0 and shift 1 the prologue makes
    every real input 1, so a border output sums fewer taps than an interior one."""
    be = get_backend("triton")
    x = torch.randn(1, 16, 5, 5)
    w = torch.ones(16, 16, 3, 3)
    out = be.conv_fused(x, w, None, stride=1, padding=1, in_mean=torch.zeros(16), in_scale=torch.zeros(16),
                        in_shift=torch.ones(16)).out
    assert out[0, 0, 2, 2].item() == 9 * 16 and out[0, 0, 0, 0].item() == 4 * 16 and out[0, 0, 0, 2].item() == 6 * 16


@pytest.mark.parametrize("use_1x1conv", [False, True])
def test_eval_block_launches_exactly_two_kernels(use_1x1conv):
    from fused_resnet.backends.triton import counting
    device = "cuda" if HAS_CUDA else "cpu"
    blk = randomize_(fused_resnet.Residual(4, 8 if use_1x1conv else 4, use_1x1conv, 2 if use_1x1conv else 1,
                                           backend="triton")).to(device).eval()
    x = torch.randn(2, 4, 6, 6, device=device)
    with torch.no_grad(), counting() as launched:
        blk(x)
    assert sum(launched.values()) == 2, launched
    if HAS_CUDA:  # and nothing else reaches the GPU: no fold kernels, no copies
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof, torch.no_grad():
            blk(x)
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        assert len(kernels) == 2, [e.name for e in kernels]


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
