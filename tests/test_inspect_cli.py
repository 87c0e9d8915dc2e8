"""``loraplex inspect``: facts about an adapter, and a check against a base model folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from loraplex.adapters import cli as adapters_cli
from loraplex.adapters.io import WEIGHTS_NAME, load_adapter
from conftest import make_peft_adapter, tiny_bert_cls, tiny_gpt2, tiny_llama

runner = CliRunner()


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def main() -> None:  # a group, as in the real ``loraplex`` app
        """test app"""

    adapters_cli.register(app)
    return app


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inspect")
    llama = tiny_llama()
    llama.save_pretrained(root / "llama_base")
    big = tiny_llama(hidden_size=64, intermediate_size=128)
    big.save_pretrained(root / "big_llama_base")
    tiny_gpt2().save_pretrained(root / "gpt2_base")
    cls_model = tiny_bert_cls(num_labels=3)
    cls_model.save_pretrained(root / "bert_cls_base")
    out = {"root": root}
    out["plain"] = make_peft_adapter(llama, root / "plain", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                     task_type="CAUSAL_LM")
    out["patterns"] = make_peft_adapter(llama, root / "multi" / "patterns", r=8, lora_alpha=16, use_rslora=True,
                                        target_modules="all-linear", rank_pattern={"o_proj": 2},
                                        alpha_pattern={"o_proj": 4}, task_type="CAUSAL_LM",
                                        config_overrides={"target_modules": "all-linear"})
    shutil.copytree(out["plain"], root / "multi" / "plain")
    out["multi"] = root / "multi"
    out["head"] = make_peft_adapter(cls_model, root / "head", r=2, lora_alpha=2, target_modules=["query", "value"],
                                    task_type="SEQ_CLS")
    for name in ("llama_base", "big_llama_base", "gpt2_base", "bert_cls_base"):
        out[name] = root / name
    return out


def _json(result) -> dict:
    assert result.stdout.strip(), result.output
    return json.loads(result.stdout)


def test_register_adds_inspect_to_the_main_app(files) -> None:
    from loraplex.cli import app as main_app

    names = [c.name or c.callback.__name__ for c in main_app.registered_commands]
    assert "inspect" in names
    if len(names) > 1:  # typer runs a lone command without its name; with several it is a group
        res = runner.invoke(main_app, ["inspect", str(files["plain"]), "--json"])
        assert res.exit_code == 0, res.output
        assert _json(res)["adapters"][0]["r"] == 4


def test_inspect_text(app, files) -> None:
    res = runner.invoke(app, ["inspect", str(files["plain"])])
    assert res.exit_code == 0, res.output
    out = res.stdout
    ad = load_adapter(files["plain"])
    assert "adapter plain" in out
    assert "rank:            4" in out
    assert "alpha:           8" in out
    assert "alpha / r = 2" in out
    assert "['q_proj', 'v_proj']" in out or "['v_proj', 'q_proj']" in out
    assert "-> 4 modules" in out
    assert f"{ad.num_parameters:,}" in out
    assert "float32" in out
    assert "on disk" in out and "in memory" in out
    assert "base check" not in out


def test_inspect_json_patterns_and_rslora(app, files) -> None:
    res = runner.invoke(app, ["inspect", str(files["patterns"]), "--json"])
    assert res.exit_code == 0, res.output
    data = _json(res)
    (info,) = data["adapters"]
    ad = load_adapter(files["patterns"])
    assert info["r"] == 8 and info["lora_alpha"] == 16
    assert info["use_rslora"] and "sqrt" in info["scaling_rule"]
    assert info["rank_pattern"] == {"o_proj": 2}
    assert info["rank_counts"] == {"8": 12, "2": 2}
    assert info["module_ranks"] == {"model.layers.0.self_attn.o_proj": 2, "model.layers.1.self_attn.o_proj": 2}
    assert info["target_modules"] == "all-linear" and info["num_modules"] == 14
    assert info["parameters"] == ad.num_parameters
    assert info["bytes_in_memory"] == ad.nbytes
    assert info["bytes_on_disk"] >= (Path(files["patterns"]) / WEIGHTS_NAME).stat().st_size
    assert info["dtype"] == ["float32"]
    assert sorted(info["scaling"]) == sorted({round(16 / 8 ** 0.5, 6), round(4 / 2 ** 0.5, 6)})
    text = runner.invoke(app, ["inspect", str(files["patterns"])]).stdout
    assert "per-module rank" in text and "model.layers.0.self_attn.o_proj=2" in text
    assert "rsLoRA" in text and "'all-linear' -> 14 modules" in text


def test_inspect_multi_adapter_folder(app, files) -> None:
    res = runner.invoke(app, ["inspect", str(files["multi"]), "--json"])
    assert res.exit_code == 0, res.output
    assert [a["name"] for a in _json(res)["adapters"]] == ["patterns", "plain"]
    text = runner.invoke(app, ["inspect", str(files["multi"])]).stdout
    assert "adapter patterns" in text and "adapter plain" in text


def test_inspect_modules_to_save(app, files) -> None:
    res = runner.invoke(app, ["inspect", str(files["head"]), "--json", "--base", str(files["bert_cls_base"])])
    assert res.exit_code == 0, res.output
    (info,) = _json(res)["adapters"]
    assert "classifier" in info["modules_to_save"]
    assert info["saved_modules"]["classifier"]["weight"] == [3, 32]
    assert info["base_check"] == "OK" and info["base_class"] == "BertForSequenceClassification"
    text = runner.invoke(app, ["inspect", str(files["head"])]).stdout
    assert "modules_to_save:" in text and "classifier" in text


def test_inspect_against_matching_base(app, files) -> None:
    res = runner.invoke(app, ["inspect", str(files["multi"]), "--base", str(files["llama_base"])])
    assert res.exit_code == 0, res.output
    assert res.stdout.count("base check:      OK") == 2
    assert "LlamaForCausalLM" in res.stdout
    data = _json(runner.invoke(app, ["inspect", str(files["patterns"]), "--json", "--base",
                                     str(files["llama_base"])]))
    info = data["adapters"][0]
    assert info["base_check"] == "OK" and info["base_matching_modules"] == 14


def test_inspect_against_wrong_base_exits_2(app, files) -> None:
    res = runner.invoke(app, ["inspect", str(files["plain"]), "--base", str(files["gpt2_base"])])
    assert res.exit_code == 2
    assert "base check:      FAILED" in res.stdout
    assert "model.layers.0.self_attn" in res.stdout and "GPT2LMHeadModel" in res.stdout
    assert "Traceback" not in res.output
    res = runner.invoke(app, ["inspect", str(files["plain"]), "--json", "--base", str(files["big_llama_base"])])
    assert res.exit_code == 2
    info = _json(res)["adapters"][0]
    assert "expects d_in=64" in info["base_check"] and "self_attn" in info["base_check"]


def test_inspect_bad_paths_exit_2(app, files, tmp_path) -> None:
    res = runner.invoke(app, ["inspect", str(tmp_path / "missing")])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "error:" in res.stderr and "missing" in res.stderr
    res = runner.invoke(app, ["inspect", str(files["plain"]), "--base", str(tmp_path / "no_model")])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "cannot build base model" in res.stdout
    broken = tmp_path / "broken"
    shutil.copytree(files["plain"], broken)
    (broken / WEIGHTS_NAME).write_bytes(b"garbage")
    res = runner.invoke(app, ["inspect", str(broken)])
    assert res.exit_code == 2 and "corrupt" in res.stderr and str(broken) in res.stderr
