"""MLA prefill on the Triton backend: the latent path (attention over the compact cache,
kv_up absorbed) and the expanded path vs the torch implementations and the reference
module, with a cache already holding a prefix, and the per-shape choice between them."""

import pytest
import torch

from mythos_rt.config import MythosConfig
from mythos_rt.ops import attention as A
from mythos_rt.testing import TOL_FP16_INTERPRET, TOL_FP32_INTERPRET, assert_rel_close
from mythos_rt.triton_kernels import attention as TA
from mythos_rt.triton_kernels.flash_attention import _launch

from ..ops._attn_ref import Harness

DTYPES = [pytest.param(torch.float32, TOL_FP32_INTERPRET, id="fp32"),
          pytest.param(torch.float16, TOL_FP16_INTERPRET, id="fp16")]


def _cfg(rank: int) -> MythosConfig:
    # H=3, nope 12, rope 8, v 10: nothing a power of two but rope.
    return MythosConfig(dim=32, n_heads=3, attn_type="mla", kv_lora_rank=rank, q_lora_rank=20,
                        qk_rope_head_dim=8, qk_nope_head_dim=12, v_head_dim=10,
                        rope_theta=10000.0)


def _force(monkeypatch, path: str) -> None:
    monkeypatch.setattr(TA, "latent_prefill_wins", lambda *shape: path == "latent")


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("T", [1, 3, 37])
def test_latent_kernel_over_a_cached_prefix(T, num_splits):
    """One flash launch over [ckv | kpe] as a single shared KV head, V aliasing the latent:
    rows at offsets 29 and 6 (no multiple of a key tile), slots past them hold NaN."""
    B, H, R, P, S_max = 2, 3, 48, 8, 80
    q_start = torch.tensor([29, 6], dtype=torch.int32)
    kv_len = q_start + T
    ckv = torch.full((B + 1, S_max, R), float("nan"))
    kpe = torch.full((B + 1, S_max, P), float("nan"))
    for b in range(B):
        ckv[b, :kv_len[b]] = torch.randn(int(kv_len[b]), R)
        kpe[b, :kv_len[b]] = torch.randn(int(kv_len[b]), P)
    q_lat, q_pe = torch.randn(B, T, H, R), torch.randn(B, T, H, P)
    S = int(kv_len.max())
    latent = ckv[:B, :S].unsqueeze(2)
    out = torch.empty(B, T, H, R)
    _launch(q_lat, q_pe, latent, kpe[:B, :S].unsqueeze(2), latent, out, q_start, kv_len,
            0.3, True, num_splits)
    keys = torch.cat([ckv, kpe], -1)[:B, :S].unsqueeze(2)
    ref = A.flash_attention(torch.cat([q_lat, q_pe], -1), keys, latent, q_start, kv_len, 0.3)
    assert_rel_close(out, ref, TOL_FP32_INTERPRET)


@pytest.mark.parametrize("path", ["latent", "expanded"])
@pytest.mark.parametrize("T", [1, 3, 37])
@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_prefill_paths_match_torch(path, T, dtype, tol):
    """``mla_prefill`` (both paths) vs the torch implementation, R = 48, a 29-token prefix."""
    h = Harness("mla", "triton", dtype, b_max=2, s_max=72, cfg=_cfg(48))
    ckv, kpe = (c.normal_() for c in h.caches)
    w, H = h.w, h.cfg.n_heads
    q_nope = torch.randn(2, T, H, w.nope).to(dtype)
    q_pe = torch.randn(2, T, H, w.rope_dim).to(dtype)
    lens = torch.tensor([29, 29], dtype=torch.int32)
    got = TA.mla_prefill(q_nope, q_pe, ckv, kpe, lens, w, h.scale, latent=path == "latent")
    f32 = {k: getattr(w, k).float() for k in ("kv_up", "w_uk", "w_uv")}
    wf = A.MLAWeights(**{**w.__dict__, **f32})
    ref = A.mla_prefill(q_nope.float(), q_pe.float(), ckv.float(), kpe.float(), lens, wf,
                        h.scale)
    assert got.shape == (2, T, H, w.v_dim)
    assert_rel_close(got, ref, tol)


F32, F16 = (p.values for p in DTYPES)


@pytest.mark.parametrize("path,rank,dtype,tol", [
    ("latent", 48, *F32), ("expanded", 48, *F32), ("chosen", 64, *F32),
    ("latent", 64, *F16), ("expanded", 48, *F16)])
def test_chunked_prefill_matches_reference(monkeypatch, path, rank, dtype, tol):
    """The sublayer in chunks of 5, 37 and 3 tokens (each over what the last ones cached)
    vs the reference MLAttention with its dict cache."""
    if path != "chosen":
        _force(monkeypatch, path)
    h = Harness("mla", "triton", dtype, b_max=2, s_max=48, cfg=_cfg(rank))
    ref_cache, start = {}, 0
    for T in (5, 37, 3):
        x = h.x(2, T)
        assert_rel_close(h.ours(x, [start, start]), h.reference(x, start, ref_cache), tol,
                         f"chunk of {T} at {start}")
        start += T


def test_latent_path_never_expands_the_cache(monkeypatch):
    """The latent path does not touch kv_up (it would re-expand the whole prefix)."""
    _force(monkeypatch, "latent")
    h = Harness("mla", "triton", b_max=1, cfg=_cfg(48))
    h.ours(h.x(1, 6), [0])
    h.w.kv_up = torch.full_like(h.w.kv_up, float("nan"))
    assert torch.isfinite(h.ours(h.x(1, 4), [6])).all()


@pytest.mark.parametrize("preset,last_latent", [("mythos_1b", 85), ("mythos_3b", 128),
                                                ("mythos_10b", 170)])
def test_latent_path_is_chosen_by_multiply_adds(preset, last_latent):
    c = MythosConfig.from_preset(preset)
    shape = (c.kv_lora_rank, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim)
    assert TA.latent_prefill_wins(last_latent, *shape)
    assert not TA.latent_prefill_wins(last_latent + 1, *shape)
    assert not TA.latent_prefill_wins(256, *shape)  # the default chunk stays expanded


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["mythos_1b", "mythos_3b"])
@pytest.mark.parametrize("T,prefix", [(17, 8000), (64, 3000), (256, 7936)])
def test_bf16_gpu_paths_agree(preset, T, prefix):
    """Both paths at the presets' shapes (bf16, long prefixes, the default key splits)
    vs the torch implementation in float32."""
    from mythos_rt.lower import op_args
    from mythos_rt.reference import MLAttention
    from mythos_rt.testing import TOL_BF16_KERNEL
    cfg = MythosConfig.from_preset(preset)
    w = op_args("mla_attention", MLAttention(cfg).state_dict(), cfg, dtype=torch.bfloat16)
    w = A.MLAWeights(**{k: v.cuda() if torch.is_tensor(v) else v for k, v in w.__dict__.items()})
    H, S = cfg.n_heads, prefix + T
    mk = lambda *s: torch.randn(*s, device="cuda").bfloat16()  # noqa: E731
    ckv, kpe = mk(1, S, cfg.kv_lora_rank), mk(1, S, cfg.qk_rope_head_dim)
    q_nope, q_pe = mk(1, T, H, cfg.qk_nope_head_dim), mk(1, T, H, cfg.qk_rope_head_dim)
    lens = torch.tensor([prefix], dtype=torch.int32, device="cuda")
    scale = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
    wf = A.MLAWeights(**{**w.__dict__, **{k: getattr(w, k).float() for k in ("kv_up", "w_uk",
                                                                             "w_uv")}})
    ref = A.mla_prefill(q_nope.float(), q_pe.float(), ckv.float(), kpe.float(), lens, wf, scale)
    for latent in (True, False):
        got = TA.mla_prefill(q_nope, q_pe, ckv, kpe, lens, w, scale, latent=latent)
        assert_rel_close(got, ref, TOL_BF16_KERNEL, f"latent={latent}")
