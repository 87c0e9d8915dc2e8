"""From snippets to rows: pools of snippets per split, deduplication across classes and splits, a seeded
round-robin order over files, and balanced classification rows.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from loraplex.demo.sources import SourceSet
from loraplex.demo.text import SPLITS, DatasetBuildError, hash_unit, normalize_key, split_for

#: Default rows *per class* per split for the classification datasets.
DEFAULT_CLASS_SIZES: dict[str, int] = {"train": 300, "validation": 50, "test": 100}

#: Rows per split (per class for classification datasets); None for a builder's default.
Sizes = Mapping[str, int] | None


@dataclass(frozen=True)
class Snippet:
    """One snippet of a source file."""

    text: str
    source: str
    index: int  # position of the snippet within its file


def snippet_pools(parts: Sequence[tuple[Callable[[str], list[str]], SourceSet]]) -> dict[str, list[Snippet]]:
    """Snippets per split from every file of ``parts``: (the snippets of one file by its path, files).

    A file's snippets all go to its split (:func:`split_for`)."""
    pools: dict[str, list[Snippet]] = {s: [] for s in SPLITS}
    for snippets_of, ss in parts:
        for path in ss.files:
            split = split_for(path)
            for i, text in enumerate(snippets_of(path)):
                pools[split].append(Snippet(text, path, i))
    return pools


def dedup_across(
    pools_by_class: Mapping[str, Mapping[str, list[Snippet]]],
) -> dict[str, dict[str, list[Snippet]]]:
    """Drop repeated snippets (same normalized text) across classes and splits.

    The first occurrence wins in split order test, validation, train (and within a split in
    path order), so a text that appears in a test file never shows up in train as well.
    """
    seen: set[str] = set()
    out: dict[str, dict[str, list[Snippet]]] = {c: {s: [] for s in SPLITS} for c in pools_by_class}
    for split in ("test", "validation", "train"):
        for cls in sorted(pools_by_class):
            for sn in sorted(pools_by_class[cls][split], key=lambda x: (x.source, x.index)):
                k = normalize_key(sn.text)
                if k in seen:
                    continue
                seen.add(k)
                out[cls][split].append(sn)
    return out


def rank(
    pool: Sequence[Snippet], seed: int, salt: str, prefer: Callable[[Snippet], bool] | None = None
) -> list[Snippet]:
    """Order a pool for sampling: round-robin over files (one snippet per file before a second),
    preferred snippets first, ties shuffled by a seeded hash."""
    per_file: dict[str, list[Snippet]] = defaultdict(list)
    for sn in pool:
        per_file[sn.source].append(sn)
    keyed = []
    for src, items in per_file.items():
        hashed = sorted(((hash_unit(salt, seed, src, x.index), x) for x in items), key=lambda hx: (hx[0], hx[1].index))
        for r, (h, sn) in enumerate(hashed):
            pref = 0 if (prefer is None or prefer(sn)) else 1
            keyed.append(((pref, r, h), sn))
    keyed.sort(key=lambda kv: kv[0])
    return [sn for _, sn in keyed]


def balanced_rows(
    pools_by_class: Mapping[str, Mapping[str, list[Snippet]]],
    sizes: Mapping[str, int],
    seed: int,
    salt: str,
    dataset: str,
    prefer: Callable[[Snippet], bool] | None = None,
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
            for sn in rank(pools_by_class[cls][split], seed, f"{salt}:{cls}:{split}", prefer)[:n]:
                rows.append({"text": sn.text, "label": cls, "source": sn.source})
        random.Random(f"{salt}:{seed}:{split}").shuffle(rows)
        out[split] = rows
    return out


def text_half(sn: Snippet) -> int:
    """0 or 1 from a hash of the snippet text: text_kind prefers half 0, code_language half 1."""
    return int(hash_unit("half", normalize_key(sn.text)) < 0.5)


def class_counts(rows: Mapping[str, list[dict[str, Any]]], kept: Sequence[str], sizes: Mapping[str, int]
                 ) -> dict[str, Any]:
    """Manifest details of a balanced class dataset: rows per class asked for and written, splits shrunk."""
    per_class = {s: len(rows[s]) // len(kept) for s in SPLITS}
    return {"requested_per_class": {s: int(sizes.get(s, 0)) for s in SPLITS}, "rows_per_class": per_class,
            "shrunk": [s for s in SPLITS if per_class[s] < int(sizes.get(s, 0))]}
