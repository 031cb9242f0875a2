"""Eager OpenMythos 0.5.0 — the numerical oracle of mythos-rt.

Every compiled kernel and plan is checked against this file. It reproduces
``open_mythos/main.py`` (0.5.0) exactly, with identical parameter/buffer names and
shapes (state_dicts load both ways with ``strict=True``), and fixes upstream's
crashes without changing any result upstream computes (see docs/design.md):
  * RoPE tables stay complex64 under ``model.to(bfloat16)``, so bf16 works;
  * chunked prefill after a cache exists gets a correct causal mask;
  * generate() treats temperature 0 as greedy and accepts stop ids;
  * changing n_loops within one cached sequence is an error, not a silent wrong answer
    (read from the cache's own ``recurrent_loop_<t>`` entries: the kv_cache dict holds
    nothing but upstream's per-layer entries).
It is a drop-in for ``open_mythos.main``: the same public names, constructor and forward
signatures and defaults, submodules (dropout included) and kv_cache layout
(``tests/test_reference.py`` compares them with the installed package).

Dimension legend: B batch, T new tokens, S cached + new tokens, D dim, H heads,
E routed experts, k experts per token, t loop index, R latent (kv_lora_rank).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import MythosConfig
from .memory import check_fits

_LOOP_CACHE_KEY = "recurrent_loop_{}"  # kv_cache key of loop t's attention entry (upstream's)


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x²) + eps) * w, computed in the input dtype (as upstream)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x.pow(2).mean(-1, keepdim=True).add(self.eps).rsqrt() * self.weight


def precompute_rope_freqs(dim: int, max_len: int, theta: float = 500000.0) -> torch.Tensor:
    """complex64 (max_len, dim//2) phasors e^{i·pos·f}, f = theta^(-2j/dim)."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), freqs)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent feature pairs of x (B, T, H, d) by freqs_cis (T, d/2), in float32."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs_cis[None, :, None, :]).flatten(-2).to(x.dtype)


def causal_mask(T: int, S: int, device: torch.device,
                dtype: torch.dtype = torch.float32) -> Optional[torch.Tensor]:
    """Additive (1, 1, T, S) mask: new token i sits at key position S-T+i. None when T == 1."""
    if T == 1:
        return None
    mask = torch.full((1, 1, T, S), float("-inf"), device=device, dtype=dtype)
    return torch.triu(mask, diagonal=S - T + 1)


def _attend(q, k, v, scale, mask, dropout_p=0.0, training=False):
    """dropout(softmax(q·kᵀ·scale + mask))·v over (B, H, T, d) x (B, H, S, d).

    Dropout (upstream's, on the attention probabilities) only acts in training mode."""
    attn = torch.matmul(q, k.transpose(-2, -1)) * scale
    if mask is not None:
        attn = attn + mask
    return torch.matmul(F.dropout(F.softmax(attn, dim=-1), dropout_p, training), v)


def _append_cache(kv_cache, cache_key, **new):
    """Concatenate new entries onto kv_cache[cache_key] along T and return the full tensors."""
    if kv_cache is None:
        return new
    old = kv_cache.get(cache_key)
    full = {n: t if old is None else torch.cat([old[n], t], dim=1) for n, t in new.items()}
    kv_cache[cache_key] = {n: t.detach() for n, t in full.items()}
    return full


class GQAttention(nn.Module):
    """Grouped-query attention; K/V cached after RoPE, repeated to the query heads."""

    def __init__(self, cfg: MythosConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads
        self.head_dim = cfg.dim // cfg.n_heads
        self.groups = cfg.n_heads // cfg.n_kv_heads
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=False)
        self.dropout_p = cfg.dropout

    def forward(self, x, freqs_cis, mask=None, kv_cache=None, cache_key="default"):
        B, T, _ = x.shape
        q = apply_rope(self.wq(x).view(B, T, self.n_heads, self.head_dim), freqs_cis)
        k = apply_rope(self.wk(x).view(B, T, self.n_kv_heads, self.head_dim), freqs_cis)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        kv = _append_cache(kv_cache, cache_key, k=k, v=v)  # (B, S, Hkv, d) each
        k = kv["k"].repeat_interleave(self.groups, dim=2)
        v = kv["v"].repeat_interleave(self.groups, dim=2)
        out = _attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                      self.head_dim ** -0.5, mask, self.dropout_p, self.training)  # (B, H, T, d)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class MLAttention(nn.Module):
    """Multi-latent attention (DeepSeek-V2 style) with upstream's cache layout.

    Caches the un-normed latent c_kv (B, S, R) and the roped key expanded per head
    (B, S, H, rope) exactly as upstream; K_nope and V are re-expanded from the whole
    latent cache at every step. (The compiled runtime caches a compact layout instead.)
    """

    def __init__(self, cfg: MythosConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.kv_lora_rank = cfg.kv_lora_rank
        self.qk_rope_dim = cfg.qk_rope_head_dim
        self.qk_nope_dim = cfg.qk_nope_head_dim
        self.v_dim = cfg.v_head_dim
        self.q_head_dim = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        H = cfg.n_heads
        self.q_down = nn.Linear(cfg.dim, cfg.q_lora_rank, bias=False)
        self.q_norm = RMSNorm(cfg.q_lora_rank)
        self.q_up_nope = nn.Linear(cfg.q_lora_rank, H * cfg.qk_nope_head_dim, bias=False)
        self.q_up_rope = nn.Linear(cfg.q_lora_rank, H * cfg.qk_rope_head_dim, bias=False)
        self.kv_down = nn.Linear(cfg.dim, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(cfg.kv_lora_rank)
        self.kv_up = nn.Linear(cfg.kv_lora_rank,
                               H * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.wo = nn.Linear(H * cfg.v_head_dim, cfg.dim, bias=False)
        self.attn_drop = nn.Dropout(cfg.dropout)

    def forward(self, x, freqs_cis, mask=None, kv_cache=None, cache_key="default"):
        B, T, _ = x.shape
        H, nope, rope = self.n_heads, self.qk_nope_dim, self.qk_rope_dim
        c_q = self.q_norm(self.q_down(x))
        q_nope = self.q_up_nope(c_q).view(B, T, H, nope)
        q_rope = apply_rope(self.q_up_rope(c_q).view(B, T, H, rope), freqs_cis)
        q = torch.cat([q_nope, q_rope], dim=-1)  # (B, T, H, nope+rope)

        kv_raw = self.kv_down(x)
        c_kv = kv_raw[..., : self.kv_lora_rank]  # (B, T, R)
        k_rope = kv_raw[..., self.kv_lora_rank:].unsqueeze(2).expand(B, T, H, rope)
        k_rope = apply_rope(k_rope.contiguous(), freqs_cis)  # (B, T, H, rope)
        cached = _append_cache(kv_cache, cache_key, c_kv=c_kv, k_rope=k_rope)
        c_kv, k_rope = cached["c_kv"], cached["k_rope"]
        S = c_kv.shape[1]

        kv = self.kv_up(self.kv_norm(c_kv)).view(B, S, H, nope + self.v_dim)
        k = torch.cat([kv[..., :nope], k_rope], dim=-1)  # (B, S, H, nope+rope)
        v = kv[..., nope:]  # (B, S, H, v)
        out = _attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                      self.q_head_dim ** -0.5, mask, self.attn_drop.p, self.training)  # (B, H, T, v)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class Expert(nn.Module):
    """SwiGLU FFN: down(silu(gate(x)) * up(x)). Also the dense Prelude/Coda FFN."""

    def __init__(self, dim: int, expert_dim: int):
        super().__init__()
        self.gate = nn.Linear(dim, expert_dim, bias=False)
        self.up = nn.Linear(dim, expert_dim, bias=False)
        self.down = nn.Linear(expert_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


def route(logits: torch.Tensor, router_bias: torch.Tensor, k: int):
    """Top-k on logits + bias; weights = chosen softmax(logits) renormalized to sum 1.

    logits (N, E) -> (ids (N, k) int64, weights (N, k) in logits' dtype)
    """
    scores = F.softmax(logits, dim=-1)
    _, ids = (logits + router_bias).topk(k, dim=-1)
    weights = scores.gather(-1, ids)
    return ids, weights / weights.sum(dim=-1, keepdim=True)


class MoEFFN(nn.Module):
    """Fine-grained MoE: k routed SwiGLU experts per token plus always-on shared experts."""

    def __init__(self, cfg: MythosConfig):
        super().__init__()
        self.n_experts, self.n_shared, self.topk = (
            cfg.n_experts, cfg.n_shared_experts, cfg.n_experts_per_tok)
        self.router = nn.Linear(cfg.dim, cfg.n_experts, bias=False)
        self.register_buffer("router_bias", torch.zeros(cfg.n_experts))
        self.routed_experts = nn.ModuleList(
            [Expert(cfg.dim, cfg.expert_dim) for _ in range(cfg.n_experts)])
        self.shared_experts = nn.ModuleList(
            [Expert(cfg.dim, cfg.shared_expert_dim) for _ in range(cfg.n_shared_experts)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        flat = x.reshape(B * T, D)
        ids, weights = route(self.router(flat), self.router_bias, self.topk)  # (N, k)
        # One expert call per expert over all its (token, slot) pairs; then the k slots
        # are summed in slot order, the same order upstream accumulates them in.
        y = flat.new_zeros(B * T, self.topk, D)
        for eid in ids.unique().tolist():
            tok, slot = (ids == eid).nonzero(as_tuple=True)
            y[tok, slot] = self.routed_experts[eid](flat[tok])
        out = torch.zeros_like(flat)
        for i in range(self.topk):
            out = out + weights[:, i:i + 1] * y[:, i]
        for shared in self.shared_experts:
            out = out + shared(flat)
        return out.view(B, T, D)


def loop_index_embedding(h: torch.Tensor, loop_t: int, loop_dim: int,
                         theta: float = 10000.0) -> torch.Tensor:
    """h + [sin(t·f), cos(t·f)] on the first loop_dim channels, f computed in h's dtype."""
    freqs = 1.0 / (theta ** (torch.arange(0, loop_dim, 2, device=h.device, dtype=h.dtype)
                             / loop_dim))
    angles = loop_t * freqs
    emb = torch.zeros(h.shape[-1], device=h.device, dtype=h.dtype)
    emb[:loop_dim] = torch.cat([angles.sin(), angles.cos()], dim=-1)[:loop_dim]
    return h + emb


class LoRAAdapter(nn.Module):
    """Depth-wise LoRA: delta(x, t) = (down(x) * scale[min(t, max_loops-1)]) @ B."""

    def __init__(self, dim: int, rank: int, max_loops: int):
        super().__init__()
        self.down = nn.Linear(dim, rank, bias=False)
        self.B = nn.Parameter(torch.randn(rank, dim) * 0.02)
        self.scale = nn.Embedding(max_loops, rank)

    def forward(self, x: torch.Tensor, loop_t: int) -> torch.Tensor:
        t_idx = min(loop_t, self.scale.num_embeddings - 1)  # depth extrapolation clamp
        s = self.scale(torch.tensor(t_idx, device=x.device))  # (rank,)
        return (self.down(x) * s) @ self.B


class TransformerBlock(nn.Module):
    """Pre-norm block: x += drop(attn(norm(x))); x += drop(ffn(norm(x))). MoE FFN in the
    loop only; dropout (upstream's, residual) only acts in training mode."""

    def __init__(self, cfg: MythosConfig, use_moe: bool = False):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim)
        self.ffn_norm = RMSNorm(cfg.dim)
        self.attn = MLAttention(cfg) if cfg.attn_type == "mla" else GQAttention(cfg)
        self.ffn = MoEFFN(cfg) if use_moe else Expert(cfg.dim, cfg.dense_hidden)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x, freqs_cis, mask=None, kv_cache=None, cache_key="default"):
        x = x + self.resid_drop(self.attn(self.attn_norm(x), freqs_cis, mask, kv_cache, cache_key))
        return x + self.resid_drop(self.ffn(self.ffn_norm(x)))


class LTIInjection(nn.Module):
    """h' = A·h + B·e + out with A = exp(-exp(clamp(log_dt + log_A, -20, 20))) in (0, 1)."""

    def __init__(self, dim: int):
        super().__init__()
        self.log_A = nn.Parameter(torch.zeros(dim))
        self.log_dt = nn.Parameter(torch.zeros(1))
        self.B = nn.Parameter(torch.ones(dim) * 0.1)

    def get_A(self) -> torch.Tensor:
        return torch.exp(-torch.exp((self.log_dt + self.log_A).clamp(-20, 20)))

    def forward(self, h, e, transformer_out):
        return self.get_A() * h + self.B * e + transformer_out


class ACTHalting(nn.Module):
    """Per-position halting probability p = sigmoid(halt(h)), (B, T, D) -> (B, T)."""

    def __init__(self, dim: int):
        super().__init__()
        self.halt = nn.Linear(dim, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.halt(h)).squeeze(-1)


def act_update(h, p, cumulative_p, halted, h_out, thr):
    """One loop's ACT accumulation; returns (h_out, cumulative_p, halted).

    The step that crosses thr contributes 1 - cum; positions already halted contribute
    nothing; positions that never halt get no remainder. p, cumulative_p, halted: (B, T).
    """
    running = (~halted).float()
    weight = torch.where(cumulative_p + p >= thr, (1.0 - cumulative_p).clamp(min=0), p)
    weight = weight * running
    h_out = h_out + weight.unsqueeze(-1).to(h.dtype) * h
    cumulative_p = cumulative_p + p * running
    return h_out, cumulative_p, halted | (cumulative_p >= thr)


class RecurrentBlock(nn.Module):
    """One TransformerBlock looped n_loops times with LTI injection, LoRA and ACT halting."""

    def __init__(self, cfg: MythosConfig):
        super().__init__()
        self.cfg = cfg
        self.block = TransformerBlock(cfg, use_moe=True)
        self.injection = LTIInjection(cfg.dim)
        self.act = ACTHalting(cfg.dim)
        self.lora = LoRAAdapter(cfg.dim, cfg.lora_rank, cfg.max_loop_iters)
        self.norm = RMSNorm(cfg.dim)
        self.loop_dim = cfg.dim // 8

    def forward(self, h, e, freqs_cis, mask=None, n_loops=None, kv_cache=None):
        n_loops = n_loops or self.cfg.max_loop_iters
        B, T, _ = h.shape
        halted = torch.zeros(B, T, device=h.device, dtype=torch.bool)
        cumulative_p = torch.zeros(B, T, device=h.device, dtype=torch.float32)
        h_out = torch.zeros_like(h)
        thr = self.cfg.act_threshold
        for t in range(n_loops):
            combined = self.norm(loop_index_embedding(h, t, self.loop_dim) + e)
            out = self.block(combined, freqs_cis, mask, kv_cache, _LOOP_CACHE_KEY.format(t))
            out = out + self.lora(out, t)
            h = self.injection(h, e, out)

            h_out, cumulative_p, halted = act_update(h, self.act(h), cumulative_p, halted,
                                                     h_out, thr)
            # With a cache every depth must run so later decode steps find every loop's keys.
            if kv_cache is None and bool(halted.all()):
                break
        return h_out


class OpenMythos(nn.Module):
    """Prelude (dense blocks) → RecurrentBlock (looped) → Coda (dense blocks) → tied head."""

    def __init__(self, cfg: MythosConfig):
        super().__init__()
        cfg.validate()
        check_fits(cfg, torch.get_default_device(), "building the reference model",
                   dtype_bytes=torch.get_default_dtype().itemsize)
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.register_buffer("freqs_cis", precompute_rope_freqs(
            cfg.dim // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta))
        self.register_buffer("freqs_cis_mla", precompute_rope_freqs(
            cfg.qk_rope_head_dim, cfg.max_seq_len, cfg.rope_theta))
        self.prelude = nn.ModuleList(
            [TransformerBlock(cfg, use_moe=False) for _ in range(cfg.prelude_layers)])
        self.recurrent = RecurrentBlock(cfg)
        self.coda = nn.ModuleList(
            [TransformerBlock(cfg, use_moe=False) for _ in range(cfg.coda_layers)])
        self.norm = RMSNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.head.weight = self.embed.weight  # tied
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)

    def _apply(self, fn, recurse=True):
        # model.to(bfloat16) would cast the complex RoPE tables to real (upstream's bf16
        # bug): keep them out of the cast and only move them to the weights' device.
        tables = {name: self._buffers.pop(name) for name in ("freqs_cis", "freqs_cis_mla")}
        try:
            super()._apply(fn, recurse)
        finally:
            device = self.embed.weight.device
            dims = {"freqs_cis": self.cfg.dim // self.cfg.n_heads,
                    "freqs_cis_mla": self.cfg.qk_rope_head_dim}
            for name, buf in tables.items():
                if buf.is_meta and device.type != "meta":  # e.g. after to_empty()
                    buf = precompute_rope_freqs(dims[name], self.cfg.max_seq_len,
                                                self.cfg.rope_theta)
                self._buffers[name] = buf.to(device)
        return self

    def forward(self, input_ids: torch.Tensor, n_loops: Optional[int] = None,
                kv_cache: Optional[dict] = None, start_pos: int = 0) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, vocab). Pass the same kv_cache dict every step."""
        T = input_ids.shape[1]
        if n_loops is not None and n_loops < 1:
            raise ValueError(f"n_loops must be >= 1, got {n_loops}")
        if start_pos < 0 or start_pos + T > self.cfg.max_seq_len:
            raise ValueError(f"positions {start_pos}..{start_pos + T - 1} exceed "
                             f"max_seq_len={self.cfg.max_seq_len}")
        loops = n_loops or self.cfg.max_loop_iters
        filled = _cached_loops(kv_cache)
        if filled and filled != loops:
            raise ValueError(f"this kv_cache was filled with n_loops={filled}; a sequence "
                             f"keeps one n_loops for its lifetime (got {loops})")
        freqs = self.freqs_cis_mla if self.cfg.attn_type == "mla" else self.freqs_cis
        freqs = freqs[start_pos:start_pos + T]
        S = T + _cached_len(kv_cache)
        mask = causal_mask(T, S, input_ids.device, self.embed.weight.dtype)

        x = self.embed(input_ids)
        for i, layer in enumerate(self.prelude):
            x = layer(x, freqs, mask, kv_cache, cache_key=f"prelude_{i}")
        e = x  # frozen injection input
        x = self.recurrent(x, e, freqs, mask, loops, kv_cache)
        for i, layer in enumerate(self.coda):
            x = layer(x, freqs, mask, kv_cache, cache_key=f"coda_{i}")
        return self.head(self.norm(x))

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 64,
                 n_loops: int = 8, temperature: float = 1.0, top_k: int = 50,
                 stop_ids: Sequence[int] = (), generator: Optional[torch.Generator] = None,
                 ) -> torch.Tensor:
        """Prefill once, then decode one token per step with the KV cache.

        temperature 0 is greedy. Sampling does what upstream does (temperature, top-k,
        multinomial). Once every row has produced a stop id generation ends; rows that
        stopped earlier are padded with their stop id. Returns (B, T + new) ids.
        """
        kv_cache: dict = {}
        prompt_len = input_ids.shape[1]
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        stops = torch.tensor(list(stop_ids), dtype=input_ids.dtype, device=input_ids.device)
        for step in range(max_new_tokens):
            cur, start = ((input_ids, 0) if step == 0
                          else (input_ids[:, -1:], prompt_len + step - 1))
            logits = self.forward(cur, n_loops=n_loops, kv_cache=kv_cache, start_pos=start)
            logits = logits[:, -1, :]
            if temperature == 0:
                next_tok = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k > 0:
                    v, _ = logits.topk(min(top_k, logits.shape[-1]))
                    logits[logits < v[:, -1:]] = float("-inf")
                next_tok = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
            if len(stops):
                next_tok = torch.where(finished[:, None], input_ids[:, -1:], next_tok)
                finished |= torch.isin(next_tok[:, 0], stops)
            input_ids = torch.cat([input_ids, next_tok], dim=1)
            if len(stops) and bool(finished.all()):
                break
        return input_ids


def _cached_len(kv_cache: Optional[dict]) -> int:
    """Tokens already cached (0 for no cache or an empty one)."""
    for entry in (kv_cache or {}).values():
        return next(iter(entry.values())).shape[1]
    return 0


def _cached_loops(kv_cache: Optional[dict]) -> int:
    """Loops a cached sequence ran (0 for no cache or an empty one): with a cache every
    loop runs, so each of its n_loops left one ``recurrent_loop_<t>`` entry."""
    n = 0
    while kv_cache and _LOOP_CACHE_KEY.format(n) in kv_cache:
        n += 1
    return n
