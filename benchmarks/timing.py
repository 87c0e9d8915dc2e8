"""Shared timing helper of the benchmark scripts (run as ``python benchmarks/NAME.py``, so this folder is on the path)."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def timeit_interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds of each ``fn()``, the variants interleaved round-robin so machine drift hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}
