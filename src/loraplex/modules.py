"""Target modules of a base model: their dims and base weight, replacing one by path, and the model seen through its
wrappers."""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import nn

from loraplex.quant import QuantizedLinear


class WrappedModule(nn.Module):
    """A module that stands in for a base module (``self.base``); :class:`UnwrappedView` sees the base instead."""

    base: nn.Module


def module_dims(module: nn.Module) -> tuple[int, int] | None:
    """(d_in, d_out) of a Linear, GPT-2 Conv1D or quantized Linear, else None."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, (nn.Linear, QuantizedLinear)):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return int(module.weight.shape[0]), int(module.nf)
    return None


def adapted_dims(module: nn.Module) -> tuple[int, int] | None:
    """(d_in, d_out) of a module loraplex puts LoRA on: a Linear or GPT-2 Conv1D (:func:`module_dims`), or an
    ``nn.Embedding`` seen as the linear map of a one-hot token (d_in = num_embeddings, d_out = embedding_dim, as
    PEFT's ``lora_embedding_A`` [r, num_embeddings] and ``lora_embedding_B`` [embedding_dim, r] say); else None."""
    if isinstance(module, nn.Embedding):
        return int(module.num_embeddings), int(module.embedding_dim)
    return module_dims(module)


def base_weight(module: nn.Module) -> torch.Tensor:
    """The weight of a Linear / Conv1D / Embedding as a [d_out, d_in] matrix (a view where possible).

    A Conv1D stores [d_in, d_out] and an Embedding [num_embeddings, dim]: both are transposed. A
    :class:`~loraplex.quant.QuantizedLinear` gives its dequantized [d_out, d_in] weight.
    """
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, QuantizedLinear):
        return module.dequantize()
    if isinstance(module, (Conv1D, nn.Embedding)):
        return module.weight.t()  # [d_out, d_in]
    return module.weight  # [d_out, d_in]


def module_dtype_device(module: nn.Module) -> tuple[torch.dtype, torch.device]:
    """The activation dtype and the device of a Linear / Conv1D / quantized Linear (its adapters live there)."""
    if isinstance(module, QuantizedLinear):
        return module.dtype, module.device
    return module.weight.dtype, module.weight.device


def stores_transposed(module: nn.Module) -> bool:
    """Whether the layer is (or was, before quantization) a GPT-2 Conv1D: PEFT's ``fan_in_fan_out``."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D) or (isinstance(module, QuantizedLinear) and module.fan_in_fan_out)


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted path ``name``."""
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, new)


def dict_key(name: str | None) -> str:
    """An ``nn.ModuleDict``-safe key for an adapter name (one per name, no collisions)."""
    return "a_" + "".join(c if c.isalnum() or c == "_" else f"_{ord(c):x}_" for c in str(name))


class UnwrappedView(nn.Module):
    """A read-only view of a model where wrapped modules look like their base modules (for validation).

    ``table``: a (name, module) list of the view's ``named_modules()`` computed earlier, reused while the model's
    wrapping does not change (None: walk the model each time).
    """

    def __init__(self, model: nn.Module, table: list[tuple[str, nn.Module]] | None = None) -> None:
        super().__init__()
        object.__setattr__(self, "_m", model)
        object.__setattr__(self, "_table", table)

    def named_modules(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, nn.Module]]:  # type: ignore[override]
        if self._table is not None and not args and not kwargs:
            yield from self._table
            return
        inside: str | None = None  # a wrapper's own children (its base's) come right after it, depth first
        for name, mod in self._m.named_modules(*args, **kwargs):
            if inside is not None and name.startswith(inside):
                continue
            if isinstance(mod, WrappedModule):
                inside = name + "."
                yield name, mod.base
            else:
                inside = None
                yield name, mod

    def get_output_embeddings(self) -> nn.Module | None:
        f = getattr(self._m, "get_output_embeddings", None)
        return f() if callable(f) else None

    def __getattr__(self, item: str) -> Any:
        return getattr(object.__getattribute__(self, "_m"), item)
