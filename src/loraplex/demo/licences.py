"""Licence texts as demo data: Debian machine-readable copyright files (DEP-5), licence families of their short
ids, licence snippets that never name a family, and the ``licences`` dataset.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

from loraplex.demo.cache import build_params, cached_build, source_info
from loraplex.demo.sampling import Sizes, Snippet, balanced_rows, dedup_across
from loraplex.demo.sources import SourceSet, discover_sources, require_source
from loraplex.demo.text import (SPLITS, ChunkParams, DatasetBuildError, Reader, chunk_sentences, is_english_prose,
                                normalize_key, paragraphs_of, read_text, split_for, split_sentences)

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
# snippets of one copyright file (kept in the build's reader)
# ---------------------------------------------------------------------------------------------

#: Debian copyright files can be large (one for Boost is about 2 MB); they are still read whole.
_MAX_COPYRIGHT_BYTES = 8_000_000

#: One to three sentences of licence text for ``licences``.
LICENCE_CHUNKS = ChunkParams(min_lines=1, max_lines=1, max_chars=400, min_chars=40, max_sentences=3)


def dep5_licences(reader: Reader, path: str) -> list[tuple[str, str]]:
    """``(family, body)`` of every licence body with a family in a DEP-5 copyright file, in file order."""

    def compute() -> list[tuple[str, str]]:
        text = read_text(path, _MAX_COPYRIGHT_BYTES)
        pairs = [] if text is None else parse_dep5(text)
        return [(fam, body) for lid, body in pairs if (fam := licence_family(lid)) is not None]

    return reader.memo(("dep5", path), compute)


def licence_file_snippets(reader: Reader, path: str, p: ChunkParams) -> list[tuple[str, str]]:
    """``(family, snippet)`` pairs of a DEP-5 copyright file, in file order (see :func:`licence_snippets`)."""
    return reader.memo(("licence", path, p), lambda: [
        (fam, sn)
        for fam, body in dep5_licences(reader, path)
        for sn in licence_snippets(body, min_chars=p.min_chars, max_chars=p.max_chars, max_sentences=p.max_sentences)
    ])


# ---------------------------------------------------------------------------------------------
# the licences dataset
# ---------------------------------------------------------------------------------------------

#: Default rows *per class* per split for ``licences`` (shrunk to what every kept family has).
DEFAULT_LICENCE_SIZES: dict[str, int] = {"train": 200, "validation": 40, "test": 80}

LICENCES_DESCRIPTION = (
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
)


def build_licences(
    cache_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    sizes: Sizes = None,
    *,
    min_files: int = 8,
    min_snippets: int = 2,
    max_files: int = 1000,
    use_cache: bool = True,
    sources: Mapping[str, SourceSet] | None = None,
    reader: Reader | None = None,
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
    params = build_params(
        "licences", seed, sizes, max_files, {"min_files": min_files, "min_snippets": min_snippets}, given
    )

    def build() -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
        src = given if given is not None else discover_sources(max_files, kinds=("copyright",))
        ss = require_source(src, "copyright", "licences")
        read = reader or Reader()
        files_of: dict[str, set[str]] = defaultdict(set)
        raw: dict[str, dict[str, list[Snippet]]] = {fam: {s: [] for s in SPLITS} for fam in LICENCE_FAMILIES}
        for path in ss.files:
            split = split_for(path)
            for fam, _ in dep5_licences(read, path):
                files_of[fam].add(path)
            for i, (fam, text) in enumerate(licence_file_snippets(read, path, LICENCE_CHUNKS)):
                raw[fam][split].append(Snippet(text, path, i))
        # a text seen under two families has no single label: drop it everywhere
        fams_of_key: dict[str, set[str]] = defaultdict(set)
        for fam, by_split in raw.items():
            for pool in by_split.values():
                for sn in pool:
                    fams_of_key[normalize_key(sn.text)].add(fam)
        ambiguous = {k for k, fams in fams_of_key.items() if len(fams) > 1}
        pools = dedup_across(
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
        rows = balanced_rows({fam: pools[fam] for fam in kept}, sizes, seed, "licences", "licences")
        per_class = {s: len(rows[s]) // len(kept) for s in SPLITS}
        info = source_info(src, ["copyright"])
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

    return cached_build("licences", params, cache_dir, use_cache, build, LICENCES_DESCRIPTION)
