"""Batch surgery on a left-padded KV cache: keep some rows, append rows, drop all-padding columns.

Layout: every row is ``[padding..., prompt..., generated...]`` with padding only on the left, so a row's
position ids are ``cumsum(mask) - 1`` and a new token sits at ``mask.sum() - 1`` (as in HF ``generate``).
Keys are cached after rotary embedding, so padding columns can be added or removed on the left freely.

Works on :class:`transformers.DynamicCache` whose layers are plain ``DynamicLayer`` (full attention); for other
caches (sliding window, quantized, recurrent) :func:`supports_surgery` is False and the engine falls back to
running one batch to completion before admitting the next.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def new_cache(model: torch.nn.Module):
    """An empty dynamic cache for ``model``."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # older signature
        return DynamicCache()


def supports_surgery(cache) -> bool:
    """True when every layer is a plain full-attention ``DynamicLayer`` holding [B, H, L, D] keys/values."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    return layers is not None and all(type(layer) is DynamicLayer for layer in layers)


def _layers(cache):
    return [layer for layer in cache.layers if getattr(layer, "is_initialized", False) and layer.keys.numel()]


def select_rows(cache, mask: torch.Tensor, keep: list[int]) -> torch.Tensor:
    """Keep batch rows ``keep`` (in that order) of ``cache`` in place; the matching mask rows."""
    idx = torch.tensor(keep, dtype=torch.long, device=mask.device)
    for layer in _layers(cache):
        layer.keys = layer.keys.index_select(0, idx.to(layer.keys.device))
        layer.values = layer.values.index_select(0, idx.to(layer.values.device))
    return mask.index_select(0, idx)


def trim_left(cache, mask: torch.Tensor) -> torch.Tensor:
    """Drop leading columns that are padding in every row (after rows left the batch)."""
    real = mask.any(dim=0)
    if bool(real[0]):
        return mask
    first = int(real.to(torch.int8).argmax())  # first column with a real token somewhere
    for layer in _layers(cache):
        layer.keys = layer.keys[:, :, first:]
        layer.values = layer.values[:, :, first:]
    return mask[:, first:]


def concat_rows(cache, mask: torch.Tensor, other, other_mask: torch.Tensor) -> torch.Tensor:
    """Append ``other``'s rows to ``cache`` (in place), left-padding the shorter one; the joint mask."""
    la, lb = mask.shape[1], other_mask.shape[1]
    length = max(la, lb)
    mine, theirs = _layers(cache), _layers(other)
    if len(mine) != len(theirs):
        raise RuntimeError("caches with different numbers of layers cannot be joined")
    for a, b in zip(mine, theirs):
        a.keys = torch.cat([_pad_left(a.keys, length), _pad_left(b.keys, length)], dim=0)
        a.values = torch.cat([_pad_left(a.values, length), _pad_left(b.values, length)], dim=0)
    return torch.cat([_pad_mask(mask, length), _pad_mask(other_mask, length)], dim=0)


def _pad_left(t: torch.Tensor, length: int) -> torch.Tensor:
    extra = length - t.shape[-2]
    return t if extra == 0 else F.pad(t, (0, 0, extra, 0))


def _pad_mask(m: torch.Tensor, length: int) -> torch.Tensor:
    extra = length - m.shape[1]
    return m if extra == 0 else F.pad(m, (extra, 0))


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """HF ``generate``'s position ids for a left-padded mask: ``cumsum - 1``, padding set to 1."""
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 1)
