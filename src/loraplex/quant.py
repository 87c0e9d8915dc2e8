"""Weight-only quantized base layers: int8 per output channel and int4 group-wise, on PyTorch's own CPU kernels.

A :class:`QuantizedLinear` stands in for an ``nn.Linear`` (or a GPT-2 ``Conv1D``) of the base model *before*
loraplex wraps targets in :class:`~loraplex.layers.MultiLoraLinear`; the wrapper calls it as its base layer and
adds every row's LoRA update on top in the activation dtype, so mixed batches run exactly as over a float base.

Schemes (W is [out, in], x is [..., in]):

* ``int8``: symmetric per output channel, ``W[o, :] ~ s[o] * q[o, :]``, ``q`` in [-127, 127],
  ``s[o] = max|W[o, :]| / 127``. Kernel: ``aten._weight_int8pack_mm(x, q [out, in], s [out])``.
* ``int4``: asymmetric per group of ``group_size`` input features, ``W[o, g*G + j] ~ (q - 8) * s[o, g] + z[o, g]``
  with ``q`` in [0, 15], ``s = (max - min) / 15``, ``z = min + 8 s`` (the affine form of llama.cpp's Q4_1: ``min +
  q s``). Kernel: ``aten._weight_int4pack_mm_for_cpu(x, packed, G, sz [in/G, out, 2])`` on the layout made by
  ``aten._convert_weight_to_int4pack_for_cpu``; it needs ``out % 16 == 0``, ``G`` in {32, 64, 128, 256} and
  ``in % G == 0``. On CUDA (compute capability >= 8.0) the same codes and scales run on
  ``aten._weight_int4pack_mm`` (the tinygemm kernel) over ``aten._convert_weight_to_int4pack``'s layout (``out % 8
  == 0``, ``in`` a multiple of 32); each layer checks the kernel against its dequantized weight on a probe input
  when it is built and takes the reference path if the kernel is missing or disagrees.

The kernels are vectorised for bfloat16 activations only (the CPU's float32 variants measure 10-40x slower than
a float32 ``F.linear`` on this machine), so the kernel path casts the layer's input to bfloat16 and its output
back: the scales are stored in bfloat16 and the quantization grid is computed against those rounded scales, so
:meth:`QuantizedLinear.dequantize` returns exactly the weights the kernel multiplies by. Shapes a kernel does
not take, int8 off the CPU, and other devices run the *reference* path ``F.linear(x, dequantize())`` in the
activation dtype (:attr:`QuantizedLinear.kernel` says which; :func:`quantize_model` logs the fallbacks). Packed
codes belong to their device: a layer quantized on the CPU and moved to CUDA raises a clear error when called.
Neither kernel has a derivative: a custom autograd function gives ``dL/dx = dL/dy @ W`` with the dequantized
weight, so LoRA adapters train over a quantized base (QLoRA-style); the quantized weights never get gradients.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.errors import LoraplexError

__all__ = ["BITS", "INT4_GROUP_SIZES", "QuantizedLinear", "cuda_int4_inner_k_tiles", "dequantize_int4",
           "dequantize_int8", "fuse_outputs", "int4_kernel_fits", "kernel_for", "quantize_int4", "quantize_int8",
           "quantize_model", "quantized_modules", "scheme_of", "weight_bytes"]

log = logging.getLogger(__name__)

#: the schemes by name and their bits per weight (codes only)
BITS: dict[str, int] = {"int8": 8, "int4": 4}
#: group sizes the CPU int4 kernel takes
INT4_GROUP_SIZES: tuple[int, ...] = (32, 64, 128, 256)


def scheme_of(value: str | int | None) -> str | None:
    """``"int8"`` / ``"int4"`` / None from a scheme name or a bit count (8, 4, "8", "int8", None)."""
    if value is None or value is False:
        return None
    text = str(value).strip().lower()
    for name, bits in BITS.items():
        if text in (name, str(bits)):
            return name
    if text in ("", "none", "fp32", "float32", "no"):
        return None
    raise ValueError(f"quantize must be 'int8' (8 bits), 'int4' (4 bits) or None, got {value!r}")


# ---------------------------------------------------------------------- pure tensor functions
def quantize_int8(w: torch.Tensor, scale_dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-channel int8 codes of ``w`` [out, in]: (q int8 [out, in], s [out] in ``scale_dtype``) with
    ``w ~ q * s[:, None]``; ``q`` is rounded against the stored (rounded) scale."""
    w = w.detach().float()
    s = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12).to(scale_dtype)  # [out]
    q = (w / s.float()[:, None]).round_().clamp_(-127, 127).to(torch.int8).contiguous()  # [out, in]
    return q, s


def dequantize_int8(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q * s[:, None]`` in ``dtype`` ([out, in])."""
    return (q.to(torch.float32) * s.to(torch.float32)[:, None]).to(dtype)


def quantize_int4(w: torch.Tensor, group_size: int, scale_dtype: torch.dtype = torch.bfloat16
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric group-wise int4 codes of ``w`` [out, in] (``in % group_size == 0``): (q uint8 [out, in] in
    [0, 15], s [out, in/G], z [out, in/G], both in ``scale_dtype``) with ``w ~ (q - 8) * s + z`` per group."""
    out_f, in_f = w.shape
    if group_size <= 0 or in_f % group_size:
        raise ValueError(f"int4 group_size {group_size} must divide in_features {in_f}")
    wg = w.detach().float().reshape(out_f, in_f // group_size, group_size)  # [out, n_groups, G]
    lo, hi = torch.aminmax(wg, dim=-1)  # [out, n_groups]
    s = ((hi - lo) / 15.0).clamp_min(1e-12).to(scale_dtype)
    z = (lo + 8.0 * s.float()).to(scale_dtype)
    q = (wg - z.float()[..., None]).div_(s.float()[..., None]).add_(8.0).round_().clamp_(0, 15)
    return q.to(torch.uint8).reshape(out_f, in_f), s, z


def dequantize_int4(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor, group_size: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(q - 8) * s + z`` per group of ``group_size`` input features, in ``dtype`` ([out, in])."""
    out_f, in_f = q.shape
    qg = q.to(torch.float32).reshape(out_f, in_f // group_size, group_size)  # [out, n_groups, G]
    w = (qg - 8.0) * s.to(torch.float32)[..., None] + z.to(torch.float32)[..., None]
    return w.reshape(out_f, in_f).to(dtype)


def int4_kernel_fits(out_features: int, in_features: int, group_size: int) -> bool:
    """Whether the CPU int4 kernel takes this shape."""
    return group_size in INT4_GROUP_SIZES and in_features % group_size == 0 and out_features % 16 == 0


def cuda_int4_inner_k_tiles(out_features: int, in_features: int, group_size: int) -> int | None:
    """The CUDA int4 kernel's ``innerKTiles`` for this shape (8, 4 or 2: the largest with ``in % (16 * tiles)
    == 0``), or None when the kernel does not take it (``out % 8``, group sizes as on the CPU)."""
    if group_size not in INT4_GROUP_SIZES or in_features % group_size or out_features % 8:
        return None
    return next((t for t in (8, 4, 2) if in_features % (16 * t) == 0), None)


#: the device type each packed kernel's layout belongs to
_KERNEL_DEVICE = {"int8pack": "cpu", "int4pack": "cpu", "int4pack-cuda": "cuda"}


def kernel_for(scheme: str, device: torch.device, out_f: int, in_f: int, group: int | None) -> str:
    """The kernel a layer of this scheme, shape and device runs: ``int8pack`` / ``int4pack`` (CPU),
    ``int4pack-cuda`` (CUDA, subject to a probe check at construction), else ``reference``."""
    if device.type == "cpu":
        if scheme == "int8":
            return "int8pack"
        return "int4pack" if int4_kernel_fits(out_f, in_f, int(group)) else "reference"
    if device.type == "cuda" and scheme == "int4" and cuda_int4_inner_k_tiles(out_f, in_f, int(group)):
        return "int4pack-cuda"
    return "reference"


def _cuda_int4_kernel(w: torch.Tensor, q: torch.Tensor, s: torch.Tensor, z: torch.Tensor, group: int
                      ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(packed codes, scales_zeros [in/G, out, 2]) for the CUDA int4 kernel (``aten._weight_int4pack_mm``,
    bfloat16, compute capability >= 8.0) from ``q`` [out, in] / ``s``, ``z`` [out, in/G] on ``w``'s CUDA device, or
    None when the kernel is unavailable or its output on a probe input disagrees with the dequantized weight (the
    caller then runs the reference path)."""
    out_f, in_f = q.shape
    tiles = cuda_int4_inner_k_tiles(out_f, in_f, group)
    if tiles is None or torch.cuda.get_device_capability(w.device) < (8, 0):
        return None
    try:
        nibbles = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8).contiguous()  # [out, in/2], even k high
        packed = torch.ops.aten._convert_weight_to_int4pack(nibbles, tiles)
        sz = torch.stack([s, z], dim=-1).transpose(0, 1).contiguous()  # [in/G, out, 2]
        gen = torch.Generator(device=w.device).manual_seed(0)
        x = torch.randn(4, in_f, device=w.device, dtype=torch.bfloat16, generator=gen)  # [4, in]
        got = torch.ops.aten._weight_int4pack_mm(x, packed, group, sz).float()  # [4, out]
        ref = x.float() @ dequantize_int4(q, s, z, group).t()  # [4, out]
    except RuntimeError as exc:
        log.debug("int4 CUDA kernel unavailable for [%dx%d]: %s", out_f, in_f, exc)
        return None
    if (got - ref).abs().max() > 2 ** -6 * ref.abs().max() + 1e-3:
        log.debug("int4 CUDA kernel disagrees with the dequantized weight on a probe input for [%dx%d]", out_f, in_f)
        return None
    return packed, sz


def _int4_group_for(in_features: int, group_size: int) -> int:
    """``group_size`` if it divides ``in_features``, else the largest smaller kernel group size that does, else the
    largest divisor of ``in_features`` not above ``group_size`` (the reference path takes any)."""
    if in_features % group_size == 0:
        return group_size
    for g in sorted(INT4_GROUP_SIZES, reverse=True):
        if g < group_size and in_features % g == 0:
            return g
    return max(d for d in range(1, min(group_size, in_features) + 1) if in_features % d == 0)


# ---------------------------------------------------------------------- autograd over the kernels
class _QuantMatmul(torch.autograd.Function):
    """``y = x @ W^T`` on the layer's kernel; ``dL/dx = dL/dy @ W`` with the dequantized weight."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: "QuantizedLinear") -> torch.Tensor:  # x [M, in] -> [M, out]
        ctx.layer = layer
        return layer.matmul(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # grad [M, out] -> [M, in]
        w = ctx.layer.dequantize(grad.dtype)  # [out, in]
        return grad @ w, None


class QuantizedLinear(nn.Module):
    """A frozen Linear with weight-only quantized weights: ``y = x W^T + b``, W from int8 or int4 codes.

    Attributes: ``in_features``, ``out_features``, ``scheme`` ("int8" | "int4"), ``group_size`` (int4),
    ``kernel`` ("int8pack" | "int4pack" on the CPU, "int4pack-cuda" | "reference"), ``compute_dtype`` (what the
    kernel multiplies in),
    ``dtype`` (the original weight's dtype: activations and LoRA adapters stay in it) and ``fan_in_fan_out``
    (True when it replaced a GPT-2 Conv1D, whose PEFT adapters say so).

    Build with :meth:`from_module`. The codes are buffers (in the state dict, moved by ``.to(device)``); they are
    never trained.
    """

    def __init__(self, in_features: int, out_features: int, scheme: str, *, group_size: int | None,
                 kernel: str, dtype: torch.dtype, compute_dtype: torch.dtype, fan_in_fan_out: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.scheme, self.group_size, self.kernel = scheme, group_size, kernel
        self.dtype, self.compute_dtype, self.fan_in_fan_out = dtype, compute_dtype, fan_in_fan_out
        self.bias: nn.Parameter | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_module(cls, module: nn.Module, scheme: str, *, group_size: int = 32) -> "QuantizedLinear":
        """The quantized replacement of an ``nn.Linear`` or GPT-2 ``Conv1D`` (its weight and bias copied)."""
        from transformers.pytorch_utils import Conv1D

        if isinstance(module, nn.Linear):
            w, conv = module.weight, False  # [out, in]
        elif isinstance(module, Conv1D):
            w, conv = module.weight.t(), True  # Conv1D stores [in, out]
        else:
            raise TypeError(f"cannot quantize a {type(module).__name__}: only nn.Linear and Conv1D")
        scheme = scheme_of(scheme) or ""
        if scheme not in BITS:
            raise ValueError(f"unknown quantization scheme {scheme!r}")
        out_f, in_f = w.shape
        group = _int4_group_for(in_f, group_size) if scheme == "int4" else None
        kernel = kernel_for(scheme, w.device, out_f, in_f, group)
        compute = torch.bfloat16 if kernel != "reference" else w.dtype
        layer = cls(in_f, out_f, scheme, group_size=group, kernel=kernel, dtype=w.dtype, compute_dtype=compute,
                    fan_in_fan_out=conv)
        with torch.no_grad():
            if scheme == "int8":
                q, s = quantize_int8(w, compute)
                layer.register_buffer("qweight", q.to(w.device))  # [out, in] int8
                layer.register_buffer("scales", s.to(w.device))  # [out]
            else:
                q, s, z = quantize_int4(w, int(group), compute)  # q [out, in] uint8; s, z [out, in/G]
                cuda = _cuda_int4_kernel(w, q, s, z, int(group)) if kernel == "int4pack-cuda" else None
                if kernel == "int4pack-cuda" and cuda is None:  # unavailable or wrong here: the reference path
                    layer.kernel, layer.compute_dtype = "reference", w.dtype
                    q, s, z = quantize_int4(w, int(group), w.dtype)
                if kernel == "int4pack":
                    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 2)
                    layer.register_buffer("qweight", packed)  # kernel layout, [out, in/2] uint8
                    layer.register_buffer("scales_zeros", torch.stack([s, z], dim=-1).transpose(0, 1).contiguous())
                    # [in/G, out, 2]
                elif cuda is not None:
                    layer.register_buffer("qweight", cuda[0])  # the CUDA kernel's layout (int32)
                    layer.register_buffer("scales_zeros", cuda[1])  # [in/G, out, 2]
                else:
                    layer.register_buffer("qweight", q.to(w.device))  # [out, in] uint8 codes
                    layer.register_buffer("scales", s.to(w.device))  # [out, in/G]
                    layer.register_buffer("zeros", z.to(w.device))  # [out, in/G]
            bias = getattr(module, "bias", None)
            if bias is not None:
                layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return layer

    # ------------------------------------------------------------------ reading the weights
    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @torch.no_grad()
    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight this layer multiplies by, [out, in] in ``dtype`` (default: the original weight's dtype)."""
        dtype = dtype or self.dtype
        if self.scheme == "int8":
            return dequantize_int8(self.qweight, self.scales, dtype)
        if self.kernel == "reference":
            return dequantize_int4(self.qweight, self.scales, self.zeros, int(self.group_size), dtype)
        q = self.int4_codes()
        s, z = self.scales_zeros.unbind(-1)  # [in/G, out] each
        return dequantize_int4(q, s.t(), z.t(), int(self.group_size), dtype)

    @torch.no_grad()
    def int4_codes(self) -> torch.Tensor:
        """The int4 codes [out, in] (uint8 in [0, 15]).

        On the kernel path the packed layout is private to ATen, so the codes are read back through the kernel
        itself: ``x = I`` gives ``W^T`` in bfloat16, and each entry is rounded to its group's grid,
        ``q = round((w - z) / s + 8)``, exact because the bfloat16 error of ``w`` (< 2^-8 |w|) stays below ``s/2``.
        """
        if self.scheme != "int4":
            raise ValueError("int4_codes: this layer is int8")
        if self.kernel == "reference":
            return self.qweight
        g = int(self.group_size)
        s, z = (t.t().float() for t in self.scales_zeros.unbind(-1))  # [out, in/G]
        out = torch.empty(self.out_features, self.in_features, dtype=torch.uint8, device=self.device)
        step = 256
        for k0 in range(0, self.in_features, step):  # identity rows k0..k1 -> columns k0..k1 of W
            k1 = min(k0 + step, self.in_features)
            eye = torch.zeros(k1 - k0, self.in_features, dtype=torch.bfloat16, device=self.device)
            eye[:, k0:k1] = torch.eye(k1 - k0, dtype=torch.bfloat16)
            wt = self.kernel_fn()(eye)  # [k, out]
            cols = torch.arange(k0, k1, device=self.device) // g
            q = torch.round((wt.float().t() - z[:, cols]) / s[:, cols] + 8.0).clamp_(0, 15)  # [out, k]
            out[:, k0:k1] = q.to(torch.uint8)
        return out

    def weight_bytes(self) -> int:
        """Bytes of the codes and scales one forward reads (the bias excluded)."""
        return sum(b.numel() * b.element_size() for b in self.buffers(recurse=False))

    # ------------------------------------------------------------------ compute
    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W^T`` without bias, x [M, in] -> [M, out] in x's dtype (the kernel runs in ``compute_dtype``)."""
        if self.kernel == "reference":
            return F.linear(x, self.dequantize(x.dtype))
        return self.kernel_matmul(x.to(self.compute_dtype).contiguous()).to(x.dtype)

    def kernel_matmul(self, xc: torch.Tensor) -> torch.Tensor:
        """``xc @ W^T`` on the packed kernel, without bias: ``xc`` [M, in] contiguous in ``compute_dtype``, the
        result [M, out] in ``compute_dtype``. The ``reference`` kernel has no packed codes and raises."""
        return self.kernel_fn()(xc)

    def kernel_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """:meth:`kernel_matmul` with this layer's current codes bound, for a caller that resolves it once and calls
        it at every step (the decode step: no module attribute lookups per call). Valid while the buffers stay."""
        want = _KERNEL_DEVICE.get(self.kernel)
        if want is not None and self.qweight.device.type != want:
            raise LoraplexError(f"this layer's codes are packed for the {self.kernel} kernel ({want}) but sit on "
                                f"{self.qweight.device}: quantize on the device the model runs on "
                                "(load(..., device=..., quantize=...))")
        if self.kernel == "int8pack":  # each row alone: a row's output does not depend on the batch around it
            op8, q, s = torch.ops.aten._weight_int8pack_mm.default, self.qweight, self.scales
            return lambda xc: op8(xc, q, s)  # [M, in] -> [M, out]
        if self.kernel in ("int4pack", "int4pack-cuda"):
            op4 = (torch.ops.aten._weight_int4pack_mm_for_cpu.default if self.kernel == "int4pack"
                   else torch.ops.aten._weight_int4pack_mm.default)
            q, g, sz = self.qweight, int(self.group_size), self.scales_zeros
            return lambda xc: op4(xc, q, g, sz)  # [M, in] -> [M, out]
        raise ValueError(f"kernel_fn needs a packed kernel; this layer runs {self.kernel!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [..., in] -> [..., out]
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # [M, in]
        if torch.is_grad_enabled() and x2.requires_grad:
            y = _QuantMatmul.apply(x2, self)
        else:
            y = self.matmul(x2)  # [M, out]
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.group_size else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.scheme}{g}, "
                f"kernel={self.kernel}, bias={self.bias is not None}")


#: the CPU int4 packed layout is separable by output rows in blocks of this many rows
INT4_PACK_ROWS = 64


def fuse_outputs(layers: list[QuantizedLinear]) -> QuantizedLinear | None:
    """One layer computing ``layers``' outputs side by side (``[x W_1^T | x W_2^T | ...]``, biases too), for
    projections that read the same input (q/k/v, gate/up): one kernel call instead of ``len(layers)``.

    The fused layer owns the concatenated codes and each member's codes become a view of its rows, so the weights are
    held once (each keeps its own small scale tensors). None when the layers cannot share a kernel call: different
    schemes, kernels, group sizes, input widths or dtypes, the reference path, an int4 member whose row count is
    not a multiple of 64 (the packed layout's row block), or a mix of members with and without bias.
    """
    if len(layers) < 2:
        return None
    first = layers[0]
    same = all(m.scheme == first.scheme and m.kernel == first.kernel and m.group_size == first.group_size
               and m.in_features == first.in_features and m.dtype == first.dtype
               and m.fan_in_fan_out == first.fan_in_fan_out and m.device == first.device for m in layers)
    if not same or first.kernel not in ("int8pack", "int4pack") or len({m.bias is None for m in layers}) != 1:
        return None
    if first.kernel == "int4pack" and any(m.out_features % INT4_PACK_ROWS for m in layers):
        return None
    fused = QuantizedLinear(first.in_features, sum(m.out_features for m in layers), first.scheme,
                            group_size=first.group_size, kernel=first.kernel, dtype=first.dtype,
                            compute_dtype=first.compute_dtype, fan_in_fan_out=first.fan_in_fan_out)
    with torch.no_grad():
        codes = torch.cat([m.qweight for m in layers])  # [sum out, in] int8, or [sum out, in/2] packed int4
        fused.register_buffer("qweight", codes)
        if first.kernel == "int8pack":
            fused.register_buffer("scales", torch.cat([m.scales for m in layers]))  # [sum out]
        else:
            fused.register_buffer("scales_zeros", torch.cat([m.scales_zeros for m in layers], dim=1).contiguous())
            # [in/G, sum out, 2]
        if first.bias is not None:
            fused.bias = nn.Parameter(torch.cat([m.bias.detach() for m in layers]), requires_grad=False)
        row = 0
        for m in layers:  # members read their rows of the fused codes: the weights stay in memory once
            m.qweight = codes[row:row + m.out_features]
            row += m.out_features
    return fused


# ---------------------------------------------------------------------- whole models
def quantize_model(model: nn.Module, bits: str | int, *, group_size: int = 32, lm_head: str | int | None = "int8",
                   skip: Iterable[str] = ("classifier", "score")) -> nn.Module:
    """Replace every ``nn.Linear`` / GPT-2 ``Conv1D`` of ``model`` (in place) by a :class:`QuantizedLinear`.

    ``bits``: 8 / "int8" or 4 / "int4"; ``group_size``: int4 group (32 reproduces llama.cpp's Q4_1 blocks);
    ``lm_head``: the output projection's scheme ("int8" by default, as llama.cpp keeps the output matrix at 6-8
    bits; None keeps it in float); its weight may be tied to the input embedding, which stays as it is (the head
    gets a quantized copy). ``skip``: module names (or their last component, or a regex) left in float, by default
    task heads that adapters save per adapter. Embeddings and norms are never quantized. Call it before loraplex
    wraps targets (``loraplex.load(..., quantize=...)`` does). Returns ``model``.
    """
    from transformers.pytorch_utils import Conv1D

    scheme = scheme_of(bits)
    if scheme is None:
        return model
    head_scheme = scheme_of(lm_head)
    patterns = [re.compile(p) for p in skip]
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    todo = []
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.Linear, Conv1D)):
            continue
        if any(p.fullmatch(name) or p.fullmatch(name.rsplit(".", 1)[-1]) for p in patterns):
            continue
        this = head_scheme if mod is head else scheme
        if this is not None:
            todo.append((name, mod, this))
    fallbacks = []
    for name, mod, this in todo:
        q = QuantizedLinear.from_module(mod, this, group_size=group_size)
        device = mod.weight.device.type
        if q.kernel == "reference" and (device == "cpu" or (device == "cuda" and this == "int4")):
            fallbacks.append(f"{name} [{q.out_features}x{q.in_features}]")
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, q)
    if fallbacks:
        log.warning("%s: %d layer(s) run dequantize + matmul (a shape the kernel does not take; on CUDA, also a GPU "
                    "below compute capability 8.0 or a kernel that failed its probe check): %s",
                    scheme, len(fallbacks), ", ".join(fallbacks[:8]) + (" ..." if len(fallbacks) > 8 else ""))
    return model


def quantized_modules(model: nn.Module) -> dict[str, QuantizedLinear]:
    """The model's quantized layers by module path (inside loraplex wrappers too)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def weight_bytes(model: nn.Module, *, decode: bool = True) -> int:
    """Bytes of weights one decode step reads: every Linear/Conv1D/quantized layer's weight (codes + scales) and
    bias, plus, with ``decode`` False, the embeddings too (a decode step reads one embedding row per token)."""
    from transformers.pytorch_utils import Conv1D

    total = 0
    seen: set[int] = set()
    for mod in model.modules():
        if isinstance(mod, QuantizedLinear):
            total += mod.weight_bytes() + (mod.bias.nbytes if mod.bias is not None else 0)
            continue
        if isinstance(mod, (nn.Linear, Conv1D)) or (not decode and isinstance(mod, nn.Embedding)):
            for p in mod.parameters(recurse=False):
                if id(p) not in seen:
                    seen.add(id(p))
                    total += p.nbytes
    return total
