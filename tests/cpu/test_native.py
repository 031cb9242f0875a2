"""The compiled row kernels of the cpu backend (mythos_rt.cpu.native): building and
caching, every way they can be unavailable, argument checks, and MLA (over the joint
cache) and GQA decode at awkward sizes (the other kernels: tests/cpu/test_cpu_backend.py,
which runs every op with and without them)."""

import platform
import warnings

import pytest
import torch

from mythos_rt.config import MythosConfig
from mythos_rt.cpu import native
from mythos_rt.cpu.attention import prepare_mla
from mythos_rt.cpu.moe import moe_ffn_cpu, prepare_moe
from mythos_rt.lower import op_args
from mythos_rt.testing import TOL_BF16_KERNEL, TOL_FP32_TORCH, assert_rel_close

from ..ops._attn_ref import Harness
from ..ops.test_moe import make_moe, moe_cfg, ref_forward

needs_compiler = pytest.mark.skipif(native.compiler() is None, reason="no C++ compiler")


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """An empty kernel cache and no remembered library (restored afterwards)."""
    monkeypatch.setenv("MYTHOS_RT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "_LIBRARY", {})
    return tmp_path


@needs_compiler
def test_build_is_cached_and_keyed_by_the_source(fresh, monkeypatch):
    path = native.build()
    assert path.parent == fresh / "cpu" and path.exists()
    stamp = path.stat().st_mtime_ns
    assert native.build() == path and path.stat().st_mtime_ns == stamp  # not rebuilt
    edited = fresh / "decode_row.cpp"
    edited.write_text(native.SOURCE.read_text() + "\n// edited\n")
    monkeypatch.setattr(native, "SOURCE", edited)
    assert native.build() != path
    assert native.library() is not None


@needs_compiler
def test_an_unwritable_cache_builds_in_a_temporary_directory(fresh, monkeypatch):
    blocker = fresh / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("MYTHOS_RT_CACHE_DIR", str(blocker))
    path = native.build()
    assert path.exists() and blocker not in path.parents
    assert native.library() is not None


@needs_compiler
def test_a_compile_error_is_reported_with_the_compiler_output(fresh, monkeypatch):
    broken = fresh / "decode_row.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(native, "SOURCE", broken)
    with pytest.raises(native.NativeError, match="decode_row.cpp"):
        native.build()
    assert not list((fresh / "cpu").glob("*.so"))  # nothing half-built left in the cache


def test_without_a_compiler_the_pytorch_path_runs(fresh, monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    assert native.compiler() is None
    with pytest.warns(UserWarning, match="no C\\+\\+ compiler"):
        assert native.library() is None
    assert "no C++ compiler" in native.describe()
    cfg = moe_cfg()
    m = make_moe(cfg)
    moe = prepare_moe(op_args("moe", m.state_dict(), cfg))
    assert moe.row_kernel is None
    x = torch.randn(1, cfg.dim)
    assert_rel_close(moe_ffn_cpu(x, moe), ref_forward(m, x), TOL_FP32_TORCH)


def test_disabled_by_the_environment_without_a_warning(fresh, monkeypatch):
    monkeypatch.setenv("MYTHOS_RT_CPU_NATIVE", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.library() is None
    assert native.describe() == "PyTorch paths (MYTHOS_RT_CPU_NATIVE=0)"


@needs_compiler
def test_describe_says_for_what_and_on_how_many_threads(fresh):
    lib = native.library()
    assert native.describe() == (f"compiled for -march=native ({lib.vector_bits()}-bit "
                                 f"vectors), {lib.team_threads()} thread(s)")


@needs_compiler
def test_kernel_arguments_must_be_contiguous_float32():
    lib = native.library()
    w = torch.randn(8, 4)
    with pytest.raises(native.NativeError, match="lora_B must be a contiguous float32"):
        native.kernel(lib, "loop_epilogue_row", native.LoopRow, dict(D=4, r=8),
                      dict(lora_B=w.t()))
    with pytest.raises(native.NativeError, match="A must be .* torch.bfloat16"):
        native.kernel(lib, "loop_epilogue_row", native.LoopRow, dict(D=4, r=8),
                      dict(A=torch.randn(4).to(torch.bfloat16)))


@needs_compiler
def test_the_avx512_path_compiles_on_a_cpu_without_it(fresh, monkeypatch):
    """Every kernel (the bf16 ones too) builds for AVX-512 (x86-64-v4). A CPU with
    AVX-512 runs that build in every compiled test; on one without (AVX2 only) this checks
    that it still compiles."""
    from pathlib import Path

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("not an x86-64 CPU")
    if " avx512f " in Path("/proc/cpuinfo").read_text():
        pytest.skip("this CPU runs the AVX-512 build in every compiled test")
    monkeypatch.setenv("MYTHOS_RT_CPU_ARCH", "x86-64-v4")
    assert native.build().exists()


def _head_kernel_built_for(arch: str, w: torch.Tensor, monkeypatch) -> native.Kernel:
    """The head kernel (``gemm_nk`` over w's rows) of a build for ``-march=arch``."""
    if arch != "native" and platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("an x86-64 -march")
    monkeypatch.setenv("MYTHOS_RT_CPU_ARCH", arch)
    monkeypatch.setattr(native, "_LIBRARY", {})  # a build per -march, cached across tests
    lib = native.library()
    assert lib is not None
    bf16 = w.dtype == torch.bfloat16
    return native.kernel(lib, "head_rows_bf16" if bf16 else "head_rows", native.HeadRow,
                         dict(V=w.shape[0], D=w.shape[1]), dict(w=w), bf16=("w",) if bf16 else ())


@needs_compiler
@pytest.mark.parametrize("arch", ["native", "x86-64-v3", "x86-64"])
@pytest.mark.parametrize("K", [16, 32, 45, 64, 97], ids=lambda k: f"K{k}")
def test_bf16_products_at_awkward_widths_on_every_vector_path(arch, K, monkeypatch):
    """bf16 products widen two weights per 32-bit lane and take the inputs in pair order
    over blocks of 32: widths with no whole block, one, several, and tails, 23 weight rows
    (tiles taking one row of each quarter, and single rows after the quarters) and 5
    inputs, on AVX-512 or AVX2 (native), AVX2 alone and SSE2 (x86-64), against the float64
    product of the same bf16 values."""
    w = torch.randn(23, K).bfloat16()
    head = _head_kernel_built_for(arch, w, monkeypatch)
    x = torch.randn(5, K)
    logits = torch.full((5, 23), float("nan"))
    head.fn(head.ref, native.address(x), 5, native.address(logits))
    want = x.double() @ w.double().t()
    assert_rel_close(logits.double(), want, 1e-6)


@needs_compiler
@pytest.mark.parametrize("arch", ["native", "x86-64-v3", "x86-64"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("K", [600, 1100, 2048], ids=lambda k: f"K{k}")
def test_k_blocked_products_sum_as_one_input_alone(arch, dtype, K, monkeypatch):
    """With several inputs a product walks K in blocks (the tile stays in L1), each
    input's sums saved between blocks: every output bitwise the one-input product's (the
    same sums in the same order), and within 1e-6 of the float64 product. Widths past one
    block, with a partial last block and a tail; 23 rows, 7 inputs."""
    w = torch.randn(23, K).to(dtype)
    head = _head_kernel_built_for(arch, w, monkeypatch)
    x = torch.randn(7, K)
    together = torch.full((7, 23), float("nan"))
    head.fn(head.ref, native.address(x), 7, native.address(together))
    for i in range(7):
        alone = torch.full((1, 23), float("nan"))
        head.fn(head.ref, native.address(x[i:i + 1]), 1, native.address(alone))
        assert torch.equal(together[i:i + 1], alone), f"input {i}"
    assert_rel_close(together.double(), x.double() @ w.double().t(), 1e-6)


def test_openmp_runtimes_are_read_from_the_process_maps():
    line = "7f00-7f01 r-xp 00000000 08:01 12 {}\n"
    torch_only = line.format("/site-packages/torch/lib/libgomp.so.1")
    assert native.openmp_runtimes(torch_only * 2) == {"/site-packages/torch/lib/libgomp.so.1"}
    two = torch_only + line.format("/opt/intel/lib/libiomp5.so")
    assert len(native.openmp_runtimes(two)) == 2
    assert not native.openmp_runtimes(line.format("/usr/lib/libgompish-not.txt"))


def _awkward_mla() -> MythosConfig:
    # D=50, H=3, R=13 (rope + R odd), q_lora=7, rope=6: no size a multiple of 4 or 16.
    return MythosConfig(dim=50, n_heads=3, max_seq_len=40, attn_type="mla", kv_lora_rank=13,
                        q_lora_rank=7, qk_rope_head_dim=6, qk_nope_head_dim=5, v_head_dim=7,
                        rope_theta=10000.0)


def _prefill_then_decode_to_the_last_slot(h: Harness, s_max: int,
                                          tol: float = TOL_FP32_TORCH) -> None:
    """Three prompt tokens, then one token per step up to slot s_max - 1, each against the
    (float32) reference."""
    ref_cache = {}
    x = h.x(1, 3)
    assert_rel_close(h.ours(x, [0]).float(), h.reference(x, 0, ref_cache), tol, "prefill")
    for pos in range(3, s_max):
        x = h.x(1, 1)
        assert_rel_close(h.ours(x, [pos]).float(), h.reference(x, pos, ref_cache), tol,
                         f"decode at {pos}")


@pytest.mark.parametrize("fold", [True, False], ids=["absorbed", "two-step"])
@pytest.mark.parametrize("cfg", [None, _awkward_mla()], ids=["harness", "awkward"])
def test_mla_one_row_over_the_joint_cache(cfg, fold, row_path):
    """Prefill then decode one row over a joint [k_pe | latent] cache (unwritten slots
    NaN), against the reference, up to the last slot of the cache."""
    h = Harness("mla", "cpu", b_max=1, s_max=24, cfg=cfg)
    if not fold:
        h.w = prepare_mla(h.w.base, fold_limit=0.0)
    assert (h.w.w_uk is None) == fold and (h.w.w_uv_t is None) == fold
    if row_path == "compiled":
        assert h.w.row_kernel is not None
    P, R = h.cfg.qk_rope_head_dim, h.cfg.kv_lora_rank
    joint = torch.full((1, 24, P + R), float("nan"))
    h.caches = (joint[..., P:], joint[..., :P])
    _prefill_then_decode_to_the_last_slot(h, 24)


@pytest.mark.parametrize("fold", [True, False], ids=["absorbed", "two-step"])
@pytest.mark.parametrize("cfg", [None, _awkward_mla()], ids=["harness", "awkward"])
def test_mla_bf16_one_row_within_the_bf16_bound(cfg, fold, row_path):
    """bf16 weights and a bf16 joint cache: the fused matrices stay bf16 and decode runs
    mla_decode_rows_bf16, against the float32 reference with docs/design.md's bf16
    per-kernel bound, up to the last slot."""
    if row_path == "pytorch":
        pytest.skip("no bf16 kernel to test: the torch implementation runs (its bf16 error at "
                    "these small sizes is near the bound itself)")
    h = Harness("mla", "cpu", dtype=torch.bfloat16, b_max=1, s_max=20, cfg=cfg)
    if not fold:
        h.w = prepare_mla(h.w.base, fold_limit=0.0)
    assert h.w.o_t.dtype == torch.bfloat16 and (h.w.w_uk is None) == fold
    assert h.w.row_kernel is not None
    P, R = h.cfg.qk_rope_head_dim, h.cfg.kv_lora_rank
    joint = torch.full((1, 20, P + R), float("nan"), dtype=torch.bfloat16)
    h.caches = (joint[..., P:], joint[..., :P])
    _prefill_then_decode_to_the_last_slot(h, 20, TOL_BF16_KERNEL)


def _float32_weights(w):
    """The same weights (bf16 values, exactly) in float32: the float32 path's input."""
    from dataclasses import fields, replace

    return replace(w, **{f.name: getattr(w, f.name).float() for f in fields(w)
                         if isinstance(getattr(w, f.name), torch.Tensor)})


@needs_compiler
@pytest.mark.parametrize("fold", [True, False], ids=["absorbed", "two-step"])
def test_mla_bf16_rows_of_a_ragged_batch_match_the_float32_kernel(fold):
    """B rows at different positions over a bf16 joint cache (unwritten slots NaN): the
    bf16 kernel against the float32 kernel on the same weights and cache values (rounded
    to bf16), outputs and new entries within the bf16 bound."""
    from mythos_rt.cpu.attention import mla_attention_cpu

    limit = None if fold else 0.0
    h = Harness("mla", "cpu", dtype=torch.bfloat16, b_max=3, s_max=16, cfg=_awkward_mla())
    ours = prepare_mla(h.w.base, fold_limit=limit)
    ref = prepare_mla(_float32_weights(h.w.base), fold_limit=limit)
    assert ours.o_t.dtype == torch.bfloat16 and ref.o_t.dtype == torch.float32
    P, R = h.cfg.qk_rope_head_dim, h.cfg.kv_lora_rank
    lens = torch.tensor([5, 0, 15], dtype=torch.int32)  # one row at the last slot
    joint = torch.full((3, 16, P + R), float("nan"))
    for b, n in enumerate(lens.tolist()):
        joint[b, :n] = torch.randn(n, P + R)
    joint = joint.bfloat16()
    x = h.x(3, 1).bfloat16()
    results = []
    for w, dtype in ((ours, torch.bfloat16), (ref, torch.float32)):
        cache = joint.to(dtype)
        out = mla_attention_cpu(x.to(dtype), w, cache[..., P:], cache[..., :P], lens, h.cos,
                                h.sin, h.scale)
        results.append((out.float(), cache.float()))
    (out, cache), (ref_out, ref_cache) = results
    assert_rel_close(out, ref_out, TOL_BF16_KERNEL, "outputs")
    written = torch.zeros(3, 16, dtype=torch.bool)
    written[torch.arange(3), lens.long()] = True
    assert_rel_close(cache[written], ref_cache[written], TOL_BF16_KERNEL, "new entries")
    assert torch.equal(cache[~written].isnan(), joint[~written].float().isnan())


def test_binders_take_their_ops_arguments():
    """Selected.launcher passes one argument list to the binder or to the op."""
    import inspect

    from mythos_rt.ops import registry

    bound = [impl for impl in registry.records() if impl.bind is not None]
    assert bound, "no binders registered"
    for impl in bound:
        sel = registry.select(impl.op, "cpu", impl.backend)
        assert (list(inspect.signature(sel.bind).parameters)
                == list(inspect.signature(sel.fn).parameters)), impl.bind


def test_launcher_calls_the_op_where_the_binder_declines():
    from mythos_rt.ops.registry import Selected

    calls = []
    sel = Selected("op", "cpu", lambda *a, **k: calls.append((a, k)), bind=lambda *a, **k: None)
    sel.launcher(1, out=2)()
    assert calls == [((1,), {"out": 2})]


@needs_compiler
def test_a_bound_mla_launch_refuses_a_position_outside_the_cache():
    h = Harness("mla", "cpu", b_max=1, s_max=8)
    P, R = h.cfg.qk_rope_head_dim, h.cfg.kv_lora_rank
    joint = torch.zeros(1, 8, P + R)
    out = torch.full((1, 1, h.cfg.dim), float("nan"))
    lens = torch.tensor([7], dtype=torch.int32)
    launch = native_bind(h, joint, lens, out)
    launch()  # the last slot
    assert torch.isfinite(out).all()
    lens.fill_(8)
    before = joint.clone()
    with pytest.raises(ValueError, match=r"positions \[8\] reach outside the cache of 8 slots"):
        launch()
    assert torch.equal(joint, before)


def native_bind(h, joint, lens, out):
    import gc
    import weakref

    from mythos_rt.cpu.attention import bind_mla_attention_cpu

    P = h.cfg.qk_rope_head_dim
    x = h.x(1, 1)
    alive = weakref.ref(x)
    launch = bind_mla_attention_cpu(x, h.w, joint[..., P:], joint[..., :P], lens,
                                    h.cos, h.sin, h.scale, out)
    assert launch is not None
    del x
    gc.collect()
    assert alive() is not None, "a prebound launch must hold the tensors it points into"
    return launch


@needs_compiler
@pytest.mark.parametrize("fold", [True, False], ids=["absorbed", "two-step"])
@pytest.mark.parametrize("cfg", [None, _awkward_mla()], ids=["harness", "awkward"])
def test_mla_rows_of_a_ragged_batch_match_the_pytorch_path(cfg, fold):
    """B rows at different positions over a joint cache whose unwritten slots are NaN: the
    compiled kernel against the cpu backend's PyTorch path (itself checked against the
    reference in tests/ops/test_attention.py)."""
    from dataclasses import replace

    from mythos_rt.cpu.attention import mla_attention_cpu

    h = Harness("mla", "cpu", b_max=3, s_max=16, cfg=cfg)
    if not fold:
        h.w = prepare_mla(h.w.base, fold_limit=0.0)
    assert h.w.row_kernel is not None and (h.w.w_uk is None) == fold
    P, R = h.cfg.qk_rope_head_dim, h.cfg.kv_lora_rank
    lens = torch.tensor([5, 0, 11], dtype=torch.int32)
    joint = torch.full((3, 16, P + R), float("nan"))
    for b, n in enumerate(lens.tolist()):
        joint[b, :n] = torch.randn(n, P + R)
    x = h.x(3, 1)
    results = []
    for w in (h.w, replace(h.w, row_kernel=None, row=None)):
        cache = joint.clone()
        out = mla_attention_cpu(x, w, cache[..., P:], cache[..., :P], lens, h.cos, h.sin,
                                h.scale)
        results.append((out, cache))
    (ours, our_cache), (ref, ref_cache) = results
    assert torch.isfinite(ours).all()
    assert_rel_close(ours, ref, TOL_FP32_TORCH, "outputs")
    written = torch.zeros(3, 16, dtype=torch.bool)
    written[torch.arange(3), lens.long()] = True
    assert_rel_close(our_cache[written], ref_cache[written], TOL_FP32_TORCH, "new entries")
    assert torch.equal(our_cache[~written].isnan(), joint[~written].isnan())


def _gqa(H: int, Hkv: int, d: int, D: int) -> MythosConfig:
    return MythosConfig(dim=D, n_heads=H, n_kv_heads=Hkv, max_seq_len=40, attn_type="gqa",
                        rope_theta=10000.0)


GQA_SHAPES = [  # none of d, D a multiple of 16
    pytest.param(_gqa(6, 2, 10, 60), id="H6-kv2-d10"),
    pytest.param(_gqa(3, 1, 18, 54), id="mqa-H3-d18"),
    pytest.param(_gqa(2, 2, 34, 68), id="mha-H2-d34"),
]


@pytest.mark.parametrize("cfg", GQA_SHAPES)
def test_gqa_one_row_decode_to_the_last_slot(cfg, row_path):
    """Prefill then decode one row (unwritten cache slots NaN) against the reference, up to
    the last slot of the cache."""
    h = Harness("gqa", "cpu", b_max=1, s_max=20, cfg=cfg)
    assert (h.w.row_kernel is not None) == (row_path == "compiled")
    _prefill_then_decode_to_the_last_slot(h, 20)


@needs_compiler
@pytest.mark.parametrize("cfg", GQA_SHAPES)
def test_gqa_rows_of_a_ragged_batch_match_the_pytorch_path(cfg):
    """B rows at different positions over caches whose unwritten slots are NaN: the
    compiled kernel against the cpu backend's PyTorch path."""
    from dataclasses import replace

    from mythos_rt.cpu.attention import gqa_attention_cpu

    h = Harness("gqa", "cpu", b_max=4, s_max=16, cfg=cfg)
    assert h.w.row_kernel is not None
    lens = torch.tensor([5, 0, 15], dtype=torch.int32)  # 3 of 4 rows; one at the last slot
    caches = [torch.full((4, 16, cfg.n_kv_heads, cfg.head_dim), float("nan")) for _ in range(2)]
    for c in caches:
        for b, n in enumerate(lens.tolist()):
            c[b, :n] = torch.randn(n, cfg.n_kv_heads, cfg.head_dim)
    x = h.x(3, 1)
    results = []
    for w in (h.w, replace(h.w, row_kernel=None)):
        k, v = (c.clone() for c in caches)
        results.append((gqa_attention_cpu(x, w, k, v, lens, h.cos, h.sin, h.scale), k, v))
    (ours, ok, ov), (ref, rk, rv) = results
    assert torch.isfinite(ours).all()
    assert_rel_close(ours, ref, TOL_FP32_TORCH, "outputs")
    for name, a, b, before in (("k", ok, rk, caches[0]), ("v", ov, rv, caches[1])):
        written = torch.zeros(4, 16, dtype=torch.bool)
        written[torch.arange(3), lens.long()] = True
        assert_rel_close(a[written], b[written], TOL_FP32_TORCH, f"new {name} entries")
        assert torch.equal(a[~written].isnan(), before[~written].isnan()), name


@pytest.mark.parametrize("cfg", GQA_SHAPES)
def test_gqa_bf16_one_row_within_the_bf16_bound(cfg, row_path):
    """bf16 weights and caches: decode runs gqa_decode_rows_bf16, against the float32
    reference at the bf16 per-kernel bound."""
    if row_path == "pytorch":
        pytest.skip("no bf16 kernel to test: the torch implementation runs (its bf16 error at "
                    "these small sizes is near the bound itself)")
    h = Harness("gqa", "cpu", dtype=torch.bfloat16, b_max=1, s_max=20, cfg=cfg)
    assert h.w.qkv_t.dtype == torch.bfloat16 and h.w.row_kernel is not None
    _prefill_then_decode_to_the_last_slot(h, 20, TOL_BF16_KERNEL)


@needs_compiler
@pytest.mark.parametrize("cfg", GQA_SHAPES)
def test_gqa_bf16_rows_of_a_ragged_batch_match_the_float32_kernel(cfg):
    """B rows at different positions over bf16 caches (unwritten slots NaN): the bf16
    kernel against the float32 kernel on the same weights and cache values."""
    from mythos_rt.cpu.attention import gqa_attention_cpu, prepare_gqa

    h = Harness("gqa", "cpu", dtype=torch.bfloat16, b_max=4, s_max=16, cfg=cfg)
    ref = prepare_gqa(_float32_weights(h.w.base))
    lens = torch.tensor([5, 0, 15], dtype=torch.int32)
    caches = [torch.full((4, 16, cfg.n_kv_heads, cfg.head_dim), float("nan")) for _ in range(2)]
    for c in caches:
        for b, n in enumerate(lens.tolist()):
            c[b, :n] = torch.randn(n, cfg.n_kv_heads, cfg.head_dim)
    caches = [c.bfloat16() for c in caches]
    x = h.x(3, 1).bfloat16()
    results = []
    for w, dtype in ((h.w, torch.bfloat16), (ref, torch.float32)):
        k, v = (c.to(dtype) for c in caches)
        out = gqa_attention_cpu(x.to(dtype), w, k, v, lens, h.cos, h.sin, h.scale)
        results.append((out.float(), k.float(), v.float()))
    (ours, ok, ov), (ref_out, rk, rv) = results
    assert_rel_close(ours, ref_out, TOL_BF16_KERNEL, "outputs")
    written = torch.zeros(4, 16, dtype=torch.bool)
    written[torch.arange(3), lens.long()] = True
    for name, a, b, before in (("k", ok, rk, caches[0]), ("v", ov, rv, caches[1])):
        assert_rel_close(a[written], b[written], TOL_BF16_KERNEL, f"new {name} entries")
        assert torch.equal(a[~written].isnan(), before[~written].float().isnan()), name


@needs_compiler
def test_a_bound_gqa_launch_refuses_a_position_outside_the_cache():
    from mythos_rt.cpu.attention import bind_gqa_attention_cpu

    h = Harness("gqa", "cpu", b_max=1, s_max=8)
    k, v = (torch.zeros(1, 8, h.cfg.n_kv_heads, h.cfg.head_dim) for _ in range(2))
    out = torch.full((1, 1, h.cfg.dim), float("nan"))
    lens = torch.tensor([7], dtype=torch.int32)
    launch = bind_gqa_attention_cpu(h.x(1, 1), h.w, k, v, lens, h.cos, h.sin, h.scale, out)
    launch()  # the last slot
    assert torch.isfinite(out).all()
    lens.fill_(8)
    before = (k.clone(), v.clone())
    with pytest.raises(ValueError, match=r"positions \[8\] reach outside the cache of 8 slots"):
        launch()
    assert torch.equal(k, before[0]) and torch.equal(v, before[1])
    # what the kernel cannot take is declined, for the PyTorch path to run
    assert bind_gqa_attention_cpu(h.x(1, 1), h.w, k, v, lens, h.cos[:4], h.sin[:4], h.scale,
                                  out) is None
    assert bind_gqa_attention_cpu(h.x(1, 1), h.w, k.transpose(2, 3), v.transpose(2, 3), lens,
                                  h.cos, h.sin, h.scale, out) is None


@needs_compiler
@pytest.mark.parametrize("threads", [3, 4])
def test_uneven_teams_give_the_one_thread_answer(threads):
    """Team sizes that split heads, (row, kv head) pairs, experts and columns unevenly
    (oversubscribed on a small machine: correctness, not speed) agree with one thread."""
    from mythos_rt.cpu.attention import gqa_attention_cpu, mla_attention_cpu

    cfg = moe_cfg(D=48, I=24, E=7, k=3, S=2)
    m = make_moe(cfg)
    moe = prepare_moe(op_args("moe", m.state_dict(), cfg))
    mla = Harness("mla", "cpu", b_max=3, s_max=16, cfg=_awkward_mla())
    gqa = Harness("gqa", "cpu", b_max=3, s_max=16, cfg=_gqa(6, 2, 10, 60))
    lens = torch.tensor([5, 0, 11], dtype=torch.int32)
    P, R = mla.cfg.qk_rope_head_dim, mla.cfg.kv_lora_rank
    joint = torch.randn(3, 16, P + R)
    kv = [torch.randn(3, 16, 2, 10) for _ in range(2)]
    x_moe, x_mla, x_gqa = torch.randn(7, 48), mla.x(3, 1), gqa.x(3, 1)

    def run():
        j, k, v = joint.clone(), *(c.clone() for c in kv)
        return [moe_ffn_cpu(x_moe, moe),
                mla_attention_cpu(x_mla, mla.w, j[..., P:], j[..., :P], lens, mla.cos, mla.sin,
                                  mla.scale), j,
                gqa_attention_cpu(x_gqa, gqa.w, k, v, lens, gqa.cos, gqa.sin, gqa.scale), k, v]

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(threads)
        if native.library().team_threads() != threads:
            pytest.skip(f"the kernels run on one thread here ({native.describe()})")
        many = run()
    finally:
        torch.set_num_threads(before)
    for name, a, b in zip(["moe", "mla", "mla cache", "gqa", "gqa k", "gqa v"], many, one):
        assert_rel_close(a, b, 1e-6, name)
