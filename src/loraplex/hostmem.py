"""Process-wide host-memory tuning for long-running loraplex processes (``train``, ``serve``, benchmarks)."""

from __future__ import annotations

import sys

__all__ = ["tune_cpu_allocator"]


def tune_cpu_allocator() -> bool:
    """Best effort (Linux glibc): keep freed large blocks in the process heap instead of returning them to the OS.

    With glibc's defaults every tensor above the (dynamic, at most 32 MB) mmap threshold is unmapped on free and
    page-faults again on the next forward; on CPU that costs 10-30% of a training step or a large prefill and makes
    timings jump by several percent from run to run. Process-wide, so only the ``loraplex train`` and
    ``loraplex serve`` commands and the benchmarks call it (a library import never does). The cost: the process's
    resident memory does not shrink after a peak. Returns whether it applied.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, 1 << 30) == 1
        ok = libc.mallopt(m_trim_threshold, (1 << 31) - 1) == 1 and ok
        return ok
    except (OSError, AttributeError):
        return False
