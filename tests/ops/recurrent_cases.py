"""Shared cases for the recurrent-step tests (torch backend and Triton kernels).

The reference side is always ``mythos_rt.reference``: the loop body of
``RecurrentBlock.forward`` restated step by step (``ref_step``) with the reference
modules, and anchored to ``RecurrentBlock.forward`` itself in ``run_loop``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mythos_rt import reference as R
from mythos_rt.config import MythosConfig
from mythos_rt.lower import op_args
from mythos_rt.ops.recurrent import ACTState, LoopParams
from mythos_rt.testing import assert_rel_close


@dataclass
class RefLoop:
    """The reference modules of the loop body (no block) and their LoopParams."""
    norm: R.RMSNorm
    lora: R.LoRAAdapter
    injection: R.LTIInjection
    act: R.ACTHalting
    loop_dim: int
    thr: float
    cfg: MythosConfig

    def state_dict(self):
        sd = {}
        for name in ("norm", "lora", "injection", "act"):
            for k, v in getattr(self, name).state_dict().items():
                sd[f"recurrent.{name}.{k}"] = v
        return sd

    def params(self, dtype=None, device=None) -> LoopParams:
        return op_args("loop", self.state_dict(), self.cfg, "recurrent.", dtype=dtype,
                       device=device)


def randomize_(norm, lora, injection, act):
    """Non-trivial parameters: no ones/zeros left from init, LoRA delta of O(0.1·|x|)."""
    D = norm.weight.numel()
    with torch.no_grad():
        norm.weight.copy_(1.0 + 0.3 * torch.randn(D))
        lora.scale.weight.copy_(torch.randn_like(lora.scale.weight))
        lora.B.copy_(0.3 * torch.randn_like(lora.B))
        injection.log_A.copy_(0.7 * torch.randn(D))
        injection.log_dt.copy_(0.3 * torch.randn(1))
        injection.B.copy_(0.1 + 0.2 * torch.randn(D))
        act.halt.bias.copy_(0.3 * torch.randn(1))


def make_ref_loop(dim: int, rank: int = 4, max_loops: int = 3, thr: float = 0.99,
                  round_to=None) -> RefLoop:
    """Fresh random reference modules for a D=dim loop. ``round_to`` rounds every weight
    to that dtype (kept fp32) so a low-precision kernel sees exactly the reference's weights."""
    cfg = MythosConfig(dim=dim, lora_rank=rank, max_loop_iters=max_loops, act_threshold=thr)
    m = RefLoop(R.RMSNorm(dim), R.LoRAAdapter(dim, rank, max_loops), R.LTIInjection(dim),
                R.ACTHalting(dim), cfg.loop_dim, thr, cfg)
    randomize_(m.norm, m.lora, m.injection, m.act)
    if round_to is not None:
        with torch.no_grad():
            for mod in (m.norm, m.lora, m.injection, m.act):
                for p in mod.parameters():
                    p.copy_(p.to(round_to).float())
    return m


def ref_prologue(m, h, e, t):
    """combined = norm(loop_index_embedding(h, t) + e) — RecurrentBlock.forward's first line."""
    return m.norm(R.loop_index_embedding(h, t, m.loop_dim) + e)


def ref_step(m, block_out, h, e, t, cum, halted, h_out):
    """The rest of one iteration of RecurrentBlock.forward, verbatim in meaning."""
    thr = m.thr if hasattr(m, "thr") else m.cfg.act_threshold
    out = block_out + m.lora(block_out, t)
    h = m.injection(h, e, out)
    h_out, cum, halted = R.act_update(h, m.act(h), cum, halted, h_out, thr)
    return h, cum, halted, h_out


def random_step_inputs(m: RefLoop, n: int, dtype, device="cpu", t: int = 0):
    """Rounded-to-dtype inputs (as fp32 for the reference) and an ACT state where some rows
    are halted, some cross the threshold this step and some keep running. Rows whose
    crossing decision is within 0.02 of the threshold are moved away from it, so the
    discrete outcome does not hinge on rounding."""
    D = m.norm.weight.numel()
    x, h, e, h_out = (torch.randn(n, D).to(dtype).float() for _ in range(4))
    cum = torch.rand(n) * 0.95
    halted = torch.rand(n) < 0.3
    cum[halted] = m.thr + 0.5 * torch.rand(int(halted.sum()))
    with torch.no_grad():
        hn = m.injection(h, e, x + m.lora(x, t))
        p = m.act(hn)
        near = ((cum + p - m.thr).abs() < 0.02) & ~halted
        cum[near] = (cum[near] - 0.05).clamp(min=0)
        near = ((cum + p - m.thr).abs() < 0.02) & ~halted
        cum[near] = cum[near] + 0.1
    state = ACTState.allocate(n + 3, D, dtype, device).reset(n)
    state.h_out[:n].copy_(h_out)
    state.cum_p[:n].copy_(cum)
    state.halted[:n].copy_(halted)
    state.n_running.fill_(int((~halted).sum()))
    return x, h, e, cum, halted, h_out, state


def check_step(m: RefLoop, epilogue, n, dtype, tol, t, with_next, device="cpu", **kw):
    """One epilogue call vs ref_step (+ ref_prologue(t+1) when with_next)."""
    x, h, e, cum, halted, h_out, state = random_step_inputs(m, n, dtype, device, t)
    params = m.params(dtype=dtype, device=device)
    h_dev, e_dev, x_dev = (a.to(device=device, dtype=dtype) for a in (h, e, x))
    nc = torch.full_like(h_dev, float("nan")) if with_next else None
    with torch.no_grad():
        h_r, cum_r, halted_r, hout_r = ref_step(m, x, h, e, t, cum, halted, h_out)
        comb_r = ref_prologue(m, h_r, e, t + 1)
    epilogue(x_dev, h_dev, e_dev, params, t, state, nc, **kw)
    assert_rel_close(h_dev, h_r, tol, "h")
    assert_rel_close(state.h_out[:n], hout_r, tol, "h_out")
    assert_rel_close(state.cum_p[:n], cum_r, tol, "cum_p")
    assert torch.equal(state.halted[:n].cpu(), halted_r), "halted"
    assert not state.halted[n:].any() and not state.cum_p[n:].any(), "rows beyond N touched"
    assert int(state.n_running) == int((~halted_r).sum()), "n_running"
    if with_next:
        assert_rel_close(nc, comb_r, tol, "next_combined")
    return halted, halted_r


# ---- loop level: a small full model, halting at different loops ------------------------

def make_model(scenario: str, T: int, seed_dtype=torch.float32):
    """tiny_mla model whose ACT halts positions at different loops.

    ``scenario`` "mixed": some positions never halt within the test's loops;
    "all": every position halts, at different loops. Halting is steered through one
    channel k: e[..., k] spreads over positions, halt.weight = one-hot(k), the LTI
    injection passes e[..., k] straight into h[..., k] (A_k ≈ 0, B_k = 1) and the loop
    norm weight of channel k is 0, so the block adds only a small O(0.1) term to h_k.
    """
    cfg = MythosConfig.from_preset("tiny_mla")
    model = R.OpenMythos(cfg).eval()
    rb = model.recurrent
    randomize_(rb.norm, rb.lora, rb.injection, rb.act)
    D, k = cfg.dim, 5
    lo, hi = (-6.0, 5.0) if scenario == "mixed" else (-1.2, 5.0)  # p ≈ sigmoid(e_k)
    with torch.no_grad():
        rb.act.halt.weight.zero_()
        rb.act.halt.weight[0, k] = 1.0
        rb.act.halt.bias.zero_()
        rb.norm.weight[k] = 0.0
        rb.injection.B[k] = 1.0
        rb.injection.log_A[k] = 3.0  # A_k ≈ 0: h_k ≈ e_k + out_k
    e = torch.randn(1, T, D)
    e[0, :, k] = torch.linspace(lo, hi, T)[torch.randperm(T)]
    h0 = torch.randn(1, T, D)
    return model, cfg, h0, e


def run_loop(prologue, epilogue, scenario: str, T: int, n_loops: int, tol: float,
             dtype=torch.float32, device="cpu"):
    """Drive prologue → reference block → epilogue for n_loops and compare every loop.

    The block output fed to our epilogue is the reference block applied to the
    reference's combined, so both sides see the same block_out. Returns the loop at which
    each position halted (-1: never) according to the reference.
    """
    model, cfg, h0, e = make_model(scenario, T)
    rb = model.recurrent
    freqs = model.freqs_cis_mla[:T]
    mask = R.causal_mask(T, T, h0.device)
    N, D = T, cfg.dim
    params = op_args("loop", model.state_dict(), cfg, "recurrent.", dtype=dtype, device=device)
    state = ACTState.allocate(N + 2, D, dtype, device).reset(N)
    h = h0.reshape(N, D).to(device=device, dtype=dtype).clone()
    e_dev = e.reshape(N, D).to(device=device, dtype=dtype)
    combined = prologue(h, e_dev, params, 0)

    h_r, cum_r = h0, torch.zeros(1, T)
    halted_r, hout_r = torch.zeros(1, T, dtype=torch.bool), torch.zeros_like(h0)
    halt_loop = torch.full((T,), -1)
    with torch.no_grad():
        for t in range(n_loops):
            comb_r = ref_prologue(rb, h_r, e, t)
            assert_rel_close(combined, comb_r.reshape(N, D), tol, f"combined, loop {t}")
            block_out = rb.block(comb_r, freqs, mask, None, f"recurrent_loop_{t}")
            h_r, cum_r, halted_r, hout_r = ref_step(rb, block_out, h_r, e, t, cum_r, halted_r,
                                                    hout_r)
            halt_loop[(halt_loop < 0) & halted_r[0]] = t
            epilogue(block_out.reshape(N, D).to(device=device, dtype=dtype), h, e_dev, params,
                     t, state, combined)
            assert_rel_close(h, h_r.reshape(N, D), tol, f"h, loop {t}")
            assert_rel_close(state.h_out[:N], hout_r.reshape(N, D), tol, f"h_out, loop {t}")
            assert_rel_close(state.cum_p[:N], cum_r.reshape(N), tol, f"cum_p, loop {t}")
            assert torch.equal(state.halted[:N].cpu(), halted_r.reshape(N)), f"halted, loop {t}"
            assert int(state.n_running) == int((~halted_r).sum()), f"n_running, loop {t}"
            assert (int(state.n_running) == 0) == bool(halted_r.all())
        # anchor: the step-by-step reference is RecurrentBlock.forward itself
        h_out_forward = rb(h0, e, freqs, mask, n_loops)
    assert_rel_close(hout_r, h_out_forward, 1e-6, "ref_step loop vs RecurrentBlock.forward")
    return halt_loop
