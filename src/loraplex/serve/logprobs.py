"""Token logprobs: computed from a batch's raw logits, and shaped as OpenAI's completion and chat ``logprobs``.

The logprobs are those of the model's own distribution (log-softmax of the raw logits of the row's adapter, before
penalties, temperature or truncation: vLLM's default ``raw_logprobs``), so a greedy completion's logprobs are
``log_softmax(plex(ids, adapters=...).logits)`` at each position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch


@dataclass
class TokenLogprob:
    """One token's logprob and the most likely alternatives at its position."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), most likely first
    offset: int = 0  # characters of the text before this token


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, n_top: Sequence[int]) -> list[TokenLogprob]:
    """Per row of raw ``logits`` [B, V]: the logprob of ``tokens`` [B] and the ``n_top[b]`` best alternatives."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # [B, V]
    chosen = logp.gather(1, tokens.to(logp.device).long()[:, None]).squeeze(1)  # [B]
    k = max(n_top, default=0)
    if k:
        top_v, top_i = logp.topk(k, dim=-1)  # [B, k]
        top_v, top_i = top_v.tolist(), top_i.tolist()
    else:
        top_v = top_i = [[] for _ in n_top]
    return [TokenLogprob(int(t), float(c), list(zip(ids[:n], vs[:n])))
            for t, c, ids, vs, n in zip(tokens.tolist(), chosen.tolist(), top_i, top_v, n_top)]


def prompt_logprobs(logits: torch.Tensor, prompt: Sequence[int], n_top: int) -> list[TokenLogprob | None]:
    """The prompt's tokens scored by the logits at the positions before them: ``logits`` [L, V] are the prefill
    logits of the prompt's L positions; the first token has no logprob (None)."""
    if len(prompt) < 2:
        return [None] * len(prompt)
    ids = torch.tensor(list(prompt[1:]), dtype=torch.long)
    return [None, *token_logprobs(logits[:-1], ids, [n_top] * (len(prompt) - 1))]


# --------------------------------------------------------------------------- OpenAI shapes
TokenText = Callable[[int], str]


def completion_logprobs(entries: Sequence[TokenLogprob | None], text: TokenText, n_top: int,
                        base_offset: int = 0) -> dict[str, Any]:
    """The ``logprobs`` object of a completion choice: ``tokens``, ``token_logprobs``, ``top_logprobs`` (the
    ``n_top`` best plus the chosen token) and ``text_offset`` (into the choice's text, ``base_offset`` added).
    A None entry (the first token of an echoed prompt) has a null logprob and null alternatives."""
    tokens, lps, tops, offsets = [], [], [], []
    last = base_offset
    for e in entries:
        if e is None:
            tokens.append(None)
            lps.append(None)
            tops.append(None)
            offsets.append(last)
            continue
        tokens.append(text(e.token_id))
        lps.append(e.logprob)
        top = {text(i): v for i, v in e.top[:n_top]}
        top.setdefault(text(e.token_id), e.logprob)
        tops.append(top)
        last = base_offset + e.offset
        offsets.append(last)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def _chat_token(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8", errors="replace"))}


def chat_logprobs(entries: Sequence[TokenLogprob], text: TokenText, n_top: int) -> dict[str, Any]:
    """The ``logprobs`` object of a chat choice: ``{"content": [{token, logprob, bytes, top_logprobs}]}``."""
    content = []
    for e in entries:
        item = _chat_token(text(e.token_id), e.logprob)
        item["top_logprobs"] = [_chat_token(text(i), v) for i, v in e.top[:n_top]]
        content.append(item)
    return {"content": content}
