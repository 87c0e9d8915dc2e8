"""Exceptions with messages that name the file, field or adapter at fault."""


class LoraplexError(Exception):
    """Base class of every error loraplex raises on bad input."""


class AdapterError(LoraplexError, ValueError):
    """An adapter file, config or name is missing, malformed or does not fit the base model."""


class UnknownAdapterError(AdapterError, KeyError):
    """A batch or request names an adapter the bank does not hold."""

    def __init__(self, name: object, known: list[str]):
        self.name = name
        self.known = sorted(known)
        super().__init__(f"unknown adapter {name!r}; known adapters: {', '.join(self.known) or '(none)'}")

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class PathNotAllowedError(LoraplexError, PermissionError):
    """A path lies outside the configured adapter roots."""
