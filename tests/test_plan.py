"""The batch plan module: the one spec -> rows translator, and the per-thread plan and training overrides."""

from __future__ import annotations

import threading

import pytest
import torch

from loraplex.compose.spec import ComposeSpecError, parse
from loraplex.errors import LoraplexError, UnknownAdapterError
from loraplex.plan import BatchPlan, NeedsCompositionError, PlanState, TrainOverrides, rows_from_spec

KNOWN = ["a", "b", "c", "top"]


@pytest.mark.parametrize("spec,row", [
    (None, []), ("base", []), ("", []), (parse("base"), []),
    ("a", [("a", 1.0)]), (parse("a"), [("a", 1.0)]),
    ({"a": 0.7, "b": -0.3}, [("a", 0.7), ("b", -0.3)]),
    ([("c", 2), ("a", 1)], [("c", 2.0), ("a", 1.0)]),
    ("blend(a=0.7,b=-0.3)", [("a", 0.7), ("b", -0.3)]),
    ("blend(a=3, b=1, normalize=true)", [("a", 0.75), ("b", 0.25)]),
    ("blend(a)", [("a", 1.0)]),
    ("stack(a,b)", [("a", 1.0), ("b", 1.0)]),
    (parse("stack(c,a,mode=additive)"), [("c", 1.0), ("a", 1.0)]),
])
def test_rows_from_spec_forms(spec, row):
    assert rows_from_spec(spec, KNOWN) == row


def test_rows_from_spec_errors_name_the_adapter():
    with pytest.raises(UnknownAdapterError, match="unknown adapter 'zz'; known adapters: a, b, c, top"):
        rows_from_spec("zz", KNOWN)
    with pytest.raises(UnknownAdapterError, match="'zz'") as exc:
        rows_from_spec("blend(a=1,zz=1)", KNOWN, listed=lambda: KNOWN + ["mix"])
    assert exc.value.known == sorted(KNOWN + ["mix"])
    with pytest.raises(UnknownAdapterError, match="'zz'"):
        rows_from_spec({"a": 1.0, "zz": 1.0}, KNOWN)
    with pytest.raises(LoraplexError, match="a blend is a mapping"):
        rows_from_spec([["a"]], KNOWN)  # type: ignore[list-item]
    with pytest.raises(ComposeSpecError, match=r"column \d+"):
        rows_from_spec("blend(a=heavy)", KNOWN)
    for text in ("moe(router_dir)", "ensemble(a=1,b=1)", "merge(ties;a=1,b=1)", "stack(a,b,mode=inlayer)", "auto"):
        with pytest.raises(NeedsCompositionError) as ne:
            rows_from_spec(parse(text), KNOWN)
        assert ne.value.node == parse(text) and "build_composition" in str(ne.value)
    assert rows_from_spec("blend(x=1,y=2)", None) == [("x", 1.0), ("y", 2.0)]  # names unchecked


def test_rows_from_spec_brings_the_adapters_a_stacked_one_was_trained_on():
    below = {"top": ["c", "a"]}.get
    assert rows_from_spec("top", KNOWN, below=lambda n: below(n) or []) == [("top", 1.0), ("c", 1.0), ("a", 1.0)]
    assert rows_from_spec(parse("top"), KNOWN, below=lambda n: below(n) or []) == [("top", 1.0), ("c", 1.0),
                                                                                      ("a", 1.0)]
    with pytest.raises(LoraplexError, match="'top' was trained on top of 'gone', which is not available"):
        rows_from_spec("top", KNOWN, below=lambda n: ["gone"])


def test_plan_and_overrides_are_per_thread():
    state = PlanState()
    plan = BatchPlan.build([[("a", 1.0)], []], {"a": 1}, torch.device("cpu"))
    ov = TrainOverrides(dropout=0.5)
    seen: dict[str, object] = {}
    entered, checked = threading.Event(), threading.Event()

    def other() -> None:
        entered.wait(10)
        seen["plan"], seen["overrides"] = state.plan, state.overrides
        checked.set()

    t = threading.Thread(target=other)
    t.start()
    with state.planned(plan), state.overriding(ov):
        assert state.plan is plan and state.overrides is ov
        assert state.plan_for(4, "m").rows == [[("a", 1.0)], [("a", 1.0)], [], []]  # rows repeated in place
        with pytest.raises(LoraplexError, match="module 'm' got a batch of 3 rows but the adapter plan has 2"):
            state.plan_for(3, "m")
        entered.set()
        assert checked.wait(10)
    t.join()
    assert seen == {"plan": None, "overrides": None}  # the other thread never saw them
    assert state.plan is None and state.overrides is None  # and they are gone after the block


def test_with_weights_carries_the_gradient():
    plan = BatchPlan.build([[("a", 0.5), ("b", 0.5)], [("b", 1.0)]], {"a": 1, "b": 2}, torch.device("cpu"))
    w = torch.tensor([0.25, 0.75, 1.0], requires_grad=True)
    weighted = plan.with_weights(w)
    assert weighted.segments.weights.requires_grad and weighted.pair_weights is w
    assert torch.equal(plan.pair_weights, torch.tensor([0.5, 0.5, 1.0]))  # the original plan is unchanged
