"""The implementation records and the lowering's per-kind rules: the lowering asks the
selected implementation's hooks, never a backend's name."""

import dataclasses

import pytest
import torch

from mythos_rt import reference as R
from mythos_rt.config import MythosConfig
from mythos_rt.lower import RULES, lower
from mythos_rt.ops import registry
from mythos_rt.passes import run_passes
from mythos_rt.trace import trace
from mythos_rt.weights import materialize


def test_records_name_importable_hooks():
    """Every registered hook of the torch / cpu / triton implementations imports (cuda's
    need the extension: tests/csrc)."""
    for impl in (i for i in registry.records() if i.backend != "cuda"):
        sel = registry.resolve(impl)
        for hook in ("bind", "caches", "workspace"):
            assert (getattr(impl, hook) is None) == (getattr(sel, hook) is None), impl
        assert callable(sel.fn) and callable(sel.prepare)
        if impl.prepare is None:
            args = object()
            assert sel.prepare(args) is args, impl


def test_register_rejects_unknown_backends_and_bare_names():
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        registry.register("moe_ffn", "tpu", "m:f")
    with pytest.raises(ValueError, match="module:function"):
        registry.register("moe_ffn", "torch", "mythos_rt.ops.moe:moe_ffn_torch", workspace="ws")


def test_auto_selection_follows_the_records_dtypes():
    assert registry.record("moe_ffn", "cpu").dtypes == frozenset({torch.float32, torch.bfloat16})
    assert registry.select("moe_ffn", "cpu", dtype=torch.bfloat16).backend == "cpu"
    assert registry.select("moe_ffn", "cpu", dtype=torch.float32).backend == "cpu"
    assert registry.select("moe_ffn", "cpu", dtype=torch.float16).backend == "torch"


def _lowered(cfg=None, **kw):
    cfg = cfg or MythosConfig.from_preset("tiny_mla")
    graph, cfg, sd = trace(R.OpenMythos(cfg))
    g = run_passes(graph)
    cpu = torch.device("cpu")
    return lower(g, cfg, materialize(g, sd, cpu), cpu, torch.float32, max_batch=2, chunk=3,
                 max_seq_len=16, max_loops=cfg.max_loop_iters, **kw)


def test_lowering_allocates_the_selected_implementations_workspace():
    """The Triton MoE's workspace comes from its record's hook, sized for the plan's rows;
    the torch implementation registers none, so none is allocated."""
    from mythos_rt.triton_kernels.moe import MoEWorkspace
    low = _lowered(overrides={"moe_ffn": "triton"})
    ws = low.buffers.workspaces["recurrent.block.ffn"]
    assert isinstance(ws, MoEWorkspace) and ws.max_tokens == 6
    assert _lowered(backend="torch").buffers.workspaces == {}


def test_every_traced_kind_has_one_rule():
    low = _lowered(backend="torch")
    kinds = {op.kind for g in [low.graph] + [op.body for op in low.graph.ops if op.body]
             for op in g.ops}
    assert kinds <= set(RULES)
    assert {r.kernel for r in RULES.values() if r.kernel} == set(low.impls)


@pytest.mark.parametrize("backend,hidden", [("triton", 64), ("torch", 42), ("cpu", 42)])
def test_ffn_intermediates_are_as_wide_as_the_prepared_weights(backend, hidden):
    """dim 32: dense hidden 42. The Triton dense FFN pads it to 64 when it prepares its
    weights (``ops.ffn.align_hidden``) and its gate_up / act buffers follow; the other
    backends, and the weights the runtime keeps (artifacts), stay at 42."""
    cfg = dataclasses.replace(MythosConfig.from_preset("tiny_mla"), dim=32)
    low = _lowered(cfg, overrides={"dense_ffn": backend})
    ffns = [op for op in low.graph.ops if op.kind == "dense_ffn"]
    assert len(ffns) == 2
    for op in ffns:
        assert low.args[op.name].hidden == hidden
        assert low.buf(f"{op.name}.gate_up").shape == (6, 2 * hidden)
        assert low.buf(f"{op.name}.act").shape == (6, hidden)
        assert low.weights[op.weights["w13"]].shape == (2 * 42, 32)
        assert low.weights[op.weights["down"]].shape == (32, 42)
        if backend == "triton":  # the padded weights hold the model's: one copy in the plan
            for role in ("w13", "down"):
                held = low.weights[op.weights[role]]
                assert held.data_ptr() == getattr(low.args[op.name], role).data_ptr()
