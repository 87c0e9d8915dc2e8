"""``modules_to_save`` matched by PEFT's rule (a module is saved when its name ends with an entry), and the reasons
given for tensors loraplex does not take, whatever their order in the file."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import loraplex
from loraplex.adapters.io import WEIGHTS_NAME, adapter_from_state_dict, load_adapter, read_config, saved_owner
from loraplex.errors import AdapterError
from conftest import VOCAB, make_peft_adapter, peft_model, tiny_llama, tiny_qwen2

ATOL = 1e-5


def _randomize(folder: Path, needle: str, seed: int) -> None:
    sd = load_file(str(folder / WEIGHTS_NAME))
    gen = torch.Generator().manual_seed(seed)
    for k in sorted(sd):
        if needle in k:
            sd[k] = sd[k] + 0.5 * torch.randn(sd[k].shape, generator=gen)
    save_file(sd, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})


def test_saved_owner_is_the_name_suffix_rule() -> None:
    keys = ["model.norm.weight", "model.layers.0.input_layernorm.weight", "model.layers.1.post_attention_layernorm.weight"]
    assert [saved_owner(k, ["norm"]) for k in keys] == [
        ("model.norm", "weight"), ("model.layers.0.input_layernorm", "weight"),
        ("model.layers.1.post_attention_layernorm", "weight")]
    assert saved_owner("score.modules_to_save.default.weight", ["score"]) == ("score", "weight")
    assert saved_owner("classifier.dense.weight", ["classifier"]) == ("classifier", "dense.weight")
    assert saved_owner("model.layers.0.mlp.up_proj.weight", ["norm"]) is None


@pytest.mark.parametrize("factory", [tiny_llama, tiny_qwen2])
def test_peft_norm_adapter_loads_and_serves_like_peft(factory, tmp_path: Path) -> None:
    base = factory()
    norm = make_peft_adapter(base, tmp_path / "norm", seed=3, r=2, lora_alpha=4, target_modules=["q_proj"],
                             modules_to_save=["norm"], task_type="CAUSAL_LM")
    _randomize(norm, "norm.weight", seed=4)  # PEFT saved every *norm module; make them differ from the base
    keys = load_file(str(norm / WEIGHTS_NAME))
    assert any("input_layernorm" in k for k in keys) and any(k.endswith("model.norm.weight") for k in keys)
    plain = make_peft_adapter(base, tmp_path / "plain", seed=5, r=2, lora_alpha=4, target_modules=["v_proj"],
                              task_type="CAUSAL_LM")
    ad = load_adapter(norm)
    n_layers = base.config.num_hidden_layers
    assert len(ad.saved_modules) == 2 * n_layers + 1  # input_/post_attention_layernorm per layer, model.norm
    plex = loraplex.load(copy.deepcopy(base), adapters={"norm": str(norm), "plain": str(plain)})
    rows = ["norm", None, "plain", "norm"]
    ids = torch.randint(3, VOCAB, (len(rows), 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = plex(ids, adapters=rows).logits
        want = {"norm": peft_model(base, norm)(input_ids=ids).logits,
                "plain": peft_model(base, plain)(input_ids=ids).logits, None: base(input_ids=ids).logits}
    for i, r in enumerate(rows):
        assert torch.allclose(got[i], want[r][i], atol=ATOL, rtol=0), (i, r)
    out = plex.save_adapter("norm", tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(peft_model(base, out)(input_ids=ids).logits, want["norm"])


def test_unsupported_tensor_reason_does_not_depend_on_order(tmp_path: Path) -> None:
    base = tiny_llama()
    folder = make_peft_adapter(base, tmp_path / "emb", seed=6, r=2, lora_alpha=4,
                               target_modules=["embed_tokens", "q_proj"], task_type="CAUSAL_LM")
    spec = read_config(folder)
    tensors = load_file(str(folder / WEIGHTS_NAME))
    assert any(k.endswith("embed_tokens.base_layer.weight") for k in tensors)  # PEFT's save_embedding_layers
    orders = [dict(sorted(tensors.items())), dict(sorted(tensors.items(), reverse=True))]
    loaded = [adapter_from_state_dict("emb", spec, t, source="f") for t in orders]  # embedding adapters load
    assert sorted(loaded[0].modules) == sorted(loaded[1].modules)
    bad = {**tensors, "base_model.model.model.layers.0.mlp.weird": torch.zeros(2),
           "base_model.model.model.layers.1.self_attn.q_proj.lora_C.weight": torch.zeros(2)}
    msgs = []
    for items in (sorted(bad.items()), sorted(bad.items(), reverse=True)):
        with pytest.raises(AdapterError) as exc:
            adapter_from_state_dict("emb", spec, dict(items), source="f")
        msgs.append(str(exc.value))
    assert msgs[0] == msgs[1]
    assert "unexpected tensor 'base_model.model.model.layers.0.mlp.weird'" in msgs[0] and "2 such tensors" in msgs[0]


def test_an_embedding_copy_that_differs_from_the_base_is_refused_with_the_reason(tmp_path: Path) -> None:
    base = tiny_llama()
    folder = make_peft_adapter(base, tmp_path / "emb", seed=7, r=2, lora_alpha=4,
                               target_modules=["embed_tokens"], task_type="CAUSAL_LM")
    loraplex.load(copy.deepcopy(base), adapters={"emb": str(folder)})  # an unchanged copy is fine
    _randomize(folder, "base_layer.weight", seed=8)
    with pytest.raises(AdapterError, match="own copy of model.embed_tokens.weight .* differs from the base model"):
        loraplex.load(copy.deepcopy(base), adapters={"emb": str(folder)})
