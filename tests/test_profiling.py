"""mythos_rt.profiling on CPU: stages, ACT statistics vs the reference, files, CLI commands."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mythos_rt
from mythos_rt import profiling
from mythos_rt.checkpoint import save_checkpoint
from mythos_rt.config import MythosConfig
from mythos_rt.reference import OpenMythos
from mythos_rt.testing import halting_loops, spread_act_halting

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MYTHOS_BENCH_THREADS": "1"}


@pytest.fixture(scope="module")
def tiny():
    """tiny_mla with a halting head calibrated so positions halt at different loops."""
    torch.manual_seed(0)
    model = OpenMythos(MythosConfig.from_preset("tiny_mla")).eval()
    spread_act_halting(model, torch.randint(0, 97, (2, 23)))
    return model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny):
    return save_checkpoint(tmp_path_factory.mktemp("ckpt"), tiny.cfg, tiny.state_dict())


def test_stage_names():
    assert profiling.stage_of("embed") == "prelude"
    assert profiling.stage_of("prelude.0.attn") == "prelude"
    assert profiling.stage_of("loop_start+prologue[t=0]") == "loop[0]"
    assert profiling.stage_of("recurrent.block.ffn[t=11]") == "loop[11]"
    assert profiling.stage_of("loop_epilogue[t=3]") == "loop[3]"
    assert profiling.stage_of("coda.1.ffn") == "coda"
    assert profiling.stage_of("logits") == profiling.stage_of("norm") == "head"
    assert profiling.stage_of("loop_result") == "loop_exit"


def test_act_statistics_match_reference(tiny):
    rt = mythos_rt.compile(tiny, backend="torch", max_batch_size=2)
    ids = torch.randint(0, 97, (2, 23))
    n = 4
    stats = profiling.act_statistics(rt, ids, n)
    ref = halting_loops(tiny, ids, n).flatten()
    expect = [int((ref == t + 1).sum()) for t in range(n)]
    assert [h["positions"] for h in stats["halted_at_loop"]] == expect
    assert stats["never_halted"] == int((ref == 0).sum())
    assert len(set(expect)) > 1, "calibration should spread halting over loops"


def test_profile_writes_files_and_stages(tiny, tmp_path):
    rt = mythos_rt.compile(tiny, backend="torch", max_batch_size=1)
    runs = [s.run for s in rt.plan(3)]
    res = profiling.profile(rt, prompt_len=9, new_tokens=4, n_loops=3, out_dir=tmp_path)
    saved = json.loads((tmp_path / "profile.json").read_text())
    assert saved["schema"] == profiling.PROFILE_SCHEMA and saved["timer"] == "perf_counter"
    trace = json.loads((tmp_path / "trace.json").read_text())
    assert trace["traceEvents"]
    for phase in ("prefill", "decode"):
        stages = [r["stage"] for r in res["stages"][phase]]
        assert stages[:5] == ["prelude", "loop[0]", "loop[1]", "loop[2]", "loop_exit"]
        assert "coda" in stages and "head" in stages
    assert res["stages"]["decode"][-1]["stage"] == "sampling"
    assert res["totals"]["decode_ms_per_token"] > 0 and res["floors"]["decode_floor_ms"] > 0
    assert res["telemetry"] == {"available": False, "reason":
                                "telemetry unavailable: device is cpu, not a CUDA GPU"}
    assert res["kernels"] and all(":" not in k["name"].split("::")[-1] for k in res["kernels"])
    assert sum(h["positions"] for h in res["act"]["halted_at_loop"]) + \
        res["act"]["never_halted"] == 9
    ops = {p["op"] for p in res["roofline"]["points"]}
    assert {"attention", "moe", "head"} <= ops
    if importlib.util.find_spec("matplotlib") is None:
        assert res["roofline"]["path"] is None and "matplotlib" in res["roofline"]["reason"]
    else:
        assert (tmp_path / "roofline.png").stat().st_size > 1000
    # profiling observes the plan, it never rebinds a step
    assert [s.run for s in rt.plan(3)] == runs


def test_roofline_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    got = profiling.plot_roofline([], mythos_rt.costmodel.H100, tmp_path / "r.png", "t")
    assert got["path"] is None and "matplotlib not importable" in got["reason"]


def _cli(*args, timeout=90):
    return subprocess.run([sys.executable, "-m", "mythos_rt.cli", *args], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def test_cli_profile(ckpt, tmp_path):
    out = tmp_path / "prof"
    proc = _cli("profile", str(ckpt), "--prompt-len", "12", "--new-tokens", "3",
                "--n-loops", "2", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "telemetry unavailable" in proc.stdout and "loop[1]" in proc.stdout
    assert (out / "profile.json").exists() and (out / "trace.json").exists()
    # the ceilings are this CPU's, measured and said so; the profiler library's own log
    # lines (profiler_start / profiler_stop on stderr) stay out
    assert "ceilings: " in proc.stdout and "measured on this cpu" in proc.stdout
    assert proc.stderr == "", proc.stderr[-2000:]
    saved = json.loads((out / "profile.json").read_text())
    assert saved["ceilings"]["measured"] and "H100" not in json.dumps(saved["ceilings"])


def test_profile_defaults_fit_the_model(tiny, tmp_path):
    """tiny_mla has max_seq_len 64: the defaults (128 + 16 tokens) shrink to fit."""
    assert profiling.fit_lengths(64) == (49, 16)
    assert profiling.fit_lengths(4096) == (128, 16)
    assert profiling.fit_lengths(8) == (7, 2)
    assert profiling.fit_lengths(64, prompt_len=49) == (49, 16)
    assert profiling.fit_lengths(64, new_tokens=4) == (61, 4)
    with pytest.raises(mythos_rt.InputError, match="lower prompt_len or new_tokens "
                                                   "\\(CLI: --prompt-len, --new-tokens\\)"):
        profiling.fit_lengths(64, prompt_len=60)
    rt = mythos_rt.compile(tiny, backend="torch", max_batch_size=1, max_seq_len=12)
    res = profiling.profile(rt, n_loops=2, out_dir=tmp_path)
    assert (res["workload"]["prompt_len"], res["workload"]["new_tokens"]) == (10, 3)


def test_measured_ceilings_of_a_cpu():
    c = profiling.measure_ceilings(torch.device("cpu"), torch.float32)
    assert c.measured and "measured on this cpu" in c.source and "random data" in c.source
    assert 0.1 < c.copy_gbps < 1000 and 1e-4 < c.bf16_tflops < 100


def test_a_cpu_compute_ceiling_is_float32_for_bf16_weights():
    """The cpu backend sums bf16 weights in float32: its ceiling is a float32 matmul, not
    torch's software bf16 one (which made every bf16 CPU floor compute-bound)."""
    c = profiling.measure_ceilings(torch.device("cpu"), torch.bfloat16)
    assert "float32 matmul" in c.source and "bfloat16" not in c.source


def test_cli_bench(ckpt, tmp_path):
    out = tmp_path / "bench.json"
    proc = _cli("bench", str(ckpt), "--quick", "--systems", "mythos-rt", "--budget-s", "40",
                "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "no CUDA device" in proc.stdout
    rows = json.loads(out.read_text())["e2e"]["rows"]
    assert rows and all(r["status"] == "ok" for r in rows)
    assert {r["phase"] for r in rows} == {"prefill", "decode"}


@pytest.mark.parametrize("args, message", [
    (("profile", "/nonexistent/ckpt"), "no such file"),
    (("profile",), "checkpoint path"),
    (("profile", "--preset", "tiny_mla", "--prompt-len", "0"), "prompt_len"),
    (("profile", "--preset", "tiny_mla", "--prompt-len", "100"),
     "max_seq_len=64 of the model profiled: lower prompt_len or new_tokens (CLI: --prompt-len"),
    (("bench", "--preset", "nope"), "unknown preset"),
])
def test_cli_user_errors_are_one_line(args, message, capsys):
    from mythos_rt.cli import main
    assert main(list(args)) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
