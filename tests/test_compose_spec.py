"""The composition grammar: parsing, canonical text, errors with positions, name validation."""

from __future__ import annotations

import pytest

from loraplex.compose.spec import (AdapterRef, Auto, Base, Blend, ComposeSpecError, Ensemble, Merge, MoE, Stack,
                                   parse, validate)

CANONICAL = [
    "coding",
    "my-adapter.v2_1",
    "base",
    "auto",
    "blend(a=0.7,b=0.3)",
    "blend(a=0.7,b=-0.3,normalize=true)",
    "blend(a=1e-05,b=2)",
    "stack(a,b)",
    "stack(a,b,c,mode=pipeline)",
    "stack(a,b,mode=inlayer)",
    "moe(runs/exp1/router)",
    "moe(router,top_k=2,mode=soft)",
    "moe('my routers/r 1',top_k=1)",
    "merge(ties;a=0.7,b=0.3;density=0.7)",
    "merge(dare_ties_svd;a=1,b=-1;density=0.2,majority_sign_method=frequency,svd_rank=8,normalize=false)",
    "merge(cat;a=1)",
    "ensemble(a=0.5,b=0.5)",
]


@pytest.mark.parametrize("text", CANONICAL)
def test_canonical_round_trip(text: str) -> None:
    node = parse(text)
    assert str(node) == text
    assert parse(str(node)) == node
    assert hash(node) == hash(parse(text))  # frozen, hashable


def test_each_node_type() -> None:
    assert parse("coding") == AdapterRef("coding")
    assert parse("base") == Base()
    assert parse("auto") == Auto()
    assert parse("blend(a=0.7,b=0.3)") == Blend((("a", 0.7), ("b", 0.3)))
    assert parse("blend(a=2,b=2,normalize=true)").normalized_weights() == {"a": 0.5, "b": 0.5}
    assert parse("stack(a,b)") == Stack(("a", "b"), "additive")
    assert parse("stack(a,b,mode=pipeline)").mode == "pipeline"  # type: ignore[attr-defined]
    assert parse("moe(r, top_k=2, mode=soft)") == MoE("r", 2, "soft")
    assert parse("moe(r)") == MoE("r")
    m = parse("merge(ties;a=0.7,b=0.3;density=0.7)")
    assert m == Merge("ties", (("a", 0.7), ("b", 0.3)), density=0.7)
    assert isinstance(m, Merge) and m.options() == {"density": 0.7} and m.weights == {"a": 0.7, "b": 0.3}
    assert parse("ensemble(a=0.5,b=0.5)") == Ensemble((("a", 0.5), ("b", 0.5)))


def test_adapter_names() -> None:
    assert parse("a").adapter_names() == ("a",)
    assert parse("base").adapter_names() == ()
    assert parse("auto").adapter_names() == ()
    assert parse("blend(x=1,y=2)").adapter_names() == ("x", "y")
    assert parse("stack(x,y,x)").adapter_names() == ("x", "y")
    assert parse("moe(routers/r)").adapter_names() == ()
    assert parse("merge(linear;p,q)").adapter_names() == ("p", "q")
    assert parse("ensemble(u=1)").adapter_names() == ("u",)


def test_whitespace_and_defaults() -> None:
    assert parse("  blend( a = 0.7 ,\tb=0.3 )  ") == parse("blend(a=0.7,b=0.3)")
    assert parse(" merge( ties ; a = 0.7 , b = 0.3 ; density = 0.7 ) ") == parse("merge(ties;a=0.7,b=0.3;density=0.7)")
    assert str(parse("blend(a, b)")) == "blend(a=1,b=1)"  # missing weight is 1
    assert str(parse("stack(a,b,mode=additive)")) == "stack(a,b)"  # default mode omitted
    assert str(parse("blend(a=.5,b=+1.50)")) == "blend(a=0.5,b=1.5)"
    assert str(parse("blend(a=1,normalize=false)")) == "blend(a=1)"
    # an adapter that happens to be called like an option is a plain weighted name
    assert parse("blend(normalize=0.5,b=0.5)").adapter_names() == ("normalize", "b")


def test_programmatic_construction() -> None:
    assert str(Blend({"a": 0.25, "b": 0.75})) == "blend(a=0.25,b=0.75)"
    assert str(Stack(["a", "b"], "inlayer")) == "stack(a,b,mode=inlayer)"
    assert str(MoE("dir with space/r")) == "moe('dir with space/r')"
    with pytest.raises(ComposeSpecError, match="appears twice"):
        Blend([("a", 1.0), ("a", 2.0)])
    with pytest.raises(ComposeSpecError, match="reserved"):
        AdapterRef("base")
    with pytest.raises(ComposeSpecError, match="density"):
        Merge("ties", (("a", 1.0),), density=0.0)


def error_of(text: str) -> ComposeSpecError:
    with pytest.raises(ComposeSpecError) as info:
        parse(text)
    return info.value


@pytest.mark.parametrize(("text", "position", "fragment"), [
    ("blend(a=0.7 b=0.3)", 12, "expected ',' or ')', got 'b'"),
    ("blnd(a=1)", 0, "unknown function 'blnd' (did you mean 'blend'?)"),
    ("blend(a=x)", 8, "weight of 'a': expected a finite number, got 'x'"),
    ("blend(a=nan)", 8, "expected a finite number"),
    ("blend(a=1", 9, "got the end of the spec"),
    ("", 0, "empty composition spec"),
    ("a b", 2, "unexpected 'b' after the end"),
    ("a)", 1, "unexpected ')'"),
    ("stack(a)", 0, "needs at least two adapters"),
    ("stack(a,blend(b=1))", 8, "takes adapter names, not nested expressions"),
    ("stack(a,b,mod=pipeline)", 10, "unknown option 'mod' (did you mean 'mode'?)"),
    ("stack(a,b,mode=serial)", 15, "expected one of additive, inlayer, pipeline, got 'serial'"),
    ("merge(tie;a,b)", 6, "got 'tie' (did you mean 'ties'?)"),
    ("merge(ties a,b)", 11, "expected ';' after the merge method"),
    ("merge(ties;a=1;densty=0.5)", 15, "unknown option 'densty' (did you mean 'density'?)"),
    ("merge(ties;a=1;density=1.5)", 23, "density must be in (0, 1], got 1.5"),
    ("merge(ties;a=1;svd_rank=0)", 24, "expected an integer >= 1, got '0'"),
    ("moe(r,top_k=0)", 12, "top_k: expected an integer >= 1"),
    ("moe(r,top_k=2,mode=top1)", 19, "mode=top1 contradicts top_k=2"),
    ("moe(r,k=2)", 6, "unknown option 'k'"),
    ("moe(top_k=2)", 4, "expected a router folder or name first"),
    ("moe('r)", 4, "unterminated quoted string"),
    ("blend(a=1,a=2)", 10, "adapter 'a' appears twice"),
    ("blend(base=1)", 6, "'base' is a reserved word"),
    ("a/b", 0, "invalid adapter name 'a/b'"),
    ("blend(a=1)x", 10, "unexpected 'x'"),
    ("a$", 1, "unexpected character '$'"),
])
def test_syntax_errors_have_positions(text: str, position: int, fragment: str) -> None:
    err = error_of(text)
    assert err.position == position, str(err)
    assert err.column == position + 1
    assert fragment in err.message, err.message
    lines = str(err).splitlines()
    assert f"(column {position + 1})" in lines[0]
    assert lines[1] == "  " + text
    assert lines[2] == "  " + " " * position + "^"
    assert isinstance(err, ValueError)


def test_caret_points_at_the_error() -> None:
    text = "merge(ties; a=0.7, b=oops)"
    err = error_of(text)
    caret = str(err).splitlines()[2].index("^") - 2
    assert text[caret:].startswith("oops")


def test_validate_names_unknown_adapter_and_lists_known() -> None:
    known = {"coding", "chat", "legal"}
    assert validate("blend(coding=0.5,chat=0.5)", known) == parse("blend(coding=0.5,chat=0.5)")
    assert validate(parse("base"), known) == Base()
    with pytest.raises(ComposeSpecError) as info:
        validate("stack(coding,chatt)", known)
    msg = str(info.value)
    assert "unknown adapter 'chatt'" in msg and "(did you mean 'chat'?)" in msg
    assert "known adapters: chat, coding, legal" in msg
    with pytest.raises(ComposeSpecError, match="unknown adapters 'x', 'y'"):
        validate("merge(ties;x=1,y=1,coding=1)", known)
    with pytest.raises(ComposeSpecError, match=r"known adapters: \(none\)"):
        validate("a", set())


def test_validate_routers() -> None:
    assert validate("moe(r1,top_k=2)", {"a"}, routers={"r1"}) == MoE("r1", 2)
    assert validate("moe(runs/x/router)", {"a"}, routers=set()) == MoE("runs/x/router")
    assert validate("auto", set()) == Auto()  # routers not checked when not given
    with pytest.raises(ComposeSpecError, match="unknown router 'r2'; known routers: r1"):
        validate("moe(r2)", {"a"}, routers={"r1"})
    with pytest.raises(ComposeSpecError, match="'auto' needs a router"):
        validate("auto", {"a"}, routers=set())


def test_normalize_needs_weights_that_do_not_sum_to_zero():
    """``normalize=true`` divides by the weights' sum: a zero sum is an error at parse time (FixedBlend agrees)."""
    with pytest.raises(ComposeSpecError, match="blend: cannot normalise weights a=1,b=-1: they sum to 0"):
        parse("blend(a=1,b=-1,normalize=true)")
    with pytest.raises(ComposeSpecError, match="ensemble: .*sum to 0"):
        Ensemble((("a", 0.5), ("b", -0.5)), normalize=True)
    assert parse("blend(a=1,b=-1)").normalized_weights() == {"a": 1.0, "b": -1.0}  # no normalize: as written
