"""The public entry point: ``plex = loraplex.load(base, adapters={...})``; ``plex(input_ids, adapters=[...])``."""

from __future__ import annotations

import concurrent.futures
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from loraplex.adapters.bank import AdapterBank, BankStats, LoadListener
from loraplex.adapters.io import LoraAdapter, LoraModule, save_adapter
from loraplex.adapters.store import AdapterInfo, AdapterStore
from loraplex.errors import LoraplexError
from loraplex.layers import MultiLoraLinear
from loraplex.plan import BASE_NAMES, BatchPlan, PlanState, RowChoice, RowSpec, TrainOverrides, rows_from_spec
from loraplex.quant import quantize_model, scheme_of

__all__ = ["BASE_NAMES", "Plex", "RowChoice", "load", "load_base"]


class Plex:
    """A base model with many resident LoRA adapters; each batch row picks its own adapter or blend.

    The typed surface the rest of loraplex uses (compose, serve and train never reach into :attr:`bank`):

    * registry: :attr:`adapters`, ``name in plex``, :meth:`get_adapter`, :meth:`add_adapter`,
      :meth:`remove_adapter`, :meth:`save_adapter`;
    * device slots: :meth:`hold` (a block), :meth:`acquire` / :meth:`release` (a holder that spans calls, e.g. a
      serving request across decode steps), :attr:`max_slots`, :meth:`resident`;
    * computation: :attr:`layers` (the wrapped layers by module path), :attr:`device`, :attr:`dtype`,
      :meth:`rows_for` (choices -> per-row specs), :meth:`using` (choices -> a held plan),
      :meth:`using_plan` (a plan built elsewhere), :meth:`train_overrides` (training stacks and LoRA dropout),
      :attr:`plan_state` (what model heads read the rows' adapters from); plans and overrides are per thread;
    * reading adapters like the bank does: :attr:`trust_pickle`; cache counters: :attr:`stats`, :meth:`nbytes`.
    """

    def __init__(self, model: nn.Module, tokenizer: Any = None, *, max_slots: int = 32,
                 cpu_budget_bytes: int | None = None, trust_pickle: bool = False) -> None:
        self.model = model
        self.tokenizer = tokenizer
        model.requires_grad_(False)
        model.eval()
        #: the adapter bank (tests and benchmarks inspect it; library code uses this class's methods)
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

    def __contains__(self, name: object) -> bool:
        """Whether ``name`` is a registered adapter."""
        return name in self.bank

    def add_adapter(self, name: str, source: LoraAdapter | str | os.PathLike, *, replace: bool = False) -> LoraAdapter:
        """Register an adapter from a folder/hub id or a :class:`LoraAdapter` (validated against the model)."""
        return self.bank.register(name, source if isinstance(source, LoraAdapter) else str(source), replace=replace)

    def remove_adapter(self, name: str, *, timeout: float | None = 30.0) -> None:
        """Unregister an adapter once no running batch uses it."""
        self.bank.unregister(name, timeout=timeout)
        if isinstance(self._active, str) and self._active == name:
            self._active = None

    def get_adapter(self, name: str) -> LoraAdapter:
        """A registered adapter's CPU copy (spec, factors, ``modules_to_save``, meta, path)."""
        return self.bank.get(name)

    def adapter_info(self, name: str) -> AdapterInfo:
        """Folder and meta of an adapter, without reading its weights (for listings)."""
        return self.bank.info(name)

    def attach_store(self, store: AdapterStore) -> None:
        """Serve every adapter of ``store`` by name, each read from disk on first use (see :meth:`fetch_adapter`)."""
        self.bank.attach_store(store)

    @property
    def store(self) -> AdapterStore | None:
        """The attached adapter store, if any."""
        return self.bank.store

    def fetch_adapter(self, name: str) -> "concurrent.futures.Future[LoraAdapter]":
        """Read a store adapter into the CPU tier on a loader thread (once, however many callers ask); a done
        future when it is in memory already."""
        return self.bank.fetch(name)

    def needs_fetch(self, name: str) -> bool:
        """Whether ``name`` is a store adapter not in the CPU tier (its first use reads it from disk)."""
        return self.bank.needs_fetch(name)

    def in_store(self, name: str) -> bool:
        """Whether ``name`` is served from the attached store (not registered by name)."""
        return self.bank.in_store(name)

    def on_load(self, fn: LoadListener) -> None:
        """Call ``fn(tier, seconds)`` after every adapter load: ``disk`` (file -> CPU) or ``slot`` (CPU -> device)."""
        self.bank.on_load(fn)

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
        """Run the bare base model inside this block (this thread)."""
        self._local.disabled = getattr(self._local, "disabled", 0) + 1
        try:
            yield
        finally:
            self._local.disabled -= 1

    # ------------------------------------------------------------------ device slots
    @contextmanager
    def hold(self, names: Iterable[str]) -> Iterator[dict[str, int]]:
        """Device slots for ``names`` ({name: slot}), loaded if needed and never evicted inside the block."""
        with self.bank.hold(list(names)) as slots:
            yield slots

    def acquire(self, names: Iterable[str], loaded: Mapping[str, LoraAdapter] | None = None) -> dict[str, int]:
        """Device slots for ``names`` ({name: slot}), held until :meth:`release`; ``loaded``: copies
        :meth:`fetch_adapter` returned (no second read if the CPU tier dropped them meanwhile)."""
        return self.bank.acquire(list(names), loaded)

    def release(self, slots: Mapping[str, int]) -> None:
        """Give back the slots :meth:`acquire` returned."""
        self.bank.release(slots.values())

    @property
    def max_slots(self) -> int:
        """How many distinct adapters one forward may use (the device slots of every wrapped layer)."""
        return self.bank.max_slots

    def resident(self) -> dict[str, int]:
        """Adapters currently in device slots, with their slot."""
        return self.bank.resident()

    @property
    def stats(self) -> BankStats:
        """Live counters of the adapter cache (slot hits, misses, evictions, reloads, load seconds)."""
        return self.bank.stats

    def cpu_adapters(self) -> int:
        """How many adapters have their tensors in the CPU tier now."""
        return self.bank.cpu_count()

    def nbytes(self) -> dict[str, int]:
        """Bytes held per tier: ``cpu`` (adapters in RAM) and ``device`` (slot stacks)."""
        return self.bank.nbytes()

    # ------------------------------------------------------------------ computation
    @property
    def layers(self) -> Mapping[str, MultiLoraLinear]:
        """The wrapped layers by module path (read-only, live)."""
        return MappingProxyType(self.bank.layers)

    @property
    def device(self) -> torch.device:
        """Where the model (and the adapter slots) compute."""
        return self.bank.device

    @property
    def dtype(self) -> torch.dtype:
        """The model's dtype (adapters are kept in it)."""
        return self.bank.dtype

    @property
    def trust_pickle(self) -> bool:
        """Whether adapter folders may hold pickled ``.bin`` weights."""
        return self.bank.trust_pickle

    @property
    def plan_state(self) -> PlanState:
        """The per-thread plan and training overrides every wrapped layer reads (model heads read it too)."""
        return self.bank.state

    def _row(self, choice: RowChoice) -> RowSpec:
        return rows_from_spec(choice, self.bank)

    def rows_for(self, adapters: RowChoice | Sequence[RowChoice] | None, n_rows: int) -> list[RowSpec]:
        """Per-row specs: one choice for all rows, or a list with one choice per row."""
        if getattr(self._local, "disabled", 0):
            return [[] for _ in range(n_rows)]
        if adapters is None:
            return [self._row(self._active)] * n_rows
        if isinstance(adapters, str) or not isinstance(adapters, Sequence):  # one choice (name, mapping, node)
            return [self._row(adapters)] * n_rows  # type: ignore[arg-type]
        choices = list(adapters)
        if len(choices) != n_rows:
            raise LoraplexError(f"adapters has {len(choices)} entries but the batch has {n_rows} rows")
        return [self._row(c) for c in choices]

    @contextmanager
    def using(self, adapters: RowChoice | Sequence[RowChoice] | None, n_rows: int) -> Iterator[BatchPlan]:
        """Hold device slots and set the batch plan for every forward inside the block (``plex.model`` calls too)."""
        rows = self.rows_for(adapters, n_rows)
        names = {n for row in rows for n, _ in row}
        with self.bank.hold(names) as slots:
            plan = BatchPlan.build(rows, slots, self.bank.device)
            with self.bank.state.planned(plan):
                yield plan

    @contextmanager
    def using_plan(self, plan: BatchPlan) -> Iterator[BatchPlan]:
        """Every forward of this thread inside the block uses ``plan`` (its slots must be held by the caller)."""
        with self.bank.state.planned(plan):
            yield plan

    @contextmanager
    def train_overrides(self, overrides: TrainOverrides) -> Iterator[None]:
        """Every forward of this thread inside the block computes with ``overrides`` (differentiable stacks, LoRA
        dropout); other threads keep serving the frozen slots."""
        with self.bank.state.overriding(overrides):
            yield

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


def _batch_size(input_ids: torch.Tensor | None, kwargs: dict[str, Any]) -> int:
    for t in (input_ids, kwargs.get("inputs_embeds"), kwargs.get("attention_mask")):
        if t is not None:
            return int(t.shape[0])
    raise LoraplexError("cannot tell the batch size: pass input_ids, inputs_embeds or attention_mask")


def load(base: nn.Module | str | os.PathLike, adapters: Mapping[str, Any] | None = None, *,
         model_class: Any = None, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
         tokenizer: Any = True, max_slots: int = 32, cpu_budget_bytes: int | None = None,
         trust_pickle: bool = False, quantize: str | int | None = None, group_size: int = 32,
         **model_kwargs: Any) -> Plex:
    """A :class:`Plex` over ``base`` (a model, a local folder or a hub id) with ``adapters`` {name: folder}.

    ``quantize``: ``"int8"`` / ``"int4"`` (or 8 / 4) replaces the base's Linear layers by weight-only quantized
    ones (:func:`loraplex.quant.quantize_model`, int4 groups of ``group_size``) before adapters are attached;
    adapters stay in the activation dtype and load the same on the float base. A model passed in is quantized
    in place.
    """
    tok = None
    if isinstance(base, nn.Module):
        model = base
        if tokenizer is not True and tokenizer is not False:
            tok = tokenizer
    else:
        model, tok = load_base(base, model_class=model_class, dtype=dtype, tokenizer=tokenizer, **model_kwargs)
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    try:
        scheme = scheme_of(quantize)
    except ValueError as exc:
        raise LoraplexError(str(exc)) from None
    if scheme is not None:
        quantize_model(model, scheme, group_size=group_size)
    plex = Plex(model, tok, max_slots=max_slots, cpu_budget_bytes=cpu_budget_bytes, trust_pickle=trust_pickle)
    for name, src in (adapters or {}).items():
        plex.add_adapter(name, src)
    return plex


def load_base(path: str | os.PathLike, *, model_class: Any = None, dtype: torch.dtype | None = None,
              tokenizer: Any = True, quantize: str | int | None = None, group_size: int = 32,
              **kwargs: Any) -> tuple[nn.Module, Any]:
    """A transformers model (+ tokenizer) from a folder, a hub id or an embedded model's name
    (:mod:`loraplex.models`, e.g. ``"smollm2"``); causal LMs get their LM head. ``quantize`` ("int8" / "int4"):
    its Linear layers weight-only quantized on the CPU (:func:`loraplex.quant.quantize_model`)."""
    try:
        scheme = scheme_of(quantize)
    except ValueError as exc:
        raise LoraplexError(str(exc)) from None
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
    if scheme is not None:
        quantize_model(model, scheme, group_size=group_size)
    tok = None
    if tokenizer is True:
        try:
            tok = AutoTokenizer.from_pretrained(src)
        except Exception:
            tok = None
    elif tokenizer is not False:
        tok = tokenizer
    return model, tok
