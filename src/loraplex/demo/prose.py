"""English prose as demo data (licence texts, package documentation, docstrings) and the three datasets that
draw on it: ``text_kind`` (code kinds vs prose), ``entities`` (prose with silver entity tags) and ``domains``
(code / prose / shell text for causal-LM domain adapters).
"""

from __future__ import annotations

import os
import random
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from loraplex.demo.cache import build_params, cached_build, source_info
from loraplex.demo.code import code_snippets, docstring_snippets
from loraplex.demo.entities import ENTITY_LABELS, Span, entity_row, tag_entities
from loraplex.demo.sampling import (DEFAULT_CLASS_SIZES, Sizes, Snippet, balanced_rows, dedup_across, rank,
                                    snippet_pools, text_half)
from loraplex.demo.sources import SourceSet, discover_sources, require_source
from loraplex.demo.text import (CLASSIFY_CHUNKS, SPLITS, ChunkParams, DatasetBuildError, Reader, chunk_sentences,
                                is_english_prose, paragraphs_of)

#: Labels of the ``text_kind`` dataset.
TEXT_KIND_LABELS: tuple[str, ...] = ("python", "c_header", "shell", "prose")
#: Labels of the ``domains`` dataset.
DOMAIN_LABELS: tuple[str, ...] = ("code", "prose", "shell")
#: Default rows per split (all rows, not per class) for ``entities``.
DEFAULT_ENTITY_SIZES: dict[str, int] = {"train": 1000, "validation": 150, "test": 300}
#: One to three sentences for entity tagging.
ENTITY_CHUNKS = ChunkParams(min_lines=1, max_lines=1, max_chars=300, min_chars=30, max_sentences=3)
#: A few hundred characters for causal-LM domain text.
DOMAIN_CHUNKS = ChunkParams(
    min_lines=5, max_lines=24, max_chars=700, min_chars=200, max_sentences=10, min_code_chars=150
)

TEXT_KIND_DESCRIPTION = (
    "**text_kind** (labels `python`, `c_header`, `shell`, `prose`): snippets of 3-12 lines and "
    "at most 400 characters cut from Python standard-library modules, C headers under "
    "`/usr/include`, shell scripts (`#!/bin/sh`/`#!/bin/bash` files and `*.sh` under `/usr/bin`, "
    "`/usr/sbin`, `/etc`, `/usr/share`) and English prose (sentences from "
    "`/usr/share/common-licenses`, `README*`/`copyright` files in `/usr/share/doc`, and stdlib "
    "docstrings found by a small Python lexer). Code snippets must be mostly code lines (comments, "
    "licence headers, docstrings and punctuation-only lines do not count); prose snippets must "
    "read as English sentences. Default 300/50/100 rows per class for train/validation/test."
)

ENTITIES_DESCRIPTION = (
    "**entities** (BIO tags over `NUMBER`, `DATE`, `URL`, `EMAIL`, `VERSION`, `PATH`): 1-3 "
    "English sentences (at most 300 characters) from the same prose sources, tagged by precise "
    "regular expressions applied in priority order URL > EMAIL > PATH > DATE > VERSION > "
    "NUMBER (dates must be real calendar dates; versions are `1.2.3`, `v2.0` or the number "
    "after the word \"version\"; paths need two components). Rows carry character spans, "
    "words (word characters or single punctuation marks, cut at span boundaries), word "
    "offsets and BIO tags. About 80% of rows contain an entity, drawn round-robin over labels "
    "so rare labels appear; 20% contain none. Default 1000/150/300 rows. Labels are silver "
    "(regex-made), not human annotations."
)

DOMAINS_DESCRIPTION = (
    "**domains** (labels `code`, `prose`, `shell`) for causal-LM domain adapters and a router: "
    "longer snippets of about 150-700 characters (5-24 lines of code with at least 150 "
    "non-space characters, or 200-700 characters of prose in up to 10 sentences): Python stdlib code, licence/documentation prose and docstrings, and shell "
    "scripts. Default 300/50/100 rows per domain."
)


def prose_snippets(reader: Reader, path: str, p: ChunkParams) -> list[str]:
    """English prose snippets of a documentation file, in file order: the sentences of its paragraphs
    (:func:`paragraphs_of`) grouped by :func:`chunk_sentences`, kept when they read as English
    (:func:`is_english_prose`)."""

    def compute() -> list[str]:
        text = reader.text(path)
        if text is None:
            return []
        return [s for s in chunk_sentences(paragraphs_of(text), min_chars=p.min_chars, max_chars=p.max_chars,
                                           max_sentences=p.max_sentences) if is_english_prose(s)]

    return reader.memo(("prose", path, p), compute)


def _read_as(reader: Reader, parts: Sequence[tuple[str, SourceSet]], p: ChunkParams
             ) -> list[tuple[Callable[[str], list[str]], SourceSet]]:
    """``parts`` (source kind, files) as (snippets of one file, files): ``prose`` and ``docstring`` files are read
    as prose, the other kinds as code of that kind."""
    out: list[tuple[Callable[[str], list[str]], SourceSet]] = []
    for kind, ss in parts:
        if kind == "prose":
            out.append((lambda path: prose_snippets(reader, path, p), ss))
        elif kind == "docstring":
            out.append((lambda path: docstring_snippets(reader, path, p), ss))
        else:
            out.append((lambda path, k=kind: code_snippets(reader, k, path, p), ss))
    return out


def build_text_kind(
    cache_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    sizes: Sizes = None,
    *,
    max_files: int = 300,
    use_cache: bool = True,
    sources: Mapping[str, SourceSet] | None = None,
    reader: Reader | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """``text_kind``: split -> rows ``{text, label, source}``, label in :data:`TEXT_KIND_LABELS`.

    ``sizes`` gives rows *per class* per split (default :data:`~loraplex.demo.sampling.DEFAULT_CLASS_SIZES`).  With
    ``use_cache`` the result is read from / written to ``cache_dir/text_kind``.
    """
    sizes = dict(DEFAULT_CLASS_SIZES if sizes is None else sizes)
    params = build_params("text_kind", seed, sizes, max_files, None, sources)

    def build() -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
        src = discover_sources(max_files) if sources is None else sources
        for kind in ("python", "c_header", "shell"):
            require_source(src, kind, "text_kind")
        if not (src.get("prose") and src["prose"].files) and not (src.get("docstring") and src["docstring"].files):
            require_source(src, "prose", "text_kind")
        read = reader or Reader()
        parts = {
            "python": [("python", src["python"])],
            "c_header": [("c_header", src["c_header"])],
            "shell": [("shell", src["shell"])],
            "prose": [(k, src[k]) for k in ("prose", "docstring") if k in src],
        }
        pools = dedup_across({c: snippet_pools(_read_as(read, parts[c], CLASSIFY_CHUNKS)) for c in TEXT_KIND_LABELS})
        rows = balanced_rows(pools, sizes, seed, "text_kind", "text_kind", prefer=lambda sn: text_half(sn) == 0)
        return rows, source_info(src, ["python", "c_header", "shell", "prose", "docstring"])

    return cached_build("text_kind", params, cache_dir, use_cache, build, TEXT_KIND_DESCRIPTION)


def build_entities(
    cache_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    sizes: Sizes = None,
    *,
    none_fraction: float = 0.2,
    max_files: int = 300,
    use_cache: bool = True,
    sources: Mapping[str, SourceSet] | None = None,
    reader: Reader | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """``entities``: split -> rows ``{text, spans, words, word_offsets, tags, source}``.

    ``sizes`` gives total rows per split (default :data:`DEFAULT_ENTITY_SIZES`); about
    ``none_fraction`` of them have no entity.  Rows with entities are drawn round-robin over
    the labels (a snippet holding the rarest-so-far label first), so rare labels such as DATE
    and VERSION are represented.
    """
    sizes = dict(DEFAULT_ENTITY_SIZES if sizes is None else sizes)
    params = build_params("entities", seed, sizes, max_files, {"none_fraction": none_fraction}, sources)

    def build() -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
        src = discover_sources(max_files) if sources is None else sources
        if not any(k in src and src[k].files for k in ("prose", "docstring")):
            require_source(src, "prose", "entities")
        read = reader or Reader()
        parts = [(k, src[k]) for k in ("prose", "docstring") if k in src]
        pools = dedup_across({"prose": snippet_pools(_read_as(read, parts, ENTITY_CHUNKS))})["prose"]
        out: dict[str, list[dict[str, Any]]] = {}
        for split in SPLITS:
            want = int(sizes.get(split, 0))
            ranked = rank(pools[split], seed, f"entities:{split}")
            with_ent: list[tuple[Snippet, list[Span]]] = []
            without: list[tuple[Snippet, list[Span]]] = []
            for sn in ranked:
                spans = tag_entities(sn.text)
                (with_ent if spans else without).append((sn, spans))
            n_none = min(len(without), round(want * none_fraction))
            n_ent = min(len(with_ent), want - n_none)
            if want > 0 and n_ent == 0:
                raise DatasetBuildError(f"entities: no {split} prose snippets with entities; searched "
                                        + ", ".join(sum((s.searched for _, s in parts), [])))
            chosen = _round_robin_by_label(with_ent, n_ent) + without[:n_none]
            rows = [entity_row(sn.text, sn.source, spans) for sn, spans in chosen]
            random.Random(f"entities:{seed}:{split}").shuffle(rows)
            out[split] = rows
        return out, source_info(src, ["prose", "docstring"])

    return cached_build("entities", params, cache_dir, use_cache, build, ENTITIES_DESCRIPTION)


def _round_robin_by_label(
    rows: Sequence[tuple[Snippet, list[Span]]], n: int
) -> list[tuple[Snippet, list[Span]]]:
    """Pick ``n`` (snippet, spans) pairs in their given order, cycling over labels, least-covered first."""
    by_label: dict[str, list[int]] = defaultdict(list)
    for i, (_, spans) in enumerate(rows):
        for lab in sorted({sp.label for sp in spans}):
            by_label[lab].append(i)
    used: set[int] = set()
    counts: Counter[str] = Counter()
    ptr: dict[str, int] = defaultdict(int)
    picked: list[int] = []
    while len(picked) < n:
        progressed = False
        for lab in sorted(by_label, key=lambda k: (counts[k], ENTITY_LABELS.index(k))):
            lst = by_label[lab]
            while ptr[lab] < len(lst) and lst[ptr[lab]] in used:
                ptr[lab] += 1
            if ptr[lab] >= len(lst):
                continue
            i = lst[ptr[lab]]
            used.add(i)
            picked.append(i)
            for sp in rows[i][1]:
                counts[sp.label] += 1
            progressed = True
            break
        if not progressed:
            break
    return [rows[i] for i in picked]


def build_domains(
    cache_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    sizes: Sizes = None,
    *,
    max_files: int = 300,
    use_cache: bool = True,
    sources: Mapping[str, SourceSet] | None = None,
    reader: Reader | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """``domains``: split -> rows ``{text, label, source}``, label in :data:`DOMAIN_LABELS`.

    Longer snippets (about 200-700 characters) for causal-LM domain adapters and a router:
    ``code`` is Python source, ``prose`` is licence/documentation text and docstrings,
    ``shell`` is shell scripts.  ``sizes`` is rows per domain per split.
    """
    sizes = dict(DEFAULT_CLASS_SIZES if sizes is None else sizes)
    params = build_params("domains", seed, sizes, max_files, None, sources)

    def build() -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
        src = discover_sources(max_files) if sources is None else sources
        require_source(src, "python", "domains")
        require_source(src, "shell", "domains")
        if not any(k in src and src[k].files for k in ("prose", "docstring")):
            require_source(src, "prose", "domains")
        read = reader or Reader()
        parts = {
            "code": [("python", src["python"])],
            "prose": [(k, src[k]) for k in ("prose", "docstring") if k in src],
            "shell": [("shell", src["shell"])],
        }
        pools = dedup_across({d: snippet_pools(_read_as(read, parts[d], DOMAIN_CHUNKS)) for d in DOMAIN_LABELS})
        rows = balanced_rows(pools, sizes, seed, "domains", "domains")
        return rows, source_info(src, ["python", "shell", "prose", "docstring"])

    return cached_build("domains", params, cache_dir, use_cache, build, DOMAINS_DESCRIPTION)

