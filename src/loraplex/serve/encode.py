"""Dynamic batching for encoder requests (classify, embed): one mixed-adapter forward per batch.

One worker thread owns the model. Requests put their rows (one per input text) in a bounded FIFO queue
(full -> :class:`~loraplex.serve.engine.QueueFull`, HTTP 429). When idle, the worker waits for a row, then up to
``batch_window_ms`` for more (up to ``max_batch_size`` rows), so rows of concurrent clients with different adapters
share a batch. For the batch it

1. routes the ``auto`` rows with ONE router call (the router's choice per row);
2. checks every row's choice (unknown adapter, or no task head for a classify row: that row fails alone);
3. parks the rows whose store adapters (:mod:`loraplex.adapters.store`) are not in memory: their reads run on the
   bank's loader threads (one read per adapter however many rows wait for it) and the rows come back to the queue
   when the reads are done, or fail with the read's error; the other rows go on;
4. runs ONE forward of the :class:`~loraplex.tasks.MultiTaskEncoder`, rows ordered by adapter slot so each adapter's
   rows form one contiguous run, each row with its own adapter (or blend) and head;
5. hands each row its logits, head and mean-pooled embedding.

Changes to the adapter bank go through :meth:`EncoderBatcher.call_on_worker`, between two forwards.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import torch

from loraplex.api import Plex
from loraplex.tokens import pad_batch, pad_id
from loraplex.errors import AdapterError, LoraplexError
from loraplex.serve.engine import EngineClosed, QueueFull
from loraplex.serve.metrics import Counter, ServeMetrics
from loraplex.serve.registry import choice_names
from loraplex.serve.worker import WorkerThread
from loraplex.tasks import TaskInfo

log = logging.getLogger("loraplex.serve")

#: The row choice placeholder of rows the router decides.
AUTO = object()


class NoTaskHead(AdapterError):
    """/v1/classify asked for an adapter (or the base model) that carries no task head."""

    def __init__(self, what: str, heads: Mapping[str, Any]) -> None:
        self.what = what
        self.with_heads = sorted(heads)
        more = ("; adapters of the store not read yet are not listed (GET /v1/models shows each adapter's task)"
                if isinstance(heads, TaskHeads) and heads.partial else "")
        super().__init__(f"{what} has no task head (no 'classifier' in modules_to_save with a task in "
                         f"loraplex_meta.json), so it cannot classify; adapters with heads: "
                         f"{', '.join(self.with_heads) or '(none)'}{more}")


class EncoderMetrics(ServeMetrics):
    """The server's metrics plus per-adapter counts of classify and embedding requests."""

    def __init__(self) -> None:
        super().__init__()
        self.classify_requests = Counter("loraplex_classify_requests_total",
                                         "/v1/classify requests per adapter that served them (auto: the router's "
                                         "choice; base: no adapter).", ("adapter",))
        self.classify_inputs = Counter("loraplex_classify_inputs_total", "Texts classified per adapter.",
                                       ("adapter",))
        self.embedding_requests = Counter("loraplex_embedding_requests_total",
                                          "/v1/embeddings requests per adapter (base: no adapter).", ("adapter",))
        self.cancelled_requests = Counter("loraplex_encoder_requests_cancelled_total",
                                          "Encoder requests whose client hung up before the answer (queued rows "
                                          "skipped).", ())

    def render(self) -> str:
        lines: list[str] = []
        for m in (self.classify_requests, self.classify_inputs, self.embedding_requests, self.cancelled_requests):
            lines.extend(m.render())
        return super().render() + "\n".join(lines) + "\n"


@dataclass
class Encoded:
    """One row's result."""

    choice: Any  # the row choice it ran with (auto: the router's)
    served_by: list[str]  # adapters with a non-zero weight
    head: str | None  # the adapter whose head produced ``logits``
    logits: torch.Tensor | None  # [num_labels] or [L, num_labels] (float32, CPU)
    embedding: torch.Tensor  # [H] mean-pooled, L2-normalised (float32, CPU)


@dataclass
class _Row:
    ids: list[int]
    choice: Any
    text: str
    need_head: bool
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    submitted: float = field(default_factory=time.monotonic)
    requeued: bool = False  # back from waiting for a store read (its future is running already)


class TaskHeads(Mapping):
    """Adapter -> :class:`~loraplex.tasks.TaskInfo` of the adapters with a task head: the heads installed in the
    model, and for store adapters not read yet the task their ``loraplex_meta.json`` declares (no weights read;
    an invalid meta raises its :class:`AdapterError` naming the adapter). Iterating gives the installed heads
    only, so listing a large store reads nothing."""

    def __init__(self, plex: Plex) -> None:
        self.plex = plex
        self.installed: dict[str, TaskInfo] = dict(getattr(plex.model, "tasks", {}) or {})

    def __getitem__(self, name: str) -> TaskInfo:
        info = self.installed.get(name)
        if info is not None:
            return info
        if isinstance(name, str) and self.plex.in_store(name):  # not read yet, or read but not installed yet
            meta = self.plex.adapter_info(name).meta
            if meta.get("task") is not None:
                return TaskInfo.from_meta(meta, name)
        raise KeyError(name)

    @property
    def partial(self) -> bool:
        """Whether iterating may miss heads: adapters of an attached store are known by their meta only once asked
        for by name."""
        return self.plex.store is not None

    def __iter__(self) -> Iterator[str]:
        return iter(self.installed)

    def __len__(self) -> int:
        return len(self.installed)


def served_names(choice: Any) -> list[str]:
    """Adapters of a row choice with a non-zero weight."""
    if choice is None or isinstance(choice, str):
        return choice_names(choice)
    items = list(choice.items()) if isinstance(choice, Mapping) else list(choice)
    return [str(n) for n, w in items if float(w) != 0]


def head_owner(choice: Any, with_heads: Mapping[str, Any]) -> str | None:
    """The adapter whose head answers a row (the first with a head and a non-zero weight), as the model picks it."""
    return next((n for n in served_names(choice) if n in with_heads), None)


def route_rows(router: Any, plex: Plex, texts: list[str], ids: torch.Tensor, mask: torch.Tensor) -> list[Any]:
    """One row choice per text from a router: ``route_texts(texts)``, a RoutedModel (``route(ids, mask, texts=)``)
    or a callable ``text -> (choice, served_by)``."""
    if callable(getattr(router, "route_texts", None)):
        return list(router.route_texts(texts))
    if callable(getattr(router, "route", None)):
        device = plex.device
        return list(router.route(ids.to(device), mask.to(device), texts=texts).choices())
    return [router(t)[0] for t in texts]


class EncoderBatcher(WorkerThread):
    """The worker that batches encoder rows across requests (see the module docstring)."""

    def __init__(self, plex: Plex, *, router: Any = None, max_batch_size: int = 32, batch_window_ms: float = 5.0,
                 max_queue: int = 1024, metrics: EncoderMetrics | None = None, start: bool = True,
                 threads: int | None = None) -> None:
        if max_batch_size < 1 or max_queue < 1:
            raise ValueError("max_batch_size and max_queue must be >= 1")
        self.plex = plex
        self.model = plex.model
        self.tokenizer = plex.tokenizer
        self.router = router
        self.max_batch_size = max_batch_size
        self.batch_window = max(0.0, batch_window_ms / 1000.0)
        self.max_queue = max_queue
        self.pad_token_id = pad_id(self.tokenizer, self.model)
        self.metrics = metrics or EncoderMetrics()
        self.metrics.attach_engine(self)
        super().__init__("loraplex-encoder", EngineClosed, threads)
        self._running = 0
        if start:
            self.start()

    # ------------------------------------------------------------------ state (start, close, alive: WorkerThread)
    @property
    def running_count(self) -> int:
        return self._running

    @property
    def heads(self) -> TaskHeads:
        """Adapter -> :class:`~loraplex.tasks.TaskInfo` of the adapters with a task head (:class:`TaskHeads`)."""
        return TaskHeads(self.plex)

    # ------------------------------------------------------------------ submitting
    def submit_many(self, rows: Sequence[tuple[Sequence[int], Any, str, bool]]) -> list[concurrent.futures.Future]:
        """Queue rows ``(token ids, choice | AUTO, text, needs a head)``: all are queued, or none (raises)."""
        items = [_Row([int(t) for t in ids], choice, text, need) for ids, choice, text, need in rows]
        with self._cv:
            if self._stopping or self.dead is not None:
                raise EngineClosed("the encoder worker is not running" + (f" ({self.dead})" if self.dead else ""))
            if len(self._pending) + len(items) > self.max_queue:
                self.metrics.rejected.inc(reason="queue_full")
                raise QueueFull(f"the request queue is full ({self.max_queue} rows waiting); retry later")
            self._pending.extend(items)
            self._cv.notify_all()
        return [r.future for r in items]

    def encode(self, rows: Sequence[tuple[Sequence[int], Any, str, bool]], timeout: float | None = None
               ) -> list[Encoded]:
        """Submit and wait (blocking); raises the first row's error."""
        return [f.result(timeout) for f in self.submit_many(rows)]

    # ------------------------------------------------------------------ worker
    def _worker(self) -> None:
        torch.set_grad_enabled(False)
        try:
            while True:
                self._control.run_pending()
                if self._stopping:
                    break
                batch = self._take()
                if batch:
                    self._running = len(batch)
                    try:
                        self._run(batch)
                    except Exception as exc:  # noqa: BLE001 - reported to the rows, the server stays up
                        log.exception("encoder batch failed")
                        for r in batch:
                            if not r.future.done():
                                r.future.set_exception(exc)
                    finally:
                        self._running = 0
        except BaseException as exc:  # a bug: make it visible to /health and every waiting client
            log.exception("encoder worker crashed")
            self.dead = exc
        finally:
            self._fail_all(EngineClosed(f"the encoder stopped ({self.dead})" if self.dead else
                                        "the encoder stopped"))

    def _take(self) -> list[_Row]:
        """The next batch: wait for a row, then up to the batching window for more."""
        with self._cv:
            while not (self._stopping or self._control or self._pending):
                self._cv.wait(1.0)
            if self._stopping or self._control:
                return []
            if self.batch_window > 0:
                self._control.batching_window(self.batch_window, lambda: len(self._pending) >= self.max_batch_size,
                                              lambda: self._stopping)
                if self._stopping:
                    return []
            batch = []
            while self._pending and len(batch) < self.max_batch_size:
                r = self._pending.popleft()
                if r.requeued or r.future.set_running_or_notify_cancel():  # a cancelled row (client gone) is skipped
                    batch.append(r)
            return batch

    def _run(self, batch: list[_Row]) -> None:
        """Route, check, one forward, hand out the results."""
        auto = [r for r in batch if r.choice is AUTO]
        if auto:
            try:
                if self.router is None:
                    raise LoraplexError("model 'auto' needs a router, and no router is configured on this server")
                ids, mask = pad_batch([r.ids for r in auto], self.pad_token_id)
                choices = route_rows(self.router, self.plex, [r.text for r in auto], ids, mask)
            except Exception as exc:  # noqa: BLE001 - the routed rows fail, the others run
                for r in auto:
                    r.future.set_exception(exc)
                batch = [r for r in batch if r.choice is not AUTO]
            else:
                for r, c in zip(auto, choices):
                    r.choice = None if isinstance(c, str) and c in ("base", "") else c
        heads = self.heads
        rows: list[_Row] = []
        for r in batch:
            try:
                self.plex.rows_for([r.choice], 1)  # unknown adapters (e.g. unloaded meanwhile) fail this row only
                if r.need_head and head_owner(r.choice, heads) is None:
                    names = served_names(r.choice)
                    raise NoTaskHead(f"adapter {names[0]!r}" if len(names) == 1 else
                                     f"model {r.choice!r}" if names else "the base model", heads)
            except LoraplexError as exc:
                r.future.set_exception(exc)
                continue
            rows.append(r)
        for part in self._slot_chunks(self._loaded(rows)):
            self._forward(part)

    def _loaded(self, rows: list[_Row]) -> list[_Row]:
        """The rows whose store adapters are all in memory. For the others the reads start (or are joined) on the
        bank's loader threads, off this thread; each such row goes back to the front of the queue when its reads
        are done, or fails with the first read's error (an :class:`AdapterError` naming the adapter)."""
        ready = []
        for r in rows:
            reads = [self.plex.fetch_adapter(n) for n in choice_names(r.choice) if self.plex.needs_fetch(n)]
            reads = [f for f in reads if not f.done() or f.exception() is not None]
            if not reads:
                ready.append(r)
                continue
            self.metrics.adapter_loading.inc()
            self._when_read(r, reads)
        return ready

    def _when_read(self, row: _Row, reads: list[concurrent.futures.Future]) -> None:
        left = [len(reads)]

        def done(_: concurrent.futures.Future) -> None:
            with self._cv:
                left[0] -= 1
                if left[0]:
                    return
                err = next((f.exception() for f in reads if f.exception() is not None), None)
                if err is None and (self._stopping or self.dead is not None):
                    err = EngineClosed("the encoder stopped while the adapter was read")
                if err is None:
                    row.requeued = True
                    self._pending.appendleft(row)
                    self._cv.notify_all()
            if err is not None:
                row.future.set_exception(err)

        for f in reads:
            f.add_done_callback(done)

    def _slot_chunks(self, rows: list[_Row]) -> list[list[_Row]]:
        """Rows split so that no forward needs more adapters than the bank has device slots."""
        limit = max(1, self.plex.max_slots)
        parts: list[list[_Row]] = []
        names: set[str] = set()
        for r in rows:
            mine = set(choice_names(r.choice))
            if not parts or len(names | mine) > limit:
                parts.append([])
                names = set()
            parts[-1].append(r)
            names |= mine
        return parts

    def _forward(self, rows: list[_Row]) -> None:
        """One mixed-adapter forward over ``rows`` (ordered by adapter slot); results to each row's future."""
        names = sorted({n for r in rows for n in choice_names(r.choice)})
        with self.plex.hold(names) as slots:
            rows = grouped(rows, slots)
            ids, mask = pad_batch([r.ids for r in rows], self.pad_token_id)
            device = self.plex.device
            out = self.plex(ids.to(device), attention_mask=mask.to(device), adapters=[r.choice for r in rows])
        self.metrics.batch_size.observe(len(rows), phase="encode")
        self.metrics.prompt_tokens.inc(int(mask.sum()))
        emb = out.embeddings.float().cpu()
        now = time.monotonic()
        for j, r in enumerate(rows):
            lg = out.logits[j]
            if lg is not None:
                lg = lg.float().cpu()
                if lg.dim() == 2:
                    lg = lg[:len(r.ids)]
            r.future.set_result(Encoded(r.choice, served_names(r.choice), out.heads[j], lg, emb[j]))
            self.metrics.request_latency.observe(now - r.submitted)

    def _fail_all(self, exc: BaseException) -> None:
        with self._cv:
            pending = list(self._pending)
            self._pending.clear()
        self._control.fail_all(exc)
        for r in pending:
            if r.future.set_running_or_notify_cancel():
                r.future.set_exception(exc)


def grouped(rows: list[Any], slots: Mapping[str, int]) -> list[Any]:
    """Rows (with a ``choice``) ordered base first, then by adapter slot (one contiguous run per adapter), blends
    last; the order within a group is kept."""
    def key(r: Any) -> tuple[int, int]:
        if r.choice is None:
            return (0, 0)
        if isinstance(r.choice, str):
            return (1, slots.get(r.choice, 0))
        return (2, 0)
    return sorted(rows, key=key)


__all__ = ["AUTO", "Encoded", "EncoderBatcher", "EncoderMetrics", "NoTaskHead", "grouped", "head_owner", "route_rows",
           "served_names"]
