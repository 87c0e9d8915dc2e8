"""Intra-op CPU threads of the threads a loraplex process runs torch work on.

PyTorch's CPU ops parallelise over an OpenMP team owned by the calling thread, sized by that thread's
``torch.set_num_threads`` (a new thread starts from the value last set anywhere in the process). Each thread that
ever ran a parallel op keeps its team for as long as it lives, and libgomp stops spin-waiting (its workers sleep on a
futex after every parallel region) once the process holds more team threads than cores. Then every small op of a
decode step pays a wake-up: on 2 cores, a SmolLM2 int4 decode step measured 18 ms on a thread whose team was the
only one, and 26-40 ms on the serving worker while the main thread kept the team it loaded the model with.

So a serving process gives its intra-op threads to the one worker that runs the model (:func:`use`), and every
other thread that touches tensors (the main thread while it loads, loader pools) runs single-threaded
(:func:`single`), before it runs its first parallel op.
"""

from __future__ import annotations

import torch

__all__ = ["single", "use"]


def use(n: int) -> None:
    """Run this thread's torch CPU ops on ``n`` intra-op threads (``n >= 1``)."""
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def single() -> None:
    """Run this thread's torch CPU ops on one thread: no OpenMP team of its own to compete with the model's."""
    use(1)
