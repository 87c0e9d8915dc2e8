"""Long token-classification rows: overlapping windows instead of truncation (training, predict, the demo).

The window layout is checked as a pure function; ``predict`` on rows longer than ``max_length`` is checked against
PEFT's own token-classification model run on each window separately (each word tagged by the window that owns it)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from conftest import minilm_model, minilm_path

from loraplex.train.data import IGNORE, token_example, token_examples, word_windows

BIO = ["O", "B-EMAIL", "I-EMAIL", "B-DATE", "I-DATE"]


@pytest.mark.parametrize("seed", range(20))
def test_word_windows_cover_every_word_once_within_budget(seed: int) -> None:
    rnd = random.Random(seed)
    counts = [rnd.choice([0, 1, 1, 1, 2, 3, 7]) for _ in range(rnd.randint(1, 120))]
    budget = rnd.randint(4, 40)
    wins = word_windows(counts, budget)
    if sum(counts) <= budget:
        assert [(w.start, w.end, w.own_start, w.own_end) for w in wins] == [(0, len(counts), 0, len(counts))]
    assert wins[0].start == 0 and wins[-1].end == len(counts)
    owned = [w for win in wins for w in range(win.own_start, win.own_end)]
    assert owned == list(range(len(counts)))  # the owned ranges partition the words, in order
    for a, b in zip(wins, wins[1:]):
        assert a.start < b.start <= a.end  # progress, no gap
    for win in wins:
        assert win.start <= win.own_start <= win.own_end <= win.end
        assert sum(counts[win.start:win.end]) <= budget or win.end - win.start == 1  # one over-long word
    if len(wins) > 1:  # half the budget is shared: owned words have context on both sides
        mid = wins[1:-1]
        for win in mid:
            if win.own_end > win.own_start and all(c <= budget // 4 for c in counts):
                assert sum(counts[win.start:win.own_start]) > 0 and sum(counts[win.own_end:win.end]) > 0


def test_word_windows_one_window_when_it_fits_and_huge_words_alone() -> None:
    assert word_windows([3, 4, 5], 12) == word_windows([3, 4, 5], 100)
    assert len(word_windows([3, 4, 5], 12)) == 1
    wins = word_windows([2, 50, 2], 10)
    assert any(w.start == 1 and w.end == 2 for w in wins)


def test_token_examples_label_each_word_once_and_fit_max_length() -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path())
    words = [f"word{i}" if i % 3 else "alpha" for i in range(60)]
    tags = [i % len(BIO) for i in range(60)]
    exs = token_examples(tok, words, tags, 24, row=7)
    assert len(exs) > 2
    labelled: dict[int, int] = {}
    for ex, word_ids, win in exs:
        assert ex.row == 7 and len(ex.input_ids) <= 24
        assert ex.input_ids[0] == tok.cls_token_id and ex.input_ids[-1] == tok.sep_token_id
        inner = [w for w in word_ids if w is not None]
        assert inner[0] == win.start and inner[-1] == win.end - 1  # the row's word indices
        assert tok.decode(ex.input_ids[1:-1]) == " ".join(words[win.start:win.end])
        for lab, w in zip(ex.labels, word_ids):
            if lab != IGNORE:
                assert w not in labelled and win.own_start <= w < win.own_end
                labelled[w] = lab
    assert labelled == dict(enumerate(tags))
    short = token_examples(tok, words[:5], tags[:5], 24)  # fits: exactly the single truncating example
    assert len(short) == 1 and short[0][:2] == token_example(tok, words[:5], tags[:5], 24)


def test_predict_tags_long_rows_window_by_window_like_peft(tmp_path: Path) -> None:
    """Rows longer than max_length: every word is predicted (no truncation), by the window that owns it; the
    reference runs PEFT's BertForTokenClassification on each window alone."""
    from peft import PeftModel
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    from loraplex.serve.testing import task_adapters
    from loraplex.tasks import load_encoder_plex
    from loraplex.config import load_config
    from loraplex.train.predict import predict

    paths = task_adapters(tmp_path / "adapters", {"ner": ("token_classification", BIO)})
    tok = AutoTokenizer.from_pretrained(minilm_path())
    plex = load_encoder_plex(minilm_model(), paths, tokenizer=tok)
    rnd = random.Random(1)
    vocab = "the meeting on 2024-01-31 with bob@example.com about invoices was moved to friday".split()
    rows = []
    for n in (5, 30, 47):
        words = [rnd.choice(vocab) for _ in range(n)]
        rows.append({"words": words, "tags": [rnd.choice(BIO) for _ in words]})
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    max_len = 16
    cfg = load_config({"base_model": minilm_path(), "model_type": "encoder", "output_dir": str(tmp_path / "out"),
                       "adapters": {"adapters": {"ner": {"task": "token_classification", "dataset": str(data)}}},
                       "trainer": {"max_length": max_len}})
    res = predict(cfg, data, adapter="ner", plex=plex, progress=False, batch_size=4)
    got = [json.loads(line) for line in res.path.read_text().splitlines()]

    model = AutoModelForTokenClassification.from_pretrained(minilm_path(), num_labels=len(BIO))
    peft = PeftModel.from_pretrained(model, str(paths["ner"])).eval()
    n_windows = 0
    for row, out in zip(rows, got):
        words = row["words"]
        want = ["?"] * len(words)
        for ex, word_ids, win in token_examples(tok, words, None, max_len):
            n_windows += 1
            with torch.no_grad():
                logits = peft(input_ids=torch.tensor([ex.input_ids])).logits[0]
            prev = None
            for pos, w in enumerate(word_ids):
                if w is not None and w != prev and win.own_start <= w < win.own_end:
                    want[w] = BIO[int(logits[pos].argmax())]
                prev = w
        assert out["words"] == words and out["prediction"] == want
    assert n_windows > len(rows) + 3  # the long rows really were split
    from loraplex.train.predict import entity_metrics

    assert res.metrics["f1"] == pytest.approx(entity_metrics([r["tags"] for r in rows],
                                                             [o["prediction"] for o in got])["f1"])
    assert res.metrics["n"] == len(rows)
