"""AdapterBank: many named adapters of one model in three tiers: disk (an adapter store), CPU (byte budget, LRU)
and device slots (LRU, refcounted)."""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping

from torch import nn

from loraplex import cputhreads
from loraplex.adapters.io import META_NAME, LoraAdapter, align_prefix, load_adapter, validate_against
from loraplex.adapters.store import AdapterInfo, AdapterStore, StoreChange
from loraplex.errors import AdapterError, LoraplexError, UnknownAdapterError
from loraplex.hostmem import to_pages
from loraplex.layers import MultiLoraLinear, SavedModuleSwitch
from loraplex.modules import UnwrappedView, set_submodule
from loraplex.plan import PlanState


@dataclass
class BankStats:
    """Counters of the tier transitions: device-slot hits/misses (CPU -> slot copies)/evictions, disk -> CPU reads
    (first reads from the store and re-reads after a CPU-tier eviction), CPU-tier evictions, load latency."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    cpu_evictions: int = 0
    disk_loads: int = 0
    disk_reloads: int = 0
    load_errors: int = 0
    load_seconds: float = 0.0
    disk_seconds: float = 0.0


#: ``fn(tier, seconds)`` told of every load: ``"disk"`` (file -> CPU tier, validated) or ``"slot"`` (CPU -> device).
LoadListener = Callable[[str, float], None]
#: Threads reading adapters from disk off the serving worker.
LOAD_THREADS = 4


class AdapterBank:
    """Named adapters of one base model.

    *Disk tier*: an optional :class:`~loraplex.adapters.store.AdapterStore` (:meth:`attach_store`): its adapters
    are names until first used, then read (:meth:`fetch` off the caller's thread, once per adapter however many
    callers ask at the same time; or inline by :meth:`get`), validated and kept in the CPU tier.
    *CPU tier*: registered adapters' tensors (pinned on CUDA; else in page-backed buffers,
    :func:`loraplex.hostmem.page_buffer`, so a dropped copy's memory leaves the process); with
    ``cpu_budget_bytes``, the least recently used adapters that have a file on disk are dropped and re-read when
    needed (a re-read one counts against the budget again).
    *Device tier*: ``max_slots`` slots in every wrapped layer's stacked tensors; a batch acquires slots for the
    adapters it uses (loading them, evicting the least recently used idle slot) and releases them afterwards.
    Slot 0 is the all-zero "no adapter" slot. Adapters registered by name take precedence over store entries.
    """

    def __init__(self, model: nn.Module, *, max_slots: int = 32, cpu_budget_bytes: int | None = None,
                 trust_pickle: bool = False) -> None:
        if max_slots < 1:
            raise ValueError(f"max_slots must be >= 1, got {max_slots}")
        self.model = model
        self.state = PlanState()
        self.max_slots = max_slots
        self.cpu_budget_bytes = cpu_budget_bytes
        self.trust_pickle = trust_pickle
        self.layers: dict[str, MultiLoraLinear] = {}
        self.switches: dict[str, SavedModuleSwitch] = {}
        self._cpu: dict[str, LoraAdapter | None] = {}  # None: dropped from RAM, reload from ._paths
        self._paths: dict[str, str | None] = {}
        self._cpu_lru: OrderedDict[str, None] = OrderedDict()
        self._cpu_bytes = 0  # bytes of the adapters held in ._cpu
        self.store: AdapterStore | None = None
        self._from_store: set[str] = set()  # names in ._cpu read from the store
        self._fetched: dict[str, LoraAdapter] = {}  # read and validated, waiting for a module install (see get)
        self._inflight: dict[str, concurrent.futures.Future] = {}
        self._outdated: set[str] = set()  # store adapters whose files changed: re-read at their next acquire
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._listeners: list[LoadListener] = []
        self._slot_of: dict[str, int] = {}
        self._slot_owner: list[str | None] = [None] * (max_slots + 1)
        self._refcount: list[int] = [0] * (max_slots + 1)
        self._stale: set[int] = set()  # slots whose adapter was replaced/removed while in use
        self._lru: OrderedDict[int, None] = OrderedDict()
        self._lock = threading.RLock()
        self._idle = threading.Condition(self._lock)
        self.stats = BankStats()
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.version = 0  # bumped on every register/unregister
        self._base_modules: list[tuple[str, nn.Module]] | None = None  # see _base_model

    # ------------------------------------------------------------------ registry
    @property
    def names(self) -> list[str]:
        """Registered adapters (in registration order), then the store's (sorted)."""
        with self._lock:
            own = [n for n in self._cpu if n not in self._from_store]
        if self.store is None:
            return own
        return list(dict.fromkeys(own + self.store.names()))

    def __contains__(self, name: object) -> bool:
        if name in self._cpu and name not in self._from_store:
            return True
        return self.store is not None and name in self.store

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        with self._lock:
            own = sum(1 for n in self._cpu if n not in self._from_store)
        if self.store is None:
            return own
        return own + sum(1 for n in self.store.names() if n not in self._cpu or n in self._from_store)

    def in_store(self, name: str) -> bool:
        """Whether ``name`` is served from the store (not registered by name)."""
        return (self.store is not None and (name not in self._cpu or name in self._from_store)
                and name in self.store)

    def in_memory(self, name: str) -> bool:
        """Whether ``name`` is in the CPU tier, ready for a slot without a disk read."""
        with self._lock:
            return self._cpu.get(name) is not None or name in self._fetched

    def info(self, name: str) -> AdapterInfo:
        """Folder and meta of ``name`` without reading its weights (a registered one's CPU copy when held)."""
        with self._lock:
            own = name in self._cpu and name not in self._from_store
            ad = self._cpu.get(name) if own else None
        if ad is not None:
            return AdapterInfo(name, ad.path, dict(ad.meta))
        if own:
            path = self._paths.get(name)
            meta: dict = {}
            if path:
                f = Path(path) / META_NAME
                try:
                    meta = json.loads(f.read_text()) if f.is_file() else {}
                except (OSError, ValueError):
                    meta = {}
            return AdapterInfo(name, path, meta if isinstance(meta, dict) else {})
        if self.store is not None and name in self.store:
            return self.store.info(name)
        raise UnknownAdapterError(name, self.names)

    def needs_fetch(self, name: str) -> bool:
        """Whether ``name`` is a store adapter whose tensors are not in the CPU tier."""
        return self.in_store(name) and not self.in_memory(name)

    def attach_store(self, store: AdapterStore) -> None:
        """Serve the adapters of ``store`` by name (read on first use); its changes invalidate their copies."""
        self.store = store
        store.on_change(self._store_changed)

    def on_load(self, fn: LoadListener) -> None:
        """Call ``fn(tier, seconds)`` after every disk -> CPU read and every CPU -> slot copy."""
        self._listeners.append(fn)

    def get(self, name: str) -> LoraAdapter:
        """The adapter's CPU copy (read from the store, or re-read from disk if it was dropped)."""
        if self.in_store(name) and not self.in_memory(name) and not self._lock._is_owned():  # type: ignore[attr-defined]
            self.fetch(name).result()  # one read shared with concurrent fetches (raises the adapter's error)
        with self._lock:
            ad = self._memory_copy(name)
            if ad is not None:
                return ad
            if name in self._cpu and name not in self._from_store:
                if self._paths.get(name) is None:
                    raise UnknownAdapterError(name, self.names)
                t0 = time.perf_counter()  # re-read and prepared exactly as at register (prefix, dtype, pinning)
                ad = self._prepare(name, self._read(name, self._paths[name]))
                self.stats.disk_reloads += 1
                self._put_cpu(name, ad, from_store=False)
                self._observe("disk", time.perf_counter() - t0)
                return ad
            if not self.in_store(name):
                raise UnknownAdapterError(name, self.names)
            # the caller holds the bank (a slot load) and the copy was dropped meanwhile: read it on this thread
            t0 = time.perf_counter()
            ad = self._prepare(name, self.store.read(name))  # type: ignore[union-attr]
            self._install_modules(ad)
            self._count_read(name, time.perf_counter() - t0, name in self._from_store)
            self._put_cpu(name, ad, from_store=True)
            return ad

    def _memory_copy(self, name: str) -> LoraAdapter | None:
        """The CPU copy of ``name`` if there is one (a fetched copy gets its modules installed now, on the thread
        that owns the model), marked most recently used."""
        ad = self._fetched.pop(name, None)
        if ad is not None:
            self._install_modules(ad)
            self._put_cpu(name, ad, from_store=True)
            return ad
        ad = self._cpu.get(name)
        if ad is not None:
            self._cpu_lru.move_to_end(name)
        return ad

    def _count_read(self, name: str, seconds: float, reread: bool) -> None:
        if reread:
            self.stats.disk_reloads += 1
        else:
            self.stats.disk_loads += 1
        self.stats.disk_seconds += seconds
        self._observe("disk", seconds)

    def fetch(self, name: str) -> "concurrent.futures.Future[LoraAdapter]":
        """The store adapter ``name`` read and validated into the CPU tier on a loader thread (a done future when
        it is there already); concurrent calls for one adapter share one read. The future's error is an
        :class:`AdapterError` naming the adapter and file for an invalid adapter."""
        with self._lock:
            ad = self._cpu.get(name)
            ad = ad if ad is not None else self._fetched.get(name)
            if ad is not None:
                done: concurrent.futures.Future = concurrent.futures.Future()
                done.set_result(ad)
                return done
            fut = self._inflight.get(name)
            if fut is not None:
                return fut
            fut = self._inflight[name] = concurrent.futures.Future()
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(LOAD_THREADS, thread_name_prefix="loraplex-load",
                                                                   initializer=cputhreads.single)
            pool = self._pool
        pool.submit(self._fetch_into, name, fut)
        return fut

    def _fetch_into(self, name: str, fut: concurrent.futures.Future) -> None:
        t0 = time.perf_counter()
        try:
            if self.store is None or not self.in_store(name):
                raise UnknownAdapterError(name, self.names)
            ad = self._prepare(name, self.store.read(name))
        except BaseException as exc:  # noqa: BLE001 - handed to every waiter
            with self._lock:
                self._inflight.pop(name, None)
                self.stats.load_errors += 1
            fut.set_exception(exc)
            return
        with self._lock:
            reread = name in self._from_store
            if self._needs_install(ad):
                self._fetched[name] = ad
            else:
                self._put_cpu(name, ad, from_store=True)
            self._inflight.pop(name, None)
            self._count_read(name, time.perf_counter() - t0, reread)
        fut.set_result(ad)

    def register(self, name: str, adapter: LoraAdapter | str, *, replace: bool = False) -> LoraAdapter:
        """Add an adapter (object or folder) under ``name``; with ``replace``, swap it atomically."""
        if not name or not isinstance(name, str):
            raise AdapterError(f"adapter name must be a non-empty string, got {name!r}")
        if isinstance(adapter, LoraAdapter):
            ad = adapter
        else:
            ad = self._read(name, str(adapter))
        ad = self._prepare(name, ad)
        with self._lock:
            if name in self._cpu and name not in self._from_store and not replace:
                raise AdapterError(f"adapter {name!r} is already registered (use replace=True to swap it)")
            if name in self._cpu:
                self._detach_slot(name)
            self._install_modules(ad)
            self._put_cpu(name, ad, from_store=False)
            self._from_store.discard(name)
            self._paths[name] = ad.path
            self.version += 1
        return ad

    def unregister(self, name: str, *, timeout: float | None = 30.0) -> None:
        """Remove an adapter; waits (up to ``timeout`` s) for batches still using it, then frees its slot."""
        with self._lock:
            if name not in self._cpu or name in self._from_store:
                raise UnknownAdapterError(name, self.names)
            slot = self._slot_of.get(name)
            if slot is not None and self._refcount[slot] > 0:
                deadline = None if timeout is None else time.monotonic() + timeout
                while self._refcount[slot] > 0:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise LoraplexError(f"adapter {name!r} is still in use by running requests after "
                                            f"{timeout}s; not unloaded")
                    self._idle.wait(left)
            self._detach_slot(name)
            self._remove_saved(name)
            self._drop_cpu(name)
            del self._cpu[name]
            self._from_store.discard(name)
            self._paths.pop(name, None)
            self._cpu_lru.pop(name, None)
            self.version += 1

    # ------------------------------------------------------------------ device slots
    def acquire(self, names: set[str] | list[str], loaded: Mapping[str, LoraAdapter] | None = None
                ) -> dict[str, int]:
        """Slots for ``names`` (loading missing ones); hold them until :meth:`release`. ``loaded``: copies
        :meth:`fetch` gave, put back into the CPU tier if the budget dropped them meanwhile (no second read)."""
        wanted = list(dict.fromkeys(names))
        if len(wanted) > self.max_slots:
            raise LoraplexError(f"a batch uses {len(wanted)} distinct adapters but the bank has only "
                                f"{self.max_slots} device slots (raise max_slots)")
        loaded = dict(loaded or {})
        if self.store is not None and not self._lock._is_owned():  # type: ignore[attr-defined]
            for n in wanted:  # disk reads before taking the bank, so other threads' slot work goes on
                if n not in loaded and self.in_store(n) and not self.in_memory(n):
                    loaded[n] = self.fetch(n).result()
        with self._lock:
            for n in wanted:
                if n not in self:
                    raise UnknownAdapterError(n, self.names)
                if n in self._outdated:  # its files changed: the new version goes into a slot
                    self._outdated.discard(n)
                    self._detach_slot(n)
                if loaded and n in loaded and self._cpu.get(n) is None and n not in self._fetched \
                        and self.in_store(n):
                    self._install_modules(loaded[n])
                    self._put_cpu(n, loaded[n], from_store=True)
            out: dict[str, int] = {}
            for n in wanted:  # pin the resident ones first so loading others cannot evict them
                if n in self._slot_of:
                    s = self._slot_of[n]
                    out[n] = s
                    self._refcount[s] += 1
                    self._lru.move_to_end(s)
                    self.stats.hits += 1
            try:
                for n in wanted:
                    if n in out:
                        continue
                    s = self._free_slot()
                    self._load_slot(n, s)
                    out[n] = s
                    self._refcount[s] += 1
                    self.stats.misses += 1
            except BaseException:
                self.release(out.values())
                raise
            return out

    def release(self, slots: object) -> None:
        """Give back slots taken by :meth:`acquire`."""
        with self._lock:
            for s in slots:  # type: ignore[attr-defined]
                self._refcount[s] -= 1
                if self._refcount[s] == 0:
                    if s in self._stale:
                        self._stale.discard(s)
                        self._clear_slot(s)
                    self._idle.notify_all()

    @contextmanager
    def hold(self, names: set[str] | list[str]) -> Iterator[dict[str, int]]:
        """``acquire`` as a context manager."""
        slots = self.acquire(names)
        try:
            yield slots
        finally:
            self.release(slots.values())

    def resident(self) -> dict[str, int]:
        """Adapters currently in device slots, with their slot."""
        with self._lock:
            return dict(self._slot_of)

    def nbytes(self) -> dict[str, int]:
        """Bytes per tier: CPU adapters held in RAM, device slot stacks."""
        dev = sum(l.lora_A.nbytes + l.lora_B.nbytes for l in self.layers.values())
        return {"cpu": self._cpu_bytes, "device": dev}

    def cpu_count(self) -> int:
        """Adapters whose tensors are in the CPU tier now."""
        with self._lock:
            return sum(1 for a in self._cpu.values() if a is not None) + len(self._fetched)

    def close(self) -> None:
        """Stop the loader threads (reads in progress finish)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ internals
    def _read(self, name: str, path: str) -> LoraAdapter:
        return load_adapter(path, name, trust_pickle=self.trust_pickle)

    def _prepare(self, name: str, ad: LoraAdapter) -> LoraAdapter:
        """Validate against the model; CPU copy in the model dtype (pinned when the model is on CUDA)."""
        ad.name = name
        base = self._base_model()
        # the spec is kept as written (e.g. target_modules="all-linear") so saving gives back the same config;
        # the modules served are the ones in the weights file, checked below
        ad = align_prefix(ad, base)
        ad.name = name
        validate_against(ad, base, check_saved=self._saved_handler() is None, model_name=type(self.model).__name__)
        cast = any(t.dtype != self.dtype for m in ad.modules.values() for t in m.tensors())
        ad = ad.to("cpu", self.dtype)
        ad.name = name
        if cast and self.device.type != "cuda":  # the cast copies go back into one page-backed block (no heap growth)
            for m in ad.modules.values():
                packed = to_pages(m.tensors())
                m.A, m.B = packed[0], packed[1]
                m.magnitude = packed[2] if m.magnitude is not None else None
        ad.base_copies = {}  # checked equal to the model's above: the shared base serves them
        if self.device.type == "cuda":
            for m in ad.modules.values():
                m.A, m.B = m.A.pin_memory(), m.B.pin_memory()
                if m.magnitude is not None:
                    m.magnitude = m.magnitude.pin_memory()
        return ad

    def _base_model(self) -> nn.Module:
        """The model as its base modules (wrappers seen through); the module table is walked once and reused
        until this bank wraps another module (a registration would otherwise walk the whole model twice)."""
        if self._base_modules is None:
            self._base_modules = list(UnwrappedView(self.model).named_modules())
        return UnwrappedView(self.model, self._base_modules)

    def _install_modules(self, ad: LoraAdapter) -> None:
        """Wrap the modules this adapter needs (once per module) and install its modules_to_save copies."""
        for mod in ad.modules:
            if mod not in self.layers:
                base = self.model.get_submodule(mod)
                layer = MultiLoraLinear(base, mod, self.state, self.max_slots + 1, ad.modules[mod].rank)
                set_submodule(self.model, mod, layer)
                self.layers[mod] = layer
                self._base_modules = None
        handler = self._saved_handler()
        for mod, sd in ad.saved_modules.items():
            if handler is not None:
                handler(ad, mod, sd)  # the model's own installer may add modules (e.g. a task head)
                self._base_modules = None
                continue
            if mod not in self.switches:
                base = self.model.get_submodule(mod)
                sw = SavedModuleSwitch(base, mod, self.state)
                set_submodule(self.model, mod, sw)
                self.switches[mod] = sw
                self._base_modules = None
            self.switches[mod].set_copy(ad.name, sd)

    def _saved_handler(self):
        """The model's own ``modules_to_save`` installer, when it has one (e.g. a multi-task head bank)."""
        handler = getattr(self.model, "loraplex_install_saved", None)
        return handler if callable(handler) else None

    def _free_slot(self) -> int:
        for s in range(1, self.max_slots + 1):
            if self._slot_owner[s] is None and s not in self._stale:
                return s
        for s in self._lru:
            if self._refcount[s] == 0 and s not in self._stale:
                victim = self._slot_owner[s]
                if victim is not None:
                    del self._slot_of[victim]
                self._slot_owner[s] = None
                self.stats.evictions += 1
                return s
        raise LoraplexError(f"all {self.max_slots} device slots hold adapters in use by running batches; "
                            f"raise max_slots or lower concurrency")

    def _load_slot(self, name: str, slot: int) -> None:
        t0 = time.perf_counter()
        ad = self.get(name)
        for mod, layer in self.layers.items():
            m = ad.modules.get(mod)
            if m is None:
                layer.set_slot(slot, None, None, 0.0)
            else:
                layer.set_slot(slot, m.A.to(self.device, non_blocking=True), m.B.to(self.device, non_blocking=True),
                               m.scaling, None if m.magnitude is None else m.magnitude.to(self.device))
        self._slot_of[name] = slot
        self._slot_owner[slot] = name
        self._lru[slot] = None
        self._lru.move_to_end(slot)
        self.stats.load_seconds += time.perf_counter() - t0
        self._observe("slot", time.perf_counter() - t0)

    def _clear_slot(self, slot: int) -> None:
        for layer in self.layers.values():
            layer.set_slot(slot, None, None, 0.0)
        self._slot_owner[slot] = None
        self._lru.pop(slot, None)

    def _detach_slot(self, name: str) -> None:
        """Unmap ``name`` from its slot; the slot is cleared now if idle, else when its last user releases it."""
        slot = self._slot_of.pop(name, None)
        if slot is None:
            return
        self._slot_owner[slot] = None
        if self._refcount[slot] > 0:
            self._stale.add(slot)
        else:
            self._clear_slot(slot)

    def _observe(self, tier: str, seconds: float) -> None:
        for fn in list(self._listeners):
            fn(tier, seconds)

    def _needs_install(self, ad: LoraAdapter) -> bool:
        """Whether the adapter needs a module wrapped or a ``modules_to_save`` copy installed (model changes)."""
        return bool(ad.saved_modules) or any(m not in self.layers for m in ad.modules)

    def _put_cpu(self, name: str, ad: LoraAdapter, *, from_store: bool) -> None:
        """Hold ``ad`` in the CPU tier as the most recently used, then keep the tier under its budget."""
        self._drop_cpu(name)
        self._cpu[name] = ad
        self._cpu_bytes += ad.nbytes
        if from_store:
            self._from_store.add(name)
            self._paths[name] = ad.path
        self._cpu_lru[name] = None
        self._cpu_lru.move_to_end(name)
        self._enforce_cpu_budget()

    def _drop_cpu(self, name: str) -> None:
        """Forget the CPU copy of ``name`` (the entry stays: it is re-read when needed)."""
        ad = self._cpu.get(name)
        if ad is not None:
            self._cpu_bytes -= ad.nbytes
            self._cpu[name] = None

    def _store_changed(self, change: StoreChange) -> None:
        """Store rescan: copies of replaced adapters are re-read at their next use (a slot holding the old version
        is replaced at its next acquire, on the serving thread), removed ones are forgotten."""
        with self._lock:
            for name in change.changed + change.removed:
                if name not in self._from_store and name not in self._fetched:
                    continue
                self._fetched.pop(name, None)
                self._drop_cpu(name)
                self._cpu_lru.pop(name, None)
                if name in self._slot_of:
                    self._outdated.add(name)
                elif name in change.removed:
                    self._cpu.pop(name, None)
                    self._from_store.discard(name)
                    self._remove_saved(name)
                self.version += 1

    def _enforce_cpu_budget(self) -> None:
        """Drop least recently used CPU copies that can be re-read (a file or the store behind them, not in a
        slot), never the most recently used one, until the tier fits its budget."""
        if self.cpu_budget_bytes is None or self._cpu_bytes <= self.cpu_budget_bytes:
            return
        newest = next(reversed(self._cpu_lru), None)
        for name in list(self._cpu_lru):
            if self._cpu_bytes <= self.cpu_budget_bytes:
                break
            ad = self._cpu.get(name)
            if ad is None or name == newest or name in self._slot_of:
                continue
            if not (self._paths.get(name) or name in self._from_store):
                continue
            self._drop_cpu(name)
            self._cpu_lru.pop(name, None)
            if name in self._from_store and ad.saved_modules:
                self._remove_saved(name)  # a task head goes with its copy; the next read installs it again
            self.stats.cpu_evictions += 1

    def _remove_saved(self, name: str) -> None:
        """Uninstall ``name``'s ``modules_to_save`` copies (the model's own remover, e.g. a task head, or the
        switches' copies)."""
        for sw in self.switches.values():
            if sw.copy_for(name) is not None:
                sw.set_copy(name, None)
        handler = getattr(self.model, "loraplex_remove_saved", None)
        if callable(handler):
            handler(name)
