"""Tests for loraplex.demo.corpora: real datasets built from text installed on the machine."""

from __future__ import annotations

import csv
import gzip
import json
import os
import re
import time
from collections import Counter
from pathlib import Path

import pytest

from loraplex.demo import corpora
from loraplex.demo.corpora import (
    CODE_LANGUAGES,
    DOMAIN_LABELS,
    LICENCE_FAMILIES,
    MAN_SECTIONS,
    ENTITY_LABELS,
    SPLITS,
    TEXT_KIND_LABELS,
    DatasetBuildError,
    SourceSet,
    Span,
    bio_labels,
    bio_tags,
    chunk_lines,
    chunk_sentences,
    licence_family,
    licence_snippets,
    man_escapes,
    man_page_sections,
    man_snippets,
    names_licence_family,
    names_man_section,
    normalize_key,
    parse_date,
    parse_dep5,
    python_docstrings,
    scrub_section_refs,
    split_for,
    tag_entities,
    troff_to_text,
)
from loraplex.tokens import tokenize_words

MAX_FILES = 60
SIZES = {"train": 40, "validation": 8, "test": 15}
ENTITY_SIZES = {"train": 80, "validation": 15, "test": 30}


@pytest.fixture(scope="module")
def sources() -> dict[str, SourceSet]:
    return corpora.discover_sources(MAX_FILES)


@pytest.fixture(scope="module")
def datasets(sources, tmp_path_factory) -> dict[str, dict[str, list[dict]]]:
    cache = tmp_path_factory.mktemp("corpora_cache")
    return corpora.build_all(
        cache_dir=cache, seed=0, sizes=SIZES, entity_sizes=ENTITY_SIZES, max_files=MAX_FILES, sources=sources,
        man_max_files=MAX_FILES,
    )


# ------------------------------------------------------------------------------ pure helpers


def test_split_for_is_deterministic_and_proportional() -> None:
    paths = [f"/some/dir/file_{i}.py" for i in range(5000)]
    first = [split_for(p) for p in paths]
    assert first == [split_for(p) for p in paths]
    frac = Counter(first)
    assert set(frac) == set(SPLITS)
    assert abs(frac["train"] / 5000 - 0.7) < 0.03
    assert abs(frac["validation"] / 5000 - 0.1) < 0.02
    assert abs(frac["test"] / 5000 - 0.2) < 0.03


def test_chunk_lines_skips_licence_headers_and_punctuation() -> None:
    text = (
        "# Copyright (c) 2001 Someone\n# Licensed under the Apache License\n# See LICENSE for details\n"
        "# More licence text here\n\n"
        "}\n);\n};\n\n"
        "def add(a, b):\n    total = a + b\n    return total\n"
    )
    mask = corpora.code_mask(text, "python")
    chunks = chunk_lines(text.split("\n"), mask, min_lines=3, max_lines=12, max_chars=400)
    assert chunks == ["def add(a, b):\n    total = a + b\n    return total"]


def test_chunk_lines_respects_bounds() -> None:
    lines = [f"x_{i} = compute({i}) + offset_{i}" for i in range(200)]
    chunks = chunk_lines(lines, None, min_lines=3, max_lines=12, max_chars=400)
    assert len(chunks) > 10
    for ch in chunks:
        n = len(ch.split("\n"))
        assert 3 <= n <= 12 and len(ch) <= 400


def test_c_block_comment_licence_is_not_code() -> None:
    text = "/* This file is part of the GNU C Library.\n   It is free software; you can\n   redistribute it.  */\nint x;\n"
    mask = corpora.code_mask(text, "c")
    assert mask[:3] == [False, False, False] and mask[3] is True


def test_python_docstrings_lexer() -> None:
    src = '"""Module doc."""\nx = """not a doc\n"""\ndef f():\n    \'\'\'Doc of f.\'\'\'\n    return 1  # """ in comment\n'
    lines, docs = python_docstrings(src)
    assert docs == ["Module doc.", "Doc of f."]
    assert lines == [0, 4]


def test_chunk_sentences_never_cuts_sentences() -> None:
    para = "First sentence is here. " * 30 + "A" * 500 + ". Last one."
    for snippet in chunk_sentences([para], min_chars=20, max_chars=120):
        assert len(snippet) <= 120
        assert snippet.endswith(".")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("See https://www.gnu.org/licenses/gpl.html.", [("https://www.gnu.org/licenses/gpl.html", "URL")]),
        ("Mail <bug-gnu@gnu.org> today", [("bug-gnu@gnu.org", "EMAIL")]),
        ("read /usr/share/common-licenses/GPL-2 now", [("/usr/share/common-licenses/GPL-2", "PATH")]),
        ("released 2024-01-31 and on January 5, 2020.", [("2024-01-31", "DATE"), ("January 5, 2020", "DATE")]),
        ("Version 2, June 1991", [("2", "NUMBER"), ("June 1991", "DATE")]),
        ("use v2.0 or 1.2.3-rc1, under version 2.1", [("v2.0", "VERSION"), ("1.2.3-rc1", "VERSION"), ("2.1", "VERSION")]),
        ("costs 1,234.5 units and 42 more", [("1,234.5", "NUMBER"), ("42", "NUMBER")]),
        # negatives: not entities (or not of the tempting label)
        ("and/or TCP/IP libstdc++/4.x", []),
        ("GPL-2 and x86_64 and 3rd and 0x1F", []),
        ("address 192.168.1.10 is not a version", []),
        ("on February 30, 2020 nothing happened", [("30", "NUMBER"), ("2020", "NUMBER")]),
    ],
)
def test_tag_entities_examples(text: str, expected: list[tuple[str, str]]) -> None:
    got = [(text[s.start : s.end], s.label) for s in tag_entities(text)]
    assert got == expected


def test_url_wins_over_path_and_email() -> None:
    text = "clone https://user@example.org/repo/path/x.git please"
    spans = tag_entities(text)
    assert [(text[s.start : s.end], s.label) for s in spans] == [("https://user@example.org/repo/path/x.git", "URL")]


def test_tokenize_and_bio_align_with_spans() -> None:
    text = "Get it from https://a.org/x, e-mail a.b@c.org (v1.2)."
    spans = tag_entities(text)
    words, offsets = tokenize_words(text, spans)
    tags = bio_tags(offsets, spans)
    assert [w for w in words] == [text[s:e] for s, e in offsets]
    by_label = {s.label: s for s in spans}
    assert set(by_label) == {"URL", "EMAIL", "VERSION"}
    url_tags = [t for (s, e), t in zip(offsets, tags) if s >= by_label["URL"].start and e <= by_label["URL"].end]
    assert url_tags[0] == "B-URL" and all(t == "I-URL" for t in url_tags[1:]) and len(url_tags) > 3
    assert tags[words.index("Get")] == "O"


def test_bio_labels() -> None:
    labels = bio_labels()
    assert labels[0] == "O" and len(labels) == 1 + 2 * len(ENTITY_LABELS)
    assert {"B-URL", "I-URL", "B-NUMBER", "I-PATH"} <= set(labels)


# ------------------------------------------------------------------------------ datasets

CLASS_DATASETS = ("text_kind", "code_language", "domains", "licences", "man_sections")


def test_sizes_and_labels(datasets) -> None:
    # build_all builds every dataset but man_languages (translated man pages are often not installed)
    assert set(datasets) == set(corpora.DATASET_NAMES) - {"man_languages"}
    assert set(datasets) == {"text_kind", "code_language", "entities", "domains", "licences", "man_sections"}
    assert {r["label"] for r in datasets["text_kind"]["train"]} == set(TEXT_KIND_LABELS)
    assert {r["label"] for r in datasets["domains"]["train"]} == set(DOMAIN_LABELS)
    langs = {r["label"] for r in datasets["code_language"]["train"]}
    assert len(langs) >= 2 and langs <= set(CODE_LANGUAGES)
    for name in CLASS_DATASETS:
        n_cls = len({r["label"] for r in datasets[name]["train"]})
        for split in SPLITS:
            assert 0 < len(datasets[name][split]) <= SIZES[split] * n_cls


@pytest.mark.parametrize("name", CLASS_DATASETS)
def test_classes_balanced(datasets, name: str) -> None:
    for split in SPLITS:
        counts = Counter(r["label"] for r in datasets[name][split])
        assert len(set(counts.values())) == 1, (split, counts)


@pytest.mark.parametrize("name", ["text_kind", "code_language", "entities", "domains", "licences", "man_sections"])
def test_splits_are_file_disjoint(datasets, name: str) -> None:
    files = {split: {r["source"] for r in datasets[name][split]} for split in SPLITS}
    assert not files["train"] & files["test"]
    assert not files["train"] & files["validation"]
    assert not files["validation"] & files["test"]
    for split in SPLITS:
        for r in datasets[name][split]:
            assert Path(r["source"]).is_file()
            assert split_for(r["source"]) == split


@pytest.mark.parametrize("name", ["text_kind", "code_language", "entities", "domains", "licences", "man_sections"])
def test_no_text_repeats_across_or_within_splits(datasets, name: str) -> None:
    seen: dict[str, str] = {}
    for split in SPLITS:
        for r in datasets[name][split]:
            k = normalize_key(r["text"])
            assert k not in seen, (split, seen.get(k))
            seen[k] = split


def test_snippets_are_bounded_and_texts_come_from_their_source(datasets) -> None:
    for r in datasets["text_kind"]["train"] + datasets["code_language"]["test"]:
        assert len(r["text"]) <= 400
        if r["label"] != "prose":
            lines = r["text"].split("\n")
            assert 3 <= len([ln for ln in lines if ln.strip()]) <= 12
            assert r["text"].split("\n")[0].strip() in Path(r["source"]).read_text(errors="replace").expandtabs(4)
            comment = ("/*", "*", "//") if r["label"] in ("c", "c_header") else ("#",)
            code = [ln for ln in lines if re.search(r"\w", ln) and not ln.strip().startswith(comment)]
            assert len(code) >= 2, r
    for r in datasets["domains"]["train"]:
        assert 150 <= len(r["text"]) <= 700


def test_code_language_has_no_prose_and_differs_from_text_kind(datasets) -> None:
    assert all(r["label"] in CODE_LANGUAGES for s in SPLITS for r in datasets["code_language"][s])
    tk = {r["text"] for r in datasets["text_kind"]["train"]}
    cl = {r["text"] for r in datasets["code_language"]["train"]}
    assert len(tk & cl) < 0.25 * len(cl)


_SHAPES = {
    "URL": re.compile(r"(?:(?:https?|ftp)://|www\.)[A-Za-z0-9]\S*"),
    "EMAIL": re.compile(r"[^@\s]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"),
    "PATH": re.compile(r"~?/[^\s/]+(?:/[^\s/]+)*/?"),
    "VERSION": re.compile(r"v?\d+(?:\.\d+)+(?:[-.]?[a-z]+\d+)?", re.I),
    "NUMBER": re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?"),
}


def test_entity_rows_are_consistent(datasets) -> None:
    total = none = 0
    labels_seen: set[str] = set()
    for split in SPLITS:
        for r in datasets["entities"][split]:
            text, spans = r["text"], r["spans"]
            total += 1
            none += not spans
            assert len(r["words"]) == len(r["word_offsets"]) == len(r["tags"])
            for w, (s, e) in zip(r["words"], r["word_offsets"]):
                assert text[s:e] == w and w.strip() == w and w
            prev_end = -1
            for sp in spans:
                s, e, label = sp["start"], sp["end"], sp["label"]
                labels_seen.add(label)
                assert prev_end <= s < e <= len(text)
                prev_end = e
                mention = text[s:e]
                if label == "DATE":
                    assert parse_date(mention) is not None, mention
                else:
                    assert _SHAPES[label].fullmatch(mention), (label, mention)
                if label == "PATH":
                    assert mention.count("/") >= 2 or mention.startswith("~/")
                if label == "VERSION":
                    assert "." in mention
                # BIO: words covering the span are B then I, and they tile the span exactly
                inside = [i for i, (ws, we) in enumerate(r["word_offsets"]) if ws >= s and we <= e]
                assert inside, (mention, r["words"])
                assert r["word_offsets"][inside[0]][0] == s and r["word_offsets"][inside[-1]][1] == e
                assert r["tags"][inside[0]] == f"B-{label}"
                assert all(r["tags"][i] == f"I-{label}" for i in inside[1:])
            covered = {i for sp in spans for i, (ws, we) in enumerate(r["word_offsets"]) if ws >= sp["start"] and we <= sp["end"]}
            assert all(t == "O" for i, t in enumerate(r["tags"]) if i not in covered)
            assert set(r["tags"]) <= set(bio_labels())
            # silver labels are reproducible from the text alone
            assert [Span(**sp) for sp in spans] == tag_entities(text)
    assert 0.1 <= none / total <= 0.3
    assert {"URL", "EMAIL", "NUMBER"} <= labels_seen


def test_deterministic_given_seed(sources, datasets) -> None:
    again = corpora.build_text_kind(seed=0, sizes=SIZES, max_files=MAX_FILES, sources=sources, use_cache=False)
    assert again == datasets["text_kind"]
    ents = corpora.build_entities(seed=0, sizes=ENTITY_SIZES, max_files=MAX_FILES, sources=sources, use_cache=False)
    assert ents == datasets["entities"]
    other = corpora.build_text_kind(seed=1, sizes=SIZES, max_files=MAX_FILES, sources=sources, use_cache=False)
    assert other["train"] != again["train"]
    # a different seed resamples snippets but never moves a file to another split
    for split in SPLITS:
        assert all(split_for(r["source"]) == split for r in other[split])


def test_cache_written_and_reused(sources, tmp_path, monkeypatch) -> None:
    data = corpora.build_domains(cache_dir=tmp_path, seed=3, sizes=SIZES, max_files=MAX_FILES, sources=sources)
    folder = tmp_path / "domains"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["params"]["seed"] == 3 and manifest["params"]["sizes"] == SIZES
    assert manifest["counts"] == {s: len(data[s]) for s in SPLITS}
    for split in SPLITS:
        jsonl = [json.loads(x) for x in (folder / f"{split}.jsonl").read_text().splitlines()]
        assert jsonl == data[split]
        with open(folder / f"{split}.csv", newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        assert [r["text"] for r in rows] == [r["text"] for r in data[split]]

    # second call with the same parameters must read the files, not rebuild
    def boom(*a, **k):
        raise AssertionError("rebuilt instead of reading the cache")

    monkeypatch.setattr(corpora, "_pools", boom)
    again = corpora.build_domains(cache_dir=tmp_path, seed=3, sizes=SIZES, max_files=MAX_FILES, sources=sources)
    assert again == data
    # the cache really is read: an edit to the file shows up
    edited = dict(data["test"][0], text="EDITED")
    lines = (folder / "test.jsonl").read_text().splitlines()
    lines[0] = json.dumps(edited)
    (folder / "test.jsonl").write_text("\n".join(lines) + "\n")
    assert corpora.build_domains(cache_dir=tmp_path, seed=3, sizes=SIZES, max_files=MAX_FILES, sources=sources)[
        "test"
    ][0]["text"] == "EDITED"
    # different parameters do not match the manifest: a rebuild is attempted
    with pytest.raises(AssertionError, match="rebuilt"):
        corpora.build_domains(cache_dir=tmp_path, seed=4, sizes=SIZES, max_files=MAX_FILES, sources=sources)


def test_env_var_sets_cache_dir(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LORAPLEX_CACHE", str(tmp_path))
    assert corpora.default_cache_dir() == tmp_path / "data"
    monkeypatch.delenv("LORAPLEX_CACHE")
    assert corpora.default_cache_dir() == Path.home() / ".cache" / "loraplex" / "data"


def _empty_sources(*kinds_with_files: str, real: dict[str, SourceSet] | None = None) -> dict[str, SourceSet]:
    out = {}
    for kind in ("python", "docstring", "c_header", "shell", "perl", "prose"):
        if real is not None and kind in kinds_with_files:
            out[kind] = real[kind]
        else:
            out[kind] = SourceSet(kind, [], [f"/nowhere/{kind}"])
    return out


def test_clear_error_when_sources_missing(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(corpora, "discover_sources", lambda *a, **k: _empty_sources())
    with pytest.raises(DatasetBuildError, match=r"python.*/nowhere/python"):
        corpora.build_text_kind(cache_dir=tmp_path, use_cache=False)
    with pytest.raises(DatasetBuildError, match=r"prose.*/nowhere/prose"):
        corpora.build_entities(cache_dir=tmp_path, use_cache=False)
    with pytest.raises(ValueError):  # DatasetBuildError is a ValueError
        corpora.build_domains(cache_dir=tmp_path, use_cache=False)


def test_code_language_needs_two_languages(sources, monkeypatch, tmp_path) -> None:
    only_python = _empty_sources("python", real=sources)
    monkeypatch.setattr(corpora, "discover_sources", lambda *a, **k: only_python)
    with pytest.raises(DatasetBuildError) as err:
        corpora.build_code_language(cache_dir=tmp_path, use_cache=False)
    msg = str(err.value)
    assert "perl" in msg and "/nowhere/perl" in msg and "/nowhere/c_header" in msg and "python" in msg
    # with a second language present it builds, with exactly those two labels
    two = _empty_sources("python", "shell", real=sources)
    monkeypatch.setattr(corpora, "discover_sources", lambda *a, **k: two)
    data = corpora.build_code_language(cache_dir=tmp_path, sizes=SIZES, use_cache=False)
    assert {r["label"] for r in data["train"]} == {"python", "shell"}


def test_describe_datasets_mentions_every_dataset() -> None:
    text = corpora.describe_datasets()
    for name in corpora.DATASET_NAMES:
        assert f"**{name}**" in text
    assert "source file" in text and "LORAPLEX_CACHE" in text


# ------------------------------------------------------------------------------ licences


@pytest.mark.parametrize(
    ("license_id", "family"),
    [
        ("GPL-2+", "gpl"), ("GPL-2", "gpl"), ("GPLv3+", "gpl"), ("GPL-2.0+", "gpl"), ("GPL-3.0-or-later", "gpl"),
        ("GPL", "gpl"), ("gpl-3", "gpl"),
        ("LGPL-2.1+", "lgpl"), ("LGPLv2.1+", "lgpl"), ("LGPL-3.0-only", "lgpl"), ("LGPL", "lgpl"),
        ("AGPL-3+", "agpl"),
        ("BSD-3-clause", "bsd"), ("BSD-3-Clause", "bsd"), ("BSD-2-clause", "bsd"), ("BSD-4-clause", "bsd"),
        ("MIT", "mit"), ("Expat", "mit"), ("X11", "mit"),
        ("Apache-2.0", "apache"), ("Apache-2", "apache"),
        ("BSL-1.0", "boost"), ("public-domain", "public-domain"), ("PD", "public-domain"),
        ("Zlib", "zlib"), ("ISC", "isc"), ("CC0-1.0", "cc0"), ("MPL-2.0", "mpl"), ("Artistic", "artistic"),
        ("  GPL-2+  ", "gpl"),
        # dual / compound ids and ids outside the rules have no family
        ("GPL-1+ or Artistic", None), ("LGPL-3+ or GPL-2+", None), ("LGPLv3+_or_GPLv2+", None),
        ("BSD-3-clause or GPL-2", None), ("BSL-1.0 and MIT", None), ("GPL-2+ with Autoconf exception", None),
        ("APACHE-2-LLVM-EXCEPTIONS", None), ("GPL-2 | MIT", None), ("BSD-3-clause-generic", None),
        ("MIT/X11", None), ("OpenLDAP-2.8", None), ("FSFULLR", None), ("GPLish", None), ("", None),
    ],
)
def test_licence_family_rules(license_id: str, family: str | None) -> None:
    assert licence_family(license_id) == family


def test_licence_families_are_distinct_from_each_other() -> None:
    # LGPL/AGPL ids must never fall into gpl, nor gpl ids into lgpl
    assert {licence_family(x) for x in ("LGPL-2+", "LGPLv3", "AGPL-3.0-or-later")} == {"lgpl", "agpl"}
    assert set(corpora.LICENCE_NAME_TOKENS) == set(LICENCE_FAMILIES)


_DEP5_EXAMPLE = """\
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: demo
Comment: not a licence
 body of a comment

Files: *
Copyright: 2001 Someone
License: BSD-3-clause

Files: extra/*
Copyright: 2002 Other
License: MIT
 Permission is hereby granted, free of charge, to any person.
 .
 The above copyright notice shall be included.
# a comment line inside the file
\tTab continuation line.

License: BSD-3-clause
 Redistribution and use in source and binary forms
 are permitted.
 .
 .
 THIS SOFTWARE IS PROVIDED "AS IS".

License: GPL-2+ or Artistic
 Dual licensed text.
"""


def test_parse_dep5_continuation_lines_and_blanks() -> None:
    got = parse_dep5(_DEP5_EXAMPLE)
    assert got == [
        ("MIT", "Permission is hereby granted, free of charge, to any person.\n\n"
                "The above copyright notice shall be included.\nTab continuation line."),
        ("BSD-3-clause", "Redistribution and use in source and binary forms\nare permitted.\n\n\n"
                         'THIS SOFTWARE IS PROVIDED "AS IS".'),
        ("GPL-2+ or Artistic", "Dual licensed text."),
    ]
    # the License field without a body (Files: *) gives nothing; non-DEP-5 files give nothing
    assert parse_dep5("This package was debianized by someone.\n\nLicense: MIT\n Some text.\n") == []
    assert parse_dep5("") == []


def test_licence_snippets_drop_family_names_and_notices() -> None:
    body = (
        "This program is free software; you can redistribute it under the terms of the GNU General "
        "Public License. This program is distributed in the hope that it will be useful, but WITHOUT "
        "ANY WARRANTY. See the GPL for details.\n.\n"
        "# Copyright (c) 2001 Some Author. All of the code in this file is here to be used.\n"
        "\n * Redistribution of this code is permitted provided that the notice is retained in full.\n"
    )
    snips = licence_snippets(body)
    assert snips == [
        "This program is distributed in the hope that it will be useful, but WITHOUT ANY WARRANTY.",
        "All of the code in this file is here to be used.",
        "Redistribution of this code is permitted provided that the notice is retained in full.",
    ]
    assert names_licence_family("see /usr/share/common-licenses/GPL-2") and names_licence_family("FreeBSD")
    assert names_licence_family("Licensed under the Apache License") and names_licence_family("the X11 code")
    assert not names_licence_family("Permission is hereby granted to submit and permit use.")


LICENCE_SIZES = {"train": 200, "validation": 40, "test": 80}


@pytest.fixture(scope="module")
def copyright_sources() -> dict[str, SourceSet]:
    return corpora.discover_sources(1000, kinds=("copyright",))


@pytest.fixture(scope="module")
def licences(copyright_sources, tmp_path_factory) -> dict[str, list[dict]]:
    cache = tmp_path_factory.mktemp("licence_cache")
    return corpora.build_licences(cache_dir=cache, seed=0, sizes=LICENCE_SIZES, sources=copyright_sources)


def test_licences_families_balanced_and_from_rules(licences) -> None:
    labels = {r["label"] for r in licences["train"]}
    assert len(labels) >= 3 and labels <= set(LICENCE_FAMILIES)
    reader = corpora._Reader()
    for split in SPLITS:
        counts = Counter(r["label"] for r in licences[split])
        assert set(counts) == labels and len(set(counts.values())) == 1, (split, counts)
        for r in licences[split]:
            assert set(r) == {"text", "label", "source"}
            assert r["source"].endswith("/copyright") and split_for(r["source"]) == split
            # the label is the family (by the id rules) of a licence body of that file holding the text
            snippets = reader.licence_snippets(r["source"], corpora.LICENCE_CHUNKS)
            fams = {fam for fam, text in snippets if text == r["text"]}
            assert fams == {r["label"]}, (r, fams)


def test_licences_texts_never_name_a_family(licences) -> None:
    for split in SPLITS:
        for r in licences[split]:
            text = r["text"]
            low = text.lower()
            for token in ("gpl", "gnu general public", "general public", "apache", "bsd", "boost", "lesser",
                          "public domain", "affero", "mozilla public", "creative commons", "artistic"):
                assert token not in low, (token, text)
            assert not re.search(r"\b(?:MIT|ISC|X11|Expat|zlib|CC0|MPL|BSL)\b", text, re.I), text
            assert not names_licence_family(text)
            assert 40 <= len(text) <= 400 and "\n" not in text


def test_licences_deterministic_and_cached(licences, copyright_sources, tmp_path) -> None:
    again = corpora.build_licences(seed=0, sizes=LICENCE_SIZES, sources=copyright_sources, use_cache=False)
    assert again == licences
    reader = corpora._Reader()  # shared by the two builds below: parsing was checked just above
    other = corpora.build_licences(
        seed=1, sizes=LICENCE_SIZES, sources=copyright_sources, use_cache=False, _reader=reader
    )
    for split in SPLITS:
        assert all(split_for(r["source"]) == split for r in other[split])
    data = corpora.build_dataset(
        "licences", cache_dir=tmp_path, sizes=LICENCE_SIZES, sources=copyright_sources, _reader=reader
    )
    manifest = json.loads((tmp_path / "licences" / "manifest.json").read_text())
    details = manifest["details"]
    assert details["families"] == sorted({r["label"] for r in data["train"]}, key=LICENCE_FAMILIES.index)
    assert details["requested_per_class"] == LICENCE_SIZES
    for split in SPLITS:
        assert details["rows_per_class"][split] * len(details["families"]) == len(data[split])
        assert (split in details["shrunk"]) == (details["rows_per_class"][split] < LICENCE_SIZES[split])
    assert set(details["dropped_families"]) | set(details["families"]) == set(LICENCE_FAMILIES)


def _write_copyright(folder: Path, pkg: str, license_id: str, body: str) -> str:
    path = folder / pkg / "copyright"
    path.parent.mkdir(parents=True)
    text = "\n".join(" " + ln if ln else " ." for ln in body.split("\n"))
    path.write_text(
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\n"
        f"Files: *\nCopyright: 2020 Someone\nLicense: {license_id}\n\nLicense: {license_id}\n{text}\n"
    )
    return str(path)


def test_licences_error_when_too_few_families(tmp_path, monkeypatch) -> None:
    files = []
    for i in range(12):
        for fam_id in ("MIT", "ISC", "GPL-2+ or Artistic"):
            body = (f"Package number {i} of kind {fam_id.split()[0].lower()[:2]} may be copied by anyone at all. "
                    f"It comes with no warranty of any kind whatsoever, number {i}.")
            files.append(_write_copyright(tmp_path, f"{fam_id[:3].lower()}{i}", fam_id, body))
    only_two = {"copyright": SourceSet("copyright", sorted(files), [str(tmp_path)])}
    with pytest.raises(DatasetBuildError, match=r"at least 3 licence families") as err:
        corpora.build_licences(cache_dir=tmp_path, sources=only_two, use_cache=False)
    msg = str(err.value)
    assert "mit: 12 file(s)" in msg and "isc: 12 file(s)" in msg and str(tmp_path) in msg
    # no copyright files at all (e.g. not a Debian system): a clear error naming what was searched
    none = {"copyright": SourceSet("copyright", [], ["/nowhere/doc"])}
    monkeypatch.setattr(corpora, "discover_sources", lambda *a, **k: none)
    with pytest.raises(DatasetBuildError, match=r"copyright.*/nowhere/doc"):
        corpora.build_licences(cache_dir=tmp_path, use_cache=False)


# ------------------------------------------------------------------------------ man_sections


def test_man_escapes_fonts_dashes_and_specials() -> None:
    assert man_escapes(r"\fBbold\fR, \fIital\fP, \f(CWcode\fP, \f[B]br\f[]") == "bold, ital, code, br"
    assert man_escapes(r"\-v \(em \e \&.x end") == "-v — \\ .x end"
    assert man_escapes(r"a\(xxb") == "a b"  # unknown special characters become a space
    assert man_escapes(r"\*(lqq\*(rq \s-1SMALL\s0 \(bu \[em] \\") == '"q" SMALL • — \\'
    assert man_escapes("no escapes here") == "no escapes here"
    # groff composed letters (translated pages use them): umlauts, acutes, cedilla, caron, ring, ß
    assert man_escapes(r"zusammengeh\(:orend użytkownik\('ow \[:a]\(,c\(~a\(ss\(vs\(oa \(Bq") == (
        "zusammengehörend użytkowników äçãßšå „"
    )


_MAN_PAGE = r""".\" Comment line: .SH NOT A HEADING (1)
.TH LS 1 "2024-01-01" "GNU coreutils 9.1" "User Commands"
.SH NAME
ls \- list directory contents
.SH SYNOPSIS
.B ls
[\fI\,OPTION\/\fR]... [\fI\,FILE\/\fR]...
.SH DESCRIPTION
List information about the
.B files
in a directory; see
.BR stat (2)
and
.IR dir (1).
.\" another comment
.PP
Mandatory arguments to long options are mandatory for short options too.
.TP
\fB\-a\fR, \fB\-\-all\fR
do not ignore entries starting with a dot, see \fBglob\fP(7)
.IP \(bu 2
a bullet item that is long enough to make a third line of the snippet here
.nf
.B code line one
  code line two
.fi
.SH "SEE ALSO"
.BR dir (1)
"""


def test_troff_to_text_requests_headings_and_comments() -> None:
    text = troff_to_text(_MAN_PAGE)
    assert text == (
        "NAME\nls - list directory contents\n\n"
        "SYNOPSIS\nls [OPTION]... [FILE]...\n\n"
        "DESCRIPTION\nList information about the files in a directory; see stat(2) and dir(1).\n\n"
        "Mandatory arguments to long options are mandatory for short options too.\n\n"
        "-a, --all\ndo not ignore entries starting with a dot, see glob(7)\n\n"
        "• a bullet item that is long enough to make a third line of the snippet here\n"
        "code line one\n  code line two\n\n"
        "SEE ALSO\ndir(1)"
    )
    assert "Comment" not in text and "coreutils" not in text and "\\" not in text
    # filled text is reflowed at 78 columns; .SH with a quoted argument gives the plain heading
    long = ".SH DESCRIPTION\n" + "\n".join(f"word{i}" for i in range(60)) + "\n"
    [(heading, lines)] = man_page_sections(long)
    assert heading == "DESCRIPTION" and len(lines) > 1 and all(len(ln) <= 78 for ln in lines)
    assert " ".join(lines) == " ".join(f"word{i}" for i in range(60))
    # tables, macro definitions and conditional blocks are dropped whole
    dropped = ".SH DESCRIPTION\n.de XX\nmacro body\n..\n.TS\nl l.\na\tb\n.TE\n.if n \\{\\\ninside\n.\\}\nkept\n"
    assert man_page_sections(dropped) == [("DESCRIPTION", ["kept"])]


def test_man_snippets_use_body_sections_without_section_numbers() -> None:
    snippets = man_snippets(_MAN_PAGE)
    assert snippets, troff_to_text(_MAN_PAGE)
    joined = "\n".join(snippets)
    assert "list directory contents" not in joined  # the NAME line is never used
    assert "see stat and dir." in joined and "glob\n" in joined + "\n"
    for sn in snippets:
        assert not re.search(r"\(\s*[1-9]\w*\s*\)", sn) and not names_man_section(sn)
        lines = [ln for ln in sn.split("\n") if ln.strip()]
        assert 3 <= len(lines) <= 12 and len(sn) <= 400
    assert scrub_section_refs("see ls(1), tzfile(5) data and printf (3p).") == "see ls, tzfile data and printf."
    assert scrub_section_refs("exit(0) and f(2023)") == "exit(0) and f(2023)"
    assert names_man_section("Section 7 of the manual") and names_man_section("try man 2 open")
    assert not names_man_section("see section 3.2 of RFC 3484 and version 2")
    # redirect (.so) and mdoc pages give nothing
    assert man_snippets(".so man3/other.3\n") == []
    assert man_snippets(".Dd March 1, 2020\n.Dt FOO 3\n.Sh DESCRIPTION\nText.\n") == []


def _write_man_page(folder: Path, name: str, paragraphs: int = 3) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    body = "\n.PP\n".join(
        f"The {name} page, paragraph {k}, explains option number {k} of {name} in some detail.\n"
        f"It spans a few source lines so that the rendered text of {name} has several\n"
        f"lines: this is line three of paragraph {k} and the {name} text goes on.\n"
        f"A fourth line about {name} closes paragraph {k} of the page."
        for k in range(paragraphs)
    )
    path = folder / f"{name}.gz"
    with gzip.open(path, "wt") as fh:
        fh.write(f'.TH {name} 1 "2024"\n.SH NAME\n{name} \\- demo\n.SH DESCRIPTION\n{body}\n')
    return str(path)


def test_pick_man_pages_skips_aliases_redirects_and_suffixed_sections(tmp_path) -> None:
    man3 = tmp_path / "man3"
    real = _write_man_page(man3, "alpha.3")
    os.symlink(real, man3 / "alias.3.gz")  # an alias of alpha.3: read once
    _write_man_page(man3, "Some::Module.3pm")  # Perl module pages are not section 3
    with gzip.open(man3 / "redirect.3.gz", "wt") as fh:
        fh.write('.\\" comment\n.so man3/alpha.3\n')
    (man3 / "plain.3").write_text(".TH plain 3\n.SH DESCRIPTION\nText.\n")
    assert corpora._pick_man_pages([str(man3)], "3", 50) == sorted([real, str(man3 / "plain.3")])
    # one page family fills at most a tenth of the picks (at least 3)
    man1 = tmp_path / "man1"
    fam = [_write_man_page(man1, f"gcloud_cmd{i}.1", 1) for i in range(10)]
    other = [_write_man_page(man1, f"tool{i}.1", 1) for i in range(2)]
    picked = corpora._pick_man_pages([str(man1)], "1", 10)
    assert len(set(picked) & set(fam)) == 3 and set(other) <= set(picked)


def test_man_sections_labels_balanced_and_without_section_numbers(datasets) -> None:
    data = datasets["man_sections"]
    labels = {r["label"] for r in data["train"]}
    assert len(labels) >= 3 and labels <= set(MAN_SECTIONS)
    for split in SPLITS:
        counts = Counter(r["label"] for r in data[split])
        assert set(counts) == labels and len(set(counts.values())) == 1, (split, counts)
        for r in data[split]:
            assert set(r) == {"text", "label", "source"}
            text, source = r["text"], r["source"]
            # the page's own section decides the label; suffixed sections (3pm, 1ssl) never count
            assert re.search(rf"\.{MAN_SECTIONS[r['label']]}(?:\.gz)?$", source), r
            assert split_for(source) == split
            # the section number never appears: no "(N)" / "name(N)" token, no "Section N"
            assert not re.search(r"\(\s*[1-9][A-Za-z]*\s*\)", text), r
            assert not names_man_section(text), r
            assert len(text) <= 400 and 3 <= len([ln for ln in text.split("\n") if ln.strip()]) <= 12
            assert not re.search(r"(?m)\\f[BIRP(\[]|^\.(?:SH|TH|B|BR|PP|TP|IP)\b", text), r


def test_man_sections_deterministic_and_manifest(datasets, tmp_path) -> None:
    again = corpora.build_man_sections(seed=0, sizes=SIZES, max_files=MAX_FILES, use_cache=False)
    assert again == datasets["man_sections"]
    data = corpora.build_dataset("man_sections", cache_dir=tmp_path, seed=0, sizes=SIZES, max_files=MAX_FILES)
    assert data == again
    details = json.loads((tmp_path / "man_sections" / "manifest.json").read_text())["details"]
    assert details["sections"] == sorted({r["label"] for r in data["train"]}, key=list(MAN_SECTIONS).index)
    assert details["requested_per_class"] == SIZES
    for split in SPLITS:
        assert details["rows_per_class"][split] * len(details["sections"]) == len(data[split])
    assert set(details["dropped_sections"]) | set(details["sections"]) == set(MAN_SECTIONS)


def test_man_sections_error_when_too_few_sections(tmp_path, monkeypatch) -> None:
    pages = {n: sorted(_write_man_page(tmp_path / f"man{n}", f"page{n}x{i}.{n}") for i in range(60)) for n in "128"}

    def fake(*kinds_with_pages: str) -> dict[str, SourceSet]:
        return {
            f"man{n}": SourceSet(f"man{n}", pages[n] if n in kinds_with_pages else [], [f"/nowhere/man{n}"])
            for n in "123578"
        }

    monkeypatch.setattr(corpora, "discover_sources", lambda *a, **k: fake("1", "2"))
    with pytest.raises(DatasetBuildError, match=r"at least 3 manual sections") as err:
        corpora.build_man_sections(cache_dir=tmp_path, use_cache=False)
    msg = str(err.value)
    assert "library (man3): 0 page(s) < 40" in msg and "/nowhere/man3" in msg and "/nowhere/man8" in msg
    # a third section with enough pages: it builds, with exactly those three labels, balanced
    sizes = {"train": 10, "validation": 0, "test": 2}
    data = corpora.build_man_sections(sources=fake("1", "2", "8"), sizes=sizes, use_cache=False)
    assert {r["label"] for r in data["train"]} == {"user_commands", "system_calls", "admin_commands"}
    assert Counter(r["label"] for r in data["test"]) == {"user_commands": 2, "system_calls": 2, "admin_commands": 2}
    assert data["validation"] == []


# ------------------------------------------------------------------------------ man_languages

_LANG_LINES = {
    "de": ("Die Seite {n} beschreibt Absatz {k} und erklärt die Einstellung {k} ausführlich.",
           "Diese Zeilen gehören zu {n} und werden beim Lesen der Datei geprüft.",
           "Hier steht die dritte Zeile von Absatz {k}, und der Text über {n} geht weiter.",
           "Eine vierte Zeile über {n} schließt Absatz {k} dieser Seite ab."),
    "fr": ("La page {n} décrit le paragraphe {k} et explique l'option {k} en détail.",
           "Ces lignes appartiennent à {n} et sont vérifiées pendant la lecture du fichier.",
           "Voici la troisième ligne du paragraphe {k}, et le texte sur {n} continue.",
           "Une quatrième ligne sur {n} termine le paragraphe {k} de cette page."),
    "sv": ("Sidan {n} beskriver stycke {k} och förklarar flaggan {k} i detalj.",
           "Dessa rader hör till {n} och kontrolleras när filen läses.",
           "Här är den tredje raden i stycke {k}, och texten om {n} fortsätter.",
           "En fjärde rad om {n} avslutar stycke {k} på denna sida."),
    "pt": ("A página {n} descreve o parágrafo {k} e explica a opção {k} em detalhe.",
           "Estas linhas pertencem a {n} e são verificadas durante a leitura do arquivo.",
           "Aqui está a terceira linha do parágrafo {k}, e o texto sobre {n} continua.",
           "Uma quarta linha sobre {n} termina o parágrafo {k} desta página."),
}
_FIRST_SECTION = (
    "Kopfzeile {n} ERSTERABSCHNITT mit einer langen Zusammenfassung der Seite,\n"
    "die über mehrere Zeilen geht und trotzdem nie in einem Schnipsel steht,\n"
    "weil der erste Abschnitt nur den Namen und die Kurzbeschreibung enthält."
)
_ENGLISH_PARAGRAPH = (
    "This paragraph of the page was not translated, so it is still written in English and\n"
    "the reader sees the original text with all the words that the English page has,\n"
    "which must never be given the label of the language of the page."
)


def _write_translated_page(folder: Path, lang: str, name: str, paragraphs: int = 2, english: bool = False) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    body = "\n.PP\n".join(
        "\n".join(line.format(n=name, k=k) for line in _LANG_LINES[lang]) for k in range(paragraphs)
    )
    extra = f".SH EXTRA\n{_ENGLISH_PARAGRAPH}\n" if english else ""
    path = folder / f"{name}.gz"
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write(f'.TH {name} 1 "2024" "Paket 1.0" "Handbuch"\n.SH NAME\n{_FIRST_SECTION.format(n=name)}\n'
                 f".SH BESCHREIBUNG\n{body}\n{extra}")
    return str(path)


def test_looks_english_and_man_language_snippets() -> None:
    assert corpora.looks_english("This option is the default and the program uses it when you run it.")
    for other in ("Die Option ist in der Regel aktiv, wenn das Programm startet.",  # de
                  "Deze optie is in de regel actief als het programma start.",  # nl: "is", "in", "de"
                  "To jest domyślna opcja, a program jej używa.",  # pl: "to", "a"
                  "Programul are această opțiune în mod implicit.",  # ro: "are"
                  "Cette option est active par défaut, ou si le programme démarre."):
        assert not corpora.looks_english(other), other
    source = (
        '.TH ls 1 "2024" "coreutils 9.1" "Benutzerbefehle"\n.SH BEZEICHNUNG\n' + _FIRST_SECTION.format(n="ls") + "\n"
        ".SH BESCHREIBUNG\n" + "\n".join(ln.format(n="ls", k=1) for ln in _LANG_LINES["de"]) + "\n"
        ".SH BEISPIEL\n.nf\n-- 1 2 3 --\n+----+----+\n| 12 | 34 |\n+----+----+\n= 56 = 78 =\n.fi\n"
        ".SH FEHLER\n" + _ENGLISH_PARAGRAPH + "\n"
    )
    german = "\n".join(ln.format(n="ls", k=1) for ln in _LANG_LINES["de"])
    heading, rendered = corpora.man_page_sections(source)[1]
    assert heading == "BESCHREIBUNG" and normalize_key("\n".join(rendered)) == normalize_key(german)
    # one snippet: the German body; not the first section, the symbol block or the English paragraph
    assert corpora.man_language_snippets(source) == ["\n".join(rendered)]
    assert corpora.man_language_snippets(".so man1/ls.1\n") == []
    assert corpora.man_language_snippets(".Dd March 1, 2020\n.Dt FOO 1\n.Sh BESCHREIBUNG\n" + german) == []
    # a snippet needs a word of 3+ Latin letters (Cyrillic text gives none)
    cyrillic = ".SH ИМЯ\nимя\n.SH ОПИСАНИЕ\n" + "\n".join(["Это описание программы и её параметров."] * 4)
    assert corpora.man_language_snippets(cyrillic) == []


@pytest.fixture()
def translated_tree(tmp_path) -> Path:
    """A fake /usr/share/man with translated pages: 40 each in de, fr, sv; pt split over pt and pt_BR."""
    root = tmp_path / "man"
    for lang in ("de", "fr", "sv"):
        for i in range(40):
            _write_translated_page(root / lang / "man1", lang, f"prog{lang}{i}.1")
    for i in range(30):
        _write_translated_page(root / "pt" / "man1", "pt", f"progpt{i}.1")
    for i in range(25, 45):  # progpt25..29 exist in pt too: a page name counts once per language
        _write_translated_page(root / "pt_BR" / "man1", "pt", f"progpt{i}.1")
    _write_translated_page(root / "de" / "man5", "de", "conf.5")
    _write_translated_page(root / "de" / "man5", "de", "misplaced.1")  # man5 holds only *.5 pages
    os.symlink(root / "de" / "man1" / "progde0.1.gz", root / "de" / "man1" / "alias.1.gz")
    with gzip.open(root / "de" / "man1" / "redirect.1.gz", "wt") as fh:
        fh.write(".so man1/progde1.1\n")
    (root / "de" / "man1" / "bsd.1").write_text(".Dd March 1, 2020\n.Dt BSD 1\n.Sh BESCHREIBUNG\nText.\n")
    _write_translated_page(root / "ja" / "man1", "de", "nonlatin.1")  # not a Latin-script language
    _write_translated_page(root / "sr@latin" / "man1", "de", "modifier.1")  # folders with a modifier: out
    _write_translated_page(root / "man1", "de", "english.1")  # the English pages are no language folder
    return root


def test_discover_man_languages_folders_aliases_and_pt_merge(translated_tree) -> None:
    found = corpora.discover_man_languages(300, root=str(translated_tree))
    assert sorted(found) == ["man_de", "man_fr", "man_pt", "man_sv"]
    de = found["man_de"]
    assert de.searched == [str(translated_tree / "de" / "man1"), str(translated_tree / "de" / "man5")]
    names = sorted(os.path.basename(f) for f in de.files)
    # alias read once (as its target), .so redirect, mdoc page and misplaced page skipped
    assert names == sorted([f"progde{i}.1.gz" for i in range(40)] + ["conf.5.gz"])
    pt = found["man_pt"].files
    assert len(pt) == 45 and len({os.path.basename(f) for f in pt}) == 45
    assert {os.path.basename(os.path.dirname(os.path.dirname(f))) for f in pt} == {"pt", "pt_BR"}
    assert len(corpora.discover_man_languages(10, root=str(translated_tree))["man_fr"].files) == 10


def test_man_languages_build_from_translated_tree(translated_tree, tmp_path) -> None:
    sources = corpora.discover_man_languages(300, root=str(translated_tree))
    sizes = {"train": 6, "validation": 0, "test": 2}
    data = corpora.build_dataset("man_languages", cache_dir=tmp_path / "cache", sources=sources, sizes=sizes)
    assert data["validation"] == []
    for split in ("train", "test"):
        counts = Counter(r["label"] for r in data[split])
        assert counts == {lang: sizes[split] for lang in ("de", "fr", "pt", "sv")}, (split, counts)
        for r in data[split]:
            assert set(r) == {"text", "label", "source"} and split_for(r["source"]) == split
            lang_folder = os.path.basename(os.path.dirname(os.path.dirname(r["source"])))
            assert lang_folder.split("_")[0] == r["label"]
            assert "ERSTERABSCHNITT" not in r["text"] and "Handbuch" not in r["text"]
            # the text is one paragraph of the page's own body (reflowed to 78 columns)
            name = os.path.basename(r["source"])[:-3]
            assert normalize_key(r["text"]) in {
                normalize_key(" ".join(ln.format(n=name, k=k) for ln in _LANG_LINES[r["label"]])) for k in range(2)
            }, r
            assert max(map(len, r["text"].split("\n"))) <= 78
    keys = [normalize_key(r["text"]) for s in SPLITS for r in data[s]]
    assert len(keys) == len(set(keys))
    manifest = json.loads((tmp_path / "cache" / "man_languages" / "manifest.json").read_text())
    details = manifest["details"]
    assert details["languages"] == ["de", "fr", "pt", "sv"] and details["dropped_languages"] == {}
    assert details["language_pages"] == {"de": 41, "fr": 40, "pt": 45, "sv": 40}
    assert details["rows_per_class"] == sizes and details["shrunk"] == []
    again = corpora.build_man_languages(sources=sources, sizes=sizes, use_cache=False)
    assert again == data


def test_man_languages_error_when_too_few_languages(translated_tree, tmp_path, monkeypatch) -> None:
    sources = corpora.discover_man_languages(300, root=str(translated_tree))
    two = {k: v for k, v in sources.items() if k in ("man_de", "man_fr")}
    sv_train = [f for f in sources["man_sv"].files if split_for(f) == "train"][:2]
    two["man_sv"] = SourceSet("man_sv", sv_train, ["/nowhere/sv/man1"])
    monkeypatch.setattr(corpora, "discover_man_languages", lambda *a, **k: two)
    with pytest.raises(DatasetBuildError, match=r"^man_languages: need at least 3 languages") as err:
        corpora.build_man_languages(cache_dir=tmp_path, use_cache=False, sizes={"train": 2, "test": 1})
    msg = str(err.value)
    assert "found ['de', 'fr']" in msg and "sv: 2 page(s) < 40" in msg
    assert "/nowhere/sv/man1" in msg and str(translated_tree / "de" / "man1") in msg
    # with a lower page threshold the third language qualifies
    data = corpora.build_man_languages(use_cache=False, sizes={"train": 1, "test": 0}, min_files=2, min_snippets=1)
    assert Counter(r["label"] for r in data["train"]) == {"de": 1, "fr": 1, "sv": 1}
