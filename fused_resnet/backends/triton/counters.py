"""Launch counters of the Triton backend: tests read them to prove how many kernels a block launches."""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from typing import Iterator

LAUNCHES: Counter = Counter()


def count_launch(kernel: str) -> None:
    LAUNCHES[kernel] += 1


@contextmanager
def counting() -> Iterator[Counter]:
    """Count the kernels launched inside the block: ``with counting() as c: ...; sum(c.values())``."""
    before = LAUNCHES.copy()
    result: Counter = Counter()
    try:
        yield result
    finally:
        result.update(LAUNCHES - before)
