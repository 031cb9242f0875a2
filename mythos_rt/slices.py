"""Checkpoint tensors read only in the slices a tensor-parallel rank asks for.

``load_checkpoint(..., lazy=True)`` returns, for safetensors checkpoints, a state_dict
of ``LazyTensor``s: each knows its file, name, shape and dtype, and reads nothing until
``weights.materialize`` asks for the whole tensor (``read``) or one slice of it
(``read_slice``, through safetensors' memory-mapped ``get_slice``). A rank therefore
never holds another rank's share of the model (docs/parallel.md).
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["LazyTensor", "read_lazy_shard", "bytes_read"]

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
           "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}

# Bytes materialized from lazy tensors in this process (tests check a rank reads ≈ 1/N).
_READ = {"bytes": 0}


def bytes_read() -> int:
    """Bytes this process has read through ``LazyTensor`` so far."""
    return _READ["bytes"]


class LazyTensor:
    """One tensor of a safetensors file, read on demand (whole or one slice)."""

    def __init__(self, path: Path, name: str, shape: tuple, dtype: torch.dtype):
        self.path, self.name = path, name
        self.shape, self.dtype = torch.Size(shape), dtype

    def __repr__(self) -> str:
        return f"LazyTensor({self.path.name}:{self.name}, {tuple(self.shape)}, {self.dtype})"

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def is_complex(self) -> bool:
        return self.dtype.is_complex

    def read(self) -> torch.Tensor:
        """The whole tensor."""
        return self.read_slice(0, 0, self.shape[0]) if self.shape else self._open(lambda s: s[:])

    def read_slice(self, dim: int, start: int, stop: int) -> torch.Tensor:
        """``tensor.narrow(dim, start, stop - start)``, reading only that slice."""
        index = (slice(None),) * dim + (slice(start, stop),)
        return self._open(lambda s: s[index])

    def _open(self, take) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt", device="cpu") as f:
            t = take(f.get_slice(self.name))
        _READ["bytes"] += t.numel() * t.element_size()
        return t


def read_lazy_shard(f, path: Path, names) -> dict[str, LazyTensor]:
    """``LazyTensor``s of ``names`` in the open safetensors file ``f`` at ``path``."""
    out = {}
    for name in names:
        s = f.get_slice(name)
        dtype = _DTYPES.get(s.get_dtype())
        if dtype is None:
            raise ValueError(f"tensor {name} has unsupported dtype {s.get_dtype()}")
        out[name] = LazyTensor(path, name, tuple(s.get_shape()), dtype)
    return out
