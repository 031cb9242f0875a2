"""bench/gpu_suite.py on CPU: the dry run's order, budgets and files; a slow part keeps to
its share; results survive a kill."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench import gpu_suite, harness  # noqa: E402


def _emitter(rows: list[dict], sleep_s: float = 0.0) -> list[str]:
    """A worker command that emits ``rows`` one by one, then sleeps (it imports no torch,
    so it starts fast even on a loaded machine)."""
    code = (f"import json, time\nfor r in {rows!r}:\n"
            f"    print({harness.ROW_TAG!r} + json.dumps(r), flush=True)\ntime.sleep({sleep_s})\n")
    return [sys.executable, "-c", code]


def _worker_part(name: str, share: float, rows: list[dict], sleep_s: float = 0.0):
    return gpu_suite.Part(name, f"{name} (simulated)", share,
                          lambda ctx: gpu_suite.child(ctx, name, _emitter(rows, sleep_s),
                                                      ctx.left()))


def test_cpu_dry_run_order_budgets_and_files(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, "bench/gpu_suite.py", "--quick", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(f.suffix for f in out.iterdir()) == [".json", ".jsonl", ".md"]
    data = json.loads(next(out.glob("*.json")).read_text())
    gpu_suite.validate(data)
    assert data["complete"] and data["ceilings"]["measured"] is False
    assert "hostname" not in json.dumps(data["provenance"]).lower()
    # value order, each part with its own share; deadlines never pass the budget
    assert [p["part"] for p in data["plan"]] == ["parity", "decode", "throughput", "micro",
                                                 "tests"]
    assert data["plan"][-1]["deadline_s"] < data["budget_s"]
    assert data["wall_s"] < data["budget_s"] + 10
    # the same rows on both files, each with its part; the parity row passes its bound
    lines = [json.loads(x) for x in next(out.glob("*.jsonl")).read_text().splitlines()]
    assert lines == data["rows"]
    parity = [r for r in data["rows"] if r["part"] == "parity"]
    assert parity and parity[0]["status"] == "ok" and parity[0]["max_rel_err"] <= parity[0]["bound"]
    decode = {r["system"]: r for r in data["rows"] if r["part"] == "decode"}
    assert decode["mythos-rt"]["status"] == "ok" and decode["mythos-rt+graphs"]["status"] == "n/a"
    assert "floor_ms" in decode["mythos-rt"] and decode["eager"]["status"] == "ok"
    micro = [r for r in data["rows"] if r["part"] == "micro"]
    assert any(r["status"] == "ok" for r in micro)
    assert any(r["name"] == "cuda" and "needs a CUDA GPU" in r["reason"] for r in micro) or any(
        "bench_cuda" in r["name"] for r in micro)  # skipped with its reason, or timed out
    tests = [r for r in data["rows"] if r["part"] == "tests"]
    assert tests and all(r["status"] == "skipped" and r["reason"] for r in tests)
    # the summary table is printed last, one line per part
    assert proc.stdout.strip().splitlines()[-1].startswith("| tests |")
    assert "## (a) end-to-end parity" in next(out.glob("*.md")).read_text()


def test_slow_part_keeps_to_its_share_and_later_parts_run(tmp_path):
    parts = [_worker_part("fast", 0.3, [{"name": "fast/1"}]),
             _worker_part("slow", 0.3, [{"name": "slow/1"}], sleep_s=60),
             _worker_part("after", 0.3, [{"name": "after/1"}, {"name": "after/2"}])]
    t0 = time.perf_counter()
    rec = gpu_suite.run_suite(tmp_path, budget_s=10.0, parts=parts)
    wall = time.perf_counter() - t0
    assert wall < 10.0 + 2.0  # the slow worker was killed at its deadline (~6 s in)
    rows = {r["name"]: r for r in rec.data["rows"]}
    assert rows["slow/1"]["status"] == "ok"  # streamed before the kill: kept
    assert rows["slow/slow"]["status"] == "timeout"
    assert "killed after" in rows["slow/slow"]["reason"] and "1 row(s)" in rows["slow/slow"]["reason"]
    assert rows["after/2"]["status"] == "ok"
    assert rec.data["parts"]["slow"]["status"] == "partial"
    assert [p["budget_s"] for p in rec.data["plan"]] == [3.0, 3.0, 3.0]


def test_failing_worker_and_part_error_are_rows(tmp_path):
    def broken(ctx):
        raise RuntimeError("no model")
    crash = gpu_suite.Part("crash", "crash", 0.4, lambda ctx: gpu_suite.child(
        ctx, "w", [sys.executable, "-c", "import sys; sys.exit('boom')"], ctx.left()))
    rec = gpu_suite.run_suite(tmp_path, budget_s=20.0,
                              parts=[crash, gpu_suite.Part("err", "err", 0.4, broken)])
    rows = {r["part"]: r for r in rec.data["rows"]}
    assert rows["crash"]["status"] == "failed" and "boom" in rows["crash"]["reason"]
    assert rows["err"]["status"] == "error" and "no model" in rows["err"]["reason"]
    gpu_suite.validate(rec.data)


def test_results_survive_a_kill(tmp_path):
    driver = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO)!r}); sys.path.insert(0, {str(Path(__file__).parent)!r})
        from bench import gpu_suite
        from test_gpu_suite import _worker_part
        gpu_suite.run_suite({str(tmp_path)!r}, budget_s=120.0, parts=[
            _worker_part("first", 0.4, [{{"name": "first/1"}}]),
            _worker_part("second", 0.5, [{{"name": "second/1"}}], sleep_s=120)])
    """)
    proc = subprocess.Popen([sys.executable, "-c", driver], cwd=REPO, start_new_session=True,
                            stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):
            # the .json is replaced whole after the row's .jsonl line: wait for it, or the
            # kill may land between the two
            summary = next(tmp_path.glob("*.json"), None)
            if summary and "second/1" in summary.read_text():
                break
            time.sleep(0.1)
        else:
            pytest.fail("the suite recorded no row of its second part within 30 s")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    data = json.loads(next(tmp_path.glob("*.json")).read_text())
    gpu_suite.validate(data)
    assert not data["complete"]
    assert [r["name"] for r in data["rows"]] == ["first/1", "second/1"]
    lines = [json.loads(x) for x in next(tmp_path.glob("*.jsonl")).read_text().splitlines()]
    assert [r["name"] for r in lines if "name" in r] == ["first/1", "second/1"]
    assert data["parts"]["first"]["status"] == "ok" and data["parts"]["second"]["status"] == "running"
    assert "INCOMPLETE" in next(tmp_path.glob("*.md")).read_text()


def test_plan_shares_and_torch_compile_option():
    default = gpu_suite.plan()
    assert [p.name for p in default] == ["parity", "decode", "throughput", "micro", "tests"]
    assert 0.9 <= sum(p.share for p in default) < 1.0  # the rest is the reserve
    with_compile = gpu_suite.plan(torch_compile=True)
    assert with_compile[-1].name == "compile"
    assert sum(p.share for p in with_compile) == pytest.approx(sum(p.share for p in default))
    only = gpu_suite.plan(["tests", "parity"])
    assert [p.name for p in only] == ["parity", "tests"]
    with pytest.raises(ValueError, match="unknown part"):
        gpu_suite.plan(["nope"])


def test_share_floor_keeps_time_for_later_jobs():
    assert harness.share_s(100.0, 4, 10.0) == 70.0   # first job may use what the floors leave
    assert harness.share_s(100.0, 4, 40.0) == 25.0   # never less than an equal share
    assert harness.share_s(30.0, 1, 10.0) == 30.0


def test_validate_rejects_missing_parts_and_silent_failures():
    with pytest.raises(ValueError, match="schema"):
        gpu_suite.validate({"schema": "x", "provenance": {}, "ceilings": {}, "budget_s": 1,
                            "wall_s": 1, "quick": True, "plan": [], "parts": {}, "rows": [],
                            "summary": [], "complete": True})


def test_markdown_table_and_slug():
    md = harness.markdown_table([{"a": 1.0, "b": "x|y", "nested": {"n": 1}}, {"a": 2500.0}])
    assert md.splitlines()[0] == "| a | b |" and "x\\|y" in md and "2500.0" in md
    assert harness.device_slug({"gpu": "NVIDIA H100 80GB HBM3"}) == "h100-80gb-hbm3"
    assert harness.device_slug({"gpu": None}) == "cpu"


def test_measure_on_cpu():
    t = harness.measure(lambda: sum(range(100)), warmup=1, reps=7)
    assert t.timer == "perf_counter" and t.reps == 7 and t.min_ms <= t.median_ms <= t.p90_ms
    assert harness.time_ms(lambda: None, warmup=0, reps=3) >= 0
