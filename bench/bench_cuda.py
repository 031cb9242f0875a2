"""CUDA kernels (mythos_rt._C, and the NVRTC-specialized recurrent step) vs their Triton
siblings and torch references, at decode and prefill sizes.

Rows: ``cuda/<op>/<case>/N<tokens>/<impl>`` with impl ∈ {cuda, cuda_jit, triton, torch},
median time and achieved GB/s of the bytes the op must move (% of H100 HBM), plus
``speedup_vs_triton``. Ops and sizes (bf16):
* moe_route  mythos_50b router (D=6144, E=256, k=4) and E=512/k=8 (D=12288): N 1, 64, 8192
* moe_align  E=64/k=4/S=8 and E=256/k=8/S=8, block_m 16 (decode) / 128 (prefill)
* loop_epilogue (+next prologue) and loop_prologue  mythos_1b (D=2048, r=8),
  mythos_10b (D=4096, r=16): N 1, 64, 8192

Needs a GPU and the built extension: on CPU it prints why and returns [] (never fails).
A kernel stays in csrc/ only where it wins somewhere: docs/cuda.md records the verdicts
from the results file this writes through bench/gpu_suite.py.

    python bench/bench_cuda.py [--quick] [--json]
"""

from __future__ import annotations

import os
import sys
from typing import Iterator

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench.harness import bench_main, row, time_ms  # noqa: E402

DT = torch.bfloat16


def _why_not() -> str | None:
    if not torch.cuda.is_available():
        return "bench_cuda: needs a CUDA GPU (none here); no rows"
    try:
        import mythos_rt._C  # noqa: F401
    except ImportError:
        return ("bench_cuda: mythos_rt._C is not built (MYTHOS_RT_BUILD_CUDA=1 pip install "
                "--no-build-isolation -e .); no rows")
    return None


def _rows(op, case, n, impls: dict, nbytes: float, quick: bool, **extra) -> list[dict]:
    warm, reps = (3, 20) if quick else (10, 100)
    out = []
    for impl, fn in impls.items():
        ms = time_ms(fn, warmup=warm, reps=reps)
        out.append(row(f"cuda/{op}/{case}/N{n}/{impl}", ms, bytes_moved=nbytes, op=op,
                       case=case, tokens=n, impl=impl, dtype="bfloat16", **extra))
    tri = next((r["ms"] for r in out if r["impl"] == "triton"), None)
    for r in out:
        r["speedup_vs_triton"] = round(tri / r["ms"], 2) if tri and r["ms"] else None
    return out


def _route(quick: bool) -> list[dict]:
    from mythos_rt.cuda.moe import RouteWorkspace, moe_route_cuda
    from mythos_rt.ops.moe import moe_route_torch
    from mythos_rt.triton_kernels.moe import moe_route_triton
    rows = []
    for case, D, E, k in (("D6144-E256-k4", 6144, 256, 4), ("D12288-E512-k8", 12288, 512, 8)):
        w = (torch.randn(E, D, device="cuda") / D ** 0.5).to(DT)
        b = torch.randn(E, device="cuda") * 0.1
        for n in ((1, 8192) if quick else (1, 64, 8192)):
            x = torch.randn(n, D, device="cuda", dtype=DT)
            ws = RouteWorkspace.allocate(n, E, "cuda")
            out = (torch.empty(n, k, dtype=torch.int32, device="cuda"),
                   torch.empty(n, k, device="cuda"))
            nbytes = (E * D + n * D) * 2 + n * k * 8
            rows += _rows("moe_route", case, n, {
                "cuda": lambda: moe_route_cuda(x, w, b, k, out=out, workspace=ws),
                "triton": lambda: moe_route_triton(x, w, b, k, out=out),
                "torch": lambda: moe_route_torch(x, w, b, k)}, nbytes, quick)
    return rows


def _align(quick: bool) -> list[dict]:
    from mythos_rt.cuda.moe import moe_align_cuda
    from mythos_rt.ops.moe import PackedMoE, moe_align_sizes, moe_align_torch
    from mythos_rt.triton_kernels import moe as tmoe
    rows = []
    for case, E, k, S in (("E64-k4-S8", 64, 4, 8), ("E256-k8-S8", 256, 8, 8)):
        for n in ((1, 8192) if quick else (1, 64, 8192)):
            bm = 16 if n <= 64 else 128
            ids = torch.stack([torch.randperm(E, device="cuda")[:k] for _ in range(n)]).int()
            _, _, nrows, blocks = moe_align_sizes(n, E, k, S, bm)
            i32 = dict(dtype=torch.int32, device="cuda")
            out = (torch.empty(E + S, **i32), torch.empty(E + S, **i32),
                   torch.empty(nrows, **i32), torch.empty(blocks, **i32))
            # the Triton alignment consumes the router's histogram: build one for these ids
            packed = PackedMoE(w13=torch.empty(E + S, 2, 8, device="cuda", dtype=DT),
                               w2=torch.empty(E + S, 8, 1, device="cuda", dtype=DT),
                               router_w=torch.empty(E, 8, device="cuda", dtype=DT),
                               router_bias=torch.zeros(E, device="cuda"), n_routed=E,
                               n_shared_slots=S, top_k=k, expert_dim=1)
            ws = tmoe.MoEWorkspace.allocate(n, packed)
            chunks = ws.hist.shape[0]
            tok = torch.arange(n, device="cuda").repeat_interleave(k) // tmoe.ROUTER_BLOCK_T
            hist = torch.zeros(chunks * E, dtype=torch.int32, device="cuda")
            hist.index_add_(0, tok * E + ids.flatten().long(),
                            torch.ones(n * k, dtype=torch.int32, device="cuda"))
            ws.hist.copy_(hist.view(chunks, E))
            nbytes = n * k * 4 + (nrows + blocks) * 4
            rows += _rows("moe_align", case, n, {
                "cuda": lambda: moe_align_cuda(ids, E, S, bm, out=out),
                "triton": lambda: tmoe.moe_align_triton(n, ids, ws.hist, ws, packed, bm),
                "torch": lambda: moe_align_torch(ids, E, S, bm)}, nbytes, quick, block_m=bm)
    return rows


def _loop(quick: bool) -> list[dict]:
    from bench.bench_recurrent import fused_bytes
    from mythos_rt.config import MythosConfig
    from mythos_rt.cuda import jit
    from mythos_rt.cuda.recurrent import loop_epilogue_cuda, loop_prologue_cuda
    from mythos_rt.ops.recurrent import ACTState, loop_epilogue_torch, loop_prologue_torch
    from mythos_rt.triton_kernels.recurrent_step import (loop_epilogue_triton,
                                                         loop_prologue_triton)
    from tests.ops.recurrent_cases import make_ref_loop
    rows = []
    for name in ("mythos_1b", "mythos_10b"):
        cfg = MythosConfig.from_preset(name)
        D = cfg.dim
        p = make_ref_loop(D, rank=cfg.lora_rank, max_loops=cfg.max_loop_iters).params(
            dtype=DT, device="cuda")
        try:
            pj = jit.SpecializedLoop(p, jit.specialize_loop(p, DT, "cuda"))
        except Exception as exc:  # noqa: BLE001 — CuPy/NVRTC missing: AOT rows only
            print(f"bench_cuda: no JIT rows for {name}: {exc}", file=sys.stderr)
            pj = None
        for n in ((1, 8192) if quick else (1, 64, 8192)):
            x, h, e = (torch.randn(n, D, device="cuda", dtype=DT) for _ in range(3))
            st = ACTState.allocate(n, D, DT, "cuda").reset(n)
            nc = torch.empty_like(h)
            epi = lambda f, q=p: (lambda: f(x, h, e, q, 3, st, nc))  # noqa: E731
            impls = {"cuda": epi(loop_epilogue_cuda)}
            if pj is not None:
                impls["cuda_jit"] = epi(loop_epilogue_cuda, pj)
            impls.update(triton=epi(loop_epilogue_triton), torch=epi(loop_epilogue_torch))
            nbytes = fused_bytes(n, D, cfg.lora_rank, cfg.max_loop_iters, 2)
            rows += _rows("loop_epilogue", name, n, impls, nbytes, quick)
            pro = lambda f, q=p: (lambda: f(h, e, q, 3, nc))  # noqa: E731
            impls = {"cuda": pro(loop_prologue_cuda)}
            if pj is not None:
                impls["cuda_jit"] = pro(loop_prologue_cuda, pj)
            impls.update(triton=pro(loop_prologue_triton), torch=pro(loop_prologue_torch))
            rows += _rows("loop_prologue", name, n, impls, 3 * n * D * 2 + D * 2, quick)
    return rows


def iter_rows(quick: bool) -> Iterator[dict]:
    """Result rows (module docstring), per op; where it cannot run, one ``skipped`` row
    whose ``reason`` says why."""
    why = _why_not()
    if why:
        yield {"name": "cuda", "status": "skipped", "reason": why}
        return
    torch.manual_seed(0)
    yield from _route(quick)
    yield from _align(quick)
    yield from _loop(quick)


def run(quick: bool) -> list[dict]:
    """Result rows (module docstring); [] with a printed reason where it cannot run."""
    why = _why_not()
    if why:
        print(why)
        return []
    return list(iter_rows(quick))


def main(argv=None):
    bench_main(run, ["name", "ms", "gbps", "pct_hbm", "speedup_vs_triton"], __doc__.split("\n")[0], argv)


if __name__ == "__main__":
    main()
