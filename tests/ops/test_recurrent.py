"""Torch backend of the recurrent step (loop_prologue / loop_epilogue) vs mythos_rt.reference."""

import inspect

import pytest
import torch

from mythos_rt import reference as R
from mythos_rt.config import MythosConfig
from mythos_rt.lower import op_args
from mythos_rt.ops import registry
from mythos_rt.ops.recurrent import (ACTState, loop_epilogue, loop_epilogue_torch, loop_prologue,
                                     loop_prologue_torch)
from mythos_rt.testing import TOL_FP32_TORCH, assert_rel_close

from .recurrent_cases import check_step, make_ref_loop, ref_prologue, run_loop

DIMS = [pytest.param(48, id="D48"), pytest.param(208, id="D208")]  # D//8 even, not 2^k
ROWS = [pytest.param(1, id="N1"), pytest.param(7, id="N7"), pytest.param(37, id="N37")]


def test_loop_params_as_the_lowering_builds_them():
    cfg = MythosConfig.from_preset("tiny_mla")
    model = R.OpenMythos(cfg)
    rb = model.recurrent
    with torch.no_grad():
        rb.injection.log_A.copy_(torch.randn(cfg.dim) * 3)  # some hit the ±20 clamp
        rb.injection.log_dt.fill_(15.0)
    p = op_args("loop", model.state_dict(), cfg, "recurrent.")
    assert p.dim == cfg.dim and p.rank == cfg.lora_rank and p.loop_dim == cfg.loop_dim
    assert p.max_loops == cfg.max_loop_iters and p.threshold == cfg.act_threshold
    assert p.A.dtype == torch.float32
    assert torch.equal(p.A, rb.injection.get_A().detach())
    assert torch.equal(p.lora_scale, rb.lora.scale.weight)
    assert torch.equal(p.halt_w, rb.act.halt.weight.reshape(-1))
    assert p.halt_b.shape == (1,) and p.lora_down.shape == (cfg.lora_rank, cfg.dim)
    half = op_args("loop", model.state_dict(), cfg, "recurrent.", dtype=torch.float16)
    assert half.norm_w.dtype == torch.float16 and half.A.dtype == torch.float32
    sub = rb.state_dict()
    assert torch.equal(op_args("loop", sub, cfg).inj_B, p.inj_B)
    with pytest.raises(KeyError, match="recurrent.lora.B"):
        op_args("loop", {k: v for k, v in model.state_dict().items()
                         if k != "recurrent.lora.B"}, cfg, "recurrent.")


def test_act_state_reset_keeps_buffers():
    st = ACTState.allocate(9, 48, torch.float16, "cpu")
    assert int(st.n_running) == 9 and st.halted.dtype == torch.bool
    ptrs = [st.h_out.data_ptr(), st.cum_p.data_ptr(), st.halted.data_ptr()]
    st.h_out.normal_()
    st.cum_p.uniform_()
    st.halted.fill_(True)
    st.reset(5)
    assert [st.h_out.data_ptr(), st.cum_p.data_ptr(), st.halted.data_ptr()] == ptrs
    assert not st.h_out[:5].any() and not st.cum_p[:5].any() and not st.halted[:5].any()
    assert st.halted[5:].all() and int(st.n_running) == 5
    with pytest.raises(ValueError):
        st.reset(10)


@pytest.mark.parametrize("t", [0, 1, 6])
@pytest.mark.parametrize("n", ROWS)
@pytest.mark.parametrize("dim", DIMS)
def test_prologue_torch_vs_reference(dim, n, t):
    m = make_ref_loop(dim)
    h, e = torch.randn(n, dim), torch.randn(n, dim)
    with torch.no_grad():
        ref = ref_prologue(m, h, e, t)
    assert_rel_close(loop_prologue_torch(h, e, m.params(), t), ref, TOL_FP32_TORCH)
    out = torch.full_like(h, float("nan"))
    assert loop_prologue_torch(h, e, m.params(), t, out=out) is out
    assert_rel_close(out, ref, TOL_FP32_TORCH)


@pytest.mark.parametrize("with_next", [False, True], ids=["plain", "next_combined"])
@pytest.mark.parametrize("t", [pytest.param(1, id="t1"),
                               pytest.param(5, id="t5_beyond_max_loops")])
@pytest.mark.parametrize("n", ROWS)
@pytest.mark.parametrize("dim", DIMS)
def test_epilogue_torch_vs_reference(dim, n, t, with_next):
    m = make_ref_loop(dim, rank=3, max_loops=3)
    halted_before, halted_after = check_step(m, loop_epilogue_torch, n, torch.float32,
                                             TOL_FP32_TORCH, t, with_next)
    if n == 37:  # the random state covers every ACT branch
        assert halted_before.any() and (halted_after & ~halted_before).any()
        assert (~halted_after).any()


@pytest.mark.parametrize("scenario,T", [("mixed", 37), ("all", 7)])
def test_loop_torch_vs_reference(scenario, T):
    n_loops = 7  # tiny_mla max_loop_iters = 4: loops 4..6 use the clamped LoRA scale
    halt_loop = run_loop(loop_prologue_torch, loop_epilogue_torch, scenario, T, n_loops,
                         TOL_FP32_TORCH)
    assert len(set(halt_loop[halt_loop >= 0].tolist())) >= 2, halt_loop
    if scenario == "mixed":
        assert (halt_loop < 0).any() and (halt_loop >= 0).any(), halt_loop
    else:
        assert (halt_loop >= 0).all(), halt_loop


def test_registry_and_signatures():
    for op in ("loop_prologue", "loop_epilogue", "rmsnorm", "swiglu"):
        # loop_prologue/epilogue also have a cuda backend (tests/csrc checks its signature)
        assert registry.backends_of(op)[:2] == ["torch", "triton"]
        t_sig = inspect.signature(registry.load(op, "torch"))
        k_sig = inspect.signature(registry.load(op, "triton"))
        public = [p for p in k_sig.parameters.values() if not p.name.startswith("_")]
        assert list(t_sig.parameters) == [p.name for p in public], op
        assert [p.default for p in t_sig.parameters.values()] == [p.default for p in public]
    assert registry.select("loop_epilogue", "cpu", "torch").fn is loop_epilogue_torch


def test_dispatch_wrappers_prepare_the_selected_backend():
    m = make_ref_loop(48)
    h, e = torch.randn(5, 48), torch.randn(5, 48)
    want = loop_prologue_torch(h, e, m.params(), 2)
    assert torch.equal(loop_prologue(h, e, m.params(), 2, backend="torch"), want)
    # auto on a CPU is the cpu backend, which needs its prepared LoopParams
    assert_rel_close(loop_prologue(h, e, m.params(), 2), want, TOL_FP32_TORCH)
    st = ACTState.allocate(5, 48, torch.float32, "cpu").reset(5)
    assert loop_epilogue(torch.randn(5, 48), h, e, m.params(), 0, st) is None


def test_shape_errors():
    m = make_ref_loop(48)
    with pytest.raises(ValueError, match="e: shape"):
        loop_prologue_torch(torch.randn(3, 48), torch.randn(4, 48), m.params(), 0)
    st = ACTState.allocate(2, 48, torch.float32, "cpu")
    with pytest.raises(ValueError, match="ACTState"):
        loop_epilogue_torch(torch.randn(3, 48), torch.randn(3, 48), torch.randn(3, 48),
                            m.params(), 0, st)
