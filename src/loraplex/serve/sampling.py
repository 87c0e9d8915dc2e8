"""Per-request sampling parameters and the batched next-token choice.

Every step turns a batch of raw logits [B, V] into one token per row, each row with its own parameters, in
tensor operations over the whole batch (the only per-row work is drawing one uniform number from the row's own
generator, so a seeded request samples the same whatever else shares its batch). In order, as vLLM applies them:

1. penalties on the raw logits: ``repetition_penalty`` (tokens of the prompt and the output: a positive logit is
   divided by it, a negative one multiplied), ``frequency_penalty`` (minus penalty x count in the output),
   ``presence_penalty`` (minus penalty once a token appears in the output);
2. ``min_tokens``: while a row has fewer output tokens, its end-of-sequence and ``stop_token_ids`` are banned;
3. greedy rows (``temperature == 0``) take the argmax of these logits;
4. the others: ``temperature``, then ``min_p`` (drop tokens below ``min_p`` x the top probability), ``top_k`` (keep
   the k most likely), ``top_p`` (keep the smallest set of most likely tokens reaching ``top_p``, always the top
   one), each on the distribution the previous step left, then one draw by inverse CDF.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import torch

#: Most alternatives a request may ask for per token (``logprobs`` / ``top_logprobs``), as vLLM's default.
MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    """What one request asks of generation."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0: greedy (argmax), equal to ``generate(do_sample=False)``
    top_p: float = 1.0
    stop: tuple[str, ...] = ()  # stop strings: the text ends before the first one found
    seed: int | None = None  # seeds this request's own generator: same seed, same prompt -> same sample; any
    # integer is accepted and reduced mod 2**64 (torch's seed range; -1 and 2**64 - 1 are the same seed)
    ignore_eos: bool = False  # keep generating past end-of-sequence tokens
    stop_token_ids: tuple[int, ...] = ()  # generating one of these ends the request (the token is kept)
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # 1: off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_tokens: int = 0  # no end-of-sequence / stop token before this many output tokens
    include_stop_str_in_output: bool = False  # the text ends after the stop string instead of before it
    logprobs: int | None = None  # per output token: its logprob and this many alternatives (None: off)
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (``echo``)

    def __post_init__(self) -> None:
        self.stop = tuple(s for s in self.stop if s)
        self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids)
        if self.seed is not None:
            self.seed = int(self.seed) % 2**64
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1, 0 (off) or >= 1, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not 0.0 < self.repetition_penalty <= 100.0:
            raise ValueError(f"repetition_penalty must be in (0, 100], got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and not 0 <= v <= MAX_LOGPROBS:
                raise ValueError(f"{name} must be in [0, {MAX_LOGPROBS}], got {v}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def make_generator(self) -> torch.Generator | None:
        if self.greedy:
            return None
        g = torch.Generator()
        g.manual_seed(self.seed if self.seed is not None else random.getrandbits(63))
        return g


def _token_mask(rows: Sequence[Sequence[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[B, V] bool: True where token v is in row b's list."""
    return _token_counts(rows, vocab, device) > 0


def _token_counts(rows: Sequence[Sequence[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[B, V] float: how often token v occurs in row b's list (ids outside the vocabulary are ignored)."""
    width = max((len(r) for r in rows), default=0)
    counts = torch.zeros(len(rows), vocab + 1, device=device)
    if width:
        ids = torch.full((len(rows), width), vocab, dtype=torch.long)  # [B, L], padding -> the spare column
        for b, r in enumerate(rows):
            if r:
                ids[b, :len(r)] = torch.tensor(r, dtype=torch.long)
        ids = ids.clamp_(0, vocab).to(device)
        counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=counts.dtype))
    return counts[:, :vocab]


def adjust_logits(logits: torch.Tensor, params: Sequence[SamplingParams], prompts: Sequence[Sequence[int]],
                  outputs: Sequence[Sequence[int]], eos_ids: Sequence[int] = ()) -> torch.Tensor:
    """Penalties and the ``min_tokens`` ban applied to raw ``logits`` [B, V] (float32 [B, V] out).

    ``prompts`` / ``outputs``: each row's prompt and output token ids so far."""
    out = logits.float()
    B, V = out.shape
    dev = out.device
    if any(p.penalized for p in params):
        rep = torch.tensor([p.repetition_penalty for p in params], device=dev)[:, None]  # [B, 1]
        if bool((rep != 1.0).any()):
            seen = _token_mask([list(a) + list(b) for a, b in zip(prompts, outputs)], V, dev)  # [B, V]
            out = torch.where(seen, torch.where(out > 0, out / rep, out * rep), out)
        freq = torch.tensor([p.frequency_penalty for p in params], device=dev)[:, None]  # [B, 1]
        pres = torch.tensor([p.presence_penalty for p in params], device=dev)[:, None]
        if bool((freq != 0).any() or (pres != 0).any()):
            counts = _token_counts(outputs, V, dev)  # [B, V]
            out = out - freq * counts - pres * (counts > 0).float()
    if any(len(o) < p.min_tokens for p, o in zip(params, outputs)):
        banned = [list(eos_ids) + list(p.stop_token_ids) if len(o) < p.min_tokens else []
                  for p, o in zip(params, outputs)]
        out = out.masked_fill(_token_mask(banned, V, dev), float("-inf"))
    return out


def sample_probs(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """The distribution each row draws from, [B, V] (rows sum to 1): temperature, min_p, top_k, top_p of the
    adjusted ``logits`` [B, V]; a greedy row is one-hot at its argmax."""
    logits = logits.float()
    B, V = logits.shape
    dev = logits.device
    greedy = torch.tensor([p.greedy for p in params], device=dev)  # [B]
    temp = torch.tensor([p.temperature if not p.greedy else 1.0 for p in params], device=dev)[:, None]
    probs = torch.softmax(logits / temp, dim=-1)  # [B, V]
    min_p = torch.tensor([p.min_p for p in params], device=dev)[:, None]  # [B, 1]
    if bool((min_p > 0).any()):
        probs = probs.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    top_k = torch.tensor([p.top_k if p.top_k > 0 else V for p in params], device=dev)[:, None]  # [B, 1]
    top_p = torch.tensor([p.top_p for p in params], device=dev)[:, None]
    if bool((top_k < V).any() or (top_p < 1.0).any()):
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)  # [B, V]
        rank = torch.arange(V, device=dev)[None, :]
        sorted_p = torch.where(rank < top_k, sorted_p, torch.zeros_like(sorted_p))
        sorted_p = sorted_p / sorted_p.sum(dim=-1, keepdim=True)
        keep = (torch.cumsum(sorted_p, dim=-1) - sorted_p) < top_p  # always keeps the most likely token
        sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
        sorted_p = sorted_p / sorted_p.sum(dim=-1, keepdim=True)
        probs = torch.zeros_like(probs).scatter_(1, order, sorted_p)
    one_hot = torch.nn.functional.one_hot(logits.argmax(dim=-1), V).to(probs.dtype)  # [B, V]
    return torch.where(greedy[:, None], one_hot, probs)


def draw(probs: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """One token per row of ``probs`` [B, V] by inverse CDF, row b's uniform from ``generators[b]`` ([B] long);
    a row without a generator takes its argmax."""
    u = torch.tensor([1.0 - float(torch.rand((), generator=g)) if g is not None else 1.0 for g in generators],
                     dtype=torch.float64)  # (0, 1]: never picks a zero-probability token
    cdf = torch.cumsum(probs.double(), dim=-1)  # [B, V]
    target = (u.to(cdf.device) * cdf[:, -1])[:, None]  # [B, 1]
    picks = torch.searchsorted(cdf, target).squeeze(1).clamp_(max=probs.shape[-1] - 1)  # [B]
    plain = torch.tensor([g is None for g in generators], device=probs.device)
    return torch.where(plain, probs.argmax(dim=-1), picks)


def sample_rows(logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None],
                prompts: Sequence[Sequence[int]] | None = None, outputs: Sequence[Sequence[int]] | None = None,
                eos_ids: Sequence[int] = ()) -> list[int]:
    """Next token per row of raw ``logits`` [B, V] (see the module docstring for the order of the steps)."""
    n = len(params)
    adjusted = adjust_logits(logits, params, prompts or [[]] * n, outputs or [[]] * n, eos_ids)
    if all(p.greedy for p in params):
        return adjusted.argmax(dim=-1).tolist()
    return draw(sample_probs(adjusted, params), generators).tolist()
