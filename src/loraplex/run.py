"""A trained run: the output folder of ``loraplex train`` and everything that reads or writes it.

::

    <output_dir>/
      adapters/<name>/      one PEFT adapter folder per trained adapter and per merge
      router/router.json    the trained router (with its weights), when the config has one
      state.json            what was built from what: fingerprints, steps, losses, the active choice
      checkpoints/          resumable training state (removed when a run completes)
      logs/<name>.json      per-adapter training log;  plots/<name>_loss.png: its loss curve
      predictions/          ``loraplex predict`` output (default place)

:class:`TrainedRun` owns this layout and ``state.json`` (read, and updated atomically by one writer);
:func:`adapter_fingerprint` / :func:`merge_fingerprint` / :func:`router_fingerprint` say when a part must be
rebuilt; :func:`load_trained_plex` and :func:`serve_arguments` open a trained run for ``predict`` and ``serve``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from loraplex.adapters.io import CONFIG_NAME, atomic_write_text, load_adapter
from loraplex.api import Plex, load_base
from loraplex.compose.router import ROUTER_JSON
from loraplex.config.explain import ConfigError
from loraplex.config.load import resolve_base_model
from loraplex.config.schema import MergeConfig, TrainConfig
from loraplex.config.validate import DEFAULT_RUN_NAME
from loraplex.errors import LoraplexError
from loraplex.quant import quantize_model
from loraplex.tasks import load_encoder_plex

__all__ = ["ADAPTERS_DIR", "CHECKPOINTS_DIR", "FINGERPRINT_VERSION", "LOGS_DIR", "PLOTS_DIR", "PREDICTIONS_DIR",
           "ROUTER_DIR", "STATE_NAME", "STATE_VERSION", "TrainedRun", "adapter_fingerprint", "load_base_plex",
           "load_trained_plex", "merge_fingerprint", "router_fingerprint", "serve_arguments"]

STATE_NAME = "state.json"
ADAPTERS_DIR = "adapters"
ROUTER_DIR = "router"
CHECKPOINTS_DIR = "checkpoints"
LOGS_DIR = "logs"
PLOTS_DIR = "plots"
PREDICTIONS_DIR = "predictions"
#: Version of the ``state.json`` layout.
STATE_VERSION = 1
#: Bumped when the meaning of the fingerprint payload changes.
FINGERPRINT_VERSION = 1


class TrainedRun:
    """The output folder of one training config (see the module docstring)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    @classmethod
    def of(cls, config: TrainConfig, output_dir: str | os.PathLike[str] | None = None) -> "TrainedRun":
        """The run of ``config``: ``output_dir`` when given, else the config's (``runs/<config stem>``)."""
        if output_dir is not None:
            return cls(output_dir)
        return cls(config.output_dir if config.output_dir is not None else f"runs/{DEFAULT_RUN_NAME}")

    def __repr__(self) -> str:
        return f"TrainedRun({str(self.root)!r})"

    # ------------------------------------------------------------------ layout
    @property
    def adapters_dir(self) -> Path:
        return self.root / ADAPTERS_DIR

    def adapter_dir(self, name: str) -> Path:
        """Folder of adapter (or merge) ``name``."""
        return self.adapters_dir / name

    @property
    def router_dir(self) -> Path:
        return self.root / ROUTER_DIR

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / CHECKPOINTS_DIR

    @property
    def logs_dir(self) -> Path:
        return self.root / LOGS_DIR

    @property
    def plots_dir(self) -> Path:
        return self.root / PLOTS_DIR

    @property
    def predictions_dir(self) -> Path:
        return self.root / PREDICTIONS_DIR

    @property
    def state_path(self) -> Path:
        return self.root / STATE_NAME

    def has_adapter(self, name: str) -> bool:
        """Whether adapter (or merge) ``name`` has been written."""
        return (self.adapter_dir(name) / CONFIG_NAME).is_file()

    def has_router(self) -> bool:
        """Whether a trained router has been written."""
        return (self.router_dir / ROUTER_JSON).is_file()

    def present(self, names: list[str]) -> list[str]:
        """The names of ``names`` that have been written, in order."""
        return [n for n in names if self.has_adapter(n)]

    # ------------------------------------------------------------------ state.json
    def load_state(self) -> dict[str, Any]:
        """``state.json`` (an empty state when there is none)."""
        p = self.state_path
        if not p.is_file():
            return {"version": STATE_VERSION, "adapters": {}, "merges": {}}
        try:
            state = json.loads(p.read_text())
        except ValueError as exc:
            raise LoraplexError(f"{p}: not valid JSON ({exc}); delete it to retrain everything") from None
        state.setdefault("adapters", {})
        state.setdefault("merges", {})
        return state

    def update_state(self, *, adapters: Mapping[str, dict[str, Any]] | None = None,
                     merges: Mapping[str, dict[str, Any]] | None = None, router: dict[str, Any] | None = None,
                     **fields: Any) -> dict[str, Any]:
        """Merge records into ``state.json`` and write it atomically; returns the new state.

        ``adapters`` / ``merges`` replace the records of the names they give; ``router`` replaces the router
        record; ``fields`` set top-level entries (``base_model``, ``active``, ...)."""
        state = self.load_state()
        state["adapters"].update(adapters or {})
        state["merges"].update(merges or {})
        if router is not None:
            state["router"] = router
        state.update(fields)
        state["version"] = STATE_VERSION
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.state_path, json.dumps(state, indent=2, sort_keys=True))
        return state

    def recorded_fingerprint(self, section: str, name: str | None = None) -> str | None:
        """The fingerprint ``state.json`` records for an adapter or merge (``section`` ``adapters`` / ``merges``
        and ``name``) or the router (``section`` ``router``)."""
        state = self.load_state()
        rec = state.get("router") if section == "router" else state.get(section, {}).get(name)
        return (rec or {}).get("fingerprint")

    def active(self, config: TrainConfig) -> str:
        """The choice the run was last trained with (``state.json``), else the config's ``active``."""
        return self.load_state().get("active") or config.active


# ---------------------------------------------------------------------------------------------------- fingerprints
def _hash(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


_HASH_CACHE: dict[tuple[str, int, int], str] = {}


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


def adapter_fingerprint(config: TrainConfig, name: str) -> str:
    """A stable hash (sha256 hex) of what determines adapter ``name``'s trained weights.

    It covers the adapter's settings (minus dataset paths), base_model, model_type, the trainer settings (minus
    ``checkpoint_every``), the base's quantization, the sha256 of the dataset file's bytes, and the fingerprint of
    the adapter it is stacked on. Moving or renaming the dataset file keeps the fingerprint; editing it changes it.
    """
    a = config.get_adapter(name)
    ds_hash: str | None = None
    if a.dataset is not None:
        try:
            ds_hash = _file_sha256(a.dataset)
        except OSError as exc:
            raise ConfigError([(f"{config.adapter_path(name)}.dataset",
                                f"cannot read {a.dataset}: {exc.strerror or exc}")],
                              str(config.source) if config.source else None) from None
    parts = {
        "version": FINGERPRINT_VERSION,
        "base_model": config.base_model,
        "model_type": config.model_type,
        "adapter": a.model_dump(mode="json", exclude={"dataset", "eval_dataset"}),
        "dataset_sha256": ds_hash,
        "trainer": config.trainer.model_dump(mode="json", exclude={"checkpoint_every"}),
        "stack_on": adapter_fingerprint(config, a.stack_on) if a.stack_on is not None else None,
    }
    if config.quantize is not None:  # trained over a quantized base (float-base runs keep their fingerprints)
        parts["quantize"] = config.quantize
    return _hash(parts)


def merge_fingerprint(config: TrainConfig, merge: MergeConfig) -> str:
    """Hash of a merge's settings and its sources' fingerprints."""
    return _hash({"merge": merge.model_dump(mode="json"),
                  "sources": {s: adapter_fingerprint(config, s) for s in merge.sources or []}})


def router_fingerprint(config: TrainConfig) -> str:
    """Hash of the router's settings, the base model and its experts' fingerprints."""
    router = config.router
    if router is None:
        raise LoraplexError("the config has no adapters.router block")
    return _hash({"router": router.model_dump(mode="json"), "base_model": config.base_model,
                  "experts": {e: adapter_fingerprint(config, e) for e in router.experts or []}})


# ---------------------------------------------------------------------------------------------------- opening a run
def load_base_plex(config: TrainConfig, *, device: str | torch.device | None = None, max_slots: int = 8) -> Any:
    """A :class:`~loraplex.api.Plex` over the config's base model (a multi-task encoder for ``model_type:
    encoder``), with no adapters."""
    base = resolve_base_model(config)
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if config.model_type == "encoder":
        from transformers import AutoModel, AutoTokenizer

        try:
            enc = AutoModel.from_pretrained(base)
            tok = AutoTokenizer.from_pretrained(base)
        except Exception as exc:
            raise LoraplexError(f"base_model {config.base_model!r}: cannot load the encoder ({exc})") from exc
        enc = enc.to(dev)
        if config.quantize is not None:  # task heads (classifier) stay float: adapters save copies of them
            quantize_model(enc, config.quantize)
        return load_encoder_plex(enc, tokenizer=tok, max_slots=max_slots)
    model, tok = load_base(base)
    if tok is None:
        raise LoraplexError(f"base_model {config.base_model!r}: no tokenizer found next to the model; "
                            f"save one into the model folder")
    model = model.to(dev)
    if config.quantize is not None:  # on the compute device: the CPU kernels or the dequantizing path
        quantize_model(model, config.quantize)
    return Plex(model, tok, max_slots=max_slots)


def load_trained_plex(config: TrainConfig, output_dir: str | os.PathLike[str] | None = None, *,
                      device: str | torch.device | None = None, names: list[str] | None = None) -> Any:
    """A Plex over the config's base model with the trained adapters (and merges) of the run registered."""
    run = TrainedRun.of(config, output_dir)
    wanted = list(names) if names is not None else config.adapter_names + [m.name for m in config.merges]
    present = run.present(wanted)
    if not present:
        raise LoraplexError(f"no trained adapters in {run.adapters_dir}; run `loraplex train` first")
    plex = load_base_plex(config, device=device, max_slots=max(len(present), 2))
    for n in present:
        plex.add_adapter(n, load_adapter(run.adapter_dir(n), n))
    return plex


def serve_arguments(config: TrainConfig, output_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """``loraplex serve CONFIG.yaml`` for a trained causal-LM config: :func:`loraplex.serve.cli.build_server`
    arguments.

    The trained adapters and merges of the run are served under their names, the router (when trained) as model
    ``auto``, and the run's ``active`` choice as model ``active`` (a composition alias). The config's
    ``generation`` block becomes the request defaults and each adapter's prompt template is applied to its
    completion prompts (:mod:`loraplex.serve.defaults`).
    """
    run = TrainedRun.of(config, output_dir)
    where = str(config.source) if config.source is not None else "the config"
    names = config.adapter_names + [m.name for m in config.merges]
    adapters = {n: str(run.adapter_dir(n)) for n in run.present(names)}
    if not adapters:
        raise ConfigError([], where, headline=f"cannot serve {where}: no trained adapters in {run.adapters_dir}; "
                                              f"run `loraplex train {where}` first")
    active: str | None = run.active(config)
    serve: dict[str, Any] = {"base": resolve_base_model(config), "adapters": adapters}
    if config.quantize is not None:
        serve["quantize"] = config.quantize
    if run.has_router():
        serve["router_dir"] = str(run.router_dir)
    if active in ("router", "auto"):
        active = "auto" if "router_dir" in serve else None
    if active is not None and "active" not in adapters:
        serve["compositions"] = {"active": active}
    generation = config.generation.generate_kwargs()
    if generation:
        serve["generation"] = generation
    templates = {n: (a.prompt_template, a.prompt_column or "prompt") for n, a in config.adapter_configs.items()
                 if n in adapters and a.prompt_template is not None}
    if templates:
        serve["prompt_templates"] = templates
    return serve
