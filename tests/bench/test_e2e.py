"""bench_e2e orchestration without running models: case order, budget skips, ratios."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench import bench_e2e as E  # noqa: E402


def test_gpu_cases_cover_the_grid_in_priority_order():
    cs = E.cases(quick=False, on_gpu=True)
    assert cs[0] == E.Case("decode", 1, 128, 16, 32) and cs[1].phase == "prefill"
    assert {c.length for c in cs if c.phase == "prefill"} == {512, 2048, 8192}
    assert {c.batch for c in cs if c.phase == "decode"} == {1, 8, 64}
    assert {c.n_loops for c in cs} == {8, 16, 32}
    assert len(cs) == len(set(cs)) == 18
    assert all(c.n_loops == 16 for c in cs[:6])


def test_budget_spent_skips_and_says_so():
    res = E.run_e2e(quick=True, budget_s=0.5, device="cpu", systems=["mythos-rt", "eager"],
                    log=lambda s: None)
    assert not [r for r in res["rows"] if r.get("status") == "ok"]
    assert res["skipped"] and all(s["reason"] == "time budget spent" for s in res["skipped"])


def test_graphs_row_is_na_on_cpu_and_ratios():
    res = E.run_e2e(quick=True, budget_s=0.5, device="cpu", systems=["mythos-rt+graphs"],
                    log=lambda s: None)
    assert res["rows"] and all(r["status"] == "n/a" for r in res["rows"])
    rows = [{"preset": "p", "phase": "decode", "batch": 1, "length": 8, "n_loops": 4,
             "system": s, "status": "ok", "ms": ms} for s, ms in (("mythos-rt", 2.0), ("eager", 5.0))]
    E._add_ratios(rows)
    assert rows[1]["x_vs_rt"] == 2.5 and "x_vs_rt" not in rows[0]
