"""Analytic cost model: bytes moved and FLOPs per op of an OpenMythos forward.

Everything here is arithmetic on a ``MythosConfig``; nothing touches a device. The
numbers are lower bounds (each weight read once per launch, activations read/written
once), which is what a roofline needs.

Decode floor (docs/design.md "Performance model"). One decode step reads, in this order:

* the token's embedding row;
* per Prelude / Coda layer: attention weights, the dense SwiGLU FFN, two RMSNorms;
* per loop iteration t (the block is *re-read every loop*, its weights do not stay in
  cache between loops: a 1B block is ~300 MB against a 50 MB L2): attention weights,
  two RMSNorms, the router, the k routed experts a token picks, the shared experts,
  and the recurrent step (loop norm, LoRA, LTI, ACT head);
* the final norm and the (tied) head, ``vocab × dim``;
* plus, when the context is not empty, every layer's KV cache up to the context length
  (MLA: the compact latent + one rope key per token, read by the absorbed decode).

With empty context this reproduces docs/design.md's examples to < 0.1% in bf16, decimal GB:
mythos_1b T=16 5.30 GB → 1.77 ms, mythos_3b 15.6 GB → 5.20 ms, mythos_10b T=24
42.6 GB → 14.2 ms at 3.0 TB/s. The recurrent-step and embedding terms are < 0.03% of
the total; the head (tied embedding, 131 MB for 1b) and the Prelude/Coda (175 MB)
are what separate docs/design.md's numbers from "loops × block" alone (5.00 GB).

Prefill floor: 2 · active parameters FLOPs per token, where a token's active
parameters count the looped block T times (attention + router + k routed + shared +
recurrent step per loop), plus Prelude/Coda and the head. Attention-score FLOPs
(quadratic in length) are reported separately by ``op_costs``.

Multi-GPU (``parallel_plan``, docs/scaling.md): the same floors taken over the busiest
rank's share of a tensor + expert parallel split, plus ring / hierarchical collectives
at NVLink and 400 Gb/s InfiniBand rates, and the fewest H100s that hold each preset.

Dimension letters: N tokens in the launch (B rows × T each), S cached context, D dim,
H heads, R kv_lora_rank, I expert_dim, E routed experts, k experts per token.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional, Union

import torch

from .config import MythosConfig

# docs/design.md's measured ceilings for one H100 80GB.
H100_COPY_GBPS = 3000.0
H100_BF16_TFLOPS = 798.0

DtypeLike = Union[str, torch.dtype, int]


def dtype_bytes(dtype: DtypeLike) -> int:
    """Bytes per element: an int passes through, "bfloat16"/torch.bfloat16 → 2, ..."""
    if isinstance(dtype, int):
        return dtype
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.replace("torch.", ""))
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class Ceilings:
    """Hardware ceilings timings are judged against; ``measured`` False = taken on trust."""
    copy_gbps: float = H100_COPY_GBPS
    bf16_tflops: float = H100_BF16_TFLOPS
    measured: bool = False
    source: str = "docs/design.md: one H100 80GB (not measured in this run)"

    def to_dict(self) -> dict:
        return asdict(self)


H100 = Ceilings()


# ---- parameter counts ---------------------------------------------------------------

def attention_params(cfg: MythosConfig) -> int:
    """Weights of one attention layer (MLA incl. its q/kv norms; GQA q/k/v/o)."""
    D, H = cfg.dim, cfg.n_heads
    if cfg.attn_type == "gqa":
        hd = cfg.head_dim
        return D * H * hd + 2 * D * cfg.n_kv_heads * hd + H * hd * D
    q, R = cfg.q_lora_rank, cfg.kv_lora_rank
    nope, rope, v = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    return (D * q + q                      # q_down, q_norm
            + q * H * (nope + rope)        # q_up_nope, q_up_rope
            + D * (R + rope) + R           # kv_down, kv_norm
            + R * H * (nope + v)           # kv_up (= absorbed W_UK + W_UV)
            + H * v * D)                   # wo


def expert_params(cfg: MythosConfig) -> int:
    """One routed expert: gate, up (D → I) and down (I → D)."""
    return 3 * cfg.dim * cfg.expert_dim


def shared_params(cfg: MythosConfig) -> int:
    """All shared experts, each of hidden k·I."""
    return cfg.n_shared_experts * 3 * cfg.dim * cfg.shared_expert_dim


def router_params(cfg: MythosConfig) -> int:
    return cfg.dim * cfg.n_experts  # (+ an E-vector bias, counted in fp32 below)


def dense_ffn_params(cfg: MythosConfig) -> int:
    return 3 * cfg.dim * cfg.dense_hidden


def recurrent_step_params(cfg: MythosConfig) -> int:
    """Per loop outside the block: loop norm, LoRA down/B + one scale row, LTI A and B,
    the ACT halting head (D + 1)."""
    D, r = cfg.dim, cfg.lora_rank
    return D + 2 * D * r + r + 2 * D + D + 1


def kv_cache_width(cfg: MythosConfig) -> int:
    """Cached elements per token per layer: MLA latent + rope key; GQA K and V."""
    if cfg.attn_type == "mla":
        return cfg.kv_lora_rank + cfg.qk_rope_head_dim
    return 2 * cfg.n_kv_heads * cfg.head_dim


def expected_experts_hit(cfg: MythosConfig, n_tokens: int) -> float:
    """Distinct routed experts N tokens touch under uniform routing: E·(1 − (1 − k/E)^N)."""
    E, k = cfg.n_experts, cfg.n_experts_per_tok
    return E * (1.0 - (1.0 - k / E) ** max(0, n_tokens))


def active_params_per_token(cfg: MythosConfig, n_loops: Optional[int] = None) -> int:
    """Parameters one token is multiplied through (the looped block counted T times)."""
    T = cfg.max_loop_iters if n_loops is None else n_loops
    loop = (attention_params(cfg) + 2 * cfg.dim + router_params(cfg)
            + cfg.n_experts_per_tok * expert_params(cfg) + shared_params(cfg)
            + recurrent_step_params(cfg))
    layers = (cfg.prelude_layers + cfg.coda_layers) * (
        attention_params(cfg) + dense_ffn_params(cfg) + 2 * cfg.dim)
    return T * loop + layers + cfg.dim + cfg.vocab_size * cfg.dim


# ---- per-op costs -------------------------------------------------------------------

@dataclass
class OpCost:
    """One op's work in a launch; ``count`` = how many times it runs (layers × loops).

    ``flops``/``bytes`` are totals over all ``count`` runs. ``kind`` is the plan Step kind
    whose measured time this op's work is compared with (profiling groups by it).
    """
    name: str
    kind: str
    count: int
    flops: float
    weight_bytes: float
    act_bytes: float = 0.0
    cache_bytes: float = 0.0
    notes: str = ""

    @property
    def bytes(self) -> float:
        return self.weight_bytes + self.act_bytes + self.cache_bytes

    @property
    def intensity(self) -> float:
        """Arithmetic intensity, FLOPs per byte."""
        return self.flops / self.bytes if self.bytes else float("inf")

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(bytes=self.bytes, intensity=self.intensity)
        return d


@dataclass
class Workload:
    """One launch of the plan: B rows × T new tokens at context S, n_loops, dtype."""
    batch: int = 1
    new_tokens: int = 1
    context: int = 0
    n_loops: Optional[int] = None
    dtype: DtypeLike = "bfloat16"
    attention_flops: bool = True  # include score/PV FLOPs (quadratic in length)
    extra: dict = field(default_factory=dict)

    @property
    def N(self) -> int:
        return self.batch * self.new_tokens


def _attention_cost(cfg: MythosConfig, w: Workload, count: int, name: str) -> OpCost:
    b, N, B, T, S = dtype_bytes(w.dtype), w.N, w.batch, w.new_tokens, w.context
    P = attention_params(cfg)
    H, D = cfg.n_heads, cfg.dim
    ctx_read = S                        # cached rows read; the T new rows are written
    avg_ctx = S + (T + 1) / 2           # causal average
    flops = 2.0 * N * P
    if cfg.attn_type == "mla" and T == 1:
        # absorbed decode: scores over latent+rope, PV in latent space (W_UK/W_UV ⊂ P)
        R, rope = cfg.kv_lora_rank, cfg.qk_rope_head_dim
        score = 2.0 * N * H * avg_ctx * ((R + rope) + R)
        note = "MLA absorbed decode over the compact cache"
    elif cfg.attn_type == "mla":
        nope, rope, v = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        score = 2.0 * N * H * avg_ctx * (nope + rope + v)
        note = "MLA prefill (K/V expanded per head)"
    else:
        score = 2.0 * N * H * avg_ctx * 2 * cfg.head_dim
        note = "GQA"
    if w.attention_flops:
        flops += score
    width = kv_cache_width(cfg)
    cache = (B * ctx_read * width + N * width) * b  # read the old cache, write the new rows
    return OpCost(name, f"{cfg.attn_type}_attention", count, count * flops, count * P * b,
                  count * 2.0 * N * D * b, count * cache, note)


def op_costs(cfg: MythosConfig, w: Workload = Workload()) -> list[OpCost]:
    """Per-op cost of one launch of the plan (Prelude → T loops → Coda → head)."""
    T = cfg.max_loop_iters if w.n_loops is None else w.n_loops
    b, N, D = dtype_bytes(w.dtype), w.N, cfg.dim
    L = cfg.prelude_layers + cfg.coda_layers
    k, S, I = cfg.n_experts_per_tok, cfg.n_shared_experts, cfg.expert_dim
    hit = expected_experts_hit(cfg, N)
    ops = [
        OpCost("embed", "embed", 1, 0.0, N * D * b, N * D * b),
        OpCost("rmsnorm", "rmsnorm", 2 * (L + T) + 1, (2 * (L + T) + 1) * 4.0 * N * D,
               (2 * (L + T) + 1) * D * b, (2 * (L + T) + 1) * 3.0 * N * D * b),
    ]
    if L:
        ops.append(_attention_cost(cfg, w, L, "attention (prelude+coda)"))
        ops.append(OpCost("dense_ffn", "dense_ffn", L, L * 2.0 * N * dense_ffn_params(cfg),
                          L * dense_ffn_params(cfg) * b,
                          L * N * (2 * D + 3 * cfg.dense_hidden) * b))
    ops.append(_attention_cost(cfg, w, T, "attention (loop)"))
    ops += [
        OpCost("router", "moe", T, T * 2.0 * N * router_params(cfg),
               T * (router_params(cfg) * b + cfg.n_experts * 4), T * N * (D * b + 4 * cfg.n_experts)),
        OpCost("routed_experts", "moe", T, T * 2.0 * N * k * expert_params(cfg),
               T * hit * expert_params(cfg) * b, T * N * (2 * D + 3 * k * I) * b,
               notes=f"{hit:.2f} of {cfg.n_experts} experts hit (uniform routing)"),
        OpCost("shared_experts", "moe", T, T * 2.0 * N * shared_params(cfg),
               T * shared_params(cfg) * b, T * N * (D + 3 * S * k * I) * b),
        # LoRA 2·2·D·r, LTI/ACT/loop-embed/norm ~ 12 flops per channel
        OpCost("recurrent_step", "loop_epilogue", T,
               T * N * (4.0 * D * cfg.lora_rank + 12.0 * D),
               T * recurrent_step_params(cfg) * b, T * 7.0 * N * D * b,
               notes="h, e, block_out, h_out read; h, h_out, combined written"),
        OpCost("head", "head", 1, 2.0 * N * cfg.vocab_size * D, cfg.vocab_size * D * b,
               N * (D * b + cfg.vocab_size * b)),
    ]
    return ops


def summarize(ops: list[OpCost]) -> dict:
    return {"flops": sum(o.flops for o in ops), "bytes": sum(o.bytes for o in ops),
            "weight_bytes": sum(o.weight_bytes for o in ops)}


# ---- decode and prefill floors --------------------------------------------------------

def decode_step_bytes(cfg: MythosConfig, n_loops: Optional[int] = None, *, batch: int = 1,
                      context: int = 0, dtype: DtypeLike = "bfloat16") -> float:
    """Bytes one decode step (``batch`` rows, one token each) must read at minimum.

    Weights are read once per launch, so in a batch the routed experts read are the
    expected distinct experts hit; each row reads its KV caches up to ``context`` and
    writes one new cache row per layer. Activations (a few rows of D) are left out.
    """
    ops = op_costs(cfg, Workload(batch=batch, new_tokens=1, context=context, n_loops=n_loops,
                                 dtype=dtype))
    return sum(o.weight_bytes + o.cache_bytes for o in ops)


def decode_bytes_per_token(cfg: MythosConfig, n_loops: Optional[int] = None, *,
                           dtype: DtypeLike = "bfloat16", context: int = 0) -> float:
    """Batch-1 decode: bytes of weights (and KV cache at ``context``) read per token."""
    return decode_step_bytes(cfg, n_loops, batch=1, context=context, dtype=dtype)


def decode_floor_ms(cfg: MythosConfig, n_loops: Optional[int] = None, *, batch: int = 1,
                    context: int = 0, dtype: DtypeLike = "bfloat16",
                    ceilings: Ceilings = H100) -> float:
    """Floor of one decode step (all ``batch`` rows) in ms: max(bytes/bandwidth, FLOPs/peak)."""
    nbytes = decode_step_bytes(cfg, n_loops, batch=batch, context=context, dtype=dtype)
    mem_ms = nbytes / (ceilings.copy_gbps * 1e9) * 1e3
    flop_ms = batch * prefill_flops_per_token(cfg, n_loops) / (ceilings.bf16_tflops * 1e12) * 1e3
    return max(mem_ms, flop_ms)


def prefill_flops_per_token(cfg: MythosConfig, n_loops: Optional[int] = None) -> float:
    """docs/design.md's prefill work: 2 · active parameters per token."""
    return 2.0 * active_params_per_token(cfg, n_loops)


def prefill_floor_ms(cfg: MythosConfig, tokens: int, n_loops: Optional[int] = None, *,
                     ceilings: Ceilings = H100) -> float:
    """Compute-bound floor of prefilling ``tokens`` tokens (all rows) in milliseconds."""
    return tokens * prefill_flops_per_token(cfg, n_loops) / (ceilings.bf16_tflops * 1e12) * 1e3


# ---- measured time → achieved rates ---------------------------------------------------

def achieved(ms: float, *, bytes_moved: float = 0.0, flops: float = 0.0,
             ceilings: Ceilings = H100) -> dict:
    """Achieved GB/s and TFLOP/s of a measured time and their % of the ceilings."""
    out: dict = {}
    if ms <= 0:
        return out
    if bytes_moved:
        gbps = bytes_moved / (ms * 1e-3) / 1e9
        out.update(gbps=round(gbps, 2), pct_hbm=round(100 * gbps / ceilings.copy_gbps, 2))
    if flops:
        tflops = flops / (ms * 1e-3) / 1e12
        out.update(tflops=round(tflops, 4),
                   pct_bf16_peak=round(100 * tflops / ceilings.bf16_tflops, 2))
    return out


def roofline_tflops(intensity: float, ceilings: Ceilings = H100) -> float:
    """Attainable TFLOP/s at an arithmetic intensity (FLOPs/byte)."""
    return min(ceilings.bf16_tflops, intensity * ceilings.copy_gbps / 1e3)


def report(cfg: MythosConfig, n_loops: Optional[int] = None, dtype: DtypeLike = "bfloat16",
           ceilings: Ceilings = H100) -> dict:
    """Headline floors of a config (what ``mythos-rt bench`` prints next to timings)."""
    T = cfg.max_loop_iters if n_loops is None else n_loops
    nbytes = decode_bytes_per_token(cfg, T, dtype=dtype)
    return {"n_loops": T, "dtype": str(dtype), "active_params_per_token": active_params_per_token(cfg, T),
            "decode_bytes_per_token": nbytes, "decode_gb_per_token": round(nbytes / 1e9, 3),
            "decode_floor_ms": round(decode_floor_ms(cfg, T, dtype=dtype, ceilings=ceilings), 4),
            "prefill_gflops_per_token": round(prefill_flops_per_token(cfg, T) / 1e9, 3),
            "ceilings": ceilings.to_dict()}


# ---- tensor + expert parallel over N GPUs: memory, communication, latency -------------
#
# The plan the runtime's multi-GPU path implements (docs/scaling.md states it in full):
# one group of N ranks; attention tensor-parallel by heads (MLA's q/kv down-projections
# and norms, which every head reads, replicated), Prelude/Coda FFNs by hidden columns,
# routed experts expert-parallel (E/N per rank), shared experts by columns, router,
# norms and the loop's recurrent step replicated, the tied embedding/head by vocabulary.
# Collectives per decode step: one all-reduce of the (rows, dim) activation after the
# embedding, after every attention and every FFN/MoE (so 2 per Prelude/Coda layer and
# 2 per loop), and one all-gather of the fp32 logits.

@dataclass(frozen=True)
class Link:
    """A class of GPU-to-GPU link: per-direction bandwidth per GPU and latency per hop."""
    name: str
    gbps: float
    hop_us: float


NVLINK = Link("NVLink 4 (H100 SXM)", 450.0, 2.0)
IB400 = Link("InfiniBand NDR 400 Gb/s, one NIC per GPU", 50.0, 6.0)


@dataclass(frozen=True)
class Fabric:
    """How N GPUs are wired: nodes of up to ``node`` GPUs joined by ``intra`` links, the
    nodes joined by ``inter`` links (one NIC per GPU). Collectives over more than one node
    run hierarchically (see ``all_reduce_ms``)."""
    name: str
    intra: Link
    inter: Link
    node: int = 8

    def levels(self, n: int) -> tuple[int, int]:
        """(GPUs per node g, nodes m) of a group of ``n`` GPUs, n = g·m."""
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"the number of GPUs must be a positive integer, got {n!r}")
        if n <= self.node:
            return n, 1
        if n % self.node:
            raise ValueError(f"fabric {self.name!r} has {self.node} GPUs per node: "
                             f"{n} GPUs do not fill whole nodes")
        return self.node, n // self.node


# The two bandwidth classes, and the usual machine: 8-GPU HGX nodes on NVLink joined by IB.
FABRICS = {
    "nvlink": Fabric("nvlink", NVLINK, NVLINK),
    "ib": Fabric("ib", IB400, IB400),
    "hgx": Fabric("hgx", NVLINK, IB400),
}


def _fabric(fabric: Union[str, Fabric]) -> Fabric:
    if isinstance(fabric, Fabric):
        return fabric
    if fabric not in FABRICS:
        raise ValueError(f"unknown fabric {fabric!r}; choose one of: {', '.join(FABRICS)}")
    return FABRICS[fabric]


def _link_s(nbytes: float, link: Link) -> float:
    return nbytes / (link.gbps * 1e9)


def all_reduce_ms(nbytes: float, n: int, fabric: Union[str, Fabric] = "hgx") -> float:
    """Ring all-reduce of ``nbytes`` per rank over ``n`` GPUs, in ms.

    One level (g GPUs on a link): 2(g−1)/g · bytes/bw + 2(g−1) · hop latency. Across m
    nodes, hierarchical: reduce-scatter in the node, all-reduce of each GPU's 1/g shard
    across nodes (g rails in parallel, one NIC per GPU), all-gather in the node.
    """
    f = _fabric(fabric)
    g, m = f.levels(n)
    s = (2 * (g - 1) / g * _link_s(nbytes, f.intra)
         + 2 * (m - 1) / m * _link_s(nbytes / g, f.inter))
    us = 2 * (g - 1) * f.intra.hop_us + 2 * (m - 1) * f.inter.hop_us
    return s * 1e3 + us * 1e-3


def all_gather_ms(nbytes: float, n: int, fabric: Union[str, Fabric] = "hgx") -> float:
    """Ring all-gather whose *result* is ``nbytes`` (each rank contributes nbytes/n), in ms:
    (g−1)/g · bytes/bw + (g−1) hops in a node; across nodes the 1/g slices first."""
    f = _fabric(fabric)
    g, m = f.levels(n)
    s = (g - 1) / g * _link_s(nbytes, f.intra) + (m - 1) / m * _link_s(nbytes / g, f.inter)
    us = (g - 1) * f.intra.hop_us + (m - 1) * f.inter.hop_us
    return s * 1e3 + us * 1e-3


def all_to_all_ms(nbytes: float, n: int, fabric: Union[str, Fabric] = "hgx") -> float:
    """All-to-all where each rank sends ``nbytes`` spread evenly over all n ranks (its own
    1/n stays), in ms. All messages are posted at once (direct connections), so the time
    is the slower level's bytes/bw plus one hop of each level used."""
    f = _fabric(fabric)
    g, m = f.levels(n)
    if n == 1:
        return 0.0
    intra_s = (g - 1) / n * _link_s(nbytes, f.intra)
    inter_s = (n - g) / n * _link_s(nbytes, f.inter)
    us = (f.intra.hop_us if g > 1 else 0.0) + (f.inter.hop_us if m > 1 else 0.0)
    return max(intra_s, inter_s) * 1e3 + us * 1e-3


def _shard(size: int, n: int) -> int:
    """The largest of n near-equal shards of ``size`` (what the busiest rank holds)."""
    return -(-size // n)


def split_sizes(cfg: MythosConfig) -> list[int]:
    """GPU counts the plan splits evenly: n dividing both n_heads and n_experts (every
    rank ≥ 1 head and the same number of experts). Column and vocabulary splits may be
    uneven (the largest shard is counted)."""
    return [n for n in range(1, min(cfg.n_heads, cfg.n_experts) + 1)
            if cfg.n_heads % n == 0 and cfg.n_experts % n == 0]


def _check_split(cfg: MythosConfig, n: int) -> None:
    if n not in split_sizes(cfg):
        raise ValueError(f"{n!r} GPUs do not split n_heads={cfg.n_heads} and "
                         f"n_experts={cfg.n_experts} evenly; choose one of: "
                         f"{', '.join(map(str, split_sizes(cfg)))}")


def rank_attention_params(cfg: MythosConfig, n: int) -> int:
    """One attention layer's weights on one of n ranks (split by heads). MLA's q/kv
    down-projections and their norms feed every head, so each rank holds them whole;
    GQA's K/V heads are split while n ≤ n_kv_heads and replicated beyond."""
    D, h = cfg.dim, _shard(cfg.n_heads, n)
    if cfg.attn_type == "gqa":
        hd = cfg.head_dim
        return 2 * h * hd * D + 2 * _shard(cfg.n_kv_heads, n) * hd * D
    q, R, rope = cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    nope, v = cfg.qk_nope_head_dim, cfg.v_head_dim
    return D * q + q + D * (R + rope) + R + h * (q * (nope + rope) + R * (nope + v) + v * D)


def rank_weight_params(cfg: MythosConfig, n: int) -> int:
    """Parameters one of n ranks stores (the tied head once; at n = 1 the whole model,
    ``memory.parameter_count`` less the head's copy of the embedding)."""
    D, attn = cfg.dim, rank_attention_params(cfg, n)
    dense = 2 * D + attn + 3 * D * _shard(cfg.dense_hidden, n)
    moe = (2 * D + attn + cfg.n_experts * (D + 1)      # norms, attention, router + bias
           + _shard(cfg.n_experts, n) * expert_params(cfg)
           + 3 * D * _shard(cfg.n_shared_experts * cfg.shared_expert_dim, n))
    recurrent = 4 * D + 2 + 2 * cfg.lora_rank * D + cfg.max_loop_iters * cfg.lora_rank
    layers = cfg.prelude_layers + cfg.coda_layers
    return _shard(cfg.vocab_size, n) * D + D + layers * dense + moe + recurrent


def rank_kv_cache_bytes(cfg: MythosConfig, n: int, *, batch: int, context: int,
                        n_loops: Optional[int] = None, dtype: DtypeLike = "bfloat16") -> float:
    """KV caches one of n ranks holds: one per Prelude/Coda layer and per loop, ``batch``
    rows of ``context`` tokens. The MLA latent is shared by all heads, so every rank
    holds all of it; GQA caches split with their K/V heads."""
    T = cfg.max_loop_iters if n_loops is None else n_loops
    width = kv_cache_width(cfg)
    if cfg.attn_type == "gqa":
        width = 2 * _shard(cfg.n_kv_heads, n) * cfg.head_dim
    layers = cfg.prelude_layers + cfg.coda_layers + T
    return float(layers * batch * context * width * dtype_bytes(dtype))


def _expected_max_binomial(trials: int, p: float, ranks: int) -> float:
    """E[max over ``ranks`` independent Binomial(trials, p) counts]."""
    if ranks == 1 or p <= 0.0:
        return trials * p
    if p >= 1.0:
        return float(trials)
    lp, lq = math.log(p), math.log1p(-p)
    cdf, total = 0.0, 0.0
    for m in range(trials):
        cdf += math.exp(math.lgamma(trials + 1) - math.lgamma(m + 1) - math.lgamma(trials - m + 1)
                        + m * lp + (trials - m) * lq)
        total += 1.0 - min(cdf, 1.0) ** ranks
    return total


def busiest_rank_experts(cfg: MythosConfig, n_tokens: int, n: int) -> float:
    """Distinct routed experts the busiest of n ranks reads for ``n_tokens`` tokens
    (E/n experts per rank, each hit with probability 1 − (1 − k/E)^tokens, independently);
    n = 1 gives ``expected_experts_hit``. Every MoE call waits for this rank."""
    p = expected_experts_hit(cfg, n_tokens) / cfg.n_experts
    return _expected_max_binomial(cfg.n_experts // n, p, n)


def busiest_rank_pairs(cfg: MythosConfig, n_tokens: int, n: int) -> float:
    """(token, expert) pairs the busiest of n ranks computes: each of the tokens·k pairs
    lands on a uniformly random rank."""
    return _expected_max_binomial(n_tokens * cfg.n_experts_per_tok, 1.0 / n, n)


@dataclass(frozen=True)
class ParallelPlan:
    """One decode step (``batch`` rows, one token each, at ``context``) on ``n_gpus``.

    Bytes, FLOPs and memory are the busiest rank's; ``step_ms`` = its compute floor plus
    the collectives, which are not overlapped (each one's output is the next op's input).
    """
    n_gpus: int
    fabric: str
    batch: int
    context: int
    n_loops: int
    nodes: int
    heads_per_gpu: int
    experts_per_gpu: int
    weight_bytes: float
    kv_bytes: float
    step_bytes: float
    step_flops: float
    compute_ms: float
    all_reduces: int
    comm_ms: float

    @property
    def memory_bytes(self) -> float:
        return self.weight_bytes + self.kv_bytes

    @property
    def step_ms(self) -> float:
        return self.compute_ms + self.comm_ms

    @property
    def tokens_per_s(self) -> float:
        return self.batch / self.step_ms * 1e3

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(memory_bytes=self.memory_bytes, step_ms=self.step_ms,
                 tokens_per_s=self.tokens_per_s)
        return d


def _rank_fractions(cfg: MythosConfig, n: int, rows: int) -> dict[str, tuple[float, float]]:
    """op name → (share of its weight bytes, share of its cache bytes) the busiest rank reads."""
    attn = rank_attention_params(cfg, n) / attention_params(cfg)
    cache = 1.0 if cfg.attn_type == "mla" else _shard(cfg.n_kv_heads, n) / cfg.n_kv_heads
    hit = expected_experts_hit(cfg, rows)
    shared = cfg.n_shared_experts * cfg.shared_expert_dim
    return {
        "embed": (1.0, 0.0), "rmsnorm": (1.0, 0.0), "router": (1.0, 0.0),
        "recurrent_step": (1.0, 0.0),
        "attention (prelude+coda)": (attn, cache), "attention (loop)": (attn, cache),
        "dense_ffn": (_shard(cfg.dense_hidden, n) / cfg.dense_hidden, 0.0),
        "routed_experts": (busiest_rank_experts(cfg, rows, n) / hit, 0.0),
        "shared_experts": (_shard(shared, n) / shared if shared else 0.0, 0.0),
        "head": (_shard(cfg.vocab_size, n) / cfg.vocab_size, 0.0),
    }


def parallel_plan(cfg: MythosConfig, n_gpus: int, *, batch: int = 1, context: int = 0,
                  n_loops: Optional[int] = None, fabric: Union[str, Fabric] = "hgx",
                  dtype: DtypeLike = "bfloat16", ceilings: Ceilings = H100) -> ParallelPlan:
    """Memory, compute floor and communication of one decode step on ``n_gpus`` GPUs.

    The compute floor is ``decode_floor_ms``'s, taken over the busiest rank's share of
    every op (n = 1 reproduces it exactly); the communication is 1 + 2·(Prelude+Coda
    layers) + 2·loops all-reduces of the (batch, dim) activation plus one all-gather
    of the (batch, vocab) fp32 logits.
    """
    _check_split(cfg, n_gpus)
    f = _fabric(fabric)
    g, m = f.levels(n_gpus)
    T = cfg.max_loop_iters if n_loops is None else n_loops
    b, D, n = dtype_bytes(dtype), cfg.dim, n_gpus
    L = cfg.prelude_layers + cfg.coda_layers
    ops = op_costs(cfg, Workload(batch=batch, new_tokens=1, context=context, n_loops=T,
                                 dtype=dtype))
    shares = _rank_fractions(cfg, n, batch)
    step_bytes = sum(o.weight_bytes * shares[o.name][0] + o.cache_bytes * shares[o.name][1]
                     for o in ops)
    attn, dense = rank_attention_params(cfg, n), 3 * D * _shard(cfg.dense_hidden, n)
    shared = 3 * D * _shard(cfg.n_shared_experts * cfg.shared_expert_dim, n)
    per_token = (T * (attn + 2 * D + router_params(cfg) + shared + recurrent_step_params(cfg))
                 + L * (attn + dense + 2 * D) + D + _shard(cfg.vocab_size, n) * D)
    step_flops = 2.0 * (batch * per_token
                        + T * expert_params(cfg) * busiest_rank_pairs(cfg, batch, n))
    compute_ms = max(step_bytes / (ceilings.copy_gbps * 1e9),
                     step_flops / (ceilings.bf16_tflops * 1e12)) * 1e3
    reduces = 1 + 2 * L + 2 * T if n > 1 else 0
    comm_ms = (reduces * all_reduce_ms(batch * D * b, n, f)
               + all_gather_ms(batch * cfg.vocab_size * 4, n, f))
    return ParallelPlan(
        n_gpus=n, fabric=f.name, batch=batch, context=context, n_loops=T, nodes=m,
        heads_per_gpu=cfg.n_heads // n, experts_per_gpu=cfg.n_experts // n,
        weight_bytes=float(rank_weight_params(cfg, n) * b),
        kv_bytes=rank_kv_cache_bytes(cfg, n, batch=batch, context=context, n_loops=T,
                                     dtype=dtype),
        step_bytes=step_bytes, step_flops=step_flops, compute_ms=compute_ms,
        all_reduces=reduces, comm_ms=comm_ms)


# One H100 80GB: 80e9 bytes (the card reports ~85.5e9), 10% of it kept for activations,
# workspace, NCCL buffers, CUDA graphs and allocator slack.
H100_MEMORY_GB = 80.0
MEMORY_RESERVE = 0.10


def fits(cfg: MythosConfig, n: int, *, batch: int, context: int,
         n_loops: Optional[int] = None, dtype: DtypeLike = "bfloat16",
         memory_gb: float = H100_MEMORY_GB, reserve: float = MEMORY_RESERVE) -> bool:
    """Whether the busiest of n ranks holds its weights and KV caches in
    ``memory_gb``·(1 − reserve)."""
    need = (rank_weight_params(cfg, n) * dtype_bytes(dtype)
            + rank_kv_cache_bytes(cfg, n, batch=batch, context=context, n_loops=n_loops,
                                  dtype=dtype))
    return need <= memory_gb * 1e9 * (1.0 - reserve)


def min_gpus(cfg: MythosConfig, *, batch: int, context: int, **memory) -> Optional[int]:
    """Fewest GPUs (of ``split_sizes``) that ``fits`` (same keywords) accepts; None when no
    split fits (the MLA cache is replicated, so it alone can exceed a GPU)."""
    return next((n for n in split_sizes(cfg)
                 if fits(cfg, n, batch=batch, context=context, **memory)), None)


def moe_alltoall_ms(cfg: MythosConfig, n: int, *, batch: int,
                    fabric: Union[str, Fabric] = "hgx", dtype: DtypeLike = "bfloat16") -> float:
    """One MoE call's communication under the dispatch/combine alternative large-scale
    expert parallelism uses: rows partitioned over the n ranks, each row sent to the
    ranks of its k experts and the k outputs sent back (two all-to-alls). The plan
    above uses one all-reduce instead; docs/scaling.md compares the two."""
    rows = _shard(batch, n)
    return 2 * all_to_all_ms(rows * cfg.n_experts_per_tok * cfg.dim * dtype_bytes(dtype),
                             n, fabric)


# ---- the scaling table of docs/scaling.md (scripts/scaling_table.py writes it) ---------

SCALING_PRESETS = ("mythos_1b", "mythos_3b", "mythos_10b", "mythos_50b", "mythos_100b",
                   "mythos_500b", "mythos_1t")
SCALING_BATCH = 64
SCALING_CONTEXT = 4096


def _num(x: float) -> str:
    if x >= 100:
        return f"{x:,.0f}"
    return f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows)]


def scaling_markdown(presets: tuple[str, ...] = SCALING_PRESETS, *, batch: int = SCALING_BATCH,
                     context: int = SCALING_CONTEXT) -> str:
    """docs/scaling.md's tables: each preset on the fewest H100s that hold it at
    ``batch`` × ``context``, its batch-1 latency and batch throughput per fabric."""
    fabrics, counts = ("nvlink", "ib", "hgx"), [2 ** i for i in range(8)]
    memory, latency, throughput, moe, strong = [], [], [], [], []
    for name in presets:
        cfg = MythosConfig.from_preset(name)
        strong.append([name, *(
            _num(parallel_plan(cfg, n, batch=1, context=context).step_ms)
            if n in split_sizes(cfg) and fits(cfg, n, batch=1, context=context) else "—"
            for n in counts)])
        n1 = min_gpus(cfg, batch=1, context=context)
        n = min_gpus(cfg, batch=batch, context=context)
        sizes = [f"{rank_weight_params(cfg, 1) / 1e9:.2f}",
                 _num(rank_weight_params(cfg, 1) * 2 / 1e9),
                 _num(rank_kv_cache_bytes(cfg, 1, batch=batch, context=context) / 1e9),
                 "does not fit" if n1 is None else str(n1)]
        if n is None:
            memory.append([name, *sizes, "does not fit", "—", "—"])
            continue
        one = {f: parallel_plan(cfg, n, batch=1, context=context, fabric=f) for f in fabrics}
        big = {f: parallel_plan(cfg, n, batch=batch, context=context, fabric=f) for f in fabrics}
        p = big["hgx"]
        split = (f"{p.heads_per_gpu} head{'s' * (p.heads_per_gpu > 1)}, "
                 f"{p.experts_per_gpu} experts / GPU"
                 + (f", {p.nodes} nodes" if p.nodes > 1 else ""))
        memory.append([name, *sizes, str(n), split, _num(p.memory_bytes / 1e9)])
        latency.append([name, str(n), str(p.all_reduces), _num(one["hgx"].compute_ms),
                        *(_num(one[f].step_ms) for f in fabrics)])
        throughput.append([name, str(n), _num(batch / p.compute_ms * 1e3),
                           *(_num(big[f].tokens_per_s) for f in fabrics)])
        act = cfg.dim * dtype_bytes("bfloat16")
        moe.append([name, str(n), *(_num(1e3 * x) for rows in (1, batch) for x in (
            all_reduce_ms(rows * act, n, "hgx"),
            moe_alltoall_ms(cfg, n, batch=rows, fabric="hgx")))])
    lines = [f"Memory and split (bf16 weights; KV caches for batch {batch} × context "
             f"{context}, one per Prelude/Coda layer and per loop):", "",
             *_table(["preset", "params (B)", "weights (GB)",
                      f"KV per GPU, {batch}×{context} (GB)",
                      "min GPUs, batch 1", f"min GPUs, batch {batch}", f"split at batch-{batch} N",
                      "per GPU (GB)"], memory),
             "", f"Batch-1 decode, ms per token at context {context}, on the batch-{batch} N:",
             "", *_table(["preset", "N", "all-reduces / token", "compute floor",
                          "NVLink", "IB 400G", "HGX (NVLink + IB)"], latency),
             "", f"Batch-{batch} decode throughput, tokens/s at context {context}:", "",
             *_table(["preset", "N", "compute floor", "NVLink", "IB 400G",
                      "HGX (NVLink + IB)"], throughput),
             "", "One MoE call's communication on HGX, µs: the plan's all-reduce against "
             "the all-to-all dispatch + combine alternative:", "",
             *_table(["preset", "N", "batch 1 all-reduce", "batch 1 all-to-all",
                      f"batch {batch} all-reduce", f"batch {batch} all-to-all"], moe),
             "", f"Batch-1 decode on HGX, ms per token at context {context}, against the GPU "
             "count (— : the model does not fit, or N does not split its heads and experts):",
             "", *_table(["preset", *(f"N={n}" for n in counts)], strong)]
    return "\n".join(lines) + "\n"
