"""Shared timing helper of the benchmark scripts (run as ``python benchmarks/NAME.py``, so this folder is on the path)."""

from __future__ import annotations

import argparse
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


def add_malloc_option(ap: argparse.ArgumentParser) -> None:
    """``--no-malloc-tuning``: keep glibc's default malloc thresholds (see :func:`tune_host`)."""
    ap.add_argument("--no-malloc-tuning", action="store_true",
                    help="keep glibc's default malloc thresholds (large activations then page-fault on every "
                         "forward; timings jump by several percent run to run)")


def tune_host(args: argparse.Namespace) -> None:
    """Keep freed large blocks in the heap, as ``loraplex serve`` and ``loraplex train`` do (unless the option says
    not to): every variant of a run is timed under the same allocator, so the ratios stay fair."""
    if not getattr(args, "no_malloc_tuning", False):
        from loraplex.hostmem import tune_cpu_allocator

        tune_cpu_allocator()
