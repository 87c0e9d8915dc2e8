"""End to end: ``loraplex train CONFIG.yaml`` (joint mixed-batch), continual training, merge, ``loraplex predict``.

Tiny random-init Llama (word-level tokenizer) for the causal LM path; the real MiniLM encoder for classification.
References are independent: PEFT's own model for losses and logits, delta-weight sums for the merge.
"""

from __future__ import annotations

import copy
import csv
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from conftest import minilm_path
from loraplex.adapters.io import load_adapter
from loraplex.cli import app
from train_project import folder_bytes, pairs, save_tiny_llama, write_csv, write_jsonl, write_yaml

TARGETS_A = ["q_proj", "v_proj"]
TARGETS_B = ["q_proj", "v_proj", "o_proj"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread (conftest)


def cli(*args: str) -> Any:
    """``loraplex ARGS`` in this process (stdout and stderr kept apart)."""
    return CliRunner().invoke(app, list(args))


def llm_config(root: Path, adapters: dict[str, Any]) -> dict[str, Any]:
    return {
        "base_model": "base",  # relative: resolved against the config file's folder
        "model_type": "llm",
        "output_dir": str(root / "out"),
        "adapters": {
            "adapters": adapters,
            "merge": {"name": "ab", "sources": ["a", "b"], "weights": [0.5, 0.5], "combination_type": "linear"},
            "active": "a",
        },
        "input_features": [{"name": "prompt", "type": "text"}],
        "output_features": [{"name": "response", "type": "text"}],
        "trainer": {"epochs": 3, "learning_rate": 5e-2, "batch_size": 4, "max_length": 16, "seed": 7},
    }


TWO = {
    "a": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": TARGETS_A, "dataset": "a.csv"},
    "b": {"type": "lora", "r": 2, "alpha": 4, "dropout": 0.1, "target_modules": TARGETS_B, "dataset": "b.jsonl"},
}
THIRD = {"c": {"type": "lora", "r": 4, "target_modules": TARGETS_A, "dataset": "c.jsonl"}}


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Train a + b, snapshot their folders, add c and train again (all through the CLI)."""
    root = tmp_path_factory.mktemp("train_e2e")
    save_tiny_llama(root / "base")
    write_csv(root / "a.csv", pairs("a", 24, 0))
    write_jsonl(root / "b.jsonl", pairs("b", 24, 0))
    # c: plain text rows (the text column path), learned everywhere
    write_jsonl(root / "c.jsonl", [{"text": f"{r['prompt']} {r['response']}"} for r in pairs("c", 16, 0)])
    write_csv(root / "test.csv", pairs("a", 6, 1))
    cfg = write_yaml(root / "train.yaml", llm_config(root, TWO))
    first = cli("train", str(cfg), "--no-progress")
    out = root / "out"
    before = {n: folder_bytes(out / "adapters" / n) for n in ("a", "b", "ab")}
    mtimes = {str(p): p.stat().st_mtime_ns for n in ("a", "b", "ab") for p in (out / "adapters" / n).iterdir()}
    logs_before = {n: (out / "logs" / f"{n}.json").read_bytes() for n in ("a", "b")}
    write_yaml(cfg, llm_config(root, {**TWO, **THIRD}))
    second = cli("train", str(cfg), "--no-progress")
    return {"root": root, "cfg": cfg, "out": out, "first": first, "second": second, "before": before,
            "mtimes": mtimes, "logs_before": logs_before}


def test_first_run_trains_both_adapters_jointly_and_merges(project: dict[str, Any]) -> None:
    res = project["first"]
    assert res.exit_code == 0, res.output
    assert "trained a: 18 steps" in res.stdout and "trained b: 18 steps" in res.stdout  # 24 rows / 4 x 3 epochs
    assert "merged ab" in res.stdout
    out = project["out"]
    for n in ("a", "b"):
        log = json.loads((out / "logs" / f"{n}.json").read_text())
        assert log["joint"] is True and log["steps"] == 18 and len(log["losses"]) == 18
        losses = log["losses"]
        assert all(math.isfinite(x) for x in losses)
        # the loss went down: mean of the last 3 steps well under the mean of the first 3
        assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses


def test_loss_curve_png_per_adapter(project: dict[str, Any]) -> None:
    import matplotlib.image as mpimg

    for n in ("a", "b", "c"):
        png = project["out"] / "plots" / f"{n}_loss.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert mpimg.imread(png).shape[:2] == (360, 600)  # matplotlib's figure (6 x 3.6 in at 100 dpi)


def test_saved_adapters_are_peft_format_with_the_config_settings(project: dict[str, Any]) -> None:
    out = project["out"]
    cfg_a = json.loads((out / "adapters" / "a" / "adapter_config.json").read_text())
    cfg_b = json.loads((out / "adapters" / "b" / "adapter_config.json").read_text())
    assert (cfg_a["r"], cfg_a["lora_alpha"], sorted(cfg_a["target_modules"])) == (4, 8, sorted(TARGETS_A))
    assert (cfg_b["r"], cfg_b["lora_alpha"], sorted(cfg_b["target_modules"])) == (2, 4, sorted(TARGETS_B))
    assert cfg_a["task_type"] == "CAUSAL_LM" and cfg_a["peft_type"] == "LORA"
    b = load_adapter(out / "adapters" / "b", "b")
    assert len(b.modules) == 2 * 3  # 2 layers x (q, v, o)
    assert all(float(m.B.abs().sum()) > 0 for m in b.modules.values())  # trained (B starts at zero)


def test_adding_a_third_adapter_trains_only_it(project: dict[str, Any]) -> None:
    res = project["second"]
    assert res.exit_code == 0, res.output
    assert "trained c:" in res.stdout
    assert "trained a" not in res.stdout and "trained b" not in res.stdout
    assert "unchanged a" in res.stdout and "unchanged b" in res.stdout
    assert "merged ab" not in res.stdout  # its sources did not change
    out = project["out"]
    for n in ("a", "b", "ab"):
        assert folder_bytes(out / "adapters" / n) == project["before"][n], n
    for path, mtime in project["mtimes"].items():  # not even rewritten
        assert Path(path).stat().st_mtime_ns == mtime, path
    for n in ("a", "b"):
        assert (out / "logs" / f"{n}.json").read_bytes() == project["logs_before"][n]
    state = json.loads((out / "state.json").read_text())
    assert set(state["adapters"]) == {"a", "b", "c"} and state["active"] == "a"
    c_log = json.loads((out / "logs" / "c.json").read_text())
    assert c_log["columns"] == {"text": "text"} and c_log["losses"][-1] < c_log["losses"][0]
    assert not (out / "checkpoints").exists()  # removed after a finished run


def test_rerun_with_nothing_changed_trains_nothing(project: dict[str, Any]) -> None:
    res = cli("train", str(project["cfg"]), "--no-progress")
    assert res.exit_code == 0, res.output
    assert "trained" not in res.stdout and "merged" not in res.stdout
    assert all(f"unchanged {n}" in res.stdout for n in ("a", "b", "c"))


def _delta(ad: Any) -> dict[str, torch.Tensor]:
    return {m: mod.scaling * (mod.B.double() @ mod.A.double()) for m, mod in ad.modules.items()}


def test_merge_block_is_the_weighted_delta_sum(project: dict[str, Any]) -> None:
    folder = project["out"] / "adapters"
    a, b, ab = (load_adapter(folder / n, n) for n in ("a", "b", "ab"))
    da, db, dab = _delta(a), _delta(b), _delta(ab)
    assert set(dab) == set(da) | set(db)
    for m in dab:
        ref = 0.5 * da.get(m, 0) + 0.5 * db.get(m, 0)
        torch.testing.assert_close(dab[m], ref, atol=1e-6, rtol=1e-5)
    report = json.loads((folder / "ab" / "merge_report.json").read_text())
    assert (report["name"], report["method"], report["sources"], report["weights"]) == ("ab", "linear", ["a", "b"],
                                                                                       [0.5, 0.5])


def _peft_response_loss(base_dir: Path, adapter_dir: Path, rows: list[dict[str, str]]) -> float:
    """Token-weighted teacher-forced loss on ``response + eos`` with PEFT's own model (the reference)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(adapter_dir)).eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for r in rows:
            p = tok(r["prompt"], add_special_tokens=False)["input_ids"]
            s = tok(r["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            ids = torch.tensor([[tok.bos_token_id] + p + s])
            logits = model(input_ids=ids).logits[0, :-1]
            labels = ids[0, 1:].clone()
            labels[: len(p)] = -100
            ce = torch.nn.functional.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="sum")
            total += float(ce)
            n += len(s)
    return total / n


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_predict_adapter_writes_rows_and_metrics_matching_peft(project: dict[str, Any]) -> None:
    root, out = project["root"], project["out"]
    res = cli("predict", str(project["cfg"]), "--dataset", str(root / "test.csv"), "--adapter", "a", "--no-progress")
    assert res.exit_code == 0, res.output
    pred_file = out / "predictions" / "test.a.csv"
    assert f"6 predictions (a, causal_lm) -> {pred_file}" in res.stdout
    rows = _read_csv(pred_file)
    src = _read_csv(root / "test.csv")
    assert len(rows) == 6 and [r["prompt"] for r in rows] == [r["prompt"] for r in src]
    assert set(rows[0]) == {"prompt", "response", "loss", "prediction", "exact_match"}
    metrics = json.loads((out / "predictions" / "test.a.metrics.json").read_text())
    assert metrics["n"] == 6 and metrics["choice"] == "a" and metrics["task"] == "causal_lm"
    ref = _peft_response_loss(root / "base", out / "adapters" / "a", src)
    assert metrics["loss"] == pytest.approx(ref, rel=1e-4, abs=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(ref), rel=1e-4)
    em = [r["exact_match"] == "True" for r in rows]
    assert metrics["exact_match"] == pytest.approx(sum(em) / 6)
    for r in rows:  # exact_match says whether the greedy prediction is the response
        assert (r["exact_match"] == "True") == (r["prediction"] == r["response"])


def test_predict_blend_equals_the_linear_merge(project: dict[str, Any]) -> None:
    """blend(a=0.5,b=0.5) adds 0.5 (delta a) + 0.5 (delta b) per row: the same model as the linear merge 'ab'."""
    root, out = project["root"], project["out"]
    res = cli("predict", str(project["cfg"]), "--dataset", str(root / "test.csv"), "--compose",
              "blend(a=0.5,b=0.5)", "--out", str(root / "blend.jsonl"), "--no-progress")
    assert res.exit_code == 0, res.output
    blend = _read_jsonl(root / "blend.jsonl")
    assert len(blend) == 6 and all({"prompt", "response", "loss", "prediction"} <= set(r) for r in blend)
    m_blend = json.loads((root / "blend.metrics.json").read_text())
    assert m_blend["choice"] == "blend(a=0.5,b=0.5)" and m_blend["n"] == 6
    res = cli("predict", str(project["cfg"]), "--dataset", str(root / "test.csv"), "--adapter", "ab",
              "--out", str(root / "ab.jsonl"), "--no-progress")
    assert res.exit_code == 0, res.output
    merged = _read_jsonl(root / "ab.jsonl")
    for x, y in zip(blend, merged):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4, abs=1e-5)
        assert x["prediction"] == y["prediction"]


def test_predict_errors_are_clean(project: dict[str, Any]) -> None:
    root = project["root"]
    res = cli("predict", str(project["cfg"]), "--dataset", str(root / "test.csv"), "--adapter", "zz")
    assert res.exit_code == 2 and "zz" in res.stderr and "Traceback" not in res.output
    res = cli("predict", str(project["cfg"]), "--dataset", str(root / "test.csv"), "--adapter", "a",
              "--compose", "blend(a=1,b=1)")
    assert res.exit_code == 2 and "give --adapter or --compose, not both" in res.stderr
    (root / "plain.csv").write_text("text\nsome words\n")
    res = cli("predict", str(project["cfg"]), "--dataset", str(root / "plain.csv"), "--compose",
              "stack(a,b,mode=pipeline)")
    assert res.exit_code == 2 and "is a pipeline" in res.stderr and "prompt column" in res.stderr
    assert "Traceback" not in res.output


def test_predict_pipeline_feeds_each_stage_to_the_next(project: dict[str, Any]) -> None:
    """stack(a,b,mode=pipeline): stage 1 is adapter a's own prediction; the final text is adapter b's prediction
    for a prompt that is stage 1's text (the default template ``{output}``)."""
    root, out = project["root"], project["out"]
    res = cli("predict", str(project["cfg"]), "--dataset", str(root / "test.csv"), "--compose",
              "stack(a,b,mode=pipeline)", "--out", str(root / "pipe.jsonl"), "--no-progress")
    assert res.exit_code == 0, res.output
    pipe = _read_jsonl(root / "pipe.jsonl")
    src = _read_csv(root / "test.csv")
    assert len(pipe) == 6 and all({"prompt", "response", "stage1", "prediction", "exact_match"} <= set(r) for r in pipe)
    metrics = json.loads((root / "pipe.metrics.json").read_text())
    assert metrics["stages"] == ["a", "b"] and metrics["n"] == 6
    assert metrics["exact_match"] == pytest.approx(sum(r["exact_match"] for r in pipe) / 6)
    res = cli("predict", str(project["cfg"]), "--dataset", str(root / "test.csv"), "--adapter", "a",
              "--out", str(root / "only_a.jsonl"), "--no-progress")
    assert res.exit_code == 0, res.output
    only_a = _read_jsonl(root / "only_a.jsonl")
    assert [r["stage1"] for r in pipe] == [r["prediction"] for r in only_a]
    second = root / "stage2.csv"  # adapter b on stage 1's texts, same responses (so the same generation length)
    with open(second, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["prompt", "response"])
        w.writerows([(r["stage1"], s["response"]) for r, s in zip(pipe, src)])
    res = cli("predict", str(project["cfg"]), "--dataset", str(second), "--adapter", "b",
              "--out", str(root / "only_b.jsonl"), "--no-progress")
    assert res.exit_code == 0, res.output
    only_b = _read_jsonl(root / "only_b.jsonl")
    assert [r["prediction"] for r in pipe] == [r["prediction"] for r in only_b]


# ------------------------------------------------------------------------------------------------ joint == sequential
def test_joint_training_equals_sequential(tmp_path: Path) -> None:
    """Rows of different adapters do not interact and each adapter has its own optimizer: one mixed-batch job makes
    the same updates as separate runs (dropout 0, so no random draws differ)."""
    from loraplex.train import train

    save_tiny_llama(tmp_path / "base")
    write_csv(tmp_path / "a.csv", pairs("a", 12, 3))
    write_jsonl(tmp_path / "b.jsonl", pairs("b", 16, 3))
    adapters = {"a": {**TWO["a"]}, "b": {**TWO["b"], "dropout": 0.0}}
    cfg = llm_config(tmp_path, adapters)
    cfg["adapters"].pop("merge")
    cfg["trainer"].update(epochs=2)
    path = write_yaml(tmp_path / "cfg.yaml", cfg)
    joint = train(path, output_dir=tmp_path / "joint", progress=False, log=lambda m: None)
    seq = train(path, output_dir=tmp_path / "seq", progress=False, joint=False, log=lambda m: None)
    assert joint.trained == ["a", "b"] and seq.trained == ["a", "b"]
    for n in ("a", "b"):
        assert len(joint.losses[n]) == len(seq.losses[n]) == (6 if n == "a" else 8)
        assert joint.losses[n] == pytest.approx(seq.losses[n], abs=1e-5)
        ja, sa = load_adapter(tmp_path / "joint/adapters" / n), load_adapter(tmp_path / "seq/adapters" / n)
        for m in ja.modules:
            torch.testing.assert_close(ja.modules[m].A, sa.modules[m].A, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(ja.modules[m].B, sa.modules[m].B, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ singular adapter
def test_singular_adapter_config_trains_default(tmp_path: Path) -> None:
    save_tiny_llama(tmp_path / "base")
    write_csv(tmp_path / "a.csv", pairs("a", 8, 0))
    path = write_yaml(tmp_path / "one.yaml", {
        "base_model": "base", "output_dir": str(tmp_path / "out"),
        "adapter": {"type": "lora", "r": 2, "target_modules": "all-linear", "dataset": "a.csv"},
        "trainer": {"epochs": 1, "batch_size": 4, "max_length": 16, "learning_rate": 1e-2},
    })
    res = cli("train", str(path), "--no-progress")
    assert res.exit_code == 0, res.output
    assert "trained default: 2 steps" in res.stdout
    ad = load_adapter(tmp_path / "out/adapters/default")
    # all-linear: every Linear of the decoder layers but the LM head (PEFT's rule), written as module names
    assert sorted(ad.spec.target_modules) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj"])
    assert len(ad.modules) == 2 * 7
    # both singular and plural blocks: a clear error, exit code 2, no traceback
    bad = yaml_with(path, adapters={"adapters": {"x": {"dataset": "a.csv"}}})
    res = cli("train", str(bad), "--no-progress")
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "adapters: use either 'adapter:' (one adapter, named 'default') or 'adapters:' (several), not both" \
        in res.stderr


def yaml_with(path: Path, **extra: Any) -> Path:
    import yaml

    data = yaml.safe_load(path.read_text())
    data.update(extra)
    out = path.with_name("bad_" + path.name)
    out.write_text(yaml.safe_dump(data))
    return out


# ------------------------------------------------------------------------------------------------ encoder
@pytest.fixture(scope="module")
def encoder_project(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    import random

    root = tmp_path_factory.mktemp("train_enc")
    pos, neg = "good great fine nice happy".split(), "bad awful poor sad ugly".split()
    pets, colours = "cat dog horse bird".split(), "red green blue yellow".split()
    rnd = random.Random(0)

    def sentiment(n: int) -> list[dict[str, str]]:
        out = []
        for _ in range(n):
            lab = rnd.choice(["pos", "neg"])
            out.append({"text": f"the film was {rnd.choice(pos if lab == 'pos' else neg)}", "label": lab})
        return out

    def topic(n: int) -> list[dict[str, str]]:
        out = []
        for _ in range(n):
            lab = rnd.choice(["pet", "colour"])
            out.append({"sentence": f"i like the {rnd.choice(pets if lab == 'pet' else colours)}", "kind": lab})
        return out

    write_csv(root / "sent.csv", sentiment(32))
    write_jsonl(root / "topic.jsonl", topic(24))
    write_csv(root / "sent_test.csv", sentiment(12))
    cfg = write_yaml(root / "enc.yaml", {
        "base_model": minilm_path(), "model_type": "encoder", "output_dir": str(root / "out"),
        "adapters": {"adapters": {
            "sent": {"r": 4, "target_modules": ["query", "value"], "dataset": "sent.csv"},
            "topic": {"r": 4, "target_modules": ["query", "value"], "dataset": "topic.jsonl",
                      "text_column": "sentence", "label_column": "kind"},
        }},
        "trainer": {"epochs": 4, "learning_rate": 5e-3, "batch_size": 8, "max_length": 16, "seed": 1},
    })
    train_res = cli("train", str(cfg), "--no-progress")
    pred_res = cli("predict", str(cfg), "--dataset", str(root / "sent_test.csv"), "--adapter", "sent", "--no-progress")
    return {"root": root, "cfg": cfg, "out": root / "out", "train": train_res, "predict": pred_res}


def test_encoder_trains_two_heads_jointly(encoder_project: dict[str, Any]) -> None:
    res = encoder_project["train"]
    assert res.exit_code == 0, res.output
    out = encoder_project["out"]
    for n, labels in (("sent", ["neg", "pos"]), ("topic", ["colour", "pet"])):
        meta = json.loads((out / "adapters" / n / "loraplex_meta.json").read_text())
        assert meta == {"task": "classification", "labels": labels}
        cfg = json.loads((out / "adapters" / n / "adapter_config.json").read_text())
        assert cfg["modules_to_save"] == ["classifier"] and cfg["task_type"] == "SEQ_CLS"
        log = json.loads((out / "logs" / f"{n}.json").read_text())
        assert sum(log["losses"][-3:]) < sum(log["losses"][:3]), log["losses"]
        assert (out / "plots" / f"{n}_loss.png").is_file()


def test_encoder_predict_accuracy(encoder_project: dict[str, Any]) -> None:
    res = encoder_project["predict"]
    assert res.exit_code == 0, res.output
    out, root = encoder_project["out"], encoder_project["root"]
    rows = _read_csv(out / "predictions" / "sent_test.sent.csv")
    assert len(rows) == 12 and set(rows[0]) == {"text", "label", "prediction", "confidence"}
    metrics = json.loads((out / "predictions" / "sent_test.sent.metrics.json").read_text())
    acc = sum(r["prediction"] == r["label"] for r in rows) / 12
    assert metrics["accuracy"] == pytest.approx(acc) and metrics["n"] == 12
    assert acc >= 0.75  # the pretrained encoder separates the two word lists after a few steps
    assert "accuracy" in res.stdout


def test_encoder_adapter_loads_in_peft_with_identical_logits(encoder_project: dict[str, Any]) -> None:
    """The saved adapter (LoRA + ``classifier`` in modules_to_save) on PEFT's BertForSequenceClassification gives the
    logits loraplex's multi-task encoder gives."""
    from peft import PeftModel
    from transformers import AutoTokenizer, BertForSequenceClassification

    from loraplex.config import load_config
    from loraplex.run import load_trained_plex

    out = encoder_project["out"]
    plex = load_trained_plex(load_config(encoder_project["cfg"]), out)
    tok = AutoTokenizer.from_pretrained(minilm_path())
    enc = tok(["the film was great", "the film was poor indeed", "i like the dog"], padding=True,
              return_tensors="pt")
    with torch.no_grad():
        res = plex(enc["input_ids"], attention_mask=enc["attention_mask"], adapters=["sent", "topic", "topic"])
        ours = [lg.float() for lg in res.logits]
    for i, name in enumerate(["sent", "topic", "topic"]):
        base = BertForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
        pm = PeftModel.from_pretrained(copy.deepcopy(base), str(out / "adapters" / name)).eval()
        with torch.no_grad():
            ref = pm(input_ids=enc["input_ids"][i:i + 1], attention_mask=enc["attention_mask"][i:i + 1]).logits[0]
        torch.testing.assert_close(ours[i], ref, atol=1e-5, rtol=1e-4)


def test_serve_hook_serves_trained_adapters_and_active(project: dict[str, Any]) -> None:
    """``loraplex serve CONFIG.yaml``: the trained adapters and merge by name, ``active`` as an alias."""
    from loraplex.serve.cli import build_engine_from_config
    from loraplex.config import load_config
    from loraplex.run import serve_arguments

    out = project["out"]
    args = serve_arguments(load_config(project["cfg"]))
    assert args == {"base": str(project["root"] / "base"),
                    "adapters": {n: str(out / "adapters" / n) for n in ("a", "b", "c", "ab")},
                    "compositions": {"active": "a"}}
    engine, registry, _ = build_engine_from_config(project["cfg"])
    try:
        assert {"a", "b", "c", "ab", "active"} <= set(registry.known())
        assert engine.call_on_worker(lambda: registry.resolve("active", prompt="one")).choice == "a"
    finally:
        engine.close()
