"""Reading a training config: YAML (duplicate keys rejected, ``2e-4`` read as a number) or a dict, checked by the
schema and :func:`loraplex.config.validate.complete`, every problem reported at once as a :class:`ConfigError`."""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any, Mapping

import yaml
from pydantic import ValidationError

from loraplex.config.explain import TOP_LEVEL, ConfigError, ConfigProblems, Loc, dotted, problems_from
from loraplex.config.ludwig import LudwigConfigWarning
from loraplex.config.notes import ludwig_notes
from loraplex.config.schema import TrainConfig
from loraplex.config.validate import complete
from loraplex.errors import LoraplexError
from loraplex.models import resolve as resolve_model

__all__ = ["load_config", "read_yaml", "resolve_base_model"]


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


def read_yaml(path: str | os.PathLike[str]) -> Any:
    """The YAML document of a config file; :class:`ConfigError` with line and column for a syntax error or a
    duplicate key."""
    path = Path(path)
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


def _as_written(problems: list[tuple[Loc, str]], raw: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Dotted paths as the user wrote the config: a single ``merge:`` block is ``adapters.merge``, not
    ``adapters.merge[0]``."""
    ad = raw.get("adapters")
    single_merge = isinstance(ad, Mapping) and isinstance(ad.get("merge"), Mapping)
    out: list[tuple[str, str]] = []
    for loc, msg in problems:
        if single_merge and loc[:2] == ("adapters", "merge") and len(loc) > 2 and loc[2] == 0:
            loc = loc[:2] + loc[3:]
        item = (dotted(loc) or TOP_LEVEL, msg)
        if item not in out:
            out.append(item)
    return out


def load_config(source: str | os.PathLike[str] | Mapping[str, Any], *, check_files: bool = False,
                require_datasets: bool = False, base_dir: str | os.PathLike[str] | None = None) -> TrainConfig:
    """Read and validate a training config from a YAML file or a dict.

    Relative dataset paths resolve against the config file's folder (``base_dir`` for a dict; left as given when
    neither is known). ``check_files`` reports dataset/eval_dataset files that do not exist; ``require_datasets``
    reports adapters without a ``dataset`` (both on for ``loraplex train``). Raises :class:`ConfigError` listing
    every problem as ``dotted.path: expected ..., got ...``. Each Ludwig key that is accepted but not honoured
    gives one :class:`~loraplex.config.ludwig.LudwigConfigWarning` ``dotted.path: what loraplex does instead``.
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
        raw = read_yaml(path)
        stem = path.stem
        folder = Path(base_dir) if base_dir is not None else path.resolve().parent
        if raw is None:
            raise ConfigError([], name, headline=f"config file {path} is empty")
    if not isinstance(raw, Mapping):
        got = type(raw).__name__
        raise ConfigError([(TOP_LEVEL, f"expected a mapping of settings at the top level, got {got}")], name)
    try:
        fields = TrainConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_as_written(problems_from(exc, TrainConfig), raw), name) from None
    try:
        done = complete(fields, source=path, base_dir=folder, config_stem=stem, check_files=check_files,
                        require_datasets=require_datasets)
    except ConfigProblems as exc:
        raise ConfigError(_as_written(exc.problems, raw), name) from None
    for where, msg in ludwig_notes(fields):
        warnings.warn(f"{name}: {where}: {msg}", LudwigConfigWarning, stacklevel=2)
    return done


def resolve_base_model(config: TrainConfig) -> str:
    """``base_model`` as a usable path: relative folders resolve against the config file's folder first; an
    embedded model's name (``smollm2-135m-instruct``, ``minilm-l6``: :mod:`loraplex.models`) becomes its local
    folder; hub ids pass through."""
    base = config.base_model
    p = Path(os.path.expanduser(base))
    if not p.is_absolute() and config.source is not None:
        cand = config.source.resolve().parent / p
        if cand.exists():
            return str(cand)
    if p.exists():
        return str(p)
    try:
        return resolve_model(base)
    except LoraplexError as exc:
        where = f"{config.source}: " if config.source is not None else ""
        tried = f" (looked in {config.source.resolve().parent} and the working directory)" \
            if config.source is not None and not p.is_absolute() else ""
        raise LoraplexError(f"{where}base_model: {exc}{tried}") from None
