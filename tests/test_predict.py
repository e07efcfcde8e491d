"""The report's predicted column (fused_resnet/predict.py): a launch-by-launch model built from a dry run's
launches (their real sizes and grids), the compiled kernels' occupancy and the measured ceilings."""

import json

import pytest

import fused_resnet
from fused_resnet.bench import BenchCase, case_bytes, case_flops
from fused_resnet.cases import BlockCase
from fused_resnet.kernel_report import record_launches
from fused_resnet.predict import launch_work, occupancy_factor, predict_ms, wave_efficiency

pytestmark = pytest.mark.skipif("triton" not in fused_resnet.available_backends(),
                                reason="Triton needs a GPU or TRITON_INTERPRET=1")

CASE = BenchCase(BlockCase(8, 16, 8, 2, use_1x1conv=True, stride=2), "eval", "float32", "nhwc")


def _launches(case, ctas=2):
    return [{"case": l.case, "kernel": l.kernel, "grid": l.grid, "spec": l.spec, "metrics": {"ctas_per_sm": ctas}}
            for l in record_launches([case], 90)]


@pytest.mark.parametrize("mode", ["eval", "train-fwd"])
def test_the_launches_flops_add_up_to_the_case(mode):
    """The per-launch FLOPs (K1, K2 with the 1x1 shortcut) are the case's own: nothing counted twice or
    left out of the model."""
    case = BenchCase(CASE.block, mode, "float32", "nhwc")
    assert sum(launch_work(l["spec"])[0] for l in _launches(case)) == case_flops(case)


def test_wave_quantisation_and_occupancy():
    assert wave_efficiency([132], 132) == 1.0
    assert wave_efficiency([133], 132) == pytest.approx(133 / 264)
    assert wave_efficiency([100], 132) == pytest.approx(100 / 132)
    assert wave_efficiency([50, 2], 8) == pytest.approx(100 / 104)
    assert occupancy_factor(2, 4) == 1.0 and occupancy_factor(1, 4) == 0.5


def test_prediction_follows_the_machine():
    """Fewer SMs (at the same rate per SM), fewer resident CTAs or a slower memory can only make the
    prediction longer, and it is never below the case's roofline floor."""
    big = BenchCase(BlockCase(64, 64, 56, 32), "eval", "bfloat16", "nhwc")
    launches = _launches(big)
    base = predict_ms(launches, big, 3e12, 8e14, 132, 3.0)
    assert predict_ms(launches, big, 3e12, 8e14 * 8 / 132, 8, 3.0) > base
    assert predict_ms(_launches(big, ctas=1), big, 3e12, 8e14, 132, 3.0) > base
    assert predict_ms(launches, big, 1e11, 8e14, 132, 3.0) > base
    assert base >= max(case_flops(big) / 8e14, case_bytes(big) / 3e12) * 1e3


def test_report_adds_the_predicted_column(tmp_path):
    from fused_resnet.cli import main
    kernels = tmp_path / "kernels.json"
    kernels.write_text(json.dumps({"launches": _launches(CASE)}))
    row = {"case": CASE.what, "mode": "eval", "dtype": "float32", "format": "nhwc", "median_ms": 0.5, "p20_ms": 0.4,
           "p80_ms": 0.6, "speedup_vs_eager": 1.0, "floor_ms": 0.01, "floor_fraction": 0.02, "device": "gpu",
           "device_type": "cuda", "torch": "t", "triton": "tr", "cuda": "c", "date": "d", "sms": 132,
           "copy_GBps": 3000.0, "matmul_TFLOPs": 800.0, "launch_us": 3.0, "host_us": 20.0}
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(dict(row, provider=p)) + "\n" for p in ("eager", "fused-triton")))
    assert main(["report", str(results), "--kernels", str(kernels)]) == 0
    table = (tmp_path / "results.md").read_text()
    triton_line = next(line for line in table.splitlines() if "| fused-triton |" in line)
    predicted = float(triton_line.rstrip(" |").rsplit("|", 1)[1])
    assert predicted == pytest.approx(predict_ms(_launches(CASE), CASE, 3e12, 8e14, 132, 3.0), abs=6e-4)
    assert "no provider can beat them" in table
