"""What a benchmark case should take on the GPU, to read a GPU run against (the report's "predicted"
column).

A fused case is the sequence of its launches: the Triton kernels a dry run of the case lists (with their
real sizes and grids, ``kernel_report``) and, in training, the cuDNN convolution gradients. Each launch
takes the larger of

- its FLOPs over the measured matrix rate, derated twice: by quantisation (G CTAs on S SMs: the busiest
  SM runs ceil(G / S) of them, so the machine works at G / (ceil(G / S) S)) and by occupancy (an SM
  holding c CTAs of w warps, c from the compiler's registers and shared memory, is taken to need 8
  resident warps to keep its tensor cores busy: min(1, c w / 8));
- its fewest bytes (each operand read once, each result written once) over the measured bandwidth;

plus the measured cost of one launch; the sum is the prediction. It is a model, not a floor: an
unfused provider is read against the roofline floor, which no provider can beat.
"""

from __future__ import annotations

import importlib
from typing import Iterable, Optional

import torch

from .backends.triton.launch import _param_names

_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int64": 8, "int32": 4}


def _kernel_params(qualified: str) -> list[str]:
    module, name = qualified.split(":")
    return _param_names(getattr(importlib.import_module(module), name))


def launch_work(spec: dict) -> tuple[float, float]:
    """(FLOPs, fewest bytes) of one recorded launch."""
    names = _kernel_params(spec["kernel"])
    args = dict(zip(names, spec["args"]))
    const = dict(spec["constexprs"])

    def v(name: str) -> int:
        return int(args[name][1])

    def e(name: str) -> int:
        return _ITEMSIZE.get(args[name][1], 4)

    kernel = spec["kernel"].rsplit(":", 1)[-1]
    if kernel == "conv_bn_act_kernel":
        n, c, h, w, k, p, q = (v(a) for a in ("N", "C", "H", "W", "K", "P", "Q"))
        kh, kw = const["KH"], const["KW"]
        m = n * p * q
        flops = 2.0 * m * k * c * kh * kw
        nbytes = n * c * h * w * e("x_ptr") + k * c * kh * kw * e("w_ptr") + m * k * e("out_ptr")
        if const["HAS_RES"]:
            nbytes += m * k * e("res_ptr")
        if const["HAS_SC"]:
            sc_c = v("SC_C")
            flops += 2.0 * m * k * sc_c
            nbytes += m * sc_c * e("scx_ptr") + k * sc_c * e("scw_ptr")
            if const["SC_SEPARATE"]:
                nbytes += m * k * e("sco_ptr")
        return flops, float(nbytes)
    if kernel == "bn_add_relu_kernel":
        rows, c = v("M"), v("C")
        return 0.0, float(rows * c * (e("z_ptr") + e("out_ptr") + (e("res_ptr") if const["HAS_RES"] else 0)))
    if kernel == "bn_relu_backward_reduce_kernel":
        rows, c = v("M"), v("C")
        return 0.0, float(rows * c * (e("g_ptr") + e("mask_ptr") + e("z_ptr")))
    if kernel == "bn_relu_backward_apply_kernel":
        rows, c = v("M"), v("C")
        per = e("g_ptr") + e("mask_ptr") + e("dz_ptr") + (e("z_ptr") if const["BATCH_STATS"] else 0)
        return 0.0, float(rows * c * (per + (e("gm_ptr") if const["WANT_GM"] else 0)))
    # finalize, merge, sum_partials: per-channel partials, (T, C) float32 three times at most
    t, c = v("T"), v("C")
    return 0.0, float(3 * t * c * 4)


def wave_efficiency(grid: Iterable[int], sms: int) -> float:
    """The fraction of the machine a grid keeps busy: the busiest SM runs ceil(tiles / sms) CTAs."""
    tiles = 1
    for g in grid:
        tiles *= g
    return tiles / (-(-tiles // sms) * sms)


def occupancy_factor(ctas_per_sm: int, warps: int) -> float:
    """Taken as min(1, resident warps / 8): fewer warps per SM leave the tensor cores waiting on loads."""
    return min(1.0, max(1, ctas_per_sm) * warps / 8)


def backward_conv_work(case) -> tuple[float, float, int]:
    """(FLOPs, bytes, launches) of the convolution gradients a training step adds (cuDNN, unfused): per
    convolution the input and weight gradients, each as many FLOPs as the forward convolution."""
    from .bench import DTYPES, _convs, blocks_of

    item = torch.empty((), dtype=DTYPES[case.dtype]).element_size()
    flops = nbytes = 0.0
    launches = 0
    for b in blocks_of(case):
        for m, cin, cout, kern, m_in in _convs(b):
            flops += 2 * (2.0 * m * cin * cout * kern * kern)
            nbytes += item * (2 * m * cout + 2 * m_in * cin + 2 * cin * cout * kern * kern)
            launches += 2
    return flops, nbytes, launches


def predict_ms(launches: list[dict], case, bandwidth: float, rate: float, sms: int, launch_us: float) -> float:
    """The predicted time of ``case`` (ms) from its recorded ``launches`` (dicts with spec, grid and the
    compiled variant's metrics) and the device's measured ceilings."""
    total = 0.0
    for launch in launches:
        flops, nbytes = launch_work(launch["spec"])
        eff = wave_efficiency(launch["grid"], sms) * occupancy_factor(launch["metrics"].get("ctas_per_sm", 1),
                                                                       launch["spec"]["num_warps"])
        total += max(flops / (rate * eff), nbytes / bandwidth) + launch_us * 1e-6
    if case.mode == "train-fwdbwd":
        flops, nbytes, count = backward_conv_work(case)
        total += max(flops / rate, nbytes / bandwidth) + count * launch_us * 1e-6
    return total * 1e3


def predictions(kernels_json: dict, rows: list[dict]) -> dict[tuple, float]:
    """Predicted ms per (case, mode, dtype, format) for the fused-triton rows of a GPU run, from the warm
    step's kernel report (``kernels --json``: launches per case id with their compiled metrics)."""
    by_case: dict[str, list[dict]] = {}
    for launch in kernels_json.get("launches", []):
        by_case.setdefault(launch["case"], []).append(launch)
    out = {}
    for r in rows:
        if r["provider"] != "fused-triton" or r.get("device_type") != "cuda":
            continue
        key = (r["case"], r["mode"], r["dtype"], r["format"])
        found = by_case.get(f"{r['case']}-{r['mode']}-{r['dtype']}-{r['format']}")
        if not found or not r.get("sms"):
            continue
        case = _case_of(r)
        if case is None:
            continue
        out[key] = predict_ms(found, case, r["copy_GBps"] * 1e9, r["matmul_TFLOPs"] * 1e12, r["sms"],
                              r.get("launch_us", 3.0))
    return out


def _case_of(r: dict):
    """The BenchCase a result row measured (None for a case id this version does not know)."""
    import re

    from .bench import BenchCase
    from .cases import BlockCase, BottleneckCase

    block = BlockCase.from_id(r["case"])
    if block is not None:
        return BenchCase(block, r["mode"], r["dtype"], r["format"])
    m = re.fullmatch(r"(resnet18|resnet50)-(\d+)-b(\d+)", r["case"])
    if m is not None:
        return BenchCase.for_model(m.group(1), int(m.group(2)), int(m.group(3)), r["mode"], r["dtype"], r["format"])
    m = re.fullmatch(r"bneck(?:-ds-s(\d+))?-(\d+)to(\d+)-w(\d+)-(\d+)x\d+-b(\d+)", r["case"])
    if m is not None:
        stride, inplanes, _, planes, size, batch = m.groups()
        return BenchCase(BottleneckCase(int(inplanes), int(planes), int(size), int(batch), int(stride or 1),
                                        downsample=stride is not None), r["mode"], r["dtype"], r["format"])
    return None
