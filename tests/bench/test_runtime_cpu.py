"""bench/bench_runtime_cpu.py runs (quick) and reports every model at every context."""

import pytest

from bench import bench_runtime_cpu


@pytest.mark.parametrize("attn", ["mla", "gqa"])
def test_quick_run_reports_decode_and_prefill_for_each_model(attn):
    rows = bench_runtime_cpu.run(quick=True, attn=attn)
    names = [r["name"] for r in rows]
    assert names[0] == "mythos-rt (cpu backend)" and "eager reference" in names
    for r in rows:
        assert r["decode_ms_per_step"] > 0 and r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0
        assert ("rt_decode_speedup" in r) == (r["name"] != names[0])
    assert {(r["batch"], r["context"]) for r in rows} == set(bench_runtime_cpu.QUICK_CASES)


def test_preset_run_reports_decode_against_the_read_floor_at_each_thread_count():
    rows, facts = bench_runtime_cpu.run_preset("tiny_mla", threads=(2, 1), prompt=7, steps=2,
                                               probe_mib=4)
    assert [r["threads"] for r in rows] == [2, 2, 2, 1, 1, 1]
    for r in rows:
        if r["name"] == "read probe":
            assert r["read_gbps_median"] > 0
        else:
            assert r["decode_s_per_token"] > 0 and r["prefill_tok_s"] > 0
            assert r["pct_of_read_floor"] >= 0  # a tiny model reads from cache: any value
            assert ("rt_decode_speedup" in r) == (r["name"] == "eager reference")
    assert facts["decode_bytes_per_token"] > 0 and facts["backends"]["moe_ffn"] == "cpu"
    assert facts["floor_s_per_token"] > 0 and facts["read_gbps_best"] > 0


def test_dtype_pair_run_compares_the_bf16_runtime_with_the_fp32_one():
    """--dtype both: the runtime in float32 and in bfloat16 interleaved, each judged against
    its own bytes; the bf16 row carries its speedup over float32."""
    rows, facts = bench_runtime_cpu.run_preset("tiny_mla", "both", threads=(1,), prompt=5,
                                               steps=2, probe_mib=4)
    assert [r["name"] for r in rows] == ["mythos-rt float32", "mythos-rt bfloat16", "read probe"]
    assert rows[1]["decode_speedup_vs_float32"] > 0 and "decode_speedup_vs_float32" not in rows[0]
    fp32, bf16 = facts["decode_bytes_per_token_by_model"].values()
    assert fp32 == 2 * bf16 == facts["decode_bytes_per_token"]


def test_decode_bytes_count_the_loop_per_iteration_and_only_the_chosen_experts():
    cfg = bench_runtime_cpu.MythosConfig.from_preset("tiny_mla")
    ref = bench_runtime_cpu._random_reference(cfg, bench_runtime_cpu.torch.float32)
    params = dict(ref.named_parameters())
    routed = sum(p.numel() for n, p in params.items() if ".routed_experts." in n)
    loop = sum(p.numel() for n, p in params.items() if n.startswith("recurrent.")) - routed
    rest = sum(p.numel() for n, p in params.items() if not n.startswith("recurrent."))
    expect = 4 * (rest + 3 * (loop + routed * cfg.n_experts_per_tok // cfg.n_experts))
    assert bench_runtime_cpu.decode_bytes_per_token(ref, cfg, 3) == expect
