"""The benchmark's check before timing (``bench.check_case``): it passes a correct provider in every mode
and layout, and names what a wrong one gets wrong."""

import math

import pytest
import torch

from fused_resnet import bench
from fused_resnet.bench import BenchCase, check_case
from fused_resnet.cases import BlockCase

from tests.conftest import HAS_CUDA

CASES = [BenchCase(BlockCase(8, 8, 4, 2), mode, "float32", fmt)
         for mode in ("eval", "train-fwdbwd") for fmt in ("nchw", "nhwc")]


@pytest.mark.parametrize("provider", ["fused-torch", "fused-cpp"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id + "-" + c.mode + "-" + c.fmt)
def test_check_case_passes_a_correct_provider(provider, case):
    if provider == "fused-cpp":
        from fused_resnet.backends import available_backends
        if "cpp" not in available_backends():
            pytest.skip("the compiled extension is not built here")
    assert check_case(provider, case, "cpu") == []


@pytest.mark.parametrize("case", [CASES[0], CASES[2]], ids=lambda c: c.mode)
def test_check_case_names_a_wrong_result(monkeypatch, case):
    build = bench.build_model

    def wrong(provider, case, device):
        model = build(provider, case, device)
        if provider != "eager":
            with torch.no_grad():
                model.bn2.bias.add_(0.05)  # a shift batch statistics cannot take back: far outside the bound
        return model

    monkeypatch.setattr(bench, "build_model", wrong)
    failures = check_case("fused-torch", case, "cpu")
    assert failures and failures[0].startswith("output: error")
    if case.mode == "train-fwdbwd":
        assert any(f.startswith("grad input: error") for f in failures)


def test_device_time_is_the_gpus_busy_time_per_call():
    """``device_ms``: NaN on the CPU (no device timeline); on a GPU, positive and at most the call's
    event-timed median (kernels cannot take longer than the calls that run them, plus rounding)."""
    from fused_resnet.bench import device_time_ms, measure, prepare
    case = [c for c in bench.suite("quick", "cpu") if c.mode == "eval" and not c.model][0]
    step, inputs = prepare("eager", case, "cpu")
    assert math.isnan(device_time_ms(step, inputs, "cpu"))
    if HAS_CUDA:
        timing = measure("eager", case, "cuda", iters=10)
        assert 0 < timing.device_ms <= 1.05 * timing.median_ms
