"""MoE FFN microbenchmark: Triton vs the eager reference vs one dense cuBLAS matmul.

GPU: mythos_1b / mythos_3b MoE shapes (D=2048/3072, I=2048/4096, E=64, k=4, 2 shared
experts = 8 shared slots), bf16, tokens ∈ {1, 16, 128, 1024, 8192}. Each Triton row
reports time, TFLOP/s and GB/s of the expert weights that must be read (distinct routed
experts hit + shared slots + router), with % of the H100 ceilings; ``pct_of_dense`` is
the throughput relative to a dense cuBLAS matmul of equal FLOPs ((N, D) × (D, 3·I·(k+S))).
Targets: decode ≥ 70% of HBM bandwidth on the weights read; 8192 tokens ≥ 60% of dense.

CPU: one tiny fp32 smoke case under the Triton interpreter (so CI can run it).

    python bench/bench_moe.py [--quick] [--tune]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Iterator

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import mythos_rt.triton_kernels  # noqa: E402,F401 — interpreter on CPU before kernels load
from bench.harness import H100_COPY_GBPS, row, time_ms  # noqa: E402
from mythos_rt.config import MythosConfig  # noqa: E402
from mythos_rt.lower import op_args  # noqa: E402
from mythos_rt.ops.moe import moe_ffn_torch, moe_route_torch  # noqa: E402
from mythos_rt.reference import MoEFFN  # noqa: E402
from mythos_rt.testing import rel_err  # noqa: E402
from mythos_rt.triton_kernels import moe as tmoe  # noqa: E402

TOKENS = (1, 16, 128, 1024, 8192)
QUICK_TOKENS = (1, 128, 8192)


def _make(cfg: MythosConfig, dtype: torch.dtype, device: str):
    """Reference MoEFFN with random weights (std 1/√fan_in, random router bias) + packed."""
    with torch.device(device):
        m = MoEFFN(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 1.0 / p.shape[-1] ** 0.5)
        m.router_bias.normal_(0.0, 0.1)
    m = m.to(dtype).eval()
    return m, op_args("moe", m.state_dict(), cfg, dtype=dtype, device=device)


def _moe_flops(n: int, packed) -> float:
    D, I, k, S, E = (packed.dim, packed.expert_dim, packed.top_k, packed.n_shared_slots,
                     packed.n_routed)
    return 2.0 * n * (k + S) * 3 * D * I + 2.0 * n * D * E


def _weight_bytes(x, packed) -> float:
    """Bytes that must be read: distinct routed experts hit, all shared slots, the router."""
    ids, _ = moe_route_torch(x, packed.router_w, packed.router_bias, packed.top_k)
    used = int(torch.unique(ids).numel())
    router = packed.router_w.numel() * packed.router_w.element_size()
    return packed.expert_weight_bytes(used + packed.n_shared_slots) + router


def _gpu_rows(quick: bool, tune: bool) -> Iterator[dict]:
    dtype, dev = torch.bfloat16, "cuda"
    tokens = QUICK_TOKENS if quick else TOKENS
    for model in ("mythos_1b", "mythos_3b"):
        cfg = MythosConfig.from_preset(model)
        m, packed = _make(cfg, dtype, dev)
        ws = tmoe.MoEWorkspace.allocate(max(tokens), packed)
        if tune:
            tmoe.autotune_moe(packed, tokens, workspace=ws)
        D, I, k, S = cfg.dim, cfg.expert_dim, packed.top_k, packed.n_shared_slots
        dense_b = torch.randn(D, 3 * I * (k + S), device=dev, dtype=dtype) / D ** 0.5
        for n in tokens:
            x = torch.randn(n, D, device=dev, dtype=dtype)
            out = torch.empty_like(x)
            flops, nbytes = _moe_flops(n, packed), _weight_bytes(x, packed)
            cfg_used = tmoe.get_config(n, packed, dtype, dev)
            ms = time_ms(lambda: tmoe.moe_ffn_triton(x, packed, ws, out=out))
            with torch.no_grad():
                ref = m(x[None])[0]
                ref_ms = time_ms(lambda: m(x[None]), warmup=2, reps=5 if n >= 1024 else 20)
            dense_ms = time_ms(lambda: torch.matmul(x, dense_b))
            err = rel_err(out.float(), ref.float())
            base = f"moe_ffn/{model}/bf16/n{n}"
            yield row(f"{base}/triton", ms, bytes_moved=nbytes, flops=flops,
                      floor_ms=round(nbytes / (H100_COPY_GBPS * 1e9) * 1e3, 5),
                      speedup_vs_ref=round(ref_ms / ms, 2),
                      pct_of_dense=round(100 * dense_ms / ms, 1),
                      rel_err_vs_ref_bf16=round(err, 5), config=cfg_used.to_dict())
            yield row(f"{base}/reference", ref_ms, bytes_moved=nbytes, flops=flops)
            yield row(f"{base}/dense_cublas_equal_flops", dense_ms, flops=flops)
        del m, packed, ws, dense_b
        torch.cuda.empty_cache()


def _cpu_rows() -> list[dict]:
    """Tiny smoke case: runs the Triton kernels in the interpreter, checks them, times."""
    cfg = MythosConfig(dim=64, expert_dim=32, n_experts=8, n_experts_per_tok=2,
                       n_shared_experts=1)
    torch.manual_seed(0)
    m, packed = _make(cfg, torch.float32, "cpu")
    n = 8
    x = torch.randn(n, cfg.dim)
    ws = tmoe.MoEWorkspace.allocate(n, packed)
    out = torch.empty_like(x)
    ms = time_ms(lambda: tmoe.moe_ffn_triton(x, packed, ws, out=out), warmup=1, reps=3)
    torch_ms = time_ms(lambda: moe_ffn_torch(x, packed), warmup=1, reps=5)
    with torch.no_grad():
        ref = m(x[None])[0]
    return [
        row("moe_ffn/tiny/fp32/n8/triton-interpreter", ms, flops=_moe_flops(n, packed),
            rel_err_vs_ref=float(f"{rel_err(out, ref):.3e}"), device="cpu"),
        row("moe_ffn/tiny/fp32/n8/torch", torch_ms, flops=_moe_flops(n, packed),
            rel_err_vs_ref=float(f"{rel_err(moe_ffn_torch(x, packed), ref):.3e}"),
            device="cpu"),
    ]


def iter_rows(quick: bool = False, tune: bool = False) -> Iterator[dict]:
    """Benchmark rows (bench/harness.py format), as each case finishes. CPU: the tiny
    smoke case only."""
    if torch.cuda.is_available():
        yield from _gpu_rows(quick, tune or os.environ.get("MYTHOS_RT_BENCH_TUNE") == "1")
    else:
        yield from _cpu_rows()


def run(quick: bool = False, tune: bool = False) -> list[dict]:
    return list(iter_rows(quick, tune))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer token counts")
    ap.add_argument("--tune", action="store_true",
                    help="autotune configs first (persisted in the autotune cache)")
    args = ap.parse_args(argv)
    for r in run(quick=args.quick, tune=args.tune):
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
