"""The adapter store: an index of PEFT adapter folders under one or more roots, read on demand.

A root is a folder of adapter folders (``<root>/<name>/adapter_config.json``), or one adapter folder itself
(named after the folder). Building the index reads directory entries only: no config, no weights. Configs are
parsed on first use and cached; weights are read by :meth:`AdapterStore.read`, which checks a fingerprint (inode,
mtime, size of the config and weights files) before and after the read and reads again when a writer replaced
the folder meanwhile, so a read never mixes two versions. Hidden folders and loraplex's write leftovers
(``.NAME.tmp-*``, ``.NAME.old-*``) are never adapters, and every file read is confined to the roots
(:func:`loraplex.adapters.io.confine`).

New folders are found by :meth:`AdapterStore.lookup` (one ``stat`` for a name not in the index) and by
:meth:`AdapterStore.rescan` (periodic, see :meth:`AdapterStore.watch`); removed ones leave the index at the next
rescan or lookup.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from loraplex.adapters.io import (CONFIG_NAME, META_NAME, PICKLE_NAME, WEIGHTS_NAME, LoraAdapter,
                                  check_path_allowed, confine, is_hidden_or_leftover, load_adapter, read_config)
from loraplex.adapters.spec import LoraSpec
from loraplex.errors import AdapterError, PathNotAllowedError, near_matches

log = logging.getLogger("loraplex.adapters")

#: Adapter names the store serves (as the composition grammar spells them): no '/', so nothing outside a root.
NAME_PATTERN = re.compile(r"[A-Za-z0-9_.\-]+")

#: Entries (path, parsed config, meta) kept for the adapters used most recently; the index itself holds names.
ENTRY_CACHE = 4096
#: (inode, mtime ns, size) of the config and of the weights file; None for a missing file.
Fingerprint = tuple[tuple[int, int, int] | None, tuple[int, int, int] | None]


def fingerprint(folder: Path) -> Fingerprint:
    """What changes when an adapter folder is replaced or a file in it rewritten (no file contents read)."""
    def one(p: Path) -> tuple[int, int, int] | None:
        try:
            st = p.stat()
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    weights = folder / WEIGHTS_NAME
    w = one(weights)
    if w is None:
        w = one(folder / PICKLE_NAME)
    return (one(folder / CONFIG_NAME), w)


@dataclass
class StoreEntry:
    """One adapter folder of the store."""

    name: str
    path: Path
    config: LoraSpec | None = None  # parsed on first use
    meta: dict[str, Any] | None = None  # loraplex_meta.json, read on first use
    seen: Fingerprint | None = None  # fingerprint when config/meta were cached


@dataclass(frozen=True)
class AdapterInfo:
    """What a listing shows of an adapter, without its weights: folder (None: built in memory) and meta."""

    name: str
    path: str | None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class StoreChange:
    """What a rescan found: names added, removed, and those whose files changed since they were read."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)


class AdapterStore:
    """An index of the adapter folders under ``roots`` (see the module docstring); thread-safe."""

    def __init__(self, roots: Sequence[str | os.PathLike] | str | os.PathLike, *, trust_pickle: bool = False,
                 confine_to: Sequence[str | os.PathLike] = ()) -> None:
        if isinstance(roots, (str, os.PathLike)):
            roots = [roots]
        self.roots = [Path(r).expanduser() for r in roots]
        for r in self.roots:
            if not r.is_dir():
                raise AdapterError(f"adapter store folder not found: {r}")
        #: every read must resolve inside these (the roots themselves plus any extra allowed roots)
        self.allowed = [str(r) for r in self.roots] + [str(r) for r in confine_to]
        self.trust_pickle = trust_pickle
        self._lock = threading.Lock()
        self._entries: dict[str, int] = {}  # name -> index of its root (-1 - i: root i is that adapter itself)
        self._cache: OrderedDict[str, StoreEntry] = OrderedDict()  # entries in use (paths, configs, meta), LRU
        self._sorted: list[str] | None = None
        self._read_fp: dict[str, Fingerprint] = {}  # fingerprint of the last weights read per name
        self.reads = 0  # weight reads (tests count them)
        self.read_counts: dict[str, int] = {}
        self.scans = 0
        self._watch: threading.Thread | None = None
        self._stop = threading.Event()
        self._listeners: list[Callable[[StoreChange], None]] = []
        self.rescan(raise_refused=True)

    # ------------------------------------------------------------------ index
    def _scan_root(self, i: int, refused: list[PathNotAllowedError]) -> dict[str, int]:
        root = self.roots[i]
        if (root / CONFIG_NAME).is_file():  # the root is one adapter folder
            return {root.name: -1 - i}
        found: dict[str, int] = {}
        try:
            entries = list(os.scandir(root))
        except OSError as exc:
            log.warning("cannot list the adapter store folder %s: %s", root, exc)
            return found
        for e in entries:
            if is_hidden_or_leftover(e.name) or not NAME_PATTERN.fullmatch(e.name):
                continue
            p = Path(e.path)
            try:
                if not e.is_dir():
                    continue
                if e.is_symlink():
                    check_path_allowed(p, self.allowed)
                if not self._confined_files(p):
                    continue
            except PathNotAllowedError as exc:
                refused.append(exc)
                continue
            except OSError:
                continue
            found[e.name] = i
        return found

    def _confined_files(self, folder: Path) -> bool:
        """Whether ``folder`` holds a config; a config or weights file that is a symlink must resolve inside the
        allowed roots (:class:`PathNotAllowedError` naming it otherwise). One ``lstat`` per file."""
        found = False
        for fname in (CONFIG_NAME, WEIGHTS_NAME, PICKLE_NAME):
            f = folder / fname
            try:
                st = os.lstat(f)
            except OSError:
                continue
            if stat.S_ISLNK(st.st_mode):
                check_path_allowed(f, self.allowed)
                found = found or (fname == CONFIG_NAME and f.is_file())
            elif fname == CONFIG_NAME:
                found = stat.S_ISREG(st.st_mode)
        return found

    def rescan(self, *, raise_refused: bool = False) -> StoreChange:
        """Re-read the roots' directory entries: new folders join the index, gone ones leave it, and names whose
        files changed since they were last read are reported (listeners are told). A folder whose files are
        symlinks out of the roots is left out (logged), or with ``raise_refused`` its
        :class:`PathNotAllowedError` raised."""
        found: dict[str, int] = {}
        refused: list[PathNotAllowedError] = []
        for i in range(len(self.roots)):
            for name, where in self._scan_root(i, refused).items():
                found.setdefault(name, where)  # the first root holding a name wins
        if refused:
            if raise_refused:
                raise refused[0]
            for exc in refused:
                log.warning("adapter store: skipping a folder: %s", exc)
        change = StoreChange()
        with self._lock:
            for name in list(self._entries):
                if name not in found:
                    del self._entries[name]
                    self._cache.pop(name, None)
                    self._read_fp.pop(name, None)
                    change.removed.append(name)
            for name, where in found.items():
                was = self._entries.get(name)
                if was != where:
                    self._entries[name] = where
                    self._cache.pop(name, None)
                    if was is None:
                        change.added.append(name)
            read = dict(self._read_fp)
            self.scans += 1
            if change.added or change.removed:
                self._sorted = None
        for name, fp in read.items():  # only adapters read so far can have changed under a reader
            e = self.lookup(name)
            if e is not None and fingerprint(e.path) != fp:
                change.changed.append(name)
                with self._lock:
                    e.config = e.meta = e.seen = None
        if change:
            for fn in list(self._listeners):
                try:
                    fn(change)
                except Exception:  # noqa: BLE001 - a listener's bug must not stop the rescans
                    log.exception("adapter store listener failed")
        return change

    def lookup(self, name: str) -> StoreEntry | None:
        """The entry of ``name``: from the index, or found on disk now (a folder written since the last scan);
        None when no root holds it (a name the index had whose folder is gone is dropped)."""
        if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or is_hidden_or_leftover(name):
            return None
        with self._lock:
            where = self._entries.get(name)
            if where is not None:
                return self._entry_at(name, where)
        for i, root in enumerate(self.roots):
            if (root / CONFIG_NAME).is_file():
                if root.name == name:
                    where = -1 - i
                    break
                continue
            try:
                if (root / name).is_symlink():
                    check_path_allowed(root / name, self.allowed)
                if self._confined_files(root / name):
                    where = i
                    break
            except (PathNotAllowedError, OSError) as exc:
                log.warning("adapter store: %s", exc)
        else:
            return None
        with self._lock:
            where = self._entries.setdefault(name, where)
            self._sorted = None
            return self._entry_at(name, where)

    def _entry_at(self, name: str, where: int) -> StoreEntry:
        """The (cached) entry of ``name`` in root ``where`` (under ``_lock``)."""
        e = self._cache.get(name)
        if e is None:
            path = self.roots[-1 - where] if where < 0 else self.roots[where] / name
            e = self._cache[name] = StoreEntry(name, path)
            if len(self._cache) > ENTRY_CACHE:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(name)
        return e

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.lookup(name) is not None

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        """Every adapter in the index, sorted."""
        with self._lock:
            if self._sorted is None:
                self._sorted = sorted(self._entries)
            return list(self._sorted)

    def page(self, after: str | None = None, limit: int | None = None) -> list[str]:
        """Names after ``after`` (exclusive), at most ``limit``: for listing a large store in pages."""
        names = self.names()
        start = 0
        if after is not None:
            import bisect

            start = bisect.bisect_right(names, after)
        return names[start:] if limit is None else names[start:start + limit]

    def suggest(self, name: str, n: int = 5) -> list[str]:
        """Up to ``n`` indexed names closest to ``name`` (for error messages)."""
        return near_matches(name, self.names(), n)

    def path(self, name: str) -> Path:
        """The folder of ``name`` (:class:`AdapterError` when the store has none)."""
        e = self.lookup(name)
        if e is None:
            raise AdapterError(f"adapter {name!r} is not in the adapter store ({len(self)} adapters under "
                               f"{', '.join(map(str, self.roots))})")
        return e.path

    # ------------------------------------------------------------------ lazy reads
    def config(self, name: str) -> LoraSpec:
        """The adapter's parsed ``adapter_config.json`` (cached until its files change)."""
        e = self._entry(name)
        fp = fingerprint(e.path)
        if e.config is None or e.seen != fp:
            e.config, e.meta, e.seen = read_config(e.path, roots=self.allowed), None, fp
        return e.config

    def meta(self, name: str) -> dict[str, Any]:
        """The adapter's ``loraplex_meta.json`` ({} when it has none; cached until its files change)."""
        e = self._entry(name)
        fp = fingerprint(e.path)
        if e.meta is None or e.seen != fp:
            meta: dict[str, Any] = {}
            f = e.path / META_NAME
            if f.is_file():
                try:
                    got = json.loads(confine(f, self.allowed).read_text())
                    meta = got if isinstance(got, dict) else {}
                except (OSError, ValueError, RecursionError):
                    meta = {}
            if e.seen != fp:
                e.config = None
            e.meta, e.seen = meta, fp
        return e.meta

    def info(self, name: str) -> AdapterInfo:
        """The adapter's folder and meta (no weights read)."""
        e = self._entry(name)
        return AdapterInfo(name, str(e.path), dict(self.meta(name)))

    def read(self, name: str, *, dtype: torch.dtype | None = None, attempts: int = 4) -> LoraAdapter:
        """The adapter's weights and config, read whole from one version of its folder: when the fingerprint
        changed during the read (a writer replaced the folder), it is read again (up to ``attempts`` times)."""
        e = self._entry(name)
        last: Exception | None = None
        for _ in range(attempts):
            before = fingerprint(e.path)
            try:
                ad = load_adapter(e.path, name, trust_pickle=self.trust_pickle, roots=self.allowed, dtype=dtype)
            except AdapterError as exc:
                if fingerprint(e.path) == before:
                    raise
                last = exc
                continue
            if fingerprint(e.path) == before:
                with self._lock:
                    self._read_fp[name] = before
                    self.reads += 1
                    self.read_counts[name] = self.read_counts.get(name, 0) + 1
                return ad
        raise AdapterError(f"adapter {name!r} ({e.path}) kept changing while it was read; "
                           f"write it atomically (a temp folder, then rename)") from last

    def changed(self, name: str) -> bool:
        """Whether the files of ``name`` differ from the version last read (True when it was never read)."""
        e = self.lookup(name)
        with self._lock:
            fp = self._read_fp.get(name)
        return e is None or fp is None or fingerprint(e.path) != fp

    def _entry(self, name: str) -> StoreEntry:
        e = self.lookup(name)
        if e is None:
            raise AdapterError(f"adapter {name!r} is not in the adapter store")
        return e

    # ------------------------------------------------------------------ rescans
    def on_change(self, fn: Callable[[StoreChange], None]) -> None:
        """Call ``fn(change)`` after every rescan that found something."""
        self._listeners.append(fn)

    def watch(self, interval: float = 5.0) -> None:
        """Rescan every ``interval`` seconds on a daemon thread (until :meth:`close`, or until no root is left)."""
        if self._watch is not None or interval <= 0:
            return

        def loop() -> None:
            while not self._stop.wait(interval):
                if not any(r.is_dir() for r in self.roots):  # the store was deleted: nothing left to watch
                    return
                try:
                    self.rescan()
                except Exception:  # noqa: BLE001 - keep watching
                    log.exception("adapter store rescan failed")

        self._watch = threading.Thread(target=loop, name="loraplex-store-rescan", daemon=True)
        self._watch.start()

    @property
    def watching(self) -> bool:
        """Whether periodic rescans run (:meth:`watch` with an interval > 0, not closed)."""
        t = self._watch
        return t is not None and t.is_alive()

    def close(self) -> None:
        """Stop the periodic rescans."""
        self._stop.set()
        t, self._watch = self._watch, None
        if t is not None:
            t.join(timeout=2.0)


__all__ = ["AdapterInfo", "AdapterStore", "Fingerprint", "NAME_PATTERN", "StoreChange", "StoreEntry", "fingerprint"]
