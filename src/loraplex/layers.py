"""The wrapped target layers: every row of a batch adds its own adapters' updates to the base layer's output.

* :class:`MultiLoraLinear` -- a Linear / GPT-2 Conv1D / Embedding with stacked LoRA slots, ``y = W x + sum_(slot, w)
  in row w * s_slot * B_slot A_slot x`` per row, rescaled per output feature for DoRA rows (the kernels are in
  :mod:`loraplex.ops`).
* :class:`SavedModuleSwitch` -- a ``modules_to_save`` module with one copy per adapter.

Both read the calling thread's :class:`~loraplex.plan.BatchPlan` (and training overrides) from a shared
:class:`~loraplex.plan.PlanState`; slots are written by :class:`~loraplex.adapters.bank.AdapterBank` only.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from loraplex import ops
from loraplex.errors import LoraplexError
from loraplex.modules import WrappedModule, adapted_dims, base_weight, dict_key, module_dtype_device
from loraplex.plan import BatchPlan, PlanState


class MultiLoraLinear(WrappedModule):
    """A Linear / GPT-2 Conv1D / Embedding plus stacked LoRA slots; each batch row adds its own slots' updates.

    ``y = g_row * (W x + sum_(slot, w) in row w * s_slot * B_slot A_slot x) + bias`` where ``g_row`` [d_out] is the
    DoRA factor ``m / ||W + s B A||`` of the row's DoRA adapter (kept per slot, :attr:`dora_gain`) and 1 for rows
    without one. An Embedding is the linear map of a one-hot token: ``A`` is [r, num_embeddings], ``B`` [dim, r]
    (PEFT's ``lora_embedding_A`` / ``lora_embedding_B``), ``x A^T`` a gather of ``A``'s columns at the token ids.
    A DoRA adapter is applied alone with weight 1 in its row: a blend or stack with it is refused
    (:class:`~loraplex.errors.LoraplexError`), as DoRA rescales the whole weight rather than adding a delta.

    Args:
        base: the module wrapped (Linear, Conv1D, Embedding, or a quantized Linear with ``dequantize()``).
        module_name: its dotted path in the model (errors and per-layer training overrides use it).
        state: the plan state shared by the model's wrapped layers.
        n_slots: slot count (slot 0 is the all-zero "no adapter" slot).
        r_max: initial max rank (grows when a larger adapter is put in a slot).
    """

    def __init__(self, base: nn.Module, module_name: str, state: PlanState, n_slots: int, r_max: int) -> None:
        super().__init__()
        dims = adapted_dims(base)
        if dims is None:
            raise LoraplexError(f"module {module_name!r} is a {type(base).__name__}, not a Linear/Conv1D/Embedding")
        self.base = base
        self.module_name = module_name
        self.state = state
        self.d_in, self.d_out = dims
        self.embedding = isinstance(base, nn.Embedding)
        dtype, device = module_dtype_device(base)  # a quantized base: its activation dtype
        w = torch.empty(0, dtype=dtype, device=device)
        self.lora_A = nn.Parameter(w.new_zeros(n_slots, r_max, self.d_in), requires_grad=False)  # [S, r, d_in]
        self.lora_B = nn.Parameter(w.new_zeros(n_slots, self.d_out, r_max), requires_grad=False)  # [S, d_out, r]
        self.register_buffer("lora_scale", w.new_zeros(n_slots, dtype=torch.float32), persistent=False)  # [S]
        self.register_buffer("dora_gain", w.new_ones(n_slots, self.d_out, dtype=dtype), persistent=False)  # [S, d_out]
        self.slot_rank: list[int] = [0] * n_slots
        self.slot_dora: list[bool] = [False] * n_slots  # the slot holds a DoRA adapter (its gain is not all ones)
        self.slot_version: list[int] = [0] * n_slots  # bumped by every write of the slot (copies of it go stale)
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
        old_a, old_b, old_s, old_g = self.lora_A.data, self.lora_B.data, self.lora_scale, self.dora_gain
        s0, r0 = old_a.shape[0], old_a.shape[1]
        a = old_a.new_zeros(n_slots, r_max, self.d_in)
        b = old_b.new_zeros(n_slots, self.d_out, r_max)
        a[:s0, :r0] = old_a
        b[:s0, :, :r0] = old_b
        scale = old_s.new_zeros(n_slots)
        scale[:s0] = old_s
        gain = old_g.new_ones(n_slots, self.d_out)
        gain[:s0] = old_g
        self.lora_A = nn.Parameter(a, requires_grad=self.lora_A.requires_grad)
        self.lora_B = nn.Parameter(b, requires_grad=self.lora_B.requires_grad)
        self.lora_scale = scale
        self.dora_gain = gain
        self.slot_rank = self.slot_rank + [0] * (n_slots - len(self.slot_rank))
        self.slot_dora = self.slot_dora + [False] * (n_slots - len(self.slot_dora))
        self.slot_version = self.slot_version + [0] * (n_slots - len(self.slot_version))

    @torch.no_grad()
    def set_slot(self, slot: int, A: torch.Tensor | None, B: torch.Tensor | None, scaling: float,
                 magnitude: torch.Tensor | None = None) -> None:
        """Write one adapter's factors into ``slot`` (``A`` None clears it); ``magnitude`` [d_out] makes it a DoRA
        slot, whose gain ``m / ||W + s B A||`` is computed here, once."""
        self.slot_version[slot] += 1
        if A is None:
            if self.slot_rank[slot] or self.slot_dora[slot]:
                self.lora_A.data[slot].zero_()
                self.lora_B.data[slot].zero_()
                self.lora_scale[slot] = 0.0
                self.dora_gain[slot].fill_(1.0)
                self.slot_rank[slot] = 0
                self.slot_dora[slot] = False
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
        if magnitude is None:
            self.dora_gain[slot].fill_(1.0)
            self.slot_dora[slot] = False
        else:
            g = ops.dora_scale(base_weight(self.base), A.to(self.lora_A.device), B.to(self.lora_A.device), scaling,
                               magnitude.to(device=self.lora_A.device, dtype=torch.float32))  # [d_out]
            self.dora_gain[slot].copy_(g)
            self.slot_dora[slot] = True

    def slot_factors(self, slot: int) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """(A [r, d_in], B [d_out, r], scaling) currently in ``slot`` (views of the stacks); None when the slot does
        not adapt this layer (rank 0). ``slot_version[slot]`` changes whenever they do."""
        r = self.slot_rank[slot]
        if r == 0:
            return None
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

    # ---------------------------------------------------------------- DoRA
    def gains(self) -> torch.Tensor:
        """The DoRA gain of every slot this thread computes with, [S, d_out]: the frozen per-slot gains, with the
        slots whose magnitude the training overrides carry recomputed from the (differentiable) stacks."""
        ov = self.state.overrides
        mags = ov.magnitudes.get(self.module_name) if ov is not None else None
        if not mags:
            return self.dora_gain
        A, B = self.stacks()
        W = base_weight(self.base)
        rows = [ops.dora_scale(W, A[s], B[s], self.lora_scale[s], mags[s]).to(self.dora_gain.dtype) if s in mags
                else self.dora_gain[s] for s in range(self.dora_gain.shape[0])]
        return torch.stack(rows)  # [S, d_out]

    def row_gain(self, plan: BatchPlan) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """DoRA factors of ``plan``'s rows for :func:`ops.dora_rescale`: (gain, shift) with gain [d_out] when every
        row uses one slot, else [N, 1, d_out] (ones for rows without DoRA), shift ``(1 - gain) * bias`` (None without
        a bias); None when no row of the plan uses a DoRA slot of this layer. Frozen gains are computed once per
        plan (they are fixed while it holds its slots), trained ones at every call."""
        ov = self.state.overrides
        trained = ov is not None and bool(ov.magnitudes.get(self.module_name))
        cached = ("dora_gain", self.module_name)
        if not trained and cached in plan.memo:
            return plan.memo[cached]
        dora = frozenset(s for s, _, _ in plan.segments.bounds if self.slot_dora[s])
        out: tuple[torch.Tensor, torch.Tensor | None] | None = None
        if dora:
            gains = self.gains()  # [S, d_out]
            if plan.uniform_slot is not None:
                gain = gains[plan.uniform_slot]  # [d_out]
            else:
                key = ("dora_rows", dora)
                if key not in plan.memo:
                    plan.memo[key] = dora_row_slots(plan, dora, self.module_name)
                gain = gains.index_select(0, plan.memo[key])[:, None, :]  # [N, 1, d_out]
            out = gain, ops.dora_shift(gain, getattr(self.base, "bias", None))
        if not trained:
            plan.memo[cached] = out
        return out

    # ---------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        y = self.base(x, *args, **kwargs)
        plan = self.state.plan_for(x.shape[0], self.module_name) if x.dim() >= 2 else None
        if plan is None or plan.all_base:
            return y
        if self.embedding:
            return self._embedding_forward(x, y, plan)
        x3 = x.reshape(x.shape[0], -1, x.shape[-1])  # [N, L, d_in]
        y3 = y.reshape(y.shape[0], -1, y.shape[-1])  # [N, L, d_out] (a view)
        A, B = self.stacks()
        ov = self.state.overrides  # LoRA dropout: only inside a training step of this thread
        dropped = False
        if ov is not None and ov.row_dropout is not None and ov.row_dropout.shape[0] == x3.shape[0]:
            keep = (1 - ov.row_dropout).to(x3.dtype)[:, None, None]  # [N, 1, 1]
            x3 = x3 * (torch.rand_like(x3) < keep).to(x3.dtype) / keep.clamp_min(1e-12)
            dropped = True
        elif ov is not None and ov.dropout > 0:
            x3 = nn.functional.dropout(x3, ov.dropout, training=True)
            dropped = True
        x3 = x3.to(A.dtype)
        dora = self.row_gain(plan)
        inplace = y3 if not torch.is_grad_enabled() and not (dropped and dora is not None) else None
        upd = self._update(x3, plan, A, B, inplace)  # y3 itself (updated in place), an update, or None
        if dora is None:
            if upd is None or upd is y3:
                return y
            return y + upd.reshape(y.shape).to(y.dtype)
        gain, shift = dora
        if not dropped:  # g * (W x + s B A x) + bias
            total = y3 if upd is None or upd is y3 else y3 + upd.to(y.dtype)
            return ops.dora_rescale(total, gain.to(y.dtype), None if shift is None else shift.to(y.dtype)
                                    ).reshape(y.shape)
        # PEFT's DoRA under LoRA dropout: W x + bias + (g - 1) * W x_d + g * s B A x_d (x_d the dropped input)
        lora = upd.to(y.dtype) if upd is not None else torch.zeros_like(y3)
        base_d = nn.functional.linear(x3.to(y.dtype), base_weight(self.base).to(y.dtype))  # [N, L, d_out]
        return (y3 + lora + (gain.to(y.dtype) - 1) * (base_d + lora)).reshape(y.shape)

    def _update(self, x3: torch.Tensor, plan: BatchPlan, A: torch.Tensor, B: torch.Tensor,
                inplace: torch.Tensor | None) -> torch.Tensor | None:
        """The rows' LoRA updates [N, L, d_out] for ``x3`` [N, L, d_in]: added into ``inplace`` (and it returned)
        when given, else a new tensor; None when the plan's one slot has rank 0."""
        if plan.uniform_slot is not None:
            slot = plan.uniform_slot
            r = self.slot_rank[slot]
            if r == 0:
                return None
            return ops.lora_single(x3, A[slot, :r], B[slot, :, :r], self.lora_scale[slot], out=inplace)
        return ops.lora_mixed(x3, A, B, self.lora_scale, plan.segments, self.kernel, out=inplace,
                              ranks=self.slot_rank)

    def _embedding_forward(self, ids: torch.Tensor, y: torch.Tensor, plan: BatchPlan) -> torch.Tensor:
        """Embedding rows: ``g_row * (E[ids] + s A[:, ids]^T B^T)`` (times the base's ``embed_scale`` when it has
        one, as PEFT does; LoRA dropout does not apply to embeddings, as in PEFT)."""
        ids2 = ids.reshape(ids.shape[0], -1)  # [N, L]
        y3 = y.reshape(y.shape[0], -1, y.shape[-1])  # [N, L, dim] (a view)
        A, B = self.stacks()
        embed_scale = getattr(self.base, "embed_scale", None)
        inplace = y3 if not torch.is_grad_enabled() and embed_scale is None else None
        if plan.uniform_slot is not None:
            slot = plan.uniform_slot
            r = self.slot_rank[slot]
            upd = None if r == 0 else ops.lora_embedding_single(ids2, A[slot, :r], B[slot, :, :r],
                                                                 self.lora_scale[slot], out=inplace)
        else:
            upd = ops.lora_embedding(ids2, A, B, self.lora_scale, plan.segments, out=inplace)
        if upd is not None and upd is not y3:
            if embed_scale is not None:
                upd = upd * torch.as_tensor(embed_scale, dtype=upd.dtype, device=upd.device)
            y3 = y3 + upd.to(y.dtype)
        dora = self.row_gain(plan)
        if dora is not None:
            y3 = ops.dora_rescale(y3, dora[0].to(y3.dtype))
        return y3.reshape(y.shape)

    def needs_forward(self, plan: BatchPlan) -> bool:
        """Whether ``plan`` needs this layer's full :meth:`forward` rather than a precomputed update (a DoRA row,
        an embedding layer, or this thread's training overrides)."""
        return self.embedding or self.state.overrides is not None or self.row_gain(plan) is not None

    def frozen_update(self, plan: BatchPlan) -> "FrozenUpdate":
        """This layer's LoRA update for ``plan``'s decode steps (one token per row, not :meth:`needs_forward`),
        resolved once: the slot stacks, segments and kernel choice :meth:`FrozenUpdate.add_` uses, or an empty update
        when no row has an adapter. Valid while the plan holds its slots (slot contents are fixed then)."""
        if plan.all_base:
            return FrozenUpdate()
        seg = plan.segments
        kernel = self.kernel if self.kernel != "auto" else ops.choose_kernel(seg, 1)
        return FrozenUpdate(stacks=(self.lora_A, self.lora_B, self.lora_scale), segments=seg, kernel=kernel,
                            ranks=list(self.slot_rank))

    def extra_repr(self) -> str:
        return f"{self.module_name}: slots={self.lora_A.shape[0]}, r_max={self.r_max}"


@dataclass(frozen=True)
class FrozenUpdate:
    """One layer's LoRA update for a fixed plan without autograd (:meth:`MultiLoraLinear.frozen_update`): the slot
    ``stacks`` (A [S, r_max, d_in], B [S, d_out, r_max], scale [S]) through :mod:`loraplex.ops`' ``kernel`` on
    ``segments``; without stacks, no update."""

    stacks: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    segments: ops.Segments | None = None
    kernel: str = "sgmv"
    ranks: list[int] | None = None

    @property
    def empty(self) -> bool:
        return self.stacks is None

    def add_(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """Add the rows' updates into ``out`` [N, d_out] (in place; it may be a column slice) for ``x`` [N, d_in],
        one token per row."""
        if self.stacks is None or self.segments is None:
            return
        A, B, scale = self.stacks
        x3, out3 = x.to(A.dtype).unsqueeze(1), out.unsqueeze(1)  # [N, 1, d_in], [N, 1, d_out] (views)
        res = ops.lora_mixed(x3, A, B, scale, self.segments, self.kernel, out=out3, ranks=self.ranks)
        if res is not out3:
            out.copy_(res.squeeze(1))


def dora_row_slots(plan: BatchPlan, dora: frozenset[int], module_name: str) -> torch.Tensor:
    """[N] long on the plan's device: each row's DoRA slot (0 for rows without one).

    A row with a DoRA adapter must use it alone with weight 1 (:class:`LoraplexError` naming the adapter
    otherwise): DoRA rescales the whole weight ``W + s B A`` per output feature, so a weighted blend or stack with it
    is not a sum of low-rank updates."""
    row_slot = [0] * plan.n_rows
    pos = 0  # pairs are the rows' entries in order (BatchPlan.build)
    slots, weights = plan.pair_slots.tolist(), plan.pair_weights.tolist()
    for i, row in enumerate(plan.rows):
        used = [(name, slots[pos + j], weights[pos + j]) for j, (name, _) in enumerate(row)]
        pos += len(row)
        used = [(n, s, w) for n, s, w in used if w != 0 and s != 0]
        dora_names = [n for n, s, _ in used if s in dora]
        if not dora_names:
            continue
        if len(used) > 1 or used[0][2] != 1:
            raise LoraplexError(
                f"row {i} asks for {row!r}: DoRA adapter {dora_names[0]!r} (module {module_name!r}) cannot be "
                f"blended, stacked or weighted; DoRA rescales the whole weight W + s*B*A per output feature, so a "
                f"weighted mix with it is not a sum of low-rank updates. Use a DoRA adapter alone, with weight 1")
        row_slot[i] = used[0][1]
    return torch.tensor(row_slot, dtype=torch.long).to(plan.device)


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
