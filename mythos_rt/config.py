"""Model configuration: OpenMythos 0.5.0's ``MythosConfig`` plus validation and presets.

Field names and defaults are those of ``open_mythos.main.MythosConfig`` so that configs
read from upstream checkpoints map one-to-one. ``validate()`` runs before any tensor is
allocated, so a bad config fails with a message instead of a shape error deep in a layer.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Callable


class ConfigError(ValueError):
    """A config value is inconsistent or out of range."""


@dataclass
class MythosConfig:
    """Hyper-parameters of an OpenMythos recurrent-depth transformer (upstream 0.5.0)."""

    vocab_size: int = 32000
    dim: int = 2048
    n_heads: int = 16
    n_kv_heads: int = 4  # GQA only; MLA ignores it
    max_seq_len: int = 4096
    max_loop_iters: int = 16  # T: default recurrent depth, size of the LoRA scale table
    prelude_layers: int = 2
    coda_layers: int = 2
    attn_type: str = "mla"  # "mla" | "gqa"
    kv_lora_rank: int = 512
    q_lora_rank: int = 1536
    qk_rope_head_dim: int = 64
    qk_nope_head_dim: int = 128
    v_head_dim: int = 128
    n_experts: int = 64
    n_shared_experts: int = 2
    n_experts_per_tok: int = 4
    expert_dim: int = 512
    act_threshold: float = 0.99
    rope_theta: float = 500000.0
    lora_rank: int = 16
    max_output_tokens: int = 4096
    dropout: float = 0.0

    # ---- derived sizes -------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        """GQA per-head dim (also the GQA RoPE dim)."""
        return self.dim // self.n_heads

    @property
    def loop_dim(self) -> int:
        """Channels that receive the loop-index embedding."""
        return self.dim // 8

    @property
    def dense_hidden(self) -> int:
        """Hidden size of the Prelude/Coda SwiGLU FFN."""
        return self.dim * 4 // 3

    @property
    def shared_expert_dim(self) -> int:
        """Hidden size of one shared expert (= k fine-grained experts)."""
        return self.expert_dim * self.n_experts_per_tok

    # ---- validation ----------------------------------------------------------------
    def validate(self) -> "MythosConfig":
        """Raise ConfigError naming the first inconsistent field; return self if valid."""
        positive = [
            "vocab_size", "dim", "n_heads", "max_seq_len", "max_loop_iters", "n_experts",
            "n_experts_per_tok", "expert_dim", "lora_rank", "max_output_tokens",
        ]
        if self.attn_type == "gqa":
            positive.append("n_kv_heads")
        if self.attn_type == "mla":
            positive += ["kv_lora_rank", "q_lora_rank", "qk_rope_head_dim",
                         "qk_nope_head_dim", "v_head_dim"]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"config.{name} must be a positive integer, got {value!r}")
        for name in ("prelude_layers", "coda_layers", "n_shared_experts"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"config.{name} must be a non-negative integer, got {value!r}")
        if self.attn_type not in ("mla", "gqa"):
            raise ConfigError(f"config.attn_type must be 'mla' or 'gqa', got {self.attn_type!r}")
        if self.dim % self.n_heads:
            raise ConfigError(f"config.dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.attn_type == "gqa":
            if self.n_heads % self.n_kv_heads:
                raise ConfigError(
                    f"config.n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
            if self.head_dim % 2:
                raise ConfigError(
                    f"GQA RoPE needs an even head_dim, got dim/n_heads={self.head_dim}")
        if self.attn_type == "mla" and self.qk_rope_head_dim % 2:
            raise ConfigError(
                f"config.qk_rope_head_dim must be even for RoPE, got {self.qk_rope_head_dim}")
        if self.loop_dim < 2 or self.loop_dim % 2:
            raise ConfigError(
                f"loop-index embedding needs an even dim//8 >= 2, got dim={self.dim} "
                f"(dim//8={self.loop_dim})")
        if self.n_experts_per_tok > self.n_experts:
            raise ConfigError(
                f"config.n_experts_per_tok={self.n_experts_per_tok} exceeds "
                f"n_experts={self.n_experts}")
        for name in ("act_threshold", "rope_theta"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ConfigError(f"config.{name} must be a positive number, got {value!r}")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ConfigError(f"config.dropout must be in [0, 1), got {self.dropout!r}")
        return self

    # ---- serialization -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MythosConfig":
        """Build from a dict; unknown keys are an error (they usually mean a wrong file)."""
        if not isinstance(data, dict):
            raise ConfigError(f"config must be a JSON object / dict, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(unknown)}")
        return cls(**data)

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "MythosConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config is not valid JSON: {exc}") from None
        return cls.from_dict(data)

    @classmethod
    def from_preset(cls, name: str) -> "MythosConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return PRESETS[name]()


# ---- presets: values identical to open_mythos/variants.py (0.5.0) -------------------

def _preset(**kw: Any) -> Callable[[], MythosConfig]:
    def make() -> MythosConfig:
        return MythosConfig(**kw)
    return make


_UPSTREAM_COMMON = dict(vocab_size=32000, prelude_layers=2, coda_layers=2, attn_type="mla",
                        n_shared_experts=2, n_experts_per_tok=4, act_threshold=0.99,
                        rope_theta=500000.0)

mythos_1b = _preset(**_UPSTREAM_COMMON, dim=2048, n_heads=16, n_kv_heads=4, max_seq_len=4096,
                    max_loop_iters=16, kv_lora_rank=256, q_lora_rank=512, qk_rope_head_dim=32,
                    qk_nope_head_dim=64, v_head_dim=64, n_experts=64, expert_dim=2048,
                    lora_rank=8)
mythos_3b = _preset(**_UPSTREAM_COMMON, dim=3072, n_heads=24, n_kv_heads=6, max_seq_len=4096,
                    max_loop_iters=16, kv_lora_rank=384, q_lora_rank=768, qk_rope_head_dim=32,
                    qk_nope_head_dim=96, v_head_dim=96, n_experts=64, expert_dim=4096,
                    lora_rank=8)
mythos_10b = _preset(**_UPSTREAM_COMMON, dim=4096, n_heads=32, n_kv_heads=8, max_seq_len=8192,
                     max_loop_iters=24, kv_lora_rank=512, q_lora_rank=1024, qk_rope_head_dim=64,
                     qk_nope_head_dim=128, v_head_dim=128, n_experts=128, expert_dim=5632,
                     lora_rank=16)
mythos_50b = _preset(vocab_size=32000, dim=6144, n_heads=48, n_kv_heads=8, max_seq_len=8192,
                     max_loop_iters=32, prelude_layers=3, coda_layers=3, attn_type="mla",
                     kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64,
                     qk_nope_head_dim=128, v_head_dim=128, n_experts=256, n_shared_experts=4,
                     n_experts_per_tok=4, expert_dim=9728, act_threshold=0.99,
                     rope_theta=500000.0, lora_rank=32)
mythos_100b = _preset(vocab_size=32000, dim=8192, n_heads=64, n_kv_heads=8, max_seq_len=1000000,
                      max_loop_iters=32, prelude_layers=4, coda_layers=4, attn_type="mla",
                      kv_lora_rank=512, q_lora_rank=2048, qk_rope_head_dim=64,
                      qk_nope_head_dim=128, v_head_dim=128, n_experts=256, n_shared_experts=4,
                      n_experts_per_tok=8, expert_dim=13568, act_threshold=0.99,
                      rope_theta=1000000.0, lora_rank=64, max_output_tokens=131072)
mythos_500b = _preset(vocab_size=100000, dim=12288, n_heads=96, n_kv_heads=16,
                      max_seq_len=1000000, max_loop_iters=48, prelude_layers=4, coda_layers=4,
                      attn_type="mla", kv_lora_rank=1024, q_lora_rank=3072, qk_rope_head_dim=64,
                      qk_nope_head_dim=128, v_head_dim=128, n_experts=512, n_shared_experts=8,
                      n_experts_per_tok=8, expert_dim=23040, act_threshold=0.99,
                      rope_theta=1000000.0, lora_rank=128, max_output_tokens=131072)
mythos_1t = _preset(vocab_size=100000, dim=16384, n_heads=128, n_kv_heads=16,
                    max_seq_len=1000000, max_loop_iters=64, prelude_layers=6, coda_layers=6,
                    attn_type="mla", kv_lora_rank=1024, q_lora_rank=4096, qk_rope_head_dim=64,
                    qk_nope_head_dim=128, v_head_dim=128, n_experts=512, n_shared_experts=8,
                    n_experts_per_tok=8, expert_dim=34560, act_threshold=0.99,
                    rope_theta=2000000.0, lora_rank=256, max_output_tokens=131072)

# Small configs for tests and the quickstart demo: every code path, odd-ish sizes.
tiny_mla = _preset(vocab_size=97, dim=48, n_heads=4, n_kv_heads=2, max_seq_len=64,
                   max_loop_iters=4, prelude_layers=1, coda_layers=1, attn_type="mla",
                   kv_lora_rank=24, q_lora_rank=20, qk_rope_head_dim=8, qk_nope_head_dim=12,
                   v_head_dim=10, n_experts=6, n_shared_experts=1, n_experts_per_tok=2,
                   expert_dim=16, lora_rank=4, rope_theta=10000.0, max_output_tokens=64)
tiny_gqa = _preset(vocab_size=101, dim=48, n_heads=6, n_kv_heads=2, max_seq_len=64,
                   max_loop_iters=3, prelude_layers=1, coda_layers=2, attn_type="gqa",
                   n_experts=5, n_shared_experts=2, n_experts_per_tok=2, expert_dim=12,
                   lora_rank=3, rope_theta=10000.0, max_output_tokens=64)
small_mla = _preset(vocab_size=512, dim=128, n_heads=4, n_kv_heads=4, max_seq_len=256,
                    max_loop_iters=8, prelude_layers=2, coda_layers=2, attn_type="mla",
                    kv_lora_rank=64, q_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=32,
                    v_head_dim=32, n_experts=16, n_shared_experts=1, n_experts_per_tok=4,
                    expert_dim=64, lora_rank=8, max_output_tokens=256)

PRESETS: dict[str, Callable[[], MythosConfig]] = {
    "mythos_1b": mythos_1b, "mythos_3b": mythos_3b, "mythos_10b": mythos_10b,
    "mythos_50b": mythos_50b, "mythos_100b": mythos_100b, "mythos_500b": mythos_500b,
    "mythos_1t": mythos_1t, "tiny_mla": tiny_mla, "tiny_gqa": tiny_gqa, "small_mla": small_mla,
}
