"""IR passes: pure Graph → Graph functions, run in the order of ``pipeline`` by ``run_passes``.

Weight transforms are not done here: a pass only declares a derived weight (a
``WeightSpec`` with a ``derive`` recipe); ``weights.materialize`` computes them all.
"""

from __future__ import annotations

from typing import Callable, Optional

from .ir import Graph, Op, WeightSpec

Pass = Callable[[Graph], Graph]

FP32_RECIPES = {"lti_decay"}  # derived weights that stay float32 whatever the model dtype
FP32_WEIGHT_SUFFIXES = ("router_bias",)


def absorb_mla(g: Graph) -> Graph:
    """MLA decode absorption: declare per-head W_UK (H, nope, R) and W_UV (H, v, R).

    q_nope·k_nope = (W_UKᵀ q_nope)·c_kv and Σ p·v = W_UV (Σ p·c_kv), so decode attends
    in latent space and never expands the cache per head.
    """
    g = g.clone()
    cfg = g.attrs["config"]
    H, nope, v, R = cfg["n_heads"], cfg["qk_nope_head_dim"], cfg["v_head_dim"], cfg["kv_lora_rank"]
    for op in g.find("mla_attention"):
        kv_up = op.weights["kv_up"]
        base = kv_up.rsplit(".kv_up.weight", 1)[0]
        dt = g.weights[kv_up].dtype
        for part, dim in (("uk", nope), ("uv", v)):
            name = f"{base}.w_{part}"
            g.weights[name] = WeightSpec((H, dim, R), dt, {
                "fn": f"mla_absorb_{part}", "from": [kv_up], "n_heads": H, "nope": nope,
                "v_dim": v})
            op.weights[f"w_{part}"] = name
        op.attrs["absorbed"] = True
    return g


def pack_experts(g: Graph) -> Graph:
    """Stack routed experts into w13 [E_tot, 2I, D] / w2 [E_tot, D, I]; fold shared experts.

    A shared expert of hidden k·I is exactly k experts of hidden I on its slices, so each
    becomes k always-selected experts with weight 1 appended after the routed ones. Dense
    FFNs get their gate/up fused into one w13 [2H, D].
    """
    g = g.clone()
    for op in g.find("moe"):
        E, S, k, I = (op.attrs[a] for a in ("n_experts", "n_shared", "top_k", "expert_dim"))
        base = op.weights["router"].rsplit(".router.weight", 1)[0]
        D = g.weights[op.weights["router"]].shape[1]
        dt = g.weights[op.weights["router"]].dtype
        experts = [f"routed.{i}" for i in range(E)] + [f"shared.{j}" for j in range(S)]
        srcs13 = [op.weights[f"{e}.{m}"] for e in experts for m in ("gate", "up")]
        srcs2 = [op.weights[f"{e}.down"] for e in experts]
        e_tot = E + S * k
        g.weights[f"{base}.w13"] = WeightSpec((e_tot, 2 * I, D), dt, {
            "fn": "moe_pack_w13", "from": srcs13, "expert_dim": I})
        g.weights[f"{base}.w2"] = WeightSpec((e_tot, D, I), dt, {
            "fn": "moe_pack_w2", "from": srcs2, "expert_dim": I})
        op.weights = {"router": op.weights["router"], "router_bias": op.weights["router_bias"],
                      "w13": f"{base}.w13", "w2": f"{base}.w2"}
        op.attrs["n_shared_slots"] = S * k
    for op in g.find("dense_ffn"):
        base = op.weights["gate"].rsplit(".gate.weight", 1)[0]
        hid, D = g.weights[op.weights["gate"]].shape
        g.weights[f"{base}.w13"] = WeightSpec((2 * hid, D), g.weights[op.weights["gate"]].dtype,
                                              {"fn": "concat_rows", "from": [op.weights["gate"], op.weights["up"]]})
        op.weights = {"w13": f"{base}.w13", "down": op.weights["down"]}
    return remove_unused_weights(g)


def fuse_recurrent_step(g: Graph) -> Graph:
    """Loop body: loop_embed+add(e)+rmsnorm → loop_prologue; lora+add+lti+act → loop_epilogue."""
    g = g.clone()
    for loop in g.find("loop"):
        body = loop.body
        kinds = [op.kind for op in body.ops]
        i = _find_seq(kinds, ["loop_embed", "add", "rmsnorm"])
        j = _find_seq(kinds, ["lora", "add", "lti_inject", "act_update"])
        if i is None or j is None:
            continue
        emb, _, norm = body.ops[i:i + 3]
        lora, _, lti, act = body.ops[j:j + 4]
        prologue = Op("loop_prologue", "loop_prologue", ["h", "e", "t"], [norm.outputs[0]],
                      {"norm_w": norm.weights["w"]}, {"loop_dim": emb.attrs["loop_dim"]})
        a_name = "recurrent.injection.A"
        g.weights[a_name] = WeightSpec(g.weights[lti.weights["log_A"]].shape, "float32", {
            "fn": "lti_decay", "from": [lti.weights["log_A"], lti.weights["log_dt"]]})
        epilogue = Op("loop_epilogue", "loop_epilogue", [lora.inputs[0], "h", "e", "t"],
                      [lti.outputs[0]],
                      {"lora_down": lora.weights["down"], "lora_B": lora.weights["B"],
                       "lora_scale": lora.weights["scale"], "A": a_name,
                       "inj_B": lti.weights["B"], "halt_w": act.weights["w"],
                       "halt_b": act.weights["b"]},
                      {"threshold": act.attrs["threshold"], "max_loops": lora.attrs["max_loops"]})
        body.ops = body.ops[:i] + [prologue] + body.ops[i + 3:j] + [epilogue] + body.ops[j + 4:]
    return remove_unused_weights(g)


def fuse_residual_norm(g: Graph) -> Graph:
    """add(a, b) immediately followed by rmsnorm of its result → add_rmsnorm (one pass)."""
    g = g.clone()
    for graph in [g] + [op.body for op in g.walk() if op.body is not None]:
        ops, out = graph.ops, []
        i = 0
        while i < len(ops):
            op = ops[i]
            nxt = ops[i + 1] if i + 1 < len(ops) else None
            if (op.kind == "add" and nxt is not None and nxt.kind == "rmsnorm"
                    and nxt.inputs == op.outputs):
                out.append(Op("add_rmsnorm", nxt.name, op.inputs, nxt.outputs + op.outputs,
                              dict(nxt.weights), {"residual_from": op.name}))
                i += 2
            else:
                out.append(op)
                i += 1
        graph.ops = out
    return g


def convert_dtype(dtype: str) -> Pass:
    """Return a pass that stores weights/activations in ``dtype`` (fp32 where numerics need)."""
    def run(g: Graph) -> Graph:
        g = g.clone()
        for name, w in g.weights.items():
            keep = (w.derive is not None and w.derive["fn"] in FP32_RECIPES) or \
                name.endswith(FP32_WEIGHT_SUFFIXES)
            if w.dtype in ("float32", "float16", "bfloat16") and not keep:
                w.dtype = dtype
        for graph in [g] + [op.body for op in g.walk() if op.body is not None]:
            for spec in graph.values.values():
                if spec.dtype in ("float32", "float16", "bfloat16"):
                    spec.dtype = dtype
        g.attrs["dtype"] = dtype
        return g
    run.__name__ = f"convert_dtype[{dtype}]"
    return run


_SIDE_EFFECTS = {"act_update", "loop_epilogue", "loop"}


def remove_dead_ops(g: Graph) -> Graph:
    """Drop ops none of whose outputs is used (and that have no side effects), then weights."""
    g = g.clone()
    for graph in [op.body for op in g.walk() if op.body is not None][::-1] + [g]:
        changed = True
        while changed:
            used = set(graph.outputs) | {v for op in graph.ops for v in op.inputs}
            keep = [op for op in graph.ops
                    if op.kind in _SIDE_EFFECTS or any(o in used for o in op.outputs)]
            changed = len(keep) != len(graph.ops)
            graph.ops = keep
    return remove_unused_weights(g)


def remove_unused_weights(g: Graph) -> Graph:
    """Keep weights read by some op, plus the checkpoint weights derived ones are made from."""
    used = g.weight_names_used()
    needed = used | {s for name in used if g.weights[name].derive
                     for s in g.weights[name].derive["from"]}
    g.weights = {k: v for k, v in g.weights.items() if k in needed}
    return g


def _find_seq(kinds: list[str], pattern: list[str]) -> Optional[int]:
    for i in range(len(kinds) - len(pattern) + 1):
        if kinds[i:i + len(pattern)] == pattern:
            return i
    return None


PIPELINE: list[Pass] = [absorb_mla, pack_experts, fuse_recurrent_step, fuse_residual_norm,
                        remove_dead_ops]


def pipeline(dtype: Optional[str] = None) -> list[Pass]:
    """The one ordered pass pipeline (compile and ``mythos-rt inspect`` both run it): the
    passes in order, with the dtype conversion before the dead-op sweep when ``dtype``
    is given."""
    passes = list(PIPELINE)
    if dtype is not None:
        passes.insert(len(passes) - 1, convert_dtype(dtype))
    return passes


def run_passes(g: Graph, passes: Optional[list[Pass]] = None, dtype: Optional[str] = None,
               after: Optional[Callable[[str, Graph], None]] = None) -> Graph:
    """Run ``passes`` (default: ``pipeline(dtype)``) in order.

    ``after(pass_name, graph)`` is called after each pass (e.g. to print the IR).
    """
    for p in pipeline(dtype) if passes is None else passes:
        g = p(g).verify()
        if after is not None:
            after(p.__name__, g)
    return g
