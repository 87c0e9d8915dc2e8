"""AdapterBank: many named adapters resident on one model; device slots, a CPU tier, LRU and byte budgets."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from torch import nn

from loraplex.adapters.io import LoraAdapter, align_prefix, load_adapter, validate_against
from loraplex.errors import AdapterError, LoraplexError, UnknownAdapterError
from loraplex.layers import MultiLoraLinear, SavedModuleSwitch
from loraplex.modules import UnwrappedView, set_submodule
from loraplex.plan import PlanState


@dataclass
class BankStats:
    """Counters for metrics: device-slot hits/misses/evictions, CPU-tier reloads, load latency."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    cpu_evictions: int = 0
    disk_reloads: int = 0
    load_seconds: float = 0.0


class AdapterBank:
    """Named adapters of one base model.

    *CPU tier*: every registered adapter's tensors (pinned on CUDA); with ``cpu_budget_bytes``, the least recently
    used adapters that have a file on disk are dropped and re-read when needed.
    *Device tier*: ``max_slots`` slots in every wrapped layer's stacked tensors; a batch acquires slots for the
    adapters it uses (loading them, evicting the least recently used idle slot) and releases them afterwards.
    Slot 0 is the all-zero "no adapter" slot.
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
        return list(self._cpu)

    def __contains__(self, name: object) -> bool:
        return name in self._cpu

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._cpu))

    def __len__(self) -> int:
        return len(self._cpu)

    def get(self, name: str) -> LoraAdapter:
        """The adapter's CPU copy (re-read from disk if it was dropped)."""
        with self._lock:
            if name not in self._cpu:
                raise UnknownAdapterError(name, self.names)
            ad = self._cpu[name]
            if ad is None:  # re-read and prepared exactly as at register (prefix alignment, dtype, pinning)
                ad = self._prepare(name, self._read(name, self._paths[name]))
                self._cpu[name] = ad
                self.stats.disk_reloads += 1
            self._cpu_lru.move_to_end(name)
            return ad

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
            if name in self._cpu and not replace:
                raise AdapterError(f"adapter {name!r} is already registered (use replace=True to swap it)")
            if name in self._cpu:
                self._detach_slot(name)
            self._install_modules(ad)
            self._cpu[name] = ad
            self._paths[name] = ad.path
            self._cpu_lru[name] = None
            self._cpu_lru.move_to_end(name)
            self.version += 1
            self._enforce_cpu_budget()
        return ad

    def unregister(self, name: str, *, timeout: float | None = 30.0) -> None:
        """Remove an adapter; waits (up to ``timeout`` s) for batches still using it, then frees its slot."""
        with self._lock:
            if name not in self._cpu:
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
            for sw in self.switches.values():
                if sw.copy_for(name) is not None:
                    sw.set_copy(name, None)
            handler = getattr(self.model, "loraplex_remove_saved", None)
            if callable(handler):
                handler(name)
            del self._cpu[name]
            self._paths.pop(name, None)
            self._cpu_lru.pop(name, None)
            self.version += 1

    # ------------------------------------------------------------------ device slots
    def acquire(self, names: set[str] | list[str]) -> dict[str, int]:
        """Slots for ``names`` (loading missing ones); hold them until :meth:`release`."""
        wanted = list(dict.fromkeys(names))
        if len(wanted) > self.max_slots:
            raise LoraplexError(f"a batch uses {len(wanted)} distinct adapters but the bank has only "
                                f"{self.max_slots} device slots (raise max_slots)")
        with self._lock:
            for n in wanted:
                if n not in self._cpu:
                    raise UnknownAdapterError(n, self.names)
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
        cpu = sum(a.nbytes for a in self._cpu.values() if a is not None)
        dev = sum(l.lora_A.nbytes + l.lora_B.nbytes for l in self.layers.values())
        return {"cpu": cpu, "device": dev}

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
        ad = ad.to("cpu", self.dtype)
        ad.name = name
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

    def _enforce_cpu_budget(self) -> None:
        if self.cpu_budget_bytes is None:
            return
        total = sum(a.nbytes for a in self._cpu.values() if a is not None)
        for name in list(self._cpu_lru):
            if total <= self.cpu_budget_bytes:
                break
            ad = self._cpu[name]
            if ad is None or not self._paths.get(name) or name in self._slot_of:
                continue
            total -= ad.nbytes
            self._cpu[name] = None
            self.stats.cpu_evictions += 1
