"""Token sampling on device: greedy, temperature, top-k, top-p — no host synchronization."""

from __future__ import annotations

from typing import Optional

import torch


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """logits (B, V) → next ids (B,) int64.

    temperature 0 is greedy (argmax). Otherwise logits/temperature, then keep the top_k
    largest (0 = all) and the smallest set whose probability reaches top_p (1 = all),
    and draw with ``generator`` (seeded → reproducible). Sampling uses the exponential
    race (argmax of p / Exp(1) noise), which needs no cumulative search or host sync.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    x = logits.float() / temperature
    if top_k > 0 and top_k < x.shape[-1]:
        kth = x.topk(top_k, dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        sorted_x, order = x.sort(dim=-1, descending=True)
        probs = sorted_x.softmax(dim=-1)
        # drop a token when the mass strictly before it already reaches top_p
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        x = x.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    probs = x.softmax(dim=-1)
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / noise).argmax(dim=-1)
