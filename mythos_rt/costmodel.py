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

Dimension letters: N tokens in the launch (B rows × T each), S cached context, D dim,
H heads, R kv_lora_rank, I expert_dim, E routed experts, k experts per token.
"""

from __future__ import annotations

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
