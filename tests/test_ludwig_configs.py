"""Ludwig LLM configs as Ludwig users write them (shaped after Ludwig's docs, its README LLM example and its
``tests/integration_tests/test_llm.py``): they validate, train on a tiny Llama, and predict with their prompt
template and generation settings; each key loraplex accepts without honouring gives exactly one
:class:`~loraplex.config.LudwigConfigWarning` (captured with pytest's ``recwarn``)."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from typer.testing import CliRunner

from loraplex.adapters.io import load_adapter
from loraplex.cli import app
from loraplex.config import ConfigError, LudwigConfigWarning, load_config
from train_project import pairs, save_tiny_llama, write_csv, write_jsonl, write_yaml

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread (conftest)


def cli(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


def ludwig_notes(recwarn: pytest.WarningsRecorder) -> list[str]:
    """The dotted paths of the Ludwig warnings recorded (message ``<source>: <path>: <what loraplex does>``)."""
    out = []
    for w in recwarn.list:
        if issubclass(w.category, LudwigConfigWarning):
            text = str(w.message)
            assert "\n" not in text  # one line each
            out.append(text.split(": ")[1])
    return out


# ------------------------------------------------------------------------------------------------ configs
#: Ludwig's README LLM example (single adapter, 4-bit quantization, prompt template, trainer type finetune,
#: a scheduler with warmup and cosine decay), with a dataset.
README_LLM = """\
model_type: llm
base_model: meta-llama/Llama-2-7b-hf
quantization:
  bits: 4
adapter:
  type: lora
prompt:
  template: |
    Below is an instruction that describes a task, paired with an input that may provide further context.
    ### Instruction:
    {instruction}
    ### Input:
    {input}
    ### Response:
input_features:
  - name: prompt
    type: text
output_features:
  - name: output
    type: text
trainer:
  type: finetune
  learning_rate: 0.0001
  batch_size: 1
  gradient_accumulation_steps: 16
  epochs: 3
  learning_rate_scheduler:
    decay: cosine
    warmup_fraction: 0.01
preprocessing:
  sample_ratio: 0.1
backend:
  type: local
"""

#: Ludwig's integration-test style: adapter shorthand, generation block, eval_batch_size, an encoder on the input.
TEST_LLM = """\
model_type: llm
base_model: hf-internal-testing/tiny-random-GPTJForCausalLM
adapter: lora
input_features:
  - name: review
    type: text
    encoder: {type: passthrough}
output_features:
  - name: output
    type: text
    preprocessing: {max_sequence_length: 8}
generation:
  max_new_tokens: 5
  temperature: 0.5
  top_p: 0.75
  top_k: 40
  num_beams: 4
  pad_token_id: 0
trainer:
  type: finetune
  batch_size: 8
  eval_batch_size: 2
  epochs: 2
  learning_rate_scheduler: {decay: linear, warmup_fraction: 0.1, reduce_on_plateau: 2}
backend: {type: ray, processor: {parallelism: 1}, trainer: {use_gpu: false, num_workers: 2}}
"""

#: The multi-adapter schema with a task-subtraction merge and Ludwig's LoRA fields at their default values.
MULTI = """\
model_type: llm
base_model: m
adapters:
  adapters:
    coding: {type: lora, r: 8, alpha: 16, bias_type: none, init_lora_weights: true, pretrained_adapter_weights: null,
             postprocessor: {merge_adapter_into_base_model: false}}
    chat: lora
  merge: {name: coding_minus_chat, sources: [coding, chat], weights: [1.0, -1.0]}
  active: coding_minus_chat
prompt: {template: "{prompt}", task: "answer"}
trainer: {type: finetune, batch_size: auto, optimizer: {type: adamw}}
"""

CASES = {
    "readme_llm": (README_LLM, ["preprocessing"]),  # quantization.bits is honoured
    "test_llm": (TEST_LLM, ["backend.processor", "backend.trainer", "generation.num_beams", "generation.pad_token_id",
                            "input_features[0].encoder", "output_features[0].preprocessing",
                            "trainer.learning_rate_scheduler.reduce_on_plateau"]),
    "multi": (MULTI, ["prompt.task", "trainer.batch_size"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_ludwig_configs_validate_with_one_warning_per_key(case: str, tmp_path: Path,
                                                          recwarn: pytest.WarningsRecorder) -> None:
    text, expected = CASES[case]
    path = tmp_path / f"{case}.yaml"
    path.write_text(text)
    cfg = load_config(path)
    assert sorted(ludwig_notes(recwarn)) == sorted(expected)  # each once, nothing else
    if case == "readme_llm":
        assert cfg.adapter_names == ["default"] and cfg.trainer.type == "finetune"
        assert cfg.trainer.scheduler == ("cosine", 0.01) and cfg.trainer.gradient_accumulation_steps == 16
        a = cfg.get_adapter("default")
        assert a.prompt_column == "prompt" and a.response_column == "output"
        assert a.prompt_template is not None and "{instruction}" in a.prompt_template
        assert cfg.quantize == "int4"
    elif case == "test_llm":
        assert cfg.get_adapter("default").type == "lora" and cfg.backend_type == "ray"
        assert cfg.trainer.eval_batch_size == 2 and cfg.trainer.scheduler == ("linear", 0.1)
        assert cfg.generation.generate_kwargs() == {"max_new_tokens": 5, "temperature": 0.5, "top_p": 0.75,
                                                    "top_k": 40}
    else:
        assert cfg.adapter_names == ["coding", "chat"] and cfg.get_adapter("chat").r == 8
        assert cfg.merges[0].weights == [0.5, -0.5]  # divided by sum |w|
        assert cfg.trainer.batch_size == 8 and cfg.get_adapter("coding").prompt_template == "{prompt}"


def test_each_key_warns_once_per_load(tmp_path: Path, recwarn: pytest.WarningsRecorder) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(TEST_LLM)
    load_config(path)
    load_config(path)
    notes = ludwig_notes(recwarn)
    assert len(notes) == 2 * len(CASES["test_llm"][1]) and all(notes.count(n) == 2 for n in set(notes))


def test_adapter_shorthands() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", LudwigConfigWarning)  # shorthands are honoured: no notes
        one = load_config({"base_model": "m", "adapter": "lora"})
        flat = load_config({"base_model": "m", "adapters": {"a": "lora", "b": "lora", "active": "b"}})
        nested = load_config({"base_model": "m", "adapters": {"adapters": {"a": "lora", "b": {"r": 4}}}})
    assert one.adapter_names == ["default"] and one.get_adapter("default").r == 8
    assert flat.adapter_names == ["a", "b"] and flat.active == "b"
    assert nested.get_adapter("a").alpha == 16 and nested.get_adapter("b").r == 4


BAD = [
    ({"generation": {"max_new_token": 5}}, "generation", "unknown field 'max_new_token' (did you mean 'max_new_tokens'?)"),
    ({"prompt": {"templat": "x"}}, "prompt", "unknown field 'templat' (did you mean 'template'?)"),
    ({"generation": {"temperature": "hot"}}, "generation.temperature", "expected a number, got 'hot'"),
    ({"quantization": {"bits": 3}}, "quantization.bits", "expected one of 4, 8, got 3"),
    ({"backend": {"type": "dask"}}, "backend.type", "expected one of local, ray, got 'dask'"),
    ({"trainer": {"type": "none"}}, "trainer.type", "expected one of finetune, got 'none'"),
    ({"trainer": {"batch_size": "big"}}, "trainer.batch_size", "expected an integer, got 'big'"),
    ({"trainer": {"learning_rate_scheduler": {"decay": "cosin"}}}, "trainer.learning_rate_scheduler.decay",
     "(did you mean 'cosine'?)"),
    ({"trainer": {"learning_rate_scheduler": {"warmup_fraction": 0.1}, "warmup_ratio": 0.2}},
     "trainer.learning_rate_scheduler.warmup_fraction", "contradicts warmup_ratio 0.2"),
    ({"adapter": {"bias_type": "all"}}, "adapter.bias_type", "loraplex trains no bias terms (got 'all')"),
    ({"adapter": {"init_lora_weights": "pissa"}}, "adapter.init_lora_weights", "got 'pissa'"),
    ({"adapter": "ia3"}, "adapter.type", "expected one of lora, got 'ia3'"),
    ({"adapter": {"loraplus_lr_ratio": 0}}, "adapter.loraplus_lr_ratio", "expected a number > 0"),
    ({"input_features": [{"name": "q", "encodr": {}}]}, "input_features[0]",
     "unknown field 'encodr' (did you mean 'encoder'?)"),
    ({"trainr": {}}, "(top level)", "unknown field 'trainr' (did you mean 'trainer'?)"),
]


@pytest.mark.parametrize(("extra", "path", "fragment"), BAD, ids=[b[1] + ":" + b[2][:20] for b in BAD])
def test_wrong_keys_and_types_stay_errors(extra: dict[str, Any], path: str, fragment: str) -> None:
    data: dict[str, Any] = {"base_model": "m", "adapter": {"type": "lora"}, **extra}
    with pytest.raises(ConfigError) as info:
        load_config(data)
    matches = [msg for p, msg in info.value.problems if p == path]
    assert any(fragment in m for m in matches), info.value.problems


def test_ludwig_trainer_and_feature_names_map_onto_ours(recwarn: pytest.WarningsRecorder) -> None:
    cfg = load_config({"base_model": "m", "adapter": "lora",
                       "input_features": [{"name": "q", "type": "text", "column": "question"}],
                       "output_features": [{"name": "a", "type": "text", "column": "answer"}],
                       "trainer": {"train_steps": 7, "steps_per_checkpoint": 3, "warmup_ratio": 0.2,
                                   "learning_rate_scheduler": {"decay": "exponential", "decay_rate": 0.5}}})
    t, a = cfg.trainer, cfg.get_adapter("default")
    assert (t.max_steps, t.checkpoint_every, t.scheduler) == (7, 3, ("exponential", 0.2))
    assert (a.prompt_column, a.response_column) == ("question", "answer")
    assert ludwig_notes(recwarn) == []
    with pytest.raises(ConfigError, match="trainer.train_steps: contradicts max_steps 5"):
        load_config({"base_model": "m", "adapter": "lora", "trainer": {"train_steps": 7, "max_steps": 5}})


def test_prompt_template_placeholders() -> None:
    """``{column}`` from the row, ``{__sample__}`` the prompt column, ``{__task__}`` the prompt task; other braces
    are kept."""
    from loraplex.config.ludwig import render_prompt, template_columns

    t = "{__task__}: {__sample__} | {context} {not a placeholder} {context}"
    assert template_columns(t) == ["context"]
    assert render_prompt(t, {"context": "ctx"}, sample="q", task="T") == "T: q | ctx {not a placeholder} ctx"
    with pytest.raises(KeyError):
        render_prompt("{missing}", {})
    cfg = load_config({"base_model": "m", "adapter": "lora", "prompt": {"template": "{__task__}: {__sample__}",
                                                                         "task": "Summarise"}})
    assert cfg.get_adapter("default").prompt_template == "Summarise: {__sample__}"


def test_scheduler_shapes() -> None:
    """``make_scheduler`` against the formulas: constant / exponential (staircase) after linear warmup."""
    from loraplex.train.trainer import make_scheduler

    def lrs(decay: str, **kw: Any) -> list[float]:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = make_scheduler(opt, decay, 0.2, 10, **kw)
        out = []
        for _ in range(10):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    assert lrs("constant") == pytest.approx([0, 0.5] + [1.0] * 8)
    assert lrs("exponential", decay_rate=0.5, decay_steps=2, staircase=True) == \
        pytest.approx([0, 0.5] + [0.5 ** ((s - 2) // 2) for s in range(2, 10)])
    assert lrs("linear")[2] == pytest.approx(1.0) and lrs("linear")[-1] == pytest.approx(1 / 8)
    cos = lrs("cosine")
    assert cos[2] == pytest.approx(1.0) and cos[6] == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------------ training
def _trained_config(root: Path) -> dict[str, Any]:
    """Multi-adapter, prompt template over a ``question`` column, generation block, Ludwig trainer fields."""
    return {
        "model_type": "llm", "base_model": "base", "output_dir": str(root / "out"),
        "adapters": {"adapters": {
            "a": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"],
                  "dataset": "a.csv", "bias_type": "none", "loraplus_lr_ratio": 4.0},
            "b": {"type": "lora", "r": 2, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"],
                  "dataset": "b.jsonl", "init_lora_weights": "gaussian"},
        }, "merge": {"name": "a_minus_b", "sources": ["a", "b"], "weights": [1.0, -1.0]}, "active": "a"},
        "prompt": {"template": "up {question} down"},
        "generation": {"max_new_tokens": 1, "temperature": 0.1, "pad_token_id": 0},
        "input_features": [{"name": "question", "type": "text"}],
        "output_features": [{"name": "answer", "type": "text"}],
        "trainer": {"type": "finetune", "epochs": 2, "batch_size": 4, "eval_batch_size": 3,
                    "gradient_accumulation_steps": 2, "learning_rate": 5e-2, "seed": 3,
                    "learning_rate_scheduler": {"decay": "cosine", "warmup_fraction": 0.25}},
    }


def _rows(task: str, n: int, seed: int) -> list[dict[str, str]]:
    return [{"question": r["prompt"], "answer": r["response"]} for r in pairs(task, n, seed)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    import loraplex.train.trainer as trainer_mod

    root = tmp_path_factory.mktemp("ludwig")
    save_tiny_llama(root / "base")
    write_csv(root / "a.csv", _rows("a", 16, 0))
    write_jsonl(root / "b.jsonl", _rows("b", 16, 0))
    write_csv(root / "test.csv", _rows("b", 6, 1))
    path = write_yaml(root / "ludwig.yaml", _trained_config(root))
    calls: list[tuple[Any, ...]] = []
    original = trainer_mod.make_scheduler

    def spy(opt: Any, decay: str, warmup: float, n_steps: int, **kw: Any) -> Any:
        calls.append((decay, warmup, n_steps, [g["lr"] for g in opt.param_groups]))
        return original(opt, decay, warmup, n_steps, **kw)

    trainer_mod.make_scheduler = spy
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = trainer_mod.train(path, progress=False, log=lambda m: None)
    finally:
        trainer_mod.make_scheduler = original
    notes = [str(w.message) for w in caught if issubclass(w.category, LudwigConfigWarning)]
    return {"root": root, "cfg": path, "out": root / "out", "res": res, "sched": calls, "notes": notes}


def test_trains_with_ludwig_trainer_fields(trained: dict[str, Any]) -> None:
    res = trained["res"]
    assert res.trained == ["a", "b"] and res.merges == ["a_minus_b"]
    for n in ("a", "b"):  # 16 rows / 4 per micro-batch x 2 epochs = 8 micro-batches = 4 optimizer steps
        assert len(res.losses[n]) == 4
    # the Ludwig scheduler: cosine after 25% warmup, per adapter; LoRA+: B at 4x the learning rate
    assert trained["sched"] == [("cosine", 0.25, 4, [5e-2, 0.2]), ("cosine", 0.25, 4, [5e-2])]
    assert len(trained["notes"]) == 1 and "generation.pad_token_id" in trained["notes"][0]
    b = load_adapter(trained["out"] / "adapters" / "b")
    assert b.spec.r == 2 and b.spec.lora_alpha == 4


def test_training_rows_are_the_template(trained: dict[str, Any]) -> None:
    """The tokens trained on are ``[bos] up <question> down <answer> [eos]``: the template filled from the row."""
    from transformers import AutoTokenizer

    from loraplex.train.data import load_adapter_data

    cfg = load_config(trained["cfg"])
    tok = AutoTokenizer.from_pretrained(trained["root"] / "base")
    data = load_adapter_data(cfg, "a", tok)
    first = _rows("a", 16, 0)[0]
    ids = [tok.bos_token_id] + tok(f"up {first['question']} down {first['answer']}",
                                   add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert data.examples[0].input_ids == ids
    n_prompt = 1 + 3  # bos, up, question, down
    assert data.examples[0].labels[:n_prompt] == [-100] * n_prompt and data.examples[0].labels[n_prompt:] == ids[n_prompt:]


def test_task_subtraction_is_the_same_from_config_cli_and_python(trained: dict[str, Any]) -> None:
    from loraplex.merge import merge_to_disk

    out, root = trained["out"], trained["root"]
    a, b = load_adapter(out / "adapters" / "a", "a"), load_adapter(out / "adapters" / "b", "b")
    res = cli("merge", "--sources", "a,b", "--weights", "1.0,-1.0", "--adapters-dir", str(out / "adapters"),
              "--out", str(root / "cli_merge"))
    assert res.exit_code == 0, res.output
    merge_to_disk({"a": a, "b": b}, ["a", "b"], [1.0, -1.0], "linear", root / "py_merge", echo=False)
    deltas = []
    for folder in (out / "adapters" / "a_minus_b", root / "cli_merge", root / "py_merge"):
        m = load_adapter(folder)
        deltas.append({k: mod.scaling * (mod.B.double() @ mod.A.double()) for k, mod in m.modules.items()})
    for k, mod in a.modules.items():  # 0.5 delta_a - 0.5 delta_b
        ref = 0.5 * mod.scaling * (mod.B.double() @ mod.A.double()) \
            - 0.5 * b.modules[k].scaling * (b.modules[k].B.double() @ b.modules[k].A.double())
        for d in deltas:
            torch.testing.assert_close(d[k], ref, atol=1e-6, rtol=1e-5)


def test_predict_feeds_the_template_and_honours_generation(trained: dict[str, Any],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoTokenizer

    from loraplex.train.predict import Runner, predict

    seen: list[dict[str, Any]] = []
    original = Runner.generate

    def spy(self: Runner, ids: torch.Tensor, mask: torch.Tensor, **kw: Any) -> torch.Tensor:
        seen.append({"ids": ids.clone(), "mask": mask.clone(), **kw})
        return original(self, ids, mask, **kw)

    monkeypatch.setattr(Runner, "generate", spy)
    root = trained["root"]
    res = predict(trained["cfg"], root / "test.csv", adapter="b", out=root / "pred.jsonl", progress=False)
    rows = [json.loads(x) for x in (root / "pred.jsonl").read_text().splitlines()]
    src = _rows("b", 6, 1)
    tok = AutoTokenizer.from_pretrained(root / "base")
    assert [r["prompt_text"] for r in rows] == [f"up {r['question']} down" for r in src]
    fed = []
    for call in seen:
        assert call["max_new_tokens"] == 1 and call["temperature"] == 0.1 and call["do_sample"] is False
        assert call["pad_token_id"] == tok.pad_token_id  # from the tokenizer, not generation.pad_token_id
        fed += [tok.decode(i[m.bool()].tolist()) for i, m in zip(call["ids"], call["mask"])]
    assert fed == [f"[BOS] up {r['question']} down" for r in src]
    assert all(len(r["prediction"].split()) <= 1 for r in rows)  # max_new_tokens 1
    two_words = [i for i, r in enumerate(src) if len(r["answer"].split()) == 2]
    assert two_words and all(rows[i]["exact_match"] is False for i in two_words)
    assert res.metrics["max_new_tokens"] == 1
    # --max-new-tokens still overrides the config
    predict(trained["cfg"], root / "test.csv", adapter="b", out=root / "pred3.jsonl", progress=False,
            max_new_tokens=3)
    assert seen[-1]["max_new_tokens"] == 3


def test_backend_ray_takes_the_ray_path(trained: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    import loraplex.distributed.cli as dcli

    calls: list[str] = []

    def fake(config: str, **kw: Any) -> Any:
        calls.append(config)
        return trained["res"]

    monkeypatch.setattr(dcli, "train_on_ray", fake)
    data = yaml.safe_load(trained["cfg"].read_text())
    data["backend"] = {"type": "ray"}
    path = write_yaml(trained["root"] / "ray.yaml", data)
    res = cli("train", str(path), "--no-progress")
    assert res.exit_code == 0, res.output
    assert calls == [str(path)]
    [line] = [x for x in res.stderr.splitlines() if "generation.pad_token_id" in x]  # one line, once
    assert line.startswith("warning: ") and "predict takes the special token ids from the tokenizer" in line


def test_serve_applies_the_template_and_generation_defaults(trained: dict[str, Any]) -> None:
    """``loraplex serve CONFIG``: an adapter's completion prompts get its template, requests default to the
    config's ``generation`` block (greedy, ``max_new_tokens``), and what the client sends wins."""
    import httpx
    from transformers import AutoTokenizer

    from loraplex.run import serve_arguments
    from loraplex.serve import ServerThread
    from loraplex.serve.cli import build_engine_from_config

    args = serve_arguments(load_config(trained["cfg"]))
    assert args["generation"] == {"max_new_tokens": 1, "temperature": 0.1}
    assert args["prompt_templates"] == {n: ("up {question} down", "question") for n in ("a", "b")}
    tok = AutoTokenizer.from_pretrained(trained["root"] / "base")
    engine, _, app = build_engine_from_config(trained["cfg"])
    rendered = tok("up what is it down")["input_ids"]
    ref = engine.call_on_worker(  # greedy next token of adapter b on the rendered prompt
        lambda: int(engine.plex(torch.tensor([rendered]), adapters="b").logits[0, -1].argmax()))
    try:
        with ServerThread(app) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
            def complete(**body: Any) -> dict[str, Any]:
                r = http.post("/v1/completions", json=body)
                assert r.status_code == 200, r.text
                return r.json()

            out = complete(model="b", prompt="what is it", echo=True, max_tokens=None)
            assert out["usage"] == {"prompt_tokens": len(rendered), "completion_tokens": 1,
                                    "total_tokens": len(rendered) + 1}
            assert out["choices"][0]["text"] == "up what is it down" + tok.decode([ref], skip_special_tokens=True)
            more = complete(model="b", prompt="what is it", max_tokens=3, ignore_eos=True)
            assert more["usage"]["completion_tokens"] == 3  # the client's max_tokens wins
            assert more["choices"][0]["text"].startswith(tok.decode([ref], skip_special_tokens=True))
            ids = complete(model="b", prompt=rendered)  # token ids are sent as given
            assert ids["usage"]["prompt_tokens"] == len(rendered)
            merged = complete(model="a_minus_b", prompt="what is it")  # a merge has no template
            assert merged["usage"]["prompt_tokens"] == len(tok("what is it")["input_ids"])
    finally:
        engine.close()


# ------------------------------------------------------------------------------------------------ pretrained / saved
def _peft_loss(base: Path, adapter: Path, rows: list[dict[str, str]]) -> float:
    """Token-weighted teacher-forced response loss with PEFT's own model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(adapter)).eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for r in rows:
            p = tok(r["prompt"], add_special_tokens=False)["input_ids"]
            s = tok(r["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            ids = torch.tensor([[tok.bos_token_id] + p + s])
            labels = ids[0, 1:].clone()
            labels[: len(p)] = -100
            total += float(torch.nn.functional.cross_entropy(model(input_ids=ids).logits[0, :-1].float(), labels,
                                                             ignore_index=-100, reduction="sum"))
            n += len(s)
    return total / n


def test_pretrained_adapter_weights_start_training(trained: dict[str, Any], tmp_path: Path) -> None:
    """Step 0 of an adapter started from a PEFT folder is the folder's adapter: its first loss (one batch of every
    row, before any update) is PEFT's loss with that folder; r, alpha and targets come from the folder."""
    from loraplex.train import train

    root = trained["root"]
    rows = pairs("a", 8, 5)
    write_csv(tmp_path / "d.csv", rows)
    path = write_yaml(tmp_path / "pre.yaml", {
        "base_model": str(root / "base"), "output_dir": str(tmp_path / "out"),
        "adapter": {"type": "lora", "dropout": 0.0, "dataset": "d.csv",
                    "pretrained_adapter_weights": str(trained["out"] / "adapters" / "a")},
        "trainer": {"epochs": 2, "batch_size": 8, "learning_rate": 1e-2, "max_length": 16},
    })
    cfg = load_config(path)
    assert (cfg.get_adapter("default").r, cfg.get_adapter("default").alpha) == (4, 8.0)
    res = train(path, progress=False, log=lambda m: None)
    ref = _peft_loss(root / "base", trained["out"] / "adapters" / "a", rows)
    assert res.losses["default"][0] == pytest.approx(ref, rel=1e-5, abs=1e-6)
    assert res.losses["default"][1] != pytest.approx(ref, rel=1e-3)  # and it trains on from there
    done = load_adapter(tmp_path / "out" / "adapters" / "default")
    assert sorted(done.spec.target_modules) == ["q_proj", "v_proj"] and done.spec.r == 4
    # a config that disagrees with the folder is refused, naming the field
    bad = yaml.safe_load(path.read_text())
    bad["adapter"]["r"] = 8
    with pytest.raises(ConfigError, match=r"adapter.pretrained_adapter_weights: the folder's r is 4"):
        load_config(bad, base_dir=tmp_path)


def test_modules_to_save_are_trained_saved_and_load_in_peft(trained: dict[str, Any], tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loraplex.config import load_config as load
    from loraplex.run import load_trained_plex
    from loraplex.train import train

    root = trained["root"]
    write_csv(tmp_path / "d.csv", pairs("c", 12, 0))
    path = write_yaml(tmp_path / "mts.yaml", {
        "base_model": str(root / "base"), "output_dir": str(tmp_path / "out"),
        "adapters": {"adapters": {
            "s": {"r": 2, "dropout": 0.0, "target_modules": ["q_proj"], "modules_to_save": ["lm_head"],
                  "dataset": "d.csv"},
            "plain": {"r": 2, "dropout": 0.0, "target_modules": ["q_proj"], "dataset": "d.csv"}}},
        "trainer": {"epochs": 2, "batch_size": 4, "learning_rate": 5e-2, "max_length": 16},
    })
    res = train(path, progress=False, log=lambda m: None)
    assert res.trained == ["s", "plain"]
    folder = tmp_path / "out" / "adapters" / "s"
    s = load_adapter(folder, "s")
    base = AutoModelForCausalLM.from_pretrained(root / "base")
    [(mod, sd)] = s.saved_modules.items()
    assert mod == "lm_head" and not torch.allclose(sd["weight"], base.lm_head.weight)  # the copy trained
    assert not load_adapter(tmp_path / "out" / "adapters" / "plain").saved_modules
    ids = torch.tensor([[2, 4, 5, 6], [2, 7, 8, 9]])
    plex = load_trained_plex(load(path), tmp_path / "out")
    with torch.no_grad():
        ours = plex(ids, adapters=["s", "plain"]).logits
        pm = PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()
        ref_s = pm(input_ids=ids[:1]).logits
        pp = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "out" / "adapters" / "plain")).eval()
        ref_p = pp(input_ids=ids[1:]).logits
    torch.testing.assert_close(ours[:1], ref_s, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours[1:], ref_p, atol=1e-5, rtol=1e-4)
