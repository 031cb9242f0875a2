"""Recurrent step between two block passes: fused epilogue (+ next prologue) vs eager ops.

Per loop the runtime runs, around the shared block: LoRA, LTI injection, ACT update and
the next loop's embed + add + RMSNorm. Eager = those ops as ``mythos_rt.reference``'s
modules run them (the unfused baseline); fused = one ``loop_epilogue`` launch with
``next_combined``. Rows report the median time, bytes the fused step must move at
minimum (``bytes_moved``: block_out, h, e, h_out read; h, h_out, combined written; ACT
vectors; weights once), the resulting % of H100 HBM bandwidth for both, and kernel
launches per loop (counted with torch.profiler: CUDA kernels on GPU; on CPU the
dispatcher-level aten ops, an estimate, and 1 by construction for the Triton kernel).

GPU: bf16, mythos_1b (D=2048, r=8) and mythos_3b (D=3072, r=8) at tokens 1/64/8192
(target: >= 70% of HBM bandwidth at 8192 tokens). CPU: a tiny fp32 smoke case (the
Triton kernel under the interpreter) so ``python bench/bench_recurrent.py`` runs anywhere;
CPU times mean nothing.
"""

from __future__ import annotations

import os
import sys
from typing import Iterator

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.harness import bench_main, row, time_ms  # noqa: E402
from mythos_rt import reference as R  # noqa: E402
from mythos_rt.config import MythosConfig  # noqa: E402
from mythos_rt.lower import op_args  # noqa: E402
from mythos_rt.ops.recurrent import ACTState, loop_epilogue_torch  # noqa: E402

ON_GPU = torch.cuda.is_available()


class _EagerLoop(torch.nn.Module):
    """The reference modules between two block passes (RecurrentBlock minus the block)."""

    def __init__(self, cfg: MythosConfig):
        super().__init__()
        self.cfg = cfg
        self.norm = R.RMSNorm(cfg.dim)
        self.lora = R.LoRAAdapter(cfg.dim, cfg.lora_rank, cfg.max_loop_iters)
        self.injection = R.LTIInjection(cfg.dim)
        self.act = R.ACTHalting(cfg.dim)
        self.loop_dim = cfg.loop_dim
        with torch.no_grad():
            self.injection.log_A.normal_(0, 0.5)
            self.lora.scale.weight.normal_()

    @torch.no_grad()
    def step(self, block_out, h, e, t, cum, halted, h_out):
        """Exactly RecurrentBlock.forward's loop body after the block, then the next prologue."""
        thr = self.cfg.act_threshold
        out = block_out + self.lora(block_out, t)
        h = self.injection(h, e, out)
        h_out, cum, halted = R.act_update(h, self.act(h), cum, halted, h_out, thr)
        combined = self.norm(R.loop_index_embedding(h, t + 1, self.loop_dim) + e)
        return h, cum, halted, h_out, combined


def count_launches(fn) -> int:
    """Kernel launches of one fn() call: CUDA kernels on GPU, top-level aten ops on CPU."""
    from torch.profiler import ProfilerActivity, profile
    fn()  # warm (compile, caches)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ON_GPU else [])
    with profile(activities=acts) as prof:
        fn()
        if ON_GPU:
            torch.cuda.synchronize()
    events = prof.events()
    if ON_GPU:
        from torch.autograd import DeviceType
        return sum(1 for ev in events if ev.device_type == DeviceType.CUDA
                   and "memcpy" not in ev.name.lower() and "memset" not in ev.name.lower())
    return sum(1 for ev in events if ev.name.startswith("aten::")
               and (ev.cpu_parent is None or not ev.cpu_parent.name.startswith("aten::")))


def fused_bytes(n: int, dim: int, rank: int, max_loops: int, elt: int) -> int:
    """Minimum bytes of one fused step: 4 row tensors read, 3 written, ACT vectors, weights."""
    rows = 7 * n * dim * elt + n * (4 + 4 + 1 + 1)
    weights = (3 + 2 * rank) * dim * elt + 4 * dim + max_loops * rank * elt + elt
    return rows + weights


def _case(name: str, cfg: MythosConfig, n: int, dtype, device, quick: bool) -> list[dict]:
    from mythos_rt.triton_kernels.recurrent_step import epilogue_config, loop_epilogue_triton
    torch.manual_seed(0)
    D, t = cfg.dim, 3
    eager = _EagerLoop(cfg).to(device=device, dtype=dtype)
    params = op_args("loop", eager.state_dict(), cfg, device=device)
    block_out, h, e = (torch.randn(n, D, device=device, dtype=dtype) for _ in range(3))
    state = ACTState.allocate(n, D, dtype, device).reset(n)
    combined = torch.empty_like(h)
    cum = torch.zeros(n, device=device)
    halted = torch.zeros(n, dtype=torch.bool, device=device)
    h_out = torch.zeros_like(h)

    def run_eager():
        return eager.step(block_out, h, e, t, cum, halted, h_out)

    def run_fused():
        loop_epilogue_triton(block_out, h, e, params, t, state, combined)

    def run_torch_composite():
        loop_epilogue_torch(block_out, h, e, params, t, state, combined)

    warm, reps = (1, 3) if not ON_GPU else ((3, 20) if quick else (10, 100))
    nbytes = fused_bytes(n, D, cfg.lora_rank, cfg.max_loop_iters, h.element_size())
    cfg_used = epilogue_config(n, D)
    common = dict(preset=name, tokens=n, dim=D, lora_rank=cfg.lora_rank,
                  dtype=str(dtype).replace("torch.", ""), device=str(device))
    out = []
    for impl, fn in (("eager_reference", run_eager), ("torch_composite", run_torch_composite),
                     ("triton_fused", run_fused)):
        ms = time_ms(fn, warmup=warm, reps=reps)
        if impl == "triton_fused" and not ON_GPU:  # the interpreter's numpy work is no launch
            launches, how = 1, "by construction"
        else:
            launches, how = count_launches(fn), ("profiler: CUDA kernels" if ON_GPU
                                                 else "profiler: top-level aten ops (estimate)")
        extra = dict(common, impl=impl, launches_per_loop=launches, launches_counted_by=how)
        if impl == "triton_fused":
            extra["config_block_d_m_warps"] = list(cfg_used)
        out.append(row(f"recurrent_step/{name}/N{n}/{impl}", ms, bytes_moved=nbytes, **extra))
    base = out[0]["ms"]
    for r in out:
        r["speedup_vs_eager"] = round(base / r["ms"], 2) if r["ms"] else None
    return out


def iter_rows(quick: bool) -> Iterator[dict]:
    """Result rows (see module docstring), as each case finishes. ``quick`` trims
    repetitions (and on CPU sizes)."""
    if ON_GPU:
        for name in ("mythos_1b", "mythos_3b"):
            cfg = MythosConfig.from_preset(name)
            for n in (1, 64, 8192):
                yield from _case(name, cfg, n, torch.bfloat16, "cuda", quick)
    else:
        cfg = MythosConfig.from_preset("tiny_mla")
        yield from _case("tiny_mla(cpu smoke)", cfg, 7, torch.float32, "cpu", quick)


def run(quick: bool) -> list[dict]:
    return list(iter_rows(quick))


def main(argv=None):
    bench_main(run, ["name", "ms", "gbps", "pct_hbm", "launches_per_loop", "speedup_vs_eager"], __doc__.split("\n")[0], argv)


if __name__ == "__main__":
    main()
