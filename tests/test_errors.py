"""Bad input gives a clear error naming the file, adapter or module at fault."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import loraplex
from loraplex.adapters.io import CONFIG_NAME, PICKLE_NAME, WEIGHTS_NAME, load_adapter
from loraplex.errors import AdapterError, LoraplexError, UnknownAdapterError
from conftest import make_peft_adapter, peft_model, tiny_gpt2, tiny_llama


@pytest.fixture(scope="module")
def llama() -> torch.nn.Module:
    return tiny_llama()


@pytest.fixture(scope="module")
def good(llama, tmp_path_factory) -> Path:
    """A valid PEFT adapter folder (never modified: tests copy it)."""
    return make_peft_adapter(llama, tmp_path_factory.mktemp("good") / "good", r=4, lora_alpha=8,
                             target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


@pytest.fixture
def adapter_copy(good, tmp_path) -> Path:
    dst = tmp_path / "myadapter"
    shutil.copytree(good, dst)
    return dst


def _edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / CONFIG_NAME).read_text())
    cfg.update(changes)
    (folder / CONFIG_NAME).write_text(json.dumps(cfg))


# --------------------------------------------------------------------------- missing files
def test_missing_adapter_folder(tmp_path: Path, llama) -> None:
    missing = tmp_path / "nowhere" / "adapter"
    with pytest.raises(AdapterError, match="adapter folder not found") as exc:
        load_adapter(missing)
    assert str(missing) in str(exc.value)
    with pytest.raises(AdapterError, match="not found") as exc:
        loraplex.load(copy.deepcopy(llama), adapters={"x": missing})
    assert str(missing) in str(exc.value)


def test_adapter_path_is_a_file(tmp_path: Path) -> None:
    f = tmp_path / "adapter_model.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(AdapterError, match="is a folder") as exc:
        load_adapter(f)
    assert str(f) in str(exc.value)


def test_missing_config(adapter_copy: Path) -> None:
    (adapter_copy / CONFIG_NAME).unlink()
    with pytest.raises(AdapterError, match=f"missing {CONFIG_NAME}") as exc:
        load_adapter(adapter_copy)
    assert str(adapter_copy) in str(exc.value)


def test_config_not_json(adapter_copy: Path) -> None:
    (adapter_copy / CONFIG_NAME).write_text("{not json")
    with pytest.raises(AdapterError, match="not valid JSON") as exc:
        load_adapter(adapter_copy)
    assert CONFIG_NAME in str(exc.value) and "myadapter" in str(exc.value)


def test_missing_weights(adapter_copy: Path) -> None:
    (adapter_copy / WEIGHTS_NAME).unlink()
    with pytest.raises(AdapterError, match=f"missing {WEIGHTS_NAME}") as exc:
        load_adapter(adapter_copy)
    assert str(adapter_copy) in str(exc.value)


# --------------------------------------------------------------------------- pickle
def test_pickle_only_adapter_refused_unless_trusted(adapter_copy: Path, llama) -> None:
    sd = load_file(str(adapter_copy / WEIGHTS_NAME))
    torch.save(sd, adapter_copy / PICKLE_NAME)
    (adapter_copy / WEIGHTS_NAME).unlink()
    with pytest.raises(AdapterError, match="trust_pickle") as exc:
        load_adapter(adapter_copy)
    assert PICKLE_NAME in str(exc.value) and str(adapter_copy) in str(exc.value)
    with pytest.raises(AdapterError, match="trust_pickle"):
        loraplex.load(copy.deepcopy(llama), adapters={"p": adapter_copy})
    ad = load_adapter(adapter_copy, trust_pickle=True)
    assert all(torch.equal(ad.state_dict()[k], v) for k, v in sd.items())
    plex = loraplex.load(copy.deepcopy(llama), adapters={"p": adapter_copy}, trust_pickle=True)
    ids = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = peft_model(llama, adapter_copy)(input_ids=ids).logits
        assert torch.allclose(plex(ids, adapters="p").logits, want, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- corrupt weights
@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "bad_header"])
def test_corrupt_safetensors(adapter_copy: Path, damage: str) -> None:
    f = adapter_copy / WEIGHTS_NAME
    data = f.read_bytes()
    if damage == "truncate":
        f.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        f.write_bytes(bytes(range(256)) * 8)
    elif damage == "empty":
        f.write_bytes(b"")
    else:  # a valid length prefix followed by a broken JSON header
        f.write_bytes((20).to_bytes(8, "little") + b'{"a": [1, 2, oops}  ' + data[28:])
    with pytest.raises(AdapterError, match="corrupt or unreadable safetensors") as exc:
        load_adapter(adapter_copy)
    assert str(f) in str(exc.value)


# --------------------------------------------------------------------------- adapter for another base
def test_adapter_for_another_architecture(good: Path) -> None:
    gpt2 = tiny_gpt2()
    with pytest.raises(AdapterError, match="does not have") as exc:
        loraplex.load(gpt2, adapters={"llama_ad": good})
    msg = str(exc.value)
    assert "'llama_ad'" in msg and "model.layers.0.self_attn" in msg and "GPT2LMHeadModel" in msg
    assert str(good) in msg


def test_adapter_for_a_bigger_model(good: Path) -> None:
    bigger = tiny_llama(hidden_size=64, intermediate_size=128)
    with pytest.raises(AdapterError, match="expects d_in=64") as exc:
        loraplex.load(bigger, adapters={"small": good})
    msg = str(exc.value)
    assert "'small'" in msg and "self_attn" in msg and "another base model" in msg
    assert "lora_A (4, 32)" in msg


def test_failed_register_leaves_the_bank_usable(good: Path, llama) -> None:
    plex = loraplex.load(copy.deepcopy(llama), adapters={"ok": good})
    bad = make_peft_adapter(tiny_gpt2(), Path(good).parent / "gpt2_ad", r=2, target_modules=["c_attn"],
                            fan_in_fan_out=True)
    with pytest.raises(AdapterError, match="does not have"):
        plex.add_adapter("bad", bad)
    assert plex.adapters == ["ok"]
    with torch.no_grad():
        plex(torch.randint(3, 128, (1, 4)), adapters="ok")


# --------------------------------------------------------------------------- bad batches
def test_unknown_adapter_name_in_batch(good: Path, llama) -> None:
    plex = loraplex.load(copy.deepcopy(llama), adapters={"alpha": good, "beta": good})
    ids = torch.randint(3, 128, (3, 4))
    with pytest.raises(UnknownAdapterError) as exc:
        plex(ids, adapters=["alpha", "gamma", None])
    msg = str(exc.value)
    assert "'gamma'" in msg and "known adapters: alpha, beta" in msg
    assert isinstance(exc.value, KeyError) and isinstance(exc.value, AdapterError)
    with pytest.raises(UnknownAdapterError, match="'delta'.*alpha, beta"):
        plex(ids, adapters=[{"alpha": 0.5, "delta": 0.5}, None, None])
    with pytest.raises(UnknownAdapterError, match="'gamma'"):
        plex.generate(ids, adapters="gamma", max_new_tokens=1, pad_token_id=0)
    with pytest.raises(UnknownAdapterError, match="'nope'"):
        plex.active = "nope"
    assert all(c == 0 for c in plex.bank._refcount)  # nothing left held


def test_wrong_number_of_row_entries(good: Path, llama) -> None:
    plex = loraplex.load(copy.deepcopy(llama), adapters={"alpha": good})
    ids = torch.randint(3, 128, (3, 4))
    with pytest.raises(LoraplexError, match="adapters has 2 entries but the batch has 3 rows"):
        plex(ids, adapters=["alpha", None])
    with pytest.raises(LoraplexError, match="adapters has 4 entries but the batch has 3 rows"):
        plex.generate(ids, adapters=["alpha"] * 4, max_new_tokens=1, pad_token_id=0)


def test_malformed_blend(good: Path, llama) -> None:
    plex = loraplex.load(copy.deepcopy(llama), adapters={"alpha": good})
    with pytest.raises(LoraplexError, match="a blend is a mapping"):
        plex(torch.randint(3, 128, (1, 4)), adapters=[["alpha"]])


# --------------------------------------------------------------------------- unsupported / inconsistent configs
def test_dora_config_without_magnitude_vectors_refused(adapter_copy: Path) -> None:
    _edit_config(adapter_copy, use_dora=True)
    with pytest.raises(AdapterError, match="'use_dora' is true but the weights hold no lora_magnitude_vector") as exc:
        load_adapter(adapter_copy)
    assert str(adapter_copy / CONFIG_NAME) in str(exc.value)


def test_other_peft_type_refused(adapter_copy: Path) -> None:
    _edit_config(adapter_copy, peft_type="IA3")
    with pytest.raises(AdapterError, match="peft_type is 'IA3'"):
        load_adapter(adapter_copy)


def test_rank_differs_from_config(adapter_copy: Path) -> None:
    _edit_config(adapter_copy, r=8)
    with pytest.raises(AdapterError, match="has rank 4 but the config says 8") as exc:
        load_adapter(adapter_copy)
    assert "self_attn.q_proj" in str(exc.value) and str(adapter_copy) in str(exc.value)


def test_rank_pattern_differs_from_weights(adapter_copy: Path) -> None:
    _edit_config(adapter_copy, rank_pattern={"v_proj": 2})
    with pytest.raises(AdapterError, match="v_proj' has rank 4 but the config says 2"):
        load_adapter(adapter_copy)


def test_bad_rank_value(adapter_copy: Path) -> None:
    _edit_config(adapter_copy, r="eight")
    with pytest.raises(AdapterError, match="field 'r' must be an integer"):
        load_adapter(adapter_copy)


def test_missing_target_modules(adapter_copy: Path) -> None:
    _edit_config(adapter_copy, target_modules=None)
    with pytest.raises(AdapterError, match="target_modules is missing"):
        load_adapter(adapter_copy)


def test_unpaired_and_unexpected_tensors(adapter_copy: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    f = adapter_copy / WEIGHTS_NAME
    sd = load_file(str(f))
    key_b = next(k for k in sd if k.endswith("lora_B.weight"))
    save_file({k: v for k, v in sd.items() if k != key_b}, str(f))
    with pytest.raises(AdapterError, match="do not pair up") as exc:
        load_adapter(adapter_copy)
    assert key_b.split(".lora_B")[0].removeprefix("base_model.model.") in str(exc.value)
    save_file({**sd, "base_model.model.lm_head.weight": torch.zeros(3, 3)}, str(f))
    with pytest.raises(AdapterError, match="unexpected tensor 'base_model.model.lm_head.weight'"):
        load_adapter(adapter_copy)
