"""Shared timing helper of the benchmark scripts (run as ``python benchmarks/NAME.py``, so this folder is on the path)."""

from __future__ import annotations

import argparse
import random
import statistics
import time
from typing import Callable


def timeit_interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2,
                       ref: str | None = None) -> dict[str, float]:
    """Median seconds of each ``fn()``, the variants interleaved in rounds (in a shuffled order each round, seeded)
    so that machine drift and cache effects hit all alike.

    With ``ref`` (a key of ``fns``), each variant's value is the median over rounds of its time divided by ``ref``'s
    time in the same round, times ``ref``'s median: ``value[k] / value[ref]`` is then the median of paired
    per-round ratios, which is far steadier on a noisy machine than a ratio of two medians.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns)
    rng = random.Random(0)
    for _ in range(repeats):
        rng.shuffle(order)
        for k in order:
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    if ref is None:
        return med
    base = times[ref]
    return {k: statistics.median(t / b for t, b in zip(v, base)) * med[ref] for k, v in times.items()}


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
