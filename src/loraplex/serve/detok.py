"""Incremental detokenization with stop strings.

:class:`TextStream` turns a growing list of token ids into text pieces that are never revised: the
concatenation of every piece it hands out *is* the request's final text, streamed or not. It holds back
text that may still change (an incomplete UTF-8 sequence shows as U+FFFD) and any tail that could be the
start of a stop string; when a stop string appears the text ends just before it (or just after it, with
``include_stop``).

Cost: the first ``FULL_DECODE_TOKENS`` tokens are decoded in full at every step (exactly ``tokenizer.decode``);
after that only a short window of the latest tokens is decoded (the incremental scheme of vLLM/TGI: the text a
new token adds is ``decode(window + new) - decode(window)``), so long generations stay O(1) per token.
"""

from __future__ import annotations

from typing import Any, Sequence

FULL_DECODE_TOKENS = 128
WINDOW = 5


class TextStream:
    """Token ids in, stable text pieces out."""

    def __init__(self, tokenizer: Any, stop: Sequence[str] = (), *, skip_special_tokens: bool = True,
                 include_stop: bool = False) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.include_stop = include_stop
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._text = ""  # decoded text accepted so far (never revised)
        self._sent = 0  # chars of _text handed out
        self._max_stop = max((len(s) for s in self.stop), default=0)
        self.stopped: str | None = None  # the stop string that ended the text
        self._end: int | None = None
        self._prefix = 0  # incremental mode: window start ...
        self._read: int | None = None  # ... and end of the tokens already turned into text (None: full mode)

    @property
    def accepted_chars(self) -> int:
        """Characters of text accepted so far (the text offset of the next token), capped at a stop string."""
        return len(self._text) if self._end is None else self._end

    @property
    def text(self) -> str:
        """The final text so far (up to a stop string, if one was found)."""
        return self._text if self._end is None else self._text[: self._end]

    def _decode(self, ids: list[int] | None = None) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(self.ids if ids is None else ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one token; the text that became safe to send (may be empty)."""
        if self.stopped is not None:
            return ""
        self.ids.append(int(token_id))
        if self._read is not None:
            self._window(final=False)
            return self._release(final=False)
        full = self._decode()
        stable = full.rstrip("\ufffd")
        if len(stable) > len(self._text):
            # Tokenizers only append in practice; when one revises earlier text, the accepted text stays
            self._text += stable[len(self._text):]
        if len(self.ids) >= FULL_DECODE_TOKENS and stable == full and full == self._text:
            self._prefix, self._read = max(0, len(self.ids) - WINDOW), len(self.ids)  # go incremental
        return self._release(final=False)

    def _window(self, final: bool) -> None:
        assert self._read is not None
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self._text += after[len(before):]
            self._prefix, self._read = self._read, len(self.ids)

    def finish(self) -> str:
        """The text still held back, at the end of generation."""
        if self.stopped is None:
            if self._read is not None:
                self._window(final=True)
            else:
                full = self._decode()
                if len(full) > len(self._text) and full.startswith(self._text):
                    self._text = full
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        text = self._text
        if self.stop and self._end is None:
            start = max(0, self._sent - self._max_stop + 1)
            hits = [(text.find(s, start), s) for s in self.stop]
            hits = [(i, s) for i, s in hits if i >= 0]
            if hits:
                pos, s = min(hits)
                self._end, self.stopped = (pos + len(s) if self.include_stop else pos), s
        if self._end is not None:
            end = self._end
        elif final:
            end = len(text)
        else:
            end = len(text) - _held_tail(text, self.stop, self._max_stop)
        if end <= self._sent:
            return ""
        piece = text[self._sent:end]
        self._sent = end
        return piece


def _held_tail(text: str, stops: tuple[str, ...], max_stop: int) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
    for k in range(min(max_stop - 1, len(text)), 0, -1):
        tail = text[-k:]
        if any(s.startswith(tail) for s in stops):
            return k
    return 0


def text_offsets(tokenizer: Any, ids: Sequence[int]) -> list[int]:
    """The offset of each token's text in the decoded text of ``ids`` (characters before it)."""
    stream = TextStream(tokenizer)
    out = []
    for t in ids:
        out.append(stream.accepted_chars)
        stream.push(t)
    return out
