"""Command line: ``python -m fused_resnet [check|bench|profile|report] ...`` (``check`` by default).

This is an entry point, not library code: it may choose the Triton interpreter for a machine without a
GPU, which must happen before any kernel module is imported.
"""

from __future__ import annotations

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from .cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
