"""The LLM demo's three datasets, built from text on this machine (split by source file, never by line).

* ``code``: Python standard-library source (plain text rows: the adapter learns every token).
* ``docs``: English prose from licences, READMEs and docstrings (plain text rows).
* ``lang``: a chat instruction "which programming language is this snippet?" over a code snippet (Python, C,
  shell or Perl, whichever the machine has), answered with one lower-case word; scored by exact match.

The ``lang`` prompt is the model's own chat template applied to the user message (what ``/v1/chat/completions``
sends), so an adapter trained on these rows answers chat requests in the format it learned.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loraplex.demo.datasets import build_dataset

#: Adapter name -> the kind of rows it trains on.
DOMAINS: dict[str, str] = {"code": "text", "docs": "text", "lang": "task"}
#: What the ``lang`` adapter is asked (the snippet follows on the next lines).
LANG_INSTRUCTION = "Which programming language is this code written in? Answer with one word."
#: Longest snippet (characters) in a ``lang`` prompt; keeps whole chat prompts near 80 tokens.
LANG_SNIPPET_CHARS = 100


def lang_message(snippet: str) -> str:
    """The user message of a ``lang`` row."""
    return f"{LANG_INSTRUCTION}\n\n{snippet[:LANG_SNIPPET_CHARS].rstrip()}"


def chat_prompt(tokenizer: Any, message: str) -> str:
    """``message`` as one user turn in ``tokenizer``'s chat template with the generation prompt, minus a leading
    bos token (the trainer puts the bos id in front of every prompt)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True,
                                         tokenize=False)
    bos = getattr(tokenizer, "bos_token", None)
    return text[len(bos):] if bos and text.startswith(bos) else text


def build_rows(tokenizer: Any, *, train_rows: int, test_rows: int, seed: int = 0,
               cache_dir: str | Path | None = None) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """``{adapter: {"train": rows, "test": rows}}``; text rows are ``{text, source}``, ``lang`` rows
    ``{prompt, response, message, source}``. ``train_rows`` / ``test_rows`` are per adapter."""
    domains = build_dataset("domains", seed=seed, cache_dir=cache_dir,
                           sizes={"train": train_rows, "validation": 2, "test": test_rows})
    code = build_dataset("code_language", seed=seed, cache_dir=cache_dir,
                        sizes={"train": -(-train_rows // 4) + 2, "validation": 2,
                               "test": -(-test_rows // 4) + 1})
    out: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for name, label in (("code", "code"), ("docs", "prose")):
        out[name] = {split: [{"text": r["text"], "source": r["source"]}
                             for r in domains[split] if r["label"] == label][:n]
                     for split, n in (("train", train_rows), ("test", test_rows))}
    out["lang"] = {}
    for split, n in (("train", train_rows), ("test", test_rows)):
        rows = sorted(code[split], key=lambda r: r["label"])  # round robin over the languages
        by_label: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            by_label.setdefault(r["label"], []).append(r)
        mixed = [r for group in zip(*by_label.values()) for r in group][:n]
        out["lang"][split] = [{"prompt": chat_prompt(tokenizer, lang_message(r["text"])), "response": r["label"],
                               "message": lang_message(r["text"]), "source": r["source"]} for r in mixed]
    return out
