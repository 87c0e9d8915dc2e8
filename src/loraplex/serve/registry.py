"""What a request's ``model`` field names, turned into a per-row adapter choice.

A name resolves, in this order, to:

* the base model (``base`` or the base model's id) -> no adapter;
* ``auto`` -> the configured router picks per request: an object with ``route_texts([prompt]) -> [choice]``, a
  :class:`loraplex.compose.moe.RoutedModel` (``route(ids, mask).choices()``), or a callable
  ``prompt -> (choice, served_by)``;
* an A/B split from the config ``{name: {arm: weight, ...}}`` -> one arm, drawn by a seeded RNG (sticky per
  ``user`` when the request names one), reported back as ``arm``;
* a named composition from the config ``{name: spec}``;
* a registered adapter (merged adapters are registered adapters whose ``loraplex_meta.json`` names parents);
* a composition spec: ``blend(a=0.7,b=0.3)`` (weighted sum of deltas, one pass) or ``stack(a,b)`` (adapters
  trained on top of each other: their deltas add up, i.e. a blend with weights 1);
* a merge spec ``merge(ties;a=0.7,b=0.3;density=0.7)`` (LoRAX-style per-request merge), when the app serves merges
  (:attr:`ModelRegistry.serves_merges`): the :class:`Resolved` carries the parsed :class:`~loraplex.compose.spec.Merge`
  and the app's merge cache (:mod:`loraplex.serve.merges`) turns it into a registered adapter.

Compositions are checked when they are defined (start-up, config, admin load): every adapter they use must be
registered (:meth:`ModelRegistry.check_composition`), and :meth:`ModelRegistry.compositions_using` names the
compositions an adapter unload would break.

:class:`Resolved` carries the row choice, the adapters that serve it and the A/B arm.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import random
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Container, Mapping, Protocol, Sequence

import torch

from loraplex.compose.spec import ComposeSpecError, Merge, Node, Stack, parse
from loraplex.errors import LoraplexError, UnknownAdapterError
from loraplex.plan import NeedsCompositionError, RowSpec, rows_from_spec
from loraplex.serve.worker import Coalescer

AUTO = "auto"
BASE_ALIASES = ("base", "")
#: Bank names of per-request merges start with this; such a name is never a valid adapter name for a client.
MERGE_PREFIX = "merge~"
#: The ``auto`` model card names at most this many adapters as its parents.
LIST_PARENTS = 100


def is_merge_name(name: object) -> bool:
    """Whether ``name`` is the bank name of a merge computed by the server (hidden from listings)."""
    return isinstance(name, str) and name.startswith(MERGE_PREFIX)


class Router(Protocol):
    """A router object (e.g. the MoE router): one row choice per text."""

    def route_texts(self, texts: list[str]) -> list[Any]: ...


#: Or a plain callable ``prompt -> (row choice, served_by names)``.
RouterFn = Callable[[str], tuple[Any, list[str]]]


class ResolveError(LoraplexError, ValueError):
    """A model name that is known but cannot serve this request (HTTP 400)."""

    def __init__(self, message: str, code: str = "invalid_model") -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Resolved:
    """How a request will be served."""

    model: str  # the name the request used
    choice: Any  # row choice for plex: None, adapter name or {name: weight}
    served_by: list[str]  # adapters used (empty: the base model)
    arm: str | None = None  # the A/B arm drawn, if the name was a split
    weights: dict[str, float] = field(default_factory=dict)
    merge: Merge | None = None  # a merge to build first: the merge cache sets ``choice`` to its bank name

    def info(self) -> dict[str, Any]:
        """The ``x_loraplex`` block of a response."""
        out: dict[str, Any] = {"served_by": list(self.served_by), "arm": self.arm}
        if self.weights and (len(self.weights) > 1 or any(w != 1.0 for w in self.weights.values())):
            out["weights"] = dict(self.weights)
        return out


# --------------------------------------------------------------------------- composition specs
_NAME = r"[A-Za-z0-9_.\-]+"  # adapter names, as in the composition grammar


class AdapterCatalog(Protocol):
    """What the registry reads of a :class:`~loraplex.api.Plex` (or of the Ray ingress's store catalog)."""

    tokenizer: Any

    @property
    def adapters(self) -> list[str]: ...

    @property
    def device(self) -> torch.device: ...

    def __contains__(self, name: object) -> bool: ...

    def get_adapter(self, name: str) -> Any: ...

    def adapter_info(self, name: str) -> Any:
        """``path`` and ``meta`` of an adapter, without its weights (:class:`loraplex.adapters.store.AdapterInfo`)."""
        ...


def parse_spec(text: str) -> dict[str, float] | None:
    """``blend(a=0.7,b=0.3)`` -> {a: 0.7, b: 0.3}; ``stack(a,b)`` -> {a: 1, b: 1}; a plain name -> None.

    The text is parsed by :func:`loraplex.compose.spec.parse` (its errors point at the column at fault) and turned
    into weights by :func:`loraplex.plan.rows_from_spec`; adapter names are not checked here. Forms the server
    cannot run in one pass (``moe``, ``merge``, ``ensemble``, non-additive ``stack``) are a :class:`ResolveError`."""
    t = text.strip()
    if not _looks_like_spec(t):
        return None
    return dict(spec_rows(t, None))


def spec_rows(text: str, known: Container[str] | None, listed: Callable[[], list[str]] | None = None) -> RowSpec:
    """The row of a ``blend(...)`` / ``stack(...)`` model name, adapters checked against ``known`` (None: not
    checked); errors as :func:`parse_spec`'s, and :class:`UnknownAdapterError` listing ``listed()``."""
    try:
        node = parse(text)
    except ComposeSpecError as exc:
        raise ResolveError(str(exc), "invalid_spec") from None
    if isinstance(node, Stack) and node.mode != "additive":
        raise ResolveError(f"{text!r}: stack mode {node.mode!r} is not served; stack(...) with the default "
                           f"additive mode (W + D1 + D2, one pass) is", "unsupported_spec")
    try:
        return rows_from_spec(node, known, listed=listed)
    except NeedsCompositionError:
        raise ResolveError(_unsupported(str(node).split("(")[0], text), "unsupported_spec") from None


def parse_merge(text: str) -> Merge | None:
    """The :class:`~loraplex.compose.spec.Merge` of a ``merge(...)`` model name, or None for any other name
    (a malformed ``merge(...)`` is a :class:`ResolveError` pointing at the column at fault)."""
    t = text.strip()
    if not (_looks_like_spec(t) and t.startswith("merge")):
        return None
    try:
        node = parse(t)
    except ComposeSpecError as exc:
        raise ResolveError(str(exc), "invalid_spec") from None
    return node if isinstance(node, Merge) else None


def spec_adapters(spec: str) -> list[str]:
    """The adapters a composition spec uses (a plain name: itself), without checking them."""
    t = spec.strip()
    if not _looks_like_spec(t):
        return [t]
    try:
        node: Node = parse(t)
    except ComposeSpecError:
        return []
    return list(node.adapter_names())


def _unsupported(fn: str, text: str) -> str:
    why = {"moe": "use model 'auto' (the server's router)",
           "merge": "this server does not build merges per request; merge offline with `loraplex merge` and load "
                    "the result",
           "ensemble": "a logit-level ensemble needs K+1 passes; use blend(...) (delta level, one pass)"}
    return f"{text!r}: {fn}(...) is not served directly; {why.get(fn, 'use blend(...) or stack(...)')}"


def _looks_like_spec(name: str) -> bool:
    return "(" in name and name.rstrip().endswith(")")


# --------------------------------------------------------------------------- registry
class ModelRegistry:
    """Names the server answers to, and how each is served."""

    def __init__(self, plex: AdapterCatalog, *, base_id: str = "base", compositions: Mapping[str, str] | None = None,
                 ab_splits: Mapping[str, Mapping[str, float]] | None = None, router: Router | RouterFn | None = None,
                 seed: int = 0) -> None:
        self.plex = plex
        self.base_id = base_id
        self.router = router
        self.compositions: dict[str, str] = dict(compositions or {})
        self.ab_splits: dict[str, dict[str, float]] = {}
        self._rng = random.Random(seed)
        self._seed = seed
        self._lock = threading.Lock()
        self.created = int(time.time())
        self._templates: dict[str, tuple[str | None, str | None]] = {}  # adapter -> (path, template)
        self._route_batcher: Coalescer | None = None  # see batch_routing
        #: Whether ``merge(...)`` names are served (set by an app with a merge cache, :mod:`loraplex.serve.merges`).
        self.serves_merges = False
        for name, spec in self.compositions.items():
            self._check_new_name(name, "composition")
            self.check_composition(name, spec)
        for name, arms in (ab_splits or {}).items():
            self._check_new_name(name, "A/B split")
            total = sum(float(w) for w in arms.values())
            if not arms or total <= 0 or any(float(w) < 0 for w in arms.values()):
                raise ResolveError(f"A/B split {name!r}: weights must be >= 0 and sum to > 0, got {dict(arms)}")
            self.ab_splits[name] = {str(a): float(w) / total for a, w in arms.items()}

    def _check_new_name(self, name: str, what: str) -> None:
        if name in (AUTO, self.base_id, *BASE_ALIASES) or _looks_like_spec(name):
            raise ResolveError(f"{what} name {name!r} is reserved")

    def reserved(self, name: str) -> str | None:
        """Why ``name`` cannot be used for a new adapter, or None."""
        if name in (AUTO, self.base_id, *BASE_ALIASES):
            return f"{name!r} is a reserved model name"
        if name in self.compositions or name in self.ab_splits:
            return f"{name!r} is already a composition or A/B split name"
        if not re.fullmatch(_NAME, name) or _looks_like_spec(name):
            return f"{name!r} is not a valid adapter name (letters, digits, '_', '.', '-')"
        return None

    # ------------------------------------------------------------------ compositions
    def check_composition(self, name: str, spec: str) -> None:
        """Raise :class:`ResolveError` naming composition ``name`` when ``spec`` cannot be served: malformed, a
        form served only through the router or offline, or using an adapter that is not registered (each unknown
        adapter is named, with the registered ones listed)."""
        if not isinstance(spec, str) or not spec.strip():
            raise ResolveError(f"composition {name!r}: the spec must be a non-empty string, got {spec!r}",
                               "invalid_spec")
        text = spec.strip()
        if "(" in text and not _looks_like_spec(text):  # a spec cut short: the grammar points at the column
            try:
                parse(text)
            except ComposeSpecError as exc:
                raise ResolveError(f"composition {name!r}: {exc}", "invalid_spec") from None
        if not _looks_like_spec(text):
            if text not in self.plex or is_merge_name(text):
                raise ResolveError(f"composition {name!r}: {text!r} is neither a blend(...)/stack(...)/merge(...) "
                                   f"spec nor a registered adapter; known adapters: {self._listed()}",
                                   "unknown_adapter")
            return
        try:
            merge = parse_merge(text)
            if merge is None:
                parse_spec(text)  # refuses moe/ensemble/non-additive stack
        except ResolveError as exc:
            raise ResolveError(f"composition {name!r}: {exc}", exc.code) from None
        unknown = [a for a in spec_adapters(text) if a not in self.plex or is_merge_name(a)]
        if unknown:
            noun = "adapter" if len(unknown) == 1 else "adapters"
            raise ResolveError(f"composition {name!r}: unknown {noun} {', '.join(repr(a) for a in unknown)} in "
                               f"{text!r}; known adapters: {self._listed()}", "unknown_adapter")

    def _listed(self) -> str:
        return ", ".join(sorted(a for a in self.plex.adapters if not is_merge_name(a))) or "(none)"

    def compositions_using(self, adapter: str) -> list[str]:
        """Names of the compositions whose spec uses ``adapter``."""
        return [n for n, spec in self.compositions.items() if adapter in spec_adapters(spec)]

    def add_composition(self, name: str, spec: str, *, replace: bool = False) -> None:
        """Define (or with ``replace``, redefine) composition ``name``, checked as at start-up; raises
        :class:`ResolveError` (code ``name_exists`` when the name is taken)."""
        why = self.reserved(name) if name not in self.compositions else None
        if why:
            raise ResolveError(f"composition name: {why}", "invalid_name")
        if name in self.plex:
            raise ResolveError(f"composition name {name!r} is already an adapter", "name_exists")
        if name in self.compositions and not replace:
            raise ResolveError(f"composition {name!r} already exists (send \"replace\": true to redefine it)",
                               "name_exists")
        self.check_composition(name, spec)
        self.compositions = {**self.compositions, name: spec.strip()}  # a new dict: readers never see a half edit

    def remove_composition(self, name: str) -> str:
        """Remove composition ``name``; returns its spec (:class:`UnknownAdapterError` when there is none)."""
        if name not in self.compositions:
            raise UnknownAdapterError(name, list(self.compositions))
        rest = dict(self.compositions)
        spec = rest.pop(name)
        self.compositions = rest
        return spec

    # ------------------------------------------------------------------ names
    def known(self) -> list[str]:
        """Every name a request may use."""
        adapters = [a for a in self.plex.adapters if not is_merge_name(a)]
        names = [self.base_id] + adapters + list(self.compositions) + list(self.ab_splits)
        if self.router is not None:
            names.append(AUTO)
        return list(dict.fromkeys(names))

    def resolve(self, model: str, *, prompt: str | None = None, user: str | None = None,
                _depth: int = 0) -> Resolved:
        """The row choice for ``model`` (raises :class:`UnknownAdapterError` / :class:`ResolveError`)."""
        if not isinstance(model, str):
            raise ResolveError(f"model must be a string, got {type(model).__name__}")
        if _depth > 4:
            raise ResolveError(f"model {model!r}: A/B arms or compositions nest too deep")
        name = model.strip()
        if name in BASE_ALIASES or name == self.base_id:
            return Resolved(model, None, [])
        if name == AUTO:
            return self._route(model, prompt)
        if name in self.ab_splits:
            arm = self._draw(name, user)
            inner = self.resolve(arm, prompt=prompt, user=user, _depth=_depth + 1)
            return Resolved(model, inner.choice, inner.served_by, arm, inner.weights, inner.merge)
        if name in self.compositions:
            inner = self.resolve(self.compositions[name], prompt=prompt, user=user, _depth=_depth + 1)
            return Resolved(model, inner.choice, inner.served_by, inner.arm, inner.weights, inner.merge)
        if name in self.plex:
            return Resolved(model, name, [name], weights={name: 1.0})
        merge = parse_merge(name) if self.serves_merges else None
        if merge is not None:
            return self._merge_resolved(model, merge)
        if _looks_like_spec(name):
            blend = dict(spec_rows(name, self.plex, self.known))
            served = [n for n, w in blend.items() if w != 0]
            return Resolved(model, dict(blend), served, weights=dict(blend))
        raise UnknownAdapterError(name, self.known())

    def _merge_resolved(self, model: str, merge: Merge) -> Resolved:
        """A merge to build: its sources checked now (404 listing the known names), ``choice`` left to the cache."""
        for a in merge.adapter_names():
            if a not in self.plex or is_merge_name(a):
                raise UnknownAdapterError(a, self.known())
        weights = dict(merge.items)
        return Resolved(model, None, [n for n, w in weights.items() if w != 0], weights=weights, merge=merge)

    def _draw(self, split: str, user: str | None) -> str:
        arms = self.ab_splits[split]
        if user:  # sticky: one user always lands in the same arm
            h = hashlib.sha256(f"{self._seed}:{split}:{user}".encode()).digest()
            x = int.from_bytes(h[:8], "big") / 2**64
        else:
            with self._lock:
                x = self._rng.random()
        acc = 0.0
        for arm, w in arms.items():
            acc += w
            if x < acc:
                return arm
        return next(reversed(arms))

    def _route(self, model: str, prompt: str | None) -> Resolved:
        if self.router is None:
            raise ResolveError("model 'auto' needs a router, and no router is configured on this server",
                               "no_router")
        raw = (self._route_batcher.submit(prompt or "") if self._route_batcher is not None
               else self.route_prompts([prompt or ""])[0])
        if self._router_kind() == "callable":  # a plain callable: prompt -> (choice, served_by)
            choice, served = raw
            r = self._as_resolved(model, choice)
            return Resolved(model, r.choice, list(served), weights=r.weights)
        return self._as_resolved(model, raw)

    def _router_kind(self) -> str:
        if callable(getattr(self.router, "route_texts", None)):
            return "texts"
        if callable(getattr(self.router, "route", None)):  # loraplex.compose.moe.RoutedModel
            return "routed"
        return "callable"

    def route_prompts(self, prompts: list[str]) -> list[Any]:
        """The router's raw decision for each prompt, all in one call (one routing pass for a RoutedModel: the
        prompts right-padded into one batch; a plain callable router is called per prompt)."""
        kind = self._router_kind()
        if kind == "texts":
            return list(self.router.route_texts(list(prompts)))  # type: ignore[union-attr]
        if kind == "routed":
            from loraplex.tokens import pad_batch, pad_id

            tok = self.plex.tokenizer
            seqs = [list(tok(p)["input_ids"]) for p in prompts]
            ids, mask = pad_batch(seqs, pad_id(tok), device=self.plex.device)
            return list(self.router.route(ids, mask, texts=list(prompts)).choices())  # type: ignore[union-attr]
        return [self.router(p) for p in prompts]  # type: ignore[operator, misc]

    def batch_routing(self, run_on_worker: Callable[[Callable[[], None]], Any]) -> Coalescer:
        """Route concurrent ``auto`` requests together: their prompts are routed in one :meth:`route_prompts` call
        run through ``run_on_worker`` (the serving engine's worker, so a routing pass never overlaps a batch)."""
        self._route_batcher = Coalescer(self.route_prompts, run_on_worker)
        return self._route_batcher

    @staticmethod
    def _as_resolved(model: str, choice: Any) -> Resolved:
        if isinstance(choice, str) and choice in BASE_ALIASES:
            choice = None
        if choice is None:
            return Resolved(model, None, [])
        if isinstance(choice, str):
            return Resolved(model, choice, [choice], weights={choice: 1.0})
        items = list(choice.items()) if isinstance(choice, Mapping) else list(choice)
        blend = {str(n): float(w) for n, w in items}
        return Resolved(model, blend, [n for n, w in blend.items() if w != 0], weights=blend)

    # ------------------------------------------------------------------ listing
    def list_models(self, *, limit: int | None = None, after: str | None = None,
                    only: str | None = None) -> list[dict[str, Any]]:
        """OpenAI model objects for every name, each with its parent(s) and kind; no adapter weights are read.

        ``limit`` / ``after``: one page of the adapters (sorted by name, those after ``after``); the base model,
        compositions, A/B splits and ``auto`` come with the first page only. ``only``: just that name's card
        (none when unknown)."""
        if only is not None:
            if only in self.plex and only not in self.compositions and only not in self.ab_splits \
                    and only not in (AUTO, self.base_id):
                return [c for c in self._adapter_cards([only]) if c["id"] == only]
            return [c for c in self.list_models(limit=0) if c["id"] == only]
        card = self._card
        first = after is None
        out = [card(self.base_id, "base", None)] if first else []
        out += self._adapter_cards(self.adapter_page(limit=limit, after=after))
        if not first:
            return out
        for name, spec in self.compositions.items():
            out.append(card(name, "composition", spec_adapters(spec), spec=spec))
        for name, arms in self.ab_splits.items():
            out.append(card(name, "ab_split", list(arms), arms=dict(arms)))
        if self.router is not None:
            names = self.plex.adapters
            parents = names if len(names) <= LIST_PARENTS else names[:LIST_PARENTS]
            out.append(card(AUTO, "router", list(parents)))
        return out

    def _card(self, mid: str, kind: str, parent: Any, **extra: Any) -> dict[str, Any]:
        return {"id": mid, "object": "model", "created": self.created, "owned_by": "loraplex",
                "parent": parent, "root": extra.pop("root", mid), "x_loraplex_kind": kind, **extra}

    def _adapter_cards(self, names: list[str]) -> list[dict[str, Any]]:
        out = []
        for name in names:
            try:
                info = self.plex.adapter_info(name)
            except LoraplexError:  # removed meanwhile, or its meta unreadable
                continue
            parents = _parents(getattr(info, "meta", {}) or {})
            root = info.path or name
            if parents:
                out.append(self._card(name, "merge", parents, root=root))
            else:
                out.append(self._card(name, "adapter", self.base_id, root=root))
        return out

    def adapter_page(self, *, limit: int | None = None, after: str | None = None) -> list[str]:
        """Adapter names in listing order (sorted when paged), those after ``after``, at most ``limit``."""
        names = [n for n in self.plex.adapters if not is_merge_name(n)]  # computed merges: listed by spec
        if limit is None and after is None:
            return names
        names = sorted(names)
        start = bisect.bisect_right(names, after) if after is not None else 0
        return names[start:] if limit is None else names[start:start + limit]

    def adapter_count(self) -> int:
        """How many adapters the server can serve by name."""
        return sum(1 for n in self.plex.adapters if not is_merge_name(n))

    # ------------------------------------------------------------------ chat templates
    def chat_template(self, resolved: Resolved) -> str | None:
        """The chat template of the adapter that serves most of the request, if that adapter ships one."""
        if not resolved.weights:
            return None
        best = max(resolved.weights.items(), key=lambda kv: abs(kv[1]))[0]
        try:
            ad = self.plex.adapter_info(best)
        except LoraplexError:
            return None
        key = best
        cached = self._templates.get(key)
        if cached is not None and cached[0] == ad.path:
            return cached[1]
        tmpl = _adapter_template(ad)
        self._templates[key] = (ad.path, tmpl)
        return tmpl


def _parents(meta: Mapping[str, Any]) -> list[str] | None:
    for k in ("parents", "parent", "sources", "merged_from"):
        v = meta.get(k)
        if isinstance(v, str):
            return [v]
        if isinstance(v, Mapping):
            return [str(x) for x in v]
        if isinstance(v, (list, tuple)) and v:
            return [str(x) for x in v]
    return None


def _adapter_template(ad: Any) -> str | None:
    """A chat template shipped with an adapter: meta, chat_template.jinja/.json or tokenizer_config.json."""
    meta = getattr(ad, "meta", None) or {}
    if isinstance(meta.get("chat_template"), str):
        return meta["chat_template"]
    if not ad.path:
        return None
    folder = Path(ad.path)
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    for fname in ("chat_template.json", "tokenizer_config.json"):
        f = folder / fname
        if f.is_file():
            try:
                t = json.loads(f.read_text()).get("chat_template")
            except (json.JSONDecodeError, AttributeError):
                continue
            if isinstance(t, str):
                return t
    return None


def choice_names(choice: Any) -> list[str]:
    """Adapter names in a row choice."""
    if choice is None:
        return []
    if isinstance(choice, str):
        return [choice]
    items: Sequence[Any] = list(choice.items()) if isinstance(choice, Mapping) else list(choice)
    return [str(n) for n, _ in items]

