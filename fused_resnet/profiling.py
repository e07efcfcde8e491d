"""Named ranges around each fused stage, for profilers.

Off by default (a range costs microseconds, a fused eval block only two launches). ``python -m
fused_resnet profile`` turns them on; so does ``FUSED_RESNET_RANGES=1``. Each range is a
``torch.profiler.record_function`` (it shows in torch.profiler traces) and, on a GPU, an NVTX range (it
shows in Nsight Systems).
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from typing import ContextManager, Iterator

import torch

ENABLED = os.environ.get("FUSED_RESNET_RANGES", "0") == "1"


@contextmanager
def _range(name: str) -> Iterator[None]:
    nvtx = torch.cuda.is_available()
    with torch.profiler.record_function(name):
        if nvtx:
            torch.cuda.nvtx.range_push(name)
        try:
            yield
        finally:
            if nvtx:
                torch.cuda.nvtx.range_pop()


def stage(name: str) -> ContextManager[None]:
    """``with stage("K1 conv3x3+bn+relu"): ...`` -- a profiler range when ranges are enabled."""
    return _range(f"fused_resnet::{name}") if ENABLED else _OFF


_OFF = nullcontext()  # stateless and reusable: no allocation per stage when ranges are off
