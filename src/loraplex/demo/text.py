"""What every demo dataset shares: splits by source file, snippet keys, chunking of code lines and prose
sentences, the English-prose check, reading files, snippet size limits and the per-build file memo.

Train / validation / test are drawn from *disjoint source files*: a hash of the file path decides the split of
every snippet taken from that file (:func:`split_for`).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from loraplex.demo.entities import ENTITY_REGEXES
from loraplex.errors import LoraplexError

#: Split names, in the order they are written.
SPLITS: tuple[str, ...] = ("train", "validation", "test")
#: Fraction of *source files* that go to each split (decided by a hash of the path).
SPLIT_FRACTIONS: tuple[tuple[str, float], ...] = (("train", 0.7), ("validation", 0.1), ("test", 0.2))
#: Files larger than this many bytes are not read (:func:`read_text`).
MAX_FILE_BYTES = 200_000

_SPLIT_SALT = "loraplex-split-v1"
_URL_RE = ENTITY_REGEXES["URL"]
_EMAIL_RE = ENTITY_REGEXES["EMAIL"]
_PATH_RE = ENTITY_REGEXES["PATH"]

T = TypeVar("T")


class DatasetBuildError(LoraplexError, ValueError):
    """A dataset cannot be built: a source kind is missing or too small on this machine."""


# ---------------------------------------------------------------------------------------------
# hashing, splitting, keys
# ---------------------------------------------------------------------------------------------


def hash_unit(*parts: object) -> float:
    """Deterministic number in [0, 1) from ``parts`` (stable across runs and machines)."""
    h = hashlib.blake2b("\x1f".join(map(str, parts)).encode("utf-8", "surrogatepass"), digest_size=8)
    return int.from_bytes(h.digest(), "big") / 2**64


def split_for(path: str, fractions: Sequence[tuple[str, float]] = SPLIT_FRACTIONS) -> str:
    """Split name (``train``/``validation``/``test``) of a source file, from a hash of its path."""
    u = hash_unit(_SPLIT_SALT, path)
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
# chunking and filtering
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
# reading files
# ---------------------------------------------------------------------------------------------


def read_text(path: str, limit: int = MAX_FILE_BYTES) -> str | None:
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


class Reader:
    """What one build read from each file (texts, parsed forms, snippets), kept by key.

    :func:`loraplex.demo.datasets.build_all` shares one reader between its datasets, so a file that two datasets
    cut the same way is read and cut once."""

    def __init__(self) -> None:
        self._memo: dict[tuple[Hashable, ...], Any] = {}

    def memo(self, key: tuple[Hashable, ...], compute: Callable[[], T]) -> T:
        """``compute()`` the first time ``key`` is asked for; the kept value after that."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def text(self, path: str) -> str | None:
        """Text of ``path`` (:func:`read_text` with the default size limit)."""
        return self.memo(("text", path), lambda: read_text(path))
