"""Test set-up. TRITON_INTERPRET must be set before any Triton kernel is decorated, so this runs before
anything imports fused_resnet: without a GPU, every Triton kernel runs under the interpreter."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fused_resnet  # noqa: E402
from fused_resnet.backends import base  # noqa: E402

# Kernels' outputs start as NaN, so an element a kernel forgot to write fails every comparison. A test
# device only: tests that count what a user's run launches turn it off (the fills are launches too).
base.POISON_OUTPUTS = True

# FUSED_RESNET_RECORD_LAUNCHES=path: every distinct Triton kernel variant the session launches is written
# there as LaunchSpec lines, for the ahead-of-time compile check (`python -m fused_resnet kernels
# --variants path`, run by CI with the GPU machine's Triton release as well). With FUSED_RESNET_DRY_LAUNCHES=1
# the kernels are listed and not run: results are garbage and failures expected -- how the GPU run lists
# the variants its test steps will need and compiles them ahead, in parallel, before they run.
_RECORD_PATH = os.environ.get("FUSED_RESNET_RECORD_LAUNCHES")
_SESSION_RECORDER = None


def pytest_sessionstart(session):
    global _SESSION_RECORDER
    if _RECORD_PATH and "triton" in fused_resnet.available_backends():
        from fused_resnet.backends.triton import launch
        _SESSION_RECORDER = launch.Recorder(execute=os.environ.get("FUSED_RESNET_DRY_LAUNCHES") != "1")
        launch._RECORDERS.append(_SESSION_RECORDER)


def pytest_sessionfinish(session, exitstatus):
    if _SESSION_RECORDER is not None:
        import json
        with open(_RECORD_PATH, "w") as f:
            for spec in _SESSION_RECORDER.specs:
                f.write(json.dumps(spec.to_json()) + "\n")

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _exact_float32():
    """float32 tests run in float32 (TF32 off, which the fused kernels follow as eager's convolutions
    do): TF32's rounding moves pre-activations near zero across a ReLU, a coin toss that no bound on a
    small block's gradients absorbs. TF32 itself is tested on its own (tests/test_block.py)."""
    if not HAS_CUDA:
        yield
        return
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


@pytest.fixture
def unpoisoned(monkeypatch):
    """Outputs allocated as a user's run allocates them: no NaN fill (which is a kernel launch too)."""
    monkeypatch.setattr(base, "POISON_OUTPUTS", False)


@pytest.fixture
def deterministic():
    """Bit-for-bit tests must ask for deterministic algorithms: the convolution gradients come from cuDNN,
    whose default algorithms may accumulate with atomics on a GPU."""
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
              torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[1], before[2]


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


def assert_compiled_step_matches(fused: torch.nn.Module, ref: torch.nn.Module, x: torch.Tensor) -> None:
    """torch.compile(fused, fullgraph=True) -- a graph break fails -- runs one training step as ``ref``
    does in eager: the output, the input's gradient and afterwards every state (running statistics
    included) agree. aot_eager on the CPU (no C++ compiler needed), inductor on a GPU."""
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager" if not HAS_CUDA else "inductor")
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, want = compiled(x1), ref(x2)
    torch.testing.assert_close(out, want, rtol=2e-3, atol=2e-3)
    out.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=2e-3, atol=2e-3)
    for (name, a), (_, b) in zip(ref.state_dict().items(), fused.state_dict().items()):
        torch.testing.assert_close(b, a, rtol=2e-3, atol=2e-3, msg=name)
