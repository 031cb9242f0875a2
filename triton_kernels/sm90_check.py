"""Static sm_90a verification: compile every Triton kernel exactly as the runtime launches
it, on a machine without a GPU, and report registers, spills and shared memory.

    TRITON_INTERPRET=0 python -m mythos_rt.triton_kernels.sm90_check
        [--presets ...] [--dtypes bf16 fp16] [--batches 1 64] [--no-prefill]
        [--candidates PRESET ...] [--markdown FILE]

How: Triton's launch path (``JITFunction.run``) is kept, with two substitutions: the
active driver is a stand-in that names an sm_90 target (device 0, stream 0), and every
launch compiles without running (``warmup=True``). The real host launchers are then
called on meta tensors built from each preset the way the lowering builds them, so each
kernel is specialized by Triton's own binder (constexprs, 16-byte divisibility, ==1
integers) with exactly the launch parameters of the runtime: decode batches (the CUDA
graph buckets 1..64), prefill chunks of the runtime's chunk size up to 8192 cached
tokens (a short chunk after a long prefix too: MLA's latent prefill splitting the key
range), and the MoE autotune candidates. ptxas (bundled with the Triton wheel) reports
registers and spills of each distinct compile.

Exit status 1 on a compile error, on shared memory above the sm_90 limit (227 KiB per
block), or on any spill in a kernel on the bf16 decode path; the table is printed (and
written as Markdown with ``--markdown``: ``docs/kernels-sm90.md``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Iterator, Optional

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    raise SystemExit("sm90_check compiles kernels: run it with TRITON_INTERPRET=0")
os.environ["TRITON_INTERPRET"] = "0"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402
from ..depth import DEVICE_WINDOW  # noqa: E402
from ..ops.norm import NORM_EPS  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
SMEM_LIMIT = 227 * 1024   # opt-in shared memory per block on sm_90
PRESETS = ("tiny_mla", "tiny_gqa", "small_mla", "mythos_1b", "mythos_3b")
DECODE_BATCHES = (1, 2, 4, 8, 16, 32, 48, 64)
MAX_PREFILL = 8192
AUTOTUNE_TOKENS = (1, 16, 128, 1024, 8192)   # autotune_moe's default token counts
CANDIDATE_PRESETS = ("mythos_1b", "mythos_3b")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Compiled:
    """One distinct compile (kernel + specialization) and every case that launched it."""
    kernel: str
    config: str
    dtype: str
    smem: int = 0
    regs: Optional[int] = None
    spills: int = 0
    error: str = ""
    cases: set = field(default_factory=set)
    paths: set = field(default_factory=set)   # "decode", "prefill", "autotune"

    @property
    def decode_bf16(self) -> bool:
        return self.dtype == "bf16" and "decode" in self.paths

    def problems(self) -> list[str]:
        out = []
        if self.error:
            out.append(f"compile error: {self.error}")
        if self.smem > SMEM_LIMIT:
            out.append(f"{self.smem} B shared memory > {SMEM_LIMIT}")
        if self.spills and self.decode_bf16:
            out.append(f"{self.spills} B spilled on the bf16 decode path")
        return out


class _StandInDriver:
    """Just enough of a Triton driver for the launch path to specialize and compile."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return TARGET


class StaticCompiler:
    """Context manager: kernel launches compile for sm_90a instead of running.

    ``case(label, path, dtype)`` names the launches that follow; ``results`` maps each
    distinct (kernel, specialization) to a ``Compiled``.
    """

    def __init__(self):
        self.results: dict[tuple, Compiled] = {}
        self._label, self._path, self._dtype = "", "", ""
        self._usage: dict[str, tuple[int, int]] = {}

    def case(self, label: str, path: str, dtype: str) -> None:
        self._label, self._path, self._dtype = label, path, dtype

    def __enter__(self):
        self._run = JITFunction.run
        self._driver = driver._active  # None until first use; no real driver exists here
        driver.set_active(_StandInDriver())
        checker = self

        def run(fn, *args, grid, warmup, **kwargs):
            return checker._compile(fn, args, kwargs, grid)
        JITFunction.run = run
        return self

    def __exit__(self, *exc):
        JITFunction.run = self._run
        driver._active = self._driver

    def _compile(self, fn: JITFunction, args, kwargs, grid):
        config = " ".join(f"{k}={v}" for k, v in sorted(kwargs.items())
                          if k not in ("debug", "instrumentation_mode"))
        try:
            kernel = self._run(fn, *args, grid=grid, warmup=True, **kwargs)
        except Exception as exc:  # noqa: BLE001 - every failure is reported, none stops the sweep
            key = (fn.__name__, config, self._dtype, "error")
            rec = self.results.setdefault(key, Compiled(fn.__name__, config, self._dtype,
                                                        error=_first_line(exc)))
        else:
            key = (fn.__name__, kernel.hash)
            rec = self.results.get(key)
            if rec is None:
                regs, spills = self._ptxas_usage(kernel.asm["ptx"], kernel.hash)
                rec = self.results[key] = Compiled(fn.__name__, config, self._dtype,
                                                   smem=kernel.metadata.shared, regs=regs,
                                                   spills=spills)
        rec.cases.add(self._label)
        rec.paths.add(self._path)
        return None

    def _ptxas_usage(self, ptx: str, key: str) -> tuple[Optional[int], int]:
        """(registers, spill-store + spill-load bytes) from ``ptxas -v``."""
        if key not in self._usage:
            ptxas = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas")
            with tempfile.TemporaryDirectory() as d:
                src = os.path.join(d, "k.ptx")
                with open(src, "w") as f:
                    f.write(ptx)
                r = subprocess.run([ptxas, "-arch=sm_90a", "-v", src, "-o", os.devnull],
                                   capture_output=True, text=True)
            regs = re.search(r"Used (\d+) registers", r.stderr)
            spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill", r.stderr))
            self._usage[key] = (int(regs.group(1)) if regs else None, spills)
        return self._usage[key]


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"[:300]


# ---- driving the host launchers with the runtime's arguments -------------------------------

class PresetModel:
    """A preset's weights on the meta device, in the layouts the lowering builds and the
    Triton backend prepares."""

    def __init__(self, preset: str, dtype: torch.dtype):
        from ..config import MythosConfig
        from ..lower import op_args
        from ..ops.ffn import align_hidden
        from ..reference import OpenMythos
        self.cfg = cfg = MythosConfig.from_preset(preset)
        self.dtype = dtype
        with torch.device("meta"):
            sd = OpenMythos(cfg).to(dtype).state_dict()
        attn = "mla_attention" if cfg.attn_type == "mla" else "gqa_attention"
        self.attn = op_args(attn, sd, cfg, "prelude.0.attn.", dtype, "meta")
        self.ffn = align_hidden(op_args("dense_ffn", sd, cfg, "prelude.0.ffn.", dtype, "meta"))
        self.norm_w = sd["prelude.0.attn_norm.weight"]
        self.moe = op_args("moe", sd, cfg, "recurrent.block.ffn.", dtype, "meta")
        self.loop = op_args("loop", sd, cfg, "recurrent.", dtype, "meta")


def _meta(*shape, dtype):
    return torch.empty(*shape, device="meta", dtype=dtype)


def launch_step(m: PresetModel, B: int, T: int, prefix: int, max_batch: int,
                s_max: int) -> None:
    """Every Triton launch one plan step of B rows × T tokens at ``prefix`` cached tokens
    makes (attention sublayer, norms, dense FFN, MoE, recurrent prologue/epilogue)."""
    from ..ops.recurrent import ACTState
    from . import moe as tmoe
    from .attention import gqa_attention, mla_attention
    from .recurrent_step import loop_epilogue_triton, loop_prologue_triton
    from .rmsnorm import rmsnorm_triton
    from ..ops.ffn import dense_ffn_triton
    cfg, dt = m.cfg, m.dtype
    N, D = B * T, cfg.dim
    x = _meta(N, D, dtype=dt)
    rmsnorm_triton(x, m.norm_w, NORM_EPS)
    rmsnorm_triton(x, m.norm_w, NORM_EPS, residual=_meta(N, D, dtype=dt), out=_meta(N, D, dtype=dt),
                   residual_out=_meta(N, D, dtype=dt))
    half = (cfg.qk_rope_head_dim if cfg.attn_type == "mla" else cfg.head_dim) // 2
    cos = sin = _meta(s_max, half, dtype=torch.float32)
    # Prefill reads max(cache_lens) on the host to size its key range: a CPU tensor holds
    # the real value there; decode keeps the lengths on the device (meta).
    lens = (torch.full((B,), prefix, dtype=torch.int32) if T > 1
            else _meta(B, dtype=torch.int32))
    if cfg.attn_type == "mla":
        ckv = _meta(max_batch, s_max, cfg.kv_lora_rank, dtype=dt)
        kpe = _meta(max_batch, s_max, cfg.qk_rope_head_dim, dtype=dt)
        scale = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
        mla_attention(x.view(B, T, D), m.attn, ckv, kpe, lens, cos, sin, scale)
    else:
        kc = _meta(max_batch, s_max, cfg.n_kv_heads, cfg.head_dim, dtype=dt)
        gqa_attention(x.view(B, T, D), m.attn, kc, kc.clone(), lens, cos, sin,
                      cfg.head_dim ** -0.5)
    dense_ffn_triton(x, m.ffn, gate_up=_meta(N, 2 * m.ffn.hidden, dtype=dt),
                     act=_meta(N, m.ffn.hidden, dtype=dt))
    ws = tmoe.MoEWorkspace.allocate(max_batch * max(T, 1), m.moe, device="meta")
    tmoe.moe_ffn_triton(x, m.moe, ws)
    # lazy depth with device-resident decode (the CUDA default) passes a skip flag to the
    # loop's MoE: its prompt chunks, and decode passes of W rows per batch row
    skip = _meta(1, dtype=torch.int32)
    if T > 1:
        tmoe.moe_ffn_triton(x, m.moe, ws, skip=skip)
    else:
        xw = _meta(B * DEVICE_WINDOW, D, dtype=dt)
        ws_w = tmoe.MoEWorkspace.allocate(max_batch * DEVICE_WINDOW, m.moe, device="meta")
        tmoe.moe_ffn_triton(xw, m.moe, ws_w, skip=skip)
    tmoe.moe_route_triton(x, m.moe.router_w, m.moe.router_bias, m.moe.top_k)
    state = ACTState.allocate(N, D, dt, "meta")
    h, e = _meta(N, D, dtype=dt), _meta(N, D, dtype=dt)
    loop_prologue_triton(h, e, m.loop, 0)
    loop_epilogue_triton(x, h, e, m.loop, 3, state, _meta(N, D, dtype=dt))
    loop_epilogue_triton(x, h, e, m.loop, 3, state, None)


def sweep(presets=PRESETS, dtypes=("bf16", "fp16"), batches=DECODE_BATCHES,
          prefill: bool = True, candidates=CANDIDATE_PRESETS, chunk: Optional[int] = None,
          log=lambda s: None) -> StaticCompiler:
    """Compile every launch of every case; returns the checker with its results.

    ``candidates``: presets whose MoE autotune candidates are compiled too (bf16, the
    dtype autotuning runs in on the GPU machines).
    """
    from ..options import DEFAULT_CHUNK
    chunk = chunk or DEFAULT_CHUNK
    with StaticCompiler() as sc:
        for preset in presets:
            for dname in dtypes:
                m = PresetModel(preset, DTYPES[dname])
                s_max = max(m.cfg.max_seq_len, MAX_PREFILL)
                max_batch = max(batches)
                steps = [(B, 1, 0, f"decode B={B}") for B in batches]
                if prefill:
                    steps += [(B, T, at, f"prefill B={B} T={T} at {at}") for B, T, at in
                              ((1, 17, 0), (1, 17, MAX_PREFILL - 17), (1, chunk, 0),
                               (1, chunk, MAX_PREFILL - chunk), (4, 64, 0))]
                for B, T, at, what in steps:
                    sc.case(f"{preset} {what}", what.split()[0], dname)
                    launch_step(m, B, T, at, max_batch, s_max)
                for n in AUTOTUNE_TOKENS if preset in candidates and dname == "bf16" else ():
                    _autotune(sc, m, n, f"{preset} autotune N={n}", dname)
                log(f"{preset} {dname}: {len(sc.results)} distinct compiles so far")
    return sc


def _autotune(sc: StaticCompiler, m: PresetModel, N: int, label: str, dname: str) -> None:
    """The MoE autotune candidates for N tokens, compiled as autotuning would launch them."""
    from . import moe as tmoe
    from .moe_config import candidates, shared_split
    sc.case(label, "autotune", dname)
    ws = tmoe.MoEWorkspace.allocate(N, m.moe, device="meta")
    x = _meta(N, m.cfg.dim, dtype=m.dtype)
    for c in candidates(N, m.moe, m.dtype):
        c = dataclasses.replace(c, split_shared=shared_split(
            N, m.moe.n_shared_slots, c, m.cfg.dim, ws.y_shared.shape[0]))
        tmoe._moe_ffn_impl(x, m.moe, ws, ws.out[:N], c)


# ---- report ----------------------------------------------------------------------------------

def rows(sc: StaticCompiler) -> Iterator[Compiled]:
    return iter(sorted(sc.results.values(), key=lambda c: (c.kernel, c.dtype, c.config)))


def markdown(sc: StaticCompiler, argv: list[str]) -> str:
    lines = ["# Triton kernels on sm_90a (static)", "",
             f"Generated by `python -m mythos_rt.triton_kernels.sm90_check {' '.join(argv)}`"
             f" with triton {triton.__version__} and its bundled ptxas; no GPU involved. One "
             "row per distinct compile (kernel + specialization); `paths` says where the "
             "runtime launches it (autotune = a MoE autotune candidate), `cases` the first "
             "few launches that produced it. Gate (CI): no compile error, shared memory "
             f"<= {SMEM_LIMIT} B, no spill on the bf16 decode path.", "",
             "| kernel | dtype | config | regs | spills (B) | smem (B) | paths | cases | problems |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in rows(sc):
        cases = sorted(c.cases)
        shown = ", ".join(cases[:3]) + (f" (+{len(cases) - 3})" if len(cases) > 3 else "")
        lines.append(f"| {c.kernel} | {c.dtype} | {c.config} | {c.regs if c.regs is not None else ''} "
                     f"| {c.spills} | {c.smem} | {', '.join(sorted(c.paths))} | {shown} | "
                     f"{'; '.join(c.problems())} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", nargs="+", default=list(PRESETS))
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--batches", nargs="+", type=int, default=list(DECODE_BATCHES))
    ap.add_argument("--no-prefill", action="store_true")
    ap.add_argument("--candidates", nargs="*", default=list(CANDIDATE_PRESETS),
                    help="presets whose MoE autotune candidates are compiled (bf16); none: "
                         "skip them")
    ap.add_argument("--markdown", help="also write the table as Markdown to this file")
    args = ap.parse_args(argv)
    sc = sweep(args.presets, args.dtypes, args.batches, not args.no_prefill,
               tuple(args.candidates), log=lambda s: print(s, file=sys.stderr, flush=True))
    bad = 0
    for c in rows(sc):
        problems = c.problems()
        bad += bool(problems)
        print(f"{c.kernel:24s} {c.dtype:5s} regs={c.regs!s:>4s} spills={c.spills:<4d} "
              f"smem={c.smem:<7d} {','.join(sorted(c.paths)):24s} {c.config}"
              + (f"  <-- {'; '.join(problems)}" if problems else ""))
    if args.markdown:
        shown = sys.argv[1:] if argv is None else list(argv)
        with open(args.markdown, "w") as f:
            f.write(markdown(sc, [a for a in shown if not a.startswith("--markdown")
                                  and a != args.markdown]))
    print(f"{len(sc.results)} distinct compiles, {bad} with problems")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
