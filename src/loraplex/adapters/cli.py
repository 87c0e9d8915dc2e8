"""``loraplex inspect PATH [--base MODEL] [--json]``: what an adapter (or a folder of adapters) holds.

Prints rank (per-module ranks under ``rank_pattern``), alpha, the scaling rule (rsLoRA or not), the targets as
configured and the adapted modules, parameter count, bytes on disk and in memory, dtypes and ``modules_to_save``.
With ``--base`` (a local model folder or a hub id) it builds the base model's skeleton from its config (on the
``meta`` device: shapes only, no weights are read) and checks the adapter against it; any problem is printed and
the command exits with code 2, without a traceback.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import torch
import typer

from loraplex.adapters.io import LoraAdapter, align_prefix, load_adapter_dir, validate_against
from loraplex.adapters.spec import linear_module_names, module_matches, resolve_all_linear
from loraplex.errors import LoraplexError

EXIT_BAD_INPUT = 2


def register(app: typer.Typer) -> None:
    """Add the ``inspect`` command to ``app``."""

    @app.command("inspect")
    def inspect_cmd(
        path: str = typer.Argument(..., help="Adapter folder (PEFT format), or a folder with one adapter per subfolder."),
        base: Optional[str] = typer.Option(None, "--base", help="Base model folder or hub id to check the adapter against."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of text."),
        trust_pickle: bool = typer.Option(False, "--trust-pickle",
                                          help="Allow adapter_model.bin (pickle can run arbitrary code)."),
    ) -> None:
        """Show an adapter's rank, alpha, scaling, targets, size; with --base, check it fits that model."""
        try:
            adapters = load_adapter_dir(path, trust_pickle=trust_pickle)
        except LoraplexError as exc:
            _fail(str(exc))
        model, base_error = None, None
        if base is not None:
            try:
                model = load_base_skeleton(base, next(iter(adapters.values())).spec.task_type)
            except Exception as exc:  # unreadable config, unknown architecture, offline hub, ...
                base_error = f"cannot build base model {base!r}: {exc}"
        infos = []
        failed = base_error is not None
        for ad in adapters.values():
            info = describe(ad)
            if base is not None:
                if base_error is not None:
                    info["base_check"] = base_error
                else:
                    info.update(check_against(ad, model))
                    failed |= info["base_check"] != "OK"
            infos.append(info)
        if as_json:
            out: dict[str, Any] = {"path": str(path), "adapters": infos}
            if base is not None:
                out["base"] = base
            typer.echo(json.dumps(out, indent=2, default=str))
        else:
            typer.echo("\n\n".join(format_text(i) for i in infos))
        if failed:
            raise typer.Exit(EXIT_BAD_INPUT)


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(EXIT_BAD_INPUT)


# --------------------------------------------------------------------------- facts
def describe(ad: LoraAdapter) -> dict[str, Any]:
    """Plain facts about ``ad`` (JSON-friendly)."""
    spec = ad.spec
    ranks = {m: mod.rank for m, mod in ad.modules.items()}
    scalings = sorted({round(mod.scaling, 6) for mod in ad.modules.values()})
    tensors = [m.A for m in ad.modules.values()] + [m.B for m in ad.modules.values()]
    tensors += [t for sd in ad.saved_modules.values() for t in sd.values()]
    info: dict[str, Any] = {
        "name": ad.name,
        "path": ad.path,
        "r": spec.r,
        "rank_pattern": dict(spec.rank_pattern),
        "rank_counts": {str(r): c for r, c in sorted(Counter(ranks.values()).items(), reverse=True)},
        "module_ranks": {m: r for m, r in sorted(ranks.items()) if r != spec.r},
        "lora_alpha": spec.lora_alpha,
        "alpha_pattern": {k: int(v) if float(v).is_integer() else v for k, v in spec.alpha_pattern.items()},
        "use_rslora": spec.use_rslora,
        "scaling_rule": "rsLoRA: alpha / sqrt(r)" if spec.use_rslora else "alpha / r",
        "scaling": scalings,
        "target_modules": spec.target_modules,
        "layers_to_transform": spec.layers_to_transform,
        "exclude_modules": spec.exclude_modules,
        "num_modules": len(ad.modules),
        "modules": sorted(ad.modules),
        "fan_in_fan_out": spec.fan_in_fan_out,
        "parameters": ad.num_parameters,
        "bytes_on_disk": _disk_bytes(ad.path),
        "bytes_in_memory": ad.nbytes,
        "dtype": sorted({str(t.dtype).removeprefix("torch.") for t in tensors}),
        "modules_to_save": list(spec.modules_to_save or []),
        "saved_modules": {m: {p: list(t.shape) for p, t in sd.items()} for m, sd in sorted(ad.saved_modules.items())},
        "task_type": spec.task_type,
        "base_model_name_or_path": spec.base_model_name_or_path,
    }
    return info


def _disk_bytes(folder: str | None) -> int | None:
    if not folder:
        return None
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file())


# --------------------------------------------------------------------------- base model check
_TASK_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "FEATURE_EXTRACTION": "AutoModel",
}


def load_base_skeleton(base: str, task_type: str | None = None) -> torch.nn.Module:
    """The base model built from its config on the ``meta`` device (module names and shapes, no weights).

    The class follows the adapter's ``task_type`` (as PEFT users load the base), else the config's architecture.
    """
    import transformers
    from transformers import AutoConfig

    from loraplex.models import resolve as resolve_model

    resolved = resolve_model(base)  # a local path that is not a model folder is refused here, by name
    config = AutoConfig.from_pretrained(resolved)
    candidates: list[Any] = []
    if task_type in _TASK_CLASSES:
        candidates.append(getattr(transformers, _TASK_CLASSES[task_type]))
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            candidates.append(cls)
    candidates.append(transformers.AutoModel)
    errors = []
    for cls in candidates:
        try:
            with torch.device("meta"):
                if hasattr(cls, "from_config"):
                    return cls.from_config(config)
                return cls(config)
        except Exception as exc:  # e.g. a causal-LM auto class for an encoder config
            errors.append(f"{getattr(cls, '__name__', cls)}: {exc}")
    raise LoraplexError("no model class fits this config (" + "; ".join(errors) + ")")


def check_against(ad: LoraAdapter, model: torch.nn.Module) -> dict[str, Any]:
    """``{"base_check": "OK" | error, "base_class", "base_matching_modules"}`` for ``ad`` on ``model``."""
    out: dict[str, Any] = {"base_class": type(model).__name__}
    try:
        spec = resolve_all_linear(ad.spec, model)
        linear = linear_module_names(model)
        out["base_matching_modules"] = sum(module_matches(spec, n) for n in linear)
        validate_against(align_prefix(ad, model), model)
        out["base_check"] = "OK"
    except LoraplexError as exc:
        out["base_check"] = str(exc)
    return out


# --------------------------------------------------------------------------- text
def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _num(v: float) -> str:
    return f"{v:g}"


def format_text(info: dict[str, Any]) -> str:
    """Human-readable lines for one :func:`describe` (+ check) dict."""
    lines = [f"adapter {info['name']}" + (f"  ({info['path']})" if info.get("path") else "")]

    def row(label: str, value: Any) -> None:
        lines.append(f"  {label + ':':<17}{value}")

    rank = str(info["r"])
    if info["rank_pattern"] or len(info["rank_counts"]) > 1:
        counts = ", ".join(f"r={r}: {c} modules" for r, c in info["rank_counts"].items())
        rank += f"  ({counts}; rank_pattern {info['rank_pattern']})" if info["rank_pattern"] else f"  ({counts})"
    row("rank", rank)
    per = info["module_ranks"]
    if per:
        shown = list(per.items())[:20]
        row("per-module rank", ", ".join(f"{m}={r}" for m, r in shown) + (" ..." if len(per) > 20 else ""))
    alpha = _num(info["lora_alpha"]) + (f"  (alpha_pattern {info['alpha_pattern']})" if info["alpha_pattern"] else "")
    row("alpha", alpha)
    row("scaling", f"{info['scaling_rule']} = " + ", ".join(_num(s) for s in info["scaling"]))
    row("targets", f"{info['target_modules']!r} -> {info['num_modules']} modules")
    if info["layers_to_transform"] is not None:
        row("layers", info["layers_to_transform"])
    if info["exclude_modules"]:
        row("exclude", info["exclude_modules"])
    row("parameters", f"{info['parameters']:,}")
    row("size", f"{_size(info['bytes_on_disk'])} on disk, {_size(info['bytes_in_memory'])} in memory")
    row("dtype", ", ".join(info["dtype"]) or "-")
    if info["modules_to_save"]:
        shapes = "; ".join(f"{m} {s}" for m, s in info["saved_modules"].items())
        row("modules_to_save", ", ".join(info["modules_to_save"]) + (f"  ({shapes})" if shapes else ""))
    if info["task_type"]:
        row("task_type", info["task_type"])
    if info["base_model_name_or_path"]:
        row("trained on", info["base_model_name_or_path"])
    if "base_check" in info:
        check = info["base_check"]
        if check == "OK":
            extra = f"{info.get('base_class')}"
            if "base_matching_modules" in info:
                extra += f", {info['base_matching_modules']} base modules match the targets"
            row("base check", f"OK ({extra})")
        else:
            row("base check", f"FAILED: {check}")
    return "\n".join(lines)
