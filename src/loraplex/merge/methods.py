"""Pure tensor math of adapter merging: combine per-module deltas, then re-factorise them into LoRA factors.

Everything here works on one target module at a time and does no I/O. Notation (DESIGN.md, "Math that must be
right"): source adapter ``i`` contributes the dense delta ``D_i = s_i B_i A_i`` of shape ``[d_out, d_in]`` (a source
that does not adapt the module contributes ``D_i = 0``) with the user weight ``w_i``.

Combination rules (all on deltas, never on A and B separately):

* ``task_arithmetic`` / ``linear``: ``sum_i w_i D_i``.
* ``magnitude_prune``: ``sum_i w_i trim(D_i)``; ``trim`` keeps the ``k = round(density * numel)`` entries of largest
  ``|x|`` of each delta (ties at the threshold are all kept) and zeroes the rest, no rescale.
* ``ties`` (Yadav et al. 2023, "TIES-Merging"): trim each delta as above -> ``T_i``; with ``V_i = w_i T_i``
  elect a sign per entry, ``gamma = sign(sum_i V_i)`` (``total``) or ``gamma = sign(sum_i sign(V_i))``
  (``frequency``), a zero sum electing ``+1``; the agreeing set of an entry is ``S = {i : V_i != 0 and
  sign(V_i) = gamma}``; the merged entry is the *weighted disjoint mean* scaled by the total weight::

      ties = (sum_j |w_j|) * (sum_{i in S} w_i T_i) / (sum_{i in S} |w_i|)     (0 where S is empty)

  With the default normalised weights (``sum |w| = 1``) this is exactly the paper's disjoint mean with the weights
  as relative importance and the paper's ``lambda = 1``; with equal weights it is the paper's plain mean over the
  agreeing tasks times ``lambda = sum |w|``. Where every kept value agrees in sign and ``density = 1`` it reduces
  to ``linear`` exactly (PEFT instead divides ``sum_{i in S} w_i T_i`` by the *count* ``|S|`` and elects the sign on
  the unweighted values, so its TIES of agreeing entries is ``linear / |S|``). Trimming is per module (as in PEFT
  and mergekit); the paper trims the whole flattened task vector at once.
* ``dare_linear`` / ``dare_ties`` (Yu et al. 2024, "DARE"): drop-and-rescale each delta,
  ``R_i = D_i * M_i / density`` with ``M_i ~ Bernoulli(density)`` drawn as
  ``torch.rand(d_out, d_in, generator=torch.Generator("cpu").manual_seed(seed_i)) < density`` where
  ``seed_i = derive_seed(seed, module, source_name)``; then ``sum_i w_i R_i`` (``dare_linear``) or the TIES
  sign election and weighted disjoint mean above applied to ``R_i`` instead of ``T_i`` (``dare_ties``). Seeds depend
  on the module path and the source name only, so results do not depend on module or source order.

Re-factorisation: :func:`refactorise` (dense delta -> truncated SVD, ``B = U sqrt(S)``, ``A = sqrt(S) Vh``, so
``B @ A`` approximates the delta with scaling 1), :func:`refactorise_lowrank` (a delta given exactly as
``B_cat @ A_cat``: QR of both factors, SVD of the small core; exact and cheap), :func:`cat_factors` (exact
concatenation). Each returns the relative Frobenius error ``||D - B A||_F / ||D||_F``.

``peft_*`` functions reproduce PEFT's ``add_weighted_adapter`` semantics (``peft/utils/merge_utils.py`` and
``LoraModel._generalized_task_arithmetic_weighted_adapter``) for the ``peft_compat`` option; they are NOT the
weighted sum of deltas (factor-wise merging creates cross terms ``B_i A_j``).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch

SignMethod = Literal["total", "frequency"]
SvdMethod = Literal["auto", "full", "lowrank"]

#: Extra columns drawn by ``torch.svd_lowrank`` beyond the requested rank, and its power iterations.
LOWRANK_OVERSAMPLE = 10
LOWRANK_NITER = 4


# --------------------------------------------------------------------------- seeds and masks
def derive_seed(seed: int, module: str, source: str) -> int:
    """A 63-bit seed for one (module, source) pair: blake2b of ``"{seed}\\0{module}\\0{source}"``."""
    digest = hashlib.blake2b(f"{int(seed)}\0{module}\0{source}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def bernoulli_keep(shape: Sequence[int], density: float, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Bool keep-mask ``rand(shape) < density`` drawn on the CPU from ``seed`` (same on every device), then moved."""
    gen = torch.Generator("cpu").manual_seed(int(seed))
    mask = torch.rand(tuple(shape), generator=gen, dtype=torch.float32) < density  # [d_out, d_in]
    return mask.to(device)


def keep_count(numel: int, density: float) -> int:
    """How many entries magnitude trimming keeps: ``round(density * numel)`` clamped to [1, numel]."""
    return min(numel, max(1, int(round(density * numel))))


def magnitude_trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """``delta`` with all but its ``keep_count`` largest-``|x|`` entries zeroed (ties at the threshold kept)."""
    n = delta.numel()
    k = keep_count(n, density)
    if k >= n:
        return delta.clone()
    mag = delta.abs()  # [d_out, d_in]
    thresh = torch.kthvalue(mag.reshape(-1), n - k + 1).values  # the k-th largest |x|
    return torch.where(mag >= thresh, delta, torch.zeros((), dtype=delta.dtype, device=delta.device))


def dare_drop(delta: torch.Tensor, density: float, seed: int) -> torch.Tensor:
    """DARE: keep each entry with probability ``density`` (mask from ``seed``), rescale kept ones by ``1/density``."""
    if density >= 1.0:
        return delta.clone()
    keep = bernoulli_keep(delta.shape, density, seed, delta.device)  # [d_out, d_in] bool
    return torch.where(keep, delta / density, torch.zeros((), dtype=delta.dtype, device=delta.device))


# --------------------------------------------------------------------------- combination rules
def _weights(weights: Sequence[float] | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(list(map(float, weights)) if not torch.is_tensor(weights) else weights,
                           dtype=like.dtype, device=like.device)


def task_arithmetic(deltas: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """``sum_i w_i D_i`` (task arithmetic, Ilharco et al. 2023); no stacking, one delta-sized buffer."""
    out = torch.zeros_like(deltas[0])  # [d_out, d_in]
    for d, w in zip(deltas, weights):
        out.add_(d, alpha=float(w))
    return out


linear = task_arithmetic


def elect_sign(weighted: torch.Tensor, method: SignMethod = "total") -> torch.Tensor:
    """Per-entry elected sign (+1/-1) of stacked weighted values ``[n, ...]``; a zero vote elects +1."""
    if method == "total":
        vote = weighted.sum(dim=0)
    elif method == "frequency":
        vote = torch.sign(weighted).sum(dim=0)
    else:
        raise ValueError(f"majority_sign_method must be 'total' or 'frequency', got {method!r}")
    one = torch.ones((), dtype=weighted.dtype, device=weighted.device)
    return torch.where(vote >= 0, one, -one)  # [...]


def disjoint_mean(values: torch.Tensor, weights: torch.Tensor, method: SignMethod = "total") -> torch.Tensor:
    """TIES elect + weighted disjoint mean of stacked (trimmed or DARE'd) values ``[n, d_out, d_in]``.

    ``V_i = w_i X_i``; ``gamma`` from :func:`elect_sign`; ``S = {i: V_i != 0, sign(V_i) = gamma}``; result
    ``(sum_j |w_j|) * sum_{i in S} V_i / sum_{i in S} |w_i|``, zero where ``S`` is empty. ``values`` is
    overwritten (it is a scratch buffer of the callers), keeping the peak at about two stacks.
    """
    w = weights.view(-1, *([1] * (values.dim() - 1)))  # [n, 1, 1]
    weighted = values.mul_(w)  # [n, d_out, d_in], in place
    gamma = elect_sign(weighted, method)  # [d_out, d_in]
    agree = torch.sign(weighted).eq_(gamma)  # [n, d_out, d_in] as 0/1; zeros never agree
    num = weighted.mul_(agree).sum(dim=0)  # [d_out, d_in]
    den = agree.mul_(w.abs()).sum(dim=0)  # [d_out, d_in]
    del weighted, agree
    total = float(weights.abs().sum())
    den.clamp_(min=torch.finfo(values.dtype).tiny)  # where nobody agrees num is 0, so the result is 0
    return num.div_(den).mul_(total)


def _stack_into(tensors: Sequence[torch.Tensor], fn: Callable[[torch.Tensor, int], torch.Tensor]) -> torch.Tensor:
    """``torch.stack([fn(t, i) ...])`` written into one preallocated buffer ``[n, d_out, d_in]``."""
    out = torch.empty((len(tensors), *tensors[0].shape), dtype=tensors[0].dtype, device=tensors[0].device)
    for i, t in enumerate(tensors):
        out[i] = fn(t, i)
    return out


def ties(deltas: Sequence[torch.Tensor], weights: Sequence[float], density: float,
         majority_sign_method: SignMethod = "total") -> torch.Tensor:
    """TIES-Merging of deltas: magnitude trim to ``density``, elect sign, weighted disjoint mean (module docstring)."""
    trimmed = _stack_into(deltas, lambda d, i: magnitude_trim(d, density))  # [n, d_out, d_in]
    return disjoint_mean(trimmed, _weights(weights, trimmed), majority_sign_method)


def magnitude_prune(deltas: Sequence[torch.Tensor], weights: Sequence[float], density: float) -> torch.Tensor:
    """``sum_i w_i trim(D_i)``: per-delta magnitude trim to ``density``, no rescale, then the weighted sum."""
    out = torch.zeros_like(deltas[0])  # [d_out, d_in]
    for d, w in zip(deltas, weights):
        out.add_(magnitude_trim(d, density), alpha=float(w))
    return out


def dare_linear(deltas: Sequence[torch.Tensor], weights: Sequence[float], density: float,
                seeds: Sequence[int]) -> torch.Tensor:
    """``sum_i w_i dare_drop(D_i)``: Bernoulli(density) keep with 1/density rescale, then the weighted sum."""
    out = torch.zeros_like(deltas[0])  # [d_out, d_in]
    for d, w, s in zip(deltas, weights, seeds):
        out.add_(dare_drop(d, density, s), alpha=float(w))
    return out


def dare_ties(deltas: Sequence[torch.Tensor], weights: Sequence[float], density: float, seeds: Sequence[int],
              majority_sign_method: SignMethod = "total") -> torch.Tensor:
    """DARE drop-and-rescale of each delta, then TIES sign election and weighted disjoint mean."""
    dropped = _stack_into(deltas, lambda d, i: dare_drop(d, density, seeds[i]))  # [n, d_out, d_in]
    return disjoint_mean(dropped, _weights(weights, dropped), majority_sign_method)


# --------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class MergeMethod:
    """One combination type.

    ``combine`` is ``None`` for the low-rank-exact methods (the weighted sum of deltas is represented exactly by
    concatenated factors; no dense delta is formed); otherwise it maps ``(deltas, weights, density,
    majority_sign_method, seeds)`` to the dense merged delta. ``refactor`` is ``"cat"`` (exact concatenation;
    ``linear``/``task_arithmetic`` switch to SVD only when a rank or energy is asked) or ``"svd"``.
    ``default_rank`` is the SVD rank used when none is asked: ``"sum"`` (sum of the source ranks at that module,
    the faithful choice for pruned deltas, which are no longer low rank) or ``"max"`` (PEFT's default for its
    ``*_svd`` types). ``uses_density`` / ``uses_sign`` say which options matter.
    """

    name: str
    combine: Callable[..., torch.Tensor] | None
    refactor: Literal["cat", "svd"]
    default_rank: Literal["sum", "max"]
    uses_density: bool
    uses_sign: bool
    random: bool
    description: str


def _c_ties(deltas, weights, density, sign, seeds):  # type: ignore[no-untyped-def]
    return ties(deltas, weights, density, sign)


def _c_dare_linear(deltas, weights, density, sign, seeds):  # type: ignore[no-untyped-def]
    return dare_linear(deltas, weights, density, seeds)


def _c_dare_ties(deltas, weights, density, sign, seeds):  # type: ignore[no-untyped-def]
    return dare_ties(deltas, weights, density, seeds, sign)


def _c_magnitude_prune(deltas, weights, density, sign, seeds):  # type: ignore[no-untyped-def]
    return magnitude_prune(deltas, weights, density)


def _registry() -> dict[str, MergeMethod]:
    m: dict[str, MergeMethod] = {}

    def add(name: str, combine, refactor, default_rank, dens, sign, rnd, desc) -> None:  # type: ignore[no-untyped-def]
        m[name] = MergeMethod(name, combine, refactor, default_rank, dens, sign, rnd, desc)

    add("cat", None, "cat", "sum", False, False, False,
        "exact: A = concat(w_i s_i A_i), B = concat(B_i), rank = sum of ranks")
    add("linear", None, "cat", "sum", False, False, False,
        "weighted sum of deltas; exact by concatenation (SVD only if svd_rank/svd_energy is given)")
    add("task_arithmetic", None, "cat", "sum", False, False, False, "same as linear")
    add("svd", None, "svd", "max", False, False, False,
        "weighted sum of deltas, truncated SVD (default rank: max source rank)")
    for base, fn, dens, sign, rnd, desc in (
        ("ties", _c_ties, True, True, False, "TIES: trim, elect sign, weighted disjoint mean"),
        ("dare_linear", _c_dare_linear, True, False, True, "DARE drop/rescale, weighted sum"),
        ("dare_ties", _c_dare_ties, True, True, True, "DARE drop/rescale, elect sign, weighted disjoint mean"),
        ("magnitude_prune", _c_magnitude_prune, True, False, False, "magnitude trim, weighted sum"),
    ):
        add(base, fn, "svd", "sum", dens, sign, rnd, desc + "; SVD to rank = sum of source ranks by default")
        add(base + "_svd", fn, "svd", "max", dens, sign, rnd, desc + "; SVD to rank = max source rank by default")
    return m


#: All combination types by name.
MERGE_METHODS: dict[str, MergeMethod] = _registry()


# --------------------------------------------------------------------------- re-factorisation
def _rank_for_energy(s: torch.Tensor, energy: float) -> int:
    """Smallest k with ``sum_{j<k} s_j^2 >= energy * sum_j s_j^2`` (s descending), at least 1."""
    e = s.double().square()
    total = float(e.sum())
    if total == 0.0:
        return 1
    cum = torch.cumsum(e, 0) / total
    k = int(torch.searchsorted(cum, torch.tensor([energy - 1e-12], dtype=torch.float64)).item()) + 1
    return max(1, min(k, s.numel()))


def _rel_error(delta: torch.Tensor, B: torch.Tensor, A: torch.Tensor, norm: float) -> float:
    """``||delta - B @ A||_F / norm`` (0 when norm is 0)."""
    if norm == 0.0:
        return 0.0
    resid = torch.addmm(delta, B, A, alpha=-1.0)  # [d_out, d_in]
    return float(torch.linalg.matrix_norm(resid)) / norm


def seeded_svd_lowrank(D: torch.Tensor, q: int, niter: int, seed: int) -> tuple[torch.Tensor, ...]:
    """``torch.svd_lowrank(D, q, niter)`` with its random test matrix drawn from ``seed``: the same inputs give the
    same factors on every call, and the caller's global RNG state is left as it was (``fork_rng``)."""
    devices = [D.device] if D.device.type != "cpu" else []
    with torch.random.fork_rng(devices=devices, device_type=D.device.type if devices else "cuda"):
        torch.manual_seed(int(seed))
        return torch.svd_lowrank(D, q=q, niter=niter)


def refactorise(delta: torch.Tensor, rank: int | None = None, *, energy: float | None = None,
                svd_method: SvdMethod = "auto", compute_dtype: torch.dtype = torch.float32,
                module: str = "?", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, float, str]:
    """Truncated SVD of a dense delta ``[d_out, d_in]`` into ``(A [k, d_in], B [d_out, k], rel_err, how)``.

    ``B = U_k sqrt(S_k)``, ``A = sqrt(S_k) Vh_k``, so ``B @ A ~= delta`` with scaling 1. ``rank`` fixes ``k``;
    ``energy`` picks the smallest ``k`` keeping that share of ``||delta||_F^2`` (full SVD). ``svd_method="auto"``
    uses ``torch.svd_lowrank(q=k+10, niter=4)`` when ``k + 10 <= min(d_out, d_in) // 2`` and
    ``torch.linalg.svd`` otherwise. ``rel_err`` is the actual ``||delta - B A||_F / ||delta||_F``, computed from the
    returned factors (float32/64, before any cast). ``how`` names the path taken. The randomised path draws its
    test matrix from ``derive_seed(seed, module, "svd_lowrank")``, so results are reproducible.
    """
    d_out, d_in = delta.shape
    p = min(d_out, d_in)
    if rank is not None and rank > p:
        raise ValueError(f"svd_rank {rank} larger than possible (module {module} is {d_out} x {d_in})")
    D = delta.to(compute_dtype)  # [d_out, d_in]
    norm = float(torch.linalg.matrix_norm(D))
    if norm == 0.0:
        k = 1 if rank is None else rank
        return (torch.zeros(k, d_in, dtype=compute_dtype, device=D.device),
                torch.zeros(d_out, k, dtype=compute_dtype, device=D.device), 0.0, "zero")
    use_low = (energy is None and rank is not None and svd_method != "full"
               and (svd_method == "lowrank" or rank + LOWRANK_OVERSAMPLE <= p // 2))
    if use_low:
        assert rank is not None
        q = min(p, rank + LOWRANK_OVERSAMPLE)
        lr_seed = derive_seed(seed, module, "svd_lowrank")
        U, S, V = seeded_svd_lowrank(D, q, LOWRANK_NITER, lr_seed)  # [d_out, q], [q], [d_in, q]
        k = rank
        Vh = V.mT
        how = "svd_lowrank"
    else:
        U, S, Vh = torch.linalg.svd(D, full_matrices=False)  # [d_out, p], [p], [p, d_in]
        k = rank if rank is not None else _rank_for_energy(S, energy if energy is not None else 1.0)
        how = "svd"
    root = S[:k].clamp_min(0).sqrt()  # [k]
    B = U[:, :k] * root  # [d_out, k]
    A = root[:, None] * Vh[:k]  # [k, d_in]
    return A, B, _rel_error(D, B, A, norm), how


def refactorise_lowrank(B_cat: torch.Tensor, A_cat: torch.Tensor, rank: int | None = None, *,
                        energy: float | None = None, compute_dtype: torch.dtype = torch.float32,
                        module: str = "?") -> tuple[torch.Tensor, torch.Tensor, float, str]:
    """SVD truncation of a delta given exactly as ``B_cat [d_out, R] @ A_cat [R, d_in]``, never forming it.

    ``B_cat = Qb Rb``, ``A_cat^T = Qa Ra`` (reduced QR), SVD of the small core ``Rb Ra^T = Uc S Vc^T``; then
    ``U = Qb Uc``, ``V = Qa Vc`` are the exact singular vectors of the product. ``k = min(rank, R)``, so asking for
    more than the exact rank returns the exact rank. The error is ``sqrt(sum_{j>k} S_j^2 / sum_j S_j^2)``, exact.
    """
    d_out, R = B_cat.shape
    d_in = A_cat.shape[1]
    p = min(d_out, d_in)
    if rank is not None and rank > p:
        raise ValueError(f"svd_rank {rank} larger than possible (module {module} is {d_out} x {d_in})")
    Bc = B_cat.to(compute_dtype)
    Ac = A_cat.to(compute_dtype)
    Qb, Rb = torch.linalg.qr(Bc)  # [d_out, m], [m, R]
    Qa, Ra = torch.linalg.qr(Ac.mT)  # [d_in, n], [n, R]
    Uc, S, Vch = torch.linalg.svd(Rb @ Ra.mT, full_matrices=False)  # core [m, n]
    if energy is not None:
        k = _rank_for_energy(S, energy)
    else:
        k = min(rank if rank is not None else S.numel(), S.numel())
    root = S[:k].clamp_min(0).sqrt()  # [k]
    B = (Qb @ Uc[:, :k]) * root  # [d_out, k]
    A = root[:, None] * (Vch[:k] @ Qa.mT)  # [k, d_in]
    e = S.double().square()
    tot = float(e.sum())
    err = math.sqrt(max(0.0, float(e[k:].sum())) / tot) if tot > 0 else 0.0
    return A, B, err, "svd_core"


def cat_factors(As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor],
                coefs: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact concatenation: ``A = concat_rows(c_i A_i) [sum r_i, d_in]``, ``B = concat_cols(B_i) [d_out, sum r_i]``,
    with ``c_i = w_i s_i``, so ``B @ A = sum_i w_i s_i B_i A_i``."""
    A = torch.cat([a * float(c) for a, c in zip(As, coefs)], dim=0)
    B = torch.cat(list(Bs), dim=1)
    return A, B


def lowrank_norm(B: torch.Tensor, A: torch.Tensor) -> float:
    """``||B @ A||_F`` from the small Gram matrices: ``sqrt(trace((B^T B)(A A^T)))``."""
    g = (B.mT @ B) * (A @ A.mT).mT  # [R, R]
    return math.sqrt(max(0.0, float(g.sum())))


# --------------------------------------------------------------------------- PEFT's semantics (peft_compat)
def peft_prune_magnitude(t: torch.Tensor, density: float) -> torch.Tensor:
    """PEFT ``magnitude_based_pruning``: keep ``topk(|t|, int(density * numel))``; density >= 1 keeps all."""
    if density >= 1:
        return t
    k = int(density * t.numel())
    mask = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    mask[torch.topk(t.abs().reshape(-1), k=k, largest=True).indices] = 1
    return t * mask.view(t.shape)


def peft_combine(kind: str, tensors: Sequence[torch.Tensor], weights: torch.Tensor, density: float,
                 majority_sign_method: SignMethod, seeds: Sequence[int]) -> torch.Tensor:
    """PEFT's ``merge_utils`` rule ``kind`` over same-shaped tensors (deltas or factors).

    ``ties``/``dare_ties``: sign elected on the UNweighted pruned values, then
    ``sum_{i in S} w_i x_i / max(|S|, 1)``. DARE masks come from ``seeds`` (PEFT draws them from the global RNG,
    so they cannot be reproduced bit for bit).
    """
    w = weights.view(-1, *([1] * tensors[0].dim()))
    if kind in ("linear", "svd"):
        return (torch.stack(list(tensors)) * w).sum(0)
    if kind in ("ties", "magnitude_prune"):
        x = torch.stack([peft_prune_magnitude(t, density) for t in tensors])
    elif kind in ("dare_linear", "dare_ties"):
        x = torch.stack([dare_drop(t, density, s) for t, s in zip(tensors, seeds)])
    else:
        raise ValueError(f"no PEFT rule {kind!r}")
    if kind in ("magnitude_prune", "dare_linear"):
        return (x * w).sum(0)
    sign = torch.sign(x)
    vote = x.sum(0) if majority_sign_method == "total" else sign.sum(0)
    mask = sign == torch.where(vote >= 0, 1, -1)
    return (x * w * mask).sum(0) / mask.sum(0).clamp(min=1.0)


def peft_factorwise(kind: str, As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor], ws: Sequence[float],
                    density: float, majority_sign_method: SignMethod,
                    seeds_a: Sequence[int], seeds_b: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's factor-wise rule for ``linear/ties/dare_*/magnitude_prune``: A and B merged separately.

    ``ws`` are ``w_i * s_i``; A gets ``sign(ws_i) sqrt(|ws_i|)``, B gets ``sqrt(|ws_i|)``. The product of the
    results is NOT ``sum_i w_i s_i B_i A_i`` (cross terms ``B_i A_j``).
    """
    wa = torch.tensor([math.copysign(math.sqrt(abs(x)), x) if x != 0 else 0.0 for x in ws], dtype=As[0].dtype)
    wb = torch.tensor([math.sqrt(abs(x)) for x in ws], dtype=Bs[0].dtype)
    base = kind[:-4] if kind.endswith("_svd") else kind
    A = peft_combine(base, As, wa.to(As[0].device), density, majority_sign_method, seeds_a)
    B = peft_combine(base, Bs, wb.to(Bs[0].device), density, majority_sign_method, seeds_b)
    return A, B


def peft_svd(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's SVD split: full ``torch.linalg.svd``, ``B = U_k diag(S_k)``, ``A = Vh_k`` (no balancing)."""
    U, S, Vh = torch.linalg.svd(delta, full_matrices=True)
    return Vh[:rank, :], U[:, :rank] @ torch.diag(S[:rank])
