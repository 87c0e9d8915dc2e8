"""The licences dataset: DEP-5 parsing, licence families, snippets that never name a family."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from loraplex.demo import licences as licence_module
from loraplex.demo.datasets import build_dataset
from loraplex.demo.licences import (
    LICENCE_CHUNKS,
    LICENCE_FAMILIES,
    LICENCE_NAME_TOKENS,
    build_licences,
    licence_family,
    licence_file_snippets,
    licence_snippets,
    names_licence_family,
    parse_dep5,
)
from loraplex.demo.sources import SourceSet, discover_sources
from loraplex.demo.text import SPLITS, DatasetBuildError, Reader, split_for


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
    assert set(LICENCE_NAME_TOKENS) == set(LICENCE_FAMILIES)


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
    return discover_sources(1000, kinds=("copyright",))


@pytest.fixture(scope="module")
def licences(copyright_sources, tmp_path_factory) -> dict[str, list[dict]]:
    cache = tmp_path_factory.mktemp("licence_cache")
    return build_licences(cache_dir=cache, seed=0, sizes=LICENCE_SIZES, sources=copyright_sources)


def test_licences_families_balanced_and_from_rules(licences) -> None:
    labels = {r["label"] for r in licences["train"]}
    assert len(labels) >= 3 and labels <= set(LICENCE_FAMILIES)
    reader = Reader()
    for split in SPLITS:
        counts = Counter(r["label"] for r in licences[split])
        assert set(counts) == labels and len(set(counts.values())) == 1, (split, counts)
        for r in licences[split]:
            assert set(r) == {"text", "label", "source"}
            assert r["source"].endswith("/copyright") and split_for(r["source"]) == split
            # the label is the family (by the id rules) of a licence body of that file holding the text
            snippets = licence_file_snippets(reader, r["source"], LICENCE_CHUNKS)
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
    again = build_licences(seed=0, sizes=LICENCE_SIZES, sources=copyright_sources, use_cache=False)
    assert again == licences
    reader = Reader()  # shared by the two builds below: parsing was checked just above
    other = build_licences(
        seed=1, sizes=LICENCE_SIZES, sources=copyright_sources, use_cache=False, reader=reader
    )
    for split in SPLITS:
        assert all(split_for(r["source"]) == split for r in other[split])
    data = build_dataset(
        "licences", cache_dir=tmp_path, sizes=LICENCE_SIZES, sources=copyright_sources, reader=reader
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
        build_licences(cache_dir=tmp_path, sources=only_two, use_cache=False)
    msg = str(err.value)
    assert "mit: 12 file(s)" in msg and "isc: 12 file(s)" in msg and str(tmp_path) in msg
    # no copyright files at all (e.g. not a Debian system): a clear error naming what was searched
    none = {"copyright": SourceSet("copyright", [], ["/nowhere/doc"])}
    monkeypatch.setattr(licence_module, "discover_sources", lambda *a, **k: none)
    with pytest.raises(DatasetBuildError, match=r"copyright.*/nowhere/doc"):
        build_licences(cache_dir=tmp_path, use_cache=False)
