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


# ---- tensor + expert parallel plan (docs/scaling.md) ----------------------------------

import pathlib
import re

from mythos_rt import memory

SCALING_DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "scaling.md"


@pytest.mark.parametrize("preset", ["mythos_1b", "mythos_10b", "mythos_1t"])
@pytest.mark.parametrize("batch,context", [(1, 0), (1, 4096), (64, 4096)])
def test_one_gpu_plan_is_the_single_gpu_floor_without_communication(preset, batch, context):
    cfg = MythosConfig.from_preset(preset)
    plan = C.parallel_plan(cfg, 1, batch=batch, context=context)
    floor = C.decode_floor_ms(cfg, batch=batch, context=context)
    assert plan.compute_ms == pytest.approx(floor, rel=1e-12)
    assert plan.step_ms == plan.compute_ms and plan.comm_ms == 0 and plan.all_reduces == 0
    assert plan.step_bytes == pytest.approx(C.decode_step_bytes(cfg, batch=batch, context=context),
                                            rel=1e-12)
    # the whole model once (the tied head not twice)
    params = memory.parameter_count(cfg)[0] - cfg.vocab_size * cfg.dim
    assert plan.weight_bytes == 2 * params
    assert plan.kv_bytes == ({"mythos_1t": 12}.get(preset, 4) + cfg.max_loop_iters) \
        * batch * context * C.kv_cache_width(cfg) * 2


def test_collective_formulas_by_hand():
    X = 3e6
    # 2 GPUs on NVLink, ring: 2·(1/2)·X/450 GB/s + 2 hops of 2 µs
    assert C.all_reduce_ms(X, 2, "nvlink") == pytest.approx((X / 450e9 + 4e-6) * 1e3)
    # 8 GPUs on IB, ring: 2·(7/8)·X/50 GB/s + 14 hops of 6 µs
    assert C.all_reduce_ms(X, 8, "ib") == pytest.approx((1.75 * X / 50e9 + 84e-6) * 1e3)
    # 16 GPUs = 2 HGX nodes: in-node reduce-scatter + all-gather, X/8 across nodes
    want = 2 * 7 / 8 * X / 450e9 + 2 * 1 / 2 * (X / 8) / 50e9 + (14 * 2 + 2 * 6) * 1e-6
    assert C.all_reduce_ms(X, 16, "hgx") == pytest.approx(want * 1e3)
    assert C.all_gather_ms(X, 4, "ib") == pytest.approx((0.75 * X / 50e9 + 18e-6) * 1e3)
    want = 7 / 8 * X / 450e9 + 3 / 4 * (X / 8) / 50e9 + (7 * 2 + 3 * 6) * 1e-6
    assert C.all_gather_ms(X, 32, "hgx") == pytest.approx(want * 1e3)
    want = max(7 / 16 * X / 450e9, 8 / 16 * X / 50e9) + 8e-6
    assert C.all_to_all_ms(X, 16, "hgx") == pytest.approx(want * 1e3)
    for f in C.all_reduce_ms, C.all_gather_ms, C.all_to_all_ms:
        assert f(X, 1, "hgx") == 0.0
    assert C.all_reduce_ms(X, 8, "hgx") == C.all_reduce_ms(X, 8, "nvlink")  # one node


def test_bad_gpu_counts_are_named():
    cfg = MythosConfig.from_preset("mythos_1b")
    with pytest.raises(ValueError, match=r"3 GPUs do not split n_heads=16.*1, 2, 4, 8, 16"):
        C.parallel_plan(cfg, 3)
    with pytest.raises(ValueError, match="12 GPUs do not fill whole nodes"):
        C.all_reduce_ms(1e6, 12, "hgx")
    with pytest.raises(ValueError, match="unknown fabric 'pcie'"):
        C.all_reduce_ms(1e6, 2, "pcie")


def test_communication_counts_and_scales_with_loops():
    cfg = MythosConfig.from_preset("mythos_100b")
    act = 64 * cfg.dim * 2
    plans = {T: C.parallel_plan(cfg, 16, batch=64, context=100, n_loops=T) for T in (16, 32)}
    for T, plan in plans.items():
        assert plan.all_reduces == 1 + 2 * 8 + 2 * T
        assert plan.comm_ms == pytest.approx(plan.all_reduces * C.all_reduce_ms(act, 16)
                                             + C.all_gather_ms(64 * 32000 * 4, 16))
    assert plans[32].comm_ms - plans[16].comm_ms == pytest.approx(32 * C.all_reduce_ms(act, 16))


def test_split_shares_by_hand():
    cfg = MythosConfig.from_preset("mythos_1b")
    D = 2048
    replicated = D * 512 + 512 + D * 288 + 256
    per_head = 512 * 96 + 256 * 128 + 64 * D
    assert C.rank_attention_params(cfg, 1) == C.attention_params(cfg)
    assert C.rank_attention_params(cfg, 4) == replicated + 4 * per_head
    # 32 of 64 experts, half of both shared experts' 16384 columns, half the vocab
    two, one = C.rank_weight_params(cfg, 2), C.rank_weight_params(cfg, 1)
    saved = (32 * 3 * D * 2048 + 3 * D * 8192 + 16000 * D + 4 * 3 * D * (2730 - 1365)
             + 5 * (C.attention_params(cfg) - C.rank_attention_params(cfg, 2)))
    assert one - two == saved
    # MLA's latent cache is every head's: each rank holds all of it
    assert C.rank_kv_cache_bytes(cfg, 8, batch=2, context=5) == C.rank_kv_cache_bytes(
        cfg, 1, batch=2, context=5)


def test_gqa_cache_splits_with_kv_heads():
    cfg = MythosConfig(vocab_size=256, dim=128, n_heads=8, n_kv_heads=2, attn_type="gqa",
                       n_experts=8, expert_dim=32, max_loop_iters=3, lora_rank=4).validate()
    kv = [C.rank_kv_cache_bytes(cfg, n, batch=3, context=7) for n in (1, 2, 4)]
    assert kv == [kv[0], kv[0] / 2, kv[0] / 2]  # one K/V head per rank beyond n_kv_heads
    assert C.rank_attention_params(cfg, 1) == C.attention_params(cfg)
    assert C.parallel_plan(cfg, 4, batch=2, context=3, fabric="ib").comm_ms > 0


def test_busiest_rank_loads():
    cfg = MythosConfig.from_preset("mythos_1t")
    assert C._expected_max_binomial(1, 0.5, 2) == pytest.approx(0.75)
    # P(max ≥ 1) + P(max ≥ 2) = (1 − 1/16) + (1 − 9/16)
    assert C._expected_max_binomial(2, 0.5, 2) == pytest.approx(1.375)
    for rows in (1, 64):
        hit = C.expected_experts_hit(cfg, rows)
        assert C.busiest_rank_experts(cfg, rows, 1) == pytest.approx(hit)
        assert C.busiest_rank_pairs(cfg, rows, 1) == rows * 8
        for n in (2, 8, 128):
            assert hit / n <= C.busiest_rank_experts(cfg, rows, n) <= min(512 / n, hit)
            assert rows * 8 / n <= C.busiest_rank_pairs(cfg, rows, n) <= rows * 8


def test_memory_falls_with_gpus_and_min_gpus_is_the_first_that_fits():
    for name in C.SCALING_PRESETS:
        cfg = MythosConfig.from_preset(name)
        sizes = C.split_sizes(cfg)
        mem = [C.parallel_plan(cfg, n, batch=64, context=4096).memory_bytes for n in sizes]
        assert mem == sorted(mem, reverse=True)
        assert C.rank_kv_cache_bytes(cfg, 1, batch=64, context=4096) > C.rank_kv_cache_bytes(
            cfg, 1, batch=1, context=4096)
        for batch in (1, 64):
            n = C.min_gpus(cfg, batch=batch, context=4096)
            assert C.fits(cfg, n, batch=batch, context=4096)
            budget = 80e9 * 0.9
            got = C.parallel_plan(cfg, n, batch=batch, context=4096).memory_bytes
            assert got <= budget
            if n > 1:
                before = sizes[sizes.index(n) - 1]
                assert not C.fits(cfg, before, batch=batch, context=4096)
                assert C.parallel_plan(cfg, before, batch=batch,
                                       context=4096).memory_bytes > budget
    # 1t's replicated MLA cache (43 GB at 64 × 4096) leaves it one head per GPU
    assert C.min_gpus(MythosConfig.from_preset("mythos_1t"), batch=64, context=4096) == 128
    assert C.min_gpus(MythosConfig.from_preset("mythos_1t"), batch=4096, context=4096) is None


def test_scaling_table_names_a_batch_no_split_holds():
    text = C.scaling_markdown(("mythos_1t",), batch=4096, context=4096)
    assert "| mythos_1t | 999.33 | 1,999 | 2,775 | 32 | does not fit | — | — |" in text
    assert "| mythos_1t | — | — | — | — | — | 278 | 193 | 158 |" in text


def test_committed_scaling_table_is_what_the_code_generates():
    text = SCALING_DOC.read_text()
    block = re.search(r"<!-- BEGIN GENERATED[^\n]*-->\n(.*?)<!-- END GENERATED -->", text, re.S)
    assert block, "docs/scaling.md lost its generated-table markers"
    assert block.group(1) == C.scaling_markdown(), (
        "docs/scaling.md is stale: run .venv/bin/python scripts/scaling_table.py --write")
