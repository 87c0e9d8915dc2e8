"""Router training: supervised (task labels), from the language-model loss (which expert lowers it), or joint
(router and adapters together).

* **supervised** -- features of each example (computed once: the base model and the embedding model are frozen),
  cross-entropy of the router logits against the expert the task label names, plus the auxiliary losses.
* **lm_loss** -- adapters frozen; each example's label is the expert with the lowest LM loss on it. The [N, K] loss
  matrix is computed in ONE expanded mixed batch per chunk (every row x every expert), never a loop over experts.
  ``targets="soft"`` trains on ``softmax(-loss / T)`` instead of the argmin.
* **joint** -- the router's top-k / soft weights (top-1: Switch-style ``p * delta``) enter the mixed-batch pass as
  grad-carrying per-row weights; the LM loss back-propagates into the router and, with ``train_adapters``, into the
  adapters the rows selected (their factors are trainable copies, committed to the bank at the end).

Auxiliary losses (``load_balance``: ``switch`` N * sum f_i P_i | ``sq_dev`` on soft assignments | ``none``;
``z_loss_weight`` for the router z-loss) -- see :mod:`loraplex.compose.losses`. A load loss built from argmax counts
has no gradient and is not offered for training. Every epoch logs routing accuracy, per-expert load share and
entropy, and warns (:class:`~loraplex.compose.losses.RouterCollapseWarning`) when an expert takes more than 2x its
fair share or none.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from loraplex.api import Plex
from loraplex.compose import losses as L
from loraplex.compose.blend import causal_lm_loss
from loraplex.compose.features import NGRAM_DIM, get_embedder
from loraplex.compose.moe import RoutedModel, expert_logits
from loraplex.compose.router import Router
from loraplex.compose.trainable import TrainableAdapters
from loraplex.errors import LoraplexError

OBJECTIVES = ("supervised", "lm_loss", "joint")


@dataclass
class RouterTrainConfig:
    """Optimiser and loss settings of router training."""

    epochs: int = 30
    lr: float = 1e-2
    batch_size: int = 64
    weight_decay: float = 0.0
    load_balance: str = "switch"  # switch | sq_dev | none
    load_balance_weight: float = 1e-2
    z_loss_weight: float = 1e-3
    adapter_lr: float = 1e-3  # joint training with train_adapters
    seed: int = 0
    collapse_factor: float = 2.0
    normalize_features: bool = True  # fit the router's input standardisation on the training features
    warn: bool = True  # issue RouterCollapseWarning at the last epoch


@dataclass
class EpochLog:
    """Metrics of one epoch (``accuracy`` against the labels trained on; ``val_accuracy`` on held-out rows)."""

    epoch: int
    loss: float
    task_loss: float
    aux_loss: float
    accuracy: float
    val_accuracy: float | None
    shares: dict[str, float]
    entropy: float
    share_entropy: float
    problems: list[str] = field(default_factory=list)

    def line(self) -> str:
        va = "" if self.val_accuracy is None else f" val_acc={self.val_accuracy:.3f}"
        shares = " ".join(f"{k}={v:.2f}" for k, v in self.shares.items())
        return (f"epoch {self.epoch}: loss={self.loss:.4f} (task {self.task_loss:.4f}, aux {self.aux_loss:.4f}) "
                f"acc={self.accuracy:.3f}{va} entropy={self.entropy:.3f} load[{shares}]")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RouterTrainResult:
    history: list[EpochLog]
    labels: torch.Tensor | None = None  # the targets used (task labels, or the lm_loss argmin)
    loss_matrix: torch.Tensor | None = None  # lm_loss: [N, K] per-example loss of each expert

    @property
    def final(self) -> EpochLog:
        return self.history[-1]


# --------------------------------------------------------------------------------------------- helpers
def label_indices(labels: Sequence[str | int], experts: Sequence[str],
                  label_map: dict[str, str] | None = None) -> torch.Tensor:
    """Task labels -> expert indices (labels are expert names, indices, or mapped by ``label_map``)."""
    out = []
    pos = {e: i for i, e in enumerate(experts)}
    for lab in labels:
        if isinstance(lab, (int,)) and not isinstance(lab, bool):
            if not 0 <= lab < len(experts):
                raise LoraplexError(f"label index {lab} is out of range for {len(experts)} experts")
            out.append(lab)
            continue
        name = (label_map or {}).get(str(lab), str(lab))
        if name not in pos:
            raise LoraplexError(f"label {lab!r} names no expert; experts: {', '.join(experts)}"
                                + ("" if label_map is None else f" (label map: {label_map})"))
        out.append(pos[name])
    return torch.tensor(out, dtype=torch.long)


@torch.no_grad()
def compute_features(routed: RoutedModel, input_ids: torch.Tensor | None = None,
                     attention_mask: torch.Tensor | None = None, texts: Sequence[str] | None = None,
                     batch_size: int = 32) -> torch.Tensor:
    """Router inputs for a dataset, in batches (one routing pass / embedding batch each)."""
    n = len(texts) if texts is not None and input_ids is None else int(input_ids.shape[0])  # type: ignore[union-attr]
    feats = []
    for i in range(0, n, batch_size):
        ids = None if input_ids is None else input_ids[i:i + batch_size]
        mask = None if attention_mask is None else attention_mask[i:i + batch_size]
        tx = None if texts is None else list(texts[i:i + batch_size])
        feats.append(routed.features(ids, mask, tx).float().cpu())
    return torch.cat(feats) if feats else torch.zeros(0, routed.router.in_dim)


@torch.no_grad()
def lm_loss_matrix(plex: Plex, experts: Sequence[str | None], input_ids: torch.Tensor,
                   attention_mask: torch.Tensor | None = None, *, batch_rows: int = 8) -> torch.Tensor:
    """[N, K] mean next-token loss of each example under each expert (None = base); each chunk of rows is ONE
    expanded mixed batch (rows x experts)."""
    k = len(experts)
    out = []
    for i in range(0, int(input_ids.shape[0]), batch_rows):
        ids = input_ids[i:i + batch_rows]
        mask = None if attention_mask is None else attention_mask[i:i + batch_rows]
        logits = expert_logits(plex, experts, ids, mask)  # [n, K, L, V]
        n = ids.shape[0]
        flat = logits.reshape(n * k, *logits.shape[2:])
        ids_k = ids.repeat_interleave(k, 0)
        mask_k = None if mask is None else mask.repeat_interleave(k, 0)
        out.append(causal_lm_loss(flat, ids_k, mask_k, per_row=True).view(n, k).cpu())
    return torch.cat(out)


def _epoch_metrics(router: Router, logits: torch.Tensor, labels: torch.Tensor | None) -> tuple[float, torch.Tensor,
                                                                                                 float]:
    probs = torch.softmax(logits / router.temperature, -1)
    shares = L.load_shares(probs.argmax(-1), router.n_experts)
    acc = math.nan if labels is None else L.routing_accuracy(probs.argmax(-1).cpu(), labels.cpu())
    return acc, shares, float(L.entropy(probs))


@torch.no_grad()
def evaluate_router(router: Router, features: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, Any]:
    """Routing accuracy (when labels are given), per-expert load share and entropy on ``features``."""
    was = router.training
    router.eval()
    logits = router(features.to(router.feature_mean.device))
    router.train(was)
    acc, shares, ent = _epoch_metrics(router, logits, labels)
    return {"accuracy": acc, "shares": dict(zip(router.experts, shares.tolist())), "entropy": ent,
            "share_entropy": L.share_entropy(shares),
            "problems": L.collapse_problems(shares, router.experts)}


# --------------------------------------------------------------------------------------------- supervised
def train_supervised(router: Router, features: torch.Tensor, labels: torch.Tensor, *,
                     val_features: torch.Tensor | None = None, val_labels: torch.Tensor | None = None,
                     config: RouterTrainConfig | None = None, soft_targets: torch.Tensor | None = None,
                     log: Callable[[EpochLog], None] | None = None) -> RouterTrainResult:
    """Cross-entropy of router logits against ``labels`` [N] (or ``soft_targets`` [N, K]) + auxiliary losses."""
    cfg = config or RouterTrainConfig()
    if features.shape[0] != labels.shape[0]:
        raise LoraplexError(f"{features.shape[0]} feature rows but {labels.shape[0]} labels")
    if features.shape[0] == 0:
        raise LoraplexError("router training needs at least one example")
    dev = router.feature_mean.device
    feats, labs = features.float().to(dev), labels.long().to(dev)
    soft = None if soft_targets is None else soft_targets.float().to(dev)
    if cfg.normalize_features:
        router.fit_normalizer(feats)
    g = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW([p for p in router.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    history: list[EpochLog] = []
    n = feats.shape[0]
    for epoch in range(1, cfg.epochs + 1):
        router.train()
        order = torch.randperm(n, generator=g).to(dev)
        tot = task_tot = aux_tot = 0.0
        for i in range(0, n, cfg.batch_size):
            b = order[i:i + cfg.batch_size]
            x = feats[b]
            logits = router(x)
            routed = router.noisy_logits(x, logits) if (router.noise_std or router.noisy_gating) else logits
            if soft is not None:
                task = -(soft[b] * torch.log_softmax(routed / router.temperature, -1)).sum(-1).mean()
            else:
                task = nn.functional.cross_entropy(routed / router.temperature, labs[b])
            probs = torch.softmax(routed / router.temperature, -1)
            aux = L.aux_loss(logits, probs, load_balance=cfg.load_balance,
                             load_balance_weight=cfg.load_balance_weight, z_loss_weight=cfg.z_loss_weight)
            loss = task + aux
            opt.zero_grad()
            loss.backward()
            opt.step()
            w = len(b) / n
            tot += float(loss.detach()) * w
            task_tot += float(task.detach()) * w
            aux_tot += float(aux.detach()) * w
        history.append(_log_epoch(router, epoch, tot, task_tot, aux_tot, feats, labs, val_features, val_labels, cfg,
                                  log))
    router.eval()
    return RouterTrainResult(history, labels=labels)


def _log_epoch(router: Router, epoch: int, loss: float, task: float, aux: float, feats: torch.Tensor,
               labels: torch.Tensor | None, val_features: torch.Tensor | None, val_labels: torch.Tensor | None,
               cfg: RouterTrainConfig, log: Callable[[EpochLog], None] | None) -> EpochLog:
    m = evaluate_router(router, feats, labels)
    va = None
    if val_features is not None and val_labels is not None and len(val_labels):
        va = evaluate_router(router, val_features, val_labels)["accuracy"]
    shares = torch.tensor(list(m["shares"].values()))
    problems = L.collapse_problems(shares, router.experts, cfg.collapse_factor)
    entry = EpochLog(epoch, loss, task, aux, m["accuracy"], va, {k: round(v, 4) for k, v in m["shares"].items()},
                     m["entropy"], m["share_entropy"], problems)
    if cfg.warn and epoch == cfg.epochs:
        L.warn_collapse(shares, router.experts, cfg.collapse_factor, where="router training")
    if log is not None:
        log(entry)
    return entry


# --------------------------------------------------------------------------------------------- lm loss
def train_lm_loss(router: Router, plex: Plex, features: torch.Tensor, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor | None = None, *, targets: str = "argmin",
                  soft_temperature: float = 0.1, batch_rows: int = 8, task_labels: torch.Tensor | None = None,
                  val_features: torch.Tensor | None = None, val_labels: torch.Tensor | None = None,
                  config: RouterTrainConfig | None = None, log: Callable[[EpochLog], None] | None = None
                  ) -> RouterTrainResult:
    """Adapters frozen: label each example with the expert whose LM loss on it is lowest (one expanded batch per
    chunk), then train the router on those labels (``targets="soft"``: on ``softmax(-loss/T)``)."""
    losses = lm_loss_matrix(plex, router.experts, input_ids, attention_mask, batch_rows=batch_rows)
    best = losses.argmin(-1)
    soft = torch.softmax(-losses / soft_temperature, -1) if targets == "soft" else None
    if targets not in ("argmin", "soft"):
        raise LoraplexError(f"targets must be argmin or soft, got {targets!r}")
    res = train_supervised(router, features, best, val_features=val_features, val_labels=val_labels, config=config,
                           soft_targets=soft, log=log)
    if task_labels is not None:  # how often the LM-loss label agrees with the task label
        res.history[-1].problems = res.history[-1].problems + [
            f"lm-loss labels agree with task labels on {L.routing_accuracy(best, task_labels):.1%} of rows"]
    res.labels, res.loss_matrix = best, losses
    return res


# --------------------------------------------------------------------------------------------- joint
def train_joint(routed: RoutedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                features: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                train_adapters: bool = True, top1_weight: str = "prob", config: RouterTrainConfig | None = None,
                log: Callable[[EpochLog], None] | None = None) -> RouterTrainResult:
    """Router (+ adapters) trained on the LM loss through the mixed-batch pass with grad-carrying weights.

    Rows use the router's mode (top-1 Switch-weighted, top-k renormalised, or soft). ``labels`` (optional) only
    feed the logged routing accuracy. With ``train_adapters`` the adapters' factors are trained too and committed
    to the bank at the end.
    """
    cfg = config or RouterTrainConfig()
    router, plex = routed.router, routed.plex
    feats = compute_features(routed, input_ids, attention_mask) if features is None else features.float()
    if cfg.normalize_features:
        router.fit_normalizer(feats.to(router.feature_mean.device))
    trainable = TrainableAdapters(plex, router.experts) if train_adapters else None
    groups = [{"params": [p for p in router.parameters() if p.requires_grad], "lr": cfg.lr}]
    if trainable is not None:
        groups.append({"params": list(trainable.parameters()), "lr": cfg.adapter_lr})
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    g = torch.Generator().manual_seed(cfg.seed)
    n = int(input_ids.shape[0])
    history: list[EpochLog] = []
    try:
        for epoch in range(1, cfg.epochs + 1):
            router.train()
            order = torch.randperm(n, generator=g)
            tot = task_tot = aux_tot = 0.0
            for i in range(0, n, cfg.batch_size):
                b = order[i:i + cfg.batch_size]
                ids = input_ids[b]
                mask = None if attention_mask is None else attention_mask[b]
                ctx = trainable.active() if trainable is not None else _null()
                with ctx:
                    out, routing = routed.differentiable(ids, mask, features=feats[b], top1_weight=top1_weight)
                    task = causal_lm_loss(out.logits, ids, mask)
                aux = L.aux_loss(routing.logits, routing.probs, load_balance=cfg.load_balance,
                                 load_balance_weight=cfg.load_balance_weight, z_loss_weight=cfg.z_loss_weight)
                loss = task + aux
                opt.zero_grad()
                loss.backward()
                opt.step()
                w = len(b) / n
                tot += float(loss.detach()) * w
                task_tot += float(task.detach()) * w
                aux_tot += float(aux.detach()) * w
            history.append(_log_epoch(router, epoch, tot, task_tot, aux_tot, feats, labels, None, None, cfg, log))
    finally:
        if trainable is not None:
            trainable.commit()
    router.eval()
    return RouterTrainResult(history, labels=labels)


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: Any) -> None:
        return None


# --------------------------------------------------------------------------------------------- one entry point
def feature_dim(plex: Plex, pooling: str = "mean", embedding_model: str | None = None) -> int:
    """Router input size: the base model's hidden size, or the embedding model's."""
    if pooling == "embedding":
        return get_embedder(embedding_model).dim
    if pooling == "ngram":
        return NGRAM_DIM
    cfg = getattr(plex.model, "config", None)
    dim = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None) or getattr(cfg, "d_model", None)
    if dim is None:
        raise LoraplexError("cannot tell the base model's hidden size; build the Router with in_dim=")
    return int(dim)


def new_router(plex: Plex, experts: Sequence[str] | None = None, **settings: Any) -> Router:
    """A fresh :class:`Router` over ``experts`` (default: every adapter of ``plex``) with the right input size."""
    names = list(experts or plex.adapters)
    dim = feature_dim(plex, settings.get("pooling", "mean"), settings.get("embedding_model"))
    return Router(names, dim, **settings)


def fit_router(plex: Plex, router: Router, *, input_ids: torch.Tensor | None = None,
               attention_mask: torch.Tensor | None = None, texts: Sequence[str] | None = None,
               labels: Sequence[str | int] | torch.Tensor | None = None, objective: str = "supervised",
               val: dict[str, Any] | None = None, config: RouterTrainConfig | None = None,
               log: Callable[[EpochLog], None] | None = None, **options: Any) -> RouterTrainResult:
    """Train ``router`` over ``plex``'s adapters with one of :data:`OBJECTIVES`.

    Data: ``input_ids``/``attention_mask`` (needed for lm_loss/joint and hidden-state routers) and/or ``texts``
    (embedding routers); ``labels``: expert names or indices per row (supervised; optional otherwise).
    ``val``: the same keys for held-out rows (routing accuracy is logged on them).
    """
    if objective not in OBJECTIVES:
        raise LoraplexError(f"unknown router objective {objective!r}; expected one of {', '.join(OBJECTIVES)}")
    routed = RoutedModel(plex, router)
    lab = None
    if labels is not None:
        lab = labels.long() if isinstance(labels, torch.Tensor) else label_indices(list(labels), router.experts)
    if objective == "supervised" and lab is None:
        raise LoraplexError("supervised router training needs labels")
    feats = compute_features(routed, input_ids, attention_mask, texts)
    vf = vl = None
    if val:
        vf = compute_features(routed, val.get("input_ids"), val.get("attention_mask"), val.get("texts"))
        if val.get("labels") is not None:
            v = val["labels"]
            vl = v.long() if isinstance(v, torch.Tensor) else label_indices(list(v), router.experts)
    if objective == "supervised":
        return train_supervised(router, feats, lab, val_features=vf, val_labels=vl,  # type: ignore[arg-type]
                                config=config, log=log)
    if input_ids is None:
        raise LoraplexError(f"{objective} router training needs input_ids (it computes the LM loss)")
    if objective == "lm_loss":
        return train_lm_loss(router, plex, feats, input_ids, attention_mask, task_labels=lab, val_features=vf,
                             val_labels=vl, config=config, log=log, **options)
    return train_joint(routed, input_ids, attention_mask, features=feats, labels=lab, config=config, log=log,
                       **options)
