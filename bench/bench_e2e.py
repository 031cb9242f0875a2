"""End-to-end benchmark: prefill tokens/s and decode ms/token, side by side with ratios.

Systems (same random weights, greedy):
  * ``mythos-rt``            — ``mythos_rt.compile(...)`` + ``Runtime.generate`` (graphs off)
  * ``mythos-rt+graphs``     — the same with CUDA graphs, when the runtime exposes a switch
                               (a ``cuda_graphs=`` compile kwarg or ``Runtime.use_cuda_graphs``);
                               otherwise reported as ``n/a``
  * ``eager``                — ``mythos_rt.reference.OpenMythos`` with its KV-cache dict
  * ``compile:<mode>``       — ``torch.compile`` of the eager reference's forward, modes
                               ``max-autotune-no-cudagraphs`` and ``reduce-overhead``

Cases (GPU, bf16, mythos_1b and mythos_3b): prefill of 512 / 2k / 8k tokens and decode at
batch 1 / 8 / 64 (128-token prompt), each at n_loops 8 / 16 / 32, in priority order
(n_loops 16 first). One timed run streams 1 + M greedy tokens with a device sync after
each: prefill time = start to the first token; decode ms/token = first token to the last,
over M. Both come from the same run (never the difference of two noisy runs), medians over
repeats, wall clock: what a caller streaming tokens sees. Every row carries the cost-model floor
(``mythos_rt.costmodel``) and % of it reached; non-mythos-rt rows carry ``x_vs_rt``
(their time / mythos-rt's; > 1 = slower than mythos-rt).

Each (model, system) runs in a worker subprocess under a share of ``--budget-s``; a
worker that runs out of time is killed and its remaining cases are listed as skipped,
so a slow ``torch.compile`` cannot take the suite past its budget. On CPU: the tiny_mla
config only, fp32, tiny lengths; torch.compile systems only when asked (``--systems``).

    python bench/bench_e2e.py [--quick] [--budget-s 240] [--preset mythos_1b ...]
                              [--checkpoint DIR] [--systems ...] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import env_threads  # noqa: E402
from mythos_rt import costmodel  # noqa: E402
from mythos_rt.config import MythosConfig  # noqa: E402

ON_GPU = torch.cuda.is_available()
SYSTEMS = ("mythos-rt", "mythos-rt+graphs", "eager", "compile:max-autotune-no-cudagraphs",
           "compile:reduce-overhead")
CPU_SYSTEMS = ("mythos-rt", "mythos-rt+graphs", "eager")
GPU_PRESETS = ("mythos_1b", "mythos_3b")
CPU_PRESETS = ("tiny_mla",)
ROW_TAG = "E2E_ROW "
DEFAULT_BUDGET_S = 240.0


@dataclass(frozen=True)
class Case:
    phase: str      # "prefill" | "decode"
    batch: int
    length: int     # prefill: tokens per row; decode: prompt (context) length
    n_loops: int
    new_tokens: int = 0  # decode steps timed

    @property
    def key(self) -> str:
        if self.phase == "prefill":
            return f"prefill/L{self.length}/T{self.n_loops}"
        return f"decode/B{self.batch}/T{self.n_loops}"


def cases(quick: bool, on_gpu: bool = ON_GPU) -> list[Case]:
    """Cases in priority order: what a short budget must not miss comes first."""
    if on_gpu:
        lens, batches, loops, prompt, new = (512, 2048, 8192), (1, 8, 64), (16, 8, 32), 128, 32
        if quick:
            lens, batches, loops, new = (512, 2048), (1, 8), (16, 32), 16
    else:
        lens, batches, loops, prompt, new = (16, 48), (1, 4), (4, 2), 8, 4
        if quick:
            lens, batches, loops, new = (16,), (1, 4), (4,), 3
    out = []
    for T in loops:  # n_loops 16 (GPU) / 4 (CPU) first, then the others
        for i in range(max(len(lens), len(batches))):
            if i < len(batches):
                out.append(Case("decode", batches[i], prompt, T, new))
            if i < len(lens):
                out.append(Case("prefill", 1, lens[i], T))
    return out


# ---- models (worker side) -------------------------------------------------------------------

def _bench_config(spec: dict) -> MythosConfig:
    """The preset, with max_seq_len raised to the longest case (random weights, RoPE only)."""
    cfg = MythosConfig.from_preset(spec["preset"])
    need = spec.get("max_seq_len", 0)
    if need > cfg.max_seq_len:
        cfg = dataclasses.replace(cfg, max_seq_len=need, max_output_tokens=max(cfg.max_output_tokens, need))
    return cfg


def _load(spec: dict, device: torch.device, dtype: torch.dtype):
    """(config, reference OpenMythos in eval mode) from a preset (random) or a checkpoint."""
    from mythos_rt.reference import OpenMythos
    if spec.get("checkpoint"):
        from mythos_rt.checkpoint import load_checkpoint
        cfg, sd = load_checkpoint(spec["checkpoint"])
        with torch.device(device):
            model = OpenMythos(cfg)
        model.load_state_dict(sd, strict=True)  # load_checkpoint guarantees strict names
    else:
        cfg = _bench_config(spec)
        torch.manual_seed(0)
        with torch.device(device):
            model = OpenMythos(cfg)
    return cfg, model.to(dtype).eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _token_times(tokens: Iterable[object], device: torch.device) -> tuple[float, float]:
    """(seconds to the first token, seconds from the first token to the last), synced per token."""
    _sync(device)
    t0 = time.perf_counter()
    marks = []
    for _ in tokens:
        _sync(device)
        marks.append(time.perf_counter())
    if not marks:
        raise RuntimeError("the system produced no token")
    return marks[0] - t0, marks[-1] - marks[0]


def _ref_stream(fwd: Callable, ids: torch.Tensor, new: int, n_loops: int) -> Iterator[torch.Tensor]:
    """Greedy cached decode with the reference's forward (eager or torch.compile'd), per token."""
    cache: dict = {}
    with torch.no_grad():
        logits = fwd(ids, n_loops=n_loops, kv_cache=cache)
        nxt = logits[:, -1:].argmax(-1)
        yield nxt
        for step in range(new - 1):
            logits = fwd(nxt, n_loops=n_loops, kv_cache=cache, start_pos=ids.shape[1] + step)
            nxt = logits[:, -1:].argmax(-1)
            yield nxt


def _graphs_switch() -> Optional[str]:
    import mythos_rt
    if "cuda_graphs" in inspect.signature(mythos_rt.compile).parameters:
        return "kwarg"
    if hasattr(mythos_rt.Runtime, "use_cuda_graphs"):
        return "attr"
    return None


class _RtSystem:
    """mythos-rt with one compiled Runtime per phase (sized for that phase's cases)."""

    def __init__(self, model, cfg, job: dict, device, dtype, graphs: bool):
        import mythos_rt
        self.mythos_rt, self.model, self.job = mythos_rt, model, job
        self.device, self.dtype, self.graphs = device, dtype, graphs
        self.runtimes: dict[str, object] = {}
        self.compile_s = 0.0

    def runtime(self, case: Case):
        if case.phase not in self.runtimes:
            sizes = self.job["sizes"][case.phase]
            kw = dict(device=self.device, dtype=self.dtype, backend=self.job.get("backend", "auto"),
                      max_batch_size=sizes["max_batch"], max_seq_len=sizes["max_seq_len"],
                      max_loops=sizes["max_loops"])
            switch = _graphs_switch()
            if switch == "kwarg":
                kw["cuda_graphs"] = self.graphs
            t0 = time.perf_counter()
            rt = self.mythos_rt.compile(self.model, **kw)
            if switch == "attr":
                rt.use_cuda_graphs = self.graphs
            self.compile_s += time.perf_counter() - t0
            self.runtimes[case.phase] = rt
        return self.runtimes[case.phase]

    def generator(self, case: Case) -> Callable[[torch.Tensor, int], Iterable[object]]:
        rt = self.runtime(case)
        return lambda ids, new: rt.stream(ids, new, n_loops=case.n_loops)


class _RefSystem:
    def __init__(self, model, mode: Optional[str]):
        self.fwd = model.forward if mode is None else torch.compile(model.forward, mode=mode)
        self.compile_s = 0.0

    def generator(self, case: Case) -> Callable[[torch.Tensor, int], Iterable[object]]:
        return lambda ids, new: _ref_stream(self.fwd, ids, new, case.n_loops)


def _measure_case(gen, case: Case, cfg: MythosConfig, device, reps: int) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (case.batch, case.length), generator=g).to(device)
    new = 1 + (case.new_tokens if case.phase == "decode" else 0)
    t0 = time.perf_counter()
    _token_times(gen(ids, new), device)  # warm-up (compiles, autotunes)
    r = {"first_call_s": round(time.perf_counter() - t0, 3)}
    runs = [_token_times(gen(ids, new), device) for _ in range(reps)]
    if case.phase == "prefill":
        s = statistics.median(p for p, _ in runs)
        ms, tok_s = s * 1e3, case.batch * case.length / s
    else:
        s = statistics.median(d for _, d in runs) / case.new_tokens
        ms, tok_s = s * 1e3, case.batch / s
    r.update(ms=ms, tok_s=round(tok_s, 2))
    return r


def _floors(cfg: MythosConfig, case: Case, ms: float, dtype: torch.dtype,
            ceilings: costmodel.Ceilings) -> dict:
    if case.phase == "prefill":
        floor = costmodel.prefill_floor_ms(cfg, case.batch * case.length, case.n_loops,
                                           ceilings=ceilings)
        work = costmodel.achieved(ms, flops=case.batch * case.length *
                                  costmodel.prefill_flops_per_token(cfg, case.n_loops),
                                  ceilings=ceilings)
    else:
        ctx = case.length + case.new_tokens // 2
        floor = costmodel.decode_floor_ms(cfg, case.n_loops, batch=case.batch, context=ctx,
                                          dtype=dtype, ceilings=ceilings)
        work = costmodel.achieved(ms, bytes_moved=costmodel.decode_step_bytes(
            cfg, case.n_loops, batch=case.batch, context=ctx, dtype=dtype), ceilings=ceilings)
    return {"floor_ms": round(floor, 4), "pct_of_floor": round(100 * floor / ms, 2), **work}


def worker(job: dict) -> None:
    """Run one (model, system)'s cases; print one ``E2E_ROW {json}`` line per case."""
    device = torch.device(job["device"])
    dtype = getattr(torch, job["dtype"])
    torch.set_num_threads(job.get("threads", torch.get_num_threads()))
    ceilings = costmodel.Ceilings(**job["ceilings"])
    cfg, model = _load(job["spec"], device, dtype)
    system = job["system"]
    if system.startswith("mythos-rt"):
        sysobj = _RtSystem(model, cfg, job, device, dtype, graphs=system.endswith("+graphs"))
    else:
        sysobj = _RefSystem(model, None if system == "eager" else system.split(":", 1)[1])
    for c in job["cases"]:
        case = Case(**c)
        base = {"preset": job["label"], "system": system, **dataclasses.asdict(case),
                "dtype": job["dtype"], "device": job["device"]}
        try:
            res = _measure_case(sysobj.generator(case), case, cfg, device, job["reps"])
            res.update(_floors(cfg, case, res["ms"], dtype, ceilings))
            res["ms"] = round(res["ms"], 4)
            res["status"] = "ok"
            if sysobj.compile_s:
                res["compile_s"] = round(sysobj.compile_s, 2)
        except Exception as exc:  # noqa: BLE001 - one failing case must not stop the others
            res = {"status": "error", "note": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"}
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print(ROW_TAG + json.dumps({**base, **res}), flush=True)


# ---- orchestration (parent side) ------------------------------------------------------------

def _sizes(case_list: list[Case]) -> dict:
    sizes = {}
    for phase in ("prefill", "decode"):
        cs = [c for c in case_list if c.phase == phase]
        if cs:
            sizes[phase] = {"max_batch": max(c.batch for c in cs),
                            "max_seq_len": max(c.length + c.new_tokens + 1 for c in cs),
                            "max_loops": max(c.n_loops for c in cs)}
    return sizes


def _name(r: dict) -> str:
    c = Case(r["phase"], r["batch"], r["length"], r["n_loops"], r.get("new_tokens", 0))
    return f"e2e/{r['preset']}/{c.key}/{r['system']}"


def _run_worker(job: dict, timeout_s: float, log: Callable[[str], None]) -> tuple[list[dict], str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    status = "ok"
    try:
        out, err = proc.communicate(timeout=max(1.0, timeout_s))
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        status = f"timed out after {timeout_s:.0f} s (budget share)"
    rows = [json.loads(line[len(ROW_TAG):]) for line in out.splitlines() if line.startswith(ROW_TAG)]
    if proc.returncode not in (0, None) and status == "ok":
        tail = (err.strip().splitlines() or ["no stderr"])[-1][:300]
        status = f"worker exited {proc.returncode}: {tail}"
    return rows, status


def run_e2e(specs: Optional[list[dict]] = None, *, quick: bool = False,
            budget_s: float = DEFAULT_BUDGET_S, systems: Optional[list[str]] = None,
            device: Optional[str] = None, dtype: Optional[str] = None,
            ceilings: Optional[costmodel.Ceilings] = None, threads: Optional[int] = None,
            log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> dict:
    """Run the e2e set within ``budget_s``; returns {"rows", "skipped", "notes", ...}.

    specs: [{"preset": name}] or [{"checkpoint": path}]; default mythos_1b + mythos_3b on
    GPU, tiny_mla on CPU.
    """
    t_start = time.perf_counter()
    device = device or ("cuda" if ON_GPU else "cpu")
    on_gpu = device.startswith("cuda")
    dtype = dtype or ("bfloat16" if on_gpu else "float32")
    specs = specs or [{"preset": p} for p in (GPU_PRESETS if on_gpu else CPU_PRESETS)]
    systems = list(systems or (SYSTEMS if on_gpu else CPU_SYSTEMS))
    for s in systems:
        if s not in SYSTEMS:
            raise ValueError(f"unknown system {s!r}; choose from: {', '.join(SYSTEMS)}")
    ceilings = ceilings or costmodel.H100
    case_list = cases(quick, on_gpu)
    notes, rows, skipped = [], [], []
    if not ceilings.measured:
        notes.append(f"floors use {ceilings.source}")
    switch = _graphs_switch()
    groups = []
    for spec in specs:
        label = spec.get("preset") or Path(spec["checkpoint"]).name
        spec_cases = case_list
        if spec.get("checkpoint"):
            from mythos_rt.checkpoint import load_checkpoint  # config only, weights mmapped
            cfg, _ = load_checkpoint(spec["checkpoint"])
            too_long = [c for c in spec_cases if c.length + c.new_tokens + 1 > cfg.max_seq_len]
            skipped += [{"name": f"e2e/{label}/{c.key}/*", "reason": f"needs {c.length + c.new_tokens + 1} "
                         f"positions > the checkpoint's max_seq_len={cfg.max_seq_len}"} for c in too_long]
            spec_cases = [c for c in spec_cases if c not in too_long]
        else:
            spec = {**spec, "max_seq_len": max(c.length + c.new_tokens + 1 for c in spec_cases)}
        for system in systems:
            if system == "mythos-rt+graphs" and (switch is None or not on_gpu):
                why = ("CUDA graphs need a GPU" if not on_gpu else
                       "the runtime exposes no CUDA-graph switch yet (graphs= / use_cuda_graphs)")
                rows += [{"name": f"e2e/{label}/{c.key}/{system}", "preset": label, "system": system,
                          **dataclasses.asdict(c), "status": "n/a", "note": why} for c in spec_cases]
                continue
            groups.append((label, spec, system, spec_cases))
    for i, (label, spec, system, spec_cases) in enumerate(groups):
        left = budget_s - (time.perf_counter() - t_start)
        share = left / (len(groups) - i)
        if left < 2.0:
            skipped += [{"name": f"e2e/{label}/{c.key}/{system}", "reason": "time budget spent"}
                        for c in spec_cases]
            continue
        job = {"spec": spec, "label": label, "system": system, "device": device, "dtype": dtype,
               "cases": [dataclasses.asdict(c) for c in spec_cases], "sizes": _sizes(spec_cases),
               "reps": 2 if (quick or not on_gpu) else 3, "ceilings": ceilings.to_dict(),
               "threads": threads or (torch.get_num_threads() if on_gpu else env_threads())}
        t0 = time.perf_counter()
        got, status = _run_worker(job, share, log)
        log(f"e2e {label} {system}: {len(got)}/{len(spec_cases)} cases in "
            f"{time.perf_counter() - t0:.1f} s ({status})")
        done = {(r["phase"], r["batch"], r["length"], r["n_loops"]) for r in got}
        for r in got:
            r["name"] = _name(r)
        rows += got
        for c in spec_cases:
            if (c.phase, c.batch, c.length, c.n_loops) not in done:
                skipped.append({"name": f"e2e/{label}/{c.key}/{system}", "reason": status})
    _add_ratios(rows)
    return {"rows": rows, "skipped": skipped, "notes": notes, "budget_s": budget_s,
            "wall_s": round(time.perf_counter() - t_start, 2), "quick": quick,
            "device": device, "dtype": dtype, "systems": systems,
            "graphs_switch": switch or "none"}


def _add_ratios(rows: list[dict]) -> None:
    """x_vs_rt = this system's time / mythos-rt's on the same case (> 1: slower)."""
    key = lambda r: (r["preset"], r["phase"], r["batch"], r["length"], r["n_loops"])  # noqa: E731
    base = {key(r): r["ms"] for r in rows if r["system"] == "mythos-rt" and r.get("status") == "ok"}
    for r in rows:
        if r["system"] != "mythos-rt" and r.get("status") == "ok" and key(r) in base:
            r["x_vs_rt"] = round(r["ms"] / base[key(r)], 3)


def run(quick: bool) -> list[dict]:
    """gpu_suite / harness entry point: the default e2e set, budget-limited."""
    res = run_e2e(quick=quick, budget_s=120.0 if quick else DEFAULT_BUDGET_S)
    return res["rows"] + [{"name": s["name"], "status": "skipped", "note": s["reason"]}
                          for s in res["skipped"]]


TABLE_COLUMNS = ("preset", "phase", "batch", "length", "n_loops", "system", "status", "ms",
                 "tok_s", "floor_ms", "pct_of_floor", "x_vs_rt", "note")


def format_table(result: dict) -> str:
    from bench.harness import markdown_table
    lines = [markdown_table(result["rows"], TABLE_COLUMNS)]
    if result["skipped"]:
        lines.append(f"{len(result['skipped'])} case(s) skipped: " + "; ".join(
            sorted({s['reason'] for s in result['skipped']})) + "\n")
    for n in result["notes"]:
        lines.append(f"note: {n}\n")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S)
    p.add_argument("--preset", action="append", help="preset name (repeatable)")
    p.add_argument("--checkpoint", help="benchmark this checkpoint instead of random presets")
    p.add_argument("--systems", nargs="+", choices=SYSTEMS)
    p.add_argument("--device")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--out", type=Path, help="write the result JSON here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    specs = ([{"checkpoint": args.checkpoint}] if args.checkpoint
             else [{"preset": n} for n in args.preset] if args.preset else None)
    res = run_e2e(specs, quick=args.quick, budget_s=args.budget_s, systems=args.systems,
                  device=args.device, dtype=args.dtype)
    print(format_table(res))
    if args.out:
        from bench.harness import provenance, write_json
        write_json(args.out, {"provenance": provenance(), "e2e": res})
        print(f"wrote {args.out}")
    return 0 if any(r.get("status") == "ok" for r in res["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
