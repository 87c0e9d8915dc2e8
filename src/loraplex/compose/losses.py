"""Router losses and routing statistics (pure functions of router outputs).

Which ones have a gradient (with respect to the router logits):

=========================  ========  ===============================================================
function                   gradient  definition
=========================  ========  ===============================================================
switch_load_balance        yes       ``N * sum_i f_i P_i``; f_i = share of rows whose argmax is i (constant),
                                     P_i = mean router probability of i (carries the gradient)
router_z_loss              yes       ``mean_rows logsumexp(logits)^2`` (keeps logits small, ST-MoE)
sq_dev_load_loss           yes       ``K * sum_i (P_i - 1/K)^2`` on soft assignments (0 when balanced)
hard_load_loss             **no**    the same squared deviation on argmax counts: ``bincount(argmax)``
                                     is piecewise constant, so its gradient is zero / undefined --
                                     use it to *measure* imbalance, never to train
entropy                    yes       mean row entropy of the routing distribution
load_shares                no        share of rows per expert (argmax, or soft mean)
=========================  ========  ===============================================================

With N experts balanced, ``switch_load_balance`` is 1 at its minimum; note that when the argmax shares ``f`` are
exactly uniform its gradient vanishes (the loss is then ``sum_i P_i = 1``), which is the balanced optimum.
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import torch

from loraplex.errors import LoraplexError


class RouterCollapseWarning(UserWarning):
    """An expert takes more than twice its fair share of rows, or none at all."""


def _probs(logits_or_probs: torch.Tensor, is_probs: bool | None) -> torch.Tensor:
    x = logits_or_probs
    if x.dim() != 2:
        raise LoraplexError(f"router outputs must be [N, K], got shape {tuple(x.shape)}")
    if is_probs is None:
        with torch.no_grad():
            is_probs = bool((x >= 0).all()) and torch.allclose(x.sum(-1), torch.ones_like(x[:, 0]), atol=1e-4)
    return x if is_probs else torch.softmax(x.float(), dim=-1)


def load_shares(assign: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Share of rows per expert ([K], sums to 1, no gradient).

    ``assign``: [N] expert ids (argmax routing; -1 = routed to base, not counted) or [N, K] soft probabilities.
    """
    with torch.no_grad():
        if assign.dim() == 2:
            return assign.float().mean(0)
        a = assign[assign >= 0]
        if a.numel() == 0:
            return torch.zeros(n_experts)
        return torch.bincount(a.long().cpu(), minlength=n_experts).float() / assign.numel()


def switch_load_balance(logits_or_probs: torch.Tensor, top1_idx: torch.Tensor | None = None, *,
                        is_probs: bool | None = None) -> torch.Tensor:
    """Switch Transformer auxiliary loss ``N * sum_i f_i P_i`` (Fedus et al. 2021), N = number of experts.

    ``f_i`` = share of rows whose top-1 expert is i (from ``top1_idx`` [N], or the argmax; no gradient),
    ``P_i`` = mean router probability of expert i (differentiable). Minimum 1 at a uniform split.
    ``is_probs`` says whether the input is probabilities (default: detected).
    """
    p = _probs(logits_or_probs, is_probs)
    k = p.shape[1]
    idx = p.detach().argmax(-1) if top1_idx is None else top1_idx.reshape(-1)
    f = torch.bincount(idx.long(), minlength=k).to(p.dtype) / max(1, idx.numel())  # constant
    return k * (f.detach() * p.mean(0)).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss ``mean over rows of logsumexp(logits)^2`` (Zoph et al. 2022); differentiable."""
    if logits.dim() != 2:
        raise LoraplexError(f"router logits must be [N, K], got shape {tuple(logits.shape)}")
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


def sq_dev_load_loss(probs: torch.Tensor, *, is_probs: bool | None = None) -> torch.Tensor:
    """Squared deviation of the soft load from uniform: ``K * sum_i (P_i - 1/K)^2``, P_i = mean_n probs[n, i].

    Built from soft assignments, so it has a gradient (0 exactly when the soft load is balanced).
    """
    p = _probs(probs, is_probs)
    k = p.shape[1]
    return k * (p.mean(0) - 1.0 / k).pow(2).sum()


def hard_load_loss(logits_or_probs: torch.Tensor) -> torch.Tensor:
    """The squared deviation of *argmax counts* from uniform. **No gradient**: ``bincount(argmax)`` is piecewise
    constant in the logits; this is a metric, and training on it does nothing (use :func:`sq_dev_load_loss`)."""
    k = logits_or_probs.shape[1]
    shares = load_shares(logits_or_probs.detach().argmax(-1), k)
    return k * (shares - 1.0 / k).pow(2).sum()


def entropy(probs: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Mean over rows of the routing distribution's entropy (nats); differentiable."""
    return -(probs * (probs + eps).log()).sum(-1).mean()


def share_entropy(shares: torch.Tensor, eps: float = 1e-12) -> float:
    """Entropy (nats) of the per-expert load shares; ``log K`` when balanced, 0 when one expert takes all."""
    s = shares.float()
    return float(-(s * (s + eps).log()).sum())


def collapse_problems(shares: torch.Tensor | Sequence[float], names: Sequence[str], factor: float = 2.0
                      ) -> list[str]:
    """Messages for experts whose load share is above ``factor`` times fair (1/K) or exactly 0."""
    s = [float(x) for x in shares]
    k = len(s)
    if k != len(names):
        raise LoraplexError(f"{k} shares for {len(names)} experts")
    fair = 1.0 / k
    out = []
    for name, share in zip(names, s):
        if share > factor * fair + 1e-9:
            out.append(f"expert {name!r} takes {share:.0%} of rows, more than {factor:g}x its fair share "
                       f"({fair:.0%})")
        elif share == 0:
            out.append(f"expert {name!r} receives no rows")
    return out


def warn_collapse(shares: torch.Tensor | Sequence[float], names: Sequence[str], factor: float = 2.0,
                  where: str = "router") -> list[str]:
    """:func:`collapse_problems`, each issued as a :class:`RouterCollapseWarning`; returns the messages."""
    problems = collapse_problems(shares, names, factor)
    for p in problems:
        warnings.warn(f"{where}: {p} (routing collapse?)", RouterCollapseWarning, stacklevel=2)
    return problems


def aux_loss(logits: torch.Tensor, probs: torch.Tensor, *, load_balance: str = "switch",
             load_balance_weight: float = 1e-2, z_loss_weight: float = 1e-3) -> torch.Tensor:
    """The configured auxiliary loss: ``weight * (switch | sq_dev | none) + z_weight * z-loss``."""
    total = logits.new_zeros(())
    if load_balance == "switch":
        total = total + load_balance_weight * switch_load_balance(probs, is_probs=True)
    elif load_balance == "sq_dev":
        total = total + load_balance_weight * sq_dev_load_loss(probs, is_probs=True)
    elif load_balance not in ("none", None):
        raise LoraplexError(f"unknown load_balance {load_balance!r}; expected switch, sq_dev or none")
    if z_loss_weight:
        total = total + z_loss_weight * router_z_loss(logits)
    return total


def routing_accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of rows whose predicted expert equals the label (labels < 0 are ignored)."""
    keep = labels >= 0
    if int(keep.sum()) == 0:
        return math.nan
    return float((pred[keep] == labels[keep]).float().mean())
