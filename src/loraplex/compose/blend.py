"""Parallel weighted composition.

* :class:`FixedBlend` -- delta-level blend ``y = W x + sum_i w_i s_i B_i A_i x`` in ONE pass (exact); weights as
  given (negative allowed) or normalised to sum 1; per row (``rows=``) or for the whole batch.
* :class:`LearnedBlend` -- weights ``softmax(logits / T)`` over trainable logits, adapters and base frozen, trained
  on a small dataset with the language-model loss (or any loss on the output); its result is a fixed blend.
* :class:`LogitEnsemble` -- the textbook ensemble ``base + sum_i w_i (logits_i - base)`` at the logit level, computed
  in ONE expanded batch of N x (K+1) rows (base + each adapter). Costs K+1 forwards' worth of compute; offered for
  comparison with the delta-level blend (they differ: the network is not linear in the deltas).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from loraplex.api import Plex
from loraplex.compose import functional as F
from loraplex.compose.moe import expert_logits
from loraplex.compose.spec import Blend
from loraplex.compose.trainable import check_experts, weighted_plan
from loraplex.errors import LoraplexError


def blend_choice(weights: Mapping[str, float] | Sequence[tuple[str, float]], normalize: bool = False
                 ) -> dict[str, float]:
    """A runtime row choice ``{adapter: weight}`` (checked; normalised to sum 1 with ``normalize``)."""
    return F.blend_weights(weights, normalize)


def blend_rows(rows: Sequence[Mapping[str, float] | str | None], normalize: bool = False
               ) -> list[dict[str, float] | str | None]:
    """Per-row choices: each row a blend dict (checked / normalised), an adapter name, or None (base)."""
    return [r if r is None or isinstance(r, str) else blend_choice(r, normalize) for r in rows]


class FixedBlend:
    """Delta-level blend with fixed weights; ``__call__``/``generate`` run one mixed-batch pass."""

    def __init__(self, plex: Plex, weights: Mapping[str, float] | Sequence[tuple[str, float]],
                 normalize: bool = False) -> None:
        self.plex = plex
        self.weights = blend_choice(weights, normalize)
        check_experts(plex, list(self.weights), "blend")

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        return self.plex(input_ids, adapters=self.weights, **kwargs)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        return self.plex.generate(input_ids, adapters=self.weights, **kwargs)

    def spec(self) -> str:
        """The blend as composition-grammar text."""
        return str(Blend(tuple(self.weights.items())))


def causal_lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   per_row: bool = False) -> torch.Tensor:
    """Next-token cross-entropy (pad positions ignored): mean over tokens, or [N] per-row means."""
    lg = logits[:, :-1].float()
    tgt = input_ids[:, 1:].to(lg.device)
    valid = torch.ones_like(tgt, dtype=torch.bool) if attention_mask is None else \
        (attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()).to(lg.device)
    ce = nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), tgt.reshape(-1), reduction="none")
    ce = ce.view_as(tgt) * valid
    if per_row:
        return ce.sum(1) / valid.sum(1).clamp_min(1)
    return ce.sum() / valid.sum().clamp_min(1)


class LearnedBlend(nn.Module):
    """Blend weights ``softmax(logits / temperature)`` (sum 1, positive) learned with adapters frozen."""

    def __init__(self, plex: Plex, experts: Sequence[str], *, temperature: float = 1.0,
                 init: Mapping[str, float] | None = None) -> None:
        super().__init__()
        check_experts(plex, experts, "learned blend")
        self.plex = plex
        self.experts = list(experts)
        self.temperature = float(temperature)
        start = torch.zeros(len(self.experts))
        if init:
            start = torch.tensor([float(init.get(e, 0.0)) for e in self.experts]).clamp_min(1e-6).log()
        self.logits = nn.Parameter(start * self.temperature)

    def weights(self) -> torch.Tensor:
        """[K] current weights (differentiable)."""
        return torch.softmax(self.logits / self.temperature, dim=-1)

    def choice(self) -> dict[str, float]:
        """The learned weights as a fixed blend choice."""
        return dict(zip(self.experts, [float(w) for w in self.weights().detach()]))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """One mixed-batch pass; the output is differentiable in the blend logits."""
        w = self.weights().to(self.plex.device)
        dense = w.unsqueeze(0).expand(int(input_ids.shape[0]), -1)
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        with weighted_plan(self.plex, self.experts, dense):
            return self.plex.model(input_ids=input_ids, **kwargs)

    def fit(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]], *, epochs: int = 1, lr: float = 0.1,
            loss_fn: Callable[[Any, torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None
            ) -> list[float]:
        """Train the logits on ``(input_ids, attention_mask)`` batches (default loss: causal LM); returns the
        mean loss per epoch. Base and adapters stay frozen (only ``self.logits`` is optimised)."""
        opt = torch.optim.Adam([self.logits], lr=lr)
        batches = list(batches)
        if not batches:
            raise LoraplexError("LearnedBlend.fit needs at least one batch")
        history = []
        for _ in range(epochs):
            total = 0.0
            for ids, mask in batches:
                out = self(ids, mask)
                loss = loss_fn(out, ids, mask) if loss_fn else causal_lm_loss(out.logits, ids, mask)
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += float(loss.detach())
            history.append(total / len(batches))
        return history

    def to_fixed(self) -> FixedBlend:
        return FixedBlend(self.plex, self.choice())


@dataclass
class EnsembleOutput:
    """Output of :class:`LogitEnsemble`: the combined ``logits``."""

    logits: torch.Tensor


class _EnsembleProcessor:
    """Generation over the expanded batch: rows ``g*(K+1) .. g*(K+1)+K`` hold (base, adapters...) of sequence g.
    Each step combines their logits, picks one token per sequence and forces it on every row of the group."""

    def __init__(self, weights: torch.Tensor, group: int, do_sample: bool, temperature: float, top_k: int) -> None:
        self.weights, self.group = weights, group
        self.do_sample, self.temperature, self.top_k = do_sample, temperature, top_k

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        s = scores.float().view(-1, self.group, scores.shape[-1])  # [G, K+1, V]
        comb = F.combine_ensemble(s[:, 0], s[:, 1:], self.weights.to(s.device))  # [G, V]
        if self.do_sample:
            z = comb / max(self.temperature, 1e-6)
            if self.top_k:
                kth = z.topk(min(self.top_k, z.shape[-1]), -1).values[:, -1:]
                z = z.masked_fill(z < kth, float("-inf"))
            tok = torch.multinomial(torch.softmax(z, -1), 1)  # [G, 1]
        else:
            tok = comb.argmax(-1, keepdim=True)
        forced = torch.full_like(scores, float("-inf"))
        forced.scatter_(1, tok.repeat_interleave(self.group, 0), 0.0)
        return forced


class LogitEnsemble:
    """``base + sum_i w_i (logits_i - base)`` from one expanded batch of N x (K+1) rows."""

    def __init__(self, plex: Plex, weights: Mapping[str, float] | Sequence[tuple[str, float]],
                 normalize: bool = False) -> None:
        self.plex = plex
        self.weights = blend_choice(weights, normalize)
        check_experts(plex, list(self.weights), "ensemble")
        self.experts = list(self.weights)
        self.w = torch.tensor([self.weights[e] for e in self.experts])

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any
                 ) -> EnsembleOutput:
        logits = expert_logits(self.plex, [None, *self.experts], input_ids, attention_mask, **kwargs)
        return EnsembleOutput(F.combine_ensemble(logits[:, 0], logits[:, 1:], self.w.to(logits.device)))

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, **kwargs: Any) -> torch.Tensor:
        """Greedy (or sampled) generation from the ensembled logits, with the KV cache, in one expanded batch."""
        from transformers import LogitsProcessorList

        g = len(self.experts) + 1
        n = int(input_ids.shape[0])
        ids = input_ids.repeat_interleave(g, 0)
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask.repeat_interleave(g, 0)
        proc = _EnsembleProcessor(self.w, g, do_sample, temperature, top_k)
        extra = list(kwargs.pop("logits_processor", []) or [])
        out = self.plex.generate(ids, adapters=[None, *self.experts] * n, do_sample=False,
                                 logits_processor=LogitsProcessorList([*extra, proc]), **kwargs)
        seqs = out.sequences if hasattr(out, "sequences") else out
        return seqs[::g]
