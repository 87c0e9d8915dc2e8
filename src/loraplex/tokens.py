"""Tokens: special ids, padding, words and the first sub-token of each word, one rule for train, predict, serve and
the demo.

* Special ids: :func:`pad_id`, :func:`bos_id`, :func:`eos_id` (the id that ends a causal-LM training row) and
  :func:`eos_ids` (the ids that stop generation). None of them changes the tokenizer.
* Padding: :func:`pad_batch` turns token-id lists into one ``input_ids`` / ``attention_mask`` batch.
* Words: :func:`split_words` cuts text into runs of word characters and single punctuation marks (``\\w+|[^\\w\\s]``),
  the word of token-classification data and of the ``/v1/classify`` entities.
* First sub-token: a text is tokenized whole, with its offset mapping; :func:`token_words` places each token in the
  word it overlaps first, and :func:`first_tokens` yields each word's first token, where the word's label goes in
  training and where its tag is read in prediction and serving (:func:`encode_words` is that encoding).
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Iterator, Protocol, Sequence

import torch

__all__ = [
    "CharSpan", "bos_id", "encode_offsets", "encode_words", "eos_id", "eos_ids", "first_token_per_word", "first_tokens",
    "join_words", "pad_batch", "pad_id", "split_words", "token_words", "tokenize_words",
]

WORD_RE = re.compile(r"\w+|[^\w\s]")


# --------------------------------------------------------------------------------------------------- special ids
def _int_ids(v: Any) -> list[int]:
    """A config's token id field (None, an int or a list of ints) as a list."""
    if v is None:
        return []
    return [int(v)] if isinstance(v, int) else [int(x) for x in v]


def bos_id(tokenizer: Any) -> int | None:
    """The id that starts a causal-LM row: the tokenizer's ``bos_token_id``, else its ``cls_token_id`` (BERT-style
    tokenizers), else None."""
    for v in (getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "cls_token_id", None)):
        if v is not None:
            return int(v)
    return None


def eos_id(tokenizer: Any) -> int | None:
    """The id that ends a causal-LM row (and that greedy prediction stops on): the tokenizer's ``eos_token_id``, else
    its ``sep_token_id`` (BERT-style tokenizers), else None."""
    for v in (getattr(tokenizer, "eos_token_id", None), getattr(tokenizer, "sep_token_id", None)):
        if v is not None:
            return int(v)
    return None


def eos_ids(tokenizer: Any, model: Any = None) -> frozenset[int]:
    """The ids that end generation: the model's ``generation_config.eos_token_id`` (an int or a list), else its
    ``config.eos_token_id``, else :func:`eos_id` of the tokenizer; empty when none of them is set."""
    for src in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        ids = _int_ids(getattr(src, "eos_token_id", None))
        if ids:
            return frozenset(ids)
    eos = eos_id(tokenizer)
    return frozenset() if eos is None else frozenset([eos])


def pad_id(tokenizer: Any, model: Any = None) -> int:
    """The id that fills padding positions: the tokenizer's ``pad_token_id``; else the model's
    ``generation_config.pad_token_id``, then ``config.pad_token_id``; else the smallest of :func:`eos_ids`; else 0.

    Padding sits under a zero attention mask (and -100 labels), so any id of the vocabulary gives the same outputs;
    the rule picks the one the tokenizer or model names. The tokenizer is only read, never changed."""
    for v in (getattr(tokenizer, "pad_token_id", None),
              getattr(getattr(model, "generation_config", None), "pad_token_id", None),
              getattr(getattr(model, "config", None), "pad_token_id", None)):
        if isinstance(v, int):
            return v
    eos = eos_ids(tokenizer, model)
    return min(eos) if eos else 0


# --------------------------------------------------------------------------------------------------- padding
def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, *, left: bool = False,
              device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` [N, L] (long), L the longest sequence.

    Right padding by default (encoders, training, scoring); ``left`` puts the padding first, so that generation
    continues every row from its last real token."""
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        span = slice(n - len(s), n) if left else slice(0, len(s))
        ids[i, span] = torch.tensor(list(s), dtype=torch.long)
        mask[i, span] = 1
    if device is not None:
        ids, mask = ids.to(device), mask.to(device)
    return ids, mask


# --------------------------------------------------------------------------------------------------- words
class CharSpan(Protocol):
    """A character range ``start:end`` of a text (e.g. a labelled entity)."""

    start: int
    end: int


def split_words(text: str, cuts: Iterable[int] = ()) -> list[tuple[int, int]]:
    """Character ranges ``(start, end)`` of the words of ``text``: runs of word characters, or single punctuation
    marks. The text is first cut at every offset in ``cuts``, so a word never crosses a cut (a labelled span made of
    whole words: a URL becomes several words)."""
    bounds = sorted({0, len(text), *(int(c) for c in cuts if 0 <= int(c) <= len(text))})
    return [m.span() for a, b in zip(bounds, bounds[1:]) for m in WORD_RE.finditer(text, a, b)]


def tokenize_words(text: str, spans: Sequence[CharSpan] = ()) -> tuple[list[str], list[list[int]]]:
    """Words of ``text`` (:func:`split_words`, cut at every span boundary, so each span starts at a word start and
    ends at a word end) and their ``[start, end]`` offsets."""
    ranges = split_words(text, [c for sp in spans for c in (sp.start, sp.end)])
    return [text[s:e] for s, e in ranges], [[s, e] for s, e in ranges]


def join_words(words: Sequence[str]) -> tuple[str, list[tuple[int, int]]]:
    """Pre-split words as one text, joined by single spaces, and each word's character range in it."""
    ranges, pos = [], 0
    for w in words:
        ranges.append((pos, pos + len(w)))
        pos += len(w) + 1
    return " ".join(words), ranges


# --------------------------------------------------------------------------------------------------- sub-tokens
def token_words(offsets: Sequence[Sequence[int]], words: Sequence[Sequence[int]]) -> list[int | None]:
    """The word of each token: the first word (by character range, sorted, non-overlapping) that the token's
    ``(start, end)`` offsets overlap; None for special tokens (empty offsets) and tokens only on spaces.

    Overlap, not "starts inside", so that a token carrying its leading space (byte-level BPE ``Ġword``,
    SentencePiece ``▁word``) belongs to the word after the space."""
    out: list[int | None] = []
    w = 0
    for s, e in offsets:
        if e <= s:
            out.append(None)
            continue
        while w < len(words) and words[w][1] <= s:
            w += 1
        out.append(w if w < len(words) and words[w][0] < e else None)
    return out


def first_tokens(word_ids: Sequence[int | None], own: tuple[int, int] | None = None) -> Iterator[tuple[int, int]]:
    """``(position, word)`` of the first sub-token of each word (of the words ``own[0] <= word < own[1]`` only,
    when given), from the word of each token (:func:`token_words`, None for none): where a word's label goes in
    training and where its tag is read in prediction and serving."""
    prev = None
    for pos, w in enumerate(word_ids):
        if w is not None and w != prev and (own is None or own[0] <= w < own[1]):
            yield pos, w
        prev = w


def first_token_per_word(word_ids: Sequence[int | None], n_words: int) -> list[int | None]:
    """Per word ``0..n_words-1``, the position of its first sub-token (:func:`first_tokens`), or None when no token
    falls in it (e.g. cut off by truncation, or inside a token that starts in the word before)."""
    out: list[int | None] = [None] * n_words
    for pos, w in first_tokens(word_ids):
        if w < n_words and out[w] is None:
            out[w] = pos
    return out


def encode_offsets(tokenizer: Any, text: str, max_length: int | None = None) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of ``text`` (special tokens included, truncated to ``max_length`` when given) and each token's
    character range ``(start, end)`` in it (``(0, 0)`` for special tokens): the one tokenization of a text for
    classification and token tasks, in training and serving. Needs a fast (Rust-backed) tokenizer."""
    enc = tokenizer(text, return_offsets_mapping=True, truncation=max_length is not None, max_length=max_length)
    return list(enc["input_ids"]), [(int(s), int(e)) for s, e in enc["offset_mapping"]]


def encode_words(tokenizer: Any, text: str, words: Sequence[Sequence[int]], max_length: int | None = None
                 ) -> tuple[list[int], list[int | None]]:
    """Token ids of ``text`` (:func:`encode_offsets`) and the word of each token (:func:`token_words` over the
    words' character ranges ``words``): the encoding of a token-classification input, on which training puts
    labels and serving reads tags."""
    ids, offsets = encode_offsets(tokenizer, text, max_length)
    return ids, token_words(offsets, words)
