"""Compile this package's recurrent/norm kernels for sm_90a without a GPU.

``TRITON_INTERPRET=0 python -m mythos_rt.triton_kernels.aot_check [--verbose] [--dtypes ..]`` lowers the
kernels through Triton's full NVIDIA pipeline (TTIR → TTGIR → LLVM → PTX → ptxas cubin)
for an H100 target on a CPU-only machine, so a kernel that only the interpreter accepts
fails here rather than on the GPU. ``--verbose`` prints ptxas register / spill usage.
Exit status 0 when every kernel compiled.
"""

from __future__ import annotations

import os
import subprocess
import tempfile

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    raise SystemExit("aot_check needs TRITON_INTERPRET=0 (kernels must not be interpreted)")
os.environ["TRITON_INTERPRET"] = "0"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from mythos_rt.triton_kernels import recurrent_step, rmsnorm, swiglu  # noqa: E402
from mythos_rt.triton_kernels._rowwise import row_config  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


def _epilogue_sig(dt: str) -> dict:
    sig = {n: f"*{dt}" for n in ("x_ptr", "h_ptr", "e_ptr", "hout_ptr")}
    sig.update(cum_ptr="*fp32", halted_ptr="*u8", nrun_ptr="*i32", nc_ptr=f"*{dt}",
               normw_ptr=f"*{dt}", down_ptr=f"*{dt}", loraB_ptr=f"*{dt}", scale_ptr=f"*{dt}",
               A_ptr="*fp32", injB_ptr=f"*{dt}", haltw_ptr=f"*{dt}", haltb_ptr=f"*{dt}",
               n_rows="i32", D="i32", t="i32", tc="i32", emb_c="fp32", loop_dim="i32",
               thr="fp32", eps="fp32", stride_x="i32", stride_h="i32", stride_e="i32",
               stride_o="i32", stride_nc="i32", R="constexpr", HAS_NEXT="constexpr",
               BLOCK_M="constexpr", BLOCK_D="constexpr")
    return sig


def cases(dtypes=("bf16", "fp16", "fp32")):
    """(label, jit fn, signature, constexprs, num_warps) for every kernel and dtype."""
    rbd, rbm, rnw = row_config(2048, 8192)
    for dt in dtypes:
        for n, dim in ((1, 2048), (8192, 2048), (8192, 3072)):
            bd, bm, nw = recurrent_step.epilogue_config(n, dim)
            yield (f"epilogue {dt} N={n} D={dim}", recurrent_step._epilogue_kernel,
                   _epilogue_sig(dt), dict(R=8, HAS_NEXT=True, BLOCK_M=bm, BLOCK_D=bd), nw)
        yield (f"epilogue {dt} no-next", recurrent_step._epilogue_kernel, _epilogue_sig(dt),
               dict(R=16, HAS_NEXT=False, BLOCK_M=1, BLOCK_D=4096), 8)
        yield (f"prologue {dt}", recurrent_step._prologue_kernel,
               dict(h_ptr=f"*{dt}", e_ptr=f"*{dt}", w_ptr=f"*{dt}", y_ptr=f"*{dt}",
                    n_rows="i32", D="i32", t="i32", emb_c="fp32", loop_dim="i32", eps="fp32",
                    stride_h="i32", stride_e="i32", stride_y="i32",
                    BLOCK_M="constexpr", BLOCK_D="constexpr"),
               dict(BLOCK_M=rbm, BLOCK_D=rbd), rnw)
        for has_res in (False, True):
            yield (f"rmsnorm {dt} residual={has_res}", rmsnorm._rmsnorm_kernel,
                   dict(x_ptr=f"*{dt}", r_ptr=f"*{dt}", w_ptr=f"*{dt}", y_ptr=f"*{dt}",
                        s_ptr=f"*{dt}", n_rows="i32", D="i32", eps="fp32", stride_x="i32",
                        stride_r="i32", stride_y="i32", stride_s="i32",
                        HAS_RESIDUAL="constexpr", BLOCK_M="constexpr", BLOCK_D="constexpr"),
                   dict(HAS_RESIDUAL=has_res, BLOCK_M=rbm, BLOCK_D=rbd), rnw)
        yield (f"swiglu {dt}", swiglu._swiglu_kernel,
               dict(gu_ptr=f"*{dt}", y_ptr=f"*{dt}", I="i32", stride_gu="i32",
                    stride_y="i32", BLOCK_I="constexpr"), dict(BLOCK_I=1024), 8)


def _ptxas_usage(ptx: str) -> str:
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        r = subprocess.run([ptxas, "-arch=sm_90a", "-v", f.name, "-o", os.devnull],
                           capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    return "; ".join(line.split("info    :")[-1].strip() for line in r.stderr.splitlines()
                     if "registers" in line or "spill" in line)


def main(argv=None) -> int:
    import argparse
    ap = argparse.ArgumentParser(description="compile the kernels for sm_90a, no GPU needed")
    ap.add_argument("--verbose", action="store_true", help="print ptxas register/spill use")
    ap.add_argument("--dtypes", default="bf16,fp16,fp32", help="comma list of bf16/fp16/fp32")
    args = ap.parse_args(argv)
    verbose = args.verbose
    failed = 0
    for label, fn, sig, consts, nw in cases(tuple(args.dtypes.split(","))):
        try:
            k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                               target=TARGET, options={"num_warps": nw})
            msg = "ok"
            if verbose:
                msg += " | " + _ptxas_usage(k.asm["ptx"])
        except Exception as exc:  # report every failure, not just the first
            failed += 1
            msg = f"FAILED: {type(exc).__name__}: {str(exc)[:400]}"
        print(f"{label:40s} {msg}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
