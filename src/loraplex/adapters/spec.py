"""LoRA adapter description (PEFT ``adapter_config.json``) and per-module rank/alpha/scaling rules."""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field
from typing import Annotated, Any

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, ValidationError

from loraplex.errors import AdapterError
from loraplex.modules import module_dims

#: Config fields we understand; other PEFT fields are kept verbatim in ``raw`` for round trips.
_UNSUPPORTED_TRUE = ("use_qalora", "lora_bias")
#: PEFT features that add tensors loraplex does not apply: refused when set to anything but null / empty.
_UNSUPPORTED_SET = ("target_parameters", "trainable_token_indices", "layer_replication")

Rank = Annotated[int, Field(strict=True, gt=0)]
LayerIndex = Annotated[int, Field(strict=True, ge=0)]
Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Dropout = Annotated[float, Field(strict=True, ge=0.0, lt=1.0)]
Name = Annotated[str, Field(strict=True, min_length=1)]


class AdapterConfigFile(BaseModel):
    """The fields of ``adapter_config.json`` loraplex reads, typed; PEFT's other fields are allowed as they are.

    ``null`` stands for PEFT's default wherever PEFT itself writes ``null`` (``rank_pattern``, ``use_rslora``, ...);
    ``r`` and ``lora_alpha`` must be present as numbers when given (``"r": 4.7`` or ``"lora_alpha": null`` are
    refused, never rounded or defaulted)."""

    model_config = ConfigDict(extra="allow")

    peft_type: StrictStr | None = "LORA"
    r: Rank = 8
    lora_alpha: Number = 8.0
    target_modules: list[Name] | StrictStr | None = None
    use_rslora: StrictBool | None = False
    rank_pattern: dict[StrictStr, Rank] | None = None
    alpha_pattern: dict[StrictStr, Number] | None = None
    modules_to_save: list[Name] | None = None
    layers_to_transform: list[LayerIndex] | LayerIndex | None = None
    layers_pattern: list[Name] | StrictStr | None = None
    exclude_modules: list[Name] | StrictStr | None = None
    fan_in_fan_out: StrictBool | None = False
    lora_dropout: Dropout | None = 0.0
    bias: StrictStr | None = "none"
    task_type: StrictStr | None = None
    base_model_name_or_path: StrictStr | None = None
    use_dora: StrictBool | None = False
    use_qalora: StrictBool | None = False
    lora_bias: StrictBool | None = False


#: What each field must be, for error messages (``field 'r' must be <this>, got ...``).
_EXPECTED: dict[str, str] = {
    "peft_type": "a string",
    "r": "an integer > 0",
    "lora_alpha": "a finite number",
    "target_modules": "a list of module names or a regex string",
    "use_rslora": "true or false",
    "rank_pattern": "an object of module patterns to integer ranks > 0",
    "rank_pattern.*": "an integer rank > 0",
    "alpha_pattern": "an object of module patterns to numbers",
    "alpha_pattern.*": "a finite number",
    "modules_to_save": "a list of module names",
    "modules_to_save.*": "a non-empty module name",
    "layers_to_transform": "a layer index >= 0 or a list of them",
    "layers_to_transform.*": "a layer index >= 0",
    "layers_pattern": "a string or a list of strings",
    "exclude_modules": "a list of module names or a regex string",
    "target_modules.*": "a non-empty module name",
    "exclude_modules.*": "a non-empty module name",
    "layers_pattern.*": "a non-empty string",
    "fan_in_fan_out": "true or false",
    "lora_dropout": "a number in [0, 1)",
    "bias": "a string",
    "task_type": "a string",
    "base_model_name_or_path": "a string",
    "use_dora": "true or false",
    "use_qalora": "true or false",
    "lora_bias": "true or false",
}


def config_error(exc: ValidationError, cfg: dict[str, Any], source: str) -> AdapterError:
    """An :class:`AdapterError` naming ``source`` and the first bad field (``rank_pattern.q_proj``) and value."""
    err = exc.errors()[0]
    loc = list(err["loc"])
    path, value = [str(loc[0])], cfg.get(loc[0])
    for part in loc[1:]:  # keep the dict keys / list indices, drop pydantic's union-branch tags
        if isinstance(value, dict) and part in value:
            path.append(str(part))
            value = value[part]
        elif isinstance(value, list) and isinstance(part, int) and 0 <= part < len(value):
            path.append(str(part))
            value = value[part]
    name = ".".join(path)
    want = _EXPECTED.get(name) or (_EXPECTED.get(f"{path[0]}.*") if len(path) > 1 else None)
    if want is None:
        return AdapterError(f"{source}: field {name!r} is invalid ({err['msg']}), got {value!r}")
    return AdapterError(f"{source}: field {name!r} must be {want}, got {value!r}")


def _check_regex(source: str, field_name: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise AdapterError(f"{source}: field {field_name!r} is not a valid regular expression "
                           f"({pattern!r}: {exc})") from None


@dataclass
class LoraSpec:
    """What a LoRA adapter targets and how it scales, as PEFT writes it in ``adapter_config.json``."""

    r: int = 8
    lora_alpha: float = 8.0
    target_modules: list[str] | str | None = None
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    lora_dropout: float = 0.0
    bias: str = "none"
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    use_dora: bool = False  # DoRA: every module also has a magnitude vector (``lora_magnitude_vector``)
    raw: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ parsing
    @classmethod
    def from_peft_config(cls, cfg: dict[str, Any], *, source: str = "adapter_config.json") -> "LoraSpec":
        """Parse a PEFT LoRA config dict, checked by :class:`AdapterConfigFile`; a bad value or an unsupported
        feature raises :class:`AdapterError` naming ``source`` and the field."""
        if not isinstance(cfg, dict):
            raise AdapterError(f"{source}: expected a JSON object, got {type(cfg).__name__}")
        peft_type = str(cfg.get("peft_type", "LORA")).upper()
        if peft_type != "LORA":
            raise AdapterError(f"{source}: peft_type is {peft_type!r}; loraplex handles LORA adapters only")
        try:
            c = AdapterConfigFile.model_validate(cfg)
        except ValidationError as exc:
            raise config_error(exc, cfg, source) from None
        for flag in _UNSUPPORTED_TRUE:
            if getattr(c, flag):
                raise AdapterError(f"{source}: {flag}=true is not supported by loraplex (plain LoRA only)")
        if c.bias not in ("none", None):
            raise AdapterError(f"{source}: bias={c.bias!r} is not supported (only 'none')")
        for name in _UNSUPPORTED_SET:
            if cfg.get(name):
                raise AdapterError(f"{source}: {name} is not supported by loraplex (got {cfg[name]!r})")
        targets = c.target_modules
        if targets is None and not c.modules_to_save:
            raise AdapterError(f"{source}: target_modules is missing")
        if isinstance(targets, str) and targets.lower() != "all-linear":
            _check_regex(source, "target_modules", targets)
        if isinstance(c.exclude_modules, str):
            _check_regex(source, "exclude_modules", c.exclude_modules)
        for pattern_field in ("rank_pattern", "alpha_pattern"):
            for key in getattr(c, pattern_field) or {}:
                _check_regex(source, f"{pattern_field}.{key}", key)
        for p in [c.layers_pattern] if isinstance(c.layers_pattern, str) else c.layers_pattern or []:
            _check_regex(source, "layers_pattern", p)
        return cls(
            r=c.r,
            lora_alpha=float(c.lora_alpha),
            target_modules=targets,
            use_rslora=bool(c.use_rslora),
            rank_pattern=dict(c.rank_pattern or {}),
            alpha_pattern={k: float(v) for k, v in (c.alpha_pattern or {}).items()},
            modules_to_save=_dedupe(c.modules_to_save),
            layers_to_transform=c.layers_to_transform,
            layers_pattern=c.layers_pattern,
            exclude_modules=c.exclude_modules,
            fan_in_fan_out=bool(c.fan_in_fan_out),
            lora_dropout=float(c.lora_dropout or 0.0),
            bias="none",
            task_type=c.task_type,
            base_model_name_or_path=c.base_model_name_or_path,
            use_dora=bool(c.use_dora),
            raw=copy.deepcopy(cfg),
        )

    def to_peft_config(self) -> dict[str, Any]:
        """The ``adapter_config.json`` dict: unknown PEFT fields from ``raw`` kept, ours written over them."""
        out = copy.deepcopy(self.raw)
        targets = self.target_modules
        out.update(
            {
                "peft_type": "LORA",
                "r": self.r,
                "lora_alpha": _num(self.lora_alpha),
                "target_modules": sorted(targets) if isinstance(targets, (list, set, tuple)) else targets,
                "use_rslora": self.use_rslora,
                "rank_pattern": dict(self.rank_pattern),
                "alpha_pattern": {k: _num(v) for k, v in self.alpha_pattern.items()},
                "modules_to_save": list(self.modules_to_save) if self.modules_to_save else None,
                "layers_to_transform": self.layers_to_transform,
                "layers_pattern": self.layers_pattern,
                "exclude_modules": self.exclude_modules,
                "fan_in_fan_out": self.fan_in_fan_out,
                "lora_dropout": self.lora_dropout,
                "bias": "none",
                "task_type": self.task_type,
                "base_model_name_or_path": self.base_model_name_or_path,
                "use_dora": self.use_dora,
            }
        )
        if isinstance(self.raw.get("target_modules"), list) and isinstance(targets, list):
            if sorted(self.raw["target_modules"]) == sorted(targets):
                out["target_modules"] = list(self.raw["target_modules"])  # keep PEFT's order byte-for-byte
        out.setdefault("inference_mode", True)
        out.setdefault("init_lora_weights", True)
        return out

    # ------------------------------------------------------------- per module
    def rank_for(self, module_name: str) -> int:
        """Rank of ``module_name`` after ``rank_pattern``."""
        key = _pattern_key(self.rank_pattern, module_name)
        return int(self.rank_pattern[key]) if key is not None else self.r

    def alpha_for(self, module_name: str) -> float:
        """Alpha of ``module_name`` after ``alpha_pattern``."""
        key = _pattern_key(self.alpha_pattern, module_name)
        return float(self.alpha_pattern[key]) if key is not None else float(self.lora_alpha)

    def scaling_for(self, module_name: str, rank: int | None = None) -> float:
        """``alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA) for ``module_name``."""
        r = rank if rank is not None else self.rank_for(module_name)
        alpha = self.alpha_for(module_name)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def matches(self, module_name: str) -> bool:
        """Whether PEFT would put a LoRA layer on ``module_name`` (``all-linear`` must be resolved first)."""
        return module_matches(self, module_name)

    def copy(self, **changes: Any) -> "LoraSpec":
        """A deep copy with fields replaced."""
        new = copy.deepcopy(self)
        for k, v in changes.items():
            setattr(new, k, v)
        return new


def _num(v: float) -> float | int:
    return int(v) if float(v).is_integer() else float(v)


def _dedupe(items: Any) -> list[str] | None:
    if not items:
        return None
    seen: list[str] = []
    for it in items:
        if it not in seen:
            seen.append(str(it))
    return seen


def _pattern_key(pattern: dict[str, Any], module_name: str) -> str | None:
    """First key of a PEFT rank/alpha pattern that matches the end of ``module_name`` (PEFT's rule)."""
    for key in pattern:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None


def module_matches(spec: LoraSpec, key: str) -> bool:
    """PEFT's ``check_target_module_exists`` rule: exact, suffix, or full-regex match, then layer filters."""
    excl = spec.exclude_modules
    if excl:
        if isinstance(excl, str):
            if re.fullmatch(excl, key):
                return False
        elif key in excl or any(key.endswith(f".{e}") for e in excl):
            return False
    if spec.modules_to_save and any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in spec.modules_to_save):
        return False
    targets = spec.target_modules
    if targets is None:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if key in targets:
        return True
    found = any(key.endswith(f".{t}") for t in targets)
    layers = spec.layers_to_transform
    using_layers = layers is not None and (len(layers) != 0 if isinstance(layers, list) else True)
    if not (found and using_layers):
        return found
    match = None
    patterns = spec.layers_pattern
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        for p in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    if match is None:
        return False
    idx = int(match.group("idx"))
    return idx == layers if isinstance(layers, int) else idx in layers


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Names of all ``nn.Linear`` / GPT-2 ``Conv1D`` (quantized or not) modules of ``model``."""
    return [n for n, m in model.named_modules() if module_dims(m) is not None]


def resolve_all_linear(spec: LoraSpec, model: torch.nn.Module) -> LoraSpec:
    """Replace ``target_modules="all-linear"`` by the explicit module list PEFT would use."""
    if not (isinstance(spec.target_modules, str) and spec.target_modules.lower() == "all-linear"):
        return spec
    names = set(linear_module_names(model))
    get_out = getattr(model, "get_output_embeddings", None)
    out_emb = get_out() if callable(get_out) else None
    if out_emb is not None:
        names -= {n for n, m in model.named_modules() if m is out_emb}
    elif spec.task_type == "SEQ_CLS":
        for head in ("classifier", "score"):
            mod = getattr(model, head, None)
            if mod is not None:
                names -= {n for n, m in model.named_modules() if m is mod or n.startswith(head + ".")}
                break
    return spec.copy(target_modules=sorted(names))
