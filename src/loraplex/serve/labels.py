"""Pure functions from head logits to answers: sequence labels with scores, and entity spans from BIO tags.

Token tasks are tagged per *word* (as in training: runs of word characters or single punctuation marks, see
:func:`loraplex.tokens.split_words`). A word takes the tag of its first sub-token, placed by the rule training puts
labels by (:func:`loraplex.tokens.token_words` over the tokenizer's offset mapping), so every span's
``start``/``end`` are character offsets into the original text and ``text[start:end]`` is the entity.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from loraplex.tokens import first_token_per_word, token_words


def sequence_scores(logits: torch.Tensor, labels: Sequence[str], top_k: int | None = None
                    ) -> tuple[str, float, dict[str, float]]:
    """(best label, its probability, {label: probability} best first, cut to ``top_k``) of one row's logits."""
    probs = torch.softmax(logits.float(), dim=-1)
    order = torch.argsort(probs, descending=True, stable=True).tolist()
    if top_k is not None:
        order = order[:top_k]
    scores = {labels[i]: float(probs[i]) for i in order}
    best = order[0]
    return labels[best], float(probs[best]), scores


def word_tags(token_logits: torch.Tensor, offsets: Sequence[Sequence[int]], words: Sequence[tuple[int, int]],
              labels: Sequence[str]) -> list[tuple[str, float]]:
    """(tag, probability) per word from per-token logits [L, num_labels] (words without a token: ``("O", 1.0)``,
    e.g. cut off by truncation)."""
    probs = torch.softmax(token_logits.float(), dim=-1)
    best_p, best = probs.max(dim=-1)
    out: list[tuple[str, float]] = []
    for t in first_token_per_word(token_words(offsets, words), len(words)):
        if t is None or t >= probs.shape[0]:
            out.append(("O", 1.0))
        else:
            out.append((labels[int(best[t])], float(best_p[t])))
    return out


def _split_tag(tag: str) -> tuple[str, str | None]:
    """``B-X`` -> (B, X), ``I-X`` -> (I, X), ``O`` -> (O, None); an unprefixed tag is an IO-scheme ``I``."""
    if tag == "O" or not tag:
        return "O", None
    if len(tag) > 2 and tag[1] in "-_" and tag[0] in "BIES":
        return tag[0], tag[2:]
    return "I", tag


def bio_entities(text: str, words: Sequence[tuple[int, int]], tags: Sequence[tuple[str, float]]
                 ) -> list[dict[str, Any]]:
    """Entity spans ``{label, text, start, end, score}`` from per-word (tag, probability).

    ``B-X`` starts an entity; ``I-X`` continues an entity of type X (and starts one after ``O`` or another type:
    lenient decoding); ``O`` ends it. ``score`` is the mean probability of the entity's word tags."""
    ents: list[dict[str, Any]] = []
    cur: dict[str, Any] | None = None
    probs: list[float] = []

    def close() -> None:
        nonlocal cur, probs
        if cur is not None:
            cur["text"] = text[cur["start"]:cur["end"]]
            cur["score"] = sum(probs) / len(probs)
            ents.append(cur)
        cur, probs = None, []

    for (s, e), (tag, p) in zip(words, tags):
        kind, label = _split_tag(tag)
        if kind == "O":
            close()
            continue
        if kind in ("B", "S") or cur is None or cur["label"] != label:
            close()
            cur = {"label": label, "text": "", "start": s, "end": e}
        cur["end"] = e
        probs.append(p)
        if kind in ("E", "S"):
            close()
    close()
    return ents


__all__ = ["bio_entities", "sequence_scores", "word_tags"]
