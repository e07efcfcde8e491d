"""Residual block (and seed ResNet-18) timings per provider: eager, torch.compile, each fused backend.

Every figure lands in the pytest-benchmark JSON with extra_info: CUDA-event median and p20/p80 over
rotating inputs, peak memory, speedup over eager from the same run, the roofline floor and the
fraction of it reached, the device, versions and date, and whether the provider's result agreed with
the float64 reference when checked before timing.
"""

import torch

from fused_resnet.bench import as_row, check_case, measure, prepare, yardstick


def test_block(benchmark, bench_case, provider, bench_device, eager_times, record_row, pytestconfig):
    disabled = pytestconfig.getoption("benchmark_disable", False)
    iters = 2 if disabled else pytestconfig.getoption("--bench-iters")
    # Checked against the float64 reference once before it is timed: a wrong result's speed is no figure.
    failures = check_case(provider, bench_case, bench_device) if provider != "eager" else []
    base = yardstick(provider)  # eager, or eager in a CUDA graph for the +graph providers
    key = (bench_case.id, base)
    if key not in eager_times and provider != base:
        eager_times[key] = measure(base, bench_case, bench_device, iters=iters).median_ms
    step, inputs = prepare(provider, bench_case, bench_device)
    timing = measure(provider, bench_case, bench_device, iters=iters, warmup=1 if disabled else 5,
                     prepared=(step, inputs))
    if provider == base:
        eager_times[key] = timing.median_ms
    row = as_row(provider, bench_case, timing, eager_times.get(key))
    row["check"] = "; ".join(failures) or "ok"
    benchmark.extra_info.update(row)
    record_row(row)
    assert not failures, f"{provider} on {bench_case.id} disagrees with the reference: {failures}"
    assert timing.median_ms > 0 and timing.samples == iters

    # pytest-benchmark's own statistics: a few synchronised calls of the same step.
    state = {"i": 0}

    def one_call():
        state["i"] += 1
        step(inputs[state["i"] % len(inputs)])
        if bench_device == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(one_call, rounds=5, iterations=1, warmup_rounds=1)
