"""Finding the files demo datasets are cut from on this machine: source kinds, the folders searched for each,
and an even, hash-based pick of at most ``max_files`` files per kind (copies and aliases kept once).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import sysconfig
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraplex.demo.text import DatasetBuildError, hash_unit
from loraplex.demo.troff import is_man_redirect, is_mdoc

#: Latin-script languages the ``man_languages`` dataset may use: the language part of a translated
#: man-page folder (``/usr/share/man/<lang>[_TERRITORY]``; ``pt`` and ``pt_BR`` both count as ``pt``).
MAN_LANGUAGES: tuple[str, ...] = (
    "af", "ca", "cs", "cy", "da", "de", "eo", "es", "et", "eu", "fi", "fr", "ga", "gl", "hr", "hu", "id",
    "is", "it", "lt", "lv", "ms", "nb", "nl", "nn", "no", "pl", "pt", "ro", "sk", "sl", "sq", "sv", "tr",
    "vi",
)
#: Man pages are read up to this many (uncompressed) bytes; larger pages (gcc, perl) are skipped.
MAX_MAN_BYTES = 1_000_000

_PICK_SALT = "loraplex-pick-v1"


@dataclass
class SourceSet:
    """Files found for one source kind, and the folders that were searched for them."""

    kind: str
    files: list[str] = field(default_factory=list)
    searched: list[str] = field(default_factory=list)


#: Folders scanned for each source kind; the ``{stdlib}`` entry is filled in at run time.
SOURCE_ROOTS: dict[str, list[str]] = {
    "python": ["{stdlib}"],
    "c_header": ["/usr/include"],
    "shell": ["/usr/bin", "/usr/sbin", "/etc", "/usr/share"],
    "perl": ["/usr/share/perl*"],
    "prose": ["/usr/share/common-licenses", "/usr/share/doc"],
    "copyright": ["/usr/share/doc"],
    **{f"man{n}": [f"/usr/share/man/man{n}"] for n in ("1", "2", "3", "5", "7", "8")},
    "man_languages": ["/usr/share/man"],
}
#: Source kinds of the ``man_sections`` dataset: ``man<N>`` for every section in
#: :data:`loraplex.demo.manpages.MAN_SECTIONS`.
MAN_KINDS: tuple[str, ...] = ("man1", "man2", "man3", "man5", "man7", "man8")

#: Stdlib folders skipped: third-party packages, test suites and codec tables (data, not code).
_PRUNE_STDLIB = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test", "encodings"}
_PRUNE_SHARE = {
    "man", "icons", "locale", "zoneinfo", "mime", "i18n", "fonts", "pixmaps", "X11", "help",
    "themes", "backgrounds", "sounds", "info", "applications", "gtk-doc", "javascript",
}
_SHEBANGS = (
    b"#!/bin/sh", b"#! /bin/sh", b"#!/bin/bash", b"#! /bin/bash", b"#!/usr/bin/env sh",
    b"#!/usr/bin/env bash", b"#!/usr/bin/bash", b"#!/bin/dash",
)
_PROSE_SKIP_EXT = (".html", ".htm", ".pdf", ".png", ".jpg", ".svg", ".xml", ".json", ".css", ".js")

_DISCOVERY_CACHE: dict[tuple[Any, ...], dict[str, SourceSet]] = {}


def stdlib_dir() -> str:
    """This Python's standard-library folder (the ``python`` source kind)."""
    return sysconfig.get_paths()["stdlib"]


def expand_roots(kind: str) -> list[str]:
    """Folders searched for source kind ``kind`` (:data:`SOURCE_ROOTS`, ``{stdlib}`` and globs filled in)."""
    out: list[str] = []
    for root in SOURCE_ROOTS.get(kind, []):
        root = root.replace("{stdlib}", stdlib_dir())
        if "*" in root:
            parent = Path(root).parent
            out.extend(sorted(str(p) for p in parent.glob(Path(root).name)) or [root])
        else:
            out.append(root)
    return out


def _walk(root: str, prune: Collection[str] = frozenset()) -> Iterator[tuple[str, list[str]]]:
    """(dirpath, sorted filenames) for every folder under ``root``, skipping ``prune`` names."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in prune)
        yield dirpath, sorted(filenames)


def _pick_files(
    candidates: Iterable[str],
    limit: int,
    accept: Callable[[str], bool] | None = None,
    copy_key: Callable[[str, os.stat_result], object] | None = None,
) -> list[str]:
    """Up to ``limit`` accepted files from ``candidates``, chosen by a path hash (so spread evenly).

    Paths are resolved and de-duplicated, and copies (by default: same file name and size, e.g.
    one header per architecture folder; else same ``copy_key(path, stat)``) are kept once.
    The hash used is independent of the split hash, so the cap does not bias which split files
    land in.  Returned sorted.
    """
    uniq: dict[str, None] = {}
    for c in candidates:
        try:
            real = os.path.realpath(c)
        except OSError:
            continue
        uniq.setdefault(real, None)
    ordered = sorted(uniq, key=lambda p: hash_unit(_PICK_SALT, p))
    out: list[str] = []
    copies: set[object] = set()
    for path in ordered:
        if len(out) >= limit:
            break
        try:
            st = os.stat(path)
        except OSError:
            continue
        if not os.path.isfile(path):
            continue
        key = (os.path.basename(path), st.st_size) if copy_key is None else copy_key(path, st)
        if key in copies:
            continue
        if accept is not None and not accept(path):
            continue
        copies.add(key)
        out.append(path)
    return sorted(out)


def _is_shell_script(path: str) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(1024)
    except OSError:
        return False
    if b"\x00" in head:
        return False
    first = head.split(b"\n", 1)[0].rstrip()
    if first.startswith(_SHEBANGS):
        return True
    return path.endswith(".sh") and not first.startswith(b"#!")


def _content_key(path: str, st: os.stat_result) -> object:
    """Copy key of a file by its size and content hash (for files that all share one name)."""
    try:
        with open(path, "rb") as fh:
            return (st.st_size, hashlib.blake2b(fh.read(), digest_size=16).hexdigest())
    except OSError:
        return (path,)


def _man_family(path: str, root: str) -> str:
    """Page family of a man page: its name up to the first ``-``, ``_`` or ``.`` (``gcloud``, ``git``),
    or its folder when it lies outside ``root`` (pages linked in from a package's own man folder)."""
    if os.path.dirname(path) != root.rstrip("/"):
        return os.path.dirname(path)
    return re.split(r"[-_.]", os.path.basename(path), maxsplit=1)[0].lower()


def _man_page_ok(path: str) -> bool:
    """A man page with content: readable, not a ``.so`` redirect, not written with ``mdoc`` macros."""
    try:
        if os.path.getsize(path) > MAX_MAN_BYTES:
            return False
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as fh:
            head = fh.read(20_000)
    except (OSError, EOFError, gzip.BadGzipFile):
        return False
    if b"\x00" in head[:4096]:
        return False
    text = head.decode("utf-8", errors="replace")
    return not is_man_redirect(text) and not is_mdoc(text)


def pick_man_pages(
    roots: Sequence[str], section: str | None, limit: int, *, unique_names: bool = False
) -> list[str]:
    """Up to ``limit`` man pages of ``section`` (files ``*.<section>`` or ``*.<section>.gz`` under
    ``roots``), picked by a path hash, as resolved paths.  With ``section=None`` every root is a
    ``man<N>`` folder holding pages of its own section ``N`` (``de/man1/*.1.gz``, ``de/man5/*.5``).

    Symlinks are followed and every page is kept once (aliases such as ``man3/creat.3.gz`` ->
    ``open.2.gz``-style links, or links into ``/etc/alternatives``, count as their target, which
    must be a page of the same section); ``.so`` redirect pages and ``mdoc`` pages are skipped.
    Suffixed sections (``3pm``, ``3perl``, ``1ssl``, ``3type``) are not part of ``section``.  One page
    family (:func:`_man_family`, e.g. ``gcloud`` with thousands of generated pages) fills at most a
    tenth of the pages (at least 3), so a section is not dominated by one package.  With
    ``unique_names``, a page name (``ls.1``) is picked once over all roots (``pt`` and ``pt_BR``
    translations of one page count as one).
    """
    cands: list[tuple[str, str, tuple[str, str]]] = []  # (path, its folder resolved, page suffixes)
    for r in roots:
        if not os.path.isdir(r):
            continue
        sec = section if section is not None else re.sub(r"^man", "", os.path.basename(r.rstrip("/")))
        suffixes = (f".{sec}", f".{sec}.gz")
        for d, names in _walk(r):
            real_d = os.path.realpath(d)
            cands.extend(
                (f"{real_d}/{f}", real_d, suffixes)
                for f in names if f.endswith(suffixes) and not f.startswith(suffixes)
            )
    per_family = max(3, -(-limit // 10))
    families: Counter[str] = Counter()
    seen: set[str] = set()
    names_seen: set[str] = set()
    out: list[str] = []
    for cand, folder, suffixes in sorted(cands, key=lambda c: hash_unit(_PICK_SALT, c[0])):
        if len(out) >= limit:
            break
        real = os.path.realpath(cand) if os.path.islink(cand) else cand
        if real in seen or not os.path.basename(real).endswith(suffixes) or not os.path.isfile(real):
            continue
        seen.add(real)
        name = os.path.basename(real).removesuffix(".gz")
        if unique_names and name in names_seen:
            continue
        fam = _man_family(real, folder)
        if families[fam] >= per_family or not _man_page_ok(real):
            continue
        families[fam] += 1
        names_seen.add(name)
        out.append(real)
    return sorted(out)


def _man_language_folders(root: str) -> dict[str, list[str]]:
    """Language (:data:`MAN_LANGUAGES`) -> its translated man folders under ``root``
    (``de``, ``pt`` + ``pt_BR``; folders with a codeset or modifier such as ``sr@latin`` are left out)."""
    out: dict[str, list[str]] = defaultdict(list)
    try:
        entries = sorted(os.listdir(root))
    except OSError:
        return {}
    for name in entries:
        m = re.fullmatch(r"([a-z]{2,3})(?:_[A-Z]{2})?", name)
        if m and m.group(1) in MAN_LANGUAGES and os.path.isdir(os.path.join(root, name)):
            out[m.group(1)].append(os.path.join(root, name))
    return dict(out)


def discover_man_languages(max_files: int = 300, root: str | None = None) -> dict[str, SourceSet]:
    """Translated man pages per language: ``man_<lang>`` -> up to ``max_files`` pages found under
    ``root`` (default the ``man_languages`` entry of :data:`SOURCE_ROOTS`, ``/usr/share/man``) in
    ``<lang>[_TERRITORY]/man<N>/*.N[.gz]``, picked by :func:`pick_man_pages` (aliases read once,
    ``.so`` redirects and ``mdoc`` pages skipped, one page family at most a tenth, one page name
    once per language).  Only languages in :data:`MAN_LANGUAGES` (Latin script) are looked at.
    Results are memoised per process.
    """
    roots = [root] if root is not None else expand_roots("man_languages")
    key = ("man_languages", max_files, tuple(roots))
    if key not in _DISCOVERY_CACHE:
        found: dict[str, SourceSet] = {}
        for r in roots:
            for lang, folders in sorted(_man_language_folders(r).items()):
                sections = sorted(
                    os.path.join(f, d) for f in folders for d in os.listdir(f)
                    if re.fullmatch(r"man[1-9]", d) and os.path.isdir(os.path.join(f, d))
                )
                kind = f"man_{lang}"
                if kind not in found:
                    files = pick_man_pages(sections, None, max_files, unique_names=True)
                    found[kind] = SourceSet(kind, files, sections)
        _DISCOVERY_CACHE[key] = found
    return {k: SourceSet(v.kind, list(v.files), list(v.searched)) for k, v in _DISCOVERY_CACHE[key].items()}


def discover_sources(max_files: int = 300, kinds: Sequence[str] | None = None) -> dict[str, SourceSet]:
    """Find source files on this machine, at most ``max_files`` per kind.

    Kinds: ``python`` (stdlib ``*.py``, without ``site-packages`` and test folders),
    ``c_header`` (``/usr/include/**/*.h``), ``shell`` (``#!/bin/sh``/``#!/bin/bash`` scripts
    and ``*.sh`` under ``/usr/bin``, ``/usr/sbin``, ``/etc``, ``/usr/share``), ``perl``
    (``*.pm`` under ``/usr/share/perl*``), ``prose`` (``/usr/share/common-licenses/*`` and
    ``README*``/``copyright`` files under ``/usr/share/doc``), ``docstring`` (the same
    Python files as ``python``; their docstrings are read as prose).  ``copyright`` (Debian
    ``/usr/share/doc/<package>/copyright`` files, identical copies kept once, for ``licences``)
    is found only when named in ``kinds``, and so are the man-page kinds ``man1``, ``man2``, ``man3``,
    ``man5``, ``man7``, ``man8`` (pages of that manual section under ``/usr/share/man/man<N>``, for
    ``man_sections``; see :func:`pick_man_pages`).  The folders come from :data:`SOURCE_ROOTS`.  A kind
    with no files is returned with an empty ``files`` list.
    Results are memoised per process.
    """
    kinds = tuple(kinds) if kinds is not None else ("python", "c_header", "shell", "perl", "prose", "docstring")
    key = (max_files, kinds, json.dumps(SOURCE_ROOTS, sort_keys=True), stdlib_dir())
    if key in _DISCOVERY_CACHE:
        return {k: SourceSet(v.kind, list(v.files), list(v.searched)) for k, v in _DISCOVERY_CACHE[key].items()}
    found: dict[str, SourceSet] = {}
    need = set(kinds)
    if "docstring" in need:
        need.add("python")

    if "python" in need:
        roots = expand_roots("python")
        cands = [
            os.path.join(d, f)
            for r in roots if os.path.isdir(r)
            for d, fs in _walk(r, _PRUNE_STDLIB)
            for f in fs if f.endswith(".py")
        ]
        found["python"] = SourceSet("python", _pick_files(cands, max_files), roots)
        found["docstring"] = SourceSet("docstring", list(found["python"].files), roots)

    if "c_header" in need:
        roots = expand_roots("c_header")
        cands = [os.path.join(d, f) for r in roots if os.path.isdir(r) for d, fs in _walk(r) for f in fs
                 if f.endswith(".h")]
        found["c_header"] = SourceSet("c_header", _pick_files(cands, max_files), roots)

    if "perl" in need:
        roots = expand_roots("perl")
        cands = [os.path.join(d, f) for r in roots if os.path.isdir(r) for d, fs in _walk(r) for f in fs
                 if f.endswith(".pm")]
        found["perl"] = SourceSet("perl", _pick_files(cands, max_files), roots)

    if "shell" in need:
        roots = expand_roots("shell")
        cands: list[str] = []
        for r in roots:
            if not os.path.isdir(r):
                continue
            big = r.rstrip("/") == "/usr/share"
            for d, fs in _walk(r, _PRUNE_SHARE if big else frozenset()):
                for f in fs:
                    p = os.path.join(d, f)
                    if f.endswith(".sh"):
                        cands.append(p)
                    elif "." not in f and (not big or os.access(p, os.X_OK)):
                        cands.append(p)
        found["shell"] = SourceSet("shell", _pick_files(cands, max_files, _is_shell_script), roots)

    if "prose" in need:
        roots = expand_roots("prose")
        cands = []
        for r in roots:
            if not os.path.isdir(r):
                continue
            is_doc = os.path.basename(r.rstrip("/")) == "doc"
            for d, fs in _walk(r):
                for f in fs:
                    if f.lower().endswith(_PROSE_SKIP_EXT):
                        continue
                    if not is_doc or f.startswith(("README", "copyright")):
                        cands.append(os.path.join(d, f))
        found["prose"] = SourceSet("prose", _pick_files(cands, max_files), roots)

    if "copyright" in need:
        roots = expand_roots("copyright")
        cands = []
        for r in roots:
            if not os.path.isdir(r):
                continue
            for pkg in sorted(os.listdir(r)):
                p = os.path.join(r, pkg, "copyright")
                if os.path.isfile(p):
                    cands.append(p)
        found["copyright"] = SourceSet("copyright", _pick_files(cands, max_files, copy_key=_content_key), roots)

    for kind in MAN_KINDS:
        if kind in need:
            roots = expand_roots(kind)
            found[kind] = SourceSet(kind, pick_man_pages(roots, kind[3:], max_files), roots)

    result = {k: v for k, v in found.items() if k in kinds}
    _DISCOVERY_CACHE[key] = result
    return {k: SourceSet(v.kind, list(v.files), list(v.searched)) for k, v in result.items()}


def require_source(sources: Mapping[str, SourceSet], kind: str, dataset: str, min_files: int = 1) -> SourceSet:
    """``sources[kind]`` when it has at least ``min_files`` files; else a :class:`DatasetBuildError` for
    ``dataset`` naming the folders searched."""
    ss = sources.get(kind)
    if ss is None or len(ss.files) < min_files:
        searched = ", ".join(ss.searched if ss is not None and ss.searched else expand_roots(kind))
        n = 0 if ss is None else len(ss.files)
        raise DatasetBuildError(
            f"{dataset}: need at least {min_files} {kind} source file(s), found {n}; "
            f"searched: {searched or '(nothing)'}"
        )
    return ss
