"""CUDA kernels vs their torch references and Triton siblings (GPU only; bf16 ≤ 1e-2).

Every test needs a CUDA device and the built extension (MYTHOS_RT_BUILD_CUDA=1); the JIT
tests also need CuPy. On CPU machines they are skipped (docs/design.md "CPU and GPU").
"""

import pytest
import torch

from mythos_rt.ops.moe import moe_align_torch, moe_route_torch
from mythos_rt.ops.recurrent import loop_epilogue_torch, loop_prologue_torch
from mythos_rt.testing import TOL_BF16_KERNEL, TOL_FP32_TORCH, assert_rel_close
from tests.ops.recurrent_cases import check_step, make_ref_loop, run_loop

pytestmark = pytest.mark.gpu
DEV = "cuda"


@pytest.fixture(autouse=True)
def _needs_ext():
    pytest.importorskip("mythos_rt._C", reason="mythos_rt._C not built")


def _router_inputs(N, D, E, dtype):
    x = torch.randn(N, D, device=DEV).to(dtype)
    w = (torch.randn(E, D, device=DEV) / D ** 0.5).to(dtype)
    b = torch.randn(E, device=DEV) * 0.1
    return x, w, b


@pytest.mark.parametrize("N", [1, 3, 8, 133])
@pytest.mark.parametrize("E,k", [(64, 4), (256, 8), (512, 8), (509, 5)],
                         ids=["E64k4", "E256k8", "E512k8", "E509k5-prime"])
def test_moe_route_equals_torch(N, E, k):
    from mythos_rt.cuda.moe import moe_route_cuda
    x, w, b = _router_inputs(N, 1024, E, torch.bfloat16)
    ids, wts = moe_route_cuda(x, w, b, k)
    ids_r, wts_r = moe_route_torch(x, w, b, k)
    # selection may only differ where biased logits tie within fp32 rounding
    same = (ids == ids_r).all(dim=1)
    assert same.float().mean() >= 0.99, f"{int((~same).sum())} rows differ"
    assert_rel_close(wts[same], wts_r[same], TOL_BF16_KERNEL, "weights")


def test_moe_route_equals_triton_and_replays_in_graph():
    from mythos_rt.cuda.moe import RouteWorkspace, moe_route_cuda
    from mythos_rt.triton_kernels.moe import moe_route_triton
    x, w, b = _router_inputs(64, 2048, 256, torch.bfloat16)
    ids_t, wts_t = moe_route_triton(x, w, b, 8)
    ws = RouteWorkspace.allocate(64, 256, DEV)
    out = (torch.empty(64, 8, dtype=torch.int32, device=DEV),
           torch.empty(64, 8, dtype=torch.float32, device=DEV))
    moe_route_cuda(x, w, b, 8, out=out, workspace=ws)
    assert (out[0] == ids_t).all(dim=1).float().mean() >= 0.99
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        moe_route_cuda(x, w, b, 8, out=out, workspace=ws)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        g.replay()
        torch.cuda.synchronize()
        ids_r, wts_r = moe_route_torch(x, w, b, 8)
        same = (out[0] == ids_r).all(dim=1)
        assert same.float().mean() >= 0.99
        assert_rel_close(out[1][same], wts_r[same], TOL_BF16_KERNEL, "graph replay weights")
    assert int(ws.counters.abs().sum()) == 0, "arrival counters must be left at zero"


@pytest.mark.parametrize("bm", [16, 64, 128])
@pytest.mark.parametrize("N,E,k,S", [(1, 64, 4, 8), (37, 256, 8, 8), (8192, 64, 4, 8),
                                     (1000, 512, 8, 0), (5, 6, 6, 1)],
                         ids=["decode", "E256-prime-N", "prefill", "E512-no-shared", "k-eq-E"])
def test_moe_align_equals_torch_exactly(N, E, k, S, bm):
    from mythos_rt.cuda.moe import moe_align_cuda
    ids = torch.stack([torch.randperm(E, device=DEV)[:k] for _ in range(N)]).int()
    ref = moe_align_torch(ids, E, S, bm)
    out = moe_align_cuda(ids, E, S, bm)
    assert (out.rb_max, out.n_blocks) == (ref.rb_max, ref.n_blocks)
    for name in ("counts", "offsets", "sorted_pairs", "block_expert"):
        assert torch.equal(getattr(out, name), getattr(ref, name)), name


def test_moe_align_all_to_one_expert_and_graph_replay():
    from mythos_rt.cuda.moe import moe_align_cuda
    from mythos_rt.ops.moe import moe_align_sizes
    N, E, k, S, bm = 300, 128, 1, 2, 16
    ids = torch.full((N, k), 77, dtype=torch.int32, device=DEV)
    _, _, rows, blocks = moe_align_sizes(N, E, k, S, bm)
    i32 = dict(dtype=torch.int32, device=DEV)
    out = (torch.empty(E + S, **i32), torch.empty(E + S, **i32), torch.full((rows,), 5, **i32),
           torch.full((blocks,), 5, **i32))
    g = torch.cuda.CUDAGraph()
    moe_align_cuda(ids, E, S, bm, out=out)
    with torch.cuda.graph(g):
        moe_align_cuda(ids, E, S, bm, out=out)
    for _ in range(2):
        ids.copy_(torch.randint(0, E, (N, k), device=DEV, dtype=torch.int32))
        g.replay()
        ref = moe_align_torch(ids, E, S, bm)
        assert torch.equal(out[2], ref.sorted_pairs) and torch.equal(out[3], ref.block_expert)


def test_moe_align_feeds_triton_gemms_like_triton_alignment():
    """The Triton MoE FFN gives the same result whether its alignment or ours filled ws."""
    from mythos_rt.config import MythosConfig
    from mythos_rt.cuda.moe import moe_align_cuda
    from mythos_rt.triton_kernels import moe as tmoe
    from tests.ops.test_moe import make_moe
    cfg = MythosConfig.from_preset("small_mla")
    m = make_moe(cfg).to(DEV)
    from mythos_rt.lower import op_args
    packed = op_args("moe", m.state_dict(), cfg, dtype=torch.bfloat16, device=DEV)
    x = torch.randn(77, cfg.dim, device=DEV, dtype=torch.bfloat16)
    ws = tmoe.MoEWorkspace.allocate(77, packed)
    ref = tmoe.moe_ffn_triton(x, packed, ws).clone()
    cfgm = ws.config or tmoe.get_config(77, packed, x.dtype, x.device)
    orig = tmoe.moe_align_triton

    def ours(n_tokens, ids, hist, ws_, packed_, block_m):
        al = moe_align_cuda(ids, packed_.n_routed, packed_.n_shared_slots, block_m,
                            out=(ws_.counts, ws_.offsets, ws_.sorted_pairs, ws_.block_expert))
        return al.rb_max, al.n_blocks
    tmoe.moe_align_triton = ours
    try:
        got = tmoe._moe_ffn_impl(x, packed, ws, torch.empty_like(x), cfgm)
    finally:
        tmoe.moe_align_triton = orig
    assert torch.equal(got, ref)


DIMS = [48, 208, 2048]


@pytest.mark.parametrize("D", DIMS)
@pytest.mark.parametrize("with_next", [False, True], ids=["no-next", "next"])
@pytest.mark.parametrize("t", [0, 5], ids=["t0", "t5-clamped"])
def test_loop_epilogue_cuda_vs_reference(D, with_next, t):
    from mythos_rt.cuda.recurrent import loop_epilogue_cuda
    m = make_ref_loop(D, rank=8, max_loops=3, round_to=torch.bfloat16)
    check_step(m, loop_epilogue_cuda, 37, torch.bfloat16, TOL_BF16_KERNEL, t, with_next,
               device=DEV)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, TOL_FP32_TORCH * 10),
                                       (torch.bfloat16, TOL_BF16_KERNEL)])
def test_loop_prologue_cuda_vs_torch_and_triton(dtype, tol):
    from mythos_rt.cuda.recurrent import loop_prologue_cuda
    from mythos_rt.triton_kernels.recurrent_step import loop_prologue_triton
    m = make_ref_loop(2048)
    p = m.params(dtype=dtype, device=DEV)
    h, e = (torch.randn(129, 2048, device=DEV).to(dtype) for _ in range(2))
    ref = loop_prologue_torch(h, e, p, 7)
    assert_rel_close(loop_prologue_cuda(h, e, p, 7), ref, tol, "cuda vs torch")
    assert_rel_close(loop_prologue_cuda(h, e, p, 7), loop_prologue_triton(h, e, p, 7), tol,
                     "cuda vs triton")
    # unaligned rows (odd row stride) take the scalar path
    hb = torch.randn(129, 2049, device=DEV).to(dtype)[:, :2048]
    assert_rel_close(loop_prologue_cuda(hb, e, p, 7), loop_prologue_torch(hb, e, p, 7), tol,
                     "scalar path")


@pytest.mark.parametrize("scenario", ["mixed", "all"])
def test_loop_cuda_matches_reference_over_loops(scenario):
    from mythos_rt.cuda.recurrent import loop_epilogue_cuda, loop_prologue_cuda
    halt = run_loop(loop_prologue_cuda, loop_epilogue_cuda, scenario, 9, 6, 1e-4,
                    torch.float32, DEV)
    assert (halt >= 0).any()


def test_loop_epilogue_cuda_equals_triton_bf16_next_aliases_block_out():
    from mythos_rt.cuda.recurrent import loop_epilogue_cuda
    from mythos_rt.ops.recurrent import ACTState
    from mythos_rt.triton_kernels.recurrent_step import loop_epilogue_triton
    D, N = 2048, 513
    p = make_ref_loop(D, rank=8).params(dtype=torch.bfloat16, device=DEV)
    x, h, e = (torch.randn(N, D, device=DEV, dtype=torch.bfloat16) for _ in range(3))
    outs = []
    for fn in (loop_epilogue_cuda, loop_epilogue_triton):
        st = ACTState.allocate(N, D, torch.bfloat16, DEV).reset(N)
        xx, hh = x.clone(), h.clone()
        fn(xx, hh, e, p, 2, st, xx)       # next_combined aliases block_out
        outs.append((hh, xx, st))
    (h1, n1, s1), (h2, n2, s2) = outs
    assert_rel_close(h1, h2, TOL_BF16_KERNEL, "h")
    assert_rel_close(n1, n2, TOL_BF16_KERNEL, "next_combined")
    assert_rel_close(s1.h_out, s2.h_out, TOL_BF16_KERNEL, "h_out")
    assert int(s1.n_running) == int(s2.n_running)


def test_jit_specialized_kernels_equal_aot(tmp_path, monkeypatch):
    pytest.importorskip("cupy")
    from mythos_rt.cuda import jit
    from mythos_rt.cuda.recurrent import loop_epilogue_cuda, loop_prologue_cuda
    from mythos_rt.ops.recurrent import ACTState
    monkeypatch.setenv("MYTHOS_RT_CACHE_DIR", str(tmp_path))
    D, N = 2048, 77
    p = make_ref_loop(D, rank=8).params(dtype=torch.bfloat16, device=DEV)
    x, h, e = (torch.randn(N, D, device=DEV, dtype=torch.bfloat16) for _ in range(3))
    res = []
    for use_jit in (False, True):
        pp = jit.SpecializedLoop(p, jit.specialize_loop(p, torch.bfloat16, DEV)) if use_jit else p
        if use_jit:
            assert list((tmp_path / "nvrtc").glob("*.cubin"))
        st = ACTState.allocate(N, D, torch.bfloat16, DEV).reset(N)
        hh, nc = h.clone(), torch.empty_like(h)
        loop_epilogue_cuda(x, hh, e, pp, 1, st, nc)
        res.append((hh, nc, st.h_out.clone(), loop_prologue_cuda(hh, e, pp, 3)))
    for a, b, name in zip(res[0], res[1], ("h", "next", "h_out", "prologue")):
        assert_rel_close(b, a, 1e-6, f"jit vs aot: {name}")
    # second specialization is a disk-cache hit
    n_files = len(list((tmp_path / "nvrtc").glob("*.cubin")))
    jit.specialize_loop(p, torch.bfloat16, DEV)
    assert len(list((tmp_path / "nvrtc").glob("*.cubin"))) == n_files


def test_epilogue_graph_capture():
    from mythos_rt.cuda.recurrent import loop_epilogue_cuda
    from mythos_rt.ops.recurrent import ACTState
    D, N = 2048, 16
    p = make_ref_loop(D, rank=8).params(dtype=torch.bfloat16, device=DEV)
    x, h, e = (torch.randn(N, D, device=DEV, dtype=torch.bfloat16) for _ in range(3))
    st = ACTState.allocate(N, D, torch.bfloat16, DEV).reset(N)
    nc = torch.empty_like(h)
    loop_epilogue_cuda(x, h, e, p, 0, st, nc)
    g = torch.cuda.CUDAGraph()
    st.reset(N)
    h0 = h.clone()
    with torch.cuda.graph(g):
        loop_epilogue_cuda(x, h, e, p, 0, st, nc)
    h.copy_(h0)
    st.reset(N)
    g.replay()
    h_ref, st_ref = h0.clone(), ACTState.allocate(N, D, torch.bfloat16, DEV).reset(N)
    loop_epilogue_torch(x, h_ref, e, p, 0, st_ref)
    assert_rel_close(h, h_ref, TOL_BF16_KERNEL, "graph replay h")
