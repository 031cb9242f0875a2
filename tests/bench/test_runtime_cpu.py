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
