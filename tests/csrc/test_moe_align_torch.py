"""moe_align_torch (the per-op reference of moe_align) vs the Triton alignment's contract.

CPU: the Triton router + alignment run under the interpreter; the torch reference must
produce the same counts, offsets, block table and live rows of sorted_pairs (the Triton
kernels leave dead routed rows unwritten, so those are compared only for -1 in ours).
"""

from types import SimpleNamespace

import pytest
import torch

import mythos_rt.triton_kernels  # noqa: F401 — interpreter on CPU
from mythos_rt.ops.moe import moe_align_sizes, moe_align_torch
from mythos_rt.triton_kernels import moe as tmoe
from tests.triton_kernels.test_moe import _check_alignment, build, one_hot_bias

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def triton_alignment(N, E, k, S, bm, bias=None):
    _, _, packed, x = build(dict(D=32, I=16, E=E, k=k, S=S), N, torch.float32, bias)
    ws = tmoe.MoEWorkspace.allocate(max(N, 1), packed)
    ids, wts = ws.ids[:N], ws.weights[:N]
    tmoe._launch_router(x.to(DEV), packed.router_w, packed.router_bias, k, ids, wts, ws.hist,
                        write_hist=True)
    rb_max, n_blocks = tmoe.moe_align_triton(N, ids, ws.hist, ws, packed, bm)
    return packed, ws, ids, rb_max, n_blocks


def live_rows(al, bm):
    be = al.block_expert.cpu()
    return torch.cat([torch.arange(b * bm, (b + 1) * bm) for b in range(be.numel())
                      if be[b] >= 0])


@pytest.mark.parametrize("bm", [16, 32])
@pytest.mark.parametrize("N,E,k,S,hot", [(1, 8, 2, 1, None), (13, 6, 3, 2, None),
                                         (37, 8, 2, 1, [2, 7]), (23, 8, 1, 0, [5])],
                         ids=["one-token", "prime-13-S2", "empty-experts", "one-expert-no-shared"])
def test_torch_alignment_equals_triton(N, E, k, S, hot, bm):
    packed, ws, ids, rb_max, n_blocks = triton_alignment(
        N, E, k, S, bm, one_hot_bias(E, hot) if hot else None)
    al = moe_align_torch(ids, E, packed.n_shared_slots, bm)   # S shared experts · k slots
    assert (al.rb_max, al.n_blocks) == (rb_max, n_blocks)
    assert torch.equal(al.counts.cpu(), ws.counts.cpu())
    assert torch.equal(al.offsets.cpu(), ws.offsets.cpu())
    assert torch.equal(al.block_expert.cpu(), ws.block_expert[:n_blocks].cpu())
    rows = live_rows(al, bm)
    assert torch.equal(al.sorted_pairs.cpu()[rows], ws.sorted_pairs.cpu()[rows])
    dead = torch.ones(al.sorted_pairs.numel(), dtype=torch.bool)
    dead[rows] = False
    assert (al.sorted_pairs.cpu()[dead] == -1).all()
    _check_alignment(SimpleNamespace(counts=al.counts, offsets=al.offsets,
                                     sorted_pairs=al.sorted_pairs, block_expert=al.block_expert),
                     packed, N, bm, ids)


def test_out_buffers_and_sizes():
    ids = torch.randint(0, 6, (11, 2), dtype=torch.int32)
    rb_max, _, rows, blocks = moe_align_sizes(11, 6, 2, 1, 16)
    out = tuple(torch.full((n,), 777, dtype=torch.int32) for n in (7, 7, rows + 5, blocks + 2))
    al = moe_align_torch(ids, 6, 1, 16, out=out)
    assert al.sorted_pairs.data_ptr() == out[2].data_ptr() and (out[2][rows:] == 777).all()
    ref = moe_align_torch(ids, 6, 1, 16)
    assert torch.equal(al.sorted_pairs, ref.sorted_pairs) and al.rb_max == rb_max
    with pytest.raises(ValueError, match="needs"):
        moe_align_torch(ids, 6, 1, 16, out=(out[0][:3], *out[1:]))


def test_out_of_range_ids_are_skipped():
    ids = torch.tensor([[0, 9], [-1, 1]], dtype=torch.int32)
    al = moe_align_torch(ids, 2, 0, 16)
    assert al.counts.tolist() == [1, 1]
    assert sorted(al.sorted_pairs[al.sorted_pairs >= 0].tolist()) == [0, 3]
