"""Multi-task encoder: one encoder pass, per-row LoRA adapters, per-adapter task heads (sequence or token labels).

Module paths match ``BertForSequenceClassification`` / ``BertForTokenClassification`` (``bert.*``, ``classifier``),
so a head saved as PEFT ``modules_to_save=["classifier"]`` loads both here and in PEFT.
An adapter's task and label names live in ``loraplex_meta.json`` (``{"task": ..., "labels": [...]}``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from loraplex.api import Plex
from loraplex.errors import AdapterError, LoraplexError
from loraplex.modules import dict_key
from loraplex.plan import PlanState

#: Tasks an adapter's head can do (``loraplex_meta.json`` ``task``).
HEAD_TASKS = ("classification", "token_classification")
HEAD_MODULE = "classifier"


@dataclass
class TaskInfo:
    """What an adapter's head predicts."""

    task: str
    labels: list[str]

    @classmethod
    def from_meta(cls, meta: dict[str, Any], adapter: str) -> "TaskInfo":
        task = meta.get("task")
        if task not in HEAD_TASKS:
            raise AdapterError(f"adapter {adapter!r}: loraplex_meta.json 'task' must be one of {HEAD_TASKS}, "
                               f"got {task!r}")
        labels = meta.get("labels")
        if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
            raise AdapterError(f"adapter {adapter!r}: loraplex_meta.json 'labels' must be a non-empty list of strings")
        return cls(task, list(labels))


@dataclass
class MultiTaskOutput:
    """Encoder states for every row, plus each row's head logits (None for rows without a head)."""

    last_hidden_state: torch.Tensor  # [N, L, H]
    pooler_output: torch.Tensor | None  # [N, H]
    logits: list[torch.Tensor | None]  # per row: [num_labels] or [L, num_labels]
    heads: list[str | None]  # per row: the adapter whose head produced the logits
    embeddings: torch.Tensor = field(default=None)  # type: ignore[assignment]  # [N, H] mean-pooled, normalised


class HeadBank(nn.Module):
    """Per-adapter ``classifier`` heads (Linear H -> num_labels)."""

    def __init__(self) -> None:
        super().__init__()
        self.heads = nn.ModuleDict()

    def forward(self, *_: Any) -> torch.Tensor:  # pragma: no cover - heads are called by MultiTaskEncoder
        raise LoraplexError("HeadBank is applied per row by MultiTaskEncoder")


class MultiTaskEncoder(nn.Module):
    """A transformers encoder plus per-adapter heads; rows of one batch may belong to different tasks."""

    def __init__(self, encoder: nn.Module, dropout: float | None = None) -> None:
        super().__init__()
        self.base_model_prefix = getattr(encoder, "base_model_prefix", "bert") or "bert"
        setattr(self, self.base_model_prefix, encoder)
        self.config = encoder.config
        p = dropout if dropout is not None else getattr(encoder.config, "hidden_dropout_prob", 0.1)
        self.dropout = nn.Dropout(p)
        self.classifier = HeadBank()
        self.tasks: dict[str, TaskInfo] = {}
        self._state: PlanState | None = None  # the Plex's plan state, set by attach()

    @property
    def encoder_model(self) -> nn.Module:
        return getattr(self, self.base_model_prefix)

    def attach(self, plan_state: PlanState) -> None:
        """Read each row's adapter from ``plan_state`` (the Plex's :attr:`~loraplex.api.Plex.plan_state`), so the
        heads answer for the right adapter."""
        self._state = plan_state

    # -------------------------------------------------------------- bank hooks
    def loraplex_install_saved(self, adapter: Any, module: str, state_dict: dict[str, torch.Tensor]) -> None:
        """Install ``adapter``'s ``classifier`` head (called by the adapter bank on register)."""
        if module != HEAD_MODULE:
            raise AdapterError(f"adapter {adapter.name!r}: modules_to_save {module!r} is not supported by the "
                               f"multi-task encoder (only {HEAD_MODULE!r})")
        info = TaskInfo.from_meta(adapter.meta, adapter.name)
        w, b = state_dict.get("weight"), state_dict.get("bias")
        hidden = self.config.hidden_size
        if w is None or w.dim() != 2 or w.shape[1] != hidden:
            raise AdapterError(f"adapter {adapter.name!r}: classifier.weight must be [num_labels, {hidden}], "
                               f"got {None if w is None else tuple(w.shape)}")
        if w.shape[0] != len(info.labels):
            raise AdapterError(f"adapter {adapter.name!r}: head has {w.shape[0]} outputs but loraplex_meta.json "
                               f"lists {len(info.labels)} labels")
        ref = next(self.encoder_model.parameters())
        head = nn.Linear(hidden, w.shape[0], bias=b is not None).to(ref.device, ref.dtype)
        with torch.no_grad():
            head.weight.copy_(w)
            if b is not None:
                head.bias.copy_(b)
        head.requires_grad_(False)
        self.classifier.heads[dict_key(adapter.name)] = head
        self.tasks[adapter.name] = info

    def loraplex_remove_saved(self, adapter: str) -> None:
        if dict_key(adapter) in self.classifier.heads:
            del self.classifier.heads[dict_key(adapter)]
        self.tasks.pop(adapter, None)

    def head(self, adapter: str) -> nn.Linear:
        if dict_key(adapter) not in self.classifier.heads:
            raise AdapterError(f"adapter {adapter!r} has no task head")
        return self.classifier.heads[dict_key(adapter)]  # type: ignore[return-value]

    # -------------------------------------------------------------- forward
    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, **kwargs: Any) -> MultiTaskOutput:
        out = self.encoder_model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                                 **kwargs)
        seq = out.last_hidden_state  # [N, L, H]
        pooled = getattr(out, "pooler_output", None)  # [N, H]
        n = seq.shape[0]
        plan = self._state.plan if self._state is not None else None
        owners: list[str | None] = [None] * n
        if plan is not None:
            owners = plan.owners(frozenset(self.tasks))
        logits: list[torch.Tensor | None] = [None] * n
        groups: dict[str, list[int]] = {}
        for i, o in enumerate(owners):
            if o is not None:
                groups.setdefault(o, []).append(i)
        for name, rows in groups.items():
            idx = torch.tensor(rows, device=seq.device)
            info = self.tasks[name]
            if info.task == "classification":
                if pooled is None:
                    raise LoraplexError("sequence classification needs the encoder's pooler output")
                lg = self.head(name)(self.dropout(pooled.index_select(0, idx)))  # [n_g, labels]
            else:
                lg = self.head(name)(self.dropout(seq.index_select(0, idx)))  # [n_g, L, labels]
            for j, r in enumerate(rows):
                logits[r] = lg[j]
        mask = attention_mask if attention_mask is not None else torch.ones(seq.shape[:2], device=seq.device)
        m = mask.unsqueeze(-1).to(seq.dtype)
        emb = (seq * m).sum(1) / m.sum(1).clamp_min(1e-9)  # [N, H] mean over real tokens
        emb = nn.functional.normalize(emb, dim=-1)
        return MultiTaskOutput(seq, pooled, logits, owners, emb)


def load_encoder_plex(base: Any, adapters: dict[str, Any] | None = None, **kw: Any) -> Plex:
    """A :class:`~loraplex.api.Plex` over a :class:`MultiTaskEncoder` built on ``base`` (model or folder)."""
    from transformers import AutoModel, AutoTokenizer

    tok = kw.pop("tokenizer", None)
    if isinstance(base, nn.Module):
        enc = base
    else:
        enc = AutoModel.from_pretrained(str(base))
        if tok is None:
            tok = AutoTokenizer.from_pretrained(str(base))
    model = MultiTaskEncoder(enc)
    device = kw.pop("device", None)
    if device is not None:
        model.to(device)
    plex = Plex(model, tok, **kw)
    model.attach(plex.plan_state)
    for name, src in (adapters or {}).items():
        plex.add_adapter(name, src)
    return plex
