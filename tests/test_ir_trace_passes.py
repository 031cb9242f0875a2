"""Tracer, IR forms and each pass, on the reference model and upstream's."""

import dataclasses

import pytest
import torch
import torch.nn as nn

from mythos_rt import passes
from mythos_rt.config import MythosConfig
from mythos_rt.ir import Graph, IRError
from mythos_rt.reference import OpenMythos
from mythos_rt.trace import TraceError, trace
from mythos_rt.weights import materialize
from tests.upstream import upstream_main


@pytest.fixture(params=["tiny_mla", "tiny_gqa"])
def traced(request):
    model = OpenMythos(MythosConfig.from_preset(request.param))
    return model, *trace(model)


def test_loop_is_one_region_not_unrolled(traced):
    model, g, cfg, sd = traced
    loops = g.find("loop")
    assert len(loops) == 1 and loops[0].body.inputs == ["h", "e", "t"]
    attn_kind = f"{cfg.attn_type}_attention"
    assert len(g.find(attn_kind)) == cfg.prelude_layers + 1 + cfg.coda_layers
    assert len(g.find("moe")) == 1


def test_text_and_json_round_trip(traced):
    _, g, _, _ = traced
    for graph in (g, passes.run_passes(g, dtype="bfloat16")):
        again = Graph.from_json(graph.to_json())
        assert again.to_text() == graph.to_text()
        assert again.to_json() == graph.to_json()
    assert "loop(" in g.to_text() and "body(%h, %e, %t)" in g.to_text()


def test_bad_ir_json_is_a_clear_error(traced):
    _, g, _, _ = traced
    with pytest.raises(IRError, match="not valid JSON"):
        Graph.from_json("{")
    with pytest.raises(IRError, match="unsupported IR version 99"):
        Graph.from_json(g.to_json().replace('"ir_version": 1', '"ir_version": 99'))
    broken = g.clone()
    broken.ops[1].inputs = ["nowhere"]
    with pytest.raises(IRError, match="reads undefined value %nowhere"):
        Graph.from_json(broken.to_json())


def test_upstream_model_traces_to_the_same_graph():
    up = upstream_main()
    cfg = MythosConfig.from_preset("tiny_gqa")
    g_up, cfg_up, sd_up = trace(up.OpenMythos(up.MythosConfig(**cfg.to_dict())))
    g_ours, _, sd_ours = trace(OpenMythos(cfg))
    assert cfg_up == cfg and g_up.to_text() == g_ours.to_text()
    assert sorted(sd_up) == sorted(sd_ours)


def test_unrecognized_module_is_named():
    model = OpenMythos(MythosConfig.from_preset("tiny_mla"))
    model.coda[0].ffn = nn.GELU()
    with pytest.raises(TraceError, match=r"coda.0.ffn: unrecognized module type torch.nn.modules.activation.GELU"):
        trace(model)
    model = OpenMythos(MythosConfig.from_preset("tiny_mla"))
    model.recurrent.extra = nn.Linear(2, 2)
    with pytest.raises(TraceError, match=r"recurrent \(RecurrentBlock\): unrecognized recurrent.extra \(Linear\)"):
        trace(model)
    with pytest.raises(TraceError, match="expected an OpenMythos nn.Module or a checkpoint path"):
        trace(42)


def test_absorb_mla_declares_exact_per_head_slices():
    model = OpenMythos(MythosConfig.from_preset("tiny_mla"))
    g, cfg, sd = trace(model)
    g2 = passes.absorb_mla(g)
    op = g2.find("mla_attention")[0]
    w = materialize(g2, sd, torch.device("cpu"))
    kv_up = sd[op.weights["kv_up"]].view(cfg.n_heads, -1, cfg.kv_lora_rank)
    assert torch.equal(w[op.weights["w_uk"]], kv_up[:, :cfg.qk_nope_head_dim])
    assert torch.equal(w[op.weights["w_uv"]], kv_up[:, cfg.qk_nope_head_dim:])
    assert g.find("mla_attention")[0].attrs.get("absorbed") is None  # pure: input untouched


def test_pack_experts_folds_shared_experts_exactly():
    cfg = dataclasses.replace(MythosConfig.from_preset("tiny_mla"), n_shared_experts=2)
    model = OpenMythos(cfg).eval()
    g, _, sd = trace(model)
    g2 = passes.pack_experts(g)
    op = g2.find("moe")[0]
    w = materialize(g2, sd, torch.device("cpu"))
    w13, w2 = w[op.weights["w13"]], w[op.weights["w2"]]
    E, k, I = cfg.n_experts, cfg.n_experts_per_tok, cfg.expert_dim
    assert w13.shape == (E + 2 * k, 2 * I, cfg.dim) and op.attrs["n_shared_slots"] == 2 * k
    x = torch.randn(5, cfg.dim)
    for j, shared in enumerate(model.recurrent.block.ffn.shared_experts):
        folded = sum(
            (torch.nn.functional.silu(x @ w13[s, :I].T) * (x @ w13[s, I:].T)) @ w2[s].T
            for s in range(E + j * k, E + (j + 1) * k))
        torch.testing.assert_close(folded, shared(x), rtol=1e-5, atol=1e-6)
    for i in (0, E - 1):  # routed experts keep their order
        expert = model.recurrent.block.ffn.routed_experts[i]
        assert torch.equal(w13[i, :I], expert.gate.weight) and torch.equal(w2[i], expert.down.weight)


def test_fuse_recurrent_step_leaves_one_op_between_blocks(traced):
    _, g, _, sd = traced
    g2 = passes.fuse_recurrent_step(g)
    kinds = [op.kind for op in g2.find("loop")[0].body.ops]
    assert kinds[0] == "loop_prologue" and kinds[-1] == "loop_epilogue"
    assert not {"loop_embed", "lora", "lti_inject", "act_update"} & set(kinds)
    A = materialize(g2, sd, torch.device("cpu"))["recurrent.injection.A"]
    assert A.dtype == torch.float32 and ((A > 0) & (A < 1)).all()


def test_fuse_residual_norm_and_dead_ops(traced):
    _, g, _, _ = traced
    g2 = passes.fuse_residual_norm(g)
    assert g2.find("add_rmsnorm") and len(g2.find("add")) < len(g.find("add"))
    dead = g.clone()
    dead.ops.insert(1, dataclasses.replace(dead.ops[1], name="unused", outputs=["unused"]))
    dead.values["unused"] = dead.values[dead.ops[2].outputs[0]]
    cleaned = passes.remove_dead_ops(dead)
    assert "unused" not in [op.name for op in cleaned.ops]
    assert cleaned.to_text() == passes.remove_dead_ops(g).to_text()


def test_convert_dtype_keeps_numerically_sensitive_weights_fp32(traced):
    _, g, _, _ = traced
    g2 = passes.run_passes(g, dtype="bfloat16")
    assert g2.weights["recurrent.injection.A"].dtype == "float32"
    assert g2.weights["recurrent.block.ffn.router_bias"].dtype == "float32"
    assert g2.weights["embed.weight"].dtype == "bfloat16"


def test_pass_manager_reports_after_each_pass(traced):
    _, g, _, _ = traced
    seen = []
    passes.run_passes(g, after=lambda name, graph: seen.append(name))
    assert seen == [p.__name__ for p in passes.PIPELINE]
