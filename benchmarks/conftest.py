"""The benchmark suite's set-up: which device and case set, and eager's figure for each case so every
provider's speedup comes from the same run.

    pytest benchmarks --bench-suite default --benchmark-json results.json      # on a GPU
    pytest benchmarks --bench-suite quick --benchmark-disable                    # CI smoke run
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_addoption(parser):
    group = parser.getgroup("fused_resnet")
    group.addoption("--bench-device", default="cuda" if torch.cuda.is_available() else "cpu",
                    choices=["cpu", "cuda"])
    group.addoption("--bench-suite", default="quick", choices=["quick", "short", "default", "full", "host"])
    group.addoption("--bench-providers", default="", help="comma-separated subset (default: every one)")
    group.addoption("--bench-iters", type=int, default=50)
    group.addoption("--bench-rows", default=None,
                    help="append each result as a JSON line here as soon as it is measured (a run cut short "
                         "keeps what it measured; python -m fused_resnet report reads the file)")


def pytest_generate_tests(metafunc):
    if "bench_case" not in metafunc.fixturenames:
        return
    from fused_resnet.bench import providers, suite

    config = metafunc.config
    device = config.getoption("--bench-device")
    wanted = [p for p in config.getoption("--bench-providers").split(",") if p]
    params = []
    for case in suite(config.getoption("--bench-suite"), device):
        names = providers(device, case, config.getoption("--bench-suite"))
        others = [p for p in names if p != "eager" and (not wanted or p in wanted)]
        # eager runs beside the providers it is the yardstick of (a case none of them runs is left out)
        chosen = ["eager"] + others if others or not wanted or wanted == ["eager"] else []
        params += [pytest.param(case, p, id=f"{case.id}-{p}") for p in chosen]
    metafunc.parametrize("bench_case,provider", params)


@pytest.fixture(scope="session")
def bench_device(pytestconfig):
    return pytestconfig.getoption("--bench-device")


@pytest.fixture(scope="session")
def eager_times():
    """The yardstick's median per (case id, yardstick): eager, or eager in a CUDA graph (``bench.yardstick``),
    filled as the suite runs (measured first for each case)."""
    return {}


@pytest.fixture(scope="session")
def record_row(pytestconfig):
    path = pytestconfig.getoption("--bench-rows")

    def record(row: dict) -> None:
        if path:
            import json
            with open(path, "a") as f:
                f.write(json.dumps(row) + "\n")
    return record
