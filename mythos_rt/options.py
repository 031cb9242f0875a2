"""CompileOptions: everything ``mythos_rt.compile`` was asked for besides the model.

A Runtime is built from them and keeps them; artifacts save them (``options.json``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .config import MythosConfig
from .errors import InputError

DEFAULT_CHUNK = 256
# Upper bounds far beyond any real use: a typo (or a hostile options.json) is an error
# naming the option, not an allocation that exhausts the machine.
LIMITS = {"max_batch_size": 4096, "max_loops": 1024, "chunk": 1 << 16}
DTYPES = ("float32", "float16", "bfloat16")
# How the recurrent loop treats positions ACT has halted (docs/adaptive-depth.md):
# "eager" computes every loop for every position, "lazy" stops a halted position and
# computes its deeper loops only when a later position needs them (exact), "reuse" gives
# it its last computed cache entries instead (approximate).
ACT_MODES = ("eager", "lazy", "reuse")


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
    act_mode: str = "eager"
    tensor_parallel: int = 1  # ranks the model is split over (mythos_rt.parallel)
    # lazy depth's decode passes: None = the device's default (16 on CUDA: device-resident,
    # graph-capturable; 0 elsewhere: decided on the host), or that many positions per row
    lazy_window: Optional[int] = None

    def validate(self, cfg: MythosConfig) -> "CompileOptions":
        for name in ("max_batch_size", "max_seq_len", "max_loops", "chunk", "tensor_parallel"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InputError(f"{name} must be a positive integer, got {str(value)[:40]!r}")
            if name == "max_seq_len" and value > cfg.max_seq_len:
                raise InputError(f"{name}={value} exceeds the model's {name}={cfg.max_seq_len} "
                                 "(RoPE tables)")
            if value > LIMITS.get(name, value):
                raise InputError(f"{name}={value} is larger than mythos-rt supports "
                                 f"({LIMITS[name]})")
        for name in ("cuda_graphs", "debug"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{name} must be True or False, got {str(getattr(self, name))[:40]!r}")
        if not isinstance(self.overrides, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in self.overrides.items()):
            raise InputError(f"overrides must map op names to backend names, got "
                             f"{str(self.overrides)[:60]!r}")
        w = self.lazy_window
        if w is not None and (not isinstance(w, int) or isinstance(w, bool) or w < 0
                              or w > self.chunk):
            raise InputError(f"lazy_window must be None or an integer in [0, chunk={self.chunk}]"
                             f", got {str(w)[:40]!r}")
        if self.act_mode not in ACT_MODES:
            raise InputError(f"act_mode must be one of {', '.join(ACT_MODES)}, got "
                             f"{str(self.act_mode)[:40]!r}")
        if self.dtype not in DTYPES:
            raise InputError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        return self
