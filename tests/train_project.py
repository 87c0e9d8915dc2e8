"""Helpers for the training tests: a tiny Llama + word-level tokenizer saved to a folder, small generated datasets,
and the example config of the docs with its two dataset files."""

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
ANSWERS = {
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
    mapping = ANSWERS[task]
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


#: The example config of the docs (two adapters, a merge, a router).
EXAMPLE_CONFIG = """\
base_model: PATH_OR_HUB_ID
model_type: llm            # or encoder
adapters:
  adapters:
    coding: {type: lora, r: 16, alpha: 32, dropout: 0.05, target_modules: [q_proj, v_proj], dataset: data/code.jsonl}
    chat:   {type: lora, r: 8,  alpha: 16, target_modules: [q_proj, v_proj], dataset: data/chat.csv}
  merge: {name: coding_chat, sources: [coding, chat], weights: [0.7, 0.3], combination_type: ties, density: 0.7}
  router: {type: mlp, top_k: 1, load_balance: switch}   # optional
  active: coding_chat
input_features: [{name: prompt, type: text}]
output_features: [{name: response, type: text}]
trainer: {epochs: 3, learning_rate: 2e-4, batch_size: 8, max_length: 512}
"""


def example_project(folder: Path) -> Path:
    """``folder`` with ``train.yaml`` (:data:`EXAMPLE_CONFIG`) and its two dataset files; returns ``folder``."""
    (folder / "data").mkdir(parents=True, exist_ok=True)
    (folder / "data" / "code.jsonl").write_text('{"prompt": "def f(", "response": "x): pass"}\n')
    (folder / "data" / "chat.csv").write_text("prompt,response\nhi,hello\n")
    (folder / "train.yaml").write_text(EXAMPLE_CONFIG)
    return folder


def example_dict() -> dict[str, Any]:
    """:data:`EXAMPLE_CONFIG` as a dict."""
    return yaml.safe_load(EXAMPLE_CONFIG)
