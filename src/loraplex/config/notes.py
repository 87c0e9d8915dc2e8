"""Notes for the keys of a Ludwig config that loraplex accepts but does not honour: one ``(dotted.path, what
loraplex does instead)`` per key, which :func:`loraplex.config.load_config` issues as a
:class:`~loraplex.config.ludwig.LudwigConfigWarning` each."""

from __future__ import annotations

from pydantic import BaseModel

from loraplex.config.ludwig import GENERATION_HONOURED, TASK, GenerationConfig
from loraplex.config.schema import TrainConfig

__all__ = ["ludwig_notes"]

# ---------------------------------------------------------------------------------------------------- notes
_IGNORED_TOP = {
    "preprocessing": "ignored; loraplex reads every row of each adapter's dataset and cuts sequences at "
                     "trainer.max_length",
    "defaults": "ignored; feature defaults do not apply to loraplex's prompt/response rows",
    "hyperopt": "ignored; loraplex trains the configured values once (no hyperparameter search)",
    "model_parameters": "ignored; the base model is loaded with its own config",
    "ludwig_version": "ignored (informational)",
}
_IGNORED_TRAINER = {
    "optimizer": "ignored; loraplex trains every adapter with AdamW (trainer.learning_rate, trainer.weight_decay)",
    "checkpoints_per_epoch": "ignored; use trainer.checkpoint_every (optimizer steps)",
    "early_stop": "ignored; loraplex trains for trainer.epochs (or train_steps)",
    "evaluate_training_set": "ignored; loraplex evaluates only an adapter's eval_dataset",
    "validation_field": "ignored; the eval loss is the response loss",
    "validation_metric": "ignored; the eval loss is the response loss",
    "max_batch_size": "ignored; batch_size is fixed",
    "increase_batch_size_on_plateau": "ignored; batch_size is fixed",
    "regularization_lambda": "ignored; use trainer.weight_decay",
    "regularization_type": "ignored; use trainer.weight_decay",
    "should_shuffle": "ignored; every epoch is a seeded permutation of the rows",
    "use_mixed_precision": "ignored; use trainer.precision (bf16 or fp16)",
    "compile": "ignored; the model runs eagerly",
    "enable_gradient_checkpointing": "ignored; activations are kept",
    "layers_to_freeze_regex": "ignored; only the LoRA weights (and modules_to_save) train, the base stays frozen",
    "skip_all_evaluation": "ignored; only an adapter's eval_dataset is evaluated",
    "bucketing_field": "ignored; batches are not bucketed by length",
    "effective_batch_size": "ignored; set batch_size and gradient_accumulation_steps",
    "gradient_clipping": "ignored; gradients are not clipped",
    "base_learning_rate": "ignored; use trainer.learning_rate",
    "enable_profiling": "ignored",
    "profiler": "ignored",
    "steps_per_epoch": "ignored; an epoch is every row once",
    "learning_rate_scaling": "ignored; the learning rate does not scale with the number of workers",
    "increase_batch_size_on_plateau_patience": "ignored; batch_size is fixed",
    "increase_batch_size_on_plateau_rate": "ignored; batch_size is fixed",
    "increase_batch_size_on_plateau_max": "ignored; batch_size is fixed",
    "increase_batch_size_eval_metric": "ignored; batch_size is fixed",
    "increase_batch_size_eval_split": "ignored; batch_size is fixed",
    "reduce_learning_rate_on_plateau": "ignored; use learning_rate_scheduler.decay",
    "reduce_learning_rate_on_plateau_patience": "ignored; use learning_rate_scheduler.decay",
    "reduce_learning_rate_on_plateau_rate": "ignored; use learning_rate_scheduler.decay",
    "reduce_learning_rate_eval_metric": "ignored; use learning_rate_scheduler.decay",
    "reduce_learning_rate_eval_split": "ignored; use learning_rate_scheduler.decay",
    "learning_rate_warmup_epochs": "ignored; use learning_rate_scheduler.warmup_fraction",
    "decay": "ignored; use learning_rate_scheduler.decay",
    "decay_steps": "ignored; use learning_rate_scheduler.decay_steps",
    "decay_rate": "ignored; use learning_rate_scheduler.decay_rate",
    "staircase": "ignored; use learning_rate_scheduler.staircase",
}


def _given(model: BaseModel | None, name: str) -> bool:
    return model is not None and name in model.model_fields_set and getattr(model, name) is not None


def ludwig_notes(config: TrainConfig) -> list[tuple[str, str]]:
    """``(dotted.path, message)`` for each accepted key of ``config`` (schema-checked, as written) that loraplex
    does not honour, once per key, in config order."""
    notes: list[tuple[str, str]] = []
    for key, msg in _IGNORED_TOP.items():
        if _given(config, key):
            notes.append((key, msg))
    q = config.quantization
    if q is not None:
        for key in ("llm_int8_threshold", "llm_int8_has_fp16_weight", "bnb_4bit_compute_dtype",
                    "bnb_4bit_use_double_quant", "bnb_4bit_quant_type"):
            if _given(q, key):
                notes.append((f"quantization.{key}", f"ignored; loraplex quantizes the base to "
                                                     f"{config.quantize} with its own kernels (bitsandbytes is not "
                                                     f"used)"))
    b = config.backend
    if b is not None:
        for key in ("processor", "trainer", "loader", "cache_dir", "cache_credentials", "credentials"):
            if _given(b, key):
                notes.append((f"backend.{key}", "ignored; Ray tasks train one adapter each with the config's "
                                                "trainer settings" if b.type == "ray" else "ignored (local backend)"))
    p = config.prompt
    if p is not None:
        if _given(p, "retrieval"):
            notes.append(("prompt.retrieval", "ignored; prompts are not augmented with retrieved examples"))
        if _given(p, "task") and (p.template is None or "{" + TASK + "}" not in p.template):
            notes.append(("prompt.task", "used only through a {__task__} placeholder in prompt.template, which "
                                         "this config does not have; the task text is not fed to the model"))
    g = config.generation
    if g is not None:
        for key in GenerationConfig.model_fields:
            if key not in GENERATION_HONOURED and _given(g, key):
                if key in ("pad_token_id", "bos_token_id", "eos_token_id"):
                    msg = "ignored; predict takes the special token ids from the tokenizer"
                elif key in ("num_beams", "num_beam_groups"):
                    msg = "ignored; predict decodes one sequence per row (no beam search)"
                elif key in ("max_length", "min_length"):
                    msg = f"ignored; predict bounds generation with {key.replace('length', 'new_tokens')}"
                else:
                    msg = "ignored by predict's generation"
                notes.append((f"generation.{key}", msg))
    for i, feats in enumerate((config.input_features, config.output_features)):
        where = "input_features" if i == 0 else "output_features"
        for j, f in enumerate(feats):
            for key in ("encoder", "decoder", "preprocessing", "loss", "tied", "dependencies", "reduce_input",
                        "reduce_dependencies"):
                if _given(f, key):
                    notes.append((f"{where}[{j}].{key}",
                                  "ignored; the base model reads the prompt text and generates the response"
                                  if key in ("encoder", "decoder") else
                                  "ignored; loraplex tokenizes with the base model's tokenizer and cuts at "
                                  "trainer.max_length" if key == "preprocessing" else "ignored"))
    t = config.trainer
    for key, msg in _IGNORED_TRAINER.items():
        if _given(t, key):
            if key == "optimizer" and isinstance(t.optimizer, dict) and \
                    str(t.optimizer.get("type", "adamw")).lower() == "adamw" and set(t.optimizer) <= {"type"}:
                continue  # AdamW is what loraplex uses
            notes.append((f"trainer.{key}", msg))
    for key in t.auto_fields:
        notes.append((f"trainer.{key}", f"'auto' is not tuned by loraplex; it uses {getattr(t, key):g}"))
    s = t.learning_rate_scheduler
    if s is not None:
        for key in ("warmup_evaluations", "reduce_on_plateau", "reduce_on_plateau_patience", "reduce_on_plateau_rate",
                    "reduce_eval_metric", "reduce_eval_split", "t_0", "t_mult", "eta_min"):
            if _given(s, key):
                notes.append((f"trainer.learning_rate_scheduler.{key}",
                               "ignored; the schedule is warmup_fraction then decay "
                               f"({s.decay or 'constant'}) over the training steps"))
    assert config.adapters is not None or config.adapter is not None
    blocks = ([("adapter", config.adapter)] if config.adapter is not None else
              [(f"adapters.adapters.{n}", a) for n, a in (config.adapters.adapters if config.adapters else {}).items()])
    for where, a in blocks:
        if a.postprocessor is not None and a.postprocessor.merge_adapter_into_base_model:
            notes.append((f"{where}.postprocessor.merge_adapter_into_base_model",
                          "ignored; loraplex keeps adapters separate from the base (merge them with "
                          "`loraplex merge` or a merge block)"))
    return notes
