"""Runtime: a compiled OpenMythos model — ``mythos_rt.compile(...)`` returns one.

compile = load/trace → passes → materialize weights → lower (select kernels, allocate
every buffer once). A Runtime then runs plans: prefill in chunks of at most ``chunk``
tokens per row (chunked prefill is exact: causal offsets come from the cache lengths),
and decode one token per step against per-layer / per-loop KV caches.
"""

from __future__ import annotations

import os
import time
from typing import Any, Mapping, Optional, Union

import torch
import torch.nn as nn

from .config import MythosConfig
from .ir import Graph
from .lower import Lowered, Shape, Step, lower
from .passes import run_passes
from .sampling import sample
from .trace import trace
from .weights import materialize

DEFAULT_CHUNK = 256


class InputError(ValueError):
    """A call's arguments are invalid (names the argument, its value and the limit)."""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


class Runtime:
    """A compiled model: ``forward`` (stateless) and ``generate`` (KV-cached decode)."""

    def __init__(self, lowered: Lowered, graph_before_passes: Optional[Graph] = None,
                 timings: Optional[dict[str, float]] = None):
        self._low = lowered
        self.config: MythosConfig = lowered.cfg
        self.device: torch.device = lowered.device
        self.dtype: torch.dtype = lowered.dtype
        self.graph: Graph = lowered.graph
        self.traced_graph = graph_before_passes
        self.max_batch_size = lowered.max_batch
        self.max_seq_len = lowered.buffers.cos.shape[0]
        self.max_loops = lowered.max_loops
        self.timings = dict(timings or {})
        self._plans: dict[int, list[Step]] = {}

    # ---- introspection --------------------------------------------------------------------
    @property
    def backends(self) -> dict[str, str]:
        """Registry op → backend that runs it."""
        return {name: sel.backend for name, sel in sorted(self._low.impls.items())}

    def __repr__(self) -> str:
        ops = ", ".join(f"{k}={v}" for k, v in self.backends.items())
        return (f"Runtime({self.config.attn_type}, dim={self.config.dim}, "
                f"device={self.device}, dtype={_dtype_name(self.dtype)}, "
                f"max_batch_size={self.max_batch_size}, max_seq_len={self.max_seq_len}, "
                f"max_loops={self.max_loops}, ops: {ops})")

    def plan(self, n_loops: int) -> list[Step]:
        if n_loops not in self._plans:
            self._plans[n_loops] = self._low.plan(n_loops)
        return self._plans[n_loops]

    # ---- input checks -----------------------------------------------------------------------
    def _check_ids(self, input_ids: Any) -> torch.Tensor:
        if not isinstance(input_ids, torch.Tensor):
            raise InputError(f"input_ids must be a torch.Tensor of token ids, got "
                             f"{type(input_ids).__name__}")
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.dim() != 2:
            raise InputError(f"input_ids must have shape (B, T), got {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise InputError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        B, T = input_ids.shape
        if B < 1 or T < 1:
            raise InputError(f"input_ids is empty: shape {tuple(input_ids.shape)}")
        if B > self.max_batch_size:
            raise InputError(f"batch size {B} exceeds max_batch_size={self.max_batch_size} "
                             "(recompile with a larger max_batch_size)")
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            bad = lo if lo < 0 else hi
            raise InputError(f"token id {bad} is outside the vocabulary [0, "
                             f"{self.config.vocab_size})")
        return input_ids.to(device=self.device, dtype=torch.long)

    def _check_loops(self, n_loops: Optional[int]) -> int:
        n = self.config.max_loop_iters if n_loops is None else n_loops
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise InputError(f"n_loops must be an integer >= 1, got {n_loops!r}")
        if n > self.max_loops:
            raise InputError(f"n_loops={n} exceeds the compiled max_loops={self.max_loops} "
                             "(recompile with max_loops >= n_loops)")
        return n

    # ---- execution --------------------------------------------------------------------------
    def _run_chunk(self, ids: torch.Tensor, n_loops: int) -> torch.Tensor:
        """Run one chunk (B, T) at the current cache lengths; return logits (B, T, V) view."""
        B, T = ids.shape
        s = Shape(B, T)
        self._low.buffers.input_ids[:s.N].copy_(ids.reshape(-1))
        for step in self.plan(n_loops):
            step.run(s)
        return self._low.buffers.arena["logits"][:s.N].view(B, T, -1)

    def _prefill(self, ids: torch.Tensor, n_loops: int, want_all: bool) -> torch.Tensor:
        B, T = ids.shape
        chunk = self._low.chunk
        self._low.buffers.cache_lens.zero_()
        outs = []
        for start in range(0, T, chunk):
            logits = self._run_chunk(ids[:, start:start + chunk], n_loops)
            outs.append(logits.clone() if want_all else logits[:, -1:].clone())
        return torch.cat(outs, dim=1) if want_all else outs[-1]

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, n_loops: Optional[int] = None) -> torch.Tensor:
        """Stateless forward: logits (B, T, vocab), as the reference's forward without cache."""
        ids = self._check_ids(input_ids)
        n = self._check_loops(n_loops)
        if ids.shape[1] > self.max_seq_len:
            raise InputError(f"sequence length {ids.shape[1]} exceeds max_seq_len="
                             f"{self.max_seq_len}")
        return self._prefill(ids, n, want_all=True)

    __call__ = forward

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *,
                 n_loops: Optional[int] = None, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: Optional[int] = None, return_logits: bool = False):
        """Prefill once, then decode one token per step with the KV caches.

        Returns ids (B, T + max_new_tokens), and per-step logits (B, new, vocab) when
        ``return_logits``. temperature 0 is greedy; ``seed`` makes sampling reproducible.
        """
        ids = self._check_ids(input_ids)
        n = self._check_loops(n_loops)
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise InputError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
        B, T = ids.shape
        if T + max_new_tokens > self.max_seq_len:
            raise InputError(f"prompt length {T} + max_new_tokens {max_new_tokens} = "
                             f"{T + max_new_tokens} exceeds max_seq_len={self.max_seq_len}")
        if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
            raise InputError(f"invalid sampling parameters: temperature={temperature} (>= 0), "
                             f"top_k={top_k} (>= 0), top_p={top_p} (in (0, 1])")
        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(seed)
        out = torch.empty(B, T + max_new_tokens, dtype=torch.long, device=self.device)
        out[:, :T] = ids
        step_logits = []
        if max_new_tokens:
            logits = self._prefill(ids, n, want_all=False)[:, -1]
            for i in range(max_new_tokens):
                if return_logits:
                    step_logits.append(logits.float().clone())
                nxt = sample(logits, temperature, top_k, top_p, gen)
                out[:, T + i] = nxt
                if i + 1 < max_new_tokens:
                    logits = self._run_chunk(nxt[:, None], n)[:, -1]
        if return_logits:
            V = self.config.vocab_size
            stacked = (torch.stack(step_logits, 1) if step_logits
                       else torch.empty(B, 0, V, device=self.device))
            return out, stacked
        return out


def compile(model_or_path: Union[nn.Module, str, os.PathLike], *, device=None, dtype=None,
            backend: str = "auto", max_batch_size: int = 8, max_seq_len: Optional[int] = None,
            max_loops: Optional[int] = None, config: Any = None, chunk: int = DEFAULT_CHUNK,
            overrides: Optional[Mapping[str, str]] = None) -> Runtime:
    """Compile an OpenMythos model (module or checkpoint path) into a Runtime.

    device: default CUDA if available else CPU. dtype: default the weights' dtype.
    backend: "auto" | "torch" | "triton" | "cuda" (per-op ``overrides`` win).
    max_seq_len: KV-cache length (default the config's). max_loops: the largest n_loops
    you will ask for (default max_loop_iters). chunk: prefill tokens per row per launch.
    """
    t0 = time.perf_counter()
    graph, cfg, sd = trace(model_or_path, config)
    t1 = time.perf_counter()
    device = torch.device(device if device is not None else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype if dtype is not None else sd["embed.weight"].dtype
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    max_seq_len = cfg.max_seq_len if max_seq_len is None else max_seq_len
    max_loops = cfg.max_loop_iters if max_loops is None else max_loops
    for name, value, upper in (("max_batch_size", max_batch_size, None),
                               ("max_seq_len", max_seq_len, cfg.max_seq_len),
                               ("max_loops", max_loops, None), ("chunk", chunk, None)):
        if not isinstance(value, int) or value < 1:
            raise InputError(f"{name} must be a positive integer, got {value!r}")
        if upper is not None and value > upper:
            raise InputError(f"{name}={value} exceeds the model's {name}={upper} (RoPE tables)")
    optimized = run_passes(graph, dtype=_dtype_name(dtype))
    t2 = time.perf_counter()
    weights = materialize(optimized, sd, device)
    t3 = time.perf_counter()
    lowered = lower(optimized, cfg, weights, device, dtype, max_batch=max_batch_size,
                    chunk=min(chunk, max_seq_len), max_seq_len=max_seq_len,
                    max_loops=max_loops, backend=backend, overrides=overrides)
    t4 = time.perf_counter()
    return Runtime(lowered, graph, {"trace_s": t1 - t0, "passes_s": t2 - t1,
                                    "weights_s": t3 - t2, "lower_s": t4 - t3})
