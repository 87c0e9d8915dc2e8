"""Tests for loraplex.data.corpora: real datasets built from text installed on the machine."""

from __future__ import annotations

import csv
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from loraplex.data import corpora
from loraplex.data.corpora import (
    CODE_LANGUAGES,
    DOMAIN_LABELS,
    LICENCE_FAMILIES,
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
    names_licence_family,
    normalize_key,
    parse_date,
    parse_dep5,
    python_docstrings,
    split_for,
    tag_entities,
    tokenize_words,
)

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
        cache_dir=cache, seed=0, sizes=SIZES, entity_sizes=ENTITY_SIZES, max_files=MAX_FILES, sources=sources
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

CLASS_DATASETS = ("text_kind", "code_language", "domains", "licences")


def test_sizes_and_labels(datasets) -> None:
    assert set(datasets) == {"text_kind", "code_language", "entities", "domains", "licences"}
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


@pytest.mark.parametrize("name", ["text_kind", "code_language", "entities", "domains", "licences"])
def test_splits_are_file_disjoint(datasets, name: str) -> None:
    files = {split: {r["source"] for r in datasets[name][split]} for split in SPLITS}
    assert not files["train"] & files["test"]
    assert not files["train"] & files["validation"]
    assert not files["validation"] & files["test"]
    for split in SPLITS:
        for r in datasets[name][split]:
            assert Path(r["source"]).is_file()
            assert split_for(r["source"]) == split


@pytest.mark.parametrize("name", ["text_kind", "code_language", "entities", "domains", "licences"])
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
