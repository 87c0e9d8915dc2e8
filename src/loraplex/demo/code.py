"""Source code as demo data: which lines are code (not comments, POD or docstrings), Python docstrings found by
a small lexer, code snippets and docstring snippets of a file, and the ``code_language`` dataset.
"""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

from loraplex.demo.cache import build_params, cached_build, source_info
from loraplex.demo.sampling import DEFAULT_CLASS_SIZES, Sizes, balanced_rows, dedup_across, snippet_pools, text_half
from loraplex.demo.sources import SourceSet, discover_sources, expand_roots
from loraplex.demo.text import (CLASSIFY_CHUNKS, ChunkParams, DatasetBuildError, Reader, chunk_lines,
                                chunk_sentences, is_english_prose)

#: Languages the ``code_language`` dataset may use (those present with enough files are used).
CODE_LANGUAGES: tuple[str, ...] = ("python", "c", "shell", "perl")
#: Language each code source kind is read as (``c_header`` files are C).
KIND_LANGUAGE: dict[str, str] = {"python": "python", "c_header": "c", "c": "c", "shell": "shell", "perl": "perl"}

_HAS_ALNUM = re.compile(r"[A-Za-z0-9]")
_C_COMMENT = re.compile(r"/\*.*?\*/|//[^\n]*", re.S)


def _keep_newlines(match: re.Match[str]) -> str:
    return "\n" * match.group(0).count("\n")


def code_mask(text: str, language: str, docstring_lines: Iterable[int] = ()) -> list[bool]:
    """Per line of ``text``: is it code (not blank, comment, POD or docstring; has a letter/digit)?

    ``language`` is one of ``python``, ``c``, ``shell``, ``perl``.  ``docstring_lines`` are
    0-based line numbers to treat as documentation (used for Python docstrings).
    """
    if language == "c":
        stripped = _C_COMMENT.sub(_keep_newlines, text)
        lines = stripped.split("\n")
        return [bool(_HAS_ALNUM.search(ln)) for ln in lines]
    lines = text.split("\n")
    mask = []
    in_pod = False
    for ln in lines:
        s = ln.strip()
        if language == "perl":
            if s.startswith("=cut"):
                in_pod = False
                mask.append(False)
                continue
            if re.match(r"^=[a-zA-Z]", ln):
                in_pod = True
            if in_pod:
                mask.append(False)
                continue
        mask.append(bool(s) and not s.startswith("#") and bool(_HAS_ALNUM.search(s)))
    for i in docstring_lines:
        if 0 <= i < len(mask):
            mask[i] = False
    return mask


_PY_LEX = re.compile(
    r"(?P<comment>#[^\n]*)"
    r"|(?P<triple>(?P<tprefix>[rRbBuUfF]{0,2})(?P<q>\"\"\"|\'\'\'))"
    r"|(?P<single>[rRbBuUfF]{0,2}(?:\"(?:\\.|[^\"\\\n])*\"|\'(?:\\.|[^\'\\\n])*\'))"
)


def python_docstrings(text: str) -> tuple[list[int], list[str]]:
    """Docstring-like strings of Python source, found by a small lexer (much faster than ``ast``).

    A triple-quoted string that starts its line (after indentation) and is not a bytes/f-string
    is a docstring or a bare string statement.  Returns (0-based line numbers it covers, its
    cleaned texts).  Comments and one-line strings are skipped so quotes inside them don't count.
    """
    lines: list[int] = []
    docs: list[str] = []
    pos = 0
    n = len(text)
    while pos < n:
        m = _PY_LEX.search(text, pos)
        if m is None:
            break
        if m.group("triple") is None:
            pos = m.end()
            continue
        q = m.group("q")
        close = re.compile(r"(?:\\.|[^\\])*?" + re.escape(q), re.S).match(text, m.end())
        if close is None:  # unterminated: treat the rest as a string
            end = n
        else:
            end = close.end()
        start = m.start()
        line_start = text.rfind("\n", 0, start) + 1
        prefix = m.group("tprefix").lower()
        if not text[line_start:start].strip() and "b" not in prefix and "f" not in prefix:
            first = text.count("\n", 0, start)
            last = first + text.count("\n", start, end)
            lines.extend(range(first, last + 1))
            body = text[m.end(): end - 3 if close is not None else end]
            doc = inspect.cleandoc(body)
            if doc:
                docs.append(doc)
        pos = end
    return lines, docs
# ---------------------------------------------------------------------------------------------
# snippets of one file (kept in the build's reader)
# ---------------------------------------------------------------------------------------------


def python_info(reader: Reader, path: str) -> tuple[list[int], list[str]] | None:
    """(0-based docstring line numbers, docstrings) of a Python file (:func:`python_docstrings`); None if unreadable."""

    def compute() -> tuple[list[int], list[str]] | None:
        src = reader.text(path)
        return None if src is None else python_docstrings(src)

    return reader.memo(("python_docstrings", path), compute)


def code_snippets(reader: Reader, kind: str, path: str, p: ChunkParams) -> list[str]:
    """Code snippets of one file read as source kind ``kind`` (a key of :data:`KIND_LANGUAGE`), in file order:
    runs of lines cut by :func:`chunk_lines`, mostly code lines (:func:`code_mask`)."""
    return reader.memo(("code", kind, path, p), lambda: _code_snippets(reader, kind, path, p))


def _code_snippets(reader: Reader, kind: str, path: str, p: ChunkParams) -> list[str]:
    text = reader.text(path)
    if text is None:
        return []
    language = KIND_LANGUAGE[kind]
    doc_lines: list[int] = []
    if language == "python":
        info = python_info(reader, path)
        if info is None:
            return []
        doc_lines = info[0]

    def lines_and_mask() -> tuple[list[str], list[bool]]:
        clean = text.replace("\r\n", "\n").expandtabs(4)
        return clean.split("\n"), code_mask(clean, language, doc_lines)

    lines, mask = reader.memo(("code_mask", language, path), lines_and_mask)
    return chunk_lines(
        lines, mask, min_lines=p.min_lines, max_lines=p.max_lines, max_chars=p.max_chars, min_chars=p.min_code_chars
    )


def docstring_snippets(reader: Reader, path: str, p: ChunkParams) -> list[str]:
    """English prose snippets of a Python file's docstrings, in file order: sentences grouped by
    :func:`chunk_sentences`; docstring blocks holding doctest examples, indented code or tables are left out."""
    return reader.memo(("docstring", path, p), lambda: _docstring_snippets(reader, path, p))


def _docstring_snippets(reader: Reader, path: str, p: ChunkParams) -> list[str]:
    info = python_info(reader, path)
    if info is None:
        return []
    paras: list[str] = []
    for doc in info[1]:
        for block in re.split(r"\n\s*\n", doc):
            blines = block.splitlines()
            # skip doctest examples, indented code, parameter tables
            if not blines or any(ln.startswith((" ", "\t", ">>>")) for ln in blines):
                continue
            paras.append(" ".join(block.split()))
    return [s for s in chunk_sentences(paras, min_chars=p.min_chars, max_chars=p.max_chars,
                                       max_sentences=p.max_sentences) if is_english_prose(s)]


# ---------------------------------------------------------------------------------------------
# the code_language dataset
# ---------------------------------------------------------------------------------------------

CODE_LANGUAGE_DESCRIPTION = (
    "**code_language** (labels: whichever of `python`, `c`, `shell`, `perl` have at least 20 "
    "files here; Perl modules come from `/usr/share/perl*`): code-only snippets chunked like "
    "`text_kind`, preferring the half of the snippets (by a text hash) that `text_kind` does "
    "not prefer, so the two datasets overlap little. Building fails with a clear error if fewer "
    "than two languages are available. Default 300/50/100 rows per class."
)


def build_code_language(
    cache_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    sizes: Sizes = None,
    *,
    min_files: int = 20,
    max_files: int = 300,
    use_cache: bool = True,
    sources: Mapping[str, SourceSet] | None = None,
    reader: Reader | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """``code_language``: split -> rows ``{text, label, source}``, label a language in
    :data:`CODE_LANGUAGES` that has at least ``min_files`` source files here.

    Raises :class:`DatasetBuildError` when fewer than two languages are available.  Snippets
    come from the same file pools as ``text_kind`` but prefer the other half of the snippets
    (by a text hash), so the two datasets overlap as little as the pools allow.
    """
    sizes = dict(DEFAULT_CLASS_SIZES if sizes is None else sizes)
    params = build_params("code_language", seed, sizes, max_files, {"min_files": min_files}, sources)
    kind_of = {"python": "python", "c": "c_header", "shell": "shell", "perl": "perl"}

    def build() -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
        src = discover_sources(max_files) if sources is None else sources

        def n_files(lang: str) -> int:
            return len(src[kind_of[lang]].files) if kind_of[lang] in src else 0

        present = [lang for lang in CODE_LANGUAGES if n_files(lang) >= min_files]
        if len(present) < 2:
            missing = [lang for lang in CODE_LANGUAGES if lang not in present]
            detail = "; ".join(
                f"{lang}: {n_files(lang)} file(s) in "
                + ", ".join(src[kind_of[lang]].searched if kind_of[lang] in src else expand_roots(kind_of[lang]))
                for lang in missing
            )
            raise DatasetBuildError(
                f"code_language: need at least 2 languages with >= {min_files} files each, "
                f"found {present or 'none'}; missing: {detail}"
            )
        read = reader or Reader()
        pools = dedup_across({
            lang: snippet_pools(
                [(lambda path, k=kind_of[lang]: code_snippets(read, k, path, CLASSIFY_CHUNKS), src[kind_of[lang]])]
            )
            for lang in present
        })
        rows = balanced_rows(pools, sizes, seed, "code_language", "code_language", prefer=lambda sn: text_half(sn) == 1)
        return rows, source_info(src, [kind_of[lang] for lang in present])

    return cached_build("code_language", params, cache_dir, use_cache, build, CODE_LANGUAGE_DESCRIPTION)
