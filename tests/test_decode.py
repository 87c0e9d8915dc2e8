"""The fast decode step (:mod:`loraplex.decode`) against transformers' own forward on the same model and cache.

Reference: the transformers forward of the same wrapped model (which equals PEFT: tests/test_mixed_batch.py,
tests/test_quant.py) on a second copy of the same prefilled KV cache, step by step, for mixed batches with left
padding, base rows and blends, on Llama, Qwen2 (q/k/v biases) and Mistral, over float, int8 and int4 bases.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import loraplex
from conftest import MODEL_FACTORIES, make_peft_adapter
from loraplex import decode
from loraplex.quant import QuantizedLinear
from loraplex.serve import Engine, SamplingParams, kv
from loraplex.tokens import pad_batch

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread (conftest)

#: shapes the int4 kernel and the fused int4 layout take (widths multiples of 64)
SHAPE = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
TARGETS = {"a": ["q_proj", "v_proj", "down_proj"], "b": ["k_proj", "o_proj", "up_proj", "gate_proj"],
           "c": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
PROMPTS = [[5, 9, 11, 3, 7], [4, 8], [12, 13, 14], [6, 7, 8, 9, 10, 11], [20]]


def base_model(arch: str) -> torch.nn.Module:
    over = dict(SHAPE, attention_bias=True) if arch == "qwen2" else dict(SHAPE)
    return MODEL_FACTORIES[arch](**over)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, dict[str, Path]]:
    out: dict[str, dict[str, Path]] = {}
    for arch in ("llama", "qwen2", "mistral"):
        root = tmp_path_factory.mktemp(f"decode_{arch}")
        base = base_model(arch)
        out[arch] = {n: make_peft_adapter(base, root / n, seed=10 + i, r=4 + 4 * i, lora_alpha=16, target_modules=t)
                     for i, (n, t) in enumerate(TARGETS.items())}
    return out


def close(got: torch.Tensor, ref: torch.Tensor, scheme: str | None) -> None:
    """fp32: rounding only. Quantized: the kernels take and give bfloat16 (2^-8 relative), so a last-bit
    difference in a layer's input can move its outputs by a step or two of that grid: tolerance relative to the
    tensor's scale."""
    if scheme is None:
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    else:
        torch.testing.assert_close(got, ref, atol=2 ** -6 * float(ref.abs().max()), rtol=2 ** -6)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("scheme", [None, "int8", "int4"])
@pytest.mark.parametrize("stacked", [True, False])
def test_decode_steps_equal_the_transformers_forward(arch: str, scheme: str | None, stacked: bool, adapters,
                                                     monkeypatch) -> None:
    """Stacked: each projection group's LoRA in one update over its whole output; else (more distinct adapters
    than decode.STACKED_MAX_ADAPTERS) each layer's own mixed-batch kernel."""
    if not stacked:
        monkeypatch.setattr(decode, "STACKED_MAX_ADAPTERS", 0)
    plex = loraplex.load(base_model(arch), adapters={k: str(v) for k, v in adapters[arch].items()},
                         quantize=scheme)
    model = plex.model
    assert decode.supports(model)
    fast = decode.FastDecoder(model)
    for choices in (["a", None, "b", {"a": 0.5, "c": 0.5}, "c"], ["c", "c", "c"], [None, None], ["b"]):
        n = len(choices)
        ids, mask = pad_batch(PROMPTS[:n], 0, left=True)
        with torch.no_grad(), plex.using(choices, n) as plan:
            prog = fast.program(plan, n)
            assert prog is not None
            ref_cache, fast_cache = kv.new_cache(model), kv.new_cache(model)
            for c in (ref_cache, fast_cache):
                out = model(input_ids=ids, attention_mask=mask, position_ids=kv.position_ids(mask),
                            past_key_values=c, use_cache=True)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            for _ in range(4):
                mask = torch.cat([mask, mask.new_ones(n, 1)], dim=1)
                pos = mask.sum(dim=1, keepdim=True) - 1
                ref = model(input_ids=tok, attention_mask=mask, position_ids=pos, past_key_values=ref_cache,
                            use_cache=True).logits[:, -1]
                got = fast.step(prog, tok, mask, pos, fast_cache)
                close(got, ref, scheme)
                tok = ref.argmax(-1, keepdim=True)
            for a, b in zip(ref_cache.layers, fast_cache.layers):
                close(b.keys, a.keys, scheme)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_fused_projections_share_the_members_codes_and_compute_the_same(scheme: str) -> None:
    model = loraplex.quant.quantize_model(base_model("llama"), scheme)
    attn = model.model.layers[0].self_attn
    x = torch.randn(3, 128)
    with torch.no_grad():
        before = [m(x) for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
        fused = loraplex.quant.fuse_outputs([attn.q_proj, attn.k_proj, attn.v_proj])
        assert isinstance(fused, QuantizedLinear) and fused.out_features == 128 + 64 + 64
        assert torch.equal(fused(x), torch.cat(before, dim=-1))  # one kernel call, the same values
        after = [m(x) for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
    for b, a in zip(before, after):
        assert torch.equal(a, b)
    start = fused.qweight.data_ptr()
    end = start + fused.qweight.nbytes
    for m in (attn.q_proj, attn.k_proj, attn.v_proj):  # members' codes are rows of the fused codes
        assert start <= m.qweight.data_ptr() < end


def test_int4_members_off_the_packed_row_block_are_not_fused() -> None:
    lin = [torch.nn.Linear(64, 48), torch.nn.Linear(64, 64)]
    q = [QuantizedLinear.from_module(m, "int4") for m in lin]
    assert q[0].kernel == "int4pack"
    assert loraplex.quant.fuse_outputs(q) is None


def test_unsupported_models_and_plans(adapters, tmp_path: Path) -> None:
    assert not decode.supports(MODEL_FACTORIES["gpt2"]())
    assert not decode.supports(MODEL_FACTORIES["mistral"](**SHAPE, sliding_window=16))
    with pytest.raises(ValueError, match="Llama-layout"):
        decode.FastDecoder(MODEL_FACTORIES["gpt2"]())
    base = base_model("llama")
    dora = make_peft_adapter(base, tmp_path / "dora", seed=3, r=4, lora_alpha=8, target_modules=["q_proj"],
                             use_dora=True)
    plex = loraplex.load(copy.deepcopy(base), adapters={"a": str(adapters["llama"]["a"]), "d": str(dora)})
    fast = decode.FastDecoder(plex.model)
    with plex.using(["a", "d"], 2) as plan:
        assert fast.program(plan, 2) is None  # DoRA rows need the full layer forward
    with plex.using(["a", None], 2) as plan:
        assert fast.program(plan, 2) is not None
        assert fast.program(plan, 3) is None  # rows of another batch


@pytest.mark.parametrize("scheme", [None, "int8"])
def test_engine_generates_the_same_tokens_with_and_without_the_fast_step(scheme: str | None, adapters,
                                                                         tmp_path: Path) -> None:
    paths = {k: str(v) for k, v in adapters["llama"].items()}
    dora = make_peft_adapter(base_model("llama"), tmp_path / "dora", seed=3, r=4, lora_alpha=8,
                             target_modules=["q_proj", "up_proj"], use_dora=True)
    results = {}
    for fast in (True, False):
        plex = loraplex.load(base_model("llama"), adapters={**paths, "d": str(dora)}, quantize=scheme)
        with Engine(plex, max_batch_size=8, batch_window_ms=50, fast_decode=fast,
                    eos_token_ids=[]) as engine:
            assert (engine.decoder is not None) == fast
            params = SamplingParams(max_tokens=6, temperature=0.0)
            choices = ["a", None, "b", {"a": 0.5, "c": 0.5}, "c"]
            mixed = engine.submit_many([(p, c, params) for p, c in zip(PROMPTS, choices)])
            with_dora = engine.submit_many([(p, c, params) for p, c in zip(PROMPTS[:2], ["d", "a"])])
            results[fast] = [h.result(timeout=60).token_ids for h in mixed + with_dora]
    assert results[True] == results[False]
    assert all(len(t) == 6 for t in results[True])


def test_kv_appender_equals_concatenation_across_batch_surgery() -> None:
    """Keys written into spare capacity equal DynamicCache's concatenation, also after rows leave the batch and a
    transformers update replaced the layer's tensors; buffers are reused between reallocations."""
    model = base_model("llama")
    ref, got = kv.new_cache(model), kv.new_cache(model)
    app = decode.KVAppender(min_spare=2)
    torch.manual_seed(0)
    first = torch.randn(3, 2, 4, 32), torch.randn(3, 2, 4, 32)
    for c in (ref, got):
        c.update(*first, 0)
    mask = torch.ones(3, 4, dtype=torch.long)
    ptrs = set()
    for step in range(7):
        k, v = torch.randn(ref.layers[0].keys.shape[0], 2, 1, 32), torch.randn(ref.layers[0].keys.shape[0], 2, 1, 32)
        want = ref.update(k, v, 0)
        have = app.append(got, 0, k, v)
        ptrs.add(have[0].data_ptr())
        assert torch.equal(have[0], want[0]) and torch.equal(have[1], want[1])
        assert got.layers[0].keys is have[0]
        if step == 2:  # a row leaves: the layer's tensors are new ones, the appender starts a new buffer
            mask = kv.select_rows(ref, mask, [0, 2])
            kv.select_rows(got, mask.new_ones(3, 1), [0, 2])
        if step == 4:  # a transformers forward appends by concatenation
            k2, v2 = torch.randn(2, 2, 1, 32), torch.randn(2, 2, 1, 32)
            ref.update(k2, v2, 0)
            got.update(k2, v2, 0)
    assert 2 <= len(ptrs) < 7  # reallocated after surgery, written in place in between


def test_stacked_factors_follow_slot_rewrites(adapters) -> None:
    """The decoder keeps each group's stacked factors between batches over the same adapters; an adapter replaced
    under the same name (its slot rewritten) is computed with its new weights, equal to the transformers forward."""
    paths = adapters["llama"]
    plex = loraplex.load(base_model("llama"), adapters={"a": str(paths["a"]), "b": str(paths["b"])})
    model = plex.model
    fast = decode.FastDecoder(model)
    ids, mask = pad_batch(PROMPTS[:2], 0, left=True)

    def step_pair(choices: list) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad(), plex.using(choices, 2) as plan:
            prog = fast.program(plan, 2)
            assert prog is not None
            caches = kv.new_cache(model), kv.new_cache(model)
            for c in caches:
                out = model(input_ids=ids, attention_mask=mask, position_ids=kv.position_ids(mask), past_key_values=c,
                            use_cache=True)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            m = torch.cat([mask, mask.new_ones(2, 1)], dim=1)
            pos = m.sum(dim=1, keepdim=True) - 1
            ref = model(input_ids=tok, attention_mask=m, position_ids=pos, past_key_values=caches[0],
                        use_cache=True).logits[:, -1]
            return fast.step(prog, tok, m, pos, caches[1]), ref

    got, ref = step_pair(["a", "b"])
    close(got, ref, None)
    kept = dict(fast._stacks)  # noqa: SLF001 - the cache under test
    got, ref = step_pair(["b", "a"])  # other rows, same adapters: the stacked factors are reused
    close(got, ref, None)
    assert all(fast._stacks[k][1] is v[1] for k, v in kept.items())  # noqa: SLF001
    before = got
    plex.add_adapter("a", str(paths["c"]), replace=True)  # a's slot rewritten with other weights
    got, ref = step_pair(["b", "a"])
    close(got, ref, None)
    assert not torch.allclose(got[1], before[1], atol=1e-3)  # the new weights really changed row 1


def test_engine_worker_runs_on_its_own_intra_op_threads(adapters) -> None:
    """The worker sets its intra-op threads (default: the constructing thread's), so a serving process can load on
    one thread and give the cores to the worker (loraplex.cputhreads)."""
    plex = loraplex.load(base_model("llama"), adapters={"a": str(adapters["llama"]["a"])})
    with Engine(plex, max_batch_size=2, threads=2) as engine:
        assert engine.call_on_worker(torch.get_num_threads) == 2
    here = torch.get_num_threads()
    with Engine(plex, max_batch_size=2) as engine:
        assert engine.call_on_worker(torch.get_num_threads) == here
    with pytest.raises(ValueError, match="threads must be >= 1"):
        loraplex.cputhreads.use(0)
