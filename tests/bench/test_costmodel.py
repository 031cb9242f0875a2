"""Cost model arithmetic against docs/design.md's "Performance model" examples."""

import pytest

from mythos_rt import costmodel as C
from mythos_rt.config import MythosConfig

# docs/design.md: bf16, T = max_loop_iters, 3.0 TB/s: (GB/token, ms)
DESIGN_DECODE = {"mythos_1b": (5.3, 1.77), "mythos_3b": (15.6, 5.2), "mythos_10b": (42.6, 14.2)}


@pytest.mark.parametrize("preset", sorted(DESIGN_DECODE))
def test_decode_bytes_per_token_match_design(preset):
    cfg = MythosConfig.from_preset(preset)
    gb, ms = DESIGN_DECODE[preset]
    nbytes = C.decode_bytes_per_token(cfg, dtype="bfloat16")
    assert nbytes / 1e9 == pytest.approx(gb, rel=0.01)
    assert C.decode_floor_ms(cfg) == pytest.approx(ms, rel=0.01)


def test_decode_bytes_accounting_by_hand_mythos_1b():
    """loops × (attn + 2 norms + router + k experts + shared + step) + 4 × dense layer + head."""
    cfg = MythosConfig.from_preset("mythos_1b")
    D, V = 2048, 32000
    attn = (D * 512 + 512 + 512 * 16 * 96 + D * 288 + 256 + 256 * 16 * 128 + 16 * 64 * D)
    assert C.attention_params(cfg) == attn
    loop = attn + 2 * D + D * 64 + 4 * 3 * D * 2048 + 2 * 3 * D * 8192 + C.recurrent_step_params(cfg)
    dense_layer = attn + 3 * D * (D * 4 // 3) + 2 * D
    weights = 16 * loop + 4 * dense_layer + D + V * D + D  # + final norm + head + embed row
    weights += 16 * 64 * 2  # the fp32 router bias (E floats per loop) in bf16 elements
    cache_writes = 20 * 288  # one new latent+rope row per attention layer
    assert C.decode_bytes_per_token(cfg) == pytest.approx(2 * (weights + cache_writes), rel=1e-12)


def test_decode_scales_with_loops_and_dtype():
    cfg = MythosConfig.from_preset("mythos_1b")
    b8, b16, b32 = (C.decode_bytes_per_token(cfg, T) for T in (8, 16, 32))
    assert b32 - b16 == pytest.approx(2 * (b16 - b8))
    assert C.decode_bytes_per_token(cfg, dtype="float32") == pytest.approx(
        2 * C.decode_bytes_per_token(cfg, dtype="bfloat16"), rel=1e-6)  # router bias stays fp32


def test_context_adds_compact_mla_cache():
    cfg = MythosConfig.from_preset("mythos_1b")
    extra = C.decode_bytes_per_token(cfg, context=1000) - C.decode_bytes_per_token(cfg)
    layers = 16 + 4
    assert extra == pytest.approx(layers * 1000 * (256 + 32) * 2)


def test_batch_reads_expected_distinct_experts():
    cfg = MythosConfig.from_preset("mythos_1b")
    assert C.expected_experts_hit(cfg, 1) == pytest.approx(4)
    assert 4 < C.expected_experts_hit(cfg, 8) < 32
    assert C.expected_experts_hit(cfg, 10_000) == pytest.approx(64)
    one, eight = C.decode_step_bytes(cfg, batch=1), C.decode_step_bytes(cfg, batch=8)
    assert one < eight < 8 * one


def test_prefill_flops_are_two_active_params():
    cfg = MythosConfig.from_preset("mythos_3b")
    active = C.active_params_per_token(cfg, 16)
    assert C.prefill_flops_per_token(cfg, 16) == 2 * active
    assert C.prefill_floor_ms(cfg, 1000) == pytest.approx(1000 * 2 * active / 798e12 * 1e3)
    # op_costs agree with the per-token formula when attention scores are left out
    ops = C.op_costs(cfg, C.Workload(new_tokens=512, attention_flops=False))
    assert C.summarize(ops)["flops"] == pytest.approx(512 * 2 * active, rel=2e-3)


def test_achieved_and_roofline():
    got = C.achieved(2.0, bytes_moved=3e9, flops=4e12)
    assert got["gbps"] == pytest.approx(1500) and got["pct_hbm"] == pytest.approx(50)
    assert got["tflops"] == pytest.approx(2000) and got["pct_bf16_peak"] > 100
    assert C.roofline_tflops(1.0) == pytest.approx(3.0)
    assert C.roofline_tflops(1e6) == 798.0


def test_gqa_and_tiny_configs():
    for name in ("tiny_gqa", "tiny_mla", "small_mla"):
        cfg = MythosConfig.from_preset(name)
        rep = C.report(cfg)
        assert rep["decode_bytes_per_token"] > 0 and rep["decode_floor_ms"] > 0
        for op in C.op_costs(cfg, C.Workload(batch=2, new_tokens=5, context=3, dtype="float32")):
            assert op.flops >= 0 and op.bytes > 0, op
