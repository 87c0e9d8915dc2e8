"""LoRA adapter description (PEFT ``adapter_config.json``) and per-module rank/alpha/scaling rules."""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from loraplex.errors import AdapterError

#: Config fields we understand; other PEFT fields are kept verbatim in ``raw`` for round trips.
_UNSUPPORTED_TRUE = ("use_dora", "use_qalora", "lora_bias")


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
    raw: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ parsing
    @classmethod
    def from_peft_config(cls, cfg: dict[str, Any], *, source: str = "adapter_config.json") -> "LoraSpec":
        """Parse a PEFT LoRA config dict; unsupported features raise :class:`AdapterError` naming ``source``."""
        if not isinstance(cfg, dict):
            raise AdapterError(f"{source}: expected a JSON object, got {type(cfg).__name__}")
        peft_type = str(cfg.get("peft_type", "LORA")).upper()
        if peft_type != "LORA":
            raise AdapterError(f"{source}: peft_type is {peft_type!r}; loraplex handles LORA adapters only")
        for flag in _UNSUPPORTED_TRUE:
            if cfg.get(flag):
                raise AdapterError(f"{source}: {flag}=true is not supported by loraplex (plain LoRA only)")
        if cfg.get("bias", "none") not in ("none", None):
            raise AdapterError(f"{source}: bias={cfg.get('bias')!r} is not supported (only 'none')")
        if cfg.get("layer_replication"):
            raise AdapterError(f"{source}: layer_replication is not supported")
        try:
            r = int(cfg.get("r", 8))
        except (TypeError, ValueError) as exc:
            raise AdapterError(f"{source}: field 'r' must be an integer, got {cfg.get('r')!r}") from exc
        if r <= 0:
            raise AdapterError(f"{source}: field 'r' must be > 0, got {r}")
        targets = cfg.get("target_modules")
        if isinstance(targets, (set, tuple)):
            targets = list(targets)
        if targets is None and not cfg.get("modules_to_save"):
            raise AdapterError(f"{source}: target_modules is missing")
        return cls(
            r=r,
            lora_alpha=float(cfg.get("lora_alpha", 8)),
            target_modules=targets,
            use_rslora=bool(cfg.get("use_rslora", False)),
            rank_pattern={str(k): int(v) for k, v in (cfg.get("rank_pattern") or {}).items()},
            alpha_pattern={str(k): float(v) for k, v in (cfg.get("alpha_pattern") or {}).items()},
            modules_to_save=_dedupe(cfg.get("modules_to_save")),
            layers_to_transform=cfg.get("layers_to_transform"),
            layers_pattern=cfg.get("layers_pattern"),
            exclude_modules=cfg.get("exclude_modules"),
            fan_in_fan_out=bool(cfg.get("fan_in_fan_out", False)),
            lora_dropout=float(cfg.get("lora_dropout", 0.0) or 0.0),
            bias="none",
            task_type=cfg.get("task_type"),
            base_model_name_or_path=cfg.get("base_model_name_or_path"),
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
    """Names of all ``nn.Linear`` / GPT-2 ``Conv1D`` modules of ``model``."""
    from transformers.pytorch_utils import Conv1D

    return [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))]


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
