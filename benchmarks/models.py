"""Base models of the benchmark scripts: synthetic random-init Llama shapes, or the real SmolLM2-135M-Instruct.

``--model synthetic`` (the default) builds a random-init ``LlamaForCausalLM`` of the script's ``--hidden`` and
``--layers``; ``--model smollm2`` loads the pretrained SmolLM2-135M-Instruct (30 layers, hidden 576, GQA 9/3 heads,
intermediate 1536, vocab 49,152, tied embeddings) from its cached local folder (:func:`loraplex.models.resolve`),
whose shapes are fixed. Adapters are written by PEFT with random non-zero A and B on either base.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SMOLLM2 = "smollm2-135m-instruct"
MODELS = ("synthetic", "smollm2")


def add_model_options(ap: argparse.ArgumentParser, *, hidden: int, layers: int, rank: int = 16) -> None:
    """``--model``, and the synthetic model's ``--hidden`` / ``--layers`` (defaults given here), and ``--rank``."""
    ap.add_argument("--model", choices=MODELS, default="synthetic",
                    help="synthetic: random-init Llama of --hidden/--layers; smollm2: the real pretrained "
                         "SmolLM2-135M-Instruct (30 layers, hidden 576, GQA 9/3, vocab 49,152)")
    ap.add_argument("--hidden", type=int, default=None, help=f"synthetic model's hidden size (default {hidden})")
    ap.add_argument("--layers", type=int, default=None, help=f"synthetic model's layers (default {layers})")
    ap.add_argument("--rank", type=int, default=rank, help="LoRA rank of every adapter (alpha = 2 x rank)")
    ap.set_defaults(synthetic_defaults=(hidden, layers))


def check_model_options(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fill ``--hidden`` / ``--layers`` with their defaults; refuse them with ``--model smollm2`` (fixed shapes)."""
    hidden, layers = args.synthetic_defaults
    if is_real(args):
        given = [f"--{k}" for k in ("hidden", "layers") if getattr(args, k) is not None]
        if given:
            ap.error(f"{' and '.join(given)} {'size' if len(given) > 1 else 'sizes'} the synthetic model; "
                     "--model smollm2 has fixed shapes")
        return
    args.hidden = hidden if args.hidden is None else args.hidden
    args.layers = layers if args.layers is None else args.layers


def is_real(args: argparse.Namespace) -> bool:
    """Whether the run is on the real SmolLM2 weights (``--model smollm2``)."""
    return args.model == "smollm2"


def smollm2_folder() -> str:
    """Local folder of SmolLM2-135M-Instruct (safetensors + tokenizer, converted once from the bundled GGUF); exits
    with the library's message (e.g. the install command) when it cannot be provided."""
    from loraplex.errors import LoraplexError
    from loraplex.models import resolve

    try:
        return resolve(SMOLLM2)
    except LoraplexError as exc:
        sys.exit(f"--model smollm2: {exc}")


def synthetic_config(args: argparse.Namespace, **overrides: Any):
    """LlamaConfig of the synthetic model: ``--hidden`` / ``--layers``, intermediate 2.6875 x hidden, 64-wide heads,
    2 query heads per KV head, vocab 2048; ``overrides`` replace any field."""
    from transformers import LlamaConfig

    fields: dict[str, Any] = dict(vocab_size=2048, hidden_size=args.hidden,
                                  intermediate_size=int(args.hidden * 2.6875), num_hidden_layers=args.layers,
                                  num_attention_heads=max(1, args.hidden // 64),
                                  num_key_value_heads=max(1, args.hidden // 128))
    fields.update(overrides)
    return LlamaConfig(**fields)


def load_base(args: argparse.Namespace, **synthetic: Any) -> torch.nn.Module:
    """The benchmark's base causal LM in eval mode: SmolLM2 (``--model smollm2``) or a random-init Llama of
    :func:`synthetic_config` (``synthetic``: its overrides; seed torch before the call for a repeatable model)."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    if is_real(args):
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            return AutoModelForCausalLM.from_pretrained(smollm2_folder(), dtype=torch.float32).eval()
        finally:
            hf_logging.set_verbosity(verbosity)
    return LlamaForCausalLM(synthetic_config(args, **synthetic)).eval()


def describe(args: argparse.Namespace, config: Any) -> str:
    """One line naming the base and its shapes (``config``: the model's), for a benchmark's header."""
    kind = "SmolLM2-135M-Instruct (pretrained)" if is_real(args) else "synthetic Llama (random init)"
    return (f"{kind}: hidden {config.hidden_size}, {config.num_hidden_layers} layers, heads "
            f"{config.num_attention_heads}/{config.num_key_value_heads}, intermediate {config.intermediate_size}, "
            f"vocab {config.vocab_size}")


def peft_adapters_on(model: torch.nn.Module, folder: str | Path, names: Sequence[str], *, r: int,
                     targets: Sequence[str] = LLAMA_TARGETS) -> tuple[Any, dict[str, Path]]:
    """LoRA adapters ``names`` (rank ``r``, alpha 2r, random non-zero A and B: ``init_lora_weights=False``) on a
    copy of ``model``, written by PEFT into one subfolder of ``folder`` each. Returns the PEFT model holding all of
    them (``model`` itself is left bare) and {name: folder}."""
    import loraplex
    from peft import LoraConfig, get_peft_model

    peft_model = None
    for name in names:
        lc = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), init_lora_weights=False)
        if peft_model is None:
            peft_model = get_peft_model(copy.deepcopy(model), lc, adapter_name=name)
        else:
            peft_model.add_adapter(name, lc)
    peft_model.save_pretrained(str(folder))
    return peft_model, loraplex.load_adapter_dir(folder)  # PEFT writes one subfolder per adapter name
