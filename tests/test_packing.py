"""The channels-contiguous weight copies the GPU kernels read (``backends/packing.py``): cached per
weight, never stale, dropped with the weight."""

import gc

import torch

from fused_resnet.backends import packing


def test_dense_weights_are_used_as_they_are():
    w = torch.randn(8, 4, 3, 3).contiguous(memory_format=torch.channels_last)
    assert packing.channels_dense_weight(w) is w
    one = torch.randn(8, 1, 3, 3)            # one input channel: any layout is channel-dense
    assert packing.channels_dense_weight(one) is one


def test_packed_copy_is_cached_and_never_stale():
    w = torch.nn.Parameter(torch.randn(8, 4, 3, 3))
    p = packing.channels_dense_weight(w)
    assert p.is_contiguous(memory_format=torch.channels_last) and torch.equal(p, w.detach())
    assert packing.channels_dense_weight(w) is p
    with torch.no_grad():
        w.mul_(2)                             # an optimizer step: the version counter moves
    q = packing.channels_dense_weight(w)
    assert q is not p and torch.equal(q, w.detach())
    w.data = torch.randn(8, 4, 3, 3)          # new storage, same tensor object
    r = packing.channels_dense_weight(w)
    assert torch.equal(r, w.detach())
    w.data = w.data.transpose(2, 3)           # a view of the same storage: address, shape, version alike
    assert torch.equal(packing.channels_dense_weight(w), w.detach())
    t = torch.randn(8, 4, 3, 3)
    packing.channels_dense_weight(t)
    t.data = t.data.view(torch.int32)         # reinterpreted: only the dtype moves
    assert packing.channels_dense_weight(t).dtype == torch.int32
    del t
    other = torch.randn(8, 4, 3, 3)
    assert torch.equal(packing.channels_dense_weight(other), other)
    assert torch.equal(packing.channels_dense_weight(w), w.detach())


def test_nothing_is_cached_while_a_cuda_graph_records(monkeypatch):
    """A copy made during a CUDA graph's capture holds its values only when the graph replays: it is
    returned, never cached (an eager call after the capture gets a copy of its own)."""
    monkeypatch.setattr(packing, "capturing", lambda t: True)
    w = torch.randn(8, 4, 3, 3)
    before = len(packing._PACKED)
    p = packing.channels_dense_weight(w)
    assert torch.equal(p, w) and len(packing._PACKED) == before
    monkeypatch.setattr(packing, "capturing", lambda t: False)
    assert packing.channels_dense_weight(w) is not p and len(packing._PACKED) == before + 1


def test_entries_die_with_their_weights():
    before = len(packing._PACKED)
    ws = [torch.randn(4, 4, 3, 3) for _ in range(5)]
    for w in ws:
        packing.channels_dense_weight(w)
    assert len(packing._PACKED) == before + 5
    del ws, w
    gc.collect()
    assert len(packing._PACKED) == before
