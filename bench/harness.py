"""Shared benchmark harness: timing, hardware ceilings, provenance, result files.

Every benchmark module ``bench/bench_<op>.py`` exposes ``run(quick: bool) -> list[dict]``;
each row names the case and carries a median time plus the achieved rate against a
ceiling (never an absolute time alone). ``bench/gpu_suite.py`` collects them.

Timing (``measure``): warm-up calls, then CUDA events around each call on GPU
(perf_counter on CPU), median over many repeats. Cold-cache timing rotates among
enough input sets to exceed L2 (``rotating``), so a kernel cannot read last repeat's
inputs from cache. Ceilings (``measure_ceilings``) are measured in the same run on GPU;
on CPU docs/design.md's H100 numbers are returned, marked as not measured.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mythos_rt.costmodel import H100, Ceilings  # noqa: E402
from mythos_rt.cpu import native  # noqa: E402

# docs/design.md's measured ceilings for one H100 80GB; gpu_suite re-measures them per run.
H100_COPY_GBPS = H100.copy_gbps
H100_BF16_TFLOPS = H100.bf16_tflops
L2_BYTES = 50 * 2**20  # H100 L2; rotate inputs larger than this for cold-cache timing
REPO = Path(__file__).resolve().parents[1]
SCHEMA = "mythos-rt-bench/1"


# ---- timing ----------------------------------------------------------------------------

@dataclass
class Timing:
    """Distribution of one measurement, in milliseconds."""
    median_ms: float
    min_ms: float
    p10_ms: float
    p90_ms: float
    reps: int
    warmup: int
    timer: str  # "cuda_events" | "perf_counter"

    def to_dict(self) -> dict:
        return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def _quantile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def measure(fn: Callable[..., object], *, warmup: int = 5, reps: int = 50,
            inputs: Optional[Callable[[], object]] = None,
            device: Optional[torch.device] = None) -> Timing:
    """Time fn() (or fn(inputs()) with a rotating getter): warm-up, then ``reps`` timed calls.

    On CUDA each call sits between two recorded events (one event pair per call, read
    after a single synchronize at the end, so timing adds no host sync per call); on
    CPU perf_counter around each call.
    """
    cuda = (device.type == "cuda") if device is not None else torch.cuda.is_available()
    call = (lambda: fn(inputs())) if inputs is not None else fn
    for _ in range(warmup):
        call()
    reps = max(1, reps)
    if cuda:
        torch.cuda.synchronize()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(reps)]
        for start, end in events:
            start.record()
            call()
            end.record()
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) for s, e in events]
        timer = "cuda_events"
    else:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            call()
            times.append((time.perf_counter() - t0) * 1e3)
        timer = "perf_counter"
    return Timing(statistics.median(times), min(times), _quantile(times, 0.1),
                  _quantile(times, 0.9), reps, warmup, timer)


def time_ms(fn: Callable[[], object], warmup: int = 5, reps: int = 50) -> float:
    """Median wall time of fn() in milliseconds: CUDA events on GPU, perf_counter on CPU."""
    return measure(fn, warmup=warmup, reps=reps).median_ms


def rotating(make: Callable[[], object], bytes_each: int, budget: int = 2 * L2_BYTES) -> Callable[[], object]:
    """Return a getter cycling over enough copies of make()'s inputs to exceed L2."""
    n = max(1, min(16, budget // max(1, bytes_each) + 1)) if torch.cuda.is_available() else 1
    sets = [make() for _ in range(n)]
    state = {"i": 0}

    def nxt():
        state["i"] = (state["i"] + 1) % n
        return sets[state["i"]]
    return nxt


def row(name: str, ms: float, *, bytes_moved: float = 0.0, flops: float = 0.0,
        ceilings: Ceilings = H100, **extra) -> dict:
    """A result row with achieved GB/s and TFLOP/s and their % of the ceilings."""
    r = {"name": name, "ms": round(ms, 5)}
    if bytes_moved:
        gbps = bytes_moved / (ms * 1e-3) / 1e9
        r.update(gbps=round(gbps, 1), pct_hbm=round(100 * gbps / ceilings.copy_gbps, 1))
    if flops:
        tflops = flops / (ms * 1e-3) / 1e12
        r.update(tflops=round(tflops, 2), pct_bf16_peak=round(100 * tflops / ceilings.bf16_tflops, 1))
    r.update(extra)
    return r


# ---- ceilings --------------------------------------------------------------------------

def measure_ceilings(quick: bool = False, device: Optional[torch.device] = None) -> Ceilings:
    """Device-to-device copy GB/s and large bf16 matmul TFLOP/s, measured now.

    Copy: a 1 GiB (256 MiB quick) buffer copied into another, counting read + write.
    Matmul: 8192³ (4096³ quick) bf16, 2·M·N·K FLOPs. Without CUDA: docs/design.md's H100
    numbers, ``measured=False``.
    """
    cuda = (device.type == "cuda") if device is not None else torch.cuda.is_available()
    if not cuda:
        return H100
    dev = device or torch.device("cuda")
    reps = 10 if quick else 30
    nbytes = (256 if quick else 1024) * 2**20
    n = 4096 if quick else 8192
    copy_ms, mm_ms = _copy_ms(dev, nbytes, reps), _matmul_ms(dev, n, reps)
    torch.cuda.empty_cache()
    return Ceilings(copy_gbps=round(2 * nbytes / (copy_ms * 1e-3) / 1e9, 1),
                    bf16_tflops=round(2 * n**3 / (mm_ms * 1e-3) / 1e12, 1),
                    measured=True,
                    source=f"measured: {nbytes >> 20} MiB D2D copy (read+write), "
                           f"{n}^3 bf16 matmul, median")


def _copy_ms(dev: torch.device, nbytes: int, reps: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    return measure(lambda: dst.copy_(src), warmup=3, reps=reps, device=dev).median_ms


def _matmul_ms(dev: torch.device, n: int, reps: int) -> float:
    a, b = (torch.randn(n, n, device=dev, dtype=torch.bfloat16) for _ in range(2))
    c = torch.empty(n, n, device=dev, dtype=torch.bfloat16)
    return measure(lambda: torch.matmul(a, b, out=c), warmup=5, reps=reps, device=dev).median_ms


# ---- provenance ------------------------------------------------------------------------

def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def nvml_info(index: int = 0) -> dict:
    """Driver, clocks, power limit and memory from NVML, or {"nvml": "unavailable: ..."}."""
    try:
        import pynvml
    except ImportError as exc:
        return {"nvml": f"unavailable: nvidia-ml-py not importable ({exc})"}
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # noqa: BLE001 - NVMLError_* (no driver / no GPU)
        return {"nvml": f"unavailable: {exc}"}
    try:
        h = pynvml.nvmlDeviceGetHandleByIndex(index)
        info = {"nvml": "ok", "driver": _s(pynvml.nvmlSystemGetDriverVersion()),
                "nvml_name": _s(pynvml.nvmlDeviceGetName(h))}
        for key, fn in (("sm_clock_mhz", lambda: pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM)),
                        ("mem_clock_mhz", lambda: pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_MEM)),
                        ("max_sm_clock_mhz", lambda: pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM)),
                        ("max_mem_clock_mhz", lambda: pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_MEM)),
                        ("power_limit_w", lambda: pynvml.nvmlDeviceGetEnforcedPowerLimit(h) / 1000),
                        ("memory_total_gib", lambda: pynvml.nvmlDeviceGetMemoryInfo(h).total / 2**30),
                        ("temperature_c", lambda: pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU))):
            try:
                info[key] = round(fn(), 2)
            except Exception as exc:  # noqa: BLE001 - some queries are unsupported per SKU
                info[key] = f"unavailable: {exc}"
        return info
    finally:
        pynvml.nvmlShutdown()


def _s(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def provenance() -> dict:
    """Where and with what a result was produced (no hostname, no user name)."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    commit = _git("rev-parse", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    p = {"date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
         "git_commit": commit, "git_dirty": bool(dirty) if dirty is not None else None,
         "python": platform.python_version(), "torch": torch.__version__,
         "triton": triton_version, "cuda_runtime": torch.version.cuda,
         "os": f"{platform.system()} {platform.release()}", "cpu": native.cpu_facts()["cpu"],
         "cpu_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        p.update(device="cuda", gpu=props.name, gpu_capability=f"{props.major}.{props.minor}",
                 gpu_sms=props.multi_processor_count,
                 gpu_memory_gib=round(props.total_memory / 2**30, 1))
        p.update(nvml_info(0))
    else:
        p.update(device="cpu", gpu=None, nvml="unavailable: no CUDA device")
    return p


def device_slug(prov: dict) -> str:
    """'h100-80gb-hbm3' from 'NVIDIA H100 80GB HBM3'; 'cpu' without a GPU."""
    name = prov.get("gpu") or "cpu"
    name = name.replace("NVIDIA", "").strip().lower()
    return "".join(c if c.isalnum() else "-" for c in name).strip("-") or "gpu"


# ---- result files ----------------------------------------------------------------------

def _fmt(v) -> str:
    if isinstance(v, float):
        if v != v:
            return "nan"
        if abs(v) >= 100:
            return f"{v:.1f}"
        return f"{v:.3g}" if abs(v) < 1 else f"{v:.2f}"
    if v is None:
        return ""
    return str(v).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Iterable[dict], columns: Optional[Sequence[str]] = None) -> str:
    """A GitHub Markdown table of dict rows (columns: given, else keys in first-seen order)."""
    rows = list(rows)
    if not rows:
        return "_no rows_\n"
    if columns is None:
        columns = []
        for r in rows:
            columns += [k for k in r if k not in columns and not isinstance(r[k], (dict, list))]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def write_json(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")
    return path


def results_stem(prov: dict) -> str:
    return f"{prov['date_utc'][:10]}-{device_slug(prov)}"


def env_threads() -> int:
    """CPU threads the benchmarks use: MYTHOS_BENCH_THREADS, default 1.

    CPU numbers are smoke results; on a shared 2-core CI machine intra-op threads
    oversubscribe and a tiny forward varies 50x (20 ms vs 1.4 s), one thread does not.
    """
    return max(1, int(os.environ.get("MYTHOS_BENCH_THREADS", "1")))


def bench_main(run, cols: list[str], description: str, argv=None) -> None:
    """The command line every ``bench_<op>.py`` shares: ``[--quick] [--json]``, then a table."""
    import argparse
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true", help="print rows as JSON")
    args = ap.parse_args(argv)
    rows = run(args.quick)
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r.get(c, "")) for c in cols))


# ---- subprocesses that stream rows -----------------------------------------------------

ROW_TAG = "BENCH_ROW "


def emit_row(r: dict) -> None:
    """Print one result row for a parent reading this process with ``stream_rows``."""
    print(ROW_TAG + json.dumps(r, default=str), flush=True)


@dataclass
class Finished:
    """How a streamed subprocess ended: ``status`` ok | failed | timeout, and why."""
    status: str
    reason: str
    returncode: Optional[int]
    stderr_tail: str


def stream_rows(cmd: Sequence[str], timeout_s: float, on_row: Callable[[dict], None],
                cwd: Optional[Path] = None, env: Optional[dict] = None) -> Finished:
    """Run ``cmd``, calling ``on_row`` for each row it emits (``emit_row``) as it arrives.

    A process that outlives ``timeout_s`` is killed with its whole process group (Triton
    compiles in children); rows it emitted before are kept by the caller's ``on_row``.
    A kernel fault poisons the CUDA context of the process it happens in, which is why
    each benchmark group runs in its own process.
    """
    proc = subprocess.Popen(list(cmd), cwd=cwd or REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    err: list[str] = []
    drain = threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True)
    drain.start()
    killed = threading.Event()

    def on_timeout():
        killed.set()
        _kill_group(proc)
    timer = threading.Timer(max(0.5, timeout_s), on_timeout)
    timer.start()
    try:
        for line in proc.stdout:
            at = line.find(ROW_TAG)  # pytest's progress characters may precede it
            if at >= 0:
                on_row(json.loads(line[at + len(ROW_TAG):]))
        proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:  # on_row raised: leave no orphan behind
            _kill_group(proc)
            proc.wait()
    drain.join(timeout=5)
    tail = "".join(err)[-4000:]
    if killed.is_set():
        return Finished("timeout", f"killed after {timeout_s:.0f} s (its budget share)",
                        proc.returncode, tail)
    if proc.returncode != 0:
        last = (tail.strip().splitlines() or ["no stderr"])[-1][:300]
        return Finished("failed", f"exited {proc.returncode}: {last}", proc.returncode, tail)
    return Finished("ok", "", 0, tail)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def share_s(left_s: float, n_left: int, floor_s: float) -> float:
    """Time for the next of ``n_left`` jobs sharing ``left_s``: at least an equal share,
    and as much more as keeps ``floor_s`` (at most an equal share) for each later one.

    The first job of a group pays cold compiles the later ones find cached, so equal
    shares starve it; a floor keeps one slow job from starving the rest.
    """
    equal = left_s / max(1, n_left)
    return max(equal, left_s - min(equal, floor_s) * (n_left - 1))
