"""The training config schema (pydantic v2), shaped like Ludwig's multi-adapter block.

::

    base_model: PATH_OR_HUB_ID
    model_type: llm            # or encoder
    adapters:
      adapters:
        coding: {type: lora, r: 16, alpha: 32, target_modules: [q_proj, v_proj], dataset: data/code.jsonl}
        chat:   {type: lora, r: 8, dataset: data/chat.csv}
      merge: {name: coding_chat, sources: [coding, chat], weights: [0.7, 0.3], combination_type: ties}
      router: {type: mlp, top_k: 1, load_balance: switch}
      active: coding_chat
    input_features: [{name: prompt, type: text}]
    output_features: [{name: response, type: text}]
    trainer: {epochs: 3, learning_rate: 2e-4, batch_size: 8, max_length: 512}

Ludwig's LLM sections (``prompt``, ``generation``, ``quantization``, ``backend``, the trainer's
``learning_rate_scheduler``, the LoRA fields ``bias_type``, ``init_lora_weights``, ``loraplus_lr_ratio``,
``pretrained_adapter_weights``, ``postprocessor``) are accepted as Ludwig writes them
(:mod:`loraplex.config.ludwig`); the keys loraplex does not honour are listed by :mod:`loraplex.config.notes`.

The models check each field on its own; the checks across fields and the defaults that depend on other fields
live in :mod:`loraplex.config.validate`, and :func:`loraplex.config.load.load_config` runs both, so a loaded
config is complete.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from loraplex.adapters.spec import LoraSpec
from loraplex.compose.spec import COMBINATION_TYPES, NAME_RE
from loraplex.config.explain import show
from loraplex.config.ludwig import (BackendConfig, GenerationConfig, LRSchedulerConfig, PostprocessorConfig,
                                    PromptConfig, QuantizationConfig)
from loraplex.errors import UnknownAdapterError

__all__ = [
    "ADAPTER_TASKS", "AdapterConfig", "AdaptersBlock", "DATASET_SUFFIXES", "Feature", "MergeConfig",
    "PEFT_TASK_TYPES", "RESERVED_NAMES", "RouterConfig", "RouterTrainSection", "TrainConfig", "TrainerConfig",
]

#: Dataset file types the trainer reads.
DATASET_SUFFIXES = (".csv", ".jsonl", ".json", ".parquet")
#: Adapter tasks: ``causal_lm`` for model_type llm, the other two for encoders.
ADAPTER_TASKS = ("causal_lm", "classification", "token_classification")
#: PEFT ``task_type`` for each task.
PEFT_TASK_TYPES = {"causal_lm": "CAUSAL_LM", "classification": "SEQ_CLS", "token_classification": "TOKEN_CLS"}
#: Names an adapter or merge cannot take (they mean something in ``active`` and in composition specs).
RESERVED_NAMES = frozenset({"base", "auto", "router"})

Precision = Literal["fp32", "bf16", "fp16"]


# ---------------------------------------------------------------------------------------------------- helpers
def _range_check(lo: float, hi: float, lo_open: bool, hi_open: bool) -> Callable[[float], float]:
    """A validator that checks lo (<|<=) v (<|<=) hi and says the interval in its message."""
    interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"

    def check(v: float) -> float:
        ok_lo = v > lo if lo_open else v >= lo
        ok_hi = v < hi if hi_open else v <= hi
        if not (ok_lo and ok_hi):
            raise ValueError(f"expected a number in {interval}, got {show(v)}")
        return v

    return check


def _check_name(v: str, what: str) -> str:
    if not NAME_RE.fullmatch(v):
        raise ValueError(f"invalid {what} name {v!r}: use letters, digits, '_', '.', '-'")
    if v in RESERVED_NAMES:
        raise ValueError(f"{v!r} is reserved and cannot name an {what}")
    return v


class _Strict(BaseModel):
    """Unknown keys are errors; field names may start with ``model_``."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


# ---------------------------------------------------------------------------------------------------- sections
class AdapterConfig(_Strict):
    """One LoRA adapter to train: its LoRA settings (PEFT names in brackets), data and task."""

    type: Literal["lora"] = "lora"
    r: int = Field(8, gt=0)
    alpha: float | None = Field(None, gt=0)  # [lora_alpha]; default 2 * r
    dropout: float = 0.05  # [lora_dropout], in [0, 1)
    target_modules: list[str] | str | None = None  # names, a regex, "all-linear"; None: trainer picks per architecture
    use_rslora: bool = False
    use_dora: bool = False
    rank_pattern: dict[str, Annotated[int, Field(gt=0)]] = Field(default_factory=dict)
    alpha_pattern: dict[str, Annotated[float, Field(gt=0)]] = Field(default_factory=dict)
    modules_to_save: list[str] | None = None
    layers_to_transform: list[Annotated[int, Field(ge=0)]] | None = None
    dataset: str | None = None
    eval_dataset: str | None = None
    task: Literal[ADAPTER_TASKS] | None = None  # type: ignore[valid-type]  # default from model_type
    label_column: str | None = None
    text_column: str | None = None
    prompt_column: str | None = None
    response_column: str | None = None
    stack_on: str | None = None  # train on top of this frozen adapter
    init_seed: int | None = None
    prompt_template: str | None = None  # default: the config's prompt.template
    # Ludwig's LoRA fields
    bias_type: Literal["none", "all", "lora_only"] = "none"
    init_lora_weights: bool | str = True  # true (A kaiming-uniform, B zeros) or "gaussian" (A normal(0, 1/r))
    loraplus_lr_ratio: float | None = Field(None, gt=0)  # LoRA+: B's learning rate is this times A's
    pretrained_adapter_weights: str | None = None  # a PEFT adapter folder the adapter starts from
    postprocessor: PostprocessorConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _type_shorthand(cls, v: Any) -> Any:
        return {"type": v} if isinstance(v, str) else v  # Ludwig's `adapter: lora`

    @field_validator("bias_type")
    @classmethod
    def _no_bias(cls, v: str) -> str:
        if v != "none":
            raise ValueError(f"loraplex trains no bias terms (got {v!r}); set bias_type: none")
        return v

    @field_validator("init_lora_weights")
    @classmethod
    def _init(cls, v: bool | str) -> bool | str:
        if v is True or v == "gaussian":
            return v
        raise ValueError(f"expected true (kaiming-uniform A, zero B) or 'gaussian', got {show(v)}")

    @field_validator("pretrained_adapter_weights")
    @classmethod
    def _pretrained(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("expected a PEFT adapter folder, got an empty string")
        return v

    @field_validator("dropout")
    @classmethod
    def _check_dropout(cls, v: float) -> float:
        return _range_check(0, 1, False, True)(v)

    @field_validator("target_modules", mode="before")
    @classmethod
    def _check_targets(cls, v: Any) -> Any:
        if v is None:
            return v
        if isinstance(v, str):
            if not v.strip():
                raise ValueError("expected module names, a regex or 'all-linear', got an empty string")
            if v != "all-linear":
                try:
                    re.compile(v)
                except re.error as exc:
                    raise ValueError(f"expected a list of module names, a regex or 'all-linear', got {v!r} "
                                     f"(not a valid regex: {exc})") from None
            return v
        if isinstance(v, (list, tuple)):
            bad = [x for x in v if not isinstance(x, str) or not x]
            if bad or not v:
                raise ValueError(f"expected a non-empty list of module names, got {show(v)}")
            return list(v)
        raise ValueError(f"expected a list of module names, a regex or 'all-linear', got {show(v)}")

    @field_validator("layers_to_transform", mode="before")
    @classmethod
    def _one_layer(cls, v: Any) -> Any:
        return [v] if isinstance(v, int) and not isinstance(v, bool) else v

    @field_validator("modules_to_save", mode="before")
    @classmethod
    def _one_module(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("dataset", "eval_dataset")
    @classmethod
    def _dataset_suffix(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not v.strip():
            raise ValueError("expected a dataset file path, got an empty string")
        if Path(v).suffix.lower() not in DATASET_SUFFIXES:
            raise ValueError(f"expected a {', '.join(DATASET_SUFFIXES[:-1])} or {DATASET_SUFFIXES[-1]} file, got {v!r}")
        return v

    @model_validator(mode="after")
    def _default_alpha(self) -> "AdapterConfig":
        if self.alpha is None:
            self.alpha = float(2 * self.r)
            self.__pydantic_fields_set__.discard("alpha")  # a default, not written by the user
        return self

    @property
    def scaling(self) -> float:
        """alpha / r (alpha / sqrt(r) with rsLoRA)."""
        alpha = float(self.alpha if self.alpha is not None else 2 * self.r)
        return alpha / (self.r ** 0.5 if self.use_rslora else self.r)


class MergeConfig(_Strict):
    """A merge of trained adapters into a new one (built after training)."""

    name: str = "merged"
    sources: list[str] | None = None  # default: all adapters
    weights: list[float] | None = None  # default 1.0 each; divided by sum |w| unless normalize is false
    normalize: bool = True
    combination_type: Literal[COMBINATION_TYPES] = "linear"  # type: ignore[valid-type]
    density: float = 0.5  # in (0, 1]
    majority_sign_method: Literal["total", "frequency"] = "total"
    svd_rank: int | None = Field(None, gt=0)
    peft_compat: bool = False  # PEFT's factor-wise merge (not the weighted sum of deltas)

    @field_validator("density")
    @classmethod
    def _check_density(cls, v: float) -> float:
        return _range_check(0, 1, True, False)(v)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _check_name(v, "merge")

    @field_validator("sources", mode="before")
    @classmethod
    def _one_source(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


class RouterTrainSection(_Strict):
    """Optimiser settings of router training."""

    epochs: int = Field(3, gt=0)
    learning_rate: float = Field(1e-3, gt=0)
    batch_size: int = Field(16, gt=0)


class RouterConfig(_Strict):
    """A router that picks adapters (experts) per input."""

    type: Literal["linear", "mlp"] = "linear"
    hidden_size: int = Field(256, gt=0)  # mlp only
    top_k: int = Field(1, ge=1)
    mode: Literal["top1", "topk", "soft"] | None = None  # default: top1 when top_k is 1, else topk
    pooling: Literal["mean", "first", "embedding", "ngram"] = "mean"  # ngram: hashed character n-grams
    embedding_model: str | None = None  # pooling: embedding; default: the bundled MiniLM encoder
    temperature: float = Field(1.0, gt=0)
    noise_std: float = Field(0.0, ge=0)
    load_balance: Literal["switch", "sq_dev", "none"] = "switch"
    load_balance_weight: float = Field(1e-2, ge=0)
    z_loss_weight: float = Field(1e-3, ge=0)
    train: RouterTrainSection = Field(default_factory=RouterTrainSection)
    training: Literal["supervised", "lm_loss", "joint"] = "supervised"
    experts: list[str] | None = None  # default: all adapters

    @field_validator("train", mode="before")
    @classmethod
    def _none_train(cls, v: Any) -> Any:
        return {} if v is None else v

    @model_validator(mode="after")
    def _mode(self) -> "RouterConfig":
        if self.mode is None:
            self.mode = "top1" if self.top_k == 1 else "topk"
        elif self.mode == "top1" and self.top_k != 1:
            raise ValueError(f"mode top1 contradicts top_k {self.top_k}; use mode: topk or top_k: 1")
        return self


class AdaptersBlock(_Strict):
    """Ludwig's ``adapters:`` block: named adapters, merges, an optional router and the active choice."""

    adapters: dict[str, AdapterConfig]
    merge: list[MergeConfig] = Field(default_factory=list)  # YAML: one block or a list of blocks
    router: RouterConfig | None = None
    active: str | None = None  # default: the first adapter

    @model_validator(mode="before")
    @classmethod
    def _flat(cls, v: Any) -> Any:
        """``adapters: {a: lora, b: lora}``: adapters named directly under ``adapters:``, by type shorthand."""
        if isinstance(v, Mapping) and "adapters" not in v:
            named = {k: s for k, s in v.items() if k not in ("merge", "router", "active")}
            if named and all(isinstance(s, str) for s in named.values()):
                return {"adapters": named, **{k: s for k, s in v.items() if k not in named}}
        return v

    @field_validator("adapters", mode="before")
    @classmethod
    def _adapters(cls, v: Any) -> Any:
        if v is None:
            raise ValueError("expected at least one adapter, got none")
        if not isinstance(v, Mapping):
            raise ValueError(f"expected a mapping of adapter name -> settings, got {show(v)}")
        if not v:
            raise ValueError("expected at least one adapter, got none")
        for name in v:
            if not isinstance(name, str):
                raise ValueError(f"adapter names are strings, got {name!r}")
            _check_name(name, "adapter")
        return {k: ({} if s is None else s) for k, s in v.items()}

    @field_validator("merge", mode="before")
    @classmethod
    def _merge_list(cls, v: Any) -> Any:
        if v is None:
            return []
        return [v] if isinstance(v, Mapping) else v

    @field_validator("active", mode="before")
    @classmethod
    def _active(cls, v: Any) -> Any:
        return v.strip() if isinstance(v, str) else v


#: What ``auto`` means for the trainer fields Ludwig lets tune themselves.
AUTO_VALUES: dict[str, int | float] = {"batch_size": 8, "eval_batch_size": 8, "gradient_accumulation_steps": 1,
                                       "learning_rate": 2e-4}


class TrainerConfig(_Strict):
    """Optimisation settings shared by the adapters of one run (Ludwig's trainer names where they exist)."""

    type: Literal["finetune"] = "finetune"  # Ludwig's LLM trainer type
    epochs: int = Field(3, gt=0)
    learning_rate: float = Field(2e-4, gt=0)  # these four may be written "auto" (AUTO_VALUES)
    batch_size: int = Field(8, gt=0)
    eval_batch_size: int | None = Field(None, gt=0)  # default: batch_size
    max_length: int = Field(512, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    warmup_ratio: float = 0.0  # in [0, 1)
    learning_rate_scheduler: LRSchedulerConfig | None = None  # Ludwig's; default: linear decay after warmup_ratio
    weight_decay: float = Field(0.0, ge=0)
    seed: int = 42
    checkpoint_every: int | None = Field(None, gt=0)  # steps
    steps_per_checkpoint: int | None = Field(None, gt=0)  # Ludwig's name of checkpoint_every
    max_steps: int | None = Field(None, gt=0)
    train_steps: int | None = Field(None, gt=0)  # Ludwig's name of max_steps
    precision: Precision = "fp32"
    joint: bool = True  # train all adapters in one mixed-batch job
    # Ludwig trainer keys accepted and noted (loraplex.config.ludwig)
    optimizer: Any = None
    checkpoints_per_epoch: Any = None
    early_stop: Any = None
    evaluate_training_set: Any = None
    validation_field: Any = None
    validation_metric: Any = None
    max_batch_size: Any = None
    increase_batch_size_on_plateau: Any = None
    regularization_lambda: Any = None
    regularization_type: Any = None
    should_shuffle: Any = None
    use_mixed_precision: Any = None
    compile: Any = None
    enable_gradient_checkpointing: Any = None
    layers_to_freeze_regex: Any = None
    skip_all_evaluation: Any = None
    bucketing_field: Any = None
    effective_batch_size: Any = None
    gradient_clipping: Any = None
    base_learning_rate: Any = None
    enable_profiling: Any = None
    profiler: Any = None
    steps_per_epoch: Any = None
    learning_rate_scaling: Any = None
    increase_batch_size_on_plateau_patience: Any = None
    increase_batch_size_on_plateau_rate: Any = None
    increase_batch_size_on_plateau_max: Any = None
    increase_batch_size_eval_metric: Any = None
    increase_batch_size_eval_split: Any = None
    reduce_learning_rate_on_plateau: Any = None
    reduce_learning_rate_on_plateau_patience: Any = None
    reduce_learning_rate_on_plateau_rate: Any = None
    reduce_learning_rate_eval_metric: Any = None
    reduce_learning_rate_eval_split: Any = None
    learning_rate_warmup_epochs: Any = None
    decay: Any = None
    decay_steps: Any = None
    decay_rate: Any = None
    staircase: Any = None

    @field_validator("warmup_ratio")
    @classmethod
    def _check_warmup(cls, v: float) -> float:
        return _range_check(0, 1, False, True)(v)

    _auto: list[str] = PrivateAttr(default_factory=list)

    @model_validator(mode="wrap")
    @classmethod
    def _auto_values(cls, v: Any, handler: Any) -> "TrainerConfig":
        """Ludwig's ``auto`` becomes loraplex's value (:data:`AUTO_VALUES`); :attr:`auto_fields` remembers which."""
        auto: list[str] = []
        if isinstance(v, Mapping):
            v = dict(v)
            for k, value in AUTO_VALUES.items():
                if v.get(k) == "auto":
                    v[k] = value
                    auto.append(k)
        out = handler(v)
        if auto:
            out._auto = auto
        return out

    @property
    def auto_fields(self) -> list[str]:
        """The fields written as ``auto``."""
        return list(self._auto)

    @property
    def scheduler(self) -> tuple[str, float]:
        """(decay: ``linear`` | ``cosine`` | ``exponential`` | ``constant``, warmup fraction) of the per-adapter
        schedule."""
        s = self.learning_rate_scheduler
        if s is None:
            return "linear", self.warmup_ratio
        return s.decay or "constant", s.warmup_fraction


class Feature(_Strict):
    """A Ludwig input/output feature; its ``column`` (default: its name) is the default column name."""

    name: str = Field(min_length=1)
    type: str = "text"
    column: str | None = None
    # accepted and noted (loraplex.config.ludwig)
    encoder: Any = None
    decoder: Any = None
    preprocessing: Any = None
    loss: Any = None
    tied: Any = None
    dependencies: Any = None
    reduce_input: Any = None
    reduce_dependencies: Any = None

    @property
    def column_name(self) -> str:
        """The dataset column this feature reads."""
        return self.column or self.name


# ---------------------------------------------------------------------------------------------------- root
class TrainConfig(_Strict):
    """The whole training config. Load it with :func:`loraplex.config.load_config` (readable errors, cross-field
    checks and defaults), not ``model_validate`` (field checks only)."""

    base_model: str = Field(min_length=1)
    model_type: Literal["llm", "encoder"] = "llm"
    output_dir: str | None = None  # default runs/<config stem>, relative to the working directory
    adapter: AdapterConfig | None = None  # Ludwig's single adapter, named "default"; moved into adapters
    adapters: AdaptersBlock | None = None
    input_features: list[Feature] = Field(default_factory=list)
    output_features: list[Feature] = Field(default_factory=list)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    # Ludwig's LLM sections
    prompt: PromptConfig | None = None
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    quantization: QuantizationConfig | None = None
    backend: BackendConfig | None = None
    preprocessing: Any = None
    defaults: Any = None
    hyperopt: Any = None
    model_parameters: Any = None
    ludwig_version: Any = None

    _source: Path | None = PrivateAttr(default=None)
    _single: bool = PrivateAttr(default=False)

    @field_validator("trainer", "generation", mode="before")
    @classmethod
    def _none_trainer(cls, v: Any) -> Any:
        return {} if v is None else v

    @property
    def backend_type(self) -> str:
        """``local`` or ``ray`` (Ludwig's ``backend.type``)."""
        return self.backend.type if self.backend is not None else "local"

    @property
    def quantize(self) -> str | None:
        """The base model's weight-only quantization (Ludwig's ``quantization.bits``): ``"int8"``, ``"int4"`` or
        None (float); see :mod:`loraplex.quant`."""
        if self.quantization is None:
            return None
        return {8: "int8", 4: "int4"}[self.quantization.bits]

    @field_validator("base_model")
    @classmethod
    def _strip_base(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("expected a model folder or hub id, got an empty string")
        return v.strip()

    @field_validator("input_features", "output_features", mode="before")
    @classmethod
    def _none_features(cls, v: Any) -> Any:
        return [] if v is None else v

    # ------------------------------------------------------------------ origin
    def with_origin(self, *, source: Path | None = None, single_adapter: bool | None = None) -> "TrainConfig":
        """A copy that knows the YAML file it came from and whether it was written with the singular ``adapter:``
        (arguments left as None keep this config's)."""
        new = self.model_copy()
        new._source = source if source is not None else self._source
        new._single = single_adapter if single_adapter is not None else self._single
        return new

    @property
    def source(self) -> Path | None:
        """The YAML file this config came from (None for a dict)."""
        return self._source

    @property
    def single_adapter(self) -> bool:
        """Whether the config was written with Ludwig's singular ``adapter:`` (its adapter is named ``default``)."""
        return self._single

    def adapter_path(self, name: str) -> str:
        """The dotted path of adapter ``name``'s block, for error messages (``adapter`` or
        ``adapters.adapters.<name>``)."""
        return "adapter" if self._single else f"adapters.adapters.{name}"

    # ------------------------------------------------------------------ accessors

    @property
    def adapter_configs(self) -> dict[str, AdapterConfig]:
        """Adapters by name, in config order."""
        assert self.adapters is not None
        return self.adapters.adapters

    @property
    def adapter_names(self) -> list[str]:
        """Adapter names in config order (``["default"]`` for a singular ``adapter:``)."""
        return list(self.adapter_configs)

    @property
    def merges(self) -> list[MergeConfig]:
        """The merges to build after training (possibly none)."""
        assert self.adapters is not None
        return self.adapters.merge

    @property
    def router(self) -> RouterConfig | None:
        """The router, if configured."""
        assert self.adapters is not None
        return self.adapters.router

    @property
    def active(self) -> str:
        """The adapter, merge, ``router``/``auto`` or composition spec used after training."""
        assert self.adapters is not None and self.adapters.active is not None
        return self.adapters.active

    def get_adapter(self, name: str) -> AdapterConfig:
        """One adapter's config; :class:`UnknownAdapterError` if there is none by that name."""
        try:
            return self.adapter_configs[name]
        except KeyError:
            raise UnknownAdapterError(name, self.adapter_names) from None

    def training_order(self) -> list[str]:
        """Adapter names with every ``stack_on`` target before the adapters stacked on it (else config order)."""
        order: list[str] = []
        adapters = self.adapter_configs

        def visit(n: str) -> None:
            if n in order:
                return
            below = adapters[n].stack_on
            if below is not None and below not in order:
                visit(below)
            order.append(n)

        for n in adapters:
            visit(n)
        return order

    def stack_chain(self, name: str) -> list[str]:
        """The frozen adapters ``name`` trains on, bottom first (empty when it stacks on nothing)."""
        chain: list[str] = []
        cur = self.get_adapter(name).stack_on
        while cur is not None:
            chain.insert(0, cur)
            cur = self.adapter_configs[cur].stack_on
        return chain

    def task_of(self, name: str) -> str:
        """Adapter ``name``'s task (its ``task``, else the model type's default)."""
        task = self.get_adapter(name).task
        return task or ("causal_lm" if self.model_type == "llm" else "classification")

    def lora_spec(self, name: str, *, target_modules: list[str] | str | None = None,
                  fan_in_fan_out: bool = False) -> LoraSpec:
        """Adapter ``name``'s :class:`~loraplex.adapters.spec.LoraSpec` (its ``adapter_config.json`` through
        ``to_peft_config``).

        ``target_modules`` overrides the config's (the trainer resolves ``None`` and ``all-linear`` against the base
        model); encoder tasks save their task head (``modules_to_save`` defaults to ``["classifier"]``).
        """
        a = self.get_adapter(name)
        task = self.task_of(name)
        modules_to_save = a.modules_to_save
        if modules_to_save is None and task in ("classification", "token_classification"):
            modules_to_save = ["classifier"]
        targets = target_modules if target_modules is not None else a.target_modules
        return LoraSpec(
            r=a.r,
            lora_alpha=float(a.alpha if a.alpha is not None else 2 * a.r),
            target_modules=list(targets) if isinstance(targets, list) else targets,
            use_rslora=a.use_rslora,
            rank_pattern=dict(a.rank_pattern),
            alpha_pattern={k: float(v) for k, v in a.alpha_pattern.items()},
            modules_to_save=list(modules_to_save) if modules_to_save is not None else None,
            layers_to_transform=list(a.layers_to_transform) if a.layers_to_transform is not None else None,
            fan_in_fan_out=fan_in_fan_out,
            lora_dropout=a.dropout,
            task_type=PEFT_TASK_TYPES[task],
            base_model_name_or_path=self.base_model,
            use_dora=a.use_dora,
            raw={"use_dora": a.use_dora},
        )
