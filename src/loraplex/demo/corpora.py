"""Small, real labelled datasets built at run time from text that ships with the machine's software.

Nothing is downloaded and no third-party text is stored in this repository: every dataset is
rebuilt from files already on the machine (the Python standard library, C headers under
``/usr/include``, shell scripts, Perl modules, licence texts, package documentation and man pages) and
cached as JSONL + CSV under ``~/.cache/loraplex/data`` (or ``$LORAPLEX_CACHE/data``).

Seven datasets are provided (see :func:`describe_datasets` for the exact recipe of each):

* ``text_kind``      -- classify a snippet as ``python`` / ``c_header`` / ``shell`` / ``prose``.
* ``code_language``  -- classify a code snippet by language (whichever of python / c / shell /
  perl the machine has enough files for).
* ``entities``       -- English prose with silver BIO entity tags from precise regexes
  (NUMBER, DATE, URL, EMAIL, VERSION, PATH).
* ``domains``        -- causal-LM domain text (code / prose / shell) for domain adapters and a router.
* ``licences``       -- classify a licence-text snippet by licence family (gpl / lgpl / bsd / mit /
  ...), from Debian machine-readable copyright files, with the family names removed from the text.
* ``man_sections``   -- classify man-page text (rendered from troff under ``/usr/share/man``) by its
  manual section (user commands, system calls, library, file formats, overview, admin commands),
  with the section number removed from the text.
* ``man_languages``  -- classify a snippet of a translated man page (``/usr/share/man/<lang>``) by
  its (Latin-script) human language: German, French, Swedish, Portuguese, ...

Train / validation / test are always drawn from *disjoint source files*: a hash of the file path
decides the split of every snippet taken from that file, and every row records its ``source``.

The module is layered: pure helpers (chunking, filtering, regex tagging, BIO tagging,
hash splitting) come first, then file reading, then source discovery (filesystem scanning),
then the dataset builders and the cache.
"""

from __future__ import annotations

import inspect
import csv
import datetime as _dt
import gzip
import hashlib
import io
import json
import os
import random
import re
import sys
import sysconfig
import time
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraplex.errors import LoraplexError
from loraplex.tokens import tokenize_words

__all__ = [
    "CODE_LANGUAGES",
    "DATASET_NAMES",
    "DEFAULT_CLASS_SIZES",
    "DEFAULT_ENTITY_SIZES",
    "DEFAULT_LICENCE_SIZES",
    "DOMAIN_LABELS",
    "ENTITY_LABELS",
    "ENTITY_PATTERNS",
    "LICENCE_FAMILIES",
    "LICENCE_ID_RULES",
    "LICENCE_NAME_TOKENS",
    "MAN_BODY_HEADINGS",
    "MAN_KINDS",
    "MAN_LANGUAGES",
    "MAN_SECTIONS",
    "SPLITS",
    "TEXT_KIND_LABELS",
    "DatasetBuildError",
    "SourceSet",
    "Span",
    "bio_labels",
    "bio_tags",
    "build_all",
    "build_code_language",
    "build_dataset",
    "build_domains",
    "build_entities",
    "build_licences",
    "build_man_languages",
    "build_man_sections",
    "build_text_kind",
    "chunk_lines",
    "chunk_sentences",
    "code_mask",
    "default_cache_dir",
    "describe_datasets",
    "discover_man_languages",
    "discover_sources",
    "entity_row",
    "is_english_prose",
    "looks_english",
    "licence_family",
    "licence_snippets",
    "man_escapes",
    "man_language_snippets",
    "man_page_sections",
    "man_snippets",
    "names_licence_family",
    "names_man_section",
    "normalize_key",
    "parse_date",
    "parse_dep5",
    "python_docstrings",
    "scrub_section_refs",
    "split_for",
    "tag_entities",
    "troff_to_text",
]

# ---------------------------------------------------------------------------------------------
# constants
# ---------------------------------------------------------------------------------------------

#: Split names, in the order they are written.
SPLITS: tuple[str, ...] = ("train", "validation", "test")
#: Fraction of *source files* that go to each split (decided by a hash of the path).
SPLIT_FRACTIONS: tuple[tuple[str, float], ...] = (("train", 0.7), ("validation", 0.1), ("test", 0.2))

#: Labels of the ``text_kind`` dataset.
TEXT_KIND_LABELS: tuple[str, ...] = ("python", "c_header", "shell", "prose")
#: Languages the ``code_language`` dataset may use (those present with enough files are used).
CODE_LANGUAGES: tuple[str, ...] = ("python", "c", "shell", "perl")
#: Labels of the ``domains`` dataset.
DOMAIN_LABELS: tuple[str, ...] = ("code", "prose", "shell")
#: Entity types of the ``entities`` dataset, in tagging priority order (earlier wins overlaps).
ENTITY_LABELS: tuple[str, ...] = ("URL", "EMAIL", "PATH", "DATE", "VERSION", "NUMBER")
#: Dataset names accepted by :func:`build_dataset`.
DATASET_NAMES: tuple[str, ...] = (
    "text_kind", "code_language", "entities", "domains", "licences", "man_sections", "man_languages"
)
#: Latin-script languages the ``man_languages`` dataset may use: the language part of a translated
#: man-page folder (``/usr/share/man/<lang>[_TERRITORY]``; ``pt`` and ``pt_BR`` both count as ``pt``).
MAN_LANGUAGES: tuple[str, ...] = (
    "af", "ca", "cs", "cy", "da", "de", "eo", "es", "et", "eu", "fi", "fr", "ga", "gl", "hr", "hu", "id",
    "is", "it", "lt", "lv", "ms", "nb", "nl", "nn", "no", "pl", "pt", "ro", "sk", "sl", "sq", "sv", "tr",
    "vi",
)

#: Default rows *per class* per split for the classification datasets.
DEFAULT_CLASS_SIZES: dict[str, int] = {"train": 300, "validation": 50, "test": 100}
#: Default rows per split (all rows, not per class) for ``entities``.
DEFAULT_ENTITY_SIZES: dict[str, int] = {"train": 1000, "validation": 150, "test": 300}

#: Bump when the recipe changes so that stale caches are rebuilt.
FORMAT_VERSION = 1

_SPLIT_SALT = "loraplex-split-v1"
_PICK_SALT = "loraplex-pick-v1"
_MAX_FILE_BYTES = 200_000
#: Debian copyright files can be large (one for Boost is about 2 MB); they are still read whole.
_MAX_COPYRIGHT_BYTES = 8_000_000
#: Man pages are read up to this many (uncompressed) bytes; larger pages (gcc, perl) are skipped.
_MAX_MAN_BYTES = 1_000_000


class DatasetBuildError(LoraplexError, ValueError):
    """A dataset cannot be built: a source kind is missing or too small on this machine."""


# ---------------------------------------------------------------------------------------------
# pure helpers: hashing, splitting, keys
# ---------------------------------------------------------------------------------------------


def _hash_unit(*parts: object) -> float:
    """Deterministic number in [0, 1) from ``parts`` (stable across runs and machines)."""
    h = hashlib.blake2b("\x1f".join(map(str, parts)).encode("utf-8", "surrogatepass"), digest_size=8)
    return int.from_bytes(h.digest(), "big") / 2**64


def split_for(path: str, fractions: Sequence[tuple[str, float]] = SPLIT_FRACTIONS) -> str:
    """Split name (``train``/``validation``/``test``) of a source file, from a hash of its path."""
    u = _hash_unit(_SPLIT_SALT, path)
    acc = 0.0
    for name, frac in fractions:
        acc += frac
        if u < acc:
            return name
    return fractions[-1][0]


def normalize_key(text: str) -> str:
    """Deduplication key of a snippet: lower case, whitespace collapsed."""
    return " ".join(text.lower().split())


# ---------------------------------------------------------------------------------------------
# pure helpers: chunking and filtering
# ---------------------------------------------------------------------------------------------

_PUNCT_ONLY = re.compile(r"^[\W_]*$")
_NOT_LETTER = re.compile(r"[\W\d_]+")


def chunk_lines(
    lines: Sequence[str],
    mask: Sequence[bool] | None = None,
    *,
    min_lines: int = 3,
    max_lines: int = 12,
    max_chars: int = 400,
    min_chars: int = 0,
    min_code_lines: int = 2,
    min_code_fraction: float = 0.5,
) -> list[str]:
    """Cut source lines into snippets of ``min_lines..max_lines`` non-blank lines and
    ``min_chars..max_chars`` characters (``min_chars`` counts non-space characters).

    ``mask[i]`` says whether line ``i`` is *code* (not a comment/docstring, has a letter or digit).
    A snippet is kept only if it has at least ``min_code_lines`` code lines making up at least
    ``min_code_fraction`` of its non-blank lines, so pure licence headers, comment blocks and
    lines of punctuation are skipped.  Snippets break early at a blank line once they are long
    enough, so they tend to follow the code's own paragraphs.  Lines longer than ``max_chars``
    end the current snippet and are dropped.
    """
    if mask is None:
        mask = [bool(ln.strip()) and not _PUNCT_ONLY.match(ln.strip()) for ln in lines]
    out: list[str] = []
    cur: list[int] = []
    size = 0
    nonblank = 0

    def flush() -> None:
        nonlocal cur, size, nonblank
        while cur and not lines[cur[-1]].strip():
            cur.pop()
        code = sum(1 for i in cur if mask[i])
        if nonblank >= min_lines and code >= min_code_lines and code >= min_code_fraction * nonblank:
            text = "\n".join(lines[i].rstrip() for i in cur)
            if sum(map(len, text.split())) >= min_chars:
                out.append(text)
        cur, size, nonblank = [], 0, 0

    for i, raw in enumerate(lines):
        line = raw.rstrip()
        if len(line) > max_chars:
            flush()
            continue
        if not line.strip():
            if not cur:
                continue
            if nonblank >= min_lines:
                flush()
                continue
            cur.append(i)
            size += 1
            continue
        if cur and (nonblank >= max_lines or size + len(line) + 1 > max_chars):
            flush()
        cur.append(i)
        size += len(line) + 1
        nonblank += 1
    flush()
    return out


_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\"'])")
_ENGLISH_WORDS = frozenset(
    "the and of to a is in for with this that or be by are it as on not you may any".split()
)


def split_sentences(paragraph: str) -> list[str]:
    """Split a reflowed paragraph into sentences (``. ! ?`` followed by space and a capital)."""
    return [s.strip() for s in _SENT_SPLIT.split(paragraph) if s.strip()]


def chunk_sentences(
    paragraphs: Iterable[str],
    *,
    min_chars: int = 60,
    max_chars: int = 400,
    max_sentences: int = 6,
) -> list[str]:
    """Group the sentences of each paragraph into snippets of ``min_chars..max_chars`` characters.

    Paragraphs are reflowed (whitespace collapsed) first.  A single sentence longer than
    ``max_chars`` is dropped rather than cut, so entity mentions are never truncated.
    Snippets never cross paragraph boundaries.
    """
    out: list[str] = []
    for para in paragraphs:
        para = " ".join(para.split())
        if not para:
            continue
        cur: list[str] = []
        size = 0
        for sent in split_sentences(para):
            if len(sent) > max_chars:
                if size >= min_chars:
                    out.append(" ".join(cur))
                cur, size = [], 0
                continue
            if cur and (size + 1 + len(sent) > max_chars or len(cur) >= max_sentences):
                if size >= min_chars:
                    out.append(" ".join(cur))
                cur, size = [], 0
            cur.append(sent)
            size += len(sent) + (1 if size else 0)
        if cur and size >= min_chars:
            out.append(" ".join(cur))
    return out


def paragraphs_of(text: str) -> list[str]:
    """Paragraphs of a prose document: blocks separated by blank lines, decoration lines removed."""
    paras: list[str] = []
    cur: list[str] = []
    for line in text.splitlines():
        s = line.strip()
        if not s or _PUNCT_ONLY.match(s):
            if cur:
                paras.append(" ".join(cur))
                cur = []
            continue
        cur.append(s)
    if cur:
        paras.append(" ".join(cur))
    return paras


def is_english_prose(text: str) -> bool:
    """True when ``text`` reads like English sentences rather than code, tables or markup.

    URLs, e-mail addresses and paths are ignored when measuring the share of letters, so
    sentences that mention them still count as prose.
    """
    if ">>>" in text or "{" in text or "}" in text or "\t" in text or "  " in text.strip():
        return False
    stripped = text
    if "/" in stripped or "www." in stripped:
        stripped = _PATH_RE.sub(" ", _URL_RE.sub(" ", stripped))
    if "@" in stripped:
        stripped = _EMAIL_RE.sub(" ", stripped)
    nonspace = sum(map(len, stripped.split()))
    if nonspace < 30:
        return False
    if len(_NOT_LETTER.sub("", stripped)) / nonspace < 0.75:
        return False
    words = re.findall(r"[A-Za-z]+", stripped.lower())
    if len(words) < 6:
        return False
    common = sum(w in _ENGLISH_WORDS for w in words)
    return common >= 2 and common / len(words) >= 0.08


# ---------------------------------------------------------------------------------------------
# pure helpers: code masks (which lines are code, not comments/docstrings)
# ---------------------------------------------------------------------------------------------

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
# pure helpers: entity regexes, tagging, words and BIO tags
# ---------------------------------------------------------------------------------------------

_MONTHS_FULL = "January|February|March|April|May|June|July|August|September|October|November|December"
_MONTHS_ANY = (
    r"Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?|"
    r"Sep(?:tember)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?"
)
_DAY = r"(?:3[01]|[12]\d|0?[1-9])"
_YEAR = r"(?:1[89]|20)\d{2}"
_URL_CH = r"[^\s<>\"'`()\[\]{}]"
_URL_END = r"[^\s<>\"'`()\[\]{}.,;:!?]"
_SEG = r"[A-Za-z0-9_.+-]*[A-Za-z0-9_+-]"

#: The regular expression behind each entity label (applied in :data:`ENTITY_LABELS` order).
ENTITY_PATTERNS: dict[str, str] = {
    # scheme:// or www. then a host character; never ends on sentence punctuation.
    "URL": rf"(?<![\w@.])(?:(?:https?|ftp)://|www\.)[A-Za-z0-9](?:{_URL_CH}*{_URL_END})?",
    "EMAIL": (
        r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@"
        r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,}(?![\w-])"
    ),
    # absolute path with >= 2 components, or ~/something; starts the text or follows a space or
    # opening punctuation (so and/or, libstdc++/4.x and URL tails are not paths).
    "PATH": rf"(?<![^\s(\[<\"'`=,;])(?:~(?:/{_SEG})+|(?:/{_SEG}){{2,}})/?(?![\w/])",
    "DATE": (
        rf"\b{_YEAR}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12]\d|3[01])\b"
        rf"|\b(?:{_MONTHS_ANY})\.? {_DAY}(?:st|nd|rd|th)?, {_YEAR}\b"
        rf"|\b{_DAY} (?:{_MONTHS_ANY}) {_YEAR}\b"
        rf"|\b(?:{_MONTHS_FULL}) {_YEAR}\b"
    ),
    # v2.0 / 1.2.3 (exactly three numeric parts: 1.2.3.4 is rejected, it may be an address),
    # optional pre-release suffix; or X.Y right after the word "version".
    "VERSION": (
        r"(?<![\w.])(?:[vV]\d+(?:\.\d+)+|\d+\.\d+\.\d+)(?:[-.]?(?:rc|alpha|beta|dev|post|a|b)\d+)?"
        r"(?![.\w]*\w)"
        r"|(?<=[Vv]ersion )\d+\.\d+(?![.\w]*\w)"
    ),
    # integers/decimals, optional thousands separators; not inside words, versions or names (GPL-2).
    "NUMBER": (
        r"(?<![\w.,/])(?<![A-Za-z]-)(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\w]|[.,]\d)"
    ),
}

_COMPILED = {label: re.compile(p) for label, p in ENTITY_PATTERNS.items()}
_URL_RE = _COMPILED["URL"]
_EMAIL_RE = _COMPILED["EMAIL"]
_PATH_RE = _COMPILED["PATH"]

_DATE_FORMATS = ("%Y-%m-%d", "%B %d %Y", "%b %d %Y", "%d %B %Y", "%d %b %Y", "%B %Y")


def parse_date(text: str) -> _dt.date | None:
    """Parse a DATE mention (``2024-01-31``, ``January 5, 2020``, ``5 Jan 2020``, ``June 1991``)."""
    s = re.sub(r"(\d)(st|nd|rd|th)\b", r"\1", text).replace(",", "").replace(".", "")
    s = re.sub(r"\bSept\b", "Sep", s)
    for fmt in _DATE_FORMATS:
        try:
            return _dt.datetime.strptime(s, fmt).date()
        except ValueError:
            continue
    return None


@dataclass(frozen=True)
class Span:
    """A labelled character range ``text[start:end]``."""

    start: int
    end: int
    label: str

    def as_dict(self) -> dict[str, Any]:
        """JSON form ``{"start", "end", "label"}``."""
        return {"start": self.start, "end": self.end, "label": self.label}


def tag_entities(text: str) -> list[Span]:
    """Silver entity spans of ``text``, non-overlapping, sorted by start.

    Labels are matched in :data:`ENTITY_LABELS` priority order (URL before EMAIL before PATH
    before DATE before VERSION before NUMBER); a later match overlapping an accepted one is
    dropped.  DATE matches that are not real calendar dates (``February 31, 2020``) are dropped.
    """
    taken: list[Span] = []
    for label in ENTITY_LABELS:
        for m in _COMPILED[label].finditer(text):
            s, e = m.span()
            if e <= s:
                continue
            if label == "DATE" and parse_date(m.group(0)) is None:
                continue
            if any(s < t.end and t.start < e for t in taken):
                continue
            taken.append(Span(s, e, label))
    return sorted(taken, key=lambda sp: sp.start)


def bio_tags(word_offsets: Sequence[Sequence[int]], spans: Sequence[Span]) -> list[str]:
    """BIO tag per word: ``B-LABEL`` for a span's first word, ``I-LABEL`` inside it, else ``O``."""
    tags = ["O"] * len(word_offsets)
    for sp in spans:
        first = True
        for i, (s, e) in enumerate(word_offsets):
            if s >= sp.start and e <= sp.end:
                tags[i] = ("B-" if first else "I-") + sp.label
                first = False
    return tags


def bio_labels() -> list[str]:
    """All BIO tags: ``O`` then ``B-X``, ``I-X`` for every label in :data:`ENTITY_LABELS`."""
    out = ["O"]
    for label in ENTITY_LABELS:
        out += [f"B-{label}", f"I-{label}"]
    return out


def entity_row(text: str, source: str, spans: Sequence[Span] | None = None) -> dict[str, Any]:
    """A full ``entities`` row for ``text``: spans (tagged here unless given), words, offsets, BIO tags."""
    spans = tag_entities(text) if spans is None else list(spans)
    words, offsets = tokenize_words(text, spans)
    return {
        "text": text,
        "spans": [sp.as_dict() for sp in spans],
        "words": words,
        "word_offsets": offsets,
        "tags": bio_tags(offsets, spans),
        "source": source,
    }


# ---------------------------------------------------------------------------------------------
# pure helpers: Debian machine-readable copyright files (DEP-5) and licence families
# ---------------------------------------------------------------------------------------------

#: Licence families of the ``licences`` dataset (those with enough files and snippets are used).
LICENCE_FAMILIES: tuple[str, ...] = (
    "gpl", "lgpl", "agpl", "bsd", "mit", "apache", "boost", "public-domain", "zlib", "isc", "cc0", "mpl",
    "artistic",
)

_VERSION_SUFFIX = r"(?:[-_ ]?v?\d+(?:\.\d+)*)?(?:\+|-or-later|-only)?"

#: Family of a DEP-5 short licence id: the first rule whose pattern *fully* matches the id
#: (case-insensitive, whitespace collapsed) wins.  Ids outside these rules have no family.
LICENCE_ID_RULES: tuple[tuple[str, str], ...] = (
    ("gpl", rf"GPL{_VERSION_SUFFIX}"),  # GPL, GPL-2, GPL-2+, GPLv3+, GPL-2.0-or-later
    ("lgpl", rf"LGPL{_VERSION_SUFFIX}"),  # LGPL-2.1+, LGPLv3+
    ("agpl", rf"AGPL{_VERSION_SUFFIX}"),
    ("bsd", r"BSD(?:-[1-4]-clause)?"),  # BSD-2-clause, BSD-3-Clause, BSD-4-clause (not BSD-3-clause-foo)
    ("mit", r"MIT|Expat|X11"),
    ("apache", rf"Apache{_VERSION_SUFFIX}"),  # Apache-2.0, Apache-2 (not APACHE-2-LLVM-EXCEPTIONS)
    ("boost", r"BSL(?:-1\.0)?|Boost(?:-1\.0)?"),
    ("public-domain", r"public[-_ ]?domain|PD"),
    ("zlib", r"zlib"),
    ("isc", r"ISC"),
    ("cc0", r"CC0(?:-1\.0)?"),
    ("mpl", rf"MPL{_VERSION_SUFFIX}"),
    ("artistic", rf"Artistic{_VERSION_SUFFIX}"),
)
_LICENCE_ID_COMPILED = tuple((fam, re.compile(pat, re.I)) for fam, pat in LICENCE_ID_RULES)
#: Compound ids ("A or B", "A and B", "A with X exception", "A | B", "A, B") have no single family.
_COMPOUND_ID = re.compile(r"[\s_](?:or|and|with)[\s_]|[|&,;]|exception", re.I)

#: Words that name a licence family (or one of its short ids).  A sentence containing any of them,
#: for *any* family, is left out of the snippets, so the label is never spelled out in the text.
LICENCE_NAME_TOKENS: dict[str, tuple[str, ...]] = {
    "gpl": (r"GPL", r"General\s+Public"),  # GPL also catches LGPL, AGPL, GPLv2
    "lgpl": (r"Lesser", r"Library\s+General"),
    "agpl": (r"Affero",),
    "bsd": (r"BSD", r"Berkeley\s+Software\s+Distribution"),  # BSD also catches FreeBSD, 4.4BSD
    "mit": (r"\bMIT\b", r"Massachusetts\s+Institute", r"\bExpat\b", r"\bX11\b"),
    "apache": (r"Apache",),
    "boost": (r"Boost", r"\bBSL\b"),
    "public-domain": (r"public[\s_-]+domain", r"\bPD\b"),
    "zlib": (r"\bzlib\b",),
    "isc": (r"\bISC\b", r"Internet\s+(?:Systems|Software)\s+Consortium"),
    "cc0": (r"\bCC0\b", r"Creative\s+Commons"),
    "mpl": (r"\bMPL\b", r"Mozilla\s+Public"),
    "artistic": (r"Artistic",),
}
_LICENCE_NAME_RE = re.compile("|".join(p for pats in LICENCE_NAME_TOKENS.values() for p in pats), re.I)


def licence_family(license_id: str) -> str | None:
    """Licence family of a DEP-5 short licence id (see :data:`LICENCE_ID_RULES`), or None.

    Compound ids such as ``GPL-2+ or Artistic``, ``BSL-1.0 and MIT`` or
    ``GPL-2+ with Autoconf exception`` and ids outside the rules return None.
    """
    lid = " ".join(license_id.split())
    if not lid or _COMPOUND_ID.search(lid):
        return None
    for fam, pat in _LICENCE_ID_COMPILED:
        if pat.fullmatch(lid):
            return fam
    return None


def names_licence_family(text: str) -> bool:
    """True when ``text`` contains a licence family name token (:data:`LICENCE_NAME_TOKENS`)."""
    return _LICENCE_NAME_RE.search(text) is not None


#: Comment decoration that licence bodies copied from source headers keep at line starts.
_COMMENT_LEAD = re.compile(r"^\s*(?:#+|\*+(?!\))|//+|;+|--|dnl\b|rem\b|%+)[ \t]?", re.I)
#: Copyright notices ("Copyright (c) 2001 Someone"): not licence text.
_COPYRIGHT_NOTICE = re.compile(r"\bcopyright\s*(?:\(c\)|©|\d{4})|\(c\)\s*\d{4}", re.I)


def _licence_sentence_ok(sentence: str) -> bool:
    return not names_licence_family(sentence) and not _COPYRIGHT_NOTICE.search(sentence)


_DEP5_FIELD = re.compile(r"([!-9;-~][!-9;-~]*):(.*)$")


def parse_dep5(text: str) -> list[tuple[str, str]]:
    """``(licence id, licence body)`` for every ``License:`` field of a DEP-5 copyright file.

    Returns an empty list unless the first paragraph has a ``Format:`` (or the older
    ``Format-Specification:``) field.  Paragraphs are separated by blank lines; a field's
    continuation lines start with a space or tab (one leading space/tab is removed) and a
    continuation line of just ``.`` is a blank line of the value.  The first line of a
    ``License:`` field is the short id (not part of the body); its continuation lines are the
    body.  Stand-alone ``License:`` paragraphs, ``Files:`` paragraphs and the header paragraph
    are all read; fields with an empty body are skipped (their text is normally given by a
    stand-alone paragraph of the same id).  ``#`` comment lines are ignored.
    """
    paragraphs: list[list[str]] = []
    cur: list[str] = []
    for line in text.replace("\r\n", "\n").split("\n"):
        if not line.strip():
            if cur:
                paragraphs.append(cur)
                cur = []
            continue
        if not line.startswith("#"):
            cur.append(line)
    if cur:
        paragraphs.append(cur)
    out: list[tuple[str, str]] = []
    for n, para in enumerate(paragraphs):
        fields: list[tuple[str, str, list[str]]] = []
        for line in para:
            if line[:1] in (" ", "\t"):
                if fields:
                    fields[-1][2].append("" if line.strip() == "." else line[1:].rstrip())
                continue
            m = _DEP5_FIELD.match(line)
            if m is None:  # not a field: stop attaching continuation lines to the previous one
                fields.append(("", "", []))
                continue
            fields.append((m.group(1).lower(), m.group(2).strip(), []))
        names = {f[0] for f in fields}
        if n == 0 and not names & {"format", "format-specification"}:
            return []
        for name, value, body in fields:
            if name == "license" and any(ln.strip() for ln in body):
                out.append((value, "\n".join(body).strip("\n")))
    return out


def licence_snippets(
    body: str, *, min_chars: int = 40, max_chars: int = 400, max_sentences: int = 3
) -> list[str]:
    """Snippets of 1-``max_sentences`` sentences (``min_chars..max_chars`` characters) of a licence body.

    Comment decoration at line starts (``#``, ``*``, ``//``, ``;``, ``--``, ``dnl``) is removed
    first.  Sentences that name a licence family (:func:`names_licence_family`) or hold a
    copyright notice (``Copyright (c) 2001 ...``) are removed and cut the paragraph there, so
    snippets are runs of consecutive sentences of the original text.  Snippets must read as
    English prose (:func:`is_english_prose`).
    """
    body = "\n".join(_COMMENT_LEAD.sub("", line) for line in body.split("\n"))
    runs: list[str] = []
    for para in paragraphs_of(body):
        run: list[str] = []
        for sent in split_sentences(" ".join(para.split())):
            if not _licence_sentence_ok(sent):
                if run:
                    runs.append(" ".join(run))
                run = []
                continue
            run.append(sent)
        if run:
            runs.append(" ".join(run))
    snippets = chunk_sentences(runs, min_chars=min_chars, max_chars=max_chars, max_sentences=max_sentences)
    return [s for s in snippets if is_english_prose(s) and _licence_sentence_ok(s)]


# ---------------------------------------------------------------------------------------------
# pure helpers: man pages (troff source) to plain text
# ---------------------------------------------------------------------------------------------

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
#: Column at which filled text is wrapped, as ``man`` does on an 80-column terminal.
MAN_WIDTH = 78
#: Snippets of a page come from about its first this many rendered body lines (long pages such as
#: ``cmake-modules`` would otherwise take most of the build time; few snippets per page are used).
MAN_MAX_BODY_LINES = 600

#: ``\(xx`` / ``\[xx]`` special characters rendered as text; any other one becomes a space.
_MAN_SPECIAL: dict[str, str] = {
    "em": "—", "en": "–", "hy": "-", "mi": "-", "bu": "•", "lq": '"', "rq": '"', "oq": "'", "cq": "'",
    "aq": "'", "dq": '"', "ga": "`", "aa": "'", "ti": "~", "ha": "^", "rs": "\\", "sl": "/", "pl": "+",
    "eq": "=", "co": "©", "rg": "®", "tm": "™", "mu": "×", "de": "°", ">=": "≥", "<=": "≤", "->": "→",
    "<-": "←", "+-": "±", "Fo": "«", "Fc": "»", "fo": "‹", "fc": "›", "ba": "|", "or": "|", "at": "@",
    "sh": "#", "Do": "$", "lB": "[", "rB": "]", "lC": "{", "rC": "}", "la": "<", "ra": ">",
    "Bq": "„", "bq": "‚",
}
#: Accents of groff's composed-letter escapes (``\(:o`` = ö, ``\('e`` = é, ``\(,c`` = ç, ``\(vs`` = š)
#: as Unicode combining marks.
_MAN_ACCENTS: dict[str, str] = {
    ":": "\u0308", "'": "\u0301", "`": "\u0300", "^": "\u0302", "~": "\u0303", ",": "\u0327",
    "v": "\u030c", "o": "\u030a", '"': "\u030b",
}
#: groff letters that are not an ASCII letter plus an accent.
_MAN_LETTERS: dict[str, str] = {
    "ss": "ß", "ae": "æ", "AE": "Æ", "oe": "œ", "OE": "Œ", "/o": "ø", "/O": "Ø", "/l": "ł", "/L": "Ł",
    "-D": "Đ", "Sd": "ð", "TP": "Þ", "Tp": "þ", ".i": "ı", "IJ": "Ĳ", "ij": "ĳ",
}


def _man_letter(name: str) -> str | None:
    """The letter named by a groff special character such as ``:o`` (ö), ``'e`` (é), ``ss`` (ß)."""
    if name in _MAN_LETTERS:
        return _MAN_LETTERS[name]
    if len(name) == 2 and name[0] in _MAN_ACCENTS and name[1].isascii() and name[1].isalpha():
        letter = unicodedata.normalize("NFC", name[1] + _MAN_ACCENTS[name[0]])
        return letter if len(letter) == 1 else None
    return None


#: ``\*(xx`` / ``\*[xx]`` strings (defined by the man macros, pod2man and DocBook preambles).
_MAN_STRINGS: dict[str, str] = {
    "lq": '"', "rq": '"', 'L"': '"', 'R"': '"', "C`": '"', "C'": '"', "Aq": "'", "aq": "'", "Tm": "™",
    "R": "®", "Lt": "<", "Gt": ">", "Am": "&", "Ba": "|", "Ne": "≠", "Le": "≤", "Ge": "≥", "Pi": "π",
    "Ec": "", "Eo": "", "S": "",
}
#: One-character escapes (``\X``); an unknown one renders as the character itself.
_MAN_CHARS: dict[str, str] = {
    "-": "-", "e": "\\", "E": "\\", "\\": "\\", "&": "", "|": "", "^": "", " ": " ", "0": " ", "~": " ",
    "c": "", ":": "", "%": "", "'": "'", "`": "`", ".": ".", "t": " ", "d": "", "u": "", "r": "",
    "p": "", "/": "", ",": "", "a": "", "{": "", "}": "", "!": "", ")": "", "\n": "",
}
_MAN_ESC = re.compile(
    r"\\(?:"
    r"(?P<font>f(?:\[[^\]\n]*\]|\(..|.))"  # \fB \fI \fR \fP \f(CW \f[B]
    r"|\((?P<sp2>..)"  # \(em
    r"|\[(?P<spl>[^\]\n]*)\]"  # \[em] \[u00E9]
    r"|\*(?P<str>\[[^\]\n]*\]|\(..|.)"  # \*(lq \*R \*[name]
    r"|(?P<size>s(?:[+-]?\(\d\d|[+-]?\d|\[[^\]\n]*\]|'[^'\n]*'))"  # \s-1 \s0 \s(12
    r"|(?P<reg>n[+-]?(?:\[[^\]\n]*\]|\(..|.))"  # number registers \n(.g
    r"|N'(?P<num>\d+)'"  # \N'65'
    r"|(?P<arg>[hvwolLDXZbRSxHCAB]'[^'\n]*')"  # motions, widths, overstrikes, device controls
    r"|(?P<sel>[mMFYVkzg$](?:\[[^\]\n]*\]|\(..|.))"  # colours, families, marks, macro arguments
    r"|(?P<char>.)"
    r")",
    re.S,
)
#: A comment (``\"`` or ``\#``) not preceded by an escaping backslash; group 1 is the text before it.
_MAN_COMMENT = re.compile(r'^((?:[^\\]|\\[^"#])*)\\["#]')
#: Request arguments: ``"quoted ""words"""`` or runs of non-space characters (escaped spaces kept).
_MAN_ARG = re.compile(r'"((?:[^"]|"")*)"?|((?:\\.|[^\s\\]|\\)+)')
#: A cross-reference to a manual section, ``(1)``, ``(3p)``, ``(1ssl)``, as in ``ls(1)``.
_SECTION_REF = re.compile(r"( ?)\(\s*[1-9](?:[A-Za-z][\w+]*)?\s*\)( ?)")
#: A manual section named in words: "Section 7 of the manual", "man 2 open", "man3/", "man7.org".
_SECTION_WORDS = re.compile(r"\bsections?\s+[1-9][a-z]*\b(?!\.\d)|\bman\s?[1-9][a-z]*\b", re.I)

_MAN_FONT_SPACED = frozenset({"B", "I", "SM", "SB"})
_MAN_FONT_JOINED = frozenset({"BR", "BI", "IB", "IR", "RB", "RI"})
_MAN_PARAGRAPH = frozenset({"PP", "P", "LP", "HP", "sp", "Sp"})
_MAN_NOFILL = frozenset({"nf", "EX", "Vb"})
_MAN_FILL = frozenset({"fi", "EE", "Ve"})
#: Blocks dropped whole: tables, equations, pictures (to their end macro), macro definitions and
#: ``.ig`` blocks (to ``..`` or the end name given).
_MAN_BLOCKS = {"TS": "TE", "EQ": "EN", "PS": "PE", "de": "..", "de1": "..", "am": "..", "am1": "..", "ig": ".."}
#: Man-macro requests whose arguments are not text (header/footer, index entries, layout).
_MAN_DROP = frozenset({
    "TH", "IX", "UC", "DT", "AT", "PD", "RS", "RE", "YS", "ME", "LO", "Dd", "Dt", "Os",
    "INDENT", "UNINDENT", "LINKSTYLE",  # docutils (rst2man) and util-linux preambles
})
#: Requests and macros that end the current output line (without a blank line).
_MAN_BREAK = frozenset({"br", "in", "ti", "ce", "bp", "RS", "RE", "INDENT", "UNINDENT"})
#: Arguments that are only numbers or sizes (``3.5``, ``-4n``): layout, not text.
_MAN_NUMERIC_ARGS = re.compile(r"^(?:\s*[-+]?(?:\d+\.?\d*|\.\d+)[a-z]?\s*)*$")


def _man_esc_repl(m: re.Match[str]) -> str:
    if m.group("font") is not None or m.group("size") is not None or m.group("reg") is not None:
        return ""
    if m.group("arg") is not None or m.group("sel") is not None:
        return ""
    name = m.group("sp2") if m.group("sp2") is not None else m.group("spl")
    if name is not None:
        if re.fullmatch(r"u[0-9A-Fa-f]{4,6}", name) and int(name[1:], 16) < 0x110000:
            return chr(int(name[1:], 16))  # \[u00E9]
        if name in _MAN_SPECIAL:
            return _MAN_SPECIAL[name]
        letter = _man_letter(name)
        return " " if letter is None else letter
    s = m.group("str")
    if s is not None:
        key = s[1:-1] if s.startswith("[") else s[1:] if s.startswith("(") else s
        return _MAN_STRINGS.get(key, "")
    if m.group("num") is not None:
        n = int(m.group("num"))
        return chr(n) if 32 <= n < 0x110000 else ""
    ch = m.group("char")
    return _MAN_CHARS.get(ch, ch)


def man_escapes(text: str) -> str:
    """Plain text of one line of troff text: escapes rendered (``\\fB`` and other font changes and
    size changes removed, ``\\-`` -> ``-``, ``\\(em`` -> ``—``, ``\\e`` -> ``\\``, ``\\&`` -> nothing,
    a few common ``\\(xx`` characters and ``\\*(xx`` strings as text, other ``\\(xx`` -> a space)."""
    return _MAN_ESC.sub(_man_esc_repl, text) if "\\" in text else text


def _strip_man_comment(line: str) -> tuple[str, bool]:
    """(``line`` without its ``\\"`` comment, whether it had one)."""
    if '\\"' not in line and "\\#" not in line:
        return line, False
    m = _MAN_COMMENT.match(line)
    return (m.group(1), True) if m else (line, False)


def _man_args(rest: str) -> list[str]:
    """Arguments of a request line (after its name), rendered by :func:`man_escapes`."""
    if '"' not in rest and "\\" not in rest:
        return rest.split()
    out = []
    for m in _MAN_ARG.finditer(rest):
        out.append(man_escapes(m.group(1).replace('""', '"') if m.group(1) is not None else m.group(2)))
    return out


def _man_first_request(source: str) -> str | None:
    """Name of the first request of a page (comments and blank lines skipped), or None."""
    for line in source.split("\n"):
        body, _ = _strip_man_comment(line)
        if not body.strip():
            continue
        if body[:1] in (".", "'"):
            parts = body[1:].split(None, 1)
            if parts:
                return parts[0]
            continue
        return None
    return None


def is_man_redirect(source: str) -> bool:
    """True for a redirect-only page (its first request is ``.so other/page.N``)."""
    return _man_first_request(source) == "so"


def is_mdoc(source: str) -> bool:
    """True for a page written with the BSD ``mdoc`` macros (``.Dd``/``.Dt``), which are not rendered."""
    return re.search(r"^\.\s*D[dt]\b", source[:20000], re.M) is not None


_WRAP_RES: dict[int, re.Pattern[str]] = {}


def _wrap_re(width: int) -> re.Pattern[str]:
    """Pattern whose matches are the lines of single-spaced text greedily wrapped at ``width``."""
    if width not in _WRAP_RES:
        _WRAP_RES[width] = re.compile(rf"(.{{1,{width}}})(?: |$)|(\S+)(?: |$)")
    return _WRAP_RES[width]


class _ManRenderer:
    """Renders ``man``-macro troff source into (heading, lines) sections; see :func:`man_page_sections`."""

    def __init__(self, width: int, wanted: Callable[[str], bool] | None = None) -> None:
        self.width = width
        self.wanted = wanted
        self.active = wanted is None or wanted("")  # is the current section rendered?
        self.done_lines = 0  # lines of rendered sections before the current one
        self.sections: list[tuple[str, list[str]]] = [("", [])]
        self.fill = True
        self.cur = ""
        self.join_next = False
        self.pending: str | None = None  # "heading" (bare .SH) or "tag" (.TP)

    # -- output
    def _lines(self) -> list[str]:
        return self.sections[-1][1]

    def flush(self) -> None:
        text = " ".join(self.cur.split())
        self.cur = ""
        self.join_next = False
        if not text:
            return
        if len(text) <= self.width:
            self._lines().append(text)
            return
        # greedy wrap: as many words as fit; a word longer than the width gets a line of its own
        self._lines().extend(m.group(1) or m.group(2) for m in _wrap_re(self.width).finditer(text))

    def para(self) -> None:
        self.flush()
        lines = self._lines()
        if lines and lines[-1] != "":
            lines.append("")

    def heading(self, text: str) -> None:
        self.flush()
        while self._lines() and self._lines()[-1] == "":
            self._lines().pop()
        heading = " ".join(text.split())
        if self.active:
            self.done_lines += len(self._lines())
        self.sections.append((heading, []))
        self.active = self.wanted is None or self.wanted(heading)
        self.fill = True
        self.pending = None

    def text(self, text: str, join: bool = False, leading_space: bool = False) -> None:
        """Add rendered text; ``join``: the source line ended with ``\\c`` (no space before the next)."""
        if self.pending == "heading":
            if text.strip():
                self.heading(text)
            return
        if not self.active:
            return
        if not self.fill:
            self.pending = None
            if self.join_next:
                self.cur += text
            else:
                self.flush()
                self.cur = text
            if join:
                self.join_next = True
                return
            line = self.cur.rstrip()
            self.cur = ""
            self.join_next = False
            self._lines().append(line.expandtabs(8))
            return
        if leading_space and not self.join_next:
            self.flush()
        if self.join_next:
            self.cur += text.lstrip()
        else:
            self.cur += (" " if self.cur else "") + text.strip()
        self.join_next = join
        if self.pending == "tag" and not join and self.cur.strip():
            self.pending = None
            self.flush()

    # -- input
    def request(self, name: str, rest: str) -> None:
        if name in ("SH", "Sh"):
            args = _man_args(rest)
            if args:
                self.heading(" ".join(args))
            else:
                self.flush()
                self.pending = "heading"
            return
        if name in _MAN_NOFILL or name in _MAN_FILL:
            self.flush()
            self.fill = name in _MAN_FILL
            return
        if (not self.active and self.pending != "heading") or name in _MAN_DROP or not name[:1].isupper():
            if self.active:
                if name in _MAN_BREAK:
                    self.flush()
                elif name in _MAN_PARAGRAPH:  # .sp, .Sp
                    self.paragraph()
            return  # troff requests (lower case: .ds, .nr, .ft, .in, .ad, ...) and layout macros
        if name in _MAN_PARAGRAPH:
            self.paragraph()
        elif name in ("TP", "TQ"):
            (self.para if name == "TP" else self.flush)()
            self.pending = "tag"
        elif name in ("SS", "Ss"):
            self.para()
            args = _man_args(rest)
            if args:
                self.text(" ".join(args))
                self.flush()
            else:
                self.pending = "tag"
        elif name in _MAN_FONT_SPACED or name in _MAN_FONT_JOINED:
            joined = (" " if name in _MAN_FONT_SPACED else "").join(_man_args(rest))
            if joined.strip():
                self.text(joined)
        elif name == "IP":
            self.para()
            args = _man_args(rest)
            tag = args[0].strip() if args else ""
            if tag:
                self.text(tag)
                if len(tag) > 4:  # a long tag stands on its own line; a bullet starts the paragraph
                    self.flush()
        else:
            args = _man_args(rest)
            if not args:
                return
            if name == "MR":
                self.text(f"{args[0]}({args[1] if len(args) > 1 else ''}){''.join(args[2:])}")
            elif name == "UE":
                self.cur += "".join(args)
            elif name == "OP":
                self.text("[" + " ".join(args) + "]")
            elif name == "SY":
                self.flush()
                self.text(" ".join(args))
            elif not _MAN_NUMERIC_ARGS.match(" ".join(args)):
                self.text(" ".join(args))  # other man macros (.UR, .MT, .ZN, ...): keep the arguments

    def paragraph(self) -> None:
        """A paragraph break (``.PP``, ``.sp``): a blank line; in no-fill mode always one more."""
        if self.fill:
            self.para()
        else:
            self.flush()
            self._lines().append("")

    def rendered_lines(self) -> int:
        """Lines rendered so far in the sections that are rendered."""
        return self.done_lines + (len(self._lines()) if self.active else 0)

    def render(self, source: str, max_lines: int | None = None) -> list[tuple[str, list[str]]]:
        skip_until: str | None = None  # end request of a dropped block ("." for "..", "TE", ...)
        depth = 0  # nesting of a dropped conditional block \{ ... \}
        carry = ""  # a line ending in an escaped newline continues on the next one
        for n, raw in enumerate(source.replace("\r\n", "\n").split("\n")):
            if max_lines is not None and not n % 32 and self.rendered_lines() >= max_lines:
                break
            if carry:
                raw, carry = carry + raw, ""
            if skip_until is not None:
                s = raw.lstrip()
                if s[:1] in (".", "'") and s[1:].split(None, 1)[:1] == [skip_until]:
                    skip_until = None
                continue
            if depth > 0:
                depth += raw.count("\\{") - raw.count("\\}")
                continue
            line, had_comment = _strip_man_comment(raw)
            if not had_comment and line.endswith("\\") and (len(line) - len(line.rstrip("\\"))) % 2:
                carry = line[:-1]
                continue
            if line[:1] in (".", "'"):
                parts = line[1:].split(None, 1)
                if not parts:
                    continue
                name, rest = parts[0], parts[1] if len(parts) > 1 else ""
                if name in _MAN_BLOCKS:
                    end = _MAN_BLOCKS[name]
                    if end == "..":  # .de NAME [END] / .ig [END]: ends at ".." or ".END"
                        words = rest.split()
                        custom = words[0:1] if name == "ig" else words[1:2]
                        end = custom[0] if custom else "."
                    skip_until = end
                    continue
                if name in ("if", "ie", "el", "while"):
                    depth = max(0, line.count("\\{") - line.count("\\}"))
                    continue
                self.request(name, rest)
                continue
            if not self.active and self.pending != "heading":
                continue  # text of a section that is not rendered
            if not line.strip():
                if had_comment:
                    continue  # a comment-only line is not a blank line
                if self.fill:
                    self.para()
                else:
                    self.text("")
                continue
            join = "\\c" in line and re.search(r"(?<!\\)(?:\\\\)*\\c\s*$", line) is not None
            self.text(man_escapes(line), join=join, leading_space=line[:1] in (" ", "\t"))
        self.flush()
        out = []
        for heading, body_lines in self.sections:
            while body_lines and body_lines[-1] == "":
                body_lines.pop()
            while body_lines and body_lines[0] == "":
                body_lines.pop(0)
            if heading or body_lines:
                out.append((heading, body_lines))
        return out


def man_page_sections(
    source: str,
    width: int = MAN_WIDTH,
    wanted: Callable[[str], bool] | None = None,
    max_lines: int | None = None,
) -> list[tuple[str, list[str]]]:
    """``(heading, lines)`` for every ``.SH`` section of a man page written in troff (``man`` macros).

    A basic rendering, close to what ``man`` prints: comment lines (``.\\"``) and troff requests
    (``.ds``, ``.nr``, ``.ft``, ``.if ... \\{ ... \\}``, macro definitions, tables) are dropped, as is
    ``.TH`` (the header and footer line); ``.SH NAME`` starts the section headed ``NAME``;
    font macros keep their arguments (``.B ls`` -> ``ls``, ``.BR a (1)`` -> ``a(1)``);
    ``.PP``/``.TP``/``.IP``/``.sp`` break paragraphs (a ``.TP`` tag gets its own line, an ``.IP``
    tag starts its paragraph); other man macros keep their arguments; escapes are rendered by
    :func:`man_escapes`.  Filled text is reflowed and wrapped at ``width`` columns; ``.nf``/``.EX``
    blocks keep their lines.  Paragraphs are separated by one blank line.  With ``wanted``, only
    the sections whose heading it accepts get body lines (the others are parsed, not rendered);
    with ``max_lines``, rendering stops soon after that many body lines.
    """
    return _ManRenderer(width, wanted).render(source, max_lines)


def troff_to_text(source: str, width: int = MAN_WIDTH) -> str:
    """Plain text of a man page (see :func:`man_page_sections`): each heading on its own line,
    followed by its body; sections separated by a blank line."""
    blocks = []
    for heading, lines in man_page_sections(source, width):
        blocks.append("\n".join(([heading] if heading else []) + lines))
    return "\n\n".join(blocks)


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
    English words (:data:`_ENGLISH_MARKERS`), as in untranslated paragraphs of a translated page."""
    words = [w.lower() for w in _LETTER_WORD.findall(text)]
    hits = sum(1 for w in words if w in _ENGLISH_MARKERS)
    return hits >= 2 and hits >= 0.08 * len(words)


def man_language_snippets(source: str, params: ChunkParams | None = None) -> list[str]:
    """``man_languages`` snippets of one translated man page's troff source, in page order.

    Redirect pages (``.so``) and ``mdoc`` pages give none.  The page is rendered by
    :func:`man_page_sections` (about its first :data:`MAN_MAX_BODY_LINES` body lines, no ``.TH``
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
# reading files into snippets (per file, memoised)
# ---------------------------------------------------------------------------------------------


def _read_text(path: str, limit: int = _MAX_FILE_BYTES) -> str | None:
    """Text of a (possibly gzipped) file, or None if unreadable, binary or larger than ``limit``."""
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as fh:
                data = fh.read(limit + 1)
        else:
            if os.path.getsize(path) > limit:
                return None
            with open(path, "rb") as fh:
                data = fh.read(limit + 1)
    except (OSError, EOFError, gzip.BadGzipFile):
        return None
    if len(data) > limit or b"\x00" in data[:4096]:
        return None
    return data.decode("utf-8", errors="replace")


@dataclass(frozen=True)
class ChunkParams:
    """Snippet size limits; code uses the line limits, prose the character/sentence limits."""

    min_lines: int = 3
    max_lines: int = 12
    max_chars: int = 400
    min_chars: int = 60
    max_sentences: int = 6
    min_code_chars: int = 0


#: Short snippets for classification (text_kind, code_language).
CLASSIFY_CHUNKS = ChunkParams(min_lines=3, max_lines=12, max_chars=400, min_chars=80, min_code_chars=60)
#: One to three sentences for entity tagging.
ENTITY_CHUNKS = ChunkParams(min_lines=1, max_lines=1, max_chars=300, min_chars=30, max_sentences=3)
#: One to three sentences of licence text for ``licences``.
LICENCE_CHUNKS = ChunkParams(min_lines=1, max_lines=1, max_chars=400, min_chars=40, max_sentences=3)
#: 3-12 consecutive rendered lines of a man page (at least 60 non-space characters) for ``man_sections``.
MAN_CHUNKS = ChunkParams(min_lines=3, max_lines=12, max_chars=400, min_chars=60, min_code_chars=60)
#: A few hundred characters for causal-LM domain text.
DOMAIN_CHUNKS = ChunkParams(
    min_lines=5, max_lines=24, max_chars=700, min_chars=200, max_sentences=10, min_code_chars=150
)


class _Reader:
    """Reads source files into snippets, memoising per (kind, path, params) within one build."""

    def __init__(self) -> None:
        self._text: dict[str, str | None] = {}
        self._py: dict[str, tuple[list[int], list[str]] | None] = {}
        self._memo: dict[tuple[str, str, ChunkParams], list[str]] = {}
        self._masks: dict[tuple[str, str], tuple[list[str], list[bool]]] = {}
        self._dep5: dict[str, list[tuple[str, str]]] = {}
        self._licence_memo: dict[tuple[str, ChunkParams], list[tuple[str, str]]] = {}
        self._man_memo: dict[tuple[str, ChunkParams], list[str]] = {}
        self._man_lang_memo: dict[tuple[str, ChunkParams], list[str]] = {}

    def text(self, path: str) -> str | None:
        if path not in self._text:
            self._text[path] = _read_text(path)
        return self._text[path]

    def dep5_licences(self, path: str) -> list[tuple[str, str]]:
        """``(family, body)`` of every licence body with a family in a DEP-5 copyright file, in file order."""
        if path not in self._dep5:
            text = _read_text(path, _MAX_COPYRIGHT_BYTES)
            pairs = [] if text is None else parse_dep5(text)
            self._dep5[path] = [(fam, body) for lid, body in pairs if (fam := licence_family(lid)) is not None]
        return self._dep5[path]

    def licence_snippets(self, path: str, p: ChunkParams) -> list[tuple[str, str]]:
        """``(family, snippet)`` pairs of a DEP-5 copyright file, in file order (see :func:`licence_snippets`)."""
        key = (path, p)
        if key not in self._licence_memo:
            self._licence_memo[key] = [
                (fam, sn)
                for fam, body in self.dep5_licences(path)
                for sn in licence_snippets(body, min_chars=p.min_chars, max_chars=p.max_chars,
                                           max_sentences=p.max_sentences)
            ]
        return self._licence_memo[key]

    def man_snippets(self, path: str, p: ChunkParams = MAN_CHUNKS) -> list[str]:
        """``man_sections`` snippets of a (possibly gzipped) man page, in page order (see :func:`man_snippets`)."""
        key = (path, p)
        if key not in self._man_memo:
            text = _read_text(path, _MAX_MAN_BYTES)
            self._man_memo[key] = [] if text is None else man_snippets(text, p)
        return self._man_memo[key]

    def man_language_snippets(self, path: str, p: ChunkParams = MAN_CHUNKS) -> list[str]:
        """``man_languages`` snippets of a (possibly gzipped) translated man page (see
        :func:`man_language_snippets`)."""
        key = (path, p)
        if key not in self._man_lang_memo:
            text = _read_text(path, _MAX_MAN_BYTES)
            self._man_lang_memo[key] = [] if text is None else man_language_snippets(text, p)
        return self._man_lang_memo[key]

    def _python_info(self, path: str) -> tuple[list[int], list[str]] | None:
        """(0-based docstring line numbers, docstrings) of a Python file; None if unreadable."""
        if path not in self._py:
            src = self.text(path)
            self._py[path] = None if src is None else python_docstrings(src)
        return self._py[path]

    def snippets(self, kind: str, path: str, params: ChunkParams) -> list[str]:
        """Accepted snippets of one file read as ``kind``, in file order."""
        key = (kind, path, params)
        if key not in self._memo:
            self._memo[key] = self._snippets(kind, path, params)
        return self._memo[key]

    def _snippets(self, kind: str, path: str, p: ChunkParams) -> list[str]:
        if kind == "docstring":
            info = self._python_info(path)
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
        text = self.text(path)
        if text is None:
            return []
        if kind == "prose":
            paras = paragraphs_of(text)
            return [s for s in chunk_sentences(paras, min_chars=p.min_chars, max_chars=p.max_chars,
                                               max_sentences=p.max_sentences) if is_english_prose(s)]
        language = {"python": "python", "c_header": "c", "c": "c", "shell": "shell", "perl": "perl"}[kind]
        doc_lines: list[int] = []
        if language == "python":
            info = self._python_info(path)
            if info is None:
                return []
            doc_lines = info[0]
        mkey = (language, path)
        if mkey not in self._masks:
            text = text.replace("\r\n", "\n").expandtabs(4)
            self._masks[mkey] = (text.split("\n"), code_mask(text, language, doc_lines))
        lines, mask = self._masks[mkey]
        return chunk_lines(
            lines, mask, min_lines=p.min_lines, max_lines=p.max_lines, max_chars=p.max_chars, min_chars=p.min_code_chars
        )


# ---------------------------------------------------------------------------------------------
# source discovery (filesystem scanning)
# ---------------------------------------------------------------------------------------------


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
#: Source kinds of the ``man_sections`` dataset: ``man<N>`` for every section in :data:`MAN_SECTIONS`.
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


def _stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def _expand_roots(kind: str) -> list[str]:
    out: list[str] = []
    for root in SOURCE_ROOTS.get(kind, []):
        root = root.replace("{stdlib}", _stdlib_dir())
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
    ordered = sorted(uniq, key=lambda p: _hash_unit(_PICK_SALT, p))
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
        if os.path.getsize(path) > _MAX_MAN_BYTES:
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


def _pick_man_pages(
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
    for cand, folder, suffixes in sorted(cands, key=lambda c: _hash_unit(_PICK_SALT, c[0])):
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
    ``<lang>[_TERRITORY]/man<N>/*.N[.gz]``, picked by :func:`_pick_man_pages` (aliases read once,
    ``.so`` redirects and ``mdoc`` pages skipped, one page family at most a tenth, one page name
    once per language).  Only languages in :data:`MAN_LANGUAGES` (Latin script) are looked at.
    Results are memoised per process.
    """
    roots = [root] if root is not None else _expand_roots("man_languages")
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
                    files = _pick_man_pages(sections, None, max_files, unique_names=True)
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
    ``man_sections``; see :func:`_pick_man_pages`).  The folders come from :data:`SOURCE_ROOTS`.  A kind
    with no files is returned with an empty ``files`` list.
    Results are memoised per process.
    """
    kinds = tuple(kinds) if kinds is not None else ("python", "c_header", "shell", "perl", "prose", "docstring")
    key = (max_files, kinds, json.dumps(SOURCE_ROOTS, sort_keys=True), _stdlib_dir())
    if key in _DISCOVERY_CACHE:
        return {k: SourceSet(v.kind, list(v.files), list(v.searched)) for k, v in _DISCOVERY_CACHE[key].items()}
    found: dict[str, SourceSet] = {}
    need = set(kinds)
    if "docstring" in need:
        need.add("python")

    if "python" in need:
        roots = _expand_roots("python")
        cands = [
            os.path.join(d, f)
            for r in roots if os.path.isdir(r)
            for d, fs in _walk(r, _PRUNE_STDLIB)
            for f in fs if f.endswith(".py")
        ]
        found["python"] = SourceSet("python", _pick_files(cands, max_files), roots)
        found["docstring"] = SourceSet("docstring", list(found["python"].files), roots)

    if "c_header" in need:
        roots = _expand_roots("c_header")
        cands = [os.path.join(d, f) for r in roots if os.path.isdir(r) for d, fs in _walk(r) for f in fs
                 if f.endswith(".h")]
        found["c_header"] = SourceSet("c_header", _pick_files(cands, max_files), roots)

    if "perl" in need:
        roots = _expand_roots("perl")
        cands = [os.path.join(d, f) for r in roots if os.path.isdir(r) for d, fs in _walk(r) for f in fs
                 if f.endswith(".pm")]
        found["perl"] = SourceSet("perl", _pick_files(cands, max_files), roots)

    if "shell" in need:
        roots = _expand_roots("shell")
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
        roots = _expand_roots("prose")
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
        roots = _expand_roots("copyright")
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
            roots = _expand_roots(kind)
            found[kind] = SourceSet(kind, _pick_man_pages(roots, kind[3:], max_files), roots)

    result = {k: v for k, v in found.items() if k in kinds}
    _DISCOVERY_CACHE[key] = result
    return {k: SourceSet(v.kind, list(v.files), list(v.searched)) for k, v in result.items()}


# ---------------------------------------------------------------------------------------------
# pools, sampling
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Snippet:
    text: str
    source: str
    index: int  # position of the snippet within its file


def _require(sources: Mapping[str, SourceSet], kind: str, dataset: str, min_files: int = 1) -> SourceSet:
    ss = sources.get(kind)
    if ss is None or len(ss.files) < min_files:
        searched = ", ".join(ss.searched if ss is not None and ss.searched else _expand_roots(kind))
        n = 0 if ss is None else len(ss.files)
        raise DatasetBuildError(
            f"{dataset}: need at least {min_files} {kind} source file(s), found {n}; "
            f"searched: {searched or '(nothing)'}"
        )
    return ss


def _pools(
    reader: _Reader,
    parts: Sequence[tuple[str, SourceSet]],
    params: ChunkParams,
) -> dict[str, list[_Snippet]]:
    """Snippets per split from every file of ``parts`` (kind used to read, files)."""
    pools: dict[str, list[_Snippet]] = {s: [] for s in SPLITS}
    for read_kind, ss in parts:
        for path in ss.files:
            split = split_for(path)
            for i, text in enumerate(reader.snippets(read_kind, path, params)):
                pools[split].append(_Snippet(text, path, i))
    return pools


def _dedup_across(
    pools_by_class: Mapping[str, Mapping[str, list[_Snippet]]],
) -> dict[str, dict[str, list[_Snippet]]]:
    """Drop repeated snippets (same normalized text) across classes and splits.

    The first occurrence wins in split order test, validation, train (and within a split in
    path order), so a text that appears in a test file never shows up in train as well.
    """
    seen: set[str] = set()
    out: dict[str, dict[str, list[_Snippet]]] = {c: {s: [] for s in SPLITS} for c in pools_by_class}
    for split in ("test", "validation", "train"):
        for cls in sorted(pools_by_class):
            for sn in sorted(pools_by_class[cls][split], key=lambda x: (x.source, x.index)):
                k = normalize_key(sn.text)
                if k in seen:
                    continue
                seen.add(k)
                out[cls][split].append(sn)
    return out


def _rank(
    pool: Sequence[_Snippet], seed: int, salt: str, prefer: Callable[[_Snippet], bool] | None = None
) -> list[_Snippet]:
    """Order a pool for sampling: round-robin over files (one snippet per file before a second),
    preferred snippets first, ties shuffled by a seeded hash."""
    per_file: dict[str, list[_Snippet]] = defaultdict(list)
    for sn in pool:
        per_file[sn.source].append(sn)
    keyed = []
    for src, items in per_file.items():
        hashed = sorted(((_hash_unit(salt, seed, src, x.index), x) for x in items), key=lambda hx: (hx[0], hx[1].index))
        for r, (h, sn) in enumerate(hashed):
            pref = 0 if (prefer is None or prefer(sn)) else 1
            keyed.append(((pref, r, h), sn))
    keyed.sort(key=lambda kv: kv[0])
    return [sn for _, sn in keyed]


def _balanced_rows(
    pools_by_class: Mapping[str, Mapping[str, list[_Snippet]]],
    sizes: Mapping[str, int],
    seed: int,
    salt: str,
    dataset: str,
    prefer: Callable[[_Snippet], bool] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Balanced classification rows: the same number of rows per class in each split.

    If some class has fewer snippets than asked, every class is cut to that class's count;
    a split where some class has none raises :class:`DatasetBuildError`.
    """
    out: dict[str, list[dict[str, Any]]] = {}
    for split in SPLITS:
        want = int(sizes.get(split, 0))
        if want <= 0:
            out[split] = []
            continue
        avail = {c: len(pools_by_class[c][split]) for c in pools_by_class}
        n = min([want, *avail.values()])
        if n == 0:
            empty = [c for c, k in avail.items() if k == 0]
            raise DatasetBuildError(
                f"{dataset}: no usable {split} snippets for class(es) {empty}; "
                "too few source files of that kind on this machine"
            )
        rows: list[dict[str, Any]] = []
        for cls in sorted(pools_by_class):
            for sn in _rank(pools_by_class[cls][split], seed, f"{salt}:{cls}:{split}", prefer)[:n]:
                rows.append({"text": sn.text, "label": cls, "source": sn.source})
        random.Random(f"{salt}:{seed}:{split}").shuffle(rows)
        out[split] = rows
    return out


# ---------------------------------------------------------------------------------------------
# cache
# ---------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """Data cache folder: ``$LORAPLEX_CACHE/data`` if the variable is set, else ``~/.cache/loraplex/data``."""
    env = os.environ.get("LORAPLEX_CACHE")
    if env:
        return Path(env).expanduser() / "data"
    return Path.home() / ".cache" / "loraplex" / "data"


def _csv_value(v: Any) -> Any:
    return json.dumps(v) if isinstance(v, (list, dict)) else v


def _write_dataset(folder: Path, name: str, data: Mapping[str, list[dict[str, Any]]], manifest: dict[str, Any]) -> None:
    """Write ``<split>.jsonl`` and ``<split>.csv`` for every split, then ``manifest.json`` last."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in data.items():
        jl = folder / f"{split}.jsonl"
        tmp = jl.with_suffix(f".jsonl.{os.getpid()}.tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, jl)
        cols = list(rows[0].keys()) if rows else ["text", "label", "source"]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols)
        w.writeheader()
        for row in rows:
            w.writerow({k: _csv_value(row.get(k)) for k in cols})
        tmp = folder / f"{split}.csv.{os.getpid()}.tmp"
        tmp.write_text(buf.getvalue(), encoding="utf-8")
        os.replace(tmp, folder / f"{split}.csv")
    tmp = folder / f"manifest.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(tmp, folder / "manifest.json")


def _read_cached(folder: Path, params: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]] | None:
    """Rows from a cached dataset folder if its manifest's build parameters equal ``params``."""
    mpath = folder / "manifest.json"
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if manifest.get("params") != json.loads(json.dumps(params)):
        return None
    out: dict[str, list[dict[str, Any]]] = {}
    try:
        for split in manifest.get("splits", SPLITS):
            with open(folder / f"{split}.jsonl", encoding="utf-8") as fh:
                out[split] = [json.loads(line) for line in fh if line.strip()]
    except (OSError, ValueError):
        return None
    if any(len(out[s]) != manifest.get("counts", {}).get(s) for s in out):
        return None
    return out


def _params(name: str, seed: int, sizes: Mapping[str, int], max_files: int, extra: Mapping[str, Any] | None,
            sources: Mapping[str, SourceSet] | None) -> dict[str, Any]:
    p: dict[str, Any] = {
        "dataset": name,
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "sizes": {s: int(sizes.get(s, 0)) for s in SPLITS},
        "max_files": max_files,
        "python": f"{sys.version_info[0]}.{sys.version_info[1]}",
        "stdlib": _stdlib_dir(),
        "sources": "auto" if sources is None else _fingerprint(sources),
    }
    if extra:
        p.update(extra)
    return p


def _fingerprint(sources: Mapping[str, SourceSet]) -> str:
    h = hashlib.sha256()
    for k in sorted(sources):
        h.update(k.encode())
        for f in sources[k].files:
            h.update(b"\0" + f.encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:16]


def _label_counts(data: Mapping[str, list[dict[str, Any]]]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for split, rows in data.items():
        c: Counter[str] = Counter()
        for r in rows:
            if "label" in r:
                c[r["label"]] += 1
            else:
                for sp in r.get("spans", []):
                    c[sp["label"]] += 1
                if not r.get("spans"):
                    c["(none)"] += 1
        out[split] = dict(sorted(c.items()))
    return out


def _cached_build(
    name: str,
    params: dict[str, Any],
    cache_dir: str | os.PathLike[str] | None,
    use_cache: bool,
    build: Callable[[], tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]],
) -> dict[str, list[dict[str, Any]]]:
    folder = Path(cache_dir).expanduser() / name if cache_dir is not None else default_cache_dir() / name
    if use_cache:
        cached = _read_cached(folder, params)
        if cached is not None:
            return cached
    t0 = time.perf_counter()
    data, info = build()
    manifest = {
        "dataset": name,
        "params": params,
        "splits": list(data),
        "counts": {s: len(rows) for s, rows in data.items()},
        "label_counts": _label_counts(data),
        "files": {s: {"jsonl": f"{s}.jsonl", "csv": f"{s}.csv"} for s in data},
        "source_files": info.get("source_files", {}),
        "searched": info.get("searched", {}),
        "build_seconds": round(time.perf_counter() - t0, 3),
        "description": _DESCRIPTIONS[name],
    }
    if "details" in info:
        manifest["details"] = info["details"]
    if use_cache:
        _write_dataset(folder, name, data, manifest)
    return data


def _info(sources: Mapping[str, SourceSet], kinds: Iterable[str]) -> dict[str, Any]:
    kinds = [k for k in kinds if k in sources]
    return {
        "source_files": {
            k: {s: sum(1 for f in sources[k].files if split_for(f) == s) for s in SPLITS} for k in kinds
        },
        "searched": {k: sources[k].searched for k in kinds},
    }


# ---------------------------------------------------------------------------------------------
# dataset builders
# ---------------------------------------------------------------------------------------------

_Sizes = Mapping[str, int] | None


def _sources(sources: Mapping[str, SourceSet] | None, max_files: int) -> Mapping[str, SourceSet]:
    return discover_sources(max_files) if sources is None else sources


def build_text_kind(
    cache_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    sizes: _Sizes = None,
    *,
    max_files: int = 300,
    use_cache: bool = True,
    sources: Mapping[str, SourceSet] | None = None,
    _reader: _Reader | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """``text_kind``: split -> rows ``{text, label, source}``, label in :data:`TEXT_KIND_LABELS`.

    ``sizes`` gives rows *per class* per split (default :data:`DEFAULT_CLASS_SIZES`).  With
    ``use_cache`` the result is read from / written to ``cache_dir/text_kind``.
    """
    sizes = dict(DEFAULT_CLASS_SIZES if sizes is None else sizes)
    params = _params("text_kind", seed, sizes, max_files, None, sources)

    def build() -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
        src = _sources(sources, max_files)
        for kind in ("python", "c_header", "shell"):
            _require(src, kind, "text_kind")
        if not (src.get("prose") and src["prose"].files) and not (src.get("docstring") and src["docstring"].files):
            _require(src, "prose", "text_kind")
        reader = _reader or _Reader()
        parts = {
            "python": [("python", src["python"])],
            "c_header": [("c_header", src["c_header"])],
            "shell": [("shell", src["shell"])],
            "prose": [(k, src[k]) for k in ("prose", "docstring") if k in src],
        }
        pools = _dedup_across({c: _pools(reader, parts[c], CLASSIFY_CHUNKS) for c in TEXT_KIND_LABELS})
        rows = _balanced_rows(pools, sizes, seed, "text_kind", "text_kind", prefer=lambda sn: _half(sn) == 0)
        return rows, _info(src, ["python", "c_header", "shell", "prose", "docstring"])

    return _cached_build("text_kind", params, cache_dir, use_cache, build)


def _half(sn: _Snippet) -> int:
    """0 or 1 from a hash of the snippet text: text_kind prefers half 0, code_language half 1."""
    return int(_hash_unit("half", normalize_key(sn.text)) < 0.5)


def build_code_language(
    cache_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    sizes: _Sizes = None,
    *,
    min_files: int = 20,
    max_files: int = 300,
    use_cache: bool = True,
    sources: Mapping[str, SourceSet] | None = None,
    _reader: _Reader | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """``code_language``: split -> rows ``{text, label, source}``, label a language in
    :data:`CODE_LANGUAGES` that has at least ``min_files`` source files here.

    Raises :class:`DatasetBuildError` when fewer than two languages are available.  Snippets
    come from the same file pools as ``text_kind`` but prefer the other half of the snippets
    (by a text hash), so the two datasets overlap as little as the pools allow.
    """
    sizes = dict(DEFAULT_CLASS_SIZES if sizes is None else sizes)
    params = _params("code_language", seed, sizes, max_files, {"min_files": min_files}, sources)
    kind_of = {"python": "python", "c": "c_header", "shell": "shell", "perl": "perl"}

    def build() -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
        src = _sources(sources, max_files)

        def n_files(lang: str) -> int:
            return len(src[kind_of[lang]].files) if kind_of[lang] in src else 0

        present = [lang for lang in CODE_LANGUAGES if n_files(lang) >= min_files]
        if len(present) < 2:
            missing = [lang for lang in CODE_LANGUAGES if lang not in present]
            detail = "; ".join(
                f"{lang}: {n_files(lang)} file(s) in "
                + ", ".join(src[kind_of[lang]].searched if kind_of[lang] in src else _expand_roots(kind_of[lang]))
                for lang in missing
            )
            raise DatasetBuildError(
                f"code_language: need at least 2 languages with >= {min_files} files each, "
                f"found {present or 'none'}; missing: {detail}"
            )
        reader = _reader or _Reader()
        pools = _dedup_across(
            {lang: _pools(reader, [(kind_of[lang], src[kind_of[lang]])], CLASSIFY_CHUNKS) for lang in present}
        )
        rows = _balanced_rows(pools, sizes, seed, "code_language", "code_language", prefer=lambda sn: _half(sn) == 1)
        return rows, _info(src, [kind_of[lang] for lang in present])

    return _cached_build("code_language", params, cache_dir, use_cache, build)


def build_entities(
    cache_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    sizes: _Sizes = None,
    *,
    none_fraction: float = 0.2,
    max_files: int = 300,
    use_cache: bool = True,
    sources: Mapping[str, SourceSet] | None = None,
    _reader: _Reader | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """``entities``: split -> rows ``{text, spans, words, word_offsets, tags, source}``.

    ``sizes`` gives total rows per split (default :data:`DEFAULT_ENTITY_SIZES`); about
    ``none_fraction`` of them have no entity.  Rows with entities are drawn round-robin over
    the labels (a snippet holding the rarest-so-far label first), so rare labels such as DATE
    and VERSION are represented.
    """
    sizes = dict(DEFAULT_ENTITY_SIZES if sizes is None else sizes)
    params = _params("entities", seed, sizes, max_files, {"none_fraction": none_fraction}, sources)

    def build() -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
        src = _sources(sources, max_files)
        if not any(k in src and src[k].files for k in ("prose", "docstring")):
            _require(src, "prose", "entities")
        reader = _reader or _Reader()
        parts = [(k, src[k]) for k in ("prose", "docstring") if k in src]
        pools = _dedup_across({"prose": _pools(reader, parts, ENTITY_CHUNKS)})["prose"]
        out: dict[str, list[dict[str, Any]]] = {}
        for split in SPLITS:
            want = int(sizes.get(split, 0))
            ranked = _rank(pools[split], seed, f"entities:{split}")
            with_ent: list[tuple[_Snippet, list[Span]]] = []
            without: list[tuple[_Snippet, list[Span]]] = []
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
        return out, _info(src, ["prose", "docstring"])

    return _cached_build("entities", params, cache_dir, use_cache, build)


def _round_robin_by_label(
    rows: Sequence[tuple[_Snippet, list[Span]]], n: int
) -> list[tuple[_Snippet, list[Span]]]:
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
    sizes: _Sizes = None,
    *,
    max_files: int = 300,
    use_cache: bool = True,
    sources: Mapping[str, SourceSet] | None = None,
    _reader: _Reader | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """``domains``: split -> rows ``{text, label, source}``, label in :data:`DOMAIN_LABELS`.

    Longer snippets (about 200-700 characters) for causal-LM domain adapters and a router:
    ``code`` is Python source, ``prose`` is licence/documentation text and docstrings,
    ``shell`` is shell scripts.  ``sizes`` is rows per domain per split.
    """
    sizes = dict(DEFAULT_CLASS_SIZES if sizes is None else sizes)
    params = _params("domains", seed, sizes, max_files, None, sources)

    def build() -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
        src = _sources(sources, max_files)
        _require(src, "python", "domains")
        _require(src, "shell", "domains")
        if not any(k in src and src[k].files for k in ("prose", "docstring")):
            _require(src, "prose", "domains")
        reader = _reader or _Reader()
        parts = {
            "code": [("python", src["python"])],
            "prose": [(k, src[k]) for k in ("prose", "docstring") if k in src],
            "shell": [("shell", src["shell"])],
        }
        pools = _dedup_across({d: _pools(reader, parts[d], DOMAIN_CHUNKS) for d in DOMAIN_LABELS})
        rows = _balanced_rows(pools, sizes, seed, "domains", "domains")
        return rows, _info(src, ["python", "shell", "prose", "docstring"])

    return _cached_build("domains", params, cache_dir, use_cache, build)


#: Default rows *per class* per split for ``licences`` (shrunk to what every kept family has).
DEFAULT_LICENCE_SIZES: dict[str, int] = {"train": 200, "validation": 40, "test": 80}


def build_licences(
    cache_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    sizes: _Sizes = None,
    *,
    min_files: int = 8,
    min_snippets: int = 2,
    max_files: int = 1000,
    use_cache: bool = True,
    sources: Mapping[str, SourceSet] | None = None,
    _reader: _Reader | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """``licences``: split -> rows ``{text, label, source}``, label a licence family in
    :data:`LICENCE_FAMILIES`, text 1-3 sentences (at most 400 characters) of licence text.

    Read from Debian machine-readable copyright files (``/usr/share/doc/*/copyright``, the
    ``copyright`` entry of ``sources`` when given): every ``License:`` field with a body is parsed
    (:func:`parse_dep5`), its short id mapped to a family (:func:`licence_family`; compound and
    unknown ids are skipped) and its body cut into snippets with no family name in them
    (:func:`licence_snippets`).  ``source`` is the copyright file, which decides the split.  A text
    found under two families is dropped; repeats are kept once, test split first.  A family is
    used when at least ``min_files`` copyright files have a body of it and it has at least
    ``min_snippets`` distinct snippets in every requested split.  ``sizes`` is rows per family
    per split (default :data:`DEFAULT_LICENCE_SIZES`), shrunk to the smallest family's count
    when needed; the manifest's ``details`` record what was kept, asked for and available.
    Raises :class:`DatasetBuildError` when fewer than three families qualify.
    """
    sizes = dict(DEFAULT_LICENCE_SIZES if sizes is None else sizes)
    given = {"copyright": sources["copyright"]} if sources is not None and "copyright" in sources else None
    params = _params(
        "licences", seed, sizes, max_files, {"min_files": min_files, "min_snippets": min_snippets}, given
    )

    def build() -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
        src = given if given is not None else discover_sources(max_files, kinds=("copyright",))
        ss = _require(src, "copyright", "licences")
        reader = _reader or _Reader()
        files_of: dict[str, set[str]] = defaultdict(set)
        raw: dict[str, dict[str, list[_Snippet]]] = {fam: {s: [] for s in SPLITS} for fam in LICENCE_FAMILIES}
        for path in ss.files:
            split = split_for(path)
            for fam, _ in reader.dep5_licences(path):
                files_of[fam].add(path)
            for i, (fam, text) in enumerate(reader.licence_snippets(path, LICENCE_CHUNKS)):
                raw[fam][split].append(_Snippet(text, path, i))
        # a text seen under two families has no single label: drop it everywhere
        fams_of_key: dict[str, set[str]] = defaultdict(set)
        for fam, by_split in raw.items():
            for pool in by_split.values():
                for sn in pool:
                    fams_of_key[normalize_key(sn.text)].add(fam)
        ambiguous = {k for k, fams in fams_of_key.items() if len(fams) > 1}
        pools = _dedup_across(
            {
                fam: {s: [sn for sn in pool if normalize_key(sn.text) not in ambiguous] for s, pool in by_split.items()}
                for fam, by_split in raw.items()
            }
        )
        asked = [s for s in SPLITS if int(sizes.get(s, 0)) > 0]
        avail = {fam: {s: len(pools[fam][s]) for s in SPLITS} for fam in LICENCE_FAMILIES}
        dropped: dict[str, str] = {}
        for fam in LICENCE_FAMILIES:
            if len(files_of[fam]) < min_files:
                dropped[fam] = f"{len(files_of[fam])} file(s) < {min_files}"
            elif any(avail[fam][s] < min_snippets for s in asked):
                short = [f"{s} {avail[fam][s]}" for s in asked if avail[fam][s] < min_snippets]
                dropped[fam] = f"snippets {', '.join(short)} < {min_snippets}"
        kept = [fam for fam in LICENCE_FAMILIES if fam not in dropped]
        if len(kept) < 3:
            detail = "; ".join(
                f"{fam}: {len(files_of[fam])} file(s), snippets "
                + "/".join(str(avail[fam][s]) for s in SPLITS)
                for fam in LICENCE_FAMILIES
                if files_of[fam]
            )
            raise DatasetBuildError(
                f"licences: need at least 3 licence families with >= {min_files} copyright files and "
                f">= {min_snippets} distinct snippets in each split (train/validation/test), found "
                f"{kept or 'none'} among {len(ss.files)} copyright file(s) in "
                f"{', '.join(s + '/*/copyright' for s in ss.searched) or '(nothing)'}; "
                f"per family: {detail or 'no DEP-5 licence bodies with a known family'}"
            )
        rows = _balanced_rows({fam: pools[fam] for fam in kept}, sizes, seed, "licences", "licences")
        per_class = {s: len(rows[s]) // len(kept) for s in SPLITS}
        info = _info(src, ["copyright"])
        info["details"] = {
            "families": kept,
            "requested_per_class": {s: int(sizes.get(s, 0)) for s in SPLITS},
            "rows_per_class": per_class,
            "shrunk": [s for s in SPLITS if per_class[s] < int(sizes.get(s, 0))],
            "family_files": {fam: len(files_of[fam]) for fam in LICENCE_FAMILIES},
            "family_snippets": avail,
            "dropped_families": dropped,
            "ambiguous_texts_dropped": len(ambiguous),
        }
        return rows, info

    return _cached_build("licences", params, cache_dir, use_cache, build)


def _man_label_pools(
    files: Mapping[str, Sequence[str]],
    snippets_of: Callable[[str], list[str]],
    sizes: Mapping[str, int],
    min_files: int,
    min_snippets: int,
) -> tuple[dict[str, dict[str, list[_Snippet]]], dict[str, int], dict[str, dict[str, int]], dict[str, str], list[str]]:
    """Snippet pools of man-page datasets: ``files`` label -> pages; returns (pools per label and split, pages
    giving snippets per label, snippets available per label and split, dropped label -> reason, kept labels).

    A page's snippets all go to its split (:func:`split_for`); repeats are kept once, test split first; a label is
    dropped with fewer than ``min_files`` pages giving snippets or fewer than ``min_snippets`` in a requested split.
    """
    raw: dict[str, dict[str, list[_Snippet]]] = {label: {s: [] for s in SPLITS} for label in files}
    pages: dict[str, int] = {}
    for label, paths in files.items():
        used = 0
        for path in paths:
            snippets = snippets_of(path)
            used += bool(snippets)
            raw[label][split_for(path)].extend(_Snippet(text, path, i) for i, text in enumerate(snippets))
        pages[label] = used
    pools = _dedup_across(raw)
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


def _class_counts(rows: Mapping[str, list[dict[str, Any]]], kept: Sequence[str], sizes: Mapping[str, int]
                  ) -> dict[str, Any]:
    """Manifest details of a balanced class dataset: rows per class asked for and written, splits shrunk."""
    per_class = {s: len(rows[s]) // len(kept) for s in SPLITS}
    return {"requested_per_class": {s: int(sizes.get(s, 0)) for s in SPLITS}, "rows_per_class": per_class,
            "shrunk": [s for s in SPLITS if per_class[s] < int(sizes.get(s, 0))]}


def build_man_sections(
    cache_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    sizes: _Sizes = None,
    *,
    min_files: int = 40,
    min_snippets: int = 2,
    max_files: int = 300,
    use_cache: bool = True,
    sources: Mapping[str, SourceSet] | None = None,
    _reader: _Reader | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """``man_sections``: split -> rows ``{text, label, source}``, label the manual section of the
    man page the text comes from (:data:`MAN_SECTIONS`: ``user_commands`` = man1, ``system_calls``
    = man2, ``library`` = man3, ``file_formats`` = man5, ``overview`` = man7, ``admin_commands`` =
    man8), text 3-12 consecutive lines (at most 400 characters) of the page rendered to plain text.

    Pages come from ``/usr/share/man/man<N>`` (the ``man<N>`` entries of ``sources`` when given, else
    :func:`discover_sources` with ``max_files`` pages per section; see :func:`_pick_man_pages`), and
    snippets from their SYNOPSIS / DESCRIPTION / OPTIONS bodies (:func:`man_snippets`), so the
    section number never appears in the text: the NAME line, the ``.TH`` header/footer and every
    ``name(N)`` / ``(N)`` cross-reference are left out.  ``source`` is the page, which decides the
    split.  Repeats are kept once, test split first.  A section is used when at least ``min_files``
    of its pages give snippets and it has at least ``min_snippets`` distinct snippets in every
    requested split.  ``sizes`` is rows per section per split (default :data:`DEFAULT_CLASS_SIZES`),
    shrunk to the smallest section's count when needed; the manifest's ``details`` record what was
    kept, asked for and available.  Raises :class:`DatasetBuildError` when fewer than three
    sections qualify, naming the folders searched.
    """
    sizes = dict(DEFAULT_CLASS_SIZES if sizes is None else sizes)
    given = {k: sources[k] for k in MAN_KINDS if k in sources} if sources is not None else {}
    params = _params(
        "man_sections", seed, sizes, max_files, {"min_files": min_files, "min_snippets": min_snippets},
        given or None,
    )

    def build() -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
        src = given or discover_sources(max_files, kinds=MAN_KINDS)
        reader = _reader or _Reader()
        files = {label: (src[f"man{num}"].files if f"man{num}" in src else []) for label, num in MAN_SECTIONS.items()}
        pools, pages, avail, dropped, kept = _man_label_pools(
            files, lambda path: reader.man_snippets(path, MAN_CHUNKS), sizes, min_files, min_snippets)
        searched = [d for k in MAN_KINDS for d in (src[k].searched if k in src else _expand_roots(k))]
        if len(kept) < 3:
            detail = "; ".join(f"{label} (man{num}): {dropped[label]}" for label, num in MAN_SECTIONS.items()
                               if label in dropped)
            raise DatasetBuildError(
                f"man_sections: need at least 3 manual sections with >= {min_files} man pages giving "
                f"snippets and >= {min_snippets} distinct snippets in each split, found {kept or 'none'}; "
                f"{detail}; searched: {', '.join(searched) or '(nothing)'}"
            )
        rows = _balanced_rows({label: pools[label] for label in kept}, sizes, seed, "man_sections", "man_sections")
        info = _info(src, list(MAN_KINDS))
        info["details"] = {
            "sections": kept,
            "section_numbers": {label: MAN_SECTIONS[label] for label in kept},
            **_class_counts(rows, kept, sizes),
            "section_pages": pages,
            "section_snippets": avail,
            "dropped_sections": dropped,
        }
        return rows, info

    return _cached_build("man_sections", params, cache_dir, use_cache, build)


def build_man_languages(
    cache_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    sizes: _Sizes = None,
    *,
    min_files: int = 40,
    min_snippets: int = 2,
    max_files: int = 300,
    use_cache: bool = True,
    sources: Mapping[str, SourceSet] | None = None,
    _reader: _Reader | None = None,
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
    split (default :data:`DEFAULT_CLASS_SIZES`), shrunk to the smallest language's count when
    needed; the manifest's ``details`` record what was kept, asked for and available.  Raises
    :class:`DatasetBuildError` when fewer than three languages qualify, naming the folders searched.
    """
    sizes = dict(DEFAULT_CLASS_SIZES if sizes is None else sizes)
    prefix = "man_"
    given = (
        {k: sources[k] for k in sources if k.startswith(prefix) and k[len(prefix):] in MAN_LANGUAGES}
        if sources is not None else {}
    )
    params = _params(
        "man_languages", seed, sizes, max_files, {"min_files": min_files, "min_snippets": min_snippets},
        given or None,
    )

    def build() -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
        src = given or discover_man_languages(max_files)
        langs = sorted(k[len(prefix):] for k in src)
        reader = _reader or _Reader()
        pools, pages, avail, dropped, kept = _man_label_pools(
            {lang: src[prefix + lang].files for lang in langs},
            lambda path: reader.man_language_snippets(path, MAN_CHUNKS), sizes, min_files, min_snippets)
        if len(kept) < 3:
            searched = [d for k in sorted(src) for d in src[k].searched] or _expand_roots("man_languages")
            detail = "; ".join(f"{lang}: {dropped[lang]}" for lang in langs if lang in dropped)
            raise DatasetBuildError(
                f"man_languages: need at least 3 languages with >= {min_files} translated man pages giving "
                f"snippets and >= {min_snippets} distinct snippets in each split, found {kept or 'none'}; "
                f"{detail or 'no translated man pages in a Latin-script language'}; "
                f"searched: {', '.join(searched) or '(nothing)'}"
            )
        rows = _balanced_rows({lang: pools[lang] for lang in kept}, sizes, seed, "man_languages", "man_languages")
        info = _info(src, sorted(src))
        info["details"] = {
            "languages": kept,
            **_class_counts(rows, kept, sizes),
            "language_pages": pages,
            "language_snippets": avail,
            "dropped_languages": dropped,
        }
        return rows, info

    return _cached_build("man_languages", params, cache_dir, use_cache, build)


_BUILDERS: dict[str, Callable[..., dict[str, list[dict[str, Any]]]]] = {
    "text_kind": build_text_kind,
    "code_language": build_code_language,
    "entities": build_entities,
    "domains": build_domains,
    "licences": build_licences,
    "man_sections": build_man_sections,
    "man_languages": build_man_languages,
}


def build_dataset(name: str, **kwargs: Any) -> dict[str, list[dict[str, Any]]]:
    """Build (or read from cache) one dataset by name; ``kwargs`` go to its ``build_*`` function."""
    if name not in _BUILDERS:
        raise DatasetBuildError(f"unknown dataset {name!r}; choose from {', '.join(DATASET_NAMES)}")
    return _BUILDERS[name](**kwargs)


def build_all(
    cache_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    sizes: _Sizes = None,
    entity_sizes: _Sizes = None,
    domain_sizes: _Sizes = None,
    licence_sizes: _Sizes = None,
    man_sizes: _Sizes = None,
    *,
    max_files: int = 300,
    licence_max_files: int = 1000,
    man_max_files: int = 300,
    use_cache: bool = True,
    sources: Mapping[str, SourceSet] | None = None,
) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Build (or read from cache) the six datasets other than ``man_languages`` (which needs
    translated man pages, often not installed; build it with :func:`build_dataset`): name -> split -> rows.

    ``sizes`` is per class for ``text_kind`` and ``code_language``, ``domain_sizes`` per
    domain (defaults to ``sizes``), ``licence_sizes`` per licence family (defaults to ``sizes``,
    else :data:`DEFAULT_LICENCE_SIZES`), ``entity_sizes`` total per split.  ``licences`` reads up
    to ``licence_max_files`` copyright files (or ``sources["copyright"]`` when present): it needs
    all of them, as licence bodies repeat a lot.  ``man_sections`` reads up to ``man_max_files``
    pages per manual section (or the ``man<N>`` entries of ``sources`` when present), ``man_sizes``
    rows per section (defaults to ``sizes``, else :data:`DEFAULT_CLASS_SIZES`).  Source discovery
    and file reading are shared between the datasets.
    """
    reader = _Reader()  # discovery is memoised per process; the reader shares parsed files
    common: dict[str, Any] = dict(
        cache_dir=cache_dir, seed=seed, max_files=max_files, use_cache=use_cache, sources=sources, _reader=reader
    )
    return {
        "text_kind": build_text_kind(sizes=sizes, **common),
        "code_language": build_code_language(sizes=sizes, **common),
        "entities": build_entities(sizes=entity_sizes, **common),
        "domains": build_domains(sizes=domain_sizes if domain_sizes is not None else sizes, **common),
        "licences": build_licences(
            sizes=licence_sizes if licence_sizes is not None else sizes,
            **dict(common, max_files=licence_max_files),
        ),
        "man_sections": build_man_sections(
            sizes=man_sizes if man_sizes is not None else sizes,
            **dict(common, max_files=man_max_files),
        ),
    }


# ---------------------------------------------------------------------------------------------
# documentation
# ---------------------------------------------------------------------------------------------

_DESCRIPTIONS: dict[str, str] = {
    "text_kind": (
        "**text_kind** (labels `python`, `c_header`, `shell`, `prose`): snippets of 3-12 lines and "
        "at most 400 characters cut from Python standard-library modules, C headers under "
        "`/usr/include`, shell scripts (`#!/bin/sh`/`#!/bin/bash` files and `*.sh` under `/usr/bin`, "
        "`/usr/sbin`, `/etc`, `/usr/share`) and English prose (sentences from "
        "`/usr/share/common-licenses`, `README*`/`copyright` files in `/usr/share/doc`, and stdlib "
        "docstrings found by a small Python lexer). Code snippets must be mostly code lines (comments, "
        "licence headers, docstrings and punctuation-only lines do not count); prose snippets must "
        "read as English sentences. Default 300/50/100 rows per class for train/validation/test."
    ),
    "code_language": (
        "**code_language** (labels: whichever of `python`, `c`, `shell`, `perl` have at least 20 "
        "files here; Perl modules come from `/usr/share/perl*`): code-only snippets chunked like "
        "`text_kind`, preferring the half of the snippets (by a text hash) that `text_kind` does "
        "not prefer, so the two datasets overlap little. Building fails with a clear error if fewer "
        "than two languages are available. Default 300/50/100 rows per class."
    ),
    "entities": (
        "**entities** (BIO tags over `NUMBER`, `DATE`, `URL`, `EMAIL`, `VERSION`, `PATH`): 1-3 "
        "English sentences (at most 300 characters) from the same prose sources, tagged by precise "
        "regular expressions applied in priority order URL > EMAIL > PATH > DATE > VERSION > "
        "NUMBER (dates must be real calendar dates; versions are `1.2.3`, `v2.0` or the number "
        "after the word \"version\"; paths need two components). Rows carry character spans, "
        "words (word characters or single punctuation marks, cut at span boundaries), word "
        "offsets and BIO tags. About 80% of rows contain an entity, drawn round-robin over labels "
        "so rare labels appear; 20% contain none. Default 1000/150/300 rows. Labels are silver "
        "(regex-made), not human annotations."
    ),
    "domains": (
        "**domains** (labels `code`, `prose`, `shell`) for causal-LM domain adapters and a router: "
        "longer snippets of about 150-700 characters (5-24 lines of code with at least 150 "
        "non-space characters, or 200-700 characters of prose in up to 10 sentences): Python stdlib code, licence/documentation prose and docstrings, and shell "
        "scripts. Default 300/50/100 rows per domain."
    ),
    "licences": (
        "**licences** (labels: licence families `gpl`, `lgpl`, `agpl`, `bsd`, `mit`, `apache`, `boost`, "
        "`public-domain`, `zlib`, `isc`, `cc0`, `mpl`, `artistic`, whichever have enough data here): "
        "1-3 sentences (40-400 characters) of licence text from Debian machine-readable (DEP-5) "
        "copyright files `/usr/share/doc/*/copyright` (files without a `Format:` header are skipped, "
        "identical copies read once; up to 1000 files). Every `License:` field with a body (stand-alone "
        "licence paragraphs, `Files:` paragraphs and the header) is read: the first line is the short "
        "id, which gives the label, and the indented continuation lines (` .` = blank line) are the "
        "text. Ids map to families by exact rules: `GPL`, `GPL-2+`, `GPLv3+`, `GPL-2.0-or-later` are "
        "`gpl` (never LGPL/AGPL, which have their own families); `BSD`, `BSD-1-clause` to "
        "`BSD-4-clause` are `bsd`; `MIT`, `Expat`, `X11` are `mit`; `Apache-2.0` is `apache`; `BSL-1.0` "
        "is `boost`; `public-domain`/`PD`; `Zlib`; `ISC`; `CC0-1.0`; `MPL-2.0`; `Artistic`. Compound "
        "ids (`A or B`, `A and B`, `A with X exception`) and other ids are skipped. **The label is "
        "never spelled out in the text**: every sentence naming any family (`GPL`, `General Public`, "
        "`Lesser`, `Library General`, `Affero`, `BSD`, `MIT`, `Expat`, `X11`, `Apache`, `Boost`, "
        "`BSL`, `public domain`, `zlib`, `ISC`, `CC0`, `Creative Commons`, `MPL`, `Mozilla Public`, "
        "`Artistic`; case-insensitive), so also `/usr/share/common-licenses/GPL-2` pointers and "
        "licence URLs, is removed, as are copyright notices and comment marks (`#`, `*`, `//`), and "
        "snippets are runs of the remaining consecutive sentences. A text found under two families "
        "(mislabelled bodies exist) is dropped. The split is decided by the copyright file. A "
        "family is kept if at least 8 copyright files have a body of it and it has at least 2 "
        "distinct snippets in every split; building fails if fewer than 3 families qualify. "
        "Default 200/40/80 rows per family, cut to the smallest family's count: licence bodies are "
        "mostly the same boilerplate, so after deduplication this dataset is small (the manifest's "
        "`details` record the families kept and dropped, the snippets available and the rows per "
        "class)."
    ),
    "man_sections": (
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
    ),
    "man_languages": (
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
    ),
}

_COMMON_DESCRIPTION = (
    "All datasets are built at run time from files already installed on the machine (nothing is "
    "downloaded or shipped with loraplex) and cached as JSONL and CSV with a `manifest.json` of "
    "the build parameters under `~/.cache/loraplex/data` (override with `cache_dir=` or "
    "`LORAPLEX_CACHE`, which sets the cache root, data going to `$LORAPLEX_CACHE/data`). At most "
    "300 files per source kind are read, picked by a hash of the path. **Splits are by source "
    "file**: a hash of each file's path sends all of its snippets to train (70% of files), "
    "validation (10%) or test (20%), and every row records its `source` path. Identical snippets "
    "(ignoring case and whitespace) are kept once, in the test split first, so no text repeats "
    "across splits. Classes are balanced in every split, sampling goes round-robin over files, and "
    "everything is deterministic given the seed and the installed files, so the exact texts differ "
    "between machines."
)


def describe_datasets() -> str:
    """Markdown text (one paragraph per dataset, plus the shared rules) for the README."""
    return "\n\n".join([_COMMON_DESCRIPTION, *(_DESCRIPTIONS[n] for n in DATASET_NAMES)]) + "\n"
