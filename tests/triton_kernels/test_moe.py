"""Triton MoE (router, alignment, grouped GEMMs, combine) vs the reference MoEFFN.

CPU: Triton interpreter, fp32 (≤ TOL_FP32_INTERPRET) and fp16 (≤ TOL_FP16_INTERPRET) at
tiny shapes (N ≤ 40, D ≤ 64, E ≤ 8). GPU: bf16 at larger shapes, CUDA-graph capture,
the autotune cache.
"""

import dataclasses
import json
import os

import pytest
import torch
import torch.nn.functional as F

import mythos_rt.triton_kernels  # noqa: F401 — turns on the interpreter on CPU
from mythos_rt.lower import op_args
from mythos_rt.ops.moe import moe_ffn_torch
from mythos_rt.reference import route
from mythos_rt.testing import (TOL_BF16_KERNEL, TOL_FP16_INTERPRET, TOL_FP32_INTERPRET,
                               assert_rel_close)
from mythos_rt.triton_kernels import moe as tmoe
from mythos_rt.triton_kernels import moe_config as mc
from mythos_rt.triton_kernels.moe import (MoEConfig, MoEWorkspace, moe_ffn_triton,
                                          moe_route_triton)
from tests.ops.test_moe import make_moe, moe_cfg, ref_forward


DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: TOL_FP32_INTERPRET, torch.float16: TOL_FP16_INTERPRET}


def build(cfg_kw, N, dtype, bias=None):
    """Reference module (fp32, weights rounded through ``dtype``), packed weights, x."""
    cfg = moe_cfg(**cfg_kw)
    m = make_moe(cfg)
    if bias is not None:
        with torch.no_grad():
            m.router_bias.copy_(bias)
    m = m.to(dtype).float()                      # the kernel's weights, exactly, in fp32
    x = torch.randn(N, cfg.dim).to(dtype)
    packed = op_args("moe", m.state_dict(), cfg, dtype=dtype, device=DEV)
    return cfg, m, packed, x


def one_hot_bias(E, hot, big=50.0):
    b = torch.randn(E) * 0.1
    b[list(hot)] += big
    return b


# name -> (moe_cfg kwargs, N, router bias factory or None)
CASES = {
    "basic": (dict(), 16, None),
    "one-token": (dict(), 1, None),
    "prime-13": (dict(D=48, I=16, E=6, k=3, S=2), 13, None),
    "prime-37": (dict(), 37, None),
    "D40-I24-not-multiple-of-block": (dict(D=40, I=24, E=5, k=2, S=1), 11, None),
    "no-shared": (dict(S=0), 17, None),
    "topk-eq-n-experts": (dict(E=4, k=4, S=1), 9, None),
    "all-tokens-one-expert": (dict(E=8, k=1, S=1), 23, lambda: one_hot_bias(8, [5])),
    "empty-experts": (dict(E=8, k=2, S=1), 29, lambda: one_hot_bias(8, [1, 6])),
}


# every case in fp32; a representative subset in fp16 (keeps the interpreter suite fast)
FP16_CASES = ("basic", "prime-13", "empty-experts", "D40-I24-not-multiple-of-block")
PARAMS = ([pytest.param(c, torch.float32, id=f"{c}-fp32") for c in CASES]
          + [pytest.param(c, torch.float16, id=f"{c}-fp16") for c in FP16_CASES])


@pytest.mark.parametrize("case,dtype", PARAMS)
def test_moe_ffn_triton_matches_reference(case, dtype):
    cfg_kw, N, bias = CASES[case]
    cfg, m, packed, x = build(cfg_kw, N, dtype, bias() if bias else None)
    ws = MoEWorkspace.allocate(40, packed)
    out = moe_ffn_triton(x.to(DEV), packed, ws)
    assert out.shape == (N, cfg.dim) and out.dtype == dtype
    ref = ref_forward(m, x.float())
    assert_rel_close(out.float().cpu(), ref, TOL[dtype], f"{case}/{dtype}")


@pytest.mark.parametrize("k,E,bias", [(2, 8, None), (4, 4, None), (1, 8, "one-expert")],
                         ids=["k2-E8", "topk-eq-n-experts", "all-tokens-one-expert"])
def test_router_selection_equals_reference(k, E, bias):
    D, N = 40, 37
    x = torch.randn(N, D)
    w = torch.randn(E, D) / D ** 0.5
    b = one_hot_bias(E, [3]) if bias else torch.randn(E)
    ids, wts = moe_route_triton(x.to(DEV), w.to(DEV), b.to(DEV), k)
    ref_ids, ref_w = route(F.linear(x, w), b, k)
    assert ids.dtype == torch.int32 and wts.dtype == torch.float32
    assert torch.equal(ids.cpu().long(), ref_ids)
    assert_rel_close(wts.cpu(), ref_w, TOL_FP32_INTERPRET, "routing weights")


def test_router_out_buffers():
    x, w, b = torch.randn(5, 32), torch.randn(6, 32), torch.randn(6)
    ids_buf = torch.full((9, 2), -7, dtype=torch.int32)
    w_buf = torch.zeros(9, 2)
    ids, wts = moe_route_triton(x, w, b, 2, out=(ids_buf, w_buf))
    assert ids.data_ptr() == ids_buf.data_ptr() and (ids_buf[5:] == -7).all()
    ref_ids, _ = route(F.linear(x, w), b, 2)
    assert torch.equal(ids.long(), ref_ids)


def _check_alignment(ws, packed, N, bm, ids, held=None):
    """``held``: the (token, slot) pairs of ``ids`` whose experts the workspace's MoE
    holds (an expert shard's; default all), ``ids`` numbered as its weights are."""
    E, k, S = packed.n_local, packed.top_k, packed.n_shared_slots
    slots = k + S
    counts, offsets = ws.counts.cpu().tolist(), ws.offsets.cpu().tolist()
    sp, be = ws.sorted_pairs.cpu(), ws.block_expert.cpu()
    ids = ids.cpu()
    held = torch.ones_like(ids, dtype=torch.bool) if held is None else held.cpu()
    rb_max = -(-N * k // bm) + min(E, N * k)
    n_blocks = rb_max + S * -(-N // bm)
    want_counts = torch.bincount(ids[held].long(), minlength=E).tolist() + [N] * S
    assert counts == want_counts
    live_rows = set()
    for e in range(E + S):
        start, cnt = offsets[e], counts[e]
        assert start % bm == 0
        padded = -(-cnt // bm) * bm
        if e < E:      # routed: contiguous, in expert order
            assert start == sum(-(-c // bm) * bm for c in counts[:e])
        else:          # shared slots: static segments after the routed region
            assert start == rb_max * bm + (e - E) * -(-N // bm) * bm
        seg = sp[start:start + cnt].tolist()
        if e < E:
            tok, slot = (ids == e).nonzero(as_tuple=True)
            want = sorted((tok * slots + slot).tolist())
        else:
            want = [t * slots + k + (e - E) for t in range(N)]
        assert seg == want, f"expert {e}: segment {seg} != {want}"   # sorted, stable
        assert (sp[start + cnt:start + padded] == -1).all(), f"expert {e} padding"
        for b in range(start // bm, (start + padded) // bm):
            assert be[b].item() == e, f"block {b} -> {be[b].item()}, expected {e}"
            live_rows.add(b)
    for b in range(n_blocks):
        if b not in live_rows:
            assert be[b].item() == -1, f"dead block {b} -> {be[b].item()}"
    assert sum(-(-c // bm) for c in counts[:E]) <= rb_max
    # every (token, slot) pair appears exactly once
    live = sp[[r for b in sorted(live_rows) for r in range(b * bm, (b + 1) * bm)]]
    live = live[live >= 0]
    tok, slot = held.nonzero(as_tuple=True)
    want = (tok * slots + slot).tolist() + [t * slots + k + s for t in range(N) for s in range(S)]
    assert sorted(live.tolist()) == sorted(want)


@pytest.mark.parametrize("bm", [16, 32], ids=["bm16", "bm32"])
@pytest.mark.parametrize("N,bias", [(1, None), (13, None), (37, "two-experts")],
                         ids=["one-token", "prime-13", "prime-37-empty-experts"])
def test_alignment_invariants(N, bias, bm):
    E, k = 8, 2
    cfg_kw = dict(D=32, I=16, E=E, k=k, S=1)
    _, _, packed, x = build(cfg_kw, N, torch.float32,
                            one_hot_bias(E, [2, 7]) if bias else None)
    ws = MoEWorkspace.allocate(40, packed)
    # stale garbage must not matter
    for t in (ws.sorted_pairs, ws.block_expert, ws.counts, ws.offsets, ws.hist, ws.base):
        t.fill_(12345)
    ids, wts = ws.ids[:N], ws.weights[:N]
    tmoe._launch_router(x.to(DEV), packed.router_w, packed.router_bias, k, ids, wts, ws.hist,
                        write_hist=True)
    tmoe.moe_align_triton(N, ids, ws.hist, ws, packed, bm)
    _check_alignment(ws, packed, N, bm, ids)


def test_bitwise_deterministic_and_stale_workspace():
    _, m, packed, x = build(dict(D=48, I=16, E=6, k=3, S=2), 29, torch.float32)
    ws = MoEWorkspace.allocate(40, packed)
    a = moe_ffn_triton(x.to(DEV), packed, ws).clone()
    for t in (ws.h, ws.y_routed, ws.y_shared, ws.sorted_pairs, ws.block_expert, ws.out):
        t.fill_(7)
    b = moe_ffn_triton(x.to(DEV), packed, ws).clone()
    c = moe_ffn_triton(x.to(DEV), packed, MoEWorkspace.allocate(29, packed))
    assert torch.equal(a, b) and torch.equal(a, c)


def test_workspace_reuse_smaller_batch_and_out_buffer():
    _, m, packed, x = build(dict(), 37, torch.float32)
    ws = MoEWorkspace.allocate(37, packed)
    moe_ffn_triton(x.to(DEV), packed, ws)
    out = torch.empty(5, 64, device=DEV)
    res = moe_ffn_triton(x[:5].to(DEV), packed, ws, out=out)
    assert res is out
    assert_rel_close(out.cpu(), ref_forward(m, x[:5].float()), TOL_FP32_INTERPRET)
    with pytest.raises(ValueError, match="max_tokens"):
        moe_ffn_triton(torch.randn(38, 64, device=DEV), packed, ws)


@pytest.mark.parametrize("cfg", [
    MoEConfig(block_m=32, block_n1=16, block_k1=16, block_n2=16, block_k2=16,
              block_m_shared=32, split_shared=1, num_stages=1),
    MoEConfig(block_m=16, block_n1=32, block_k1=64, block_n2=64, block_k2=16,
              block_m_shared=16, split_shared=3, num_stages=1),
], ids=["bm32-split1", "bm16-split3-uneven"])
def test_pinned_configs(cfg):
    # S = 2 shared * k 3 = 6 slots: split 3 -> 2 slots per program (K-concatenated)
    _, m, packed, x = build(dict(D=40, I=24, E=6, k=3, S=2), 19, torch.float32)
    ws = MoEWorkspace.allocate(19, packed, config=cfg)
    out = moe_ffn_triton(x.to(DEV), packed, ws)
    assert_rel_close(out.cpu(), ref_forward(m, x.float()), TOL_FP32_INTERPRET)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_a_skipped_call_reads_no_expert_weight(backend):
    """``skip`` set: zeros, even with NaN expert weights (none is read); ``skip`` clear:
    bitwise the call without it."""
    _, m, packed, x = build(dict(D=48, I=16, E=6, k=3, S=2), 11, torch.float32)
    x = x.to(DEV)
    ws = MoEWorkspace.allocate(11, packed)
    run = ((lambda p, **kw: moe_ffn_triton(x, p, ws, **kw)) if backend == "triton"
           else (lambda p, **kw: moe_ffn_torch(x, p, **kw)))
    flag = torch.zeros(1, dtype=torch.int32, device=DEV)
    assert torch.equal(run(packed, skip=flag).clone(), run(packed).clone())
    nan = dataclasses.replace(packed, w13=torch.full_like(packed.w13, float("nan")),
                              w2=torch.full_like(packed.w2, float("nan")))
    ws.h.fill_(7)
    ws.y_routed.fill_(7)
    out = torch.full_like(x, float("nan"))
    res = run(nan, skip=flag.fill_(1), out=out)
    assert res is out and torch.equal(out, torch.zeros_like(x))
    if backend == "triton":  # the expert GEMMs wrote nothing
        assert bool((ws.h == 7).all()) and bool((ws.y_routed == 7).all())
        with pytest.raises(ValueError, match="skip must be"):
            run(packed, skip=torch.ones(1))


def test_triton_matches_torch_backend_fp32():
    cfg, m, packed, x = build(dict(), 21, torch.float32)
    assert_rel_close(moe_ffn_triton(x.to(DEV), packed).cpu(),
                     moe_ffn_torch(x, op_args("moe", m.state_dict(), cfg)), TOL_FP32_INTERPRET)


def test_config_cache_roundtrip(tmp_path, monkeypatch):
    monkeypatch.setenv("MYTHOS_RT_CACHE_DIR", str(tmp_path))
    path = tmoe.cache_path()
    assert path == str(tmp_path / "autotune" / "moe.json")
    _, _, packed, _ = build(dict(), 1, torch.float32)
    key = tmoe.config_key(100, packed, torch.bfloat16, "cpu")
    assert "|n128|D64|I32|E8|k2|S2|bfloat16" in key
    cfg = MoEConfig(block_m=64, num_warps=8)
    mc.save_cache(path, {key: dict(cfg.to_dict(), _ms=0.5)})
    mc._CACHE.clear()
    entry = json.load(open(path))[key]
    assert entry["_ms"] == 0.5 and mc.config_from(entry) == cfg
    assert mc.config_from(dict(cfg.to_dict(), block_m=48)) is None
    # the interpreter never tunes and never reads the cache
    assert tmoe.get_config(100, packed, torch.float32, "cpu") == tmoe.INTERPRETER_CONFIG
    assert tmoe.autotune_moe(packed, (3,)) == {4: tmoe.INTERPRETER_CONFIG}
    assert tmoe.heuristic_config(8192, 2048, 2048, 64, 4, 8, torch.bfloat16).block_m == 128
    assert tmoe.heuristic_config(1, 2048, 2048, 64, 4, 8, torch.bfloat16).block_m == 16


# ---------------------------------------------------------------------------------------
# GPU (bf16, larger shapes, graph capture, autotune cache)
# ---------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("N", [1, 7, 128, 1031])
def test_moe_ffn_triton_bf16_gpu(N):
    _, m, packed, x = build(dict(D=1024, I=512, E=32, k=4, S=2), N, torch.bfloat16)
    ws = MoEWorkspace.allocate(2048, packed)
    out = moe_ffn_triton(x.cuda(), packed, ws).clone()   # ws.out is reused by each call
    ref = ref_forward(m.cuda(), x.float().cuda())
    assert_rel_close(out.float(), ref, TOL_BF16_KERNEL, f"bf16 N={N}")
    assert torch.equal(out, moe_ffn_triton(x.cuda(), packed, ws))


@pytest.mark.gpu
def test_moe_ffn_triton_cuda_graph_capture():
    _, m, packed, x = build(dict(D=512, I=256, E=16, k=4, S=2), 4, torch.bfloat16)
    ws = MoEWorkspace.allocate(4, packed)
    xs, out = x.cuda().clone(), torch.empty(4, 512, device="cuda", dtype=torch.bfloat16)
    moe_ffn_triton(xs, packed, ws, out=out)      # compile outside capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        moe_ffn_triton(xs, packed, ws, out=out)
    for _ in range(3):
        xn = torch.randn(4, 512).to(torch.bfloat16)
        xs.copy_(xn.cuda())
        g.replay()
        torch.cuda.synchronize()
        assert_rel_close(out.float(), ref_forward(m.cuda(), xn.float().cuda()),
                         TOL_BF16_KERNEL, "graph replay")


@pytest.mark.gpu
def test_autotune_cache_second_compile_does_not_retune(tmp_path, monkeypatch):
    monkeypatch.setenv("MYTHOS_RT_CACHE_DIR", str(tmp_path))
    mc._CACHE.clear()
    _, _, packed, _ = build(dict(D=256, I=128, E=8, k=2, S=1), 1, torch.bfloat16)
    cands = [tmoe.heuristic_config(16, 256, 128, 8, 2, 2, torch.bfloat16),
             dataclasses.replace(tmoe.heuristic_config(16, 256, 128, 8, 2, 2, torch.bfloat16),
                                 block_n1=32)]
    first = tmoe.autotune_moe(packed, (16,), candidates=cands)
    calls = []
    monkeypatch.setattr(tmoe, "_moe_ffn_impl", lambda *a: calls.append(a))
    mc._CACHE.clear()
    second = tmoe.autotune_moe(packed, (16,), candidates=cands)
    assert first == second and not calls
    assert tmoe.get_config(16, packed, torch.bfloat16, "cuda") == first[16]


@pytest.mark.parametrize("n", [1, 16, 128, 1024, 8192])
def test_gpu_configs_fit_shared_memory(n):
    """Heuristic and autotune candidates stay inside an H100's shared memory."""
    _, _, packed, _ = build(dict(), 1, torch.float32)
    big = dataclasses.replace(packed, n_routed=64, top_k=4, n_shared_slots=8,
                              expert_dim=2048)
    for dtype, elt in ((torch.bfloat16, 2), (torch.float32, 4)):
        cfg = tmoe.heuristic_config(n, 2048, 2048, 64, 4, 8, dtype)
        assert mc.smem_bytes(cfg, elt) <= mc._SMEM_BUDGET, (n, dtype, cfg)
        cands = mc.candidates(n, big, dtype)
        assert cands and all(mc.smem_bytes(c, elt) <= mc._SMEM_BUDGET for c in cands)
