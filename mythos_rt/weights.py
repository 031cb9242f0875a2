"""Compile-time weight transforms: materialize a graph's weights from a state_dict.

This is the one place where weight layouts change. Each derived weight in the IR names
a recipe below and its source tensors; the recipes are small and exact (reshapes,
concatenations, and the LTI decay computed once in float32).
"""

from __future__ import annotations

from typing import Callable

import torch

from .ir import Graph, WeightSpec
from .progress import bar


def _mla_absorb(kv_up: torch.Tensor, n_heads: int, nope: int, v_dim: int, part: str) -> torch.Tensor:
    """kv_up (H·(nope+v), R) → W_UK (H, nope, R) or W_UV (H, v, R)."""
    per_head = kv_up.reshape(n_heads, nope + v_dim, kv_up.shape[-1])
    return (per_head[:, :nope] if part == "uk" else per_head[:, nope:]).contiguous()


def _moe_pack_w13(srcs: list[torch.Tensor], expert_dim: int) -> torch.Tensor:
    """[gate0, up0, gate1, up1, ...] → [E_tot, 2I, D]; a shared expert (k·I) splits into k."""
    packed = []
    for gate, up in zip(srcs[0::2], srcs[1::2]):
        for s in range(gate.shape[0] // expert_dim):
            rows = slice(s * expert_dim, (s + 1) * expert_dim)
            packed.append(torch.cat([gate[rows], up[rows]], dim=0))
    return torch.stack(packed)


def _moe_pack_w2(srcs: list[torch.Tensor], expert_dim: int) -> torch.Tensor:
    """[down0, down1, ...] (D, k·I) → [E_tot, D, I], slicing shared experts' columns."""
    packed = []
    for down in srcs:
        for s in range(down.shape[1] // expert_dim):
            packed.append(down[:, s * expert_dim:(s + 1) * expert_dim])
    return torch.stack(packed).contiguous()


def _lti_decay(log_A: torch.Tensor, log_dt: torch.Tensor) -> torch.Tensor:
    """A = exp(-exp(clamp(log_dt + log_A, -20, 20))), in float32 (as in the reference)."""
    return torch.exp(-torch.exp((log_dt.float() + log_A.float()).clamp(-20, 20)))


RECIPES: dict[str, Callable[..., torch.Tensor]] = {
    "mla_absorb_uk": lambda srcs, d: _mla_absorb(srcs[0], d["n_heads"], d["nope"], d["v_dim"], "uk"),
    "mla_absorb_uv": lambda srcs, d: _mla_absorb(srcs[0], d["n_heads"], d["nope"], d["v_dim"], "uv"),
    "moe_pack_w13": lambda srcs, d: _moe_pack_w13(srcs, d["expert_dim"]),
    "moe_pack_w2": lambda srcs, d: _moe_pack_w2(srcs, d["expert_dim"]),
    "concat_rows": lambda srcs, d: torch.cat(srcs, dim=0),
    "lti_decay": lambda srcs, d: _lti_decay(*srcs),
}


def materialize(g: Graph, state_dict: dict[str, torch.Tensor], device: torch.device,
                only_used: bool = True, progress: bool = False) -> dict[str, torch.Tensor]:
    """Return name → tensor for every weight the graph's ops read, in the IR's dtypes.

    Derived weights are computed from their sources in float32 and then cast; source-only
    checkpoint weights are not kept (``only_used``) so packed experts are not stored twice.
    """
    used = g.weight_names_used()
    out: dict[str, torch.Tensor] = {}
    names = [n for n in g.weights if n in used or not only_used]
    tied: dict[tuple, torch.Tensor] = {}  # checkpoint tensors sharing storage stay shared
    for name in bar(names, desc="packing weights", enabled=progress):
        spec = g.weights[name]
        src = _make(name, spec, g, state_dict)
        if spec.derive is not None:
            out[name] = src.to(device=device, dtype=_dtype(spec))
            continue
        key = (src.data_ptr(), tuple(src.shape), src.stride(), spec.dtype)
        if key not in tied:
            tied[key] = src.detach().to(device=device, dtype=_dtype(spec))
        out[name] = tied[key]
    return out


def _make(name: str, spec: WeightSpec, g: Graph, sd: dict[str, torch.Tensor]) -> torch.Tensor:
    if spec.derive is None:
        if name not in sd:
            raise KeyError(f"weight {name!r} is not in the state_dict")
        t = sd[name]
    else:
        recipe = RECIPES.get(spec.derive["fn"])
        if recipe is None:
            raise KeyError(f"weight {name!r}: unknown derivation {spec.derive['fn']!r}")
        t = recipe([sd[s].float() for s in spec.derive["from"]], spec.derive)
    if tuple(t.shape) != tuple(spec.shape):
        raise ValueError(f"weight {name!r}: made shape {tuple(t.shape)}, IR says {spec.shape}")
    return t


def _dtype(spec: WeightSpec) -> torch.dtype:
    return getattr(torch, spec.dtype)
