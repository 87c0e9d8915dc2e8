"""Pure batched LoRA math: every row of a batch applies its own (weighted) set of adapter slots.

Shapes: ``x`` is [N, L, d_in] (N rows, L tokens each), slot stacks are ``A`` [S, r, d_in], ``B`` [S, d_out, r],
``scale`` [S] (alpha/r per slot, 0 for slot 0, the all-zero "no adapter" slot).
A row's adapters are given as *pairs* (row, slot, weight); a plain row has one pair, a blend several.

Reference semantics (what every kernel here must equal)::

    out = zeros(N, L, d_out)
    for row, slot, w in pairs:
        out[row] += w * scale[slot] * (x[row] @ A[slot].T @ B[slot].T)

An embedding layer is the same map of a one-hot token: ``x[row] @ A[slot].T`` is the gather
``A[slot][:, ids[row]].T`` (:func:`lora_embedding`, ids [N, L], ``A`` [S, r, num_embeddings]).

DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", as PEFT implements it) rescales a row's whole
output per output feature: ``y = g * (W x + s B A x) + bias`` with ``g = m / ||W + s B A||`` (row norms of the
[d_out, d_in] weight, treated as a constant). ``g`` depends on the weights only (:func:`dora_scale`); it is applied
after the shared base matmul and LoRA update (:func:`dora_rescale`), so a mixed batch with DoRA rows stays one pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Segments:
    """Pairs sorted by slot: ``rows[start:end]`` all use ``slot``; computed once per forward, on the host."""

    rows: torch.Tensor  # [P] long, row of each pair, sorted by slot (stable)
    weights: torch.Tensor  # [P] float, user weight of each pair (same order)
    slots: torch.Tensor  # [P] long, slot of each pair (same order)
    bounds: tuple[tuple[int, int, int], ...]  # (slot, start, end) per distinct non-zero slot
    row_ranges: tuple[tuple[int, int, int], ...] | None  # (slot, row0, row1) when each segment is a run of
    # consecutive rows with weight 1: then no gather/scatter is needed at all
    n_rows: int
    # the segments padded to one length m for a single bmm over distinct slots (``lora_segbmm``):
    seg_slots: torch.Tensor | None = None  # [S] long, the distinct slots
    pad_rows: torch.Tensor | None = None  # [S * m] long, row of each padded position (pads: row 0)
    pad_weights: torch.Tensor | None = None  # [S * m] float, weight of each padded position (pads: 0)
    slot_range: tuple[int, int] | None = None  # (lo, hi) when the distinct slots are lo, lo+1, .., hi-1: factors sliced
    pad_identity: bool = False  # the padded layout is rows 0..N-1 in order (equal segments): no gather/scatter

    @property
    def identity(self) -> bool:
        """Every row uses exactly one adapter, in row order, weight 1.

        ``row_ranges`` are sorted by slot, so the pairs are in row order only when the ranges also follow each
        other (rows ``["b", "a"]`` with a in slot 1 give two runs but pair order [1, 0]: not the identity).
        """
        rr = self.row_ranges
        if rr is None or self.rows.numel() != self.n_rows:
            return False
        return all(prev[2] == nxt[1] for prev, nxt in zip(rr, rr[1:])) and (not rr or rr[0][1] == 0)


def make_segments(pair_rows: torch.Tensor, pair_slots: torch.Tensor, pair_weights: torch.Tensor,
                  n_rows: int, device: torch.device | str | None = None) -> Segments:
    """Group (row, slot, weight) pairs (host tensors) by slot, dropping slot 0 and zero weights."""
    keep = (pair_slots != 0) & (pair_weights != 0)
    rows, slots, weights = pair_rows[keep], pair_slots[keep], pair_weights[keep]
    order = torch.argsort(slots, stable=True)
    rows, slots, weights = rows[order], slots[order], weights[order]
    uniq, counts = torch.unique_consecutive(slots, return_counts=True)
    bounds, start = [], 0
    for s, c in zip(uniq.tolist(), counts.tolist()):
        bounds.append((int(s), start, start + int(c)))
        start += int(c)
    row_ranges: tuple[tuple[int, int, int], ...] | None = None
    if bool((weights == 1).all()):
        ranges = []
        for slot, s, e in bounds:
            r0 = int(rows[s])
            if not torch.equal(rows[s:e], torch.arange(r0, r0 + e - s)):
                break
            ranges.append((slot, r0, r0 + e - s))
        else:
            row_ranges = tuple(ranges)
    pad_rows, pad_weights = _pad_segments(rows, weights, bounds)
    slot_list = [b[0] for b in bounds]
    seg_slots = torch.tensor(slot_list, dtype=torch.long)
    slot_range = (slot_list[0], slot_list[-1] + 1) if slot_list and slot_list == list(
        range(slot_list[0], slot_list[-1] + 1)) else None
    pad_identity = pad_rows.numel() == n_rows and bool((weights == 1).all()) and torch.equal(
        pad_rows, torch.arange(n_rows))
    if device is not None and torch.device(device).type != "cpu":
        rows, weights, slots, seg_slots, pad_rows, pad_weights = (
            t.to(device, non_blocking=True) for t in (rows, weights, slots, seg_slots, pad_rows, pad_weights))
    return Segments(rows, weights, slots, tuple(bounds), row_ranges, n_rows, seg_slots, pad_rows, pad_weights,
                    slot_range, pad_identity)


def _pad_segments(rows: torch.Tensor, weights: torch.Tensor, bounds: list[tuple[int, int, int]]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(padded rows [S*m], padded weights [S*m]): segment k fills positions k*m .. k*m+len-1, pads are row 0 with
    weight 0."""
    n_seg = len(bounds)
    m = max((e - s for _, s, e in bounds), default=0)
    pad_rows = torch.zeros(n_seg * m, dtype=torch.long)
    pad_weights = torch.zeros(n_seg * m, dtype=weights.dtype)
    for k, (_, s, e) in enumerate(bounds):
        pad_rows[k * m:k * m + e - s] = rows[s:e]
        pad_weights[k * m:k * m + e - s] = weights[s:e]
    return pad_rows, pad_weights


def lora_sgmv(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor, seg: Segments,
              out: torch.Tensor | None = None, ranks: list[int] | None = None) -> torch.Tensor:
    """Sort+segment LoRA: one (x A^T) B^T matmul pair per distinct adapter, added into ``out`` [N, L, d_out].

    ``ranks[slot]`` (optional) is each slot's true rank: padded rank columns are skipped, a 0 skips the slot.
    ``out`` is updated in place when given and autograd is off; otherwise a new tensor is returned.
    """
    n, length, _ = x.shape
    d_out = B.shape[1]
    inplace = out is not None and not torch.is_grad_enabled()
    if seg.row_ranges is not None:
        # each adapter's rows are consecutive, weight 1: slice rows instead of gathering them
        if inplace:
            for slot, r0, r1 in seg.row_ranges:
                rk = A.shape[1] if ranks is None else ranks[slot]
                if rk:
                    v = torch.matmul(x[r0:r1], A[slot, :rk].t()).mul_(scale[slot])  # [n_s, L, r]
                    o = out[r0:r1]
                    if o.is_contiguous():  # rows of a contiguous [N, L, d_out] are contiguous
                        o.view(-1, o.shape[-1]).addmm_(v.view(-1, rk), B[slot, :, :rk].t())
                    else:
                        o.add_(torch.matmul(v, B[slot, :, :rk].t()))  # [n_s, L, d_out]
            return out
        if seg.identity:
            parts = [_segment(x[r0:r1], A, B, slot, scale[slot], ranks) for slot, r0, r1 in seg.row_ranges]
            upd = torch.cat(parts, 0)  # [N, L, d_out]
            return upd if out is None else out + upd
    xs = x.index_select(0, seg.rows)  # [P, L, d_in]
    w = seg.weights.to(x.dtype) * scale.index_select(0, seg.slots).to(x.dtype)  # [P]
    parts = [_segment(xs[s:e], A, B, slot, w[s:e, None, None], ranks) for slot, s, e in seg.bounds]
    upd = torch.cat(parts, 0) if parts else x.new_zeros(0, length, d_out)  # [P, L, d_out]
    if inplace:
        return out.index_add_(0, seg.rows, upd)
    base = out if out is not None else x.new_zeros(n, length, d_out)
    return base.index_add(0, seg.rows, upd)


def _segment(xs: torch.Tensor, A: torch.Tensor, B: torch.Tensor, slot: int, w: torch.Tensor,
             ranks: list[int] | None) -> torch.Tensor:
    """``w * xs A[slot]^T B[slot]^T`` for one segment ([n_s, L, d_in] -> [n_s, L, d_out])."""
    rk = A.shape[1] if ranks is None else ranks[slot]
    if rk == 0:
        return xs.new_zeros(*xs.shape[:-1], B.shape[1])
    v = torch.matmul(xs, A[slot, :rk].t()) * w  # [n_s, L, r]
    return torch.matmul(v, B[slot, :, :rk].t())


def lora_bgmv(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor, seg: Segments,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """Gather+bmm LoRA: each pair gathers its slot's factors; best for small decode batches (L == 1)."""
    n, length, _ = x.shape
    d_out = B.shape[1]
    if seg.rows.numel() == 0:
        return out if out is not None else x.new_zeros(n, length, d_out)
    xs = x if seg.identity else x.index_select(0, seg.rows)  # [P, L, d_in]
    w = seg.weights.to(x.dtype) * scale.index_select(0, seg.slots).to(x.dtype)  # [P]
    v = torch.bmm(xs, A.index_select(0, seg.slots).transpose(1, 2))  # [P, L, r]
    v = v * w[:, None, None]
    upd = torch.bmm(v, B.index_select(0, seg.slots).transpose(1, 2))  # [P, L, d_out]
    return _add_rows(out, upd, None if seg.identity else seg.rows, n)


def lora_segbmm(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor, seg: Segments,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """Segments padded to one length, two ``bmm``s over the distinct slots: each adapter's factors are read once
    (like sort+segment) in a fixed number of ops (like gather+bmm). Best for decode batches with many adapters;
    padding costs compute proportional to the longest segment, so prefill uses :func:`lora_sgmv`."""
    n, length, d_in = x.shape
    d_out = B.shape[1]
    if seg.seg_slots is None or seg.pad_rows is None or seg.pad_weights is None or seg.seg_slots.numel() == 0:
        return out if out is not None else x.new_zeros(n, length, d_out)
    n_seg = seg.seg_slots.numel()
    m = seg.pad_rows.numel() // n_seg
    xs = (x if seg.pad_identity else x.index_select(0, seg.pad_rows)).reshape(n_seg, m * length, d_in)  # [S, m*L, d_in]
    if seg.slot_range is not None:  # consecutive slots: views, no copy of the factors
        lo, hi = seg.slot_range
        a, b, sc = A[lo:hi], B[lo:hi], scale[lo:hi]  # [S, r, d_in], [S, d_out, r], [S]
    else:
        a, b, sc = (t.index_select(0, seg.seg_slots) for t in (A, B, scale))
    v = torch.bmm(xs, a.transpose(1, 2)).view(n_seg, m, length, -1)  # [S, m, L, r]
    if seg.pad_identity:
        v = v * sc.to(x.dtype)[:, None, None, None]
    else:
        v = v * (seg.pad_weights.to(x.dtype).view(n_seg, m) * sc.to(x.dtype)[:, None])[:, :, None, None]
    upd = torch.bmm(v.view(n_seg, m * length, -1), b.transpose(1, 2)).view(n_seg * m, length, d_out)  # [S*m, L, d_out]
    return _add_rows(out, upd, None if seg.pad_identity else seg.pad_rows, n)


def lora_mixed(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor, seg: Segments, kernel: str,
               out: torch.Tensor | None = None, ranks: list[int] | None = None) -> torch.Tensor:
    """The rows' LoRA updates on ``seg`` through ``kernel`` ("bgmv" | "segbmm" | "sgmv", or "auto":
    :func:`choose_kernel` for ``x``'s tokens per row), added into ``out`` [N, L, d_out] as the kernels do;
    ``ranks`` (sgmv) skips padded rank columns."""
    if kernel == "auto":
        kernel = choose_kernel(seg, x.shape[1])
    if kernel == "bgmv":
        return lora_bgmv(x, A, B, scale, seg, out=out)
    if kernel == "segbmm":
        return lora_segbmm(x, A, B, scale, seg, out=out)
    return lora_sgmv(x, A, B, scale, seg, out=out, ranks=ranks)


def _add_rows(out: torch.Tensor | None, upd: torch.Tensor, rows: torch.Tensor | None, n: int) -> torch.Tensor:
    """``out`` [N, L, d_out] plus ``upd`` [P, L, d_out] added at ``rows`` [P] (None: P == N in row order); in place
    when autograd is off, a new tensor otherwise (``out`` None: zeros)."""
    inplace = out is not None and not torch.is_grad_enabled()
    if rows is None:
        if out is None:
            return upd
        return out.add_(upd) if inplace else out + upd
    if inplace:
        return out.index_add_(0, rows, upd)
    base = out if out is not None else upd.new_zeros(n, *upd.shape[1:])
    return base.index_add(0, rows, upd)


def lora_single(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float | torch.Tensor,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """Every row uses one adapter: ``out + scaling * x A^T B^T`` with ``A`` [r, d_in], ``B`` [d_out, r]."""
    if out is not None and not torch.is_grad_enabled() and out.is_contiguous():
        v = torch.matmul(x, A.t()).mul_(scaling)  # [..., r]
        out.view(-1, out.shape[-1]).addmm_(v.view(-1, v.shape[-1]), B.t())  # no [..., d_out] temporary
        return out
    v = torch.matmul(x, A.t()) * scaling  # [..., r]
    upd = torch.matmul(v, B.t())  # [..., d_out]
    return upd if out is None else out + upd


def stack_columns(factors: list[list[tuple[torch.Tensor, torch.Tensor, float] | None]], widths: list[int]
                  ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Several adapters' factors for several outputs that read one input, as one down- and one up-projection.

    ``factors[k][j]`` is adapter k's ``(A [r, d_in], B [d_out_j, r], scaling)`` for output j (of width
    ``widths[j]``), or None where it does not adapt that output. Returns ``a`` [d_in, C] (each pair's
    ``scaling * A^T``, adapter by adapter, output by output), ``b`` [C, sum(widths)] (each pair's ``B^T`` in its
    output's columns, zeros elsewhere) and the number of columns of each adapter, so that for x [N, d_in]::

        (x @ a)[:, cols_k] @ b[cols_k] == concat_j(scaling_kj * x A_kj^T B_kj^T)     # adapter k alone
    """
    first = next(f for per in factors for f in per if f is not None)
    dtype, device = first[0].dtype, first[0].device
    a_parts, b_parts, cols = [], [], []
    for per in factors:
        blocks = []  # one per output: B^T [r, d_out_j], or [0, d_out_j] where the adapter leaves it alone
        for f, w in zip(per, widths):
            if f is None:
                blocks.append(torch.zeros(0, w, dtype=dtype, device=device))
                continue
            A, B, scaling = f
            a_parts.append(A.t() * scaling)  # [d_in, r]
            blocks.append(B.t())  # [r, d_out_j]
        b_parts.append(torch.block_diag(*blocks))  # [C_k, W]
        cols.append(b_parts[-1].shape[0])
    return torch.cat(a_parts, dim=1), torch.cat(b_parts, dim=0), cols


def column_weights(pair_rows: torch.Tensor, pair_index: torch.Tensor, pair_weights: torch.Tensor, cols: list[int],
                   n_rows: int) -> torch.Tensor:
    """[N, C] weight of each row on each column of :func:`stack_columns`' layout: pair p puts
    ``pair_weights[p]`` on the ``cols[pair_index[p]]`` columns of adapter ``pair_index[p]`` in row
    ``pair_rows[p]`` (index -1: the pair adds nothing)."""
    keep = pair_index >= 0
    per_adapter = torch.zeros(n_rows, len(cols), dtype=torch.float32)  # [N, K]
    per_adapter.index_put_((pair_rows[keep], pair_index[keep]), pair_weights[keep].float(), accumulate=True)
    return per_adapter.repeat_interleave(torch.tensor(cols), dim=1)  # [N, C]


def lora_columns(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, weights: torch.Tensor | None,
                 out: torch.Tensor) -> torch.Tensor:
    """``out += ((x @ a) * weights) @ b`` in place, for ``x`` [N, d_in], ``a`` [d_in, C], ``b`` [C, W],
    ``weights`` [N, C] (None: all ones) and ``out`` [N, W] (it may be a column slice): every row's adapters
    (:func:`stack_columns`, :func:`column_weights`) in three ops. Rows pay for every adapter's columns, so this
    suits few distinct adapters and one token per row."""
    t = torch.mm(x.to(a.dtype), a)  # [N, C]
    if weights is not None:
        t.mul_(weights)
    return out.addmm_(t, b)


def lora_reference(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor,
                   pair_rows: list[int], pair_slots: list[int], pair_weights: list[float]) -> torch.Tensor:
    """Plain per-pair loop (slow, for tests): the definition the kernels implement."""
    n, length, _ = x.shape
    out = x.new_zeros(n, length, B.shape[1])
    for r, s, w in zip(pair_rows, pair_slots, pair_weights):
        out[r] += w * scale[s] * (x[r] @ A[s].t() @ B[s].t())
    return out


def choose_kernel(seg: Segments, tokens_per_row: int) -> str:
    """The kernel for a mixed batch: ``"segbmm"``, ``"sgmv"`` or ``"bgmv"`` (never a per-row loop).

    Measured on CPU (hidden 1024, r=16, 16 rows, 7 Llama target shapes; ``benchmarks/kernel_choice.py``):

    * decode steps (<= 4 tokens per row): ``segbmm`` (each adapter's factors read once, a fixed number of ops;
      1.4-2.9x faster than sgmv with 8-16 adapters), except two uneven segments of grouped rows (``sgmv``) and
      layouts where padding would more than triple the rows (one big segment and many single rows: ``bgmv``);
    * prefill, segments of (nearly) equal length -- one or two rows per adapter -- with more than two adapters or
      rows not grouped by adapter: ``segbmm`` (no padding waste; 1.3-2x faster than sgmv);
    * prefill with each adapter's rows consecutive and at most 8 adapters: ``sgmv`` (slices, no gather, few
      enough segments that per-segment calls are cheap; padding uneven segments would waste up to 8x compute);
    * otherwise (prefill with rows scattered or blended, or many uneven segments): ``bgmv``, which gathers each
      row's factors instead of its activations and pads nothing.
    """
    n_seg = len(seg.bounds)
    pairs = seg.rows.numel()
    if n_seg <= 1:
        return "sgmv"
    padded = seg.pad_rows.numel() if seg.pad_rows is not None else None
    grouped = seg.row_ranges is not None  # each adapter's rows consecutive, weight 1
    near_equal = padded is not None and padded * 8 <= pairs * 9  # padding adds at most 1/8
    if tokens_per_row <= 4:
        if grouped and n_seg <= 2 and not near_equal:
            return "sgmv"
        return "bgmv" if padded is None or padded > 3 * pairs else "segbmm"
    if near_equal and (n_seg > 2 or not grouped):
        return "segbmm"
    if grouped and n_seg <= 8:
        return "sgmv"
    return "bgmv"


def lora_embedding(ids: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor, seg: Segments,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """Embedding LoRA for a mixed batch: each pair gathers its slot's ``A`` columns at the row's token ids.

    ``ids`` [N, L] long, ``A`` [S, r, num_embeddings], ``B`` [S, dim, r]; adds
    ``w * scale[slot] * A[slot][:, ids[row]].T @ B[slot].T`` into ``out`` [N, L, dim] (in place when autograd is off).
    """
    n, length = ids.shape
    d_out = B.shape[1]
    if seg.rows.numel() == 0:
        return out if out is not None else B.new_zeros(n, length, d_out)
    rows = None if seg.identity else seg.rows
    idx = ids if rows is None else ids.index_select(0, rows)  # [P, L]
    w = seg.weights.to(A.dtype) * scale.index_select(0, seg.slots).to(A.dtype)  # [P]
    v = A.transpose(1, 2)[seg.slots[:, None], idx]  # [P, L, r]: A[slot][:, ids].T
    v = v * w[:, None, None]
    upd = torch.bmm(v, B.index_select(0, seg.slots).transpose(1, 2))  # [P, L, dim]
    return _add_rows(out, upd, rows, n)


def lora_embedding_single(ids: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float | torch.Tensor,
                          out: torch.Tensor | None = None) -> torch.Tensor:
    """Every row uses one embedding adapter: ``out + scaling * A[:, ids].T @ B.T`` (``A`` [r, num], ``B`` [dim, r])."""
    v = torch.nn.functional.embedding(ids, A.t()) * scaling  # [..., r]
    upd = torch.matmul(v, B.t())  # [..., dim]
    if out is None:
        return upd
    return out.add_(upd) if not torch.is_grad_enabled() else out + upd


def dora_weight_norm(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float | torch.Tensor
                     ) -> torch.Tensor:
    """Row L2 norms ``||W + s B A||`` [d_out] of the adapted weight, without gradient (DoRA's denominator, and its
    magnitude's initial value).

    ``W`` [d_out, d_in] (the base weight, Conv1D / Embedding already transposed), ``A`` [r, d_in], ``B`` [d_out, r].
    Computed in float32 (or the inputs' dtype when wider)."""
    dt = torch.promote_types(torch.promote_types(W.dtype, A.dtype), torch.float32)
    with torch.no_grad():
        eff = W.to(dt) + float(scaling) * (B.detach().to(dt) @ A.detach().to(dt))  # [d_out, d_in]
        return torch.linalg.vector_norm(eff, dim=1)  # [d_out]


def dora_scale(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float | torch.Tensor,
               magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA's per-output-feature factor ``g = m / ||W + s B A||`` [d_out] (:func:`dora_weight_norm`; the norm
    carries no gradient, ``m`` [d_out] does, as in the DoRA paper's section 4.3 and PEFT)."""
    return magnitude / dora_weight_norm(W, A, B, scaling).to(device=magnitude.device, dtype=magnitude.dtype)


def dora_rescale(y: torch.Tensor, gain: torch.Tensor, shift: torch.Tensor | None = None) -> torch.Tensor:
    """``gain * y + shift`` with ``shift = (1 - gain) * bias`` (:func:`dora_shift`), i.e. ``gain * (y - bias) + bias``
    per row: ``y`` [N, L, d_out] (base output plus LoRA updates), ``gain`` [N, 1, d_out] or [d_out] (1 for rows
    without DoRA), ``shift`` of the same shape or None (no bias). In place when autograd is off."""
    if not torch.is_grad_enabled():
        y.mul_(gain)
        return y if shift is None else y.add_(shift)
    out = y * gain
    return out if shift is None else out + shift


def dora_shift(gain: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """``(1 - gain) * bias`` (None without a bias): what :func:`dora_rescale` adds so the bias is not rescaled."""
    return None if bias is None else (1 - gain) * bias.to(gain.dtype)


def dora_reference(x: torch.Tensor, W: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor, B: torch.Tensor,
                   scaling: float, magnitude: torch.Tensor) -> torch.Tensor:
    """One DoRA layer by its definition (slow, for tests): ``(m / ||W + s B A||) * (W + s B A) x + bias``."""
    eff = W + scaling * (B @ A)  # [d_out, d_in]
    y = x @ (eff * (magnitude / torch.linalg.vector_norm(eff, dim=1))[:, None]).t()
    return y if bias is None else y + bias
