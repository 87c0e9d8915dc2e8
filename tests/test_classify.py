"""The encoder server over HTTP on loopback (uvicorn on a thread), on the real MiniLM with three task adapters with
different heads (3-label and 4-label sequence tasks, a BIO token task) and a headless adapter, all made with PEFT:
/v1/classify per task equals PEFT's own model, `auto` returns the router's choice and that adapter's output,
entity offsets map back to the text, /v1/embeddings equals a hand-computed mean-pool, batching across concurrent
clients, models/health/metrics, every error case, and `loraplex serve` on an encoder base or config."""

from __future__ import annotations

import base64
import json
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
from conftest import make_peft_adapter, minilm_model, minilm_path

from loraplex.errors import AdapterError
from loraplex.serve import ServerThread, create_classify_app
from loraplex.serve.labels import bio_entities
from loraplex.serve.testing import task_adapters
from loraplex.tasks import load_encoder_plex
from loraplex.tokens import first_token_per_word, split_words, token_words

BIO = ["O", "B-EMAIL", "I-EMAIL", "B-DATE", "I-DATE"]
TASKS = {
    "intent": ("classification", ["billing", "travel", "support"]),
    "sentiment": ("classification", ["very_neg", "neg", "pos", "very_pos"]),
    "entities": ("token_classification", BIO),
}
TEXTS = [
    "I want to book a flight to Paris next Monday",
    "this product is terrible, I want a refund",
    "Contact bob@example.com or visit https://example.org/help before 2024-01-31.",
    "Version 2.4.1 fixed the crash in /usr/lib/libfoo.so",
    "hello",
    "Café naïve résumé — 3,000 users, don't panic!!",
]
WORD = re.compile(r"\w+|[^\w\s]")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread (conftest)


# --------------------------------------------------------------------------- independent references (PEFT)
def peft_task_model(task: str, n_labels: int, path: Path) -> torch.nn.Module:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification
    from transformers.utils import logging as hf_logging

    cls = AutoModelForSequenceClassification if task == "classification" else AutoModelForTokenClassification
    hf_logging.set_verbosity_error()
    try:
        model = cls.from_pretrained(minilm_path(), num_labels=n_labels)
    finally:
        hf_logging.set_verbosity_warning()
    return PeftModel.from_pretrained(model, str(path)).eval()


def ref_scores(env, name: str, text: str) -> torch.Tensor:
    """Softmax of PEFT's logits for ``text`` alone."""
    with torch.no_grad():
        logits = env["peft"][name](**env["tok"](text, return_tensors="pt")).logits[0]
    return torch.softmax(logits, -1)


def ref_entities(env, name: str, text: str) -> list[dict]:
    """Entities by an independent path: words by regex, tokenized pre-split (word_ids), PEFT's token logits, tag of
    each word's first sub-token, BIO spans -> character offsets of the words."""
    labels = TASKS[name][1]
    spans = [m.span() for m in WORD.finditer(text)]
    enc = env["tok"]([text[s:e] for s, e in spans], is_split_into_words=True, return_tensors="pt")
    with torch.no_grad():
        probs = torch.softmax(env["peft"][name](**enc).logits[0], -1)
    tags, seen = [None] * len(spans), set()
    for pos, w in enumerate(enc.word_ids()):
        if w is not None and w not in seen:
            seen.add(w)
            tags[w] = labels[int(probs[pos].argmax())]
    ents: list[dict] = []
    for (s, e), tag in zip(spans, tags):
        if tag == "O":
            cur = None
            continue
        kind, label = tag.split("-", 1)
        if kind == "B" or not ents or cur is None or cur["label"] != label:
            cur = {"label": label, "start": s, "end": e}
            ents.append(cur)
        cur["end"] = e
    for ent in ents:
        ent["text"] = text[ent["start"]:ent["end"]]
    return ents


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).float()
    v = (hidden * m).sum(1) / m.sum(1)
    return v / v.norm(dim=-1, keepdim=True)


class FixedRouter:
    """A router with ``route_texts``: 'refund' -> sentiment, '@' -> entities, else intent."""

    def route_texts(self, texts):
        return ["sentiment" if "refund" in t else "entities" if "@" in t else "intent" for t in texts]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from transformers import AutoTokenizer

    from loraplex.compose.moe import RoutedModel
    from loraplex.compose.router import build_router

    tmp = tmp_path_factory.mktemp("classify")
    paths = task_adapters(tmp / "adapters", TASKS)
    paths["plain"] = make_peft_adapter(minilm_model(), tmp / "adapters" / "plain", seed=7, r=4, lora_alpha=8,
                                       target_modules=["query", "value"])
    tok = AutoTokenizer.from_pretrained(minilm_path())
    plex = load_encoder_plex(minilm_model(), paths, tokenizer=tok)
    torch.manual_seed(3)
    router = build_router(list(TASKS), 384, pooling="mean")
    with torch.no_grad():  # spread the random router so the test texts do not all pick one expert
        router.head[-1].weight.mul_(40.0)
    routed = RoutedModel(plex, router)
    app = create_classify_app(plex, router=routed, base_id="minilm", max_batch_size=16, batch_window_ms=30)
    bare = create_classify_app(plex, base_id="minilm", max_length=32)  # no router; short max_length
    fixed = create_classify_app(plex, router=FixedRouter(), base_id="minilm")
    peft = {n: peft_task_model(t, len(labels), paths[n]) for n, (t, labels) in TASKS.items()}
    with ServerThread(app) as srv, ServerThread(bare) as bare_srv, ServerThread(fixed) as fixed_srv:
        with httpx.Client(base_url=srv.url, timeout=120) as client:
            yield {"plex": plex, "tok": tok, "paths": paths, "tmp": tmp, "url": srv.url, "client": client,
                   "bare": bare_srv.url, "fixed": fixed_srv.url, "routed": routed, "peft": peft, "app": app}
    for a in (app, bare, fixed):
        a.state.batcher.close()


def post(env, body, path="/v1/classify", url=None):
    if url is None:
        return env["client"].post(path, json=body)
    return httpx.post(url + path, json=body, timeout=120)


def assert_matches_reference(env, name, text, item):
    task, labels = TASKS[name]
    assert item["task"] == task and item["head"] == name and item["served_by"] == [name]
    if task == "classification":
        want = ref_scores(env, name, text)
        assert item["label"] == labels[int(want.argmax())]
        assert item["score"] == pytest.approx(float(want.max()), abs=1e-5)
        assert set(item["scores"]) == set(labels)
        for i, lab in enumerate(labels):
            assert item["scores"][lab] == pytest.approx(float(want[i]), abs=1e-5), (name, text, lab)
        assert list(item["scores"].values()) == sorted(item["scores"].values(), reverse=True)
    else:
        got = [{k: e[k] for k in ("label", "start", "end", "text")} for e in item["entities"]]
        assert got == ref_entities(env, name, text)


# --------------------------------------------------------------------------- each task == PEFT
@pytest.mark.parametrize("name", list(TASKS))
def test_classify_each_task_equals_peft(env, name):
    r = post(env, {"model": name, "input": TEXTS})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["model"] == name and len(body["data"]) == len(TEXTS)
    assert body["x_loraplex"]["served_by"] == [[name]] * len(TEXTS)
    assert body["usage"]["prompt_tokens"] == sum(len(env["tok"](t)["input_ids"]) for t in TEXTS)
    for i, (text, item) in enumerate(zip(TEXTS, body["data"])):
        assert item["index"] == i
        assert_matches_reference(env, name, text, item)


def test_entities_found_and_offsets_map_back(env):
    r = post(env, {"model": "entities", "input": TEXTS})
    n_multiword = 0
    for text, item in zip(TEXTS, r.json()["data"]):
        for ent in item["entities"]:
            assert text[ent["start"]:ent["end"]] == ent["text"]
            assert ent["label"] in ("EMAIL", "DATE") and 0 < ent["score"] <= 1
            words = [m.span() for m in WORD.finditer(text)]
            assert ent["start"] in {s for s, _ in words} and ent["end"] in {e for _, e in words}
            n_multiword += len(WORD.findall(ent["text"])) > 1
    assert n_multiword > 0  # the random head tags runs of words: spans cover several words


def test_top_k_limits_the_scores(env):
    r = post(env, {"model": "sentiment", "input": TEXTS[1], "top_k": 2})
    item = r.json()["data"][0]
    want = ref_scores(env, "sentiment", TEXTS[1])
    top = torch.topk(want, 2)
    assert list(item["scores"]) == [TASKS["sentiment"][1][i] for i in top.indices.tolist()]
    assert list(item["scores"].values()) == pytest.approx(top.values.tolist(), abs=1e-5)


# --------------------------------------------------------------------------- pure span helpers
def test_bio_entities_from_word_tags():
    text = "Mail bob@x.org on 2024-01-31, ok"
    words = split_words(text)
    assert [text[s:e] for s, e in words] == ["Mail", "bob", "@", "x", ".", "org", "on", "2024", "-", "01", "-",
                                             "31", ",", "ok"]
    tags = ["O", "B-EMAIL", "I-EMAIL", "I-EMAIL", "I-EMAIL", "I-EMAIL", "O", "B-DATE", "I-DATE", "I-DATE", "I-DATE",
            "I-DATE", "O", "I-DATE"]
    ents = bio_entities(text, words, [(t, 0.5) for t in tags])
    assert [(e["label"], e["text"], e["start"], e["end"]) for e in ents] == [
        ("EMAIL", "bob@x.org", 5, 14), ("DATE", "2024-01-31", 18, 28), ("DATE", "ok", 30, 32)]
    # B- after B- starts a new entity; I- of another type too
    ents = bio_entities(text, words[:4], [("B-EMAIL", 1.0), ("B-EMAIL", 1.0), ("I-DATE", 1.0), ("I-DATE", 1.0)])
    assert [(e["label"], e["text"]) for e in ents] == [("EMAIL", "Mail"), ("EMAIL", "bob"), ("DATE", "@x")]


def test_first_tokens_use_the_offset_mapping(env):
    text = "Café naïve: bob@x.org"
    enc = env["tok"](text, return_offsets_mapping=True)
    words = split_words(text)
    firsts = first_token_per_word(token_words(enc["offset_mapping"], words), len(words))
    toks = enc.tokens()
    assert [toks[t] for t in firsts] == ["cafe", "naive", ":", "bob", "@", "x", ".", "org"]
    # truncation: words past the last token have none
    enc = env["tok"](text, return_offsets_mapping=True, truncation=True, max_length=4)
    assert first_token_per_word(token_words(enc["offset_mapping"], words), len(words))[:3] == [1, 2, None]


# --------------------------------------------------------------------------- auto
def test_auto_returns_the_router_choice_and_its_output(env):
    routed, tok = env["routed"], env["tok"]
    want = []
    for t in TEXTS:
        enc = tok([t], return_tensors="pt")
        want.append(routed.route(enc["input_ids"], enc["attention_mask"], texts=[t]).choices()[0])
    assert len(set(want)) >= 2, want  # the test router spreads the texts over several experts
    r = post(env, {"model": "auto", "input": TEXTS})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["x_loraplex"]["served_by"] == [[w] for w in want]
    for text, name, item in zip(TEXTS, want, body["data"]):
        assert_matches_reference(env, name, text, item)


def test_auto_with_a_route_texts_router(env):
    r = post(env, {"model": "auto", "input": TEXTS[:3]}, url=env["fixed"])
    body = r.json()
    assert body["x_loraplex"]["served_by"] == [["intent"], ["sentiment"], ["entities"]]
    for text, name, item in zip(TEXTS[:3], ["intent", "sentiment", "entities"], body["data"]):
        assert_matches_reference(env, name, text, item)


# --------------------------------------------------------------------------- batching across clients
def test_concurrent_clients_with_different_adapters_share_batches(env):
    batcher = env["app"].state.batcher
    hist = batcher.metrics.batch_size
    before_n, before_rows = hist.count(phase="encode"), _hist_sum(batcher.metrics, "encode")
    jobs = [(list(TASKS)[i % 3], TEXTS[i % len(TEXTS)]) for i in range(18)]

    def one(job):
        name, text = job
        return job, httpx.post(env["url"] + "/v1/classify", json={"model": name, "input": text}, timeout=120)

    with ThreadPoolExecutor(9) as pool:
        results = list(pool.map(one, jobs))
    for (name, text), r in results:
        assert r.status_code == 200, r.text
        assert_matches_reference(env, name, text, r.json()["data"][0])
    forwards = hist.count(phase="encode") - before_n
    rows = _hist_sum(batcher.metrics, "encode") - before_rows
    assert rows == len(jobs) and forwards < len(jobs)  # rows of different clients shared forwards


def _hist_sum(metrics, phase):
    with metrics.batch_size._lock:
        got = metrics.batch_size._values.get((phase,))
    return got[1] if got else 0.0


def test_a_mixed_batch_row_by_row_equals_each_adapter_alone(env):
    """The batcher's one forward (three tasks + base + a blend) against the plex running each row alone."""
    from loraplex.serve.encode import EncoderBatcher

    plex, tok = env["plex"], env["tok"]
    choices = ["intent", "entities", None, "sentiment", {"sentiment": 0.5, "plain": 0.5}, "intent"]
    batcher = EncoderBatcher(plex, max_batch_size=16, batch_window_ms=0, start=False)
    rows = [(tok(t)["input_ids"], c, t, False) for t, c in zip(TEXTS, choices)]
    futures = batcher.submit_many(rows)
    batcher._run(batcher._take())  # exactly one batch, on this thread
    got = [f.result(0) for f in futures]
    assert batcher.metrics.batch_size.count(phase="encode") == 1
    for (ids, c, _, _), res in zip(rows, got):
        with torch.no_grad():
            alone = plex(torch.tensor([ids]), adapters=[c])
        assert res.head == alone.heads[0]
        if alone.logits[0] is None:
            assert res.logits is None
        else:
            torch.testing.assert_close(res.logits, alone.logits[0].float(), atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(res.embedding, alone.embeddings[0], atol=2e-5, rtol=1e-4)
    assert got[4].head == "sentiment" and got[4].served_by == ["sentiment", "plain"]


# --------------------------------------------------------------------------- embeddings
def test_embeddings_match_a_hand_computed_mean_pool(env):
    from peft import PeftModel

    tok = env["tok"]
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        base = minilm_model()
        want_base = mean_pool(base(**enc).last_hidden_state, enc["attention_mask"])
        want_plain = mean_pool(PeftModel.from_pretrained(minilm_model(), str(env["paths"]["plain"])).eval()(
            **enc).last_hidden_state, enc["attention_mask"])
        want_sent = mean_pool(env["peft"]["sentiment"].base_model.model.bert(**enc).last_hidden_state,
                              enc["attention_mask"])
    for model, want in (("minilm", want_base), ("plain", want_plain), ("sentiment", want_sent)):
        r = post(env, {"model": model, "input": TEXTS}, path="/v1/embeddings")
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "list" and [d["index"] for d in body["data"]] == list(range(len(TEXTS)))
        got = torch.tensor([d["embedding"] for d in body["data"]])
        assert got.shape == (len(TEXTS), 384)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        assert body["x_loraplex"]["served_by"] == [[] if model == "minilm" else [model]] * len(TEXTS)
    # token ids in, base64 out
    ids = tok(TEXTS[0])["input_ids"]
    r = post(env, {"model": "minilm", "input": ids, "encoding_format": "base64"}, path="/v1/embeddings")
    vec = torch.frombuffer(bytearray(base64.b64decode(r.json()["data"][0]["embedding"])), dtype=torch.float32)
    torch.testing.assert_close(vec, want_base[0], atol=1e-5, rtol=1e-4)


def test_embeddings_with_the_openai_client(env):
    client = openai.OpenAI(base_url=env["url"] + "/v1", api_key="unused", max_retries=0)
    got = client.embeddings.create(model="sentiment", input=TEXTS[:2])
    direct = post(env, {"model": "sentiment", "input": TEXTS[:2]}, path="/v1/embeddings").json()
    for a, b in zip(got.data, direct["data"]):
        assert a.embedding == pytest.approx(b["embedding"], abs=1e-6)
    with pytest.raises(openai.NotFoundError, match="unknown adapter 'nope'"):
        client.embeddings.create(model="nope", input="x")


# --------------------------------------------------------------------------- info endpoints
def test_models_health_metrics(env):
    c = env["client"]
    cards = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
    assert set(cards) == {"minilm", "intent", "sentiment", "entities", "plain", "auto"}
    for name, (task, labels) in TASKS.items():
        assert cards[name]["x_loraplex_task"] == {"task": task, "labels": labels}
        assert cards[name]["parent"] == "minilm"
    assert cards["plain"]["x_loraplex_task"] is None
    assert c.get("/v1/models/entities").json()["x_loraplex_task"]["labels"] == BIO
    h = c.get("/health").json()
    assert h["status"] == "ok" and h["adapters"] == 4 and h["heads"] == 3 and h["max_length"] == 512

    def value(name, adapter):
        m = re.search(rf'^{name}{{adapter="{adapter}"}} (\S+)$', c.get("/metrics").text, re.M)
        return float(m.group(1)) if m else 0.0

    before = value("loraplex_classify_requests_total", "sentiment"), value("loraplex_classify_inputs_total",
                                                                            "sentiment")
    post(env, {"model": "sentiment", "input": TEXTS[:3]})
    assert value("loraplex_classify_requests_total", "sentiment") == before[0] + 1
    assert value("loraplex_classify_inputs_total", "sentiment") == before[1] + 3
    text = c.get("/metrics").text
    assert 'loraplex_requests_total{endpoint="/v1/classify",status="200"}' in text
    assert "loraplex_cache_resident_adapters" in text and 'loraplex_embedding_requests_total{adapter="' in text


# --------------------------------------------------------------------------- errors
def test_text_too_long(env):
    long = "word " * 40  # 42 tokens > max_length 32 of the bare server
    r = post(env, {"model": "intent", "input": ["ok", long]}, url=env["bare"])
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded" and err["param"] == "input"
    assert err["message"] == ('input[1] has 42 tokens; this server accepts at most 32 tokens per input (max_length); '
                              'send "truncate": true to cut longer inputs')
    r = post(env, {"model": "intent", "input": long}, path="/v1/embeddings", url=env["bare"])
    assert r.status_code == 400 and "at most 32 tokens" in r.json()["error"]["message"]
    # with truncation: the first 32 tokens are classified
    r = post(env, {"model": "intent", "input": long, "truncate": True}, url=env["bare"])
    assert r.status_code == 200
    cut = env["tok"].decode(env["tok"](long, truncation=True, max_length=32)["input_ids"], skip_special_tokens=True)
    assert r.json()["data"][0]["scores"] == pytest.approx(post(env, {"model": "intent", "input": cut}).json()[
        "data"][0]["scores"], abs=1e-5)
    # the default limit is the model's 512 positions
    r = post(env, {"model": "intent", "input": "word " * 600})
    assert r.status_code == 400 and "at most 512 tokens" in r.json()["error"]["message"]


def test_adapter_without_head(env):
    r = post(env, {"model": "plain", "input": "hello"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "no_task_head" and err["param"] == "model"
    assert err["message"].startswith("adapter 'plain' has no task head")
    assert err["adapters_with_heads"] == ["entities", "intent", "sentiment"]
    r = post(env, {"model": "minilm", "input": "hello"})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("the base model 'minilm' has no task head")
    # ... but the headless adapter embeds fine
    assert post(env, {"model": "plain", "input": "hello"}, path="/v1/embeddings").status_code == 200
    # a blend whose first weighted adapter has a head is served by that head
    r = post(env, {"model": "blend(plain=0.5,intent=0.5)", "input": TEXTS[0]})
    assert r.status_code == 200 and r.json()["data"][0]["head"] == "intent"
    assert r.json()["x_loraplex"]["served_by"] == [["plain", "intent"]]


def test_unknown_adapter_lists_known_names(env):
    r = post(env, {"model": "nope", "input": "hello"})
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["code"] == "model_not_found" and err["param"] == "model"
    assert err["message"] == "unknown adapter 'nope'; known adapters: auto, entities, intent, minilm, plain, sentiment"
    assert err["known_models"] == ["auto", "entities", "intent", "minilm", "plain", "sentiment"]
    r = post(env, {"model": "blend(intent=0.5,nope=0.5)", "input": "hello"})
    assert r.status_code == 404 and "'nope'" in r.json()["error"]["message"]


def test_request_errors(env):
    r = env["client"].post("/v1/classify", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = post(env, {"model": "intent", "input": []})
    assert r.status_code == 400 and r.json()["error"]["message"] == "input must not be empty"
    r = post(env, {"model": "intent", "input": "x", "top_k": 0})
    assert r.status_code == 400 and "top_k" in r.json()["error"]["message"]
    r = post(env, {"model": "auto", "input": "x"}, url=env["bare"])
    assert r.status_code == 400 and r.json()["error"]["code"] == "no_router"
    r = post(env, {"model": "minilm", "input": [999999]}, path="/v1/embeddings")
    assert r.status_code == 400 and "outside the vocabulary" in r.json()["error"]["message"]
    r = post(env, {"model": "minilm", "input": "x", "dimensions": 16}, path="/v1/embeddings")
    assert r.status_code == 400 and r.json()["error"]["param"] == "dimensions"


def test_label_set_that_does_not_fit_the_head_fails_at_load(env, tmp_path):
    from loraplex.serve.classify import build_classify_server

    bad = tmp_path / "bad"
    shutil.copytree(env["paths"]["intent"], bad)
    (bad / "loraplex_meta.json").write_text(json.dumps({"task": "classification", "labels": ["yes", "no"]}))
    msg = "adapter 'bad': head has 3 outputs but loraplex_meta.json lists 2 labels"
    with pytest.raises(AdapterError, match=re.escape(msg)):
        env["plex"].add_adapter("bad", bad)
    assert "bad" not in env["plex"].adapters
    with pytest.raises(AdapterError, match=re.escape(msg)):
        build_classify_server(base=minilm_path(), adapters={"bad": str(bad)})
    (bad / "loraplex_meta.json").write_text(json.dumps({"task": "regression", "labels": ["x"]}))
    with pytest.raises(AdapterError, match="'task' must be one of"):
        build_classify_server(base=minilm_path(), adapters={"bad": str(bad)})


# --------------------------------------------------------------------------- loraplex serve
def test_serve_cli_builds_the_classify_server_for_an_encoder(env, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import loraplex.serve.server as server_mod
    from loraplex.cli import app as cli_app
    from loraplex.serve.classify import is_encoder_base
    from loraplex.serve.testing import tiny_llama

    assert is_encoder_base(minilm_path()) and not is_encoder_base(tiny_llama(tmp_path / "llama"))
    seen = {}

    def fake_run(app, **kw):  # serve one request in-process instead of listening
        from fastapi.testclient import TestClient

        with TestClient(app) as client:
            seen["classify"] = client.post("/v1/classify", json={"model": "intent", "input": TEXTS[0]}).json()
            seen["big"] = client.post("/v1/classify", json={"model": "intent", "input": "x" * 2**20})

    monkeypatch.setattr(server_mod, "serve", fake_run)
    args = ["serve", "--base", minilm_path(), "--adapter", f"intent={env['paths']['intent']}", "--max-body-mb", "1"]
    res = CliRunner().invoke(cli_app, args)
    assert res.exit_code == 0, res.output
    assert seen["big"].status_code == 413 and seen["big"].json()["error"]["code"] == "request_too_large"
    assert_matches_reference(env, "intent", TEXTS[0], seen["classify"]["data"][0])
    bad = tmp_path / "bad"
    shutil.copytree(env["paths"]["intent"], bad)
    (bad / "loraplex_meta.json").write_text(json.dumps({"task": "classification", "labels": ["yes"]}))
    res = CliRunner().invoke(cli_app, ["serve", "--base", minilm_path(), "--adapter", f"bad={bad}"])
    assert res.exit_code == 2 and "head has 3 outputs but loraplex_meta.json lists 1 labels" in res.output


def test_serve_an_encoder_training_config(env, tmp_path):
    import yaml

    from loraplex.serve.cli import build_engine_from_config

    out = tmp_path / "run"
    for name in TASKS:
        shutil.copytree(env["paths"][name], out / "adapters" / name)
    data = tmp_path / "d.csv"
    data.write_text("text,label\nhello,billing\n")
    cfg = {"base_model": minilm_path(), "model_type": "encoder", "output_dir": str(out),
           "adapters": {"adapters": {n: {"type": "lora", "r": 4, "alpha": 8, "target_modules": ["query", "value"],
                                         "task": t, "dataset": str(data)} for n, (t, _) in TASKS.items()}}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    batcher, registry, app = build_engine_from_config(path)
    try:
        with ServerThread(app) as srv:
            r = httpx.post(srv.url + "/v1/classify", json={"model": "sentiment", "input": TEXTS[1]}, timeout=60)
            assert_matches_reference(env, "sentiment", TEXTS[1], r.json()["data"][0])
        assert set(registry.known()) == {registry.base_id, *TASKS}
    finally:
        batcher.close()


def test_in_process_app_as_the_demo_uses_it(env):
    """``create_classify_app(plex, router=...)`` under TestClient: serves, and closes its own worker at shutdown."""
    from fastapi.testclient import TestClient

    app = create_classify_app(env["plex"], router=FixedRouter())
    with TestClient(app) as client:
        r = client.post("/v1/classify", json={"model": "auto", "input": [TEXTS[2], TEXTS[1]]})
        assert r.status_code == 200 and r.json()["x_loraplex"]["served_by"] == [["entities"], ["sentiment"]]
        assert app.state.batcher.alive
    assert not app.state.batcher.alive


# --------------------------------------------------------------------------- admin endpoints, hang-ups
def test_admin_load_replace_unload_on_the_encoder_server(env, tmp_path):
    root = env["tmp"] / "adapters"
    plex = load_encoder_plex(minilm_model(), {"intent": env["paths"]["intent"]}, tokenizer=env["tok"])
    app = create_classify_app(plex, base_id="minilm", admin_token="s3cret", adapter_roots=[str(root)])
    auth = {"Authorization": "Bearer s3cret"}
    outside = tmp_path / "elsewhere"
    shutil.copytree(env["paths"]["sentiment"], outside)
    try:
        with ServerThread(app) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
            load = {"lora_name": "sentiment", "lora_path": str(env["paths"]["sentiment"])}
            r = c.post("/v1/load_lora_adapter", json=load)
            assert r.status_code == 401 and r.json()["error"]["code"] == "missing_token"
            r = c.post("/v1/load_lora_adapter", json={**load, "lora_path": str(outside)}, headers=auth)
            assert r.status_code == 403 and r.json()["error"]["param"] == "lora_path"
            r = c.post("/v1/classify", json={"model": "sentiment", "input": TEXTS[1]})
            assert r.status_code == 404
            r = c.post("/v1/load_lora_adapter", json=load, headers=auth)
            assert r.status_code == 200 and r.json()["status"] == "loaded", r.text
            item = c.post("/v1/classify", json={"model": "sentiment", "input": TEXTS[1]}).json()["data"][0]
            assert_matches_reference(env, "sentiment", TEXTS[1], item)  # the head came with the adapter
            card = c.get("/v1/models/sentiment").json()
            assert card["x_loraplex_task"] == {"task": "classification", "labels": TASKS["sentiment"][1]}
            assert c.post("/v1/load_lora_adapter", json=load, headers=auth).status_code == 409
            swap = {"lora_name": "sentiment", "lora_path": str(env["paths"]["intent"]), "replace": True}
            r = c.post("/v1/load_lora_adapter", json=swap, headers=auth)
            assert r.status_code == 200 and r.json()["replaced"] is True
            item = c.post("/v1/classify", json={"model": "sentiment", "input": TEXTS[0]}).json()["data"][0]
            assert set(item["scores"]) == set(TASKS["intent"][1])  # now the intent head, under the new name
            want = c.post("/v1/classify", json={"model": "intent", "input": TEXTS[0]}).json()["data"][0]
            assert item["scores"] == pytest.approx(want["scores"], abs=1e-6)
            r = c.post("/v1/unload_lora_adapter", json={"lora_name": "sentiment"}, headers=auth)
            assert r.status_code == 200 and r.json()["status"] == "unloaded"
            assert "sentiment" not in plex.adapters
            assert c.post("/v1/classify", json={"model": "sentiment", "input": TEXTS[1]}).status_code == 404
            assert "sentiment" not in [m["id"] for m in c.get("/v1/models").json()["data"]]
            r = c.post("/v1/unload_lora_adapter", json={"lora_name": "sentiment"}, headers=auth)
            assert r.status_code == 404 and "intent" in r.json()["error"]["message"]
            text = c.get("/metrics").text
            assert 'loraplex_adapter_loads_total{adapter="sentiment",result="ok"} 2' in text
            assert 'loraplex_adapter_loads_total{adapter="sentiment",result="refused"} 1' in text
            assert 'loraplex_adapter_unloads_total{adapter="sentiment",result="ok"} 1' in text
    finally:
        app.state.batcher.close()
    closed = create_classify_app(plex, base_id="minilm")  # no token: the admin endpoints are off
    try:
        with ServerThread(closed) as srv:
            r = httpx.post(srv.url + "/v1/unload_lora_adapter", json={"lora_name": "intent"}, headers=auth)
            assert r.status_code == 403 and r.json()["error"]["code"] == "admin_disabled"
            assert "intent" in plex.adapters
    finally:
        closed.state.batcher.close()


def test_a_client_that_hangs_up_has_its_queued_rows_skipped(env):
    import threading
    import time

    plex = load_encoder_plex(minilm_model(), {"intent": env["paths"]["intent"]}, tokenizer=env["tok"])
    app = create_classify_app(plex, base_id="minilm", batch_window_ms=0)
    batcher = app.state.batcher
    gate = threading.Event()
    try:
        with ServerThread(app) as srv:
            blocker = threading.Thread(target=lambda: batcher.call_on_worker(lambda: gate.wait(30)))
            blocker.start()  # the worker is busy: the next request's rows wait in the queue
            tokens = batcher.metrics.prompt_tokens.value()
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(srv.url + "/v1/classify", json={"model": "intent", "input": TEXTS[:3]}, timeout=0.5)
            deadline = time.monotonic() + 10
            while batcher.metrics.cancelled_requests.value() < 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert batcher.metrics.cancelled_requests.value() == 1
            gate.set()
            blocker.join(10)
            r = httpx.post(srv.url + "/v1/classify", json={"model": "intent", "input": TEXTS[4]}, timeout=60)
            assert r.status_code == 200
            n_ids = len(env["tok"](TEXTS[4])["input_ids"])
            assert batcher.metrics.prompt_tokens.value() - tokens == n_ids  # the three hung-up rows never ran
    finally:
        gate.set()
        batcher.close()
