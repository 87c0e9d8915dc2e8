"""Pure tensor math of composition and routing (no models, no I/O).

Notation: N rows (sequences), L tokens, K experts (adapters), D feature size, r rank.

* :func:`pool_hidden`   -- one vector per sequence from token states (mean over non-pad tokens, first, last).
* :func:`route`         -- router logits -> (probs, chosen experts, their weights) for top-1 / top-k / soft.
* :func:`apply_capacity` -- optional top-1 capacity: overflow rows go to their next expert with room, or base.
* :func:`dense_weights` -- (idx, weights) -> a dense [N, K] weight matrix (keeps the gradient of ``weights``).
* :func:`gated_delta`   -- per-token mixture of K LoRA deltas (the token-gated router's layer update).
* :func:`chain_delta`   -- the in-layer product stack ``s_n B_n A_n ( ... s_1 B_1 A_1 x)``.
* :func:`combine_ensemble` -- logit-level ensemble ``base + sum_i w_i (logits_i - base)``.
* :func:`blend_weights` -- validate / normalise a fixed blend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from loraplex.errors import LoraplexError

POOLINGS = ("mean", "first", "last")
ROUTE_MODES = ("top1", "topk", "soft")


# --------------------------------------------------------------------------------------------- pooling
def pool_hidden(hidden: torch.Tensor, attention_mask: torch.Tensor | None = None, how: str = "mean") -> torch.Tensor:
    """Pool token states ``hidden`` [N, L, D] to [N, D].

    ``mean``: mean over non-pad tokens (``attention_mask`` 1); ``first``/``last``: the first / last non-pad token
    (works for left and right padding). Without a mask every token counts.
    """
    if hidden.dim() != 3:
        raise LoraplexError(f"pool_hidden expects [N, L, D] token states, got shape {tuple(hidden.shape)}")
    n, length, _ = hidden.shape
    mask = (torch.ones(n, length, device=hidden.device) if attention_mask is None
            else attention_mask.to(hidden.device).float())
    if how == "mean":
        m = mask.to(hidden.dtype)[..., None]  # [N, L, 1]
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
    pos = torch.arange(length, device=hidden.device)
    if how == "first":
        idx = torch.where(mask > 0, pos, length).amin(1).clamp_max(length - 1)  # [N]
    elif how == "last":
        idx = torch.where(mask > 0, pos, -1).amax(1).clamp_min(0)
    else:
        raise LoraplexError(f"unknown pooling {how!r}; expected one of {', '.join(POOLINGS)}")
    return hidden[torch.arange(n, device=hidden.device), idx]


# --------------------------------------------------------------------------------------------- routing
@dataclass
class Gates:
    """The outcome of routing N rows over K experts.

    ``probs`` [N, K]: softmax(logits / temperature) (carries the router's gradient).
    ``idx`` [N, k] long: chosen experts, best first (-1: no expert, the row runs the base model).
    ``weights`` [N, k]: the weight of each chosen expert (top1: 1; topk: renormalised probs; soft: probs).
    """

    probs: torch.Tensor
    idx: torch.Tensor
    weights: torch.Tensor

    @property
    def top1(self) -> torch.Tensor:
        """[N] the best expert of each row (argmax of ``probs``)."""
        return self.probs.argmax(-1)


def route(logits: torch.Tensor, mode: str = "top1", top_k: int = 1, temperature: float = 1.0,
          top1_weight: str = "one") -> Gates:
    """Turn router ``logits`` [N, K] into :class:`Gates`.

    * ``top1``: the argmax expert; its weight is 1 (``top1_weight="one"``, the row equals that adapter exactly) or its
      probability (``"prob"``, Switch Transformer style: carries the router gradient in joint training).
    * ``topk``: the ``top_k`` most probable experts, weights renormalised to sum 1 (gradient flows through them).
    * ``soft``: every expert, weight = probability.
    """
    if logits.dim() != 2:
        raise LoraplexError(f"router logits must be [N, K], got shape {tuple(logits.shape)}")
    if temperature <= 0:
        raise LoraplexError(f"temperature must be > 0, got {temperature}")
    n, k_all = logits.shape
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if mode == "top1":
        idx = probs.argmax(-1, keepdim=True)
        p = probs.gather(1, idx)
        if top1_weight == "one":
            w = torch.ones_like(p)
        elif top1_weight == "prob":
            w = p
        else:
            raise LoraplexError(f"top1_weight must be 'one' or 'prob', got {top1_weight!r}")
        return Gates(probs, idx, w)
    if mode == "topk":
        if not 1 <= top_k <= k_all:
            raise LoraplexError(f"top_k must be between 1 and the number of experts ({k_all}), got {top_k}")
        p, idx = probs.topk(top_k, dim=-1)
        return Gates(probs, idx, p / p.sum(-1, keepdim=True).clamp_min(1e-12))
    if mode == "soft":
        idx = torch.arange(k_all, device=logits.device).expand(n, k_all)
        return Gates(probs, idx, probs)
    raise LoraplexError(f"unknown routing mode {mode!r}; expected one of {', '.join(ROUTE_MODES)}")


def add_noise(logits: torch.Tensor, noise_std: torch.Tensor | float) -> torch.Tensor:
    """Noisy gating (Shazeer et al. 2017): ``logits + N(0, 1) * noise_std`` (``noise_std`` a number or [N, K],
    e.g. ``softplus(x W_noise)``)."""
    if isinstance(noise_std, (int, float)) and noise_std == 0:
        return logits
    return logits + torch.randn_like(logits) * noise_std


def apply_capacity(gates: Gates, capacity_factor: float, fallback: str = "next") -> Gates:
    """Top-1 with a capacity of ``ceil(capacity_factor * N / K)`` rows per expert.

    Rows are served in order of decreasing router probability; a row whose expert is full goes to its next most
    probable expert with room (``fallback="next"``) or to the base model (``"base"``, idx -1, weight 0).
    """
    if gates.idx.shape[1] != 1:
        raise LoraplexError("capacity applies to top-1 routing")
    n, k_all = gates.probs.shape
    cap = max(1, math.ceil(capacity_factor * n / k_all))
    probs = gates.probs.detach()
    order = torch.argsort(probs.max(-1).values, descending=True).tolist()
    prefs = torch.argsort(probs, dim=-1, descending=True).tolist()
    load = [0] * k_all
    new_idx = gates.idx.clone()
    changed = []
    for row in order:
        choices = prefs[row] if fallback == "next" else prefs[row][:1]
        pick = next((e for e in choices if load[e] < cap), -1)
        if pick >= 0:
            load[pick] += 1
        if pick != int(gates.idx[row, 0]):
            new_idx[row, 0] = pick
            changed.append(row)
    if not changed:
        return gates
    hard = bool((gates.weights.detach() == 1).all())  # top1_weight="one": moved rows keep weight 1
    w = gates.weights.clone()
    for row in changed:
        e = int(new_idx[row, 0])
        w[row, 0] = 0.0 if e < 0 else (1.0 if hard else gates.probs[row, e])
    return Gates(gates.probs, new_idx, w)


def dense_weights(idx: torch.Tensor, weights: torch.Tensor, n_experts: int) -> torch.Tensor:
    """[N, K] matrix with ``weights[n, j]`` at column ``idx[n, j]`` (idx -1 is dropped); differentiable."""
    n = idx.shape[0]
    valid = idx >= 0
    safe = torch.where(valid, idx, torch.zeros_like(idx))
    vals = torch.where(valid, weights, torch.zeros_like(weights))
    return torch.zeros(n, n_experts, dtype=weights.dtype, device=weights.device).scatter_add(1, safe, vals)


# --------------------------------------------------------------------------------------------- layer math
def gated_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor,
                gates: torch.Tensor) -> torch.Tensor:
    """Per-token mixture of K LoRA deltas: ``sum_k gates[..., k] * scale[k] * x A_k^T B_k^T``.

    ``x`` [N, L, d_in], ``A`` [K, r, d_in], ``B`` [K, d_out, r], ``scale`` [K], ``gates`` [N, L, K] -> [N, L, d_out].
    """
    v = torch.einsum("nld,krd->nlkr", x, A)  # [N, L, K, r]
    v = v * (gates * scale.to(gates.dtype))[..., None].to(v.dtype)
    return torch.einsum("nlkr,kor->nlo", v, B)


def lora_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float | torch.Tensor) -> torch.Tensor:
    """``scaling * x A^T B^T`` for one adapter (``A`` [r, d_in], ``B`` [d_out, r])."""
    return torch.matmul(torch.matmul(x, A.t()) * scaling, B.t())


def chain_delta(x: torch.Tensor, factors: Sequence[tuple[torch.Tensor, torch.Tensor, float | torch.Tensor]]
                ) -> torch.Tensor:
    """In-layer product stack: ``h = x; for (A, B, s) in factors: h = s * h A^T B^T``; returns ``h``.

    Needs d_in == d_out for every factor after the first (each factor reads the previous one's output).
    """
    h = x
    for A, B, s in factors:
        if h.shape[-1] != A.shape[1]:
            raise LoraplexError(f"in-layer stack: a factor expects inputs of size {A.shape[1]} but gets "
                                f"{h.shape[-1]}")
        h = lora_delta(h, A, B, s)
    return h


def combine_ensemble(base: torch.Tensor, expert_logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Logit-level ensemble ``base + sum_i w_i (logits_i - base)``.

    ``base`` [N, ...], ``expert_logits`` [N, K, ...], ``weights`` [K] or [N, K].
    """
    w = weights.to(expert_logits.dtype)
    if w.dim() == 1:
        w = w.expand(expert_logits.shape[0], -1)
    w = w.reshape(*w.shape, *([1] * (expert_logits.dim() - 2)))
    return base + (w * (expert_logits - base.unsqueeze(1))).sum(1)


def blend_weights(weights: Mapping[str, float] | Sequence[tuple[str, float]], normalize: bool = False
                  ) -> dict[str, float]:
    """A checked blend {name: weight}: finite weights (negative allowed); ``normalize`` divides by their sum."""
    items = list(weights.items()) if isinstance(weights, Mapping) else list(weights)
    if not items:
        raise LoraplexError("a blend needs at least one adapter")
    out: dict[str, float] = {}
    for name, w in items:
        w = float(w)
        if not math.isfinite(w):
            raise LoraplexError(f"blend weight of {name!r} must be finite, got {w}")
        if name in out:
            raise LoraplexError(f"blend names {name!r} twice")
        out[str(name)] = w
    if normalize:
        total = sum(out.values())
        if abs(total) < 1e-12:
            raise LoraplexError(f"cannot normalise blend weights {out}: they sum to 0")
        out = {n: w / total for n, w in out.items()}
    return out
