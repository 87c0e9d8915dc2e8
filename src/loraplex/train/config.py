"""The training config: a validated (pydantic v2) schema of the YAML, shaped like Ludwig's multi-adapter block.

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

:func:`load_config` reads a file or a dict and raises :class:`ConfigError`, whose message lists every problem as
``<dotted.field.path>: <what was expected, what was given>``. Defaults that depend on other fields (alpha = 2r,
merge sources = all adapters, weights normalised, active = first adapter, per-adapter task and column names,
router experts and mode, output_dir) are filled in by validation, so a loaded config is complete.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import types
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Mapping, Union, get_args, get_origin

import yaml
from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from loraplex.compose.spec import (COMBINATION_TYPES, NAME_RE, Auto, ComposeSpecError, MoE)
from loraplex.compose.spec import parse as parse_spec
from loraplex.errors import LoraplexError, UnknownAdapterError

__all__ = [
    "AdapterConfig", "AdaptersBlock", "ConfigError", "DATASET_SUFFIXES", "Feature", "MergeConfig", "RouterConfig",
    "RouterTrainConfig", "TASKS", "TrainConfig", "TrainerConfig", "load_config", "load_serve_config",
]

#: Dataset file types the trainer reads.
DATASET_SUFFIXES = (".csv", ".jsonl", ".json", ".parquet")
#: Adapter tasks: ``causal_lm`` for model_type llm, the other two for encoders.
TASKS = ("causal_lm", "classification", "token_classification")
#: PEFT ``task_type`` for each task.
PEFT_TASK_TYPES = {"causal_lm": "CAUSAL_LM", "classification": "SEQ_CLS", "token_classification": "TOKEN_CLS"}
#: Names an adapter or merge cannot take (they mean something in ``active`` and in composition specs).
RESERVED_NAMES = frozenset({"base", "auto", "router"})
#: Path shown for problems with the top level of the config.
TOP_LEVEL = "(top level)"
#: Bumped when the meaning of the fingerprint payload changes.
FINGERPRINT_VERSION = 1

#: Common other spellings of our field names, used to suggest the right one for an unknown key.
SYNONYMS = {
    "rank": "r", "lora_r": "r", "lora_rank": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
    "target": "target_modules", "targets": "target_modules", "data": "dataset", "train_dataset": "dataset",
    "training_set": "dataset", "eval": "eval_dataset", "validation_dataset": "eval_dataset", "lr": "learning_rate",
    "epoch": "epochs", "num_epochs": "epochs", "num_train_epochs": "epochs", "bs": "batch_size",
    "max_sequence_length": "max_length", "max_seq_length": "max_length", "method": "combination_type",
    "combination": "combination_type", "adapter_names": "sources", "adapters": "sources", "peft_type": "type",
    "dora": "use_dora", "rslora": "use_rslora", "k": "top_k", "num_experts_per_tok": "top_k",
    "output_directory": "output_dir", "model": "base_model", "base_model_name_or_path": "base_model",
}

Precision = Literal["fp32", "bf16", "fp16"]


class ConfigError(LoraplexError, ValueError):
    """A training config is invalid.

    ``problems`` lists ``(dotted.path, message)`` pairs; ``source`` is the file (or ``<dict>``); ``line`` is set
    for YAML syntax errors (1-based).
    """

    def __init__(self, problems: list[tuple[str, str]], source: str | None = None, *, line: int | None = None,
                 headline: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        self.line = line
        where = f"{source!s}" if source else "training config"
        if headline is not None:
            text = headline
        else:
            n = len(self.problems)
            text = f"invalid training config {where} ({n} problem{'s' if n != 1 else ''}):"
            text += "".join(f"\n  {path}: {msg}" if path else f"\n  {msg}" for path, msg in self.problems)
        super().__init__(text)


class _Problems(ValueError):
    """Cross-field problems found by a model validator: ``(loc, message)`` pairs, loc relative to that model."""

    def __init__(self, problems: list[tuple[tuple[str | int, ...], str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{_dotted(loc)}: {msg}" for loc, msg in problems))


# ---------------------------------------------------------------------------------------------------- helpers
def _dotted(loc: tuple[str | int, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _show(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _range_check(lo: float, hi: float, lo_open: bool, hi_open: bool) -> Callable[[float], float]:
    """A validator that checks lo (<|<=) v (<|<=) hi and says the interval in its message."""
    interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"

    def check(v: float) -> float:
        ok_lo = v > lo if lo_open else v >= lo
        ok_hi = v < hi if hi_open else v <= hi
        if not (ok_lo and ok_hi):
            raise ValueError(f"expected a number in {interval}, got {_show(v)}")
        return v

    return check


def _check_name(v: str, what: str) -> str:
    if not NAME_RE.fullmatch(v):
        raise ValueError(f"invalid {what} name {v!r}: use letters, digits, '_', '.', '-'")
    if v in RESERVED_NAMES:
        raise ValueError(f"{v!r} is reserved and cannot name an {what}")
    return v


def _file_sha256(path: str) -> str:
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    cached = _HASH_CACHE.get(key)
    if cached is not None:
        return cached
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    _HASH_CACHE[key] = digest = h.hexdigest()
    return digest


_HASH_CACHE: dict[tuple[str, int, int], str] = {}


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
    task: Literal["causal_lm", "classification", "token_classification"] | None = None  # default from model_type
    label_column: str | None = None
    text_column: str | None = None
    prompt_column: str | None = None
    response_column: str | None = None
    stack_on: str | None = None  # train on top of this frozen adapter
    init_seed: int | None = None

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
                raise ValueError(f"expected a non-empty list of module names, got {_show(v)}")
            return list(v)
        raise ValueError(f"expected a list of module names, a regex or 'all-linear', got {_show(v)}")

    @field_validator("layers_to_transform", mode="before")
    @classmethod
    def _one_layer(cls, v: Any) -> Any:
        return [v] if isinstance(v, int) and not isinstance(v, bool) else v

    @field_validator("modules_to_save", mode="before")
    @classmethod
    def _one_module(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("use_dora")
    @classmethod
    def _no_dora(cls, v: bool) -> bool:
        if v:
            raise ValueError("DoRA is not supported by loraplex (got true); set use_dora: false")
        return v

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
    weights: list[float] | None = None  # default 1.0 each; normalised to sum 1 unless normalize is false
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


class RouterTrainConfig(_Strict):
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
    train: RouterTrainConfig = Field(default_factory=RouterTrainConfig)
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

    @field_validator("adapters", mode="before")
    @classmethod
    def _adapters(cls, v: Any) -> Any:
        if v is None:
            raise ValueError("expected at least one adapter, got none")
        if not isinstance(v, Mapping):
            raise ValueError(f"expected a mapping of adapter name -> settings, got {_show(v)}")
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


class TrainerConfig(_Strict):
    """Optimisation settings shared by the adapters of one run."""

    epochs: int = Field(3, gt=0)
    learning_rate: float = Field(2e-4, gt=0)
    batch_size: int = Field(8, gt=0)
    max_length: int = Field(512, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    warmup_ratio: float = 0.0  # in [0, 1)
    weight_decay: float = Field(0.0, ge=0)
    seed: int = 42
    checkpoint_every: int | None = Field(None, gt=0)  # steps
    max_steps: int | None = Field(None, gt=0)
    precision: Precision = "fp32"
    joint: bool = True  # train all adapters in one mixed-batch job

    @field_validator("warmup_ratio")
    @classmethod
    def _check_warmup(cls, v: float) -> float:
        return _range_check(0, 1, False, True)(v)


class Feature(_Strict):
    """A Ludwig input/output feature; its name is the default column name."""

    name: str = Field(min_length=1)
    type: str = "text"


# ---------------------------------------------------------------------------------------------------- root
class TrainConfig(_Strict):
    """The whole training config. Load it with :func:`load_config` (readable errors), not ``model_validate``."""

    base_model: str = Field(min_length=1)
    model_type: Literal["llm", "encoder"] = "llm"
    output_dir: str | None = None  # default runs/<config stem>, relative to the working directory
    adapter: AdapterConfig | None = None  # Ludwig's single adapter, named "default"; moved into adapters
    adapters: AdaptersBlock | None = None
    input_features: list[Feature] = Field(default_factory=list)
    output_features: list[Feature] = Field(default_factory=list)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)

    _source: Path | None = PrivateAttr(default=None)
    _single: bool = PrivateAttr(default=False)

    @field_validator("trainer", mode="before")
    @classmethod
    def _none_trainer(cls, v: Any) -> Any:
        return {} if v is None else v

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

    @model_validator(mode="after")
    def _cross_check(self, info: ValidationInfo) -> "TrainConfig":
        ctx = info.context or {}
        problems: list[tuple[tuple[str | int, ...], str]] = []
        if self.adapter is not None and self.adapters is not None:
            raise _Problems([(("adapters",), "use either 'adapter:' (one adapter, named 'default') or 'adapters:' "
                                             "(several), not both")])
        if self.adapter is None and self.adapters is None:
            raise _Problems([(("adapters",), "required: give 'adapters: {adapters: {NAME: {...}}}', or 'adapter: "
                                             "{...}' for a single adapter; got neither")])
        if self.adapter is not None:
            self.adapters = AdaptersBlock.model_construct(adapters={"default": self.adapter}, merge=[], router=None,
                                                          active=None)
            self.adapter = None
            self._single = True
        block = self.adapters
        assert block is not None
        names = list(block.adapters)

        def aloc(name: str) -> tuple[str | int, ...]:
            return ("adapter",) if self._single else ("adapters", "adapters", name)

        # ---- per adapter: task, columns, dataset paths, stack_on
        base_dir = ctx.get("base_dir")
        in_col = self.input_features[0].name if self.input_features else None
        out_col = self.output_features[0].name if self.output_features else None
        for name, a in block.adapters.items():
            if self.model_type == "llm":
                if a.task is None:
                    a.task = "causal_lm"
                elif a.task != "causal_lm":
                    problems.append((aloc(name) + ("task",), f"model_type llm trains causal_lm adapters, got "
                                                             f"{a.task!r} (use model_type: encoder)"))
                a.prompt_column = a.prompt_column or in_col or "prompt"
                a.response_column = a.response_column or out_col or "response"
            else:
                if a.task is None:
                    a.task = "classification"
                elif a.task == "causal_lm":
                    problems.append((aloc(name) + ("task",), "expected classification or token_classification for "
                                                             "model_type encoder, got 'causal_lm'"))
                a.text_column = a.text_column or in_col or "text"
                a.label_column = a.label_column or out_col or "label"
            for fld in ("dataset", "eval_dataset"):
                p = getattr(a, fld)
                if p is None:
                    continue
                p = os.path.expanduser(p)
                if base_dir is not None and not os.path.isabs(p):
                    p = os.path.normpath(os.path.join(str(base_dir), p))
                setattr(a, fld, p)
                if ctx.get("check_files") and not os.path.isfile(p):
                    problems.append((aloc(name) + (fld,), f"file not found: {p}"))
            if a.dataset is None and ctx.get("require_datasets"):
                problems.append((aloc(name) + ("dataset",), "required for training (a .csv, .jsonl, .json or "
                                                            ".parquet file), got nothing"))
            if a.stack_on is not None and a.stack_on not in block.adapters:
                problems.append((aloc(name) + ("stack_on",), f"unknown adapter {a.stack_on!r}; known adapters: "
                                                             f"{', '.join(names)}"))
        reported: set[str] = set()
        for name in names:
            chain = [name]
            cur = block.adapters[name].stack_on
            while cur is not None and cur in block.adapters and cur not in chain:
                chain.append(cur)
                cur = block.adapters[cur].stack_on
            if cur is not None and cur in chain:
                cycle = chain[chain.index(cur):]
                if not reported.intersection(cycle):
                    reported.update(cycle)
                    shown = " -> ".join(cycle + [cur])
                    problems.append((aloc(cycle[0]) + ("stack_on",), f"stack_on cycle: {shown}"))

        # ---- merges
        merge_names: list[str] = []
        for i, m in enumerate(block.merge):
            loc: tuple[str | int, ...] = ("adapters", "merge", i)
            if m.name in block.adapters:
                problems.append((loc + ("name",), f"merge name {m.name!r} is also an adapter name; pick another"))
            elif m.name in merge_names:
                problems.append((loc + ("name",), f"duplicate merge name {m.name!r}"))
            merge_names.append(m.name)
            if m.sources is None:
                m.sources = list(names)
            unknown = [s for s in m.sources if s not in block.adapters]
            if not m.sources:
                problems.append((loc + ("sources",), "expected at least one adapter, got an empty list"))
            elif unknown:
                problems.append((loc + ("sources",), f"unknown adapter {unknown[0]!r}{_hint(unknown[0], names)}; "
                                                     f"known adapters: {', '.join(names)}"))
            elif len(set(m.sources)) != len(m.sources):
                dup = next(s for s in m.sources if m.sources.count(s) > 1)
                problems.append((loc + ("sources",), f"adapter {dup!r} is listed twice"))
            if m.weights is None:
                m.weights = [1.0] * len(m.sources)
            elif len(m.weights) != len(m.sources):
                problems.append((loc + ("weights",), f"expected {len(m.sources)} weights (one per source: "
                                                     f"{', '.join(m.sources)}), got {len(m.weights)}"))
                continue
            if m.normalize and m.weights:
                total = sum(m.weights)
                if total == 0:
                    problems.append((loc + ("weights",), "weights sum to 0 and cannot be normalised; "
                                                         "set normalize: false"))
                else:
                    m.weights = [w / total for w in m.weights]

        # ---- router
        if block.router is not None:
            r = block.router
            loc = ("adapters", "router")
            if r.experts is None:
                r.experts = list(names)
            unknown = [e for e in r.experts if e not in block.adapters]
            if unknown:
                problems.append((loc + ("experts",), f"unknown adapter {unknown[0]!r}{_hint(unknown[0], names)}; "
                                                     f"known adapters: {', '.join(names)}"))
            elif len(set(r.experts)) != len(r.experts):
                problems.append((loc + ("experts",), "an adapter is listed twice"))
            elif len(r.experts) < 2:
                problems.append((loc + ("experts",), f"a router needs at least 2 experts, got {len(r.experts)}"))
            elif r.top_k > len(r.experts):
                problems.append((loc + ("top_k",), f"expected top_k <= {len(r.experts)} (the number of experts), "
                                                   f"got {r.top_k}"))
            if r.training == "lm_loss" and self.model_type != "llm":
                problems.append((loc + ("training",), "lm_loss needs model_type llm; use supervised or joint"))

        # ---- active
        if block.active is None:
            block.active = names[0]
        else:
            problem = _check_active(block.active, names, list(dict.fromkeys(merge_names)), block.router is not None)
            if problem:
                problems.append((("adapters", "active"), problem))

        if self.output_dir is None:
            self.output_dir = f"runs/{ctx.get('config_stem') or 'train'}"
        if problems:
            raise _Problems(problems)
        return self

    # ------------------------------------------------------------------ accessors
    @property
    def source(self) -> Path | None:
        """The YAML file this config came from (None for a dict)."""
        return self._source

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

    def adapter_fingerprint(self, name: str) -> str:
        """A stable hash (sha256 hex) of what determines this adapter's trained weights.

        It covers the adapter's settings (minus dataset paths), base_model, model_type, the trainer settings
        (minus ``checkpoint_every``), the sha256 of the dataset file's bytes, and the fingerprint of the adapter it
        is stacked on. Moving or renaming the dataset file keeps the fingerprint; editing it changes it.
        """
        a = self.get_adapter(name)
        ds_hash: str | None = None
        if a.dataset is not None:
            try:
                ds_hash = _file_sha256(a.dataset)
            except OSError as exc:
                loc = ("adapter",) if self._single else ("adapters", "adapters", name)
                raise ConfigError([(_dotted(loc + ("dataset",)), f"cannot read {a.dataset}: {exc.strerror or exc}")],
                                  str(self._source) if self._source else None) from None
        payload = {
            "version": FINGERPRINT_VERSION,
            "base_model": self.base_model,
            "model_type": self.model_type,
            "adapter": a.model_dump(mode="json", exclude={"dataset", "eval_dataset"}),
            "dataset_sha256": ds_hash,
            "trainer": self.trainer.model_dump(mode="json", exclude={"checkpoint_every"}),
            "stack_on": self.adapter_fingerprint(a.stack_on) if a.stack_on is not None else None,
        }
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def to_peft_config_dict(self, name: str) -> dict[str, Any]:
        """PEFT ``adapter_config.json`` fields for this adapter.

        For encoder tasks, ``modules_to_save`` defaults to ``["classifier"]`` (the task head).
        """
        a = self.get_adapter(name)
        alpha = float(a.alpha if a.alpha is not None else 2 * a.r)
        modules_to_save = a.modules_to_save
        if modules_to_save is None and a.task in ("classification", "token_classification"):
            modules_to_save = ["classifier"]
        targets = list(a.target_modules) if isinstance(a.target_modules, list) else a.target_modules
        return {
            "peft_type": "LORA",
            "task_type": PEFT_TASK_TYPES[a.task or ("causal_lm" if self.model_type == "llm" else "classification")],
            "base_model_name_or_path": self.base_model,
            "r": a.r,
            "lora_alpha": int(alpha) if alpha.is_integer() else alpha,
            "lora_dropout": a.dropout,
            "target_modules": targets,
            "use_rslora": a.use_rslora,
            "use_dora": False,
            "rank_pattern": dict(a.rank_pattern),
            "alpha_pattern": {k: (int(v) if float(v).is_integer() else v) for k, v in a.alpha_pattern.items()},
            "modules_to_save": list(modules_to_save) if modules_to_save is not None else None,
            "layers_to_transform": list(a.layers_to_transform) if a.layers_to_transform is not None else None,
            "bias": "none",
        }

    @classmethod
    def load(cls, source: str | os.PathLike[str] | Mapping[str, Any], **kwargs: Any) -> "TrainConfig":
        """Same as :func:`load_config`."""
        return load_config(source, **kwargs)


def _hint(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_active(active: str, adapters: list[str], merges: list[str], has_router: bool) -> str | None:
    """None if ``active`` is usable, else what is wrong."""
    known = adapters + merges
    if active in known:
        return None
    if active in ("router", "auto"):
        return None if has_router else f"{active!r} needs an adapters.router block"
    expected = f"an adapter ({', '.join(adapters)})"
    if merges:
        expected += f", a merge ({', '.join(merges)})"
    expected += ", 'router'/'auto'" if has_router else ""
    expected += " or a composition spec such as blend(a=0.5,b=0.5)"
    if "(" not in active and NAME_RE.fullmatch(active):
        return f"expected {expected}; got unknown name {active!r}{_hint(active, known)}"
    try:
        node = parse_spec(active)
    except ComposeSpecError as exc:
        return f"expected {expected}; got {active!r}: {exc.message}"
    if isinstance(node, (MoE, Auto)) and not has_router and not (isinstance(node, MoE) and "/" in node.router):
        return f"{active!r} needs an adapters.router block"
    unknown = [n for n in node.adapter_names() if n not in known]
    if unknown:
        return f"{active!r} uses unknown adapter {unknown[0]!r}{_hint(unknown[0], known)}; known: {', '.join(known)}"
    return None


# ---------------------------------------------------------------------------------------------------- errors
def _unwrap(tp: Any) -> list[Any]:
    """The concrete arms of an annotation (Annotated and None stripped)."""
    if get_origin(tp) is Annotated:
        return _unwrap(get_args(tp)[0])
    if get_origin(tp) in (Union, types.UnionType):
        return [x for arm in get_args(tp) if arm is not type(None) for x in _unwrap(arm)]
    return [tp]


def _descend(tp: Any, key: str | int) -> Any:
    for arm in _unwrap(tp):
        origin = get_origin(arm)
        if isinstance(arm, type) and issubclass(arm, BaseModel):
            f = arm.model_fields.get(key) if isinstance(key, str) else None
            if f is not None:
                return f.annotation
        elif origin is dict and isinstance(key, str):
            return get_args(arm)[1]
        elif origin is list and isinstance(key, int):
            return get_args(arm)[0]
    return None


def _annotation_at(loc: tuple[str | int, ...]) -> Any:
    tp: Any = TrainConfig
    for key in loc:
        tp = _descend(tp, key)
        if tp is None:
            return None
    return tp


def _model_at(loc: tuple[str | int, ...]) -> type[BaseModel] | None:
    tp = _annotation_at(loc)
    for arm in _unwrap(tp) if tp is not None else []:
        if isinstance(arm, type) and issubclass(arm, BaseModel):
            return arm
    return None


def _kind(loc: tuple[str | int, ...]) -> str:
    arms = _unwrap(_annotation_at(loc)) if _annotation_at(loc) is not None else []
    if int in arms:
        return "an integer"
    if float in arms:
        return "a number"
    return "a value"


def _literal_values(loc: tuple[str | int, ...]) -> list[str]:
    tp = _annotation_at(loc)
    out: list[str] = []
    for arm in _unwrap(tp) if tp is not None else []:
        if get_origin(arm) is Literal:
            out.extend(str(x) for x in get_args(arm))
    return out


def _unknown_field(parent: tuple[str | int, ...], key: str) -> str:
    model = _model_at(parent)
    fields = list(model.model_fields) if model is not None else []
    candidates = fields + [s for s, t in SYNONYMS.items() if t in fields]
    target: str | None = None
    if key in SYNONYMS and SYNONYMS[key] in fields:
        target = SYNONYMS[key]
    else:
        close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
        if close:
            target = close[0] if close[0] in fields else SYNONYMS[close[0]]
    if target is not None:
        return f"unknown field {key!r} (did you mean {target!r}?)"
    return f"unknown field {key!r}; expected one of: {', '.join(fields)}" if fields else f"unknown field {key!r}"


def _explain(err: Mapping[str, Any]) -> list[tuple[tuple[str | int, ...], str]]:
    """One pydantic error as ``(loc, readable message)`` pairs (several for a cross-field problem list)."""
    loc = tuple(err["loc"])
    typ = err["type"]
    ctx = err.get("ctx") or {}
    given = err.get("input")
    got = f", got {_show(given)}"
    if typ in ("value_error", "assertion_error"):
        exc = ctx.get("error")
        if isinstance(exc, _Problems):
            return [(loc + sub, msg) for sub, msg in exc.problems]
        return [(loc, str(exc) if exc is not None else err["msg"])]
    if typ == "extra_forbidden":
        return [(loc[:-1], _unknown_field(loc[:-1], str(loc[-1])))]
    if typ == "missing":
        return [(loc, "required field is missing")]
    if typ == "literal_error":
        allowed = _literal_values(loc)
        hint = _hint(str(given), allowed) if isinstance(given, str) else ""
        return [(loc, f"expected one of {', '.join(allowed)}{got}{hint}")]
    bounds = {"greater_than": (">", "gt"), "greater_than_equal": (">=", "ge"), "less_than": ("<", "lt"),
              "less_than_equal": ("<=", "le")}
    if typ in bounds:
        op, key = bounds[typ]
        bound = ctx.get(key)
        shown = f"{bound:g}" if isinstance(bound, (int, float)) and not isinstance(bound, bool) else bound
        return [(loc, f"expected {_kind(loc)} {op} {shown}{got}")]
    simple = {
        "int_parsing": "expected an integer", "int_type": "expected an integer",
        "int_from_float": "expected an integer", "float_parsing": "expected a number",
        "float_type": "expected a number", "finite_number": "expected a finite number",
        "bool_parsing": "expected true or false", "bool_type": "expected true or false",
        "string_type": "expected a string", "list_type": "expected a list", "dict_type": "expected a mapping",
        "model_type": "expected a mapping", "model_attributes_type": "expected a mapping",
    }
    if typ in simple:
        return [(loc, simple[typ] + got)]
    if typ == "string_too_short":
        return [(loc, f"expected a non-empty string{got}")]
    if typ == "too_short":
        return [(loc, f"expected at least {ctx.get('min_length')} item(s){got}")]
    return [(loc, f"{err['msg'][:1].lower()}{err['msg'][1:]}{got}")]


def _problems_from(exc: ValidationError, raw: Mapping[str, Any]) -> list[tuple[str, str]]:
    ad = raw.get("adapters") if isinstance(raw, Mapping) else None
    single_merge = isinstance(ad, Mapping) and isinstance(ad.get("merge"), Mapping)
    out: list[tuple[str, str]] = []
    for err in exc.errors():
        for loc, msg in _explain(err):
            if single_merge and loc[:2] == ("adapters", "merge") and len(loc) > 2 and loc[2] == 0:
                loc = loc[:2] + loc[3:]
            item = (_dotted(loc) or TOP_LEVEL, msg)
            if item not in out:
                out.append(item)
    return out


# ---------------------------------------------------------------------------------------------------- loading
class _Loader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys (a repeated adapter name would silently replace the first)."""


def _construct_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            dup = key in seen
            seen.add(key)
        except TypeError:
            continue
        if dup:
            raise yaml.constructor.ConstructorError("while constructing a mapping", node.start_mark,
                                                    f"found duplicate key {key!r}", key_node.start_mark)
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)  # type: ignore[arg-type]
# YAML 1.1 reads 2e-4 (no dot) as a string; read it as a float as YAML 1.2 and users do.
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([], str(path), headline=f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([], str(path), headline=f"cannot read config file {path}: {exc}") from None
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        if "duplicate key" in str(problem):
            kind, what = "duplicate key", f"{problem} (a later value would silently replace the earlier one)"
        else:
            kind, what = "YAML syntax error", str(problem)
        if mark is not None:
            line, col = mark.line + 1, mark.column + 1
            raise ConfigError([], str(path), line=line,
                              headline=f"{path}, line {line}, column {col}: {kind}: {what}") from None
        raise ConfigError([], str(path), headline=f"{path}: YAML syntax error: {what}") from None


def load_config(source: str | os.PathLike[str] | Mapping[str, Any], *, check_files: bool = False,
                require_datasets: bool = False, base_dir: str | os.PathLike[str] | None = None) -> TrainConfig:
    """Read and validate a training config from a YAML file or a dict.

    Relative dataset paths resolve against the config file's folder (``base_dir`` for a dict; left as given when
    neither is known). ``check_files`` reports dataset/eval_dataset files that do not exist; ``require_datasets``
    reports adapters without a ``dataset`` (both on for ``loraplex train``). Raises :class:`ConfigError` listing
    every problem as ``dotted.path: expected ..., got ...``.
    """
    path: Path | None = None
    if isinstance(source, Mapping):
        raw: Any = dict(source)
        name = "<dict>"
        stem = None
        folder = Path(base_dir) if base_dir is not None else None
    else:
        path = Path(source)
        name = str(path)
        raw = _read_yaml(path)
        stem = path.stem
        folder = Path(base_dir) if base_dir is not None else path.resolve().parent
        if raw is None:
            raise ConfigError([], name, headline=f"config file {path} is empty")
    if not isinstance(raw, Mapping):
        got = type(raw).__name__
        raise ConfigError([(TOP_LEVEL, f"expected a mapping of settings at the top level, got {got}")], name)
    context = {"base_dir": folder, "config_stem": stem, "check_files": check_files,
               "require_datasets": require_datasets}
    try:
        cfg = TrainConfig.model_validate(raw, context=context)
    except ValidationError as exc:
        raise ConfigError(_problems_from(exc, raw), name) from None
    cfg._source = path
    return cfg


def load_serve_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``loraplex serve CONFIG.yaml`` for a trained causal-LM config: :func:`loraplex.serve.cli.build_server` arguments.

    The trained adapters and merges of the config's output folder are served under their names, the router (when
    trained) as model ``auto``, and the config's ``active`` choice as model ``active`` (a composition alias).
    """
    from loraplex.train.trainer import ADAPTERS_DIR, ROUTER_DIR, load_state, resolve_base_model

    cfg = load_config(path)
    out = Path(cfg.output_dir or "runs/train")
    folder = out / ADAPTERS_DIR
    names = cfg.adapter_names + [m.name for m in cfg.merges]
    adapters = {n: str(folder / n) for n in names if (folder / n / "adapter_config.json").is_file()}
    if not adapters:
        raise ConfigError([], str(path), headline=f"cannot serve {path}: no trained adapters in {folder}; "
                                                  f"run `loraplex train {path}` first")
    router_dir = out / ROUTER_DIR
    active = load_state(out).get("active") or cfg.active
    serve: dict[str, Any] = {"base": resolve_base_model(cfg), "adapters": adapters}
    if (router_dir / "router.json").is_file():
        serve["router_dir"] = str(router_dir)
    if active in ("router", "auto"):
        active = "auto" if "router_dir" in serve else None
    if active is not None and "active" not in adapters:
        serve["compositions"] = {"active": active}
    return serve
