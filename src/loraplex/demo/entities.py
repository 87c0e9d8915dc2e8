"""Silver entity tags of English prose: the entity regexes, non-overlapping spans, words and BIO tags.

Entities are found by precise regular expressions applied in :data:`ENTITY_LABELS` priority order (URL before
EMAIL before PATH before DATE before VERSION before NUMBER). Words are runs of word characters or single
punctuation marks, cut at span boundaries, so every span covers whole words; a span's words are tagged
``B-LABEL I-LABEL ...``. The ``entities`` dataset that uses these rows is built in :mod:`loraplex.demo.prose`.
"""

from __future__ import annotations

import datetime as _dt
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from loraplex.tokens import tokenize_words

#: Entity types of the ``entities`` dataset, in tagging priority order (earlier wins overlaps).
ENTITY_LABELS: tuple[str, ...] = ("URL", "EMAIL", "PATH", "DATE", "VERSION", "NUMBER")

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

#: :data:`ENTITY_PATTERNS` compiled.
ENTITY_REGEXES: dict[str, re.Pattern[str]] = {label: re.compile(p) for label, p in ENTITY_PATTERNS.items()}

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
        for m in ENTITY_REGEXES[label].finditer(text):
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

