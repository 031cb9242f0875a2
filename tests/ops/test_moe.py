"""MoE op family, torch backend + packing: vs mythos_rt.reference.MoEFFN / route."""

import inspect

import pytest
import torch
import torch.nn.functional as F

from mythos_rt.config import MythosConfig
from mythos_rt.ops import backends_of, load, select
from mythos_rt.lower import op_args
from mythos_rt.ops.moe import PackedMoE, moe_ffn_torch, moe_route_torch
from mythos_rt.reference import Expert, MoEFFN, route
from mythos_rt.testing import TOL_FP32_TORCH, assert_rel_close


def moe_cfg(D=64, I=32, E=8, k=2, S=1) -> MythosConfig:
    return MythosConfig(dim=D, expert_dim=I, n_experts=E, n_experts_per_tok=k,
                        n_shared_experts=S)


def make_moe(cfg: MythosConfig, bias_std: float = 0.5) -> MoEFFN:
    """A reference MoEFFN with random (never zero) weights and router bias."""
    m = MoEFFN(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 1.0 / p.shape[-1] ** 0.5)
        m.router_bias.normal_(0.0, bias_std)
    return m.eval()


def ref_forward(m: MoEFFN, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return m(x[None])[0]


CASES = {
    "basic": dict(cfg=dict(), N=16),
    "one-token": dict(cfg=dict(), N=1),
    "prime-13": dict(cfg=dict(D=48, I=16, E=6, k=3, S=2), N=13),
    "prime-37": dict(cfg=dict(), N=37),
    "D40-I24": dict(cfg=dict(D=40, I=24, E=5, k=2, S=1), N=11),
    "no-shared": dict(cfg=dict(S=0), N=17),
    "topk-eq-E": dict(cfg=dict(E=4, k=4, S=1), N=9),
}


@pytest.mark.parametrize("case", list(CASES))
def test_moe_ffn_torch_matches_reference(case):
    spec = CASES[case]
    cfg = moe_cfg(**spec["cfg"])
    m = make_moe(cfg)
    x = torch.randn(spec["N"], cfg.dim)
    packed = op_args("moe", m.state_dict(), cfg)
    assert_rel_close(moe_ffn_torch(x, packed), ref_forward(m, x), TOL_FP32_TORCH, case)


def test_moe_ffn_torch_out_buffer():
    cfg = moe_cfg()
    m = make_moe(cfg)
    x = torch.randn(7, cfg.dim)
    out = torch.empty(7, cfg.dim)
    res = moe_ffn_torch(x, op_args("moe", m.state_dict(), cfg), out=out)
    assert res is out
    assert_rel_close(out, ref_forward(m, x), TOL_FP32_TORCH)


@pytest.mark.parametrize("k,E", [(1, 4), (2, 8), (4, 4)], ids=["k1", "k2", "topk-eq-E"])
def test_moe_route_torch_matches_reference(k, E):
    D, N = 32, 23
    x, w = torch.randn(N, D), torch.randn(E, D)
    bias = torch.randn(E)
    ids, wts = moe_route_torch(x, w, bias, k)
    ref_ids, ref_w = route(F.linear(x, w), bias, k)
    assert ids.dtype == torch.int32 and wts.dtype == torch.float32
    assert torch.equal(ids.long(), ref_ids)
    assert_rel_close(wts, ref_w, TOL_FP32_TORCH)
    assert torch.allclose(wts.sum(-1), torch.ones(N))


def test_packed_moe_layout_and_prefix():
    """The lowering's arguments (pack_experts pass + materialize + PackedMoE.build) of a
    MoEFFN given under a prefix, in fp16."""
    cfg = moe_cfg(D=24, I=8, E=3, k=2, S=2)
    m = make_moe(cfg)
    sd = {"recurrent.block.ffn." + n: t for n, t in m.state_dict().items()}
    p = op_args("moe", sd, cfg, "recurrent.block.ffn.", dtype=torch.float16)
    E, k, I, D = 3, 2, 8, 24
    assert isinstance(p, PackedMoE)
    assert p.w13.shape == (E + 2 * k, 2 * I, D) and p.w2.shape == (E + 2 * k, D, I)
    assert p.w13.dtype == torch.float16 and p.router_bias.dtype == torch.float32
    assert (p.n_routed, p.n_shared_slots, p.top_k, p.expert_dim) == (E, 2 * k, k, I)
    r1 = m.routed_experts[1]
    assert torch.equal(p.w13[1, :I], r1.gate.weight.half())
    assert torch.equal(p.w13[1, I:], r1.up.weight.half())
    assert torch.equal(p.w2[1], r1.down.weight.half())
    sh = m.shared_experts[1]
    for s in range(k):
        e = E + 1 * k + s
        assert torch.equal(p.w13[e, :I], sh.gate.weight[s * I:(s + 1) * I].half())
        assert torch.equal(p.w2[e], sh.down.weight[:, s * I:(s + 1) * I].half())
    del sd["recurrent.block.ffn.shared_experts.1.up.weight"]
    with pytest.raises(KeyError, match="no 'recurrent.block.ffn.shared_experts.1.up.weight'"):
        op_args("moe", sd, cfg, "recurrent.block.ffn.")


@pytest.mark.parametrize("k", [1, 3])
def test_shared_expert_split_equals_unsplit(k):
    """Σ over the k packed slices (each an expert of hidden I) == the shared expert (k·I)."""
    D, I = 40, 24
    cfg = moe_cfg(D=D, I=I, E=4, k=k, S=1)
    m = make_moe(cfg)
    p = op_args("moe", m.state_dict(), cfg)
    x = torch.randn(19, D)
    with torch.no_grad():
        unsplit = m.shared_experts[0](x)
        split = sum(
            F.linear(F.silu(F.linear(x, p.w13[e, :I])) * F.linear(x, p.w13[e, I:]), p.w2[e])
            for e in range(4, 4 + k))
        # and the same through the reference Expert module loaded with one slice
        slice_expert = Expert(D, I)
        slice_expert.gate.weight.copy_(p.w13[4, :I])
        slice_expert.up.weight.copy_(p.w13[4, I:])
        slice_expert.down.weight.copy_(p.w2[4])
        assert torch.equal(slice_expert(x), F.linear(
            F.silu(F.linear(x, p.w13[4, :I])) * F.linear(x, p.w13[4, I:]), p.w2[4]))
    assert_rel_close(split, unsplit, TOL_FP32_TORCH, "split shared expert")


def test_registry_backends_and_signatures():
    assert backends_of("moe_ffn") == ["torch", "triton", "cpu"]
    assert backends_of("moe_route") == ["torch", "triton", "cuda"]   # cuda: docs/cuda.md
    assert select("moe_ffn", "cpu").backend == "cpu"  # auto on a CPU: the lean cpu backend
    for op in ("moe_ffn", "moe_route"):
        sig_t = inspect.signature(load(op, "torch"))
        sig_tr = inspect.signature(load(op, "triton"))
        assert list(sig_t.parameters) == list(sig_tr.parameters), op
        assert [p.default for p in sig_t.parameters.values()] == \
            [p.default for p in sig_tr.parameters.values()], op
