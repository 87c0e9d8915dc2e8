"""Helpers for the training tests: a tiny Llama + word-level tokenizer saved to a folder, small generated datasets."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path
from typing import Any

import yaml

from conftest import tiny_llama

SPECIALS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
WORDS = ("alpha beta gamma delta one two three four red green blue cat dog fish yes no up down left right "
         "north south east west").split()
#: prompt -> response, one mapping per adapter's dataset
TASKS = {
    "a": {"one": "alpha", "two": "beta", "three": "gamma", "four": "delta"},
    "b": {"red": "cat dog", "green": "fish", "blue": "yes no"},
    "c": {"up": "left", "down": "right", "north": "south", "east": "west"},
}


def save_tiny_llama(folder: Path) -> Path:
    """A random-init tiny Llama (hidden 32, 2 layers) with a word-level tokenizer over ``WORDS``, saved to ``folder``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]",
                                   eos_token="[EOS]")
    # initializer_range 0.1 (not 0.02): with a 0.02-scale LM head the logits cannot move enough to learn anything
    model = tiny_llama(vocab_size=len(vocab), pad_token_id=0, bos_token_id=2, eos_token_id=3, initializer_range=0.1)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def pairs(task: str, n: int, seed: int) -> list[dict[str, str]]:
    rnd = random.Random(f"{task}:{seed}")
    mapping = TASKS[task]
    keys = sorted(mapping)
    return [{"prompt": k, "response": mapping[k]} for k in (rnd.choice(keys) for _ in range(n))]


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_yaml(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
