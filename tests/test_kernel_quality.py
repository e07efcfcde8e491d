"""Kernel quality read from the machine code, without a GPU (DESIGN.md section 7b): every Triton kernel
variant the seed stage shapes launch (batch 32, channels_last; fp16, bf16 and fp32 as TF32; eval and
training) and ResNet-50's Bottleneck stage shapes launch (bf16), compiled ahead of time with the JIT's own specialisation for sm_80 and sm_90, and the CUDA
extension's kernels read from the built library. Each invariant is one a GPU run would otherwise find
the slow way: spills, convolutions off the tensor cores, a main loop split per tap, shared memory past
the architecture's limit, 64-bit division inside a main loop."""

import json
import os
import re

import pytest

import fused_resnet
from fused_resnet.bench import BenchCase
from fused_resnet.cases import bottleneck_cases, seed_block_cases
from fused_resnet.kernel_report import (compile_all, ctas_per_sm, cuda_conv_config, extension_stats,
                                        record_launches, short_cuda_name)

pytestmark = pytest.mark.skipif("triton" not in fused_resnet.available_backends(),
                                reason="Triton needs a GPU or TRITON_INTERPRET=1")

CASES = [BenchCase(b, mode, dtype, "nhwc") for b in seed_block_cases(batches=(32,))
         for mode in ("eval", "train-fwdbwd") for dtype in ("float16", "bfloat16", "float32")]
CASES += [BenchCase(b, mode, "bfloat16", "nhwc") for b in bottleneck_cases(32) for mode in ("eval", "train-fwdbwd")]
# Shared memory one CTA may use (opt-in maximum) by architecture.
CTA_SHARED = {80: 163 * 1024, 90: 227 * 1024}


@pytest.fixture(scope="module", params=[90, 80], ids=lambda a: f"sm_{a}")
def compiled(request):
    """(launch, metrics) per distinct kernel variant of CASES, compiled for the architecture."""
    arch = request.param
    launches = record_launches(CASES, arch)
    unique = {}
    for launch in launches:
        unique.setdefault(launch.variant, launch)
    metrics = compile_all([launch.spec for launch in unique.values()], arch, jobs=os.cpu_count() or 1)
    return arch, list(zip(unique.values(), metrics))


def _label(launch) -> str:
    return f"{launch.case} {launch.kernel} {launch.config}"


def test_every_variant_compiles_without_spills(compiled):
    _, variants = compiled
    bad = [f"{_label(l)}: {m['error']}" if "error" in m else
           f"{_label(l)}: {m['spills']} local loads/stores, {m['stack']} B stack, {m['registers']} registers"
           for l, m in variants if "error" in m or m["spills"] or m["stack"]]
    assert not bad, "\n".join(bad)


def test_every_convolution_runs_one_pipelined_main_loop_on_tensor_cores(compiled):
    """A convolution's reduction over taps x channel chunks is one loop of tensor-core instructions fed
    by async copies (a second loop only for the 1x1 shortcut's own reduction), however many taps."""
    _, variants = compiled
    convs = [(l, m) for l, m in variants if l.kernel == "conv_bn_act_kernel"]
    assert len(convs) >= 3 * 7 + 8  # every dtype, every stage shape; the Bottleneck stages
    for launch, m in convs:
        shortcut = dict(launch.spec["constexprs"])["HAS_SC"]
        assert m["mma"] > 0, f"{_label(launch)}: no tensor-core instructions"
        assert m["async_copies"] > 0, f"{_label(launch)}: no cp.async/TMA loads"
        assert m["mma_loops"] == 1 + shortcut, f"{_label(launch)}: {m['mma_loops']} main loops"


def test_shared_memory_fits_the_architecture(compiled):
    arch, variants = compiled
    for launch, m in variants:
        assert m["shared"] <= CTA_SHARED[arch], f"{_label(launch)}: {m['shared']} B of shared memory"
        assert m["ctas_per_sm"] >= 1, f"{_label(launch)}: does not fit an SM"


def test_the_batch_counter_is_stored_by_one_thread(compiled):
    """bn_finalize counts num_batches_tracked with a scalar load and store (triton/bn.py): one 64-bit
    store, predicated on thread 0 (Triton masks a scalar's redundant threads). Stored by every thread, a
    warp that loaded the count after another warp's store would count the batch twice."""
    arch, variants = compiled
    counting = [l for l, _ in variants
                if l.kernel == "bn_finalize_kernel" and dict(l.spec["constexprs"])["COUNT"]]
    assert counting, "no training case launched bn_finalize with a batch counter"
    ptx, = compile_all([counting[0].spec], arch, jobs=1, ptx=True)
    stores = re.findall(r"^\s*(@%p\d+)?\s*st\.global\.b64\b", ptx, re.M)
    assert len(stores) == 1 and stores[0], f"{_label(counting[0])}: 64-bit stores {stores}"
    pred = stores[0][1:]
    cond = re.search(rf"setp\.eq\.[su]?b?32\s+{pred},\s*(%r\d+),\s*0;", ptx)
    assert cond and re.search(rf"mov\.u32\s+{cond.group(1)},\s*%tid\.x;", ptx), \
        f"{_label(counting[0])}: the counter's store is not thread 0's alone"


@pytest.mark.parametrize("arch", [90, 80], ids=lambda a: f"sm_{a}")
def test_cuda_conv_ring_fits_two_ctas_per_sm(arch):
    """The CUDA convolution's tensor-core kernels launch with their ring in dynamic shared memory (the
    library holds only the static part; the launch's figure comes from the extension): over the 48 KB a
    launch gets unasked (so the launch must raise the limit, as it does), within one CTA's limit, and two
    CTAs per SM by registers and shared memory together."""
    stats = extension_stats(arch)
    if not stats:
        pytest.skip("this build has no CUDA kernels (no nvcc, or FUSED_RESNET_NO_CUDA)")
    config = cuda_conv_config()
    assert config is not None and config["threads"] == 256
    convs = {short_cuda_name(n): s for n, s in stats.items() if "conv_bn_act_kernel" in n}
    tensor_core = {n: s for n, s in convs.items() if "simt" not in n}
    assert len(tensor_core) == 18 and len(convs) == 21, sorted(convs)  # 3 x 3 dtypes x 2 loops; 3 SIMT
    for name, s in tensor_core.items():
        shared = s.static_shared + s.launch_shared
        assert s.launch_shared == config["tc_smem"] >= config["stages"] * 2 * 64 * config["slice_bytes"] > 48 * 1024
        assert shared <= CTA_SHARED[arch], (name, shared)
        assert ctas_per_sm(s.registers, s.threads, shared, arch) >= 2, (name, s.registers, shared)
        # the epilogue's channels-dense path: four channels per store (nvcc split a packed 8-byte store)
        assert s.wide_stores > 0, name


@pytest.mark.parametrize("arch", [90, 80], ids=lambda a: f"sm_{a}")
def test_cuda_conv_main_loops_have_no_division_and_no_spills(arch):
    """The CUDA extension's convolution steps through taps and channel slices by addition: no call to a
    division routine inside a tensor-core main loop; and no kernel of the library spills."""
    stats = extension_stats(arch)
    if not stats:
        pytest.skip("this build has no CUDA kernels (no nvcc, or FUSED_RESNET_NO_CUDA)")
    spills = [short_cuda_name(n) for n, s in stats.items() if s.spills or s.stack]
    assert not spills, spills
    tensor_core = {short_cuda_name(n): s for n, s in stats.items() if "conv_bn_act_kernel" in n and s.mma}
    assert tensor_core
    for name, s in tensor_core.items():
        assert s.mma_loops >= 1 and s.calls_in_mma_loops == 0, (name, json.dumps(s.__dict__))
