"""Convolution weights in the layout the GPU kernels read: channels contiguous ((K, R, S, C) order, what
``memory_format=torch.channels_last`` gives a (K, C, R, S) tensor), so a weight tile of BLOCK_K channels
is one contiguous run per output channel rather than a gather with a stride of R*S.

A model converted to channels_last already has such weights and they are used as they are. Otherwise
the repacked copy is cached per weight tensor and keyed on its storage and version counter: an
optimizer step, ``load_state_dict`` or any in-place change bumps the version and the next call
repacks, so a cached copy is never stale.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

_PACKED = WeakIdKeyDictionary()


def is_channels_dense(w: Tensor) -> bool:
    return w.dim() == 4 and (w.stride(1) == 1 or w.shape[1] == 1) and w.is_contiguous(
        memory_format=torch.channels_last)


def channels_dense_weight(w: Tensor) -> Tensor:
    """``w`` itself when its channels are contiguous, else its cached channels_last copy."""
    if is_channels_dense(w):
        return w
    key = (w.data_ptr(), w._version, w.dtype, w.shape)
    entry = _PACKED.get(w)
    if entry is not None and entry[0] == key:
        return entry[1]
    packed = w.detach().contiguous(memory_format=torch.channels_last)
    _PACKED[w] = (key, packed)
    return packed
