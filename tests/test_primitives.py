"""Each compiled or Triton backend's primitives against the torch primitives (the oracle): the fused
convolution in every fused path, on odd shapes and channel counts, NCHW and channels_last."""

import pytest
import torch

import fused_resnet
from fused_resnet.backends import get_backend
from fused_resnet.backends.torch_ref import TorchBackend, merge_stats
from fused_resnet.testing import FLOORS, rel_err

from tests.conftest import HAS_CUDA, device_dtype_params

REF = TorchBackend()
FMT = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
FUSED_BACKENDS = [b for b in fused_resnet.available_backends()
                  if b != "torch" and "conv_fused" in getattr(get_backend(b), "native", {"conv_fused"})]


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
    # a Bottleneck's last 1x1 conv in training: the downsample apart, with its own BN's statistics
    ("1x1-prologue-stats-shortcut-bn", 1, 1, dict(prologue=True, stats=True, shortcut="separate", sc_stats=True,
                                                  sc_bias=False)),
    ("bn-shortcut-nobias-relu", 3, 1, dict(bn=True, shortcut="add", sc_bias=False, relu=True)),
]
# (n, c, h, w, k). The last has channel counts that fill whole 16-byte vectors (8 x 16-bit, 4 x fp32):
# in channels_last, with channels_last weights as a converted model has, the CUDA kernel takes its
# cp.async path there and its strided-gather path on the others.
SHAPES = [(2, 5, 7, 7, 5), (2, 3, 9, 11, 24), (3, 13, 5, 5, 16), (2, 8, 6, 7, 16)]


@pytest.mark.parametrize("fmt", list(FMT))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("variant", VARIANTS, ids=[v[0] for v in VARIANTS])
@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_conv_fused_matches_torch(backend, device, dtype, variant, shape, fmt):
    be = get_backend(backend)
    if be.supports(device, dtype, False) is not None:
        pytest.skip(be.supports(device, dtype, False))
    check_conv_variant(be, device, dtype, variant, shape, fmt)


def check_conv_variant(be, device, dtype, variant, shape, fmt):
    """One fused path of ``be.conv_fused`` (a VARIANTS row) on an (n, c, h, w, k) problem against the
    torch primitive: output, separate shortcut, merged statistics, memory format and dtype."""
    _, kernel, stride, opt = variant
    n, c, h, w, k = shape
    x = torch.randn(n, c, h, w, device=device, dtype=dtype).contiguous(memory_format=FMT[fmt])
    weight = (torch.randn(k, c, kernel, kernel, device=device) / (c * kernel * kernel) ** 0.5).to(dtype)
    weight = weight.contiguous(memory_format=FMT[fmt])  # as model.to(memory_format=...) lays them out
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
        sc_c = c + 8  # a whole number of vectors exactly when c is
        kw["sc_x"] = torch.randn(n, sc_c, h * stride, w * stride, device=device, dtype=dtype)
        kw["sc_x"] = kw["sc_x"].contiguous(memory_format=FMT[fmt])
        kw["sc_weight"] = (torch.randn(k, sc_c, 1, 1, device=device) / sc_c ** 0.5).to(dtype)
        kw["sc_weight"] = kw["sc_weight"].contiguous(memory_format=FMT[fmt])
        kw["sc_bias"] = _vec(k, device).to(dtype) if opt.get("sc_bias", True) else None
        kw["sc_stride"] = stride
        kw["sc_separate"] = opt["shortcut"] == "separate"
        kw["sc_stats"] = opt.get("sc_stats", False)
    got = be.conv_fused(x, weight, bias, **kw)
    want = REF.conv_fused(x, weight, bias, **kw)
    tol = _tol(dtype)
    assert got.out.dtype == dtype and got.out.shape == want.out.shape
    assert got.out.is_contiguous(memory_format=FMT[fmt]), "output must keep the input's memory format"
    assert rel_err(got.out, want.out) <= tol
    if opt.get("shortcut") == "separate":
        assert rel_err(got.shortcut, want.shortcut) <= tol
    pairs = [("part_mean", "part_m2")] if kw["stats"] else []
    pairs += [("sc_part_mean", "sc_part_m2")] if kw.get("sc_stats") else []
    for mean_name, m2_name in pairs:
        mean, m2, count = merge_stats(getattr(got, mean_name), getattr(got, m2_name), got.part_count)
        mean_ref, m2_ref, count_ref = merge_stats(getattr(want, mean_name), getattr(want, m2_name), want.part_count)
        assert count.item() == count_ref.item() == n * p * q
        assert rel_err(mean, mean_ref) <= tol and rel_err(m2, m2_ref) <= tol, mean_name
