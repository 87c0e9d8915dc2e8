"""Compositions on the mixed-batch runtime: blends, stacks, ensembles, routed models, against hand references."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch

import loraplex
from loraplex.compose import (FixedBlend, GatedModel, InLayerStack, LearnedBlend, LogitEnsemble, RoutedModel, Router,
                              RouterCollapseWarning, RouterError, build_composition, expert_logits, load_router,
                              save_router, weighted_plan)
from loraplex.compose import functional as F
from loraplex.compose import losses as L
from loraplex.compose.stack import AdditiveStack
from loraplex.errors import LoraplexError
from conftest import VOCAB, make_peft_adapter, tiny_llama

ATOL = 1e-5
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
# q/o are square (32x32); k/v are 32->16 (GQA); up/down are 32<->64
SPECS = {
    "a": dict(r=4, lora_alpha=8, target_modules=TARGETS),
    "b": dict(r=2, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "o_proj", "v_proj", "down_proj"]),
    "c": dict(r=8, lora_alpha=4, target_modules=["q_proj", "up_proj"]),
}



pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread (conftest)

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("compose")
    base = tiny_llama()
    paths = {n: make_peft_adapter(base, root / n, seed=20 + i, task_type="CAUSAL_LM", **kw)
             for i, (n, kw) in enumerate(SPECS.items())}
    return base, paths, root


def make_plex(setup) -> loraplex.Plex:
    base, paths, _ = setup
    return loraplex.load(copy.deepcopy(base), adapters={n: str(p) for n, p in paths.items()})


def ids_of(n: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def hand_deltas(path) -> dict[str, torch.Tensor]:
    """Dense deltas ``s * B @ A`` per module, read straight from a PEFT adapter folder (safetensors + config),
    with PEFT's scaling ``alpha / r`` (rsLoRA: ``alpha / sqrt(r)``) -- independent of loraplex's loader and bank."""
    from safetensors.torch import load_file

    cfg = json.loads((Path(path) / "adapter_config.json").read_text())
    assert not cfg.get("rank_pattern") and not cfg.get("alpha_pattern") and not cfg.get("fan_in_fan_out")
    r, alpha = cfg["r"], cfg["lora_alpha"]
    scale = alpha / r ** 0.5 if cfg.get("use_rslora") else alpha / r
    state = load_file(str(Path(path) / "adapter_model.safetensors"))
    out = {}
    for key, a in state.items():
        if key.endswith(".lora_A.weight"):
            mod = key[len("base_model.model."):-len(".lora_A.weight")]
            b = state[key.replace(".lora_A.", ".lora_B.")]
            out[mod] = scale * (b.double() @ a.double()).float()
    return out


def dense_model(setup, plex, weights: dict[str, float]) -> torch.nn.Module:
    """A copy of the base model with W + sum_i w_i D_i written into every adapted Linear (hand reference: the
    deltas come from the adapter files, not from loraplex)."""
    model = copy.deepcopy(setup[0])
    deltas = {name: hand_deltas(setup[1][name]) for name in weights}
    for name, w in weights.items():
        for mod, d in deltas[name].items():
            with torch.no_grad():
                model.get_submodule(mod).weight += w * d
    return model


def logits(out) -> torch.Tensor:
    return out.logits


# ------------------------------------------------------------------------------------------- blend
@pytest.mark.parametrize("kernel", ["auto", "sgmv", "bgmv", "segbmm"])
def test_blend_equals_exact_delta_sum(setup, kernel):
    plex = make_plex(setup)
    for layer in plex.layers.values():
        layer.kernel = kernel
    ids = ids_of(3, 7)
    w = {"a": 0.7, "b": -0.3, "c": 1.5}
    ref = dense_model(setup, plex, w)
    with torch.no_grad():
        got = plex(ids, adapters=w).logits
        want = ref(input_ids=ids).logits
    assert torch.allclose(got, want, atol=ATOL), (got - want).abs().max()


@pytest.mark.parametrize("kernel", ["sgmv", "bgmv", "segbmm"])
def test_per_row_blends_in_one_batch(setup, kernel):
    plex = make_plex(setup)
    for layer in plex.layers.values():
        layer.kernel = kernel
    rows = [{"a": 0.5, "b": 0.5}, "c", None, {"b": 2.0, "c": -1.0}]
    ids = ids_of(4, 5, seed=1)
    with torch.no_grad():
        got = plex(ids, adapters=rows).logits
        for i, r in enumerate(rows):
            w = {} if r is None else ({r: 1.0} if isinstance(r, str) else r)
            want = dense_model(setup, plex, w)(input_ids=ids[i:i + 1]).logits[0]
            assert torch.allclose(got[i], want, atol=ATOL), (i, (got[i] - want).abs().max())


def test_fixed_blend_normalise_and_negative(setup):
    plex = make_plex(setup)
    fb = FixedBlend(plex, {"a": 3.0, "b": -1.0}, normalize=True)
    assert fb.weights == {"a": 1.5, "b": -0.5}
    assert fb.spec() == "blend(a=1.5,b=-0.5)"
    ids = ids_of(2, 6)
    with torch.no_grad():
        assert torch.allclose(fb(ids).logits, dense_model(setup, plex, fb.weights)(input_ids=ids).logits, atol=ATOL)
    with pytest.raises(LoraplexError, match="sum to 0"):
        FixedBlend(plex, {"a": 1.0, "b": -1.0}, normalize=True)
    with pytest.raises(LoraplexError, match="not registered"):
        FixedBlend(plex, {"a": 1.0, "zz": 1.0})


def test_weighted_plan_carries_gradient_and_matches_blend(setup):
    plex = make_plex(setup)
    ids = ids_of(3, 5)
    w = torch.tensor([[0.2, 0.8, 0.0], [1.0, 0.0, 0.0], [0.3, 0.3, 0.4]], requires_grad=True)
    with weighted_plan(plex, ["a", "b", "c"], w):
        out = plex.model(input_ids=ids).logits
    with torch.no_grad():
        rows = [{"a": 0.2, "b": 0.8}, "a", {"a": 0.3, "b": 0.3, "c": 0.4}]
        want = plex(ids, adapters=rows).logits
    assert torch.allclose(out, want, atol=ATOL)
    out.pow(2).mean().backward()
    assert w.grad is not None
    assert w.grad[0, :2].abs().min() > 0 and w.grad[2].abs().min() > 0
    assert w.grad[0, 2] == 0  # zero weights are not in the plan


def test_learned_blend_trains_only_the_weights(setup):
    plex = make_plex(setup)
    lb = LearnedBlend(plex, ["a", "b", "c"])
    assert torch.allclose(lb.weights(), torch.full((3,), 1 / 3))
    ids = ids_of(4, 8, seed=3)
    with torch.no_grad():  # forward equals the fixed blend with the same weights
        assert torch.allclose(lb(ids).logits, plex(ids, adapters=lb.choice()).logits, atol=ATOL)
    before = {n: p.clone() for n, p in plex.model.named_parameters()}
    hist = lb.fit([(ids, None)], epochs=15, lr=0.2)
    assert hist[-1] < hist[0]
    assert abs(sum(lb.choice().values()) - 1) < 1e-5 and lb.choice() != {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}
    for n, p in plex.model.named_parameters():
        assert torch.equal(p, before[n]), n  # base and adapter stacks frozen


def test_logit_ensemble_one_expanded_batch(setup):
    plex = make_plex(setup)
    ids = ids_of(2, 6)
    ens = LogitEnsemble(plex, {"a": 0.6, "b": 0.4})
    calls = []
    h = plex.model.register_forward_hook(lambda m, a, kw_out: calls.append(1))
    with torch.no_grad():
        got = ens(ids).logits
    h.remove()
    assert len(calls) == 1  # N x (K+1) rows in one forward
    with torch.no_grad():
        base = plex(ids, adapters=None).logits
        la, lb_ = plex(ids, adapters="a").logits, plex(ids, adapters="b").logits
    want = base + 0.6 * (la - base) + 0.4 * (lb_ - base)
    assert torch.allclose(got, want, atol=ATOL)
    # differs from the delta-level blend (the network is not linear in the deltas)
    with torch.no_grad():
        blend = plex(ids, adapters={"a": 0.6, "b": 0.4}).logits
    assert not torch.allclose(got, blend, atol=1e-4)
    # greedy generation: every step takes the argmax of the ensembled logits
    gen = ens.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert gen.shape == (2, 9)
    with torch.no_grad():
        first = ens(ids).logits[:, -1].argmax(-1)
    assert torch.equal(gen[:, 6], first)


# ------------------------------------------------------------------------------------------- stacks
def test_additive_stack_is_w_plus_both_deltas(setup):
    plex = make_plex(setup)
    ids = ids_of(2, 6)
    st = AdditiveStack(plex, ["a", "b"])
    with torch.no_grad():
        assert torch.allclose(st(ids).logits, dense_model(setup, plex, {"a": 1, "b": 1})(input_ids=ids).logits,
                              atol=ATOL)


def _two_step_reference(setup, plex, first: str, second: str) -> torch.nn.Module:
    """Hand-written in-layer stack: step 1 ``h = D1 x``, step 2 ``y = W x + D2 h`` where both adapt a square layer;
    elsewhere ``y = W x + D1 x + D2 x`` (with whichever deltas exist)."""
    model = copy.deepcopy(setup[0])
    a1, a2 = hand_deltas(setup[1][first]), hand_deltas(setup[1][second])
    for mod in plex.layers:
        lin = model.get_submodule(mod)
        d1, d2 = a1.get(mod), a2.get(mod)
        square = lin.in_features == lin.out_features

        def hook(m, args, y, d1=d1, d2=d2, square=square):
            x = args[0]
            if d1 is not None and d2 is not None and square:
                h = x @ d1.t()          # step 1: adapter 1 on the layer input
                return y + h @ d2.t()   # step 2: adapter 2 on adapter 1's output
            extra = 0
            for d in (d1, d2):
                if d is not None:
                    extra = extra + x @ d.t()
            return y + extra

        lin.register_forward_hook(hook)
    return model


def test_inlayer_stack_equals_two_step_reference(setup):
    plex = make_plex(setup)
    st = InLayerStack(plex, ["a", "b"])
    rules = st.layer_rules()
    assert rules["model.layers.0.self_attn.q_proj"] == "product"
    assert rules["model.layers.0.self_attn.o_proj"] == "product"
    assert rules["model.layers.0.self_attn.v_proj"] == "additive"  # 32 -> 16: shapes do not allow the product
    assert rules["model.layers.0.mlp.up_proj"] == "additive"  # only adapter a adapts it
    ids = ids_of(3, 6)
    with torch.no_grad():
        got = st(ids).logits
        want = _two_step_reference(setup, plex, "a", "b")(input_ids=ids).logits
        additive = plex(ids, adapters={"a": 1, "b": 1}).logits
    assert torch.allclose(got, want, atol=ATOL), (got - want).abs().max()
    assert not torch.allclose(got, additive, atol=1e-4)
    # order matters, and the hooks are gone after the call
    with torch.no_grad():
        rev = InLayerStack(plex, ["b", "a"])(ids).logits
        assert torch.allclose(rev, _two_step_reference(setup, plex, "b", "a")(input_ids=ids).logits, atol=ATOL)
        assert torch.allclose(plex(ids).logits, plex(ids, adapters=None).logits)
        assert all(not layer._forward_hooks for layer in plex.layers.values())
    out = st.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert torch.equal(out[:, 6], got[:, -1].argmax(-1))


# ------------------------------------------------------------------------------------------- routing
def _router(experts, in_dim, seed=0, **kw) -> Router:
    torch.manual_seed(seed)
    r = Router(experts, in_dim, **kw)
    with torch.no_grad():
        r.head[-1].weight.mul_(50)  # decisive, diverse choices on random features
    return r.eval()


def test_top1_routed_logits_equal_own_adapter_row_by_row(setup):
    plex = make_plex(setup)
    ids = ids_of(8, 6, seed=5)
    rm = RoutedModel(plex, _router(["a", "b", "c"], 32))
    calls = []
    h = plex.model.register_forward_hook(lambda m, a, o: calls.append(1))
    with torch.no_grad():
        out, routing = rm.run(ids)
    h.remove()
    assert len(calls) == 2  # one routing pass + ONE mixed-batch pass
    chosen = routing.top1
    assert len(set(chosen)) >= 2, chosen
    assert routing.choices() == chosen
    with torch.no_grad():  # the choice is the router's argmax on the bare base model's mean-pooled last hidden state
        hs = setup[0](input_ids=ids, output_hidden_states=True).hidden_states[-1]
        assert chosen == [rm.experts[i] for i in rm.router(hs.mean(1)).argmax(-1).tolist()]
    with torch.no_grad():
        for i, name in enumerate(chosen):
            own = plex(ids[i:i + 1], adapters=name).logits[0]
            assert torch.allclose(out.logits[i], own, atol=ATOL), (i, name)
            by_hand = dense_model(setup, plex, {name: 1.0})(input_ids=ids[i:i + 1]).logits[0]
            assert torch.allclose(out.logits[i], by_hand, atol=ATOL), (i, name)
        sel = rm.all_experts(ids, combine="select")
    assert torch.allclose(sel, out.logits, atol=ATOL)


def test_topk_and_soft_rows_are_renormalised_blends(setup):
    plex = make_plex(setup)
    ids = ids_of(4, 5, seed=6)
    r = _router(["a", "b", "c"], 32, top_k=2)
    with torch.no_grad():
        r.head[-1].weight.div_(50)
    rm = RoutedModel(plex, r)
    with torch.no_grad():
        out = rm(ids)
    routing = rm.last_routing
    with torch.no_grad():  # routing probabilities by hand: softmax of the router on the pooled base hidden state
        hs = setup[0](input_ids=ids, output_hidden_states=True).hidden_states[-1]
        p_hand = torch.softmax(r(hs.mean(1)), -1)
    assert torch.allclose(routing.probs, p_hand, atol=1e-5)
    for row, choice in enumerate(routing.choices()):
        assert isinstance(choice, dict) and len(choice) == 2
        p_sorted, order = p_hand[row].sort(descending=True)
        assert list(choice) == [rm.experts[i] for i in order[:2].tolist()]
        # renormalised: p_i / (p_1 + p_2), not the raw probabilities
        want_w = (p_sorted[:2] / p_sorted[:2].sum()).tolist()
        assert choice[rm.experts[order[0]]] == pytest.approx(want_w[0], abs=1e-6)
        assert choice[rm.experts[order[1]]] == pytest.approx(want_w[1], abs=1e-6)
        assert choice[rm.experts[order[0]]] > p_sorted[0] + 1e-4  # three experts: renormalising changes them
        with torch.no_grad():
            want = plex(ids[row:row + 1], adapters=choice).logits[0]
        assert torch.allclose(out.logits[row], want, atol=ATOL)
    soft = RoutedModel(plex, r, mode="soft")
    with torch.no_grad():
        got = soft(ids).logits
        p = soft.last_routing.probs
        want = plex(ids, adapters=[dict(zip("abc", row.tolist())) for row in p]).logits
        weighted = soft.all_experts(ids, combine="weighted")
        each = expert_logits(plex, ["a", "b", "c"], ids)
    assert torch.allclose(got, want, atol=ATOL)
    assert torch.allclose(weighted, (p[:, :, None, None] * each).sum(1), atol=ATOL)


def test_routed_generation_matches_per_row_generation(setup):
    plex = make_plex(setup)
    ids = ids_of(6, 5, seed=7)
    rm = RoutedModel(plex, _router(["a", "b", "c"], 32, seed=1))
    out = rm.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    for i, name in enumerate(rm.last_routing.top1):
        alone = plex.generate(ids[i:i + 1], adapters=name, max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(out[i], alone[0]), (i, name)


def test_embedding_router_on_texts(setup):
    plex = make_plex(setup)
    r = Router(["a", "b"], 384, pooling="embedding")
    rm = RoutedModel(plex, r)
    feats = rm.features(texts=["def f(x): return x", "The quick brown fox."])
    assert feats.shape == (2, 384)
    assert torch.allclose(feats.norm(dim=-1), torch.ones(2), atol=1e-5)
    routing = rm.route(texts=["def f(x): return x", "The quick brown fox."])
    assert routing.probs.shape == (2, 2)


def test_gradients_reach_router_through_mixed_batch(setup):
    plex = make_plex(setup)
    ids = ids_of(6, 6, seed=8)
    for mode, k in (("soft", 1), ("topk", 2), ("top1", 1)):
        r = Router(["a", "b", "c"], 32, type="mlp", hidden_size=16, mode=mode, top_k=k)
        rm = RoutedModel(plex, r)
        out, routing = rm.differentiable(ids)
        loss = out.logits.float().logsumexp(-1).mean()
        loss.backward()
        g = r.head[-1].weight.grad
        assert g is not None and g.abs().sum() > 0, mode


# ------------------------------------------------------------------------------------------- losses
def test_every_load_loss_has_gradient_into_router():
    torch.manual_seed(0)
    r = Router(["a", "b", "c", "d"], 16, type="mlp", hidden_size=8)
    feats = torch.randn(32, 16) + torch.tensor([2.0] + [0.0] * 15)  # skewed: imbalanced routing
    for name, fn in [("switch", lambda lg: L.switch_load_balance(lg)),
                     ("switch_probs", lambda lg: L.switch_load_balance(torch.softmax(lg, -1))),
                     ("z", L.router_z_loss),
                     ("sq_dev", lambda lg: L.sq_dev_load_loss(torch.softmax(lg, -1))),
                     ("entropy", lambda lg: L.entropy(torch.softmax(lg, -1))),
                     ("aux", lambda lg: L.aux_loss(lg, torch.softmax(lg, -1), load_balance="sq_dev"))]:
        r.zero_grad()
        fn(r(feats)).backward()
        grads = [p.grad for p in r.parameters() if p.requires_grad]
        assert all(g is not None for g in grads), name
        assert sum(float(g.abs().sum()) for g in grads) > 0, name
    hard = L.hard_load_loss(r(feats))
    assert not hard.requires_grad  # argmax counts: no gradient (documented)


def test_loss_values():
    probs = torch.full((8, 4), 0.25)
    assert torch.isclose(L.sq_dev_load_loss(probs), torch.tensor(0.0))
    assert torch.isclose(L.switch_load_balance(probs, torch.arange(8) % 4), torch.tensor(1.0))
    collapsed = torch.tensor([[1.0, 0, 0, 0]] * 8)
    assert torch.isclose(L.switch_load_balance(collapsed), torch.tensor(4.0))
    assert torch.isclose(L.router_z_loss(torch.zeros(3, 4)), torch.log(torch.tensor(4.0)) ** 2)
    assert torch.allclose(L.load_shares(torch.tensor([0, 0, 1, -1]), 3), torch.tensor([0.5, 0.25, 0.0]))


def test_collapse_warning():
    with pytest.warns(RouterCollapseWarning) as rec:
        problems = L.warn_collapse(torch.tensor([0.8, 0.2, 0.0]), ["a", "b", "c"])
    assert len(problems) == 2 and len(rec) == 2
    assert "'a' takes 80%" in problems[0] and "'c' receives no rows" in problems[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert L.warn_collapse(torch.tensor([0.4, 0.3, 0.3]), ["a", "b", "c"]) == []


def test_route_modes_and_capacity():
    logits = torch.tensor([[3.0, 1.0, 0.0], [2.9, 2.8, 0.0], [3.0, 0.0, 1.0], [0.0, 0.0, 5.0]])
    g = F.route(logits, "topk", 2)
    assert torch.allclose(g.weights.sum(-1), torch.ones(4))
    assert F.route(logits, "top1").weights.eq(1).all()
    hot = F.route(logits, "soft", temperature=0.1).probs
    assert hot.max(-1).values.min() > 0.6
    capped = F.apply_capacity(F.route(logits, "top1"), capacity_factor=1.0)  # capacity ceil(4/3) = 2
    assert torch.bincount(capped.idx[:, 0], minlength=3).max() <= 2
    assert capped.idx[1, 0] == 1  # the least sure row of expert 0 moves to its second choice


def test_pool_hidden():
    h = torch.arange(24, dtype=torch.float).view(2, 4, 3)
    m = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0]])
    assert torch.allclose(F.pool_hidden(h, m, "mean")[0], h[0, 1:].mean(0))
    assert torch.allclose(F.pool_hidden(h, m, "first"), torch.stack([h[0, 1], h[1, 0]]))
    assert torch.allclose(F.pool_hidden(h, m, "last"), torch.stack([h[0, 3], h[1, 1]]))


# ------------------------------------------------------------------------------------------- token gating
def test_token_gated_uniform_equals_equal_blend_and_trains(setup):
    plex = make_plex(setup)
    gm = GatedModel.new(plex, ["a", "b", "c"])
    ids = ids_of(2, 5)
    with torch.no_grad():
        got = gm(ids).logits
        want = plex(ids, adapters={"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}).logits
    assert torch.allclose(got, want, atol=ATOL)  # zero-init gates: uniform mixture per token
    # a decisive gate bias selects one expert everywhere
    with torch.no_grad():
        for lin in gm.router.gates_by_layer.values():
            lin.bias.copy_(torch.tensor([0.0, 60.0, 0.0]))
        assert torch.allclose(gm(ids).logits, plex(ids, adapters="b").logits, atol=1e-4)
        for lin in gm.router.gates_by_layer.values():
            lin.bias.zero_()
    loss = gm(ids).logits.float().logsumexp(-1).mean()
    loss.backward()
    assert any(float(lin.weight.grad.abs().sum()) > 0 for lin in gm.router.gates_by_layer.values())


# ------------------------------------------------------------------------------------------- save / load
def test_router_save_load_round_trip_and_errors(setup, tmp_path):
    plex = make_plex(setup)
    r = _router(["a", "b", "c"], 32, type="mlp", hidden_size=16, top_k=2, temperature=0.5)
    r.fit_normalizer(torch.randn(10, 32))
    save_router(r, tmp_path / "router", adapters={n: p for n, p in setup[1].items()})
    cfg = json.loads((tmp_path / "router" / "router.json").read_text())
    assert cfg["experts"] == ["a", "b", "c"] and cfg["type"] == "mlp" and cfg["top_k"] == 2
    assert cfg["mode"] == "topk" and cfg["temperature"] == 0.5 and cfg["pooling"] == "mean"
    assert set(cfg["adapters"]) == {"a", "b", "c"} and not Path(cfg["adapters"]["a"]).is_absolute()
    back = load_router(tmp_path / "router", ["a", "b", "c"])
    x = torch.randn(5, 32)
    with torch.no_grad():
        assert torch.allclose(back(x), r(x))
    assert Path(back.adapter_paths["a"]) == Path(setup[1]["a"]).resolve()
    with pytest.raises(RouterError, match=r"routes over adapters \[a, b, c\] but was given \[a, b, d\] "
                                          r"\(missing: c; unexpected: d\)"):
        load_router(tmp_path / "router", ["a", "b", "d"])
    with pytest.raises(RouterError, match="unexpected: z"):
        load_router(tmp_path / "router", ["a", "b", "c", "z"])
    load_router(tmp_path / "router", ["a", "b", "c", "z"], allow_extra=True)
    with pytest.raises(RouterError, match="not a router folder"):
        load_router(tmp_path / "nowhere")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "router.json").write_text("{nope")
    with pytest.raises(RouterError, match="not valid JSON"):
        load_router(tmp_path / "bad")
    # moe(ROUTER_DIR) over a plex that lacks the experts: they are loaded from the recorded paths
    fresh = loraplex.load(copy.deepcopy(setup[0]))
    comp = build_composition(fresh, f"moe('{tmp_path / 'router'}')")
    assert isinstance(comp, RoutedModel) and set(fresh.adapters) == {"a", "b", "c"}
    # a plex whose adapters differ cannot run it
    other = loraplex.load(copy.deepcopy(setup[0]), adapters={"a": str(setup[1]["a"])})
    with pytest.raises(RouterError, match="missing: b, c"):
        build_composition(other, f"moe('{tmp_path / 'router'}')", load_missing=False)
    # token-gated routers save and load too
    gm = GatedModel.new(plex, ["a", "b"])
    save_router(gm.router, tmp_path / "gated")
    assert type(load_router(tmp_path / "gated", ["a", "b"])).__name__ == "TokenGatedRouter"


# ------------------------------------------------------------------------------------------- build_composition
def test_build_composition_covers_the_grammar(setup, tmp_path):
    plex = make_plex(setup)
    ids = ids_of(2, 5)
    with torch.no_grad():
        assert torch.allclose(build_composition(plex, "a")(ids).logits, plex(ids, adapters="a").logits)
        assert torch.allclose(build_composition(plex, "base")(ids).logits, plex(ids, adapters=None).logits)
        assert torch.allclose(build_composition(plex, "blend(a=0.7,b=0.3)")(ids).logits,
                              plex(ids, adapters={"a": 0.7, "b": 0.3}).logits, atol=ATOL)
        assert torch.allclose(build_composition(plex, "stack(a,b)")(ids).logits,
                              plex(ids, adapters={"a": 1, "b": 1}).logits, atol=ATOL)
        assert isinstance(build_composition(plex, "stack(a,b,mode=inlayer)"), InLayerStack)
        assert isinstance(build_composition(plex, "ensemble(a=0.5,b=0.5)"), LogitEnsemble)
        merged = build_composition(plex, "merge(linear;a=0.5,b=0.5)")
        # an exact (cat) linear merge equals the delta-level blend
        assert torch.allclose(merged(ids).logits, plex(ids, adapters={"a": 0.5, "b": 0.5}).logits, atol=1e-4)
    save_router(_router(["a", "b"], 32), tmp_path / "r")
    rm = build_composition(plex, f"moe('{tmp_path / 'r'}',top_k=2)")
    assert isinstance(rm, RoutedModel) and rm.top_k == 2 and rm.mode == "topk"
    assert isinstance(build_composition(plex, "auto", routers={"auto": str(tmp_path / "r")}), RoutedModel)
    with pytest.raises(LoraplexError, match="needs a router"):
        build_composition(plex, "auto")
    with pytest.raises(LoraplexError):
        build_composition(plex, "blend(a=1,zz=1)")


# ------------------------------------------------------------------------------------------- routing pass details
def test_routing_pass_early_exit_equals_hidden_states(setup):
    from loraplex.compose.features import routing_pass

    plex = make_plex(setup)
    ids = ids_of(3, 7)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        hs = setup[0](input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    calls = []
    h = plex.layers["model.layers.1.self_attn.q_proj"].register_forward_hook(lambda *a: calls.append(1))
    for layer in (0, 1, -1):
        got = routing_pass(plex, ids, mask, "mean", layer)
        want = F.pool_hidden(hs[layer], mask, "mean")
        assert torch.allclose(got, want, atol=1e-5), layer
    h.remove()
    assert len(calls) == 1  # layers 0 and 1 stop before block 1 runs; only the full pass reaches it
    assert torch.allclose(routing_pass(plex, ids, mask, "last"), hs[-1][:, -1], atol=1e-5)


def test_grouped_generation_returns_rows_in_caller_order(setup):
    plex = make_plex(setup)
    ids = ids_of(6, 5, seed=11)
    rm = RoutedModel(plex, _router(["a", "b", "c"], 32, seed=2))
    routing = rm.route(ids)
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_scores=True)
    grouped = rm.generate(ids, routing=routing, **kw)
    plain = rm.generate(ids, routing=routing, group_rows=False, **kw)
    assert torch.equal(grouped.sequences, plain.sequences)
    for a, b in zip(grouped.scores, plain.scores):
        assert torch.allclose(a, b, atol=1e-5)


def test_noise_only_in_training_and_router_validation():
    torch.manual_seed(0)
    r = Router(["a", "b"], 8, noisy_gating=True)
    x = torch.randn(4, 8)
    r.eval()
    l1, g1 = r.gates(x)
    l2, g2 = r.gates(x)
    assert torch.equal(g1.probs, g2.probs)
    r.train()
    _, g3 = r.gates(x)
    assert not torch.allclose(g3.probs, g1.probs)
    with pytest.raises(RouterError, match="top_k"):
        Router(["a", "b"], 8, top_k=3)
    with pytest.raises(RouterError, match="distinct"):
        Router(["a", "a"], 8)
    with pytest.raises(RouterError, match="unknown router type"):
        Router(["a", "b"], 8, type="transformer")
    with pytest.raises(RouterError, match=r"features \[N, 8\]"):
        r(torch.randn(2, 5))


# ------------------------------------------------------------------------------------------- more modes, by hand
def test_all_experts_mode_is_one_expanded_batch(setup):
    """'All experts in parallel': each row expanded to all K experts in ONE forward; outputs then selected (top-1),
    weighted (routing probabilities) or returned as [N, K, ...]."""
    plex = make_plex(setup)
    ids = ids_of(5, 6, seed=12)
    r = _router(["a", "b", "c"], 32, seed=3)
    rm = RoutedModel(plex, r)
    calls = []
    h = plex.model.register_forward_hook(lambda m, a, o: calls.append(int(o.logits.shape[0])))
    with torch.no_grad():
        every = rm.all_experts(ids, combine="none")
    h.remove()
    assert calls == [5 * 3] and every.shape == (5, 3, 6, VOCAB)  # one forward over N x K rows
    with torch.no_grad():
        for i in range(5):
            for k, name in enumerate("abc"):
                want = dense_model(setup, plex, {name: 1.0})(input_ids=ids[i:i + 1]).logits[0]
                assert torch.allclose(every[i, k], want, atol=ATOL), (i, name)
        routing = rm.route(ids)
        top = routing.probs.argmax(-1)
        assert torch.allclose(rm.all_experts(ids, combine="select", routing=routing), every[torch.arange(5), top])
        soft = RoutedModel(plex, r, mode="soft")
        p = soft.route(ids).probs
        weighted = soft.all_experts(ids, combine="weighted")
    assert torch.allclose(weighted, sum(p[:, k, None, None] * every[:, k] for k in range(3)), atol=ATOL)
    with pytest.raises(LoraplexError, match="combine must be"):
        rm.all_experts(ids, combine="mean")


def test_token_gated_mode_equals_per_token_hand_reference(setup):
    """Per-token, per-layer gates (X-LoRA / MoLE): in every gated layer ``y = W x + sum_k g_k(x) D_k x`` with
    ``g(x) = softmax(x W_l + b_l)`` -- checked against forward hooks written here, with random gate weights so every
    token gets its own mixture."""
    plex = make_plex(setup)
    gm = GatedModel.new(plex, ["a", "b", "c"])
    torch.manual_seed(4)
    with torch.no_grad():
        for lin in gm.router.gates_by_layer.values():
            lin.weight.normal_(0, 2.0)
            lin.bias.normal_(0, 1.0)
    ids = ids_of(3, 7, seed=13)
    model = copy.deepcopy(setup[0])
    deltas = [hand_deltas(setup[1][n]) for n in "abc"]
    zero = {}
    for mod in gm.router.layer_dims:
        lin_gate = gm.router.gates_by_layer[gm.router._keys[mod]]
        target = model.get_submodule(mod)
        ds = [d.get(mod, torch.zeros_like(target.weight)) for d in deltas]

        def hook(m, args, y, lin_gate=lin_gate, ds=ds):
            x = args[0]
            g = torch.softmax(x @ lin_gate.weight.t() + lin_gate.bias, -1)  # [N, L, K]
            return y + sum(g[..., k:k + 1] * (x @ ds[k].t()) for k in range(3))

        target.register_forward_hook(hook)
    gm.record_gates = True
    with torch.no_grad():
        got = gm(ids).logits
        want = model(input_ids=ids).logits
    assert torch.allclose(got, want, atol=ATOL), (got - want).abs().max()
    g = next(iter(gm.last_gates.values()))
    assert g.shape == (3, 7, 3) and (g.max(-1).values - g.min(-1).values).std() > 0  # gates differ per token
    with torch.no_grad():
        assert not torch.allclose(got, plex(ids, adapters={"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}).logits, atol=1e-4)


def test_collapse_threshold_is_strictly_more_than_twice_fair():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # exactly 2x the fair share (1/4) is not collapse
        assert L.warn_collapse([0.5, 0.25, 0.125, 0.125], list("abcd")) == []
    with pytest.warns(RouterCollapseWarning, match="'a' takes 51%"):
        L.warn_collapse([0.51, 0.25, 0.12, 0.12], list("abcd"))
    with pytest.warns(RouterCollapseWarning, match="'d' receives no rows"):
        L.warn_collapse([0.4, 0.3, 0.3, 0.0], list("abcd"))


def test_routed_serving_warns_on_collapse_and_is_deterministic(setup):
    plex = make_plex(setup)
    ids = ids_of(6, 5, seed=14)
    r = Router(["a", "b", "c"], 32, noise_std=5.0, dropout=0.5)
    with torch.no_grad():
        r.head[-1].bias.copy_(torch.tensor([50.0, 0.0, 0.0]))  # everything to 'a'
    r.train()  # left in training mode: serving must still be noise- and dropout-free
    rm = RoutedModel(plex, r, warn_on_collapse=True)
    with pytest.warns(RouterCollapseWarning) as rec:
        first = rm.route(ids)
    msgs = [str(w.message) for w in rec]
    assert any("'a' takes 100%" in m for m in msgs) and any("'b' receives no rows" in m for m in msgs)
    assert r.training  # the router's mode is restored
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RouterCollapseWarning)
        again = [rm.route(ids).logits for _ in range(3)]
    assert all(torch.equal(first.logits, lg) for lg in again)
    assert first.top1 == ["a"] * 6
