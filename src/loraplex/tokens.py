"""Token-id lists to one padded batch (``input_ids`` and ``attention_mask``), for every forward loraplex builds."""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["pad_batch"]


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, *, left: bool = False,
              device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` [N, L] (long), L the longest sequence.

    Right padding by default (encoders, training, scoring); ``left`` puts the padding first, so that generation
    continues every row from its last real token."""
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        span = slice(n - len(s), n) if left else slice(0, len(s))
        ids[i, span] = torch.tensor(list(s), dtype=torch.long)
        mask[i, span] = 1
    if device is not None:
        ids, mask = ids.to(device), mask.to(device)
    return ids, mask
