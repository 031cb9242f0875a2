"""The one command for a GPU machine: GPU tests, every microbenchmark, the e2e set.

    python bench/gpu_suite.py [--out DIR] [--quick] [--budget-s 480]

Installs nothing and needs no network. Parts, each under its own share of the budget
(8 minutes on GPU; unused time flows to the next part):

1. provenance (GPU, driver, clocks via NVML, versions, git commit) and ceilings measured
   now (device copy GB/s, bf16 matmul TFLOP/s);
2. ``pytest -m gpu -q`` in a subprocess (its summary line is recorded);
3. every ``bench/bench_*.py`` module's ``run(quick)``, each in its own subprocess: a
   kernel fault (illegal address) poisons the CUDA context of the process it happens in,
   so one broken module must not take the next ones down; a failure or timeout is
   recorded and the suite goes on;
4. ``bench/bench_e2e.py``'s set (mythos-rt / eager / torch.compile, vs cost-model floors).

Writes ``bench/results/<date>-<gpu>.json`` and ``.md`` (or into ``--out DIR``) and prints a
short summary table last. Without CUDA it runs the CPU subset (tiny cases, interpreter)
so CI keeps it working: ``--quick`` then fits in about 40 s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import harness  # noqa: E402
from mythos_rt.costmodel import Ceilings  # noqa: E402

ON_GPU = torch.cuda.is_available()
BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
E2E_MODULE = "bench_e2e"
GPU_ONLY_SKIP = {"bench_runtime_cpu": "CPU benchmark (compares against CPU eager runs)"}
ROWS_TAG = "SUITE_ROWS "
PARTS = ("tests", "micro", "e2e")
# Shares of the budget per part (tests, microbenchmarks, e2e); the rest is a reserve.
SHARES = {"gpu": (0.35, 0.30, 0.30), "cpu": (0.12, 0.50, 0.33)}


def default_budget(quick: bool) -> float:
    return 480.0 if ON_GPU else (40.0 if quick else 300.0)


def _part(status: str, t0: float, budget: float, **kw) -> dict:
    return {"status": status, "wall_s": round(time.perf_counter() - t0, 2),
            "budget_s": round(budget, 1), **kw}


# ---- parts ---------------------------------------------------------------------------------

def run_tests(budget_s: float) -> dict:
    """``pytest -m gpu -q`` in a subprocess; on CPU every GPU test reports as skipped."""
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"]
    try:
        proc = subprocess.run(cmd, cwd=harness.REPO, capture_output=True, text=True,
                              timeout=max(1.0, budget_s))
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return _part("timeout", t0, budget_s, command=" ".join(cmd[1:]),
                     summary=f"killed after {budget_s:.0f} s", tail=out[-2000:])
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.strip()]
    summary = lines[-1].strip("= ") if lines else "no output"
    status = "ok" if proc.returncode in (0, 5) else "failed"  # 5: nothing collected
    part = _part(status, t0, budget_s, command=" ".join(cmd[1:]), returncode=proc.returncode,
                 summary=summary)
    if status != "ok":
        part["tail"] = (proc.stdout + proc.stderr)[-4000:]
    if not ON_GPU:
        part["note"] = "no CUDA device: GPU tests are collected and skipped"
    return part


def bench_modules() -> list[str]:
    return sorted(p.stem for p in BENCH_DIR.glob("bench_*.py") if p.stem != E2E_MODULE)


def _run_module(name: str, quick: bool, timeout_s: float) -> dict:
    t0 = time.perf_counter()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--run-module", name]
    if quick:
        cmd.append("--quick")
    try:
        proc = subprocess.run(cmd, cwd=harness.REPO, capture_output=True, text=True,
                              timeout=max(1.0, timeout_s))
    except subprocess.TimeoutExpired:
        return _part("timeout", t0, timeout_s, rows=[],
                     error=f"killed after {timeout_s:.0f} s (budget share)")
    for line in proc.stdout.splitlines():
        if line.startswith(ROWS_TAG):
            return _part("ok", t0, timeout_s, rows=json.loads(line[len(ROWS_TAG):]))
    err = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}, no rows"])[-1]
    return _part("error", t0, timeout_s, rows=[], error=err[:500],
                 tail=proc.stderr[-3000:])


def run_microbench(quick: bool, budget_s: float) -> dict:
    """Each module in order, each under the budget left; the rest is skipped, and said so."""
    t0 = time.perf_counter()
    modules: dict[str, dict] = {}
    names = bench_modules()
    for i, name in enumerate(names):
        if ON_GPU and name in GPU_ONLY_SKIP:
            modules[name] = {"status": "skipped", "reason": GPU_ONLY_SKIP[name], "rows": []}
            continue
        left = budget_s - (time.perf_counter() - t0)
        if left < 2.0:
            modules[name] = {"status": "skipped", "reason": "microbenchmark budget spent",
                             "rows": []}
            continue
        modules[name] = _run_module(name, quick, left)
        print(f"[gpu_suite] {name}: {modules[name]['status']} "
              f"({modules[name]['wall_s']} s)", file=sys.stderr, flush=True)
    n_ok = sum(m["status"] == "ok" for m in modules.values())
    status = "ok" if n_ok == len(modules) else ("partial" if n_ok else "failed")
    return _part(status, t0, budget_s, modules=modules)


def run_e2e_part(quick: bool, budget_s: float, ceilings: Ceilings) -> dict:
    t0 = time.perf_counter()
    if budget_s < 5:
        return _part("skipped", t0, budget_s, reason="no budget left", rows=[], skipped=[])
    try:
        from bench.bench_e2e import run_e2e
        res = run_e2e(quick=quick, budget_s=budget_s, ceilings=ceilings,
                      log=lambda s: print(f"[gpu_suite] {s}", file=sys.stderr, flush=True))
    except Exception as exc:  # noqa: BLE001 - recorded, the suite still writes its files
        return _part("error", t0, budget_s, error=f"{type(exc).__name__}: {exc}", rows=[],
                     skipped=[])
    ok = sum(r.get("status") == "ok" for r in res["rows"])
    status = "ok" if ok and not res["skipped"] else ("partial" if ok else "failed")
    return _part(status, t0, budget_s, **res)


# ---- report --------------------------------------------------------------------------------

def summary_rows(result: dict) -> list[dict]:
    p = result["parts"]
    t = p["tests"]
    mods = p["microbench"]["modules"]
    e = p["e2e"]
    rows = [{"part": "ceilings", "status": "measured" if result["ceilings"]["measured"] else
             "not measured", "wall_s": result.get("ceilings_wall_s", 0.0),
             "detail": f"{result['ceilings']['copy_gbps']} GB/s copy, "
                       f"{result['ceilings']['bf16_tflops']} TFLOP/s bf16"},
            {"part": "tests", "status": t["status"], "wall_s": t["wall_s"],
             "detail": t.get("summary", t.get("reason", ""))},
            {"part": "microbench", "status": p["microbench"]["status"],
             "wall_s": p["microbench"]["wall_s"],
             "detail": ", ".join(f"{n}: {m['status']}" for n, m in mods.items())
                       or p["microbench"].get("reason", "")}]
    e_rows = e.get("rows", [])
    detail = (f"{sum(r.get('status') == 'ok' for r in e_rows)} ok, "
              f"{len(e.get('skipped', []))} skipped")
    key = [r for r in e_rows if r.get("status") == "ok" and r["system"] == "mythos-rt"
           and r["phase"] == "decode" and r["batch"] == 1]
    if key:
        r = key[0]
        detail += (f"; {r['preset']} decode B1 T{r['n_loops']}: {r['ms']:.3g} ms/token "
                   f"(floor {r['floor_ms']:.3g} ms, {r['pct_of_floor']:.3g}% of floor)")
    rows.append({"part": "e2e", "status": e["status"], "wall_s": e["wall_s"], "detail": detail})
    return rows


def to_markdown(result: dict) -> str:
    prov, c = result["provenance"], result["ceilings"]
    md = [f"# mythos-rt GPU suite — {prov.get('gpu') or 'CPU (no GPU)'}, {prov['date_utc']}\n",
          f"commit `{prov.get('git_commit')}`{' (dirty)' if prov.get('git_dirty') else ''}; "
          f"torch {prov['torch']}, triton {prov['triton']}, CUDA {prov.get('cuda_runtime')}, "
          f"driver {prov.get('driver', 'n/a')}; quick={result['quick']}; "
          f"wall {result['wall_s']} s of {result['budget_s']} s budget\n",
          f"Ceilings: {c['copy_gbps']} GB/s device copy, {c['bf16_tflops']} TFLOP/s bf16 "
          f"({c['source']})\n", "## Summary\n", harness.markdown_table(result["summary"])]
    t = result["parts"]["tests"]
    md += ["## GPU tests\n", f"`{t.get('command', '')}`: {t.get('summary', t.get('reason', t['status']))}\n"]
    md.append("## Microbenchmarks\n")
    for name, m in result["parts"]["microbench"]["modules"].items():
        md.append(f"### {name} — {m['status']}\n")
        if m.get("rows"):
            md.append(harness.markdown_table(m["rows"]))
        for k in ("reason", "error"):
            if m.get(k):
                md.append(f"{k}: {m[k]}\n")
    e = result["parts"]["e2e"]
    md.append("## End-to-end\n")
    if e.get("rows"):
        from bench.bench_e2e import format_table
        md.append(format_table(e))
    elif e.get("reason") or e.get("error"):
        md.append(f"{e.get('reason') or e.get('error')}\n")
    return "\n".join(md)


def validate(result: dict) -> None:
    """Raise ValueError if ``result`` does not have the suite's JSON shape (used by tests)."""
    need = {"schema": str, "provenance": dict, "ceilings": dict, "budget_s": (int, float),
            "wall_s": (int, float), "quick": bool, "parts": dict, "summary": list}
    for k, typ in need.items():
        if not isinstance(result.get(k), typ):
            raise ValueError(f"result[{k!r}] missing or not {typ}")
    if result["schema"] != harness.SCHEMA:
        raise ValueError(f"schema {result['schema']!r} != {harness.SCHEMA!r}")
    for k in ("date_utc", "git_commit", "torch", "triton", "device"):
        if k not in result["provenance"]:
            raise ValueError(f"provenance lacks {k!r}")
    for k in ("copy_gbps", "bf16_tflops", "measured", "source"):
        if k not in result["ceilings"]:
            raise ValueError(f"ceilings lack {k!r}")
    for part in ("tests", "microbench", "e2e"):
        p = result["parts"].get(part)
        if not isinstance(p, dict) or "status" not in p or "wall_s" not in p:
            raise ValueError(f"part {part!r} lacks status/wall_s")
    for name, m in result["parts"]["microbench"]["modules"].items():
        if "status" not in m or not isinstance(m.get("rows"), list):
            raise ValueError(f"module {name!r} lacks status/rows")
        for r in m["rows"]:
            if "name" not in r:
                raise ValueError(f"a {name} row has no name: {r}")
    for r in result["parts"]["e2e"].get("rows", []):
        for k in ("name", "preset", "system", "phase", "status"):
            if k not in r:
                raise ValueError(f"e2e row lacks {k!r}: {r}")
        if r["status"] == "ok" and not all(k in r for k in ("ms", "floor_ms", "pct_of_floor")):
            raise ValueError(f"e2e ok row lacks timing/floor: {r}")


def run_suite(out_dir: Optional[Path] = None, quick: bool = False,
              budget_s: Optional[float] = None,
              parts: Optional[list[str]] = None) -> tuple[dict, Path, Path]:
    t_start = time.perf_counter()
    budget = default_budget(quick) if budget_s is None else budget_s
    prov = harness.provenance()
    t0 = time.perf_counter()
    ceilings = harness.measure_ceilings(quick=quick)
    ceilings_wall = round(time.perf_counter() - t0, 2)
    s_tests, s_micro, s_e2e = SHARES["gpu" if ON_GPU else "cpu"]
    spent = lambda: time.perf_counter() - t_start  # noqa: E731
    parts = set(parts or PARTS)
    tests = (run_tests(s_tests * budget) if "tests" in parts else
             {"status": "skipped", "wall_s": 0.0, "reason": "not in --parts"})
    micro = (run_microbench(quick, (s_tests + s_micro) * budget - spent()) if "micro" in parts
             else {"status": "skipped", "wall_s": 0.0, "reason": "not in --parts", "modules": {}})
    e2e = (run_e2e_part(quick, (s_tests + s_micro + s_e2e) * budget - spent(), ceilings)
           if "e2e" in parts else
           {"status": "skipped", "wall_s": 0.0, "reason": "not in --parts", "rows": [], "skipped": []})
    result = {"schema": harness.SCHEMA, "provenance": prov, "ceilings": ceilings.to_dict(),
              "ceilings_wall_s": ceilings_wall, "budget_s": budget, "quick": quick,
              "parts": {"tests": tests, "microbench": micro, "e2e": e2e}}
    result["wall_s"] = round(spent(), 2)
    result["summary"] = summary_rows(result)
    validate(result)
    out_dir = Path(out_dir) if out_dir else RESULTS_DIR
    stem = harness.results_stem(prov)
    json_path = harness.write_json(out_dir / f"{stem}.json", result)
    md_path = out_dir / f"{stem}.md"
    md_path.write_text(to_markdown(result))
    return result, json_path, md_path


def _module_main(name: str, quick: bool) -> int:
    import importlib
    if not ON_GPU:
        torch.set_num_threads(harness.env_threads())
    mod = importlib.import_module(f"bench.{name}")
    rows = mod.run(quick)
    print(ROWS_TAG + json.dumps(rows, default=str), flush=True)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help=f"directory for the result files (default {RESULTS_DIR})")
    p.add_argument("--quick", action="store_true", help="fewer cases and repeats")
    p.add_argument("--budget-s", type=float, help="total time budget (default 480 s on GPU)")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                   help="run only these parts (default: all)")
    p.add_argument("--run-module", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.run_module:
        return _module_main(args.run_module, args.quick)
    if not ON_GPU:
        print("[gpu_suite] no CUDA device: running the CPU subset (tiny cases, Triton "
              "interpreter; H100 ceilings from docs/design.md, not measured)", file=sys.stderr)
    result, json_path, md_path = run_suite(args.out, args.quick, args.budget_s, args.parts)
    print(f"wrote {json_path} and {md_path}")
    print(harness.markdown_table(result["summary"]), end="")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
