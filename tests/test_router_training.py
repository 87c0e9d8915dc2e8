"""Router training (supervised, LM-loss labels, joint), the pipeline stack, and ``loraplex route``."""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch

import loraplex
from loraplex.compose import (Pipeline, RoutedModel, Router, RouterCollapseWarning, RouterTrainConfig,
                              build_composition, expert_logits, fit_router, lm_loss_matrix, load_router,
                              train_joint, train_supervised)
from loraplex.compose.blend import causal_lm_loss
from loraplex.compose.train_router import compute_features
from conftest import make_peft_adapter, minilm_path, tiny_llama

TARGETS = ["q_proj", "v_proj", "o_proj"]

CODE = ["def {0}(x):\n    return x + {1}", "for {0} in range({1}):\n    print({0})", "import os\n{0} = os.path.join('a', '{1}')",
        "class {0}:\n    def __init__(self):\n        self.v = {1}"]
PROSE = ["The {0} walked slowly to the market on day {1}.", "Many people believe the {0} is older than {1} years.",
         "In the morning, the {0} read a long letter about {1} gardens.", "She said the {0} would arrive after {1} weeks."]
WORDS = ["alpha", "river", "stone", "cloud", "maple", "tiger", "ocean", "piano", "lemon", "comet"]


def texts(kind: list[str], n: int, seed: int) -> list[str]:
    rnd = random.Random(seed)
    return [rnd.choice(kind).format(rnd.choice(WORDS), rnd.randint(2, 99)) for _ in range(n)]



pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread (conftest)

@pytest.fixture(scope="module")
def text_setup(tmp_path_factory):
    """A tiny Llama sized to MiniLM's tokenizer (vocab 30522) saved with that tokenizer, and two PEFT adapters."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("route")
    tok = AutoTokenizer.from_pretrained(minilm_path())
    base = tiny_llama(vocab_size=tok.vocab_size, pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id,
                      eos_token_id=tok.sep_token_id, max_position_embeddings=128)
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    paths = {n: make_peft_adapter(base, root / n, seed=30 + i, r=4, lora_alpha=16, target_modules=TARGETS,
                                  task_type="CAUSAL_LM") for i, n in enumerate(["code", "prose"])}
    return root, base, tok, paths


def plex_of(text_setup) -> loraplex.Plex:
    root, base, tok, paths = text_setup
    return loraplex.load(copy.deepcopy(base), adapters={n: str(p) for n, p in paths.items()}, tokenizer=tok)


def encode(tok, rows: list[str]):
    enc = tok(rows, padding=True, truncation=True, max_length=32, return_tensors="pt", add_special_tokens=False)
    return enc["input_ids"], enc["attention_mask"]


def test_supervised_router_learns_domains_and_logs(text_setup):
    plex = plex_of(text_setup)
    rows = texts(CODE, 40, 0) + texts(PROSE, 40, 1)
    labels = ["code"] * 40 + ["prose"] * 40
    ids, mask = encode(plex.tokenizer, rows)
    vrows = texts(CODE, 10, 2) + texts(PROSE, 10, 3)
    vids, vmask = encode(plex.tokenizer, vrows)
    router = Router(["code", "prose"], 32)
    logs = []
    res = fit_router(plex, router, input_ids=ids, attention_mask=mask, labels=labels,
                     val={"input_ids": vids, "attention_mask": vmask, "labels": ["code"] * 10 + ["prose"] * 10},
                     config=RouterTrainConfig(epochs=25, lr=0.05, batch_size=16), log=logs.append)
    assert len(res.history) == 25 and logs[-1] is res.final
    assert res.final.accuracy >= 0.95 and res.final.val_accuracy >= 0.9
    assert set(res.final.shares) == {"code", "prose"} and abs(sum(res.final.shares.values()) - 1) < 1e-3
    assert 0 <= res.final.entropy <= 0.7
    assert "acc=" in res.final.line()
    # routed top-1 on held-out rows runs the chosen adapter
    rm = RoutedModel(plex, router)
    with torch.no_grad():
        rm(vids, vmask)
    assert rm.last_routing.top1[:10].count("code") >= 9


def test_collapse_is_warned_during_training():
    feats = torch.randn(40, 8)
    labels = torch.zeros(40, dtype=torch.long)  # everything to expert 0
    with pytest.warns(RouterCollapseWarning):
        res = train_supervised(Router(["a", "b", "c"], 8), feats, labels,
                               config=RouterTrainConfig(epochs=20, lr=0.1, load_balance="none"))
    assert any("receives no rows" in p for p in res.final.problems)


def test_lm_loss_matrix_is_one_expanded_batch_and_labels_lowest_loss(text_setup):
    plex = plex_of(text_setup)
    rows = texts(CODE, 3, 5) + texts(PROSE, 3, 6)
    ids, mask = encode(plex.tokenizer, rows)
    calls = []
    h = plex.model.register_forward_hook(lambda m, a, o: calls.append(1))
    m = lm_loss_matrix(plex, ["code", "prose", None], ids, mask, batch_rows=16)
    h.remove()
    assert len(calls) == 1 and m.shape == (6, 3)
    with torch.no_grad():
        for k, name in enumerate(["code", "prose", None]):
            want = causal_lm_loss(plex(ids, adapters=name, attention_mask=mask).logits, ids, mask, per_row=True)
            assert torch.allclose(m[:, k], want, atol=1e-5)
    router = Router(["code", "prose"], 32)
    res = fit_router(plex, router, input_ids=ids, attention_mask=mask, objective="lm_loss",
                     config=RouterTrainConfig(epochs=5, lr=0.05))
    assert torch.equal(res.labels, res.loss_matrix.argmin(-1))


@pytest.mark.parametrize("mode,top_k", [("soft", 1), ("topk", 2), ("top1", 1)])
def test_joint_training_updates_router_and_adapters(text_setup, mode, top_k):
    plex = plex_of(text_setup)
    rows = texts(CODE, 8, 7) + texts(PROSE, 8, 8)
    ids, mask = encode(plex.tokenizer, rows)
    router = Router(["code", "prose"], 32, mode=mode, top_k=top_k)
    before_router = [p.detach().clone() for p in router.parameters()]
    before_ad = plex.get_adapter("code").modules["model.layers.0.self_attn.q_proj"].B.clone()
    with torch.no_grad():
        loss0 = causal_lm_loss(RoutedModel(plex, router, mode="soft")(ids, mask).logits, ids, mask)
    res = train_joint(RoutedModel(plex, router), ids, mask, labels=torch.tensor([0] * 8 + [1] * 8),
                      config=RouterTrainConfig(epochs=3, lr=0.05, adapter_lr=5e-3, batch_size=8))
    assert len(res.history) == 3
    assert any(not torch.equal(a, b) for a, b in zip(before_router, router.parameters()))
    after_ad = plex.get_adapter("code").modules["model.layers.0.self_attn.q_proj"].B
    assert not torch.equal(before_ad, after_ad)  # committed back to the bank
    with torch.no_grad():
        loss1 = causal_lm_loss(RoutedModel(plex, router, mode="soft")(ids, mask).logits, ids, mask)
    assert loss1 < loss0
    assert plex.plan_state.overrides is None and plex.plan_state.plan is None  # nothing left set on this thread
    assert all(layer.stacks()[0] is layer.lora_A for layer in plex.layers.values())


def test_pipeline_returns_each_stage(text_setup):
    plex = plex_of(text_setup)
    prompts = ["def add(x):", "the river is"]
    pipe = Pipeline(plex, ["code", "prose"], "rewrite: {output} ({input})", max_new_tokens=4, add_special_tokens=False,
                    do_sample=False)
    res = pipe.run(prompts)
    assert [s.adapter for s in res.stages] == ["code", "prose"]
    assert res.stages[0].prompts == prompts
    assert res.stages[1].prompts == [f"rewrite: {o} ({p})" for o, p in zip(res.stages[0].outputs, prompts)]
    assert res.outputs == res.stages[1].outputs

    def alone(adapter, prompt):  # each stage equals its adapter generating for that prompt alone
        ids = plex.tokenizer([prompt], return_tensors="pt", add_special_tokens=False)["input_ids"]
        out = plex.generate(ids, adapters=adapter, max_new_tokens=4, do_sample=False,
                            pad_token_id=plex.tokenizer.pad_token_id)
        return plex.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()

    for i, p in enumerate(prompts):
        assert res.stages[0].outputs[i] == alone("code", p)
        assert res.stages[1].outputs[i] == alone("prose", res.stages[1].prompts[i])
    comp = build_composition(plex, "stack(code,prose,mode=pipeline)", max_new_tokens=2, add_special_tokens=False)
    assert isinstance(comp, Pipeline) and len(comp.generate(prompts).stages) == 2
    with pytest.raises(loraplex.LoraplexError, match="template"):
        Pipeline(plex, ["code", "prose"], "{nope}").run(["x"])


def test_route_cli_trains_and_saves(text_setup, tmp_path):
    from typer.testing import CliRunner

    from loraplex.cli import app

    root, _, _, paths = text_setup
    data = tmp_path / "rows.jsonl"
    with open(data, "w") as fh:
        for t in texts(CODE, 30, 10):
            fh.write(json.dumps({"text": t, "label": "py"}) + "\n")
        for t in texts(PROSE, 30, 11):
            fh.write(json.dumps({"text": t, "label": "prose"}) + "\n")
    out = tmp_path / "router"
    args = ["route", "--base", str(root / "base"), "--adapter", f"code={paths['code']}", "--adapter",
            f"prose={paths['prose']}", "--data", str(data), "--label-map", "py=code", "--router-type", "mlp",
            "--hidden-size", "16", "--top-k", "1", "--epochs", "20", "--lr", "0.05", "--out", str(out)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "held-out routing accuracy" in res.output and "| code |" in res.output
    r = load_router(out, ["code", "prose"])
    assert r.type == "mlp" and json.loads((out / "router.json").read_text())["metrics"]["val_accuracy"] >= 0.9
    no_map = [a for a in args if a not in ("--label-map", "py=code")]
    bad = CliRunner().invoke(app, no_map)
    assert bad.exit_code == 2 and "label 'py' names no expert" in bad.output
    assert not (tmp_path / "r2").exists()


def test_hashed_ngrams_are_deterministic_normalised_counts():
    from loraplex.compose.features import hashed_ngrams

    f = hashed_ngrams(["abab", "", "abab"], dim=64, orders=(1, 2))
    assert f.shape == (3, 64)
    assert torch.equal(f[0], f[2]) and torch.count_nonzero(f[1]) == 0
    # "abab": unigrams a:2, b:2; bigrams ab:2, ba:1 -> counts before normalising (hash collisions add up)
    import zlib

    expect = torch.zeros(64)
    for g, c in {"a": 2, "b": 2, "ab": 2, "ba": 1}.items():
        expect[zlib.crc32(g.encode()) % 64] += c
    assert torch.allclose(f[0], expect / expect.norm())


def test_ngram_router_routes_raw_texts_and_round_trips(text_setup, tmp_path):
    """An ``ngram`` router needs no routing pass; it keeps no standardisation (unseen buckets stay 0)."""
    from loraplex.compose import save_router
    from loraplex.compose.train_router import new_router

    plex = plex_of(text_setup)
    rows = texts(CODE, 40, 0) + texts(PROSE, 40, 1)
    labels = ["code"] * 40 + ["prose"] * 40
    router = new_router(plex, ["code", "prose"], pooling="ngram")
    assert router.in_dim == 1 << 16 and router.uses_texts
    res = fit_router(plex, router, texts=rows, labels=labels, config=RouterTrainConfig(epochs=20, lr=0.05))
    assert res.final.accuracy == 1.0
    assert torch.count_nonzero(router.feature_mean) == 0 and torch.all(router.feature_std == 1)
    held = texts(CODE, 10, 5) + texts(PROSE, 10, 6)
    rm = RoutedModel(plex, router)
    assert rm.route(texts=held).choices() == ["code"] * 10 + ["prose"] * 10
    save_router(router, tmp_path / "r", adapters=text_setup[3])
    again = load_router(tmp_path / "r", expected=["code", "prose"])
    assert again.pooling == "ngram" and RoutedModel(plex, again).route(texts=held).choices() == \
        ["code"] * 10 + ["prose"] * 10
