"""The one command for a GPU machine: the most valuable numbers first, none ever lost.

    python bench/gpu_suite.py [--out DIR] [--quick] [--budget-s S] [--parts ...]
                              [--torch-compile]

Installs nothing and needs no network. After provenance and the ceilings measured now
(device copy GB/s, bf16 matmul TFLOP/s), parts run in order of value, each until its
own deadline (its share of the budget, plus whatever earlier parts left unused):

  parity      (a) bf16 end-to-end parity of the compiled runtime vs the float32 eager
                  reference, mythos_1b with random weights (``bench_parity``)
  decode      (b) mythos_1b batch-1 decode ms/token with and without CUDA graphs and the
                  eager reference, against the cost-model floor (``bench_e2e``)
  throughput  (c) batch 8 / 32 decode tokens/s
  micro       (d) kernel micro-benchmarks against the roofline (``bench_<op>.py``)
  tests       (e) ``pytest -m gpu``, one row per test
  compile     torch.compile of the reference, only with ``--torch-compile``

Every group of work runs in its own subprocess (a kernel fault poisons the CUDA context
of its process) and streams a row per finished case. Each row is appended to
``<stem>.jsonl`` and the ``<stem>.json`` / ``.md`` pair is rewritten atomically, so a
kill at any moment keeps everything measured so far. A part that runs out of time, a
worker that crashes and a module that cannot run (e.g. ``bench_cuda`` without the CUDA
extension) each leave a row saying so. The default budget (420 s) leaves an 8-minute
GPU slot room for ``pip install --no-deps --no-build-isolation -e .`` and cold starts.

Without CUDA the same parts run at CPU sizes (tiny_mla, fp32, Triton interpreter): a dry
run that shows the order, the budgets and the files. Writes into ``--out DIR`` or
``bench/results/`` as ``<date>-<gpu>.{json,jsonl,md}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import harness  # noqa: E402
from mythos_rt.costmodel import Ceilings  # noqa: E402

ON_GPU = torch.cuda.is_available()
RESULTS_DIR = Path(__file__).resolve().parent / "results"
GPU_BUDGET_S, CPU_BUDGET_S, CPU_QUICK_BUDGET_S = 420.0, 300.0, 90.0
# Kernel micro-benchmark modules, most informative first.
MICRO_MODULES = ("bench_attention", "bench_moe", "bench_recurrent", "bench_norm", "bench_cuda")
# A later module (or e2e worker) keeps at least this much when an earlier one runs long.
MICRO_FLOOR_S = 15.0


# ---- the record: every row lands on disk as it arrives ----------------------------------

class Record:
    """The suite's result: rows per part, written to disk after every change.

    ``<stem>.jsonl`` gets one line per row (append-only); ``<stem>.json`` (the whole
    result) and ``<stem>.md`` are replaced atomically (write, then rename), so a reader
    never sees a half-written file and a kill loses nothing already recorded.
    """

    def __init__(self, out_dir: Path, header: dict):
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = harness.results_stem(header["provenance"])
        self.json_path, self.md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
        self.jsonl_path = out_dir / f"{stem}.jsonl"
        self.jsonl_path.write_text("")
        self.t0 = time.perf_counter()
        self.data = {**header, "parts": {}, "rows": [], "complete": False, "wall_s": 0.0}
        self.flush()

    def row(self, part: str, r: dict) -> None:
        r = {"part": part, **r}
        self.data["rows"].append(r)
        with self.jsonl_path.open("a") as f:
            f.write(json.dumps(r, default=str) + "\n")
        self.flush()

    def part(self, name: str, **info) -> None:
        self.data["parts"].setdefault(name, {}).update(info)
        self.flush()

    def flush(self) -> None:
        self.data["wall_s"] = round(time.perf_counter() - self.t0, 2)
        self.data["summary"] = summary_rows(self.data)
        _replace(self.json_path, json.dumps(self.data, indent=1, default=str) + "\n")
        _replace(self.md_path, to_markdown(self.data))


def _replace(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---- parts -----------------------------------------------------------------------------

@dataclass
class Context:
    """What a part runs with: its deadline, the record, and the run's settings."""
    part: str
    deadline: float  # time.perf_counter() value
    record: Record
    quick: bool
    ceilings: Ceilings

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def add(self, r: dict) -> None:
        self.record.row(self.part, r)


@dataclass
class Part:
    name: str
    title: str
    share: float  # of the total budget
    run: Callable[[Context], None]


def child(ctx: Context, label: str, cmd: Sequence[str], timeout_s: float) -> harness.Finished:
    """Run one worker process under ``timeout_s``; its rows land as they arrive, and a
    timeout or crash adds a row naming ``label`` and the reason."""
    n = [0]

    def on_row(r: dict) -> None:
        n[0] += 1
        ctx.add({"status": "ok", **r})  # benchmark rows are measurements unless they say
    end = harness.stream_rows(cmd, timeout_s, on_row)
    if end.status != "ok":
        ctx.add({"name": f"{ctx.part}/{label}", "status": end.status,
                 "reason": f"{end.reason}; {n[0]} row(s) recorded before",
                 "stderr_tail": end.stderr_tail[-1500:]})
    return end


def _module_cmd(module: str, quick: bool) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--child", module] + (
        ["--quick"] if quick else [])


def run_parity(ctx: Context) -> None:
    child(ctx, "bench_parity", _module_cmd("bench_parity", ctx.quick), ctx.left())


def _e2e(ctx: Context, cases: list, systems: Sequence[str]) -> None:
    from bench import bench_e2e
    preset = "mythos_1b" if ON_GPU else "tiny_mla"
    bench_e2e.run_e2e([{"preset": preset}], quick=ctx.quick, budget_s=ctx.left(),
                      systems=list(systems), ceilings=ctx.ceilings, case_list=cases,
                      on_row=ctx.add, log=_log)


def _decode_case(batch: int, quick: bool):
    from bench.bench_e2e import Case
    if ON_GPU:
        return Case("decode", batch, 128, 16, 16 if quick else 32)
    return Case("decode", batch, 8, 4, 3 if quick else 4)


def run_decode(ctx: Context) -> None:
    _e2e(ctx, [_decode_case(1, ctx.quick)], ("mythos-rt+graphs", "mythos-rt", "eager"))


def run_throughput(ctx: Context) -> None:
    batches = (8, 32) if ON_GPU else (4,)
    _e2e(ctx, [_decode_case(b, ctx.quick) for b in batches],
         ("mythos-rt+graphs", "eager", "mythos-rt"))


def run_compile(ctx: Context) -> None:
    from bench.bench_e2e import COMPILE_SYSTEMS
    _e2e(ctx, [_decode_case(1, ctx.quick)], COMPILE_SYSTEMS)


def run_micro(ctx: Context) -> None:
    for i, module in enumerate(MICRO_MODULES):
        left = ctx.left()
        if left < 2.0:
            ctx.add({"name": f"micro/{module}", "status": "skipped",
                     "reason": "the part's budget is spent"})
            continue
        t0 = time.perf_counter()
        end = child(ctx, module, _module_cmd(module, ctx.quick),
                    harness.share_s(left, len(MICRO_MODULES) - i, MICRO_FLOOR_S))
        _log(f"micro {module}: {end.status} ({time.perf_counter() - t0:.1f} s)")


def run_tests(ctx: Context) -> None:
    child(ctx, "pytest -m gpu", _module_cmd("pytest", ctx.quick), ctx.left())


# Shares of the budget in order of value; 7% stays in reserve for the files and the slack
# of killing a worker. --torch-compile adds its part and scales the others to make room.
PARTS = (
    Part("parity", "(a) end-to-end parity vs the float32 reference (mythos_1b, bf16)", 0.25,
         run_parity),
    Part("decode", "(b) mythos_1b batch-1 decode: CUDA graphs, eager steps, eager reference, "
         "vs the bandwidth floor", 0.20, run_decode),
    Part("throughput", "(c) batch 8 / 32 decode throughput", 0.12, run_throughput),
    Part("micro", "(d) kernel micro-benchmarks vs the roofline", 0.20, run_micro),
    Part("tests", "(e) GPU-marked tests", 0.16, run_tests),
)
COMPILE_PART = Part("compile", "torch.compile of the eager reference (--torch-compile)", 0.15,
                    run_compile)
PART_NAMES = tuple(p.name for p in PARTS) + (COMPILE_PART.name,)


def plan(names: Optional[Sequence[str]] = None, torch_compile: bool = False) -> list[Part]:
    """The parts to run, in order, with their shares (re-scaled to the parts chosen)."""
    parts = list(PARTS) + ([COMPILE_PART] if torch_compile else [])
    if names:
        unknown = set(names) - set(PART_NAMES)
        if unknown:
            raise ValueError(f"unknown part(s) {sorted(unknown)}; choose from {PART_NAMES}")
        parts = [p for p in parts if p.name in names]
        if COMPILE_PART.name in names and COMPILE_PART not in parts:
            parts.append(COMPILE_PART)
    used = sum(p.share for p in PARTS)  # the default plan's total: keep the same reserve
    total = sum(p.share for p in parts)
    return [dataclasses.replace(p, share=p.share * used / total) for p in parts]


def run_suite(out_dir: Optional[Path] = None, quick: bool = False,
              budget_s: Optional[float] = None, parts: Optional[list[Part]] = None) -> Record:
    """Run ``parts`` (default ``plan()``) within ``budget_s``; returns the final record."""
    t_start = time.perf_counter()
    budget = budget_s or (GPU_BUDGET_S if ON_GPU else CPU_QUICK_BUDGET_S if quick
                          else CPU_BUDGET_S)
    parts = parts if parts is not None else plan()
    prov = harness.provenance()
    ceilings = harness.measure_ceilings(quick=True)
    deadlines, at = [], 0.0
    for p in parts:
        at += p.share * budget
        deadlines.append(at)
    header = {"schema": harness.SCHEMA, "provenance": prov, "ceilings": ceilings.to_dict(),
              "ceilings_wall_s": round(time.perf_counter() - t_start, 2), "budget_s": budget,
              "quick": quick,
              "plan": [{"part": p.name, "title": p.title, "share": round(p.share, 4),
                        "budget_s": round(p.share * budget, 1), "deadline_s": round(d, 1)}
                       for p, d in zip(parts, deadlines)]}
    rec = Record(Path(out_dir) if out_dir else RESULTS_DIR, header)
    for p, d in zip(parts, deadlines):
        ctx = Context(p.name, t_start + d, rec, quick, ceilings)
        t0 = time.perf_counter()
        rec.part(p.name, status="running", started_s=round(t0 - t_start, 2),
                 budget_s=round(ctx.left(), 1))
        _log(f"part {p.name}: {p.title}; {ctx.left():.0f} s until its deadline")
        if ctx.left() < 2.0:
            rec.part(p.name, status="skipped", reason="no budget left", wall_s=0.0)
            ctx.add({"name": f"{p.name}", "status": "skipped", "reason": "no budget left"})
            continue
        try:
            p.run(ctx)
            status = part_status([r for r in rec.data["rows"] if r["part"] == p.name])
            rec.part(p.name, status=status, wall_s=round(time.perf_counter() - t0, 2))
        except Exception as exc:  # noqa: BLE001 - recorded; the later parts still run
            rec.part(p.name, status="error", wall_s=round(time.perf_counter() - t0, 2),
                     reason=f"{type(exc).__name__}: {exc}")
            ctx.add({"name": p.name, "status": "error", "reason": f"{type(exc).__name__}: {exc}"})
    rec.data["complete"] = True
    rec.flush()
    return rec


def part_status(rows: list[dict]) -> str:
    """ok: nothing failed; partial: something failed and something succeeded; failed:
    nothing succeeded; skipped: every row skipped or n/a (e.g. GPU tests on a CPU)."""
    bad = [r for r in rows if r.get("status") in ("failed", "error", "timeout")]
    good = [r for r in rows if r.get("status") == "ok"]
    if bad:
        return "partial" if good else "failed"
    return "ok" if good else ("skipped" if rows else "empty")


def _log(msg: str) -> None:
    print(f"[gpu_suite] {msg}", file=sys.stderr, flush=True)


# ---- report ------------------------------------------------------------------------------

def summary_rows(data: dict) -> list[dict]:
    """One line per planned part: status, time against its budget, and its key number."""
    out = []
    for p in data.get("plan", []):
        name = p["part"]
        info = data["parts"].get(name, {})
        rows = [r for r in data["rows"] if r["part"] == name]
        counts: dict[str, int] = {}
        for r in rows:
            counts[r.get("status", "?")] = counts.get(r.get("status", "?"), 0) + 1
        out.append({"part": name, "status": info.get("status", "not started"),
                    "wall_s": info.get("wall_s"), "budget_s": info.get("budget_s", p["budget_s"]),
                    "rows": ", ".join(f"{n} {s}" for s, n in sorted(counts.items())),
                    "key": _key_number(name, rows)})
    return out


def _key_number(part: str, rows: list[dict]) -> str:
    parity = [r for r in rows if "max_rel_err" in r]
    if part == "parity" and parity:
        r = parity[0]
        return (f"{r['preset']} B{r['batch']}: max rel err {r['max_rel_err']:.3g} "
                f"(bound {r['bound']:g}), greedy {100 * r['greedy_match']:.0f}%")
    if part in ("decode", "throughput", "compile"):
        return "; ".join(f"{r['system']} B{r['batch']}: {r['ms']:.3g} ms/token "
                         f"({r['pct_of_floor']:.3g}% of floor)"
                         for r in rows if r.get("status") == "ok")
    return ""


PART_COLUMNS = {
    "parity": ("name", "status", "max_rel_err", "mean_rel_err", "eager_rel_err", "bound",
               "greedy_match", "compile_s", "backends", "reason"),
    "decode": ("name", "status", "ms", "tok_s", "floor_ms", "pct_of_floor", "compile_s", "note",
               "reason"),
    "tests": ("name", "status", "wall_s", "reason"),
}
PART_COLUMNS["throughput"] = PART_COLUMNS["compile"] = PART_COLUMNS["decode"]


def to_markdown(data: dict) -> str:
    prov, c = data["provenance"], data["ceilings"]
    md = [f"# mythos-rt GPU suite — {prov.get('gpu') or 'CPU dry run (no GPU)'}, "
          f"{prov['date_utc']}\n",
          f"commit `{prov.get('git_commit')}`{' (dirty)' if prov.get('git_dirty') else ''}; "
          f"torch {prov['torch']}, triton {prov['triton']}, CUDA {prov.get('cuda_runtime')}, "
          f"driver {prov.get('driver', 'n/a')}; quick={data['quick']}; "
          f"wall {data['wall_s']} s of {data['budget_s']} s budget"
          f"{'' if data['complete'] else ' — INCOMPLETE (still running or killed)'}\n",
          f"Ceilings: {c['copy_gbps']} GB/s device copy, {c['bf16_tflops']} TFLOP/s bf16 "
          f"({c['source']})\n", "## Plan\n", harness.markdown_table(data["plan"]),
          "## Summary\n", harness.markdown_table(data["summary"])]
    for p in data["plan"]:
        rows = [r for r in data["rows"] if r["part"] == p["part"]]
        md += [f"## {p['title']}\n", harness.markdown_table(rows, PART_COLUMNS.get(p["part"]))]
    return "\n".join(md)


def validate(data: dict) -> None:
    """Raise ValueError if ``data`` does not have the suite's JSON shape (used by tests)."""
    need = {"schema": str, "provenance": dict, "ceilings": dict, "budget_s": (int, float),
            "wall_s": (int, float), "quick": bool, "plan": list, "parts": dict, "rows": list,
            "summary": list, "complete": bool}
    for k, typ in need.items():
        if not isinstance(data.get(k), typ):
            raise ValueError(f"result[{k!r}] missing or not {typ}")
    if data["schema"] != harness.SCHEMA:
        raise ValueError(f"schema {data['schema']!r} != {harness.SCHEMA!r}")
    for k in ("date_utc", "git_commit", "torch", "triton", "device"):
        if k not in data["provenance"]:
            raise ValueError(f"provenance lacks {k!r}")
    for k in ("copy_gbps", "bf16_tflops", "measured", "source"):
        if k not in data["ceilings"]:
            raise ValueError(f"ceilings lack {k!r}")
    planned = {p["part"] for p in data["plan"]}
    for r in data["rows"]:
        for k in ("part", "name", "status"):
            if k not in r:
                raise ValueError(f"a row lacks {k!r}: {r}")
        if r["part"] not in planned:
            raise ValueError(f"row of unplanned part {r['part']!r}: {r}")
        if r["status"] in ("timeout", "failed", "error", "skipped") and not (
                r.get("reason") or r.get("note") or "max_rel_err" in r):
            raise ValueError(f"a {r['status']} row gives no reason: {r}")
        if r["part"] in ("decode", "throughput", "compile") and r["status"] == "ok" and not all(
                k in r for k in ("ms", "floor_ms", "pct_of_floor")):
            raise ValueError(f"e2e ok row lacks timing/floor: {r}")


# ---- worker processes --------------------------------------------------------------------

class _TestRows:
    """pytest plugin: one row per test as soon as its outcome is known."""

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or (report.when == "setup" and not report.passed):
            status = {"passed": "ok", "failed": "failed", "skipped": "skipped"}[report.outcome]
            r = {"name": report.nodeid, "status": status,
                 "wall_s": round(report.duration, 3)}
            if report.skipped and isinstance(report.longrepr, tuple):
                r["reason"] = report.longrepr[2]
            elif report.failed:
                r["reason"] = str(report.longrepr).strip().splitlines()[-1][:300]
            harness.emit_row(r)


def _child_main(name: str, quick: bool) -> int:
    if name == "pytest":
        import pytest
        return int(pytest.main(["-m", "gpu", "-q", "-p", "no:cacheprovider",
                                str(harness.REPO / "tests")], plugins=[_TestRows()]) not in (0, 5))
    import importlib
    if not ON_GPU:
        torch.set_num_threads(harness.env_threads())
    mod = importlib.import_module(f"bench.{name}")
    for r in mod.iter_rows(quick):
        harness.emit_row(r)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help=f"directory for the result files (default {RESULTS_DIR})")
    p.add_argument("--quick", action="store_true", help="fewer cases and repeats")
    p.add_argument("--budget-s", type=float,
                   help=f"total time budget (default {GPU_BUDGET_S:.0f} s on GPU, "
                        f"{CPU_BUDGET_S:.0f} s on CPU, {CPU_QUICK_BUDGET_S:.0f} s CPU --quick)")
    p.add_argument("--parts", nargs="+", choices=PART_NAMES,
                   help="run only these parts, in the suite's order (default: all but compile)")
    p.add_argument("--torch-compile", action="store_true",
                   help="add the torch.compile rows (minutes of cold compiles per mode)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return _child_main(args.child, args.quick)
    if not ON_GPU:
        _log("no CUDA device: CPU dry run (tiny_mla, fp32, Triton interpreter; H100 "
             "ceilings from docs/design.md, not measured)")
    rec = run_suite(args.out, args.quick, args.budget_s, plan(args.parts, args.torch_compile))
    print(f"wrote {rec.json_path}, {rec.jsonl_path.name} and {rec.md_path.name}")
    print(harness.markdown_table(rec.data["summary"]), end="")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
