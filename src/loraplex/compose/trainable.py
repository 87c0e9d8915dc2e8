"""Plumbing between compositions and the mixed-batch plan (no new math here).

* :func:`weighted_plan` -- set a batch plan whose per-row blend weights are a tensor that may carry a gradient
  (learned blends, soft/top-k routing in joint training): the ordinary :class:`~loraplex.plan.BatchPlan` with the
  weight tensor itself in its segments (:meth:`~loraplex.plan.BatchPlan.with_weights`); the kernels multiply by
  ``segments.weights``, so the gradient reaches the weights.
* :class:`TrainableAdapters` -- differentiable copies of some adapters' factors, served to the calling thread
  through the plan's :class:`~loraplex.plan.TrainOverrides` (each wrapped layer uses them instead of its frozen
  stacks), written back on ``commit``.
* :func:`layer_hooks` -- forward hooks on the wrapped layers for the compositions that are not a row blend
  (in-layer product stack, per-token gating), active only for the calling thread.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from loraplex.adapters.io import LoraAdapter, LoraModule
from loraplex.api import Plex
from loraplex.errors import LoraplexError
from loraplex.layers import MultiLoraLinear
from loraplex.plan import BatchPlan, TrainOverrides


def check_experts(plex: Plex, experts: Sequence[str], what: str = "composition") -> None:
    """Every expert must be registered; the error lists the missing and the known ones."""
    missing = [e for e in experts if e not in plex]
    if missing:
        raise LoraplexError(f"{what} needs adapters {', '.join(map(repr, missing))}, which are not registered; "
                            f"registered: {', '.join(plex.adapters) or '(none)'}")


@contextmanager
def weighted_plan(plex: Plex, experts: Sequence[str], weights: torch.Tensor) -> Iterator[BatchPlan]:
    """Plan where row n uses ``sum_k weights[n, k] * delta(experts[k])`` (zero weights are skipped).

    ``weights`` [N, K] may require grad: the plan's segments hold (a gather of) the tensor itself, so every
    wrapped layer's update is differentiable in it. Rows whose weights are all exactly 1 for a single adapter take
    the plan's unweighted fast path (the weight 1 is then a constant, which is what it is).
    """
    if weights.dim() != 2 or weights.shape[1] != len(experts):
        raise LoraplexError(f"weights must be [N, {len(experts)}], got shape {tuple(weights.shape)}")
    n = int(weights.shape[0])
    w_host = weights.detach().float().cpu()
    nz = (w_host != 0).nonzero(as_tuple=False)  # row-major: rows in order, experts in order within a row
    rows: list[list[tuple[str, float]]] = [[] for _ in range(n)]
    for r, k in nz.tolist():
        rows[r].append((experts[k], float(w_host[r, k])))
    names = sorted({experts[k] for k in nz[:, 1].tolist()}) if nz.numel() else []
    with plex.hold(names) as slots:
        plan = BatchPlan.build(rows, slots, plex.device)
        if weights.requires_grad and nz.numel():
            idx = nz.to(weights.device)
            plan = plan.with_weights(weights[idx[:, 0], idx[:, 1]].float())  # same order as BatchPlan.build's pairs
        with plex.using_plan(plan):
            yield plan


@contextmanager
def base_plan(plex: Plex, n_rows: int) -> Iterator[BatchPlan]:
    """Plan with every row on the bare base model (no adapter)."""
    with plex.disabled(), plex.using(None, n_rows) as plan:
        yield plan


# --------------------------------------------------------------------------------------------- trainable factors
class TrainableAdapters(nn.Module):
    """Trainable copies of the LoRA factors of ``names`` (for joint router + adapter training).

    Slots for the adapters are held from construction until :meth:`close`. Inside :meth:`active`, every wrapped
    layer computes, for the calling thread only, with stacks where those slots hold the trainable tensors (a
    :class:`~loraplex.plan.TrainOverrides`), so gradients reach them through any plan. :meth:`commit` writes the
    trained factors back as the registered adapters.
    """

    def __init__(self, plex: Plex, names: Sequence[str]) -> None:
        super().__init__()
        check_experts(plex, names, "trainable adapters")
        self.plex = plex
        self.names = list(names)
        self.slots: dict[str, int] = plex.acquire(self.names)
        self._closed = False
        self.factors = nn.ParameterDict()
        self._index: list[tuple[str, str, str]] = []  # (adapter, module, key)
        layers = plex.layers
        for name in self.names:
            ad = plex.get_adapter(name)
            for mod_name, m in ad.modules.items():
                if mod_name not in layers:
                    continue
                key = f"{len(self._index)}"
                dev = layers[mod_name].lora_A.device
                self.factors[key + "_A"] = nn.Parameter(m.A.detach().to(dev, torch.float32).clone())
                self.factors[key + "_B"] = nn.Parameter(m.B.detach().to(dev, torch.float32).clone())
                self._index.append((name, mod_name, key))

    @contextmanager
    def active(self) -> Iterator[None]:
        """Serve the trainable factors in every forward of this thread inside the block (the stacks are rebuilt
        from the factors, one graph per call); other threads keep the frozen slots."""
        layers = self.plex.layers
        per_layer: dict[str, list[tuple[int, str]]] = {}
        for name, mod_name, key in self._index:
            per_layer.setdefault(mod_name, []).append((self.slots[name], key))
        stacks: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for mod_name, entries in per_layer.items():
            layer = layers[mod_name]
            A = layer.lora_A.detach()  # [S, r_max, d_in]
            B = layer.lora_B.detach()  # [S, d_out, r_max]
            slot_idx = torch.tensor([s for s, _ in entries], device=A.device)
            r_max = A.shape[1]
            a_new = torch.stack([nn.functional.pad(self.factors[k + "_A"], (0, 0, 0, r_max - self.factors[
                k + "_A"].shape[0])) for _, k in entries]).to(A.dtype)  # [E, r_max, d_in]
            b_new = torch.stack([nn.functional.pad(self.factors[k + "_B"], (0, r_max - self.factors[
                k + "_B"].shape[1])) for _, k in entries]).to(B.dtype)  # [E, d_out, r_max]
            stacks[mod_name] = (A.index_put((slot_idx,), a_new), B.index_put((slot_idx,), b_new))
        with self.plex.train_overrides(TrainOverrides(stacks=stacks)):
            yield

    @torch.no_grad()
    def commit(self) -> None:
        """Replace the bank's adapters with the trained factors (same names, specs and scalings)."""
        self.close()
        new: dict[str, dict[str, LoraModule]] = {}
        for name, mod_name, key in self._index:
            old = self.plex.get_adapter(name).modules[mod_name]
            new.setdefault(name, {})[mod_name] = LoraModule(
                self.factors[key + "_A"].detach().cpu().to(old.A.dtype),
                self.factors[key + "_B"].detach().cpu().to(old.B.dtype), old.scaling, old.magnitude, old.embedding)
        for name in self.names:
            ad = self.plex.get_adapter(name)
            mods = dict(ad.modules)
            mods.update(new.get(name, {}))
            self.plex.add_adapter(name, LoraAdapter(name, ad.spec, mods, dict(ad.saved_modules), None, dict(ad.meta)),
                                  replace=True)

    def close(self) -> None:
        """Release the held slots (idempotent)."""
        if not self._closed:
            self._closed = True
            self.plex.release(self.slots)

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass


# --------------------------------------------------------------------------------------------- layer hooks
@contextmanager
def layer_hooks(plex: Plex, hook: Callable[[str, MultiLoraLinear, torch.Tensor, torch.Tensor], torch.Tensor | None],
                modules: Sequence[str] | None = None) -> Iterator[None]:
    """Call ``hook(module_name, layer, x, y) -> new y | None`` after each wrapped layer, in this thread only."""
    owner = threading.get_ident()
    handles = []
    layers = plex.layers
    for name in (modules if modules is not None else list(layers)):
        layer = layers[name]

        def fn(mod: nn.Module, args: tuple, output: torch.Tensor, _name: str = name) -> torch.Tensor | None:
            if threading.get_ident() != owner or not args:
                return None
            return hook(_name, mod, args[0], output)

        handles.append(layer.register_forward_hook(fn))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def slot_factors(layer: MultiLoraLinear, slot: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(A [r, d_in], B [d_out, r], scaling) of a slot in a layer, as this thread computes with it (training
    overrides included), None if empty."""
    r = layer.slot_rank[slot]
    if r == 0:
        return None
    A, B = layer.stacks()
    return A[slot, :r], B[slot, :, :r], layer.lora_scale[slot]
