"""Silver entity tags: the regexes, overlaps, words cut at span boundaries and BIO tags."""

from __future__ import annotations


import pytest

from loraplex.demo.entities import ENTITY_LABELS, bio_labels, bio_tags, tag_entities
from loraplex.tokens import tokenize_words


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
