"""The demo datasets built from text installed on this machine: sizes, balance, file-disjoint splits,
no repeats, determinism, the cache, clear errors, the registry."""

from __future__ import annotations

import csv
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from loraplex.demo import code, prose
from loraplex.demo.cache import default_cache_dir
from loraplex.demo.code import CODE_LANGUAGES, build_code_language
from loraplex.demo.datasets import DATASET_NAMES, build_all, build_dataset, describe_datasets
from loraplex.demo.entities import Span, bio_labels, parse_date, tag_entities
from loraplex.demo.manpages import MAN_SECTIONS, build_man_sections, names_man_section
from loraplex.demo.prose import DOMAIN_LABELS, TEXT_KIND_LABELS, build_domains, build_entities, build_text_kind
from loraplex.demo.sources import SourceSet, discover_sources
from loraplex.demo.text import SPLITS, DatasetBuildError, normalize_key, split_for


MAX_FILES = 60

SIZES = {"train": 40, "validation": 8, "test": 15}
ENTITY_SIZES = {"train": 80, "validation": 15, "test": 30}


@pytest.fixture(scope="module")
def sources() -> dict[str, SourceSet]:
    return discover_sources(MAX_FILES)


@pytest.fixture(scope="module")
def datasets(sources, tmp_path_factory) -> dict[str, dict[str, list[dict]]]:
    cache = tmp_path_factory.mktemp("corpora_cache")
    return build_all(
        cache_dir=cache, seed=0, sizes=SIZES, entity_sizes=ENTITY_SIZES, max_files=MAX_FILES, sources=sources,
        man_max_files=MAX_FILES,
    )


CLASS_DATASETS = ("text_kind", "code_language", "domains", "licences", "man_sections")


def test_sizes_and_labels(datasets) -> None:
    # build_all builds every dataset but man_languages (translated man pages are often not installed)
    assert set(datasets) == set(DATASET_NAMES) - {"man_languages"}
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
    again = build_text_kind(seed=0, sizes=SIZES, max_files=MAX_FILES, sources=sources, use_cache=False)
    assert again == datasets["text_kind"]
    ents = build_entities(seed=0, sizes=ENTITY_SIZES, max_files=MAX_FILES, sources=sources, use_cache=False)
    assert ents == datasets["entities"]
    other = build_text_kind(seed=1, sizes=SIZES, max_files=MAX_FILES, sources=sources, use_cache=False)
    assert other["train"] != again["train"]
    # a different seed resamples snippets but never moves a file to another split
    for split in SPLITS:
        assert all(split_for(r["source"]) == split for r in other[split])


def test_cache_written_and_reused(sources, tmp_path, monkeypatch) -> None:
    data = build_domains(cache_dir=tmp_path, seed=3, sizes=SIZES, max_files=MAX_FILES, sources=sources)
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

    monkeypatch.setattr(prose, "snippet_pools", boom)
    again = build_domains(cache_dir=tmp_path, seed=3, sizes=SIZES, max_files=MAX_FILES, sources=sources)
    assert again == data
    # the cache really is read: an edit to the file shows up
    edited = dict(data["test"][0], text="EDITED")
    lines = (folder / "test.jsonl").read_text().splitlines()
    lines[0] = json.dumps(edited)
    (folder / "test.jsonl").write_text("\n".join(lines) + "\n")
    assert build_domains(cache_dir=tmp_path, seed=3, sizes=SIZES, max_files=MAX_FILES, sources=sources)[
        "test"
    ][0]["text"] == "EDITED"
    # different parameters do not match the manifest: a rebuild is attempted
    with pytest.raises(AssertionError, match="rebuilt"):
        build_domains(cache_dir=tmp_path, seed=4, sizes=SIZES, max_files=MAX_FILES, sources=sources)


def test_env_var_sets_cache_dir(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LORAPLEX_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "data"
    monkeypatch.delenv("LORAPLEX_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "loraplex" / "data"


def _empty_sources(*kinds_with_files: str, real: dict[str, SourceSet] | None = None) -> dict[str, SourceSet]:
    out = {}
    for kind in ("python", "docstring", "c_header", "shell", "perl", "prose"):
        if real is not None and kind in kinds_with_files:
            out[kind] = real[kind]
        else:
            out[kind] = SourceSet(kind, [], [f"/nowhere/{kind}"])
    return out


def test_clear_error_when_sources_missing(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(prose, "discover_sources", lambda *a, **k: _empty_sources())
    with pytest.raises(DatasetBuildError, match=r"python.*/nowhere/python"):
        build_text_kind(cache_dir=tmp_path, use_cache=False)
    with pytest.raises(DatasetBuildError, match=r"prose.*/nowhere/prose"):
        build_entities(cache_dir=tmp_path, use_cache=False)
    with pytest.raises(ValueError):  # DatasetBuildError is a ValueError
        build_domains(cache_dir=tmp_path, use_cache=False)


def test_code_language_needs_two_languages(sources, monkeypatch, tmp_path) -> None:
    only_python = _empty_sources("python", real=sources)
    monkeypatch.setattr(code, "discover_sources", lambda *a, **k: only_python)
    with pytest.raises(DatasetBuildError) as err:
        build_code_language(cache_dir=tmp_path, use_cache=False)
    msg = str(err.value)
    assert "perl" in msg and "/nowhere/perl" in msg and "/nowhere/c_header" in msg and "python" in msg
    # with a second language present it builds, with exactly those two labels
    two = _empty_sources("python", "shell", real=sources)
    monkeypatch.setattr(code, "discover_sources", lambda *a, **k: two)
    data = build_code_language(cache_dir=tmp_path, sizes=SIZES, use_cache=False)
    assert {r["label"] for r in data["train"]} == {"python", "shell"}


def test_describe_datasets_mentions_every_dataset() -> None:
    text = describe_datasets()
    for name in DATASET_NAMES:
        assert f"**{name}**" in text
    assert "source file" in text and "LORAPLEX_CACHE" in text


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
    again = build_man_sections(seed=0, sizes=SIZES, max_files=MAX_FILES, use_cache=False)
    assert again == datasets["man_sections"]
    data = build_dataset("man_sections", cache_dir=tmp_path, seed=0, sizes=SIZES, max_files=MAX_FILES)
    assert data == again
    details = json.loads((tmp_path / "man_sections" / "manifest.json").read_text())["details"]
    assert details["sections"] == sorted({r["label"] for r in data["train"]}, key=list(MAN_SECTIONS).index)
    assert details["requested_per_class"] == SIZES
    for split in SPLITS:
        assert details["rows_per_class"][split] * len(details["sections"]) == len(data[split])
    assert set(details["dropped_sections"]) | set(details["sections"]) == set(MAN_SECTIONS)
