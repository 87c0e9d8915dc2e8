"""Mixed batches: every row picks its own adapter / base / blend in one forward, equal to PEFT row by row."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

import loraplex
from loraplex import ops
from loraplex.errors import LoraplexError
from conftest import MODEL_FACTORIES, PAD, VOCAB, make_peft_adapter, minilm_model, peft_model

ATOL = 1e-5
ARCHS = ["llama", "qwen2", "mistral", "gpt2", "bert", "minilm"]
CAUSAL = ["llama", "qwen2", "mistral", "gpt2"]

# Three adapters per architecture, all of different ranks:
#   a: rsLoRA + layers_to_transform;  b: "all-linear" + rank_pattern/alpha_pattern;  c: a regex target string.
_DECODER_SPECS = {
    "a": dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"],
              layers_to_transform=[1]),
    "b": dict(r=8, lora_alpha=16, target_modules="all-linear", rank_pattern={"o_proj": 2, "up_proj": 3},
              alpha_pattern={"o_proj": 3, "gate_proj": 5}),
    "c": dict(r=2, lora_alpha=4, target_modules=r".*\.(k_proj|gate_proj)"),
}
_GPT2_SPECS = {
    "a": dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["c_attn", "c_proj", "c_fc"], layers_to_transform=[1],
              fan_in_fan_out=True),
    "b": dict(r=8, lora_alpha=16, target_modules="all-linear", rank_pattern={"attn.c_proj": 2},
              alpha_pattern={"c_fc": 3}, fan_in_fan_out=True),
    "c": dict(r=2, lora_alpha=4, target_modules=r".*\.attn\.c_(attn|proj)", fan_in_fan_out=True),
}
_BERT_SPECS = {
    "a": dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["query", "key", "value", "dense"],
              layers_to_transform=[1]),
    "b": dict(r=8, lora_alpha=16, target_modules="all-linear", rank_pattern={"attention.self.key": 2},
              alpha_pattern={"output.dense": 3}),
    "c": dict(r=2, lora_alpha=4, target_modules=r".*\.attention\.self\.(query|value)"),
}


@dataclass
class Case:
    arch: str
    base: torch.nn.Module
    adapters: dict[str, Path]
    causal: bool
    vocab: int
    lo: int  # smallest random token id
    cache: dict = field(default_factory=dict)

    def fresh_base(self) -> torch.nn.Module:
        return copy.deepcopy(self.base)

    def plex(self, **kw) -> loraplex.Plex:
        return loraplex.load(self.fresh_base(), adapters={n: str(p) for n, p in self.adapters.items()}, **kw)

    def ids(self, n: int, length: int, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randint(self.lo, self.vocab, (n, length), generator=g)

    def peft(self, name: str) -> torch.nn.Module:
        if ("peft", name) not in self.cache:
            self.cache[("peft", name)] = peft_model(self.base, self.adapters[name])
        return self.cache[("peft", name)]


def out_of(case: Case, result) -> torch.Tensor:
    return result.logits if case.causal else result.last_hidden_state


_CASES: dict[str, Case] = {}


def _case(arch: str, root: Path) -> Case:
    if arch in _CASES:
        return _CASES[arch]
    if arch == "minilm":
        base, specs, causal, vocab, lo, task = minilm_model(), dict(_BERT_SPECS), False, 30522, 1000, None
        specs["a"] = {**specs["a"], "layers_to_transform": [1, 4]}
    else:
        base = MODEL_FACTORIES[arch]()
        causal = arch in CAUSAL
        specs = _GPT2_SPECS if arch == "gpt2" else _DECODER_SPECS if causal else _BERT_SPECS
        vocab, lo, task = VOCAB, 3, "CAUSAL_LM" if causal else None
    adapters = {}
    for i, (name, kw) in enumerate(specs.items()):
        over = {"target_modules": "all-linear"} if kw["target_modules"] == "all-linear" else None
        adapters[name] = make_peft_adapter(base, root / arch / name, seed=10 + i, task_type=task,
                                           config_overrides=over, **kw)
    _CASES[arch] = Case(arch, base, adapters, causal, vocab, lo)
    return _CASES[arch]


@pytest.fixture(params=ARCHS)
def case(request, tmp_path_factory) -> Case:
    return _case(request.param, tmp_path_factory.getbasetemp() / "mixed")


@pytest.fixture(params=CAUSAL)
def causal_case(request, tmp_path_factory) -> Case:
    return _case(request.param, tmp_path_factory.getbasetemp() / "mixed")


@pytest.fixture
def llama_case(tmp_path_factory) -> Case:
    return _case("llama", tmp_path_factory.getbasetemp() / "mixed")


ROWS = ["a", None, "b", "c", "a", None]


def _peft_rows(case: Case, rows, **inputs) -> list[torch.Tensor]:
    """Per row, PEFT's output for that row's adapter (base model for None), run on the same whole batch."""
    outs: dict = {}
    with torch.no_grad():
        for name in set(rows):
            model = case.base if name is None else case.peft(name)
            outs[name] = out_of(case, model(**inputs))
    return [outs[name][i] for i, name in enumerate(rows)]


def _assert_rows(got: torch.Tensor, want: list[torch.Tensor], rows, mask: torch.Tensor | None = None) -> None:
    for i, name in enumerate(rows):
        g, w = got[i], want[i]
        if mask is not None:
            g, w = g[mask[i].bool()], w[mask[i].bool()]
        assert torch.allclose(g, w, atol=ATOL, rtol=0), (
            f"row {i} ({name!r}): max abs diff {(g - w).abs().max().item():.3g}")


# --------------------------------------------------------------------------- forward vs PEFT
def test_adapters_really_change_outputs(case: Case) -> None:
    ids = case.ids(2, 6)
    with torch.no_grad():
        base = out_of(case, case.base(input_ids=ids))
        for name in case.adapters:
            assert (out_of(case, case.peft(name)(input_ids=ids)) - base).abs().max() > 1e-3, name


def test_mixed_batch_matches_peft(case: Case) -> None:
    plex = case.plex()
    ids = case.ids(len(ROWS), 8)
    with torch.no_grad():
        got = out_of(case, plex(ids, adapters=ROWS))
    _assert_rows(got, _peft_rows(case, ROWS, input_ids=ids), ROWS)


# row layouts that take the kernels' special paths: consecutive runs (no gather), one adapter, all base
ROW_LAYOUTS = {
    "runs": ["b", "b", "a", "c", "c", "c"],
    "uniform": ["c"] * 4,
    "all_base": [None, "base", None],
    "two_adapters": ["a", "b", "a", "b"],
}


@pytest.mark.parametrize("layout", list(ROW_LAYOUTS))
def test_row_layouts_match_peft(layout: str, tmp_path_factory) -> None:
    rows = ROW_LAYOUTS[layout]
    peft_rows = [None if r == "base" else r for r in rows]
    for arch in ("llama", "gpt2", "bert"):
        case = _case(arch, tmp_path_factory.getbasetemp() / "mixed")
        plex = case.plex()
        for name in ("c", "b", "a"):  # fixed slots c=1, b=2, a=3: slot order is not row order
            plex.bank.release(plex.bank.acquire([name]).values())
        assert plex.bank.resident() == {"c": 1, "b": 2, "a": 3}
        for length in (6, 1):
            ids = case.ids(len(rows), length, seed=20 + length)
            want = _peft_rows(case, peft_rows, input_ids=ids)
            with torch.no_grad():  # in-place kernels
                _assert_rows(out_of(case, plex(ids, adapters=rows)), want, peft_rows)
            with torch.enable_grad():  # out-of-place (autograd) kernels
                _assert_rows(out_of(case, plex(ids, adapters=rows)).detach(), want, peft_rows)
    # the adapters' ranks really differ; the bank pads them to its max rank
    ranks = {n: max(m.rank for m in plex.get_adapter(n).modules.values()) for n in "abc"}
    assert ranks == {"a": 4, "b": 8, "c": 2}
    assert max(layer.r_max for layer in plex.layers.values()) == 8


def test_mixed_batch_with_padding_matches_peft(case: Case) -> None:
    plex = case.plex()
    ids = case.ids(len(ROWS), 9, seed=1)
    mask = torch.ones_like(ids)
    for i, p in enumerate([0, 3, 1, 4, 2, 0]):
        if case.causal:
            mask[i, :p] = 0  # left padding
        elif p:
            mask[i, -p:] = 0  # right padding for encoders
    ids = ids.masked_fill(mask == 0, PAD)
    with torch.no_grad():
        got = out_of(case, plex(ids, adapters=ROWS, attention_mask=mask))
    _assert_rows(got, _peft_rows(case, ROWS, input_ids=ids, attention_mask=mask), ROWS, mask)


@pytest.mark.parametrize("kernel", ["sgmv", "bgmv", "segbmm"])
def test_forced_kernels_match_peft(case: Case, kernel: str) -> None:
    plex = case.plex()
    assert plex.layers
    for layer in plex.layers.values():
        layer.kernel = kernel
    rows = ["c", "a", None, "b", "a", "b"]
    for length in (7, 1):  # prefill-like and decode-like shapes
        ids = case.ids(len(rows), length, seed=length)
        with torch.no_grad():
            got = out_of(case, plex(ids, adapters=rows))
        _assert_rows(got, _peft_rows(case, rows, input_ids=ids), rows)


# --------------------------------------------------------------------------- blends
def _deltas(case: Case, name: str) -> dict[str, torch.Tensor]:
    """Per base parameter, PEFT's merged weight minus the base weight."""
    key = ("delta", name)
    if key not in case.cache:
        merged = peft_model(case.base, case.adapters[name]).merge_and_unload().state_dict()
        base = case.base.state_dict()
        case.cache[key] = {k: merged[k] - base[k] for k in base if not torch.equal(merged[k], base[k])}
    return case.cache[key]


def _blend_model(case: Case, weights: dict[str, float]) -> torch.nn.Module:
    """A copy of the base with ``W + sum_i w_i * delta_i`` written into its weights by hand."""
    model = case.fresh_base()
    sd = model.state_dict()
    with torch.no_grad():
        for name, w in weights.items():
            for k, d in _deltas(case, name).items():
                sd[k].add_(w * d)
    return model


def test_blend_rows_match_hand_computed_reference(case: Case) -> None:
    plex = case.plex()
    blends = [{"a": 0.7, "b": -0.3}, None, {"b": 0.5, "c": 0.5}, "c", {"a": 0.7, "b": -0.3}]
    ids = case.ids(len(blends), 6, seed=3)
    want = {}
    with torch.no_grad():
        for i, choice in enumerate(blends):
            weights = {} if choice is None else {choice: 1.0} if isinstance(choice, str) else choice
            key = tuple(sorted(weights.items()))
            if key not in want:
                want[key] = out_of(case, _blend_model(case, weights)(input_ids=ids))
            want[i] = want[key][i]
    for kernel in ("auto", "sgmv", "bgmv", "segbmm"):
        for layer in plex.layers.values():
            layer.kernel = kernel
        with torch.no_grad():
            got = out_of(case, plex(ids, adapters=blends))
        for i in range(len(blends)):
            assert torch.allclose(got[i], want[i], atol=ATOL, rtol=0), (kernel, i, (got[i] - want[i]).abs().max())


def test_blend_string_and_single_blend(llama_case: Case) -> None:
    plex = llama_case.plex()
    ids = llama_case.ids(2, 5)
    with torch.no_grad():
        a = plex(ids, adapters="blend(a=0.7,b=-0.3)").logits
        b = plex(ids, adapters={"a": 0.7, "b": -0.3}).logits
        c = plex(ids, adapters=[[("a", 0.7), ("b", -0.3)]] * 2).logits
    assert torch.equal(a, b)
    assert torch.allclose(a, c, atol=ATOL, rtol=0)
    from loraplex.compose.spec import parse
    from loraplex.plan import NeedsCompositionError

    with torch.no_grad():  # the grammar's other one-pass forms, as text or parsed
        st = plex(ids, adapters="stack(a,b)").logits
        node = plex(ids, adapters=parse("blend(a=0.7,b=-0.3)")).logits
        ones = plex(ids, adapters={"a": 1.0, "b": 1.0}).logits
        norm = plex(ids, adapters="blend(a=7,b=-3,normalize=true)").logits
    assert torch.equal(st, ones) and torch.equal(node, a)
    assert torch.allclose(norm, plex(ids, adapters={"a": 1.75, "b": -0.75}).logits, atol=ATOL, rtol=0)
    with pytest.raises(NeedsCompositionError, match="build_composition"):
        plex(ids, adapters="ensemble(a=1,b=1)")


# --------------------------------------------------------------------------- generate
def _left_padded(case: Case, n: int, length: int, pads: list[int], seed: int = 5):
    ids = case.ids(n, length, seed=seed)
    mask = torch.ones_like(ids)
    for i, p in enumerate(pads):
        mask[i, :p] = 0
    return ids.masked_fill(mask == 0, PAD), mask


def test_generate_greedy_matches_peft(causal_case: Case) -> None:
    case = causal_case
    plex = case.plex()
    ids, mask = _left_padded(case, len(ROWS), 6, [0, 2, 1, 3, 0, 2])
    gen = dict(max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=PAD, attention_mask=mask)
    got = plex.generate(ids, adapters=ROWS, **gen)
    assert got.shape[1] > ids.shape[1]
    with torch.no_grad():
        for name in set(ROWS):
            model = case.base if name is None else case.peft(name)
            want = model.generate(input_ids=ids, **gen)
            for i, r in enumerate(ROWS):
                if r == name:
                    assert torch.equal(got[i], want[i]), (r, i, got[i].tolist(), want[i].tolist())
    # adapters steer generation: not every row equals the base continuation
    with torch.no_grad():
        base = case.base.generate(input_ids=ids, **gen)
    assert any(not torch.equal(got[i], base[i]) for i, r in enumerate(ROWS) if r is not None)


def test_generate_with_blends(llama_case: Case) -> None:
    case = llama_case
    plex = case.plex()
    rows = [{"a": 0.7, "b": -0.3}, "c", None, {"b": 0.5, "c": 0.5}]
    ids, mask = _left_padded(case, len(rows), 5, [0, 1, 2, 0], seed=8)
    gen = dict(max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=PAD, attention_mask=mask)
    got = plex.generate(ids, adapters=rows, **gen)
    with torch.no_grad():
        for i, choice in enumerate(rows):
            weights = {} if choice is None else {choice: 1.0} if isinstance(choice, str) else choice
            want = _blend_model(case, weights).generate(input_ids=ids, **gen)[i]
            assert torch.equal(got[i], want), (i, choice)


@pytest.mark.parametrize("kernel", ["sgmv", "bgmv", "segbmm"])
def test_generate_forced_kernel(llama_case: Case, kernel: str) -> None:
    case = llama_case
    plex = case.plex()
    for layer in plex.layers.values():
        layer.kernel = kernel
    rows = ["b", "c", None, "a"]
    ids, mask = _left_padded(case, len(rows), 5, [1, 0, 2, 0], seed=6)
    gen = dict(max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=PAD, attention_mask=mask)
    got = plex.generate(ids, adapters=rows, **gen)
    with torch.no_grad():
        for i, name in enumerate(rows):
            model = case.base if name is None else case.peft(name)
            assert torch.equal(got[i], model.generate(input_ids=ids, **gen)[i]), (kernel, name)


def test_generate_single_adapter_and_num_return_sequences(llama_case: Case) -> None:
    case = llama_case
    plex = case.plex()
    ids, mask = _left_padded(case, 2, 5, [1, 0], seed=7)
    gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=PAD, attention_mask=mask)
    with torch.no_grad():
        want = case.peft("b").generate(input_ids=ids, **gen)
    assert torch.equal(plex.generate(ids, adapters="b", **gen), want)
    # beam search expands rows in place: the plan follows
    beams = dict(gen, num_beams=2, num_return_sequences=2)
    with torch.no_grad():
        want = case.peft("b").generate(input_ids=ids, **beams)
    got = plex.generate(ids, adapters=["b", "b"], **beams)
    assert torch.equal(got, want)
    # mixed rows under beam search: each input row's beams keep that row's adapter
    got = plex.generate(ids, adapters=["a", "c"], **beams)
    with torch.no_grad():
        want_a = case.peft("a").generate(input_ids=ids, **beams)
        want_c = case.peft("c").generate(input_ids=ids, **beams)
    assert torch.equal(got[:2], want_a[:2]) and torch.equal(got[2:], want_c[2:])


# --------------------------------------------------------------------------- autograd
def test_autograd_trainable_slot_gets_grads(llama_case: Case) -> None:
    case = llama_case
    plex = case.plex()
    ids = case.ids(4, 6, seed=8)
    rows = ["a", None, "a", None]
    with torch.no_grad():
        ref = plex(ids, adapters=rows).logits
    slot = plex.bank.resident()["a"]
    layers = list(plex.layers.values())
    for layer in layers:
        layer.lora_A.requires_grad_(True)
        layer.lora_B.requires_grad_(True)
    for kernel in ("auto", "sgmv", "bgmv", "segbmm"):
        for layer in layers:
            layer.kernel = kernel
            layer.lora_A.grad = layer.lora_B.grad = None
        out = plex(ids, adapters=rows).logits
        assert out.requires_grad
        assert torch.allclose(out, ref, atol=ATOL, rtol=0)  # autograd path == no_grad path
        out.float().logsumexp(-1).mean().backward()
        touched = 0
        for layer in layers:
            for p in (layer.lora_A, layer.lora_B):
                if p.grad is None:
                    continue
                assert torch.isfinite(p.grad).all()
                others = torch.cat([p.grad[:slot], p.grad[slot + 1:]])
                assert others.abs().max() == 0, f"{layer.module_name}: gradient leaked to other slots"
                r = layer.slot_rank[slot]
                g = p.grad[slot]
                if r:
                    touched += int(g.abs().sum() > 0)
                    pad = g[r:] if p is layer.lora_A else g[:, r:]
                    assert pad.abs().sum() == 0, "zero-padded rank entries must get no gradient"
                else:
                    assert g.abs().sum() == 0
        assert touched >= len(plex.get_adapter("a").modules), kernel
    # frozen base
    assert all(not p.requires_grad for n, p in plex.model.named_parameters() if "lora_" not in n)


# --------------------------------------------------------------------------- active / disabled / switching
def test_active_and_disabled(llama_case: Case) -> None:
    case = llama_case
    plex = case.plex()
    ids = case.ids(3, 5, seed=9)
    with torch.no_grad():
        base = case.base(input_ids=ids).logits
        want_a = case.peft("a")(input_ids=ids).logits
        want_c = case.peft("c")(input_ids=ids).logits
        assert plex.active is None
        assert torch.allclose(plex(ids).logits, base, atol=ATOL, rtol=0)
        plex.active = "a"
        assert torch.allclose(plex(ids).logits, want_a, atol=ATOL, rtol=0)
        with plex.disabled():
            assert torch.allclose(plex(ids).logits, base, atol=ATOL, rtol=0)
            assert torch.allclose(plex(ids, adapters="c").logits, base, atol=ATOL, rtol=0)
        assert torch.allclose(plex(ids).logits, want_a, atol=ATOL, rtol=0)
        plex.active = "c"
        assert torch.allclose(plex(ids).logits, want_c, atol=ATOL, rtol=0)
        # an explicit per-call choice overrides active
        assert torch.allclose(plex(ids, adapters="a").logits, want_a, atol=ATOL, rtol=0)
        plex.active = {"a": 1.0}
        assert torch.allclose(plex(ids).logits, want_a, atol=ATOL, rtol=0)
        plex.active = None
        assert torch.allclose(plex(ids).logits, base, atol=ATOL, rtol=0)
    # generate follows active and disabled() too
    gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=PAD)
    plex.active = "c"
    with torch.no_grad():
        assert torch.equal(plex.generate(ids, **gen), case.peft("c").generate(input_ids=ids, **gen))
        with plex.disabled():
            assert torch.equal(plex.generate(ids, **gen), case.base.generate(input_ids=ids, **gen))
    plex.active = None
    with pytest.raises(LoraplexError, match="zzz"):
        plex.active = "zzz"
    assert plex.active is None


def test_switch_is_a_slot_index_change(llama_case: Case) -> None:
    case = llama_case
    plex = case.plex()
    ids = case.ids(2, 4, seed=10)
    with torch.no_grad():
        plex(ids, adapters=["a", "b"])  # both resident now
        plex(ids, adapters=["c", "c"])
    def ptrs():
        return {n: (l.lora_A.data_ptr(), l.lora_B.data_ptr(), l.lora_scale.data_ptr())
                for n, l in plex.layers.items()}
    before, misses = ptrs(), plex.bank.stats.misses
    times = []
    for name in ["a", "b", "c", None, "a"] * 20:
        t0 = time.perf_counter()
        plex.active = name
        times.append(time.perf_counter() - t0)
    assert sorted(times)[len(times) // 2] < 1e-3, f"median switch {sorted(times)[len(times) // 2] * 1e3:.3f} ms"
    assert ptrs() == before
    with torch.no_grad():
        for name in ["a", "b", "c"]:
            plex.active = name
            got = plex(ids).logits
            assert torch.allclose(got, case.peft(name)(input_ids=ids).logits, atol=ATOL, rtol=0)
    assert ptrs() == before
    assert plex.bank.stats.misses == misses  # no weight copies: every switch hit a resident slot


# --------------------------------------------------------------------------- ops vs reference
def _random_stack(seed: int, slots: int = 5, r: int = 4, d_in: int = 12, d_out: int = 10, ranks=None):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(slots, r, d_in, generator=g)
    B = torch.randn(slots, d_out, r, generator=g)
    scale = torch.rand(slots, generator=g) + 0.5
    A[0], B[0], scale[0] = 0, 0, 0  # slot 0: no adapter
    if ranks is not None:  # zero-padded to r_max, as the bank stores them
        for s, rk in enumerate(ranks):
            A[s, rk:], B[s, :, rk:] = 0, 0
    return A, B, scale


PAIR_CASES = {
    "one_each": ([0, 1, 2, 3], [1, 2, 3, 4], [1.0, 1.0, 1.0, 1.0]),
    "consecutive_runs": ([0, 1, 2, 3, 4], [2, 2, 3, 3, 3], [1.0] * 5),
    "runs_out_of_slot_order": ([0, 1, 2, 3, 4], [3, 3, 1, 2, 2], [1.0] * 5),
    "one_run_not_first": ([1, 2], [2, 2], [1.0, 1.0]),
    "repeated_unordered": ([0, 1, 2, 3, 4, 5], [3, 1, 3, 0, 1, 3], [1.0] * 6),
    "blends": ([0, 0, 1, 2, 2, 2, 4], [1, 2, 3, 1, 2, 4, 2], [0.7, -0.3, 1.0, 0.2, 0.5, 0.3, 2.0]),
    "zero_weights": ([0, 1, 1, 2, 3], [1, 2, 3, 2, 4], [0.0, 1.0, 0.0, 0.5, 0.0]),
    "all_base": ([0, 2], [0, 0], [1.0, 1.0]),
    "same_slot_twice_in_row": ([0, 0, 1], [2, 2, 2], [0.5, 0.5, 1.0]),
}


@pytest.mark.parametrize("length", [1, 5])
@pytest.mark.parametrize("pairs", list(PAIR_CASES), ids=list(PAIR_CASES))
def test_ops_kernels_equal_reference(pairs: str, length: int) -> None:
    pr, ps, pw = PAIR_CASES[pairs]
    n_rows = max(pr) + 1 + (1 if pairs == "all_base" else 0)
    ranks = [0, 4, 2, 3, 1]
    A, B, scale = _random_stack(len(pr) * 7 + length, ranks=ranks)
    x = torch.randn(n_rows, length, A.shape[2], generator=torch.Generator().manual_seed(1))
    want = ops.lora_reference(x, A, B, scale, pr, ps, pw)
    seg = ops.make_segments(torch.tensor(pr), torch.tensor(ps), torch.tensor(pw, dtype=torch.float32), n_rows)
    results = {
        "sgmv": ops.lora_sgmv(x, A, B, scale, seg),
        "sgmv_ranks": ops.lora_sgmv(x, A, B, scale, seg, ranks=ranks),
        "bgmv": ops.lora_bgmv(x, A, B, scale, seg),
    }
    base = torch.randn(n_rows, length, B.shape[1], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        results["sgmv_inplace"] = ops.lora_sgmv(x, A, B, scale, seg, out=base.clone(), ranks=ranks) - base
        results["bgmv_inplace"] = ops.lora_bgmv(x, A, B, scale, seg, out=base.clone()) - base
    for kind, got in results.items():
        assert got.shape == want.shape, kind
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (kind, (got - want).abs().max())
    if pairs in ("all_base",):
        assert want.abs().max() == 0
    if pairs == "zero_weights":
        assert want[0].abs().max() == 0 and want[3].abs().max() == 0


def test_ops_autograd_matches_reference() -> None:
    A, B, scale = _random_stack(3)
    pr, ps, pw = PAIR_CASES["blends"]
    x = torch.randn(5, 3, A.shape[2])
    seg = ops.make_segments(torch.tensor(pr), torch.tensor(ps), torch.tensor(pw), 5)
    grads = {}
    for kind in ("ref", "sgmv", "bgmv"):
        a = A.clone().requires_grad_(True)
        xx = x.clone().requires_grad_(True)
        if kind == "ref":
            y = ops.lora_reference(xx, a, B, scale, pr, ps, pw)
        elif kind == "sgmv":
            y = ops.lora_sgmv(xx, a, B, scale, seg)
        else:
            y = ops.lora_bgmv(xx, a, B, scale, seg)
        (y ** 2).sum().backward()
        grads[kind] = (a.grad, xx.grad)
    for kind in ("sgmv", "bgmv"):
        assert torch.allclose(grads[kind][0], grads["ref"][0], atol=1e-4, rtol=1e-5)
        assert torch.allclose(grads[kind][1], grads["ref"][1], atol=1e-4, rtol=1e-5)
    assert grads["sgmv"][0][0].abs().sum() == 0  # slot 0 (no adapter) gets no gradient


@pytest.mark.parametrize("kernel", ["sgmv", "bgmv", "segbmm"])
@pytest.mark.parametrize("length", [1, 5])
def test_kernels_equal_plain_loop_with_uneven_segments_blends_and_grads(kernel: str, length: int) -> None:
    """Each kernel (values and gradients) equals ops.lora_reference on an uneven layout with blends and base rows."""
    g = torch.Generator().manual_seed(0)
    n_slots, r, d_in, d_out = 5, 4, 12, 10
    A = torch.randn(n_slots, r, d_in, generator=g, dtype=torch.float64)
    B = torch.randn(n_slots, d_out, r, generator=g, dtype=torch.float64)
    A[0], B[0] = 0, 0
    scale = torch.tensor([0.0, 2.0, 0.5, 1.0, 3.0], dtype=torch.float64)
    # rows: 0 -> slot 3; 1 -> base; 2 -> slot 1; 3 -> 0.7*s1 - 0.4*s4; 4 -> slot 3; 5 -> slot 3; 6 -> slot 2
    pairs = [(0, 3, 1.0), (2, 1, 1.0), (3, 1, 0.7), (3, 4, -0.4), (4, 3, 1.0), (5, 3, 1.0), (6, 2, 1.0)]
    rows, slots, weights = (torch.tensor(c) for c in zip(*pairs))
    seg = ops.make_segments(rows, slots, weights.double(), 7)
    x = torch.randn(7, length, d_in, generator=g, dtype=torch.float64, requires_grad=True)
    fn = {"sgmv": ops.lora_sgmv, "bgmv": ops.lora_bgmv, "segbmm": ops.lora_segbmm}[kernel]
    got = fn(x, A, B, scale, seg)
    want = ops.lora_reference(x, A, B, scale, rows.tolist(), slots.tolist(), weights.tolist())
    assert torch.allclose(got, want, atol=1e-12)
    gx, = torch.autograd.grad(got.square().sum(), x)
    wx, = torch.autograd.grad(want.square().sum(), x)
    assert torch.allclose(gx, wx, atol=1e-10)
    with torch.no_grad():  # the in-place path adds into ``out``
        base = torch.randn(7, length, d_out, generator=g, dtype=torch.float64)
        assert torch.allclose(fn(x, A, B, scale, seg, out=base.clone()), base + want, atol=1e-12)


@pytest.mark.parametrize("slots", [[1, 1, 2, 2, 3, 3], [1, 1, 3, 3, 4, 4], [2, 2, 1, 1, 3, 3]])
def test_segbmm_fast_layouts_equal_plain_loop(slots: list[int]) -> None:
    """Equal consecutive segments (no gather) and consecutive slots (factor views), and the general fallbacks."""
    g = torch.Generator().manual_seed(1)
    A = torch.randn(5, 3, 8, generator=g, dtype=torch.float64)
    B = torch.randn(5, 6, 3, generator=g, dtype=torch.float64)
    scale = torch.tensor([0.0, 1.5, 0.5, 2.0, 1.0], dtype=torch.float64)
    rows = list(range(len(slots)))
    seg = ops.make_segments(torch.tensor(rows), torch.tensor(slots), torch.ones(len(slots), dtype=torch.float64),
                            len(slots))
    assert seg.pad_identity == (slots == sorted(slots))
    assert (seg.slot_range is not None) == (sorted(set(slots)) == list(range(min(slots), max(slots) + 1)))
    x = torch.randn(len(slots), 2, 8, generator=g, dtype=torch.float64)
    want = ops.lora_reference(x, A, B, scale, rows, slots, [1.0] * len(slots))
    assert torch.allclose(ops.lora_segbmm(x, A, B, scale, seg), want, atol=1e-12)
    with torch.no_grad():
        base = torch.randn(len(slots), 2, 6, generator=g, dtype=torch.float64)
        assert torch.allclose(ops.lora_segbmm(x, A, B, scale, seg, out=base.clone()), base + want, atol=1e-12)


@pytest.mark.parametrize("slots, length, want", [
    ([1, 1, 1, 1], 64, "sgmv"),  # one adapter: a single matmul pair
    (list(range(1, 17)), 64, "segbmm"),  # one row per adapter: equal segments, no padding
    ([3, 1, 2, 4, 2, 3, 1, 4], 64, "segbmm"),  # equal segments, rows scattered
    ([1] * 8 + [2] * 8, 64, "sgmv"),  # two grouped segments: two slices
    ([1] * 6 + [2] * 3 + [3] * 2 + [4, 5], 64, "sgmv"),  # uneven, grouped, few adapters
    ([1] * 6 + [2, 3, 1, 2, 4, 5, 1, 3], 64, "bgmv"),  # uneven and scattered: gather factors, pad nothing
    ([1] * 5 + list(range(2, 13)), 64, "bgmv"),  # many uneven segments
    (list(range(1, 17)), 1, "segbmm"),  # decode, 16 adapters
    ([1] * 8 + [2] * 8, 1, "segbmm"),  # decode, two equal segments
    ([1] * 12 + [2] * 4, 1, "sgmv"),  # decode, two uneven grouped segments
    ([1] * 5 + list(range(2, 13)), 1, "bgmv"),  # decode: padding would more than triple the rows
])
def test_choose_kernel_follows_measured_rules(slots: list[int], length: int, want: str) -> None:
    """The automatic choice per layout (rules measured with benchmarks/kernel_choice.py)."""
    n = len(slots)
    seg = ops.make_segments(torch.arange(n), torch.tensor(slots), torch.ones(n), n)
    assert ops.choose_kernel(seg, length) == want


def test_pad_batch_right_and_left() -> None:
    from loraplex.tokens import pad_batch

    ids, mask = pad_batch([[5, 6, 7], [8], (9, 10)], 0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]] and ids.dtype == torch.long
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    ids, mask = pad_batch([[5, 6, 7], [8]], 2, left=True, device="cpu")
    assert ids.tolist() == [[5, 6, 7], [2, 2, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_stacked_columns_equal_each_outputs_plain_loop() -> None:
    """ops.stack_columns + column_weights + lora_columns (several outputs reading one input, adapters of different
    ranks, an output an adapter leaves alone, blends, base rows) equal ops.lora_reference output by output."""
    torch.manual_seed(0)
    d_in, widths, n_slots = 24, [16, 8, 12], 4
    ranks = {1: [4, 0, 2], 2: [3, 5, 0], 3: [0, 0, 6]}  # slot -> rank per output (0: no adapter there)
    stacks = []
    for j, w in enumerate(widths):
        A = torch.zeros(n_slots, 6, d_in)
        B = torch.zeros(n_slots, w, 6)
        for s, rs in ranks.items():
            A[s, :rs[j]] = torch.randn(rs[j], d_in)
            B[s, :, :rs[j]] = torch.randn(w, rs[j])
        stacks.append((A, B, torch.tensor([0.0, 0.5, 2.0, 0.25])))
    pr, ps, pw = [0, 1, 2, 2, 4, 5], [1, 2, 1, 3, 0, 2], [1.0, 1.0, 0.3, 0.7, 1.0, -0.5]  # row 3: no pair
    x = torch.randn(6, d_in)
    slots = [1, 2, 3]
    factors = [[(A[s, :ranks[s][j]], B[s, :, :ranks[s][j]], float(sc[s])) if ranks[s][j] else None
                for j, (A, B, sc) in enumerate(stacks)] for s in slots]
    a, b, cols = ops.stack_columns(factors, widths)
    assert cols == [6, 8, 6] and a.shape == (d_in, 20) and b.shape == (20, sum(widths))
    index = torch.tensor([slots.index(s) if s in slots else -1 for s in ps])
    weights = ops.column_weights(torch.tensor(pr), index, torch.tensor(pw), cols, 6)
    out = torch.zeros(6, sum(widths))
    ops.lora_columns(x, a, b, weights, out)
    want = torch.cat([ops.lora_reference(x[:, None], A, B, sc, pr, ps, pw)[:, 0] for A, B, sc in stacks], dim=1)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    assert out[3].abs().max() == 0 and out[4].abs().max() == 0  # no pair / slot 0: nothing added
