"""MLA / GQA attention sublayers (torch and Triton backends) against the reference modules.

Caches start as NaN, so reading a slot that was never written fails loudly.
"""

import pytest
import torch

from mythos_rt.config import MythosConfig
from mythos_rt.lower import op_args
from mythos_rt.ops import attention as A
from mythos_rt.ops import backends_of
from mythos_rt.reference import MLAttention, apply_rope, precompute_rope_freqs
from mythos_rt.testing import (TOL_FP16_INTERPRET, TOL_FP32_INTERPRET, TOL_FP32_TORCH,
                               assert_rel_close)

from ._attn_ref import Harness


CASES = [  # (backend, dtype, tolerance)
    pytest.param("torch", torch.float32, TOL_FP32_TORCH, id="torch-fp32"),
    pytest.param("triton", torch.float32, TOL_FP32_INTERPRET, id="triton-fp32"),
    pytest.param("triton", torch.float16, TOL_FP16_INTERPRET, id="triton-fp16"),
    pytest.param("cpu", torch.float32, TOL_FP32_TORCH, id="cpu-fp32"),
]
FP32_CASES = [c for c in CASES if c.values[1] == torch.float32]
KINDS = ["mla", "gqa"]


def test_registered():
    for op in ("mla_attention", "gqa_attention", "mla_decode", "gqa_decode", "flash_attention",
               "rope", "rope_cache_write", "mla_cache_write"):
        lean = ["cpu"] if op in ("mla_attention", "gqa_attention") else []
        assert backends_of(op) == ["torch", "triton"] + lean, op


@pytest.mark.parametrize("kind", KINDS)
def test_cache_allocators_keep_the_contract(kind):
    """Every registered KV-cache allocator gives the contract's shapes, zeroed, as two
    caches that do not overlap (whatever buffer they are views of)."""
    from mythos_rt.ops import select

    cfg = MythosConfig.from_preset(f"tiny_{kind}")
    want = A.new_caches(cfg, 3, 11, torch.float32, "cpu")
    for backend in backends_of(f"{kind}_attention"):
        alloc = select(f"{kind}_attention", "cpu", backend).caches or A.new_caches
        a, b = alloc(cfg, 3, 11, torch.float32, "cpu")
        assert (a.shape, b.shape) == (want[0].shape, want[1].shape), backend
        assert not a.any() and not b.any() and a.dtype == b.dtype == torch.float32
        a.fill_(1.0)
        assert not b.any(), f"{backend}: writing one cache changed the other"


def test_absorb_mla_weights_per_head():
    H, nope, v, R = 3, 12, 10, 24
    w = torch.randn(H * (nope + v), R)
    w_uk, w_uv = A.absorb_mla_weights(w, H, nope, v)
    assert w_uk.shape == (H, nope, R) and w_uv.shape == (H, v, R)
    c = torch.randn(5, R)
    kv = (c @ w.t()).view(5, H, nope + v)
    assert_rel_close(torch.einsum("hnr,sr->shn", w_uk, c), kv[..., :nope], TOL_FP32_TORCH)
    assert_rel_close(torch.einsum("hvr,sr->shv", w_uv, c), kv[..., nope:], TOL_FP32_TORCH)
    with pytest.raises(ValueError):
        A.absorb_mla_weights(w, H + 1, nope, v)


def test_weights_under_a_prefix():
    """The lowering's arguments of an attention module given under a prefix; MLA's
    absorbed matrices are kv_up's per-head blocks."""
    h = Harness("mla")
    sd = {"recurrent.block.attn." + k: v for k, v in h.ref.state_dict().items()}
    w = op_args("mla_attention", sd, h.cfg, "recurrent.block.attn.")
    assert (w.n_heads, w.nope, w.rope_dim, w.v_dim, w.kv_lora_rank) == (3, 12, 8, 10, 24)
    w_uk, w_uv = A.absorb_mla_weights(h.ref.kv_up.weight.detach(), 3, 12, 10)
    assert torch.equal(w.w_uk, w_uk) and torch.equal(w.w_uv, w_uv)
    g = Harness("gqa")
    sd = {"coda.1.attn." + k: v for k, v in g.ref.state_dict().items()}
    w = op_args("gqa_attention", sd, g.cfg, "coda.1.attn.")
    assert (w.n_heads, w.n_kv_heads, w.head_dim) == (4, 2, 10)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_rope_matches_reference(backend):
    from mythos_rt.ops import select
    B, T, H, d, S = 2, 5, 3, 8, 16
    cos, sin = A.rope_tables(d, S, 10000.0)
    freqs = precompute_rope_freqs(d, S, 10000.0)
    x = torch.randn(B, T, H, d)
    lens = torch.tensor([0, 9], dtype=torch.int32)
    out = select("rope", "cpu", backend).fn(x, cos, sin, lens)
    for b in range(B):
        s = int(lens[b])
        assert_rel_close(out[b:b + 1], apply_rope(x[b:b + 1], freqs[s:s + T]), TOL_FP32_TORCH)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend,dtype,tol", CASES)
def test_prefill_then_decode_matches_reference(kind, backend, dtype, tol):
    h = Harness(kind, backend, dtype)
    B, T = 2, 7
    ref_cache = {}
    x = h.x(B, T)
    assert_rel_close(h.ours(x, [0, 0]), h.reference(x, 0, ref_cache), tol, "prefill")
    for step in range(3):
        x = h.x(B, 1)
        assert_rel_close(h.ours(x, [T + step] * B), h.reference(x, T + step, ref_cache), tol,
                         f"decode step {step}")
    if kind == "mla" and dtype == torch.float32:
        # The compact cache: normed latent + one roped key per token (== any head's copy).
        entry = ref_cache["layer"]
        ckv, kpe = h.caches
        assert_rel_close(ckv[:B, :T + 3], h.ref.kv_norm(entry["c_kv"]), TOL_FP32_TORCH, "ckv")
        assert_rel_close(kpe[:B, :T + 3], entry["k_rope"][:, :, 0], TOL_FP32_TORCH, "kpe")
    if kind == "gqa" and dtype == torch.float32:
        entry = ref_cache["layer"]
        assert_rel_close(h.caches[0][:B, :T + 3], entry["k"], TOL_FP32_TORCH, "k_cache")
        assert_rel_close(h.caches[1][:B, :T + 3], entry["v"], TOL_FP32_TORCH, "v_cache")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend,dtype,tol", FP32_CASES)
def test_ragged_batch_equals_rows_alone(kind, backend, dtype, tol):
    """Rows with different cache_lens (padded prefill, then a chunk, then decodes) give
    what each row gives alone."""
    torch.manual_seed(1)
    h = Harness(kind, backend, dtype)
    lens, T0 = [5, 9], 9
    xs = [h.x(2, T0), h.x(2, 3), h.x(2, 1), h.x(2, 1)]
    batched = []
    cur = [0, 0]
    for i, x in enumerate(xs):
        batched.append(h.ours(x, cur))
        cur = [c + (lens[r] if i == 0 else x.shape[1]) for r, c in enumerate(cur)]
    for r in range(2):
        alone = Harness(kind, backend, dtype, b_max=1)
        alone.ref, alone.w = h.ref, h.w
        c = 0
        for i, x in enumerate(xs):
            xr = x[r:r + 1, :lens[r]] if i == 0 else x[r:r + 1]
            o = alone.ours(xr, [c])
            assert_rel_close(batched[i][r:r + 1, :xr.shape[1]], o, tol, f"row {r} call {i}")
            c += xr.shape[1]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend,dtype,tol", FP32_CASES)
def test_chunked_prefill_equals_one_shot(kind, backend, dtype, tol):
    h1 = Harness(kind, backend, dtype)
    h2 = Harness(kind, backend, dtype)
    h2.ref, h2.w = h1.ref, h1.w
    x = h1.x(2, 9)
    one = h1.ours(x, [0, 0])
    parts, c = [], 0
    for n in (5, 3, 1):
        parts.append(h2.ours(x[:, c:c + n], [c, c]))
        c += n
    assert_rel_close(torch.cat(parts, 1), one, tol, "chunked vs one-shot")
    for a, b in zip(h1.caches, h2.caches):
        assert_rel_close(b[:2, :9], a[:2, :9], tol, "cache")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", ["torch", "triton", "cpu"])
def test_cache_write_stops_at_s_max(kind, backend):
    """A chunk running past S_max writes nothing out of bounds; in-range tokens are right."""
    S_max = 12
    h = Harness(kind, backend, torch.float32, b_max=3, s_max=S_max)
    sentinel = [c[2].clone() for c in h.caches]  # row 2 is never used
    ref_cache = {}
    x = h.x(2, 10)
    h.ours(x, [0, 0])
    h.reference(x, 0, ref_cache)
    x = h.x(2, 4)  # positions 10..13: 12, 13 are past S_max
    out = h.ours(x, [10, 10])
    ref = h.reference(x[:, :2], 10, ref_cache)
    assert_rel_close(out[:, :2], ref, TOL_FP32_INTERPRET)
    for c, s in zip(h.caches, sentinel):
        assert torch.isnan(c[2]).all() and torch.isnan(s).all()
        assert torch.isfinite(c[:2]).all()


def test_mla_decode_is_absorbed():
    """The decode path never builds per-head K/V: kv_up is not touched at T == 1."""
    h = Harness("mla")
    x = h.x(1, 4)
    h.ours(x, [0])
    h.w.kv_up = torch.full_like(h.w.kv_up, float("nan"))
    out = h.ours(h.x(1, 1), [4])
    assert torch.isfinite(out).all()


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
def test_bf16_gpu_long(kind):
    cfg = MythosConfig.from_preset("mythos_1b")
    cfg.attn_type = kind
    dev = "cuda"
    torch.manual_seed(0)
    B, S_max, T = 2, 4096, 1000
    if kind == "mla":
        mod = MLAttention(cfg).to(dev)
    else:
        from mythos_rt.reference import GQAttention
        mod = GQAttention(cfg).to(dev)
    with torch.no_grad():
        for name, p in mod.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.3)
    rope_dim = cfg.qk_rope_head_dim if kind == "mla" else cfg.head_dim
    cos, sin = A.rope_tables(rope_dim, S_max, cfg.rope_theta, dev)
    freqs = precompute_rope_freqs(rope_dim, S_max, cfg.rope_theta).to(dev)
    from mythos_rt.ops import select
    from mythos_rt.reference import causal_mask
    if kind == "mla":
        w = op_args("mla_attention", mod.state_dict(), cfg, dtype=torch.bfloat16)
        scale = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
    else:
        w = op_args("gqa_attention", mod.state_dict(), cfg, dtype=torch.bfloat16)
        scale = cfg.head_dim ** -0.5
    caches = A.new_caches(cfg, B, S_max, torch.bfloat16, dev)
    fn = select(f"{kind}_attention", dev, "triton").fn
    ref_cache = {}
    x = torch.randn(B, T, cfg.dim, device=dev)
    with torch.no_grad():
        ref = mod(x, freqs[:T], causal_mask(T, T, dev), ref_cache, "l")
    out = fn(x.bfloat16(), w, *caches, torch.zeros(B, dtype=torch.int32, device=dev), cos, sin,
             scale)
    assert_rel_close(out, ref, 1e-2, "bf16 prefill")
    for step in range(3):
        x = torch.randn(B, 1, cfg.dim, device=dev)
        with torch.no_grad():
            ref = mod(x, freqs[T + step:T + step + 1], None, ref_cache, "l")
        lens = torch.full((B,), T + step, dtype=torch.int32, device=dev)
        assert_rel_close(fn(x.bfloat16(), w, *caches, lens, cos, sin, scale), ref, 1e-2,
                         "bf16 decode")
