"""The cpu backend (mythos_rt.cpu): each lean decode op vs mythos_rt.reference, on fresh
random data, one row (the compiled kernels, or the host-scalar PyTorch paths without
them: every test runs both, see conftest.row_path) and several (vector paths/fallbacks).

Attention is also covered by tests/ops/test_attention.py (the "cpu" cases) and the whole
runtime by tests/test_runtime.py; here are the paths those do not reach: unabsorbed MLA,
MoE one token vs several, the one-row ACT update, norms with aliasing outputs.
"""

import pytest
import torch

from mythos_rt.cpu import native
from mythos_rt.cpu.attention import prepare_mla
from mythos_rt.cpu.ffn import dense_ffn_cpu, prepare_dense_ffn, swiglu_cpu
from mythos_rt.cpu.head import head_cpu, prepare_head
from mythos_rt.cpu.moe import moe_ffn_cpu, prepare_moe
from mythos_rt.cpu.norm import bind_rmsnorm_cpu, rmsnorm_cpu
from mythos_rt.cpu.recurrent import loop_epilogue_cpu, loop_prologue_cpu, prepare_loop
from mythos_rt.lower import op_args
from mythos_rt.ops import BackendError, select
from mythos_rt.ops.ffn import swiglu_torch
from mythos_rt.ops.head import HeadWeights
from mythos_rt.ops.norm import rmsnorm_torch
from mythos_rt.ops.moe import moe_ffn_torch
from mythos_rt.testing import TOL_BF16_KERNEL, TOL_FP32_TORCH, assert_rel_close, expert_shard

from ..ops._attn_ref import Harness
from ..ops.recurrent_cases import check_step, make_ref_loop, ref_prologue, run_loop
from ..ops.test_ffn import make_ffn
from ..ops.test_moe import make_moe, moe_cfg, ref_forward

pytestmark = pytest.mark.usefixtures("row_path")


def test_registry_auto_is_cpu_on_a_cpu_and_refused_elsewhere():
    for op in ("mla_attention", "gqa_attention", "moe_ffn", "loop_prologue", "loop_epilogue",
               "rmsnorm", "swiglu", "dense_ffn", "head"):
        assert select(op, "cpu").backend == "cpu", op
        assert select(op, "cpu", overrides={op: "torch"}).backend == "torch"
    with pytest.raises(BackendError, match="CPU only"):
        select("moe_ffn", "cuda", "cpu")
    # its fast paths are float32 and bf16: auto leaves other dtypes to the torch ones
    assert select("moe_ffn", "cpu", dtype=torch.bfloat16).backend == "cpu"
    assert select("moe_ffn", "cpu", dtype=torch.float16).backend == "torch"
    assert select("moe_ffn", "cpu", "cpu", dtype=torch.float16).backend == "cpu"


@pytest.mark.parametrize("fold", [True, False], ids=["absorbed", "two-step"])
def test_mla_decode_with_and_without_absorbed_projections(fold):
    h = Harness("mla", "cpu")
    if not fold:
        h.w = prepare_mla(h.w.base, fold_limit=0.0)
    assert (h.w.w_uk is None) == fold and (h.w.w_uv_t is None) == fold
    ref_cache = {}
    x = h.x(1, 5)
    assert_rel_close(h.ours(x, [0]), h.reference(x, 0, ref_cache), TOL_FP32_TORCH, "prefill")
    for step in range(4):
        x = h.x(1, 1)
        assert_rel_close(h.ours(x, [5 + step]), h.reference(x, 5 + step, ref_cache),
                         TOL_FP32_TORCH, f"decode {step}")


@pytest.mark.parametrize("spec", [dict(), dict(S=0), dict(D=48, I=16, E=6, k=3, S=2),
                                  dict(E=4, k=4, S=1)],
                         ids=["basic", "no-shared", "k3-S2", "topk-eq-E"])
@pytest.mark.parametrize("N", [1, 3, 29, 80],
                         ids=["one-token", "decode-batch", "chunk", "prefill-grouped"])
def test_moe_matches_reference(spec, N, row_path):
    """(The kernel takes 29 tokens of all but 4 experts top-4, and 80 of none: the grouped
    path.)"""
    cfg = moe_cfg(**spec)
    m = make_moe(cfg)
    moe = prepare_moe(op_args("moe", m.state_dict(), cfg))
    if row_path == "compiled":
        assert moe.kernel_max_tokens == 16 * cfg.n_experts // cfg.n_experts_per_tok
        takes = N <= moe.kernel_max_tokens
        assert takes if N <= 3 else takes == (N == 29 and spec != dict(E=4, k=4, S=1))
    x = torch.randn(N, cfg.dim)
    ref = ref_forward(m, x)
    assert_rel_close(moe_ffn_cpu(x, moe), ref, TOL_FP32_TORCH)
    out = torch.full((N, cfg.dim), float("nan"))
    assert moe_ffn_cpu(x, moe, out=out) is out
    assert_rel_close(out, ref, TOL_FP32_TORCH)


@pytest.mark.parametrize("N", [1, 3, 16, 20], ids=["one", "decode-batch", "max-rows", "prefill"])
def test_dense_ffn_matches_reference(N):
    ex, w = make_ffn(40)  # hidden 53: nothing a multiple of 16
    ffn = prepare_dense_ffn(w)
    x = torch.randn(N, 40)
    with torch.no_grad():
        ref = ex(x)
    assert_rel_close(dense_ffn_cpu(x, ffn), ref, TOL_FP32_TORCH)
    out = torch.full((N, 40), float("nan"))
    gate_up, act = torch.empty(N, 106), torch.empty(N, 53)
    assert dense_ffn_cpu(x, ffn, out=out, gate_up=gate_up, act=act) is out
    assert_rel_close(out, ref, TOL_FP32_TORCH)


@pytest.fixture(params=[True, False], ids=["bf16-hardware", "no-bf16-hardware"])
def bf16_hardware(request, monkeypatch):
    """Both choices of who takes bf16 chunks (``native.kernel_row_limit``), whatever CPU
    runs the tests: torch's matmuls (bf16 hardware) or the row kernels (none)."""
    monkeypatch.setattr(native, "native_bf16_matmul", lambda: request.param)
    return request.param


@pytest.mark.parametrize("N", [1, 3, 16, 20], ids=["one", "decode-batch", "max-rows", "prefill"])
def test_dense_ffn_bf16_weights_match_the_fp32_reference(N, row_path, bf16_hardware):
    """bf16 weights stay bf16: up to 16 rows run ffn_rows_bf16 (compiled paths), more the
    torch bf16 matmuls on bf16 hardware and the kernel without; judged against the float32
    reference at the bf16 per-kernel bound."""
    ex, w = make_ffn(40, torch.bfloat16)  # hidden 53: nothing a multiple of 16
    ffn = prepare_dense_ffn(w)
    assert (ffn.row_kernel is not None) == (row_path == "compiled")
    if ffn.row_kernel is not None:
        assert ffn.max_rows == (16 if bf16_hardware else 1 << 30)
    x = torch.randn(N, 40).bfloat16()
    with torch.no_grad():
        ref = ex.to(torch.bfloat16).float()(x.float())
    res = dense_ffn_cpu(x, ffn)
    assert res.dtype == torch.bfloat16
    assert_rel_close(res.float(), ref, TOL_BF16_KERNEL)
    out = torch.full((N, 40), float("nan"), dtype=torch.bfloat16)
    assert dense_ffn_cpu(x, ffn, out=out) is out
    assert_rel_close(out.float(), ref, TOL_BF16_KERNEL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("N", [1, 3, 16, 20], ids=["one", "decode-batch", "max-rows", "prefill"])
def test_head_matches_the_fp32_reference(N, dtype, row_path, bf16_hardware):
    """Up to 16 rows run head_rows / head_rows_bf16 (compiled paths), more the torch
    matmul (bf16 without bf16 hardware: the kernel); bf16 judged against the float32
    product at the bf16 per-kernel bound."""
    w = torch.randn(203, 40).to(dtype)  # neither a multiple of 4 or 16
    head = prepare_head(HeadWeights(w))
    assert (head.row_kernel is not None) == (row_path == "compiled")
    if head.row_kernel is not None:
        assert head.max_rows == (1 << 30 if dtype == torch.bfloat16 and not bf16_hardware
                                 else 16)
    x = torch.randn(N, 40).to(dtype)
    ref = x.float() @ w.float().t()
    tol = TOL_BF16_KERNEL if dtype == torch.bfloat16 else TOL_FP32_TORCH
    res = head_cpu(x, head)
    assert res.dtype == dtype
    assert_rel_close(res.float(), ref, tol)
    out = torch.full((N, 203), float("nan"), dtype=dtype)
    assert head_cpu(x, head, out=out) is out
    assert_rel_close(out.float(), ref, tol)


@pytest.mark.parametrize("t", [0, 2, 6], ids=["t0", "t2", "t6_beyond_max_loops"])
@pytest.mark.parametrize("n", [1, 7])
def test_prologue_matches_reference(n, t):
    m = make_ref_loop(48)
    h, e = torch.randn(n, 48), torch.randn(n, 48)
    with torch.no_grad():
        ref = ref_prologue(m, h, e, t)
    out = torch.full_like(h, float("nan"))
    assert loop_prologue_cpu(h, e, prepare_loop(m.params()), t, out=out) is out
    assert_rel_close(out, ref, TOL_FP32_TORCH)


def _epilogue(block_out, h, e, params, t, state, next_combined=None):
    return loop_epilogue_cpu(block_out, h, e, prepare_loop(params), t, state, next_combined)


@pytest.mark.parametrize("with_next", [False, True], ids=["plain", "next_combined"])
@pytest.mark.parametrize("t", [1, 5], ids=["t1", "t5_beyond_max_loops"])
@pytest.mark.parametrize("n", [1, 37])
def test_epilogue_matches_reference(n, t, with_next):
    m = make_ref_loop(48, rank=3, max_loops=3)
    seen = set()
    for seed in range(6 if n == 1 else 1):  # one row: halted, crossing and running draws
        torch.manual_seed(seed)
        before, after = check_step(m, _epilogue, n, torch.float32, TOL_FP32_TORCH, t, with_next)
        seen.add((bool(before[0]), bool(after[0])))
    if n == 1:
        assert len(seen) >= 2, seen


@pytest.mark.parametrize("with_next", [False, True], ids=["plain", "next_combined"])
@pytest.mark.parametrize("n", [1, 37])
def test_bf16_epilogue_matches_reference(n, with_next, row_path):
    """A bf16 model's epilogue: ``loop_epilogue_rows_bf16`` where compiled (the torch
    implementation otherwise), at the bf16 per-kernel bound, halting as the reference."""
    m = make_ref_loop(48, rank=3, max_loops=3, round_to=torch.bfloat16)
    assert (prepare_loop(m.params(dtype=torch.bfloat16)).row_kernel is not None) == (
        row_path == "compiled")
    for seed in range(6 if n == 1 else 1):  # one row: halted, crossing and running draws
        torch.manual_seed(seed)
        check_step(m, _epilogue, n, torch.bfloat16, TOL_BF16_KERNEL, 5, with_next)


@pytest.mark.parametrize("scenario,T", [("mixed", 1), ("all", 7)])
def test_loop_matches_reference(scenario, T):
    run_loop(lambda h, e, p, t: loop_prologue_cpu(h, e, prepare_loop(p), t), _epilogue,
             scenario, T, 7, TOL_FP32_TORCH)


@pytest.mark.parametrize("rows", [1, 5, 19])
def test_bf16_rmsnorm_matches_torch(rows, row_path):
    """bf16 rows (``rmsnorm_rows_bf16`` where compiled): the residual sum rounded and
    stored exactly as torch's, the output within one bf16 rounding of it."""
    x, r = torch.randn(rows, 40).bfloat16(), torch.randn(rows, 40).bfloat16()
    w = torch.randn(40).bfloat16()
    out, s = torch.empty_like(x), torch.empty_like(x)
    assert (bind_rmsnorm_cpu(x, w, 1e-6, r, out, s) is not None) == (row_path == "compiled")
    y, s_got = rmsnorm_cpu(x, w, 1e-6, residual=r, out=out, residual_out=s)
    y_ref, s_ref = rmsnorm_torch(x, w, 1e-6, residual=r)
    assert y is out and s_got is s and torch.equal(s, s_ref)
    assert_rel_close(y.float(), y_ref.float(), TOL_BF16_KERNEL)
    assert (y.float() - y_ref.float()).abs().max() <= 2 ** -7 * y_ref.float().abs().max()
    assert_rel_close(rmsnorm_cpu(x, w, out=torch.empty_like(x)).float(),
                     rmsnorm_torch(x, w).float(), TOL_BF16_KERNEL)


@pytest.mark.parametrize("rows", [1, 5])
def test_rmsnorm_and_swiglu_match_torch(rows):
    x, r, w = torch.randn(rows, 40), torch.randn(rows, 40), torch.randn(40)
    assert_rel_close(rmsnorm_cpu(x, w), rmsnorm_torch(x, w), TOL_FP32_TORCH)
    y, s = rmsnorm_cpu(x, w, residual=r)
    y_ref, s_ref = rmsnorm_torch(x, w, residual=r)
    assert_rel_close(y, y_ref, TOL_FP32_TORCH)
    assert torch.equal(s, s_ref)
    a, b = x.clone(), r.clone()  # outputs aliasing the inputs, as the runtime may pass them
    rmsnorm_cpu(a, w, residual=b, out=a, residual_out=b)
    assert_rel_close(a, y_ref, TOL_FP32_TORCH)
    assert torch.equal(b, s_ref)
    gu = torch.randn(rows, 2, 24)
    assert_rel_close(swiglu_cpu(gu), swiglu_torch(gu), TOL_FP32_TORCH)
    with pytest.raises(ValueError, match="even"):
        swiglu_cpu(torch.randn(rows, 7))


def test_other_dtypes_run_the_torch_reference():
    x, w = torch.randn(3, 40).to(torch.bfloat16), torch.randn(40).to(torch.bfloat16)
    assert torch.equal(rmsnorm_cpu(x, w), rmsnorm_torch(x, w))
    cfg = moe_cfg()
    m = make_moe(cfg).to(torch.float16)
    moe = prepare_moe(op_args("moe", m.state_dict(), cfg))
    x = torch.randn(1, cfg.dim).to(torch.float16)
    from mythos_rt.ops.moe import moe_ffn_torch
    assert torch.equal(moe_ffn_cpu(x, moe), moe_ffn_torch(x, moe.base))


@pytest.mark.parametrize("name", ["mla", "mla-unabsorbed", "gqa"])
def test_batch1_decode_matches_reference(name, monkeypatch, row_path):
    """The one-row fast paths end to end: greedy ids equal the reference's, and every
    decode step's logits match the reference's teacher-forced ones."""
    import mythos_rt
    from mythos_rt.config import MythosConfig
    from mythos_rt.cpu import attention as cpu_attention
    from mythos_rt.reference import OpenMythos
    from mythos_rt.testing import spread_act_halting

    cfg = MythosConfig.from_preset("tiny_gqa" if name == "gqa" else "tiny_mla")
    if name == "mla-unabsorbed":
        monkeypatch.setattr(cpu_attention, "FOLD_LIMIT", 0.0)
    ids = torch.randint(0, cfg.vocab_size, (1, 5))
    model = OpenMythos(cfg).eval()
    spread_act_halting(model, ids)
    rt = mythos_rt.compile(model, max_batch_size=1, max_loops=2 * cfg.max_loop_iters)
    assert set(rt.backends.values()) == {"cpu"}
    assert rt._low.args["loop_prologue"] is rt._low.args["loop_epilogue"]  # prepared once
    if cfg.attn_type == "mla":  # the joint cache, and the kernel (or, absorbed, a one-row path)
        mla = [a for a in rt._low.args.values() if isinstance(a, cpu_attention.CpuMLA)]
        assert all((w.w_uk is None) == (name == "mla") for w in mla)
        if row_path == "compiled":
            assert all(w.row_kernel is not None for w in mla)
        else:
            assert all((w.row is not None) == (name == "mla") for w in mla)
        ckv, kpe = next(iter(rt._low.buffers.caches.values()))
        assert cpu_attention._joint_rows(ckv, kpe) is not None
    n_loops, new = cfg.max_loop_iters + 1, 5
    out, logits = rt.generate(ids, new, n_loops=n_loops, return_logits=True)
    assert torch.equal(out, model.generate(ids, new, n_loops=n_loops, temperature=0.0))
    with torch.no_grad():
        ref = model(out[:, :-1], n_loops=n_loops)[:, ids.shape[1] - 1:]
    assert_rel_close(logits, ref, TOL_FP32_TORCH, "per-step logits")


@pytest.mark.parametrize("N", [1, 3, 29, 300], ids=["one-token", "decode-batch", "chunk",
                                                   "long-chunk"])
@pytest.mark.parametrize("kw,world", [(dict(D=40, I=24, E=7, k=2, S=1), 3),
                                      (dict(D=32, I=16, E=2, k=1, S=2), 3)],
                         ids=["E7-over-3", "E2-over-3-empty-shard"])
def test_moe_expert_shards_sum_to_the_whole(kw, world, N):
    """An expert-parallel shard (docs/parallel.md) adds its experts' and shared slots'
    contributions only, on every path (the kernel skips other shards' pairs), so the
    shards sum to the whole MoE; each matches the torch implementation of its shard."""
    cfg = moe_cfg(**kw)
    m = make_moe(cfg)
    packed = op_args("moe", m.state_dict(), cfg)
    x = torch.randn(N, cfg.dim)
    total = torch.zeros(N, cfg.dim)
    for rank in range(world):
        part = expert_shard(packed, world, rank)
        got = moe_ffn_cpu(x, prepare_moe(part))
        assert_rel_close(got, moe_ffn_torch(x, part), TOL_FP32_TORCH, f"shard {rank}")
        total += got
    assert_rel_close(total, ref_forward(m, x), TOL_FP32_TORCH)


def test_prepared_moe_reads_the_packed_weights_in_place():
    """The cpu MoE's shared slots and router are views of the packed weights the plan
    holds (no second copy of a weight), and the result still matches the reference."""
    cfg = moe_cfg(D=48, I=16, E=6, k=3, S=2)
    m = make_moe(cfg)
    packed = op_args("moe", m.state_dict(), cfg)
    moe = prepare_moe(packed)
    E = packed.n_routed
    assert moe.shared_w13.data_ptr() == packed.w13[E:].data_ptr()
    assert [w.data_ptr() for w in moe.shared_w2] == [w.data_ptr() for w in packed.w2[E:]]
    for N in (1, 3, 29):
        x = torch.randn(N, cfg.dim)
        assert_rel_close(moe_ffn_cpu(x, moe), ref_forward(m, x), TOL_FP32_TORCH)


@pytest.mark.parametrize("N", [1, 3, 29], ids=["one-token", "decode-batch", "chunk"])
def test_moe_bf16_weights_match_the_fp32_reference(N, row_path, bf16_hardware):
    """bf16 weights stay bf16 (the kernel widens them in registers; it takes chunks too
    on a CPU without bf16 hardware); judged against the float32 reference with
    docs/design.md's bf16 per-kernel bound."""
    cfg = moe_cfg(D=48, I=16, E=6, k=3, S=2)
    m = make_moe(cfg)
    moe = prepare_moe(op_args("moe", m.state_dict(), cfg, dtype=torch.bfloat16))
    assert moe.base.w13.dtype == torch.bfloat16 and moe.shared_w13.dtype == torch.bfloat16
    assert (moe.row_kernel is not None) == (row_path == "compiled")
    if moe.row_kernel is not None:
        assert moe.kernel_max_tokens == (16 if bf16_hardware else 16 * 6 // 3)
    x = torch.randn(N, cfg.dim).bfloat16()
    with torch.no_grad():  # the reference on the same (bf16-rounded) weights: a router
        for p in m.parameters():  # logit near a tie may otherwise pick another expert
            p.copy_(p.bfloat16().float())
    ref = ref_forward(m, x.float())
    res = moe_ffn_cpu(x, moe)
    assert res.dtype == torch.bfloat16
    assert_rel_close(res.float(), ref, TOL_BF16_KERNEL)
    out = torch.full((N, cfg.dim), float("nan"), dtype=torch.bfloat16)
    assert moe_ffn_cpu(x, moe, out=out) is out
    assert_rel_close(out.float(), ref, TOL_BF16_KERNEL)


def test_bf16_model_runs_the_cpu_backend_within_the_bf16_bound():
    """A bf16 model on a CPU gets the cpu backend (attention, MoE, dense FFNs, the head,
    norms and loop epilogues through the kernels where compiled): prefill and decode
    logits against the fp32 reference."""
    import mythos_rt
    from mythos_rt.config import MythosConfig
    from mythos_rt.cpu import native
    from mythos_rt.cpu.attention import CpuMLA
    from mythos_rt.cpu.ffn import CpuFFN
    from mythos_rt.cpu.head import CpuHead
    from mythos_rt.cpu.moe import CpuMoE
    from mythos_rt.reference import OpenMythos
    from mythos_rt.testing import TOL_BF16_E2E
    cfg = MythosConfig.from_preset("tiny_mla")
    model = OpenMythos(cfg).eval()
    rt = mythos_rt.compile(model, dtype="bfloat16", max_batch_size=2)
    assert rt.backends["moe_ffn"] == rt.backends["head"] == "cpu"
    prepared = [a for a in rt._low.args.values() if isinstance(a, (CpuMLA, CpuFFN, CpuHead, CpuMoE))]
    assert {type(a) for a in prepared} == {CpuMLA, CpuFFN, CpuHead, CpuMoE}
    assert all((a.row_kernel is not None) == (native.library() is not None) for a in prepared)
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    with torch.no_grad():
        assert_rel_close(rt.forward(ids, n_loops=4).float(), model(ids, n_loops=4), TOL_BF16_E2E)
        cache = {}
        model(ids[:, :8], n_loops=4, kv_cache=cache)
        ref = model(ids[:, 8:], n_loops=4, kv_cache=cache, start_pos=8)
    rt._prefill(list(ids[:, :8]), 4, want_all=False)
    assert_rel_close(rt._run_chunk(ids[:, 8:], 4).float(), ref, TOL_BF16_E2E)
