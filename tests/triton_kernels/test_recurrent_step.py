"""Triton recurrent step (prologue / epilogue kernels) vs mythos_rt.reference.

CPU: Triton's interpreter, fp32 and fp16. GPU (@pytest.mark.gpu): bf16, row packing at
real sizes, and capture of the step in a CUDA graph.
"""

import pytest
import torch

from mythos_rt.ops.recurrent import ACTState, loop_epilogue_torch
from mythos_rt.testing import (TOL_BF16_KERNEL, TOL_FP16_INTERPRET, TOL_FP32_INTERPRET,
                               assert_rel_close)
from mythos_rt.triton_kernels.recurrent_step import (epilogue_config, loop_epilogue_triton,
                                                     loop_prologue_triton)
from tests.ops.recurrent_cases import check_step, make_ref_loop, ref_prologue, run_loop

DTYPES = [pytest.param(torch.float32, TOL_FP32_INTERPRET, id="fp32"),
          pytest.param(torch.float16, TOL_FP16_INTERPRET, id="fp16")]
DIMS = [pytest.param(48, id="D48"), pytest.param(208, id="D208")]  # D//8 even, not 2^k
ROWS = [pytest.param(1, id="N1"), pytest.param(7, id="N7"), pytest.param(37, id="N37")]


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("n", ROWS)
@pytest.mark.parametrize("dim", DIMS)
def test_prologue_vs_reference(dim, n, dtype, tol):
    m = make_ref_loop(dim, round_to=dtype)
    h, e = (torch.randn(n, dim).to(dtype) for _ in range(2))
    t = 9
    with torch.no_grad():
        ref = ref_prologue(m, h.float(), e.float(), t)
    out = torch.full_like(h, float("nan"))
    assert loop_prologue_triton(h, e, m.params(dtype=dtype), t, out=out) is out
    assert_rel_close(out, ref, tol)


@pytest.mark.parametrize("t,with_next", [pytest.param(1, False, id="t1-plain"),
                                         pytest.param(5, True, id="t5_beyond_max_loops-next")])
@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("n", ROWS)
@pytest.mark.parametrize("dim", DIMS)
def test_epilogue_vs_reference(dim, n, dtype, tol, t, with_next):
    m = make_ref_loop(dim, rank=3, max_loops=3, round_to=dtype)
    check_step(m, loop_epilogue_triton, n, dtype, tol, t, with_next)


@pytest.mark.parametrize("block_m", [1, 2, 4])
def test_epilogue_packed_rows(block_m):
    """Several rows per program, N not a multiple: padded rows must not touch the state
    nor the all-halted count (the heuristic packs rows only from 1024 rows up)."""
    m = make_ref_loop(48, rank=5, max_loops=2)
    cfg = (64, block_m, 4)  # BLOCK_D 64 >= 48
    check_step(m, loop_epilogue_triton, 37, torch.float32, TOL_FP32_INTERPRET, 3, True,
               _config=cfg)


@pytest.mark.parametrize("scenario,T", [("mixed", 37), ("all", 7)])
def test_loop_vs_reference(scenario, T):
    """prologue → reference block → epilogue for 7 loops (tiny_mla: max_loop_iters 4)."""
    halt_loop = run_loop(loop_prologue_triton, loop_epilogue_triton, scenario, T, 7,
                         TOL_FP32_INTERPRET)
    assert len(set(halt_loop[halt_loop >= 0].tolist())) >= 2
    assert (halt_loop < 0).any() == (scenario == "mixed")


def test_matches_torch_backend_fp16():
    """Triton and torch backends agree on the same fp16 buffers (same storage rounding)."""
    m = make_ref_loop(208, rank=4, max_loops=3, round_to=torch.float16)
    p = m.params(dtype=torch.float16)
    n = 11
    x, h, e = (torch.randn(n, 208).half() for _ in range(3))
    outs, cum = [], torch.rand(n) * 0.9
    for epi in (loop_epilogue_torch, loop_epilogue_triton):
        st = ACTState.allocate(n, 208, torch.float16, "cpu").reset(n)
        st.cum_p.copy_(cum)
        hh, nc = h.clone(), torch.empty_like(h)
        epi(x, hh, e, p, 2, st, nc)
        outs.append((hh, st.h_out, nc))
    for a, b, what in zip(*outs, ("h", "h_out", "next_combined")):
        assert_rel_close(a, b, TOL_FP16_INTERPRET, what)


def test_epilogue_config(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the GPU heuristic
    assert epilogue_config(1, 2048) == (2048, 1, 8)   # ~8 fp32 per thread per row
    assert epilogue_config(1, 3072) == (4096, 1, 16)  # (at 8 warps it spilled on sm_90)
    bd, bm, nw = epilogue_config(8192, 3072)
    assert bd == 4096 and bm * bd <= 8192 and nw <= 16


# ---- GPU: bf16 and graph capture ------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dim,n", [(2048, 1), (2048, 4099), (3072, 64)])
def test_gpu_bf16_step(dim, n):
    m = make_ref_loop(dim, rank=8, max_loops=16, round_to=torch.bfloat16)
    check_step(m, loop_epilogue_triton, n, torch.bfloat16, TOL_BF16_KERNEL, 17, True,
               device="cuda")
    h, e = (torch.randn(n, dim).bfloat16() for _ in range(2))
    with torch.no_grad():
        ref = ref_prologue(m, h.float(), e.float(), 3)
    out = loop_prologue_triton(h.cuda(), e.cuda(), m.params(torch.bfloat16, "cuda"), 3)
    assert_rel_close(out, ref, TOL_BF16_KERNEL)


@pytest.mark.gpu
def test_gpu_epilogue_graph_capture():
    """The step captures in a CUDA graph (no sync, no allocation) and replays correctly."""
    dim, n = 2048, 64
    m = make_ref_loop(dim, rank=8, max_loops=4, round_to=torch.bfloat16)
    p = m.params(torch.bfloat16, "cuda")
    x, h0, e = (torch.randn(n, dim, device="cuda").bfloat16() for _ in range(3))
    h, nc = h0.clone(), torch.empty_like(h0)
    st = ACTState.allocate(n, dim, torch.bfloat16, "cuda").reset(n)
    loop_epilogue_triton(x, h, e, p, 0, st, nc)  # compile outside capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        loop_epilogue_triton(x, h, e, p, 0, st, nc)
    outs = []
    for _ in range(2):
        h.copy_(h0)
        st.reset(n)
        g.replay()
        torch.cuda.synchronize()
        outs.append((h.clone(), st.h_out.clone(), nc.clone(), st.n_running.clone()))
    h.copy_(h0)
    st.reset(n)
    loop_epilogue_triton(x, h, e, p, 0, st, nc)
    for got in outs:
        for a, b in zip(got, (h, st.h_out, nc, st.n_running)):
            assert torch.equal(a, b)



@pytest.mark.parametrize("epilogue", [loop_epilogue_torch, loop_epilogue_triton],
                         ids=["torch", "triton"])
def test_next_combined_may_alias_block_out(epilogue):
    m = make_ref_loop(48, rank=3, max_loops=2)
    p = m.params()
    n = 19
    x, h, e = (torch.randn(n, 48) for _ in range(3))
    results = []
    for alias in (False, True):
        st = ACTState.allocate(n, 48, torch.float32, "cpu").reset(n)
        hh, xx = h.clone(), x.clone()
        nc = xx if alias else torch.empty_like(x)
        epilogue(xx, hh, e, p, 1, st, nc)
        results.append((hh, st.h_out, st.cum_p, nc))
    for a, b in zip(*results):
        assert torch.equal(a, b)
