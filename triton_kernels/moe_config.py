"""MoE tile configs: the heuristic, the interpreter's fixed one, the persistent autotune
cache, and the candidates autotuning times (``moe.autotune_moe`` runs them)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from typing import Dict, Optional

import torch
import triton

from mythos_rt.buildcache import cache_dir, write_atomic
from mythos_rt.ops.moe import PackedMoE

from . import interpreted
from .split_kv import pow2

BLOCK_M_CHOICES = (16, 32, 64, 128)


@dataclass(frozen=True)
class MoEConfig:
    """Tile sizes of one MoE launch sequence.

    block_m: sorted-pair rows per block (alignment padding, GEMM1, routed GEMM2);
    block_n1/block_k1: I columns (each of gate and up) / D chunk of GEMM1;
    block_n2/block_k2: D columns / I chunk of both GEMM2s; block_m_shared: tokens per
    shared-GEMM2 block; split_shared: programs the shared slots are split over (fp32
    partials summed in the combine); num_warps/num_stages: for every GEMM.
    """
    block_m: int = 16
    block_n1: int = 64
    block_k1: int = 128
    block_n2: int = 64
    block_k2: int = 128
    block_m_shared: int = 16
    split_shared: int = 1
    num_warps: int = 4
    num_stages: int = 3

    def to_dict(self) -> dict:
        return asdict(self)


INTERPRETER_CONFIG = MoEConfig(block_m=16, block_n1=32, block_k1=32, block_n2=32,
                               block_k2=32, block_m_shared=16, split_shared=2,
                               num_warps=4, num_stages=1)


def shared_split(n_tokens: int, S: int, cfg: MoEConfig, D: int, cap_rows: int,
                  target_programs: int = 264) -> int:
    """How many programs to split the shared slots over: enough to fill the GPU, ≤ S."""
    if S == 0:
        return 1
    tiles = triton.cdiv(n_tokens, cfg.block_m_shared) * triton.cdiv(D, cfg.block_n2)
    split = min(S, max(1, triton.cdiv(target_programs, tiles)), max(1, cap_rows // n_tokens))
    return triton.cdiv(S, triton.cdiv(S, split))   # no empty splits


def heuristic_config(n_tokens: int, dim: int, expert_dim: int, n_routed: int, top_k: int,
                     n_shared_slots: int, dtype: torch.dtype) -> MoEConfig:
    """A reasonable GPU config by the average pairs per routed expert (no tuning)."""
    avg = n_tokens * top_k / max(1, n_routed)
    wide = 2 if dtype == torch.float32 else 1   # fp32 tiles are twice the bytes
    if avg <= 16:      # decode: memory bound, tiny M, wide K tiles, many programs
        cfg = MoEConfig(block_m=16, block_n1=64, block_k1=128 // wide, block_n2=32,
                        block_k2=256 // wide, block_m_shared=16, num_warps=4, num_stages=4)
    elif avg <= 48:
        cfg = MoEConfig(block_m=32, block_n1=64, block_k1=128 // wide, block_n2=64,
                        block_k2=128 // wide, block_m_shared=32, num_warps=4, num_stages=4)
    elif avg <= 160:
        cfg = MoEConfig(block_m=64, block_n1=64, block_k1=64, block_n2=128, block_k2=64,
                        block_m_shared=64, num_warps=4, num_stages=4)
    else:              # prefill: tensor-core bound
        cfg = MoEConfig(block_m=128, block_n1=64, block_k1=64, block_n2=128, block_k2=64,
                        block_m_shared=128, num_warps=8, num_stages=3)
    return fit_k_tiles(cfg, dim, expert_dim)


def fit_k_tiles(cfg: MoEConfig, dim: int, expert_dim: int) -> MoEConfig:
    """K tiles no wider than the reductions they cover (D for GEMM1, I for GEMM2): a
    128-wide tile over I = 12 compiled to 255 registers and kilobytes of spills."""
    return replace(cfg, block_k1=min(cfg.block_k1, pow2(dim, 16)),
                   block_k2=min(cfg.block_k2, pow2(expert_dim, 16)))


def cache_path() -> str:
    """``moe.json`` in the autotune cache (``mythos_rt.buildcache``)."""
    return str(cache_dir("autotune") / "moe.json")


_CACHE: Dict[str, Dict[str, dict]] = {}   # path -> {key: config dict}


def load_cache(path: str) -> Dict[str, dict]:
    if path not in _CACHE:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            _CACHE[path] = data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            _CACHE[path] = {}
    return _CACHE[path]


def save_cache(path: str, entries: Dict[str, dict]) -> None:
    merged = {}
    try:
        with open(path, encoding="utf-8") as f:
            merged = json.load(f)
    except (OSError, ValueError):
        pass
    merged.update(entries)
    write_atomic(path, json.dumps(merged, indent=1, sort_keys=True))
    _CACHE[path] = merged


def config_from(entry: dict) -> Optional[MoEConfig]:
    """A cache entry -> MoEConfig (keys starting with '_' are notes, e.g. '_ms'); None if bad."""
    try:
        cfg = MoEConfig(**{f: v for f, v in entry.items() if not f.startswith("_")})
    except TypeError:
        return None
    return cfg if cfg.block_m in BLOCK_M_CHOICES else None


def token_bucket(n_tokens: int) -> int:
    """Configs are chosen per power-of-two token bucket (1, 2, 4, …)."""
    return 1 << max(0, (max(1, n_tokens) - 1).bit_length())


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "_")
    return device.type


def config_key(n_tokens: int, packed: PackedMoE, dtype: torch.dtype,
               device: torch.device) -> str:
    return (f"{_device_name(torch.device(device))}|n{token_bucket(n_tokens)}|D{packed.dim}"
            f"|I{packed.expert_dim}|E{packed.n_routed}|k{packed.top_k}"
            f"|S{packed.n_shared_slots}|{str(dtype).replace('torch.', '')}")


def get_config(n_tokens: int, packed: PackedMoE, dtype: torch.dtype,
               device: torch.device | str, path: Optional[str] = None,
               tuned: Optional[Dict[str, dict]] = None) -> MoEConfig:
    """The config for this call: fixed under the interpreter, else a hit in ``tuned`` (a
    runtime's own table, e.g. its artifact's), a cache hit or the heuristic.

    Never tunes (tuning is ``autotune_moe``, a compile-time step); host-only, no sync.
    """
    if interpreted() or torch.device(device).type == "cpu":
        return INTERPRETER_CONFIG  # (meta: the static sm_90 checks take the GPU's choice)
    key = config_key(n_tokens, packed, dtype, device)
    hit = (tuned or {}).get(key)
    if hit is None:
        hit = load_cache(path or cache_path()).get(key)
    cfg = config_from(hit) if hit is not None else None
    if cfg is not None:
        return cfg
    return heuristic_config(n_tokens, packed.dim, packed.expert_dim, packed.n_routed,
                            packed.top_k, packed.n_shared_slots, dtype)


def smem_bytes(cfg: MoEConfig, elt: int) -> int:
    """Pipelined shared memory of the largest GEMM of ``cfg`` (``elt`` bytes/element)."""
    g1 = cfg.block_m * cfg.block_k1 + 2 * cfg.block_k1 * cfg.block_n1
    g2 = max(cfg.block_m, cfg.block_m_shared) * cfg.block_k2 + cfg.block_k2 * cfg.block_n2
    return max(g1, g2) * elt * max(1, cfg.num_stages)


_SMEM_BUDGET = 200 * 1024   # H100/H200 allow 227 KiB per block; leave room for epilogues


def candidates(n_tokens: int, packed: PackedMoE, dtype: torch.dtype) -> list:
    """Configs autotuning times for ``n_tokens``: the heuristic's and variants that fit
    shared memory and (``sm90_check``) do not spill registers on sm_90."""
    base = heuristic_config(n_tokens, packed.dim, packed.expert_dim, packed.n_routed,
                            packed.top_k, packed.n_shared_slots, dtype)
    out = [base]
    avg = n_tokens * packed.top_k / max(1, packed.n_routed)
    if avg <= 16:
        for bn1, bk1, bn2, bk2, st in ((32, 128, 32, 128, 4), (64, 128, 64, 64, 4),
                                       (128, 128, 32, 256, 3), (32, 256, 32, 256, 3),
                                       (64, 64, 64, 64, 5), (64, 256, 64, 256, 3)):
            out.append(replace(base, block_n1=bn1, block_k1=bk1, block_n2=bn2,
                               block_k2=bk2, num_stages=st))
    else:
        for bm in (32, 64, 128):
            for bn1, bn2, bk, w, st in ((64, 64, 64, 4, 4), (64, 128, 64, 8, 3),
                                        (128, 128, 64, 8, 3), (64, 128, 32, 4, 5)):
                if 2 * bm * bn1 > 64 * 32 * w:
                    continue  # gate + up accumulators over 64 fp32 per thread: spills
                out.append(MoEConfig(block_m=bm, block_n1=bn1, block_k1=bk, block_n2=bn2,
                                     block_k2=bk, block_m_shared=bm, num_warps=w,
                                     num_stages=st))
    elt = torch.empty((), dtype=dtype).element_size()
    seen, uniq = set(), []
    for c in out:
        c = fit_k_tiles(c, packed.dim, packed.expert_dim)
        if c not in seen and smem_bytes(c, elt) <= _SMEM_BUDGET:
            seen.add(c)
            uniq.append(c)
    return uniq
