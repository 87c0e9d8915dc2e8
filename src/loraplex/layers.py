"""The wrapped target layers: every row of a batch adds its own adapters' updates to the base layer's output.

* :class:`MultiLoraLinear` -- a Linear / GPT-2 Conv1D with stacked LoRA slots, ``y = W x + sum_(slot, w) in row
  w * s_slot * B_slot A_slot x`` per row (the kernels are in :mod:`loraplex.ops`).
* :class:`SavedModuleSwitch` -- a ``modules_to_save`` module with one copy per adapter.

Both read the calling thread's :class:`~loraplex.plan.BatchPlan` (and training overrides) from a shared
:class:`~loraplex.plan.PlanState`; slots are written by :class:`~loraplex.adapters.bank.AdapterBank` only.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from loraplex import ops
from loraplex.errors import LoraplexError
from loraplex.modules import WrappedModule, dict_key, module_dims, module_dtype_device
from loraplex.plan import PlanState


class MultiLoraLinear(WrappedModule):
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
        dtype, device = module_dtype_device(base)  # a quantized base: its activation dtype
        w = torch.empty(0, dtype=dtype, device=device)
        self.lora_A = nn.Parameter(w.new_zeros(n_slots, r_max, self.d_in), requires_grad=False)  # [S, r, d_in]
        self.lora_B = nn.Parameter(w.new_zeros(n_slots, self.d_out, r_max), requires_grad=False)  # [S, d_out, r]
        self.register_buffer("lora_scale", w.new_zeros(n_slots, dtype=torch.float32), persistent=False)  # [S]
        self.slot_rank: list[int] = [0] * n_slots
        self.kernel: str = "auto"  # "auto" | "sgmv" | "bgmv" | "segbmm" (tests and benchmarks force one)

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

    def stacks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The slot stacks this thread computes with: (A [S, r_max, d_in], B [S, d_out, r_max]), the training
        overrides' differentiable stacks when the thread has some for this layer, else the frozen slots."""
        ov = self.state.overrides
        if ov is not None:
            own = ov.stacks.get(self.module_name)
            if own is not None:
                return own
        return self.lora_A, self.lora_B

    # ---------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        y = self.base(x, *args, **kwargs)
        plan = self.state.plan_for(x.shape[0], self.module_name) if x.dim() >= 2 else None
        if plan is None or plan.all_base:
            return y
        x3 = x.reshape(x.shape[0], -1, x.shape[-1])  # [N, L, d_in]
        y3 = y.reshape(y.shape[0], -1, y.shape[-1])  # [N, L, d_out] (a view)
        A, B = self.stacks()
        ov = self.state.overrides  # LoRA dropout: only inside a training step of this thread
        if ov is not None and ov.row_dropout is not None and ov.row_dropout.shape[0] == x3.shape[0]:
            keep = (1 - ov.row_dropout).to(x3.dtype)[:, None, None]  # [N, 1, 1]
            x3 = x3 * (torch.rand_like(x3) < keep).to(x3.dtype) / keep.clamp_min(1e-12)
        elif ov is not None and ov.dropout > 0:
            x3 = nn.functional.dropout(x3, ov.dropout, training=True)
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


class SavedModuleSwitch(WrappedModule):
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
        key = dict_key(adapter)
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
        return self.copies[dict_key(adapter)] if dict_key(adapter) in self.copies else None

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        plan = self.state.plan_for(x.shape[0], self.module_name) if self._names else None
        if plan is None:
            return self.base(x, *args, **kwargs)
        owners = plan.owners(self._names)
        first = owners[0]
        if all(o == first for o in owners):
            mod = self.copies[dict_key(first)] if first is not None else self.base
            return mod(x, *args, **kwargs)
        groups: dict[str | None, list[int]] = {}
        for i, o in enumerate(owners):
            groups.setdefault(o, []).append(i)
        outs = []
        for o, idx in groups.items():
            mod = self.copies[dict_key(o)] if o is not None else self.base
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
