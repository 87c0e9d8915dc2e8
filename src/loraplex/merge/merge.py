"""Merge named LoRA adapters into a new PEFT-format adapter, module by module, with a report.

For each target module in the union of the sources' modules (a source without the module contributes a zero
delta) the merged delta is computed as :mod:`loraplex.merge.methods` defines it, then written as factors:

* ``cat`` (and ``linear`` / ``task_arithmetic`` without ``svd_rank``/``svd_energy``): exact concatenation,
  rank = sum of the source ranks at that module, no dense delta is ever formed.
* ``svd`` (and ``linear`` with a rank or energy): the weighted sum is exactly ``B_cat @ A_cat``; it is truncated
  by an exact SVD of the small QR core (no dense delta either).
* ``ties``, ``dare_*``, ``magnitude_prune`` (with or without ``_svd``): the pruned delta is no longer low rank, so
  it is formed densely (one module at a time) and truncated by SVD: ``svd_rank`` if given, else the sum of the
  source ranks (plain names) or their max (``*_svd`` names, PEFT's default), clamped to ``min(d_out, d_in)``;
  ``svd_energy`` picks the smallest rank keeping that share of the squared Frobenius norm. The relative Frobenius
  truncation error is reported per module; it can be large for pruned deltas at low rank, and is reported as is.

The merged adapter's factors satisfy ``B @ A = merged delta`` (up to the reported truncation) with scaling 1: its
config has ``lora_alpha = r``, ``use_rslora = false``, and where per-module ranks differ ``rank_pattern`` /
``alpha_pattern`` hold ``{module path: rank}`` for both, so every module's ``alpha / r`` is exactly 1. Its
``target_modules`` is the explicit list of merged module paths.

``peft_compat=True`` reproduces PEFT's ``add_weighted_adapter`` instead (factor-wise merging of A and B for the
non-svd types, PEFT's TIES weighting, PEFT's config); it is mathematically different from the weighted sum of
deltas and exists for people who need files identical to PEFT's.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence, TextIO

import torch

from loraplex.adapters.io import LoraAdapter, LoraModule, save_adapter
from loraplex.adapters.spec import LoraSpec
from loraplex.errors import AdapterError, UnknownAdapterError
from loraplex.merge import methods as M

REPORT_NAME = "merge_report.json"
SIGN_METHODS = ("total", "frequency")
#: Config fields copied from the first source's ``adapter_config.json`` into the merged one; the rest is rebuilt.
_KEEP_RAW = ("task_type", "revision", "auto_mapping")


class MergeError(AdapterError):
    """Bad merge request: unknown method or source, wrong weights, density, rank, or incompatible adapters."""


# --------------------------------------------------------------------------- report
@dataclass
class ModuleReport:
    """What happened at one target module."""

    module: str
    shape: tuple[int, int]  # (d_out, d_in)
    rank: int  # rank written
    rel_error: float  # ||D - B A||_F / ||D||_F, D = merged delta before re-factorisation
    kept: float  # fraction of D's entries that are nonzero (1.0 where nothing is pruned and D is not formed)
    seconds: float
    n_sources: int  # sources that adapt this module
    how: str  # cat | svd | svd_lowrank | svd_core | factorwise | zero
    norm: float  # ||D||_F


@dataclass
class MergeReport:
    """Per-module and total facts about one merge (printed, and saved as ``merge_report.json``)."""

    name: str
    method: str
    sources: list[str]
    weights: list[float]  # as used (after normalisation)
    density: float | None
    majority_sign_method: str | None
    svd_rank: int | None
    svd_energy: float | None
    seed: int
    peft_compat: bool
    modules: list[ModuleReport] = field(default_factory=list)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def max_error(self) -> float:
        return max((m.rel_error for m in self.modules), default=0.0)

    @property
    def total_error(self) -> float:
        """Relative Frobenius error over all modules together: sqrt(sum e_m^2 |D_m|^2 / sum |D_m|^2)."""
        den = sum(m.norm**2 for m in self.modules)
        return math.sqrt(sum((m.rel_error * m.norm) ** 2 for m in self.modules) / den) if den > 0 else 0.0

    @property
    def mean_kept(self) -> float:
        n = sum(m.shape[0] * m.shape[1] for m in self.modules)
        return sum(m.kept * m.shape[0] * m.shape[1] for m in self.modules) / n if n else 1.0

    @property
    def total_rank(self) -> int:
        return sum(m.rank for m in self.modules)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["totals"] = {"modules": len(self.modules), "total_rank": self.total_rank, "max_rel_error": self.max_error,
                       "total_rel_error": self.total_error, "kept": self.mean_kept, "seconds": self.seconds}
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def table(self) -> str:
        """A plain-text table: one line per module, then totals."""
        w = max([len(m.module) for m in self.modules] + [6])
        head = f"{'module':<{w}}  {'shape':>11}  {'rank':>5}  {'rel_err':>9}  {'kept':>6}  {'ms':>8}  how"
        lines = [f"merge {self.name!r}: {self.method} of " + ", ".join(
            f"{s}={wt:g}" for s, wt in zip(self.sources, self.weights))
                 + (" (peft_compat)" if self.peft_compat else ""), head, "-" * len(head)]
        for m in self.modules:
            shape = f"{m.shape[0]}x{m.shape[1]}"
            lines.append(f"{m.module:<{w}}  {shape:>11}  {m.rank:>5}  {m.rel_error:>9.3e}  {m.kept:>6.3f}  "
                         f"{m.seconds * 1e3:>8.1f}  {m.how}")
        lines.append("-" * len(head))
        lines.append(f"{len(self.modules)} modules, total rank {self.total_rank}, max rel_err {self.max_error:.3e}, "
                     f"total rel_err {self.total_error:.3e}, kept {self.mean_kept:.3f}, {self.seconds:.2f} s")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


# --------------------------------------------------------------------------- validation
def _natural_key(s: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def check_method(method: str) -> M.MergeMethod:
    """The registry entry of ``method``, or :class:`MergeError` suggesting the closest name."""
    if method in M.MERGE_METHODS:
        return M.MERGE_METHODS[method]
    close = difflib.get_close_matches(str(method), list(M.MERGE_METHODS), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise MergeError(f"unknown merge method {method!r}{hint}; expected one of {', '.join(M.MERGE_METHODS)}")


def resolve_weights(sources: Sequence[str], weights: Sequence[float] | None, normalize: bool) -> list[float]:
    """Weights as used: 1.0 each by default; checked for length and finiteness; divided by ``sum |w|`` when
    ``normalize`` (so non-negative weights sum to 1)."""
    if weights is None:
        ws = [1.0] * len(sources)
    else:
        ws = list(weights)
        if len(ws) != len(sources):
            raise MergeError(f"{len(ws)} weights for {len(sources)} sources ({', '.join(sources)}); "
                             f"give one weight per source")
        try:
            ws = [float(w) for w in ws]
        except (TypeError, ValueError) as exc:
            raise MergeError(f"weights must be numbers, got {list(weights)!r}") from exc
        if not all(math.isfinite(w) for w in ws):
            raise MergeError(f"weights must be finite, got {ws}")
    if normalize:
        total = sum(abs(w) for w in ws)
        if total == 0:
            raise MergeError("all weights are 0; nothing to normalise (pass normalize=False to merge with them as is)")
        ws = [w / total for w in ws]
    return ws


def _check_options(meth: M.MergeMethod, density: float, majority_sign_method: str, svd_rank: int | None,
                   svd_energy: float | None) -> None:
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not (0 < density <= 1):
        raise MergeError(f"density must be in (0, 1], got {density!r}")
    if majority_sign_method not in SIGN_METHODS:
        raise MergeError(f"majority_sign_method must be one of {', '.join(SIGN_METHODS)}, got {majority_sign_method!r}")
    if svd_rank is not None:
        if isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank < 1:
            raise MergeError(f"svd_rank must be an integer >= 1, got {svd_rank!r}")
    if svd_energy is not None:
        if isinstance(svd_energy, bool) or not isinstance(svd_energy, (int, float)) or not (0 < svd_energy <= 1):
            raise MergeError(f"svd_energy must be in (0, 1], got {svd_energy!r}")
        if svd_rank is not None:
            raise MergeError("give svd_rank or svd_energy, not both")
    if meth.name == "cat" and (svd_rank is not None or svd_energy is not None):
        raise MergeError("cat is an exact concatenation (rank = sum of ranks); for a rank-limited merge use "
                         "method 'svd' (or 'linear' with svd_rank)")


def check_compatible(srcs: Mapping[str, LoraAdapter]) -> dict[str, tuple[int, int]]:
    """``{module: (d_out, d_in)}`` over all sources; :class:`MergeError` when they are for different base models."""
    bases = {n: a.spec.base_model_name_or_path for n, a in srcs.items() if a.spec.base_model_name_or_path}
    if len(set(bases.values())) > 1:
        raise MergeError("adapters for different base models: "
                         + ", ".join(f"{n} -> {b!r}" for n, b in bases.items()))
    dora = [n for n, a in srcs.items() if a.is_dora]
    if dora:
        raise MergeError(f"cannot merge DoRA adapter(s) {', '.join(map(repr, dora))}: a DoRA adapter rescales the whole "
                         f"weight, m * (W + s B A) / ||W + s B A|| per output feature, so it is not a low-rank delta "
                         f"and a merge (a weighted sum of deltas) of it is not defined; serve DoRA adapters alone")
    shapes: dict[str, tuple[int, int]] = {}
    owner: dict[str, str] = {}
    for n, a in srcs.items():
        for mod, m in a.modules.items():
            sh = (int(m.B.shape[0]), int(m.A.shape[1]))
            if mod in shapes and shapes[mod] != sh:
                raise MergeError(f"adapters for different base models: module {mod!r} is {shapes[mod][0]} x "
                                 f"{shapes[mod][1]} in {owner[mod]!r} but {sh[0]} x {sh[1]} in {n!r}")
            shapes.setdefault(mod, sh)
            owner.setdefault(mod, n)
    if not shapes:
        raise MergeError("the sources adapt no modules (LoRA factors); nothing to merge")
    return shapes


# --------------------------------------------------------------------------- merging
def merge_adapters(adapters: Mapping[str, LoraAdapter], sources: Sequence[str],
                   weights: Sequence[float] | None = None, method: str = "linear", *, density: float = 0.5,
                   majority_sign_method: str = "total", svd_rank: int | None = None, svd_energy: float | None = None,
                   normalize: bool = True, name: str = "merged", seed: int = 0, peft_compat: bool = False,
                   svd_method: M.SvdMethod = "auto", compute_dtype: torch.dtype = torch.float32,
                   device: torch.device | str | None = None) -> tuple[LoraAdapter, MergeReport]:
    """Merge ``sources`` (names in ``adapters``) with ``weights`` by ``method`` into a new adapter ``name``.

    Streams module by module: at most one module's deltas (one per source) exist at a time. ``weights`` default to
    1.0 each and are divided by ``sum |w|`` when ``normalize``. ``density`` (in (0, 1]) is used by ties/dare/
    magnitude methods, ``majority_sign_method`` by ties/dare_ties, ``seed`` by dare. ``svd_rank`` / ``svd_energy``
    choose the SVD rank (see module docstring); ``svd_method`` ``auto|full|lowrank`` picks the dense SVD routine.
    Factors are computed in ``compute_dtype`` on ``device`` (default: where the sources are) and cast back to the
    sources' dtype. Returns the merged :class:`LoraAdapter` and a :class:`MergeReport`.
    """
    t_start = time.perf_counter()
    meth = check_method(method)
    sources = list(sources)
    if not sources:
        raise MergeError("no sources to merge")
    dup = [s for s, c in Counter(sources).items() if c > 1]
    if dup:
        raise MergeError(f"source(s) listed twice: {', '.join(dup)}")
    for s in sources:
        if s not in adapters:
            raise UnknownAdapterError(s, list(adapters))
    if name in sources:
        raise MergeError(f"merge name {name!r} is also a source name; pick another")
    ws = resolve_weights(sources, weights, normalize)
    _check_options(meth, density, majority_sign_method, svd_rank, svd_energy)
    srcs = {s: adapters[s] for s in sources}
    shapes = check_compatible(srcs)
    if svd_rank is not None:
        for mod, (d_out, d_in) in shapes.items():
            if svd_rank > min(d_out, d_in):
                raise MergeError(f"svd_rank {svd_rank} larger than possible (module {mod} is {d_out} x {d_in})")
    out_dtype = _common_dtype(srcs.values())
    report = MergeReport(name=name, method=meth.name, sources=sources, weights=ws,
                         density=float(density) if meth.uses_density else None,
                         majority_sign_method=majority_sign_method if meth.uses_sign else None,
                         svd_rank=svd_rank, svd_energy=svd_energy, seed=int(seed), peft_compat=bool(peft_compat))
    if peft_compat:
        return _merge_peft_compat(srcs, sources, ws, meth, report, shapes, density=float(density),
                                  sign=majority_sign_method, svd_rank=svd_rank, seed=int(seed), out_dtype=out_dtype,
                                  t_start=t_start, name=name)

    modules: dict[str, LoraModule] = {}
    for mod in sorted(shapes, key=_natural_key):
        t0 = time.perf_counter()
        present = [(s, w, srcs[s].modules[mod]) for s, w in zip(sources, ws) if mod in srcs[s].modules]
        A, B, err, how, kept, norm = _merge_module(mod, shapes[mod], meth, present, sources, ws, density=density,
                                                   sign=majority_sign_method, svd_rank=svd_rank, svd_energy=svd_energy,
                                                   seed=seed, svd_method=svd_method, compute_dtype=compute_dtype,
                                                   device=device)
        modules[mod] = LoraModule(A.to(out_dtype).contiguous(), B.to(out_dtype).contiguous(), 1.0,
                                  embedding=present[0][2].embedding)
        report.modules.append(ModuleReport(mod, shapes[mod], int(A.shape[0]), float(err), float(kept),
                                           time.perf_counter() - t0, len(present), how, float(norm)))
    saved = merge_saved_modules(srcs, sources, ws)
    spec = merged_spec(srcs, modules, saved)
    merged = LoraAdapter(name=name, spec=spec, modules=modules, saved_modules=saved, meta=_merged_meta(srcs, report))
    report.seconds = time.perf_counter() - t_start
    return merged, report


def _merge_module(mod: str, shape: tuple[int, int], meth: M.MergeMethod, present: list[tuple[str, float, LoraModule]],
                  sources: list[str], ws: list[float], *, density: float, sign: str, svd_rank: int | None,
                  svd_energy: float | None, seed: int, svd_method: M.SvdMethod, compute_dtype: torch.dtype,
                  device: torch.device | str | None) -> tuple[torch.Tensor, torch.Tensor, float, str, float, float]:
    """(A, B, rel_err, how, kept, ||D||) of one module."""
    d_out, d_in = shape
    p = min(d_out, d_in)
    dev = torch.device(device) if device is not None else present[0][2].A.device
    ranks = [m.rank for _, _, m in present]
    if meth.combine is None:  # low-rank exact: sum_i w_i s_i B_i A_i = B_cat @ A_cat
        A_cat, B_cat = M.cat_factors([m.A.to(dev, compute_dtype) for _, _, m in present],
                                     [m.B.to(dev, compute_dtype) for _, _, m in present],
                                     [w * m.scaling for _, w, m in present])  # [R, d_in], [d_out, R]
        norm = M.lowrank_norm(B_cat, A_cat)
        if meth.refactor == "cat" and svd_rank is None and svd_energy is None:
            return A_cat, B_cat, 0.0, "cat", 1.0, norm
        rank = svd_rank if (svd_rank is not None or svd_energy is not None) else _default_rank(meth, ranks, p)
        A, B, err, how = M.refactorise_lowrank(B_cat, A_cat, rank if svd_energy is None else None, energy=svd_energy,
                                               compute_dtype=compute_dtype, module=mod)
        return A, B, err, how, 1.0, norm
    # dense: one delta per source (zero for a source that lacks the module), never more than this module's
    by_name = {s: m for s, _, m in present}
    deltas = [by_name[s].delta(compute_dtype).to(dev) if s in by_name
              else torch.zeros(d_out, d_in, dtype=compute_dtype, device=dev) for s in sources]  # n x [d_out, d_in]
    seeds = [M.derive_seed(seed, mod, s) for s in sources]
    D = meth.combine(deltas, ws, density, sign, seeds)  # [d_out, d_in]
    del deltas
    kept = float((D != 0).sum()) / D.numel()
    norm = float(torch.linalg.matrix_norm(D))
    rank = svd_rank if svd_rank is not None else (None if svd_energy is not None else _default_rank(meth, ranks, p))
    A, B, err, how = M.refactorise(D, rank, energy=svd_energy, svd_method=svd_method, compute_dtype=compute_dtype,
                                   module=mod, seed=seed)
    return A, B, err, how, kept, norm


def _default_rank(meth: M.MergeMethod, ranks: list[int], p: int) -> int:
    return min(p, sum(ranks) if meth.default_rank == "sum" else max(ranks))


def _common_dtype(srcs: Any) -> torch.dtype:
    dt: torch.dtype | None = None
    for a in srcs:
        for m in a.modules.values():
            dt = m.A.dtype if dt is None else torch.promote_types(dt, m.A.dtype)
    return dt or torch.float32


def merge_saved_modules(srcs: Mapping[str, LoraAdapter], sources: Sequence[str],
                        ws: Sequence[float]) -> dict[str, dict[str, torch.Tensor]]:
    """``modules_to_save`` of the merge: copied when one source has the module, else the weighted average
    ``sum_i w_i T_i / sum_i w_i`` over the sources that have it (same shapes required)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    names = sorted({m for s in sources for m in srcs[s].saved_modules}, key=_natural_key)
    for mod in names:
        holders = [(s, w) for s, w in zip(sources, ws) if mod in srcs[s].saved_modules]
        if len(holders) == 1:
            out[mod] = {p: t.clone() for p, t in srcs[holders[0][0]].saved_modules[mod].items()}
            continue
        first = srcs[holders[0][0]].saved_modules[mod]
        for s, _ in holders[1:]:
            other = srcs[s].saved_modules[mod]
            if set(other) != set(first):
                raise MergeError(f"modules_to_save {mod!r} has parameters {sorted(first)} in {holders[0][0]!r} but "
                                 f"{sorted(other)} in {s!r}; cannot average")
            for p, t in other.items():
                if tuple(t.shape) != tuple(first[p].shape):
                    raise MergeError(f"modules_to_save {mod}.{p} is {tuple(first[p].shape)} in {holders[0][0]!r} "
                                     f"but {tuple(t.shape)} in {s!r} (different heads?); cannot average them - "
                                     f"merge with only one source holding {mod!r}")
        wsum = sum(w for _, w in holders)
        if wsum == 0:
            raise MergeError(f"modules_to_save {mod!r}: the weights of its holders sum to 0; cannot average")
        avg: dict[str, torch.Tensor] = {}
        for p, t0 in first.items():
            if not t0.is_floating_point():
                if any(not torch.equal(srcs[s].saved_modules[mod][p], t0) for s, _ in holders):
                    raise MergeError(f"modules_to_save {mod}.{p} is an integer tensor that differs between sources")
                avg[p] = t0.clone()
                continue
            acc = torch.zeros_like(t0, dtype=torch.float32)
            for s, w in holders:
                acc.add_(srcs[s].saved_modules[mod][p].float(), alpha=w / wsum)
            avg[p] = acc.to(t0.dtype)
        out[mod] = avg
    return out


def merged_spec(srcs: Mapping[str, LoraAdapter], modules: Mapping[str, LoraModule],
                saved: Mapping[str, Any]) -> LoraSpec:
    """Config of the merge: scaling exactly 1 for every module (``alpha = r``, patterns for odd ranks)."""
    first = next(iter(srcs.values())).spec
    ranks = {m: lm.rank for m, lm in modules.items()}
    counts = Counter(ranks.values())
    r = max(counts, key=lambda k: (counts[k], k))
    rank_pattern = {m: k for m, k in ranks.items() if k != r}
    bases = {a.spec.base_model_name_or_path for a in srcs.values() if a.spec.base_model_name_or_path}
    mts: list[str] = []
    for a in srcs.values():
        for m in a.spec.modules_to_save or []:
            if m not in mts:
                mts.append(m)
    raw = {k: first.raw[k] for k in _KEEP_RAW if k in first.raw}
    raw.update({"init_lora_weights": True, "inference_mode": True})
    return LoraSpec(r=r, lora_alpha=float(r), target_modules=sorted(modules, key=_natural_key), use_rslora=False,
                    rank_pattern=dict(rank_pattern), alpha_pattern={m: float(k) for m, k in rank_pattern.items()},
                    modules_to_save=mts or None, fan_in_fan_out=first.fan_in_fan_out, lora_dropout=first.lora_dropout,
                    task_type=first.task_type, base_model_name_or_path=next(iter(bases)) if bases else None, raw=raw)


def _merged_meta(srcs: Mapping[str, LoraAdapter], report: MergeReport) -> dict[str, Any]:
    meta: dict[str, Any] = {"parents": list(report.sources),
                            "merge": {"method": report.method, "weights": report.weights, "density": report.density,
                                      "majority_sign_method": report.majority_sign_method,
                                      "svd_rank": report.svd_rank, "svd_energy": report.svd_energy,
                                      "seed": report.seed, "peft_compat": report.peft_compat}}
    for key in ("task", "labels"):
        vals = [a.meta.get(key) for a in srcs.values()]
        if vals and vals[0] is not None and all(v == vals[0] for v in vals):
            meta[key] = vals[0]
    return meta


# --------------------------------------------------------------------------- PEFT's behaviour (peft_compat)
_FACTORWISE = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")


def _peft_max_rank(spec: LoraSpec) -> int:
    return spec.r if not spec.rank_pattern else max(spec.r, *spec.rank_pattern.values())


def _merge_peft_compat(srcs: Mapping[str, LoraAdapter], sources: list[str], ws: list[float], meth: M.MergeMethod,
                       report: MergeReport, shapes: dict[str, tuple[int, int]], *, density: float, sign: str,
                       svd_rank: int | None, seed: int, out_dtype: torch.dtype, t_start: float,
                       name: str) -> tuple[LoraAdapter, MergeReport]:
    """PEFT ``add_weighted_adapter`` semantics, file for file (tensors and config).

    * ``linear/ties/dare_linear/dare_ties/magnitude_prune``: the rule is applied to the A factors and to the B
      factors separately (A weighted by ``sign(w s) sqrt(|w s|)``, B by ``sqrt(|w s|)``); all sources need the same
      rank, new ``r`` = that rank.
    * ``cat``: our concatenation, zero-padded to ``r = sum of the sources' largest ranks``.
    * ``*svd``: PEFT's delta rules (TIES sign elected on unweighted values, disjoint sum divided by the count),
      full SVD, ``B = U_k diag(S_k)``, ``A = Vh_k``, ``r = svd_rank or max rank``.
    * config: the first source's config with ``r = lora_alpha = new rank``, empty patterns, union of targets; it
      keeps the first source's ``use_rslora`` (then the scaling is ``sqrt(r)``, not 1: PEFT's behaviour).
    DARE masks use our seeded generator (PEFT draws from the global RNG). ``rel_error`` is measured against
    loraplex's delta-level definition of the same method.
    """
    kind = "linear" if meth.name == "task_arithmetic" or len(sources) == 1 else meth.name
    max_ranks = [_peft_max_rank(srcs[s].spec) for s in sources]
    if kind in _FACTORWISE:
        if len(set(max_ranks)) != 1:
            raise MergeError(f"peft_compat: PEFT's factor-wise {kind!r} needs all adapters to have the same r, got "
                             + ", ".join(f"{s}: {r}" for s, r in zip(sources, max_ranks))
                             + " (PEFT raises 'All adapters must have the same r value'); use peft_compat=False")
        new_rank = max_ranks[0]
    elif kind == "cat":
        new_rank = sum(max_ranks)
    else:
        new_rank = svd_rank or max(max_ranks)
    first = srcs[sources[0]].spec
    tm_types = {type(srcs[s].spec.target_modules) for s in sources}
    if len(tm_types) > 1:
        raise MergeError("peft_compat: PEFT cannot merge adapters whose target_modules mix a list and a regex string")
    if isinstance(first.target_modules, str):
        targets: Any = "|".join(f"({srcs[s].spec.target_modules})" for s in sources)
    else:
        targets = sorted({t for s in sources for t in (srcs[s].spec.target_modules or [])})
    spec = first.copy(r=new_rank, lora_alpha=float(new_rank), target_modules=targets, rank_pattern={},
                      alpha_pattern={})
    if first.use_rslora:
        report.notes.append(f"the merged config keeps use_rslora from {sources[0]!r} (PEFT's behaviour), so its "
                            f"scaling is r/sqrt(r) = {math.sqrt(new_rank):.3g}, not 1")
    if kind != meth.name:
        report.notes.append(f"PEFT runs {meth.name!r} as {kind!r} here")
    if kind in ("dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"):
        report.notes.append("DARE masks come from loraplex's seeded generator (PEFT uses the global RNG)")
    holders: Counter[str] = Counter(m for s in sources for m in srcs[s].saved_modules)
    if any(c > 1 for c in holders.values()):
        raise MergeError("peft_compat: PEFT cannot merge adapters that share a modules_to_save module "
                         f"({', '.join(m for m, c in holders.items() if c > 1)})")
    modules: dict[str, LoraModule] = {}
    f32 = torch.float32
    for mod in sorted(shapes, key=_natural_key):
        t0 = time.perf_counter()
        d_out, d_in = shapes[mod]
        present = [(s, w, srcs[s].modules[mod]) for s, w in zip(sources, ws) if mod in srcs[s].modules]
        # the delta-level definition, to measure how far PEFT's result is from it
        by_name = {s: m for s, _, m in present}
        deltas = [by_name[s].delta(f32) if s in by_name else torch.zeros(d_out, d_in) for s in sources]
        seeds = [M.derive_seed(seed, mod, s) for s in sources]
        if meth.combine is None:
            target = M.task_arithmetic(deltas, ws)
        else:
            target = meth.combine(deltas, ws, density, sign, seeds)
        if kind == "cat":
            A = torch.zeros(new_rank, d_in)
            B = torch.zeros(d_out, new_rank)
            Ac, Bc = M.cat_factors([m.A.to(f32) for _, _, m in present], [m.B.to(f32) for _, _, m in present],
                                   [w * m.scaling for _, w, m in present])
            A[: Ac.shape[0]] = Ac
            B[:, : Bc.shape[1]] = Bc
            how = "cat"
        elif kind in _FACTORWISE:
            bad = [s for s, _, m in present if m.rank != new_rank]
            if bad:
                raise MergeError(f"peft_compat: module {mod!r} has rank {by_name[bad[0]].rank} in {bad[0]!r}, "
                                 f"not {new_rank}; PEFT's factor-wise {kind!r} cannot merge it")
            A, B = M.peft_factorwise(kind, [m.A.to(f32) for _, _, m in present], [m.B.to(f32) for _, _, m in present],
                                     [w * m.scaling for _, w, m in present], density, sign,  # type: ignore[arg-type]
                                     [M.derive_seed(seed, mod + ".lora_A", s) for s, _, _ in present],
                                     [M.derive_seed(seed, mod + ".lora_B", s) for s, _, _ in present])
            how = "factorwise"
        else:
            base = {"svd": "linear"}.get(kind, kind[:-4])
            pw = torch.tensor([w for _, w, _ in present])
            pd = [m.delta(f32) for _, _, m in present]
            D = M.peft_combine(base, pd, pw, density, sign,  # type: ignore[arg-type]
                               [M.derive_seed(seed, mod, s) for s, _, _ in present])
            A, B = M.peft_svd(D, new_rank)
            how = "svd"
        scaling = spec.scaling_for(mod, new_rank)
        norm = float(torch.linalg.matrix_norm(target))
        err = float(torch.linalg.matrix_norm(target - scaling * (B @ A))) / norm if norm > 0 else 0.0
        modules[mod] = LoraModule(A.to(out_dtype).contiguous(), B.to(out_dtype).contiguous(), scaling,
                                  embedding=present[0][2].embedding)
        kept = float((target != 0).sum()) / target.numel()
        report.modules.append(ModuleReport(mod, (d_out, d_in), new_rank, err, kept, time.perf_counter() - t0,
                                           len(present), how, norm))
    saved = merge_saved_modules(srcs, sources, ws)
    merged = LoraAdapter(name=name, spec=spec, modules=modules, saved_modules=saved, meta=_merged_meta(srcs, report))
    report.seconds = time.perf_counter() - t_start
    return merged, report


# --------------------------------------------------------------------------- to disk
def merge_to_disk(adapters: Mapping[str, LoraAdapter], sources: Sequence[str], weights: Sequence[float] | None,
                  method: str, out: str | Path, *, echo: bool | TextIO = True,
                  **kwargs: Any) -> tuple[LoraAdapter, MergeReport, Path]:
    """:func:`merge_adapters`, then write the adapter (PEFT format) and ``merge_report.json`` into ``out`` in one
    atomic folder replace; prints the report table (to stdout, or to ``echo`` when it is a stream)."""
    merged, report = merge_adapters(adapters, sources, weights, method, **kwargs)
    path = save_adapter(merged, out, extra_files={REPORT_NAME: report.to_json()})
    merged.path = str(path)
    if echo:
        stream = echo if not isinstance(echo, bool) else sys.stdout
        print(report.table(), file=stream)
        print(f"wrote {path} (report: {path / REPORT_NAME})", file=stream)
    return merged, report, path


def merge_from_config(cfg: Any, adapters: Mapping[str, LoraAdapter], out: str | Path | None = None,
                      **kwargs: Any) -> tuple[LoraAdapter, MergeReport]:
    """Run a config ``merge:`` block (a ``MergeConfig`` or a dict with name, sources, weights, normalize,
    combination_type, density, majority_sign_method, svd_rank, peft_compat). ``sources`` default to all adapters.
    Writes to ``out`` when given."""
    get = (lambda k, d=None: cfg.get(k, d)) if isinstance(cfg, Mapping) else (lambda k, d=None: getattr(cfg, k, d))
    sources = get("sources") or list(adapters)
    if isinstance(sources, str):
        sources = [sources]
    opts: dict[str, Any] = dict(density=get("density", 0.5), majority_sign_method=get("majority_sign_method", "total"),
                                svd_rank=get("svd_rank"), normalize=get("normalize", True),
                                name=get("name", "merged") or "merged", peft_compat=bool(get("peft_compat", False)))
    if get("svd_energy") is not None:
        opts["svd_energy"] = get("svd_energy")
    opts.update(kwargs)
    method = get("combination_type") or get("method") or "linear"
    if out is not None:
        merged, report, _ = merge_to_disk(adapters, sources, get("weights"), method, out, **opts)
        return merged, report
    return merge_adapters(adapters, sources, get("weights"), method, **opts)
