"""Numerics helpers shared by tests and benchmarks (DESIGN.md "Numerics").

Comparisons use the relative Frobenius error ‖out − ref‖ / ‖ref‖ against a float32/64
reference; NaN or Inf in the output never passes.
"""

from __future__ import annotations

import torch

# DESIGN.md's bounds, one name per mode; every test tolerance comes from here.
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
