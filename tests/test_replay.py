"""Triton operator calls replayed from C++ (fused_resnet/backends/triton/replay.py, csrc/replay.cpp): the
Triton backend's later calls of a key allocate and launch what an earlier call's Python launcher did.
Without a GPU, proven offline (Triton compiles for sm_90, launches are recorded: a process with the
interpreter off); with one, replayed and Python steps must give the same bits."""

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fused_resnet
from fused_resnet import reference
from fused_resnet.backends.extension import has_kernel
from fused_resnet.testing import randomize_

from tests.conftest import HAS_CUDA

pytestmark = [
    pytest.mark.skipif("triton" not in fused_resnet.available_backends(),
                       reason="Triton needs a GPU or TRITON_INTERPRET=1"),
    pytest.mark.skipif(not has_kernel("block_train", "CompositeImplicitAutograd"),
                       reason="replaying is the C++ training composition's (the extension is not built)"),
]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _offline(code: str, **env_extra) -> str:
    """Run ``code`` in a process with the interpreter off; returns its output (asserts it succeeded)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.update(env_extra)
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout


@pytest.mark.skipif(HAS_CUDA, reason="offline launches stand in for a GPU this machine lacks")
def test_replayed_steps_launch_what_the_python_launchers_launch_offline():
    """Both block kinds, float32 and bfloat16, channels_last, NCHW, a misaligned input, the two-level
    merge: a replayed training step (batch norms training, or frozen) and inference call launch the same
    variants, grids and arguments as the Python launchers (each pointer the same input or the same tensor
    of the call), and no Python launcher runs, nor Triton's ``CudaLauncher.__call__`` (replays call its C
    ``launch``, here a recorder behind the real ``__call__``). And the check has teeth: a plan with an
    input's offset moved, two allocations (or inputs) swapped, its last launch dropped or a fixed argument
    of the C launch missing fails it in every case, and so do replays that call the launcher object instead
    of its C launch."""
    out = _offline("""
        from fused_resnet.backends.triton import offline, replay
        assert offline.check_replayed_calls() == [], offline.check_replayed_calls()
        plan = replay._Capture.plan

        def mutated(kind):
            def wrong(self):
                allocs, outs, launches = plan(self)
                if kind == "drop":
                    return allocs, outs, launches[:-1]
                launches = [list(l) for l in launches]
                if kind == "c-order":  # the C launch called with one of its fixed arguments missing
                    for l in launches:
                        l[1] = l[1][:-1]
                    return allocs, outs, tuple(tuple(l) for l in launches)
                for l in launches:
                    spec = list(l[-1])
                    inputs = [i for i, a in enumerate(spec) if a[0] == 0]
                    fresh = [i for i, a in enumerate(spec) if a[0] == 1]
                    if kind == "offset" and inputs:
                        spec[inputs[0]] = (0, spec[inputs[0]][1], spec[inputs[0]][2] + 16)
                    elif kind == "swap" and len(fresh if len(fresh) >= 2 else inputs) >= 2:
                        i, j = (fresh if len(fresh) >= 2 else inputs)[:2]
                        spec[i], spec[j] = spec[j], spec[i]
                    l[-1] = tuple(spec)
                return allocs, outs, tuple(tuple(l) for l in launches)
            return wrong

        for kind in ("offset", "swap", "drop", "c-order"):
            replay._Capture.plan = mutated(kind)
            print(kind, len(offline.check_replayed_calls()))
        replay._Capture.plan = plan
        # Triton's CudaLauncher object called instead of its C launch: the same launches, one frame more each
        replay._callee = lambda run: (run, (), (), False)
        print("frame", len(offline.check_replayed_calls()))
    """)
    # 10 blocks (both kinds, two dtypes, five layouts) x 3 calls (training, frozen-BN training, inference)
    assert out.split() == ["offset", "30", "swap", "30", "drop", "30", "c-order", "30", "frame", "30"], out


@pytest.mark.skipif(HAS_CUDA, reason="offline launches stand in for a GPU this machine lacks")
def test_the_gate_turns_replaying_off_and_keys_the_state_plans_depend_on():
    """Off (None) while launches are recorded or counted, with a forced or modelled configuration, a
    dispatch mode (it must see the operator calls), poisoned outputs or FUSED_RESNET_TRITON_REPLAY=0; the
    token changes with the tile table, the driver's compiled kernels and the TF32 switch, and a changed
    table makes the next step plan afresh. A training step asks it once per C++ node, not per call."""
    out = _offline("""
        import copy
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode
        import fused_resnet
        from fused_resnet import reference
        from fused_resnet.backends import base
        from fused_resnet.backends.triton import configs, launch, offline, replay
        from fused_resnet.testing import randomize_

        with offline.offline_launches(keep=False):
            token = replay.gate()[0]
            class Mode(TorchDispatchMode):
                def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                    return func(*args, **(kwargs or {}))

            for ctx in (launch.counting(), launch.recording(), configs.forced_conv_config(configs.ConvConfig(
                        32, 32, 16, 1, 4, 1)), configs.modelled_device(configs.A100), Mode()):
                with ctx:
                    assert replay.gate() is None, ctx
            base.POISON_OUTPUTS, poison = True, base.POISON_OUTPUTS
            assert replay.gate() is None
            base.POISON_OUTPUTS = poison
            for flips in (1, 2):  # the switch the launcher and the gate read is the property's
                torch.backends.cudnn.allow_tf32 = not torch.backends.cudnn.allow_tf32
                assert launch.tf32_allowed() == torch.backends.cudnn.allow_tf32
                assert (replay.gate()[0] == token) == (flips == 2)
            configs.TUNED_CONV[(1, 1, 1, 1, torch.float32, 90, True)] = configs.ConvConfig(32, 32, 16, 1, 4, 1)
            assert replay.gate()[0] != token
            token = replay.gate()[0]
            launch.forget_direct_launches()
            assert replay.gate()[0] != token

            blk = fused_resnet.convert(randomize_(reference.Residual(8, 8)), backend="triton").train()
            x = torch.randn(2, 8, 6, 6)

            def python_launches():
                before = sum(launch.LAUNCHES.values())
                blk(x).sum().backward()
                return sum(launch.LAUNCHES.values()) - before

            assert python_launches() > 0 and python_launches() > 0 and python_launches() == 0  # marked, recorded
            configs.TUNED_CONV.pop((1, 1, 1, 1, torch.float32, 90, True))
            assert python_launches() > 0 and python_launches() > 0 and python_launches() == 0  # planned afresh

            asked, runtime = [], launch._runtime        # the gate reads it once per question
            launch._runtime = lambda: asked.append(1) or runtime()
            assert python_launches() == 0
            assert len(asked) == 3  # once per C++ node that replays: the forward, two of the three backwards
            launch._runtime = runtime
        print("ok")
    """)
    assert out.strip() == "ok"
    out = _offline("""
        from fused_resnet.backends.triton import offline, replay
        with offline.offline_launches(keep=False):
            print(replay.gate())
    """, FUSED_RESNET_TRITON_REPLAY="0")
    assert out.strip() == "None"


@pytest.mark.skipif(HAS_CUDA, reason="offline launches stand in for a GPU this machine lacks")
def test_which_arguments_share_memory_is_part_of_the_key():
    """A plan traced each launch argument to one input: a call whose residual *is* its input and a call
    with a residual of its own, otherwise alike (dtype, sizes, strides, alignment), must not share a plan.
    Each call's third run is replayed; its launch must read that call's own residual."""
    out = _offline("""
        import torch
        from fused_resnet.backends.packing import channels_dense_weight
        from fused_resnet.backends.triton import offline, ops

        x = torch.randn(2, 8, 6, 6)
        own = torch.randn(2, 8, 6, 6)
        w = channels_dense_weight(torch.randn(8, 8, 3, 3))

        def call(residual):
            return ops.replayed_conv_fused_op(x, w, None, 1, 1, None, None, None, None, 0.0, None, None, None,
                                             residual, None, None, None, 1, False, True, False, torch.float32,
                                             False)

        with offline.offline_launches() as rec:
            for residual in (x, own):
                for _ in range(3):  # marks the key, records its plan, replays it
                    rec.launches.clear()
                    out = call(residual)
                (launch,) = rec.launches
                addresses = {a for a in launch.args if type(a) is int and a >= 1 << 16}
                replayed = not any(isinstance(a, torch.Tensor) for a in launch.args)
                print(replayed, residual.data_ptr() in addresses, (own.data_ptr() in addresses) == (residual is own))
    """)
    assert out.split() == ["True"] * 6, out


@pytest.mark.skipif(HAS_CUDA, reason="offline launches stand in for a GPU this machine lacks")
def test_a_replayed_call_carves_its_small_buffers_from_one_allocation():
    """A replayed convolution with statistics: its per-tile statistics (and its empty outputs) come from one
    allocation, apart, each at a multiple of 256 bytes into it (16-byte aligned, what the launches were
    specialised on); the activation-sized output keeps an allocation of its own.
    What the Python launcher returned for the same key: separate allocations, the same sizes and strides."""
    out = _offline("""
        import torch
        from fused_resnet.backends.packing import channels_dense_weight
        from fused_resnet.backends.triton import offline, ops

        x = torch.randn(2, 8, 64, 64)
        w = channels_dense_weight(torch.randn(8, 8, 3, 3))
        with offline.offline_launches():
            calls = [ops.replayed_conv_fused_op(x, w, None, 1, 1, None, None, None, None, 0.0, None, None, None,
                                                None, None, None, None, 1, False, False, True, torch.float32,
                                                False) for _ in range(3)]  # marks, records, replays
        python, replayed = calls[1], calls[2]
        assert [(t.shape, t.stride()) for t in python] == [(t.shape, t.stride()) for t in replayed]
        out, stats, empty = replayed[0], list(replayed[2:5]), [replayed[1], *replayed[5:]]
        storage = lambda t: t.untyped_storage().data_ptr()
        assert all(t.numel() == 0 for t in empty) and all(t.numel() > 0 for t in stats)
        print(len({storage(t) for t in python[2:5]}), len({storage(t) for t in stats + empty}),
              storage(out) != storage(stats[0]),
              all((t.data_ptr() - storage(t)) % 256 == 0 and t.data_ptr() % 16 == 0 for t in stats),
              len({t.data_ptr() for t in stats}))
    """)
    assert out.split() == ["3", "1", "True", "True", "3"], out


@pytest.mark.skipif(HAS_CUDA, reason="the interpreter runs without a GPU")
def test_the_interpreter_never_replays():
    from fused_resnet.backends.triton import replay
    assert replay.gate() is None


@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_replayed_and_python_steps_give_the_same_bits(dtype, unpoisoned, monkeypatch):
    """Three training steps and three inference calls of a 1x1-shortcut block with replaying off, then on
    (the first marks each key, the second records, the third replays): the same outputs, gradients and running statistics, and the
    replayed calls run no Python launcher."""
    from fused_resnet.backends.triton import launch, replay
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(replay, "ENABLED", replay.ENABLED)
    seed = randomize_(reference.Residual(16, 32, use_1x1conv=True, stride=2))
    x = torch.randn(4, 16, 12, 12, device="cuda", dtype=dtype).to(memory_format=torch.channels_last)
    results = {}
    for enabled in (False, True):
        replay.ENABLED = enabled
        blk = fused_resnet.convert(copy.deepcopy(seed), backend="triton").cuda().to(dtype).train()
        steps = []
        for _ in range(3):
            xi = x.clone().requires_grad_()
            before = sum(launch.LAUNCHES.values())
            y = blk(xi)
            y.float().square().sum().backward()
            steps.append((y.detach(), xi.grad, [p.grad.clone() for p in blk.parameters()],
                          [b.clone() for b in blk.buffers()], sum(launch.LAUNCHES.values()) - before))
            blk.zero_grad()
        blk.eval()
        with torch.no_grad():
            for _ in range(3):
                before = sum(launch.LAUNCHES.values())
                steps.append((blk(x), sum(launch.LAUNCHES.values()) - before))
        results[enabled] = steps
    assert results[True][2][-1] == 0 and results[False][2][-1] >= 10      # training
    assert results[True][-1][-1] == 0 and results[False][-1][-1] == 2     # inference
    for (y0, gx0, g0, b0, _), (y1, gx1, g1, b1, _) in zip(results[False][:3], results[True][:3]):
        assert torch.equal(y0, y1) and torch.equal(gx0, gx1)
        assert all(torch.equal(a, b) for a, b in zip(g0 + b0, g1 + b1))
    for (y0, _), (y1, _) in zip(results[False][3:], results[True][3:]):
        assert torch.equal(y0, y1)


def test_a_plan_traces_each_argument_to_the_one_input_or_allocation_holding_it():
    """An input itself by identity, else the one input or allocation whose bytes hold it (at a byte
    offset); a tensor held by none (a cache) or by several inputs (sharing memory), or an output that is
    not a view of an allocation, makes the call not replayable."""
    from fused_resnet.backends.triton import replay

    class Compiled:
        run = function = packed_metadata = None

    memory = torch.randn(64)
    a, b = memory[:32], memory[16:48]            # two inputs sharing memory
    out = torch.empty(8)

    def plan(*launch_args, outputs=(out,)):
        cap = replay._Capture()
        cap.args, cap.allocations, cap.out = (a, b, 3), [out], outputs
        cap.launches = [((Compiled(), (7,)), (2, 1, 1), launch_args)]
        return cap.plan()

    allocs, outs, launches = plan(a, b, out[2:], 5)
    assert allocs == (((8,), (1,), torch.float32),) and outs == ((1, 0, 0, (8,), (1,), torch.float32),)
    assert launches[0][6:] == ((7,), 2, 1, 1, ((0, 0, 0), (0, 1, 0), (1, 0, 8), (2, 5, 0)))
    assert launches[0][1:4] == ((), (), False)  # a launcher replay.py does not know is called as it is
    assert plan(a[4:8])[2][0][-1] == ((0, 0, 16),)
    for wrong in ((memory[20:24],), (torch.randn(4),)):
        with pytest.raises(ValueError):
            plan(*wrong)
    with pytest.raises(ValueError):
        plan(a, outputs=(a,))


def test_replays_call_the_c_launch_only_where_its_argument_order_is_known(monkeypatch):
    """Triton's CudaLauncher of 3.6 or 3.8, for a kernel without scratch memory: its C ``launch`` with the
    fixed arguments its ``__call__`` adds, in that release's order. Anything else -- another release, a
    kernel asking for scratch memory, an instrumented launcher, a missing attribute, another class, the
    switch off -- keeps the launcher object itself."""
    from fused_resnet.backends.triton import replay

    Launcher = type("CudaLauncher", (), {"__module__": "triton.backends.nvidia.driver"})

    def launcher(**changes):
        run = Launcher()
        attrs = dict(launch=print, launch_cooperative_grid=False, launch_pdl=True, global_scratch_size=0,
                     profile_scratch_size=0, arg_annotations=("a",), kernel_signature=("s",))
        attrs.update(changes)
        for name, value in attrs.items():
            if value is not None:
                setattr(run, name, value)
        return run

    run = launcher()
    monkeypatch.setattr(replay, "c_launch_release", lambda: (3, 6))
    assert replay._callee(run) == (print, (False, True, None, None), (), False)
    monkeypatch.setattr(replay, "c_launch_release", lambda: (3, 8))
    assert replay._callee(run) == (print, (False, True), (None, None, ("a",), ("s",)), True)
    plain = [launcher(global_scratch_size=64), launcher(profile_scratch_size=8), launcher(gsan_enabled=True),
             launcher(launch_pdl=None), launcher(arg_annotations=None), type("Other", (), {})()]
    for other in plain:
        assert replay._callee(other) == (other, (), (), False), vars(other)
    monkeypatch.setattr(replay, "c_launch_release", lambda: None)
    assert replay._callee(run) == (run, (), (), False)
    monkeypatch.setattr(replay, "c_launch_release", lambda: (3, 6))
    monkeypatch.setattr(replay, "C_LAUNCH", False)
    assert replay._callee(run) == (run, (), (), False)


def test_inference_convolutions_take_the_out_only_operator(monkeypatch):
    """Eager inference asks the convolution for its result alone (``replayed_triton_conv_out``: no tensor
    made or wrapped for the six empty fields); training's Python path, which needs the statistics, the
    full operator. Both give the same result (the interpreter runs them here)."""
    from fused_resnet.backends import get_backend
    be = get_backend("triton")
    calls = {"out": 0, "full": 0}
    out_op, full_op = be._replayed_conv_out, be._replayed_conv
    if out_op is None:
        pytest.skip("replaying is off (FUSED_RESNET_TRITON_REPLAY=0)")

    def counted(name, op):
        def call(*args):
            calls[name] += 1
            return op(*args)
        return call

    monkeypatch.setattr(be, "_replayed_conv_out", counted("out", out_op))
    monkeypatch.setattr(be, "_replayed_conv", counted("full", full_op))
    seed = randomize_(reference.Residual(4, 8, use_1x1conv=True, stride=2)).eval()
    fused = fused_resnet.convert(copy.deepcopy(seed), backend="triton").eval()
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        y = fused(x)
        assert calls == {"out": 2, "full": 0}
        args = (x, seed.conv1.weight, seed.conv1.bias, 2, 1, None, None, None, None, 0.0, None, None, None, None,
                None, None, None, 1, False, True, False, torch.float32, False)
        alone, first = out_op(*args), full_op(*args)[0]
    assert isinstance(alone, torch.Tensor) and torch.equal(alone, first)
    torch.testing.assert_close(y, seed(x), rtol=1e-4, atol=1e-5)
