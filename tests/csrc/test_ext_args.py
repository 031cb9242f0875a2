"""Host-side argument checking of mythos_rt._C (runs without a GPU: checks precede launches).

Pointers are fake addresses: every call here fails its checks (or has zero rows) before
any CUDA call, which is what lets this run on CPU machines.
"""

import pytest

from mythos_rt.ops.moe import moe_align_sizes

BF16, FP32 = 2, 0
P = 0x10000   # a fake, well-aligned device address


def align_kw(**kw):
    d = dict(ids=P, ids_numel=26, n_tokens=13, top_k=2, n_experts=8, n_shared=1, block_m=16,
             counts=P, counts_numel=9, offsets=P, offsets_numel=9, sorted_pairs=P,
             sorted_numel=10_000, block_expert=P, block_expert_numel=100, stream=0)
    d.update(kw)
    return d


def test_constants(ext):
    assert (ext.DTYPE_FLOAT32, ext.DTYPE_FLOAT16, ext.DTYPE_BFLOAT16) == (0, 1, 2)
    assert ext.ROUTE_MAX_EXPERTS >= 512 and ext.ROUTE_MAX_TOP_K >= 8
    for name in ("moe_align", "moe_align_sizes", "moe_route", "loop_prologue", "loop_epilogue"):
        assert getattr(ext, name).__doc__.strip(), name


@pytest.mark.parametrize("N,E,k,S,bm", [(1, 8, 2, 1, 16), (13, 6, 3, 2, 32), (0, 4, 1, 0, 16),
                                        (8192, 256, 8, 8, 128)])
def test_moe_align_sizes_match_torch(ext, N, E, k, S, bm):
    assert tuple(ext.moe_align_sizes(N, E, k, S, bm)[i] for i in (0, 2, 3)) == \
        tuple(moe_align_sizes(N, E, k, S, bm)[i] for i in (0, 2, 3))


@pytest.mark.parametrize("kw,msg", [
    (dict(sorted_numel=10), "sorted_pairs holds 10 elements"),
    (dict(block_expert_numel=3), "block_expert holds 3"),
    (dict(counts_numel=8), "counts holds 8 elements, needs E \\+ S = 9"),
    (dict(ids_numel=25), "ids holds 25"),
    (dict(ids=0), "ids is a null pointer"),
    (dict(offsets=P + 2), "offsets .* not aligned"),
    (dict(block_m=24), "block_m=24 must be a power of two"),
    (dict(top_k=9), "top_k=9 outside \\[1, 8\\]"),
    (dict(n_tokens=-1), "n_tokens=-1"),
], ids=["short-sorted", "short-block-expert", "short-counts", "short-ids", "null-ids",
        "misaligned-offsets", "block_m-not-pow2", "topk-gt-E", "negative-N"])
def test_moe_align_rejects(ext, kw, msg):
    with pytest.raises(ValueError, match=f"mythos_rt._C.moe_align: {msg}"):
        ext.moe_align(**align_kw(**kw))


def test_moe_align_zero_tokens_launches_nothing(ext):
    assert ext.moe_align(**align_kw(n_tokens=0, ids=0)) == (0, 0)


def route_kw(**kw):
    d = dict(x=P, n_tokens=5, dim=64, stride_x=64, w=P, n_experts=256, bias=P, top_k=8,
             dtype=BF16, ids=P, weights=P, out_rows=5, logits=P, logits_numel=5 * 256,
             counters=P, counters_numel=5, stream=0)
    d.update(kw)
    return d


@pytest.mark.parametrize("kw,msg", [
    (dict(dtype=7), "unsupported dtype code 7"),
    (dict(n_experts=2048), "n_experts=2048 outside \\[1, 1024\\]"),
    (dict(top_k=33), "top_k=33 outside"),
    (dict(stride_x=32), "x row stride 32 < dim 64"),
    (dict(out_rows=4), "ids/weights hold 4 rows, need 5"),
    (dict(logits_numel=100), "logits scratch holds 100"),
    (dict(counters_numel=1), "counters hold 1"),
    (dict(w=0), "router_w is a null pointer"),
    (dict(x=P + 1), "x .* not aligned to its element size 2"),
], ids=["bad-dtype", "too-many-experts", "topk-too-big", "short-stride", "short-out",
        "short-logits", "short-counters", "null-w", "misaligned-x"])
def test_moe_route_rejects(ext, kw, msg):
    with pytest.raises(ValueError, match=f"mythos_rt._C.moe_route: {msg}"):
        ext.moe_route(**route_kw(**kw))


def prologue_kw(**kw):
    d = dict(h=P, e=P, norm_w=P, out=P, n_rows=3, dim=48, stride_h=48, stride_e=48,
             stride_out=48, t=0, loop_dim=6, eps=1e-6, dtype=FP32, stream=0)
    d.update(kw)
    return d


@pytest.mark.parametrize("kw,msg", [
    (dict(loop_dim=5), "loop_dim=5 must be even"),
    (dict(loop_dim=50), "loop_dim=50 must be even, >= 2 and <= dim=48"),
    (dict(stride_e=47), "e row stride 47 < dim 48"),
    (dict(out=0), "out is a null pointer"),
    (dict(dtype=-1), "unsupported dtype code -1"),
    (dict(h=P + 2), "h .* not aligned to its element size 4"),
], ids=["odd-loop-dim", "loop-dim-gt-D", "short-stride", "null-out", "bad-dtype", "misaligned"])
def test_loop_prologue_rejects(ext, kw, msg):
    with pytest.raises(ValueError, match=f"mythos_rt._C.loop_prologue: {msg}"):
        ext.loop_prologue(**prologue_kw(**kw))


def epilogue_kw(**kw):
    names = ("block_out", "h", "e", "h_out", "cum_p", "halted", "n_running", "next", "norm_w",
             "lora_down", "lora_B", "lora_scale", "A", "inj_B", "halt_w", "halt_b")
    d = {n: P for n in names}
    d.update(n_rows=7, n_max=9, dim=48, rank=4, max_loops=3, stride_x=48, stride_h=48,
             stride_e=48, stride_out=48, stride_next=48, t=5, loop_dim=6, threshold=0.99,
             eps=1e-6, dtype=BF16, stream=0)
    d.update(kw)
    return d


@pytest.mark.parametrize("kw,msg", [
    (dict(n_max=6), "ACT state holds 6 rows, the step needs 7"),
    (dict(rank=0), "rank=0 outside"),
    (dict(max_loops=0), "max_loops=0 outside"),
    (dict(lora_B=0), "lora_B is a null pointer"),
    (dict(A=P + 2), "A .* not aligned to its element size 4"),
    (dict(halted=0), "halted is a null pointer"),
    (dict(stride_next=40), "next_combined row stride 40 < dim 48"),
    (dict(dtype=3), "unsupported dtype code 3"),
    (dict(t=-1), "t=-1 outside"),
], ids=["state-too-small", "rank0", "max-loops0", "null-lora_B", "misaligned-A",
        "null-halted", "short-next-stride", "bad-dtype", "negative-t"])
def test_loop_epilogue_rejects(ext, kw, msg):
    with pytest.raises(ValueError, match=f"mythos_rt._C.loop_epilogue: {msg}"):
        ext.loop_epilogue(**epilogue_kw(**kw))


def test_zero_rows_launch_nothing(ext):
    ext.loop_epilogue(**epilogue_kw(n_rows=0, h=0, next=0))
    ext.loop_prologue(**prologue_kw(n_rows=0, h=0))
    ext.moe_route(**route_kw(n_tokens=0, x=0, logits_numel=0, counters_numel=0))


def test_next_may_be_null_but_others_not(ext):
    # next=0 passes the pointer checks; a null h then fails (checked before any launch)
    with pytest.raises(ValueError, match="h is a null pointer"):
        ext.loop_epilogue(**epilogue_kw(next=0, h=0))
