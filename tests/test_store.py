"""The adapter store: an index of adapter folders, read on first use, tiers disk -> CPU -> slots, served lazily.

References: every output is compared with the same adapter loaded eagerly (``loraplex.load(base, adapters=...)``)
and generated with ``plex.generate``; PEFT equality of eager loading is covered by the other serve tests."""

from __future__ import annotations

import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

import loraplex
from loraplex.adapters.io import CONFIG_NAME, WEIGHTS_NAME, replace_dir
from loraplex.adapters.store import AdapterStore, fingerprint
from loraplex.errors import AdapterError, PathNotAllowedError, UnknownAdapterError
from loraplex.serve import Engine, SamplingParams
from loraplex.serve.testing import random_adapters, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("store_base") / "base")


@pytest.fixture(scope="module")
def base_model(base):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(base))


def greedy(n: int = 6) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0)


def eager_reference(base: Path, paths: dict[str, Path], ids: list[int], n: int = 6) -> dict[str, list[int]]:
    """Each adapter loaded eagerly into its own Plex, greedy ``generate``."""
    plex = loraplex.load(base, adapters={k: str(v) for k, v in paths.items()}, max_slots=max(2, len(paths)))
    out = {}
    for name in paths:
        gen = plex.generate(torch.tensor([ids]), adapters=name, max_new_tokens=n, do_sample=False, pad_token_id=0)
        out[name] = gen[0, len(ids):].tolist()
    return out


# --------------------------------------------------------------------------- the index
def test_index_reads_names_only_and_skips_hidden_and_leftovers(tmp_path, base_model):
    root = tmp_path / "store"
    random_adapters(base_model, root, ["b", "a", "c"])
    shutil.copytree(root / "a", root / ".a.tmp-x1y2z3")
    shutil.copytree(root / "a", root / ".hidden")
    (root / "notes").mkdir()  # no config: not an adapter
    store = AdapterStore(root)
    assert store.names() == ["a", "b", "c"] and len(store) == 3
    assert store.reads == 0
    assert ".a.tmp-x1y2z3" not in store and ".hidden" not in store and "../a" not in store
    assert store.config("b").r == 4 and store.reads == 0  # the config alone, lazily
    assert store.page(after="a", limit=1) == ["b"]
    assert store.suggest("bb") == ["b"]


def test_new_and_removed_folders_without_restart(tmp_path, base_model):
    root = tmp_path / "store"
    random_adapters(base_model, root, ["a"])
    store = AdapterStore(root)
    random_adapters(base_model, root, ["late"], seed=9)
    assert store.names() == ["a"]
    assert "late" in store  # found by a lookup of the name (one stat), before any rescan
    random_adapters(base_model, root, ["later"], seed=10)
    shutil.rmtree(root / "a")
    change = store.rescan()
    assert change.added == ["later"] and change.removed == ["a"]
    assert store.names() == ["late", "later"]


def test_read_is_never_half_of_two_versions(tmp_path, base_model, monkeypatch):
    root = tmp_path / "store"
    paths = random_adapters(base_model, root, ["a"], seed=1)
    other = random_adapters(base_model, tmp_path / "other", ["a"], seed=2)["a"]
    store = AdapterStore(root)
    import loraplex.adapters.store as store_mod

    real = store_mod.load_adapter
    calls = []

    def racing(path, *a, **kw):  # a writer replaces the folder while the first read is under way
        got = real(path, *a, **kw)
        if not calls:
            tmp = root / ".a.tmp-race"
            shutil.copytree(other, tmp)
            replace_dir(tmp, paths["a"])
        calls.append(1)
        return got

    monkeypatch.setattr(store_mod, "load_adapter", racing)
    ad = store.read("a")
    assert len(calls) == 2  # read again after the fingerprint changed
    want = real(other, "a")
    for mod, m in want.modules.items():
        assert torch.equal(ad.modules[mod].A, m.A) and torch.equal(ad.modules[mod].B, m.B)
    assert store.reads == 1 and not store.changed("a")


def test_symlinked_weights_out_of_the_roots_are_refused(tmp_path, base_model):
    root, outside = tmp_path / "store", tmp_path / "outside"
    random_adapters(base_model, root, ["fine"])
    evil = random_adapters(base_model, outside, ["evil"])["evil"]
    (root / "sneaky").mkdir()
    shutil.copy(evil / CONFIG_NAME, root / "sneaky" / CONFIG_NAME)
    os.symlink(evil / WEIGHTS_NAME, root / "sneaky" / WEIGHTS_NAME)
    with pytest.raises(PathNotAllowedError, match="sneaky"):
        AdapterStore(root)
    assert AdapterStore(root, confine_to=[outside]).names() == ["fine", "sneaky"]


# --------------------------------------------------------------------------- the bank's tiers
def test_bank_tiers_and_cpu_budget_holds_after_rereads(tmp_path, base, base_model):
    root = tmp_path / "store"
    names = [f"ad{i:02d}" for i in range(12)]
    paths = random_adapters(base_model, root, names)
    one = loraplex.load_adapter(paths["ad00"]).nbytes
    plex = loraplex.load(base, max_slots=2, cpu_budget_bytes=3 * one)
    plex.attach_store(AdapterStore(root))
    assert plex.adapters == names and plex.cpu_adapters() == 0 and plex.nbytes()["cpu"] == 0
    ids = torch.tensor([[5, 6, 7]])
    eager = loraplex.load(base, adapters={n: str(p) for n, p in paths.items()}, max_slots=2)
    for _ in range(2):  # the second round re-reads what the budget dropped; the budget holds again
        for n in names:
            got = plex(ids, adapters=n).logits
            assert torch.allclose(got, eager(ids, adapters=n).logits, atol=1e-5), n
            assert plex.nbytes()["cpu"] <= 3 * one + one
    st = plex.stats
    assert st.disk_loads == len(names) and st.disk_reloads >= len(names) - 3 and st.cpu_evictions > 0
    assert plex.cpu_adapters() <= 4


def test_in_memory_adapters_still_register(tmp_path, base, base_model):
    root = tmp_path / "store"
    paths = random_adapters(base_model, root, ["s1"])
    extra = random_adapters(base_model, tmp_path / "extra", ["mine"], seed=5)
    plex = loraplex.load(base)
    plex.attach_store(AdapterStore(root))
    plex.add_adapter("mine", loraplex.load_adapter(extra["mine"]))
    assert plex.adapters == ["mine", "s1"] and "mine" in plex and "s1" in plex
    with pytest.raises(UnknownAdapterError):
        plex.get_adapter("nope")
    assert plex.get_adapter("s1").path == str(paths["s1"])


# --------------------------------------------------------------------------- serving
@pytest.fixture()
def served(tmp_path, base, base_model):
    from loraplex.serve.cli import build_server

    root = tmp_path / "store"
    names = [f"ad{i:02d}" for i in range(30)]
    paths = random_adapters(base_model, root, names)
    engine, registry, app = build_server(base=str(base), adapters_dir=str(root), max_batch_size=16,
                                         batch_window_ms=2, rescan_seconds=0)
    client = TestClient(app)
    yield {"engine": engine, "client": client, "root": root, "paths": paths, "names": names,
           "store": engine.plex.store}
    client.close()
    engine.close()


def _complete(client, model, prompt="hello world", n=6):
    return client.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": n,
                                                "temperature": 0})


def test_listing_loads_nothing_and_pages(served):
    c, store = served["client"], served["store"]
    body = c.get("/v1/models").json()
    assert body["x_loraplex"]["adapters"] == 30 and not body["has_more"]
    assert sorted(m["id"] for m in body["data"] if m["x_loraplex_kind"] == "adapter") == served["names"]
    page = c.get("/v1/models", params={"limit": 10}).json()
    ids = [m["id"] for m in page["data"] if m["x_loraplex_kind"] == "adapter"]
    assert ids == served["names"][:10] and page["has_more"] and page["last_id"] == "ad09"
    nxt = c.get("/v1/models", params={"limit": 10, "after": page["last_id"]}).json()
    assert [m["id"] for m in nxt["data"]] == served["names"][10:20]
    assert c.get("/v1/models/ad07").json()["id"] == "ad07"
    assert store.reads == 0 and served["engine"].plex.cpu_adapters() == 0


def test_404_body_is_small(served):
    from loraplex.errors import LIST_LIMIT

    assert len(served["names"]) > LIST_LIMIT
    r = _complete(served["client"], "ad7x")
    err = r.json()["error"]
    assert r.status_code == 404 and err["known_count"] == 31  # 30 adapters + the base model
    assert 0 < len(err["known_models"]) <= 5 and all(n.startswith("ad") for n in err["known_models"])
    assert len(r.content) < 1000


def test_adapter_copied_in_while_serving_is_served_at_once(served, base, base_model, tmp_path):
    c = served["client"]
    assert _complete(c, "ad00").status_code == 200
    staged = random_adapters(base_model, tmp_path / "staging", ["fresh"], seed=77)["fresh"]
    tmp = served["root"] / ".fresh.tmp-abc123"
    shutil.copytree(staged, tmp)
    os.replace(tmp, served["root"] / "fresh")  # an atomic copy into the store
    r = _complete(c, "fresh")
    assert r.status_code == 200, r.text
    ids = served["engine"].plex.tokenizer("hello world").input_ids
    want = eager_reference(base, {"fresh": staged}, ids)["fresh"]
    assert r.json()["choices"][0]["text"] == served["engine"].plex.tokenizer.decode(want, skip_special_tokens=True)
    assert "fresh" in {m["id"] for m in c.get("/v1/models").json()["data"]}


def test_corrupt_adapter_is_a_4xx_and_the_server_stays_up(served):
    c, root = served["client"], served["root"]
    bad = root / "broken"
    shutil.copytree(root / "ad01", bad)
    (bad / WEIGHTS_NAME).write_bytes(b"\x00garbage, not safetensors")
    wrong = root / "wrongshape"
    shutil.copytree(root / "ad02", wrong)
    (wrong / CONFIG_NAME).write_text('{"peft_type": "LORA", "r": 9, "lora_alpha": 8, "target_modules": ["q_proj"]}')
    for name, says in (("broken", "corrupt or unreadable safetensors"), ("wrongshape", "rank")):
        r = _complete(c, name)
        assert 400 <= r.status_code < 500, r.text
        assert name in r.json()["error"]["message"] and says in r.json()["error"]["message"]
    assert c.get("/health").json()["status"] == "ok"
    assert _complete(c, "ad03").status_code == 200
    metrics = c.get("/metrics").text
    assert "loraplex_cache_load_errors_total 2" in metrics


def test_replaced_adapter_is_picked_up_after_a_rescan(served, base, base_model, tmp_path):
    c, root, store = served["client"], served["root"], served["store"]
    first = _complete(c, "ad04").json()["choices"][0]["text"]
    new = random_adapters(base_model, tmp_path / "v2", ["ad04"], seed=999)["ad04"]
    tmp = root / ".ad04.tmp-v2"
    shutil.copytree(new, tmp)
    replace_dir(tmp, root / "ad04")
    assert store.rescan().changed == ["ad04"]
    second = _complete(c, "ad04").json()["choices"][0]["text"]
    ids = served["engine"].plex.tokenizer("hello world").input_ids
    want = eager_reference(base, {"ad04": new}, ids)["ad04"]
    assert second == served["engine"].plex.tokenizer.decode(want, skip_special_tokens=True)
    assert second != first and store.read_counts["ad04"] == 2


def test_200_concurrent_first_requests_to_50_cold_adapters(tmp_path, base, base_model):
    """Each adapter read once; every answer equals the same adapter loaded eagerly; slots (32) fewer than the
    adapters (50), so admission schedules around them."""
    root = tmp_path / "store"
    names = [f"cold{i:02d}" for i in range(50)]
    paths = random_adapters(base_model, root, names)
    store = AdapterStore(root)
    plex = loraplex.load(base, max_slots=32)
    plex.attach_store(store)
    ids = plex.tokenizer("the quick brown fox").input_ids
    want = eager_reference(base, paths, ids, 4)
    engine = Engine(plex, max_batch_size=16, batch_window_ms=2, max_queue=256)
    try:
        barrier = threading.Barrier(20)

        def ask(i: int) -> tuple[str, list[int]]:
            if i < 20:
                barrier.wait()
            name = names[i % 50]
            return name, engine.generate(ids, name, greedy(4), timeout=120).token_ids

        with ThreadPoolExecutor(20) as pool:
            got = list(pool.map(ask, range(200)))
        assert all(toks == want[name] for name, toks in got)
        assert store.read_counts == {n: 1 for n in names} and store.reads == 50
        assert plex.stats.disk_loads == 50 and plex.stats.disk_reloads == 0
        assert engine.metrics.tier_load_seconds.count(tier="disk") == 50
    finally:
        engine.close()


def test_scarce_slots_do_not_cap_the_batch(tmp_path, base, base_model):
    """2 slots, 3 adapters: rows sharing the running adapters join the batch (more than 2 rows per forward), the
    third adapter's rows wait a bounded number of admissions and are served right."""
    root = tmp_path / "store"
    paths = random_adapters(base_model, root, ["x", "y", "z"])
    plex = loraplex.load(base, max_slots=2)
    plex.attach_store(AdapterStore(root))
    ids = plex.tokenizer("once upon a time").input_ids
    want = eager_reference(base, paths, ids, 8)
    engine = Engine(plex, max_batch_size=12, batch_window_ms=20, max_queue=256, max_skips=3)
    try:
        for n in ("x", "y", "z"):  # warm: all in the CPU tier
            engine.generate(ids, n, greedy(1), timeout=60)
        handles = [engine.submit(ids, "xyz"[i % 3], greedy(8)) for i in range(24)]
        for i, h in enumerate(handles):
            assert h.result(timeout=120).token_ids == want["xyz"[i % 3]]
        hist = engine.metrics.batch_size
        with hist._lock:
            counts, _ = hist._values[("decode",)]
        assert counts[-1] - counts[1] > 0  # some decode steps ran more than 2 rows
    finally:
        engine.close()


def test_unknown_adapter_error_lists_all_when_few_and_near_matches_when_many():
    small = UnknownAdapterError("zz", ["a", "b"])
    assert str(small) == "unknown adapter 'zz'; known adapters: a, b" and small.listed() == ["a", "b"]
    many = UnknownAdapterError("ad071x", [f"ad{i:03d}" for i in range(500)])
    assert "did you mean" in str(many) and "500 adapters are known" in str(many)
    assert "ad071" in many.listed() and len(many.listed()) <= 5 and len(str(many)) < 200


def test_store_errors_name_the_adapter(tmp_path, base_model):
    with pytest.raises(AdapterError, match="adapter store folder not found"):
        AdapterStore(tmp_path / "missing")
    root = tmp_path / "store"
    random_adapters(base_model, root, ["a"])
    store = AdapterStore(root)
    with pytest.raises(AdapterError, match="'nope' is not in the adapter store"):
        store.read("nope")
    before = fingerprint(root / "a")
    (root / "a" / CONFIG_NAME).write_text((root / "a" / CONFIG_NAME).read_text() + " ")
    assert fingerprint(root / "a") != before


@pytest.mark.slow
def test_scale_benchmark_quick_runs():
    """``benchmarks/scale.py --quick`` on two small stores (the full run is 10 / 1,000 / 10,000 adapters)."""
    import subprocess
    import sys

    script = Path(__file__).parent.parent / "benchmarks" / "scale.py"
    res = subprocess.run([sys.executable, str(script), "--quick", "--sizes", "10,100", "--rounds", "1",
                          "--requests", "16"], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "| 100 |" in res.stdout and "targets:" in res.stdout


@pytest.mark.parametrize("seconds", [0.2, 0])
def test_serve_cli_rescan_seconds(tmp_path, base, base_model, monkeypatch, seconds):
    """``loraplex serve --rescan-seconds N``: a folder copied into the store joins the listing within a few
    periods without any request naming it; with 0 there are no periodic rescans (not listed after the same wait),
    yet a request for the name still finds it on disk and serves it."""
    import time

    from typer.testing import CliRunner

    import loraplex.serve.server as server_mod
    from loraplex.cli import app as cli_app

    root = tmp_path / "store"
    random_adapters(base_model, root, ["a"])
    staged = random_adapters(base_model, tmp_path / "staging", ["late"], seed=31)["late"]
    seen: dict = {}

    def fake_run(app, **kw):
        with TestClient(app) as client:
            def listed() -> set:
                return {m["id"] for m in client.get("/v1/models").json()["data"]}

            seen["before"] = listed()
            shutil.copytree(staged, root / ".late.tmp-1")
            os.replace(root / ".late.tmp-1", root / "late")
            deadline = time.monotonic() + 3.0
            while "late" not in listed() and time.monotonic() < deadline:
                time.sleep(0.05)
            seen["after_wait"] = listed()
            seen["watching"] = app.state.engine.plex.store.watching
            seen["served"] = _complete(client, "late").status_code
            seen["after_request"] = listed()

    monkeypatch.setattr(server_mod, "serve", fake_run)
    res = CliRunner().invoke(cli_app, ["serve", "--base", str(base), "--adapters-dir", str(root),
                                       "--rescan-seconds", str(seconds)])
    assert res.exit_code == 0, res.output
    assert "late" not in seen["before"] and seen["served"] == 200 and "late" in seen["after_request"]
    assert seen["watching"] == (seconds > 0)
    assert ("late" in seen["after_wait"]) == (seconds > 0)
    bad = CliRunner().invoke(cli_app, ["serve", "--base", str(base), "--adapters-dir", str(root),
                                       "--rescan-seconds", "-1"])
    assert bad.exit_code == 2 and "--rescan-seconds" in bad.output


# --------------------------------------------------------------------------- the encoder server's store
ENC_TEXTS = ["the invoice was wrong", "my parcel never came", "great service, thanks", "reset my password"]
ENC_LABELS = ["neg", "neu", "pos"]


@pytest.fixture(scope="module")
def encoder_store(tmp_path_factory):
    """A tiny random BERT (conftest's factory, MiniLM's vocabulary and tokenizer) and 6 classification adapters
    with heads, each with its PEFT reference model."""
    from peft import PeftModel
    from transformers import BertForSequenceClassification

    from conftest import tiny_bert
    from loraplex.serve.testing import minilm_tokenizer, task_adapters

    tmp = tmp_path_factory.mktemp("enc_store")
    base = tmp / "bert"
    tok = minilm_tokenizer()
    tiny_bert(vocab_size=tok.vocab_size, max_position_embeddings=128).save_pretrained(str(base))
    tok.save_pretrained(str(base))
    names = [f"t{i}" for i in range(6)]
    staged = task_adapters(tmp / "staged", {n: ("classification", ENC_LABELS) for n in names + ["late"]},
                           base=base, head_std=1.0)
    root = tmp / "store"
    root.mkdir()
    for n in names:
        shutil.copytree(staged[n], root / n)
    peft = {}
    for n in names + ["late"]:
        model = BertForSequenceClassification.from_pretrained(str(base), num_labels=len(ENC_LABELS))
        peft[n] = PeftModel.from_pretrained(model, str(staged[n])).eval()
    return {"base": base, "root": root, "names": names, "staged": staged, "peft": peft, "tok": tok,
            "one": loraplex.load_adapter(staged["t0"]).nbytes}


def _peft_scores(env, name: str, text: str) -> dict[str, float]:
    with torch.no_grad():
        logits = env["peft"][name](**env["tok"](text, return_tensors="pt")).logits[0]
    return dict(zip(ENC_LABELS, torch.softmax(logits, -1).tolist()))


def _check_classified(env, name: str, text: str, item: dict) -> None:
    want = _peft_scores(env, name, text)
    assert item["head"] == name and item["served_by"] == [name] and item["task"] == "classification"
    assert item["label"] == max(want, key=want.get)
    for lab, p in want.items():
        assert item["scores"][lab] == pytest.approx(p, abs=1e-5), (name, text, lab)


def test_classify_store_is_lazy_concurrent_first_requests_read_once(tmp_path, encoder_store):
    """Start-up reads nothing (the listing's tasks come from loraplex_meta.json); 48 concurrent first requests to
    6 cold adapters each equal PEFT, each adapter read once; a folder copied in while serving is served."""
    from loraplex.serve import ServerThread
    from loraplex.serve.classify import build_classify_server
    import httpx

    env = encoder_store
    root = tmp_path / "store"
    shutil.copytree(env["root"], root)
    batcher, _, app = build_classify_server(base=str(env["base"]), adapters_dir=str(root), rescan_seconds=0,
                                            batch_window_ms=5)
    store = batcher.plex.store
    try:
        assert store.reads == 0 and len(batcher.heads) == 0
        with ServerThread(app) as srv, httpx.Client(base_url=srv.url, timeout=120) as client:
            cards = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
            assert cards["t3"]["x_loraplex_task"] == {"task": "classification", "labels": ENC_LABELS}
            r = client.post("/v1/classify", json={"model": "base", "input": ENC_TEXTS[0]})  # no head, nothing read
            err = r.json()["error"]
            assert r.status_code == 400 and err["code"] == "no_task_head" and err["adapters_with_heads"] == []
            assert "adapters of the store not read yet are not listed" in err["message"]
            assert store.reads == 0

            def ask(i: int) -> tuple[str, str, dict]:
                name, text = env["names"][i % 6], ENC_TEXTS[i % 4]
                r = client.post("/v1/classify", json={"model": name, "input": text})
                assert r.status_code == 200, r.text
                return name, text, r.json()["data"][0]

            with ThreadPoolExecutor(12) as pool:
                for name, text, item in pool.map(ask, range(48)):
                    _check_classified(env, name, text, item)
            assert store.read_counts == {n: 1 for n in env["names"]}
            assert batcher.plex.stats.disk_loads == 6 and batcher.plex.stats.disk_reloads == 0
            assert "loraplex_admissions_loading_total" in client.get("/metrics").text

            tmp = root / ".late.tmp-1"
            shutil.copytree(env["staged"]["late"], tmp)
            os.replace(tmp, root / "late")
            r = client.post("/v1/classify", json={"model": "late", "input": ENC_TEXTS[0]})
            assert r.status_code == 200, r.text
            _check_classified(env, "late", ENC_TEXTS[0], r.json()["data"][0])
    finally:
        batcher.close()


def test_classify_store_cpu_budget_and_bad_adapters(tmp_path, encoder_store):
    """Under a CPU budget of two adapters the tier (task heads included) stays bounded while every answer still
    equals PEFT; a corrupt weights file and an invalid meta are 400s naming the adapter; the server stays up."""
    from loraplex.serve.classify import build_classify_server

    env = encoder_store
    root = tmp_path / "store"
    shutil.copytree(env["root"], root)
    shutil.copytree(root / "t0", root / "broken")
    (root / "broken" / WEIGHTS_NAME).write_bytes(b"\x00not safetensors")
    shutil.copytree(root / "t1", root / "badmeta")
    (root / "badmeta" / "loraplex_meta.json").write_text('{"task": "regression", "labels": ["x"]}')
    one = env["one"]
    batcher, _, app = build_classify_server(base=str(env["base"]), adapters_dir=str(root), rescan_seconds=0,
                                            cpu_budget_mb=2.5 * one / 2**20, max_slots=2)
    plex = batcher.plex
    try:
        with TestClient(app) as client:
            for _ in range(2):
                for name in env["names"]:
                    r = client.post("/v1/classify", json={"model": name, "input": ENC_TEXTS[1]})
                    assert r.status_code == 200, r.text
                    _check_classified(env, name, ENC_TEXTS[1], r.json()["data"][0])
                    assert plex.nbytes()["cpu"] <= 2.5 * one + one
                    assert len(batcher.heads) <= 4  # heads leave with their CPU copies
            assert plex.stats.disk_reloads >= 6 and plex.stats.cpu_evictions > 0
            for name, says in (("broken", "corrupt or unreadable safetensors"), ("badmeta", "'task' must be one of")):
                r = client.post("/v1/classify", json={"model": name, "input": ENC_TEXTS[0]})
                assert r.status_code == 400, r.text
                assert name in r.json()["error"]["message"] and says in r.json()["error"]["message"]
            assert client.get("/health").json()["status"] == "ok"
            r = client.post("/v1/classify", json={"model": "t2", "input": ENC_TEXTS[2]})
            _check_classified(env, "t2", ENC_TEXTS[2], r.json()["data"][0])
    finally:
        batcher.close()
