"""Numerics helpers shared by tests and benchmarks (docs/design.md "Numerics").

Comparisons use the relative Frobenius error ‖out − ref‖ / ‖ref‖ against a float32/64
reference; NaN or Inf in the output never passes.
"""

from __future__ import annotations

import torch

# docs/design.md's bounds, one name per mode; every test tolerance comes from here.
TOL_FP32_TORCH = 1e-5        # fp32, torch backend vs reference
TOL_FP32_INTERPRET = 1e-4    # fp32 Triton under TRITON_INTERPRET=1
TOL_FP16_INTERPRET = 5e-3    # fp16 Triton under TRITON_INTERPRET=1
TOL_BF16_KERNEL = 1e-2       # bf16 on GPU, per kernel
TOL_BF16_E2E = 3e-2          # bf16 on GPU, end-to-end logits


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (inf if out has NaN/Inf; abs error if ref is 0)."""
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out64).all():
        return float("inf")
    denom = ref64.norm().item()
    diff = (out64 - ref64).norm().item()
    return diff / denom if denom > 0 else diff


def assert_rel_close(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str = "output"):
    """Fail with shapes, the error, NaN count and the worst element when rel_err > tol."""
    if out.shape != ref.shape:
        raise AssertionError(f"{what}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    err = rel_err(out, ref)
    if err <= tol:
        return
    o, r = out.detach().double().cpu(), ref.detach().double().cpu()
    n_bad = int((~torch.isfinite(o)).sum())
    idx = int((o - r).abs().nan_to_num(float("inf")).flatten().argmax())
    where = tuple(int(i) for i in torch.unravel_index(torch.tensor(idx), o.shape))
    raise AssertionError(
        f"{what}: relative error {err:.3e} > {tol:.1e} (shape {tuple(o.shape)}, "
        f"{n_bad} non-finite; worst at {where}: {o.flatten()[idx].item():.6g} vs "
        f"{r.flatten()[idx].item():.6g})")


def spread_act_halting(model: torch.nn.Module, input_ids: torch.Tensor, bias: float = -1.2,
                       spread: float = 0.9, seed: int = 0) -> None:
    """Make ACT halt positions at different loops, some never (random init halts all at 1).

    Calibrates the halting head on ``input_ids``: a random direction w is scaled so that
    halt(h) = h·w + b has standard deviation ``spread`` and mean ``bias`` over the
    positions' first-loop states, so p ranges over about sigmoid(bias ± 2·spread).
    """
    halt = model.recurrent.act.halt
    states: list[torch.Tensor] = []
    hook = model.recurrent.act.register_forward_hook(lambda m, i, o: states.append(i[0]))
    g = torch.Generator().manual_seed(seed)
    try:
        with torch.no_grad():
            model(input_ids, n_loops=1)
            h = states[0].reshape(-1, states[0].shape[-1]).float()
            w = torch.randn(h.shape[-1], generator=g).to(h.device)
            z = h @ w
            w = w * (spread / z.std().clamp_min(1e-12))
            halt.weight.copy_(w[None].to(halt.weight.dtype))
            halt.bias.fill_(bias - float((h @ w).mean()))
    finally:
        hook.remove()


def halting_loops(model: torch.nn.Module, input_ids: torch.Tensor, n_loops: int) -> torch.Tensor:
    """Loop (1-based) at which each position halts in a cache-less forward; 0 = never.

    Records p from the ACT head with a forward hook and replays the halting rule.
    """
    ps: list[torch.Tensor] = []
    hook = model.recurrent.act.register_forward_hook(lambda m, i, o: ps.append(o.detach()))
    try:
        with torch.no_grad():
            model(input_ids, n_loops=n_loops)
    finally:
        hook.remove()
    thr = model.cfg.act_threshold
    cum = torch.zeros_like(ps[0], dtype=torch.float32)
    loop_of = torch.zeros_like(ps[0], dtype=torch.long)
    for t, p in enumerate(ps):
        running = loop_of == 0
        cum = cum + p.float() * running
        loop_of = torch.where(running & (cum >= thr), torch.full_like(loop_of, t + 1), loop_of)
    return loop_of


def expert_shard(packed, world: int, rank: int):
    """Rank ``rank``'s share of a ``PackedMoE``, as ``mythos_rt.parallel`` splits it: a
    contiguous range of the routed experts and of the shared slots; the router whole."""
    from .ops.moe import PackedMoE
    from .parallel import share
    E, S = packed.n_routed, packed.n_shared_slots
    e0, e1 = share(E, world, rank)
    s0, s1 = share(S, world, rank)
    held = list(range(e0, e1)) + [E + s for s in range(s0, s1)]
    return PackedMoE(w13=packed.w13[held].contiguous(), w2=packed.w2[held].contiguous(),
                     router_w=packed.router_w, router_bias=packed.router_bias,
                     n_routed=E, n_shared_slots=s1 - s0, top_k=packed.top_k,
                     expert_dim=packed.expert_dim, expert_start=e0)
