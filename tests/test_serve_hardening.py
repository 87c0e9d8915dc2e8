"""Hostile and careless request bodies against the real servers over loopback (uvicorn on a thread): every client
error is an OpenAI-shaped JSON 400 (or 413 past the body limit), never a plain-text 500, and a huge prompt being
tokenized or refused never stalls ``/health``. Completion server: a tiny Llama with MiniLM's tokenizer; encoder
server: MiniLM with one PEFT task adapter."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from conftest import minilm_model, minilm_path

import loraplex
from loraplex.serve import Engine, ServerThread, create_app, create_classify_app
from loraplex.serve.http import PREFIX_CHARS_PER_TOKEN, lone_surrogate, parse_json_object, tokens_over_limit
from loraplex.serve.testing import peft_adapters, task_adapters, tiny_llama

TOKEN = "hardening-token"
MAX_PROMPT = 64
DEEP = b"[" * 100_000 + b"]" * 100_000
LONE = b'"a \\ud800 b"'  # a JSON string with an unpaired surrogate escape
PAIR = b'"a \\ud83d\\ude00 b"'  # a valid surrogate pair: an emoji

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread (conftest)


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hardening")
    base = tiny_llama(tmp / "base")
    root = tmp / "adapters"
    peft_adapters(base, root, ["ad0"])
    plex = loraplex.load(base, adapters={"ad0": root / "ad0"})
    engine = Engine(plex, max_batch_size=4, batch_window_ms=2, max_prompt_tokens=MAX_PROMPT, max_tokens_cap=200)
    app = create_app(engine, admin_token=TOKEN, adapter_roots=[str(root)])
    small = create_app(engine, max_body_bytes=1000)
    with ServerThread(app) as srv, ServerThread(small) as small_srv:
        with httpx.Client(base_url=srv.url, timeout=120) as client:
            yield {"client": client, "url": srv.url, "small": small_srv.url, "engine": engine, "plex": plex}
    engine.close()


@pytest.fixture(scope="module")
def enc(tmp_path_factory):
    from transformers import AutoTokenizer

    from loraplex.tasks import load_encoder_plex

    tmp = tmp_path_factory.mktemp("hardening_enc")
    paths = task_adapters(tmp / "adapters", {"intent": ("classification", ["a", "b", "c"])})
    plex = load_encoder_plex(minilm_model(), paths, tokenizer=AutoTokenizer.from_pretrained(minilm_path()))
    app = create_classify_app(plex, base_id="minilm", max_length=32)
    small = create_classify_app(plex, base_id="minilm", max_body_bytes=1000)
    with ServerThread(app) as srv, ServerThread(small) as small_srv:
        with httpx.Client(base_url=srv.url, timeout=120) as client:
            yield {"client": client, "url": srv.url, "small": small_srv.url}
    for a in (app, small):
        a.state.batcher.close()


def error_of(r: httpx.Response, status: int) -> dict:
    """The OpenAI-shaped error of a JSON answer with ``status``."""
    assert r.status_code == status, (r.status_code, r.text[:300])
    assert r.headers["content-type"].startswith("application/json"), r.headers["content-type"]
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"} and err["message"]
    return err


def post_raw(client: httpx.Client, path: str, body: bytes, **headers: str) -> httpx.Response:
    return client.post(path, content=body, headers={"content-type": "application/json", **headers})


# --------------------------------------------------------------------------- bodies: pure functions
def test_parse_json_object_refuses_each_kind_of_bad_body():
    from loraplex.serve.http import ApiError

    cases = {b"": "empty", b"[1]": "JSON object", b'{"a": ': "malformed", DEEP: "nested too deeply",
             b'{"seed": ' + b"9" * 5000 + b"}": "invalid JSON value", b'{"x": ' + LONE + b"}": "surrogate",
             b'{"m": [{"c": ' + LONE + b"}]}": "m.0.c"}
    for raw, words in cases.items():
        with pytest.raises(ApiError) as info:
            parse_json_object(raw)
        assert info.value.status == 400 and words in info.value.message, (raw[:40], info.value.message)
    assert parse_json_object(b'{"x": ' + PAIR + b"}") == {"x": "a \U0001f600 b"}
    assert lone_surrogate({"a": ["ok", {"b": "x\ud800"}]}) == "a.1.b"
    assert lone_surrogate({"a": "\U0001f600"}) is None


def test_tokens_over_limit_tokenizes_only_a_prefix_and_never_refuses_a_short_text():
    seen = []

    def count(s: str) -> int:  # one token per word, as a whitespace tokenizer
        seen.append(len(s))
        return len(s.split())

    limit = 10
    assert tokens_over_limit(count, "w " * 80, limit) is None and not seen  # short: tokenized whole, later
    over = tokens_over_limit(count, "w " * 1_000_000, limit)
    assert over is not None and over > limit
    assert seen == [(limit + 1) * PREFIX_CHARS_PER_TOKEN - 1]  # the prefix, cut at its last space
    sparse = ("w" + " " * 100) * 10_000  # long but few tokens: no verdict from the prefix
    assert tokens_over_limit(count, sparse, limit) is None


# --------------------------------------------------------------------------- the completion server
def test_deep_nesting_is_a_json_400_on_every_endpoint(gen, enc):
    c = gen["client"]
    for path in ("/v1/completions", "/v1/chat/completions"):
        assert error_of(post_raw(c, path, DEEP), 400)["code"] == "invalid_json"
        body = b'{"model": "ad0", "prompt": ' + DEEP + b"}"
        assert "nested too deeply" in error_of(post_raw(c, path, body), 400)["message"]
    err = error_of(post_raw(c, "/v1/load_lora_adapter", DEEP, authorization=f"Bearer {TOKEN}"), 400)
    assert err["code"] == "invalid_json"
    for path in ("/v1/classify", "/v1/embeddings"):
        assert error_of(post_raw(enc["client"], path, DEEP), 400)["code"] == "invalid_json"
    assert c.get("/health").json()["status"] == "ok"


def test_lone_surrogate_is_a_json_400_naming_the_field(gen, enc):
    c = gen["client"]
    err = error_of(post_raw(c, "/v1/completions", b'{"model": "ad0", "prompt": ' + LONE + b"}"), 400)
    assert err["code"] == "invalid_unicode" and err["param"] == "prompt" and "surrogate" in err["message"]
    body = b'{"model": "ad0", "messages": [{"role": "user", "content": ' + LONE + b"}]}"
    err = error_of(post_raw(c, "/v1/chat/completions", body), 400)
    assert err["param"] == "messages" and "messages.0.content" in err["message"]
    for path in ("/v1/classify", "/v1/embeddings"):
        body = b'{"model": "intent", "input": ["fine", ' + LONE + b"]}"
        err = error_of(post_raw(enc["client"], path, body), 400)
        assert err["param"] == "input" and "input.1" in err["message"]
    # a valid surrogate pair is text like any other
    r = post_raw(c, "/v1/completions", b'{"model": "ad0", "max_tokens": 2, "prompt": ' + PAIR + b"}")
    assert r.status_code == 200, r.text
    r = post_raw(enc["client"], "/v1/classify", b'{"model": "intent", "input": ' + PAIR + b"}")
    assert r.status_code == 200, r.text


def test_max_tokens_null_means_the_default(gen):
    c = gen["client"]
    body = {"model": "ad0", "prompt": "hello world", "temperature": 0, "ignore_eos": True}
    r_null = c.post("/v1/completions", json={**body, "max_tokens": None})
    r_default = c.post("/v1/completions", json=body)
    r_16 = c.post("/v1/completions", json={**body, "max_tokens": 16})
    for r in (r_null, r_default, r_16):
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 16
    assert r_null.json()["choices"][0]["text"] == r_16.json()["choices"][0]["text"]
    assert error_of(c.post("/v1/completions", json={**body, "max_tokens": "many"}), 400)["code"] == "invalid_request"


def test_seeds_of_any_size_are_reduced_mod_2_64(gen):
    c = gen["client"]

    def sample(seed: int, n: int = 1) -> list[str]:
        r = c.post("/v1/completions", json={"model": "ad0", "prompt": "once upon a time", "max_tokens": 6,
                                            "temperature": 1.0, "seed": seed, "n": n, "ignore_eos": True})
        assert r.status_code == 200, r.text
        return [ch["text"] for ch in r.json()["choices"]]

    assert sample(2**64 + 5) == sample(5)
    assert sample(2**63 + 1) == sample(2**63 + 1 - 2**64)  # above int64: the same seed as its negative twin
    assert sample(2**64 - 1, n=2) == [sample(2**64 - 1)[0], sample(0)[0]]  # seed + choice index wraps too
    assert sample(7) != sample(8)
    body = b'{"model": "ad0", "prompt": "x", "seed": ' + b"9" * 5000 + b"}"  # past Python's int digit limit
    assert error_of(post_raw(c, "/v1/completions", body), 400)["code"] == "invalid_json"


def test_body_limit_is_a_json_413(gen, enc):
    big = {"model": "ad0", "prompt": "word " * 400}
    for url, path in ((gen["small"], "/v1/completions"), (gen["small"], "/v1/chat/completions"),
                      (enc["small"], "/v1/classify")):
        err = error_of(httpx.post(url + path, json=big, timeout=60), 413)
        assert err["code"] == "request_too_large" and "at most 1000 bytes" in err["message"]

    def chunks():  # no content-length: the limit holds on the bytes actually sent
        for _ in range(10):
            yield b" " * 200
    r = httpx.post(gen["small"] + "/v1/completions", content=chunks(), headers={"content-type": "application/json"},
                   timeout=60)
    assert error_of(r, 413)["code"] == "request_too_large"
    ok = httpx.post(gen["small"] + "/v1/completions", json={"model": "ad0", "prompt": "hi", "max_tokens": 2},
                    timeout=60)
    assert ok.status_code == 200, ok.text
    assert httpx.get(gen["small"] + "/health", timeout=10).json()["status"] == "ok"
    with pytest.raises(ValueError, match="max_body_bytes"):
        create_app(gen["engine"], max_body_bytes=0)


def test_long_prompts_and_many_prompts_are_refused_before_tokenizing(gen, enc):
    c = gen["client"]
    err = error_of(c.post("/v1/completions", json={"model": "ad0", "prompt": "word " * 600_000}), 400)
    assert err["code"] == "prompt_too_long" and "more than" in err["message"] and f"at most {MAX_PROMPT}" in err[
        "message"]  # refused on a prefix
    err = error_of(c.post("/v1/chat/completions", json={"model": "ad0", "messages": [
        {"role": "user", "content": "word " * 600_000}]}), 400)
    assert err["code"] == "prompt_too_long"
    err = error_of(c.post("/v1/completions", json={"model": "ad0", "prompt": ["hi"] * 10_000}), 400)
    assert err["code"] == "too_many_choices" and "10000 prompt(s)" in err["message"]
    err = error_of(enc["client"].post("/v1/classify", json={"model": "intent", "input": "word " * 600_000}), 400)
    assert err["code"] == "context_length_exceeded" and "more than" in err["message"]
    r = enc["client"].post("/v1/classify", json={"model": "intent", "input": "word " * 20_000, "truncate": True})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 32, r.text
    # a long prompt of few tokens is tokenized whole, then checked exactly
    sparse = "w" + " " * 200
    r = c.post("/v1/completions", json={"model": "ad0", "prompt": sparse * 20, "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == len(gen["plex"].tokenizer(sparse * 20)["input_ids"])


def test_health_answers_while_a_huge_prompt_is_tokenized_and_refused(gen):
    """A 3 MB prompt of few tokens per character passes the prefix check and is tokenized whole (about a second or
    more on one core): on a worker thread, so /health keeps answering meanwhile."""
    huge = ("w" + " " * 40) * 75_000  # ~3 MB, 75,002 tokens: over the limit only once tokenized whole
    out: dict = {}

    def send():
        t0 = time.monotonic()
        out["r"] = httpx.post(gen["url"] + "/v1/completions", json={"model": "ad0", "prompt": huge}, timeout=120)
        out["seconds"] = time.monotonic() - t0

    sender = threading.Thread(target=send)
    sender.start()
    latencies = []
    with httpx.Client(base_url=gen["url"], timeout=10) as probe:
        while sender.is_alive():
            t0 = time.monotonic()
            assert probe.get("/health").status_code == 200
            latencies.append(time.monotonic() - t0)
            time.sleep(0.02)
    sender.join()
    err = error_of(out["r"], 400)
    assert err["code"] == "prompt_too_long" and "75002 tokens" in err["message"]
    assert len(latencies) >= 3, (latencies, out["seconds"])  # the probes ran while the big request was in flight
    assert max(latencies) < 1.0, (max(latencies), out["seconds"])


def crashing_app(method: str):
    """A bare app of the shared HTTP layer whose ``/boom`` route raises (no-op request metering)."""
    from loraplex.serve.http import new_app

    class Metrics:
        class requests:
            @staticmethod
            def inc(**_):
                pass

    app = new_app(title="t", description="t", metrics=Metrics())

    @app.api_route("/boom", methods=[method])
    async def boom():
        raise RuntimeError("kaboom")

    return app


def test_an_unexpected_exception_is_a_json_500(gen):
    from fastapi.testclient import TestClient

    app = crashing_app("GET")

    r = TestClient(app, raise_server_exceptions=False).get("/boom")
    err = error_of(r, 500)
    assert err["code"] == "internal_error" and "RuntimeError: kaboom" in err["message"]


def test_in_process_asgi_call_answers_a_crash_in_openai_shape():
    """The Ray replica runs the app in-process (distributed.asgi.call): a crash is the app's own JSON 500, and an
    app that dies before answering gets the OpenAI-shaped error of its exception."""
    import asyncio
    import json

    from loraplex.distributed.asgi import call
    from loraplex.errors import UnknownAdapterError
    app = crashing_app("POST")

    async def bare(scope, receive, send):  # an ASGI app that raises before sending anything
        raise UnknownAdapterError("zz", ["a", "b"])

    async def collect(target):
        items = [item async for item in call(target, "POST", "/boom", b"{}")]
        return items[0], json.loads(b"".join(items[1:]))

    (status, ctype), body = asyncio.run(collect(app))
    assert status == 500 and ctype == "application/json" and body["error"]["code"] == "internal_error"
    (status, _), body = asyncio.run(collect(bare))
    assert status == 404 and body["error"]["code"] == "model_not_found" and body["error"]["known_models"] == ["a", "b"]
