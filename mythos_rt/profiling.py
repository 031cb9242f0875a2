"""Latency profiling of a compiled Runtime: per stage, per kernel, telemetry, ACT, roofline.

``profile(runtime_or_path, prompt_len, new_tokens, n_loops, out_dir)`` runs one greedy
``generate`` several times:

1. warm-up (kernels compile / autotune; not recorded);
2. a stage-timed run: a step observer (``Runtime.observe``) times every Step of the
   runtime's plan — CUDA events on GPU (read after the run, so timing adds no host sync
   per step), perf_counter on CPU — and step times are grouped into stages by name:
   ``embed``/``prelude.*`` → prelude; ``*[t=i]`` → loop[i]; ``loop_result`` → loop_exit;
   ``coda.*`` → coda; ``norm``/``logits`` → head; ``advance_cache_lens`` → cache.
   Sampling runs outside the plan and is timed on its own (same logits shape);
   NVML telemetry is sampled in a background thread during this run;
3. a ``torch.profiler`` run with each step labelled (``record_function``): per-kernel
   times and a Chrome trace (``trace.json``, open in chrome://tracing or Perfetto);
4. a stateless forward over the prompt recording, after each loop, how many positions
   have halted (ACT statistics, from the runtime's ACT state buffers).

Writes ``profile.json``, ``trace.json`` and ``roofline.png`` (when matplotlib is
importable) into ``out_dir``. The roofline places each op kind by its arithmetic
intensity from ``mythos_rt.costmodel`` at its measured TFLOP/s, under the ceilings of the
device the profile ran on, measured in the same run (``measure_ceilings``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import statistics
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional, Union

import torch

from . import costmodel
from .config import MythosConfig
from .cpu import native
from .errors import InputError
from .lower import Shape, Step

PROFILE_SCHEMA = "mythos-rt-profile/1"
DEFAULT_PROMPT_LEN, DEFAULT_NEW_TOKENS = 128, 16

# plan Step kind → roofline op group (and the cost-model OpCost names in each group)
KIND_GROUP = {"embed": "embed", "rmsnorm": "norm", "add_rmsnorm": "norm", "add": "norm",
              "mla_attention": "attention", "gqa_attention": "attention", "moe": "moe",
              "dense_ffn": "dense_ffn", "loop_prologue": "recurrent_step",
              "loop_epilogue": "recurrent_step", "copy": "recurrent_step", "head": "head"}
COST_GROUP = {"embed": "embed", "rmsnorm": "norm", "attention (prelude+coda)": "attention",
              "attention (loop)": "attention", "dense_ffn": "dense_ffn", "router": "moe",
              "routed_experts": "moe", "shared_experts": "moe", "recurrent_step": "recurrent_step",
              "head": "head"}
_LOOP_RE = re.compile(r"\[t=(\d+)\]$")
_LABEL_RE = re.compile(r"^(prelude|loop\[\d+\]|loop_exit|coda|head|cache|other):")

# NVML clock-event ("throttle") reason bits, nvml.h
THROTTLE_BITS = {0x1: "gpu_idle", 0x2: "applications_clocks_setting", 0x4: "sw_power_cap",
                 0x8: "hw_slowdown", 0x10: "sync_boost", 0x20: "sw_thermal_slowdown",
                 0x40: "hw_thermal_slowdown", 0x80: "hw_power_brake_slowdown",
                 0x100: "display_clock_setting"}


def stage_of(step_name: str) -> str:
    """Stage a plan step belongs to (see the module docstring)."""
    m = _LOOP_RE.search(step_name)
    if m:
        return f"loop[{int(m.group(1))}]"
    if step_name == "embed" or step_name.startswith("prelude."):
        return "prelude"
    if step_name.startswith("coda."):
        return "coda"
    if step_name in ("norm", "logits") or step_name.startswith("head"):
        return "head"
    if step_name == "loop_result":
        return "loop_exit"
    if step_name == "depth_start":  # lazy depth's entry: the chunk joins the store
        return "loop[0]"
    if step_name == "advance_cache_lens":
        return "cache"
    return "other"


def _stage_order(stage: str) -> tuple:
    m = re.match(r"loop\[(\d+)\]", stage)
    order = {"prelude": 0, "loop_exit": 2, "coda": 3, "head": 4, "cache": 5, "sampling": 6,
             "other": 7}
    return (1, int(m.group(1))) if m else (order.get(stage, 8), 0)


# ---- step timers --------------------------------------------------------------------------

class _StepTimer:
    """A step observer (``Runtime.observe``) timing every plan step of one run.

    Records (phase, step name, kind, start, end) per step execution; phase is "prefill"
    while the first ``n_prefill`` plan executions run (a plan execution starts with the
    step named ``first_step``), "decode" afterwards. ``label`` names each step in
    ``torch.profiler`` traces; ``after[step name](shape)`` runs after that step.
    """

    def __init__(self, first_step: str, device: torch.device, n_prefill: int,
                 label: bool = False, after: Optional[dict] = None):
        self.first_step, self.cuda = first_step, device.type == "cuda"
        self.n_prefill, self.label, self.after = n_prefill, label, after or {}
        self.records: list[tuple[str, str, str, Any, Any]] = []
        self.executions = 0
        self._label: Optional[contextlib.AbstractContextManager] = None
        self._start: Any = None

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def on_step_start(self, step: Step, shape: Shape) -> None:
        if step.name == self.first_step:
            self.executions += 1
        if self.label:
            self._label = torch.profiler.record_function(f"{stage_of(step.name)}:{step.name}")
            self._label.__enter__()
        self._start = self._now()

    def on_step_end(self, step: Step, shape: Shape) -> None:
        end = self._now()
        if self._label is not None:
            self._label.__exit__(None, None, None)
            self._label = None
        phase = "prefill" if self.executions <= self.n_prefill else "decode"
        self.records.append((phase, step.name, step.kind, self._start, end))
        post = self.after.get(step.name)
        if post is not None:
            post(shape)

    def times(self) -> list[tuple[str, str, str, float]]:
        """(phase, name, kind, ms) per execution (synchronizes once on GPU)."""
        if self.cuda:
            torch.cuda.synchronize()
            return [(p, n, k, a.elapsed_time(b)) for p, n, k, a, b in self.records]
        return [(p, n, k, (b - a) * 1e3) for p, n, k, a, b in self.records]


# ---- telemetry ----------------------------------------------------------------------------

class Telemetry:
    """NVML samples (clocks, power, temperature, memory, throttle reasons) in a thread."""

    def __init__(self, device: torch.device, interval_s: float = 0.02):
        self.interval_s, self.samples, self.reason = interval_s, [], None
        self._stop, self._thread, self._nvml, self._h = threading.Event(), None, None, None
        if device.type != "cuda":
            self.reason = f"telemetry unavailable: device is {device.type}, not a CUDA GPU"
            return
        try:
            import pynvml
        except ImportError as exc:
            self.reason = f"telemetry unavailable: nvidia-ml-py not importable ({exc})"
            return
        try:
            pynvml.nvmlInit()
            self._h = self._handle(pynvml, device)
            self._nvml = pynvml
        except Exception as exc:  # noqa: BLE001 - NVMLError_* : no driver, no permission
            self.reason = f"telemetry unavailable: NVML init failed ({exc})"

    @staticmethod
    def _handle(nv, device: torch.device):
        """NVML handle of the torch device: by PCI address (CUDA_VISIBLE_DEVICES may
        renumber devices), else by index."""
        props = torch.cuda.get_device_properties(device)
        try:
            bus = (f"{getattr(props, 'pci_domain_id', 0):08X}:{props.pci_bus_id:02X}:"
                   f"{props.pci_device_id:02X}.0")
            return nv.nvmlDeviceGetHandleByPciBusId(bus)
        except Exception:  # noqa: BLE001 - older torch without PCI ids, or NVML mismatch
            return nv.nvmlDeviceGetHandleByIndex(device.index or torch.cuda.current_device())

    def _sample(self) -> dict:
        nv, h = self._nvml, self._h
        s = {"t_s": time.perf_counter()}
        probes = {
            "sm_clock_mhz": lambda: nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM),
            "mem_clock_mhz": lambda: nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_MEM),
            "power_w": lambda: nv.nvmlDeviceGetPowerUsage(h) / 1000.0,
            "temperature_c": lambda: nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU),
            "memory_used_gib": lambda: nv.nvmlDeviceGetMemoryInfo(h).used / 2**30,
            "gpu_util_pct": lambda: nv.nvmlDeviceGetUtilizationRates(h).gpu,
            "throttle_mask": lambda: (nv.nvmlDeviceGetCurrentClocksEventReasons(h)
                                      if hasattr(nv, "nvmlDeviceGetCurrentClocksEventReasons")
                                      else nv.nvmlDeviceGetCurrentClocksThrottleReasons(h)),
        }
        for k, fn in probes.items():
            try:
                s[k] = fn()
            except Exception:  # noqa: BLE001 - unsupported on this SKU: leave it out
                pass
        return s

    def _loop(self):
        while not self._stop.is_set():
            self.samples.append(self._sample())
            self._stop.wait(self.interval_s)

    def __enter__(self):
        if self._nvml is not None:
            self._thread = threading.Thread(target=self._loop, name="nvml-telemetry", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=2)
            self.samples.append(self._sample())
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()
        return False

    def summary(self) -> dict:
        if self.reason:
            return {"available": False, "reason": self.reason}
        if not self.samples:
            return {"available": False, "reason": "telemetry unavailable: no samples taken"}
        out: dict = {"available": True, "interval_s": self.interval_s, "n_samples": len(self.samples)}
        t0 = self.samples[0]["t_s"]
        keys = [k for k in self.samples[0] if k not in ("t_s", "throttle_mask")]
        for k in keys:
            vals = [s[k] for s in self.samples if k in s]
            if vals:
                out[k] = {"min": round(min(vals), 2), "median": round(statistics.median(vals), 2),
                          "max": round(max(vals), 2)}
        mask = 0
        for s in self.samples:
            mask |= int(s.get("throttle_mask", 0))
        out["throttle_reasons_seen"] = [n for bit, n in THROTTLE_BITS.items() if mask & bit]
        out["samples"] = [{k: (round(v - t0, 4) if k == "t_s" else v) for k, v in s.items()}
                          for s in self.samples]
        return out


# ---- the profile ----------------------------------------------------------------------------

def _as_runtime(runtime_or_path, *, batch: int, max_loops: Optional[int], device, dtype,
                backend: str, act_mode: str = "eager"):
    """The runtime to profile: as given, or compiled for ``batch`` rows and the model's
    max_seq_len (the lengths are fitted to it afterwards, ``fit_lengths``)."""
    from .compiler import compile as rt_compile
    from .runtime import Runtime
    if isinstance(runtime_or_path, Runtime):
        return runtime_or_path
    return rt_compile(runtime_or_path, device=device, dtype=dtype, backend=backend,
                      max_batch_size=batch, max_loops=max_loops, act_mode=act_mode)


def check_positive(**kw) -> None:
    for name, v in kw.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise InputError(f"{name} must be a positive integer, got {str(v)[:40]!r}")


def fit_lengths(max_seq_len: int, prompt_len: Optional[int] = None,
                new_tokens: Optional[int] = None) -> tuple[int, int]:
    """(prompt_len, new_tokens) of a profile on a runtime of ``max_seq_len`` positions: as
    given, or the defaults (128, 16) shrunk to fit. P prompt tokens and N new ones take
    P + N - 1 positions (the last new token is never fed back)."""
    if new_tokens is None:
        new_tokens = max(1, min(DEFAULT_NEW_TOKENS, max_seq_len // 4))
    if prompt_len is None:
        prompt_len = max(1, min(DEFAULT_PROMPT_LEN, max_seq_len + 1 - new_tokens))
    check_positive(prompt_len=prompt_len, new_tokens=new_tokens)
    if prompt_len + new_tokens - 1 > max_seq_len:
        raise InputError(f"prompt_len {prompt_len} + new_tokens {new_tokens} take "
                         f"{prompt_len + new_tokens - 1} positions, more than the "
                         f"max_seq_len={max_seq_len} of the model profiled: lower prompt_len or "
                         "new_tokens (CLI: --prompt-len, --new-tokens)")
    return prompt_len, new_tokens


def _median_ms(fn, device: torch.device, reps: int) -> float:
    """Median ms of ``fn()`` after one warm-up call (synchronizing around each on GPU)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure_ceilings(device: torch.device, dtype: torch.dtype) -> costmodel.Ceilings:
    """The ceilings of ``device``, measured now (about a second): read bandwidth, summing a
    buffer of random data well beyond the caches (random: a VM host may merge identical
    pages and serve them from cache; on a CPU with the row kernels' four-stream
    ``stream_sum``, the pattern their products read with), and the FLOP/s of a square
    ``dtype`` matmul. On a CPU the matmul is float32 whatever ``dtype``: the cpu backend
    widens bf16 weights and sums in float32, and torch's bf16 matmul on a CPU without
    bf16 units is a software path (0.0009 TFLOP/s on an AVX2 EPYC) that made bf16 floors
    compute-bound by 15x."""
    cuda = device.type == "cuda"
    nbytes, n = ((1 << 30), 4096) if cuda else ((128 << 20), 1024)
    if cuda:
        x, how = torch.rand(nbytes // 4, device=device), "sum"
        read_ms = _median_ms(x.sum, device, reps=10)
        del x
    else:  # the row kernels' own read pattern, as bench_runtime_cpu's floor
        probe = native.ReadProbe(nbytes)
        read_ms, how = _median_ms(probe, device, reps=5), probe.how
        dtype = torch.float32
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    mm_ms = _median_ms(lambda: a @ b, device, reps=10 if cuda else 3)
    name = torch.cuda.get_device_name(device) if cuda else native.cpu_facts()["cpu"]
    return costmodel.Ceilings(
        copy_gbps=round(nbytes / (read_ms * 1e-3) / 1e9, 2),
        bf16_tflops=round(2 * n ** 3 / (mm_ms * 1e-3) / 1e12, 4), measured=True,
        source=f"measured on this {device.type} ({name}): read of {nbytes >> 20} MiB of random "
               f"data ({how}), {n}^3 {str(dtype).replace('torch.', '')} matmul, median")


@contextlib.contextmanager
def _native_stderr_silenced():
    """Discard what is written to fd 2 inside the block (native code included)."""
    import sys
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _group_stages(times, n_decode_tokens: int) -> dict:
    """{"prefill": [...], "decode": [...]} per stage; decode in ms per token."""
    out = {}
    for phase in ("prefill", "decode"):
        agg: dict[str, float] = defaultdict(float)
        for p, name, _, ms in times:
            if p == phase:
                agg[stage_of(name)] += ms
        if not agg:
            continue
        div = max(1, n_decode_tokens) if phase == "decode" else 1
        total = sum(agg.values())
        key = "ms_per_token" if phase == "decode" else "ms"
        out[phase] = [{"stage": s, key: round(v / div, 5), "pct": round(100 * v / total, 2)}
                      for s, v in sorted(agg.items(), key=lambda kv: _stage_order(kv[0]))]
    return out


def _kind_times(times, n_decode_tokens: int) -> dict:
    """Measured ms per roofline op group per phase (decode: per token step)."""
    out: dict = {"prefill": defaultdict(float), "decode": defaultdict(float)}
    for p, _, kind, ms in times:
        out[p][KIND_GROUP.get(kind, "other")] += ms
    for g in out["decode"]:
        out["decode"][g] /= max(1, n_decode_tokens)
    return {p: dict(v) for p, v in out.items() if v}


def _kernels(prof, cuda: bool, top: int = 30) -> list[dict]:
    """Top ops by self time: GPU kernels (device time) on CUDA, aten ops (CPU time) on CPU;
    the step labels ``<stage>:<step>`` added by ``_StepTimer`` are left out."""
    rows = []
    for e in prof.key_averages():
        if _LABEL_RE.match(e.key):
            continue
        dev = float(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)) or 0.0)
        cpu = float(e.self_cpu_time_total or 0.0)
        if cuda and not str(getattr(e, "device_type", "")).endswith("CUDA"):
            continue  # CPU-side ops also carry the device time of kernels they launch
        t = dev if cuda else cpu
        if t <= 0:
            continue
        rows.append({"name": e.key, "count": int(e.count), "self_ms": round(t / 1e3, 5),
                     "self_cpu_ms": round(cpu / 1e3, 5)})
    rows.sort(key=lambda r: -r["self_ms"])
    total = sum(r["self_ms"] for r in rows) or 1.0
    for r in rows:
        r["pct"] = round(100 * r["self_ms"] / total, 2)
    return rows[:top]


def act_statistics(rt, input_ids: torch.Tensor, n_loops: int) -> dict:
    """Positions of a stateless forward over ``input_ids`` halting at each loop.

    ``halted_at[i]`` counts positions whose cumulative halting probability first reached
    the threshold at loop i+1 (1-based in ``loop``); ``never`` positions ran every loop
    without halting. Under act_mode "eager" every loop still runs in the compiled plan
    (the counts say what lazy depth could save; they are read from the ACT state after
    every loop_epilogue step); under "lazy"/"reuse" they are the runtime's own
    ``last_stats`` halting histogram.
    """
    n_pos = int(input_ids.numel())
    if rt.act_mode != "eager":
        rt.forward(input_ids, n_loops=n_loops)
        hist = rt.last_stats["halt_histogram"]
        halted_at, never = hist[1:n_loops + 1], hist[0]
    else:
        halted_at = _halted_per_loop(rt, input_ids, n_loops)
        never = n_pos - sum(halted_at)
    depth = sum((t + 1) * c for t, c in enumerate(halted_at)) + n_loops * never
    return {"available": True, "positions": n_pos, "n_loops": n_loops,
            "threshold": rt.config.act_threshold,
            "halted_at_loop": [{"loop": t + 1, "positions": c} for t, c in enumerate(halted_at)],
            "never_halted": never,
            "mean_halting_depth": round(depth / max(1, n_pos), 3)}


def _halted_per_loop(rt, input_ids: torch.Tensor, n_loops: int) -> list[int]:
    """Positions first halted at each loop of an eager plan, read after its epilogues."""
    act = rt.act_state
    counts: dict[int, list] = defaultdict(list)
    names = {f"loop_epilogue[t={t}]": t for t in range(n_loops)}

    def post_for(t):
        return lambda s: counts[t].append(act.halted[:s.N].sum())

    first = rt.plan(n_loops)[0].name
    after = {n: post_for(t) for n, t in names.items()}
    with rt.observe(_StepTimer(first, rt.device, n_prefill=10**9, after=after)):
        rt.forward(input_ids, n_loops=n_loops)
    cum = [int(sum(int(c) for c in counts[t])) for t in range(n_loops)]
    return [cum[0]] + [cum[t] - cum[t - 1] for t in range(1, n_loops)]


def roofline_points(cfg: MythosConfig, kind_ms: dict, *, batch: int, prompt_len: int,
                    new_tokens: int, n_loops: int, dtype, ceilings: costmodel.Ceilings) -> list[dict]:
    """Each op group's cost-model intensity and measured TFLOP/s (per phase)."""
    work = {"prefill": costmodel.Workload(batch=batch, new_tokens=prompt_len, context=0,
                                          n_loops=n_loops, dtype=dtype),
            "decode": costmodel.Workload(batch=batch, new_tokens=1,
                                         context=prompt_len + new_tokens // 2,
                                         n_loops=n_loops, dtype=dtype)}
    points = []
    for phase, w in work.items():
        groups: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        for op in costmodel.op_costs(cfg, w):
            g = groups[COST_GROUP.get(op.name, op.name)]
            g[0] += op.flops
            g[1] += op.bytes
        for name, (flops, nbytes) in groups.items():
            ms = kind_ms.get(phase, {}).get(name)
            if not ms or not flops or not nbytes:
                continue
            intensity = flops / nbytes
            achieved = flops / (ms * 1e-3) / 1e12
            roof = costmodel.roofline_tflops(intensity, ceilings)
            points.append({"phase": phase, "op": name, "flops": flops, "bytes": nbytes,
                           "intensity": round(intensity, 4), "ms": round(ms, 5),
                           "tflops": round(achieved, 6), "roof_tflops": round(roof, 3),
                           "pct_of_roof": round(100 * achieved / roof, 3)})
    return points


def plot_roofline(points: list[dict], ceilings: costmodel.Ceilings, path: Path,
                  title: str) -> dict:
    """Write a log-log roofline PNG; {"path": ...} or {"path": None, "reason": ...}."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return {"path": None, "reason": f"roofline plot skipped: matplotlib not importable ({exc})"}
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    xs = [p["intensity"] for p in points] or [1.0]
    lo, hi = min(min(xs) / 4, 0.1), max(max(xs) * 4, 2e3)
    grid = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    ax.plot(grid, [costmodel.roofline_tflops(x, ceilings) for x in grid], "k-", lw=1.5,
            label=f"roof: {ceilings.copy_gbps:.0f} GB/s, {ceilings.bf16_tflops:.0f} TFLOP/s")
    markers = {"prefill": "s", "decode": "o"}
    for phase in ("prefill", "decode"):
        ps = [p for p in points if p["phase"] == phase]
        if ps:
            ax.scatter([p["intensity"] for p in ps], [max(p["tflops"], 1e-6) for p in ps],
                       marker=markers[phase], label=phase, zorder=3)
            for p in ps:
                ax.annotate(p["op"], (p["intensity"], max(p["tflops"], 1e-6)), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP/byte, cost model)")
    ax.set_ylabel("achieved TFLOP/s")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return {"path": str(path)}


def profile(runtime_or_path: Union[Any, str, Path], prompt_len: Optional[int] = None,
            new_tokens: Optional[int] = None, n_loops: Optional[int] = None,
            out_dir: Union[str, Path] = "mythos-profile", *, batch: int = 1, device=None,
            dtype=None, backend: str = "auto", telemetry_interval_s: float = 0.02,
            ceilings: Optional[costmodel.Ceilings] = None, seed: int = 0,
            act_mode: str = "eager") -> dict:
    """Profile greedy generation; write profile.json, trace.json, roofline.png to out_dir.

    runtime_or_path: a compiled ``Runtime``, an nn.Module or a checkpoint path (compiled
    here for ``batch`` rows). prompt_len/new_tokens default to 128/16, shrunk to fit the
    runtime's max_seq_len (``fit_lengths``). ``ceilings`` default to the device's own,
    measured (``measure_ceilings``). ``act_mode``: for a model compiled here (see
    ``compile``). Returns the profile dict (what profile.json holds).
    Raises InputError on bad arguments.
    """
    check_positive(batch=batch)
    for name, value in (("prompt_len", prompt_len), ("new_tokens", new_tokens),
                        ("n_loops", n_loops)):
        if value is not None:
            check_positive(**{name: value})
    rt = _as_runtime(runtime_or_path, batch=batch, max_loops=n_loops, device=device,
                     act_mode=act_mode,
                     dtype=dtype, backend=backend)
    prompt_len, new_tokens = fit_lengths(rt.max_seq_len, prompt_len, new_tokens)
    cfg = rt.config
    n = rt._check_loops(n_loops)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (batch, prompt_len), generator=g)
    cuda = rt.device.type == "cuda"
    n_prefill = math.ceil(prompt_len / rt.chunk)
    first = rt.plan(n)[0].name
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    notes = []
    # Stage timers observe the plan's steps; a replayed CUDA graph runs no Python per step,
    # so the whole profile (warm-up included) runs the plan eagerly (graph replay timings
    # come from bench_e2e).
    graphs_were = rt.use_cuda_graphs
    if graphs_were:
        rt.use_cuda_graphs = False
        notes.append("CUDA graphs switched off while profiling (stage timers observe plan steps)")
    try:
        return _profile_runs(rt, cfg, ids, n, out, batch, prompt_len, new_tokens, n_prefill,
                             first, sync, cuda, telemetry_interval_s, ceilings, notes)
    finally:
        if graphs_were:
            rt.use_cuda_graphs = graphs_were


def _profile_runs(rt, cfg, ids, n, out, batch, prompt_len, new_tokens, n_prefill, first,
                  sync, cuda, telemetry_interval_s, ceilings, notes) -> dict:
    rt.generate(ids, new_tokens, n_loops=n)  # warm-up: compile, autotune, first-touch
    sync()
    with Telemetry(rt.device, telemetry_interval_s) as tel:
        with rt.observe(_StepTimer(first, rt.device, n_prefill)) as timer:
            t0 = time.perf_counter()
            rt.generate(ids, new_tokens, n_loops=n)
            sync()
            gen_ms = (time.perf_counter() - t0) * 1e3
    work = rt.last_stats
    times = timer.times()
    n_decode = new_tokens - 1  # generate runs the plan once per token after the first
    stages = _group_stages(times, n_decode)
    sampling = _time_sampling(rt, batch)
    stages.setdefault("decode", []).append({"stage": "sampling", "ms_per_token": sampling,
                                            "pct": None, "note": "timed separately, same shape"})
    prefill_ms = sum(ms for p, *_, ms in times if p == "prefill")
    decode_ms = sum(ms for p, *_, ms in times if p == "decode") / max(1, n_decode)

    trace_path = out / "trace.json"
    activities = [torch.profiler.ProfilerActivity.CPU]
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    prof = torch.profiler.profile(activities=activities)
    with _native_stderr_silenced():  # the profiler library logs its start and stop
        prof.start()
    try:
        with rt.observe(_StepTimer(first, rt.device, n_prefill, label=True)):
            rt.generate(ids, new_tokens, n_loops=n)
            sync()
    finally:
        with _native_stderr_silenced():
            prof.stop()
    prof.export_chrome_trace(str(trace_path))
    kernels = _kernels(prof, cuda)

    act = act_statistics(rt, ids, n)
    ceil = ceilings or measure_ceilings(rt.device, rt.dtype)
    kind_ms = _kind_times(times, n_decode)
    points = roofline_points(cfg, kind_ms, batch=batch, prompt_len=prompt_len,
                             new_tokens=new_tokens, n_loops=n, dtype=rt.dtype, ceilings=ceil)
    where = f"measured on this {rt.device.type}" if ceil.measured else "not measured"
    plot = plot_roofline(points, ceil, out / "roofline.png",
                         f"mythos-rt roofline: dim {cfg.dim}, T={n}, batch {batch}, "
                         f"{rt.device.type} (ceilings: {where})")
    floors = {"decode_floor_ms": costmodel.decode_floor_ms(
                  cfg, n, batch=batch, context=prompt_len + new_tokens // 2, dtype=rt.dtype,
                  ceilings=ceil),
              "prefill_floor_ms": costmodel.prefill_floor_ms(cfg, batch * prompt_len, n,
                                                             ceilings=ceil)}
    result = {
        "schema": PROFILE_SCHEMA, "provenance": _provenance(rt),
        "config": cfg.to_dict(), "runtime": repr(rt), "backends": rt.backends,
        "workload": {"batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
                     "n_loops": n, "dtype": str(rt.dtype).replace("torch.", ""),
                     "device": str(rt.device), "prefill_chunks": n_prefill},
        "timer": "cuda_events" if cuda else "perf_counter",
        "totals": {"generate_ms": round(gen_ms, 4), "prefill_ms": round(prefill_ms, 4),
                   "decode_ms_per_token": round(decode_ms, 5),
                   "sampling_ms_per_token": sampling,
                   "unattributed_ms": round(gen_ms - prefill_ms - n_decode * decode_ms
                                            - new_tokens * sampling, 4)},
        "floors": {k: round(v, 5) for k, v in floors.items()},
        "pct_of_floor": {"decode": round(100 * floors["decode_floor_ms"] / decode_ms, 3) if decode_ms else None,
                         "prefill": round(100 * floors["prefill_floor_ms"] / prefill_ms, 3) if prefill_ms else None},
        "ceilings": ceil.to_dict(),
        "stages": stages, "op_groups_ms": kind_ms, "kernels": kernels,
        "telemetry": tel.summary(), "act": act, "work": work,
        "roofline": {"points": points, **plot},
        "files": {"profile": str(out / "profile.json"), "trace": str(trace_path),
                  "roofline": plot["path"]},
        "notes": notes,
    }
    (out / "profile.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    return result


def _time_sampling(rt, batch: int, reps: int = 20) -> float:
    """ms of one greedy sampling call on (batch, vocab) logits of the runtime's dtype."""
    from .sampling import sample
    logits = torch.randn(batch, rt.config.vocab_size, device=rt.device, dtype=rt.dtype)
    return round(_median_ms(lambda: sample(logits, 0.0), rt.device, reps), 5)


def _provenance(rt) -> dict:
    import platform

    p = {"date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
         "torch": torch.__version__, "python": platform.python_version(),
         "cuda_runtime": torch.version.cuda, "device": str(rt.device)}
    try:
        import triton
        p["triton"] = triton.__version__
    except ImportError:
        p["triton"] = None
    if rt.device.type == "cuda":
        p["gpu"] = torch.cuda.get_device_name(rt.device)
    else:
        p.update(native.cpu_facts())
        p["cpu_row_kernels"] = native.describe()
    return p


def format_stages(result: dict) -> str:
    """A short text table of the per-stage times (what ``mythos-rt profile`` prints)."""
    lines = []
    t = result["totals"]
    c = result["ceilings"]
    lines.append(f"prefill {t['prefill_ms']:.3f} ms, decode {t['decode_ms_per_token']:.3f} "
                 f"ms/token (floor {result['floors']['decode_floor_ms']:.4g} ms, "
                 f"timer: {result['timer']})")
    lines.append(f"  ceilings: {c['copy_gbps']:.4g} GB/s, {c['bf16_tflops']:.4g} TFLOP/s "
                 f"({c['source']})")
    w = result.get("work")
    if w and w.get("eager_block_evals"):
        saved = 1 - w["block_evals"] / w["eager_block_evals"]
        line = (f"  depth ({w['act_mode']}): {w['block_evals']} of {w['eager_block_evals']} "
                f"block evaluations ran ({100 * saved:.1f}% saved), {w['catchup_evals']} in "
                "catch-up")
        if w.get("eager_passes"):
            line += (f"; {w['passes']} block passes (eager {w['eager_passes']}), "
                     f"{w['pass_rows'] - w['block_evals']} padding rows")
            if w.get("empty_passes"):
                line += f", {w['empty_passes']} passes empty (their MoE skipped)"
        if w.get("halt_histogram"):
            hist = w["halt_histogram"]
            line += ("; halted at loop 1.." + str(len(hist) - 1) + ": "
                     + " ".join(map(str, hist[1:])) + f", never: {hist[0]}")
        lines.append(line)
    for phase, unit in (("prefill", "ms"), ("decode", "ms_per_token")):
        rows = result["stages"].get(phase, [])
        if rows:
            lines.append(f"  {phase}: " + ", ".join(
                f"{r['stage']} {r[unit]:.3g}" for r in rows))
    return "\n".join(lines)
