"""The drop-in contract: constructor, submodule names, state_dict, convert(), nn.Module behaviour."""

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import fused_resnet
from fused_resnet import reference
from fused_resnet.testing import randomize_

SEED_KEYS_1X1 = {
    "conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias", "conv3.weight", "conv3.bias",
    "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var", "bn1.num_batches_tracked",
    "bn2.weight", "bn2.bias", "bn2.running_mean", "bn2.running_var", "bn2.num_batches_tracked",
}


def _states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("use_1x1conv,stride", [(False, 1), (True, 2), (True, 1)])
def test_state_dict_round_trips_both_ways(use_1x1conv, stride):
    cin, cout = (4, 6) if use_1x1conv else (5, 5)
    seed = randomize_(reference.Residual(cin, cout, use_1x1conv, stride))
    fused = fused_resnet.Residual(cin, cout, use_1x1conv, stride)
    fused.load_state_dict(seed.state_dict(), strict=True)
    assert _states_equal(fused.state_dict(), seed.state_dict())
    back = reference.Residual(cin, cout, use_1x1conv, stride)
    back.load_state_dict(fused.state_dict(), strict=True)
    assert _states_equal(back.state_dict(), seed.state_dict())
    if use_1x1conv:
        assert set(fused.state_dict()) == SEED_KEYS_1X1
    else:
        assert fused.conv3 is None
        assert set(fused.state_dict()) == {k for k in SEED_KEYS_1X1 if not k.startswith("conv3")}


def test_submodules_match_the_seed():
    seed, fused = reference.Residual(3, 6, True, 2), fused_resnet.Residual(3, 6, True, 2)
    for name in ("conv1", "conv2", "conv3", "bn1", "bn2"):
        a, b = getattr(seed, name), getattr(fused, name)
        assert type(a) is type(b) and repr(a) == repr(b)


def test_identity_block_rejects_a_shape_change():
    with pytest.raises(ValueError, match="use_1x1conv=True"):
        fused_resnet.Residual(3, 6)
    with pytest.raises(ValueError, match="unknown backend"):
        fused_resnet.Residual(3, 3, backend="nope")


def test_resnet18_has_the_chapters_children_and_shapes():
    fused, seed = fused_resnet.resnet18(), reference.resnet18()
    names = [n for n, _ in fused.named_children()]
    assert names == ["0", "1", "2", "3", "resnet_block1", "resnet_block2", "resnet_block3", "resnet_block4",
                     "global_avg_pool", "fc"]
    assert names == [n for n, _ in seed.named_children()]
    assert fused.state_dict().keys() == seed.state_dict().keys()
    assert sum(isinstance(m, fused_resnet.Residual) for m in fused.modules()) == 8
    fused.load_state_dict(seed.state_dict(), strict=True)
    x = torch.rand(1, 1, 224, 224)
    expected = {"0": (1, 64, 112, 112), "3": (1, 64, 56, 56), "resnet_block1": (1, 64, 56, 56),
                "resnet_block2": (1, 128, 28, 28), "resnet_block3": (1, 256, 14, 14),
                "resnet_block4": (1, 512, 7, 7), "global_avg_pool": (1, 512, 1, 1), "fc": (1, 10)}
    fused.eval()
    with torch.no_grad():
        for name, layer in fused.named_children():
            x = layer(x)
            if name in expected:
                assert tuple(x.shape) == expected[name], name


def test_resnet_block_follows_the_seed():
    stage = fused_resnet.resnet_block(64, 128, 2)
    assert isinstance(stage[0], fused_resnet.Residual) and stage[0].conv3 is not None
    assert stage[0].conv1.stride == (2, 2) and stage[1].conv3 is None
    with pytest.raises(AssertionError):
        fused_resnet.resnet_block(64, 128, 2, first_block=True)


class Residual(nn.Module):
    """A user's own copy of the chapter's class, as d2lzh_pytorch ships it: not our class."""

    def __init__(self, in_channels, out_channels, use_1x1conv=False, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, stride=stride)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.conv3 = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride) if use_1x1conv else None
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)

    def forward(self, X):
        Y = torch.relu(self.bn1(self.conv1(X)))
        Y = self.bn2(self.conv2(Y))
        if self.conv3:
            X = self.conv3(X)
        return torch.relu(Y + X)


class NotAResidual(Residual):
    """Same structure, other name: must be left alone."""


def test_convert_replaces_nested_blocks_and_keeps_parameters():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ModuleDict({"a": nn.Sequential(Residual(8, 8), reference.Residual(8, 16, True, 2))}),
        nn.ModuleList([NotAResidual(16, 16)]),
    )
    randomize_(model)
    before = copy.deepcopy(model).eval()
    params_before = {n: p for n, p in model.named_parameters()}
    out = fused_resnet.convert(model, backend="torch")
    assert out is model
    inner = model[1]["a"]
    assert all(isinstance(m, fused_resnet.Residual) for m in inner)
    assert inner[0].backend == "torch"
    assert type(model[2][0]) is NotAResidual
    # The very same Parameter objects: an optimizer built before convert() keeps training the model.
    assert all(params_before[n] is p for n, p in model.named_parameters())
    assert _states_equal(model.state_dict(), before.state_dict())
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        h, h_ref = model[0](x), before[0](x)
        torch.testing.assert_close(inner(h), before[1]["a"](h_ref), rtol=1e-5, atol=1e-5)


def test_convert_leaves_mismatching_structures_alone():
    odd = reference.Residual(4, 4)
    odd.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)  # not the seed's conv2
    grouped = reference.Residual(4, 4)
    grouped.conv1 = nn.Conv2d(4, 4, 3, padding=1, groups=2)
    wrong_1x1 = reference.Residual(4, 8, True, 2)
    wrong_1x1.conv3 = nn.Conv2d(4, 8, 3, stride=2, padding=1)
    for block in (odd, grouped, wrong_1x1):
        assert not fused_resnet.is_seed_residual(block)
        assert fused_resnet.convert(block) is block
    top = fused_resnet.convert(reference.Residual(4, 4))
    assert isinstance(top, fused_resnet.Residual)


def test_module_behaviour_deepcopy_pickle_to_half_channels_last():
    blk = randomize_(fused_resnet.Residual(4, 8, True, 2, backend="torch")).eval()
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        y = blk(x)
        twin = copy.deepcopy(blk)
        torch.testing.assert_close(twin(x), y)
        buf = io.BytesIO()
        torch.save(blk, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        torch.testing.assert_close(loaded(x), y)
        assert loaded.backend == "torch"
        torch.testing.assert_close(pickle.loads(pickle.dumps(blk))(x), y)
        half = copy.deepcopy(blk).half()
        assert half.conv1.weight.dtype == torch.float16 and half.bn1.running_var.dtype == torch.float16
        assert half(x.half()).dtype == torch.float16
        y_cl = blk(x.contiguous(memory_format=torch.channels_last))
        assert y_cl.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(y_cl, y)
    blk.train()
    assert blk.bn1.training and blk.conv1.training
    assert "backend='torch'" in repr(blk)


def test_backend_registry_and_environment(monkeypatch):
    names = fused_resnet.available_backends()
    assert "torch" in names
    from fused_resnet.backends import BackendUnavailable, resolve_backend
    x = torch.randn(1, 1, 1, 1)
    assert resolve_backend("torch", x, False).name == "torch"
    assert resolve_backend("auto", x, False).name in names
    assert resolve_backend("auto", x, True) is None  # CPU training: the seed route (AUTO_ORDER)
    monkeypatch.setenv("FUSED_RESNET_BACKEND", "torch")
    assert resolve_backend("auto", x, True).name == "torch"
    monkeypatch.setenv("FUSED_RESNET_BACKEND", "bogus")
    with pytest.raises(ValueError, match="unknown backend"):
        resolve_backend("auto", x, True)
    monkeypatch.delenv("FUSED_RESNET_BACKEND")
    if "cuda" not in names:
        with pytest.raises(BackendUnavailable, match="'cuda' is not available"):
            resolve_backend("cuda", x, False)
    if "cpp" in names:
        with pytest.raises(BackendUnavailable, match="cannot run this input"):
            resolve_backend("cpp", x.double(), False)


def test_auto_seed_route_is_the_seed_forward():
    """Where AUTO_ORDER names the seed route (CPU training), an auto block runs the seed's own modules:
    bit for bit what eager gives, forward, running statistics and gradients, with no fused op called."""
    from fused_resnet.backends import AUTO_ORDER, SEED_ROUTE
    assert AUTO_ORDER[("cpu", "train")] == (SEED_ROUTE,)
    seed = randomize_(reference.Residual(3, 6, True, 2))
    fused = fused_resnet.Residual.from_seed(copy.deepcopy(seed))  # auto
    x = torch.randn(2, 3, 7, 7)
    xs, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.profiler.profile() as prof:
        yf = fused(xf)
        yf.square().sum().backward()
    assert not [e.key for e in prof.events() if e.key.startswith("fused_resnet::")]
    ys = seed(xs)
    ys.square().sum().backward()
    assert torch.equal(yf, ys) and torch.equal(xf.grad, xs.grad)
    for (name, a), b in zip(fused.state_dict().items(), seed.state_dict().values()):
        assert torch.equal(a, b), name
    for (name, a), b in zip(fused.named_parameters(), seed.parameters()):
        assert torch.equal(a.grad, b.grad), name

