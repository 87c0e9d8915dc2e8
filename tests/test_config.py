"""The training config (loraplex.config): defaults, Ludwig compatibility, readable errors, PEFT fields."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from loraplex.adapters.spec import LoraSpec
from loraplex.config import ConfigError, TrainConfig, load_config
from train_project import example_dict, example_project


@pytest.fixture()
def project(tmp_path: Path) -> Path:
    """A folder with the example config and its two dataset files."""
    return example_project(tmp_path)


def problems_of(data: dict[str, Any], **kwargs: Any) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        load_config(data, **kwargs)
    return info.value.problems


def mutated(fn: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    d = copy.deepcopy(example_dict())
    fn(d)
    return d


# ---------------------------------------------------------------------------------------------------- valid
def test_example_parses_with_defaults(project: Path) -> None:
    cfg = load_config(project / "train.yaml", check_files=True, require_datasets=True)
    assert isinstance(cfg, TrainConfig)
    assert cfg.base_model == "PATH_OR_HUB_ID" and cfg.model_type == "llm"
    assert cfg.output_dir == "runs/train"
    assert cfg.source == project / "train.yaml"
    assert cfg.adapter_names == ["coding", "chat"]
    coding, chat = cfg.get_adapter("coding"), cfg.get_adapter("chat")
    assert (coding.r, coding.alpha, coding.dropout) == (16, 32, 0.05)
    assert (chat.r, chat.alpha, chat.dropout) == (8, 16, 0.05)  # dropout default
    assert coding.target_modules == ["q_proj", "v_proj"]
    assert coding.use_rslora is False and coding.use_dora is False
    assert coding.task == "causal_lm"
    assert (coding.prompt_column, coding.response_column) == ("prompt", "response")  # from the features
    # relative dataset paths resolve against the config's folder
    assert Path(coding.dataset) == (project / "data" / "code.jsonl").resolve()
    assert Path(chat.dataset) == (project / "data" / "chat.csv").resolve()
    [merge] = cfg.merges
    assert merge.name == "coding_chat" and merge.sources == ["coding", "chat"]
    assert merge.weights == pytest.approx([0.7, 0.3])
    assert merge.combination_type == "ties" and merge.density == 0.7 and merge.majority_sign_method == "total"
    assert merge.normalize is True and merge.peft_compat is False and merge.svd_rank is None
    router = cfg.router
    assert router is not None and router.type == "mlp" and router.top_k == 1 and router.mode == "top1"
    assert router.experts == ["coding", "chat"] and router.load_balance == "switch"
    assert router.load_balance_weight == 1e-2 and router.z_loss_weight == 1e-3 and router.pooling == "mean"
    assert cfg.active == "coding_chat"
    t = cfg.trainer
    assert (t.epochs, t.learning_rate, t.batch_size, t.max_length) == (3, 2e-4, 8, 512)  # 2e-4 read as a float
    assert t.precision == "fp32" and t.joint is True and t.gradient_accumulation_steps == 1


def test_minimal_defaults() -> None:
    cfg = load_config({"base_model": "m", "adapters": {"adapters": {"a": {"r": 4}, "b": None}}})
    a, b = cfg.get_adapter("a"), cfg.get_adapter("b")
    assert a.alpha == 8 and b.r == 8 and b.alpha == 16 and a.dropout == 0.05
    assert a.target_modules is None and a.dataset is None
    assert cfg.active == "a" and cfg.merges == [] and cfg.router is None
    assert cfg.output_dir == "runs/train"


def test_merge_defaults_and_normalisation() -> None:
    cfg = load_config({"base_model": "m", "adapters": {"adapters": {"a": {}, "b": {}, "c": {}}, "merge": {}}})
    [m] = cfg.merges
    assert m.name == "merged" and m.sources == ["a", "b", "c"] and m.combination_type == "linear"
    assert m.density == 0.5 and m.weights == pytest.approx([1 / 3] * 3)
    cfg = load_config({"base_model": "m", "adapters": {"adapters": {"a": {}, "b": {}}, "merge": [
        {"name": "m1", "weights": [2, 2]}, {"name": "m2", "weights": [1, -0.5], "normalize": False}],
        "active": "m2"}})
    assert [m.name for m in cfg.merges] == ["m1", "m2"]
    assert cfg.merges[0].weights == pytest.approx([0.5, 0.5])
    assert cfg.merges[1].weights == [1.0, -0.5]
    assert cfg.active == "m2"
    # divided by sum |w| (the rule of the CLI and of loraplex.merge): task subtraction keeps its signs
    cfg = load_config({"base_model": "m", "adapters": {"adapters": {"a": {}, "b": {}}, "merge": {"weights": [1, -0.5]}}})
    assert cfg.merges[0].weights == pytest.approx([2 / 3, -1 / 3])


def test_singular_adapter_is_named_default() -> None:
    cfg = load_config({"base_model": "m", "adapter": {"type": "lora", "r": 4, "target_modules": "all-linear"}})
    assert cfg.adapter_names == ["default"]
    assert cfg.active == "default" and cfg.adapter is None
    assert cfg.get_adapter("default").alpha == 8
    assert cfg.get_adapter("default").target_modules == "all-linear"
    # errors inside it are reported under 'adapter'
    problems = problems_of({"base_model": "m", "adapter": {"r": -1}})
    assert problems == [("adapter.r", "expected an integer > 0, got -1")]


def test_encoder_defaults_and_columns() -> None:
    cfg = load_config({"base_model": "m", "model_type": "encoder",
                       "adapters": {"adapters": {"topic": {}, "ner": {"task": "token_classification",
                                                                      "label_column": "tags"}}},
                       "input_features": [{"name": "sentence", "type": "text"}]})
    topic, ner = cfg.get_adapter("topic"), cfg.get_adapter("ner")
    assert topic.task == "classification" and topic.label_column == "label" and topic.text_column == "sentence"
    assert ner.task == "token_classification" and ner.label_column == "tags"
    peft = cfg.lora_spec("ner").to_peft_config()
    assert peft["task_type"] == "TOKEN_CLS" and peft["modules_to_save"] == ["classifier"]
    assert cfg.lora_spec("topic").to_peft_config()["task_type"] == "SEQ_CLS"


def test_router_mode_derivation_and_active_router() -> None:
    cfg = load_config({"base_model": "m", "adapters": {"adapters": {"a": {}, "b": {}, "c": {}},
                                                       "router": {"top_k": 2}, "active": "router"}})
    assert cfg.router is not None and cfg.router.mode == "topk" and cfg.router.type == "linear"
    assert cfg.active == "router"
    cfg = load_config({"base_model": "m", "adapters": {"adapters": {"a": {}, "b": {}},
                                                       "router": {"mode": "soft", "experts": ["a", "b"]},
                                                       "active": "auto"}})
    assert cfg.router is not None and cfg.router.mode == "soft" and cfg.active == "auto"


def test_active_may_be_a_composition_spec() -> None:
    cfg = load_config({"base_model": "m", "adapters": {"adapters": {"a": {}, "b": {}},
                                                       "active": "blend(a=0.5, b=0.5)"}})
    assert cfg.active == "blend(a=0.5, b=0.5)"


def test_stack_on_and_training_order() -> None:
    cfg = load_config({"base_model": "m", "adapters": {"adapters": {
        "top": {"stack_on": "mid"}, "mid": {"stack_on": "bottom"}, "bottom": {}, "other": {}}}})
    assert cfg.training_order() == ["bottom", "mid", "top", "other"]
    assert cfg.stack_chain("top") == ["bottom", "mid"]


def test_yaml_file_output_dir_and_dataset_paths(tmp_path: Path) -> None:
    (tmp_path / "cfg").mkdir()
    path = tmp_path / "cfg" / "my_run.yml"
    path.write_text("base_model: m\nadapter: {dataset: ../d/train.csv, eval_dataset: /abs/eval.jsonl}\n")
    cfg = load_config(path)
    assert cfg.output_dir == "runs/my_run"
    a = cfg.get_adapter("default")
    assert Path(a.dataset) == (tmp_path / "d" / "train.csv").resolve()
    assert a.eval_dataset == "/abs/eval.jsonl"


# ---------------------------------------------------------------------------------------------------- errors
BAD_CASES: list[tuple[str, Callable[[dict[str, Any]], None], str, str]] = [
    ("both adapter and adapters", lambda d: d.update(adapter={"r": 4}), "adapters", "not both"),
    ("empty adapters", lambda d: d["adapters"].update(adapters={}), "adapters.adapters",
     "expected at least one adapter"),
    ("unknown key with suggestion", lambda d: d["adapters"]["adapters"]["coding"].update(rnak=3),
     "adapters.adapters.coding", "unknown field 'rnak' (did you mean 'r'?)"),
    ("r <= 0", lambda d: d["adapters"]["adapters"]["coding"].update(r=0), "adapters.adapters.coding.r",
     "expected an integer > 0, got 0"),
    ("density 1.5", lambda d: d["adapters"]["merge"].update(density=1.5), "adapters.merge.density",
     "expected a number in (0, 1], got 1.5"),
    ("weights length", lambda d: d["adapters"]["merge"].update(weights=[0.5, 0.3, 0.2]), "adapters.merge.weights",
     "expected 2 weights (one per source: coding, chat), got 3"),
    ("unknown merge source", lambda d: d["adapters"]["merge"].update(sources=["coding", "chatt"]),
     "adapters.merge.sources", "unknown adapter 'chatt' (did you mean 'chat'?); known adapters: coding, chat"),
    ("active unknown", lambda d: d["adapters"].update(active="nope"), "adapters.active",
     "got unknown name 'nope'"),
    ("merge name is an adapter name", lambda d: d["adapters"]["merge"].update(name="coding"),
     "adapters.merge.name", "merge name 'coding' is also an adapter name"),
    ("bad combination_type", lambda d: d["adapters"]["merge"].update(combination_type="tie"),
     "adapters.merge.combination_type", "got 'tie' (did you mean 'ties'?)"),
    ("stack_on cycle", lambda d: (d["adapters"]["adapters"]["coding"].update(stack_on="chat"),
                                  d["adapters"]["adapters"]["chat"].update(stack_on="coding")),
     "adapters.adapters.coding.stack_on", "stack_on cycle: coding -> chat -> coding"),
    ("stack_on self", lambda d: d["adapters"]["adapters"]["chat"].update(stack_on="chat"),
     "adapters.adapters.chat.stack_on", "stack_on cycle: chat -> chat"),
    ("stack_on unknown", lambda d: d["adapters"]["adapters"]["chat"].update(stack_on="cod"),
     "adapters.adapters.chat.stack_on", "unknown adapter 'cod'"),
    ("top_k > experts", lambda d: d["adapters"]["router"].update(top_k=3), "adapters.router.top_k",
     "expected top_k <= 2 (the number of experts), got 3"),
    ("use_dora text", lambda d: d["adapters"]["adapters"]["chat"].update(use_dora="maybe"),
     "adapters.adapters.chat.use_dora", "expected true or false, got 'maybe'"),
    ("missing base_model", lambda d: d.pop("base_model"), "base_model", "required field is missing"),
    ("unknown top-level key", lambda d: d.update(trainr={}), "(top level)",
     "unknown field 'trainr' (did you mean 'trainer'?)"),
    ("trainer synonym", lambda d: d["trainer"].update(lr=0.1), "trainer",
     "unknown field 'lr' (did you mean 'learning_rate'?)"),
    ("dropout out of range", lambda d: d["adapters"]["adapters"]["chat"].update(dropout=1),
     "adapters.adapters.chat.dropout", "expected a number in [0, 1)"),
    ("r not an integer", lambda d: d["adapters"]["adapters"]["chat"].update(r="big"), "adapters.adapters.chat.r",
     "expected an integer, got 'big'"),
    ("bad adapter type", lambda d: d["adapters"]["adapters"]["chat"].update(type="ia3"),
     "adapters.adapters.chat.type", "expected one of lora, got 'ia3'"),
    ("bad target_modules", lambda d: d["adapters"]["adapters"]["chat"].update(target_modules=5),
     "adapters.adapters.chat.target_modules", "got 5"),
    ("bad dataset suffix", lambda d: d["adapters"]["adapters"]["chat"].update(dataset="x.txt"),
     "adapters.adapters.chat.dataset", "expected a .csv, .jsonl, .json or .parquet file, got 'x.txt'"),
    ("router mode contradiction", lambda d: d["adapters"]["router"].update(mode="top1", top_k=2),
     "adapters.router", "mode top1 contradicts top_k 2"),
    ("unknown router expert", lambda d: d["adapters"]["router"].update(experts=["coding", "x"]),
     "adapters.router.experts", "unknown adapter 'x'"),
    ("negative learning rate", lambda d: d["trainer"].update(learning_rate=-1), "trainer.learning_rate",
     "expected a number > 0, got -1"),
    ("bad precision", lambda d: d["trainer"].update(precision="fp8"), "trainer.precision",
     "expected one of fp32, bf16, fp16, got 'fp8'"),
    ("adapter settings not a mapping", lambda d: d["adapters"]["adapters"].update(chat=5),
     "adapters.adapters.chat", "expected a mapping, got 5"),
    ("reserved adapter name", lambda d: d["adapters"]["adapters"].update(router={}), "adapters.adapters",
     "'router' is reserved"),
    ("neither adapter nor adapters", lambda d: d.pop("adapters"), "adapters", "got neither"),
    ("active spec with unknown adapter", lambda d: d["adapters"].update(active="blend(coding=1,chats=1)"),
     "adapters.active", "unknown adapter 'chats' (did you mean 'chat'?)"),
    ("auto without a router", lambda d: (d["adapters"].pop("router"), d["adapters"].update(active="auto")),
     "adapters.active", "'auto' needs an adapters.router block"),
    ("llm with an encoder task", lambda d: d["adapters"]["adapters"]["chat"].update(task="classification"),
     "adapters.adapters.chat.task", "model_type llm trains causal_lm adapters"),
    ("merge weights all zero", lambda d: d["adapters"]["merge"].update(weights=[0, 0]), "adapters.merge.weights",
     "all weights are 0"),
]


@pytest.mark.parametrize(("mutate", "path", "fragment"), [c[1:] for c in BAD_CASES], ids=[c[0] for c in BAD_CASES])
def test_bad_config(mutate: Callable[[dict[str, Any]], None], path: str, fragment: str) -> None:
    problems = problems_of(mutated(mutate))
    matches = [msg for p, msg in problems if p == path]
    assert matches, f"no problem at {path!r}: {problems}"
    assert any(fragment in m for m in matches), f"{fragment!r} not in {matches}"


def test_error_message_lists_problems_and_file(project: Path) -> None:
    d = example_dict()
    d["adapters"]["adapters"]["coding"]["r"] = 0
    d["adapters"]["merge"]["density"] = 1.5
    path = project / "bad.yaml"
    path.write_text(yaml.safe_dump(d))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    assert "bad.yaml" in text and "2 problems" in text
    assert "adapters.adapters.coding.r: expected an integer > 0, got 0" in text
    assert "adapters.merge.density: expected a number in (0, 1], got 1.5" in text
    assert "pydantic" not in text and "errors.pydantic.dev" not in text and "Input should" not in text
    assert isinstance(info.value, ValueError)


def test_list_of_merges_reports_index() -> None:
    d = example_dict()
    d["adapters"]["merge"] = [{"name": "m1"}, {"name": "m2", "sources": ["nope"]}]
    d["adapters"]["active"] = "m1"
    problems = problems_of(d)
    assert problems == [("adapters.merge[1].sources", "unknown adapter 'nope'; known adapters: coding, chat")]
    d["adapters"]["merge"] = [{"name": "m1"}, {"name": "m1"}]
    assert ("adapters.merge[1].name", "duplicate merge name 'm1'") in problems_of(d)


def test_yaml_syntax_error_has_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("base_model: m\nadapters:\n  adapters:\n    a: {r: 4\n  active: a\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.line == 5
    assert "broken.yaml, line 5" in str(info.value) and "YAML syntax error" in str(info.value)


def test_duplicate_yaml_key_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text("base_model: m\nadapters:\n  adapters:\n    a: {r: 4}\n    a: {r: 8}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.line == 5 and "duplicate key 'a'" in str(info.value)


def test_missing_and_non_mapping_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "empty.yaml").write_text("# nothing\n")
    with pytest.raises(ConfigError, match="is empty"):
        load_config(tmp_path / "empty.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match=r"\(top level\): expected a mapping"):
        load_config(tmp_path / "list.yaml")


def test_dataset_file_missing_with_check_files(project: Path) -> None:
    (project / "data" / "chat.csv").unlink()
    load_config(project / "train.yaml")  # not checked by default
    with pytest.raises(ConfigError) as info:
        load_config(project / "train.yaml", check_files=True)
    [(path, msg)] = info.value.problems
    assert path == "adapters.adapters.chat.dataset"
    assert msg.startswith("file not found:") and msg.endswith("chat.csv")


def test_require_datasets() -> None:
    problems = problems_of({"base_model": "m", "adapters": {"adapters": {"a": {}}}}, require_datasets=True)
    assert problems[0][0] == "adapters.adapters.a.dataset" and "required for training" in problems[0][1]


# ---------------------------------------------------------------------------------------------------- PEFT
def test_lora_spec_writes_the_peft_config(project: Path) -> None:
    """An adapter's settings become its ``adapter_config.json`` through LoraSpec, which reads it back unchanged."""
    d = example_dict()
    d["adapters"]["adapters"]["coding"].update(use_rslora=True, rank_pattern={"q_proj": 4},
                                               alpha_pattern={"v_proj": 8}, layers_to_transform=3,
                                               modules_to_save="lm_head")
    (project / "p.yaml").write_text(yaml.safe_dump(d))
    spec = load_config(project / "p.yaml").lora_spec("coding")
    peft = spec.to_peft_config()
    expected = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "PATH_OR_HUB_ID",
        "r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": ["q_proj", "v_proj"],
        "use_rslora": True, "use_dora": False, "rank_pattern": {"q_proj": 4}, "alpha_pattern": {"v_proj": 8},
        "modules_to_save": ["lm_head"], "layers_to_transform": [3], "bias": "none",
    }
    assert {k: peft[k] for k in expected} == expected
    assert peft["fan_in_fan_out"] is False and peft["inference_mode"] is True
    assert isinstance(peft["lora_alpha"], int)
    again = LoraSpec.from_peft_config(peft)
    assert again.to_peft_config() == peft
    assert (again.r, again.lora_alpha, again.rank_for("model.layers.0.q_proj"), again.alpha_for("x.v_proj")) == \
        (16, 32.0, 4, 8.0)
    assert spec.scaling_for("model.layers.3.v_proj") == pytest.approx(8 / 16 ** 0.5)  # rsLoRA: alpha / sqrt(r)
    # DoRA is a PEFT setting like the others: written as use_dora, read back
    d["adapters"]["adapters"]["chat"].update(use_dora=True)
    (project / "dora.yaml").write_text(yaml.safe_dump(d))
    dora = load_config(project / "dora.yaml").lora_spec("chat")
    assert dora.use_dora and dora.to_peft_config()["use_dora"] is True
    assert LoraSpec.from_peft_config(dora.to_peft_config()).use_dora
    # the trainer's resolved targets and Conv1D layout replace the config's
    other = load_config(project / "p.yaml").lora_spec("coding", target_modules=["c_attn"], fan_in_fan_out=True)
    assert other.target_modules == ["c_attn"] and other.to_peft_config()["fan_in_fan_out"] is True


# ---------------------------------------------------------------------------------------------------- completion
def test_complete_returns_a_new_config_and_leaves_its_input_alone(tmp_path: Path) -> None:
    """Cross-field defaults come from a pure function: the schema-checked input is not changed."""
    from loraplex.config.validate import complete

    raw = {"base_model": "m", "adapter": {"r": 4, "dataset": "d.csv"}, "input_features": [{"name": "q"}]}
    fields = TrainConfig.model_validate(raw)
    before = fields.model_dump()
    done = complete(fields, base_dir=tmp_path, config_stem="exp")
    assert fields.model_dump() == before and fields.adapter is not None and fields.adapters is None
    assert done is not fields and done.adapter is None and done.single_adapter and not fields.single_adapter
    assert done.adapter_names == ["default"] and done.active == "default" and done.output_dir == "runs/exp"
    a = done.get_adapter("default")
    assert (a.task, a.prompt_column, a.response_column) == ("causal_lm", "q", "response")
    assert a.dataset == str(tmp_path / "d.csv") and fields.adapter.dataset == "d.csv"
    assert done.adapter_path("default") == "adapter"
    merged = complete(TrainConfig.model_validate({"base_model": "m", "adapters": {
        "adapters": {"a": {}, "b": {}}, "merge": {"weights": [3, 1]}, "router": {}}}))
    assert merged.merges[0].sources == ["a", "b"] and merged.merges[0].weights == pytest.approx([0.75, 0.25])
    assert merged.router is not None and merged.router.experts == ["a", "b"]
    assert merged.adapter_path("b") == "adapters.adapters.b"
