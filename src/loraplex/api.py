"""The public entry point: ``plex = loraplex.load(base, adapters={...})``; ``plex(input_ids, adapters=[...])``."""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from loraplex.adapters.bank import AdapterBank
from loraplex.adapters.io import LoraAdapter, LoraModule, save_adapter
from loraplex.errors import LoraplexError, UnknownAdapterError
from loraplex.runtime import BatchPlan, RowSpec

#: What one row of a batch may ask for: an adapter name, None / "base" (no adapter), or a blend {name: weight}.
RowChoice = str | None | Mapping[str, float] | Sequence[tuple[str, float]]
BASE_NAMES = (None, "base", "")


class Plex:
    """A base model with many resident LoRA adapters; each batch row picks its own adapter or blend."""

    def __init__(self, model: nn.Module, tokenizer: Any = None, *, max_slots: int = 32,
                 cpu_budget_bytes: int | None = None, trust_pickle: bool = False) -> None:
        self.model = model
        self.tokenizer = tokenizer
        model.requires_grad_(False)
        model.eval()
        self.bank = AdapterBank(model, max_slots=max_slots, cpu_budget_bytes=cpu_budget_bytes,
                                trust_pickle=trust_pickle)
        self._active: RowChoice = None
        self._local = threading.local()  # per-thread "disabled" depth: a routing pass on one thread never
        # switches adapters off for another thread's forward

    # ------------------------------------------------------------------ adapters
    @property
    def adapters(self) -> list[str]:
        """Names of the registered adapters."""
        return self.bank.names

    def add_adapter(self, name: str, source: LoraAdapter | str | os.PathLike, *, replace: bool = False) -> LoraAdapter:
        """Register an adapter from a folder/hub id or a :class:`LoraAdapter` (validated against the model)."""
        return self.bank.register(name, source if isinstance(source, LoraAdapter) else str(source), replace=replace)

    def remove_adapter(self, name: str, *, timeout: float | None = 30.0) -> None:
        """Unregister an adapter once no running batch uses it."""
        self.bank.unregister(name, timeout=timeout)
        if isinstance(self._active, str) and self._active == name:
            self._active = None

    def get_adapter(self, name: str) -> LoraAdapter:
        return self.bank.get(name)

    def save_adapter(self, name: str, path: str | os.PathLike) -> Path:
        """Write a registered adapter as a PEFT folder."""
        return save_adapter(self.bank.get(name), path)

    @property
    def active(self) -> RowChoice:
        """What rows use when a call names no adapters: a name, a blend dict, or None (base model)."""
        return self._active

    @active.setter
    def active(self, choice: RowChoice) -> None:
        self._row(choice)  # validates
        self._active = choice

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the bare base model inside this block."""
        self._local.disabled = getattr(self._local, "disabled", 0) + 1
        try:
            yield
        finally:
            self._local.disabled -= 1

    # ------------------------------------------------------------------ plans
    def _row(self, choice: RowChoice) -> RowSpec:
        if choice in BASE_NAMES:
            return []
        if isinstance(choice, str):
            if choice not in self.bank:
                parsed = _parse_blend(choice)
                if parsed is None:
                    raise UnknownAdapterError(choice, self.adapters)
                return self._row(parsed)
            return [(choice, 1.0)]
        items = list(choice.items()) if isinstance(choice, Mapping) else list(choice)
        row: RowSpec = []
        for item in items:
            if not (isinstance(item, tuple) and len(item) == 2):
                raise LoraplexError(f"a blend is a mapping {{adapter: weight}} or a list of (adapter, weight); "
                                    f"got {item!r}")
            name, w = item
            if name not in self.bank:
                raise UnknownAdapterError(name, self.adapters)
            row.append((str(name), float(w)))
        return row

    def rows_for(self, adapters: RowChoice | Sequence[RowChoice] | None, n_rows: int) -> list[RowSpec]:
        """Per-row specs: one choice for all rows, or a list with one choice per row."""
        if getattr(self._local, "disabled", 0):
            return [[] for _ in range(n_rows)]
        if adapters is None:
            return [self._row(self._active)] * n_rows
        if isinstance(adapters, (str, Mapping)):
            return [self._row(adapters)] * n_rows
        choices = list(adapters)
        if len(choices) != n_rows:
            raise LoraplexError(f"adapters has {len(choices)} entries but the batch has {n_rows} rows")
        return [self._row(c) for c in choices]

    @contextmanager
    def using(self, adapters: RowChoice | Sequence[RowChoice] | None, n_rows: int) -> Iterator[BatchPlan]:
        """Hold device slots and set the batch plan for every forward inside the block (``plex.model`` calls too)."""
        rows = self.rows_for(adapters, n_rows)
        names = {n for row in rows for n, _ in row}
        previous = self.bank.state.plan
        with self.bank.hold(names) as slots:
            plan = BatchPlan.build(rows, slots, self.bank.device)
            self.bank.state.plan = plan
            try:
                yield plan
            finally:
                self.bank.state.plan = previous

    # ------------------------------------------------------------------ running
    def __call__(self, input_ids: torch.Tensor | None = None, *, adapters: Any = None, **kwargs: Any) -> Any:
        """The model's forward with per-row adapters (``adapters``: one choice or one per row)."""
        n = _batch_size(input_ids, kwargs)
        with self.using(adapters, n):
            if input_ids is not None:
                kwargs["input_ids"] = input_ids
            return self.model(**kwargs)

    forward = __call__

    def generate(self, input_ids: torch.Tensor | None = None, *, adapters: Any = None, **kwargs: Any) -> Any:
        """``model.generate`` with per-row adapters, held for the whole generation (KV cache included)."""
        n = _batch_size(input_ids, kwargs)
        with self.using(adapters, n), torch.no_grad():
            if input_ids is not None:
                kwargs["input_ids"] = input_ids
            return self.model.generate(**kwargs)

    def merged_delta(self, name: str, module: str) -> torch.Tensor:
        """Dense ``scaling * B @ A`` of one adapter at one module ([d_out, d_in], float32)."""
        m: LoraModule | None = self.bank.get(name).modules.get(module)
        if m is None:
            layer = self.bank.layers.get(module)
            if layer is None:
                raise LoraplexError(f"module {module!r} is not adapted")
            return torch.zeros(layer.d_out, layer.d_in)
        return m.delta()


def _parse_blend(text: str) -> list[tuple[str, float]] | None:
    """``blend(a=0.7,b=0.3)`` as [(a, 0.7), (b, 0.3)], or None if ``text`` is not a blend."""
    t = text.replace(" ", "")
    if not (t.startswith("blend(") and t.endswith(")")):
        return None
    out = []
    for part in t[6:-1].split(","):
        name, _, w = part.partition("=")
        try:
            out.append((name, float(w)))
        except ValueError:
            return None
    return out


def _batch_size(input_ids: torch.Tensor | None, kwargs: dict[str, Any]) -> int:
    for t in (input_ids, kwargs.get("inputs_embeds"), kwargs.get("attention_mask")):
        if t is not None:
            return int(t.shape[0])
    raise LoraplexError("cannot tell the batch size: pass input_ids, inputs_embeds or attention_mask")


def load(base: nn.Module | str | os.PathLike, adapters: Mapping[str, Any] | None = None, *,
         model_class: Any = None, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
         tokenizer: Any = True, max_slots: int = 32, cpu_budget_bytes: int | None = None,
         trust_pickle: bool = False, **model_kwargs: Any) -> Plex:
    """A :class:`Plex` over ``base`` (a model, a local folder or a hub id) with ``adapters`` {name: folder}."""
    tok = None
    if isinstance(base, nn.Module):
        model = base
        if tokenizer is not True and tokenizer is not False:
            tok = tokenizer
    else:
        model, tok = load_base(base, model_class=model_class, dtype=dtype, tokenizer=tokenizer, **model_kwargs)
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    plex = Plex(model, tok, max_slots=max_slots, cpu_budget_bytes=cpu_budget_bytes, trust_pickle=trust_pickle)
    for name, src in (adapters or {}).items():
        plex.add_adapter(name, src)
    return plex


def load_base(path: str | os.PathLike, *, model_class: Any = None, dtype: torch.dtype | None = None,
              tokenizer: Any = True, **kwargs: Any) -> tuple[nn.Module, Any]:
    """A transformers model (+ tokenizer) from a folder, a hub id or an embedded model's name
    (:mod:`loraplex.models`, e.g. ``"smollm2"``); causal LMs get their LM head."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    from loraplex.models import resolve as resolve_model

    src = resolve_model(path)
    try:
        config = AutoConfig.from_pretrained(src)
    except Exception as exc:
        raise LoraplexError(f"base model {src!r}: cannot read its config ({exc})") from exc
    if model_class is None:
        archs = config.architectures or []
        causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) or getattr(config, "is_decoder", False)
        model_class = AutoModelForCausalLM if causal else AutoModel
    model = model_class.from_pretrained(src, dtype=dtype, **kwargs) if dtype else model_class.from_pretrained(src, **kwargs)
    tok = None
    if tokenizer is True:
        try:
            tok = AutoTokenizer.from_pretrained(src)
        except Exception:
            tok = None
    elif tokenizer is not False:
        tok = tokenizer
    return model, tok
