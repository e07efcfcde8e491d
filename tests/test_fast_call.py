"""fused_resnet._C.call (csrc/fast_call.cpp, ``extension.fast_caller``): the package's operators called
without torch.ops' argument parsing -- the same results and errors, the operator still seen by the
dispatcher (dispatch modes, the profiler), and every call it does not take (a tensor subclass, a torch
function mode, keywords, another argument count) handed to the operator's Python object."""

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from fused_resnet.backends import extension

pytestmark = pytest.mark.skipif(not (extension.has_ops() and hasattr(extension._C, "call")),
                                reason="fused_resnet._C is not built (pip install --no-build-isolation -e .)")


def _fold_args():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(6, generator=g), 0.5 + torch.rand(6, generator=g),
            torch.nn.Parameter(torch.randn(6, generator=g)), torch.randn(6, generator=g).half(), 1e-5)


def _conv_args():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 5, 5, generator=g).contiguous(memory_format=torch.channels_last)
    w = torch.nn.Parameter(torch.randn(4, 3, 3, 3, generator=g))
    vec = lambda lo: lo + torch.rand(4, generator=g)  # noqa: E731
    return (x, w, None, 1, 1, vec(-0.5), vec(0.5), vec(0.5), vec(-0.5), 1e-5, None, None, None, None, None, None,
            None, 1, False, True, True, torch.float32, False)


class _Counting:
    """An operator's stand-in fallback that counts the calls it takes."""

    def __init__(self, op):
        self.op, self.calls = op, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.op(*args, **kwargs)


def _caller(op):
    fallback = _Counting(op)
    index = extension._C.resolve(op._schema.name, fallback)
    return (lambda *a, **k: extension._C.call(index, *a, **k)), fallback


@pytest.mark.parametrize("name,args", [("bn_fold", _fold_args), ("conv_fused", _conv_args)])
def test_plain_calls_give_the_operators_bits_without_the_fallback(name, args):
    op = getattr(torch.ops.fused_resnet, name).default
    call, fallback = _caller(op)
    a = args()
    got, want = call(*a), op(*a)
    assert fallback.calls == 0
    assert isinstance(got, tuple) and len(got) == len(want)
    for g, w in zip(got, want):
        assert type(g) is torch.Tensor and torch.equal(g, w)


def test_the_calls_it_does_not_take_go_to_the_operator():
    op = torch.ops.fused_resnet.bn_fold.default
    call, fallback = _caller(op)
    a = list(_fold_args())

    class Sub(torch.Tensor):
        pass

    want = op(*a)
    for same, declined in ((True, lambda: call(a[0].as_subclass(Sub), *a[1:])),   # a tensor subclass
                           (True, lambda: call(*a[:4], eps=a[4])),                 # keywords
                           (False, lambda: call(*a, 1.0)),                         # another argument count
                           (False, lambda: call(*a[:4], True))):                   # a bool where a float goes
        before = fallback.calls
        try:
            out = declined()
        except (TypeError, RuntimeError):  # the operator's own error for arguments it rejects
            out = None
        assert fallback.calls == before + 1
        if same:
            assert all(torch.equal(g, w) for g, w in zip(out, want))

    class Mode(TorchFunctionMode):
        seen = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            Mode.seen += 1
            return func(*args, **(kwargs or {}))

    before = fallback.calls
    with Mode():
        call(*a)
    assert fallback.calls == before + 1 and Mode.seen >= 1


def test_errors_dispatch_modes_and_the_profiler_see_the_operator():
    op = torch.ops.fused_resnet.bn_fold.default
    call, _ = _caller(op)
    a = _fold_args()
    with pytest.raises(RuntimeError, match="bn_fold: running_var must have shape"):
        call(a[0], torch.ones(5), *a[2:])

    class Seen(TorchDispatchMode):
        ops: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Seen.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with Seen():
        call(*a)
    assert "fused_resnet.bn_fold.default" in Seen.ops
    with torch.profiler.profile() as prof:
        call(*a)
    assert "fused_resnet::bn_fold" in {e.key for e in prof.events()}


def test_block_calls_take_the_fast_path(monkeypatch):
    """The per-block calls (Triton's replayed convolutions, block_train, the extension's conv_fused) go
    through _C.call: none reaches torch.ops' Python object on a plain model."""
    import copy

    import fused_resnet
    from fused_resnet import functional, reference
    from fused_resnet.backends import get_backend
    from fused_resnet.testing import randomize_

    seen = []
    real = extension._C.call

    def spy(index, *args, **kwargs):
        seen.append(index)
        return real(index, *args, **kwargs)

    fallbacks = []
    monkeypatch.setattr(extension._C, "call", spy)
    monkeypatch.setattr(functional, "_BLOCK_TRAIN", [])
    fast = extension.fast_caller
    monkeypatch.setattr(extension, "fast_caller", lambda op: fast(_counting(op, fallbacks)))
    monkeypatch.setattr(extension, "_conv_fused_fast", extension.fast_caller(torch.ops.fused_resnet.conv_fused.default))
    seed = randomize_(reference.Residual(4, 8, True, 2))
    fused = fused_resnet.convert(copy.deepcopy(seed), backend="cpp")
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    fused.train()(x).sum().backward()          # block_train
    with torch.no_grad():
        fused.eval()(x)                        # conv_fused twice
    assert len(seen) == 3 and not fallbacks, (seen, fallbacks)
    assert get_backend("cpp").block_node


def _counting(op, log: list):
    class Fallback:
        _schema, _overloadname = op._schema, op._overloadname

        def __call__(self, *args, **kwargs):
            log.append(op._schema.name)
            return op(*args, **kwargs)

    return Fallback()
