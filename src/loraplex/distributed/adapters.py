"""A replica's adapter set: reference-counted loads into the replica's engine from the shared store.

Two kinds of holders count on an adapter: Ray's multiplex cache (one hold per cached model id, released when Ray
evicts that id, least recently used first, past ``max_num_models_per_replica``) and each running request (held
from before it is submitted until it ends). An adapter is read from the store on its first holder and unloaded
from the engine when its last holder lets go, so eviction never pulls weights from under a running request. All
bookkeeping runs on the replica's event loop; disk reads and engine calls run on worker threads.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Sequence

from loraplex.adapters.io import load_adapter
from loraplex.distributed.naming import adapters_of
from loraplex.distributed.store import AdapterStore

log = logging.getLogger("loraplex.distributed")


class Held:
    """One multiplexed model id held in a replica. Ray calls ``__del__`` on eviction (on a worker thread)."""

    def __init__(self, owner: "AdapterSet", model_id: str, names: Sequence[str],
                 loop: asyncio.AbstractEventLoop) -> None:
        self.owner, self.model_id, self.names, self._loop = owner, model_id, list(names), loop
        self._released = False

    def release(self) -> None:
        """Let go of the adapters (once; thread-safe: the release itself runs on the replica's loop)."""
        if self._released:
            return
        self._released = True
        try:
            self._loop.call_soon_threadsafe(self.owner.drop, self)
        except RuntimeError:  # loop closed: the replica is going away
            pass

    def __del__(self) -> None:
        self.release()


class AdapterSet:
    """Reference-counted adapters of one engine, read on demand from an :class:`AdapterStore`."""

    def __init__(self, engine: Any, store: AdapterStore, *, trust_pickle: bool = False,
                 unload_timeout: float = 60.0) -> None:
        self.engine, self.store = engine, store
        self.trust_pickle, self.unload_timeout = trust_pickle, unload_timeout
        self.refs: Counter[str] = Counter()
        self._loading: dict[str, asyncio.Task] = {}
        self._unloading: dict[str, asyncio.Task] = {}
        self.held: dict[str, Held] = {}  # model ids in Ray's multiplex cache of this replica
        self.loads = 0  # adapters read from the store (tests, /health)
        self.unloads = 0

    @property
    def loaded(self) -> list[str]:
        """Adapters registered in the engine right now."""
        return list(self.engine.plex.adapters)

    async def hold(self, model_id: str) -> Held:
        """Load what ``model_id`` needs and keep it until the returned :class:`Held` is released."""
        names = adapters_of(model_id)
        await self.acquire(names)
        held = self.held[model_id] = Held(self, model_id, names, asyncio.get_running_loop())
        return held

    def drop(self, held: Held) -> None:
        """Ray evicted ``held``: forget it and release its adapters."""
        if self.held.get(held.model_id) is held:
            del self.held[held.model_id]
        self.release(held.names)

    @asynccontextmanager
    async def using(self, names: Sequence[str]) -> AsyncIterator[None]:
        """Hold ``names`` for the duration of a request."""
        await self.acquire(names)
        try:
            yield
        finally:
            self.release(names)

    async def acquire(self, names: Sequence[str]) -> None:
        """Count one holder on each of ``names`` and make sure each is in the engine (reloading one that an
        eviction is unloading right now). On a load error the counts are undone and the error raised."""
        names = list(dict.fromkeys(names))
        self.refs.update(names)
        try:
            for name in names:
                await self._ensure(name)
        except BaseException:
            self.release(names)
            raise

    def release(self, names: Sequence[str]) -> None:
        """One holder fewer on each of ``names``; unload those nobody holds (on the loop, without waiting)."""
        for name in dict.fromkeys(names):
            self.refs[name] -= 1
            if self.refs[name] <= 0:
                del self.refs[name]
                if name not in self._unloading and name in self.engine.plex:
                    self._unloading[name] = asyncio.ensure_future(self._unload(name))

    async def _ensure(self, name: str) -> None:
        while name in self._unloading:  # an eviction is taking it out: let it finish, then read it again
            await asyncio.shield(self._unloading[name])
        if name in self.engine.plex:
            return
        task = self._loading.get(name)
        if task is None:
            task = self._loading[name] = asyncio.ensure_future(self._load(name))
            task.add_done_callback(lambda _t, n=name: self._loading.pop(n, None))
        await asyncio.shield(task)

    async def _load(self, name: str) -> None:
        path = self.store.path(name)
        adapter = await asyncio.to_thread(load_adapter, path, name, trust_pickle=self.trust_pickle,
                                          roots=self.store.roots_for(name), dtype=self.engine.plex.dtype)
        await asyncio.to_thread(self.engine.register_adapter, name, adapter)
        self.loads += 1
        log.info("loaded adapter %s from %s", name, path)

    async def _unload(self, name: str) -> None:
        try:
            if self.refs.get(name, 0) > 0:  # held again before we got here
                return
            await asyncio.to_thread(self.engine.unload_adapter, name, timeout=self.unload_timeout)
            self.unloads += 1
            log.info("unloaded adapter %s", name)
        except Exception as exc:  # noqa: BLE001 - a failed unload leaves the adapter resident, which is harmless
            log.warning("could not unload adapter %s: %s", name, exc)
        finally:
            self._unloading.pop(name, None)
