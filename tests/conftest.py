"""Test set-up. TRITON_INTERPRET must be set before any Triton kernel is decorated, so this runs before
anything imports fused_resnet: without a GPU, every Triton kernel runs under the interpreter."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fused_resnet  # noqa: E402
from fused_resnet.backends import base  # noqa: E402

# Kernels' outputs start as NaN, so an element a kernel forgot to write fails every comparison.
base.POISON_OUTPUTS = True

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def device_dtype_params(cpu_dtypes=(torch.float32, torch.float16),
                        cuda_dtypes=(torch.float32, torch.float16, torch.bfloat16)):
    """(device, dtype) pairs: CPU cases run everywhere, CUDA cases where a GPU is present."""
    params = [pytest.param("cpu", d, id=f"cpu-{str(d)[6:]}") for d in cpu_dtypes]
    params += [pytest.param("cuda", d, id=f"cuda-{str(d)[6:]}", marks=pytest.mark.gpu) for d in cuda_dtypes
               if HAS_CUDA]
    return params


def backends_for(device: str, training: bool = False) -> list[str]:
    """Every available backend that can serve ``device``."""
    names = []
    for name in fused_resnet.available_backends():
        if fused_resnet.backends.get_backend(name).supports(device, torch.float32, training) is None:
            names.append(name)
    return names
