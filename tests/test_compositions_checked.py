"""Compositions are checked when they are defined (start-up, a config's compositions, the admin endpoint), an unload
that would break one is refused naming it, and an admin load of a missing folder inside the roots is 404."""

from __future__ import annotations

from types import SimpleNamespace

import httpx
import pytest
import torch
from typer.testing import CliRunner

import loraplex
from loraplex.serve import Engine, ModelRegistry, ResolveError, ServerThread, create_app
from loraplex.serve.cli import build_server
from loraplex.serve.testing import peft_adapters, tiny_llama

TOKEN = "t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
NAMES = ["ad0", "ad1", "ad2"]

pytestmark = pytest.mark.usefixtures("one_thread")


class Catalog:
    """The registry's view of a Plex: adapter names only."""

    tokenizer = None
    device = torch.device("cpu")

    def __init__(self, names):
        self.adapters = list(names)

    def __contains__(self, name):
        return name in self.adapters

    def get_adapter(self, name):
        return SimpleNamespace(name=name, path=None, meta={})

    def adapter_info(self, name):
        return self.get_adapter(name)


# --------------------------------------------------------------------------- the registry's check
@pytest.mark.parametrize("spec, unknown", [
    ("blend(a=0.5,zz=0.5)", ["zz"]), ("stack(a,zz)", ["zz"]), ("merge(ties;a=0.7,zz=0.3;density=0.7)", ["zz"]),
    ("blend(yy=1,a=1,zz=2)", ["yy", "zz"]), ("zz", ["zz"]),
])
def test_unknown_adapter_in_a_composition_is_refused_naming_it(spec, unknown):
    with pytest.raises(ResolveError) as ei:
        ModelRegistry(Catalog(["a", "b"]), compositions={"mix": spec})
    msg = str(ei.value)
    assert "composition 'mix'" in msg and all(repr(u) in msg for u in unknown), msg
    assert "known adapters: a, b" in msg and ei.value.code == "unknown_adapter"


@pytest.mark.parametrize("spec, needle", [
    ("blend(a=0.5,", "expected"), ("moe(router)", "moe(...) is not served"),
    ("stack(a,b,mode=inlayer)", "stack mode 'inlayer'"), ("merge(tiez;a=1,b=1)", "did you mean 'ties'"),
    ("ensemble(a=1,b=1)", "ensemble"),
])
def test_malformed_or_unserved_compositions_are_refused(spec, needle):
    with pytest.raises(ResolveError) as ei:
        ModelRegistry(Catalog(["a", "b"]), compositions={"mix": spec})
    assert "composition 'mix'" in str(ei.value) and needle in str(ei.value), str(ei.value)


def test_good_compositions_and_their_users():
    reg = ModelRegistry(Catalog(["a", "b", "c"]), compositions={
        "m1": "blend(a=0.5,b=0.5)", "m2": "stack(b,c)", "m3": "merge(ties;a=0.7,c=0.3;density=0.7)", "m4": "c"})
    assert reg.compositions_using("a") == ["m1", "m3"]
    assert reg.compositions_using("c") == ["m2", "m3", "m4"]
    assert reg.compositions_using("zz") == []
    cards = {c["id"]: c for c in reg.list_models()}
    assert cards["m3"]["parent"] == ["a", "c"] and cards["m3"]["x_loraplex_kind"] == "composition"
    reg.add_composition("m5", "blend(a=1,b=2)")
    assert reg.resolve("m5").choice == {"a": 1.0, "b": 2.0}
    with pytest.raises(ResolveError, match="already exists"):
        reg.add_composition("m5", "a")
    with pytest.raises(ResolveError, match="already an adapter"):
        reg.add_composition("a", "b")
    with pytest.raises(ResolveError, match="unknown adapter 'q'"):
        reg.add_composition("m6", "blend(a=1,q=1)")
    assert "m6" not in reg.compositions
    reg.add_composition("m5", "b", replace=True)
    assert reg.resolve("m5").choice == "b"
    assert reg.remove_composition("m5") == "b" and "m5" not in reg.known()


# --------------------------------------------------------------------------- start-up and config
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compositions")
    base = tiny_llama(tmp / "base")
    root = tmp / "adapters"
    paths = peft_adapters(base, root, NAMES + ["extra"])
    return {"base": base, "root": root, "paths": paths, "tmp": tmp}


def test_serve_cli_refuses_to_start_with_an_unknown_adapter_in_a_blend(files):
    from loraplex.cli import app

    res = CliRunner().invoke(app, ["serve", "--base", str(files["base"]), "--adapter", f"a={files['paths']['ad0']}",
                                   "--composition", "mix=blend(a=0.5,zz=0.5)"])
    assert res.exit_code == 2, res.output
    out = res.output.replace("\n", " ")
    assert "composition 'mix'" in out and "'zz'" in out and "blend(a=0.5,zz=0.5)" in out, res.output


def test_config_compositions_are_checked(files):
    """A config's compositions reach build_server (loraplex.run.serve_arguments): a merge over an unknown adapter
    is refused there, before anything is served."""
    with pytest.raises(ResolveError) as ei:
        build_server(base=str(files["base"]), adapters={"ad0": str(files["paths"]["ad0"])},
                     compositions={"active": "merge(ties;ad0=0.5,nope=0.5)"})
    assert "composition 'active'" in str(ei.value) and "'nope'" in str(ei.value)


# --------------------------------------------------------------------------- admin endpoints
@pytest.fixture(scope="module")
def env(files):
    plex = loraplex.load(files["base"], max_slots=6)
    for n in NAMES:
        plex.add_adapter(n, files["paths"][n])
    engine = Engine(plex, max_batch_size=4, batch_window_ms=2, max_prompt_tokens=64, max_tokens_cap=64)
    registry = ModelRegistry(plex, base_id="tiny", compositions={"mix": "blend(ad0=0.7,ad1=0.3)",
                                                                 "st": "stack(ad1,ad2)"})
    app = create_app(engine, registry, admin_token=TOKEN, adapter_roots=[str(files["root"])])
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        yield {"c": c, "plex": plex, "engine": engine, "registry": registry, **files}
    engine.close()


def error_of(r, status, code=None):
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    if code is not None:
        assert err["code"] == code, err
    return err


def greedy(env, model, n=6):
    r = env["c"].post("/v1/completions", json={"model": model, "prompt": "hello world", "max_tokens": n,
                                               "temperature": 0})
    return r


def test_unload_of_an_adapter_a_composition_uses_is_409_naming_it(env):
    c = env["c"]
    err = error_of(c.post("/v1/unload_lora_adapter", json={"lora_name": "ad1"}, headers=AUTH), 409, "adapter_in_use")
    assert "'mix'" in err["message"] and "'st'" in err["message"] and "unload_composition" in err["message"]
    assert err["compositions"] == ["mix", "st"]
    assert "ad1" in env["plex"] and greedy(env, "mix").status_code == 200  # nothing changed
    # remove the compositions first, then the unload goes through
    for name in ("mix", "st"):
        r = c.post("/v1/unload_composition", json={"name": name}, headers=AUTH)
        assert r.status_code == 200 and r.json()["status"] == "unloaded", r.text
    error_of(greedy(env, "mix"), 404, "model_not_found")
    assert c.post("/v1/unload_lora_adapter", json={"lora_name": "ad1"}, headers=AUTH).status_code == 200
    assert "ad1" not in env["plex"]
    ids = {m["id"] for m in c.get("/v1/models").json()["data"]}
    assert not ids & {"mix", "st", "ad1"}
    error_of(c.post("/v1/unload_composition", json={"name": "mix"}, headers=AUTH), 404, "composition_not_found")
    error_of(c.post("/v1/unload_composition", json={"name": "x"}), 401)


def test_admin_composition_load_is_checked(env):
    c = env["c"]
    err = error_of(c.post("/v1/load_composition", json={"name": "m", "spec": "blend(ad0=0.5,zz=0.5)"},
                          headers=AUTH), 400, "unknown_adapter")
    assert "'zz'" in err["message"] and "composition 'm'" in err["message"] and err["param"] == "spec"
    error_of(c.post("/v1/load_composition", json={"name": "m", "spec": "blend(ad0=0.5,"}, headers=AUTH), 400,
             "invalid_spec")
    error_of(c.post("/v1/load_composition", json={"name": "ad0", "spec": "ad2"}, headers=AUTH), 409, "name_exists")
    error_of(c.post("/v1/load_composition", json={"name": "auto", "spec": "ad2"}, headers=AUTH), 400, "invalid_name")
    error_of(c.post("/v1/load_composition", json={"name": "m", "spec": "ad2"}), 401)
    assert "m" not in env["registry"].compositions
    r = c.post("/v1/load_composition", json={"name": "m", "spec": "blend(ad0=0.25,ad2=0.75)"}, headers=AUTH)
    assert r.status_code == 200 and r.json()["spec"] == "blend(ad0=0.25,ad2=0.75)", r.text
    a = greedy(env, "m")
    b = greedy(env, "blend(ad0=0.25,ad2=0.75)")
    assert a.status_code == 200 and a.json()["choices"][0]["text"] == b.json()["choices"][0]["text"]
    error_of(c.post("/v1/load_composition", json={"name": "m", "spec": "ad2"}, headers=AUTH), 409, "name_exists")
    assert c.post("/v1/load_composition", json={"name": "m", "spec": "ad2", "replace": True},
                  headers=AUTH).status_code == 200
    assert greedy(env, "m").json()["choices"][0]["text"] == greedy(env, "ad2").json()["choices"][0]["text"]
    assert c.post("/v1/unload_composition", json={"name": "m"}, headers=AUTH).status_code == 200


def test_missing_folder_inside_the_roots_is_404_outside_stays_403(env):
    c, root, tmp = env["c"], env["root"], env["tmp"]
    err = error_of(c.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(root / "nothing")},
                          headers=AUTH), 404, "adapter_not_found")
    assert "nothing" in err["message"] and err["param"] == "lora_path"
    for outside in [str(tmp / "nothing"), "/no/such/place"]:
        error_of(c.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": outside}, headers=AUTH), 403,
                 "path_not_allowed")
    # an existing folder that is no adapter stays 400
    (root / "empty").mkdir(exist_ok=True)
    error_of(c.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(root / "empty")},
                    headers=AUTH), 400, "adapter_load_failed")
    assert c.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(root / "extra")},
                  headers=AUTH).status_code == 200
    assert c.post("/v1/unload_lora_adapter", json={"lora_name": "x"}, headers=AUTH).status_code == 200
