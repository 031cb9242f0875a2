"""Model configuration: OpenMythos 0.5.0's ``MythosConfig`` plus validation and presets.

Field names and defaults are those of ``open_mythos.main.MythosConfig`` so that configs
read from upstream checkpoints map one-to-one. ``validate()`` runs before any tensor is
allocated, so a bad config fails with a message instead of a shape error deep in a layer.
The defaults serve Python code (``MythosConfig(dim=...)``); a config read from a file or
a dict (``from_dict``) must state every field that changes results, since a silently
defaulted ``rope_theta`` or ``act_threshold`` changes the logits.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Callable

from .errors import clip, listed


class ConfigError(ValueError):
    """A config value is inconsistent or out of range."""


# Fields no result depends on: dropout is the identity at inference, and
# max_output_tokens is upstream's generation cap, which mythos-rt does not read.
OPTIONAL_FIELDS = ("dropout", "max_output_tokens")
# Fields only one attention type reads.
ATTENTION_FIELDS = {
    "mla": ("kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"),
    "gqa": ("n_kv_heads",),
}
MAX_POSITIONS = 2 ** 31 - 1  # cache lengths and positions are int32 on the device


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
            _check_int(name, getattr(self, name), 1, "a positive integer")
        for name in ("prelude_layers", "coda_layers", "n_shared_experts"):
            _check_int(name, getattr(self, name), 0, "a non-negative integer")
        if self.attn_type not in ("mla", "gqa"):
            raise ConfigError(
                f"config.attn_type must be 'mla' or 'gqa', got {_shown(self.attn_type)}")
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
        if self.max_seq_len > MAX_POSITIONS:
            raise ConfigError(f"config.max_seq_len={self.max_seq_len} exceeds {MAX_POSITIONS} "
                              "(positions are int32)")
        for name in ("act_threshold", "rope_theta"):
            value = getattr(self, name)
            if (not isinstance(value, (int, float)) or isinstance(value, bool)
                    or not 0 < value < float("inf")):
                raise ConfigError(f"config.{name} must be a positive finite number, "
                                  f"got {_shown(value)}")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ConfigError(f"config.dropout must be in [0, 1), got {_shown(self.dropout)}")
        return self

    # ---- serialization -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def required_fields(cls, attn_type: Any) -> list[str]:
        """Fields a config file must state: all that change results for ``attn_type``."""
        other = {name for kind, names in ATTENTION_FIELDS.items() if kind != attn_type
                 for name in names}
        return [f.name for f in dataclasses.fields(cls)
                if f.name not in OPTIONAL_FIELDS and f.name not in other]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MythosConfig":
        """Build from a dict stating every field that changes results (``required_fields``);
        unknown keys are an error too (they usually mean a wrong file)."""
        if not isinstance(data, dict):
            raise ConfigError(f"config must be a JSON object / dict, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(map(str, set(data) - known))
        if unknown:
            raise ConfigError(f"unknown config field(s): {listed(unknown)}")
        missing = [name for name in cls.required_fields(data.get("attn_type")) if name not in data]
        if missing:
            raise ConfigError(f"config is missing field(s) that change results: "
                              f"{listed(missing)} (no default is assumed for them)")
        return cls(**data)

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "MythosConfig":
        try:
            data = json.loads(text)
        except ValueError as exc:  # JSONDecodeError, or an integer of over 4300 digits
            raise ConfigError(f"config is not valid JSON: {clip(str(exc), 200)}") from None
        return cls.from_dict(data)

    @classmethod
    def from_preset(cls, name: str) -> "MythosConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return PRESETS[name]()


INT_LIMIT = 2 ** 63  # every size becomes a tensor dimension, an int64


def _shown(value: Any) -> str:
    """``value`` for an error message: short, even for an integer of millions of digits."""
    if isinstance(value, int) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    return clip(repr(value))


def _check_int(name: str, value: Any, lo: int, what: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value < INT_LIMIT:
        raise ConfigError(f"config.{name} must be {what} below 2**63, got {_shown(value)}")


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
