"""Drive the reference MLAttention / GQAttention (dict kv_cache) and our ops side by side."""

from __future__ import annotations

import torch

from mythos_rt.config import MythosConfig
from mythos_rt.lower import op_args
from mythos_rt.ops import attention as A
from mythos_rt.ops import select
from mythos_rt.reference import GQAttention, MLAttention, causal_mask, precompute_rope_freqs

S_MAX = 32


def mla_cfg() -> MythosConfig:
    # H=3, R=24, rope=8, nope=12, v=10: nothing a power of two but rope.
    return MythosConfig(dim=32, n_heads=3, max_seq_len=S_MAX, attn_type="mla", kv_lora_rank=24,
                        q_lora_rank=20, qk_rope_head_dim=8, qk_nope_head_dim=12, v_head_dim=10,
                        rope_theta=10000.0)


def gqa_cfg() -> MythosConfig:
    # H=4 query heads over 2 KV heads, head_dim 10.
    return MythosConfig(dim=40, n_heads=4, n_kv_heads=2, max_seq_len=S_MAX, attn_type="gqa",
                        rope_theta=10000.0)


class Harness:
    """One attention layer: the reference module + our op with a preallocated cache."""

    def __init__(self, attn_type: str, backend: str = "torch", dtype=torch.float32,
                 b_max: int = 3, s_max: int = S_MAX, cfg: MythosConfig | None = None):
        if cfg is None:
            cfg = mla_cfg() if attn_type == "mla" else gqa_cfg()
        self.cfg = cfg
        cfg.max_seq_len = s_max
        self.mla = attn_type == "mla"
        mod = MLAttention(cfg) if self.mla else GQAttention(cfg)
        with torch.no_grad():
            for name, p in mod.named_parameters():
                if "norm" in name:
                    p.normal_(1.0, 0.3)  # random RMSNorm gains, never ones/zeros
        # The reference sees the same (dtype-rounded) weights in fp32.
        self.ref = mod.to(dtype).float().eval()
        sd = self.ref.state_dict()
        rope_dim = cfg.qk_rope_head_dim if self.mla else cfg.head_dim
        self.freqs = precompute_rope_freqs(rope_dim, s_max, cfg.rope_theta)
        self.cos, self.sin = A.rope_tables(rope_dim, s_max, cfg.rope_theta)
        if self.mla:
            self.w = op_args("mla_attention", sd, cfg, dtype=dtype)
            self.scale = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
            self.caches = (torch.full((b_max, s_max, cfg.kv_lora_rank), float("nan"), dtype=dtype),
                           torch.full((b_max, s_max, cfg.qk_rope_head_dim), float("nan"),
                                      dtype=dtype))
            sel = select("mla_attention", "cpu", backend)
            self.fn, self.w = sel.fn, sel.prepare(self.w)
        else:
            self.w = op_args("gqa_attention", sd, cfg, dtype=dtype)
            self.scale = cfg.head_dim ** -0.5
            shape = (b_max, s_max, cfg.n_kv_heads, cfg.head_dim)
            self.caches = (torch.full(shape, float("nan"), dtype=dtype),
                           torch.full(shape, float("nan"), dtype=dtype))
            sel = select("gqa_attention", "cpu", backend)
            self.fn, self.w = sel.fn, sel.prepare(self.w)
        self.dtype = dtype

    def ours(self, x, cache_lens):
        """Run our op on x (B, T, D) with cache_lens (list or tensor)."""
        lens = torch.as_tensor(cache_lens, dtype=torch.int32)
        return self.fn(x.to(self.dtype), self.w, *self.caches, lens, self.cos, self.sin,
                       self.scale)

    @torch.no_grad()
    def reference(self, x, start, kv_cache):
        """Reference forward of x (B, T, D) at positions start.. with its dict cache."""
        T = x.shape[1]
        S = start + T
        return self.ref(x.to(self.dtype).float(), self.freqs[start:start + T],
                        causal_mask(T, S, x.device), kv_cache, "layer")

    def x(self, B, T):
        return torch.randn(B, T, self.cfg.dim)
