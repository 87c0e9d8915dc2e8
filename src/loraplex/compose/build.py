"""``build_composition(plex, spec)``: a composition-grammar spec (text or node) -> a runnable object.

Every object returned has ``__call__(input_ids, attention_mask=None, **kw)`` (one forward; returns the model output,
or an object with ``.logits`` for ``ensemble``) and ``generate(input_ids, attention_mask=None, **kw)``; the pipeline
stack generates only (its ``generate`` returns the per-stage texts).

=========================================  =====================================================================
spec                                       object
=========================================  =====================================================================
``a`` / ``base``                           :class:`Single`
``blend(a=0.7,b=0.3[,normalize=true])``    :class:`~loraplex.compose.blend.FixedBlend` (one pass, delta level)
``ensemble(a=..,b=..)``                    :class:`~loraplex.compose.blend.LogitEnsemble` (N x (K+1) rows)
``stack(a,b)``                             :class:`~loraplex.compose.stack.AdditiveStack` (W + D_a + D_b)
``stack(a,b,mode=inlayer)``                :class:`~loraplex.compose.stack.InLayerStack`
``stack(a,b,mode=pipeline)``               :class:`~loraplex.compose.stack.Pipeline`
``moe(ROUTER[,top_k=2][,mode=soft])``      :class:`~loraplex.compose.moe.RoutedModel` (or ``GatedModel`` for a
                                           token-gated router); ROUTER is a folder or a name in ``routers``
``auto``                                   ``moe`` over ``routers["auto"]`` (or the only router given)
``merge(ties;a=0.7,b=0.3;density=0.7)``    the merged adapter (built once with :mod:`loraplex.merge`, registered
                                           under ``merge_name`` or a name derived from the spec) as a :class:`Single`
=========================================  =====================================================================
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Mapping

import torch

from loraplex.api import Plex
from loraplex.compose import spec as S
from loraplex.compose.blend import FixedBlend, LogitEnsemble
from loraplex.compose.moe import GatedModel, RoutedModel
from loraplex.compose.router import Router, TokenGatedRouter, load_router, read_router_config
from loraplex.compose.stack import AdditiveStack, InLayerStack, Pipeline
from loraplex.errors import LoraplexError
from loraplex.merge.merge import merge_adapters


class Single:
    """One row choice for every row: an adapter name, None (base) or a blend dict."""

    def __init__(self, plex: Plex, choice: Any) -> None:
        plex.rows_for([choice], 1)  # validates
        self.plex = plex
        self.choice = choice

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        return self.plex(input_ids, adapters=self.choice, **kwargs)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        return self.plex.generate(input_ids, adapters=self.choice, **kwargs)


def resolve_router(plex: Plex, ref: str | Router | TokenGatedRouter, *, load_missing: bool = True
                   ) -> Router | TokenGatedRouter:
    """A router object from an object or a folder; adapters recorded next to it are registered when missing."""
    if isinstance(ref, (Router, TokenGatedRouter)):
        return ref
    path = os.path.expanduser(str(ref))
    cfg = read_router_config(path)
    missing = [e for e in cfg["experts"] if e not in plex]
    if missing and load_missing:
        recorded = cfg.get("adapters") or {}
        for name in missing:
            if name in recorded:
                p = recorded[name]
                plex.add_adapter(name, p if os.path.isabs(p) else os.path.join(path, p))
    return load_router(path, plex.adapters, allow_extra=True)


def build_composition(plex: Plex, spec: str | S.Node, *, routers: Mapping[str, Any] | None = None,
                      tokenizer: Any = None, pipeline_template: str = "{output}", max_new_tokens: int = 32,
                      merge_name: str | None = None, load_missing: bool = True, **options: Any) -> Any:
    """The runnable composition for ``spec`` over ``plex`` (see the module docstring)."""
    node = S.parse(spec)
    routers = dict(routers or {})
    if isinstance(node, S.Base):
        return Single(plex, None)
    if isinstance(node, S.AdapterRef):
        return Single(plex, node.name)
    if isinstance(node, S.Blend):
        return FixedBlend(plex, node.items, normalize=node.normalize)
    if isinstance(node, S.Ensemble):
        return LogitEnsemble(plex, node.items, normalize=node.normalize)
    if isinstance(node, S.Stack):
        if node.mode == "additive":
            return AdditiveStack(plex, node.names)
        if node.mode == "inlayer":
            return InLayerStack(plex, node.names, **options)
        return Pipeline(plex, node.names, pipeline_template, tokenizer=tokenizer, max_new_tokens=max_new_tokens,
                        **options)
    if isinstance(node, (S.MoE, S.Auto)):
        if isinstance(node, S.Auto):
            if "auto" in routers:
                ref = routers["auto"]
            elif len(routers) == 1:
                ref = next(iter(routers.values()))
            else:
                raise LoraplexError("'auto' needs a router: pass routers={'auto': ROUTER_DIR} (or exactly one "
                                    "router)")
            top_k = mode = None
        else:
            ref = routers.get(node.router, node.router)
            top_k, mode = node.top_k, node.mode
        router = resolve_router(plex, ref, load_missing=load_missing)
        if isinstance(router, TokenGatedRouter):
            return GatedModel(plex, router)
        if mode is None and top_k is not None:
            mode = "top1" if top_k == 1 else "topk"
        return RoutedModel(plex, router, top_k=top_k, mode=mode, **options)
    if isinstance(node, S.Merge):
        return Single(plex, register_merge(plex, node, merge_name))
    raise LoraplexError(f"unsupported composition {node!r}")  # pragma: no cover


def register_merge(plex: Plex, node: S.Merge, name: str | None = None) -> str:
    """Build ``node``'s merged adapter with :mod:`loraplex.merge` and register it (once); returns its name."""
    name = name or "merge-" + hashlib.sha1(str(node).encode()).hexdigest()[:10]
    if name in plex:
        return name
    sources = list(node.adapter_names())
    missing = [s for s in sources if s not in plex]
    if missing:
        raise LoraplexError(f"{node}: unknown adapters {missing}; registered: {', '.join(plex.adapters)}")
    opts = node.options()
    kwargs: dict[str, Any] = {k: v for k, v in opts.items() if k in ("density", "majority_sign_method", "svd_rank",
                                                                      "normalize", "peft_compat")}
    merged, _ = merge_adapters({s: plex.get_adapter(s) for s in sources}, sources, [w for _, w in node.items],
                               node.method, name=name, **kwargs)
    plex.add_adapter(name, merged)
    return name
