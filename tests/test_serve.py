"""The real server over HTTP on loopback (uvicorn on a thread): OpenAI endpoints, mixed-adapter bursts, streaming,
admin load/unload under traffic, auth and path confinement, every error case, and the official openai client."""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

import loraplex
from loraplex.serve import Engine, ModelRegistry, ServerThread, create_app
from loraplex.serve.testing import peft_adapters, tiny_llama

TOKEN = "s3cret-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
NAMES = ["ad0", "ad1", "ad2", "ad3"]
PROMPTS = ["hello world", "the quick brown fox jumps over the lazy dog", "a", "python is a programming language",
           "once upon a time there was", "numbers 1 2 3 4 5 6 7"]
ADAPTER_TEMPLATE = "<<{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} | {% endfor %}>>"


class KeywordRouter:
    """Stands in for the MoE router: code-ish prompts -> ad1, everything else -> an even blend of ad2 and ad3."""

    def route_texts(self, texts):
        return ["ad1" if "code" in t else {"ad2": 0.5, "ad3": 0.5} for t in texts]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread (conftest)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve_http")
    base = tiny_llama(tmp / "base")
    root = tmp / "adapters"
    paths = peft_adapters(base, root, NAMES + ["hot", "hot2"])
    # a merge (registered adapter naming its parents), an adapter with its own chat template
    merged = loraplex.load_adapter(paths["ad0"], "merged_ab")
    merged.meta = {"parents": ["ad0", "ad1"], "combination_type": "linear"}
    loraplex.save_adapter(merged, root / "merged_ab")
    shutil.copytree(paths["ad3"], root / "templated")
    (root / "templated" / "chat_template.jinja").write_text(ADAPTER_TEMPLATE)
    # adapters that must be refused or fail
    outside = tmp / "outside"
    shutil.copytree(paths["ad1"], outside / "evil")
    os.symlink(outside / "evil", root / "link_out")
    (root / "broken").mkdir()
    (root / "broken" / "adapter_config.json").write_text("{not json")
    other_base = tiny_llama(tmp / "other_base", hidden=16, heads=2, kv_heads=1)
    peft_adapters(other_base, root, ["wrongshape"])

    plex = loraplex.load(base, max_slots=6)
    for n in NAMES + ["merged_ab", "templated"]:
        plex.add_adapter(n, root / n)
    engine = Engine(plex, max_batch_size=8, batch_window_ms=5, max_queue=64, max_prompt_tokens=64,
                    max_tokens_cap=2000)
    registry = ModelRegistry(plex, base_id="tiny-llama",
                             compositions={"mix": "blend(ad0=0.7,ad1=0.3)", "stacked": "stack(ad2,ad3)"},
                             ab_splits={"exp": {"ad0": 0.5, "ad1": 0.5}}, router=KeywordRouter(), seed=0)
    app = create_app(engine, registry, admin_token=TOKEN, adapter_roots=[str(root)], base_id="tiny-llama",
                     unload_timeout=30)
    bare = create_app(engine, ModelRegistry(plex, base_id="tiny-llama"))  # no router, no admin token
    with ServerThread(app) as srv, ServerThread(bare) as bare_srv:
        with httpx.Client(base_url=srv.url, timeout=60) as client:
            yield {"plex": plex, "engine": engine, "root": root, "tmp": tmp, "url": srv.url, "client": client,
                   "bare_url": bare_srv.url, "paths": paths, "app": app}
    engine.close()


# --------------------------------------------------------------------------- helpers
def ref_ids(env, choice, ids, n):
    """plex.generate greedy, on the engine's worker between two steps (never racing it)."""
    plex = env["plex"]

    def run():
        out = plex.generate(torch.tensor([ids]), adapters=choice, max_new_tokens=n, do_sample=False, pad_token_id=0)
        return out[0, len(ids):].tolist()
    return env["engine"].call_on_worker(run)


def ref_text(env, choice, prompt, n):
    tok = env["plex"].tokenizer
    return tok.decode(ref_ids(env, choice, tok(prompt).input_ids, n), skip_special_tokens=True)


def chat_ids(env, messages, template=None):
    tok = env["plex"].tokenizer
    text = tok.apply_chat_template(messages, chat_template=template, add_generation_prompt=True, tokenize=False)
    return tok(text, add_special_tokens=False).input_ids


def complete(env, model, prompt, max_tokens=12, **kw):
    r = env["client"].post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                                    "temperature": 0, **kw})
    assert r.status_code == 200, r.text
    return r.json()


def error_of(r, status):
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "code"} and err["message"]
    return err


def metric(text, name, **labels):
    lab = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pat = re.escape(name + (f"{{{lab}}}" if lab else "")) + r" ([0-9.e+-]+)"
    m = re.search(pat, text)
    return float(m.group(1)) if m else 0.0


def sse_events(lines):
    out = []
    for line in lines:
        if line.startswith("data: "):
            out.append(line[6:])
    return out


# --------------------------------------------------------------------------- generation equals plex.generate
def test_completion_per_adapter_equals_generate(env):
    choices = {"tiny-llama": None, "base": None, **{n: n for n in NAMES}, "merged_ab": "merged_ab",
               "mix": {"ad0": 0.7, "ad1": 0.3}, "stacked": {"ad2": 1.0, "ad3": 1.0},
               "blend(ad1=0.25,ad3=0.75)": {"ad1": 0.25, "ad3": 0.75}}
    for model, choice in choices.items():
        body = complete(env, model, PROMPTS[1], 14)
        assert body["object"] == "text_completion" and body["model"] == model
        assert body["choices"][0]["text"] == ref_text(env, choice, PROMPTS[1], 14), model
        assert body["usage"]["prompt_tokens"] == len(env["plex"].tokenizer(PROMPTS[1]).input_ids)
        served = body["x_loraplex"]["served_by"]
        expected = [] if choice is None else ([choice] if isinstance(choice, str) else list(choice))
        assert served == expected


def test_mixed_concurrent_burst_returns_each_adapters_output(env):
    models = ["tiny-llama", *NAMES, "merged_ab", "templated", "mix"]
    choice_of = {"tiny-llama": None, "mix": {"ad0": 0.7, "ad1": 0.3}}
    jobs = [(models[i % len(models)], PROMPTS[i % len(PROMPTS)], 4 + (i * 5) % 20) for i in range(32)]
    refs = [ref_text(env, choice_of.get(m, m), p, n) for m, p, n in jobs]
    decode_steps = env["engine"].metrics.batch_size.count(phase="decode")
    with ThreadPoolExecutor(16) as pool:
        bodies = list(pool.map(lambda j: complete(env, *j), jobs))
    for (m, p, n), body, ref in zip(jobs, bodies, refs):
        assert body["choices"][0]["text"] == ref, (m, p, n)
        assert body["model"] == m
    # fewer decode steps than requests x tokens: rows of different adapters shared forwards
    steps = env["engine"].metrics.batch_size.count(phase="decode") - decode_steps
    assert steps < sum(n for _, _, n in jobs)


def test_chat_uses_tokenizer_template_or_the_adapters_own(env):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "tell me a story"}]
    tok = env["plex"].tokenizer
    for model, template in [("ad1", None), ("templated", ADAPTER_TEMPLATE)]:
        r = env["client"].post("/v1/chat/completions", json={"model": model, "messages": msgs, "max_tokens": 10,
                                                             "temperature": 0})
        assert r.status_code == 200, r.text
        body = r.json()
        ids = chat_ids(env, msgs, template)
        assert body["object"] == "chat.completion"
        msg = body["choices"][0]["message"]
        assert msg["role"] == "assistant"
        assert msg["content"] == tok.decode(ref_ids(env, model, ids, 10), skip_special_tokens=True)
        assert body["usage"]["prompt_tokens"] == len(ids)
    # the adapter's template really differs from the tokenizer's
    assert chat_ids(env, msgs, ADAPTER_TEMPLATE) != chat_ids(env, msgs)


def test_streaming_chunks_join_to_non_streamed_text(env):
    for endpoint, payload in [
        ("/v1/completions", {"model": "ad2", "prompt": PROMPTS[3]}),
        ("/v1/chat/completions", {"model": "mix", "messages": [{"role": "user", "content": "hi there"}]}),
    ]:
        payload = {**payload, "max_tokens": 16, "temperature": 0}
        full = env["client"].post(endpoint, json=payload).json()
        with env["client"].stream("POST", endpoint, json={**payload, "stream": True,
                                                          "stream_options": {"include_usage": True}}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            events = sse_events(r.iter_lines())
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        usage = chunks[-1]["usage"]
        assert usage == full["usage"]
        pieces, finish = [], None
        for c in chunks[:-1]:
            ch = c["choices"][0]
            pieces.append(ch["delta"].get("content") or "" if "delta" in ch else ch["text"])
            finish = ch["finish_reason"] or finish
            assert c["x_loraplex"] == full["x_loraplex"]
        if "message" in full["choices"][0]:
            assert "".join(pieces) == full["choices"][0]["message"]["content"]
            assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        else:
            assert "".join(pieces) == full["choices"][0]["text"]
        assert finish == full["choices"][0]["finish_reason"]
        assert len([p for p in pieces if p]) > 1  # really incremental


def test_stop_sequences_and_multiple_choices(env):
    full = complete(env, "ad0", PROMPTS[1], 16)["choices"][0]["text"]
    stop = full.split()[2]
    body = complete(env, "ad0", PROMPTS[1], 16, stop=[stop])
    assert body["choices"][0]["text"] == full[:full.find(stop)]
    assert body["choices"][0]["finish_reason"] == "stop"
    multi = complete(env, "ad1", [PROMPTS[0], PROMPTS[2]], 8)
    assert [c["index"] for c in multi["choices"]] == [0, 1]
    assert [c["text"] for c in multi["choices"]] == [ref_text(env, "ad1", p, 8) for p in (PROMPTS[0], PROMPTS[2])]
    ids = env["plex"].tokenizer(PROMPTS[4]).input_ids
    by_ids = complete(env, "ad2", ids, 8)  # prompt as token ids
    assert by_ids["choices"][0]["text"] == ref_text(env, "ad2", PROMPTS[4], 8)
    sampled = complete(env, "ad2", PROMPTS[0], 8, temperature=1.0, seed=5, n=2)
    again = complete(env, "ad2", PROMPTS[0], 8, temperature=1.0, seed=5, n=2)
    assert [c["text"] for c in sampled["choices"]] == [c["text"] for c in again["choices"]]


def test_ab_split_reports_arm_and_serves_it(env):
    refs = {a: ref_text(env, a, PROMPTS[0], 8) for a in ("ad0", "ad1")}
    arms = []
    for _ in range(12):
        body = complete(env, "exp", PROMPTS[0], 8)
        arm = body["x_loraplex"]["arm"]
        assert body["x_loraplex"]["served_by"] == [arm]
        assert body["choices"][0]["text"] == refs[arm]
        arms.append(arm)
    assert set(arms) == {"ad0", "ad1"}
    sticky = {complete(env, "exp", PROMPTS[0], 2, user="user-42")["x_loraplex"]["arm"] for _ in range(5)}
    assert len(sticky) == 1


def test_auto_routes_per_request_and_needs_a_router(env):
    passes = len(env["app"].state.route_batches)
    code = complete(env, "auto", "some code please", 8)
    assert len(env["app"].state.route_batches) == passes + 1  # routed through the app's routing batcher
    assert code["x_loraplex"]["served_by"] == ["ad1"]
    assert code["choices"][0]["text"] == ref_text(env, "ad1", "some code please", 8)
    prose = complete(env, "auto", "a poem please", 8)
    assert prose["x_loraplex"]["served_by"] == ["ad2", "ad3"]
    assert prose["choices"][0]["text"] == ref_text(env, {"ad2": 0.5, "ad3": 0.5}, "a poem please", 8)
    r = httpx.post(env["bare_url"] + "/v1/completions", json={"model": "auto", "prompt": "x"}, timeout=30)
    assert "no router" in error_of(r, 400)["message"]


def test_models_lists_everything_with_parents(env):
    data = {m["id"]: m for m in env["client"].get("/v1/models").json()["data"]}
    assert data["tiny-llama"]["parent"] is None and data["tiny-llama"]["x_loraplex_kind"] == "base"
    for n in NAMES:
        assert data[n]["parent"] == "tiny-llama" and data[n]["x_loraplex_kind"] == "adapter"
    assert data["merged_ab"]["x_loraplex_kind"] == "merge" and data["merged_ab"]["parent"] == ["ad0", "ad1"]
    assert data["mix"]["x_loraplex_kind"] == "composition" and data["mix"]["parent"] == ["ad0", "ad1"]
    assert data["stacked"]["parent"] == ["ad2", "ad3"]
    assert data["exp"]["x_loraplex_kind"] == "ab_split" and data["exp"]["parent"] == ["ad0", "ad1"]
    assert "auto" in data
    assert env["client"].get("/v1/models/ad1").json()["id"] == "ad1"
    error_of(env["client"].get("/v1/models/nope"), 404)


# --------------------------------------------------------------------------- errors
def test_error_cases(env):
    c = env["client"]
    assert error_of(c.post("/v1/completions", content=b'{"model": "ad0", "prompt": ',
                           headers={"content-type": "application/json"}), 400)["code"] == "invalid_json"
    assert "JSON object" in error_of(c.post("/v1/completions", json=[1, 2]), 400)["message"]
    assert "empty" in error_of(c.post("/v1/completions", content=b""), 400)["message"]
    assert "prompt" in error_of(c.post("/v1/completions", json={"model": "ad0"}), 400)["message"]
    assert "messages" in error_of(c.post("/v1/chat/completions", json={"model": "ad0", "messages": []}),
                                  400)["message"]
    long_prompt = " ".join(["word"] * 100)
    err = error_of(c.post("/v1/completions", json={"model": "ad0", "prompt": long_prompt}), 400)
    assert err["code"] == "prompt_too_long" and "at most 64" in err["message"]
    err = error_of(c.post("/v1/completions", json={"model": "ad0", "prompt": "x", "max_tokens": 5000}), 400)
    assert err["code"] == "max_tokens_too_large" and "2000" in err["message"]
    error_of(c.post("/v1/completions", json={"model": "ad0", "prompt": "x", "max_tokens": 0}), 400)
    error_of(c.post("/v1/completions", json={"model": "ad0", "prompt": "x", "temperature": 7}), 400)
    error_of(c.post("/v1/completions", json={"model": "ad0", "prompt": "x", "top_p": 0}), 400)
    error_of(c.post("/v1/completions", json={"model": "ad0", "prompt": [1, 99999999]}), 400)
    assert error_of(c.post("/v1/completions", json={"model": "ad0", "prompt": "x", "logit_bias": {"3": 1}}),
                    400)["param"] == "logit_bias"
    error_of(c.post("/v1/completions", json={"model": "ad0", "prompt": "x", "n": 100}), 400)
    error_of(c.post("/v1/chat/completions", json={"model": "ad0", "messages": [{"role": "wizard",
                                                                                  "content": "x"}]}), 400)
    err = error_of(c.post("/v1/completions", json={"model": "nope", "prompt": "x"}), 404)
    assert err["code"] == "model_not_found"
    for name in ["ad0", "mix", "exp", "tiny-llama", "auto", "merged_ab"]:
        assert name in err["known_models"] and name in err["message"]
    assert "zzz" in error_of(c.post("/v1/completions", json={"model": "blend(ad0=1,zzz=1)", "prompt": "x"}),
                             404)["message"]
    error_of(c.post("/v1/completions", json={"model": "blend(ad0=heavy)", "prompt": "x"}), 400)
    error_of(c.get("/v1/nothing-here"), 404)
    assert c.get("/health").json()["status"] == "ok"


def test_queue_full_answers_429(env):
    plex = loraplex.load(env["tmp"] / "base", adapters={"ad0": env["root"] / "ad0"})
    eng = Engine(plex, max_queue=1, start=False)
    try:
        with ServerThread(create_app(eng)) as srv:
            out = {}
            first = threading.Thread(target=lambda: out.setdefault("r", httpx.post(
                srv.url + "/v1/completions", json={"model": "ad0", "prompt": "hi", "max_tokens": 3}, timeout=30)))
            first.start()
            deadline = time.monotonic() + 10
            while eng.queue_depth < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            r = httpx.post(srv.url + "/v1/completions", json={"model": "ad0", "prompt": "hi"}, timeout=30)
            assert error_of(r, 429)["code"] == "queue_full"
            health = httpx.get(srv.url + "/health", timeout=30)
            assert health.status_code == 503 and health.json()["queue_depth"] == 1  # worker not running yet
            eng.start()
            first.join(30)
            assert out["r"].status_code == 200
            assert httpx.get(srv.url + "/health", timeout=30).json()["status"] == "ok"
            assert metric(httpx.get(srv.url + "/metrics").text, "loraplex_requests_rejected_total",
                          reason="queue_full") == 1
    finally:
        eng.close()


def test_cancel_when_client_disconnects(env):
    eng = env["engine"]
    m = eng.metrics

    def cancelled():
        return m.finished.value(reason="cancelled")

    before, tokens_before = cancelled(), m.generation_tokens.value()
    payload = {"model": "ad3", "prompt": "hello", "max_tokens": 1900, "temperature": 0, "ignore_eos": True}
    with env["client"].stream("POST", "/v1/completions", json={**payload, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # hang up after the first chunk
    deadline = time.monotonic() + 20
    while cancelled() < before + 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert cancelled() == before + 1
    # non-streaming: the client times out and closes the connection
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(env["url"] + "/v1/completions", json=payload, timeout=0.3)
    while cancelled() < before + 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert cancelled() == before + 2
    while eng.running_count and time.monotonic() < deadline:
        time.sleep(0.02)
    assert eng.running_count == 0
    assert m.generation_tokens.value() - tokens_before < 2 * 1900


# --------------------------------------------------------------------------- admin
def test_admin_auth_and_path_confinement(env):
    c, root, tmp = env["client"], env["root"], env["tmp"]
    load = {"lora_name": "x1", "lora_path": str(root / "hot")}
    assert error_of(c.post("/v1/load_lora_adapter", json=load), 401)["code"] == "missing_token"
    assert error_of(c.post("/v1/load_lora_adapter", json=load, headers={"Authorization": "Bearer wrong"}),
                    401)["code"] == "invalid_token"
    error_of(c.post("/v1/load_lora_adapter", json=load, headers={"Authorization": f"Basic {TOKEN}"}), 401)
    error_of(c.post("/v1/unload_lora_adapter", json={"lora_name": "ad0"}), 401)
    for path in ["/etc", str(tmp / "outside" / "evil"), f"{root}/../outside/evil", str(root / "link_out")]:
        err = error_of(c.post("/v1/load_lora_adapter", json={"lora_name": "x1", "lora_path": path}, headers=AUTH),
                       403)
        assert err["code"] == "path_not_allowed"
    r = httpx.post(env["bare_url"] + "/v1/load_lora_adapter", json=load, headers=AUTH, timeout=30)
    assert error_of(r, 403)["code"] == "admin_disabled"
    assert "x1" not in env["plex"].bank


def test_failing_loads_report_and_server_stays_healthy(env):
    c, root = env["client"], env["root"]
    for path, needle in [(root / "broken", "not valid JSON"), (root / "wrongshape", "expects d_in")]:
        err = error_of(c.post("/v1/load_lora_adapter", json={"lora_name": "bad1", "lora_path": str(path)},
                              headers=AUTH), 400)
        assert err["code"] == "adapter_load_failed" and needle in err["message"], err
    err = error_of(c.post("/v1/load_lora_adapter", json={"lora_name": "bad1", "lora_path": str(root / "missing")},
                          headers=AUTH), 404)  # a missing folder inside the roots: 404, as vLLM answers
    assert err["code"] == "adapter_not_found" and "not found" in err["message"], err
    assert error_of(c.post("/v1/load_lora_adapter", json={"lora_name": "ad0", "lora_path": str(root / "hot")},
                           headers=AUTH), 409)["code"] == "adapter_exists"
    error_of(c.post("/v1/load_lora_adapter", json={"lora_name": "auto", "lora_path": str(root / "hot")},
                    headers=AUTH), 400)
    error_of(c.post("/v1/load_lora_adapter", content=b"{oops", headers=AUTH), 400)
    error_of(c.post("/v1/unload_lora_adapter", json={"lora_name": "never-loaded"}, headers=AUTH), 404)
    assert "bad1" not in env["plex"].bank
    assert c.get("/health").json()["status"] == "ok"
    assert complete(env, "ad1", PROMPTS[0], 6)["choices"][0]["text"] == ref_text(env, "ad1", PROMPTS[0], 6)


def test_load_and_unload_under_traffic(env):
    c, root = env["client"], env["root"]
    traffic_models = ["ad0", "ad1", "mix", "tiny-llama"]
    choice_of = {"mix": {"ad0": 0.7, "ad1": 0.3}, "tiny-llama": None}
    jobs = [(traffic_models[i % 4], PROMPTS[i % len(PROMPTS)], 6 + i % 10) for i in range(48)]
    refs = [ref_text(env, choice_of.get(m, m), p, n) for m, p, n in jobs]
    results: list = [None] * len(jobs)

    def traffic(k):
        for i in range(k, len(jobs), 4):
            results[i] = complete(env, *jobs[i])["choices"][0]["text"]

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(traffic, k) for k in range(4)]
        # load a new adapter while traffic flows, and use it
        r = c.post("/v1/load_lora_adapter", json={"lora_name": "hot", "lora_path": str(root / "hot")}, headers=AUTH)
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "loaded"
        assert "hot" in {m["id"] for m in c.get("/v1/models").json()["data"]}
        assert complete(env, "hot", PROMPTS[0], 8)["choices"][0]["text"] == ref_text(env, "hot", PROMPTS[0], 8)
        # unload it while a long request uses it: the unload waits, the request completes in full
        ids = env["plex"].tokenizer(PROMPTS[1]).input_ids
        long_ref = env["plex"].tokenizer.decode(ref_ids(env, "hot", ids, 400), skip_special_tokens=True)
        out: dict = {}

        def long_request():
            out["body"] = complete(env, "hot", PROMPTS[1], 400, ignore_eos=True)

        t = threading.Thread(target=long_request)
        t.start()
        deadline = time.monotonic() + 20
        while env["engine"]._in_use["hot"] == 0 and time.monotonic() < deadline:
            time.sleep(0.002)
        assert env["engine"]._in_use["hot"] == 1  # the unload below is sent while the request runs
        r = c.post("/v1/unload_lora_adapter", json={"lora_name": "hot"}, headers=AUTH)
        assert r.status_code == 200, r.text
        assert env["engine"]._in_use["hot"] == 0 and "hot" not in env["plex"].bank
        t.join(30)
        body = out["body"]  # ... and still completed in full, on its own adapter
        assert body["usage"]["completion_tokens"] == 400
        assert body["choices"][0]["text"].startswith(long_ref)
        err = error_of(c.post("/v1/completions", json={"model": "hot", "prompt": "x"}), 404)
        assert "hot" not in err["known_models"]
        for f in futures:
            f.result(60)
    assert results == refs  # no traffic request failed or got another adapter's output


def test_unload_timeout_is_409_and_replace_swaps(env):
    c, root, eng = env["client"], env["root"], env["engine"]
    assert c.post("/v1/load_lora_adapter", json={"lora_name": "hot2", "lora_path": str(root / "hot2")},
                  headers=AUTH).status_code == 200
    payload = {"model": "hot2", "prompt": "hello", "max_tokens": 1900, "temperature": 0, "ignore_eos": True,
               "stream": True}
    with c.stream("POST", "/v1/completions", json=payload) as r:
        deadline = time.monotonic() + 20
        while eng._in_use["hot2"] == 0 and time.monotonic() < deadline:
            time.sleep(0.002)
        err = error_of(c.post("/v1/unload_lora_adapter", json={"lora_name": "hot2", "timeout": 0.05},
                              headers=AUTH), 409)
        assert err["code"] == "adapter_busy"
        assert "hot2" in env["plex"].bank
    # the stream was closed (cancelled): now the unload goes through
    assert c.post("/v1/unload_lora_adapter", json={"lora_name": "hot2"}, headers=AUTH).status_code == 200
    # replace: same name, new weights, atomically
    assert c.post("/v1/load_lora_adapter", json={"lora_name": "swapme", "lora_path": str(root / "ad0")},
                  headers=AUTH).status_code == 200
    assert complete(env, "swapme", PROMPTS[2], 8)["choices"][0]["text"] == ref_text(env, "ad0", PROMPTS[2], 8)
    r = c.post("/v1/load_lora_adapter", json={"lora_name": "swapme", "lora_path": str(root / "ad2"),
                                              "replace": True}, headers=AUTH)
    assert r.status_code == 200 and r.json()["replaced"] is True
    assert complete(env, "swapme", PROMPTS[2], 8)["choices"][0]["text"] == ref_text(env, "ad2", PROMPTS[2], 8)
    assert c.post("/v1/unload_lora_adapter", json={"lora_name": "swapme"}, headers=AUTH).status_code == 200


# --------------------------------------------------------------------------- the official client
def test_openai_client(env):
    client = openai.OpenAI(base_url=env["url"] + "/v1", api_key="x", max_retries=0, timeout=60)
    ids = {m.id for m in client.models.list()}
    assert {"tiny-llama", *NAMES, "mix", "exp", "auto"} <= ids
    comp = client.completions.create(model="ad2", prompt=PROMPTS[0], max_tokens=10, temperature=0)
    assert comp.choices[0].text == ref_text(env, "ad2", PROMPTS[0], 10)
    assert comp.x_loraplex["served_by"] == ["ad2"]
    streamed = "".join(ch.choices[0].text for ch in client.completions.create(
        model="ad2", prompt=PROMPTS[0], max_tokens=10, temperature=0, stream=True) if ch.choices)
    assert streamed == comp.choices[0].text
    msgs = [{"role": "user", "content": "say something"}]
    chat = client.chat.completions.create(model="ad3", messages=msgs, max_tokens=10, temperature=0)
    ref = env["plex"].tokenizer.decode(ref_ids(env, "ad3", chat_ids(env, msgs), 10), skip_special_tokens=True)
    assert chat.choices[0].message.content == ref
    stream = client.chat.completions.create(model="ad3", messages=msgs, max_tokens=10, temperature=0, stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices) == ref
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-adapter", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="ad0", prompt="x", max_tokens=99999)


# --------------------------------------------------------------------------- observability (runs last)
def test_health_and_metrics(env):
    h = env["client"].get("/health").json()
    assert h["status"] == "ok" and h["queue_depth"] == 0
    text = env["client"].get("/metrics").text
    assert metric(text, "loraplex_requests_total", endpoint="/v1/completions", status="200") > 20
    assert metric(text, "loraplex_requests_total", endpoint="/v1/completions", status="404") >= 1
    assert metric(text, "loraplex_adapter_requests_total", adapter="ad0") > 0
    assert metric(text, "loraplex_adapter_requests_total", adapter="base") > 0
    assert metric(text, "loraplex_generation_tokens_total") > 100
    assert metric(text, "loraplex_adapter_load_seconds", adapter="hot") > 0
    assert metric(text, "loraplex_adapter_loads_total", adapter="bad1", result="error") == 2
    assert metric(text, "loraplex_adapter_loads_total", adapter="bad1", result="not_found") == 1
    assert metric(text, "loraplex_cache_hits_total") > 0 and metric(text, "loraplex_cache_misses_total") > 0
    assert metric(text, "loraplex_cache_evictions_total") > 0  # 6 device slots, more adapters than that
    assert "loraplex_queue_depth 0" in text
    assert 'loraplex_batch_size_bucket{phase="decode",le="+Inf"}' in text
    assert "# TYPE loraplex_cache_hits_total counter" in text
