"""DoRA and embedding LoRA in mixed batches, equal to PEFT adapter by adapter.

Every architecture gets four PEFT adapters: plain LoRA (``lora``), DoRA on linear layers (``dora``; Qwen2's q/k/v
and GPT-2's Conv1D layers have a bias), LoRA on the token embedding plus a linear layer (``emb``) and DoRA on the
embedding (``demb``). DoRA magnitudes are randomised after PEFT made them, so the DoRA factor ``g`` is not 1. The
reference for each row is PEFT's own model with that row's adapter alone (the base model for base rows).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import loraplex
from loraplex import ops
from loraplex.adapters.io import WEIGHTS_NAME, load_adapter, save_adapter
from loraplex.errors import LoraplexError
from loraplex.merge.merge import MergeError, merge_adapters
from conftest import PAD, VOCAB, make_peft_adapter, peft_model, tiny_gpt2, tiny_llama, tiny_qwen2

ATOL = 1e-5
ARCHS = {"llama": tiny_llama, "qwen2": tiny_qwen2, "gpt2": tiny_gpt2}

_DECODER = {
    "lora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "dora": dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]),
    "emb": dict(r=3, lora_alpha=6, target_modules=["embed_tokens", "up_proj"]),
    "demb": dict(r=2, lora_alpha=4, use_dora=True, target_modules=["embed_tokens", "gate_proj"]),
}
_GPT2 = {
    "lora": dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True),
    "dora": dict(r=4, lora_alpha=8, use_dora=True, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True),
    "emb": dict(r=3, lora_alpha=6, target_modules=["wte", "c_fc"], fan_in_fan_out=True),
    "demb": dict(r=2, lora_alpha=4, use_dora=True, target_modules=["wte"]),
}
ROWS = ["dora", "lora", None, "emb", "demb", "dora", None, "demb", "lora", "emb"]


def make_dora_adapter(base: torch.nn.Module, path: Path, *, seed: int, **lora_kwargs) -> Path:
    """A PEFT adapter (``make_peft_adapter``) whose DoRA magnitudes, if any, are scaled by random factors in
    [0.5, 1.5), so that ``g = m / ||W + s B A||`` differs from 1."""
    folder = make_peft_adapter(base, path, seed=seed, task_type="CAUSAL_LM", **lora_kwargs)
    sd = load_file(str(folder / WEIGHTS_NAME))
    gen = torch.Generator().manual_seed(seed)
    for k in sorted(sd):
        if "lora_magnitude_vector" in k:
            sd[k] = sd[k] * (0.5 + torch.rand(sd[k].shape, generator=gen))
    save_file(sd, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    return folder


_CASES: dict[str, tuple[torch.nn.Module, dict[str, Path]]] = {}
_PEFT: dict[tuple[str, str], torch.nn.Module] = {}


@pytest.fixture(params=list(ARCHS))
def case(request, tmp_path_factory) -> tuple[str, torch.nn.Module, dict[str, Path]]:
    arch = request.param
    if arch not in _CASES:
        base = ARCHS[arch]()
        root = tmp_path_factory.getbasetemp() / "dora" / arch
        specs = _GPT2 if arch == "gpt2" else _DECODER
        _CASES[arch] = base, {n: make_dora_adapter(base, root / n, seed=30 + i, **kw)
                              for i, (n, kw) in enumerate(specs.items())}
    base, paths = _CASES[arch]
    return arch, base, paths


def _peft(arch: str, base: torch.nn.Module, paths: dict[str, Path], name: str | None) -> torch.nn.Module:
    if name is None:
        return base
    if (arch, name) not in _PEFT:
        _PEFT[(arch, name)] = peft_model(base, paths[name])
    return _PEFT[(arch, name)]


def _ids(n: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def _plex(base: torch.nn.Module, paths: dict[str, Path]) -> loraplex.Plex:
    return loraplex.load(copy.deepcopy(base), adapters={n: str(p) for n, p in paths.items()})


def _assert_rows(case, got: torch.Tensor, rows, **inputs) -> None:
    arch, base, paths = case
    with torch.no_grad():
        want = {n: _peft(arch, base, paths, n)(**inputs).logits for n in set(rows)}
    for i, name in enumerate(rows):
        diff = (got[i] - want[name][i]).abs().max().item()
        assert diff <= ATOL, f"{arch} row {i} ({name!r}): max abs diff {diff:.3g}"


# --------------------------------------------------------------------------- forward and generate vs PEFT
def test_adapters_really_change_outputs(case) -> None:
    arch, base, paths = case
    ids = _ids(2, 6, 0)
    with torch.no_grad():
        ref = base(input_ids=ids).logits
        for name in paths:
            assert (_peft(arch, base, paths, name)(input_ids=ids).logits - ref).abs().max() > 1e-2, name
    ad = load_adapter(paths["dora"])
    assert ad.is_dora and all(m.magnitude is not None for m in ad.modules.values())
    emb = load_adapter(paths["emb"])
    assert sum(m.embedding for m in emb.modules.values()) == 1


@pytest.mark.parametrize("grad", [False, True])
def test_mixed_batch_matches_peft(case, grad: bool) -> None:
    plex = _plex(case[1], case[2])
    for length in (7, 1):
        ids = _ids(len(ROWS), length, seed=length)
        with torch.set_grad_enabled(grad):  # in-place (inference) and out-of-place (autograd) paths
            got = plex(ids, adapters=ROWS).logits.detach()
        _assert_rows(case, got, ROWS, input_ids=ids)


@pytest.mark.parametrize("kernel", ["sgmv", "bgmv", "segbmm"])
def test_each_kernel_with_dora_rows(case, kernel: str) -> None:
    plex = _plex(case[1], case[2])
    for layer in plex.layers.values():
        layer.kernel = kernel
    rows = ["dora", "dora", "lora", "demb", None, "emb"]
    ids = _ids(len(rows), 5, seed=3)
    with torch.no_grad():
        got = plex(ids, adapters=rows).logits
    _assert_rows(case, got, rows, input_ids=ids)


@pytest.mark.parametrize("name", ["dora", "demb", "emb"])
def test_uniform_batch_matches_peft(case, name: str) -> None:
    plex = _plex(case[1], case[2])
    ids = _ids(3, 6, seed=4)
    with torch.no_grad():
        got = plex(ids, adapters=[name] * 3).logits
    _assert_rows(case, got, [name] * 3, input_ids=ids)


def test_padded_batch_matches_peft(case) -> None:
    plex = _plex(case[1], case[2])
    ids = _ids(len(ROWS), 8, seed=6)
    mask = torch.ones_like(ids)
    for i, p in enumerate([0, 3, 1, 4, 2, 0, 1, 2, 3, 0]):
        mask[i, :p] = 0
    ids = ids.masked_fill(mask == 0, PAD)
    with torch.no_grad():
        got = plex(ids, adapters=ROWS, attention_mask=mask).logits
    arch, base, paths = case
    with torch.no_grad():
        for name in set(ROWS):
            want = _peft(arch, base, paths, name)(input_ids=ids, attention_mask=mask).logits
            for i, r in enumerate(ROWS):
                if r == name:
                    keep = mask[i].bool()
                    assert torch.allclose(got[i][keep], want[i][keep], atol=ATOL, rtol=0), (arch, i, r)


def test_generate_greedy_matches_peft(case) -> None:
    arch, base, paths = case
    plex = _plex(base, paths)
    ids = _ids(len(ROWS), 6, seed=5)
    mask = torch.ones_like(ids)
    for i, p in enumerate([0, 2, 1, 3, 0, 2, 1, 0, 2, 1]):
        mask[i, :p] = 0
    ids = ids.masked_fill(mask == 0, PAD)
    gen = dict(max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=PAD, attention_mask=mask)
    got = plex.generate(ids, adapters=ROWS, **gen)
    assert got.shape[1] > ids.shape[1]
    with torch.no_grad():
        for name in set(ROWS):
            want = _peft(arch, base, paths, name).generate(input_ids=ids, **gen)
            for i, r in enumerate(ROWS):
                if r == name:
                    assert torch.equal(got[i], want[i]), (arch, r, i, got[i].tolist(), want[i].tolist())


# --------------------------------------------------------------------------- the DoRA factor itself
def test_dora_gain_is_computed_once_per_slot_and_matches_the_definition(case) -> None:
    arch, base, paths = case
    plex = _plex(base, paths)
    ad = plex.get_adapter("dora")
    held = plex.acquire(["dora"])
    slot = held["dora"]
    try:
        for mod, m in ad.modules.items():
            layer = plex.layers[mod]
            assert layer.slot_dora[slot]
            w = layer.base.weight.detach()
            W = w.t() if arch == "gpt2" else w  # [d_out, d_in]
            want = m.magnitude / torch.linalg.vector_norm(W + m.scaling * (m.B @ m.A), dim=1)
            torch.testing.assert_close(layer.dora_gain[slot], want, atol=1e-6, rtol=1e-6)
            x = torch.randn(2, 3, layer.d_in)
            bias = layer.base.bias
            ref = ops.dora_reference(x, W, bias, m.A, m.B, m.scaling, m.magnitude)
            with plex.using(["dora", "dora"], 2), torch.no_grad():
                torch.testing.assert_close(layer(x), ref, atol=1e-5, rtol=0)
            with plex.using([None, "dora"], 2), torch.no_grad():  # a base row next to a DoRA row: factor 1
                y = layer(x)
                assert torch.equal(y[0], layer.base(x)[0])
                torch.testing.assert_close(y[1], ref[1], atol=1e-5, rtol=0)
    finally:
        plex.release(held)
    plex.remove_adapter("dora")
    for layer in plex.layers.values():  # freeing the slot resets its factor
        assert not layer.slot_dora[slot] and bool((layer.dora_gain[slot] == 1).all())


def test_dora_blends_and_stacks_are_refused_with_the_reason(case) -> None:
    plex = _plex(case[1], case[2])
    ids = _ids(2, 4, seed=7)
    for spec in ({"dora": 0.5, "lora": 0.5}, {"dora": 0.7}, "stack(dora, lora)", "blend(lora=0.3, dora=0.7)"):
        with pytest.raises(LoraplexError, match="DoRA adapter 'dora'.*not a sum of low-rank updates"):
            plex(ids, adapters=[spec, "lora"])
    with torch.no_grad():  # blends of plain and embedding adapters stay allowed, a weight-0 DoRA entry is ignored
        plex(ids, adapters=[{"lora": 0.5, "emb": 0.5}, {"dora": 1.0, "lora": 0.0}])


def test_merging_dora_is_refused_with_the_reason(case) -> None:
    _, _, paths = case
    ads = {n: load_adapter(p, n) for n, p in paths.items()}
    for srcs in (["dora", "lora"], ["demb", "emb"]):
        with pytest.raises(MergeError, match="DoRA.*not a low-rank delta"):
            merge_adapters(ads, srcs, method="cat")
    with pytest.raises(MergeError, match="DoRA"):
        merge_adapters(ads, ["dora", "lora"], method="ties", peft_compat=True)


# --------------------------------------------------------------------------- files: PEFT <-> loraplex
def test_peft_loads_what_loraplex_saves_with_identical_outputs(case, tmp_path: Path) -> None:
    arch, base, paths = case
    plex = _plex(base, paths)
    ids = _ids(3, 6, seed=8)
    for name in paths:
        out = plex.save_adapter(name, tmp_path / name)  # the bank's copy (without PEFT's base_layer copy)
        again = save_adapter(load_adapter(paths[name]), tmp_path / f"{name}_file")  # straight file round trip
        with torch.no_grad():
            want = _peft(arch, base, paths, name)(input_ids=ids).logits
            for folder in (out, again):
                got = peft_model(base, folder)(input_ids=ids).logits
                assert torch.equal(got, want), (arch, name, folder)
        src, dst = load_file(str(paths[name] / WEIGHTS_NAME)), load_file(str(again / WEIGHTS_NAME))
        assert sorted(src) == sorted(dst) and all(torch.equal(src[k], dst[k]) for k in src)


def test_embedding_lora_merges_in_delta_space(case, tmp_path: Path) -> None:
    """cat and svd merges of two embedding adapters: the merged delta is the weighted sum of the deltas
    (``(B A)^T`` is what an embedding adds), PEFT serves the saved merge like loraplex's one-pass blend."""
    arch, base, paths = case
    emb = load_adapter(paths["emb"], "emb")
    other = make_dora_adapter(base, tmp_path / "emb2", seed=77, **{**(_GPT2 if arch == "gpt2" else _DECODER)["emb"],
                                                                   "r": 2, "lora_alpha": 3})
    ads = {"emb": emb, "emb2": load_adapter(other, "emb2")}
    emb_mod = next(m for m, lm in emb.modules.items() if lm.embedding)
    want = 0.6 * ads["emb"].modules[emb_mod].delta() + 0.4 * ads["emb2"].modules[emb_mod].delta()
    for method, kw in (("cat", {}), ("svd", {"svd_rank": 5})):
        merged, report = merge_adapters(ads, ["emb", "emb2"], [0.6, 0.4], method=method, name="m", **kw)
        assert merged.modules[emb_mod].embedding
        torch.testing.assert_close(merged.modules[emb_mod].delta(), want, atol=1e-5, rtol=0)
        folder = save_adapter(merged, tmp_path / method)
        assert any("lora_embedding_A" in k for k in load_file(str(folder / WEIGHTS_NAME)))
        plex = loraplex.load(copy.deepcopy(base), adapters={"emb": paths["emb"], "emb2": other, "m": folder})
        ids = _ids(2, 6, seed=9)
        with torch.no_grad():
            blend = plex(ids, adapters=[{"emb": 0.6, "emb2": 0.4}] * 2).logits
            served = plex(ids, adapters=["m", "m"]).logits
            ref = peft_model(base, folder)(input_ids=ids).logits
        torch.testing.assert_close(served, ref, atol=ATOL, rtol=0)
        torch.testing.assert_close(blend, ref, atol=1e-4, rtol=0)


def test_in_layer_stack_with_dora_is_refused(case) -> None:
    from loraplex.compose.stack import InLayerStack

    plex = _plex(case[1], case[2])
    with pytest.raises(LoraplexError, match="stack cannot compose DoRA adapter 'dora'"):
        InLayerStack(plex, ["lora", "dora"])(_ids(1, 4, seed=1))
