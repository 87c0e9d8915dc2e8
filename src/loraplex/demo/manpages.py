"""Man pages as demo data: snippets of rendered pages without their section number, snippets of translated
pages without English, and the ``man_sections`` and ``man_languages`` datasets.

Pages are found by :mod:`loraplex.demo.sources` and rendered by :mod:`loraplex.demo.troff`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from loraplex.demo.cache import build_params, cached_build, source_info
from loraplex.demo.sampling import DEFAULT_CLASS_SIZES, Sizes, Snippet, balanced_rows, class_counts, dedup_across
from loraplex.demo.sources import (MAN_KINDS, MAN_LANGUAGES, MAX_MAN_BYTES, SourceSet, discover_man_languages,
                                   discover_sources, expand_roots)
from loraplex.demo.text import SPLITS, ChunkParams, DatasetBuildError, Reader, chunk_lines, read_text, split_for
from loraplex.demo.troff import is_man_redirect, is_mdoc, man_page_sections

#: Labels of the ``man_sections`` dataset and the manual section (folder ``man<N>``) of each.
MAN_SECTIONS: dict[str, str] = {
    "user_commands": "1",
    "system_calls": "2",
    "library": "3",
    "file_formats": "5",
    "overview": "7",
    "admin_commands": "8",
}
#: A ``.SH`` heading containing one of these words gives ``man_sections`` snippets.
MAN_BODY_HEADINGS: tuple[str, ...] = ("SYNOPSIS", "DESCRIPTION", "OPTIONS")
#: Snippets of a page come from about its first this many rendered body lines (long pages such as
#: ``cmake-modules`` would otherwise take most of the build time; few snippets per page are used).
MAN_MAX_BODY_LINES = 600
#: 3-12 consecutive rendered lines of a man page (at least 60 non-space characters) for ``man_sections``.
MAN_CHUNKS = ChunkParams(min_lines=3, max_lines=12, max_chars=400, min_chars=60, min_code_chars=60)
#: A cross-reference to a manual section, ``(1)``, ``(3p)``, ``(1ssl)``, as in ``ls(1)``.
_SECTION_REF = re.compile(r"( ?)\(\s*[1-9](?:[A-Za-z][\w+]*)?\s*\)( ?)")
#: A manual section named in words: "Section 7 of the manual", "man 2 open", "man3/", "man7.org".
_SECTION_WORDS = re.compile(r"\bsections?\s+[1-9][a-z]*\b(?!\.\d)|\bman\s?[1-9][a-z]*\b", re.I)


def scrub_section_refs(text: str) -> str:
    """``text`` without manual-section cross-references: ``ls(1)`` -> ``ls``, ``(3p)`` removed."""

    return _SECTION_REF.sub(r"\2", text)  # the reference and the space before it go


def _is_body_heading(heading: str) -> bool:
    return not set(re.findall(r"[A-Z]+", heading.upper())).isdisjoint(MAN_BODY_HEADINGS)


def man_snippets(source: str, params: ChunkParams | None = None) -> list[str]:
    """``man_sections`` snippets of one man page's troff source, in page order.

    Redirect pages (``.so``) and ``mdoc`` pages give none.  Only the bodies of the sections whose
    heading contains a word of :data:`MAN_BODY_HEADINGS` are used (never ``NAME``, whose line
    names the section, nor the ``.TH`` header/footer), about their first :data:`MAN_MAX_BODY_LINES`
    rendered lines.  Section cross-references are removed (:func:`scrub_section_refs`), the lines
    are cut into runs of 3-12 consecutive non-blank lines of at most 400 characters (``params``,
    default :data:`MAN_CHUNKS`) by :func:`chunk_lines`, and snippets that still name a section
    (:func:`names_man_section`, e.g. "Section 2 of the manual") are dropped.
    """
    p = MAN_CHUNKS if params is None else params
    if is_man_redirect(source) or is_mdoc(source):
        return []
    out: list[str] = []
    for heading, lines in man_page_sections(source, wanted=_is_body_heading, max_lines=MAN_MAX_BODY_LINES):
        if not _is_body_heading(heading):
            continue
        clean = [scrub_section_refs(ln).rstrip() for ln in lines]
        out.extend(
            sn
            for sn in chunk_lines(clean, None, min_lines=p.min_lines, max_lines=p.max_lines,
                                  max_chars=p.max_chars, min_chars=p.min_code_chars)
            if not names_man_section(sn)
        )
    return out


def names_man_section(text: str) -> bool:
    """True when ``text`` names a manual section: a ``(N)`` reference (``ls(1)``, ``(3p)``) or words
    such as "Section 7 of the manual", "man 2 open", "man3/" (N a digit 1-9; "section 3.2" is not)."""
    return _SECTION_REF.search(text) is not None or _SECTION_WORDS.search(text) is not None


#: Letters of the Latin script (Basic Latin, Latin-1, Latin Extended-A/B, Latin Extended Additional).
_LATIN = "A-Za-z\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u024f\u1e00-\u1eff"
#: A whole word of at least three Latin letters.
_LATIN_WORD = re.compile(rf"(?<![^\W\d_])[{_LATIN}]{{3,}}(?![^\W\d_])")
_LETTER = re.compile(r"[^\W\d_]")
_LETTER_WORD = re.compile(r"[^\W\d_]+")
#: Frequent English words that are not words of the languages in :data:`MAN_LANGUAGES`
#: (so not "in", "is", "a", "to", "on", "are", "of": Dutch, Polish, Romanian, ... use them).
_ENGLISH_MARKERS = frozenset(
    "the and with this that which you your from will when should must have has been these those "
    "there their would can".split()
)


def looks_english(text: str) -> bool:
    """True when ``text`` reads as English: at least two words, and 8% of its words, are frequent
    English words (``_ENGLISH_MARKERS``), as in untranslated paragraphs of a translated page."""
    words = [w.lower() for w in _LETTER_WORD.findall(text)]
    hits = sum(1 for w in words if w in _ENGLISH_MARKERS)
    return hits >= 2 and hits >= 0.08 * len(words)


def man_language_snippets(source: str, params: ChunkParams | None = None) -> list[str]:
    """``man_languages`` snippets of one translated man page's troff source, in page order.

    Redirect pages (``.so``) and ``mdoc`` pages give none.  The page is rendered by
    :func:`~loraplex.demo.troff.man_page_sections` (about its first :data:`MAN_MAX_BODY_LINES` body lines, no ``.TH``
    header/footer) and the bodies of every section except the first one (``NAME``, ``BEZEICHNUNG``,
    ``NOM``: whatever its translated heading) are cut by :func:`chunk_lines` into runs of 3-12
    consecutive non-blank lines of at most 400 characters (``params``, default :data:`MAN_CHUNKS`),
    at least half of whose lines contain a letter.  Snippets without a word of at least three
    Latin letters, and snippets that read as English (:func:`looks_english`: untranslated text),
    are dropped.
    """
    p = MAN_CHUNKS if params is None else params
    if is_man_redirect(source) or is_mdoc(source):
        return []
    out: list[str] = []
    seen_heading = False
    for heading, lines in man_page_sections(source, max_lines=MAN_MAX_BODY_LINES):
        if not seen_heading:  # text before the first .SH, then the first .SH section itself
            seen_heading = bool(heading)
            continue
        clean = [ln.rstrip() for ln in lines]
        mask = [_LETTER.search(ln) is not None for ln in clean]
        out.extend(
            sn
            for sn in chunk_lines(clean, mask, min_lines=p.min_lines, max_lines=p.max_lines,
                                  max_chars=p.max_chars, min_chars=p.min_code_chars, min_code_lines=1)
            if _LATIN_WORD.search(sn) and not looks_english(sn)
        )
    return out


# ---------------------------------------------------------------------------------------------
# snippets of one page file (kept in the build's reader)
# ---------------------------------------------------------------------------------------------


def man_page_snippets(reader: Reader, path: str, p: ChunkParams = MAN_CHUNKS) -> list[str]:
    """``man_sections`` snippets of a (possibly gzipped) man page, in page order (see :func:`man_snippets`)."""

    def compute() -> list[str]:
        text = read_text(path, MAX_MAN_BYTES)
        return [] if text is None else man_snippets(text, p)

    return reader.memo(("man", path, p), compute)


def man_language_page_snippets(reader: Reader, path: str, p: ChunkParams = MAN_CHUNKS) -> list[str]:
    """``man_languages`` snippets of a (possibly gzipped) translated man page (see :func:`man_language_snippets`)."""

    def compute() -> list[str]:
        text = read_text(path, MAX_MAN_BYTES)
        return [] if text is None else man_language_snippets(text, p)

    return reader.memo(("man_language", path, p), compute)


# ---------------------------------------------------------------------------------------------
# the man_sections and man_languages datasets
# ---------------------------------------------------------------------------------------------

MAN_SECTIONS_DESCRIPTION = (
    "**man_sections** (labels: manual sections `user_commands` = man1, `system_calls` = man2, "
    "`library` = man3, `file_formats` = man5, `overview` = man7, `admin_commands` = man8, whichever "
    "have at least 40 usable pages here): 3-12 consecutive lines (at most 400 characters, at least "
    "60 non-space characters) of a man page from `/usr/share/man/man<N>`, rendered from troff to "
    "plain text the way `man` prints it, at a basic level: comment lines (`.\\\"`), the `.TH` "
    "header/footer and troff requests (`.ds`, `.nr`, `.if` blocks, macro definitions, tables) are "
    "dropped; `.SH DESCRIPTION` becomes the line `DESCRIPTION`; font macros keep their arguments "
    "(`.B ls` -> `ls`, `.BR a (1)` -> `a(1)`) and so do other man macros unless the arguments are "
    "only numbers; `.PP`/`.TP`/`.IP`/`.sp` break paragraphs (a `.TP` tag gets its own line); font "
    "escapes (`\\fB`, `\\fI`, `\\fR`, `\\fP`, `\\f(CW`) are removed, `\\-` is `-`, `\\(em` is "
    "`—`, `\\e` is `\\`, `\\&` is nothing, a few common `\\(xx` characters (bullets, quotes) are "
    "themselves and other ones a space; filled text is reflowed to 78 columns, `.nf`/`.EX` blocks "
    "keep their lines. Snippets come only from the SYNOPSIS, DESCRIPTION and OPTIONS bodies (about "
    "their first 600 rendered lines per page). **The section number never appears in the text**: "
    "the NAME line (which reads like `ls(1)`) and the header/footer are not used, every "
    "cross-reference loses its section (`ls(1)` -> `ls`; any `(N)` or `(Nxx)` with N a digit 1-9, "
    "such as `(3p)`, is removed) and snippets that still name a section in words (\"Section 7 of "
    "the manual\", \"man 2 open\") are dropped. Only pages named `*.N` or `*.N.gz` count for "
    "section N (Perl modules `*.3pm`/`*.3perl` and other suffixed sections such as `3type` or "
    "`1ssl` are left out, so `library` is C library pages); symlinked aliases are read once, as "
    "their target, and `.so` redirect pages and BSD `mdoc` pages are skipped. Up to 300 pages per "
    "section are picked by a path hash, one page family (the name up to the first `-`/`_`/`.`, "
    "e.g. the thousands of generated `gcloud` pages, or the folder of pages linked in from a "
    "package's own man folder) filling at most a tenth of them. The split is decided by the page "
    "file. Default 300/50/100 rows per section, cut to the smallest section's count if needed (the "
    "manifest's `details` record the sections kept and dropped, the pages and snippets available "
    "and the rows per class); building fails with an error naming the folders searched if fewer "
    "than 3 sections qualify."
)

MAN_LANGUAGES_DESCRIPTION = (
    "**man_languages** (labels: the human language of a translated man page, as a language code: "
    "whichever Latin-script languages (`de`, `fr`, `sv`, `pt`, `nl`, `it`, `pl`, `es`, `da`, `ro`, "
    "`cs`, `hu`, `id`, `tr`, `fi`, `sl`, `hr`, ...) have at least 40 usable pages here; `pt` and "
    "`pt_BR` are both `pt`, and non-Latin scripts such as `ru`, `uk`, `ja`, `ko`, `zh_CN` are left "
    "out): 3-12 consecutive lines (at most 400 characters, at least 60 non-space characters) of a "
    "page from `/usr/share/man/<lang>[_TERRITORY]/man<N>`, rendered from troff to plain text as "
    "for `man_sections` (no `.TH` header/footer; groff composed letters such as `\\(:o`, `\\('e`, "
    "`\\(,c`, `\\(ss` become `ö`, `é`, `ç`, `ß`). Headings are translated (`BESCHREIBUNG`, "
    "`OPTIONEN`), so snippets come from the bodies of every section except the first (`NAME`, "
    "`BEZEICHNUNG`, `NOM`: the page's one-line summary), about the first 600 rendered lines per "
    "page. A snippet is kept when at least half of its lines contain a letter, it has a word of "
    "at least 3 Latin letters and it does not read as English (at least 2 words, and 8% of its "
    "words, among `the`, `and`, `with`, `this`, `that`, `which`, `you`, ...: untranslated "
    "paragraphs). Pages are picked as for `man_sections` (up to 300 per language by a path hash, "
    "symlinked aliases read once, `.so` redirect pages and `mdoc` pages skipped, one page family "
    "at most a tenth of them) and one page name is read once per language (a page translated "
    "both in `pt` and `pt_BR` counts once). The split is decided by the page file. Default "
    "300/50/100 rows per language, cut to the smallest language's count if needed (the "
    "manifest's `details` record the languages kept and dropped, the pages and snippets available "
    "and the rows per class); building fails with an error naming the folders searched if fewer "
    "than 3 languages qualify. `build_all` does not build this dataset; use "
    "`build_dataset(\"man_languages\")`."
)


def _man_label_pools(
    files: Mapping[str, Sequence[str]],
    snippets_of: Callable[[str], list[str]],
    sizes: Mapping[str, int],
    min_files: int,
    min_snippets: int,
) -> tuple[dict[str, dict[str, list[Snippet]]], dict[str, int], dict[str, dict[str, int]], dict[str, str], list[str]]:
    """Snippet pools of man-page datasets: ``files`` label -> pages; returns (pools per label and split, pages
    giving snippets per label, snippets available per label and split, dropped label -> reason, kept labels).

    A page's snippets all go to its split (:func:`split_for`); repeats are kept once, test split first; a label is
    dropped with fewer than ``min_files`` pages giving snippets or fewer than ``min_snippets`` in a requested split.
    """
    raw: dict[str, dict[str, list[Snippet]]] = {label: {s: [] for s in SPLITS} for label in files}
    pages: dict[str, int] = {}
    for label, paths in files.items():
        used = 0
        for path in paths:
            snippets = snippets_of(path)
            used += bool(snippets)
            raw[label][split_for(path)].extend(Snippet(text, path, i) for i, text in enumerate(snippets))
        pages[label] = used
    pools = dedup_across(raw)
    asked = [s for s in SPLITS if int(sizes.get(s, 0)) > 0]
    avail = {label: {s: len(pools[label][s]) for s in SPLITS} for label in files}
    dropped: dict[str, str] = {}
    for label in files:
        if pages[label] < min_files:
            dropped[label] = f"{pages[label]} page(s) < {min_files}"
        elif any(avail[label][s] < min_snippets for s in asked):
            short = [f"{s} {avail[label][s]}" for s in asked if avail[label][s] < min_snippets]
            dropped[label] = f"snippets {', '.join(short)} < {min_snippets}"
    return pools, pages, avail, dropped, [label for label in files if label not in dropped]


def build_man_sections(
    cache_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    sizes: Sizes = None,
    *,
    min_files: int = 40,
    min_snippets: int = 2,
    max_files: int = 300,
    use_cache: bool = True,
    sources: Mapping[str, SourceSet] | None = None,
    reader: Reader | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """``man_sections``: split -> rows ``{text, label, source}``, label the manual section of the
    man page the text comes from (:data:`MAN_SECTIONS`: ``user_commands`` = man1, ``system_calls``
    = man2, ``library`` = man3, ``file_formats`` = man5, ``overview`` = man7, ``admin_commands`` =
    man8), text 3-12 consecutive lines (at most 400 characters) of the page rendered to plain text.

    Pages come from ``/usr/share/man/man<N>`` (the ``man<N>`` entries of ``sources`` when given, else
    :func:`~loraplex.demo.sources.discover_sources` with ``max_files`` pages per section; see
    :func:`~loraplex.demo.sources.pick_man_pages`), and snippets from their SYNOPSIS / DESCRIPTION /
    OPTIONS bodies (:func:`man_snippets`), so the section number never appears in the text: the NAME
    line, the ``.TH`` header/footer and every ``name(N)`` / ``(N)`` cross-reference are left out.
    ``source`` is the page, which decides the split.  Repeats are kept once, test split first.  A
    section is used when at least ``min_files`` of its pages give snippets and it has at least
    ``min_snippets`` distinct snippets in every requested split.  ``sizes`` is rows per section per
    split (default :data:`~loraplex.demo.sampling.DEFAULT_CLASS_SIZES`), shrunk to the smallest
    section's count when needed; the manifest's ``details`` record what was kept, asked for and
    available.  Raises :class:`DatasetBuildError` when fewer than three
    sections qualify, naming the folders searched.
    """
    sizes = dict(DEFAULT_CLASS_SIZES if sizes is None else sizes)
    given = {k: sources[k] for k in MAN_KINDS if k in sources} if sources is not None else {}
    params = build_params(
        "man_sections", seed, sizes, max_files, {"min_files": min_files, "min_snippets": min_snippets},
        given or None,
    )

    def build() -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
        src = given or discover_sources(max_files, kinds=MAN_KINDS)
        read = reader or Reader()
        files = {label: (src[f"man{num}"].files if f"man{num}" in src else []) for label, num in MAN_SECTIONS.items()}
        pools, pages, avail, dropped, kept = _man_label_pools(
            files, lambda path: man_page_snippets(read, path, MAN_CHUNKS), sizes, min_files, min_snippets)
        searched = [d for k in MAN_KINDS for d in (src[k].searched if k in src else expand_roots(k))]
        if len(kept) < 3:
            detail = "; ".join(f"{label} (man{num}): {dropped[label]}" for label, num in MAN_SECTIONS.items()
                               if label in dropped)
            raise DatasetBuildError(
                f"man_sections: need at least 3 manual sections with >= {min_files} man pages giving "
                f"snippets and >= {min_snippets} distinct snippets in each split, found {kept or 'none'}; "
                f"{detail}; searched: {', '.join(searched) or '(nothing)'}"
            )
        rows = balanced_rows({label: pools[label] for label in kept}, sizes, seed, "man_sections", "man_sections")
        info = source_info(src, list(MAN_KINDS))
        info["details"] = {
            "sections": kept,
            "section_numbers": {label: MAN_SECTIONS[label] for label in kept},
            **class_counts(rows, kept, sizes),
            "section_pages": pages,
            "section_snippets": avail,
            "dropped_sections": dropped,
        }
        return rows, info

    return cached_build("man_sections", params, cache_dir, use_cache, build, MAN_SECTIONS_DESCRIPTION)


def build_man_languages(
    cache_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    sizes: Sizes = None,
    *,
    min_files: int = 40,
    min_snippets: int = 2,
    max_files: int = 300,
    use_cache: bool = True,
    sources: Mapping[str, SourceSet] | None = None,
    reader: Reader | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """``man_languages``: split -> rows ``{text, label, source}``, label the human language (a code
    of :data:`MAN_LANGUAGES`: ``de``, ``fr``, ``sv``, ``pt``, ...) of a translated man page, text
    3-12 consecutive lines (at most 400 characters) of the page rendered to plain text.

    Pages come from ``/usr/share/man/<lang>[_TERRITORY]/man<N>`` (the ``man_<lang>`` entries of
    ``sources`` when given, else :func:`discover_man_languages` with ``max_files`` pages per
    language), snippets from the bodies of every section but the first (:func:`man_language_snippets`).
    ``source`` is the page, which decides the split.  Repeats are kept once, test split first.  A
    language is used when at least ``min_files`` of its pages give snippets and it has at least
    ``min_snippets`` distinct snippets in every requested split.  ``sizes`` is rows per language per
    split (default :data:`~loraplex.demo.sampling.DEFAULT_CLASS_SIZES`), shrunk to the smallest language's count when
    needed; the manifest's ``details`` record what was kept, asked for and available.  Raises
    :class:`DatasetBuildError` when fewer than three languages qualify, naming the folders searched.
    """
    sizes = dict(DEFAULT_CLASS_SIZES if sizes is None else sizes)
    prefix = "man_"
    given = (
        {k: sources[k] for k in sources if k.startswith(prefix) and k[len(prefix):] in MAN_LANGUAGES}
        if sources is not None else {}
    )
    params = build_params(
        "man_languages", seed, sizes, max_files, {"min_files": min_files, "min_snippets": min_snippets},
        given or None,
    )

    def build() -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
        src = given or discover_man_languages(max_files)
        langs = sorted(k[len(prefix):] for k in src)
        read = reader or Reader()
        pools, pages, avail, dropped, kept = _man_label_pools(
            {lang: src[prefix + lang].files for lang in langs},
            lambda path: man_language_page_snippets(read, path, MAN_CHUNKS), sizes, min_files, min_snippets)
        if len(kept) < 3:
            searched = [d for k in sorted(src) for d in src[k].searched] or expand_roots("man_languages")
            detail = "; ".join(f"{lang}: {dropped[lang]}" for lang in langs if lang in dropped)
            raise DatasetBuildError(
                f"man_languages: need at least 3 languages with >= {min_files} translated man pages giving "
                f"snippets and >= {min_snippets} distinct snippets in each split, found {kept or 'none'}; "
                f"{detail or 'no translated man pages in a Latin-script language'}; "
                f"searched: {', '.join(searched) or '(nothing)'}"
            )
        rows = balanced_rows({lang: pools[lang] for lang in kept}, sizes, seed, "man_languages", "man_languages")
        info = source_info(src, sorted(src))
        info["details"] = {
            "languages": kept,
            **class_counts(rows, kept, sizes),
            "language_pages": pages,
            "language_snippets": avail,
            "dropped_languages": dropped,
        }
        return rows, info

    return cached_build("man_languages", params, cache_dir, use_cache, build, MAN_LANGUAGES_DESCRIPTION)
