"""The worker thread that alone touches the model, and the calls other threads queue for it (adapter loads, swaps,
removals, run between two forwards).

Shared by the completion engine (:mod:`loraplex.serve.engine`) and the encoder batcher
(:mod:`loraplex.serve.encode`): both are a :class:`WorkerThread`.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections import deque
from typing import Any, Callable

import torch

from loraplex import cputhreads


class ControlQueue:
    """A FIFO of ``fn`` calls guarded by the owner's condition variable (so a waiting worker wakes up for them)."""

    def __init__(self, cv: threading.Condition) -> None:
        self._cv = cv
        self._items: deque[tuple[Callable[[], Any], concurrent.futures.Future]] = deque()

    def __bool__(self) -> bool:
        return bool(self._items)

    def call(self, fn: Callable[[], Any], worker: threading.Thread | None, timeout: float | None = None) -> Any:
        """``fn()`` run on ``worker`` (directly when there is no live worker, or from the worker itself)."""
        if worker is None or not worker.is_alive() or threading.current_thread() is worker:
            return fn()
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cv:
            self._items.append((fn, fut))
            self._cv.notify_all()
        return fut.result(timeout)

    def run_pending(self) -> None:
        """Run the queued calls (on the worker), each result or exception handed to its caller."""
        while True:
            with self._cv:
                if not self._items:
                    return
                fn, fut = self._items.popleft()
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except BaseException as exc:  # noqa: BLE001 - handed to the caller
                    fut.set_exception(exc)

    def run_pending_released(self) -> None:
        """:meth:`run_pending` from inside the worker's ``with cv:`` block, the lock released while the calls run
        (so submitters are not held up). Lets a batching window absorb control calls instead of ending early."""
        self._cv.release()
        try:
            self.run_pending()
        finally:
            self._cv.acquire()

    def batching_window(self, seconds: float, full: Callable[[], bool], stopping: Callable[[], bool]) -> None:
        """Wait (inside the worker's ``with cv:`` block) up to ``seconds`` for ``full()``, returning early on
        ``stopping()``. Control calls arriving meanwhile run inside the window instead of ending it, so an adapter
        load never splits the batch being gathered."""
        deadline = time.monotonic() + seconds
        while not (full() or stopping()):
            if self._items:
                self.run_pending_released()
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._cv.wait(left)

    def fail_all(self, exc: BaseException) -> None:
        """Fail every queued call with ``exc`` (shutdown)."""
        with self._cv:
            items = list(self._items)
            self._items.clear()
        for _, fut in items:
            if fut.set_running_or_notify_cancel():
                fut.set_exception(exc)


class Coalescer:
    """One ``fn(items) -> results`` call for all the items that threads submit while the worker is busy.

    ``submit(item)`` queues the item, asks ``run_on_worker`` to flush, and blocks for its own result. The worker runs
    the first flush with every item queued by then (later flushes find nothing left), so concurrent requests share
    one call -- e.g. one batched routing pass instead of one forward per request. ``run_on_worker(fn)`` must run
    ``fn`` (on the worker, or right away) before returning. ``batch_sizes`` counts the items of each call."""

    def __init__(self, fn: Callable[[list[Any]], list[Any]], run_on_worker: Callable[[Callable[[], None]], Any]
                 ) -> None:
        self._fn = fn
        self._run_on_worker = run_on_worker
        self._lock = threading.Lock()
        self._pending: list[tuple[Any, concurrent.futures.Future]] = []
        self.batch_sizes: deque[int] = deque(maxlen=1024)

    def submit(self, item: Any, timeout: float | None = None) -> Any:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            self._pending.append((item, fut))
        self._run_on_worker(self._flush)
        return fut.result(timeout)

    def _flush(self) -> None:
        with self._lock:
            batch, self._pending = self._pending, []
        if not batch:
            return
        self.batch_sizes.append(len(batch))
        try:
            results = self._fn([item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"a coalesced call returned {len(results)} results for {len(batch)} items")
        except BaseException as exc:  # noqa: BLE001 - handed to every caller
            for _, fut in batch:
                fut.set_exception(exc)
            return
        for (_, fut), res in zip(batch, results):
            fut.set_result(res)


class WorkerThread:
    """The lifecycle of one worker thread and its request queue: ``start``, ``close``, ``alive``, ``call_on_worker``.

    A subclass runs its loop in ``_worker()`` (calling ``self._control.run_pending()`` between forwards and leaving
    when ``self._stopping``), records a crash in ``self.dead``, and ends every queued and running request with
    ``_fail_all(exc)``. ``_cv`` guards ``_pending`` (the queue) and wakes the worker."""

    def __init__(self, name: str, closed: Callable[[str], BaseException], threads: int | None = None) -> None:
        #: intra-op threads of the worker (default: the constructing thread's); :mod:`loraplex.cputhreads`
        self.threads = threads or torch.get_num_threads()
        self._thread_name = name
        self._closed = closed  # the error of requests still queued or running at close
        self._cv = threading.Condition()
        self._pending: deque[Any] = deque()
        self._control = ControlQueue(self._cv)  # adapter loads/swaps, run by the worker between forwards
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.dead: BaseException | None = None

    def _thread_main(self) -> None:
        cputhreads.use(self.threads)  # the model's worker owns the intra-op threads
        self._worker()

    def _worker(self) -> None:
        raise NotImplementedError

    def _fail_all(self, exc: BaseException) -> None:
        raise NotImplementedError

    def start(self) -> None:
        """Start the worker thread (once)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._thread_main, name=self._thread_name, daemon=True)
            self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the worker; queued and running requests end with the ``closed`` error."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self._fail_all(self._closed("the server is shutting down"))

    def __enter__(self) -> "WorkerThread":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    def call_on_worker(self, fn: Callable[[], Any], timeout: float | None = None) -> Any:
        """Run ``fn`` on the worker thread between two forwards; its result (or exception)."""
        return self._control.call(fn, self._thread, timeout)
