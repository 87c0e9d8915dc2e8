"""Per-request merges (LoRAX's ``merge(...)`` model names): built once, off the engine's worker, cached by spec.

A request whose ``model`` is ``merge(ties;a=0.7,b=0.3;density=0.7)`` (or a composition defined as one) is served by
one adapter: the merge of its sources computed by :func:`loraplex.merge.merge_adapters` -- the function
``loraplex merge`` runs, with the same defaults -- and registered in the bank under a reserved name
(:data:`~loraplex.serve.registry.MERGE_PREFIX` + a hash of the spec), which no client can name or load itself.

* **Normalised key.** The spec is parsed and written back canonically with the merge code's defaults filled in for
  the options its method reads (``density`` 0.5 and ``majority_sign_method`` total where used, ``normalize`` true)
  and options it ignores dropped, so ``merge(ties;a=0.7,b=0.3)`` and ``merge(ties; a=0.7, b=0.3; density=0.5)`` are
  one entry. Source order is kept (it is the order ``loraplex merge --sources`` takes).
* **Off the worker.** Merges run on a small executor (one thread by default); only the final registration runs on
  the engine's worker, between two steps (:meth:`~loraplex.serve.engine.Engine.register_adapter`). A request waits
  for its merge with ``await`` (the event loop keeps serving everyone else), and concurrent requests for a spec that
  is being built wait for the same build.
* **LRU with a cap.** At most ``max_entries`` per-request merges stay registered; past that the least recently used
  finished one is evicted (unloaded once no running request uses it). Merges of configured compositions are pinned.
  A build that fails is not cached (the next request tries again).
* **Invalidation.** When a source adapter is replaced or unloaded (admin endpoints), every merge built from it is
  dropped (:meth:`MergeCache.forget_sources`).
* **Metrics** (``/metrics``): ``loraplex_merge_cache_hits_total``, ``..._misses_total`` (builds started),
  ``..._evictions_total``, ``loraplex_merge_failures_total``, ``loraplex_merge_seconds`` (build latency histogram)
  and ``loraplex_merge_cache_entries``.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from loraplex import cputhreads
from loraplex.compose.spec import Merge, parse
from loraplex.errors import UnknownAdapterError
from loraplex.merge import check_method, merge_adapters
from loraplex.serve.metrics import Counter, Gauge, Histogram
from loraplex.serve.registry import MERGE_PREFIX

log = logging.getLogger("loraplex.serve.merges")

#: Build-latency buckets (seconds): a merge streams every adapted module of its sources.
MERGE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
#: Defaults of :func:`loraplex.merge.merge_adapters` (and ``loraplex merge``) for the options a key spells out.
DEFAULT_DENSITY = 0.5
DEFAULT_SIGN = "total"


class MergeHost(Protocol):
    """What the cache needs of the serving engine (an :class:`~loraplex.serve.engine.Engine`)."""

    plex: Any

    def register_adapter(self, name: str, adapter: Any, *, replace: bool = False, timeout: float = 30.0) -> Any: ...

    def unload_adapter(self, name: str, *, timeout: float = 30.0) -> None: ...


def normalize(spec: Merge | str) -> Merge:
    """``spec`` with the defaults of the options its method reads filled in and the options it ignores dropped."""
    node = parse(spec)
    if not isinstance(node, Merge):
        raise TypeError(f"not a merge(...) spec: {spec!r}")
    meth = check_method(node.method)
    return Merge(node.method, node.items,
                 density=(DEFAULT_DENSITY if node.density is None else node.density) if meth.uses_density else None,
                 majority_sign_method=(node.majority_sign_method or DEFAULT_SIGN) if meth.uses_sign else None,
                 svd_rank=node.svd_rank, normalize=True if node.normalize is None else node.normalize,
                 peft_compat=True if node.peft_compat else None)


def merge_key(spec: Merge | str) -> str:
    """The cache key of a merge spec: the canonical text of :func:`normalize`'s node."""
    return str(normalize(spec))


def build_merge(plex: Any, spec: Merge | str, name: str) -> Any:
    """The merged :class:`~loraplex.adapters.io.LoraAdapter` of ``spec``'s sources (registered in ``plex``), named
    ``name``: :func:`loraplex.merge.merge_adapters` with the spec's weights and options, as ``loraplex merge``."""
    node = parse(spec)
    if not isinstance(node, Merge):
        raise TypeError(f"not a merge(...) spec: {spec!r}")
    sources = list(node.adapter_names())
    for s in sources:
        if s not in plex:
            raise UnknownAdapterError(s, [a for a in plex.adapters if not a.startswith(MERGE_PREFIX)])
    merged, _ = merge_adapters({s: plex.get_adapter(s) for s in sources}, sources, [w for _, w in node.items],
                               node.method, name=name, **node.options())
    merged.meta = {**(merged.meta or {}), "spec": str(node)}
    return merged


@dataclass
class _Entry:
    key: str
    name: str  # bank name
    sources: frozenset[str]
    future: Future  # the bank name once built
    pinned: bool = False


class MergeCache:
    """Merged adapters per normalised ``merge(...)`` spec, built on an executor and registered through ``host``.

    ``max_entries``: per-request merges kept registered (pinned ones do not count); ``workers``: merges built at
    once; ``metrics``: a :class:`~loraplex.serve.metrics.ServeMetrics` to export the counters through (its
    ``register``); ``unload_timeout``: seconds an eviction waits for running requests before retrying later.
    """

    def __init__(self, host: MergeHost, *, max_entries: int = 8, workers: int = 1, metrics: Any = None,
                 unload_timeout: float = 600.0) -> None:
        if max_entries < 1 or workers < 1:
            raise ValueError(f"max_entries and workers must be >= 1, got {max_entries}, {workers}")
        self.host = host
        self.max_entries = max_entries
        self.unload_timeout = unload_timeout
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="loraplex-merge", initializer=cputhreads.single)
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # LRU order: least recently used first
        self._seq = itertools.count()
        self.hits = Counter("loraplex_merge_cache_hits_total", "Requests served by a merge already built or being "
                                                               "built.")
        self.misses = Counter("loraplex_merge_cache_misses_total", "Merges built (a spec not in the cache).")
        self.evictions = Counter("loraplex_merge_cache_evictions_total", "Merges evicted (LRU past the cap, or a "
                                                                         "source replaced or unloaded).")
        self.failures = Counter("loraplex_merge_failures_total", "Merge builds that failed.")
        self.seconds = Histogram("loraplex_merge_seconds", "Seconds a merge took to build and register.",
                                 MERGE_BUCKETS)
        self.size = Gauge("loraplex_merge_cache_entries", "Merges registered or being built.",
                          fn=lambda: float(len(self._entries)))
        if metrics is not None:
            metrics.register(self.hits, self.misses, self.evictions, self.failures, self.seconds, self.size)

    # ------------------------------------------------------------------ lookups
    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> dict[str, str]:
        """``{key: bank name}`` of the merges built (not those still building)."""
        with self._lock:
            return {k: e.name for k, e in self._entries.items() if e.future.done() and not e.future.exception()}

    def pinned(self) -> list[str]:
        """Keys of the pinned merges (configured compositions)."""
        with self._lock:
            return [k for k, e in self._entries.items() if e.pinned]

    def start(self, spec: Merge | str, *, pinned: bool = False) -> Future:
        """The build of ``spec`` (started unless cached or under way): a future of its bank name. ``pinned``: never
        evicted by the LRU (a configured composition)."""
        key = merge_key(spec)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                entry.pinned = entry.pinned or pinned
                self.hits.inc()
                return entry.future
            node = parse(key)
            name = f"{MERGE_PREFIX}{hashlib.sha1(key.encode()).hexdigest()[:12]}.{next(self._seq)}"
            entry = _Entry(key, name, frozenset(node.adapter_names()), Future(), pinned)
            self._entries[key] = entry
            self.misses.inc()
        self._pool.submit(self._build, entry, node)
        return entry.future

    async def ensure(self, spec: Merge | str) -> str:
        """The bank name of ``spec``'s merge, awaiting its build (the event loop stays free meanwhile)."""
        fut = self.start(spec)
        if fut.done():
            return fut.result()
        return await asyncio.shield(asyncio.wrap_future(fut))  # a caller that gives up does not cancel the build

    # ------------------------------------------------------------------ building and dropping
    def _build(self, entry: _Entry, node: Merge) -> None:
        t0 = time.perf_counter()
        try:
            merged = build_merge(self.host.plex, node, entry.name)
            self.host.register_adapter(entry.name, merged)
        except BaseException as exc:  # noqa: BLE001 - answered to every waiting request
            self.failures.inc()
            with self._lock:
                if self._entries.get(entry.key) is entry:
                    del self._entries[entry.key]  # not cached: the next request tries again
            entry.future.set_exception(exc)
            return
        self.seconds.observe(time.perf_counter() - t0)
        with self._lock:
            current = self._entries.get(entry.key) is entry
        entry.future.set_result(entry.name)
        if not current:  # forgotten while it was built (a source changed): serve the waiting requests, then drop
            self._unload(entry.name)
        self._evict_over_cap()

    def _evict_over_cap(self) -> None:
        victims: list[_Entry] = []
        with self._lock:
            unpinned = [e for e in self._entries.values() if not e.pinned]
            over = len(unpinned) - self.max_entries
            for e in unpinned:  # LRU first
                if over <= 0:
                    break
                if e.future.done():
                    del self._entries[e.key]
                    victims.append(e)
                    over -= 1
        for e in victims:
            self.evictions.inc()
            self._unload_later(e.name)

    def forget_sources(self, adapters: Any) -> list[str]:
        """Drop every merge built (or being built) from one of ``adapters``; returns the keys dropped. Pinned
        merges whose sources are all still registered are started again at once."""
        changed = set(adapters)
        dropped: list[_Entry] = []
        with self._lock:
            for key, e in list(self._entries.items()):
                if e.sources & changed:
                    del self._entries[key]
                    dropped.append(e)
        for e in dropped:
            self.evictions.inc()
            if e.future.done() and not e.future.exception():
                self._unload_later(e.name)
        plex = self.host.plex
        for e in dropped:  # a configured composition's merge: build it again from the new weights
            if e.pinned and all(s in plex for s in e.sources):
                self.start(e.key, pinned=True)
        return [e.key for e in dropped]

    def discard(self, name: str) -> bool:
        """Forget the entry registered as bank name ``name`` (found missing from the bank), so the next request
        builds its merge again; True when there was one."""
        with self._lock:
            for key, e in list(self._entries.items()):
                if e.name == name:
                    del self._entries[key]
                    return True
        return False

    def unpin(self, spec: Merge | str) -> None:
        """Let ``spec``'s merge be evicted like a per-request one (its composition was removed)."""
        with self._lock:
            entry = self._entries.get(merge_key(spec))
            if entry is not None:
                entry.pinned = False
        self._evict_over_cap()

    def _unload_later(self, name: str) -> None:
        threading.Thread(target=self._unload, args=(name,), name="loraplex-merge-evict", daemon=True).start()

    def _unload(self, name: str) -> None:
        """Unregister ``name`` once no running request uses it (new requests for it are refused meanwhile and
        build the merge again under a new name)."""
        try:
            self.host.unload_adapter(name, timeout=self.unload_timeout)
        except UnknownAdapterError:
            pass
        except Exception:  # an eviction must not take the server down: the adapter stays registered
            log.exception("could not unload the merged adapter %s", name)

    def close(self) -> None:
        """Stop the executor (builds under way finish)."""
        self._pool.shutdown(wait=False, cancel_futures=True)


__all__ = ["DEFAULT_DENSITY", "DEFAULT_SIGN", "MERGE_BUCKETS", "MergeCache", "MergeHost", "build_merge", "merge_key",
           "normalize"]
