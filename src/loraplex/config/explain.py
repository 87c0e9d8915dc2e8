"""Readable config errors: :class:`ConfigError`, and pydantic errors turned into ``dotted.path: message`` lines.

Messages say what was expected and what was given; an unknown key gets a near-miss suggestion (``lr`` ->
``learning_rate``, ``rnak`` -> ``r``) from the model's field names and :data:`SYNONYMS`.
"""

from __future__ import annotations

import difflib
import types
from typing import Annotated, Any, Literal, Mapping, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from loraplex.errors import LoraplexError

__all__ = ["ConfigError", "ConfigProblems", "Loc", "SYNONYMS", "TOP_LEVEL", "dotted", "hint", "problems_from",
           "show"]

#: Path shown for problems with the top level of the config.
TOP_LEVEL = "(top level)"

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
    "warmup_fraction": "warmup_ratio", "lr_scheduler": "learning_rate_scheduler",
    "scheduler": "learning_rate_scheduler", "max_tokens": "max_new_tokens", "template": "prompt",
    "bias": "bias_type", "quantize": "quantization", "generation_config": "generation",
}

#: A location in the config: keys and list indices from the top level down.
Loc = tuple[str | int, ...]


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


class ConfigProblems(ValueError):
    """Cross-field problems of a config: ``(loc, message)`` pairs, loc from the top level."""

    def __init__(self, problems: list[tuple[Loc, str]]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(f"{dotted(loc)}: {msg}" for loc, msg in problems))


# ---------------------------------------------------------------------------------------------------- formatting
def dotted(loc: Loc) -> str:
    """``("adapters", "merge", 0, "name")`` -> ``adapters.merge[0].name``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def show(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def hint(word: str, choices: list[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, or an empty string."""
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ---------------------------------------------------------------------------------------------------- annotations
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


class _Explainer:
    """Reads the annotations of the ``root`` model to phrase its validation errors."""

    def __init__(self, root: type[BaseModel]) -> None:
        self.root = root

    def annotation_at(self, loc: Loc) -> Any:
        tp: Any = self.root
        for key in loc:
            tp = _descend(tp, key)
            if tp is None:
                return None
        return tp

    def model_at(self, loc: Loc) -> type[BaseModel] | None:
        tp = self.annotation_at(loc)
        for arm in _unwrap(tp) if tp is not None else []:
            if isinstance(arm, type) and issubclass(arm, BaseModel):
                return arm
        return None

    def kind(self, loc: Loc) -> str:
        tp = self.annotation_at(loc)
        arms = _unwrap(tp) if tp is not None else []
        if int in arms:
            return "an integer"
        if float in arms:
            return "a number"
        return "a value"

    def literal_values(self, loc: Loc) -> list[str]:
        tp = self.annotation_at(loc)
        out: list[str] = []
        for arm in _unwrap(tp) if tp is not None else []:
            if get_origin(arm) is Literal:
                out.extend(str(x) for x in get_args(arm))
        return out

    def unknown_field(self, parent: Loc, key: str) -> str:
        model = self.model_at(parent)
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

    def explain(self, err: Mapping[str, Any]) -> list[tuple[Loc, str]]:
        """One pydantic error as ``(loc, readable message)`` pairs."""
        loc = tuple(err["loc"])
        typ = err["type"]
        ctx = err.get("ctx") or {}
        given = err.get("input")
        got = f", got {show(given)}"
        if typ in ("value_error", "assertion_error"):
            exc = ctx.get("error")
            return [(loc, str(exc) if exc is not None else err["msg"])]
        if typ == "extra_forbidden":
            return [(loc[:-1], self.unknown_field(loc[:-1], str(loc[-1])))]
        if typ == "missing":
            return [(loc, "required field is missing")]
        if typ == "literal_error":
            allowed = self.literal_values(loc)
            near = hint(str(given), allowed) if isinstance(given, str) else ""
            return [(loc, f"expected one of {', '.join(allowed)}{got}{near}")]
        bounds = {"greater_than": (">", "gt"), "greater_than_equal": (">=", "ge"), "less_than": ("<", "lt"),
                  "less_than_equal": ("<=", "le")}
        if typ in bounds:
            op, key = bounds[typ]
            bound = ctx.get(key)
            shown = f"{bound:g}" if isinstance(bound, (int, float)) and not isinstance(bound, bool) else bound
            return [(loc, f"expected {self.kind(loc)} {op} {shown}{got}")]
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


def problems_from(exc: ValidationError, root: type[BaseModel]) -> list[tuple[Loc, str]]:
    """The readable ``(loc, message)`` problems of a validation error of model ``root``, duplicates dropped."""
    explainer = _Explainer(root)
    out: list[tuple[Loc, str]] = []
    for err in exc.errors():
        for item in explainer.explain(err):
            if item not in out:
                out.append(item)
    return out
