"""Training and prediction data: read CSV / JSONL / JSON / Parquet files, pick the columns, tokenize, collate.

Three row kinds, chosen by the adapter's task:

* ``causal_lm``: ``prompt`` + ``response`` columns (names from the adapter's ``prompt_column`` /
  ``response_column``, which default to the config's first input / output feature), or a single ``text`` column.
  With a prompt template (Ludwig's ``prompt.template``) the prompt is the template with each ``{column}`` replaced
  by the row's value (``{__sample__}``: the prompt column's), for training and prediction alike.
  Tokens are ``[bos] prompt response [eos]``; labels are the token ids on the response (and eos) and -100 on the
  prompt and on padding (plain ``text`` rows are labelled everywhere but on bos).
* ``classification``: a text column and a label column; labels become class ids (label names sorted, as strings).
* ``token_classification``: ``words`` + ``tags`` list columns (JSON lists in CSV cells), or ``text`` + ``spans``
  (``[{"start", "end", "label"}]`` character spans, turned into BIO tags over whitespace/punctuation words).
  A row is tokenized as one text (its own text, or the words joined by spaces) and tags go on the first sub-token
  of each word (:mod:`loraplex.tokens`, the rule serving reads tags by); other sub-tokens, special tokens and
  padding get -100.

Every problem is a :class:`DataError` naming the file, and where it applies the row (1-based, as a spreadsheet
would show it counting the header as row 1 for CSV; the line for JSONL) and the column.
"""

from __future__ import annotations

import csv
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from loraplex.config.ludwig import SAMPLE, render_prompt, template_columns
from loraplex.errors import LoraplexError
from loraplex.tokens import bos_id, encode_words, eos_id, first_tokens, join_words, split_words

__all__ = [
    "AdapterData", "DataError", "Example", "bio_spans", "collate", "examples_for_task", "load_adapter_data",
    "read_rows", "row_label", "row_prompt", "words_from_spans", "token_examples", "word_windows",
]

IGNORE = -100


class DataError(LoraplexError, ValueError):
    """A dataset file cannot be read or does not have the columns / values a task needs."""


@dataclass
class Example:
    """One tokenized row: ``input_ids`` and labels (a class id, or one label per token with -100 = ignored)."""

    input_ids: list[int]
    labels: int | list[int]
    row: int  # index of the source row (0-based, data rows only)

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)


@dataclass
class AdapterData:
    """An adapter's tokenized dataset plus what the rows mean."""

    name: str
    task: str
    path: str
    examples: list[Example]
    labels: list[str] | None = None  # class / tag names (encoder tasks)
    columns: dict[str, str] = field(default_factory=dict)  # role -> column used (e.g. prompt -> "question")

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def n_tokens(self) -> int:
        return sum(e.n_tokens for e in self.examples)


# --------------------------------------------------------------------------------------------------- reading
def read_rows(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All rows of a ``.csv``, ``.jsonl``, ``.json`` (a list of objects, or ``{"data": [...]}``) or ``.parquet`` file.

    CSV cells are strings; cells that hold JSON lists/objects (``["a", "b"]``) are decoded.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"dataset file not found: {p}")
    suffix = p.suffix.lower()
    if suffix == ".csv":
        return _read_csv(p)
    if suffix == ".jsonl":
        return _read_jsonl(p)
    if suffix == ".json":
        return _read_json(p)
    if suffix == ".parquet":
        return _read_parquet(p)
    raise DataError(f"{p}: unsupported dataset type {suffix!r}; use .csv, .jsonl, .json or .parquet")


def _read_csv(p: Path) -> list[dict[str, Any]]:
    try:
        with open(p, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames is None:
                raise DataError(f"{p}: empty CSV file (no header row)")
            rows = []
            for i, row in enumerate(reader, start=2):
                if None in row:
                    raise DataError(f"{p}, row {i}: {len(row[None]) + len(reader.fieldnames)} cells but the header "
                                    f"has {len(reader.fieldnames)} columns")
                rows.append({k: _maybe_json(v) for k, v in row.items()})
            return rows
    except UnicodeDecodeError as exc:
        raise DataError(f"{p}: not UTF-8 text ({exc})") from None
    except csv.Error as exc:
        raise DataError(f"{p}: malformed CSV ({exc})") from None


def _maybe_json(v: Any) -> Any:
    if isinstance(v, str):
        s = v.strip()
        if len(s) >= 2 and (s[0], s[-1]) in (("[", "]"), ("{", "}")):
            try:
                return json.loads(s)
            except ValueError:
                return v
    return v


def _read_jsonl(p: Path) -> list[dict[str, Any]]:
    rows = []
    try:
        with open(p, encoding="utf-8") as fh:
            for i, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as exc:
                    raise DataError(f"{p}, line {i}: not valid JSON ({exc})") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{p}, line {i}: expected a JSON object per line, got {type(obj).__name__}")
                rows.append(obj)
    except UnicodeDecodeError as exc:
        raise DataError(f"{p}: not UTF-8 text ({exc})") from None
    return rows


def _read_json(p: Path) -> list[dict[str, Any]]:
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"{p}: not valid JSON ({exc})") from None
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    if not isinstance(obj, list):
        raise DataError(f"{p}: expected a JSON list of row objects (or {{\"data\": [...]}}), got {type(obj).__name__}")
    for i, r in enumerate(obj):
        if not isinstance(r, dict):
            raise DataError(f"{p}, item {i}: expected an object per row, got {type(r).__name__}")
    return obj


def _read_parquet(p: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        try:
            import pandas as pd  # pandas needs pyarrow or fastparquet itself
        except ImportError:
            raise DataError(f"{p}: reading Parquet needs the 'pyarrow' package: pip install pyarrow") from None
        try:
            return pd.read_parquet(p).to_dict(orient="records")
        except ImportError as exc:
            raise DataError(f"{p}: reading Parquet needs the 'pyarrow' package: pip install pyarrow ({exc})") from None
    try:
        return pq.read_table(p).to_pylist()
    except Exception as exc:  # pyarrow raises its own error types
        raise DataError(f"{p}: cannot read Parquet file ({exc})") from None


def write_rows(path: str | os.PathLike[str], rows: list[dict[str, Any]]) -> Path:
    """Write rows as CSV (lists/dicts as JSON cells) or JSONL (any other suffix), atomically."""
    import io
    import tempfile

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.suffix.lower() == ".csv":
        cols: list[str] = []
        for r in rows:
            cols.extend(k for k in r if k not in cols)
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: json.dumps(v, ensure_ascii=False) if isinstance(v, (list, dict)) else v
                        for k, v in r.items()})
        text = buf.getvalue()
    else:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


# --------------------------------------------------------------------------------------------------- columns
def _where(path: str, i: int) -> str:
    """'file, row N' for data row index i (CSV rows count the header as row 1)."""
    n = i + 2 if path.lower().endswith(".csv") else i + 1
    kind = "row" if path.lower().endswith((".csv", ".parquet", ".json")) else "line"
    return f"{path}, {kind} {n}"


def _pick(columns: Sequence[str], wanted: Sequence[str | None]) -> str | None:
    for w in wanted:
        if w is not None and w in columns:
            return w
    return None


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    cols: list[str] = []
    for r in rows[:50]:
        cols.extend(k for k in r if k not in cols)
    return cols


def _text(v: Any, path: str, i: int, col: str) -> str:
    if v is None or (isinstance(v, float) and v != v):
        raise DataError(f"{_where(path, i)}, column {col!r}: empty value")
    if isinstance(v, (list, dict)):
        raise DataError(f"{_where(path, i)}, column {col!r}: expected text, got a {type(v).__name__}")
    return str(v)


def row_label(v: Any) -> str:
    """A label value as a class name (``1`` and ``"1"`` are the same class; ``1.0`` becomes ``"1"``)."""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v).strip()


# --------------------------------------------------------------------------------------------------- spans
def words_from_spans(text: str, spans: Sequence[dict[str, Any]]) -> tuple[list[str], list[tuple[int, int]], list[str]]:
    """Words (runs of word characters or single punctuation marks), their offsets and BIO tags from char spans.

    The text is cut at every span boundary first, so a span always covers whole words.
    """
    offsets = split_words(text, [int(s[k]) for s in spans for k in ("start", "end")])
    words = [text[s:e] for s, e in offsets]
    tags = ["O"] * len(words)
    for sp in sorted(spans, key=lambda s: int(s["start"])):
        first = True
        for k, (s, e) in enumerate(offsets):
            if s >= int(sp["start"]) and e <= int(sp["end"]):
                tags[k] = ("B-" if first else "I-") + str(sp["label"])
                first = False
    return words, offsets, tags


def bio_spans(tags: Sequence[str]) -> set[tuple[int, int, str]]:
    """Entity spans ``(start, end, type)`` of a BIO tag sequence (conlleval rules: a stray I- starts an entity)."""
    out: set[tuple[int, int, str]] = set()
    start, typ = None, None
    for i, t in enumerate(list(tags) + ["O"]):
        t = t or "O"
        if t == "O" or t.startswith("B-") or (t.startswith("I-") and t[2:] != typ):
            if start is not None:
                out.add((start, i, typ))  # type: ignore[arg-type]
                start, typ = None, None
            if t.startswith(("B-", "I-")):
                start, typ = i, t[2:]
        # an I- of the current type continues the entity
    return out


# --------------------------------------------------------------------------------------------------- tokenizing
def encode_prompt(tokenizer: Any, prompt: str, max_length: int) -> list[int]:
    """``[bos] prompt`` ids (left-truncated to ``max_length``), the input for generation."""
    bos = bos_id(tokenizer)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    head = [bos] if bos is not None else []
    keep = max(max_length - len(head), 1)
    return head + ids[-keep:]


def encode_response(tokenizer: Any, response: str) -> list[int]:
    """Response token ids (no specials), what generation must reproduce for an exact match."""
    return list(tokenizer(response, add_special_tokens=False)["input_ids"])


def causal_example(tokenizer: Any, prompt: str | None, response: str | None, max_length: int,
                   row: int = 0) -> Example | None:
    """``[bos] prompt response [eos]`` with labels on the response and eos; None if nothing is left to learn."""
    bos, eos = bos_id(tokenizer), eos_id(tokenizer)
    head = [bos] if bos is not None else []
    tail = [eos] if eos is not None else []
    if prompt is None:  # plain text: learn every token
        ids = head + tokenizer(response, add_special_tokens=False)["input_ids"] + tail
        ids = ids[:max_length]
        labels = [IGNORE] * len(head) + ids[len(head):]
        labels = labels[:len(ids)]
    else:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        r = tokenizer(response, add_special_tokens=False)["input_ids"] + tail
        budget = max_length - len(head)
        if len(p) + len(r) > budget:  # keep the end of the prompt and at least half the budget of response
            keep_r = min(len(r), max(budget - len(p), budget // 2))
            r = r[:keep_r]
            p = p[len(p) - (budget - len(r)):] if budget - len(r) > 0 else []
        ids = head + p + r
        labels = [IGNORE] * (len(head) + len(p)) + r
    if all(x == IGNORE for x in labels[1:]):
        return None
    return Example(ids, labels, row)


def classification_example(tokenizer: Any, text: str, label: int, max_length: int, row: int = 0) -> Example:
    ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
    return Example(list(ids), int(label), row)


def token_example(tokenizer: Any, words: list[str], tag_ids: list[int] | None, max_length: int,
                  row: int = 0, *, text: str | None = None, spans: Sequence[tuple[int, int]] | None = None
                  ) -> tuple[Example, list[int | None]]:
    """One input for a row of words (truncated to ``max_length``), labels on the first sub-token of each word, and the
    word of each token (None for special tokens). The words are ``text[s:e]`` for their ``spans`` when given, else
    they are joined by spaces (:func:`loraplex.tokens.join_words`)."""
    if text is None or spans is None:
        text, spans = join_words(words)
    return _labelled(*encode_words(tokenizer, text, spans, max_length), tag_ids, row)


def _labelled(ids: list[int], word_ids: list[int | None], tag_ids: list[int] | None, row: int
              ) -> tuple[Example, list[int | None]]:
    """The example of one encoding of a row's words (labels on first sub-tokens), and its word of each token."""
    labels = [IGNORE] * len(word_ids)
    if tag_ids is not None:
        for pos, w in first_tokens(word_ids):
            labels[pos] = int(tag_ids[w])
    return Example(ids, labels, row), word_ids


@dataclass(frozen=True)
class WordWindow:
    """Words ``start:end`` of a row in one input; the window *owns* words ``own_start:own_end`` (its
    predictions and labels count for them): the owned ranges of a row's windows partition its words."""

    start: int
    end: int
    own_start: int
    own_end: int


def word_windows(word_tokens: Sequence[int], budget: int, overlap: int | None = None) -> list[WordWindow]:
    """Cover every word with windows of consecutive words whose sub-token counts (``word_tokens``) sum to at most
    ``budget``; consecutive windows share about ``overlap`` tokens (default half the budget) and split the shared
    words in the middle, so each owned word has context on both sides. One window when everything fits; a single
    word longer than the budget gets a window of its own (and is truncated there)."""
    n = len(word_tokens)
    if n == 0 or sum(word_tokens) <= budget:
        return [WordWindow(0, n, 0, n)]
    overlap = budget // 2 if overlap is None else max(0, min(int(overlap), budget - 1))
    spans: list[tuple[int, int]] = []
    start = 0
    while True:
        end, used = start, 0
        while end < n and (end == start or used + word_tokens[end] <= budget):
            used += word_tokens[end]
            end += 1
        spans.append((start, end))
        if end == n:
            break
        nxt, tail = end, 0  # the next window starts where the last ``overlap`` tokens of this one start
        while nxt - 1 > start and tail + word_tokens[nxt - 1] <= overlap:
            nxt -= 1
            tail += word_tokens[nxt]
        start = nxt
    bounds = [0] + [(s2 + e1 + 1) // 2 for (_, e1), (s2, _) in zip(spans, spans[1:])] + [n]
    return [WordWindow(s, e, max(s, bounds[k]), min(e, bounds[k + 1])) for k, (s, e) in enumerate(spans)]


def token_examples(tokenizer: Any, words: list[str], tag_ids: list[int] | None, max_length: int, row: int = 0,
                   *, text: str | None = None, spans: Sequence[tuple[int, int]] | None = None
                   ) -> list[tuple[Example, list[int | None], WordWindow]]:
    """A row of words as one or more inputs of at most ``max_length`` tokens (:func:`word_windows`; a long row is not
    truncated): per window the example (labels only on its owned words), the *row's* word index of each token (None
    for special tokens), and the window. ``text`` / ``spans`` as in :func:`token_example`; a window is the text from
    its first word's start to its last word's end."""
    if text is None or spans is None:
        text, spans = join_words(words)
    ids, word_ids = encode_words(tokenizer, text, spans)  # the row in one input, special tokens included
    if len(ids) <= max_length:  # it fits: one example (what token_example gives), no re-tokenizing
        return [(*_labelled(ids, word_ids, tag_ids, row), WordWindow(0, len(words), 0, len(words)))]
    counts = [0] * len(words)
    for w in word_ids:
        if w is not None:
            counts[w] += 1
    budget = max_length - tokenizer.num_special_tokens_to_add(pair=False)
    windows = word_windows(counts, budget) if budget > 0 else [WordWindow(0, len(words), 0, len(words))]
    out = []
    for win in windows:
        tags = None
        if tag_ids is not None:
            tags = [tag_ids[w] if win.own_start <= w < win.own_end else IGNORE for w in range(win.start, win.end)]
        a = spans[win.start][0] if win.end > win.start else 0
        b = spans[win.end - 1][1] if win.end > win.start else 0
        local = [(s - a, e - a) for s, e in spans[win.start:win.end]]
        ex, wid = token_example(tokenizer, words[win.start:win.end], tags, max_length, row, text=text[a:b],
                                spans=local)
        out.append((ex, [None if w is None else w + win.start for w in wid], win))
    return out


_TokenRow = tuple[list[str], list[str] | None, str | None, list[tuple[int, int]] | None]


def _token_rows(rows: list[dict[str, Any]], path: str, words_col: str | None, tags_col: str | None,
                text_col: str | None, need_tags: bool) -> list[_TokenRow]:
    """(words, tags, text, word spans) per row from words+tags columns (no text: the words are joined by spaces) or
    text+spans columns."""
    out: list[_TokenRow] = []
    for i, r in enumerate(rows):
        if words_col is not None:
            words = r.get(words_col)
            if isinstance(words, str):
                words = words.split()
            if not isinstance(words, list) or not words:
                raise DataError(f"{_where(path, i)}, column {words_col!r}: expected a non-empty list of words "
                                f"(a JSON list in CSV), got {words!r:.60}")
            words = [str(w) for w in words]
            tags = None
            if tags_col is not None and r.get(tags_col) not in (None, ""):
                tags = r.get(tags_col)
                if isinstance(tags, str):
                    tags = tags.split()
                if not isinstance(tags, list):
                    raise DataError(f"{_where(path, i)}, column {tags_col!r}: expected a list of tags, got {tags!r:.60}")
                if len(tags) != len(words):
                    raise DataError(f"{_where(path, i)}, column {tags_col!r}: {len(tags)} tags for {len(words)} words "
                                    f"(column {words_col!r})")
                tags = [str(t) for t in tags]
            elif need_tags:
                raise DataError(f"{_where(path, i)}, column {tags_col or 'tags'!r}: missing tags")
            out.append((words, tags, None, None))
        else:
            assert text_col is not None
            text = _text(r.get(text_col), path, i, text_col)
            spans = r.get("spans")
            if spans in (None, ""):
                if need_tags:
                    raise DataError(f"{_where(path, i)}, column 'spans': missing (token classification needs "
                                    f"'words'+'tags' columns or 'text'+'spans')")
                spans_list: list[dict[str, Any]] = []
            else:
                if not isinstance(spans, list) or not all(isinstance(s, dict) and {"start", "end", "label"} <= set(s)
                                                          for s in spans):
                    raise DataError(f"{_where(path, i)}, column 'spans': expected a JSON list of "
                                    f"{{\"start\", \"end\", \"label\"}} objects, got {spans!r:.80}")
                spans_list = spans
            words, offsets, tags = words_from_spans(text, spans_list)
            if not words:
                raise DataError(f"{_where(path, i)}, column {text_col!r}: no words in the text")
            out.append((words, tags if spans not in (None, "") else None, text, offsets))
    return out


@dataclass
class Columns:
    """Which columns a dataset uses for an adapter's task."""

    task: str
    prompt: str | None = None
    response: str | None = None
    text: str | None = None
    label: str | None = None
    words: str | None = None
    tags: str | None = None
    template: str | None = None  # causal LM: the prompt template over the row's columns

    def as_dict(self) -> dict[str, str]:
        return {k: v for k, v in self.__dict__.items() if k not in ("task", "template") and v is not None}

    @property
    def has_prompt(self) -> bool:
        """Whether rows have a prompt (a prompt column or a template)."""
        return self.prompt is not None or self.template is not None


def row_prompt(columns: Columns, row: dict[str, Any], path: str, i: int) -> str:
    """Row ``i``'s prompt: its prompt column, or the template filled from its columns."""
    if columns.template is None:
        return _text(row.get(columns.prompt), path, i, columns.prompt or "prompt")
    sample = row.get(columns.prompt) if columns.prompt is not None else None
    try:
        return render_prompt(columns.template, row, sample=None if sample is None else str(sample))
    except KeyError as exc:
        raise DataError(f"{_where(path, i)}: the prompt template reads column {exc.args[0]!r}, which this row "
                        f"does not have") from None


def resolve_columns(rows: list[dict[str, Any]], path: str, task: str, adapter: Any, *,
                    need_labels: bool = True) -> Columns:
    """The columns of ``rows`` to use for ``task`` given the adapter's column settings (config fields)."""
    cols = _columns(rows)
    shown = ", ".join(cols) or "(none)"
    if task == "causal_lm":
        pcol = getattr(adapter, "prompt_column", None) or "prompt"
        rcol = getattr(adapter, "response_column", None) or "response"
        tcol = getattr(adapter, "text_column", None) or "text"
        template = getattr(adapter, "prompt_template", None)
        if template is not None:
            needed = template_columns(template) + ([pcol] if "{" + SAMPLE + "}" in template else [])
            missing = [c for c in needed if c not in cols]
            if missing:
                raise DataError(f"{path}: the prompt template reads column {missing[0]!r}, which the data does not "
                                f"have; columns found: {shown}")
            if rcol not in cols and need_labels:
                raise DataError(f"{path}: causal LM data with a prompt template needs a response column {rcol!r}; "
                                f"columns found: {shown}")
            return Columns(task, prompt=pcol if pcol in cols else None, response=rcol if rcol in cols else None,
                           template=template)
        if pcol in cols and (rcol in cols or not need_labels):
            return Columns(task, prompt=pcol, response=rcol if rcol in cols else None)
        if tcol in cols:
            return Columns(task, text=tcol)
        if pcol in cols:
            raise DataError(f"{path}: has the prompt column {pcol!r} but no response column {rcol!r}; "
                            f"columns found: {shown}")
        raise DataError(f"{path}: causal LM data needs {pcol!r} + {rcol!r} columns or a {tcol!r} column; "
                        f"columns found: {shown} (set prompt_column / response_column / text_column on the adapter, "
                        f"or input_features / output_features)")
    if task == "classification":
        tcol = getattr(adapter, "text_column", None) or "text"
        lcol = getattr(adapter, "label_column", None) or "label"
        if tcol not in cols:
            raise DataError(f"{path}: classification data needs a text column {tcol!r}; columns found: {shown}")
        if lcol not in cols:
            if need_labels:
                raise DataError(f"{path}: classification data needs a label column {lcol!r}; columns found: {shown}")
            lcol = None
        return Columns(task, text=tcol, label=lcol)
    if task == "token_classification":
        lcol = getattr(adapter, "label_column", None)
        tags = _pick(cols, [lcol if lcol not in (None, "label") else None, "tags", "ner_tags", lcol])
        tcol = getattr(adapter, "text_column", None) or "text"
        if "words" in cols or "tokens" in cols:
            wcol = "words" if "words" in cols else "tokens"
            if tags is None and need_labels:
                raise DataError(f"{path}: token classification data has a {wcol!r} column but no tags column "
                                f"('tags'); columns found: {shown}")
            return Columns(task, words=wcol, tags=tags)
        if tcol in cols and ("spans" in cols or not need_labels):
            return Columns(task, text=tcol, label="spans" if "spans" in cols else None)
        raise DataError(f"{path}: token classification data needs 'words' + 'tags' columns or {tcol!r} + 'spans'; "
                        f"columns found: {shown}")
    raise DataError(f"unknown task {task!r}")


def examples_for_task(rows: list[dict[str, Any]], path: str, task: str, columns: Columns, tokenizer: Any,
                      max_length: int, labels: list[str] | None = None, *, need_labels: bool = True
                      ) -> tuple[list[Example], list[str] | None, list[Any]]:
    """Tokenized examples, the label names, and per-example extras (for token tasks ``(words, word_ids, tags,
    window)``: a row longer than ``max_length`` becomes several examples, see :func:`token_examples`).

    ``labels`` fixes the label order (prediction uses the trained adapter's labels); when None, the names are
    collected from the data (sorted; ``O`` first for tags). A label not in ``labels`` is an error naming the row.
    """
    extras: list[Any] = []
    if task == "causal_lm":
        out = []
        for i, r in enumerate(rows):
            if columns.text is not None:
                ex = causal_example(tokenizer, None, _text(r.get(columns.text), path, i, columns.text), max_length, i)
            else:
                prompt = row_prompt(columns, r, path, i)
                if columns.response is None:
                    ex = Example(encode_prompt(tokenizer, prompt, max_length), [], i)
                else:
                    resp = _text(r.get(columns.response), path, i, columns.response)
                    ex = causal_example(tokenizer, prompt, resp, max_length, i)
            if ex is None:
                continue
            out.append(ex)
        return out, None, extras
    if task == "classification":
        values = []
        for i, r in enumerate(rows):
            if columns.label is None:
                values.append(None)
                continue
            v = r.get(columns.label)
            if v is None or v == "":
                if need_labels:
                    raise DataError(f"{_where(path, i)}, column {columns.label!r}: empty label")
                values.append(None)
                continue
            values.append(row_label(v))
        if labels is None:
            labels = sorted({v for v in values if v is not None}, key=_label_key)
            if need_labels and len(labels) < 2:
                raise DataError(f"{path}, column {columns.label!r}: classification needs at least 2 distinct labels, "
                                f"found {labels}")
        index = {n: k for k, n in enumerate(labels)}
        out = []
        for i, (r, v) in enumerate(zip(rows, values)):
            text = _text(r.get(columns.text), path, i, columns.text or "text")
            if v is not None and v not in index and not need_labels:
                v = None  # prediction data may hold labels the adapter never saw: scored as wrong, not an error
            if v is not None and v not in index:
                raise DataError(f"{_where(path, i)}, column {columns.label!r}: label {v!r} is not one of the "
                                f"adapter's labels {labels}")
            out.append(classification_example(tokenizer, text, index[v] if v is not None else IGNORE, max_length, i))
        return out, labels, extras
    # token classification
    word_rows = _token_rows(rows, path, columns.words, columns.tags, columns.text, need_labels)
    if labels is None:
        seen = sorted({t for _, tags, _, _ in word_rows for t in (tags or [])}, key=_tag_key)
        labels = (["O"] if "O" not in seen else []) + seen if seen else ["O"]
        labels = ["O"] + [t for t in labels if t != "O"]
        if need_labels and len(labels) < 2:
            raise DataError(f"{path}: token classification needs at least one entity tag besides 'O'")
    index = {n: k for k, n in enumerate(labels)}
    out = []
    for i, (words, tags, text, spans) in enumerate(word_rows):
        tag_ids = None
        if tags is not None:
            bad = [t for t in tags if t not in index]
            if bad and not need_labels:
                bad = []
                tag_ids = [index.get(t, IGNORE) for t in tags]
            elif bad:
                raise DataError(f"{_where(path, i)}, column {columns.tags or 'spans'!r}: tag {bad[0]!r} is not one "
                                f"of the adapter's tags {labels}")
            if tag_ids is None:
                tag_ids = [index[t] for t in tags]
        for ex, word_ids, win in token_examples(tokenizer, words, tag_ids, max_length, i, text=text, spans=spans):
            out.append(ex)
            extras.append((words, word_ids, tags, win))
    return out, labels, extras


def _label_key(s: str) -> tuple[int, Any]:
    try:
        return (0, float(s))
    except ValueError:
        return (1, s)


def _tag_key(t: str) -> tuple[str, int]:
    if t == "O":
        return ("", 0)
    kind, _, typ = t.partition("-")
    return (typ, 0 if kind == "B" else 1)


def load_adapter_data(config: Any, name: str, tokenizer: Any, *, dataset: str | None = None,
                      labels: list[str] | None = None, need_labels: bool = True) -> AdapterData:
    """Read and tokenize adapter ``name``'s dataset (or ``dataset``) following its config."""
    a = config.get_adapter(name)
    task = a.task or ("causal_lm" if config.model_type == "llm" else "classification")
    path = dataset or a.dataset
    if path is None:
        raise DataError(f"adapter {name!r} has no dataset")
    rows = read_rows(path)
    if not rows:
        raise DataError(f"{path}: no data rows")
    columns = resolve_columns(rows, str(path), task, a, need_labels=need_labels)
    examples, names, _ = examples_for_task(rows, str(path), task, columns, tokenizer, config.trainer.max_length,
                                           labels, need_labels=need_labels)
    if not examples:
        raise DataError(f"{path}: no usable rows for adapter {name!r} (every row was empty after tokenization)")
    return AdapterData(name, task, str(path), examples, names, columns.as_dict())


# --------------------------------------------------------------------------------------------------- batches
def collate(examples: Sequence[Example], pad_id: int, task: str, *, left_pad: bool = False,
            device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Pad a list of examples: ``input_ids`` and ``attention_mask`` [N, L], ``labels`` [N, L] or [N]."""
    n = len(examples)
    length = max(e.n_tokens for e in examples)
    ids = torch.full((n, length), pad_id, dtype=torch.long)
    mask = torch.zeros((n, length), dtype=torch.long)
    per_token = task != "classification"
    labels = torch.full((n, length), IGNORE, dtype=torch.long) if per_token else torch.empty(n, dtype=torch.long)
    for i, e in enumerate(examples):
        k = e.n_tokens
        sl = slice(length - k, length) if left_pad else slice(0, k)
        ids[i, sl] = torch.tensor(e.input_ids, dtype=torch.long)
        mask[i, sl] = 1
        if per_token:
            if isinstance(e.labels, list) and e.labels:
                labels[i, sl] = torch.tensor(e.labels, dtype=torch.long)
        else:
            labels[i] = int(e.labels)  # type: ignore[arg-type]
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if device is not None:
        out = {k: v.to(device) for k, v in out.items()}
    return out


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """A deterministic permutation of ``range(n)`` for one epoch (depends only on seed and epoch)."""
    rng = random.Random(f"{seed}:{epoch}")
    order = list(range(n))
    rng.shuffle(order)
    return order


def iter_chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]
