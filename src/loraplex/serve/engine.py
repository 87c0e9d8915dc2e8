"""The generation engine: a bounded request queue and one worker thread that owns the model.

Scheduling (continuous batching across adapters):

* Requests wait in a bounded FIFO queue (full -> :class:`QueueFull`, HTTP 429).
* The worker keeps one *running batch*. When it is idle it waits for a request, then up to ``batch_window_ms``
  for more (up to ``max_batch_size``). While a batch is running, waiting requests are admitted at every
  decode step as long as there is room: they are prefilled together in one mixed-adapter forward (left-padded,
  position ids from the mask as in HF ``generate``) and their KV cache is joined to the running batch's (see
  :mod:`loraplex.serve.kv`). Each decode step is one forward of every running row, each row with its own
  adapter or blend (``plex.using``). Finished and cancelled rows leave the batch at once (their cache rows are
  dropped and all-padding columns trimmed), so short requests never wait for long ones.
* Store adapters (:mod:`loraplex.adapters.store`) not yet in memory: the request stays queued in a *loading*
  state while a loader thread reads the adapter (one read however many requests wait for it); it is admitted
  when the read is done, or fails with the adapter's error. Other requests keep running meanwhile.
* Scarce device slots: rows whose adapters are resident are admitted first, others while slots are free; a row
  passed over ``max_skips`` times goes first and keeps new slots for itself (bounded waiting).
* Caches that cannot be spliced (sliding-window / non-``DynamicLayer`` layers) fall back to cohorts: a batch
  runs to completion before the next one is admitted.

Adapters: an admitted request holds device slots for the adapters it uses until it finishes (so an adapter
cannot be evicted or swapped under it). Every change to the bank (register, replace, remove) runs on the worker
between two forwards, so no forward ever sees half-installed weights; reading an adapter from disk happens on
the caller's thread, so loading never stalls requests for other adapters. ``unload_adapter`` refuses new
requests for the adapter, waits (up to a timeout) for the requests using it to finish, fails the ones still
queued cleanly, then removes it; ``register_adapter(replace=True)`` holds new requests back instead, waits for
the running ones, swaps, and lets them through with the new weights.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import queue
import threading
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterator, Sequence

import torch

from loraplex import decode
from loraplex.api import Plex
from loraplex.errors import AdapterError, LoraplexError, UnknownAdapterError, known_text
from loraplex.tokens import eos_ids, pad_batch, pad_id
from loraplex.serve import kv
from loraplex.serve.detok import TextStream
from loraplex.serve.logprobs import TokenLogprob, prompt_logprobs, token_logprobs
from loraplex.serve.metrics import ServeMetrics
from loraplex.serve.sampling import SamplingParams, sample_rows
from loraplex.serve.worker import WorkerThread

log = logging.getLogger("loraplex.serve")


# --------------------------------------------------------------------------- errors
class EngineError(LoraplexError):
    """Base class of the engine's refusals."""

    status = 500
    code = "engine_error"


class QueueFull(EngineError):
    status, code = 429, "queue_full"


class RequestTooLarge(EngineError, ValueError):
    """Prompt too long, ``max_tokens`` over the cap, or both together over the context length."""

    status = 400

    def __init__(self, message: str, code: str = "context_length_exceeded") -> None:
        super().__init__(message)
        self.code = code


class AdapterUnavailable(UnknownAdapterError):
    """The adapter is being unloaded: new requests for it are refused."""

    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(name, known)
        self.args = (f"adapter {name!r} is being unloaded; {known_text(name, self.known)}",)


class AdapterBusy(EngineError):
    """Unload/replace timed out waiting for the requests that use the adapter."""

    status, code = 409, "adapter_busy"


class EngineClosed(EngineError):
    status, code = 503, "engine_closed"


# --------------------------------------------------------------------------- events and handles
@dataclass
class Delta:
    """A piece of generated text (never revised); with ``logprobs`` requested, one per token (the text may be
    empty) carrying that token's logprob."""

    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class Final:
    """The end of a request."""

    text: str
    finish_reason: str  # "stop" | "length" | "cancelled" | "error"
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int]
    error: BaseException | None = None
    logprobs: list[TokenLogprob] | None = None  # one per token of ``token_ids`` (when requested)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # one per prompt token, the first None (echo)


class RequestHandle:
    """One submitted generation: iterate it (sync or async) for :class:`Delta` events and one :class:`Final`."""

    _ids = itertools.count(1)

    def __init__(self, prompt_ids: list[int], choice: Any, params: SamplingParams, names: list[str],
                 loop: asyncio.AbstractEventLoop | None) -> None:
        self.id = next(self._ids)
        self.prompt_ids = prompt_ids
        self.choice = choice
        self.params = params
        self.adapter_names = names
        self.final: Final | None = None
        self.prompt_logprobs: list[TokenLogprob | None] | None = None  # set at prefill (echo), before any event
        self.submitted = time.monotonic()
        self._q: queue.SimpleQueue[Delta | Final] = queue.SimpleQueue()
        self._loop = loop
        self._wake = asyncio.Event() if loop is not None else None
        self._cancel = threading.Event()

    def cancel(self) -> None:
        """Ask the engine to stop this request (it leaves the batch at the next step)."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def done(self) -> bool:
        return self.final is not None

    def _emit(self, ev: Delta | Final) -> None:
        if isinstance(ev, Final):
            self.final = ev
        self._q.put(ev)
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._wake.set)  # type: ignore[union-attr]
            except RuntimeError:  # the loop is closed: nobody is listening
                pass

    def events(self, timeout: float | None = None) -> Iterator[Delta | Final]:
        """Blocking iteration (threads, tests, benchmarks)."""
        while True:
            ev = self._q.get(timeout=timeout)
            yield ev
            if isinstance(ev, Final):
                return

    def result(self, timeout: float | None = None) -> Final:
        """Wait for the end; raises the request's error if it failed."""
        for ev in self.events(timeout):
            if isinstance(ev, Final):
                if ev.error is not None:
                    raise ev.error
                return ev
        raise AssertionError("unreachable")

    async def __aiter__(self) -> AsyncIterator[Delta | Final]:
        if self._wake is None:
            raise RuntimeError("submit with loop=... (or from inside an event loop) to iterate asynchronously")
        while True:
            try:
                ev = self._q.get_nowait()
            except queue.Empty:
                self._wake.clear()
                try:
                    ev = self._q.get_nowait()
                except queue.Empty:
                    await self._wake.wait()
                    continue
            yield ev
            if isinstance(ev, Final):
                return

    async def afinal(self) -> Final:
        """Wait for the end (asynchronously); errors are in ``Final.error``."""
        async for ev in self:
            if isinstance(ev, Final):
                return ev
        raise AssertionError("unreachable")

    async def aresult(self) -> Final:
        """Wait for the end (asynchronously); raises the request's error if it failed."""
        final = await self.afinal()
        if final.error is not None:
            raise final.error
        return final


@dataclass
class _Row:
    """Worker-side state of one request."""

    handle: RequestHandle
    stream: TextStream
    generator: torch.Generator | None
    slots: dict[str, int] = field(default_factory=dict)
    token_ids: list[int] = field(default_factory=list)
    started: float = 0.0
    admitted: bool = False  # prefilled (or about to be): counts in latency metrics
    counted: bool = False  # counts in ``Engine._in_use`` (what unload waits for)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    loading: dict[str, Any] = field(default_factory=dict)  # store adapters being read: name -> Future
    fetched: dict[str, Any] = field(default_factory=dict)  # store adapters read for this row: name -> LoraAdapter
    load_error: BaseException | None = None  # an adapter of the row failed to load
    skips: int = 0  # admissions that passed this row over (see Engine.max_skips)


# --------------------------------------------------------------------------- engine
class Engine(WorkerThread):
    """Continuous mixed-adapter batching over one :class:`loraplex.Plex` (see the module docstring)."""

    def __init__(self, plex: Plex, *, max_batch_size: int = 16, batch_window_ms: float = 5.0, max_queue: int = 256,
                 max_prompt_tokens: int | None = None, max_tokens_cap: int | None = None,
                 metrics: ServeMetrics | None = None, eos_token_ids: Sequence[int] | None = None,
                 start: bool = True, max_skips: int = 8, fast_decode: bool = True, threads: int | None = None
                 ) -> None:
        if max_batch_size < 1 or max_queue < 1:
            raise ValueError("max_batch_size and max_queue must be >= 1")
        self.plex = plex
        self.model = plex.model
        self.tokenizer = plex.tokenizer
        self.max_batch_size = max_batch_size
        self.batch_window = max(0.0, batch_window_ms / 1000.0)
        self.max_queue = max_queue
        #: a ready request passed over this many times (for rows whose adapters are resident) is admitted first,
        #: new device slots reserved for it: the bound on waiting when slots are scarce
        self.max_skips = max_skips
        cfg = getattr(self.model, "config", None)
        self.context_length: int | None = next(
            (int(v) for k in ("max_position_embeddings", "n_positions", "max_sequence_length")
             if (v := getattr(cfg, k, None))), None)
        self.max_prompt_tokens = max_prompt_tokens or ((self.context_length - 1) if self.context_length else 4096)
        self.max_tokens_cap = max_tokens_cap or (self.context_length or 4096)
        self.eos_token_ids = frozenset(eos_token_ids if eos_token_ids is not None else eos_ids(self.tokenizer,
                                                                                             self.model))
        self.pad_token_id = pad_id(self.tokenizer, self.model)
        self.metrics = metrics or ServeMetrics()
        self.metrics.attach_engine(self)
        self.device = plex.device
        try:
            self._logits_to_keep = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        except (TypeError, ValueError):
            self._logits_to_keep = False

        #: decode steps of a Llama-layout model skip transformers' forward (:mod:`loraplex.decode`), whenever the
        #: running batch's plan allows it
        self.decoder = decode.FastDecoder(self.model) if fast_decode and decode.supports(self.model) else None
        self._program: decode.DecodeProgram | None = None

        super().__init__("loraplex-engine", EngineClosed, threads)
        self._draining: dict[str, str] = {}  # adapter -> "unload" | "replace"
        self._in_use: Counter[str] = Counter()  # admitted requests per adapter
        self._running: list[_Row] = []
        self._cache: Any = None
        self._mask: torch.Tensor | None = None
        self._plan: ExitStack | None = None
        self._continuous: bool | None = None  # decided at the first prefill
        if start:
            self.start()

    # ------------------------------------------------------------------ state (start, close, alive: WorkerThread)
    @property
    def running_count(self) -> int:
        return len(self._running)

    @property
    def continuous(self) -> bool | None:
        """True: requests join a running batch; False: cohort mode; None: not decided yet."""
        return self._continuous

    # ------------------------------------------------------------------ submitting
    def adapter_names(self, choice: Any) -> list[str]:
        """The registered adapters a row choice uses (raises :class:`UnknownAdapterError`)."""
        rows = self.plex.rows_for([choice], 1)
        return list(dict.fromkeys(n for n, _ in rows[0]))

    def check(self, n_prompt: int, params: SamplingParams) -> None:
        """Raise :class:`RequestTooLarge` when the request cannot fit."""
        if n_prompt < 1:
            raise RequestTooLarge("the prompt is empty (it must have at least one token)", "empty_prompt")
        if n_prompt > self.max_prompt_tokens:
            raise RequestTooLarge(f"the prompt has {n_prompt} tokens; this server accepts at most "
                                  f"{self.max_prompt_tokens}", "prompt_too_long")
        if params.max_tokens > self.max_tokens_cap:
            raise RequestTooLarge(f"max_tokens={params.max_tokens} is over this server's cap of "
                                  f"{self.max_tokens_cap}", "max_tokens_too_large")
        if self.context_length and n_prompt + params.max_tokens > self.context_length:
            raise RequestTooLarge(f"this model's maximum context length is {self.context_length} tokens; the "
                                  f"prompt ({n_prompt} tokens) plus max_tokens ({params.max_tokens}) is "
                                  f"{n_prompt + params.max_tokens}", "context_length_exceeded")

    def submit(self, prompt_ids: Sequence[int], choice: Any = None, params: SamplingParams | None = None, *,
               loop: asyncio.AbstractEventLoop | None = None) -> RequestHandle:
        """Queue one generation; ``choice`` is an adapter name, None (base) or a blend {name: weight}."""
        return self.submit_many([(prompt_ids, choice, params or SamplingParams())], loop=loop)[0]

    def submit_many(self, items: Sequence[tuple[Sequence[int], Any, SamplingParams]], *,
                    loop: asyncio.AbstractEventLoop | None = None) -> list[RequestHandle]:
        """Queue several generations at once: all are queued, or none (the error is raised)."""
        if loop is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
        rows: list[_Row] = []
        for prompt_ids, choice, params in items:
            ids = [int(t) for t in prompt_ids]
            self.check(len(ids), params)
            names = self.adapter_names(choice)
            h = RequestHandle(ids, choice, params, names, loop)
            rows.append(_Row(h, TextStream(self.tokenizer, params.stop,
                                           include_stop=params.include_stop_str_in_output),
                             params.make_generator()))
        with self._cv:
            if self._stopping or self.dead is not None:
                raise EngineClosed("the engine is not running" + (f" ({self.dead})" if self.dead else ""))
            for r in rows:
                for n in r.handle.adapter_names:
                    if self._draining.get(n) == "unload":
                        raise AdapterUnavailable(n, self.plex.adapters)
            if len(self._pending) + len(rows) > self.max_queue:
                self.metrics.rejected.inc(reason="queue_full")
                raise QueueFull(f"the request queue is full ({self.max_queue} waiting); retry later")
            self._pending.extend(rows)
            self._cv.notify_all()
        return [r.handle for r in rows]

    def generate(self, prompt_ids: Sequence[int], choice: Any = None, params: SamplingParams | None = None,
                 timeout: float | None = None) -> Final:
        """Submit and wait (blocking)."""
        return self.submit(prompt_ids, choice, params).result(timeout)

    # ------------------------------------------------------------------ adapters (thread-safe)
    def register_adapter(self, name: str, adapter: Any, *, replace: bool = False, timeout: float = 30.0) -> Any:
        """Register an adapter (a :class:`LoraAdapter`, best read from disk beforehand on the caller's thread).

        With ``replace`` and ``name`` registered: requests for it are held back, running ones finish (up to
        ``timeout`` s, else :class:`AdapterBusy`), then the weights are swapped in one step."""
        if not (replace and name in self.plex):
            return self.call_on_worker(lambda: self.plex.add_adapter(name, adapter, replace=replace))
        self._start_drain(name, "replace")
        try:
            self._wait_unused(name, timeout)
            return self.call_on_worker(lambda: self.plex.add_adapter(name, adapter, replace=True))
        finally:
            self._end_drain(name)

    def unload_adapter(self, name: str, *, timeout: float = 30.0) -> None:
        """Refuse new requests for ``name``, wait up to ``timeout`` s for the running ones, then remove it."""
        if name not in self.plex:
            raise UnknownAdapterError(name, self.plex.adapters)
        self._start_drain(name, "unload")
        try:
            self._wait_unused(name, timeout)
            self.call_on_worker(lambda: self.plex.remove_adapter(name, timeout=5.0))
        finally:
            self._end_drain(name)

    def _start_drain(self, name: str, why: str) -> None:
        with self._cv:
            if name in self._draining:
                doing = "unloaded" if self._draining[name] == "unload" else "replaced"
                raise AdapterBusy(f"adapter {name!r} is already being {doing}")
            self._draining[name] = why

    def _end_drain(self, name: str) -> None:
        with self._cv:
            self._draining.pop(name, None)
            self._cv.notify_all()

    def _wait_unused(self, name: str, timeout: float | None) -> None:
        with self._cv:
            if not self._cv.wait_for(lambda: self._in_use[name] == 0, timeout):
                raise AdapterBusy(f"adapter {name!r} is still used by {self._in_use[name]} running request(s) "
                                  f"after {timeout}s; nothing was changed")

    # ------------------------------------------------------------------ worker
    def _worker(self) -> None:
        torch.set_grad_enabled(False)
        try:
            while True:
                self._control.run_pending()
                if self._stopping:
                    break
                rows = self._admit()
                if rows:
                    self._guarded(self._prefill, rows)
                if self._running:
                    self._guarded(self._decode_step, None)
        except BaseException as exc:  # a bug: make it visible to /health and to every waiting client
            log.exception("engine worker crashed")
            self.dead = exc
        finally:
            self._close_plan()
            self._fail_all(EngineClosed(f"the engine stopped ({self.dead})" if self.dead else "the engine stopped"))

    def _guarded(self, step: Callable[[Any], None], arg: Any) -> None:
        """Run a forward step; on an exception fail the requests involved and keep serving the others."""
        try:
            step(arg)
        except Exception as exc:  # noqa: BLE001 - reported to the requests, the server stays up
            log.exception("generation step failed")
            victims = list(self._running) + (list(arg) if arg else [])
            self._running = []
            self._cache = self._mask = None
            self._close_plan()
            for r in victims:
                if not r.handle.done:
                    self._finish(r, "error", exc)

    def _admissible(self, row: _Row) -> bool:
        """Whether ``row`` may leave the queue now: none of its adapters is being replaced, and each is in memory
        (a store adapter not yet read is fetched off this thread: the row stays *loading* meanwhile). A row whose
        adapter failed to load is admissible: admission fails it."""
        if row.handle.cancelled:  # leaves the queue at once, loading or not
            return True
        if any(self._draining.get(n) == "replace" for n in row.handle.adapter_names):
            return False
        return self._loaded(row)

    def _loaded(self, row: _Row) -> bool:
        """Start or check the reads of the row's store adapters; True when none is still being read."""
        if row.load_error is not None:
            return True
        ready = True
        for n in row.handle.adapter_names:
            if n in row.fetched:
                continue
            fut = row.loading.get(n)
            if fut is None:
                if not self.plex.needs_fetch(n):
                    continue
                fut = row.loading[n] = self.plex.fetch_adapter(n)
                if not fut.done():
                    self.metrics.adapter_loading.inc()
                    fut.add_done_callback(self._wake)
            if not fut.done():
                ready = False
                continue
            del row.loading[n]
            err = fut.exception()
            if err is not None:
                row.load_error = err
                return True
            row.fetched[n] = fut.result()
        return ready

    def _wake(self, _: Any = None) -> None:
        with self._cv:
            self._cv.notify_all()

    def _select(self, room: int, failed: list[tuple[_Row, BaseException | None]]) -> list[_Row]:
        """Take the rows to admit out of the queue (under ``_cv``); rows to fail go to ``failed``.

        Ready rows are ranked: rows passed over ``max_skips`` times first, then rows whose adapters are all
        resident in device slots (held by the running batch, or idle), then the rest, each group first come
        first served. A row is taken while the batch has room and the device slots its new adapters need are
        free (the batch is not capped at the slot count: rows sharing running adapters need none). When a row
        that waited too long does not fit, no later row may take a new slot until it does."""
        pinned = {n for r in self._running for n in r.slots}
        resident = set(self.plex.resident())
        free = self.plex.max_slots - len(pinned)
        ready: list[tuple[int, int, _Row]] = []
        keep: list[_Row] = []
        for i, row in enumerate(self._pending):
            names = row.handle.adapter_names
            if row.handle.cancelled:
                failed.append((row, None))
            elif any(self._draining.get(n) == "unload" for n in names):
                failed.append((row, AdapterUnavailable(next(n for n in names if self._draining.get(n)),
                                                       self.plex.adapters)))
            elif not self._admissible(row):
                keep.append(row)
            elif row.load_error is not None:
                failed.append((row, row.load_error))
            elif len(set(names)) > self.plex.max_slots:
                failed.append((row, LoraplexError(
                    f"a request uses {len(set(names))} distinct adapters but the server has only "
                    f"{self.plex.max_slots} device slots (raise max_slots)")))
            else:
                rank = 0 if row.skips >= self.max_skips else 1 if all(n in resident for n in names) else 2
                ready.append((rank, i, row))
        taken: list[_Row] = []
        reserved = False
        for rank, _, row in sorted(ready, key=lambda t: (t[0], t[1])):
            new = [n for n in dict.fromkeys(row.handle.adapter_names) if n not in pinned]
            if len(taken) < room and len(new) <= (0 if reserved else free):
                taken.append(row)
                pinned.update(new)
                free -= len(new)
                continue
            row.skips += 1
            keep.append(row)
            if len(taken) < room:  # passed over for device slots, not for room in the batch
                self.metrics.deferred.inc()
            if rank == 0 and new:
                reserved = True
        order = {id(r): i for i, r in enumerate(self._pending)}
        keep.sort(key=lambda r: order[id(r)])
        self._pending.clear()
        self._pending.extend(keep)
        for row in taken:
            self._in_use.update(row.handle.adapter_names)
            row.counted = True
        return taken

    def _admit(self) -> list[_Row]:
        """Requests to prefill now (may wait for work when idle)."""
        failed: list[tuple[_Row, BaseException | None]] = []
        with self._cv:
            if not self._running:
                while not (self._stopping or self._control or any(map(self._admissible, self._pending))):
                    self._cv.wait(0.05 if self._pending else 1.0)
                if self._stopping or self._control:
                    return []
                if self.batch_window > 0:
                    self._control.batching_window(self.batch_window, lambda: len(self._pending) >= self.max_batch_size,
                                                  lambda: self._stopping)
                    if self._stopping:
                        return []
            elif not self._continuous:
                return []
            taken = self._select(self.max_batch_size - len(self._running), failed)
        for row, err in failed:
            self._finish(row, "cancelled" if err is None else "error", err)
        admitted: list[_Row] = []
        for i, row in enumerate(taken):
            try:
                if row.handle.adapter_names:
                    row.slots = self.plex.acquire(row.handle.adapter_names, row.fetched)
                    row.fetched = {}
            except AdapterError as exc:  # removed while queued, or invalid
                self._finish(row, "error", exc)
                continue
            except LoraplexError as exc:  # every device slot is held by running requests
                if self._running or admitted:
                    self.metrics.deferred.inc()
                    with self._cv:  # wait for rows to finish and free slots
                        self._pending.extendleft(reversed(taken[i:]))
                        for r in taken[i:]:
                            self._in_use.subtract(r.handle.adapter_names)
                            r.counted = False
                        self._cv.notify_all()
                    break
                self._finish(row, "error", exc)
                continue
            row.admitted = True
            row.started = time.monotonic()
            for n in row.handle.adapter_names or ["base"]:
                self.metrics.adapter_requests.inc(adapter=n)
            admitted.append(row)
        return admitted

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: Any,
                 all_positions: bool = False) -> torch.Tensor:
        """Logits of the last position [B, V], or of every position [B, T, V] with ``all_positions``."""
        kwargs: dict[str, Any] = dict(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                                      use_cache=True)
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = 0 if all_positions else 1
        out = self.model(**kwargs)
        return out.logits if all_positions else out.logits[:, -1, :]

    def _sample(self, rows: list[_Row], logits: torch.Tensor) -> list[int]:
        """Each row's next token from raw ``logits`` [B, V]; the rows asking for logprobs get them."""
        params = [r.handle.params for r in rows]
        tokens = sample_rows(logits, params, [r.generator for r in rows], [r.handle.prompt_ids for r in rows],
                             [r.token_ids for r in rows], sorted(self.eos_token_ids))
        want = [i for i, p in enumerate(params) if p.logprobs is not None]
        if want:
            sel = torch.tensor(want, device=logits.device)
            lps = token_logprobs(logits.index_select(0, sel), torch.tensor([tokens[i] for i in want]),
                                 [params[i].logprobs or 0 for i in want])
            for i, lp in zip(want, lps):
                lp.offset = rows[i].stream.accepted_chars
                rows[i].logprobs.append(lp)
        return tokens

    def _prefill(self, rows: list[_Row]) -> None:
        k = len(rows)
        ids, mask = pad_batch([r.handle.prompt_ids for r in rows], self.pad_token_id, left=True, device=self.device)
        cache = kv.new_cache(self.model)
        echo = [i for i, r in enumerate(rows) if r.handle.params.prompt_logprobs is not None]
        with self.plex.using([r.handle.choice for r in rows], k):
            logits = self._forward(ids, mask, kv.position_ids(mask), cache, all_positions=bool(echo))
        if echo:  # logits [k, T, V]: score each echoed prompt at its own (left-padded) positions
            width = logits.shape[1]
            for i in echo:
                prompt = rows[i].handle.prompt_ids
                scored = prompt_logprobs(logits[i, width - len(prompt):], prompt,
                                         rows[i].handle.params.prompt_logprobs or 0)
                rows[i].prompt_logprobs = rows[i].handle.prompt_logprobs = scored
            logits = logits[:, -1, :]
        if self._continuous is None:
            self._continuous = kv.supports_surgery(cache)
            if not self._continuous:
                log.info("KV cache layers do not support batch surgery: running batches as cohorts")
        self.metrics.batch_size.observe(k, phase="prefill")
        self.metrics.prompt_tokens.inc(int(mask.sum()))
        tokens = self._sample(rows, logits)
        done = [self._accept(r, t) for r, t in zip(rows, tokens)]
        keep = [i for i, d in enumerate(done) if d is None]
        if keep:
            if len(keep) < k:
                mask = kv.select_rows(cache, mask, keep)
                mask = kv.trim_left(cache, mask)
            if self._running:
                self._mask = kv.concat_rows(self._cache, self._mask, cache, mask)
            else:
                self._cache, self._mask = cache, mask
            self._running.extend(rows[i] for i in keep)
            self._refresh_plan()
        for r, d in zip(rows, done):
            if d is not None:
                self._finish(r, d)

    def _decode_step(self, _: Any = None) -> None:
        cancelled = [i for i, r in enumerate(self._running) if r.handle.cancelled]
        if cancelled:
            self._drop(cancelled, ["cancelled"] * len(cancelled))
            if not self._running:
                return
        rows = self._running
        n = len(rows)
        assert self._mask is not None
        mask = torch.cat([self._mask, self._mask.new_ones(n, 1)], dim=1)
        pos = mask.sum(dim=1, keepdim=True) - 1
        ids = torch.tensor([[r.token_ids[-1]] for r in rows], dtype=torch.long, device=self.device)
        if self.decoder is not None and self._program is not None and self._program.n_rows == n:
            logits = self.decoder.step(self._program, ids, mask, pos, self._cache)
        else:
            logits = self._forward(ids, mask, pos, self._cache)
        self._mask = mask
        self.metrics.batch_size.observe(n, phase="decode")
        tokens = self._sample(rows, logits)
        reasons = [self._accept(r, t) for r, t in zip(rows, tokens)]
        idx = [i for i, d in enumerate(reasons) if d is not None]
        if idx:
            self._drop(idx, [reasons[i] for i in idx])  # type: ignore[misc]

    def _drop(self, idx: list[int], reasons: list[str]) -> None:
        """Remove rows ``idx`` from the running batch and finish them."""
        gone = [self._running[i] for i in idx]
        drop = set(idx)
        keep = [i for i in range(len(self._running)) if i not in drop]
        self._running = [self._running[i] for i in keep]
        if self._running:
            self._mask = kv.trim_left(self._cache, kv.select_rows(self._cache, self._mask, keep))
        else:
            self._cache = self._mask = None
            if self.decoder is not None:
                self.decoder.kv.clear()  # its spare-capacity buffers held that cache's keys and values
        self._refresh_plan()
        for r, why in zip(gone, reasons):
            self._finish(r, why)

    def _accept(self, row: _Row, token: int) -> str | None:
        """Record a sampled token; the finish reason if the row is done."""
        row.token_ids.append(token)
        self.metrics.generation_tokens.inc()
        p = row.handle.params
        if token in self.eos_token_ids and not p.ignore_eos:
            return "stop"
        piece = row.stream.push(token)
        if p.logprobs is not None:  # one event per token, carrying its logprob
            row.handle._emit(Delta(piece, row.logprobs[-1:]))
        elif piece:
            row.handle._emit(Delta(piece))
        if row.stream.stopped is not None or token in p.stop_token_ids:
            return "stop"
        if len(row.token_ids) >= p.max_tokens:
            return "length"
        if self.context_length and len(row.handle.prompt_ids) + len(row.token_ids) >= self.context_length:
            return "length"
        return None

    def _finish(self, row: _Row, reason: str, error: BaseException | None = None) -> None:
        """Release the row's slots and send its final event."""
        if row.slots:
            try:
                self.plex.release(row.slots)
            finally:
                row.slots = {}
        if row.counted:
            row.counted = False
            with self._cv:
                self._in_use.subtract(row.handle.adapter_names)
                self._cv.notify_all()
        if row.admitted:
            row.admitted = False
            self.metrics.request_latency.observe(time.monotonic() - row.started)
        if error is None and reason != "cancelled":
            tail = row.stream.finish()
            if tail:
                row.handle._emit(Delta(tail))
        self.metrics.finished.inc(reason=reason)
        wants = row.handle.params.logprobs is not None
        row.handle._emit(Final(row.stream.text, reason, len(row.handle.prompt_ids), len(row.token_ids),
                               list(row.token_ids), error, list(row.logprobs) if wants else None,
                               row.prompt_logprobs))

    def _refresh_plan(self) -> None:
        """Hold the running rows' adapter plan for the following decode steps."""
        self._close_plan()
        if self._running:
            stack = ExitStack()
            plan = stack.enter_context(self.plex.using([r.handle.choice for r in self._running], len(self._running)))
            self._plan = stack
            if self.decoder is not None:
                self._program = self.decoder.program(plan, len(self._running))

    def _close_plan(self) -> None:
        self._program = None
        if self._plan is not None:
            plan, self._plan = self._plan, None
            plan.close()

    def _fail_all(self, exc: BaseException) -> None:
        with self._cv:
            pending = list(self._pending)
            self._pending.clear()
        self._control.fail_all(exc)
        if threading.current_thread() is self._thread or self._thread is None or not self._thread.is_alive():
            running, self._running = list(self._running), []
        else:
            running = []
        for r in pending + running:
            if not r.handle.done:
                self._finish(r, "error", exc)

