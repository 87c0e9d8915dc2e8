"""Wrapped target layers and the per-forward batch plan they share.

A :class:`BatchPlan` says, for each row of the batch, which adapter slots it uses with which weights. It is
computed once per forward (host side) and read by every wrapped layer through one shared :class:`PlanState`.
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from loraplex import ops
from loraplex.adapters.io import module_dims
from loraplex.errors import LoraplexError

RowSpec = list[tuple[str, float]]  # one row: [(adapter name, weight), ...]; [] means base model only


@dataclass
class BatchPlan:
    """Per-row adapter slots and weights for one forward (or one ``generate``)."""

    n_rows: int
    rows: list[RowSpec]  # names and weights, row by row
    pair_rows: torch.Tensor  # [P] long (host)
    pair_slots: torch.Tensor  # [P] long (host)
    pair_weights: torch.Tensor  # [P] float (host)
    device: torch.device
    segments: ops.Segments
    uniform_slot: int | None  # every row uses this one slot with weight 1
    _cache: dict[Any, Any] = field(default_factory=dict)

    @classmethod
    def build(cls, rows: list[RowSpec], slot_of: dict[str, int], device: torch.device) -> "BatchPlan":
        """Plan for ``rows`` given the adapters' device slots."""
        pr, ps, pw = [], [], []
        for i, row in enumerate(rows):
            for name, w in row:
                pr.append(i)
                ps.append(slot_of[name])
                pw.append(float(w))
        pair_rows = torch.tensor(pr, dtype=torch.long)
        pair_slots = torch.tensor(ps, dtype=torch.long)
        pair_weights = torch.tensor(pw, dtype=torch.float32)
        seg = ops.make_segments(pair_rows, pair_slots, pair_weights, len(rows), device)
        uniform = None
        if seg.identity and len(seg.bounds) == 1:
            uniform = seg.bounds[0][0]
        return cls(len(rows), rows, pair_rows, pair_slots, pair_weights, torch.device(device), seg, uniform)

    @property
    def all_base(self) -> bool:
        return not self.segments.bounds

    def expanded(self, factor: int) -> "BatchPlan":
        """The plan with each row repeated ``factor`` times in place (beam search, num_return_sequences)."""
        if factor == 1:
            return self
        key = ("expand", factor)
        if key not in self._cache:
            rows = [r for r in self.rows for _ in range(factor)]
            slot_of = {n: int(s) for n, s in zip(
                [n for row in self.rows for n, _ in row], self.pair_slots.tolist())}
            self._cache[key] = BatchPlan.build(rows, slot_of, self.device)
        return self._cache[key]

    def owners(self, adapters_with_module: frozenset[str]) -> list[str | None]:
        """Per row, the first adapter of the row that has its own copy of a ``modules_to_save`` module."""
        key = ("owners", adapters_with_module)
        if key not in self._cache:
            out: list[str | None] = []
            for row in self.rows:
                owner = next((n for n, w in row if n in adapters_with_module and w != 0), None)
                out.append(owner)
            self._cache[key] = out
        return self._cache[key]


class PlanState:
    """The plan of the forward in progress, shared by every wrapped layer of one model (per thread)."""

    def __init__(self) -> None:
        self._local = threading.local()

    @property
    def plan(self) -> BatchPlan | None:
        return getattr(self._local, "plan", None)

    @plan.setter
    def plan(self, value: BatchPlan | None) -> None:
        self._local.plan = value


def _plan_for(state: PlanState, n: int, module_name: str) -> BatchPlan | None:
    plan = state.plan
    if plan is None or plan.n_rows == n:
        return plan
    if n % plan.n_rows == 0:
        return plan.expanded(n // plan.n_rows)
    raise LoraplexError(f"module {module_name!r} got a batch of {n} rows but the adapter plan has "
                        f"{plan.n_rows} rows (one adapter entry per input row is needed)")


class MultiLoraLinear(nn.Module):
    """A Linear / GPT-2 Conv1D plus stacked LoRA slots; each batch row adds its own slots' updates."""

    def __init__(self, base: nn.Module, module_name: str, state: PlanState, n_slots: int, r_max: int) -> None:
        super().__init__()
        dims = module_dims(base)
        if dims is None:
            raise LoraplexError(f"module {module_name!r} is a {type(base).__name__}, not a Linear/Conv1D")
        self.base = base
        self.module_name = module_name
        self.state = state
        self.d_in, self.d_out = dims
        w = base.weight
        self.lora_A = nn.Parameter(w.new_zeros(n_slots, r_max, self.d_in), requires_grad=False)  # [S, r, d_in]
        self.lora_B = nn.Parameter(w.new_zeros(n_slots, self.d_out, r_max), requires_grad=False)  # [S, d_out, r]
        self.register_buffer("lora_scale", w.new_zeros(n_slots, dtype=torch.float32), persistent=False)  # [S]
        self.slot_rank: list[int] = [0] * n_slots
        self.dropout = 0.0
        self.kernel: str = "auto"  # "auto" | "sgmv" | "bgmv" | "segbmm" (tests and benchmarks force one)
        # trainers: differentiable (A [S, r_max, d_in], B [S, d_out, r_max]) stacks used instead of lora_A/lora_B,
        # and per-row LoRA dropout probabilities [N] used (in training mode) instead of ``dropout``
        self.train_stacks: tuple[torch.Tensor, torch.Tensor] | None = None
        self.row_dropout: torch.Tensor | None = None

    # ---------------------------------------------------------------- slot writes (bank only)
    @property
    def r_max(self) -> int:
        return int(self.lora_A.shape[1])

    def grow(self, n_slots: int | None = None, r_max: int | None = None) -> None:
        """Reallocate the stacks with more slots and/or a larger max rank (zero padded, exact)."""
        n_slots = n_slots or self.lora_A.shape[0]
        r_max = max(r_max or 0, self.r_max)
        if n_slots == self.lora_A.shape[0] and r_max == self.r_max:
            return
        old_a, old_b, old_s = self.lora_A.data, self.lora_B.data, self.lora_scale
        s0, r0 = old_a.shape[0], old_a.shape[1]
        a = old_a.new_zeros(n_slots, r_max, self.d_in)
        b = old_b.new_zeros(n_slots, self.d_out, r_max)
        a[:s0, :r0] = old_a
        b[:s0, :, :r0] = old_b
        scale = old_s.new_zeros(n_slots)
        scale[:s0] = old_s
        self.lora_A = nn.Parameter(a, requires_grad=self.lora_A.requires_grad)
        self.lora_B = nn.Parameter(b, requires_grad=self.lora_B.requires_grad)
        self.lora_scale = scale
        self.slot_rank = self.slot_rank + [0] * (n_slots - len(self.slot_rank))

    @torch.no_grad()
    def set_slot(self, slot: int, A: torch.Tensor | None, B: torch.Tensor | None, scaling: float) -> None:
        """Write one adapter's factors into ``slot`` (``A`` None clears it)."""
        if A is None:
            if self.slot_rank[slot]:
                self.lora_A.data[slot].zero_()
                self.lora_B.data[slot].zero_()
                self.lora_scale[slot] = 0.0
                self.slot_rank[slot] = 0
            return
        r = int(A.shape[0])
        if r > self.r_max:
            self.grow(r_max=r)
        self.lora_A.data[slot].zero_()
        self.lora_B.data[slot].zero_()
        self.lora_A.data[slot, :r].copy_(A, non_blocking=True)
        self.lora_B.data[slot, :, :r].copy_(B, non_blocking=True)
        self.lora_scale[slot] = float(scaling)
        self.slot_rank[slot] = r

    def slot_factors(self, slot: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A [r, d_in], B [d_out, r], scaling) currently in ``slot``."""
        r = self.slot_rank[slot]
        return self.lora_A[slot, :r], self.lora_B[slot, :, :r], float(self.lora_scale[slot])

    # ---------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        y = self.base(x, *args, **kwargs)
        plan = _plan_for(self.state, x.shape[0], self.module_name) if x.dim() >= 2 else None
        if plan is None or plan.all_base:
            return y
        x3 = x.reshape(x.shape[0], -1, x.shape[-1])  # [N, L, d_in]
        y3 = y.reshape(y.shape[0], -1, y.shape[-1])  # [N, L, d_out] (a view)
        A, B = self.train_stacks if self.train_stacks is not None else (self.lora_A, self.lora_B)
        if self.training and self.row_dropout is not None and self.row_dropout.shape[0] == x3.shape[0]:
            keep = (1 - self.row_dropout).to(x3.dtype)[:, None, None]  # [N, 1, 1]
            x3 = x3 * (torch.rand_like(x3) < keep).to(x3.dtype) / keep.clamp_min(1e-12)
        elif self.training and self.dropout > 0:
            x3 = nn.functional.dropout(x3, self.dropout, training=True)
        x3 = x3.to(A.dtype)
        if plan.uniform_slot is not None:
            slot = plan.uniform_slot
            r = self.slot_rank[slot]
            if r == 0:
                return y
            out = ops.lora_single(x3, A[slot, :r], B[slot, :, :r], self.lora_scale[slot],
                                  out=y3 if not torch.is_grad_enabled() else None)
        else:
            seg = plan.segments
            kernel = self.kernel
            if kernel == "auto":
                kernel = ops.choose_kernel(seg, x3.shape[1])
            inplace = y3 if not torch.is_grad_enabled() else None
            if kernel == "bgmv":
                out = ops.lora_bgmv(x3, A, B, self.lora_scale, seg, out=inplace)
            elif kernel == "segbmm":
                out = ops.lora_segbmm(x3, A, B, self.lora_scale, seg, out=inplace)
            else:
                out = ops.lora_sgmv(x3, A, B, self.lora_scale, seg, out=inplace, ranks=self.slot_rank)
        if out is y3:
            return y
        return y + out.reshape(y.shape).to(y.dtype)

    def extra_repr(self) -> str:
        return f"{self.module_name}: slots={self.lora_A.shape[0]}, r_max={self.r_max}"


class SavedModuleSwitch(nn.Module):
    """A ``modules_to_save`` module with one copy per adapter; each row runs its adapter's copy (or the base).

    When copies have different output sizes (heads with different label counts) the rows' outputs are padded on
    the last dimension with ``-inf`` up to the largest size.
    """

    def __init__(self, base: nn.Module, module_name: str, state: PlanState) -> None:
        super().__init__()
        self.base = base
        self.module_name = module_name
        self.state = state
        self.copies = nn.ModuleDict()
        self._names: frozenset[str] = frozenset()

    def set_copy(self, adapter: str, state_dict: dict[str, torch.Tensor] | None) -> None:
        """Install (or with None remove) ``adapter``'s copy of this module."""
        key = _key(adapter)
        if state_dict is None:
            if key in self.copies:
                del self.copies[key]
            self._names = frozenset(n for n in self._names if n != adapter)
            return
        mod = copy.deepcopy(self.base)
        for pname, t in state_dict.items():
            owner, _, leaf = pname.rpartition(".")
            sub = mod.get_submodule(owner) if owner else mod
            old = getattr(sub, leaf)
            new = t.to(device=old.device, dtype=old.dtype)
            if isinstance(old, nn.Parameter):
                setattr(sub, leaf, nn.Parameter(new.clone(), requires_grad=old.requires_grad))
            else:
                setattr(sub, leaf, new.clone())
            if isinstance(sub, nn.Linear):
                sub.out_features, sub.in_features = sub.weight.shape
        self.copies[key] = mod
        self._names = self._names | {adapter}

    def copy_for(self, adapter: str) -> nn.Module | None:
        return self.copies[_key(adapter)] if _key(adapter) in self.copies else None

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        plan = _plan_for(self.state, x.shape[0], self.module_name) if self._names else None
        if plan is None:
            return self.base(x, *args, **kwargs)
        owners = plan.owners(self._names)
        first = owners[0]
        if all(o == first for o in owners):
            mod = self.copies[_key(first)] if first is not None else self.base
            return mod(x, *args, **kwargs)
        groups: dict[str | None, list[int]] = {}
        for i, o in enumerate(owners):
            groups.setdefault(o, []).append(i)
        outs = []
        for o, idx in groups.items():
            mod = self.copies[_key(o)] if o is not None else self.base
            rows = torch.tensor(idx, device=x.device)
            outs.append((rows, mod(x.index_select(0, rows), *args, **kwargs)))
        width = max(o.shape[-1] for _, o in outs)
        sample = outs[0][1]
        result = sample.new_full((x.shape[0], *sample.shape[1:-1], width), float("-inf"))
        for rows, o in outs:
            if o.shape[-1] < width:
                o = nn.functional.pad(o, (0, width - o.shape[-1]), value=float("-inf"))
            result = result.index_copy(0, rows, o)
        return result


def _key(adapter: str | None) -> str:
    """ModuleDict-safe key for an adapter name."""
    return "a_" + "".join(c if c.isalnum() or c == "_" else f"_{ord(c):x}_" for c in str(adapter))


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted path ``name``."""
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, new)
