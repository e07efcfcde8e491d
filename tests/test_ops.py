"""The compiled operators: CPU kernel (and CUDA where present) against the torch primitive, opcheck,
and torch.compile."""

import os
import shutil

import pytest
import torch

from fused_resnet.backends import extension
from fused_resnet.backends.torch_ref import TorchBackend
from fused_resnet.testing import rel_err

from tests.conftest import device_dtype_params

pytestmark = pytest.mark.skipif(not extension.has_ops(), reason="fused_resnet._C is not built "
                                "(pip install --no-build-isolation -e .)")
REF = TorchBackend()


def _bn_act_args(device, dtype, fmt, residual, out_dtype=None):
    z = (2 + torch.randn(3, 5, 7, 9, device=device)).to(dtype).contiguous(memory_format=fmt)
    mean = 2 + 0.1 * torch.randn(5, device=device)
    scale = torch.randn(5, device=device)
    shift = torch.randn(5, device=device)
    res = None
    if residual:
        res = torch.randn(3, 5, 7, 9, device=device, dtype=out_dtype or dtype).contiguous(memory_format=fmt)
    return z, mean, scale, shift, res


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("device,dtype", device_dtype_params(cpu_dtypes=(torch.float32, torch.float16,
                                                                          torch.bfloat16)))
def test_bn_act_matches_torch(device, dtype, fmt, residual, relu):
    if not extension.has_kernel("bn_act", device.upper()):
        pytest.skip(f"no {device} kernel in this build")
    z, mean, scale, shift, res = _bn_act_args(device, dtype, fmt, residual)
    out = extension.bn_act(z, mean, scale, shift, res, relu)
    expected = REF.bn_act(z, mean, scale, shift, res, relu)
    assert out.dtype == dtype and out.is_contiguous(memory_format=fmt)
    assert rel_err(out, expected) <= (1e-6 if dtype == torch.float32 else 4e-3)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("device,dtype", device_dtype_params(cpu_dtypes=(torch.float16,),
                                                             cuda_dtypes=(torch.bfloat16,)))
def test_bn_act_mixed_dtypes_for_autocast(device, dtype):
    """z in half precision, residual and output in float32: the identity shortcut under autocast."""
    z, mean, scale, shift, res = _bn_act_args(device, dtype, torch.contiguous_format, True, torch.float32)
    out = extension.bn_act(z, mean, scale, shift, res, True, torch.float32)
    assert out.dtype == torch.float32
    assert rel_err(out, REF.bn_act(z, mean, scale, shift, res, True, torch.float32)) <= 1e-6


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("device,dtype", device_dtype_params(cpu_dtypes=(torch.float32,),
                                                             cuda_dtypes=(torch.float32, torch.float16)))
def test_bn_act_opcheck(device, dtype, requires_grad):
    if not extension.has_kernel("bn_act", device.upper()):
        pytest.skip(f"no {device} kernel in this build")
    for fmt in (torch.contiguous_format, torch.channels_last):
        for residual in ("none", "plain", "bn"):
            z, mean, scale, shift, res = _bn_act_args(device, dtype, fmt, residual != "none")
            res_bn = (torch.randn(5, device=device), 0.5 + torch.rand(5, device=device),
                      torch.randn(5, device=device)) if residual == "bn" else (None, None, None)
            if requires_grad:
                for t in (z, mean, scale, shift, res, *res_bn):
                    if t is not None:
                        t.requires_grad_()
            torch.library.opcheck(torch.ops.fused_resnet.bn_act.default,
                                  (z, mean, scale, shift, res, True, dtype, *res_bn))


@pytest.mark.parametrize("device,dtype", device_dtype_params(cpu_dtypes=(torch.float32, torch.float16)))
def test_bn_act_with_the_residuals_own_batch_norm(device, dtype):
    """relu(BN(z) + BN_s(s)): the final kernel of a block whose shortcut convolution has its own BN."""
    if not extension.has_kernel("bn_act", device.upper()):
        pytest.skip(f"no {device} kernel in this build")
    for fmt in (torch.contiguous_format, torch.channels_last):
        z, mean, scale, shift, res = _bn_act_args(device, dtype, fmt, True)
        res_bn = (torch.randn(5, device=device), 0.5 + torch.rand(5, device=device), torch.randn(5, device=device))
        for out_dtype in (dtype, torch.float32):
            out = extension.bn_act(z, mean, scale, shift, res, True, out_dtype, res_bn)
            want = REF.bn_act(z, mean, scale, shift, res, True, out_dtype, res_bn)
            assert out.dtype == out_dtype and out.is_contiguous(memory_format=fmt)
            assert rel_err(out, want) <= (1e-6 if dtype == torch.float32 else 4e-3)


def test_bn_act_rejects_bad_arguments():
    z = torch.randn(2, 3, 4, 4)
    with pytest.raises(RuntimeError, match="scale must have shape"):
        extension.bn_act(z, torch.zeros(3), torch.ones(4), torch.zeros(3))
    with pytest.raises(RuntimeError, match="scale must be float32"):
        torch.ops.fused_resnet.bn_act(z, torch.zeros(3), torch.ones(3, dtype=torch.float64), torch.zeros(3), None,
                                      True, torch.float32)
    with pytest.raises(RuntimeError, match="z must be 4-D"):
        extension.bn_act(torch.randn(3, 4), torch.zeros(3), torch.ones(3), torch.zeros(3))
    with pytest.raises(RuntimeError, match="residual must have z's shape"):
        extension.bn_act(z, torch.zeros(3), torch.ones(3), torch.zeros(3), torch.randn(2, 3, 4, 5))
    with pytest.raises(RuntimeError, match="z must be float32, float16 or bfloat16"):
        extension.bn_act(z.double(), torch.zeros(3), torch.ones(3), torch.zeros(3))


def test_bn_act_compiles_without_graph_breaks():
    z, mean, scale, shift, res = _bn_act_args("cpu", torch.float32, torch.channels_last, True)
    fn = torch.compile(lambda *a: extension.bn_act(*a) * 2, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(fn(z, mean, scale, shift, res), 2 * REF.bn_act(z, mean, scale, shift, res))


def _conv_args(device, dtype, fmt, *, prologue=False, bn=False, shortcut=False, stats=False, sc_bias=True,
               sc_stats=False):
    n, c, k = 2, 5, 6
    x = torch.randn(n, c, 7, 9, device=device, dtype=dtype).contiguous(memory_format=fmt)
    w = (torch.randn(k, c, 3, 3, device=device) / 6).to(dtype)
    vec = lambda m, off=0.0: off + 0.3 * torch.randn(m, device=device)  # noqa: E731
    bn_args = (vec(k), 0.5 + torch.rand(k, device=device), vec(k, 1.0), vec(k)) if bn else (None,) * 4
    pro = (vec(c), vec(c, 1.0), vec(c)) if prologue else (None,) * 3
    sc = ((torch.randn(n, 3, 7, 9, device=device, dtype=dtype).contiguous(memory_format=fmt),
           (torch.randn(k, 3, 1, 1, device=device) / 2).to(dtype), vec(k).to(dtype) if sc_bias else None)
          if shortcut else (None,) * 3)
    return (x, w, vec(k).to(dtype), 1, 1, *bn_args, 1e-5, *pro, None, *sc, 1, shortcut, not stats, stats, dtype,
            sc_stats)


CONV_VARIANTS = {"bias-stats": dict(stats=True), "bn-relu": dict(bn=True),
                 "prologue-shortcut-stats": dict(prologue=True, shortcut=True, stats=True),
                 "shortcut-nobias-scstats": dict(prologue=True, shortcut=True, sc_bias=False, sc_stats=True)}


@pytest.mark.parametrize("variant", list(CONV_VARIANTS))
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("device,dtype", device_dtype_params(cpu_dtypes=(torch.float32,),
                                                             cuda_dtypes=(torch.float32, torch.float16)))
def test_every_op_passes_opcheck(device, dtype, fmt, variant):
    """opcheck on the ops the composition differentiates itself (no op-level autograd: their gradients
    are the block's backward in fused_resnet/functional.py), with inputs that do not require grad."""
    if not extension.has_kernel("conv_fused", device.upper()):
        pytest.skip(f"conv_fused has no {device} kernel in this build")
    opcheck_primitives("", _conv_args(device, dtype, fmt, **CONV_VARIANTS[variant]))


def opcheck_primitives(prefix: str, conv_args: tuple) -> None:
    """opcheck on a family of primitive operators (``fused_resnet::<prefix>conv_fused``, ...: the
    extension's, or the Triton backend's with ``prefix="triton_"``), each with inputs derived from one
    convolution's arguments (``_conv_args``)."""
    op = lambda name: getattr(torch.ops.fused_resnet, prefix + name).default  # noqa: E731
    device = conv_args[0].device
    torch.library.opcheck(op("conv_fused"), conv_args)
    out, _, pm, pq, pc, *_ = op("conv_fused")(*conv_args)
    if pm.numel():
        k = pm.shape[1]
        rm, rv = torch.randn(k, device=device), 0.5 + torch.rand(k, device=device)
        fin = (pm, pq, pc, torch.ones(k, device=device), torch.zeros(k, device=device), 1e-5, rm, rv, 0.1)
        torch.library.opcheck(op("bn_finalize"), fin)
        torch.library.opcheck(op("bn_finalize"), fin[:6] + (None, None, 0.1))
        torch.library.opcheck(op("bn_finalize"), fin + (torch.tensor(5, device=device),))
        gamma = torch.randn(k, device=device, dtype=torch.float16)  # any dtype, read as it is
        torch.library.opcheck(op("bn_fold"), (rm, rv, gamma, torch.randn(k, device=device), 1e-5))
    z = out
    c = z.shape[1]
    mean, invstd = torch.randn(c, device=device), 0.5 + torch.rand(c, device=device)
    scale = torch.randn(c, device=device)
    grad, mask = torch.randn_like(z), torch.randn_like(z)
    torch.library.opcheck(op("bn_backward_reduce"), (grad, mask, z, mean, invstd))
    sums = op("bn_backward_reduce")(grad, mask, z, mean, invstd)
    for batch_stats in (True, False):
        torch.library.opcheck(op("bn_backward_apply"),
                              (grad, mask, z, mean, invstd, scale, *sums, 17, batch_stats, True))
    torch.library.opcheck(op("bn_act"), (z, mean, scale, invstd, mask, True, z.dtype, None, None, None))
    torch.library.opcheck(op("bn_act"), (z, mean, scale, invstd, mask, False, z.dtype, mean, scale, invstd))


@pytest.mark.parametrize("param_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_channel_parameters_are_read_in_their_own_dtype(device, param_dtype):
    """Biases and batch norm parameters of a float16/bfloat16 model go to the kernels as they are (no
    conversion operator per call) and give the same bits as their float32 values; a strided one (a view)
    takes the converted copy."""
    if not extension.has_kernel("conv_fused", device.upper()):
        pytest.skip(f"no {device} kernel in this build")
    g = torch.Generator().manual_seed(5)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    k, c = 16, 8
    x = torch.randn(2, c, 6, 6, generator=g).to(device, dtype).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(k, c, 3, 3, generator=g) / 8).to(device, dtype).contiguous(memory_format=torch.channels_last)
    sc_x = torch.randn(2, c, 6, 6, generator=g).to(device, dtype).contiguous(memory_format=torch.channels_last)
    sc_w = (torch.randn(k, c, 1, 1, generator=g) / 3).to(device, dtype).contiguous(memory_format=torch.channels_last)
    vec = lambda lo: (lo + torch.rand(2 * k, generator=g)).to(device, param_dtype)[::2]  # strided views
    bias, mean, var, gamma, beta, sc_bias = vec(-0.5), vec(-0.5), vec(0.5), vec(0.5), vec(-0.5), vec(-0.5)
    dense = [t.contiguous() for t in (bias, mean, var, gamma, beta, sc_bias)]

    def run(bias, mean, var, gamma, beta, sc_bias):
        return torch.ops.fused_resnet.conv_fused(x, w, bias, 1, 1, mean, var, gamma, beta, 1e-5, None, None, None,
                                                 None, sc_x, sc_w, sc_bias, 1, False, True, False, dtype)[0]

    want = run(*[t.float() for t in dense])
    assert torch.equal(run(*dense), want)  # read as they are
    assert torch.equal(run(bias, mean, var, gamma, beta, sc_bias), want)  # strided: converted
    # bn_finalize's gamma and beta likewise
    pm, pm2 = torch.randn(3, k, generator=g).to(device), torch.rand(3, k, generator=g).to(device)
    pc = torch.full((3,), 4.0, device=device)
    fin = lambda gm, bt: torch.ops.fused_resnet.bn_finalize(pm, pm2, pc, gm, bt, 1e-5, None, None, 0.1)
    for got, exp in zip(fin(dense[3], dense[4]), fin(dense[3].float(), dense[4].float())):
        assert torch.equal(got, exp)


def test_conv_fused_rejects_bad_arguments():
    args = list(_conv_args("cpu", torch.float32, torch.contiguous_format))
    op = torch.ops.fused_resnet.conv_fused.default
    with pytest.raises(RuntimeError, match=r"weight must be \(K, 5, k, k\)"):
        op(*[torch.randn(6, 4, 3, 3) if i == 1 else a for i, a in enumerate(args)])
    with pytest.raises(RuntimeError, match="weight must have x's dtype"):
        op(*[args[1].double() if i == 1 else a for i, a in enumerate(args)])
    with pytest.raises(RuntimeError, match="x must be 4-D"):
        op(*[args[0][0] if i == 0 else a for i, a in enumerate(args)])
    with pytest.raises(RuntimeError, match="in_mean, in_scale and in_shift go together"):
        op(*[torch.zeros(5) if i == 10 else a for i, a in enumerate(args)])
    with pytest.raises(RuntimeError, match=r"residual must have the output's shape"):
        op(*[torch.zeros(2, 6, 7, 8) if i == 13 else a for i, a in enumerate(args)])
    with pytest.raises(RuntimeError, match="part_count must be"):
        torch.ops.fused_resnet.bn_finalize(torch.zeros(3, 4), torch.zeros(3, 4), torch.ones(2), torch.ones(4),
                                           torch.zeros(4), 1e-5, None, None, 0.1)
    fold = torch.ops.fused_resnet.bn_fold
    with pytest.raises(RuntimeError, match=r"bn_fold: running_var must have shape \(4\)"):
        fold(torch.zeros(4), torch.ones(5), torch.ones(4), torch.zeros(4), 1e-5)
    with pytest.raises(RuntimeError, match="bn_fold: running_mean must be 1-D"):
        fold(torch.zeros(1, 4), torch.ones(4), torch.ones(4), torch.zeros(4), 1e-5)
    with pytest.raises(RuntimeError, match="must be floating point"):
        fold(torch.zeros(4), torch.ones(4), torch.ones(4, dtype=torch.int64), torch.zeros(4), 1e-5)
    for bad in (torch.tensor(3.0), torch.tensor([3, 4]), torch.tensor(3, dtype=torch.int32)):
        with pytest.raises(RuntimeError, match="num_batches_tracked must be one int64 element"):
            torch.ops.fused_resnet.bn_finalize(torch.zeros(3, 4), torch.ones(3, 4), torch.ones(3), torch.ones(4),
                                               torch.zeros(4), 1e-5, None, None, 0.1, bad)
    with pytest.raises(RuntimeError, match="grad must have z's shape"):
        z = torch.randn(2, 3, 4, 4)
        torch.ops.fused_resnet.bn_backward_reduce(torch.randn(2, 3, 4, 5), z, z, torch.zeros(3), torch.ones(3))


@pytest.mark.parametrize("kernel,stride,padding", [(3, 1, 1), (3, 2, 1), (1, 2, 0), (3, 1, 0), (2, 3, 2)])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_im2col_matches_unfold(device, dtype, fmt, kernel, stride, padding):
    """The implicit GEMM's addressing (conv_geometry.h, shared by the CUDA convolution kernel) against
    F.unfold: output size, padding, strides, the tap of every row and column, in either layout."""
    if not extension.has_kernel("im2col", device.upper()):
        pytest.skip(f"no im2col kernel for {device} in this build")
    x = torch.randn(2, 3, 7, 6, device=device).to(dtype).contiguous(memory_format=fmt)
    got = extension.im2col(x, kernel, stride, padding)
    want = torch.nn.functional.unfold(x.float(), kernel, padding=padding, stride=stride)
    want = want.transpose(1, 2).reshape(-1, want.shape[1]).to(dtype)
    assert torch.equal(got, want)
    torch.library.opcheck(torch.ops.fused_resnet.im2col.default, (x, kernel, stride, padding))


def test_im2col_errors_name_the_problem():
    if not extension.has_kernel("im2col", "CPU"):
        pytest.skip("no im2col CPU kernel in this build")
    with pytest.raises(RuntimeError, match="x must be 4-D"):
        extension.im2col(torch.randn(3, 7, 6), 3, 1, 1)
    with pytest.raises(RuntimeError, match="does not fit"):
        extension.im2col(torch.randn(1, 2, 2, 2), 3, 1, 0)
    with pytest.raises(RuntimeError, match="stride >= 1"):
        extension.im2col(torch.randn(1, 2, 5, 5), 3, 0, 1)


def test_cuda_kernels_are_built_where_the_toolkit_is():
    """Where nvcc and a CUDA build of torch are present, the build compiles the CUDA kernels (no GPU
    needed): CI fails here if they were silently left out."""
    if os.environ.get("FUSED_RESNET_NO_CUDA") or torch.version.cuda is None or shutil.which("nvcc") is None:
        pytest.skip("no CUDA toolkit here (nvcc, a CUDA build of torch), or FUSED_RESNET_NO_CUDA is set")
    missing = [op for op in (*extension.OPS, "im2col") if not extension.has_kernel(op, "CUDA")]
    assert not missing, f"ops without a CUDA kernel in this build: {missing}"

