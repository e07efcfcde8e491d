"""Convolution weights in the layout the GPU kernels read: channels contiguous ((K, R, S, C) order, what
``memory_format=torch.channels_last`` gives a (K, C, R, S) tensor), so a weight tile of BLOCK_K channels
is one contiguous run per output channel rather than a gather with a stride of R*S.

A model converted to channels_last already has such weights and they are used as they are. Otherwise
the repacked copy is cached per weight tensor and keyed on its address, version counter, dtype, shape and
strides: an optimizer step, ``load_state_dict`` or any in-place change bumps the version, a ``.data``
assignment changes the rest (even a view of the same storage: another layout), and the next call
repacks, so a cached copy is never stale.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

# id(weight) -> (weak reference to it, its address/version/layout key, the packed copy). A plain dict keyed by
# id, the entry dropped when the weight dies: a lookup is one dict probe (a WeakIdKeyDictionary builds a
# weak reference per lookup, microseconds on every launch).
_PACKED: dict[int, tuple[weakref.ref, tuple, Tensor]] = {}


def _forget(ident: int, ref: weakref.ref) -> None:
    entry = _PACKED.get(ident)
    if entry is not None and entry[0] is ref:
        del _PACKED[ident]


_CHANNELS_LAST = torch.channels_last


def capturing(t: Tensor) -> bool:
    """Whether ``t``'s work is being recorded into a CUDA graph: a copy made now holds its values only once
    the graph replays, so a cache must not keep it (an eager call after the capture would read memory the
    graph has not written yet)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def is_channels_dense(w: Tensor) -> bool:
    """A 4-D tensor whose channels are contiguous: channels_last-contiguous, which already has stride(1) == 1
    wherever C > 1 (the check walks C first, skipping only dimensions of size 1). Runs per weight per call:
    two tensor calls (0.17 us; with a separate stride(1) test 0.36)."""
    return w.dim() == 4 and w.is_contiguous(memory_format=_CHANNELS_LAST)


def channels_dense_weight(w: Tensor) -> Tensor:
    """``w`` itself when its channels are contiguous, else its cached channels_last copy."""
    if w.dim() == 4 and w.is_contiguous(memory_format=_CHANNELS_LAST):  # is_channels_dense, inlined
        return w
    # What an in-place change (the version) or a `.data =` (address, dtype, shape, strides: a view of the same
    # storage, e.g. the kernel transposed, keeps the address and the version) can change.
    key = (w.data_ptr(), w._version, w.dtype, w.shape, w.stride())
    ident = id(w)
    entry = _PACKED.get(ident)
    if entry is not None and entry[0]() is w and entry[1] == key:
        return entry[2]
    packed = w.detach().contiguous(memory_format=torch.channels_last)
    if not capturing(w):
        _PACKED[ident] = (weakref.ref(w, lambda ref, ident=ident: _forget(ident, ref)), key, packed)
    return packed
