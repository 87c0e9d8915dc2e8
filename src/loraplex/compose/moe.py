"""Routed models: route once per sequence, then serve every row in ONE mixed-batch pass.

:class:`RoutedModel` (sequence routers, :class:`~loraplex.compose.router.Router`):

1. *routing pass*: features for the batch -- one base-model forward (adapters off) pooled, or a sentence
   embedding -- and the router's gates (top-1 / top-k / soft);
2. *one mixed-batch pass*: each row runs with its own choice -- the top-1 adapter name, or a blend
   ``{expert: weight}`` for top-k / soft -- through the runtime's per-row plan. Never one forward per example.

``generate`` routes on the prompt, then generates all rows in one ``plex.generate`` with per-row adapters.
``all_experts`` is the "every expert in parallel" mode: each row is expanded to K rows (one per expert) in a single
batch and the K outputs are selected (top-1) or weighted (by the routing probabilities) afterwards.
``differentiable`` runs the same pass with grad-carrying weights (joint router/adapter training).

:class:`GatedModel` (token-gated routers, X-LoRA / MoLE style): every wrapped layer mixes the experts' deltas with
per-token gates computed from that layer's input (one pass; K times the LoRA FLOPs of one adapter).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch

from loraplex.api import Plex
from loraplex.compose import functional as F
from loraplex.compose.features import decode_texts, get_embedder, hashed_ngrams, routing_pass
from loraplex.compose.losses import load_shares, share_entropy, warn_collapse
from loraplex.compose.router import Router, TokenGatedRouter
from loraplex.compose.trainable import base_plan, check_experts, layer_hooks, weighted_plan
from loraplex.errors import LoraplexError
from loraplex.layers import MultiLoraLinear


@dataclass
class Routing:
    """Routing decisions for one batch: ``experts`` names, ``logits``/``probs`` [N, K], chosen ``idx`` [N, k]
    (-1: base model) with ``weights`` [N, k]."""

    experts: tuple[str, ...]
    logits: torch.Tensor
    gates: F.Gates
    mode: str
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def probs(self) -> torch.Tensor:
        return self.gates.probs

    @property
    def idx(self) -> torch.Tensor:
        return self.gates.idx

    @property
    def weights(self) -> torch.Tensor:
        return self.gates.weights

    @property
    def top1(self) -> list[str]:
        """Best expert name per row."""
        return [self.experts[i] for i in self.gates.top1.tolist()]

    def dense(self) -> torch.Tensor:
        """[N, K] weights (zeros for unchosen experts); keeps the gradient."""
        return F.dense_weights(self.gates.idx, self.gates.weights, len(self.experts))

    def choices(self) -> list[str | dict[str, float] | None]:
        """Per-row choices for the runtime: a name (one expert at weight 1), a blend dict, or None (base)."""
        out: list[str | dict[str, float] | None] = []
        idx = self.gates.idx.tolist()
        w = self.gates.weights.detach().float().tolist()
        for row_i, row_w in zip(idx, w):
            pairs = [(self.experts[i], x) for i, x in zip(row_i, row_w) if i >= 0 and x != 0]
            if not pairs:
                out.append(None)
            elif len(pairs) == 1 and pairs[0][1] == 1.0:
                out.append(pairs[0][0])
            else:
                out.append(dict(pairs))
        return out

    def shares(self) -> torch.Tensor:
        """Share of rows whose top-1 is each expert."""
        return load_shares(self.gates.top1, len(self.experts))

    def summary(self) -> dict[str, Any]:
        s = self.shares()
        return {"shares": dict(zip(self.experts, [round(float(x), 4) for x in s])),
                "share_entropy": share_entropy(s),
                "mean_entropy": float(-(self.probs * (self.probs + 1e-12).log()).sum(-1).mean())}


class RoutedModel:
    """A :class:`~loraplex.api.Plex` plus a sequence router; ``top_k``/``mode``/``temperature`` override the
    router's saved settings. ``embedder`` overrides the embedding model of ``pooling="embedding"`` routers."""

    def __init__(self, plex: Plex, router: Router, *, top_k: int | None = None, mode: str | None = None,
                 temperature: float | None = None, embedder: Any = None, warn_on_collapse: bool = False) -> None:
        if not isinstance(router, Router):
            raise LoraplexError(f"RoutedModel needs a sequence router (linear/mlp), got {type(router).__name__}; "
                                f"use GatedModel for token-gated routers")
        check_experts(plex, router.experts, "router")
        self.plex = plex
        self.router = router
        self.top_k = top_k
        self.mode = mode
        self.temperature = temperature
        self._embedder = embedder
        self.warn_on_collapse = warn_on_collapse
        self.last_routing: Routing | None = None

    @property
    def experts(self) -> tuple[str, ...]:
        return tuple(self.router.experts)

    # ------------------------------------------------------------------ routing
    def features(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 texts: Sequence[str] | None = None) -> torch.Tensor:
        """Router inputs [N, D]: the routing pass, or sentence embeddings of ``texts`` (decoded if not given)."""
        r = self.router
        if r.uses_texts:
            if texts is None:
                if input_ids is None:
                    raise LoraplexError("routing needs input_ids or texts")
                texts = decode_texts(self.plex.tokenizer, input_ids, attention_mask)
            if r.pooling == "ngram":
                return hashed_ngrams(list(texts), r.in_dim)
            emb = self._embedder or get_embedder(r.embedding_model, device=self.plex.device)
            return emb.encode(list(texts))
        if input_ids is None:
            raise LoraplexError("a hidden-state router needs input_ids (it pools a routing pass of the base model)")
        return routing_pass(self.plex, input_ids, attention_mask, r.pooling,
                            r.hidden_layer)

    def route(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, *,
              texts: Sequence[str] | None = None, features: torch.Tensor | None = None, grad: bool = False,
              top1_weight: str = "one") -> Routing:
        """Routing decisions for a batch (no gradient unless ``grad``).

        Serving (``grad=False``) is deterministic: the router runs in eval mode (no dropout) and without noise even
        if it was left in training mode; with ``grad`` the router's own mode decides (noise while training)."""
        feats = self.features(input_ids, attention_mask, texts) if features is None else features
        dev = self.router.feature_mean.device
        was_training = self.router.training
        if not grad and was_training:
            self.router.eval()
        try:
            with torch.set_grad_enabled(grad):
                logits, gates = self.router.gates(feats.to(dev), mode=self.mode, top_k=self.top_k,
                                                  temperature=self.temperature, top1_weight=top1_weight)
        finally:
            self.router.train(was_training)
        routing = Routing(self.experts, logits, gates, self.mode or self.router.mode)
        if self.warn_on_collapse:
            warn_collapse(routing.shares(), self.experts, where="routed batch")
        return routing

    # ------------------------------------------------------------------ serving
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 texts: Sequence[str] | None = None, routing: Routing | None = None, **kwargs: Any) -> Any:
        """Route, then one mixed-batch forward; returns the model output (routing in ``self.last_routing``)."""
        routing = routing or self.route(input_ids, attention_mask, texts=texts)
        self.last_routing = routing
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        return self.plex(input_ids, adapters=routing.choices(), **kwargs)

    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any
            ) -> tuple[Any, Routing]:
        """``(output, routing)`` of :meth:`__call__`."""
        out = self(input_ids, attention_mask, **kwargs)
        return out, self.last_routing  # type: ignore[return-value]

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 texts: Sequence[str] | None = None, routing: Routing | None = None, group_rows: bool = True,
                 **kwargs: Any) -> Any:
        """Route on the prompt, then ONE batched generation with each row's own adapter (or blend).

        With ``group_rows`` the rows are generated ordered by their adapter's device slot (and put back in the
        caller's order afterwards): each adapter's rows are then one contiguous run, which lets the runtime skip
        the per-row gathers in every decode step. Outputs are identical either way.
        """
        routing = routing or self.route(input_ids, attention_mask, texts=texts)
        self.last_routing = routing
        choices = routing.choices()
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        n = int(input_ids.shape[0])
        if not group_rows or n < 2 or not all(isinstance(c, str) for c in choices):
            return self.plex.generate(input_ids, adapters=choices, **kwargs)
        with self.plex.hold(sorted(set(choices))) as slots:  # the slots stay put while held
            order = sorted(range(n), key=lambda i: slots[choices[i]])  # type: ignore[index]
            if order == list(range(n)):
                return self.plex.generate(input_ids, adapters=choices, **kwargs)
            perm = torch.tensor(order, device=input_ids.device)
            for key in ("attention_mask", "position_ids", "token_type_ids"):
                if isinstance(kwargs.get(key), torch.Tensor) and kwargs[key].shape[:1] == (n,):
                    kwargs[key] = kwargs[key].index_select(0, perm.to(kwargs[key].device))
            out = self.plex.generate(input_ids.index_select(0, perm), adapters=[choices[i] for i in order],
                                     **kwargs)
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(n, device=perm.device)
        return _take_rows(out, inverse, n)

    def all_experts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                    combine: str = "select", texts: Sequence[str] | None = None, routing: Routing | None = None,
                    **kwargs: Any) -> torch.Tensor:
        """Every row expanded to all K experts in ONE batch; logits combined afterwards.

        ``combine``: ``select`` (the routed top-1 expert's logits), ``weighted`` (sum_k p_k logits_k with the
        routing weights, dense over K), or ``none`` (all of them, [N, K, ...]).
        """
        logits = expert_logits(self.plex, self.experts, input_ids, attention_mask, **kwargs)  # [N, K, ...]
        if combine == "none":
            return logits
        routing = routing or self.route(input_ids, attention_mask, texts=texts)
        self.last_routing = routing
        if combine == "select":
            top = routing.gates.top1.to(logits.device)
            return logits[torch.arange(logits.shape[0], device=logits.device), top]
        if combine == "weighted":
            w = routing.dense().to(logits.dtype).to(logits.device)
            return (w.reshape(*w.shape, *([1] * (logits.dim() - 2))) * logits).sum(1)
        raise LoraplexError(f"combine must be select, weighted or none, got {combine!r}")

    def differentiable(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                       features: torch.Tensor | None = None, texts: Sequence[str] | None = None,
                       top1_weight: str = "prob", **kwargs: Any) -> tuple[Any, Routing]:
        """One mixed-batch forward whose per-row weights carry the router's gradient (top-1 uses the Switch
        weighting ``p * delta`` by default so the gate gets a gradient). Returns ``(output, routing)``."""
        routing = self.route(input_ids, attention_mask, texts=texts, features=features, grad=True,
                             top1_weight=top1_weight)
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        with weighted_plan(self.plex, self.experts, routing.dense()):
            out = self.plex.model(input_ids=input_ids, **kwargs)
        return out, routing


def _take_rows(out: Any, idx: torch.Tensor, n: int) -> Any:
    """``out`` with its per-row tensors reordered by ``idx`` (tensors, tuples of tensors, and ModelOutput fields
    whose first dimension is a multiple of ``n``, e.g. sequences and per-step scores)."""
    def take(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] % n == 0 and x.shape[0] > 0:
            f = x.shape[0] // n  # beams / num_return_sequences are consecutive per row
            rows = (idx.to(x.device)[:, None] * f + torch.arange(f, device=x.device)).reshape(-1)
            return x.index_select(0, rows)
        if isinstance(x, tuple):
            return tuple(take(e) for e in x)
        return x

    if isinstance(out, torch.Tensor):
        return take(out)
    if hasattr(out, "keys"):
        for k in list(out.keys()):
            if k != "past_key_values":
                out[k] = take(out[k])
        return out
    return out


def expert_logits(plex: Plex, experts: Sequence[str | None], input_ids: torch.Tensor,
                  attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
    """Logits [N, K, ...] of every row under every choice in ``experts`` (None = base), in ONE expanded batch."""
    n, k = int(input_ids.shape[0]), len(experts)
    ids = input_ids.repeat_interleave(k, dim=0)
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask.repeat_interleave(k, dim=0)
    out = plex(ids, adapters=list(experts) * n, **kwargs)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits.reshape(n, k, *logits.shape[1:])


# --------------------------------------------------------------------------------------------- token gating
class GatedModel:
    """A :class:`~loraplex.api.Plex` served with a :class:`TokenGatedRouter`: in every gated layer,
    ``y = W x + sum_k g_k(x) s_k B_k A_k x`` with per-token gates ``g(x)`` from that layer's input."""

    def __init__(self, plex: Plex, router: TokenGatedRouter) -> None:
        if not isinstance(router, TokenGatedRouter):
            raise LoraplexError(f"GatedModel needs a token_gated router, got {type(router).__name__}")
        check_experts(plex, router.experts, "token-gated router")
        unknown = [m for m in router.layer_dims if m not in plex.layers]
        if unknown:
            raise LoraplexError(f"token-gated router gates layers the model does not adapt: {unknown[:5]}")
        self.plex = plex
        self.router = router
        self.last_gates: dict[str, torch.Tensor] = {}
        self.record_gates = False

    @classmethod
    def new(cls, plex: Plex, experts: Sequence[str], **settings: Any) -> "GatedModel":
        """A fresh (uniform) token-gated router over every wrapped layer any expert adapts."""
        check_experts(plex, experts, "token-gated router")
        mods = {m for e in experts for m in plex.get_adapter(e).modules}
        layers = {m: plex.layers[m].d_in for m in plex.layers if m in mods}
        return cls(plex, TokenGatedRouter(experts, layers, **settings))

    @contextmanager
    def active(self, n_rows: int) -> Iterator[None]:
        """Every forward in the block (this thread) runs with per-token gating over the experts."""
        experts = self.router.experts
        with self.plex.hold(experts) as slots, base_plan(self.plex, n_rows):
            slot_idx = [slots[e] for e in experts]
            self.last_gates = {}

            def hook(name: str, layer: MultiLoraLinear, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
                if name not in self.router.layer_dims:
                    return None
                A, B = layer.stacks()  # [S, r_max, d_in], [S, d_out, r_max] (this thread's training stacks included)
                idx = torch.tensor(slot_idx, device=A.device)
                x3 = x.reshape(x.shape[0], -1, x.shape[-1])
                g = self.router.gate(name, x3)  # [N, L, K]
                if self.record_gates:
                    self.last_gates[name] = g.detach()
                upd = F.gated_delta(x3.to(A.dtype), A.index_select(0, idx), B.index_select(0, idx),
                                    layer.lora_scale.index_select(0, idx), g)
                return y + upd.reshape(y.shape).to(y.dtype)

            with layer_hooks(self.plex, hook, [m for m in self.router.layer_dims]):
                yield

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        n = int(input_ids.shape[0])
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        with self.active(n):
            return self.plex.model(input_ids=input_ids, **kwargs)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        n = int(input_ids.shape[0])
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        with self.active(n), torch.no_grad():
            return self.plex.model.generate(input_ids=input_ids, **kwargs)
