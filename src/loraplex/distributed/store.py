"""The adapter store: the one thing replicas share. A folder (or several) of PEFT adapter folders, named after them.

Every replica and the ingress see the same store (a local folder on one machine; a shared filesystem such as
NFS/EFS/Lustre, or a synced folder, across machines). An adapter is *found* by name: ``<root>/<name>/`` holding
``adapter_config.json``; explicit ``name -> path`` entries take precedence. Nothing is registered anywhere: writing
a new adapter folder into a root (atomically, e.g. :func:`loraplex.adapters.io.save_adapter`) makes it servable.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Mapping, Sequence

import torch

from loraplex.adapters.io import CONFIG_NAME, META_NAME, is_hidden_or_leftover
from loraplex.errors import AdapterError, UnknownAdapterError

_NAME = re.compile(r"[A-Za-z0-9_.\-]+")


@dataclass(frozen=True)
class AdapterStore:
    """Where adapters live: ``roots`` (folders of adapter folders) and explicit ``paths`` (name -> folder)."""

    roots: tuple[str, ...] = ()
    paths: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, roots: Sequence[str | os.PathLike] | str | os.PathLike | None = None,
           paths: Mapping[str, str | os.PathLike] | None = None) -> "AdapterStore":
        if roots is None:
            roots = ()
        elif isinstance(roots, (str, os.PathLike)):
            roots = (roots,)
        store = cls(tuple(str(Path(r).expanduser().resolve()) for r in roots),
                    {str(k): str(Path(v).expanduser().resolve()) for k, v in (paths or {}).items()})
        for r in store.roots:
            if not Path(r).is_dir():
                raise AdapterError(f"adapter store folder not found: {r}")
        for name, p in store.paths.items():
            if not (Path(p) / CONFIG_NAME).is_file():
                raise AdapterError(f"adapter {name!r}: {p} has no {CONFIG_NAME}")
        return store

    def find(self, name: str) -> Path | None:
        """The folder of adapter ``name``, or None. Names are plain (no '/', no '..'): nothing outside the roots;
        hidden names and write leftovers (``.NAME.tmp-*``, ``.NAME.old-*``) are never adapters."""
        if name in self.paths:
            return Path(self.paths[name])
        if not _NAME.fullmatch(name) or is_hidden_or_leftover(name):
            return None
        for root in self.roots:
            folder = Path(root) / name
            if (folder / CONFIG_NAME).is_file():
                return folder
        return None

    def roots_for(self, name: str) -> list[str]:
        """The folders every file read for adapter ``name`` must resolve inside: its explicit folder, or the roots."""
        return [self.paths[name]] if name in self.paths else list(self.roots)

    def path(self, name: str) -> Path:
        """The folder of adapter ``name`` (:class:`UnknownAdapterError` listing the store when absent)."""
        folder = self.find(name)
        if folder is None:
            raise UnknownAdapterError(name, self.names())
        return folder

    def names(self) -> list[str]:
        """Every adapter in the store (explicit entries first, then each root's subfolders, sorted)."""
        out = dict.fromkeys(self.paths)
        for root in self.roots:
            try:
                subs = sorted(p.name for p in Path(root).iterdir()
                              if _NAME.fullmatch(p.name) and not is_hidden_or_leftover(p.name)
                              and (p / CONFIG_NAME).is_file())
            except OSError:
                continue
            out.update(dict.fromkeys(subs))
        return list(out)


class StoreCatalog:
    """The store seen through the read-only surface :class:`~loraplex.serve.registry.ModelRegistry` uses of a
    ``Plex`` (:class:`~loraplex.serve.registry.AdapterCatalog`: ``adapters``, membership, ``get_adapter``), so the ingress resolves model names (adapters,
    ``blend(...)``/``stack(...)`` specs, compositions, A/B splits) with the single-process server's own rules
    without loading any weights. ``refresh()`` rescans the store."""

    tokenizer: Any = None

    def __init__(self, store: AdapterStore) -> None:
        self.store = store
        self.device = torch.device("cpu")
        self._names: list[str] = store.names()

    def refresh(self) -> list[str]:
        self._names = self.store.names()
        return self._names

    @property
    def adapters(self) -> list[str]:
        return list(self._names)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._names

    def get_adapter(self, name: str) -> Any:
        """An adapter-like record (``path``, ``meta``) for model cards and chat templates."""
        if name not in self._names:
            raise UnknownAdapterError(name, self._names)
        folder = self.store.path(name)
        meta: dict[str, Any] = {}
        f = folder / META_NAME
        if f.is_file():
            try:
                meta = json.loads(f.read_text())
            except (OSError, json.JSONDecodeError):
                meta = {}
        return SimpleNamespace(name=name, path=str(folder), meta=meta)

    def adapter_info(self, name: str) -> Any:
        """The same record as :meth:`get_adapter` (this catalog never reads weights)."""
        return self.get_adapter(name)
