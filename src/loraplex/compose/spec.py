"""A small composition grammar: how the CLI, the training config and the server name a mix of adapters.

Grammar (whitespace is ignored between tokens)::

    spec     := NAME | "base" | "auto" | call
    call     := "blend(" weighted ["," "normalize=" BOOL] ")"           delta-level weighted sum, one pass
              | "ensemble(" weighted ["," "normalize=" BOOL] ")"        logit-level mix, K+1 passes
              | "stack(" NAME {"," NAME} ["," "mode=" STACK_MODE] ")"   STACK_MODE: additive (default) |
                                                                         inlayer | pipeline
              | "moe(" ROUTER {"," MOE_OPT} ")"                          MOE_OPT: top_k=INT | mode=top1|topk|soft
              | "merge(" METHOD ";" weighted [";" OPT {"," OPT}] ")"
        OPT: density=NUM | majority_sign_method=total|frequency | svd_rank=INT | normalize=BOOL | peft_compat=BOOL
    weighted := NAME ["=" NUMBER] {"," NAME ["=" NUMBER]}               a missing weight is 1; weights may be negative
    NAME     := [A-Za-z0-9_.-]+   ("base" and "auto" are reserved)
    ROUTER   := a router name or folder path (letters, digits, _ . - / \\ ~ :), or a quoted string

Arguments of ``blend``/``stack``/``merge``/``ensemble`` are adapter (or merge) names, not nested expressions.
``parse(text)`` returns a frozen node; ``str(node)`` is its canonical text, and ``parse(str(node)) == node``.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

from loraplex.errors import LoraplexError

__all__ = [
    "COMBINATION_TYPES", "FUNCTIONS", "MAJORITY_SIGN_METHODS", "MOE_MODES", "NAME_RE", "RESERVED", "STACK_MODES",
    "AdapterRef", "Auto", "Base", "Blend", "ComposeSpecError", "Ensemble", "Merge", "MoE", "Node", "Stack",
    "is_valid_name", "parse", "validate",
]

#: Adapter and merge names.
NAME_RE = re.compile(r"[A-Za-z0-9_.\-]+")
#: Words that are spec keywords and cannot name an adapter.
RESERVED = frozenset({"base", "auto"})
#: Function names of the grammar.
FUNCTIONS = ("blend", "stack", "moe", "merge", "ensemble")
STACK_MODES = ("additive", "inlayer", "pipeline")
MOE_MODES = ("top1", "topk", "soft")
#: Merge methods (the names PEFT's ``add_weighted_adapter`` and Ludwig use for ``combination_type``).
COMBINATION_TYPES = (
    "linear", "svd", "cat", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd",
    "magnitude_prune", "magnitude_prune_svd", "task_arithmetic",
)
MAJORITY_SIGN_METHODS = ("total", "frequency")

_ATOM_RE = re.compile(r"[A-Za-z0-9_.+\-/\\~:]+")
_PLAIN_ROUTER_RE = re.compile(r"[A-Za-z0-9_.\-/\\~:]+")
_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


class ComposeSpecError(LoraplexError, ValueError):
    """A composition spec is malformed or names an unknown adapter.

    ``text`` is the spec, ``position`` the 0-based offset of the error (None when it has no single place);
    the message shows the text with a caret under the error column.
    """

    def __init__(self, message: str, text: str | None = None, position: int | None = None) -> None:
        self.message = message
        self.text = text
        self.position = position
        super().__init__(self._render())

    @property
    def column(self) -> int | None:
        """1-based column of the error, or None."""
        return None if self.position is None else self.position + 1

    def _render(self) -> str:
        if self.text is None:
            return self.message
        shown = self.text.replace("\t", " ").replace("\n", " ").replace("\r", " ")
        if self.position is None:
            return f"{self.message}\n  {shown}"
        pos = max(0, min(self.position, len(shown)))
        return f"{self.message} (column {pos + 1})\n  {shown}\n  {' ' * pos}^"


# ---------------------------------------------------------------------------------------------------- helpers
def is_valid_name(name: object) -> bool:
    """True when ``name`` can name an adapter in a spec: ``[A-Za-z0-9_.-]+`` and not ``base``/``auto``."""
    return isinstance(name, str) and bool(NAME_RE.fullmatch(name)) and name not in RESERVED


def _check_name(name: object, where: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ComposeSpecError(f"{where}: invalid adapter name {name!r}; names use letters, digits, '_', '.', '-'")
    if name in RESERVED:
        raise ComposeSpecError(f"{where}: {name!r} is a reserved word and cannot name an adapter")
    return name


def _fmt_num(x: float) -> str:
    """Shortest text that reads back as the same float (integral values without '.0')."""
    if x == int(x) and abs(x) < 1e15:
        return str(int(x))
    return repr(float(x))


def _fmt_bool(b: bool) -> str:
    return "true" if b else "false"


def _suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _weighted(items: Mapping[str, float] | Iterable[tuple[str, float]] | Iterable[str], where: str
              ) -> tuple[tuple[str, float], ...]:
    """Normalise weighted items to a tuple of (name, float) pairs; check names, finiteness and duplicates."""
    pairs = items.items() if isinstance(items, Mapping) else items
    out: list[tuple[str, float]] = []
    seen: set[str] = set()
    for item in pairs:
        if isinstance(item, str):
            name, weight = item, 1.0
        else:
            try:
                name, weight = item
            except (TypeError, ValueError):
                raise ComposeSpecError(f"{where}: expected (name, weight) pairs, got {item!r}") from None
        _check_name(name, where)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ComposeSpecError(f"{where}: weight of {name!r} must be a finite number, got {weight!r}")
        if name in seen:
            raise ComposeSpecError(f"{where}: adapter {name!r} appears twice")
        seen.add(name)
        out.append((name, float(weight)))
    if not out:
        raise ComposeSpecError(f"{where}: needs at least one adapter")
    return tuple(out)


def _check_normalizable(items: Sequence[tuple[str, float]], normalize: bool, where: str) -> None:
    if normalize and abs(sum(w for _, w in items)) < 1e-12:
        raise ComposeSpecError(f"{where}: cannot normalise weights {_weighted_text(items)}: they sum to 0")


def _weighted_text(items: Sequence[tuple[str, float]]) -> str:
    return ",".join(f"{n}={_fmt_num(w)}" for n, w in items)


# ---------------------------------------------------------------------------------------------------- nodes
@dataclass(frozen=True)
class Node:
    """Base of all spec nodes."""

    def adapter_names(self) -> tuple[str, ...]:
        """Adapter/merge names this node uses, in order of first use (routers are not adapters)."""
        return ()


@dataclass(frozen=True)
class AdapterRef(Node):
    """One adapter (or a merge written earlier) by name."""

    name: str

    def __post_init__(self) -> None:
        _check_name(self.name, "adapter")

    def adapter_names(self) -> tuple[str, ...]:
        return (self.name,)

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class Base(Node):
    """The bare base model (no adapter)."""

    def __str__(self) -> str:
        return "base"


@dataclass(frozen=True)
class Auto(Node):
    """Let the configured router pick the adapter per request."""

    def __str__(self) -> str:
        return "auto"


@dataclass(frozen=True)
class Blend(Node):
    """Delta-level weighted sum ``y = W x + sum_i w_i s_i B_i A_i x`` (one pass).

    ``items``: (name, weight) pairs (a dict or list is accepted and stored as a tuple); ``normalize`` rescales
    the weights to sum 1 when applied.
    """

    items: tuple[tuple[str, float], ...]
    normalize: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "items", _weighted(self.items, "blend"))
        object.__setattr__(self, "normalize", bool(self.normalize))
        _check_normalizable(self.items, self.normalize, "blend")

    @property
    def weights(self) -> dict[str, float]:
        """The weights as given (not normalised)."""
        return dict(self.items)

    def normalized_weights(self) -> dict[str, float]:
        """The weights to apply: divided by their sum when ``normalize`` is set (and the sum is not 0)."""
        total = sum(w for _, w in self.items)
        if self.normalize and total != 0:
            return {n: w / total for n, w in self.items}
        return dict(self.items)

    def adapter_names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.items)

    def __str__(self) -> str:
        opt = ",normalize=true" if self.normalize else ""
        return f"blend({_weighted_text(self.items)}{opt})"


@dataclass(frozen=True)
class Ensemble(Node):
    """Logit-level mix ``base + sum_i w_i (logits_i - base)`` (K+1 passes); fields as :class:`Blend`."""

    items: tuple[tuple[str, float], ...]
    normalize: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "items", _weighted(self.items, "ensemble"))
        object.__setattr__(self, "normalize", bool(self.normalize))
        _check_normalizable(self.items, self.normalize, "ensemble")

    @property
    def weights(self) -> dict[str, float]:
        """The weights as given (not normalised)."""
        return dict(self.items)

    def normalized_weights(self) -> dict[str, float]:
        """The weights to apply: divided by their sum when ``normalize`` is set (and the sum is not 0)."""
        total = sum(w for _, w in self.items)
        if self.normalize and total != 0:
            return {n: w / total for n, w in self.items}
        return dict(self.items)

    def adapter_names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.items)

    def __str__(self) -> str:
        opt = ",normalize=true" if self.normalize else ""
        return f"ensemble({_weighted_text(self.items)}{opt})"


@dataclass(frozen=True)
class Stack(Node):
    """Adapters applied in sequence; ``mode``: ``additive`` (W + D_1 + D_2, one pass; default),
    ``inlayer`` (y = W x + D_2 D_1 x, AdapterHub-style) or ``pipeline`` (stage i's generated text feeds stage i+1)."""

    names: tuple[str, ...]
    mode: str = "additive"

    def __post_init__(self) -> None:
        names = (self.names,) if isinstance(self.names, str) else tuple(self.names)
        for n in names:
            _check_name(n, "stack")
        if len(names) < 2:
            raise ComposeSpecError(f"stack: needs at least two adapters, got {len(names)}")
        if self.mode not in STACK_MODES:
            raise ComposeSpecError(f"stack: mode must be one of {', '.join(STACK_MODES)}, got {self.mode!r}"
                                   f"{_suggest(str(self.mode), STACK_MODES)}")
        object.__setattr__(self, "names", names)

    def adapter_names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.names))

    def __str__(self) -> str:
        opt = "" if self.mode == "additive" else f",mode={self.mode}"
        return f"stack({','.join(self.names)}{opt})"


@dataclass(frozen=True)
class MoE(Node):
    """A routed mix: ``router`` is a router folder or name; ``top_k`` and ``mode`` (top1/topk/soft) override
    the router's saved settings when given (None: use the router's own)."""

    router: str
    top_k: int | None = None
    mode: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.router, str) or not self.router.strip():
            raise ComposeSpecError(f"moe: router must be a non-empty name or path, got {self.router!r}")
        if self.top_k is not None:
            if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
                raise ComposeSpecError(f"moe: top_k must be an integer >= 1, got {self.top_k!r}")
        if self.mode is not None and self.mode not in MOE_MODES:
            raise ComposeSpecError(f"moe: mode must be one of {', '.join(MOE_MODES)}, got {self.mode!r}"
                                   f"{_suggest(str(self.mode), MOE_MODES)}")
        if self.mode == "top1" and self.top_k is not None and self.top_k != 1:
            raise ComposeSpecError(f"moe: mode=top1 contradicts top_k={self.top_k}")

    def __str__(self) -> str:
        router = self.router if _PLAIN_ROUTER_RE.fullmatch(self.router) else _quote(self.router)
        opts = ""
        if self.top_k is not None:
            opts += f",top_k={self.top_k}"
        if self.mode is not None:
            opts += f",mode={self.mode}"
        return f"moe({router}{opts})"


@dataclass(frozen=True)
class Merge(Node):
    """A merge of weighted adapters into one (built, then served as a single adapter).

    ``method`` is a combination type (:data:`COMBINATION_TYPES`); options left None take the merge code's
    defaults.
    """

    method: str
    items: tuple[tuple[str, float], ...]
    density: float | None = None
    majority_sign_method: str | None = None
    svd_rank: int | None = None
    normalize: bool | None = None
    peft_compat: bool | None = None

    def __post_init__(self) -> None:
        if self.method not in COMBINATION_TYPES:
            hint = _suggest(str(self.method), COMBINATION_TYPES)
            raise ComposeSpecError(f"merge: unknown method {self.method!r}{hint}; "
                                   f"expected one of {', '.join(COMBINATION_TYPES)}")
        object.__setattr__(self, "items", _weighted(self.items, "merge"))
        d = self.density
        if d is not None:
            if isinstance(d, bool) or not isinstance(d, (int, float)) or not (0 < d <= 1):
                raise ComposeSpecError(f"merge: density must be a number in (0, 1], got {d!r}")
            object.__setattr__(self, "density", float(d))
        if self.majority_sign_method is not None and self.majority_sign_method not in MAJORITY_SIGN_METHODS:
            raise ComposeSpecError(f"merge: majority_sign_method must be one of {', '.join(MAJORITY_SIGN_METHODS)}, "
                                   f"got {self.majority_sign_method!r}")
        if self.svd_rank is not None:
            if isinstance(self.svd_rank, bool) or not isinstance(self.svd_rank, int) or self.svd_rank < 1:
                raise ComposeSpecError(f"merge: svd_rank must be an integer >= 1, got {self.svd_rank!r}")

    @property
    def weights(self) -> dict[str, float]:
        """The weights as given."""
        return dict(self.items)

    def options(self) -> dict[str, object]:
        """The options that were set (not None)."""
        keys = ("density", "majority_sign_method", "svd_rank", "normalize", "peft_compat")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}

    def adapter_names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.items)

    def __str__(self) -> str:
        opts = []
        for k, v in self.options().items():
            if isinstance(v, bool):
                opts.append(f"{k}={_fmt_bool(v)}")
            elif isinstance(v, float):
                opts.append(f"{k}={_fmt_num(v)}")
            else:
                opts.append(f"{k}={v}")
        tail = ";" + ",".join(opts) if opts else ""
        return f"merge({self.method};{_weighted_text(self.items)}{tail})"


def _quote(s: str) -> str:
    q = "'" if "'" not in s else '"'
    if q in s:
        raise ComposeSpecError(f"moe: router {s!r} contains both quote characters")
    return f"{q}{s}{q}"


# ---------------------------------------------------------------------------------------------------- parser
@dataclass
class _Tok:
    kind: str  # "atom", "str", one of "(),;=", or "end"
    value: str
    pos: int


@dataclass
class _Parser:
    text: str
    toks: list[_Tok] = field(default_factory=list)
    i: int = 0

    # -------- lexing
    def lex(self) -> None:
        t, n, p = self.text, len(self.text), 0
        while p < n:
            c = t[p]
            if c.isspace():
                p += 1
            elif c in "(),;=":
                self.toks.append(_Tok(c, c, p))
                p += 1
            elif c in "'\"":
                end = t.find(c, p + 1)
                if end < 0:
                    self.fail("unterminated quoted string", p)
                self.toks.append(_Tok("str", t[p + 1:end], p))
                p = end + 1
            else:
                m = _ATOM_RE.match(t, p)
                if not m:
                    self.fail(f"unexpected character {c!r}", p)
                self.toks.append(_Tok("atom", m.group(), p))
                p = m.end()
        self.toks.append(_Tok("end", "", n))

    # -------- token helpers
    def fail(self, message: str, pos: int) -> None:
        raise ComposeSpecError(message, self.text, pos)

    @property
    def cur(self) -> _Tok:
        return self.toks[self.i]

    def take(self) -> _Tok:
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def expect(self, kind: str, what: str) -> _Tok:
        tok = self.cur
        if tok.kind != kind:
            self.fail(f"expected {what}, got {_describe(tok)}", tok.pos)
        return self.take()

    def name(self, where: str) -> str:
        tok = self.cur
        if tok.kind != "atom":
            self.fail(f"{where}: expected an adapter name, got {_describe(tok)}", tok.pos)
        if self.toks[self.i + 1].kind == "(":
            self.fail(f"{where}(...) takes adapter names, not nested expressions like {tok.value}(...)", tok.pos)
        if not NAME_RE.fullmatch(tok.value):
            self.fail(f"{where}: invalid adapter name {tok.value!r}; names use letters, digits, '_', '.', '-'", tok.pos)
        if tok.value in RESERVED:
            self.fail(f"{where}: {tok.value!r} is a reserved word, not an adapter name", tok.pos)
        return self.take().value

    def number(self, what: str) -> float:
        tok = self.cur
        if tok.kind == "atom":
            try:
                x = float(tok.value)
            except ValueError:
                x = math.nan
            if math.isfinite(x):
                self.take()
                return x
        self.fail(f"{what}: expected a finite number, got {_describe(tok)}", tok.pos)
        raise AssertionError  # unreachable

    def integer(self, what: str, minimum: int = 1) -> int:
        tok = self.cur
        if tok.kind == "atom" and re.fullmatch(r"[+-]?\d+", tok.value) and int(tok.value) >= minimum:
            self.take()
            return int(tok.value)
        self.fail(f"{what}: expected an integer >= {minimum}, got {_describe(tok)}", tok.pos)
        raise AssertionError

    def boolean(self, what: str) -> bool:
        tok = self.cur
        if tok.kind == "atom" and tok.value.lower() in _TRUE + _FALSE:
            self.take()
            return tok.value.lower() in _TRUE
        self.fail(f"{what}: expected true or false, got {_describe(tok)}", tok.pos)
        raise AssertionError

    def choice(self, what: str, choices: Sequence[str]) -> str:
        tok = self.cur
        if tok.kind == "atom" and tok.value in choices:
            return self.take().value
        hint = _suggest(tok.value, choices) if tok.kind == "atom" else ""
        self.fail(f"{what}: expected one of {', '.join(choices)}, got {_describe(tok)}{hint}", tok.pos)
        raise AssertionError

    # -------- grammar
    def parse(self) -> Node:
        self.lex()
        if self.cur.kind == "end":
            self.fail("empty composition spec; expected an adapter name, base, auto, or blend(...)/stack(...)/"
                      "moe(...)/merge(...)/ensemble(...)", 0)
        node = self.expr()
        if self.cur.kind != "end":
            self.fail(f"unexpected {_describe(self.cur)} after the end of the spec", self.cur.pos)
        return node

    def expr(self) -> Node:
        tok = self.cur
        if tok.kind != "atom":
            self.fail(f"expected an adapter name or a function, got {_describe(tok)}", tok.pos)
        if self.toks[self.i + 1].kind == "(":
            fn = tok.value
            if fn not in FUNCTIONS:
                self.fail(f"unknown function {fn!r}{_suggest(fn, FUNCTIONS)}; expected one of {', '.join(FUNCTIONS)}",
                          tok.pos)
            self.i += 2
            node = getattr(self, f"_{fn}")(tok.pos)
            self.expect(")", f"')' to close {fn}(")
            return node
        if tok.value == "base":
            self.take()
            return Base()
        if tok.value == "auto":
            self.take()
            return Auto()
        return AdapterRef(self.name("spec"))

    def _weighted_list(self, fn: str, stop: str, options: dict[str, str]) -> tuple[list[tuple[str, float, int]],
                                                                               dict[str, tuple[object, int]]]:
        """Comma-separated ``name[=weight]`` items and ``option=value`` entries (options named in ``options``
        whose value is not a number) up to ``stop`` (``)`` or ``;``)."""
        items: list[tuple[str, float, int]] = []
        opts: dict[str, tuple[object, int]] = {}
        while True:
            tok = self.cur
            if tok.kind == "atom" and tok.value in options and self.toks[self.i + 1].kind == "=" \
                    and not _is_number(self.toks[self.i + 2]):
                key = self.take().value
                self.take()
                opts[key] = (self._option_value(fn, key, options[key]), tok.pos)
            else:
                name = self.name(fn)
                weight = 1.0
                if self.cur.kind == "=":
                    self.take()
                    weight = self.number(f"{fn}: weight of {name!r}")
                if any(n == name for n, _, _ in items):
                    self.fail(f"{fn}: adapter {name!r} appears twice", tok.pos)
                items.append((name, weight, tok.pos))
            if self.cur.kind == ",":
                self.take()
                continue
            if self.cur.kind in (stop, ")"):
                break
            expected = "',' or ')'" if stop == ")" else f"',', '{stop}' or ')'"
            self.fail(f"{fn}: expected {expected}, got {_describe(self.cur)}", self.cur.pos)
        if not items:
            self.fail(f"{fn}: needs at least one adapter", self.cur.pos)
        return items, opts

    def _option_value(self, fn: str, key: str, kind: str) -> object:
        what = f"{fn}: {key}"
        if kind == "bool":
            return self.boolean(what)
        if kind == "int":
            return self.integer(what)
        if kind == "float":
            return self.number(what)
        return self.choice(what, kind.split("|"))

    def _blend(self, pos: int) -> Node:
        items, opts = self._weighted_list("blend", ")", {"normalize": "bool"})
        return Blend(tuple((n, w) for n, w, _ in items), bool(opts.get("normalize", (False, 0))[0]))

    def _ensemble(self, pos: int) -> Node:
        items, opts = self._weighted_list("ensemble", ")", {"normalize": "bool"})
        return Ensemble(tuple((n, w) for n, w, _ in items), bool(opts.get("normalize", (False, 0))[0]))

    def _stack(self, pos: int) -> Node:
        names: list[str] = []
        mode = "additive"
        while True:
            tok = self.cur
            if tok.kind == "atom" and self.toks[self.i + 1].kind == "=":
                if tok.value != "mode":
                    self.fail(f"stack: unknown option {tok.value!r}{_suggest(tok.value, ['mode'])}; "
                              f"stack takes adapter names and mode=", tok.pos)
                self.i += 2
                mode = self.choice("stack: mode", STACK_MODES)
            else:
                names.append(self.name("stack"))
            if self.cur.kind == ",":
                self.take()
                continue
            if self.cur.kind == ")":
                break
            self.fail(f"stack: expected ',' or ')', got {_describe(self.cur)}", self.cur.pos)
        if len(names) < 2:
            self.fail(f"stack: needs at least two adapters, got {len(names)}", pos)
        return Stack(tuple(names), mode)

    def _moe(self, pos: int) -> Node:
        tok = self.cur
        if tok.kind not in ("atom", "str") or (tok.kind == "atom" and self.toks[self.i + 1].kind == "="):
            self.fail(f"moe: expected a router folder or name first, got {_describe(tok)}", tok.pos)
        if tok.kind == "str" and not tok.value.strip():
            self.fail("moe: router must not be empty", tok.pos)
        router = self.take().value
        top_k: int | None = None
        mode: str | None = None
        mode_pos = pos
        while self.cur.kind == ",":
            self.take()
            key_tok = self.expect("atom", "moe option top_k= or mode=")
            if key_tok.value not in ("top_k", "mode"):
                self.fail(f"moe: unknown option {key_tok.value!r}{_suggest(key_tok.value, ['top_k', 'mode'])}; "
                          f"expected top_k= or mode=", key_tok.pos)
            self.expect("=", f"'=' after {key_tok.value}")
            if key_tok.value == "top_k":
                top_k = self.integer("moe: top_k")
            else:
                mode_pos = self.cur.pos
                mode = self.choice("moe: mode", MOE_MODES)
        if mode == "top1" and top_k is not None and top_k != 1:
            self.fail(f"moe: mode=top1 contradicts top_k={top_k}", mode_pos)
        return MoE(router, top_k, mode)

    def _merge(self, pos: int) -> Node:
        tok = self.cur
        if tok.kind != "atom" or tok.value not in COMBINATION_TYPES:
            hint = _suggest(tok.value, COMBINATION_TYPES) if tok.kind == "atom" else ""
            self.fail(f"merge: expected a method first ({', '.join(COMBINATION_TYPES)}), got {_describe(tok)}{hint}",
                      tok.pos)
        method = self.take().value
        self.expect(";", "';' after the merge method (merge(METHOD;a=0.5,b=0.5;OPTIONS))")
        items, _ = self._weighted_list("merge", ";", {})
        kinds = {"density": "float", "majority_sign_method": "|".join(MAJORITY_SIGN_METHODS), "svd_rank": "int",
                 "normalize": "bool", "peft_compat": "bool"}
        opts: dict[str, object] = {}
        if self.cur.kind == ";":
            self.take()
            while True:
                key_tok = self.expect("atom", "a merge option")
                if key_tok.value not in kinds:
                    self.fail(f"merge: unknown option {key_tok.value!r}{_suggest(key_tok.value, kinds)}; "
                              f"expected one of {', '.join(kinds)}", key_tok.pos)
                self.expect("=", f"'=' after {key_tok.value}")
                val_pos = self.cur.pos
                value = self._option_value("merge", key_tok.value, kinds[key_tok.value])
                if key_tok.value == "density" and isinstance(value, float) and not 0 < value <= 1:
                    self.fail(f"merge: density must be in (0, 1], got {_fmt_num(value)}", val_pos)
                opts[key_tok.value] = value
                if self.cur.kind == ",":
                    self.take()
                    continue
                break
        return Merge(method, tuple((n, w) for n, w, _ in items), **opts)  # type: ignore[arg-type]


def _is_number(tok: _Tok) -> bool:
    if tok.kind != "atom":
        return False
    try:
        float(tok.value)
    except ValueError:
        return False
    return True


def _describe(tok: _Tok) -> str:
    if tok.kind == "end":
        return "the end of the spec"
    if tok.kind == "str":
        return f"string {tok.value!r}"
    return repr(tok.value)


# ---------------------------------------------------------------------------------------------------- API
def parse(text: str | Node) -> Node:
    """Parse a composition spec into a frozen node (a node is returned unchanged).

    Raises :class:`ComposeSpecError` with the text and a caret at the error column.
    """
    if isinstance(text, Node):
        return text
    if not isinstance(text, str):
        raise ComposeSpecError(f"a composition spec is a string, got {type(text).__name__}")
    try:
        return _Parser(text).parse()
    except ComposeSpecError as exc:
        if exc.text is None:  # raised by a node constructor: attach the text
            raise ComposeSpecError(exc.message, text) from None
        raise


def validate(node: Node | str, known: Iterable[str], *, routers: Iterable[str] | None = None) -> Node:
    """Check that every adapter ``node`` uses is in ``known``; returns the node (parsed if given as text).

    With ``routers`` given, ``auto`` needs at least one router and ``moe(NAME)`` must name one of them
    (a router given as a path, i.e. containing '/' or '\\\\', is not checked here).
    """
    node = parse(node)
    known_set = set(known)
    unknown = [n for n in node.adapter_names() if n not in known_set]
    if unknown:
        listed = ", ".join(sorted(known_set)) or "(none)"
        which = ", ".join(repr(n) for n in unknown)
        noun = "adapter" if len(unknown) == 1 else "adapters"
        hint = _suggest(unknown[0], known_set)
        raise ComposeSpecError(f"unknown {noun} {which} in {str(node)!r}{hint}; known adapters: {listed}")
    if routers is not None:
        router_set = set(routers)
        if isinstance(node, Auto) and not router_set:
            raise ComposeSpecError("'auto' needs a router, and none is configured")
        if isinstance(node, MoE) and node.router not in router_set and not re.search(r"[/\\]", node.router):
            listed = ", ".join(sorted(router_set)) or "(none)"
            raise ComposeSpecError(f"unknown router {node.router!r}; known routers: {listed}")
    return node
