"""Triton MoE on an expert-parallel shard (docs/parallel.md): each shard's output is the
contribution of its experts and shared slots, so the shards sum to the whole MoE.

CPU: Triton interpreter, fp32, expert counts that do not divide by the shard count, a
shard without any routed expert, and shards without a shared slot.
"""

import pytest
import torch

import mythos_rt.triton_kernels  # noqa: F401 — turns on the interpreter on CPU
from mythos_rt.ops.moe import moe_ffn_torch
from mythos_rt.testing import TOL_FP32_INTERPRET, assert_rel_close, expert_shard
from mythos_rt.triton_kernels import moe as tmoe
from mythos_rt.triton_kernels.moe import MoEWorkspace, moe_ffn_triton

from .test_moe import DEV, _check_alignment, build, one_hot_bias


# name -> (moe_cfg kwargs, tokens, shards, router bias factory or None)
CASES = {
    # 7 experts over 3 shards (3, 2, 2), 2 shared slots (1, 1, 0)
    "E7-over-3": (dict(D=40, I=24, E=7, k=2, S=1), 19, 3, None),
    # 5 experts over 2 (3, 2), 6 slots (3, 3), every token on the second shard's experts
    "E5-over-2-one-sided": (dict(D=32, I=16, E=5, k=3, S=2), 13, 2,
                            lambda: one_hot_bias(5, [3, 4, 2])),
    # 2 experts over 3: the last shard holds no routed expert and no shared slot
    "E2-over-3-empty-shard": (dict(D=32, I=16, E=2, k=1, S=2), 11, 3, None),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_shards_sum_to_the_whole_moe(case):
    cfg_kw, N, world, bias = CASES[case]
    _, m, packed, x = build(cfg_kw, N, torch.float32, bias() if bias else None)
    x = x.to(DEV)
    whole = moe_ffn_triton(x, packed, MoEWorkspace.allocate(N, packed)).clone()
    total = torch.zeros_like(whole)
    for rank in range(world):
        part = expert_shard(packed, world, rank)
        assert part.is_shard
        ws = tmoe.moe_workspace(N, part, DEV)
        for t in (ws.h, ws.y_routed, ws.y_shared):  # rows of other shards' pairs stay NaN
            t.fill_(float("nan"))
        got = moe_ffn_triton(x, part, ws)
        # the torch implementation (the per-op reference) runs the same shard
        assert_rel_close(got.cpu(), moe_ffn_torch(x, part).cpu(), TOL_FP32_INTERPRET,
                         f"{case} shard {rank}")
        total += got
    assert_rel_close(total.cpu(), whole.cpu(), TOL_FP32_INTERPRET, case)


def test_a_shard_sorts_only_its_experts_pairs():
    """The alignment of a shard is the alignment of its experts' pairs alone, numbered
    from 0 (checked as the whole MoE's alignment of the ids shifted by the shard's first
    expert, the others' pairs left out)."""
    _, _, packed, x = build(dict(D=32, I=16, E=7, k=2, S=1), 23, torch.float32)
    part = expert_shard(packed, 3, 1)                       # experts 3, 4; slot 1
    ws = MoEWorkspace.allocate(23, part)
    for t in (ws.sorted_pairs, ws.block_expert, ws.counts, ws.offsets, ws.hist, ws.base):
        t.fill_(12345)
    ids, wts = ws.ids[:23], ws.weights[:23]
    tmoe._launch_router(x.to(DEV), part.router_w, part.router_bias, 2, ids, wts, ws.hist,
                        write_hist=True, hist_experts=(part.expert_start, part.n_local))
    tmoe.moe_align_triton(23, ids, ws.hist, ws, part, 16)
    local = ids.cpu() - part.expert_start
    _check_alignment(ws, part, 23, 16, local, held=(local >= 0) & (local < part.n_local))
