"""Exceptions with messages that name the file, field or adapter at fault."""

import difflib

#: An unknown-adapter error lists every known name up to this many; past it, a few near matches and the count.
LIST_LIMIT = 20
#: Near matches an unknown-adapter error names when there are too many names to list.
SUGGESTIONS = 5


def near_matches(name: object, names: list[str], n: int = SUGGESTIONS) -> list[str]:
    """Up to ``n`` of ``names`` closest to ``name`` (:mod:`difflib` similarity, then shared prefixes)."""
    text = str(name)
    close = difflib.get_close_matches(text, names, n=n, cutoff=0.6)
    if len(close) < n and text:
        head = text[:max(1, len(text) // 2)]
        close += [x for x in names if x.startswith(head) and x not in close][:n - len(close)]
    return close[:n]


def known_text(name: object, known: list[str]) -> str:
    """``known adapters: a, b`` for a short list; near matches and the count for a long one."""
    if len(known) <= LIST_LIMIT:
        return f"known adapters: {', '.join(known) or '(none)'}"
    near = near_matches(name, known)
    hint = f"did you mean {', '.join(repr(x) for x in near)}? " if near else ""
    return f"{hint}{len(known)} adapters are known (GET /v1/models lists them)"


class LoraplexError(Exception):
    """Base class of every error loraplex raises on bad input."""


class AdapterError(LoraplexError, ValueError):
    """An adapter file, config or name is missing, malformed or does not fit the base model."""


class UnknownAdapterError(AdapterError, KeyError):
    """A batch or request names an adapter the bank does not hold."""

    def __init__(self, name: object, known: list[str]):
        self.name = name
        self.known = sorted(known)
        super().__init__(f"unknown adapter {name!r}; {known_text(name, self.known)}")

    def listed(self) -> list[str]:
        """The names an error body lists: all known ones when few, else the near matches."""
        return list(self.known) if len(self.known) <= LIST_LIMIT else near_matches(self.name, self.known)

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class PathNotAllowedError(LoraplexError, PermissionError):
    """A path lies outside the configured adapter roots."""
