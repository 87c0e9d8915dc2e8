"""Serving defaults from a trained config: its ``generation`` block and its adapters' prompt templates.

A request field the client leaves out (or sends as ``null``) takes the config's value; a field the client sends
always wins. ``generation`` keys use transformers' (and Ludwig's) names and map onto the OpenAI request fields:

=========================  ==============================================================
``generation`` key         request field
=========================  ==============================================================
``max_new_tokens``         ``max_tokens`` (completions and chat)
``min_new_tokens``         ``min_tokens``
``do_sample: true``        ``temperature``: the block's ``temperature`` (default 1)
no ``do_sample: true``     ``temperature: 0`` (greedy, as ``generate`` and ``loraplex predict`` decode)
``top_k`` / ``top_p``      ``top_k`` / ``top_p``
``repetition_penalty``     ``repetition_penalty``
=========================  ==============================================================

Other ``generation`` keys (``typical_p``, ``no_repeat_ngram_size``, beam search...) are not applied by the server;
:attr:`ServeDefaults.ignored` names them so start-up can say so.

A prompt template (Ludwig's ``prompt.template``) is applied to a completion's text prompt when the request's model
is one adapter trained with that template: the prompt fills ``{__sample__}`` and the adapter's input column, as it
did in training. Token-id prompts and chat messages are sent as given.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from loraplex.config.ludwig import SAMPLE, render_prompt, template_columns
from loraplex.errors import LoraplexError

__all__ = ["PromptTemplate", "ServeDefaults", "SERVED_GENERATION_KEYS"]

#: ``generation`` keys the server applies as request defaults.
SERVED_GENERATION_KEYS = ("max_new_tokens", "min_new_tokens", "temperature", "do_sample", "top_k", "top_p",
                          "repetition_penalty")


@dataclass(frozen=True)
class PromptTemplate:
    """An adapter's prompt template and the input column the request's prompt stands for."""

    template: str
    column: str

    def __post_init__(self) -> None:
        other = [c for c in template_columns(self.template) if c != self.column]
        if other:
            raise LoraplexError(f"prompt template reads column {other[0]!r}: a served prompt can only fill "
                                f"{{{SAMPLE}}} and the input column {self.column!r}")

    def render(self, prompt: str) -> str:
        """The text the model sees for ``prompt``."""
        return render_prompt(self.template, {self.column: prompt}, sample=prompt)


@dataclass
class ServeDefaults:
    """Request defaults (from ``generation``) and per-adapter prompt templates."""

    generation: Mapping[str, Any] = field(default_factory=dict)
    templates: Mapping[str, PromptTemplate] = field(default_factory=dict)

    @property
    def ignored(self) -> list[str]:
        """``generation`` keys given but not applied by the server."""
        return [k for k in self.generation if k not in SERVED_GENERATION_KEYS]

    def fields(self, chat: bool) -> dict[str, Any]:
        """Request field -> default value."""
        g = self.generation
        out: dict[str, Any] = {}
        if g.get("max_new_tokens") is not None:
            out["max_tokens"] = int(g["max_new_tokens"])
        if g.get("min_new_tokens") is not None:
            out["min_tokens"] = int(g["min_new_tokens"])
        if g.get("do_sample") is True:  # sampling at the config's temperature (transformers' default: 1)
            out["temperature"] = float(g.get("temperature") or 1.0)
        else:  # greedy, as ``generate`` and ``loraplex predict`` decode without ``do_sample: true``
            out["temperature"] = 0.0
        for k in ("top_k", "top_p", "repetition_penalty"):
            if g.get(k) is not None:
                out[k] = g[k]
        if chat and "max_tokens" in out:
            out["max_completion_tokens"] = out.pop("max_tokens")
        return out

    def apply(self, req: Any, body: Mapping[str, Any], *, chat: bool) -> Any:
        """``req`` with every default whose field ``body`` leaves out (or sends as null) filled in."""
        if not self.generation:
            return req
        update = {k: v for k, v in self.fields(chat).items() if body.get(k) is None
                  and not (k == "max_completion_tokens" and body.get("max_tokens") is not None)}
        return req.model_copy(update=update) if update else req

    def templated(self, served_by: list[str]) -> bool:
        """Whether a request served by ``served_by`` gets a prompt template."""
        return len(served_by) == 1 and served_by[0] in self.templates

    def prompt(self, served_by: list[str], text: str) -> str:
        """The completion prompt for a request served by ``served_by`` (one adapter with a template: rendered)."""
        if self.templated(served_by):
            return self.templates[served_by[0]].render(text)
        return text
