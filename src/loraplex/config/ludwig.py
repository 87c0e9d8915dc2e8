"""The sections of Ludwig's LLM config that loraplex reads, and the notes for keys it accepts but does not honour.

Ludwig users write ``prompt``, ``generation``, ``quantization``, ``backend``, ``preprocessing``, a
``learning_rate_scheduler`` and more; loraplex honours what maps onto its own behaviour (prompt templates,
generation defaults for predict, warmup / decay, the Ray training path) and accepts the rest. :func:`ludwig_notes`
lists each accepted key that changes nothing, once, as ``(dotted.path, what loraplex does instead)``;
:func:`loraplex.config.load_config` turns every note into one :class:`LudwigConfigWarning`. ``docs/ludwig.md`` is the
table of every key.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from loraplex.config.schema import TrainConfig

__all__ = ["BackendConfig", "GENERATION_HONOURED", "GenerationConfig", "LRSchedulerConfig", "LudwigConfigWarning",
           "PostprocessorConfig", "PromptConfig", "QuantizationConfig", "ludwig_notes", "render_prompt",
           "template_columns"]


class LudwigConfigWarning(UserWarning):
    """A key of a Ludwig config that loraplex accepts but does not honour (the message says what it does instead)."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


# ---------------------------------------------------------------------------------------------------- prompt
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
#: Ludwig's special placeholders: the input feature's value and the prompt task.
SAMPLE, TASK = "__sample__", "__task__"


class PromptConfig(_Section):
    """Ludwig's ``prompt`` block: a template over the row's columns (``{column}``), ``{__sample__}`` for the input
    feature's value and ``{__task__}`` for ``task``."""

    template: str | None = None
    task: str | None = None
    retrieval: Any = None  # accepted, not honoured


def template_columns(template: str) -> list[str]:
    """The row columns a template reads (``{__sample__}`` and ``{__task__}`` excluded), in order, once each."""
    return list(dict.fromkeys(n for n in _PLACEHOLDER.findall(template) if n not in (SAMPLE, TASK)))


def render_prompt(template: str, row: Any, *, sample: str | None = None, task: str | None = None) -> str:
    """The template with every ``{name}`` replaced by ``row[name]`` (``{__sample__}``: ``sample``; ``{__task__}``:
    ``task``); other braces stay as written. A missing column raises ``KeyError(name)``."""

    def sub(m: re.Match[str]) -> str:
        name = m.group(1)
        if name == SAMPLE and sample is not None:
            return sample
        if name == TASK and task is not None:
            return task
        return str(row[name])

    return _PLACEHOLDER.sub(sub, template)


# ---------------------------------------------------------------------------------------------------- generation
#: Generation keys passed on to ``generate`` by ``loraplex predict`` (transformers' names, as Ludwig's).
GENERATION_HONOURED = ("max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p", "typical_p",
                       "repetition_penalty", "no_repeat_ngram_size")


class GenerationConfig(_Section):
    """Ludwig's ``generation`` block. The keys of :data:`GENERATION_HONOURED` set predict's decoding when given;
    the others are accepted and noted."""

    max_new_tokens: int | None = Field(None, gt=0)
    min_new_tokens: int | None = Field(None, ge=0)
    do_sample: bool | None = None
    temperature: float | None = Field(None, ge=0)
    top_k: int | None = Field(None, gt=0)
    top_p: float | None = Field(None, ge=0, le=1)
    typical_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, ge=0)
    no_repeat_ngram_size: int | None = Field(None, ge=0)
    # accepted, not honoured
    max_length: Any = None
    min_length: Any = None
    early_stopping: Any = None
    max_time: Any = None
    num_beams: Any = None
    num_beam_groups: Any = None
    penalty_alpha: Any = None
    use_cache: Any = None
    prompt_lookup_num_tokens: Any = None
    epsilon_cutoff: Any = None
    eta_cutoff: Any = None
    diversity_penalty: Any = None
    encoder_repetition_penalty: Any = None
    length_penalty: Any = None
    bad_words_ids: Any = None
    force_words_ids: Any = None
    renormalize_logits: Any = None
    forced_bos_token_id: Any = None
    forced_eos_token_id: Any = None
    remove_invalid_values: Any = None
    exponential_decay_length_penalty: Any = None
    suppress_tokens: Any = None
    begin_suppress_tokens: Any = None
    forced_decoder_ids: Any = None
    sequence_bias: Any = None
    guidance_scale: Any = None
    pad_token_id: Any = None
    bos_token_id: Any = None
    eos_token_id: Any = None

    def generate_kwargs(self) -> dict[str, Any]:
        """The honoured keys the config sets, as ``generate`` keyword arguments."""
        return {k: getattr(self, k) for k in GENERATION_HONOURED
                if k in self.model_fields_set and getattr(self, k) is not None}


# ---------------------------------------------------------------------------------------------------- others
class QuantizationConfig(_Section):
    """Ludwig's ``quantization`` block (bitsandbytes settings); accepted, the base model is not quantized."""

    bits: Literal[4, 8] = 4
    llm_int8_threshold: float | None = None
    llm_int8_has_fp16_weight: bool | None = None
    bnb_4bit_compute_dtype: str | None = None
    bnb_4bit_use_double_quant: bool | None = None
    bnb_4bit_quant_type: str | None = None


class BackendConfig(_Section):
    """Ludwig's ``backend`` block: ``type: ray`` trains on the Ray path (``loraplex train --ray``)."""

    type: Literal["local", "ray"] = "local"
    processor: Any = None
    trainer: Any = None
    loader: Any = None
    cache_dir: Any = None
    cache_credentials: Any = None
    credentials: Any = None


class LRSchedulerConfig(_Section):
    """Ludwig's ``trainer.learning_rate_scheduler``: warmup and decay map onto the per-adapter scheduler."""

    decay: Literal["linear", "cosine", "exponential"] | None = None  # None: constant after warmup (Ludwig's default)
    decay_rate: float = Field(0.96, gt=0, le=1)  # exponential: lr * decay_rate ** (step / decay_steps)
    decay_steps: int = Field(10000, gt=0)
    staircase: bool = False
    warmup_fraction: float = Field(0.0, ge=0, lt=1)
    warmup_evaluations: Any = None
    reduce_on_plateau: Any = None
    reduce_on_plateau_patience: Any = None
    reduce_on_plateau_rate: Any = None
    reduce_eval_metric: Any = None
    reduce_eval_split: Any = None
    t_0: Any = None
    t_mult: Any = None
    eta_min: Any = None


class PostprocessorConfig(_Section):
    """Ludwig's ``adapter.postprocessor``."""

    merge_adapter_into_base_model: bool = False
    progressbar: bool = False


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
}


def _given(model: BaseModel | None, name: str) -> bool:
    return model is not None and name in model.model_fields_set and getattr(model, name) is not None


def ludwig_notes(config: "TrainConfig") -> list[tuple[str, str]]:
    """``(dotted.path, message)`` for each accepted key of ``config`` (schema-checked, as written) that loraplex
    does not honour, once per key, in config order."""
    notes: list[tuple[str, str]] = []
    for key, msg in _IGNORED_TOP.items():
        if _given(config, key):
            notes.append((key, msg))
    q = config.quantization
    if q is not None:
        notes.append(("quantization", f"{q.bits}-bit quantization is not supported on this backend; loraplex "
                                      f"trains and serves the unquantized base (trainer.precision "
                                      f"{config.trainer.precision})"))
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
