"""Attention kernel benchmarks: MLA absorbed decode, GQA decode, flash prefill, MLA chunks.

On a GPU (bf16, mythos_1b dims): decode achieved GB/s of cache read for
batch ∈ {1, 8, 64} × cached tokens ∈ {1k, 8k, 32k} (target ≥ 80% of HBM copy bandwidth
once batch × tokens ≥ 64k), and causal prefill TFLOP/s at 1k / 8k tokens (target ≥ 50%
of bf16 peak at 8k), and MLA chunks after a long prefix on both prefill paths (latent /
expanded) around the crossover ``latent_prefill_wins`` predicts. On CPU: one tiny case per
kernel under the Triton interpreter, so ``python bench/bench_attention.py`` runs anywhere
(its times mean nothing).

Byte counts are the cache bytes a kernel must read (the compact MLA cache: R + rope per
token; GQA: K and V per KV head) plus queries/outputs; FLOPs count the causal half only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Iterator

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.harness import rotating, row, time_ms  # noqa: E402
from mythos_rt.config import MythosConfig  # noqa: E402


def _mla_decode_case(B, L, cfg, dtype, dev, reps):
    from mythos_rt.triton_kernels.mla_decode import mla_decode
    H, R, P = cfg.n_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    scale = (cfg.qk_nope_head_dim + P) ** -0.5
    nbytes = B * L * (R + P) * dtype.itemsize

    def make():
        return (torch.randn(B, H, R, device=dev, dtype=dtype),
                torch.randn(B, H, P, device=dev, dtype=dtype),
                torch.randn(B, L, R, device=dev, dtype=dtype),
                torch.randn(B, L, P, device=dev, dtype=dtype),
                torch.full((B,), L, device=dev, dtype=torch.int32))
    get = rotating(make, nbytes)
    ms = time_ms(lambda: mla_decode(*get(), scale), warmup=2 if dev == "cpu" else 5, reps=reps)
    moved = nbytes + dtype.itemsize * B * H * (2 * R + P)
    return row(f"mla_decode B={B} L={L}", ms, bytes_moved=moved, kernel="mla_decode",
               batch=B, cached_tokens=L, dtype=str(dtype).split(".")[-1])


def _gqa_decode_case(B, L, cfg, dtype, dev, reps):
    from mythos_rt.triton_kernels.gqa_decode import gqa_decode
    H, Hkv, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    nbytes = 2 * B * L * Hkv * d * dtype.itemsize

    def make():
        return (torch.randn(B, H, d, device=dev, dtype=dtype),
                torch.randn(B, L, Hkv, d, device=dev, dtype=dtype),
                torch.randn(B, L, Hkv, d, device=dev, dtype=dtype),
                torch.full((B,), L, device=dev, dtype=torch.int32))
    get = rotating(make, nbytes)
    ms = time_ms(lambda: gqa_decode(*get(), d ** -0.5), warmup=2 if dev == "cpu" else 5,
                 reps=reps)
    return row(f"gqa_decode B={B} L={L}", ms, bytes_moved=nbytes + 2 * dtype.itemsize * B * H * d,
               kernel="gqa_decode", batch=B, cached_tokens=L, dtype=str(dtype).split(".")[-1])


def _prefill_case(kind, T, cfg, dtype, dev, reps):
    """Causal prefill of T tokens (B=1) with the sublayer's exact kernel call."""
    from mythos_rt.triton_kernels.flash_attention import _launch, flash_attention
    B = 1
    zero = torch.zeros(B, device=dev, dtype=torch.int32)
    kv_len = zero + T
    mk = lambda *s: torch.randn(*s, device=dev, dtype=dtype)  # noqa: E731
    if kind == "mla":
        H, n, P, V = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        q1, q2, k1, v = mk(B, T, H, n), mk(B, T, H, P), mk(B, T, H, n), mk(B, T, H, V)
        k2 = mk(B, T, P).unsqueeze(2).expand(B, T, H, P)  # shared rope key, head stride 0
        out = torch.empty(B, T, H, V, device=dev, dtype=dtype)
        scale = (n + P) ** -0.5
        fn = lambda: _launch(q1, q2, k1, k2, v, out, zero, kv_len, scale, True)  # noqa: E731
        dqk, dv = n + P, V
    else:
        H, Hkv, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        q, k, v = mk(B, T, H, d), mk(B, T, Hkv, d), mk(B, T, Hkv, d)
        fn = lambda: flash_attention(q, k, v, zero, kv_len, d ** -0.5)  # noqa: E731
        dqk, dv = d, d
    ms = time_ms(fn, warmup=1 if dev == "cpu" else 3, reps=reps)
    pairs = T * (T + 1) / 2
    return row(f"{kind}_prefill T={T}", ms, flops=2 * B * H * pairs * (dqk + dv),
               kernel="flash_attention", variant=kind, tokens=T, dtype=str(dtype).split(".")[-1])


def _mla_chunk_case(T, L, latent, cfg, dtype, dev, reps):
    """One MLA prefill chunk of T tokens after L cached ones (B=1) on one path: latent
    (attention over the compact cache) or expanded (kv_up over the whole cache first).
    FLOPs are the per-head attention's (the same for both paths), so TFLOP/s compare
    speed; ``latent_prefill_wins`` should pick the faster one."""
    from mythos_rt.ops.attention import MLAWeights
    from mythos_rt.triton_kernels.attention import latent_prefill_wins, mla_prefill
    H, R, P = cfg.n_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    n, V, S = cfg.qk_nope_head_dim, cfg.v_head_dim, L + T
    mk = lambda *s: torch.randn(*s, device=dev, dtype=dtype) * 0.1  # noqa: E731
    kv_up = mk(H * (n + V), R)
    unused = torch.empty(0, device=dev, dtype=dtype)
    w = MLAWeights(q_down=unused, q_norm=unused, q_up_nope=unused, q_up_rope=mk(H * P, 1),
                   kv_down=unused, kv_norm=unused, kv_up=kv_up, wo=unused,
                   w_uk=kv_up.view(H, n + V, R)[:, :n].contiguous(),
                   w_uv=kv_up.view(H, n + V, R)[:, n:].contiguous())
    ckv, kpe = mk(1, S, R), mk(1, S, P)
    q_nope, q_pe = mk(1, T, H, n), mk(1, T, H, P)
    lens = torch.tensor([L], device=dev, dtype=torch.int32)
    ms = time_ms(lambda: mla_prefill(q_nope, q_pe, ckv, kpe, lens, w, (n + P) ** -0.5, latent),
                 warmup=1 if dev == "cpu" else 3, reps=reps)
    chosen = latent == latent_prefill_wins(T, R, n, P, V)
    path = "latent" if latent else "expanded"
    return row(f"mla_chunk T={T} L={L} {path}", ms,
               flops=2 * H * T * (L + (T + 1) / 2) * (n + P + V), kernel="mla_prefill",
               variant=path, tokens=T, cached_tokens=L, chosen_by_rule=chosen,
               dtype=str(dtype).split(".")[-1])


def iter_rows(quick: bool = False) -> Iterator[dict]:
    """Benchmark rows (see module docstring), yielded as each case finishes."""
    if not torch.cuda.is_available():
        # Interpreter smoke test: tiny shapes, fp32.
        cfg = MythosConfig(dim=64, n_heads=4, n_kv_heads=2, kv_lora_rank=32,
                           qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16)
        f32, note = torch.float32, "CPU interpreter smoke test; times are not performance"
        yield {**_mla_decode_case(2, 64, cfg, f32, "cpu", reps=2), "note": note}
        yield {**_gqa_decode_case(2, 64, cfg, f32, "cpu", reps=2), "note": note}
        yield {**_prefill_case("mla", 32, cfg, f32, "cpu", reps=2), "note": note}
        yield {**_prefill_case("gqa", 32, cfg, f32, "cpu", reps=2), "note": note}
        return
    cfg = MythosConfig.from_preset("mythos_1b")
    bf16, dev = torch.bfloat16, "cuda"
    batches = (1, 64) if quick else (1, 8, 64)
    lens = (1024, 32768) if quick else (1024, 8192, 32768)
    reps = 20 if quick else 50
    for B in batches:
        for L in lens:
            yield _mla_decode_case(B, L, cfg, bf16, dev, reps)
            yield _gqa_decode_case(B, L, cfg, bf16, dev, reps)
    for T in (1024, 8192):
        yield _prefill_case("mla", T, cfg, bf16, dev, reps)
        yield _prefill_case("gqa", T, cfg, bf16, dev, reps)
    for T in ((64, 256) if quick else (17, 64, 128, 256)):  # the latent/expanded crossover
        for latent in (True, False):
            yield _mla_chunk_case(T, 8192 - T, latent, cfg, bf16, dev, reps)


def run(quick: bool = False) -> list[dict]:
    return list(iter_rows(quick))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    for r in run(args.quick):
        print(json.dumps(r))
