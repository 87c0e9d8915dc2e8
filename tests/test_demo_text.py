"""The shared text helpers of the demo datasets (splits by file, chunking, sentences) and code masks."""

from __future__ import annotations

from collections import Counter

from loraplex.demo.code import code_mask, python_docstrings
from loraplex.demo.text import SPLITS, chunk_lines, chunk_sentences, split_for


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
    mask = code_mask(text, "python")
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
    mask = code_mask(text, "c")
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
