"""CompileOptions: everything ``mythos_rt.compile`` was asked for besides the model.

A Runtime is built from them and keeps them; artifacts save them (``options.json``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import MythosConfig
from .errors import InputError

DEFAULT_CHUNK = 256
DTYPES = ("float32", "float16", "bfloat16")


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` → ``"bfloat16"`` (how options and artifacts spell a dtype)."""
    return str(dtype).replace("torch.", "")


@dataclass
class CompileOptions:
    """Everything compile() was asked for besides the model (saved with artifacts)."""
    dtype: str
    backend: str = "auto"
    max_batch_size: int = 8
    max_seq_len: int = 4096
    max_loops: int = 16
    chunk: int = DEFAULT_CHUNK
    overrides: dict = field(default_factory=dict)
    cuda_graphs: bool = True
    debug: bool = False

    def validate(self, cfg: MythosConfig) -> "CompileOptions":
        for name, upper in (("max_batch_size", None), ("max_seq_len", cfg.max_seq_len),
                            ("max_loops", None), ("chunk", None)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InputError(f"{name} must be a positive integer, got {value!r}")
            if upper is not None and value > upper:
                raise InputError(f"{name}={value} exceeds the model's {name}={upper} (RoPE tables)")
        if self.dtype not in DTYPES:
            raise InputError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        return self
