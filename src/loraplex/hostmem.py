"""Host memory of long-running loraplex processes (``train``, ``serve``, benchmarks): the process-wide glibc malloc
tuning, and page-backed buffers for data that comes and goes under a byte budget (the adapter store's CPU tier)."""

from __future__ import annotations

import mmap
import sys
from typing import Sequence

import torch

__all__ = ["page_buffer", "to_pages", "tune_cpu_allocator"]


def tune_cpu_allocator() -> bool:
    """Best effort (Linux glibc): keep freed large blocks in the process heap instead of returning them to the OS.

    With glibc's defaults every tensor above the (dynamic, at most 32 MB) mmap threshold is unmapped on free and
    page-faults again on the next forward; on CPU that costs 10-30% of a training step or a large prefill and makes
    timings jump by several percent from run to run. Process-wide, so only the ``loraplex train`` and
    ``loraplex serve`` commands and the benchmarks call it (a library import never does). The cost: the process's
    resident memory does not shrink after a peak, and blocks freed between other live blocks stay in the heap.
    Data read, dropped and read again under a budget (the CPU tier of adapters) would grow the heap past that
    budget, so it lives in :func:`page_buffer` memory instead, outside malloc. Returns whether it applied.
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


def page_buffer(nbytes: int) -> torch.Tensor:
    """A zeroed uint8 tensor [nbytes] in its own anonymous memory mapping, outside the malloc heap.

    When the last tensor viewing it is freed the mapping is unmapped and its pages go back to the OS at once,
    whatever malloc's thresholds (:func:`tune_cpu_allocator` keeps freed heap blocks), and nothing is left
    fragmenting the heap. Costs one ``mmap`` and the page rounding (< 4 KiB): meant for blocks of tens of KiB
    and more, such as one adapter's tensors."""
    if nbytes <= 0:
        return torch.empty(0, dtype=torch.uint8)
    mm = mmap.mmap(-1, int(nbytes), flags=mmap.MAP_PRIVATE)  # anonymous (fd -1), not shared with a fork
    return torch.frombuffer(mm, dtype=torch.uint8)  # holds the mapping until its last view dies


def to_pages(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of CPU ``tensors`` (same dtypes and shapes) packed into one :func:`page_buffer`, each at an offset
    aligned to 64 bytes."""
    offsets, end = [], 0
    for t in tensors:
        end = -(-end // 64) * 64
        offsets.append(end)
        end += t.numel() * t.element_size()
    buf = page_buffer(end)
    out = []
    for t, off in zip(tensors, offsets):
        n = t.numel() * t.element_size()
        view = buf[off:off + n].view(t.dtype).view(t.shape)  # [*t.shape]
        view.copy_(t)
        out.append(view)
    return out
