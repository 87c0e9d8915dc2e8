"""Scale-out on Ray Serve: a private Ray on loopback with 2 replicas of a tiny Llama and 4 adapters in a shared
store. Outputs equal ``plex.generate`` per adapter; repeated requests land on a replica that already holds the
adapter (the replica reports ``replica_had_model``); LRU eviction past ``max_adapters_per_replica``; training
fan-out as Ray tasks equals sequential training. Store, naming and the replica's adapter set are also tested
without Ray."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter

import httpx
import pytest
import torch

import loraplex
from loraplex.distributed import AdapterStore, RaySettings, StoreCatalog, adapters_of, model_id_for
from loraplex.distributed.adapters import AdapterSet
from loraplex.distributed.asgi import SSEStamper, stamp_json
from loraplex.errors import AdapterError, UnknownAdapterError
from loraplex.serve import Engine, ModelRegistry
from loraplex.serve.testing import peft_adapters, tiny_llama

NAMES = ["ad0", "ad1", "ad2", "ad3"]
PROMPTS = ["hello world", "the quick brown fox jumps over the lazy dog", "python is a programming language"]


class KeywordRouter:
    """A text router run at the ingress: 'code' prompts -> ad1, the rest -> an even blend of ad2 and ad3."""

    def route_texts(self, texts):
        return ["ad1" if "code" in t else {"ad2": 0.5, "ad3": 0.5} for t in texts]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    base = tiny_llama(tmp / "base")
    peft_adapters(base, tmp / "store", NAMES)
    return {"base": base, "root": tmp / "store", "tmp": tmp}


@pytest.fixture(scope="module")
def reference(store, one_thread):
    """A single-process plex with every adapter: the independent reference (greedy plex.generate)."""
    plex = loraplex.load(store["base"], max_slots=8)
    for n in NAMES:
        plex.add_adapter(n, store["root"] / n)

    def text(choice, prompt, n):
        tok = plex.tokenizer
        ids = tok(prompt).input_ids
        out = plex.generate(torch.tensor([ids]), adapters=choice, max_new_tokens=n, do_sample=False, pad_token_id=0)
        return tok.decode(out[0, len(ids):].tolist(), skip_special_tokens=True)

    return text


# --------------------------------------------------------------------------- without Ray
def test_store_finds_adapters_by_name_and_refuses_paths(store, tmp_path):
    s = AdapterStore.of(store["root"], paths={"extra": store["root"] / "ad1"})
    assert s.names() == ["extra", *NAMES]
    assert s.path("ad2") == store["root"].resolve() / "ad2"
    assert s.path("extra") == store["root"].resolve() / "ad1"
    assert s.find("../store/ad0") is None and s.find("..") is None and s.find("nope") is None
    with pytest.raises(UnknownAdapterError) as e:
        s.path("nope")
    assert "nope" in str(e.value) and "ad3" in str(e.value)
    with pytest.raises(AdapterError, match="adapter store folder not found: .*missing"):
        AdapterStore.of(tmp_path / "missing")
    (tmp_path / "new").mkdir()
    late = AdapterStore.of(tmp_path)
    assert late.names() == []
    loraplex.save_adapter(loraplex.load_adapter(store["root"] / "ad0", "fresh"), tmp_path / "fresh")
    assert late.names() == ["fresh"]  # written into the store -> found, nothing registered


def test_ingress_resolves_names_with_the_registry_rules(store):
    cat = StoreCatalog(AdapterStore.of(store["root"]))
    reg = ModelRegistry(cat, base_id="tiny", compositions={"mix": "blend(ad0=0.7,ad1=0.3)", "st": "stack(ad2,ad3)"},
                        ab_splits={"exp": {"ad0": 1.0, "ad1": 0.0}}, router=KeywordRouter())
    mid = lambda m, p="": model_id_for(reg.resolve(m, prompt=p).choice)  # noqa: E731
    assert mid("tiny") == "" and mid("base") == ""
    assert mid("ad2") == "ad2"
    assert mid("mix") == "blend(ad0=0.7,ad1=0.3)"
    assert mid("st") == "blend(ad2=1.0,ad3=1.0)"
    assert mid("exp") == "ad0"
    assert mid("auto", "write code") == "ad1" and mid("auto", "hi") == "blend(ad2=0.5,ad3=0.5)"
    with pytest.raises(UnknownAdapterError):
        reg.resolve("ad9")
    # ids round-trip through the replica's parser exactly, and name the adapters to load
    assert adapters_of("") == [] and adapters_of("ad1") == ["ad1"]
    assert adapters_of(model_id_for({"ad0": 1 / 3, "ad3": -0.25})) == ["ad0", "ad3"]
    from loraplex.serve.registry import parse_spec
    assert parse_spec(model_id_for({"ad0": 1 / 3, "ad3": -0.25})) == {"ad0": 1 / 3, "ad3": -0.25}
    cards = {c["id"]: c for c in reg.list_models()}
    assert cards["ad1"]["root"] == str(store["root"].resolve() / "ad1")
    assert cards["mix"]["parent"] == ["ad0", "ad1"] and "auto" in cards


def test_stamping_restores_model_and_adds_replica_info():
    body = json.dumps({"model": "blend(a=0.5,b=0.5)", "x_loraplex": {"served_by": ["a", "b"]}}).encode()
    out = json.loads(stamp_json(body, "mix", {"replica": "r1"}))
    assert out == {"model": "mix", "x_loraplex": {"served_by": ["a", "b"], "replica": "r1"}}
    st = SSEStamper("mix", {"replica": "r1"})
    ev = b'data: {"model": "x", "choices": []}\n\n'
    raw = st.feed(ev[:10]) + st.feed(ev[10:] + b"data: [DONE]\n\n") + st.flush()
    assert raw == b'data: {"model": "mix", "choices": [], "x_loraplex": {"replica": "r1"}}\n\ndata: [DONE]\n\n'


def test_replica_loads_stay_inside_the_store(store, tmp_path):
    """A store folder whose weights file is a symlink to a file outside the roots is refused by the replica's
    loader (PathNotAllowedError naming the file and the link's target), like the admin load; the same adapter
    copied in whole loads."""
    import shutil

    from loraplex.errors import PathNotAllowedError

    root = tmp_path / "root"
    shutil.copytree(store["root"] / "ad0", root / "good")
    (root / "sneaky").mkdir()
    shutil.copy(store["root"] / "ad0" / "adapter_config.json", root / "sneaky" / "adapter_config.json")
    (root / "sneaky" / "adapter_model.safetensors").symlink_to(store["root"] / "ad0" / "adapter_model.safetensors")
    plex = loraplex.load(store["base"], max_slots=4)
    engine = Engine(plex, max_batch_size=2)
    aset = AdapterSet(engine, AdapterStore.of(root))

    async def scenario():
        with pytest.raises(PathNotAllowedError, match=r"sneaky/adapter_model.safetensors' \(a symlink to .*\) is "
                                                      r"outside the allowed adapter roots"):
            await aset.hold("sneaky")
        held = await aset.hold("good")
        assert plex.adapters == ["good"]
        held.release()

    try:
        asyncio.run(scenario())
    finally:
        engine.close()


def test_adapter_set_refcounts_loads_and_unloads(store):
    plex = loraplex.load(store["base"], max_slots=4)
    engine = Engine(plex, max_batch_size=2)
    aset = AdapterSet(engine, AdapterStore.of(store["root"]))

    async def scenario():
        held = await aset.hold("blend(ad0=0.5,ad1=0.5)")
        assert sorted(plex.adapters) == ["ad0", "ad1"] and aset.loads == 2
        async with aset.using(["ad1", "ad2"]):  # a request on ad1 (held) and ad2 (loaded for it)
            assert sorted(plex.adapters) == ["ad0", "ad1", "ad2"] and aset.loads == 3
            held.release()  # Ray evicts the blend while the request runs: ad0 goes, ad1 stays for the request
            await asyncio.sleep(0.3)
            assert sorted(plex.adapters) == ["ad1", "ad2"] and "blend(ad0=0.5,ad1=0.5)" not in aset.held
        for _ in range(50):
            if not plex.adapters:
                break
            await asyncio.sleep(0.05)
        assert plex.adapters == [] and aset.unloads == 3
        with pytest.raises(UnknownAdapterError):
            await aset.hold("ad9")
        assert not aset.refs  # a failed load leaves no count behind

    try:
        asyncio.run(scenario())
    finally:
        engine.close()


def test_serve_cli_ray_needs_a_store(store):
    from typer.testing import CliRunner

    from loraplex.cli import app
    res = CliRunner().invoke(app, ["serve", "--ray", "--base", str(store["base"])])
    assert res.exit_code == 2 and "--ray needs --adapters-dir" in res.stderr
    res = CliRunner().invoke(app, ["serve", "--ray", "--base", str(store["base"]), "--adapters-dir", "/nonexistent"])
    assert res.exit_code == 2 and "adapter store folder not found: /nonexistent" in res.stderr


# --------------------------------------------------------------------------- on Ray Serve
ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'loraplex[ray]')")
pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'loraplex[ray]')")


def test_replicas_load_a_quantized_base(store):
    """``loraplex serve --ray --quantize int4``: every replica quantizes its base (checked on the replica class
    itself, without a cluster); an unknown scheme fails when the settings are made, naming the choices."""
    from typer.testing import CliRunner

    from loraplex.cli import app
    from loraplex.distributed.deployments import ReplicaCore
    from loraplex.quant import quantized_modules

    settings = RaySettings(base=str(store["base"]), store=AdapterStore.of(store["root"]), quantize="4")
    assert settings.quantize == "int4"
    core = ReplicaCore(settings, "r0")
    try:
        layers = quantized_modules(core.plex.model)
        assert layers and {m.scheme for n, m in layers.items() if n != "lm_head"} == {"int4"}
    finally:
        core.engine.close()
    with pytest.raises(ValueError, match="quantize must be 'int8'"):
        RaySettings(base=str(store["base"]), quantize="int3")
    res = CliRunner().invoke(app, ["serve", "--ray", "--base", str(store["base"]), "--adapters-dir",
                                   str(store["root"]), "--quantize", "fp8"])
    assert res.exit_code == 2 and "quantize must be 'int8' (8 bits), 'int4' (4 bits) or None" in res.stderr


@pytest.fixture(scope="module")
def local_ray():
    """A private Ray on loopback: 2 CPUs, 80 MB object store, no dashboard; shut down after the module."""
    from loraplex.distributed import init_ray, stop

    t0 = time.monotonic()
    init_ray(num_cpus=2, object_store_mb=80)
    try:
        yield time.monotonic() - t0
    finally:
        stop()


@pytest.fixture(scope="module")
def cluster(store, local_ray):
    import sys

    from ray import cloudpickle

    from loraplex.distributed import RaySettings, start_app
    from loraplex.serve.server import free_port

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # KeywordRouter travels to the ingress by value
    t0 = time.monotonic()
    broken = store["tmp"] / "broken_store" / "broken"
    broken.mkdir(parents=True)
    (broken / "adapter_config.json").write_text("{not json")
    stores = AdapterStore.of([store["root"], broken.parent])
    settings = RaySettings(base=str(store["base"]), store=stores, base_id="tiny",
                           replicas=2, max_adapters_per_replica=2, compositions={"mix": "blend(ad0=0.7,ad1=0.3)"},
                           router=KeywordRouter(), replica_cpus=0, torch_threads=1, batch_window_ms=2)
    url = start_app(settings, port=free_port(), timeout_s=240)
    startup = time.monotonic() - t0
    with httpx.Client(base_url=url, timeout=120) as client:
        yield {"client": client, "startup": startup, "ray_init": local_ray}


def complete(client, model, prompt, n=10, **kw):
    r = client.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0,
                                            **kw})
    assert r.status_code == 200, r.text
    return r.json()


def test_ray_outputs_equal_generate_and_requests_stick_to_replicas(cluster, reference):
    client = cluster["client"]
    first: dict[str, str] = {}
    for i, name in enumerate(NAMES):  # warm: each adapter loaded on some replica
        body = complete(client, name, PROMPTS[i % len(PROMPTS)])
        x = body["x_loraplex"]
        assert body["model"] == name and x["served_by"] == [name] and x["multiplexed_model_id"] == name
        assert body["choices"][0]["text"] == reference(name, PROMPTS[i % len(PROMPTS)], 10), name
        assert name in x["replica_models"] and len(x["replica_models"]) <= 2
        first[name] = x["replica"]
        time.sleep(1.0)  # a replica pushes its model ids every 0.1 s; let the router learn before the next one
    assert sorted(Counter(first.values()).values()) == [2, 2]  # a new adapter goes to the replica with fewest
    for rnd in range(2):
        for i, name in enumerate(NAMES):
            prompt = PROMPTS[(i + rnd + 1) % len(PROMPTS)]
            body = complete(client, name, prompt)
            x = body["x_loraplex"]
            assert body["choices"][0]["text"] == reference(name, prompt, 10), name
            assert x["replica_had_model"] is True, (name, x)  # landed where the adapter already was
            assert x["replica"] == first[name], (name, x)
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["replicas"] == 2
    print(f"\nray init {cluster['ray_init']:.1f}s, serve app (2 replicas) up in {cluster['startup']:.1f}s")


def test_ray_compositions_auto_chat_stream_and_errors(cluster, reference):
    client = cluster["client"]
    body = complete(client, "mix", PROMPTS[1])
    x = body["x_loraplex"]
    assert body["model"] == "mix" and x["multiplexed_model_id"] == "blend(ad0=0.7,ad1=0.3)"
    assert x["replica_had_model"] is False and x["served_by"] == ["ad0", "ad1"]
    assert len(x["replica_models"]) == 2 and x["multiplexed_model_id"] in x["replica_models"]  # LRU evicted one
    assert body["choices"][0]["text"] == reference({"ad0": 0.7, "ad1": 0.3}, PROMPTS[1], 10)
    body = complete(client, "auto", "some code please")
    assert body["x_loraplex"]["routed_to"] == "ad1" and body["model"] == "auto"
    assert body["choices"][0]["text"] == reference("ad1", "some code please", 10)
    body = complete(client, "tiny", PROMPTS[0])
    assert body["x_loraplex"]["multiplexed_model_id"] == "" and body["x_loraplex"]["served_by"] == []
    assert body["choices"][0]["text"] == reference(None, PROMPTS[0], 10)
    # streaming: chunks join to the non-streamed text, each stamped with the replica
    with client.stream("POST", "/v1/completions", json={"model": "ad2", "prompt": PROMPTS[2], "max_tokens": 10,
                                                        "temperature": 0, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == reference("ad2", PROMPTS[2], 10)
    assert all(c["model"] == "ad2" and c["x_loraplex"]["replica"] for c in chunks)
    # chat goes through the same path
    r = client.post("/v1/chat/completions", json={"model": "ad3", "messages": [{"role": "user", "content": "hi"}],
                                                  "max_tokens": 6, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["object"] == "chat.completion" and r.json()["x_loraplex"]["served_by"] == ["ad3"]
    # errors keep OpenAI's shape
    r = client.post("/v1/completions", json={"model": "ad9", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert "ad3" in r.json()["error"]["message"]
    r = client.post("/v1/completions", json={"model": "ad0", "prompt": "x", "max_tokens": 10**6})
    assert r.status_code == 400 and r.json()["error"]["code"] == "max_tokens_too_large"
    r = client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/tmp"})
    assert r.status_code == 501 and "adapter store" in r.json()["error"]["message"]
    r = client.post("/v1/completions", json={"model": "broken", "prompt": "x", "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["code"] == "adapter_load_failed", r.text
    assert "failed to load 'broken' from the adapter store" in r.json()["error"]["message"]
    assert client.get("/health").json()["status"] == "ok"
    assert complete(client, "ad0", "x", 2)["x_loraplex"]["served_by"] == ["ad0"]
    ids = {c["id"] for c in client.get("/v1/models").json()["data"]}
    assert ids == {"tiny", *NAMES, "broken", "mix", "auto"}


def test_ray_train_fans_adapters_out_and_equals_sequential_training(local_ray, tmp_path):
    """Each adapter trains in its own Ray task; adapters, losses, logs, merge and state.json land in the output
    folder as a local run's would, with the same weights as ``loraplex train --sequential``."""
    from train_project import pairs, save_tiny_llama, write_csv, write_jsonl, write_yaml

    from loraplex.distributed import ray_train
    from loraplex.train import train
    from loraplex.run import TrainedRun

    save_tiny_llama(tmp_path / "base")
    write_csv(tmp_path / "a.csv", pairs("a", 8, 3))
    write_jsonl(tmp_path / "b.jsonl", pairs("b", 8, 3))
    targets = ["q_proj", "v_proj"]
    cfg = {"base_model": "base", "model_type": "llm", "output_dir": str(tmp_path / "out"),
           "adapters": {"adapters": {"a": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0,
                                           "target_modules": targets, "dataset": "a.csv"},
                                     "b": {"type": "lora", "r": 2, "alpha": 4, "dropout": 0.1,
                                           "target_modules": targets, "dataset": "b.jsonl"}},
                        "merge": {"name": "ab", "sources": ["a", "b"], "weights": [0.5, 0.5],
                                  "combination_type": "linear"}},
           "input_features": [{"name": "prompt", "type": "text"}],
           "output_features": [{"name": "response", "type": "text"}],
           "trainer": {"epochs": 1, "learning_rate": 5e-2, "batch_size": 4, "max_length": 16, "seed": 7}}
    path = write_yaml(tmp_path / "cfg.yaml", cfg)
    t0 = time.monotonic()
    res = ray_train(path, device="cpu", log=lambda m: None)
    wall = time.monotonic() - t0
    seq = train(path, output_dir=tmp_path / "seq", progress=False, joint=False, device="cpu", log=lambda m: None)
    out = tmp_path / "out"
    assert sorted(res.trained) == ["a", "b"] and res.merges == ["ab"]
    assert not (out / ".ray-work").exists()
    state = TrainedRun(out).load_state()
    assert sorted(state["adapters"]) == ["a", "b"] and "ab" in state["merges"]
    for n in ("a", "b"):
        assert res.losses[n] == pytest.approx(seq.losses[n], abs=1e-6)
        assert json.loads((out / "logs" / f"{n}.json").read_text())["losses"] == pytest.approx(seq.losses[n])
        got, ref = loraplex.load_adapter(out / "adapters" / n), loraplex.load_adapter(tmp_path / "seq/adapters" / n)
        assert sorted(got.modules) == sorted(ref.modules)
        for m in got.modules:
            torch.testing.assert_close(got.modules[m].A, ref.modules[m].A)
            torch.testing.assert_close(got.modules[m].B, ref.modules[m].B)
    # up-to-date adapters are not retrained
    again = ray_train(path, device="cpu", log=lambda m: None)
    assert again.trained == [] and sorted(again.skipped) == ["a", "b"]
    from typer.testing import CliRunner

    from loraplex.cli import app
    cli = CliRunner().invoke(app, ["train", str(path), "--ray", "--no-progress"])
    assert cli.exit_code == 0, cli.output
    assert "unchanged a" in cli.stdout and "unchanged b" in cli.stdout
    print(f"\nray_train of 2 adapters: {wall:.1f}s wall")
