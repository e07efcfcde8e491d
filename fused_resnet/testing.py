"""Numerical comparison against the seed reference (DESIGN.md section 5), shared by the tests and by
``python -m fused_resnet check``.

The yardstick is eager PyTorch's own error: both the fused module and eager run in the dtype under test
and are compared with the reference in float64 on the CPU by ``||out - ref|| / ||ref||``; the fused
error passes when it is at most ``max(2 * eager's error, floor)``. NaN never passes.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
from torch import Tensor, nn

FLOORS = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2, torch.float64: 1e-12}
TF32_FLOOR = 2e-3


def floor_for(dtype: torch.dtype, device: torch.device | str) -> float:
    """The error floor for ``dtype``; float32 on CUDA gets the TF32 floor when cuDNN may use TF32."""
    if dtype == torch.float32 and torch.device(device).type == "cuda" and torch.backends.cudnn.allow_tf32:
        return TF32_FLOOR
    return FLOORS[dtype]


def rel_err(actual: Tensor, ref: Tensor, scale: Optional[float] = None) -> float:
    """``||actual - ref|| / ||ref||`` in float64 on the CPU (``scale`` replaces ``||ref||`` when given);
    ``inf`` if ``actual`` has a NaN or Inf that ``ref`` does not, or if shapes differ."""
    if actual.shape != ref.shape:
        return math.inf
    a, r = actual.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.equal(torch.isfinite(a), torch.isfinite(r)):
        return math.inf
    finite = torch.isfinite(r)
    a, r = a[finite], r[finite]
    denom = r.norm().item() if scale is None else scale
    diff = (a - r).norm().item()
    if denom == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / denom


@dataclass
class Check:
    """One compared quantity: its name, the fused and eager errors, the bound, and the verdict."""

    name: str
    fused_err: float
    eager_err: float
    bound: float

    @property
    def ok(self) -> bool:
        return math.isfinite(self.fused_err) and self.fused_err <= self.bound


def randomize_(model: nn.Module, generator: Optional[torch.Generator] = None) -> nn.Module:
    """Give every parameter and batch-norm buffer random values (gamma near 1, running_var positive), so
    a test never runs on the constructor's zeros and ones."""

    def randn(t: Tensor, scale: float, offset: float = 0.0) -> Tensor:
        return offset + scale * torch.randn(t.shape, generator=generator, dtype=torch.float64)

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.affine:
                    m.weight.copy_(randn(m.weight, 0.2, 1.0))
                    m.bias.copy_(randn(m.bias, 0.2))
                if m.running_mean is not None:
                    m.running_mean.copy_(randn(m.running_mean, 0.2))
                    m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=generator))
            elif isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.copy_(randn(m.weight, 1.0 / math.sqrt(m.weight[0].numel())))
                if m.bias is not None:
                    m.bias.copy_(randn(m.bias, 0.2))
    return model


def compare_models(fused: nn.Module, ref: nn.Module, x: Tensor, *, train: bool, dtype: torch.dtype,
                   device: torch.device | str, grads: bool = True, steps: int = 1,
                   memory_format: torch.memory_format = torch.contiguous_format,
                   draws: Optional[int] = None) -> list[Check]:
    """Run ``fused`` and ``ref`` (same state) side by side with a float64 CPU copy of ``ref``: the
    checks of one draw (``x``), or with ``draws`` > 1 each quantity's median check over that many draws
    (``x``, then fresh normal inputs of its shape). By default gradients in the coarse dtypes -- bfloat16,
    and float32 as TF32 -- take three draws: a ReLU inside the model whose pre-activation lies within
    rounding of zero can flip either way (in eager as in fused code), and one flip among a few hundred
    elements moves a small block's gradients by several percent; in bfloat16 that failed 3 of 48 single
    draws of the small block cases (torch backend, CPU). A wrong result fails every draw.
    """
    if draws is None:
        draws = 3 if grads and (dtype == torch.bfloat16 or floor_for(dtype, device) == TF32_FLOOR) else 1
    runs = [_compare_once(fused, ref, x if d == 0 else torch.randn(x.shape, dtype=x.dtype), train=train,
                          dtype=dtype, device=device, grads=grads, steps=steps, memory_format=memory_format)
            for d in range(draws)]
    return [sorted(same, key=lambda c: c.fused_err / c.bound)[len(same) // 2] for same in zip(*runs)]


def _compare_once(fused: nn.Module, ref: nn.Module, x: Tensor, *, train: bool, dtype: torch.dtype,
                  device: torch.device | str, grads: bool, steps: int,
                  memory_format: torch.memory_format) -> list[Check]:
    """One draw of ``compare_models``: ``fused`` and ``ref`` (same state) side by side with a float64 CPU
    copy of ``ref``.

    ``steps`` forward(+backward) passes are run (running statistics evolve in train mode); the output,
    every parameter gradient, the input gradient and, in train mode, every buffer are compared after the
    last one. The models are copied, never modified.

    Where the output is a ReLU's (nonnegative in the reference), an element that the model under test and
    the reference disagree about -- zero in one, positive in the other, a pre-activation within rounding
    of zero -- gets no upstream gradient, in that model's backward and in the reference backward it is
    compared with (one reference backward per model). Such a flip is a coin toss of the dtype, not an
    error of the code, and one flip among a few hundred elements moves a gradient by several percent.
    """
    ref64 = copy.deepcopy(ref).double().cpu().train(train)
    eager = copy.deepcopy(ref).to(device=device, dtype=dtype).train(train)
    fused = copy.deepcopy(fused).to(device=device, dtype=dtype).train(train)
    fused.load_state_dict(eager.state_dict())
    floor = floor_for(dtype, device)
    models = ((ref64, torch.float64, "cpu"), (eager, dtype, device), (fused, dtype, device))
    results: list[dict[str, Tensor]] = []
    ref_grads: list[dict[str, Tensor]] = []  # the reference's gradients for eager's and fused's upstream
    for _ in range(steps):
        runs = []
        for model, model_dtype, model_device in models:
            xi = x.detach().to(device=model_device, dtype=model_dtype).contiguous(memory_format=memory_format)
            xi.requires_grad_(grads)
            with torch.set_grad_enabled(grads):
                runs.append((xi, model(xi)))
        results = [{"output": out.detach()} for _, out in runs]
        ref_grads = [{}, {}]
        if not grads:
            continue
        ref_x, ref_out = runs[0]
        g64 = torch.randn(ref_out.shape, dtype=torch.float64)
        relu_output = bool((ref_out.detach() >= 0).all())
        upstream = [g64 * ((runs[k][1].detach().double().cpu() > 0) == (ref_out.detach() > 0)) if relu_output
                    else g64 for k in (1, 2)]
        shared = torch.equal(*upstream)  # no flips in either model: one reference backward serves both
        for k in (1, 2):
            model, _, model_device = models[k]
            xi, out = runs[k]
            g = upstream[k - 1]
            out.backward(g.to(device=model_device, dtype=out.dtype))
            _take_grads(results[k], model, xi)
            if k == 1 or not shared:
                ref_out.backward(g, retain_graph=k == 1 and not shared)
                _take_grads(ref_grads[k - 1], ref64, ref_x)
            else:
                ref_grads[1] = dict(ref_grads[0])
    checks = []
    ref_rec, eager_rec, fused_rec = results
    if train:
        for (name, b64), (_, be), (_, bf) in zip(ref64.named_buffers(), eager.named_buffers(),
                                                 fused.named_buffers()):
            ref_rec[name], eager_rec[name], fused_rec[name] = b64, be, bf
    ref_for_eager, ref_for_fused = ({**ref_rec, **g} for g in ref_grads)
    for name in ["output"] + list(ref_grads[0]) + [n for n in ref_rec if n != "output"]:
        e_ref, f_ref = ref_for_eager[name], ref_for_fused[name]
        e = rel_err(eager_rec[name], e_ref, _zero_grad_scale(name, ref_for_eager, ref64) if train else None)
        f = rel_err(fused_rec[name], f_ref, _zero_grad_scale(name, ref_for_fused, ref64) if train else None)
        checks.append(Check(name, f, e, max(2 * e, floor)))
    return checks


def _take_grads(record: dict[str, Tensor], model: nn.Module, x: Tensor) -> None:
    """Move the input's and every parameter's gradient into ``record`` (clearing them for the next pass)."""
    record["grad input"] = x.grad
    x.grad = None
    for name, p in model.named_parameters():
        record[f"grad {name}"] = p.grad
        p.grad = None


def _zero_grad_scale(name: str, grads: dict[str, Tensor], model: nn.Module) -> Optional[float]:
    """The gradient of a conv bias that feeds a training-mode batch norm is zero in exact arithmetic, so
    both eager's and the fused value are rounding noise and ``||ref||`` is no yardstick. Measure it
    against the gradients of that batch norm's gamma and beta, sums over the same upstream gradient (both
    together: with few values per channel either one alone can cancel)."""
    if not (name.startswith("grad ") and name.endswith(".bias")):
        return None
    conv_name = name[len("grad "):-len(".bias")]
    parent, _, leaf = conv_name.rpartition(".")
    prefix = parent + "." if parent else ""
    # The BN after a conv: bn1/bn2 after conv1/conv2 in a block, the next child in a Sequential stem.
    bn_name = {"conv1": "bn1", "conv2": "bn2"}.get(leaf, str(int(leaf) + 1) if leaf.isdigit() else None)
    modules = dict(model.named_modules())
    bn = modules.get(prefix + bn_name) if bn_name else None
    if not isinstance(modules.get(conv_name), nn.Conv2d) or not isinstance(bn, nn.BatchNorm2d) or not bn.training:
        return None
    parts = [grads.get(f"grad {prefix}{bn_name}.{p}") for p in ("weight", "bias")]
    if any(t is None for t in parts):
        return None
    return torch.cat([t.double().flatten() for t in parts]).norm().item()


def failures(checks: Iterable[Check]) -> list[str]:
    """Human-readable lines for the checks that failed (empty when all passed)."""
    return [f"{c.name}: fused error {c.fused_err:.3e} > bound {c.bound:.3e} (eager {c.eager_err:.3e})"
            for c in checks if not c.ok]
