"""torchvision's ResNets through convert(): BasicBlock and Bottleneck recognised by structure, fused, and
checked against the unconverted model with a float64 reference (outputs, every gradient, running
statistics over two training steps; then eval), the state_dict loading both ways, and what cannot be
fused left alone and correct. torchvision is a test-only dependency.

Cost note: under the Triton interpreter (CI) a whole ResNet-34/50 takes minutes per step, so there the
Triton backend runs ResNet-18 and the Bottleneck blocks (every code path: 1x1 and strided 3x3 chain
convolutions, identity and downsample shortcuts, wide blocks); on a GPU it runs every model."""

import copy

import pytest
import torch
from torch import nn

import fused_resnet
from fused_resnet import FusedBlock
from fused_resnet.testing import compare_models, failures, randomize_

from tests.conftest import HAS_CUDA, assert_compiled_step_matches, backends_for

tv = pytest.importorskip("torchvision", reason="torchvision is a test-only dependency: "
                                               "pip install torch==2.14.1 torchvision==0.29.1")
Bottleneck, BasicBlock = tv.models.resnet.Bottleneck, tv.models.resnet.BasicBlock

DEVICE = "cuda" if HAS_CUDA else "cpu"
INTERPRETED = not HAS_CUDA
# (model, input). Batch norm over very few values per channel is ill-conditioned: at a batch of 2 and 1x1
# positions eager float32 itself is off the float64 reference by O(1), so the deeper models take 4 images
# (and ResNet-50 64x64, its last stage 2x2) for eager's error to be a yardstick.
MODELS = {"resnet18": (2, 3, 32, 32), "resnet34": (4, 3, 32, 32), "resnet50": (4, 3, 64, 64)}


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return randomize_(getattr(tv.models, name)(num_classes=10))


def _model_params():
    params = []
    for name in MODELS:
        for backend in backends_for(DEVICE, training=True):
            marks = [pytest.mark.slow] if backend == "triton" else []
            if backend == "triton" and INTERPRETED and name != "resnet18":
                continue  # see the module docstring: the Bottleneck block tests cover it here
            params.append(pytest.param(name, backend, id=f"{name}-{backend}", marks=marks))
    return params


@pytest.mark.parametrize("name", list(MODELS))
def test_convert_replaces_every_block_and_keeps_the_state_dict(name):
    """Every BasicBlock/Bottleneck becomes a FusedBlock holding the very same parameters and buffers;
    the state_dict keys stay torchvision's, so a checkpoint loads before or after conversion."""
    model = _model(name)
    kind = "Bottleneck" if name == "resnet50" else "BasicBlock"
    blocks = sum(type(m).__name__ == kind for m in model.modules())
    params = dict(model.named_parameters())
    checkpoint = copy.deepcopy(model.state_dict())
    out = fused_resnet.convert(model)
    assert out is model
    fused = [m for m in model.modules() if isinstance(m, FusedBlock)]
    assert len(fused) == blocks and all(m.kind == kind for m in fused)
    assert not any(type(m).__name__ == kind for m in model.modules())
    assert all(params[n] is p for n, p in model.named_parameters())  # an optimizer built before keeps working
    assert list(model.state_dict()) == list(checkpoint)
    model.load_state_dict(checkpoint, strict=True)
    back = getattr(tv.models, name)(num_classes=10)
    back.load_state_dict(model.state_dict(), strict=True)
    for key, value in back.state_dict().items():
        assert torch.equal(value, checkpoint[key]), key


@pytest.mark.parametrize("name,backend", _model_params())
def test_model_trains_and_evaluates_like_the_unconverted_one(name, backend):
    model = _model(name)
    fused = fused_resnet.convert(copy.deepcopy(model), backend=backend)
    x = torch.randn(MODELS[name])
    for train, steps in ((True, 2), (False, 1)):
        checks = compare_models(fused, model, x, train=train, dtype=torch.float32, device=DEVICE, steps=steps)
        names = {c.name for c in checks}
        assert "grad layer1.0.conv1.weight" in names and "grad input" in names
        if train:
            assert "layer4.1.bn2.running_var" in names
        assert not failures(checks), "\n".join(failures(checks))


BLOCKS = {
    "bottleneck-id": lambda: Bottleneck(32, 8),
    "bottleneck-downsample-s2": lambda: Bottleneck(16, 8, stride=2, downsample=_downsample(16, 32, 2)),
    "bottleneck-downsample-s1": lambda: Bottleneck(8, 4, downsample=_downsample(8, 16, 1)),
    "wide-bottleneck": lambda: Bottleneck(32, 8, base_width=128),  # wide_resnet50_2's: width = 2 x planes
    "basic-id": lambda: BasicBlock(8, 8),
    "basic-downsample-s2": lambda: BasicBlock(8, 16, stride=2, downsample=_downsample(8, 16, 2)),
}


def _downsample(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))


def _block_params(training: bool):
    return [pytest.param(b, k, id=f"{k}-{b}") for k in BLOCKS for b in backends_for(DEVICE, training)]


@pytest.mark.parametrize("fmt", ["nchw", "nhwc"])
@pytest.mark.parametrize("backend,block", _block_params(True))
def test_block_trains_and_evaluates_like_torchvision(backend, block, fmt):
    torch.manual_seed(0)
    ref = randomize_(BLOCKS[block]())
    fused = fused_resnet.convert(copy.deepcopy(ref), backend=backend)
    assert isinstance(fused, FusedBlock)
    cin = ref.conv1.in_channels
    x = torch.randn(2, cin, 7, 7)
    memory_format = torch.channels_last if fmt == "nhwc" else torch.contiguous_format
    for train, steps in ((True, 2), (False, 1)):
        checks = compare_models(fused, ref, x, train=train, dtype=torch.float32, device=DEVICE, steps=steps,
                                memory_format=memory_format)
        assert not failures(checks), "\n".join(failures(checks))


@pytest.mark.parametrize("backend", backends_for(DEVICE, True))
def test_each_batch_norm_follows_its_own_training_flag(backend):
    """Fine-tuning a Bottleneck with its shortcut's BN and bn2 frozen: running statistics there, batch
    statistics elsewhere, as in eager."""
    torch.manual_seed(0)
    ref = randomize_(BLOCKS["bottleneck-downsample-s2"]())
    fused = fused_resnet.convert(copy.deepcopy(ref), backend=backend)

    class Freeze(nn.Module):
        def __init__(self, blk):
            super().__init__()
            self.blk = blk

        def forward(self, x):
            self.blk.bn2.eval(), self.blk.downsample[1].eval()
            return self.blk(x)

    checks = compare_models(Freeze(fused), Freeze(ref), torch.randn(2, 16, 8, 8), train=True, dtype=torch.float32,
                            device=DEVICE, steps=2)
    assert not failures(checks), "\n".join(failures(checks))


def test_eval_launches_one_kernel_per_chain_convolution(unpoisoned):
    """Inference: BasicBlock 2 launches and Bottleneck 3, the downsample (its BN folded) inside the last."""
    if "triton" not in fused_resnet.available_backends():
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
    from fused_resnet.backends.triton import recording
    for block, launches in (("basic-downsample-s2", 2), ("bottleneck-downsample-s2", 3), ("bottleneck-id", 3)):
        torch.manual_seed(0)
        fused = fused_resnet.convert(randomize_(BLOCKS[block]()), backend="triton").to(DEVICE).eval()
        with torch.no_grad(), recording(execute=False) as rec:
            fused(torch.randn(2, fused.conv1.in_channels, 8, 8, device=DEVICE))
        assert [s.short_name for s, *_ in rec.launches] == ["conv_bn_act_kernel"] * launches, block


def test_folded_shortcut_follows_its_parameters():
    """The eval shortcut's BN is folded into its weights once and cached; any change to the weights or to
    the BN (an optimizer step, load_state_dict, running statistics) is seen on the next call."""
    torch.manual_seed(0)
    ref = randomize_(BLOCKS["basic-downsample-s2"]()).eval()
    fused = fused_resnet.convert(copy.deepcopy(ref), backend="torch").eval()
    x = torch.randn(2, 8, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-5, atol=1e-5)
        for change in (lambda m: m.downsample[0].weight.mul_(1.5), lambda m: m.downsample[1].running_var.add_(2.0),
                       lambda m: m.downsample[1].bias.add_(0.5)):
            change(ref), change(fused)
            torch.testing.assert_close(fused(x), ref(x), rtol=1e-5, atol=1e-5)
    fused.load_state_dict(randomize_(BLOCKS["basic-downsample-s2"]()).state_dict())
    ref.load_state_dict(fused.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-5, atol=1e-5)


def test_folded_shortcut_follows_a_new_layout_and_is_not_cached_while_a_graph_records(monkeypatch):
    """A ``.data`` view of the same storage (the shortcut's square 1x1 weight transposed: same address,
    version and shape) is a new weight to fold; during a CUDA graph's capture the fold is not kept."""
    from fused_resnet import functional
    torch.manual_seed(0)
    ref = randomize_(BasicBlock(8, 8, stride=2, downsample=_downsample(8, 8, 2))).eval()
    fused = fused_resnet.convert(copy.deepcopy(ref), backend="torch").eval()
    x = torch.randn(2, 8, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-5, atol=1e-5)
        for m in (ref, fused):
            m.downsample[0].weight.data = m.downsample[0].weight.data.transpose(0, 1)
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-5, atol=1e-5)
        monkeypatch.setattr(functional, "capturing", lambda t: True)
        del fused.__dict__["_folded_shortcut"]
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-5, atol=1e-5)
        assert "_folded_shortcut" not in fused.__dict__


@pytest.mark.parametrize("backend", backends_for(DEVICE, training=True))
def test_eval_after_a_training_step_sees_the_new_running_statistics(backend):
    """A training loop's validation: eval (the shortcut's BN folded and cached), a training step (the kernels
    update the running statistics in place), eval again -- the second eval folds the new statistics (their
    version counters move, as a cache keyed on them needs), every backend."""
    torch.manual_seed(0)
    ref = randomize_(BLOCKS["basic-downsample-s2"]()).to(DEVICE)
    fused = fused_resnet.convert(copy.deepcopy(ref), backend=backend)
    x = torch.randn(2, 8, 8, 8, device=DEVICE)
    stats = fused.downsample[1].running_mean, fused.downsample[1].running_var, fused.bn2.running_var
    for step in range(3):
        with torch.no_grad():
            torch.testing.assert_close(fused.eval()(x), ref.eval()(x), rtol=1e-5, atol=1e-5, msg=f"eval {step}")
        if step == 2:
            break
        versions = [t._version for t in stats]
        for m in (ref, fused):
            m.train()(x * 3 + 1).sum().backward()
        assert all(t._version > v for t, v in zip(stats, versions)), "running statistics updated unseen"
        for a, b in zip(fused.buffers(), ref.buffers()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_what_cannot_be_fused_is_left_alone_and_correct():
    """Groups (ResNeXt), dilation, another norm and a custom downsample: not converted, outputs unchanged."""
    torch.manual_seed(0)
    grouped = Bottleneck(16, 8, groups=4, base_width=8, downsample=_downsample(16, 32, 1))
    dilated = Bottleneck(32, 8, dilation=2)
    group_norm = Bottleneck(32, 8, norm_layer=lambda c: nn.GroupNorm(2, c))
    custom = BasicBlock(8, 16, stride=2, downsample=nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(8, 16, 1)))
    resnext = tv.models.resnext50_32x4d(num_classes=10)
    for original in (grouped, dilated, group_norm, custom):
        model = randomize_(nn.Sequential(original)).eval()
        x = torch.randn(2, original.conv1.in_channels, 8, 8)
        with torch.no_grad():
            want = model(x)
        assert fused_resnet.block_layout(original) is None
        converted = fused_resnet.convert(model)
        assert converted[0] is original
        with torch.no_grad():
            assert torch.equal(converted(x), want)
    fused_resnet.convert(resnext)
    assert not any(isinstance(m, FusedBlock) for m in resnext.modules())


def test_bad_input_names_the_block_and_the_problem():
    fused = fused_resnet.convert(Bottleneck(16, 8, stride=2, downsample=_downsample(16, 32, 2)))
    with pytest.raises(ValueError, match="Bottleneck expected an input with 16 channels, got 8"):
        fused(torch.randn(2, 8, 8, 8))
    with pytest.raises(ValueError, match="4D input"):
        fused(torch.randn(16, 8, 8))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        fused.train()(torch.randn(1, 16, 2, 2))  # the strided conv2 leaves 1x1: as BatchNorm2d refuses


def _autocast_params():
    """CPU: bfloat16, the CPU's autocast dtype (float16 convolutions take a slow path there: 36 s)."""
    backends = fused_resnet.available_backends()
    params = [pytest.param("cpu", "cpp", torch.bfloat16, id="cpu-cpp-bfloat16")] if "cpp" in backends else []
    return params + [pytest.param("cuda", b, dt, id=f"cuda-{b}-{str(dt)[6:]}", marks=pytest.mark.gpu)
                     for b in ("triton", "cuda") for dt in (torch.float16, torch.bfloat16)
                     if HAS_CUDA and b in backends]


@pytest.mark.parametrize("device,backend,dtype", _autocast_params())
def test_resnet50_training_step_under_autocast_channels_last(device, backend, dtype):
    """A converted ResNet-50 in channels_last takes a training step under autocast as eager does. Both are
    measured against the model in float32 (TF32 off) with eager's error as the yardstick: a randomly
    initialised ResNet-50's gradients in 16 bits are mostly rounding noise -- in bfloat16 eager's input
    gradient lies 1.3 times its norm from float32's (the CPU; 0.7 in float16) -- so fused and eager differ
    by as much from each other (the first GPU run compared them directly, and failed)."""
    from fused_resnet.testing import rel_err
    model = _model("resnet50").to(device=device, memory_format=torch.channels_last)
    fused = fused_resnet.convert(copy.deepcopy(model), backend=backend)
    full = copy.deepcopy(model)
    x = torch.randn(8, 3, 64, 64, device=device).contiguous(memory_format=torch.channels_last)
    outs = []
    for m, autocast in ((full, False), (model, True), (fused, True)):
        xi = x.clone().requires_grad_()
        with torch.autocast(device, dtype=dtype, enabled=autocast):
            out = m(xi)
        out.float().square().mean().backward()
        outs.append((out, xi.grad, m.layer1[0].conv2.weight.grad, m.layer4[2].bn3.weight.grad))
    for name, want, a, b in zip(("output", "grad input", "grad layer1.0.conv2", "grad layer4.2.bn3"), *outs):
        assert a.dtype == b.dtype, name
        eager_err, fused_err = rel_err(a, want), rel_err(b, want)
        assert fused_err <= max(2 * eager_err, 5e-2), f"{name}: fused {fused_err:.3e}, eager {eager_err:.3e}"


def test_the_packages_twins_are_torchvisions_models():
    """reference.resnet50 / Bottleneck / BasicBlock (what the benchmarks build without torchvision) have
    torchvision's state_dict, key for key, and compute what torchvision's do."""
    from fused_resnet import reference
    torch.manual_seed(0)
    ours, theirs = randomize_(reference.resnet50(num_classes=10)).eval(), tv.models.resnet50(num_classes=10).eval()
    assert list(ours.state_dict()) == list(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))
    block = randomize_(reference.BasicBlock(8, 16, 2, _downsample(8, 16, 2))).eval()
    twin = BasicBlock(8, 16, 2, _downsample(8, 16, 2)).eval()
    twin.load_state_dict(block.state_dict(), strict=True)
    with torch.no_grad():
        x = torch.randn(2, 8, 6, 6)
        assert torch.equal(block(x), twin(x))
    assert fused_resnet.block_layout(ours.layer2[0]) == fused_resnet.block_layout(theirs.layer2[0])


@pytest.mark.parametrize("backend", [b for b in backends_for(DEVICE, True) if b in ("torch", "triton")])
def test_compiled_bottleneck_training_step_has_no_graph_breaks(backend):
    torch.manual_seed(0)
    ref = randomize_(BLOCKS["bottleneck-downsample-s2"]()).to(DEVICE)
    fused = fused_resnet.convert(copy.deepcopy(ref), backend=backend)
    assert_compiled_step_matches(fused, ref, torch.randn(2, 16, 6, 6, device=DEVICE))
