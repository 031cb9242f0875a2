"""RMSNorm (plain and fused residual add) and SwiGLU: Triton kernels vs torch composites.

Rows: median time, minimum bytes moved and % of H100 HBM bandwidth. GPU: bf16 at the
mythos_1b / mythos_3b widths (D 2048 / 3072; SwiGLU I = the dense hidden D·4//3) for
1 / 64 / 8192 tokens. CPU: a tiny smoke case (interpreter).
"""

from __future__ import annotations

import os
import sys
from typing import Iterator

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.harness import row, time_ms  # noqa: E402
from mythos_rt.config import MythosConfig  # noqa: E402
from mythos_rt.ops.ffn import swiglu_torch  # noqa: E402
from mythos_rt.ops.norm import rmsnorm_torch  # noqa: E402

ON_GPU = torch.cuda.is_available()


def _cases(quick: bool):
    if not ON_GPU:
        return [("tiny_mla", 48, 40, 7)], torch.float32, "cpu", (1, 3)
    cases = []
    for name in ("mythos_1b", "mythos_3b"):
        cfg = MythosConfig.from_preset(name)
        for n in (1, 64, 8192):
            cases.append((name, cfg.dim, cfg.dense_hidden, n))
    return cases, torch.bfloat16, "cuda", ((3, 20) if quick else (10, 100))


def iter_rows(quick: bool) -> Iterator[dict]:
    """Rows (module docstring), as each measurement finishes."""
    from mythos_rt.triton_kernels.rmsnorm import rmsnorm_triton
    from mythos_rt.triton_kernels.swiglu import swiglu_triton
    cases, dtype, dev, (warm, reps) = _cases(quick)
    for name, D, I, n in cases:
        x, r = (torch.randn(n, D, device=dev, dtype=dtype) for _ in range(2))
        w = torch.randn(D, device=dev, dtype=dtype)
        y, s = torch.empty_like(x), torch.empty_like(x)
        gu = torch.randn(n, 2 * I, device=dev, dtype=dtype)
        o = torch.empty(n, I, device=dev, dtype=dtype)
        elt = x.element_size()
        jobs = [
            ("rmsnorm", 2 * n * D * elt, lambda: rmsnorm_torch(x, w, out=y),
             lambda: rmsnorm_triton(x, w, out=y)),
            ("rmsnorm_residual", 4 * n * D * elt,
             lambda: rmsnorm_torch(x, w, residual=r, out=y, residual_out=s),
             lambda: rmsnorm_triton(x, w, residual=r, out=y, residual_out=s)),
            ("swiglu", 3 * n * I * elt, lambda: swiglu_torch(gu, out=o),
             lambda: swiglu_triton(gu, out=o)),
        ]
        for op, nbytes, f_torch, f_triton in jobs:
            for impl, fn in (("torch", f_torch), ("triton", f_triton)):
                ms = time_ms(fn, warmup=warm, reps=reps)
                yield row(f"{op}/{name}/N{n}/{impl}", ms, bytes_moved=nbytes, op=op,
                          preset=name, tokens=n, dim=D, hidden=I, impl=impl,
                          dtype=str(dtype).replace("torch.", ""))


def run(quick: bool) -> list[dict]:
    return list(iter_rows(quick))


if __name__ == "__main__":
    for r in run(quick="--quick" in sys.argv):
        print(r["name"], r["ms"], "ms", r.get("pct_hbm", ""), "% HBM")
