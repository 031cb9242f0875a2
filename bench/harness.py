"""Shared benchmark harness: timing, hardware ceilings, result rows.

Every benchmark module ``bench/bench_<op>.py`` exposes ``run(quick: bool) -> list[dict]``;
each row names the case and carries a median time plus the achieved rate against a
ceiling (never an absolute time alone). ``bench/gpu_suite.py`` collects them.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

# DESIGN.md's measured ceilings for one H100 80GB; gpu_suite re-measures them per run.
H100_COPY_GBPS = 3000.0
H100_BF16_TFLOPS = 798.0
L2_BYTES = 50 * 2**20  # H100 L2; rotate inputs larger than this for cold-cache timing


def time_ms(fn: Callable[[], object], warmup: int = 5, reps: int = 50) -> float:
    """Median wall time of fn() in milliseconds: CUDA events on GPU, perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def rotating(make: Callable[[], object], bytes_each: int, budget: int = 2 * L2_BYTES) -> Callable[[], object]:
    """Return a getter cycling over enough copies of make()'s inputs to exceed L2."""
    n = max(1, min(16, budget // max(1, bytes_each) + 1)) if torch.cuda.is_available() else 1
    sets = [make() for _ in range(n)]
    state = {"i": 0}

    def nxt():
        state["i"] = (state["i"] + 1) % n
        return sets[state["i"]]
    return nxt


def row(name: str, ms: float, *, bytes_moved: float = 0.0, flops: float = 0.0, **extra) -> dict:
    """A result row with achieved GB/s and TFLOP/s and their % of the H100 ceilings."""
    r = {"name": name, "ms": round(ms, 5)}
    if bytes_moved:
        gbps = bytes_moved / (ms * 1e-3) / 1e9
        r.update(gbps=round(gbps, 1), pct_hbm=round(100 * gbps / H100_COPY_GBPS, 1))
    if flops:
        tflops = flops / (ms * 1e-3) / 1e12
        r.update(tflops=round(tflops, 2), pct_bf16_peak=round(100 * tflops / H100_BF16_TFLOPS, 1))
    r.update(extra)
    return r
