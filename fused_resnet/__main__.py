"""Command line: ``python -m fused_resnet [check|bench|profile|report] ...`` (``check`` by default).

This is an entry point, not library code: it may choose the Triton interpreter for a machine without a
GPU, which must happen before any kernel module is imported.
"""

from __future__ import annotations

import os
import sys

import torch

if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
    # Without a GPU, Triton kernels run under the interpreter. The variable is read when kernels are
    # decorated, and importing this package may already have imported Triton: start afresh with it set.
    os.environ["TRITON_INTERPRET"] = "1"
    os.execv(sys.executable, [sys.executable, "-m", "fused_resnet", *sys.argv[1:]])

from .cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
