"""OpenAI/vLLM API parity over HTTP with the official ``openai`` client: logprobs (completions, chat, echo,
streamed), the batched sampler's parameters against per-row reference implementations, and 400s naming every
field the server does not implement."""

from __future__ import annotations

import math

import httpx
import openai
import pytest
import torch

import loraplex
from loraplex.serve import Engine, ModelRegistry, SamplingParams, ServerThread, create_app
from loraplex.serve.sampling import adjust_logits, sample_probs
from loraplex.serve.testing import peft_adapters, tiny_llama

NAMES = ["ad0", "ad1"]
PROMPT = "the quick brown fox jumps over the lazy dog"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve_api")
    base = tiny_llama(tmp / "base")
    root = tmp / "adapters"
    peft_adapters(base, root, NAMES)
    plex = loraplex.load(base, max_slots=4)
    for n in NAMES:
        plex.add_adapter(n, root / n)
    engine = Engine(plex, max_batch_size=8, batch_window_ms=20, max_prompt_tokens=64, max_tokens_cap=200)
    app = create_app(engine, ModelRegistry(plex, base_id="tiny-llama"))
    with ServerThread(app) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        with httpx.Client(base_url=srv.url, timeout=60) as raw:
            yield {"plex": plex, "engine": engine, "client": client, "raw": raw, "root": root, "base": base}
    engine.close()


# --------------------------------------------------------------------------- references
def ids_of(env, text):
    return env["plex"].tokenizer(text).input_ids


def ref_logprobs(env, choice, seq):
    """log_softmax of ``plex(seq)`` logits for that adapter, [len(seq), V] (on the engine's worker)."""
    plex = env["plex"]
    return env["engine"].call_on_worker(
        lambda: torch.log_softmax(plex(torch.tensor([seq]), adapters=choice).logits[0].float(), dim=-1))


def ref_decode(env, choice, prompt, n, adjust=None):
    """Greedy decoding one token at a time over ``plex(...)``, ``adjust(logits, prompt, out)`` applied."""
    plex = env["plex"]

    def run():
        out = []
        for _ in range(n):
            logits = plex(torch.tensor([prompt + out]), adapters=choice).logits[0, -1].float()
            if adjust is not None:
                logits = adjust(logits, prompt, out)
            out.append(int(logits.argmax()))
        return out
    return env["engine"].call_on_worker(run)


def ref_repetition(logits, prompt, out, penalty):
    """vLLM's repetition penalty, one token at a time."""
    logits = logits.clone()
    for t in set(prompt) | set(out):
        logits[t] = logits[t] / penalty if logits[t] > 0 else logits[t] * penalty
    return logits


def ref_presence_frequency(logits, out, presence, frequency):
    logits = logits.clone()
    for t in set(out):
        logits[t] -= frequency * out.count(t) + presence
    return logits


def completion_ids(env, text_choice):
    tok = env["plex"].tokenizer
    return tok(text_choice, add_special_tokens=False).input_ids


# --------------------------------------------------------------------------- logprobs
def test_completion_logprobs_equal_log_softmax_of_plex_logits_per_adapter(env):
    c = env["client"]
    prompt = ids_of(env, PROMPT)
    from concurrent.futures import ThreadPoolExecutor

    def ask(model):  # concurrent: the two adapters share mixed batches
        return c.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0, logprobs=5)

    with ThreadPoolExecutor(4) as pool:
        outs = dict(zip(NAMES * 2, pool.map(ask, NAMES * 2)))
    for name in NAMES:
        ch = outs[name].choices[0]
        lp = ch.logprobs
        gen = ref_decode(env, name, prompt, 8)
        ref = ref_logprobs(env, name, prompt + gen)
        assert len(lp.token_logprobs) == 8
        for j, t in enumerate(gen):
            row = ref[len(prompt) - 1 + j]
            assert math.isclose(lp.token_logprobs[j], float(row[t]), abs_tol=1e-4)
            top = lp.top_logprobs[j]
            vals = list(top.values())
            assert len(top) == 5 and vals == sorted(vals, reverse=True)  # best first; greedy: chosen is the top
            best = row.topk(5)
            assert torch.allclose(torch.tensor(vals), best.values, atol=1e-4)
            assert lp.tokens[j] == env["plex"].tokenizer.decode([t])
        offs = lp.text_offset
        assert offs == sorted(offs) and offs[0] == 0 and offs[-1] <= len(ch.text)


def test_logprobs_zero_gives_the_chosen_tokens_logprob(env):
    r = env["client"].completions.create(model="ad0", prompt="hello world", max_tokens=4, temperature=0, logprobs=0)
    lp = r.choices[0].logprobs
    assert all(isinstance(x, float) for x in lp.token_logprobs)
    assert all(len(d) == 1 and list(d.values())[0] == x for d, x in zip(lp.top_logprobs, lp.token_logprobs))
    r = env["client"].completions.create(model="ad0", prompt="hello world", max_tokens=4, temperature=0)
    assert r.choices[0].logprobs is None


def test_chat_logprobs_and_top_logprobs(env):
    c = env["client"]
    msgs = [{"role": "user", "content": "hi there"}]
    r = c.chat.completions.create(model="ad1", messages=msgs, max_tokens=6, temperature=0, logprobs=True,
                                  top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    tok = env["plex"].tokenizer
    prompt = tok(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False),
                 add_special_tokens=False).input_ids
    gen = ref_decode(env, "ad1", prompt, len(content))
    ref = ref_logprobs(env, "ad1", prompt + gen)
    for j, (item, t) in enumerate(zip(content, gen)):
        assert math.isclose(item.logprob, float(ref[len(prompt) - 1 + j, t]), abs_tol=1e-4)
        assert item.token == tok.decode([t]) and item.bytes == list(item.token.encode())
        tops = [x.logprob for x in item.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and item.top_logprobs[0].token == item.token
    plain = c.chat.completions.create(model="ad1", messages=msgs, max_tokens=6, temperature=0, logprobs=True)
    assert [x.logprob for x in plain.choices[0].logprobs.content] == [x.logprob for x in content]
    assert all(x.top_logprobs == [] for x in plain.choices[0].logprobs.content)
    assert c.chat.completions.create(model="ad1", messages=msgs, max_tokens=2).choices[0].logprobs is None


def test_echo_with_logprobs_scores_the_prompt(env):
    c = env["client"]
    r = c.completions.create(model="ad0", prompt=PROMPT, max_tokens=3, temperature=0, logprobs=2, echo=True)
    ch = c.completions.create(model="ad0", prompt=PROMPT, max_tokens=3, temperature=0).choices[0]
    out = r.choices[0]
    assert out.text == PROMPT + ch.text
    prompt = ids_of(env, PROMPT)
    lp = out.logprobs
    assert len(lp.token_logprobs) == len(prompt) + 3
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    ref = ref_logprobs(env, "ad0", prompt)
    for j in range(1, len(prompt)):
        assert math.isclose(lp.token_logprobs[j], float(ref[j - 1, prompt[j]]), abs_tol=1e-4)
        assert len(lp.top_logprobs[j]) in (2, 3)  # the 2 best, plus the prompt's token when it is not among them
    offs = lp.text_offset
    assert offs == sorted(offs) and offs[len(prompt)] >= len(PROMPT)
    assert PROMPT[offs[2]:].lstrip().startswith(lp.tokens[2])  # the text before a token ends at its offset
    # echo without logprobs: just the text
    r = c.completions.create(model="ad0", prompt=PROMPT, max_tokens=3, temperature=0, echo=True)
    assert r.choices[0].text == PROMPT + ch.text and r.choices[0].logprobs is None


def test_streamed_logprobs_equal_the_non_streamed_ones(env):
    c = env["client"]
    kw = dict(model="ad1", prompt="once upon a time", max_tokens=8, temperature=0, logprobs=2)
    whole = c.completions.create(**kw).choices[0]
    tokens, lps, text = [], [], ""
    for ev in c.completions.create(stream=True, **kw):
        ch = ev.choices[0]
        text += ch.text
        if ch.logprobs is not None:
            tokens += ch.logprobs.tokens
            lps += ch.logprobs.token_logprobs
    assert text == whole.text and tokens == whole.logprobs.tokens and lps == whole.logprobs.token_logprobs
    msgs = [{"role": "user", "content": "stream me"}]
    ckw = dict(model="ad0", messages=msgs, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2)
    whole = c.chat.completions.create(**ckw).choices[0].logprobs.content
    got = []
    for ev in c.chat.completions.create(stream=True, **ckw):
        if ev.choices and ev.choices[0].logprobs is not None:
            got += ev.choices[0].logprobs.content
    assert [(x.token, x.logprob) for x in got] == [(x.token, x.logprob) for x in whole]
    # echo streamed: the prompt first, with its logprobs
    evs = list(c.completions.create(model="ad0", prompt=PROMPT, max_tokens=2, temperature=0, logprobs=1, echo=True,
                                    stream=True))
    assert evs[0].choices[0].text == PROMPT and evs[0].choices[0].logprobs.token_logprobs[0] is None


# --------------------------------------------------------------------------- the batched sampler vs per-row refs
def test_adjust_logits_equals_a_per_row_reference():
    torch.manual_seed(0)
    V = 50
    logits = torch.randn(4, V) * 3
    params = [SamplingParams(repetition_penalty=1.7), SamplingParams(presence_penalty=0.8, frequency_penalty=0.5),
              SamplingParams(min_tokens=3, stop_token_ids=(7,)), SamplingParams()]
    prompts = [[1, 2, 3], [4, 5], [6], [1]]
    outputs = [[3, 9, 9], [9, 9, 11], [2], [5]]
    got = adjust_logits(logits, params, prompts, outputs, eos_ids=[0])
    want = logits.clone()
    want[0] = ref_repetition(logits[0], prompts[0], outputs[0], 1.7)
    want[1] = ref_presence_frequency(logits[1], outputs[1], 0.8, 0.5)
    want[2, 0] = want[2, 7] = float("-inf")  # min_tokens: eos and stop ids banned while len(out) < 3
    assert torch.allclose(got, want)


def test_sample_probs_equals_a_per_row_reference():
    torch.manual_seed(1)
    V = 40
    logits = torch.randn(5, V) * 2
    params = [SamplingParams(temperature=0.7, top_k=5), SamplingParams(temperature=1.3, top_p=0.6),
              SamplingParams(min_p=0.2), SamplingParams(temperature=0), SamplingParams(top_k=8, top_p=0.5)]
    got = sample_probs(logits, params)
    for b, p in enumerate(params):
        row = logits[b]
        if p.greedy:
            want = torch.zeros(V)
            want[row.argmax()] = 1
        else:
            probs = torch.softmax(row / p.temperature, -1)
            if p.min_p:
                probs = torch.where(probs < p.min_p * probs.max(), 0.0, probs)
                probs = probs / probs.sum()
            order = sorted(range(V), key=lambda i: -float(probs[i]))
            kept, total = [], 0.0
            limit = p.top_k if p.top_k > 0 else V
            mass = sum(float(probs[i]) for i in order[:limit])
            for i in order[:limit]:
                if total >= p.top_p:
                    break
                kept.append(i)
                total += float(probs[i]) / mass
            want = torch.zeros(V)
            want[kept] = probs[kept]
            want = want / want.sum()
        assert torch.allclose(got[b], want, atol=1e-6), b


def test_top_k_one_and_min_p_one_equal_greedy(env):
    c = env["client"]
    greedy = c.completions.create(model="ad0", prompt=PROMPT, max_tokens=10, temperature=0).choices[0].text
    for extra in ({"top_k": 1}, {"min_p": 1.0}):
        for seed in (1, 2):
            r = c.completions.create(model="ad0", prompt=PROMPT, max_tokens=10, temperature=1.0, seed=seed,
                                     extra_body=extra)
            assert r.choices[0].text == greedy, extra
    sampled = {c.completions.create(model="ad0", prompt=PROMPT, max_tokens=10, temperature=1.0, seed=s,
                                    extra_body={"top_k": 50}).choices[0].text for s in range(4)}
    assert len(sampled) > 1  # top_k=50 still samples


def test_penalties_equal_the_per_row_reference(env):
    c = env["client"]
    prompt = ids_of(env, "a a a the the the dog dog")
    r = c.completions.create(model="ad1", prompt=prompt, max_tokens=12, temperature=0,
                             extra_body={"repetition_penalty": 1.8})
    want = ref_decode(env, "ad1", prompt, 12, lambda lg, p, o: ref_repetition(lg, p, o, 1.8))
    plain = ref_decode(env, "ad1", prompt, 12)
    assert want != plain  # the penalty matters for this prompt
    tok = env["plex"].tokenizer
    assert r.choices[0].text == tok.decode(want, skip_special_tokens=True)
    r = c.completions.create(model="ad1", prompt=prompt, max_tokens=12, temperature=0, presence_penalty=1.5,
                             frequency_penalty=1.0)
    want = ref_decode(env, "ad1", prompt, 12, lambda lg, p, o: ref_presence_frequency(lg, o, 1.5, 1.0))
    assert r.choices[0].text == tok.decode(want, skip_special_tokens=True)


def test_stop_token_ids_and_include_stop_str(env):
    c = env["client"]
    prompt = ids_of(env, PROMPT)
    gen = ref_decode(env, "ad0", prompt, 8)
    stop = gen[3]
    cut = gen[:gen.index(stop) + 1]
    r = c.completions.create(model="ad0", prompt=prompt, max_tokens=8, temperature=0, logprobs=0,
                             extra_body={"stop_token_ids": [stop]})
    ch = r.choices[0]
    assert ch.finish_reason == "stop" and r.usage.completion_tokens == len(cut)
    assert ch.text == env["plex"].tokenizer.decode(cut, skip_special_tokens=True)
    full = c.completions.create(model="ad0", prompt=prompt, max_tokens=8, temperature=0).choices[0].text
    word = full.split()[2]
    excl = c.completions.create(model="ad0", prompt=prompt, max_tokens=8, temperature=0, stop=[word]).choices[0]
    incl = c.completions.create(model="ad0", prompt=prompt, max_tokens=8, temperature=0, stop=[word],
                                extra_body={"include_stop_str_in_output": True}).choices[0]
    assert excl.text == full[:full.find(word)] and incl.text == full[:full.find(word) + len(word)]


def test_min_tokens_delays_eos_and_ignore_eos_runs_past_it(env):
    plex = env["plex"]
    prompt = ids_of(env, PROMPT)
    gen = ref_decode(env, "ad0", prompt, 6)
    eng = Engine(plex, eos_token_ids=[gen[0]], batch_window_ms=0)  # the first greedy token is the eos here
    try:
        assert eng.generate(prompt, "ad0", SamplingParams(max_tokens=6, temperature=0), timeout=30).token_ids == \
            gen[:1]
        late = eng.generate(prompt, "ad0", SamplingParams(max_tokens=6, temperature=0, min_tokens=3), timeout=30)
        assert len(late.token_ids) >= 3 and gen[0] not in late.token_ids[:3]
        assert late.token_ids[0] == int(ref_logprobs(env, "ad0", prompt)[-1].topk(2).indices[1])  # next best
        past = eng.generate(prompt, "ad0", SamplingParams(max_tokens=6, temperature=0, ignore_eos=True), timeout=30)
        assert past.token_ids == gen and past.finish_reason == "length"
    finally:
        eng.close()


# --------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("field,value", [("logit_bias", {"5": 1.0}), ("best_of", 3), ("suffix", "x"),
                                         ("frobnicate", 1), ("use_beam_search", True), ("guided_json", {}),
                                         ("prompt_logprobs", 1)])
def test_unsupported_fields_are_a_400_naming_them(env, field, value):
    with pytest.raises(openai.BadRequestError) as e:
        env["client"].completions.create(model="ad0", prompt="x", max_tokens=2, extra_body={field: value})
    assert field in str(e.value) and e.value.body["param"] == field
    with pytest.raises(openai.BadRequestError) as e:
        env["client"].chat.completions.create(model="ad0", messages=[{"role": "user", "content": "x"}],
                                              max_tokens=2, extra_body={field: value})
    assert field in str(e.value)


def test_harmless_fields_and_defaults_are_accepted(env):
    r = env["raw"].post("/v1/completions", json={"model": "ad0", "prompt": "x", "max_tokens": 2, "best_of": 1,
                                                  "logit_bias": {}, "store": True, "metadata": {"a": "b"},
                                                  "user": "u", "max_tokens_": None} | {"max_tokens_": None})
    assert r.status_code == 400 and "max_tokens_" in r.json()["error"]["message"]  # a typo is named
    r = env["raw"].post("/v1/completions", json={"model": "ad0", "prompt": "x", "max_tokens": 2, "best_of": 1,
                                                  "logit_bias": {}, "store": True, "metadata": {"a": "b"}})
    assert r.status_code == 200, r.text


def test_contradictions_and_ranges_are_400s(env):
    raw = env["raw"]
    msg = [{"role": "user", "content": "x"}]
    cases = [("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
             ("/v1/chat/completions", {"messages": msg, "top_logprobs": 2}, "top_logprobs"),
             ("/v1/completions", {"prompt": "x", "logprobs": 21}, "logprobs"),
             ("/v1/chat/completions", {"messages": msg, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
             ("/v1/completions", {"prompt": "x", "top_k": -2}, "top_k"),
             ("/v1/completions", {"prompt": "x", "min_p": 1.5}, "min_p"),
             ("/v1/completions", {"prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
             ("/v1/completions", {"prompt": "x", "presence_penalty": 3}, "presence_penalty"),
             ("/v1/completions", {"prompt": "x", "max_tokens": 3, "min_tokens": 4}, "min_tokens"),
             ("/v1/completions", {"prompt": "x", "stop_token_ids": [10**9]}, "stop_token_ids")]
    for path, body, field in cases:
        r = raw.post(path, json={"model": "ad0", "max_tokens": 2, **body})
        assert r.status_code == 400, (field, r.text)
        assert field in r.json()["error"]["message"], (field, r.text)
