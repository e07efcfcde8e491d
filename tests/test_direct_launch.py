"""Direct Triton launches (``launch._run``): a launch whose arguments key an earlier one's compiled variant
calls that variant's launcher without Triton's binder. Without a GPU, proven offline: Triton compiles for
sm_90 and the launcher's arguments are recorded (``fused_resnet.backends.triton.offline``); with one,
the direct and the JIT path must give the same bits."""

import copy
import os
import subprocess
import sys

import pytest
import torch

import fused_resnet
from fused_resnet import reference
from fused_resnet.backends.triton import launch as L
from fused_resnet.testing import randomize_

from tests.conftest import HAS_CUDA

pytestmark = pytest.mark.skipif("triton" not in fused_resnet.available_backends(),
                                reason="Triton needs a GPU or TRITON_INTERPRET=1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _key(*args, constexprs=None):
    return L._direct_key(L, args, constexprs or {"A": 1}, 4, 1, 0)


def test_direct_key_is_at_least_as_fine_as_the_jits_specialisation():
    """What the JIT compiles a separate variant for must key separately: a tensor's dtype and 16-byte
    alignment, an int's value (1, divisibility, width), an int against a float or a bool of equal
    value, constexprs, warps, stages, device."""
    buf = torch.empty(64)
    a, b = buf[:8], buf[4:12]                 # b: 16 bytes in, aligned; c below is not
    c = buf[1:9]
    assert _key(a, 3) == _key(b, 3)
    assert _key(a, 3) != _key(c, 3)
    assert _key(a, 3) != _key(a.to(torch.float16), 3)
    assert _key(a, 16) != _key(a, 32) and _key(a, 1) != _key(a, 2)
    assert _key(a, 1) != _key(a, 1.0) and _key(a, 1) != _key(a, True)
    assert _key(a, 3) != _key(a, 3, constexprs={"A": 2})
    assert _key(a, c) != _key(a, a)           # which tensor is misaligned, not only whether one is
    assert len({L._direct_key(L, (a,), {}, w, s, d) for w, s, d in [(4, 1, 0), (8, 1, 0), (4, 2, 0), (4, 1, 1)]}) == 4


def test_remembered_variants_take_constexprs_then_defaults_and_stay_bounded(monkeypatch):
    """The argument tail a direct launch appends: the call's constexprs, else the parameters' defaults
    (what the JIT's binder fills in); the table starts afresh past ``MAX_DIRECT`` entries."""
    from types import SimpleNamespace

    def kernel_fn(x_ptr, n, BLOCK, FLAG=False, EXTRA=7):
        pass

    kernel = SimpleNamespace(fn=kernel_fn)
    compiled = SimpleNamespace(run=None, function=1, packed_metadata=None)
    monkeypatch.setattr(L, "_DIRECT", {})
    monkeypatch.setattr(L, "MAX_DIRECT", 3)
    for i in range(7):
        L._remember(("k", i), kernel, compiled, 2, {"BLOCK": 64, "EXTRA": 9})
        assert 1 <= len(L._DIRECT) <= 3
    assert L._DIRECT[("k", 6)] == (compiled, (64, False, 9))
    L._remember(("k", "no BLOCK"), kernel, compiled, 2, {})      # a required constexpr missing: never direct
    assert ("k", "no BLOCK") not in L._DIRECT and id(kernel) in L._NO_DIRECT
    L._NO_DIRECT.discard(id(kernel))


def test_direct_launches_only_on_checked_triton_releases(monkeypatch):
    import triton
    for version, checked in (("3.6.0", True), ("3.8.0", True), ("3.9.0", False), ("4.0.0+git1", False),
                             ("3.10.0", False)):
        monkeypatch.setattr(triton, "__version__", version)
        assert L._triton_checked() is checked, version


@pytest.mark.skipif(HAS_CUDA, reason="offline launches stand in for a GPU this machine lacks")
def test_direct_launches_pass_what_the_jit_passes_offline():
    """Every kernel of a block's training step and inference call (both block kinds, float32 and
    bfloat16, channels_last, NCHW and a misaligned input, the two-level statistics merge), launched
    through ``kernel[grid]`` and directly: the same
    compiled variant, grid and arguments. In a process with the interpreter off (Triton compiles for
    sm_90, the launches are recorded); CI runs the same check with the GPU machine's Triton release."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    run = subprocess.run([sys.executable, "-m", "fused_resnet.backends.triton.offline"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and ": OK;" in run.stdout, run.stdout + run.stderr[-3000:]


@pytest.mark.skipif(HAS_CUDA, reason="the interpreter runs without a GPU")
def test_the_interpreter_never_takes_the_direct_path():
    before = sum(L.DIRECT_LAUNCHES.values())
    blk = randomize_(fused_resnet.Residual(4, 4, backend="triton")).eval()
    with torch.no_grad():
        for _ in range(2):
            blk(torch.randn(1, 4, 4, 4))
    assert sum(L.DIRECT_LAUNCHES.values()) == before
    from fused_resnet.backends.triton.conv import conv_bn_act_kernel
    assert id(conv_bn_act_kernel) in L._NO_DIRECT


@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_direct_and_jit_launches_give_the_same_bits(dtype, unpoisoned, monkeypatch):
    # the cuDNN weight gradients beside the Triton kernels must repeat bit for bit too
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(L, "DIRECT", L.DIRECT)   # restored afterwards, whatever the loop leaves
    seed = randomize_(reference.Residual(16, 32, use_1x1conv=True, stride=2))
    blk = fused_resnet.convert(copy.deepcopy(seed), backend="triton").cuda().to(dtype)
    x = torch.randn(4, 16, 12, 12, device="cuda", dtype=dtype).to(memory_format=torch.channels_last)
    results = {}
    for direct in (False, True, True):   # the JIT's path; direct (compiles, remembers); direct
        L.DIRECT = direct
        xi = x.clone().requires_grad_()
        before = sum(L.DIRECT_LAUNCHES.values())
        y = blk(xi)
        y.float().square().sum().backward()
        grads = [xi.grad] + [p.grad.clone() for p in blk.parameters()]
        blk.zero_grad()
        results.setdefault(direct, []).append((y.detach(), grads, sum(L.DIRECT_LAUNCHES.values()) - before))
    (jit_y, jit_g, jit_direct), = results[False]
    _, (y, g, direct_count) = results[True]
    assert jit_direct == 0 and direct_count >= 12
    assert torch.equal(jit_y, y) and all(torch.equal(a, b) for a, b in zip(jit_g, g))


@pytest.mark.skipif(HAS_CUDA, reason="offline launches stand in for a GPU this machine lacks")
def test_host_suite_times_the_triton_path_offline(tmp_path):
    """``bench --suite host`` with the interpreter off adds the Triton path a GPU call takes (offline
    launches): rows timed, marked as not checked (nothing ran), and not counted as wrong."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_INTERPRET"] = "0"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    out = tmp_path / "rows.json"
    run = subprocess.run([sys.executable, "-m", "fused_resnet", "bench", "--device", "cpu", "--suite", "host",
                          "--threads", "1", "--iters", "4", "--rounds", "2", "--providers", "fused-triton-offline",
                          "--json", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    import json
    rows = [r for r in json.loads(out.read_text())["rows"] if r["provider"] == "fused-triton-offline"]
    assert len(rows) == 4 and all(r["check"].startswith("not run") and r["host_us"] > 0 for r in rows)
