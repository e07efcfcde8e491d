"""The benchmark's machinery: the check before timing (``bench.check_case``: it passes a correct provider
in every mode and layout, forgives what the tests forgive, names what a wrong one gets wrong), the steps
captured in CUDA graphs and their yardstick, the device-time clocks and the tile tuner."""

import math

import pytest
import torch

from fused_resnet import bench
from fused_resnet.bench import BenchCase, check_case
from fused_resnet.cases import BlockCase
from fused_resnet.testing import rel_err

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
                model.bn2.weight.mul_(1.2)  # a scale batch statistics cannot take back: far outside the bound
        return model

    monkeypatch.setattr(bench, "build_model", wrong)
    failures = check_case("fused-torch", case, "cpu")
    assert failures and failures[0].startswith("output: error")
    if case.mode == "train-fwdbwd":
        assert any(f.startswith("grad input: error") for f in failures)


def _with_output_hook(monkeypatch, hook):
    """build_model, with ``hook(call_number, output) -> output`` on the provider's model (not eager's)."""
    build = bench.build_model
    calls = []

    def hooked(provider, case, device):
        model = build(provider, case, device)
        if provider != "eager":
            def forward_hook(module, args, out):
                calls.append(1)
                return hook(len(calls), out)
            model.register_forward_hook(forward_hook)
        return model

    monkeypatch.setattr(bench, "build_model", hooked)


def test_check_case_forgives_relu_flips(monkeypatch):
    """Output elements within rounding of zero that the provider puts on the other side of the final ReLU
    (here: the eight smallest positive outputs, zeroed) move the input gradient by far more than the bound
    when the reference passes gradient through them; the check gives them no upstream gradient in either
    model, as the tests do, and passes (bfloat16: the output's own error stays within its floor)."""

    case = BenchCase(BlockCase(8, 8, 4, 2), "train-fwdbwd", "bfloat16", "nchw")

    def flip(_, out):
        pos = out.detach().flatten()
        smallest = torch.where(pos > 0, pos.float(), torch.inf).topk(8, largest=False).indices
        mask = torch.ones_like(pos)
        mask[smallest] = 0
        return out * mask.view_as(out)

    _with_output_hook(monkeypatch, flip)
    assert check_case("fused-torch", case, "cpu") == []
    # the same flips, the reference's backward taking the whole upstream gradient: far outside the bound
    torch.manual_seed(1)
    x = torch.randn(case.input_shape, dtype=torch.float64)
    ref, fused = bench.build_model("eager", case, "cpu").double(), bench.build_model("fused-torch", case, "cpu")
    xr, xf = x.clone().requires_grad_(), x.bfloat16().requires_grad_()
    g = torch.randn(ref(xr).shape, dtype=torch.float64)
    ref(xr).backward(g)
    fused(xf).backward(g.bfloat16())
    assert rel_err(xf.grad, xr.grad) > 2e-2


def test_check_case_takes_the_median_of_three_draws(monkeypatch):
    """A coarse dtype's gradient check takes the median of three draws: one bad draw (a flip the mask
    cannot see, inside the block) passes, two fail."""
    case = BenchCase(BlockCase(8, 8, 4, 2), "train-fwdbwd", "bfloat16", "nchw")
    for bad_draws, passes in (({2}, True), ({1, 3}, False)):
        def corrupt(call, out, bad_draws=bad_draws):
            return out * 1.5 if call in bad_draws else out
        _with_output_hook(monkeypatch, corrupt)
        failures = check_case("fused-torch", case, "cpu")
        assert (failures == []) == passes, failures
        if not passes:
            assert all("median of 3 draws" in f for f in failures)


def test_graph_providers_and_their_yardstick():
    """On CUDA the head shape's eval and training fwd+bwd are also timed captured in CUDA graphs (eager
    and each fused backend, not the +sync variants), their speedup taken over eager captured alike; never
    on the CPU, never for train-fwd (a replayed forward would not build the autograd graph)."""
    head = bench.HEAD_BLOCK
    for mode in ("eval", "train-fwdbwd"):
        names = bench.providers("cuda", BenchCase(head, mode, "bfloat16", "nhwc"), "default")
        graphed = [n for n in names if n.endswith(bench.GRAPH)]
        assert graphed and graphed[0] == "eager+graph"
        assert {n[:-len(bench.GRAPH)] for n in graphed} <= set(names) and not any("+sync+" in n for n in names)
        assert all(bench.yardstick(n) == "eager+graph" for n in graphed)
        assert all(bench.yardstick(n) == "eager" for n in names if n not in graphed)
    assert not any(n.endswith(bench.GRAPH)
                   for n in bench.providers("cuda", BenchCase(head, "train-fwd", "bfloat16", "nhwc"), "default"))
    assert not any(n.endswith(bench.GRAPH)
                   for n in bench.providers("cpu", BenchCase(head, "eval", "float32", "nhwc"), "full"))
    with pytest.raises(ValueError, match="replays eval or train-fwdbwd, not train-fwd"):
        bench.graphed_step(torch.nn.Identity(), BenchCase(head, "train-fwd", "float32", "nhwc"), "cpu")


class _Replay:
    """A CPU stand-in for a captured CUDA graph: replay() runs the captured function again and writes its
    output into the captured output, as a replay writes the graph's buffers (or, ``stale``, does nothing)."""

    def __init__(self, run, reset, out, stale):
        self.run, self.reset, self.out, self.stale = run, reset, out, stale

    def replay(self):
        if self.stale:
            return
        if self.reset is not None:
            self.reset()
        new = self.run()
        with torch.no_grad():
            self.out.copy_(new)


@pytest.mark.parametrize("stale", [False, True], ids=["replays", "stale"])
@pytest.mark.parametrize("case", [CASES[0], CASES[3]], ids=lambda c: c.mode + "-" + c.fmt)
def test_graphed_step_logic_on_the_cpu(monkeypatch, case, stale):
    """``graphed_step`` around a stand-in capture (the CPU has no CUDA graphs): the step copies its input
    into the captured input and replays, the replay's output and input gradient are checked against an
    uncaptured copy of the model -- a graph that does not follow its input (stale) is refused."""
    def fake_capture(run, reset=None, warmups=3):
        for _ in range(warmups):
            run()
            if reset is not None:
                reset()
        out = run()
        return _Replay(run, reset, out, stale), out

    monkeypatch.setattr(bench, "capture", fake_capture)
    model = bench.build_model("fused-torch+graph", case, "cpu")
    if stale:
        with pytest.raises(RuntimeError, match="replay disagrees with the uncaptured model: output"):
            bench.graphed_step(model, case, "cpu")
        return
    step, inputs = bench.graphed_step(model, case, "cpu")
    step(inputs[0])
    first = step.output.clone()
    step(inputs[1])
    assert not torch.equal(first, step.output)
    want = bench.build_model("eager", case, "cpu")(inputs[1].clone())
    assert rel_err(step.output, want) <= 1e-5


def test_bench_rows_take_each_speedup_over_its_yardstick(monkeypatch):
    """``fused_resnet bench``: a +graph provider's speedup is over eager+graph, the others' over eager
    (CPU stand-ins for the graph steps: the same models, uncaptured)."""
    import argparse

    from fused_resnet import cli
    case = CASES[0]
    monkeypatch.setattr(bench, "providers", lambda device, case, suite: ["eager", "fused-torch", "eager+graph",
                                                                         "fused-torch+graph"])
    monkeypatch.setattr(bench, "prepare", lambda p, case, device: bench.make_step(
        bench.build_model(p, case, device), case, device))
    args = argparse.Namespace(device="cpu", suite="quick", providers=None, iters=4, rounds=2)
    rows = {r["provider"]: r for r in cli._bench_rows(args, [case])}
    assert set(rows) == {"eager", "fused-torch", "eager+graph", "fused-torch+graph"}
    for name, base in (("fused-torch", "eager"), ("fused-torch+graph", "eager+graph"), ("eager+graph", "eager+graph")):
        assert rows[name]["speedup_vs_eager"] == pytest.approx(rows[base]["median_ms"] / rows[name]["median_ms"])
        assert rows[name]["check"] == "ok"


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("mode", ["eval", "train-fwdbwd"])
@pytest.mark.parametrize("provider", ["eager", "fused-triton", "fused-cuda"])
def test_a_graphed_step_replays_the_model(provider, mode):
    """``graphed_step`` captures a block's forward (and backward) in a CUDA graph; the replay agrees with
    the model run uncaptured (it checks that itself, raising otherwise), and a replay on new input moves
    the output: the graph reads the input the step copies in."""
    from fused_resnet.backends import available_backends
    if provider.startswith("fused-") and provider[len("fused-"):] not in available_backends():
        pytest.skip(f"{provider} is not available here")
    case = BenchCase(BlockCase(32, 32, 14, 4), mode, "bfloat16", "nhwc")
    step, inputs = bench.graphed_step(bench.build_model(provider, case, "cuda"), case, "cuda")
    step(inputs[0])
    first = step.output.clone()
    step(inputs[1])
    torch.cuda.synchronize()
    assert torch.isfinite(step.output).all() and not torch.equal(first, step.output)


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


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA graphs need a GPU")
def test_graph_time_is_the_kernels_time():
    """``graph_time_ms`` (the tuner's clock): a call's GPU time without its host time -- positive, below
    the same call timed with events one call at a time (which includes the launch gaps), and it rotates
    through the inputs it is given."""
    from fused_resnet.bench import graph_time_ms, time_step
    a = [torch.randn(256, 256, device="cuda") for _ in range(4)]
    seen = set()

    def call(i):
        seen.add(i % 4)
        torch.mm(a[i % 4], a[i % 4])

    ms = graph_time_ms(call)
    assert seen == {0, 1, 2, 3}
    per_call = time_step(lambda _: torch.mm(a[0], a[0]), [None], "cuda", warmup=3, iters=20).median_ms
    assert 0 < ms < per_call


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_tile_tuner_runs_and_keeps_the_current_choice_unless_beaten(tmp_path, mode):
    """``python -m benchmarks.tune_conv --smoke`` (interpreter, one tiny layer, two candidates): it compiles its
    candidates ahead for sm_90, times each against the current choice, and writes its findings and the
    table entries (keyed by variant); the GPU run takes the same path with the seed's layers."""
    import json
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = tmp_path / "tune.json"
    run = subprocess.run([sys.executable, "-m", "benchmarks.tune_conv", "--smoke", "--jobs", "2", "--rounds", "1",
                          "--mode", mode, "--json", str(out)], cwd=root, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0 and "compiled 2 variants ahead for sm_90" in run.stdout and ", 0 failed" in run.stdout, \
        run.stdout[-2000:] + run.stderr[-2000:]
    found = json.loads(out.read_text())
    assert found["mode"] == mode and f"{mode} convolution" in run.stdout
    (layer,) = found["layers"]
    assert layer["current_ms"] > 0 and layer["best_ms"] > 0
    beaten = layer["best_ms"] < 0.97 * layer["current_ms"] and layer["best"] != layer["current"]
    assert layer["entry"] == beaten
    # an entry printed is keyed by its variant: eval's and training's convolutions are tuned apart
    entries = [line for line in run.stdout.splitlines() if line.startswith("    (")]
    assert len(entries) == int(beaten) and all(f", {mode == 'train'}): ConvConfig(" in e for e in entries), entries
