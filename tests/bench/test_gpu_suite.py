"""bench/gpu_suite.py on CPU: the CPU subset runs, writes JSON + Markdown, JSON has the schema."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench import gpu_suite, harness  # noqa: E402


def test_gpu_suite_cpu_quick(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, "bench/gpu_suite.py", "--quick", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted(out.iterdir())
    assert [f.suffix for f in files] == [".json", ".md"], files
    result = json.loads(files[0].read_text())
    gpu_suite.validate(result)
    assert result["budget_s"] <= 60 and result["wall_s"] < 60
    assert result["ceilings"]["measured"] is False  # CPU: docs/design.md numbers on trust
    assert "hostname" not in json.dumps(result["provenance"]).lower()
    mods = result["parts"]["microbench"]["modules"]
    assert set(mods) == set(gpu_suite.bench_modules())
    assert any(m["status"] == "ok" and m["rows"] for m in mods.values())
    e2e = result["parts"]["e2e"]
    assert any(r["status"] == "ok" and r["system"] == "mythos-rt" for r in e2e["rows"])
    assert all(r["status"] == "n/a" for r in e2e["rows"] if r["system"] == "mythos-rt+graphs")
    # the summary table is printed last
    assert proc.stdout.strip().splitlines()[-1].startswith("| e2e |")
    assert "## End-to-end" in files[1].read_text()


def test_validate_rejects_missing_parts():
    with pytest.raises(ValueError, match="schema"):
        gpu_suite.validate({"schema": "x", "provenance": {}, "ceilings": {}, "budget_s": 1,
                            "wall_s": 1, "quick": True, "parts": {}, "summary": []})


def test_markdown_table_and_slug():
    md = harness.markdown_table([{"a": 1.0, "b": "x|y", "nested": {"n": 1}}, {"a": 2500.0}])
    assert md.splitlines()[0] == "| a | b |" and "x\\|y" in md and "2500.0" in md
    assert harness.device_slug({"gpu": "NVIDIA H100 80GB HBM3"}) == "h100-80gb-hbm3"
    assert harness.device_slug({"gpu": None}) == "cpu"


def test_measure_on_cpu():
    t = harness.measure(lambda: sum(range(100)), warmup=1, reps=7)
    assert t.timer == "perf_counter" and t.reps == 7 and t.min_ms <= t.median_ms <= t.p90_ms
    assert harness.time_ms(lambda: None, warmup=0, reps=3) >= 0
