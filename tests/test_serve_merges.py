"""Per-request merges over HTTP (LoRAX's ``merge(...)`` model names): the served merge equals ``loraplex merge`` of
the same spec loaded as an adapter; concurrent first requests build it once, off the engine's worker, while other
traffic flows; the cache is keyed by the normalised spec, LRU-capped, counted in /metrics and invalidated when a
source changes; config compositions that are merges are built at start-up."""

from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from typer.testing import CliRunner

import loraplex
from loraplex.merge import merge_adapters
from loraplex.serve import Engine, ModelRegistry, ServerThread, create_app
from loraplex.serve import merges as merges_mod
from loraplex.serve.merges import merge_key
from loraplex.serve.registry import is_merge_name
from loraplex.serve.testing import peft_adapters, tiny_llama

TOKEN = "t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
NAMES = ["ad0", "ad1", "ad2"]
PROMPT = "the quick brown fox jumps over the lazy dog"
TIES = "merge(ties;ad0=0.7,ad1=0.3;density=0.7)"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve_merges")
    base = tiny_llama(tmp / "base")
    root = tmp / "adapters"
    paths = peft_adapters(base, root, NAMES + ["ad0_v2"])
    plex = loraplex.load(base, max_slots=8)
    for n in NAMES:
        plex.add_adapter(n, paths[n])
    engine = Engine(plex, max_batch_size=8, batch_window_ms=2, max_prompt_tokens=64, max_tokens_cap=64)
    registry = ModelRegistry(plex, base_id="tiny", compositions={"cfgmerge": "merge(linear;ad1=0.5,ad2=0.5)"})
    app = create_app(engine, registry, admin_token=TOKEN, adapter_roots=[str(root)], max_merges=2)
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url, timeout=60) as raw:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        yield {"plex": plex, "engine": engine, "client": client, "raw": raw, "root": root, "tmp": tmp,
               "paths": paths, "merges": app.state.merges, "registry": registry}
    engine.close()


def completion(env, model, n=8, **kw):
    return env["client"].completions.create(model=model, prompt=PROMPT, max_tokens=n, temperature=0, logprobs=3,
                                            **kw)


def cli_merge(env, out, *args):
    from loraplex.cli import app

    res = CliRunner().invoke(app, ["merge", "--adapters-dir", str(env["root"]), "--out", str(out), *args])
    assert res.exit_code == 0, res.output
    return out


def metric(env, name):
    text = env["raw"].get("/metrics").text
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def test_per_request_ties_merge_equals_the_cli_merge(env):
    out = cli_merge(env, env["tmp"] / "cli_ties", "--sources", "ad0,ad1", "--weights", "0.7,0.3", "--method", "ties",
                    "--density", "0.7")
    env["engine"].register_adapter("cli_ties", loraplex.load_adapter(out, "cli_ties"))
    served, ref = completion(env, TIES), completion(env, "cli_ties")
    assert served.choices[0].text == ref.choices[0].text and served.usage.completion_tokens == 8
    lp, lp_ref = served.choices[0].logprobs, ref.choices[0].logprobs
    assert lp.tokens == lp_ref.tokens
    assert torch.allclose(torch.tensor(lp.token_logprobs), torch.tensor(lp_ref.token_logprobs), atol=1e-5)
    # ... and it is a real merge: neither source alone, nor the base
    assert lp.token_logprobs != completion(env, "ad0").choices[0].logprobs.token_logprobs
    info = served.model_extra["x_loraplex"]
    assert info["served_by"] == ["ad0", "ad1"] and info["weights"] == {"ad0": 0.7, "ad1": 0.3}
    # chat is served the same way
    chat = env["client"].chat.completions.create(model=TIES, messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=5, temperature=0)
    chat_ref = env["client"].chat.completions.create(model="cli_ties", messages=[{"role": "user", "content": "hi"}],
                                                     max_tokens=5, temperature=0)
    assert chat.choices[0].message.content == chat_ref.choices[0].message.content
    env["engine"].unload_adapter("cli_ties")


def test_concurrent_first_requests_build_once_and_do_not_block_others(env, monkeypatch):
    spec = "merge(dare_ties;ad0=0.5,ad2=0.5;density=0.6)"
    calls, started = [], threading.Event()
    real = merges_mod.build_merge

    def slow_build(plex, node, name):
        calls.append((str(node), threading.current_thread().name))
        started.set()
        time.sleep(1.5)
        return real(plex, node, name)

    monkeypatch.setattr(merges_mod, "build_merge", slow_build)
    misses, hits = env["merges"].misses.value(), env["merges"].hits.value()
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(completion, env, spec, 6) for _ in range(5)]
        assert started.wait(20)
        t0 = time.perf_counter()  # meanwhile an adapter request is served at once
        assert completion(env, "ad1", 4).usage.completion_tokens == 4
        waited = time.perf_counter() - t0
        texts = {f.result(60).choices[0].text for f in futures}
    assert waited < 1.2, waited
    assert len(calls) == 1 and calls[0][1].startswith("loraplex-merge"), calls  # once, on the merge executor
    assert len(texts) == 1
    assert env["merges"].misses.value() - misses == 1 and env["merges"].hits.value() - hits == 4
    ref = merge_adapters({n: env["plex"].get_adapter(n) for n in ("ad0", "ad2")}, ["ad0", "ad2"],
                                        [0.5, 0.5], "dare_ties", density=0.6, name="ref_dare")[0]
    env["engine"].register_adapter("ref_dare", ref)
    assert texts == {completion(env, "ref_dare", 6).choices[0].text}
    env["engine"].unload_adapter("ref_dare")


def test_a_merge_gone_from_the_bank_is_built_again(env):
    """A request that finds its merge's bank name gone (evicted between resolving and queueing) builds it again."""
    m, spec = env["merges"], "merge(magnitude_prune;ad1=1,ad2=-0.5;density=0.8)"
    first = completion(env, spec, 5)
    name = m.names()[merge_key(spec)]
    env["engine"].unload_adapter(name)  # behind the cache's back
    misses = m.misses.value()
    again = completion(env, spec, 5)
    assert again.choices[0].text == first.choices[0].text and m.misses.value() == misses + 1
    assert m.names()[merge_key(spec)] != name


def test_cache_key_is_the_normalised_spec():
    assert merge_key("merge(ties; ad0=0.7, ad1=0.3)") == merge_key("merge(ties;ad0=0.70,ad1=0.3;density=0.5)")
    assert merge_key("merge(linear;a=1,b=1;density=0.9)") == merge_key("merge(linear;a=1,b=1)")  # unused option
    assert merge_key("merge(ties;a=1,b=1)") != merge_key("merge(ties;a=1,b=1;density=0.7)")
    assert merge_key("merge(ties;a=1,b=1)") != merge_key("merge(ties;b=1,a=1)")  # --sources order is kept


def test_lru_cap_metrics_listing_and_errors(env):
    m, plex = env["merges"], env["plex"]
    ev0, miss0 = m.evictions.value(), m.misses.value()
    specs = ["merge(linear;ad0=1,ad1=1)", "merge(linear;ad0=1,ad2=1)", "merge(linear;ad1=1,ad2=2)"]
    names = []
    for spec in specs:
        assert completion(env, spec, 3).usage.completion_tokens == 3
        names.append(m.names()[merge_key(spec)])
    deadline = time.monotonic() + 20
    while names[0] in plex and time.monotonic() < deadline:  # evicted (unloaded) in the background
        time.sleep(0.02)
    assert names[0] not in plex and names[2] in plex
    unpinned = [k for k in m.names() if k != merge_key("merge(linear;ad1=0.5,ad2=0.5)")]
    assert len(unpinned) <= 2 and merge_key(specs[0]) not in unpinned
    assert m.evictions.value() - ev0 >= 1
    # the evicted one is built again on demand, same output
    assert completion(env, specs[0], 3).choices[0].text == completion(env, specs[0], 3).choices[0].text
    assert m.misses.value() - miss0 == 4
    assert metric(env, "loraplex_merge_cache_misses_total") == m.misses.value()
    assert metric(env, "loraplex_merge_cache_hits_total") == m.hits.value()
    assert metric(env, "loraplex_merge_cache_evictions_total") == m.evictions.value()
    assert metric(env, "loraplex_merge_seconds_count") >= 4
    # bank names of merges are internal: not listed, not loadable or unloadable by clients
    ids = {c["id"] for c in env["raw"].get("/v1/models").json()["data"]}
    assert not any(is_merge_name(i) for i in ids) and "cfgmerge" in ids
    r = env["raw"].post("/v1/unload_lora_adapter", json={"lora_name": names[2]}, headers=AUTH)
    assert r.status_code == 404
    # errors: unknown source 404 naming it, malformed 400, a merge the math refuses 400
    with pytest.raises(openai.NotFoundError, match="zz"):
        completion(env, "merge(ties;ad0=1,zz=1)")
    with pytest.raises(openai.BadRequestError, match="column"):
        completion(env, "merge(ties;ad0=1,ad1=1;density=2)")
    with pytest.raises(openai.BadRequestError, match="svd_rank"):
        completion(env, "merge(svd;ad0=1,ad1=1;svd_rank=100000)")
    assert m.failures.value() >= 1 and merge_key("merge(svd;ad0=1,ad1=1;svd_rank=100000)") not in m.names()


def test_config_composition_merge_is_built_at_start_up_and_pinned(env):
    m = env["merges"]
    key = merge_key("merge(linear;ad1=0.5,ad2=0.5)")
    deadline = time.monotonic() + 30
    while key not in m.names() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert key in m.names()  # built without any request
    ref = merge_adapters({n: env["plex"].get_adapter(n) for n in ("ad1", "ad2")}, ["ad1", "ad2"], [0.5, 0.5],
                         "linear", name="ref_lin")[0]
    env["engine"].register_adapter("ref_lin", ref)
    assert completion(env, "cfgmerge").choices[0].text == completion(env, "ref_lin").choices[0].text
    env["engine"].unload_adapter("ref_lin")


def test_replacing_a_source_rebuilds_its_merges(env):
    raw, m = env["raw"], env["merges"]
    spec = "merge(ties;ad0=0.6,ad1=0.4)"
    before = completion(env, spec).choices[0].logprobs.token_logprobs
    old_name = m.names()[merge_key(spec)]
    r = raw.post("/v1/load_lora_adapter", json={"lora_name": "ad0", "lora_path": str(env["paths"]["ad0_v2"]),
                                                "load_inplace": True}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert merge_key(spec) not in m.names()
    after = completion(env, spec).choices[0].logprobs.token_logprobs
    assert m.names()[merge_key(spec)] != old_name and after != before
    ref = merge_adapters({n: env["plex"].get_adapter(n) for n in ("ad0", "ad1")}, ["ad0", "ad1"], [0.6, 0.4], "ties",
                         name="ref_ties2")[0]
    env["engine"].register_adapter("ref_ties2", ref)
    ref_lp = completion(env, "ref_ties2").choices[0].logprobs.token_logprobs
    assert torch.allclose(torch.tensor(after), torch.tensor(ref_lp), atol=1e-5)
    env["engine"].unload_adapter("ref_ties2")


def test_a_merge_composition_loaded_by_the_admin_is_pinned_and_blocks_unloads(env):
    raw = env["raw"]
    r = raw.post("/v1/load_composition", json={"name": "adminmerge", "spec": "merge(ties;ad1=0.5,ad2=0.5)"},
                 headers=AUTH)
    assert r.status_code == 200, r.text
    assert completion(env, "adminmerge").usage.completion_tokens == 8
    r = raw.post("/v1/unload_lora_adapter", json={"lora_name": "ad2"}, headers=AUTH)
    assert r.status_code == 409 and set(r.json()["error"]["compositions"]) == {"cfgmerge", "adminmerge"}
    key = merge_key("merge(ties;ad1=0.5,ad2=0.5)")
    assert key in env["merges"].pinned()
    assert raw.post("/v1/unload_composition", json={"name": "adminmerge"}, headers=AUTH).status_code == 200
    assert key not in env["merges"].pinned() and merge_key("merge(linear;ad1=0.5,ad2=0.5)") in env["merges"].pinned()


def test_a_server_without_a_merge_cache_refuses_merges_clearly():
    reg = ModelRegistry(type("C", (), {"adapters": ["a", "b"], "__contains__": lambda s, n: n in ("a", "b"),
                                       "tokenizer": None, "device": torch.device("cpu")})())
    with pytest.raises(loraplex.serve.ResolveError, match="does not build merges per request"):
        reg.resolve("merge(ties;a=1,b=1)")
