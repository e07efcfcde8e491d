"""The training block composed in C++ autograd nodes (csrc/block_train.cpp), the training path of every
backend where the extension is built: the same primitives as functional.py's three Python autograd
Functions, in the same order -- the extension's kernels (cpp, cuda) or the Triton backend's operators
(``primitives="triton_"``, under the interpreter without a GPU) -- so the two paths give the same bits --
output, every gradient, running statistics -- for every block the composition serves (chains of 2 and 3;
identity, 1x1 and 1x1+BN shortcuts; frozen or mixed BN modes, cumulative momentum, no running statistics,
frozen weights, autocast). Also: a training call is one operator and three C++ backward nodes; opcheck of
the operator and of the Triton operators it calls; the operator's argument checks."""

import copy

import os

import pytest
import torch
from torch import nn

import fused_resnet
from fused_resnet import functional, reference
from fused_resnet.backends import extension, get_backend
from fused_resnet.testing import randomize_

from tests.conftest import DEVICES

pytestmark = pytest.mark.skipif(not (extension.has_ops() and extension.has_kernel("block_train",
                                                                                  "CompositeImplicitAutograd")),
                                reason="fused_resnet._C is not built (pip install --no-build-isolation -e .)")

# backend -> the device its tensors live on (Triton: the GPU, else the CPU under the interpreter)
DEVICE_OF = {"cpp": "cpu", "cuda": "cuda", "triton": "cuda" if "cuda" in DEVICES else "cpu"}
BACKENDS = [name for name in ("cpp", "cuda") if DEVICE_OF[name] in DEVICES]
if "triton" in fused_resnet.available_backends():
    BACKENDS.append("triton")


def _downsample(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))


def _tv(kind: str):
    tv = pytest.importorskip("torchvision", reason="torchvision is a test-only dependency")
    r = tv.models.resnet
    return {"basic-ds": lambda: r.BasicBlock(8, 16, stride=2, downsample=_downsample(8, 16, 2)),
            "bneck-id": lambda: r.Bottleneck(32, 8),
            "bneck-ds": lambda: r.Bottleneck(16, 8, stride=2, downsample=_downsample(16, 32, 2))}[kind]()


BLOCKS = {  # (chain length, shortcut kind): 2/identity, 2/1x1+bias, 2/1x1+BN, 3/identity, 3/1x1+BN
    "seed-id": lambda: reference.Residual(4, 4),
    "seed-1x1": lambda: reference.Residual(4, 8, True, 2),
    "basic-ds": lambda: _tv("basic-ds"),
    "bneck-id": lambda: _tv("bneck-id"),
    "bneck-ds": lambda: _tv("bneck-ds"),
}


def _bns(block: nn.Module) -> list[nn.Module]:
    return [m for m in block.modules() if isinstance(m, nn.BatchNorm2d)]


def _no_running_stats(block: nn.Module) -> None:
    for name, m in list(block.named_modules()):
        for child_name, child in list(m.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                setattr(m, child_name, nn.BatchNorm2d(child.num_features, track_running_stats=False))


VARIANTS = {
    "train": lambda m: None,
    "frozen-bn": lambda m: [bn.eval() for bn in _bns(m)],           # fine-tuning: running stats, no update
    "mixed-bn": lambda m: _bns(m)[0].eval(),                        # one BN frozen, the others training
    "momentum-none": lambda m: [setattr(bn, "momentum", None) for bn in _bns(m)],
    "no-running-stats": _no_running_stats,
    "frozen-weights": lambda m: m.conv1.weight.requires_grad_(False),
}


def _run(block: nn.Module, x: torch.Tensor, node: bool, monkeypatch, autocast: bool,
         autocast_dtype: torch.dtype = torch.bfloat16) -> list:
    monkeypatch.setattr(get_backend(block.backend), "block_node", node)
    calls = []
    real = functional._training_node
    monkeypatch.setattr(functional, "_training_node", lambda *a: calls.append(1) or real(*a))
    g = torch.Generator(device=x.device).manual_seed(1)
    for step in range(2):
        xi = (x * (1 + step)).detach().requires_grad_(x.requires_grad)
        with torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast):
            y = block(xi)
        (y.float() * torch.randn(y.shape, generator=g, device=x.device)).sum().backward()
    assert len(calls) == (2 if node else 0)
    return [y, xi.grad] + [p.grad for p in block.parameters()] + [b.clone() for b in block.buffers()]


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("block_name", list(BLOCKS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_node_gives_the_python_functions_bits(backend, block_name, variant, monkeypatch):
    device = DEVICE_OF[backend]
    torch.manual_seed(0)
    seed = BLOCKS[block_name]()
    VARIANTS[variant](seed)
    seed = randomize_(seed).to(device)
    fmt = torch.channels_last if block_name.endswith("ds") else torch.contiguous_format
    x = torch.randn(2, seed.conv1.in_channels, 8, 8, device=device).contiguous(memory_format=fmt)
    x.requires_grad_(variant != "frozen-weights")  # frozen weights: the input needs no gradient either
    results = []
    for node in (True, False):
        block = fused_resnet.convert(copy.deepcopy(seed), backend=backend)
        if variant in ("frozen-bn", "mixed-bn"):
            VARIANTS[variant](block)
        results.append(_run(block, x, node, monkeypatch, autocast=False))
    for i, (a, b) in enumerate(zip(*results)):
        assert (a is None) == (b is None), i
        assert a is None or torch.equal(a, b), f"result {i} differs"
    assert results[0][1] is None or results[0][1].abs().sum() > 0


@pytest.mark.parametrize("block_name", ["seed-id", "bneck-id"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_node_under_autocast_keeps_the_identity_in_its_dtype(backend, block_name, monkeypatch):
    """Under autocast the convolutions take a 16-bit copy of X while the identity adds X itself in float32:
    two different inputs of the node, both with their gradient. (float16 for Triton under the interpreter,
    whose bfloat16 dot products are wrong.)"""
    device = DEVICE_OF[backend]
    dtype = torch.float16 if backend == "triton" and device == "cpu" else torch.bfloat16
    torch.manual_seed(0)
    seed = randomize_(BLOCKS[block_name]()).to(device)
    x = torch.randn(2, seed.conv1.in_channels, 8, 8, device=device, requires_grad=True)
    results = [_run(fused_resnet.convert(copy.deepcopy(seed), backend=backend), x, node, monkeypatch, autocast=True,
                    autocast_dtype=dtype) for node in (True, False)]
    assert results[0][0].dtype == torch.float32
    for i, (a, b) in enumerate(zip(*results)):
        assert torch.equal(a, b), f"result {i} differs"


@pytest.mark.parametrize("backend", BACKENDS)
def test_shortcut_conv_with_bias_under_autocast(backend):
    """The seed's 1x1 shortcut convolution has a bias, which autocast leaves in float32 while the
    convolution runs in 16 bits: the block runs (evaluation and a training step) and matches eager under
    the same autocast."""
    device = DEVICE_OF[backend]
    dtype = torch.float16 if backend == "triton" and device == "cpu" else torch.bfloat16
    torch.manual_seed(0)
    seed = randomize_(BLOCKS["seed-1x1"]()).to(device)
    x = torch.randn(2, 4, 8, 8, device=device)
    for training in (False, True):
        outs = []
        for block in (copy.deepcopy(seed), fused_resnet.convert(copy.deepcopy(seed), backend=backend)):
            block.train(training)
            xi = x.clone().requires_grad_(training)
            with torch.autocast(device, dtype=dtype):
                y = block(xi)
            if training:
                y.float().square().sum().backward()
            outs.append((y.float(), xi.grad))
        (y_eager, g_eager), (y_fused, g_fused) = outs
        assert y_fused.dtype == y_eager.dtype and (y_fused - y_eager).abs().max() <= 0.05 * y_eager.abs().max()
        if training:
            assert (g_fused - g_eager).abs().max() <= 0.05 * g_eager.abs().max()


def _nodes(fn) -> list:
    seen, todo = [], [fn]
    while todo:
        f = todo.pop()
        if f is None or f in seen or type(f).__name__ == "AccumulateGrad":
            continue
        seen.append(f)
        todo += [g for g, _ in f.next_functions]
    return seen


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_training_call_is_one_operator_and_three_compiled_nodes(backend):
    """Eager records seven backward nodes for the seed block; the fused block one operator call from
    Python and three C++ nodes -- one per convolution and one for the output, so each node's weight
    gradients are accumulated before the next runs, as in eager -- whose edges go straight to the
    parameters and the input. The nodes call the backend's own primitives (Triton's: its operators)."""
    device = DEVICE_OF[backend]
    seed = randomize_(reference.Residual(4, 4)).train().to(device)
    fused = fused_resnet.convert(copy.deepcopy(seed), backend=backend)
    x = torch.randn(2, 4, 6, 6, device=device, requires_grad=True)
    assert len(_nodes(seed(x).grad_fn)) == 7
    with torch.profiler.profile() as prof:
        y = fused(x)
    nodes = _nodes(y.grad_fn)
    assert [n.name().rsplit("::", 1)[-1].rstrip(">") for n in nodes] == ["Output", "BnReluConv", "FirstConv"]
    ops = [e.key for e in prof.events() if e.key.startswith("fused_resnet::")]
    conv = "fused_resnet::" + get_backend(backend).primitives + "conv_fused"
    assert ops.count("fused_resnet::block_train") == 1 and ops.count(conv) == 2, ops
    leaves = sum(type(g).__name__ == "AccumulateGrad" for n in nodes for g, _ in n.next_functions)
    # x twice (the convolutions' input and the identity), each conv's weight and bias, each BN's gamma and beta
    assert leaves == 2 + 2 * 4


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_mode_batch_norms_fold_in_one_operator_each(backend):
    """Training through frozen BNs (eval mode, gradients on: fine-tuning, or gradients of an eval-mode model):
    each BN's running statistics are folded by one bn_fold call -- one launch on a GPU, where three
    elementwise operators (an add, a rsqrt and a product) each launched their own."""
    device = DEVICE_OF[backend]
    seed = randomize_(reference.Residual(4, 8, True, 2)).eval().to(device)
    fused = fused_resnet.convert(copy.deepcopy(seed), backend=backend)
    x = torch.randn(2, 4, 6, 6, device=device, requires_grad=True)
    with torch.profiler.profile() as prof:
        fused(x).sum().backward()
    ops = [e.key for e in prof.events()]
    assert ops.count("fused_resnet::block_train") == 1, ops
    assert ops.count("fused_resnet::" + get_backend(backend).primitives + "bn_fold") == 2, ops
    assert "aten::rsqrt" not in ops, ops


def test_profiler_ranges_take_the_python_functions(monkeypatch):
    """With profiler ranges on (`python -m fused_resnet profile`) training takes the Python Functions, whose
    stages carry NVTX ranges; the results are the same bits."""
    from fused_resnet import profiling
    seed = randomize_(reference.Residual(4, 4)).train()
    x = torch.randn(2, 4, 6, 6)
    outs = []
    for ranges in (True, False):
        monkeypatch.setattr(profiling, "ENABLED", ranges)
        fused = fused_resnet.convert(copy.deepcopy(seed), backend="cpp")
        with torch.profiler.profile() as prof:
            outs.append(fused(x))
        keys = {e.key for e in prof.events()}
        assert ("fused_resnet::block_train" in keys) != ranges
        assert ("fused_resnet::K1 conv+stats" in keys)  # a range from Python or a scope from C++
    assert torch.equal(*outs)


def _op_args(requires_grad: bool):
    """block_train's arguments for a seed block with a 1x1 shortcut (chain 2, kind 1), by hand."""
    t = lambda *s: torch.randn(*s).requires_grad_(requires_grad)  # noqa: E731
    x = torch.randn(2, 3, 6, 6).requires_grad_(requires_grad)
    w1, w2, sw = t(5, 3, 3, 3), t(5, 5, 3, 3), t(5, 3, 1, 1)
    tensors = [x, None, w1, t(5), 1 + t(5).detach(), t(5), w2, t(5), 1 + t(5).detach(), t(5), sw, t(5), None, None]
    means, variances = [torch.zeros(5), torch.zeros(5), None], [torch.ones(5), torch.ones(5), None]
    counts = [torch.tensor(3), torch.tensor(3), None]  # num_batches_tracked of the chain BNs
    config = [2, 1, 2, 1, 1, 1, 2, 1, 1, 0]  # L, kind, (stride, padding) x 2, shortcut stride, batch stats x 3
    return (tensors, [w1.detach(), w2.detach(), sw.detach()], means, variances, counts, config,
            [1e-5, 0.1, 1e-5, 0.1, 0.0, -1.0])


@pytest.mark.parametrize("requires_grad", [False, True])
def test_block_train_passes_opcheck(requires_grad):
    torch.library.opcheck(torch.ops.fused_resnet.block_train.default, _op_args(requires_grad))


def test_block_train_rejects_bad_arguments():
    op = torch.ops.fused_resnet.block_train.default
    tensors, kw, means, variances, counts, config, ef = _op_args(False)
    with pytest.raises(RuntimeError, match="chain length"):
        op(tensors, kw, means, variances, counts, [4] + config[1:], ef)
    with pytest.raises(RuntimeError, match="config must have 10 entries"):
        op(tensors, kw, means, variances, counts, config[:-1], ef)
    with pytest.raises(RuntimeError, match="tensors must have 14 entries"):
        op(tensors[:-1], kw, means, variances, counts, config, ef)
    with pytest.raises(RuntimeError, match="kernel_weights must have 3 entries"):
        op(tensors, kw[:2], means, variances, counts, config, ef)
    with pytest.raises(RuntimeError, match="batch_counts must have 3 entries"):
        op(tensors, kw, means, variances, counts[:2], config, ef)
    with pytest.raises(RuntimeError, match="needs its weight"):
        op(tensors[:2] + [None] + tensors[3:], kw, means, variances, counts, config, ef)
    no_stats = config[:7] + [0, 1, 0]  # the first BN without batch statistics, and no running statistics
    with pytest.raises(RuntimeError, match="BN 0 without batch statistics needs running statistics"):
        op(tensors, kw, [None] * 3, [None] * 3, [None] * 3, no_stats, ef)
    with pytest.raises(RuntimeError, match="num_batches_tracked must be one int64 element"):
        op(tensors, kw, means, variances, [torch.tensor(3.0)] + counts[1:], config, ef)


def _needed(path) -> list[str]:
    """The DT_NEEDED entries of a 64-bit little-endian ELF shared object (its shared-library dependencies)."""
    import struct
    data = open(path, "rb").read()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, f"{path}: not a 64-bit little-endian ELF"
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    dynamic = next(s for s in sections if s[1] == 6)  # SHT_DYNAMIC; its sh_link is the string table
    strtab_off = sections[dynamic[6]][4]
    needed = []
    for off in range(dynamic[4], dynamic[4] + dynamic[5], 16):
        tag, val = struct.unpack_from("<qQ", data, off)
        if tag == 0:
            break
        if tag == 1:  # DT_NEEDED
            start = strtab_off + val
            needed.append(data[start:data.index(b"\0", start)].decode())
    return needed


def test_extension_shares_torchs_libstdcxx():
    """The extension links libstdc++ as the shared library torch uses (setup.py): built with a toolchain
    that linked it statically, its own copy's streams could not format a number, and the error messages
    above came out cut short (this machine) or crashed the process (the GPU machine's image)."""
    import fused_resnet._C as ext
    assert "libstdc++.so.6" in _needed(ext.__file__), "libstdc++ is not a shared-library dependency"


def test_link_args_keep_libstdcxx_shared_under_a_static_default_toolchain(tmp_path):
    """setup.py's link arguments against the GPU machine's toolchain, re-enacted: g++ linking libstdc++
    statically by default (-static-libstdc++) and a library directory holding only the archive ahead of
    the shared library's. There the earlier arguments (-Wl,-Bdynamic -lstdc++) found the archive and the
    extension got its own copy (the crash of the second GPU run); setup.py's arguments must still record
    libstdc++.so.6 as a dependency, and the shared object must work."""
    import ctypes
    import importlib.util
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    if not sys.platform.startswith("linux") or shutil.which("g++") is None:
        pytest.skip("needs g++ on Linux (the extension's own build does)")
    archive = subprocess.run(["g++", "-print-file-name=libstdc++.a"], capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(archive):
        pytest.skip("this g++ has no static libstdc++ to re-enact the toolchain with")
    spec = importlib.util.spec_from_file_location("fused_resnet_setup", Path(__file__).parents[1] / "setup.py")
    setup_py = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup_py)  # defines the helpers; setup() runs only as __main__
    static_only = tmp_path / "static"
    static_only.mkdir()
    shutil.copy(archive, static_only / "libstdc++.a")
    src = tmp_path / "fmt.cpp"
    src.write_text('#include <sstream>\n#include <string>\n#include <cstring>\n'
                   'extern "C" int fmt(long n, char* out) { std::ostringstream s; s << "n=" << n; '
                   'std::strcpy(out, s.str().c_str()); return (int)s.str().size(); }\n')

    def build(name, link_args):
        so = tmp_path / name
        subprocess.run(["g++", "-shared", "-fPIC", "-static-libstdc++", f"-L{static_only}", str(src), "-o", str(so),
                        *link_args], check=True, capture_output=True)
        return so

    old = build("old.so", ["-Wl,-Bdynamic", "-lstdc++"])
    assert "libstdc++.so.6" not in _needed(old), "the re-enactment does not reproduce the static link"
    new = build("new.so", setup_py.libstdcxx_link_args())
    assert "libstdc++.so.6" in _needed(new)
    buf = ctypes.create_string_buffer(64)
    assert ctypes.CDLL(str(new)).fmt(-1234567, buf) == 10 and buf.value == b"n=-1234567"


def test_block_node_switch_forces_the_python_functions(monkeypatch):
    """FUSED_RESNET_BLOCK_NODE=0 (read at import into functional.BLOCK_NODE): training takes the Python
    Functions for every backend, with the same bits."""
    import subprocess
    import sys
    env = dict(os.environ, FUSED_RESNET_BLOCK_NODE="0")
    out = subprocess.run([sys.executable, "-c", "from fused_resnet import functional; print(functional.BLOCK_NODE)"],
                         env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    seed = randomize_(reference.Residual(4, 4)).train()
    x = torch.randn(2, 4, 6, 6)
    outs = []
    for switch in (True, False):
        monkeypatch.setattr(functional, "BLOCK_NODE", switch)
        calls = []
        real = functional._training_node
        monkeypatch.setattr(functional, "_training_node", lambda *a: calls.append(1) or real(*a))
        outs.append(fused_resnet.convert(copy.deepcopy(seed), backend="cpp")(x))
        monkeypatch.setattr(functional, "_training_node", real)
        assert len(calls) == (1 if switch else 0)
    assert torch.equal(*outs)
