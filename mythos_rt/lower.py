"""Lowering: optimized IR + materialized weights → a Plan of launches over static buffers.

A ``Plan`` is a flat list of ``Step``s for one n_loops: the loop region is expanded
into per-iteration steps here (each iteration has its own KV cache and its loop index
as a constant), which is what a CUDA graph captures. Every step reads and writes
preallocated buffers: the activation arena (one buffer per IR value, sized for
max_batch × chunk tokens), the KV caches and the ACT state. Steps take only the
current batch rows B and chunk length T, so a decode step never allocates on the
Triton path, syncs with the host or branches on device values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, NamedTuple, Optional

import torch

from .config import MythosConfig
from .ir import Graph, Op
from .ops.attention import GQAWeights, MLAWeights, new_caches, rope_tables
from .ops.ffn import DenseFFN
from .ops.moe import PackedMoE
from .ops.recurrent import ACTState, LoopParams
from .ops.registry import Selected, select

# IR op kind → registry op name (kinds not listed run as plain torch in the plan).
KERNEL_OF = {"rmsnorm": "rmsnorm", "add_rmsnorm": "rmsnorm", "mla_attention": "mla_attention",
             "gqa_attention": "gqa_attention", "moe": "moe_ffn", "dense_ffn": "dense_ffn",
             "loop_prologue": "loop_prologue", "loop_epilogue": "loop_epilogue"}


class LoweringError(ValueError):
    """The IR contains something this lowering cannot place."""


class Shape(NamedTuple):
    """The runtime shape of one plan execution: B rows × T new tokens each (a tuple, so
    looking up a step's bound views by shape hashes in C)."""
    B: int
    T: int

    @property
    def N(self) -> int:
        return self.B * self.T


@dataclass
class Step:
    name: str
    kind: str
    backend: str
    run: Callable[[Shape], None]


def bound_run(bind: Callable[[Shape], Callable[[], None]]) -> Callable[[Shape], None]:
    """A step's ``run(shape)`` from its ``bind(shape)``, which slices the buffers for that
    shape and returns the launch: binding happens once per shape, so running a step
    costs no slicing (on a CPU, where a decode step is bound by PyTorch calls, that is a
    large share). The buffers never move, so bound views stay valid; kernel steps bind
    through ``Selected.launcher``, so an implementation can fix its addresses too."""
    bound: dict[Shape, Callable[[], None]] = {}

    def run(s: Shape) -> None:
        fn = bound.get(s)
        if fn is None:
            fn = bound[s] = bind(s)
        fn()
    return run


@dataclass
class Buffers:
    """Everything a plan touches, allocated once at compile time."""
    arena: dict[str, torch.Tensor]
    caches: dict[str, tuple[torch.Tensor, torch.Tensor]]
    cache_lens: torch.Tensor  # (max_batch,) int32, tokens cached per row
    input_ids: torch.Tensor  # (max_batch * chunk,) int64
    act: ACTState
    h: torch.Tensor  # loop state (N_max, D)
    cos: torch.Tensor
    sin: torch.Tensor
    moe_workspace: Optional[object] = None


@dataclass
class Lowered:
    """Shared by every plan of a runtime: implementations, op arguments and buffers."""
    cfg: MythosConfig
    graph: Graph
    device: torch.device
    dtype: torch.dtype
    max_batch: int
    chunk: int
    max_loops: int
    impls: dict[str, Selected]
    buffers: Buffers
    args: dict[str, object] = field(default_factory=dict)  # op name → prepared weights
    weights: dict[str, torch.Tensor] = field(default_factory=dict)

    def plan(self, n_loops: int) -> list[Step]:
        """The flat step list for one forward chunk with ``n_loops`` iterations."""
        if not 1 <= n_loops <= self.max_loops:
            raise ValueError(f"n_loops={n_loops} outside [1, {self.max_loops}] (compiled max_loops)")
        steps: list[Step] = []
        for op in self.graph.ops:
            if op.kind == "loop":
                steps += self._loop_steps(op, n_loops)
            else:
                steps.append(self._step(op))
        steps.append(Step("advance_cache_lens", "cache", "torch", bound_run(self._advance_bind)))
        return steps

    # ---- per-op steps -----------------------------------------------------------------
    def _buf(self, value: str) -> torch.Tensor:
        return self.buffers.arena[value]

    def _impl(self, op: Op) -> Selected:
        return self.impls[KERNEL_OF[op.kind]]

    def _step(self, op: Op, t: Optional[int] = None, cache_key: Optional[str] = None) -> Step:
        k, W, buf = op.kind, op.weights, self._buf
        backend = self.impls[KERNEL_OF[k]].backend if k in KERNEL_OF else "torch"
        if k == "embed":
            w, ids, out = self.weights[W["w"]], self.buffers.input_ids, buf(op.outputs[0])

            def bind(s: Shape):
                i, o = ids[:s.N], out[:s.N]
                return lambda: torch.index_select(w, 0, i, out=o)
        elif k == "rmsnorm":
            impl, w, x, out = self._impl(op), self.weights[W["w"]], buf(op.inputs[0]), buf(op.outputs[0])

            def bind(s: Shape):
                return impl.launcher(x[:s.N], w, 1e-6, out=out[:s.N])
        elif k == "add_rmsnorm":
            impl, w = self._impl(op), self.weights[W["w"]]
            a, b = buf(op.inputs[0]), buf(op.inputs[1])
            normed, summed = buf(op.outputs[0]), buf(op.outputs[1])

            def bind(s: Shape):
                return impl.launcher(a[:s.N], w, 1e-6, residual=b[:s.N], out=normed[:s.N],
                                     residual_out=summed[:s.N])
        elif k == "add":
            a, b, out = buf(op.inputs[0]), buf(op.inputs[1]), buf(op.outputs[0])

            def bind(s: Shape):
                av, bv, o = a[:s.N], b[:s.N], out[:s.N]
                return lambda: torch.add(av, bv, out=o)
        elif k in ("mla_attention", "gqa_attention"):
            bind = self._attention_bind(op, cache_key or op.attrs["cache"])
        elif k == "dense_ffn":
            impl, w = self._impl(op), self.args[op.name]
            x, out = buf(op.inputs[0]), buf(op.outputs[0])
            gu, act = buf(f"{op.name}.gate_up"), buf(f"{op.name}.act")

            def bind(s: Shape):
                return impl.launcher(x[:s.N], w, out=out[:s.N], gate_up=gu[:s.N],
                                     act=act[:s.N])
        elif k == "moe":
            impl, packed, ws = self._impl(op), self.args[op.name], self.buffers.moe_workspace
            x, out = buf(op.inputs[0]), buf(op.outputs[0])

            def bind(s: Shape):
                return impl.launcher(x[:s.N], packed, ws, out=out[:s.N])
        elif k == "head":
            w_t, x, out = self.weights[W["w"]].t(), buf(op.inputs[0]), buf(op.outputs[0])

            def bind(s: Shape):
                xv, o = x[:s.N], out[:s.N]
                return lambda: torch.matmul(xv, w_t, out=o)
        else:
            raise LoweringError(f"cannot lower op {op.name!r} of kind {k!r}")
        return Step(op.name if t is None else f"{op.name}[t={t}]", k, backend, bound_run(bind))

    def _attention_bind(self, op: Op, cache_key: str):
        impl, w = self._impl(op), self.args[op.name]
        first, second = self.buffers.caches[cache_key]
        x, out = self._buf(op.inputs[0]), self._buf(op.outputs[0])
        lens, cos, sin, D = self.buffers.cache_lens, self.buffers.cos, self.buffers.sin, self.cfg.dim
        cfg = self.cfg
        scale = ((cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5 if op.kind == "mla_attention"
                 else cfg.head_dim ** -0.5)

        def bind(s: Shape):
            xv, o, lv = x[:s.N].view(s.B, s.T, D), out[:s.N].view(s.B, s.T, D), lens[:s.B]
            return impl.launcher(xv, w, first, second, lv, cos, sin, scale, out=o)
        return bind

    def _loop_steps(self, loop: Op, n_loops: int) -> list[Step]:
        body = loop.body
        e, h, act = self._buf(loop.inputs[1]), self.buffers.h, self.buffers.act
        ops = body.ops
        if ops[0].kind != "loop_prologue" or ops[-1].kind != "loop_epilogue":
            raise LoweringError("the loop body must start with loop_prologue and end with "
                                "loop_epilogue (run the fuse_recurrent_step pass)")
        pro, epi = self.impls["loop_prologue"], self.impls["loop_epilogue"]
        pro_params, epi_params = self.args["loop_prologue"], self.args["loop_epilogue"]
        combined = self._buf(ops[0].outputs[0])
        block_out = self._buf(ops[-1].inputs[0])
        out = self._buf(loop.outputs[0])

        def start(s: Shape):
            hv, ev, cv, N = h[:s.N], e[:s.N], combined[:s.N], s.N

            def run():
                hv.copy_(ev)
                act.reset(N)
                pro.fn(hv, ev, pro_params, 0, out=cv)
            return run

        steps = [Step("loop_start+prologue[t=0]", "loop_prologue", pro.backend, bound_run(start))]
        for t in range(n_loops):
            key = f"recurrent_loop_{t}"
            steps += [self._step(op, t=t, cache_key=key) for op in ops[1:-1]]
            last = t == n_loops - 1

            def epilogue(s: Shape, t=t, last=last):
                nxt = None if last else combined[:s.N]
                return epi.launcher(block_out[:s.N], h[:s.N], e[:s.N], epi_params, t, act,
                                    next_combined=nxt)
            steps.append(Step(f"loop_epilogue[t={t}]", "loop_epilogue", epi.backend,
                              bound_run(epilogue)))

        def finish(s: Shape):
            o, r = out[:s.N], act.h_out[:s.N]
            return lambda: o.copy_(r)
        steps.append(Step("loop_result", "copy", "torch", bound_run(finish)))
        return steps

    def _advance_bind(self, s: Shape):
        lens, T = self.buffers.cache_lens[:s.B], s.T
        return lambda: lens.add_(T)


def lower(graph: Graph, cfg: MythosConfig, weights: Mapping[str, torch.Tensor],
          device: torch.device, dtype: torch.dtype, *, max_batch: int, chunk: int,
          max_seq_len: int, max_loops: int, backend: str = "auto",
          overrides: Optional[Mapping[str, str]] = None) -> Lowered:
    """Place an optimized graph: select implementations, prepare op arguments, allocate."""
    impls = {name: select(name, device, backend, overrides, dtype)
             for name in set(KERNEL_OF.values())}
    n_max = max_batch * chunk
    args: dict[str, object] = {}
    arena: dict[str, torch.Tensor] = {}
    caches: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    W = dict(weights)

    def alloc(name: str, width: int, dt=dtype):
        arena[name] = torch.empty(n_max, width, dtype=dt, device=device)

    def width_of(value: str, g: Graph) -> int:
        return cfg.vocab_size if g.values[value].shape[-1] == "vocab" else cfg.dim

    attn = impls["mla_attention" if cfg.attn_type == "mla" else "gqa_attention"]
    new_layer_caches = attn.caches or new_caches

    def cache_for(key: str):
        caches[key] = new_layer_caches(cfg, max_batch, max_seq_len, dtype, device)

    # args hold each implementation's own form of its op's arguments: its prepare step
    # (identity unless it registered one, e.g. the cpu backend's fused weights) runs once.
    moe_packed = None
    h_state = torch.empty(n_max, cfg.dim, dtype=dtype, device=device)  # the loop's h
    for g in [graph] + [op.body for op in graph.ops if op.body is not None]:
        for op in g.ops:
            for v in op.outputs:
                if op.kind == "loop_epilogue":  # it updates h in place: its output is h
                    arena[v] = h_state
                else:
                    alloc(v, width_of(v, g))
            if op.kind == "mla_attention":
                names = ["q_down", "q_norm", "q_up_nope", "q_up_rope", "kv_down", "kv_norm",
                         "kv_up", "wo", "w_uk", "w_uv"]
                args[op.name] = impls["mla_attention"].prepare(
                    MLAWeights(**{n: W[op.weights[n]] for n in names}))
            elif op.kind == "gqa_attention":
                args[op.name] = impls["gqa_attention"].prepare(GQAWeights(
                    **{n: W[op.weights[n]] for n in ("wq", "wk", "wv", "wo")},
                    n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads))
            elif op.kind == "moe":
                moe_packed = PackedMoE(
                    w13=W[op.weights["w13"]], w2=W[op.weights["w2"]],
                    router_w=W[op.weights["router"]],
                    router_bias=W[op.weights["router_bias"]].float(),
                    n_routed=op.attrs["n_experts"], n_shared_slots=op.attrs["n_shared_slots"],
                    top_k=op.attrs["top_k"], expert_dim=op.attrs["expert_dim"])
                args[op.name] = impls["moe_ffn"].prepare(moe_packed)
            elif op.kind == "dense_ffn":
                args[op.name] = impls["dense_ffn"].prepare(
                    DenseFFN(w13=W[op.weights["w13"]], down=W[op.weights["down"]]))
                hidden = W[op.weights["w13"]].shape[0]
                alloc(f"{op.name}.gate_up", hidden)
                alloc(f"{op.name}.act", hidden // 2)
            elif op.kind == "loop_epilogue":
                w = op.weights
                args["loop"] = LoopParams(
                    norm_w=W[g.ops[0].weights["norm_w"]], lora_down=W[w["lora_down"]],
                    lora_B=W[w["lora_B"]], lora_scale=W[w["lora_scale"]], A=W[w["A"]],
                    inj_B=W[w["inj_B"]], halt_w=W[w["halt_w"]].reshape(-1),
                    halt_b=W[w["halt_b"]].reshape(1), threshold=float(op.attrs["threshold"]),
                    max_loops=int(op.attrs["max_loops"]), loop_dim=cfg.loop_dim)
                prepared: dict[Callable, object] = {}  # one form per prepare function
                for name in ("loop_prologue", "loop_epilogue"):
                    prep = impls[name].prepare
                    if prep not in prepared:
                        prepared[prep] = prep(args["loop"])
                    args[name] = prepared[prep]
            if op.kind in ("mla_attention", "gqa_attention"):
                key = op.attrs["cache"]
                if isinstance(key, dict):
                    for t in range(max_loops):
                        cache_for(key["per_loop"].format(t=t))
                else:
                    cache_for(key)

    if impls["loop_epilogue"].backend == "cuda" and "loop" in args:
        _specialize_cuda_loop(args["loop"], dtype, device)
    rope_dim = cfg.qk_rope_head_dim if cfg.attn_type == "mla" else cfg.head_dim
    cos, sin = rope_tables(rope_dim, max_seq_len, cfg.rope_theta, device=device)
    workspace = None
    if moe_packed is not None and impls["moe_ffn"].backend == "triton":
        from .triton_kernels.moe import MoEWorkspace
        workspace = MoEWorkspace.allocate(n_max, moe_packed, device)
    buffers = Buffers(
        arena=arena, caches=caches,
        cache_lens=torch.zeros(max_batch, dtype=torch.int32, device=device),
        input_ids=torch.zeros(n_max, dtype=torch.long, device=device),
        act=ACTState.allocate(n_max, cfg.dim, dtype, device),
        h=h_state,
        cos=cos, sin=sin, moe_workspace=workspace)
    return Lowered(cfg, graph, device, dtype, max_batch, chunk, max_loops, impls, buffers,
                   args, W)


def _specialize_cuda_loop(params: LoopParams, dtype: torch.dtype, device: torch.device) -> None:
    """Compile the recurrent step with this model's sizes baked in (NVRTC), if possible.

    Falls back to the ahead-of-time CUDA kernels when CuPy/NVRTC is unavailable or
    disabled (MYTHOS_RT_CUDA_JIT=0); always before any graph capture.
    """
    import warnings

    from .cuda import jit
    if not jit.enabled():
        return
    try:
        jit.specialize_loop(params, dtype, device)
    except jit.JITError as exc:
        warnings.warn(f"recurrent step: NVRTC specialization unavailable ({exc}); "
                      "using the ahead-of-time CUDA kernels", stacklevel=3)
