"""The sections of Ludwig's LLM config that loraplex reads, and the notes for keys it accepts but does not honour.

Ludwig users write ``prompt``, ``generation``, ``quantization``, ``backend``, ``preprocessing``, a
``learning_rate_scheduler`` and more; loraplex honours what maps onto its own behaviour (prompt templates,
generation defaults for predict, warmup / decay, the Ray training path, ``quantization.bits``) and accepts the rest;
:func:`loraplex.config.notes.ludwig_notes` lists each accepted key that changes nothing, and
:func:`loraplex.config.load_config` turns every note into one :class:`LudwigConfigWarning`. ``docs/ludwig.md`` is the
table of every key.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["BackendConfig", "GENERATION_HONOURED", "GenerationConfig", "LRSchedulerConfig", "LudwigConfigWarning",
           "PostprocessorConfig", "PromptConfig", "QuantizationConfig", "SAMPLE", "TASK", "render_prompt",
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
    """Ludwig's ``quantization`` block: ``bits`` 8 quantizes the base model's Linear layers to int8 per channel, 4
    to int4 in groups of 32 (:mod:`loraplex.quant`); the bitsandbytes-specific keys are accepted and noted."""

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
