"""Synchronized batch norm across processes (DESIGN.md section 4b), on the CPU with gloo: 2 and 3 ranks
with unequal batches, every backend (Triton under the interpreter), both ways of asking (the keyword
under DDP; nn.SyncBatchNorm modules, converted before or after, gradients averaged by hand). The
reference is one process training the plain model on the whole batch in float64: each rank's outputs
and input gradients (its slice), the averaged parameter gradients and the running statistics over two
SGD steps, then eval. Also: world size 1 bit-identical to the unsynchronized path, the errors, and the
device guard of the Triton launches."""

import copy
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fused_resnet
from fused_resnet.testing import FLOORS, rel_err

from tests import distributed_worker as worker

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available in this build")


def _spawn(world: int, sizes: list[int], mode: str, out_dir: str) -> None:
    init_file = os.path.join(out_dir, "init")
    mp.start_processes(worker.run, args=(world, init_file, sizes, mode, out_dir), nprocs=world, join=True,
                       start_method="spawn")


def _reference(sizes: list[int], dtype: torch.dtype) -> dict:
    """The plain model on the whole batch, loss scaled by 1/world: its gradients are what DDP's average
    of the ranks' gradients must be; the input gradient times world is each rank's slice."""
    x, g = worker.global_batch(sizes)
    model = worker.tiny_model().to(dtype)
    return worker.train(model, x.to(dtype), g.to(dtype) / len(sizes))


@pytest.mark.parametrize("world,sizes,mode", [(2, [3, 2], "keyword"), (3, [2, 3, 1], "keyword"),
                                              (2, [1, 3], "syncbn-before"), (3, [3, 1, 2], "syncbn-after")],
                         ids=["2-keyword-ddp", "3-keyword-ddp", "2-syncbn-before", "3-syncbn-after"])
def test_training_matches_one_process_on_the_whole_batch(world, sizes, mode):
    ref64, eager = _reference(sizes, torch.float64), _reference(sizes, torch.float32)
    with tempfile.TemporaryDirectory() as out:
        _spawn(world, sizes, mode, out)
        results = {}
        for f in os.listdir(out):
            if f.endswith(".pt"):
                backend, rank = f[:-3].rsplit("-rank", 1)
                results.setdefault(backend, {})[int(rank)] = torch.load(os.path.join(out, f))
    assert set(results) >= {"torch", "cpp"} & set(fused_resnet.available_backends())
    bounds = {}
    for key, want in ref64.items():
        bounds[key] = max(2 * rel_err(eager[key].double(), want), FLOORS[torch.float32])
    for backend, ranks in results.items():
        assert sorted(ranks) == list(range(world)), backend
        for key, want in ref64.items():
            per_sample = key.endswith("output") or key.endswith("grad input")
            if per_sample:  # each rank's slice of the batch
                scale = world if key.endswith("grad input") else 1
                got = torch.cat([ranks[r][key] for r in range(world)]).double()
                yardstick = eager[key].double() * scale
                bound = max(2 * rel_err(yardstick, want * scale), FLOORS[torch.float32])
                err = rel_err(got, want * scale)
            else:  # the same on every rank: averaged gradients, running statistics
                bound = bounds[key]
                err = max(rel_err(ranks[r][key].double(), want) for r in range(world))
            assert err <= bound, f"{backend} {mode} world {world}: {key}: {err:.3e} > {bound:.3e}"


def test_compiled_synchronized_training_traces_the_collectives():
    with tempfile.TemporaryDirectory() as out:
        _spawn(2, [2, 3], "compile", out)
        for rank in range(2):
            got = torch.load(os.path.join(out, f"compile-rank{rank}.pt"))
            for key, want in got["eager"].items():
                torch.testing.assert_close(got["compiled"][key], want, rtol=1e-4, atol=1e-5, msg=key)


def test_bad_use_gets_a_clear_error():
    with tempfile.TemporaryDirectory() as out:
        _spawn(2, [2, 2], "errors", out)


def test_world_size_one_is_bit_identical_to_the_unsynchronized_path():
    x, g = worker.global_batch([3])
    x, g = x.float(), g.float()
    backend = "cpp" if "cpp" in fused_resnet.available_backends() else "torch"
    plain = worker.train(fused_resnet.convert(worker.tiny_model(), backend=backend), x, g)
    alone = worker.train(fused_resnet.convert(worker.tiny_model(), backend=backend, sync_batchnorm=True), x, g)
    with tempfile.TemporaryDirectory() as d:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(d, 'init')}", rank=0, world_size=1)
        try:
            in_group = worker.train(fused_resnet.convert(worker.tiny_model(), backend=backend, sync_batchnorm=True),
                                    x, g)
        finally:
            dist.destroy_process_group()
    for key, want in plain.items():
        assert torch.equal(alone[key], want), key
        assert torch.equal(in_group[key], want), key


def test_sync_settings_survive_copies_and_pickles():
    import pickle
    model = fused_resnet.convert(worker.tiny_model(), sync_batchnorm=True)
    assert all(m.sync_batchnorm is not None for m in model if hasattr(m, "layout"))
    twin = copy.deepcopy(model)
    assert twin[0].sync_batchnorm is model[0].sync_batchnorm
    assert pickle.loads(pickle.dumps(model))[2].sync_batchnorm.group is None
    assert "sync_batchnorm=True" in repr(model[0])
    with pytest.raises(ValueError, match="process_group is given but sync_batchnorm is False"):
        fused_resnet.convert(worker.tiny_model(), process_group=object())
    custom = fused_resnet.convert(worker.tiny_model(), sync_batchnorm=True, process_group=object())
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(custom)


def test_triton_launches_run_on_their_inputs_device(monkeypatch):
    """Triton launches on the current CUDA device: a launch for cuda:1 while cuda:0 is current enters a
    device guard for cuda:1 (and none when already there). Proven with the CUDA calls stood in for."""
    from contextlib import contextmanager

    from fused_resnet.backends.triton import launch as L
    seen = []

    @contextmanager
    def guard(index):
        seen.append(("enter", index))
        yield
        seen.append(("exit", index))

    def stand_in_kernel():
        pass

    class Kernel:
        fn = staticmethod(stand_in_kernel)

        def __getitem__(self, grid):
            return lambda *args, **kw: seen.append(("launch", grid))
    # the suite's launch recording (FUSED_RESNET_RECORD_LAUNCHES) must not list the stand-in
    monkeypatch.setattr(L, "_RECORDERS", [])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", guard)
    L.launch(Kernel(), (1,), (), {}, num_warps=4, device=torch.device("cuda", 1))
    assert seen == [("enter", 1), ("launch", (1,)), ("exit", 1)]
    seen.clear()
    L.launch(Kernel(), (2,), (), {}, num_warps=4, device=torch.device("cuda", 0))
    assert seen == [("launch", (2,))]
