"""Engine-level tests of loraplex.serve: continuous mixed-adapter batching equals plex.generate token by token,
sampling, stop strings, cancellation, cohort fallback, drain/replace semantics, detokenizer and registry units."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

import loraplex
from loraplex.errors import UnknownAdapterError
from loraplex.serve import AdapterBusy, Engine, ModelRegistry, QueueFull, RequestTooLarge, ResolveError, SamplingParams
from loraplex.serve.detok import TextStream
from loraplex.serve.registry import parse_spec
from loraplex.serve.testing import minilm_tokenizer, peft_adapters, tiny_llama

NAMES = ["ad0", "ad1", "ad2", "ad3"]
PROMPTS = ["hello world", "the quick brown fox jumps over the lazy dog", "a", "python is a programming language",
           "once upon a time there was", "numbers 1 2 3 4 5 6 7"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread (conftest)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_engine")
    base = tiny_llama(root / "base")
    paths = peft_adapters(base, root / "adapters", NAMES)
    return base, paths


@pytest.fixture(scope="module")
def plex(files):
    base, paths = files
    return loraplex.load(base, adapters=paths)


@pytest.fixture(scope="module")
def engine(plex):
    eng = Engine(plex, max_batch_size=8, batch_window_ms=5, max_queue=64, max_prompt_tokens=64, max_tokens_cap=2000)
    yield eng
    eng.close()


def ids_of(plex, text):
    return plex.tokenizer(text).input_ids


def reference(engine, choice, ids, max_new):
    """plex.generate greedy, run on the engine's worker (between steps) so it never races the engine."""
    def run():
        out = engine.plex.generate(torch.tensor([ids]), adapters=choice, max_new_tokens=max_new, do_sample=False,
                                   pad_token_id=0)
        return out[0, len(ids):].tolist()
    return engine.call_on_worker(run)


def greedy(n):
    return SamplingParams(max_tokens=n, temperature=0.0)


def test_single_requests_equal_generate(engine, plex):
    for choice in [None, *NAMES, {"ad0": 0.7, "ad1": 0.3}]:
        for p in PROMPTS[:3]:
            ids = ids_of(plex, p)
            got = engine.generate(ids, choice, greedy(16), timeout=30)
            assert got.token_ids == reference(engine, choice, ids, 16), (choice, p)
            assert got.text == plex.tokenizer.decode(got.token_ids, skip_special_tokens=True)
            assert got.prompt_tokens == len(ids)


def test_mixed_concurrent_burst_equals_generate(engine, plex):
    choices = [None, *NAMES, {"ad2": 0.5, "ad3": 0.5}]
    jobs = []
    for i in range(30):
        choice = choices[i % len(choices)]
        ids = ids_of(plex, PROMPTS[i % len(PROMPTS)])
        jobs.append((choice, ids, 3 + (i * 7) % 25))
    refs = [reference(engine, c, ids, n) for c, ids, n in jobs]
    before = engine.metrics.batch_size.count(phase="decode")
    handles = engine.submit_many([(ids, c, greedy(n)) for c, ids, n in jobs])
    finals = [h.result(timeout=60) for h in handles]
    for (c, ids, n), f, ref in zip(jobs, finals, refs):
        assert f.token_ids == ref, (c, n)
    assert engine.metrics.batch_size.count(phase="decode") > before
    assert engine.running_count == 0 and engine.queue_depth == 0


def test_staggered_arrivals_join_running_batch(engine, plex):
    """Requests that arrive while a batch decodes are prefilled and spliced into it (continuous batching)."""
    long_ids = ids_of(plex, PROMPTS[1])
    first = engine.submit(long_ids, "ad0", SamplingParams(max_tokens=300, temperature=0, ignore_eos=True))
    late = []
    deadline = time.monotonic() + 10
    while engine.running_count == 0 and time.monotonic() < deadline:
        time.sleep(0.001)
    for i, c in enumerate(["ad1", "ad2", None, "ad3"]):
        ids = ids_of(plex, PROMPTS[i + 2])
        late.append((c, ids, engine.submit(ids, c, greedy(10))))
        time.sleep(0.01)
    for c, ids, h in late:
        assert h.result(30).token_ids == reference(engine, c, ids, 10)
    assert not first.done  # the short ones finished while the long one kept running
    ref_first = reference(engine, "ad0", long_ids, 300)
    got = first.result(60).token_ids
    # ignore_eos: identical up to generate's own stop at eos
    assert got[:len(ref_first)] == ref_first
    assert engine.continuous is True


def test_cohort_mode_is_also_exact(plex):
    eng = Engine(plex, max_batch_size=4, batch_window_ms=2, start=False)
    eng._continuous = False  # what a cache without batch surgery gets
    eng.start()
    try:
        jobs = [(NAMES[i % 4], ids_of(plex, PROMPTS[i % 6]), 4 + i) for i in range(9)]
        refs = [reference(eng, c, ids, n) for c, ids, n in jobs]
        hs = eng.submit_many([(ids, c, greedy(n)) for c, ids, n in jobs])
        assert [h.result(60).token_ids for h in hs] == refs
    finally:
        eng.close()


def test_more_adapters_than_device_slots_defers_then_serves(files):
    """Two device slots, three adapters in one burst: the third waits for a slot, nothing fails."""
    base, paths = files
    small = loraplex.load(base, adapters=paths, max_slots=2)
    eng = Engine(small, max_batch_size=4, start=False)
    try:
        jobs = [(n, ids_of(small, PROMPTS[i]), 6 + i) for i, n in enumerate(["ad0", "ad1", "ad2", "ad3", "ad0"])]
        refs = [reference(eng, c, ids, n) for c, ids, n in jobs]
        hs = eng.submit_many([(ids, c, greedy(n)) for c, ids, n in jobs])
        eng.start()
        assert [h.result(60).token_ids for h in hs] == refs
        assert eng.metrics.deferred.value() > 0
        assert small.bank.stats.evictions > 0
        with pytest.raises(Exception, match="device slots"):  # one request that can never fit
            eng.generate(ids_of(small, "x"), {"ad0": 0.3, "ad1": 0.3, "ad2": 0.4}, greedy(2), timeout=30)
    finally:
        eng.close()


def test_sampling_seeded_and_top_p(engine, plex):
    ids = ids_of(plex, "hello world")
    p = SamplingParams(max_tokens=12, temperature=1.5, seed=7)
    a = engine.generate(ids, "ad1", p, timeout=30).token_ids
    b = engine.generate(ids, "ad1", SamplingParams(max_tokens=12, temperature=1.5, seed=7), timeout=30).token_ids
    c = engine.generate(ids, "ad1", SamplingParams(max_tokens=12, temperature=1.5, seed=8), timeout=30).token_ids
    assert a == b and a != c
    # a nucleus this small keeps only the most likely token: sampling then equals greedy
    tiny = engine.generate(ids, "ad1", SamplingParams(max_tokens=12, temperature=1.0, top_p=1e-6, seed=3), timeout=30)
    assert tiny.token_ids == reference(engine, "ad1", ids, 12)


def test_stop_strings_and_stream_pieces(engine, plex):
    ids = ids_of(plex, PROMPTS[1])
    full = engine.generate(ids, "ad2", greedy(20), timeout=30)
    words = full.text.split()
    assert len(words) >= 3
    stop = words[2]
    h = engine.submit(ids, "ad2", SamplingParams(max_tokens=20, temperature=0, stop=(stop,)))
    pieces = [ev.text for ev in h.events(timeout=30) if hasattr(ev, "text") and not hasattr(ev, "finish_reason")]
    final = h.final
    assert final.finish_reason == "stop"
    assert final.text == full.text[:full.text.find(stop)]
    assert "".join(pieces) == final.text


def test_limits_and_queue(plex):
    eng = Engine(plex, max_queue=2, max_prompt_tokens=8, max_tokens_cap=50, start=False)
    try:
        with pytest.raises(RequestTooLarge, match="at most 8"):
            eng.submit(list(range(1000, 1010)), None, greedy(4))
        with pytest.raises(RequestTooLarge, match="cap of 50"):
            eng.submit([1000, 1001], None, greedy(51))
        with pytest.raises(RequestTooLarge, match="empty"):
            eng.submit([], None, greedy(4))
        with pytest.raises(UnknownAdapterError, match="known adapters: ad0"):
            eng.submit([1000], "nope", greedy(4))
        h1 = eng.submit([1000, 1001], "ad0", greedy(3))
        h2 = eng.submit([1000, 1002], "ad1", greedy(3))
        with pytest.raises(QueueFull):
            eng.submit([1000, 1003], None, greedy(3))
        eng.start()
        assert h1.result(30).completion_tokens == 3 and h2.result(30).completion_tokens == 3
    finally:
        eng.close()


def test_cancel_leaves_batch(engine, plex):
    ids = ids_of(plex, "hello")
    h = engine.submit(ids, "ad3", SamplingParams(max_tokens=1900, temperature=0, ignore_eos=True))
    other = engine.submit(ids, "ad0", greedy(8))
    deadline = time.monotonic() + 10
    while engine.running_count == 0 and time.monotonic() < deadline:
        time.sleep(0.002)
    h.cancel()
    final = h.result(timeout=20)
    assert final.finish_reason == "cancelled" and final.completion_tokens < 1900
    assert other.result(20).token_ids == reference(engine, "ad0", ids, 8)


def test_unload_waits_for_running_then_fails_new(files, plex):
    base, paths = files
    eng = Engine(plex, max_batch_size=1)  # one row at a time: the second request stays queued
    try:
        plex.add_adapter("tmp_unload", paths["ad1"])
        ids = ids_of(plex, "hello")
        ref = reference(eng, "tmp_unload", ids, 300)
        h = eng.submit(ids, "tmp_unload", SamplingParams(max_tokens=300, temperature=0, ignore_eos=True))
        while eng._in_use["tmp_unload"] == 0 and not h.done:
            time.sleep(0.001)
        queued = eng.submit(ids, "tmp_unload", greedy(4))
        with pytest.raises(AdapterBusy):
            eng.unload_adapter("tmp_unload", timeout=0.01)
        assert "tmp_unload" in plex.bank  # a timed-out unload changes nothing
        seen = {}

        def unload():
            eng.unload_adapter("tmp_unload", timeout=30)
            seen["request_done_when_unload_returned"] = h.done

        t = threading.Thread(target=unload)
        t.start()
        while "tmp_unload" not in eng._draining and t.is_alive():
            time.sleep(0.001)
        if t.is_alive():  # while draining, new requests for it are refused at once
            with pytest.raises(UnknownAdapterError, match="being unloaded"):
                eng.submit(ids, "tmp_unload", greedy(2))
        final = h.result(60)
        t.join(30)
        assert final.token_ids[:len(ref)] == ref and final.finish_reason in ("length", "stop")
        assert seen["request_done_when_unload_returned"] is True
        with pytest.raises(UnknownAdapterError):  # the queued one fails cleanly, never runs half-removed
            queued.result(30)
        assert queued.final.completion_tokens == 0
        assert "tmp_unload" not in plex.bank
        with pytest.raises(UnknownAdapterError):
            eng.submit(ids, "tmp_unload", greedy(2))
    finally:
        eng.close()


def test_replace_holds_new_requests_and_swaps_atomically(files, plex):
    base, paths = files
    eng = Engine(plex, max_batch_size=4)
    try:
        plex.add_adapter("swap", paths["ad0"])
        ids = ids_of(plex, "once upon a time")
        ref_old = reference(eng, "ad0", ids, 150)
        ref_new = reference(eng, "ad2", ids, 10)
        running = eng.submit(ids, "swap", SamplingParams(max_tokens=150, temperature=0, ignore_eos=True))
        while eng._in_use["swap"] == 0:
            time.sleep(0.001)
        new_ad = loraplex.load_adapter(paths["ad2"], "swap")
        t = threading.Thread(target=lambda: eng.register_adapter("swap", new_ad, replace=True, timeout=30))
        t.start()
        while "swap" not in eng._draining and t.is_alive():
            time.sleep(0.001)
        queued = eng.submit(ids, "swap", greedy(10))  # held back until the swap
        t.join(60)
        assert running.result(30).token_ids[:len(ref_old)] == ref_old  # old weights all the way through
        assert queued.result(30).token_ids == ref_new  # new weights from its first token
    finally:
        if "swap" in plex.bank:
            plex.remove_adapter("swap")
        eng.close()


def test_text_stream_holds_back_stop_prefix():
    tok = minilm_tokenizer()
    ids = tok("hello world stop here please", add_special_tokens=False).input_ids
    s = TextStream(tok, stop=("stop here",))
    out = [s.push(t) for t in ids]
    out.append(s.finish())
    assert "".join(out) == "hello world "
    assert s.stopped == "stop here"
    plain = TextStream(tok)
    pieces = [plain.push(t) for t in ids] + [plain.finish()]
    assert "".join(pieces) == tok.decode(ids)


def test_parse_spec():
    assert parse_spec("blend(a=0.7, b=0.3)") == {"a": 0.7, "b": 0.3}
    assert parse_spec("blend(a=1,b=3,normalize=true)") == {"a": 0.25, "b": 0.75}
    assert parse_spec("blend(a)") == {"a": 1.0}
    assert parse_spec("stack(a,b)") == {"a": 1.0, "b": 1.0}
    assert parse_spec("plainname") is None
    for bad in ["blend(a=x)", "stack(a=1)", "blend()", "blend(a=1,a=2)"]:
        with pytest.raises(ResolveError):
            parse_spec(bad)
    with pytest.raises(ResolveError, match="auto"):
        parse_spec("moe(router_dir)")
    with pytest.raises(ResolveError, match="loraplex merge"):
        parse_spec("merge(ties;a=0.5,b=0.5)")
    with pytest.raises(ResolveError, match="one pass"):
        parse_spec("ensemble(a=1,b=1)")
    with pytest.raises(ResolveError, match="stack mode 'inlayer' is not served") as exc:
        parse_spec("stack(a,b,mode=inlayer)")
    assert exc.value.code == "unsupported_spec"
    with pytest.raises(ResolveError, match=r"column \d+") as exc:  # the grammar's error, with the caret
        parse_spec("blend(a=1,,b=2)")
    assert exc.value.code == "invalid_spec"


def test_registry_resolution(plex, files):
    reg = ModelRegistry(plex, base_id="tiny", compositions={"mix": "stack(ad0,ad1)"},
                        ab_splits={"exp": {"ad0": 3, "ad1": 1}}, seed=1)
    assert reg.resolve("tiny").choice is None and reg.resolve("base").served_by == []
    assert reg.resolve("ad2").choice == "ad2"
    mix = reg.resolve("mix")
    assert mix.choice == {"ad0": 1.0, "ad1": 1.0} and mix.served_by == ["ad0", "ad1"]
    arms = [reg.resolve("exp").arm for _ in range(400)]
    assert 0.65 < arms.count("ad0") / 400 < 0.85
    assert len({reg.resolve("exp", user="alice").arm for _ in range(20)}) == 1  # sticky per user
    with pytest.raises(ResolveError, match="no router"):
        reg.resolve("auto")
    with pytest.raises(UnknownAdapterError) as ei:
        reg.resolve("blend(ad0=1,zzz=1)")
    assert "mix" in ei.value.known and "exp" in ei.value.known
    # a spec the server resolves runs what the Plex runs for the same text, and what the weights mean
    text = "blend(ad0=3,ad1=1,normalize=true)"
    got = reg.resolve(text)
    assert got.choice == {"ad0": 0.75, "ad1": 0.25} and got.served_by == ["ad0", "ad1"]
    ids = torch.tensor([ids_of(plex, "hello there")])
    merged = loraplex.load(files[0]).model  # reference: the base with W + 0.75 D_ad0 + 0.25 D_ad1 written in
    with torch.no_grad():
        for m in plex.layers:
            merged.get_submodule(m).weight += 0.75 * plex.merged_delta("ad0", m) + 0.25 * plex.merged_delta("ad1", m)
        want = merged(input_ids=ids).logits
        served = plex(ids, adapters=got.choice).logits
        direct = plex(ids, adapters=text).logits
        base = plex(ids).logits
    assert torch.equal(served, direct)
    assert not torch.allclose(served, base, atol=1e-3)
    assert torch.allclose(served, want, atol=1e-4, rtol=0)
    with pytest.raises(ResolveError):
        ModelRegistry(plex, ab_splits={"bad": {"ad0": -1}})


def test_cli_serve_command_and_build_server(files):
    from typer.testing import CliRunner

    from loraplex.cli import app
    from loraplex.serve.cli import build_server, parse_ab

    runner = CliRunner()
    res = runner.invoke(app, ["serve", "--help"])
    assert res.exit_code == 0 and "--adapter-root" in res.output and "--admin-token" in res.output
    res = runner.invoke(app, ["serve"])
    assert res.exit_code != 0 and "--base" in res.output
    assert parse_ab(["exp=a:0.25,b:0.75"]) == {"exp": {"a": 0.25, "b": 0.75}}
    base, paths = files
    adapters_dir = str(paths["ad0"].parent)
    from loraplex.compose.router import build_router, save_router

    router_dir = save_router(build_router(NAMES, 32), Path(adapters_dir).parent / "router")
    engine, registry, fastapi_app = build_server(base=str(base), adapters_dir=adapters_dir,
                                                 compositions={"mix": "blend(ad0=0.5,ad1=0.5)"},
                                                 ab_splits=parse_ab(["exp=ad0:1,ad1:1"]), max_batch_size=4,
                                                 router_dir=str(router_dir))
    try:
        assert set(NAMES) <= set(engine.plex.adapters)
        assert {"base", "mix", "exp", "auto"} <= set(registry.known())
        auto = engine.call_on_worker(lambda: registry.resolve("auto", prompt="hello"))
        assert auto.served_by and set(auto.served_by) <= set(NAMES)
        assert engine.max_batch_size == 4 and fastapi_app.title == "loraplex"
        ids = ids_of(engine.plex, "hello")
        assert engine.generate(ids, "ad1", greedy(5), timeout=30).token_ids == reference(engine, "ad1", ids, 5)
    finally:
        engine.close()


def test_config_hook_explains_what_is_missing(tmp_path):
    """Serving a config that was never trained says so, naming the config and the command to run."""
    from loraplex.config import ConfigError
    from loraplex.serve.cli import build_engine_from_config

    cfg = tmp_path / "x.yaml"
    cfg.write_text(f"base_model: m\noutput_dir: {tmp_path / 'out'}\nadapters: {{adapters: {{a: {{}}}}}}\n")
    with pytest.raises(ConfigError, match=r"cannot serve .*x\.yaml: no trained adapters in .*out/adapters; "
                                          r"run `loraplex train .*x\.yaml` first"):
        build_engine_from_config(cfg)
    with pytest.raises(ConfigError, match="config file not found"):
        build_engine_from_config(tmp_path / "missing.yaml")


def test_auto_with_a_routed_model_runs_on_the_worker(engine, plex):
    """`auto` with the real MoE router (loraplex.compose): routing pass on the engine's worker, then the batch."""
    from loraplex.compose.moe import RoutedModel
    from loraplex.compose.router import build_router

    torch.manual_seed(0)
    routed = RoutedModel(plex, build_router(NAMES, plex.model.config.hidden_size, top_k=2))
    reg = ModelRegistry(plex, router=routed)
    for text in PROMPTS[:3]:
        got = engine.call_on_worker(lambda: reg.resolve("auto", prompt=text))
        enc = plex.tokenizer([text], return_tensors="pt")
        want = engine.call_on_worker(lambda: routed.route(enc["input_ids"], enc["attention_mask"]).choices()[0])
        assert got.choice == want and set(got.served_by) == set(want)  # top-2: a blend of two experts
        ids = ids_of(plex, text)
        assert engine.generate(ids, got.choice, greedy(6), timeout=30).token_ids == reference(engine, want, ids, 6)


def test_concurrent_auto_requests_share_one_routing_pass(engine, plex):
    """`auto` requests that arrive while the worker is busy are routed together: one padded routing pass for all of
    them (not one forward per request), each getting the decision the router gives its prompt alone."""
    from loraplex.compose.moe import RoutedModel
    from loraplex.compose.router import build_router

    torch.manual_seed(0)
    router = build_router(NAMES, plex.model.config.hidden_size)
    with torch.no_grad():
        router.head[-1].weight.mul_(40.0)  # spread the random router over the experts
    routed = RoutedModel(plex, router)
    reg = ModelRegistry(plex, router=routed)
    routes = reg.batch_routing(engine.call_on_worker)
    started, gate = threading.Event(), threading.Event()
    hold = threading.Thread(target=lambda: engine.call_on_worker(lambda: (started.set(), gate.wait(30))))
    hold.start()
    assert started.wait(30)  # the worker is busy: routing requests queue up behind it
    got: dict[int, object] = {}
    threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, reg.resolve("auto", prompt=PROMPTS[i])))
               for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while len(routes._pending) < len(PROMPTS) and time.monotonic() < deadline:
        time.sleep(0.01)
    gate.set()
    for t in threads + [hold]:
        t.join(30)
    assert list(routes.batch_sizes) == [len(PROMPTS)]  # one routing pass for all six requests
    for i, text in enumerate(PROMPTS):
        enc = plex.tokenizer([text], return_tensors="pt")
        want = engine.call_on_worker(lambda: routed.route(enc["input_ids"], enc["attention_mask"]).top1[0])
        assert got[i].choice == want and got[i].served_by == [want], (text, got[i], want)
    assert len({got[i].choice for i in got}) > 1  # a real mix of experts, not one answer for all


def test_coalescer_hands_errors_to_every_caller():
    from loraplex.serve.worker import Coalescer

    def boom(items):
        raise ValueError(f"bad batch of {len(items)}")
    with pytest.raises(ValueError, match="bad batch of 1"):
        Coalescer(boom, lambda fn: fn()).submit("x")
    with pytest.raises(RuntimeError, match="returned 0 results for 1 items"):
        Coalescer(lambda items: [], lambda fn: fn()).submit("x")
    assert Coalescer(lambda items: [len(i) for i in items], lambda fn: fn()).submit("abc") == 3


def test_control_queue_runs_calls_on_the_worker_and_fails_them_at_shutdown():
    import threading

    from loraplex.serve.worker import ControlQueue

    cv = threading.Condition()
    q = ControlQueue(cv)
    assert q.call(lambda: threading.current_thread().name, None) == threading.current_thread().name  # no worker
    stop = threading.Event()

    def work():
        while not stop.is_set():
            q.run_pending()
            with cv:
                cv.wait_for(lambda: bool(q) or stop.is_set(), 0.05)

    worker = threading.Thread(target=work, name="the-worker")
    worker.start()
    try:
        assert q.call(lambda: threading.current_thread().name, worker, timeout=5) == "the-worker"
        with pytest.raises(ZeroDivisionError):
            q.call(lambda: 1 / 0, worker, timeout=5)
    finally:
        stop.set()
        with cv:
            cv.notify_all()
        worker.join(5)
    import concurrent.futures

    fut = concurrent.futures.Future()
    q._items.append((lambda: "never", fut))
    q.fail_all(RuntimeError("shutting down"))
    assert not q and isinstance(fut.exception(0), RuntimeError)


def test_an_adapter_change_mid_window_does_not_cut_the_batch_short(plex):
    """A control call (e.g. an admin load) arriving during the batching window runs inside it: the requests of the
    window are still prefilled together in one forward."""
    import threading

    eng = Engine(plex, max_batch_size=8, batch_window_ms=400)
    try:
        ids = ids_of(plex, PROMPTS[0])
        handles = [eng.submit(ids, NAMES[0], greedy(2))]
        ran = threading.Event()
        t = threading.Thread(target=lambda: eng.call_on_worker(ran.set, timeout=10))
        t.start()
        t.join(10)
        assert ran.is_set()  # the call ran while the window was open
        handles += [eng.submit(ids, NAMES[1], greedy(2)) for _ in range(3)]
        assert all(h.result(30).finish_reason == "length" for h in handles)
        assert eng.metrics.batch_size.count(phase="prefill") == 1  # one prefill of all four rows
    finally:
        eng.close()


def test_batching_window_runs_control_calls_and_keeps_waiting():
    """A call queued mid-window runs on the waiting worker, and the window still lasts until it is full or over."""
    import threading
    import time

    from loraplex.serve.worker import ControlQueue

    cv = threading.Condition()
    q = ControlQueue(cv)
    pending: list[int] = []
    seen: dict[str, object] = {}

    def worker():
        with cv:
            t0 = time.monotonic()
            q.batching_window(0.4, lambda: len(pending) >= 3, lambda: False)
            seen["waited"], seen["rows"] = time.monotonic() - t0, len(pending)

    w = threading.Thread(target=worker, name="the-worker")
    w.start()
    time.sleep(0.05)
    assert q.call(lambda: threading.current_thread().name, w, timeout=5) == "the-worker"  # ran inside the window
    for i in range(3):  # the window ends as soon as it is full
        with cv:
            pending.append(i)
            cv.notify_all()
    w.join(5)
    assert seen["rows"] == 3 and seen["waited"] < 0.35
    with cv:  # an empty window lasts its full length; stopping ends it at once
        t0 = time.monotonic()
        q.batching_window(0.1, lambda: False, lambda: False)
        assert time.monotonic() - t0 >= 0.1
        t0 = time.monotonic()
        q.batching_window(5.0, lambda: False, lambda: True)
        assert time.monotonic() - t0 < 0.05
