"""What a config will allocate, estimated from its numbers before anything is allocated.

A config.json of a few bytes can ask for terabytes (``"n_experts": 3000000``, a
``max_seq_len`` of 2e8). Every place that turns a config into tensors — the checkpoint
loader (RoPE tables, and weights it reads into memory), the reference model, the
lowering (KV caches, activation arena) — first calls ``check_fits``, which compares the
estimate with the memory available and refuses, naming the field that drives it.

The estimate is closed-form arithmetic on the config (a test checks the parameter count
against the reference model's tensors), so it costs microseconds whatever the values.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Optional

import torch

from .config import ConfigError, MythosConfig, mythos_1b
from .errors import InputError

# Python bookkeeping per named tensor while a state_dict is checked (key, shape tuple,
# dict slot): it dominates when a config asks for millions of tiny tensors.
TENSOR_OVERHEAD_BYTES = 256
# Bytes per (position, frequency) while a RoPE table is built: float32 angles and ones,
# then the complex64 phasors.
ROPE_BYTES_PER_ENTRY = 16
# Sizes the estimate grows with that are compile options, not config fields.
OPTION_SIZES = ("max_batch", "max_seq_len", "max_loops")


class MemoryLimitError(ConfigError, InputError):
    """A config (or compile option) asks for more memory than the machine has."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a config will allocate, by what allocates them."""
    weights: int = 0
    rope_tables: int = 0
    kv_caches: int = 0
    activations: int = 0
    depth_store: int = 0  # lazy ACT's per-position state (mythos_rt.depth)

    @property
    def total(self) -> int:
        return (self.weights + self.rope_tables + self.kv_caches + self.activations
                + self.depth_store)

    def describe(self) -> str:
        parts = [f"{name.replace('_', ' ')} {format_bytes(getattr(self, name))}"
                 for name in ("weights", "rope_tables", "kv_caches", "activations",
                              "depth_store")
                 if getattr(self, name)]
        return ", ".join(parts)


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _most(n: int, world: int) -> int:
    """Rank 0's share of ``n`` items split over ``world`` ranks: the largest, since the
    first ranks hold the extra ones (``mythos_rt.parallel.share``)."""
    return -(-n // world)


def _attention_params(cfg: MythosConfig, world: int = 1) -> tuple[int, int]:
    """(parameters, tensors) of one attention sublayer (rank 0's share over ``world``
    ranks: MLA's query heads, GQA's KV heads with their query heads)."""
    D = cfg.dim
    if cfg.attn_type == "mla":
        h = _most(cfg.n_heads, world)
        rq, rkv, rope = cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_rope_head_dim
        n = (rq * D + rq + h * (cfg.qk_nope_head_dim + rope) * rq + (rkv + rope) * D + rkv
             + h * (cfg.qk_nope_head_dim + cfg.v_head_dim) * rkv + D * h * cfg.v_head_dim)
        return n, 8
    kv_heads = _most(cfg.n_kv_heads, world)
    heads = kv_heads * (cfg.n_heads // cfg.n_kv_heads)
    return 2 * heads * cfg.head_dim * D + 2 * kv_heads * cfg.head_dim * D, 4


def parameter_count(cfg: MythosConfig, world: int = 1) -> tuple[int, int]:
    """(parameters, tensors) of the reference model's state_dict without its RoPE tables:
    the numbers ``checkpoint.expected_shapes`` lists, in closed form.

    ``world`` > 1: what rank 0, the busiest rank, holds of the model split over ``world``
    ranks (docs/parallel.md): its heads, FFN columns, routed experts and shared slots, the
    embedding's and the head's ``ceil(V / world)`` rows (each; the embedding one zero
    row more), the rest whole.
    """
    D, w = cfg.dim, world
    attn, attn_tensors = _attention_params(cfg, w)
    dense = 2 * D + attn + 3 * D * _most(cfg.dense_hidden, w)
    slots = cfg.n_shared_experts * cfg.n_experts_per_tok  # shared experts, I columns each
    moe = (2 * D + attn + cfg.n_experts * (D + 1)
           + 3 * D * cfg.expert_dim * (_most(cfg.n_experts, w) + _most(slots, w)))
    recurrent = 4 * D + 2 + 2 * cfg.lora_rank * D + cfg.max_loop_iters * cfg.lora_rank
    layers = cfg.prelude_layers + cfg.coda_layers
    vocab = 2 * cfg.vocab_size * D if w == 1 else (2 * _most(cfg.vocab_size, w) + 1) * D
    params = vocab + D + layers * dense + moe + recurrent
    tensors = (3 + layers * (5 + attn_tensors) + (4 + attn_tensors + 3 * cfg.n_experts
                                                    + 3 * cfg.n_shared_experts) + 9)
    return params, tensors


def estimate(cfg: MythosConfig, *, dtype_bytes: int, weights: bool = True, max_batch: int = 0,
             max_seq_len: Optional[int] = None, max_loops: int = 0,
             chunk: int = 0, lazy_depth: bool = False,
             tensor_parallel: int = 1) -> MemoryEstimate:
    """Bytes allocated for ``cfg`` at ``dtype_bytes`` per element.

    weights: the parameters (the tied head not counted twice) and per-tensor bookkeeping.
    RoPE tables: both of the reference's tables at ``max_seq_len`` (default the config's).
    KV caches: one per prelude layer, per loop (``max_loops``) and per coda layer, for
    ``max_batch`` rows of ``max_seq_len`` tokens. Activations: the lowering's arena of
    ``max_batch`` × ``chunk`` token rows (logits, one row of width dim per value, the
    dense FFNs' hidden rows). Depth store: with ``lazy_depth`` (act_mode lazy or reuse),
    each cached position's loop state and injection input (``depth.store_bytes``).
    ``tensor_parallel`` N > 1: one rank's share of a model split over N ranks (the
    busiest rank's, ``parameter_count(cfg, N)``): split weights, GQA caches of its KV
    heads (MLA's latent cache is replicated), its FFN columns and vocabulary rows in the
    arena (the gathered logits whole).
    """
    S = cfg.max_seq_len if max_seq_len is None else max_seq_len
    N = tensor_parallel
    params, tensors = parameter_count(cfg, N)
    tied = cfg.vocab_size * cfg.dim if N == 1 else 0  # one tensor unless split
    weight_bytes = ((params - tied) * dtype_bytes
                    + tensors * TENSOR_OVERHEAD_BYTES) if weights else 0
    rope_pairs = cfg.head_dim // 2 + cfg.qk_rope_head_dim // 2
    if cfg.attn_type == "mla":
        per_token = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    else:
        per_token = 2 * _most(cfg.n_kv_heads, N) * cfg.head_dim
    layers = cfg.prelude_layers + cfg.coda_layers
    kv = (layers + max_loops) * max_batch * S * per_token * dtype_bytes
    width = (cfg.vocab_size + (_most(cfg.vocab_size, N) if N > 1 else 0)
             + (4 * layers + 8) * cfg.dim + 3 * layers * _most(cfg.dense_hidden, N))
    from .depth import store_bytes
    return MemoryEstimate(weights=weight_bytes, rope_tables=S * rope_pairs * ROPE_BYTES_PER_ENTRY,
                          kv_caches=kv, activations=max_batch * chunk * width * dtype_bytes,
                          depth_store=store_bytes(max_batch, S, cfg.dim, dtype_bytes)
                          if lazy_depth else 0)


def available_bytes(device: torch.device) -> int:
    """Memory free for new allocations on ``device``: CUDA's free memory, else the host's
    MemAvailable (/proc/meminfo), else its free physical pages."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _driver(cfg: MythosConfig, sizes: dict, **kw) -> str:
    """The config field or size option to name when the estimate does not fit: of those
    above a real model's value (mythos_1b's; batch 1, the config's loops), the one whose
    lowering to that value shrinks the estimate most."""
    typical = mythos_1b()
    trials = {}
    for f in dataclasses.fields(cfg):
        value, usual = getattr(cfg, f.name), getattr(typical, f.name)
        if isinstance(value, int) and isinstance(usual, int) and value > usual:
            smaller = dataclasses.replace(cfg, **{f.name: usual})
            trials[f"config.{f.name}={value}"] = estimate(smaller, **kw, **sizes).total
    usual_sizes = dict(max_batch=1, max_seq_len=typical.max_seq_len, max_loops=cfg.max_loop_iters)
    for name in OPTION_SIZES:
        if sizes.get(name) and sizes[name] > usual_sizes[name]:
            label = "max_batch_size" if name == "max_batch" else name
            trials[f"{label}={sizes[name]}"] = estimate(
                cfg, **kw, **{**sizes, name: usual_sizes[name]}).total
    return min(trials, key=trials.__getitem__) if trials else "the config"


def check_fits(cfg: MythosConfig, device: torch.device | str, what: str, *, dtype_bytes: int,
               weights: bool = True, max_batch: int = 0, max_seq_len: Optional[int] = None,
               max_loops: int = 0, chunk: int = 0, lazy_depth: bool = False,
               tensor_parallel: int = 1) -> MemoryEstimate:
    """Refuse with MemoryLimitError when ``estimate(...)`` exceeds the memory available on
    ``device``; ``what`` says what would allocate it. Returns the estimate
    (``tensor_parallel``: one rank's share, checked against the rank's own device)."""
    device = torch.device(device)
    kw = dict(dtype_bytes=dtype_bytes, weights=weights, chunk=chunk, lazy_depth=lazy_depth,
              tensor_parallel=tensor_parallel)
    sizes = dict(max_batch=max_batch, max_seq_len=max_seq_len, max_loops=max_loops)
    est = estimate(cfg, **kw, **sizes)
    if device.type == "meta":  # shapes only, nothing is allocated
        return est
    free = available_bytes(device)
    if est.total > free:
        raise MemoryLimitError(
            f"{_driver(cfg, sizes, **kw)}: {what} would allocate about "
            f"{format_bytes(est.total)} ({est.describe()}), more than the "
            f"{format_bytes(free)} of memory available on {device}")
    return est
