"""The compiled operators: CPU kernel (and CUDA where present) against the torch primitive, opcheck,
and torch.compile."""

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
        for residual in (True, False):
            z, mean, scale, shift, res = _bn_act_args(device, dtype, fmt, residual)
            if requires_grad:
                for t in (z, mean, scale, shift, res):
                    if t is not None:
                        t.requires_grad_()
            torch.library.opcheck(torch.ops.fused_resnet.bn_act.default, (z, mean, scale, shift, res, True, dtype))


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
