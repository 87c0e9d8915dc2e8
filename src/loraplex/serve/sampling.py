"""Per-request sampling parameters and the per-row next-token choice (greedy, temperature, top-p)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    """What one request asks of generation."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0: greedy (argmax), equal to ``generate(do_sample=False)``
    top_p: float = 1.0
    stop: tuple[str, ...] = ()  # stop strings: the text ends before the first one found
    seed: int | None = None  # seeds this request's own generator: same seed, same prompt -> same sample; any
    # integer is accepted and reduced mod 2**64 (torch's seed range; -1 and 2**64 - 1 are the same seed)
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()

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

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def make_generator(self) -> torch.Generator | None:
        if self.greedy:
            return None
        g = torch.Generator()
        g.manual_seed(self.seed if self.seed is not None else random.getrandbits(63))
        return g


def sample_rows(logits: torch.Tensor, params: list[SamplingParams],
                generators: list[torch.Generator | None]) -> list[int]:
    """Next token per row of ``logits`` [B, V]: argmax for greedy rows, else temperature + nucleus sampling."""
    logits = logits.float()
    picks = logits.argmax(dim=-1).tolist()
    for i, p in enumerate(params):
        if p.greedy:
            continue
        row = logits[i].cpu() / p.temperature  # the per-request generator lives on the CPU
        probs = torch.softmax(row, dim=-1)
        if p.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            cum = torch.cumsum(sorted_p, dim=-1)
            keep = (cum - sorted_p) < p.top_p  # always keeps the most likely token
            sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
            choice = torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=generators[i])
            picks[i] = int(order[choice])
        else:
            picks[i] = int(torch.multinomial(probs, 1, generator=generators[i]))
    return picks
