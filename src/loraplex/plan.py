"""The batch plan: which adapter slots each row of a forward uses, with which weights, per thread.

* :func:`rows_from_spec` -- the one translator from what a caller names (an adapter, ``base``, a blend mapping, a
  composition spec such as ``blend(a=0.7,b=0.3)`` or its parsed :mod:`loraplex.compose.spec` node) to a
  :data:`RowSpec`, the ``[(adapter, weight), ...]`` of one row.
* :class:`BatchPlan` -- the rows' (row, slot, weight) pairs and their kernel segments, built once per forward
  (host side) and read by every wrapped layer.
* :class:`PlanState` -- the plan of the forward in progress and the :class:`TrainOverrides` of a training step,
  both per thread: a serving thread never sees another thread's plan or training stacks.
"""

from __future__ import annotations

import dataclasses
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Container, Iterable, Iterator, Mapping, Sequence

import torch

from loraplex import ops
from loraplex.compose import spec as grammar
from loraplex.errors import LoraplexError, UnknownAdapterError

RowSpec = list[tuple[str, float]]  # one row: [(adapter name, weight), ...]; [] means base model only

#: What one row of a batch may ask for: an adapter name, None / "base" (no adapter), a blend {name: weight} or
#: [(name, weight), ...], composition-spec text (``blend(...)``, additive ``stack(...)``) or a parsed spec node.
RowChoice = str | None | Mapping[str, float] | Sequence[tuple[str, float]] | grammar.Node
BASE_NAMES = (None, "base", "")


class NeedsCompositionError(LoraplexError, ValueError):
    """A spec that is not one weighted set of adapters per row (``moe``, ``auto``, ``ensemble``, ``merge``, a
    non-additive ``stack``): it runs through :func:`loraplex.compose.build.build_composition`. ``node`` is the
    parsed spec."""

    def __init__(self, node: grammar.Node) -> None:
        self.node = node
        super().__init__(f"{str(node)!r} is not a per-row blend of adapters; run it with "
                         f"loraplex.compose.build_composition(plex, {str(node)!r})")


# --------------------------------------------------------------------------------------------- spec -> rows
def rows_from_spec(spec: RowChoice, known: Container[str] | None, *, listed: Callable[[], Iterable[str]] | None = None,
                   below: Callable[[str], Sequence[str]] | None = None) -> RowSpec:
    """One row's ``[(adapter, weight), ...]`` for ``spec``; every adapter must be in ``known`` (None: names are
    not checked here, the caller checks them).

    ``spec``: None / ``"base"`` / ``""`` (no adapter, ``[]``); an adapter name; a mapping ``{name: weight}`` or a
    sequence of ``(name, weight)`` (weights as given); composition-spec text or a parsed node: a name, ``base``,
    ``blend(...)`` (normalised when it says ``normalize=true``) or an additive ``stack(...)`` (every weight 1).
    ``listed()``: the names an :class:`UnknownAdapterError` lists as known (default: ``known``'s). ``below(name)``: the
    adapters ``name`` was trained on top of (``stack_on``), added with its weight when a single adapter is named.

    Raises :class:`UnknownAdapterError`, :class:`~loraplex.compose.spec.ComposeSpecError` (malformed text),
    :class:`LoraplexError` (a malformed blend) or :class:`NeedsCompositionError`.
    """
    def check(name: str) -> str:
        if known is not None and name not in known:
            raise UnknownAdapterError(name, list(listed() if listed is not None else known))  # type: ignore[arg-type]
        return name

    is_text = isinstance(spec, str) and "(" in spec and (known is None or spec not in known)
    if is_text or isinstance(spec, grammar.Node):
        return _rows_of_node(grammar.parse(spec), check, below, known)
    if spec in BASE_NAMES:
        return []
    if isinstance(spec, str):
        return _with_below([(check(spec), 1.0)], below, known)
    items = list(spec.items()) if isinstance(spec, Mapping) else list(spec)  # type: ignore[union-attr]
    row: RowSpec = []
    for item in items:
        if not (isinstance(item, tuple) and len(item) == 2):
            raise LoraplexError(f"a blend is a mapping {{adapter: weight}} or a list of (adapter, weight); "
                                f"got {item!r}")
        name, w = item
        row.append((check(name), float(w)))
    return row


def _rows_of_node(node: grammar.Node, check: Callable[[str], str], below: Callable[[str], Sequence[str]] | None,
                  known: Container[str] | None) -> RowSpec:
    if isinstance(node, grammar.Base):
        return []
    if isinstance(node, grammar.AdapterRef):
        return _with_below([(check(node.name), 1.0)], below, known)
    if isinstance(node, grammar.Blend):
        return [(check(n), float(w)) for n, w in node.normalized_weights().items()]
    if isinstance(node, grammar.Stack) and node.mode == "additive":
        return [(check(n), 1.0) for n in node.adapter_names()]
    raise NeedsCompositionError(node)


def _with_below(row: RowSpec, below: Callable[[str], Sequence[str]] | None, known: Container[str] | None
                ) -> RowSpec:
    """``row`` plus the frozen adapters its adapters were trained on (each with the weight of the one above)."""
    if below is None:
        return row
    out = list(row)
    for name, w in row:
        for base in below(name):
            if known is not None and base not in known:
                raise LoraplexError(f"adapter {name!r} was trained on top of {base!r}, which is not available")
            if all(base != n for n, _ in out):
                out.append((base, w))
    return out


# --------------------------------------------------------------------------------------------- the plan
@dataclass
class BatchPlan:
    """Per-row adapter slots and weights for one forward (or one ``generate``)."""

    n_rows: int
    rows: list[RowSpec]  # names and weights, row by row
    pair_rows: torch.Tensor  # [P] long (host)
    pair_slots: torch.Tensor  # [P] long (host)
    pair_weights: torch.Tensor  # [P] float (host, or a differentiable tensor: see with_weights)
    device: torch.device
    segments: ops.Segments
    uniform_slot: int | None  # every row uses this one slot with weight 1
    memo: dict[Any, Any] = field(default_factory=dict)  # plans and owners derived from this one

    @classmethod
    def build(cls, rows: list[RowSpec], slot_of: Mapping[str, int], device: torch.device) -> "BatchPlan":
        """Plan for ``rows`` given the adapters' device slots."""
        pr, ps, pw = [], [], []
        for i, row in enumerate(rows):
            for name, w in row:
                pr.append(i)
                ps.append(slot_of[name])
                pw.append(float(w))
        pair_rows = torch.tensor(pr, dtype=torch.long)
        pair_slots = torch.tensor(ps, dtype=torch.long)
        pair_weights = torch.tensor(pw, dtype=torch.float32)
        seg = ops.make_segments(pair_rows, pair_slots, pair_weights, len(rows), device)
        uniform = None
        if seg.identity and len(seg.bounds) == 1:
            uniform = seg.bounds[0][0]
        return cls(len(rows), rows, pair_rows, pair_slots, pair_weights, torch.device(device), seg, uniform)

    @property
    def all_base(self) -> bool:
        return not self.segments.bounds

    def with_weights(self, pair_weights: torch.Tensor) -> "BatchPlan":
        """The plan with ``pair_weights`` [P] (same pair order as :meth:`build`) in its segments; the tensor may
        carry a gradient, which then reaches every wrapped layer's update."""
        seg = ops.make_segments(self.pair_rows, self.pair_slots, pair_weights, self.n_rows, self.device)
        return dataclasses.replace(self, pair_weights=pair_weights, segments=seg, memo={})

    def expanded(self, factor: int) -> "BatchPlan":
        """The plan with each row repeated ``factor`` times in place (beam search, num_return_sequences)."""
        if factor == 1:
            return self
        key = ("expand", factor)
        if key not in self.memo:
            rows = [r for r in self.rows for _ in range(factor)]
            slot_of = {n: int(s) for n, s in zip(
                [n for row in self.rows for n, _ in row], self.pair_slots.tolist())}
            self.memo[key] = BatchPlan.build(rows, slot_of, self.device)
        return self.memo[key]

    def owners(self, adapters_with_module: frozenset[str]) -> list[str | None]:
        """Per row, the first adapter of the row that has its own copy of a ``modules_to_save`` module."""
        key = ("owners", adapters_with_module)
        if key not in self.memo:
            out: list[str | None] = []
            for row in self.rows:
                owner = next((n for n, w in row if n in adapters_with_module and w != 0), None)
                out.append(owner)
            self.memo[key] = out
        return self.memo[key]


@dataclass(frozen=True)
class TrainOverrides:
    """What a training step changes in the wrapped layers' computation, for the thread that sets it.

    ``stacks``: {module path: (A [S, r_max, d_in], B [S, d_out, r_max])}, differentiable slot stacks a layer uses
    instead of its frozen ones (layers not named keep theirs). ``dropout``: LoRA dropout probability on every
    row's layer input. ``row_dropout``: [N] per-row probabilities, used instead of ``dropout`` when the batch has
    N rows. ``magnitudes``: {module path: {slot: m [d_out]}}, the differentiable DoRA magnitudes of trained slots
    (the layer recomputes their gain ``m / ||W + s B A||`` from the stacks each step).
    """

    stacks: Mapping[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    dropout: float = 0.0
    row_dropout: torch.Tensor | None = None
    magnitudes: Mapping[str, Mapping[int, torch.Tensor]] = field(default_factory=dict)


class PlanState:
    """The plan of the forward in progress and the training overrides, shared by every wrapped layer of one
    model; both are per thread."""

    def __init__(self) -> None:
        self._local = threading.local()

    @property
    def plan(self) -> BatchPlan | None:
        return getattr(self._local, "plan", None)

    @property
    def overrides(self) -> TrainOverrides | None:
        return getattr(self._local, "overrides", None)

    @contextmanager
    def planned(self, plan: BatchPlan | None) -> Iterator[BatchPlan | None]:
        """Every forward of this thread inside the block uses ``plan`` (the previous plan comes back after)."""
        previous = self.plan
        self._local.plan = plan
        try:
            yield plan
        finally:
            self._local.plan = previous

    @contextmanager
    def overriding(self, overrides: TrainOverrides | None) -> Iterator[None]:
        """Every forward of this thread inside the block computes with ``overrides``."""
        previous = self.overrides
        self._local.overrides = overrides
        try:
            yield
        finally:
            self._local.overrides = previous

    def plan_for(self, n_rows: int, module_name: str) -> BatchPlan | None:
        """This thread's plan for a batch of ``n_rows`` (expanded when generation repeats rows)."""
        plan = self.plan
        if plan is None or plan.n_rows == n_rows:
            return plan
        if n_rows % plan.n_rows == 0:
            return plan.expanded(n_rows // plan.n_rows)
        raise LoraplexError(f"module {module_name!r} got a batch of {n_rows} rows but the adapter plan has "
                            f"{plan.n_rows} rows (one adapter entry per input row is needed)")
