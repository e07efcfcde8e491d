"""Convolution weights in the layout the GPU kernels read: channels contiguous ((K, R, S, C) order, what
``memory_format=torch.channels_last`` gives a (K, C, R, S) tensor), so a weight tile of BLOCK_K channels
is one contiguous run per output channel rather than a gather with a stride of R*S.

A model converted to channels_last already has such weights and they are used as they are. Otherwise
the repacked copy is cached per weight tensor and keyed on its storage and version counter: an
optimizer step, ``load_state_dict`` or any in-place change bumps the version and the next call
repacks, so a cached copy is never stale.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

# id(weight) -> (weak reference to it, its storage/version key, the packed copy). A plain dict keyed by
# id, the entry dropped when the weight dies: a lookup is one dict probe (a WeakIdKeyDictionary builds a
# weak reference per lookup, microseconds on every launch).
_PACKED: dict[int, tuple[weakref.ref, tuple, Tensor]] = {}


def _forget(ident: int, ref: weakref.ref) -> None:
    entry = _PACKED.get(ident)
    if entry is not None and entry[0] is ref:
        del _PACKED[ident]


def is_channels_dense(w: Tensor) -> bool:
    return w.dim() == 4 and (w.stride(1) == 1 or w.shape[1] == 1) and w.is_contiguous(
        memory_format=torch.channels_last)


def channels_dense_weight(w: Tensor) -> Tensor:
    """``w`` itself when its channels are contiguous, else its cached channels_last copy."""
    if is_channels_dense(w):
        return w
    key = (w.data_ptr(), w._version, w.dtype, w.shape)
    ident = id(w)
    entry = _PACKED.get(ident)
    if entry is not None and entry[0]() is w and entry[1] == key:
        return entry[2]
    packed = w.detach().contiguous(memory_format=torch.channels_last)
    _PACKED[ident] = (weakref.ref(w, lambda ref, ident=ident: _forget(ident, ref)), key, packed)
    return packed
