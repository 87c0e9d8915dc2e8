"""Hostile and careless adapter folders: symlinks out of the adapter roots (admin load over HTTP, load_adapter_dir),
bad adapter_config.json values, weights that adapt nothing, write leftovers (``.NAME.tmp-*``, ``.NAME.old-*``)
never served and cleaned safely; and real PEFT-written configs (with PEFT's null defaults) still load and give
PEFT's outputs. Each bad input must fail the same clear way from the library (``load_adapter``,
``loraplex.load``), ``loraplex inspect`` (exit 2, one line, no traceback) and the admin endpoint (JSON 4xx)."""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from pathlib import Path

import httpx
import pytest
import torch
import typer
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import loraplex
from loraplex.adapters import cli as adapters_cli
from loraplex.adapters.io import (CONFIG_NAME, META_NAME, WEIGHTS_NAME, adapter_folders, check_path_allowed,
                                  clean_leftovers, load_adapter, load_adapter_dir, save_adapter)
from loraplex.distributed.store import AdapterStore
from loraplex.errors import AdapterError, PathNotAllowedError
from loraplex.serve import Engine, ServerThread, create_app
from loraplex.serve.testing import peft_adapters, tiny_llama
from conftest import make_peft_adapter, peft_model, tiny_bert_cls
from conftest import tiny_llama as tiny_llama_model

TOKEN = "hardening-adapters"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
runner = CliRunner()

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread (conftest)

#: (case id, config changes, the field the error must name)
BAD_CONFIGS = [
    ("alpha_null", {"lora_alpha": None}, "lora_alpha"),
    ("alpha_text", {"lora_alpha": "big"}, "lora_alpha"),
    ("alpha_bool", {"lora_alpha": True}, "lora_alpha"),
    ("alpha_nan", {"lora_alpha": float("nan")}, "lora_alpha"),
    ("rank_pattern_text", {"rank_pattern": {"q_proj": "x"}}, "rank_pattern.q_proj"),
    ("rank_pattern_zero", {"rank_pattern": {"q_proj": 0}}, "rank_pattern.q_proj"),
    ("rank_pattern_list", {"rank_pattern": ["q_proj"]}, "rank_pattern"),
    ("alpha_pattern_null", {"alpha_pattern": {"v_proj": None}}, "alpha_pattern.v_proj"),
    ("r_fraction", {"r": 4.7}, "r"),
    ("r_zero", {"r": 0}, "r"),
    ("r_negative", {"r": -4}, "r"),
    ("r_null", {"r": None}, "r"),
    ("r_text", {"r": "4"}, "r"),
    ("targets_number", {"target_modules": 7}, "target_modules"),
    ("targets_item", {"target_modules": ["q_proj", 3]}, "target_modules.1"),
    ("targets_bad_regex", {"target_modules": "(q_proj"}, "target_modules"),
    ("targets_unknown", {"target_modules": ["q_prj", "v_proj", "o_proj", "up_proj"]}, "target_modules"),
    ("targets_other", {"target_modules": ["k_proj"]}, "target_modules"),
    ("layers_negative", {"layers_to_transform": [-1]}, "layers_to_transform.0"),
    ("layers_untargeted", {"layers_to_transform": [1]}, "target_modules"),
    ("rslora_text", {"use_rslora": "yes"}, "use_rslora"),
    ("dropout_big", {"lora_dropout": 3}, "lora_dropout"),
    ("modules_to_save_text", {"modules_to_save": "lm_head"}, "modules_to_save"),
    ("fan_in_fan_out_text", {"fan_in_fan_out": "no"}, "fan_in_fan_out"),
    ("dora", {"use_dora": True}, "use_dora"),
    ("target_parameters", {"target_parameters": ["mlp.experts"]}, "target_parameters"),
]


def _edit_config(folder: Path, changes: dict) -> None:
    cfg = json.loads((folder / CONFIG_NAME).read_text())
    cfg.update(changes)
    (folder / CONFIG_NAME).write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("adapter_hardening")
    base = tiny_llama(tmp / "base")
    root = tmp / "adapters"
    good = peft_adapters(base, root, ["ad0"])["ad0"]  # r=4, alpha=8 on q/v/o/up_proj
    outside = tmp / "outside"
    shutil.copytree(good, outside / "evil")
    for case, changes, _ in BAD_CONFIGS:
        shutil.copytree(good, root / f"bad_{case}")
        _edit_config(root / f"bad_{case}", changes)
    # weights that adapt nothing: no tensor at all; only tensors the config does not target
    shutil.copytree(good, root / "empty")
    save_file({}, str(root / "empty" / WEIGHTS_NAME))
    # symlinks: one file each pointing out of the root, and one pointing to a file inside it (allowed)
    for f in (WEIGHTS_NAME, CONFIG_NAME, META_NAME):
        (root / f"sneaky_{f}").mkdir()
        for g in (WEIGHTS_NAME, CONFIG_NAME):
            shutil.copy(good / g, root / f"sneaky_{f}" / g)
    (outside / "evil" / META_NAME).write_text(json.dumps({"task": "causal_lm"}))
    for f in (WEIGHTS_NAME, CONFIG_NAME, META_NAME):
        (root / f"sneaky_{f}" / f).unlink(missing_ok=True)
        os.symlink(outside / "evil" / f, root / f"sneaky_{f}" / f)
    (root / "twin").mkdir()
    shutil.copy(good / CONFIG_NAME, root / "twin" / CONFIG_NAME)
    os.symlink(good / WEIGHTS_NAME, root / "twin" / WEIGHTS_NAME)

    plex = loraplex.load(base)
    engine = Engine(plex, max_batch_size=4, batch_window_ms=2, max_prompt_tokens=64, max_tokens_cap=64)
    app = create_app(engine, admin_token=TOKEN, adapter_roots=[str(root)])
    model = copy.deepcopy(plex.model)  # the base as loaded, for loraplex.load(model, ...) checks
    with ServerThread(app) as srv:
        with httpx.Client(base_url=srv.url, timeout=120) as client:
            yield {"tmp": tmp, "root": root, "good": good, "outside": outside, "client": client, "plex": plex,
                   "base": base, "model": model, "app": app}
    engine.close()


@pytest.fixture(scope="module")
def cli_app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """test app"""

    adapters_cli.register(app)
    return app


def _admin_load(env, name: str, path: Path) -> httpx.Response:
    return env["client"].post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)},
                              headers=AUTH)


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json"), r.text
    return r.json()["error"]


def _inspect_fails(cli_app, *args: str) -> str:
    res = runner.invoke(cli_app, ["inspect", *args])
    assert res.exit_code == 2, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output and "base check: OK" not in res.output
    err = res.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


# --------------------------------------------------------------------------- path confinement
@pytest.mark.parametrize("fname", [WEIGHTS_NAME, CONFIG_NAME, META_NAME])
def test_file_symlinked_out_of_the_root_is_refused_over_http(env, fname: str) -> None:
    folder = env["root"] / f"sneaky_{fname}"
    err = _error(_admin_load(env, "sneaky", folder), 403)
    assert err["code"] == "path_not_allowed" and str(folder / fname) in err["message"], err
    assert str(env["outside"] / "evil" / fname) in err["message"]  # what it resolves to
    assert "sneaky" not in env["plex"].bank
    metrics = env["client"].get("/metrics").text
    assert 'adapter="sneaky",result="refused"' in metrics


def test_symlink_inside_the_root_loads_over_http(env) -> None:
    r = _admin_load(env, "twin", env["root"] / "twin")
    assert r.status_code == 200, r.text
    want = load_adapter(env["good"])
    got = env["plex"].bank.get("twin")
    assert sorted(got.modules) == sorted(want.modules)
    assert all(torch.equal(got.modules[m].A, want.modules[m].A.to(got.modules[m].A.dtype)) for m in want.modules)


@pytest.mark.parametrize("fname", [WEIGHTS_NAME, CONFIG_NAME, META_NAME])
def test_file_symlinked_out_of_the_root_is_refused_by_the_loaders(env, fname: str) -> None:
    root, folder = env["root"], env["root"] / f"sneaky_{fname}"
    with pytest.raises(PathNotAllowedError, match=str(folder / fname)):
        load_adapter(folder, roots=[root])
    with pytest.raises(PathNotAllowedError, match=str(folder / fname)):
        load_adapter_dir(folder, roots=[root])
    scan = env["tmp"] / f"scan_{fname.split('.')[0]}"
    scan.mkdir()
    shutil.copytree(env["good"], scan / "fine")
    shutil.copytree(folder, scan / "sneaky", symlinks=True)
    with pytest.raises(PathNotAllowedError, match=str(scan / "sneaky" / fname)):
        load_adapter_dir(scan, roots=[scan])
    assert sorted(load_adapter_dir(scan)) == ["fine", "sneaky"]  # without roots: a symlink is an ordinary file
    assert load_adapter(root / "twin", roots=[root]).modules.keys() == load_adapter(env["good"]).modules.keys()


def test_root_prefix_is_not_a_parent(tmp_path: Path) -> None:
    (tmp_path / "adapters").mkdir()
    (tmp_path / "adapters2" / "x").mkdir(parents=True)
    with pytest.raises(PathNotAllowedError):
        check_path_allowed(tmp_path / "adapters2" / "x", [tmp_path / "adapters"])
    with pytest.raises(PathNotAllowedError):
        check_path_allowed(tmp_path / "adapters" / ".." / "adapters2", [tmp_path / "adapters"])
    assert check_path_allowed(tmp_path / "adapters", [tmp_path / "adapters"]) == (tmp_path / "adapters").resolve()


def test_serve_adapters_dir_scan_is_confined(env, tmp_path: Path) -> None:
    from loraplex.serve.cli import build_server

    scan = tmp_path / "dir"
    shutil.copytree(env["good"], scan / "fine")
    (scan / "sneaky").mkdir()
    shutil.copy(env["good"] / CONFIG_NAME, scan / "sneaky" / CONFIG_NAME)
    os.symlink(env["outside"] / "evil" / WEIGHTS_NAME, scan / "sneaky" / WEIGHTS_NAME)
    with pytest.raises(PathNotAllowedError, match="sneaky"):
        build_server(base=str(env["base"]), adapters_dir=str(scan))
    # an extra --adapter-root that holds the target makes it allowed
    engine, _, _ = build_server(base=str(env["base"]), adapters_dir=str(scan), adapter_roots=[str(env["outside"])])
    try:
        assert sorted(engine.plex.adapters) == ["fine", "sneaky"]
    finally:
        engine.close()


# --------------------------------------------------------------------------- bad configs
@pytest.mark.parametrize("case,changes,field", BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_value_is_refused_everywhere(env, cli_app, case: str, changes: dict, field: str) -> None:
    folder = env["root"] / f"bad_{case}"
    cfg_file = str(folder / CONFIG_NAME)
    with pytest.raises(AdapterError) as exc:
        load_adapter(folder)
    assert f"'{field}'" in str(exc.value) or f"{field}=" in str(exc.value) or f"{field} is" in str(exc.value)
    assert cfg_file in str(exc.value)
    with pytest.raises(AdapterError) as exc2:
        loraplex.load(copy.deepcopy(env["model"]), adapters={"x": folder})
    assert str(exc2.value) == str(exc.value)
    assert _inspect_fails(cli_app, str(folder)) == f"error: {exc.value}"
    err = _error(_admin_load(env, f"x_{case}", folder), 400)
    assert err["code"] == "adapter_load_failed" and str(exc.value) in err["message"], err
    assert f"x_{case}" not in env["plex"].bank


def test_fractional_rank_is_never_rounded(env) -> None:
    with pytest.raises(AdapterError, match=r"field 'r' must be an integer > 0, got 4\.7"):
        load_adapter(env["root"] / "bad_r_fraction")


# --------------------------------------------------------------------------- weights that adapt nothing
def test_zero_tensor_adapter_is_refused(env, cli_app) -> None:
    folder = env["root"] / "empty"
    with pytest.raises(AdapterError, match="adapter 'empty' adapts nothing") as exc:
        load_adapter(folder)
    assert str(folder) in str(exc.value)
    with pytest.raises(AdapterError, match="adapter 'z' adapts nothing"):
        loraplex.load(copy.deepcopy(env["model"]), adapters={"z": folder})
    err = _inspect_fails(cli_app, str(folder), "--base", str(env["base"]))
    assert "adapts nothing" in err
    err = _error(_admin_load(env, "z", folder), 400)
    assert "adapts nothing" in err["message"] and "z" not in env["plex"].bank


def test_no_tensor_for_a_targeted_module(env, tmp_path: Path) -> None:
    folder = tmp_path / "stray"
    shutil.copytree(env["good"], folder)
    sd = load_file(str(folder / WEIGHTS_NAME))
    # the same factors under a module the config does not target (k_proj has v_proj's shape in this model)
    moved = {k.replace("v_proj", "k_proj"): v for k, v in sd.items() if "v_proj" in k}
    save_file(moved, str(folder / WEIGHTS_NAME))
    with pytest.raises(AdapterError, match=r"field 'target_modules' .* does not select module "
                                           r"'model\.layers\.\d\.self_attn\.k_proj'"):
        load_adapter(folder)


# --------------------------------------------------------------------------- write leftovers
def _leftover_tree(root: Path, good: Path) -> None:
    shutil.copytree(good, root / "a1")
    for hidden in (".a1.tmp-x1y2z3ab", ".a1.old-4242", ".hidden", ".a2.tmp-abc"):
        shutil.copytree(good, root / hidden)


def test_leftovers_and_hidden_folders_are_never_adapters(env, tmp_path: Path) -> None:
    from loraplex.serve.cli import build_server

    root = tmp_path / "store"
    _leftover_tree(root, env["good"])
    assert [p.name for p in adapter_folders(root)] == ["a1"]
    assert sorted(load_adapter_dir(root)) == ["a1"]
    store = AdapterStore.of(root)
    assert store.names() == ["a1"]
    assert store.find(".a1.tmp-x1y2z3ab") is None and store.find(".hidden") is None
    assert store.find("a1") == root / "a1"
    engine, registry, app = build_server(base=str(env["base"]), adapters_dir=str(root))
    try:
        assert engine.plex.adapters == ["a1"]
    finally:
        engine.close()


def test_stale_leftovers_are_cleaned_safely(env, tmp_path: Path) -> None:
    root = tmp_path / "store"
    _leftover_tree(root, env["good"])
    shutil.copytree(env["good"], root / ".a3.old-77")  # a replace killed between its renames: a3 is missing
    (root / "notes.tmp-1").write_text("not ours")        # no leading dot: not a loraplex name
    (root / ".gitignore").write_text("*")
    (root / ".cfg.json.tmp-q1w2e3").write_text("{")     # atomic_write_text's leftover (a file)
    os.symlink(env["outside"], root / ".x.tmp-link")      # a symlink is never followed nor removed
    old = time.time() - 7200
    for name in (".a1.tmp-x1y2z3ab", ".a1.old-4242", ".a3.old-77", ".cfg.json.tmp-q1w2e3", "notes.tmp-1",
                 ".gitignore", ".hidden"):
        os.utime(root / name, (old, old))
    fresh = root / ".a2.tmp-abc"  # a write in progress (just changed): kept
    done = clean_leftovers(root)
    assert sorted(p.name for p in done) == [".a1.old-4242", ".a1.tmp-x1y2z3ab", ".a3.old-77", ".cfg.json.tmp-q1w2e3"]
    left = sorted(p.name for p in root.iterdir())
    assert left == [".a2.tmp-abc", ".gitignore", ".hidden", ".x.tmp-link", "a1", "a3", "notes.tmp-1"]
    assert fresh.is_dir() and (env["outside"] / "evil" / WEIGHTS_NAME).is_file()
    assert sorted(load_adapter(root / "a3").modules) == sorted(load_adapter(env["good"]).modules)  # restored
    # save_adapter cleans stale leftovers of the folder it writes into
    os.utime(fresh, (old, old))
    save_adapter(load_adapter(root / "a1"), root / "a4")
    assert not fresh.exists() and (root / "a4" / CONFIG_NAME).is_file()
    assert not any(p.name.startswith(".a4.") for p in root.iterdir())


# --------------------------------------------------------------------------- real PEFT configs keep loading
PEFT_CONFIGS = {
    "rslora": (tiny_llama_model, dict(r=4, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj"])),
    "patterns": (tiny_llama_model, dict(r=8, lora_alpha=8, target_modules=["q_proj", "k_proj", "o_proj"],
                                        rank_pattern={"k_proj": 2}, alpha_pattern={"o_proj": 3.5})),
    "explicit_defaults": (tiny_llama_model, dict(r=2, lora_alpha=4, target_modules=["up_proj"], use_dora=False,
                                                 lora_dropout=0.1, bias="none", fan_in_fan_out=False,
                                                 task_type="CAUSAL_LM")),
    "layers_exclude": (tiny_llama_model, dict(r=3, lora_alpha=6, target_modules=["q_proj", "v_proj", "down_proj"],
                                              layers_to_transform=[1], exclude_modules=["down_proj"])),
    "regex": (tiny_llama_model, dict(r=2, lora_alpha=2, target_modules=r".*\.self_attn\.(q|v)_proj")),
    "all_linear": (tiny_llama_model, dict(r=2, lora_alpha=4, target_modules="all-linear")),
    "modules_to_save": (tiny_bert_cls, dict(r=4, lora_alpha=8, target_modules=["query", "value"],
                                            modules_to_save=["classifier"], task_type="SEQ_CLS")),
}


@pytest.mark.parametrize("kind", list(PEFT_CONFIGS))
def test_real_peft_configs_load_and_match_peft(kind: str, tmp_path: Path) -> None:
    factory, kw = PEFT_CONFIGS[kind]
    base = factory()
    folder = make_peft_adapter(base, tmp_path / kind, **kw)
    cfg = json.loads((folder / CONFIG_NAME).read_text())
    assert None in cfg.values()  # PEFT writes null defaults (eva_config, megatron_config, ...)
    if kind == "modules_to_save":  # make the saved head differ from the base head
        sd = load_file(str(folder / WEIGHTS_NAME))
        g = torch.Generator().manual_seed(3)
        sd = {k: (torch.randn(v.shape, generator=g) if "classifier" in k and "lora_" not in k else v)
              for k, v in sd.items()}
        save_file(sd, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    ad = load_adapter(folder)
    assert ad.modules or ad.saved_modules
    plex = loraplex.load(copy.deepcopy(base), adapters={kind: folder})
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = peft_model(base, folder)(input_ids=ids).logits
        got = plex(ids, adapters=kind).logits
        plain = base(input_ids=ids).logits
    assert not torch.allclose(want, plain, atol=1e-4)  # the adapter does change the output
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()


# --------------------------------------------------------------------------- fuzzing the loader
JUNK = [None, "x", "", -1, 0, 1, 4.7, 10**30, float("nan"), float("inf"), True, [], {}, [None], {"a": "b"},
        ["q_proj", 1], "((", "all-linear", {"q_proj": -3}, [[1]], "LORA", 2**63]


def _mutate_config(cfg: dict, rng) -> object:
    cfg = copy.deepcopy(cfg)
    roll = rng.random()
    if roll < 0.05:
        return rng.choice([[], 3, "text", None])  # not an object at all
    keys = sorted(cfg)
    for _ in range(rng.randint(1, 3)):
        key = rng.choice(keys + ["r", "lora_alpha", "rank_pattern", "alpha_pattern", "target_modules"])
        if rng.random() < 0.15:
            cfg.pop(key, None)
        elif rng.random() < 0.3 and isinstance(cfg.get(key), dict):
            cfg[key] = {rng.choice(["q_proj", "v_proj", "(", ".*"]): rng.choice(JUNK)}
        else:
            cfg[key] = rng.choice(JUNK)
    return cfg


def _mutate_weights(data: bytes, rng) -> bytes:
    n = int.from_bytes(data[:8], "little")
    header = bytearray(data[8:8 + n])
    roll = rng.random()
    if roll < 0.15:  # a wrong header length
        return rng.choice([0, 1, n - 1, n + 1, 2**40, len(data)]).to_bytes(8, "little") + data[8:]
    if roll < 0.3:  # truncation anywhere
        return data[: rng.randrange(len(data))]
    meta = json.loads(header)
    keys = [k for k in meta if k != "__metadata__"]
    if roll < 0.75 and keys:  # a semantic change in one tensor's entry
        entry = meta[rng.choice(keys)]
        field = rng.choice(["dtype", "shape", "data_offsets"])
        entry[field] = rng.choice({"dtype": ["F16", "I8", "BOOL", "F8_E4M3", "X", 3],
                                   "shape": [[], [0], [1, 1], [2, 3, 4], [-1, 4], [10**9, 10**9], "x"],
                                   "data_offsets": [[0, 0], [0, 10**12], [8, 4], [0], "x"]}[field])
        if rng.random() < 0.3:
            meta[rng.choice(keys)] = rng.choice([None, 1, [], {"dtype": "F32"}])
        text = json.dumps(meta).encode()
        return len(text).to_bytes(8, "little") + text + data[8 + n:]
    for _ in range(rng.randint(1, 4)):  # random byte flips in the header or the data
        i = rng.randrange(len(data))
        data = data[:i] + bytes([rng.randrange(256)]) + data[i + 1:]
    return data


def test_fuzzed_adapter_files_load_or_fail_cleanly(env, tmp_path: Path) -> None:
    import random

    rng = random.Random(18)
    good = env["good"]
    cfg = json.loads((good / CONFIG_NAME).read_text())
    weights = (good / WEIGHTS_NAME).read_bytes()
    folder = tmp_path / "fuzzed"
    shutil.copytree(good, folder)
    outcomes = {"loaded": 0, "refused": 0}
    t0 = time.perf_counter()
    for i in range(600):
        which = rng.random()
        (folder / CONFIG_NAME).write_text(json.dumps(_mutate_config(cfg, rng)) if which < 0.5
                                          else json.dumps(cfg))
        (folder / WEIGHTS_NAME).write_bytes(_mutate_weights(weights, rng) if which >= 0.4 else weights)
        try:
            ad = load_adapter(folder)
        except AdapterError as exc:
            assert str(folder) in str(exc), (i, str(exc))
            outcomes["refused"] += 1
            continue
        except Exception as exc:  # noqa: BLE001 -- the point of the test
            raise AssertionError(f"mutation {i}: {type(exc).__name__}: {exc}\n"
                                 f"config: {(folder / CONFIG_NAME).read_text()[:400]}") from exc
        assert ad.modules or ad.saved_modules
        outcomes["loaded"] += 1
    assert time.perf_counter() - t0 < 60
    assert outcomes["refused"] > 100 and outcomes["loaded"] > 10, outcomes


def test_inspect_names_a_missing_base_folder(env, cli_app, tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "base"
    res = runner.invoke(cli_app, ["inspect", str(env["good"]), "--base", str(missing)])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert f"base model folder '{missing}' does not exist" in res.output and "Repo id" not in res.output
