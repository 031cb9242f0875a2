"""Compile every MoE kernel launch for sm_90a without a GPU (run as a script).

Runs the real host launchers (``moe_route_triton``, ``_moe_ffn_impl``) on meta tensors
with the launches intercepted: each ``kernel[grid](*args, **meta)`` is compiled
ahead-of-time for an H100 target with the signature and 16-divisibility hints the JIT
would derive from those arguments. Catches lowering errors and shared-memory overruns
that the CPU interpreter cannot see. Needs ``TRITON_INTERPRET=0`` (set below) and the
``ptxas`` bundled with the triton wheel; no CUDA driver.

    python tests/triton_kernels/moe_sm90_compile.py [--fp32] [n_tokens ...]
"""

import os
import sys

os.environ["TRITON_INTERPRET"] = "0"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from mythos_rt.ops.moe import PackedMoE  # noqa: E402
from mythos_rt.triton_kernels import interpreted  # noqa: E402
from mythos_rt.triton_kernels import moe as M  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
SMEM_LIMIT = 227 * 1024
_PTR = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32",
        torch.int32: "*i32", torch.int64: "*i64"}
KERNELS = ["_router_kernel", "_align_scan_kernel", "_align_scatter_kernel", "_gemm1_kernel",
           "_gemm2_routed_kernel", "_gemm2_shared_kernel", "_combine_kernel"]
compiled = []


class _AOT:
    """Stands in for a JITFunction: ``k[grid](*args, **kw)`` compiles instead of launching."""

    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, grid):
        def launch(*args, num_warps=4, num_stages=3, **consts):
            names = self.fn.arg_names
            sig, attrs = {}, {}
            for i, (name, val) in enumerate(zip(names, args)):
                if isinstance(val, torch.Tensor):
                    sig[name] = _PTR[val.dtype]
                    attrs[(i,)] = [["tt.divisibility", 16]]
                elif isinstance(val, bool):
                    sig[name] = "i1"
                else:
                    sig[name] = "i32" if abs(val) < 2**31 else "i64"
                    if val % 16 == 0 and val != 0:
                        attrs[(i,)] = [["tt.divisibility", 16]]
            for name in names[len(args):]:
                sig[name] = "constexpr"
            src = ASTSource(fn=self.fn, signature=sig, constexprs=consts, attrs=attrs)
            k = triton.compile(src, target=TARGET,
                               options={"num_warps": num_warps, "num_stages": num_stages})
            compiled.append((self.fn.__name__, grid, k.metadata.shared))
            if k.metadata.shared > SMEM_LIMIT:
                raise RuntimeError(f"{self.fn.__name__}: {k.metadata.shared} B shared memory")
        return launch


def packed_meta(D, I, E, k, S, dtype):
    m = dict(device="meta", dtype=dtype)
    return PackedMoE(torch.empty(E + S, 2 * I, D, **m), torch.empty(E + S, D, I, **m),
                     torch.empty(E, D, **m), torch.empty(E, device="meta"), E, S, k, I)


def main(tokens, dtypes=(torch.bfloat16,)):
    assert not interpreted()
    for name in KERNELS:
        setattr(M, name, _AOT(getattr(M, name)))
    for dtype in dtypes:
        packed = packed_meta(2048, 2048, 64, 4, 8, dtype)       # mythos_1b MoE shapes
        ws = M.MoEWorkspace.allocate(max(tokens), packed, device="meta")
        for n in tokens:
            x = torch.empty(n, 2048, device="meta", dtype=dtype)
            cfg = M.heuristic_config(n, 2048, 2048, 64, 4, 8, dtype)
            cfg = M.replace(cfg, split_shared=M._shared_split(n, 8, cfg, 2048,
                                                               ws.y_shared.shape[0]))
            M._moe_ffn_impl(x, packed, ws, ws.out[:n], cfg)
        M.moe_route_triton(x, packed.router_w, packed.router_bias, 4)
    for name, grid, smem in compiled:
        print(f"{name:24s} grid={str(grid):18s} smem={smem}")
    print(f"OK {len(compiled)} launches compiled for sm_90a")


if __name__ == "__main__":
    args = sys.argv[1:]
    dts = (torch.bfloat16, torch.float32) if "--fp32" in args else (torch.bfloat16,)
    main([int(a) for a in args if a != "--fp32"] or [1, 8192], dts)
