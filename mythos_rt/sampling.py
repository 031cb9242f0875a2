"""Token sampling on device: greedy, temperature, top-k, top-p — no host synchronization.

``SamplingParams`` checks a call's sampling arguments once, before anything runs: a bad
value is one line of ``InputError``. A ``Sampler`` holds one call's state:

* per-row generators seeded from (seed, row index), so the tokens a row draws do not
  depend on the rows batched with it (serving engines do the same for per-request seeds);
* a device-side record of the first step whose logits were not finite. Reading it syncs
  with the host, so on a GPU the runtime reads it once per call (``Sampler.check``); on a
  CPU reading is free and happens every step, so no token is drawn from bad logits.
"""

from __future__ import annotations

import hashlib
import math
import numbers
import operator
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch

from .errors import InputError, clip

# Below float32's smallest normal number a temperature is flushed to zero or loses its
# precision on the device: logits / temperature would be inf or nan, not "nearly greedy".
MIN_TEMPERATURE = torch.finfo(torch.float32).tiny
SEED_LIMIT = 2 ** 64  # torch.Generator seeds are unsigned 64-bit

Generators = Union[torch.Generator, Sequence[torch.Generator], None]


class NonFiniteLogitsError(InputError):
    """The model produced NaN/Inf logits (weights, or a dtype too narrow for them)."""


def _bad(name: str, value: Any, rule: str) -> InputError:
    return InputError(f"invalid sampling parameters: {name}={clip(repr(value), 40)} "
                      f"({type(value).__name__}) "
                      f"{rule}")


def _integer(name: str, value: Any, lo: int, hi: Optional[int] = None) -> int:
    """``value`` as a Python int in [lo, hi), refusing floats and bools (7.9 is not 7)."""
    if isinstance(value, bool):
        raise _bad(name, value, "must be an integer, not a bool")
    try:
        v = operator.index(value)
    except TypeError:
        raise _bad(name, value, "must be an integer") from None
    if v < lo or (hi is not None and v >= hi):
        limit = f">= {lo}" if hi is None else f"in [{lo}, {hi})"
        raise _bad(name, value, f"must be {limit}")
    return v


def _real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _bad(name, value, "must be a real number")
    v = float(value)
    if not math.isfinite(v):
        raise _bad(name, value, "must be finite")
    return v


@dataclass(frozen=True)
class SamplingParams:
    """One call's sampling arguments, checked and normalized on construction.

    temperature: 0 (greedy) or a finite number >= float32's smallest normal (1.2e-38).
    top_k: integer >= 0 (0 = all tokens). top_p: in (0, 1]. seed: None or an integer in
    [0, 2**64). stop_ids: integer token ids (a tuple afterwards). vocab_limit: None or
    an integer >= 1: only ids below it are drawn (text generation sets it to the
    tokenizer's vocabulary when the model's is larger, so every drawn id has a text).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop_ids: tuple[int, ...] = ()
    vocab_limit: Optional[int] = None

    def __post_init__(self) -> None:
        t = _real("temperature", self.temperature)
        if t < 0 or 0 < t < MIN_TEMPERATURE:
            raise _bad("temperature", self.temperature,
                       f"must be 0 (greedy) or >= {MIN_TEMPERATURE:.3g} (float32's smallest "
                       "normal number)")
        p = _real("top_p", self.top_p)
        if not 0 < p <= 1:
            raise _bad("top_p", self.top_p, "must be in (0, 1]")
        seed = None if self.seed is None else _integer("seed", self.seed, 0, SEED_LIMIT)
        if isinstance(self.stop_ids, (str, bytes)) or not hasattr(self.stop_ids, "__iter__"):
            raise _bad("stop_ids", self.stop_ids, "must be a sequence of integer token ids")
        stops = tuple(_integer(f"stop_ids[{i}]", s, 0) for i, s in enumerate(self.stop_ids))
        object.__setattr__(self, "temperature", t)
        object.__setattr__(self, "top_k", _integer("top_k", self.top_k, 0))
        object.__setattr__(self, "top_p", p)
        object.__setattr__(self, "seed", seed)
        object.__setattr__(self, "stop_ids", stops)
        if self.vocab_limit is not None:
            object.__setattr__(self, "vocab_limit", _integer("vocab_limit", self.vocab_limit, 1))

    def check_vocab(self, vocab_size: int) -> "SamplingParams":
        """Refuse stop ids the model can never produce; return self."""
        for i, s in enumerate(self.stop_ids):
            if s >= vocab_size:
                raise InputError(f"invalid sampling parameters: stop_ids[{i}]={s} is outside "
                                 f"the vocabulary [0, {vocab_size})")
        return self


def row_seed(seed: int, row: int) -> int:
    """The seed of row ``row``'s generator: a 64-bit hash of (seed, row)."""
    digest = hashlib.blake2b(f"{seed}:{row}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class Sampler:
    """Draws one token per row per step for one generate/stream call."""

    def __init__(self, params: SamplingParams, batch: int, device: torch.device):
        self.params = params
        self.generators = None if params.seed is None else [
            torch.Generator(device=device).manual_seed(row_seed(params.seed, b))
            for b in range(batch)]
        self.steps = 0
        # -1 while every step's logits were finite, else the first bad step (on device).
        self._first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self._check_each_step = torch.device(device).type == "cpu"

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (B, V) → next ids (B,) int64."""
        finite = torch.isfinite(logits).all()
        self._first_bad = torch.where((self._first_bad < 0) & ~finite, self.steps,
                                      self._first_bad)
        if self._check_each_step:
            self.check()
        p = self.params
        self.steps += 1
        if p.vocab_limit is not None:
            logits = logits[:, :p.vocab_limit]  # ids keep their values: a prefix slice
        return sample(logits, p.temperature, p.top_k, p.top_p, self.generators)

    def check(self) -> None:
        """Raise NonFiniteLogitsError if any step so far saw NaN/Inf logits (one sync)."""
        step = int(self._first_bad)
        if step >= 0:
            raise NonFiniteLogitsError(
                f"the logits for new token {step + 1} contain NaN or Inf: the weights are not "
                "finite or the activations overflow the compiled dtype (float16 overflows "
                "above 65504; compile with dtype='float32' or 'bfloat16')")


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
           generator: Generators = None) -> torch.Tensor:
    """logits (B, V) → next ids (B,) int64.

    temperature 0 is greedy (argmax). Otherwise logits/temperature, then keep the top_k
    largest (0 = all) and the smallest set whose probability reaches top_p (1 = all),
    and draw with ``generator``: one for all rows, or one per row (each row's draw then
    depends only on its own generator). Sampling uses the exponential race (argmax of
    p / Exp(1) noise), which needs no cumulative search or host sync. Logits are shifted
    by their row maximum before dividing, so no normal temperature overflows.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    x = logits.float()
    x = (x - x.amax(dim=-1, keepdim=True)) / temperature  # (B, V), <= 0
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
    return (probs / _exponential_noise(probs, generator)).argmax(dim=-1)


def _exponential_noise(like: torch.Tensor, generator: Generators) -> torch.Tensor:
    """Exp(1) noise shaped like ``like`` (B, V), from one generator or one per row."""
    noise = torch.empty_like(like)
    if generator is None or isinstance(generator, torch.Generator):
        return noise.exponential_(1.0, generator=generator)
    if len(generator) != like.shape[0]:
        raise ValueError(f"{len(generator)} generators for {like.shape[0]} rows")
    for row, gen in zip(noise, generator):
        row.exponential_(1.0, generator=gen)
    return noise
