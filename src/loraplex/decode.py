"""One decode step (one new token per row) of a Llama-family causal LM, without the per-step machinery of a
transformers forward.

A decode step on CPU is bound by weight reads plus a fixed cost per operator call; transformers' forward adds
about 40 small calls per layer (mask building, rotary modules, cache bookkeeping, output objects) and loraplex's
wrapped layers resolve the batch plan at every call. :class:`FastDecoder` computes the same step from the same
modules with the plan resolved once (:meth:`FastDecoder.program`, per running batch):

* projections that read the same input (q/k/v, gate/up) run as one quantized kernel call over a fused copy of
  their codes (:func:`loraplex.quant.fuse_outputs`, weights held once), or layer by layer for float bases; the
  kernel is called directly (:meth:`loraplex.quant.QuantizedLinear.kernel_fn`, resolved with the program) on the
  input cast once, and o/down add their outputs and LoRA updates straight into the residual stream;
* with up to :data:`STACKED_MAX_ADAPTERS` distinct adapters in the batch, each group's LoRA is one stacked update
  over the group's whole output (:func:`loraplex.ops.lora_columns`; the stacked factors are kept per group for the
  adapters last served, keyed by slot versions); past it, each target's own mixed-batch kernel adds its update
  into its slice of the output (:class:`loraplex.layers.FrozenUpdate`);
* rotary embedding is applied to queries and keys in one pass; attention is one SDPA call (matmul + softmax +
  matmul from :data:`MATMUL_ATTENTION_ROWS` rows) with the query heads of each KV group packed as query positions
  (grouped-query attention without repeating keys);
* keys and values are written into spare capacity of the same ``DynamicCache`` layers the transformers forward
  fills (:class:`KVAppender`), so prefill (transformers) and decode (here) share one cache and
  :mod:`loraplex.serve.kv`'s batch surgery.

For a hidden state ``h`` [N, d] per layer (as transformers' Llama, Qwen2 and Mistral compute it)::

    a = attn(rope(q(norm1(h))), cache + rope(k(norm1(h))), cache + v(norm1(h)))   # causal over the row's mask
    h = h + o(a);  h = h + down(silu(gate(norm2(h))) * up(norm2(h)))
    logits = lm_head(norm(h))

:func:`supports` says which models qualify (full attention, SiLU MLP, RMSNorm, no q/k norms); a plan that needs
the full layer forward (DoRA rows, training overrides) gets no program, and the caller runs the transformers
forward instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from loraplex import ops
from loraplex.layers import FrozenUpdate, MultiLoraLinear
from loraplex.plan import BatchPlan
from loraplex.quant import QuantizedLinear, fuse_outputs

#: ``config.model_type`` values whose decoder layers have the Llama layout this module computes
MODEL_TYPES = ("llama", "mistral", "qwen2")


def supports(model: nn.Module) -> bool:
    """Whether ``model`` is a Llama-layout causal LM :class:`FastDecoder` computes exactly: model type in
    :data:`MODEL_TYPES`, full attention in every layer, SiLU gated MLP, RMSNorms, no q/k norms, one
    tensor-parallel slice, SDPA or eager attention."""
    config = getattr(model, "config", None)
    inner = getattr(model, "model", None)
    if config is None or inner is None or getattr(config, "model_type", None) not in MODEL_TYPES:
        return False
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and any(t != "full_attention" for t in layer_types):
        return False
    if layer_types is None and getattr(config, "sliding_window", None) is not None:
        return False
    if getattr(config, "hidden_act", None) != "silu" or getattr(config, "pretraining_tp", 1) != 1:
        return False
    if getattr(config, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
        return False
    layers = getattr(inner, "layers", None)
    if layers is None or not hasattr(inner, "rotary_emb") or not hasattr(inner, "norm"):
        return False
    for layer in layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None or hasattr(attn, "q_norm") or hasattr(attn, "k_norm"):
            return False
        if not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "scaling", "head_dim")):
            return False
        if not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
            return False
    return True


def _rms_norm(module: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """``module(h)`` for an RMSNorm (transformers' formula, in float32: ``weight * h / sqrt(mean(h^2) + eps)``), any
    other module called as it is."""
    weight, eps = getattr(module, "weight", None), getattr(module, "variance_epsilon", None)
    if weight is None or eps is None or not type(module).__name__.endswith("RMSNorm"):
        return module(h)
    if h.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(h, (h.shape[-1],), weight, eps)  # [N, d]
    x = h.float()  # [N, d]
    var = x.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()  # [N, 1]
    return weight * (x * var).to(h.dtype)


class KVAppender:
    """Appends decode steps' keys and values to a dynamic cache's layers in spare capacity: each layer's
    ``keys``/``values`` stay views ``buffer[:, :, :L]`` of larger buffers, so a step writes one column instead of
    copying the whole cache (``DynamicLayer.update`` concatenates). A layer whose tensors are no longer the view
    handed out (batch surgery, a transformers forward, another cache) gets a new buffer; growth is geometric, so
    copies cost O(1) per step amortised. Owned by one thread."""

    def __init__(self, min_spare: int = 32) -> None:
        self.min_spare = min_spare
        self._buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer index -> (keys, values) buffers
        self._handed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer index -> the views last handed out

    def clear(self) -> None:
        """Drop the buffers (the batch they served has ended)."""
        self._buffers.clear()
        self._handed.clear()

    def append(self, cache, index: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``index``'s keys and values [N, H, L + 1, D] after appending ``keys``/``values`` [N, H, 1, D]."""
        layer = cache.layers[index]
        if type(layer).__name__ != "DynamicLayer" or not getattr(layer, "is_initialized", False):
            return cache.update(keys, values, index)
        old_k, old_v = layer.keys, layer.values  # [N, H, L, D]
        n, h, length, d = old_k.shape
        buf = self._buffers.get(index)
        handed = self._handed.get(index)
        ours = handed is not None and handed[0] is old_k and handed[1] is old_v  # untouched since the last step
        if buf is None or buf[0].shape[2] <= length or \
                not (ours or (_is_prefix(old_k, buf[0]) and _is_prefix(old_v, buf[1]))):
            cap = length + max(self.min_spare, length // 2)
            buf = (old_k.new_empty(n, h, cap, d), old_v.new_empty(n, h, cap, old_v.shape[-1]))
            buf[0][:, :, :length].copy_(old_k)
            buf[1][:, :, :length].copy_(old_v)
            self._buffers[index] = buf
        buf[0][:, :, length:length + 1].copy_(keys)
        buf[1][:, :, length:length + 1].copy_(values)
        layer.keys, layer.values = buf[0][:, :, :length + 1], buf[1][:, :, :length + 1]
        self._handed[index] = (layer.keys, layer.values)
        return layer.keys, layer.values


def _is_prefix(t: torch.Tensor, buffer: torch.Tensor) -> bool:
    """``t`` is ``buffer[:, :, :L]`` for some L (same storage start, batch, heads and strides)."""
    return (t.data_ptr() == buffer.data_ptr() and t.shape[:2] == buffer.shape[:2] and t.shape[3] == buffer.shape[3]
            and t.stride() == buffer.stride())


@dataclass
class _Group:
    """Projections reading one input: their bases (fused into one layer when possible) and output widths."""

    modules: list[nn.Module]  # as they sit in the model (MultiLoraLinear wrappers or bare layers)
    widths: list[int]
    fused: QuantizedLinear | None
    generic: bool = False  # some module is neither (a module per adapter, ...): each runs its own forward

    def bases(self) -> list[nn.Module]:
        """What computes the group's base outputs: the fused layer, else each module's base layer (a generic
        group's modules themselves, LoRA included)."""
        if self.generic:
            return list(self.modules)
        if self.fused is not None:
            return [self.fused]
        return [m.base if isinstance(m, MultiLoraLinear) else m for m in self.modules]


#: distinct adapters in a batch up to which each projection group's LoRA runs as one stacked update
#: (:func:`loraplex.ops.lora_columns`: every row pays for every adapter's columns); past it, each layer's own
#: mixed-batch kernel (:class:`loraplex.layers.FrozenUpdate`)
STACKED_MAX_ADAPTERS = 8


@dataclass(frozen=True)
class _GroupProgram:
    """A group's work in one step: its base layers (:meth:`_Group.bases`) and the rows' LoRA updates,
    either ``stacked`` (``(a, b, weights)`` for :func:`loraplex.ops.lora_columns` over the group's whole output)
    or per module (``updates``: update, first and last column of the group's output)."""

    bases: list[nn.Module]
    stacked: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None
    updates: tuple[tuple[FrozenUpdate, int, int], ...] = ()
    #: when one packed quantized layer (no bias) computes the group's whole base output: its kernel
    #: (:meth:`QuantizedLinear.kernel_fn`) and compute dtype, so the step casts the input once and calls it directly
    kernel: tuple[Callable[[torch.Tensor], torch.Tensor], torch.dtype] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        b = self.bases[0] if len(self.bases) == 1 else None
        if isinstance(b, QuantizedLinear) and b.kernel != "reference" and b.bias is None:
            object.__setattr__(self, "kernel", (b.kernel_fn(), b.compute_dtype))


def _group_program(group: _Group, plan: BatchPlan, memo: dict[Any, torch.Tensor],
                   stacks: dict[tuple[int, ...], tuple[Any, torch.Tensor, torch.Tensor, list[int]]]
                   ) -> _GroupProgram | None:
    """``group``'s program for ``plan`` (not all-base); ``memo`` shares row weights between groups of one layout,
    ``stacks`` keeps each group's stacked factors for the last set of adapters it served (keyed by the slots and
    their versions), so a batch that changes rows but not adapters reuses them."""
    bases = group.bases()
    if group.generic:
        return _GroupProgram(bases)
    mods = group.modules
    if any(isinstance(m, MultiLoraLinear) and m.needs_forward(plan) for m in mods):
        return None
    slots = [s for s, _, _ in plan.segments.bounds]
    if len(slots) <= STACKED_MAX_ADAPTERS:
        gkey = tuple(id(m) for m in mods)
        key = tuple((s, tuple(m.slot_version[s] if isinstance(m, MultiLoraLinear) else -1 for m in mods))
                    for s in slots)
        kept = stacks.get(gkey)
        if kept is None or kept[0] != key:
            factors = [[m.slot_factors(s) if isinstance(m, MultiLoraLinear) else None for m in mods] for s in slots]
            if not any(f is not None for per in factors for f in per):
                stacks.pop(gkey, None)
                return _GroupProgram(bases)
            kept = (key, *ops.stack_columns(factors, group.widths))
            stacks[gkey] = kept
        _, a, b, cols = kept
        weights = None
        if plan.uniform_slot is None:
            wkey = ("columns", tuple(cols))
            if wkey not in memo:
                index = {s: k for k, s in enumerate(slots)}
                pair_index = torch.tensor([index.get(int(s), -1) for s in plan.pair_slots], dtype=torch.long)
                memo[wkey] = ops.column_weights(plan.pair_rows, pair_index, plan.pair_weights.detach(), cols,
                                                plan.n_rows).to(device=a.device, dtype=a.dtype)  # [N, C]
            weights = memo[wkey]
        return _GroupProgram(bases, stacked=(a, b, weights))
    spans, col = [], 0
    for m, width in zip(mods, group.widths):
        upd = m.frozen_update(plan) if isinstance(m, MultiLoraLinear) else FrozenUpdate()
        if not upd.empty:
            spans.append((upd, col, col + width))
        col += width
    return _GroupProgram(bases, updates=tuple(spans))


def _base_out(prog: _GroupProgram, x: torch.Tensor) -> torch.Tensor:
    """The group's base outputs side by side [N, sum widths] for ``x`` [N, d_in]: in the packed kernel's compute
    dtype when the group has one (:attr:`_GroupProgram.kernel`), else in ``x``'s dtype."""
    if prog.kernel is not None:
        fn, dtype = prog.kernel
        return fn(x.to(dtype).contiguous())  # [N, W]
    if len(prog.bases) == 1:
        return prog.bases[0](x)  # [N, W]
    return torch.cat([b(x) for b in prog.bases], dim=-1)


def _add_lora(prog: _GroupProgram, x: torch.Tensor, out: torch.Tensor) -> None:
    """``out`` [N, W] += the rows' LoRA updates of the group for ``x`` [N, d_in]."""
    if prog.stacked is not None:
        a, b, weights = prog.stacked
        ops.lora_columns(x, a, b, weights, out)
    for upd, c0, c1 in prog.updates:
        upd.add_(x, out[:, c0:c1])


def _project(prog: _GroupProgram, x: torch.Tensor) -> torch.Tensor:
    """The group's outputs side by side [N, sum widths] in ``x``'s dtype, LoRA updates included."""
    y = _base_out(prog, x).to(x.dtype)
    _add_lora(prog, x, y)
    return y


def _project_into(prog: _GroupProgram, x: torch.Tensor, h: torch.Tensor) -> None:
    """``h`` [N, W] += the group's output for ``x`` (a residual branch: the base output is added in its own dtype,
    then the LoRA updates straight into ``h``)."""
    h.add_(_base_out(prog, x))
    _add_lora(prog, x, h)


@dataclass(frozen=True)
class DecodeProgram:
    """Everything one decode step of a fixed batch plan needs, resolved once (:meth:`FastDecoder.program`)."""

    qkv: list[_GroupProgram]  # per layer
    o: list[_GroupProgram]
    gate_up: list[_GroupProgram]
    down: list[_GroupProgram]
    n_rows: int


class FastDecoder:
    """Decode steps of a Llama-layout model (:func:`supports`) over its (wrapped) modules.

    Args:
        model: the causal LM, with loraplex's wrapped layers in place; not modified, except that fused int4/int8
            projections make their members' codes views of the fused codes (same values).
    """

    def __init__(self, model: nn.Module) -> None:
        if not supports(model):
            raise ValueError(f"{type(model).__name__} is not a Llama-layout causal LM the fast decoder computes")
        self.model = model
        inner: Any = model.model
        self.inner = inner  # embed_tokens, norm and lm_head are read at every step: the bank may wrap them
        self.layers = list(inner.layers)
        attn0 = self.layers[0].self_attn
        self.head_dim = int(attn0.head_dim)
        self.n_heads = int(model.config.num_attention_heads)
        self.n_kv = int(getattr(model.config, "num_key_value_heads", None) or self.n_heads)
        self.scaling = float(attn0.scaling)
        self.kv = KVAppender()
        #: per projection group: the stacked LoRA factors of the adapters it last served (one copy of the working set)
        self._stacks: dict[tuple[int, ...], tuple[Any, torch.Tensor, torch.Tensor, list[int]]] = {}
        self._fused: dict[tuple[int, ...], QuantizedLinear | None] = {}  # by the members' ids (bases are kept)
        self.groups: list[tuple[_Group, _Group, _Group, _Group]] = [self._layer_groups(la) for la in self.layers]

    def _layer_groups(self, layer: nn.Module) -> tuple[_Group, _Group, _Group, _Group]:
        a, m = layer.self_attn, layer.mlp
        return (self._group([a.q_proj, a.k_proj, a.v_proj]), self._group([a.o_proj]),
                self._group([m.gate_proj, m.up_proj]), self._group([m.down_proj]))

    def _group(self, modules: list[nn.Module]) -> _Group:
        bases = [m.base if isinstance(m, MultiLoraLinear) else m for m in modules]
        if not all(isinstance(b, (nn.Linear, QuantizedLinear)) for b in bases):
            return _Group(modules, [], None, generic=True)
        widths = [int(b.out_features) for b in bases]  # type: ignore[arg-type]
        fused = None
        if all(isinstance(b, QuantizedLinear) for b in bases):
            key = tuple(id(b) for b in bases)
            if key not in self._fused:
                self._fused[key] = fuse_outputs(bases)  # type: ignore[arg-type]
            fused = self._fused[key]
        return _Group(modules, widths, fused)

    def _current_groups(self) -> list[tuple[_Group, _Group, _Group, _Group]]:
        """The groups over the model's modules as they are now (the bank wraps targets as adapters arrive)."""
        for i, layer in enumerate(self.layers):
            a, m = layer.self_attn, layer.mlp
            now = (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj)
            g = self.groups[i]
            if any(x is not y for x, y in zip(now, [*g[0].modules, *g[1].modules, *g[2].modules, *g[3].modules])):
                self.groups[i] = self._layer_groups(layer)
                self._stacks.clear()  # keyed by module ids: none may outlive the modules it was built from
        return self.groups

    def program(self, plan: BatchPlan | None, n_rows: int) -> DecodeProgram | None:
        """The step program for ``plan`` (None: no adapter anywhere) over ``n_rows`` rows, or None when a layer
        needs its full forward for this plan."""
        if plan is not None and plan.n_rows != n_rows:
            return None
        base = plan is None or plan.all_base
        progs: list[list[_GroupProgram]] = [[], [], [], []]
        memo: dict[Any, torch.Tensor] = {}
        for groups in self._current_groups():
            for k, g in enumerate(groups):
                p = (_GroupProgram(g.bases()) if base
                     else _group_program(g, plan, memo, self._stacks))  # type: ignore[arg-type]
                if p is None:
                    return None
                progs[k].append(p)
        return DecodeProgram(*progs, n_rows=n_rows)

    @torch.no_grad()
    def step(self, prog: DecodeProgram, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor,
             cache: Any) -> torch.Tensor:
        """Logits [N, V] (float32) of the next token for ``ids`` [N, 1], appending keys and values to ``cache``.

        ``mask`` [N, L] is the attention mask including the new token (1 = real, left padding 0), ``pos`` [N, 1]
        the new token's position ids; ``cache`` a ``DynamicCache`` holding L - 1 positions per layer.
        """
        n = ids.shape[0]
        hd, nh, nkv = self.head_dim, self.n_heads, self.n_kv
        inner = self.inner
        h = inner.embed_tokens(ids).reshape(n, -1).clone()  # [N, d], the residual stream, updated in place
        cos, sin = inner.rotary_emb(h, pos)  # [N, 1, hd] each
        half = hd // 2
        # rotate_half(v) = [-v2, v1] = roll(v, half) * [-1.., 1..]: the sign goes into sin once per step
        sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)  # [N, 1, hd]
        attend = None if bool(mask.all()) else mask.bool()[:, None, None, :]  # [N, 1, 1, L]; no padding: None
        for i, layer in enumerate(self.layers):
            x = _rms_norm(layer.input_layernorm, h)
            qkv = _project(prog.qkv[i], x)  # [N, (nh + 2 nkv) hd]
            qk = qkv[:, :(nh + nkv) * hd].view(n, nh + nkv, hd)  # [N, nh + nkv, hd]
            qk = torch.addcmul(qk * cos, qk.roll(half, dims=-1), sin)  # rope: v cos + rotate_half(v) sin
            q = qk[:, :nh].reshape(n, nkv, nh // nkv, hd)  # [N, nkv, group, hd]: a group's heads as positions
            k = qk[:, nh:].unsqueeze(2)  # [N, nkv, 1, hd]
            v = qkv[:, (nh + nkv) * hd:].view(n, nkv, 1, hd)  # [N, nkv, 1, hd]
            keys, values = self.kv.append(cache, i, k, v)  # [N, nkv, L, hd] each
            a = _attention(q, keys, values, attend, self.scaling)  # [N, nkv, group, hd]
            _project_into(prog.o[i], a.reshape(n, nh * hd), h)
            x = _rms_norm(layer.post_attention_layernorm, h)
            gu = _project(prog.gate_up[i], x)  # [N, 2 d_ff], owned here
            d_ff = gu.shape[-1] // 2
            _project_into(prog.down[i], F.silu(gu[:, :d_ff], inplace=True).mul_(gu[:, d_ff:]), h)  # [N, d_ff]
        return self.model.get_output_embeddings()(_rms_norm(inner.norm, h)).float()  # [N, V]


#: rows from which attention runs as matmul + softmax + matmul instead of one SDPA call: the CPU SDPA kernel
#: measured ~2x slower for 16 rows of one query group each (3 heads x 64, 16-96 keys), faster for 1 row
MATMUL_ATTENTION_ROWS = 4


def _attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, attend: torch.Tensor | None,
               scale: float) -> torch.Tensor:
    """softmax(q k^T * scale, masked where ``attend`` is False) v for ``q`` [N, H, g, D], ``keys``/``values``
    [N, H, L, D], ``attend`` [N, 1, 1, L] bool or None (every position)."""
    if q.shape[0] < MATMUL_ATTENTION_ROWS:
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=attend, scale=scale)
    scores = torch.matmul(q, keys.transpose(-1, -2)).mul_(scale)  # [N, H, g, L]
    if attend is not None:
        scores.masked_fill_(attend.logical_not(), float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), values)  # [N, H, g, D]

