"""Lowering: optimized IR + materialized weights → a Plan of launches over static buffers.

A ``Plan`` is a flat list of ``Step``s for one n_loops: the loop region is expanded
into per-iteration steps here (each iteration has its own KV cache and its loop index
as a constant), which is what a CUDA graph captures. Every step reads and writes
preallocated buffers: the activation arena (one buffer per IR value, sized for
max_batch × chunk tokens), the KV caches and the ACT state. Steps take only the
current batch rows B and chunk length T, so a decode step never allocates on the
Triton path, syncs with the host or branches on device values.

Each IR op kind has one ``Rule`` (``RULES``): the registry op that runs it, the builder
of its arguments, what it allocates at compile time and how a plan step binds it. The
rules ask the selected implementation (its record's hooks: prepare, bind, caches,
workspace), never a backend's name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, NamedTuple, Optional

import torch

from . import depth
from .config import MythosConfig
from .ir import Graph, Op
from .ops.comm import gather_scratch
from .ops.attention import GQAWeights, MLAWeights, new_caches, rope_tables
from .ops.ffn import DenseFFN
from .ops.head import HeadWeights
from .ops.moe import PackedMoE
from .ops.norm import NORM_EPS
from .ops.recurrent import ACTState, LoopParams
from .ops.registry import Selected, select
from .parallel import shard_args, shard_config, world_of
from .passes import run_passes
from .trace import build_graph
from .weights import materialize, sources


# The backend label of plan steps that are plain PyTorch calls rather than registry ops.
PLAIN_TORCH = "torch"


class LoweringError(ValueError):
    """The IR contains something this lowering cannot place."""


class Shape(NamedTuple):
    """The runtime shape of one plan execution: B rows × T new tokens each (a tuple, so
    looking up a step's bound views by shape hashes in C). ``row0``: the batch row the B
    rows start at (a lazy-depth pass over only the rows with work; 0 everywhere else)."""
    B: int
    T: int
    row0: int = 0

    @property
    def N(self) -> int:
        return self.B * self.T


@dataclass
class Step:
    """One launch of a plan. A region whose shapes are decided while it runs (the lazy
    loop, ``mythos_rt.depth``) also has ``expand(shape)``, yielding its inner steps with
    their shapes as it goes; its ``run`` runs them all."""
    name: str
    kind: str
    backend: str
    run: Callable[[Shape], None]
    expand: Optional[Callable[[Shape], Iterator[tuple["Step", Shape]]]] = None


Binder = Callable[[Shape], Callable[[], None]]


def bound_run(bind: Binder) -> Callable[[Shape], None]:
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
    workspaces: dict[str, object] = field(default_factory=dict)  # op name → its scratch
    depth: Optional[depth.DepthState] = None  # lazy ACT's store (act_mode lazy / reuse)


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
    args: dict[str, object] = field(default_factory=dict)  # op name → prepared arguments
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    max_seq_len: int = 0

    @property
    def n_max(self) -> int:
        return self.max_batch * self.chunk

    def plan(self, n_loops: int) -> list[Step]:
        """The flat step list for one forward chunk with ``n_loops`` iterations."""
        if not 1 <= n_loops <= self.max_loops:
            raise ValueError(f"n_loops={n_loops} outside [1, {self.max_loops}] (compiled max_loops)")
        steps: list[Step] = []
        for op in self.graph.ops:
            rule = rule_of(op)
            steps += rule.steps(self, op, n_loops) if rule.steps is not None else [self.step(op)]
        steps.append(Step("advance_cache_lens", "cache", PLAIN_TORCH,
                          bound_run(self._advance_bind)))
        return steps

    def impl(self, op: Op) -> Optional[Selected]:
        """The implementation selected for ``op`` (None for a plain-torch kind)."""
        kernel = rule_of(op).kernel
        return None if kernel is None else self.impls[kernel]

    def buf(self, value: str) -> torch.Tensor:
        return self.buffers.arena[value]

    def roles(self, op: Op) -> dict[str, torch.Tensor]:
        """``op``'s weights by role (the names its argument builder reads)."""
        return {role: self.weights[name] for role, name in op.weights.items()}

    def step(self, op: Op, t: Optional[int] = None) -> Step:
        """One bound plan step of ``op`` (``t``: its loop index inside the loop region)."""
        impl, rule = self.impl(op), rule_of(op)
        if rule.bind is None:
            raise LoweringError(f"{op.kind} {op.name!r} runs only inside its loop region")
        return Step(op.name if t is None else f"{op.name}[t={t}]", op.kind,
                    PLAIN_TORCH if impl is None else impl.backend,
                    bound_run(rule.bind(self, op, t)))

    def _advance_bind(self, s: Shape):
        lens, T = self.buffers.cache_lens[:s.B], s.T
        return lambda: lens.add_(T)


# ---- per-kind rules ---------------------------------------------------------------------

@dataclass(frozen=True)
class Rule:
    """How the lowering places one IR op kind.

    bind(low, op, t): the step's binder (``t``: the loop index inside the loop region);
        None for the loop's own ops, which the loop region's ``steps`` place.
    steps(low, op, n_loops): a region's steps (the loop), instead of one bound step.
    kernel: the registry op that runs it (None: plain torch in the plan).
    build(weights_by_role, cfg): the op's generic arguments (the builder next to their
        type); the lowering stores the selected implementation's prepared form in
        ``Lowered.args[op.name]``, and its workspace hook's scratch, if any, in
        ``Buffers.workspaces[op.name]``.
    allocate(low, op, graph): what else the op needs at compile time (caches, scratch).
    """
    bind: Optional[Callable[[Lowered, Op, Optional[int]], Binder]]
    kernel: Optional[str] = None
    build: Optional[Callable[[Mapping[str, torch.Tensor], MythosConfig], object]] = None
    allocate: Optional[Callable[[Lowered, Op, Graph], None]] = None
    steps: Optional[Callable[[Lowered, Op, int], list[Step]]] = None


def _bind_embed(low: Lowered, op: Op, t):
    w, ids, out = low.weights[op.weights["w"]], low.buffers.input_ids, low.buf(op.outputs[0])
    if "vocab_start" in op.attrs:
        return _bind_vocab_shard_embed(low, op, w, ids, out)

    def bind(s: Shape):
        i, o = ids[:s.N], out[:s.N]
        return lambda: torch.index_select(w, 0, i, out=o)
    return bind


def _bind_vocab_shard_embed(low: Lowered, op: Op, w, ids, out):
    """A vocabulary shard (``parallel``): rows ``vocab_start + [0, vocab_rows)`` of the
    table, then one zero row that every other id reads (its sum over ranks is then the
    embedding)."""
    start, rows = op.attrs["vocab_start"], op.attrs["vocab_rows"]
    local = torch.empty_like(ids)

    def bind(s: Shape):
        i, li, o = ids[:s.N], local[:s.N], out[:s.N]

        def run():
            torch.sub(i, start, out=li)
            li.clamp_(-1, rows).remainder_(rows + 1)  # outside [0, rows) -> the zero row
            torch.index_select(w, 0, li, out=o)
        return run
    return bind


def _bind_rmsnorm(low: Lowered, op: Op, t):
    impl, w = low.impl(op), low.weights[op.weights["w"]]
    x, out = low.buf(op.inputs[0]), low.buf(op.outputs[0])
    return lambda s: impl.launcher(x[:s.N], w, NORM_EPS, out=out[:s.N])


def _bind_add_rmsnorm(low: Lowered, op: Op, t):
    impl, w = low.impl(op), low.weights[op.weights["w"]]
    a, b = low.buf(op.inputs[0]), low.buf(op.inputs[1])
    normed, summed = low.buf(op.outputs[0]), low.buf(op.outputs[1])
    return lambda s: impl.launcher(a[:s.N], w, NORM_EPS, residual=b[:s.N], out=normed[:s.N],
                                   residual_out=summed[:s.N])


def _bind_add(low: Lowered, op: Op, t):
    a, b, out = low.buf(op.inputs[0]), low.buf(op.inputs[1]), low.buf(op.outputs[0])

    def bind(s: Shape):
        av, bv, o = a[:s.N], b[:s.N], out[:s.N]
        return lambda: torch.add(av, bv, out=o)
    return bind


def _bind_head(low: Lowered, op: Op, t):
    impl, w = low.impl(op), low.args[op.name]
    x, out = low.buf(op.inputs[0]), low.buf(op.outputs[0])
    return lambda s: impl.launcher(x[:s.N], w, out=out[:s.N])


def _cache_keys(op: Op, max_loops: int) -> list[str]:
    """An attention op's cache keys: one, or one per loop index inside the loop region."""
    key = op.attrs["cache"]
    if isinstance(key, dict):
        return [key["per_loop"].format(t=t) for t in range(max_loops)]
    return [key]


def _allocate_caches(low: Lowered, op: Op, g: Graph) -> None:
    new_layer_caches, cfg = low.impl(op).caches or new_caches, shard_config(low.cfg, op)
    for key in _cache_keys(op, low.max_loops):
        low.buffers.caches[key] = new_layer_caches(cfg, low.max_batch, low.max_seq_len,
                                                   low.dtype, low.device)


def _bind_attention(low: Lowered, op: Op, t):
    impl, w, cfg = low.impl(op), low.args[op.name], low.cfg
    key = op.attrs["cache"]
    first, second = low.buffers.caches[key if t is None else key["per_loop"].format(t=t)]
    x, out = low.buf(op.inputs[0]), low.buf(op.outputs[0])
    lens, cos, sin, D = low.buffers.cache_lens, low.buffers.cos, low.buffers.sin, cfg.dim
    if t is not None and low.buffers.depth is not None:
        lens = low.buffers.depth.loop_lens  # a lazy loop pass starts at its own offsets
    scale = ((cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5 if op.kind == "mla_attention"
             else cfg.head_dim ** -0.5)

    def bind(s: Shape):
        xv, o, lv = x[:s.N].view(s.B, s.T, D), out[:s.N].view(s.B, s.T, D), lens[s.row0:][:s.B]
        return impl.launcher(xv, w, first[s.row0:], second[s.row0:], lv, cos, sin, scale, out=o)
    return bind


def _allocate_ffn_scratch(low: Lowered, op: Op, g: Graph) -> None:
    """The ``gate_up`` and ``act`` intermediates, as wide as the prepared weights' hidden
    size (the Triton backend pads it, ``ops.ffn.align_hidden``; the others do not). Padded
    weights hold the model's as views, which replace the originals in ``low.weights``
    (what ``Runtime.weights`` and artifacts show), so the plan keeps one copy."""
    w = low.args[op.name]
    hidden = w.hidden
    if isinstance(w, DenseFFN) and w.width is not None:
        model = w.unpadded()
        low.weights[op.weights["w13"]], low.weights[op.weights["down"]] = model.w13, model.down
    for name, width in ((f"{op.name}.gate_up", 2 * hidden), (f"{op.name}.act", hidden)):
        low.buffers.arena[name] = torch.empty(low.n_max, width, dtype=low.dtype, device=low.device)


def _bind_dense_ffn(low: Lowered, op: Op, t):
    impl, w = low.impl(op), low.args[op.name]
    x, out = low.buf(op.inputs[0]), low.buf(op.outputs[0])
    gu, act = low.buf(f"{op.name}.gate_up"), low.buf(f"{op.name}.act")
    return lambda s: impl.launcher(x[:s.N], w, out=out[:s.N], gate_up=gu[:s.N], act=act[:s.N])


def _bind_moe(low: Lowered, op: Op, t):
    impl, packed, ws = low.impl(op), low.args[op.name], low.buffers.workspaces.get(op.name)
    x, out = low.buf(op.inputs[0]), low.buf(op.outputs[0])
    depth = low.buffers.depth
    if t is not None and depth is not None and depth.window:
        # device-resident lazy decode: a pass with no real position reads no expert
        return lambda s: impl.launcher(x[:s.N], packed, ws, out=out[:s.N], skip=depth.skip)
    return lambda s: impl.launcher(x[:s.N], packed, ws, out=out[:s.N])


def _loop_ops(body: Graph) -> list[Op]:
    """The loop ops whose weights make the ``LoopParams``: the prologue's norm and the
    epilogue's LoRA, LTI and ACT weights."""
    return [op for op in body.ops if op.kind in ("loop_prologue", "loop_epilogue")]


def _allocate_loop(low: Lowered, op: Op, g: Graph) -> None:
    """The epilogue updates h in place (its output is h); both loop ops share one
    LoopParams, prepared once per distinct prepare hook."""
    low.buffers.arena[op.outputs[0]] = low.buffers.h
    roles = {role: w for o in _loop_ops(g) for role, w in low.roles(o).items()}
    low.args["loop"] = LoopParams.build(roles, low.cfg)
    prepared: dict[Callable, object] = {}
    for name in ("loop_prologue", "loop_epilogue"):
        prep = low.impls[name].prepare
        if prep not in prepared:
            prepared[prep] = prep(low.args["loop"])
        low.args[name] = prepared[prep]


def _loop_steps(low: Lowered, loop: Op, n_loops: int) -> list[Step]:
    """The loop region expanded: its prologue, n_loops passes of the body, each closed by
    the epilogue, and the ACT result."""
    ops = loop.body.ops
    if ops[0].kind != "loop_prologue" or ops[-1].kind != "loop_epilogue":
        raise LoweringError("the loop body must start with loop_prologue and end with "
                            "loop_epilogue (run the fuse_recurrent_step pass)")
    e, h, act = low.buf(loop.inputs[1]), low.buffers.h, low.buffers.act
    pro, epi = low.impls["loop_prologue"], low.impls["loop_epilogue"]
    pro_params, epi_params = low.args["loop_prologue"], low.args["loop_epilogue"]
    combined = low.buf(ops[0].outputs[0])
    block_out = low.buf(ops[-1].inputs[0])
    out = low.buf(loop.outputs[0])

    def start(s: Shape):
        hv, ev, cv, N = h[:s.N], e[:s.N], combined[:s.N], s.N

        def run():
            hv.copy_(ev)
            act.reset(N)
            pro.fn(hv, ev, pro_params, 0, out=cv)
        return run

    steps = [Step("loop_start+prologue[t=0]", "loop_prologue", pro.backend, bound_run(start))]
    for t in range(n_loops):
        steps += [low.step(op, t) for op in ops[1:-1]]
        last = t == n_loops - 1

        def epilogue(s: Shape, t=t, last=last):
            nxt = None if last else combined[:s.N]
            return epi.launcher(block_out[:s.N], h[:s.N], e[:s.N], epi_params, t, act,
                                next_combined=nxt)
        steps.append(Step(f"loop_epilogue[t={t}]", "loop_epilogue", epi.backend,
                          bound_run(epilogue)))

    steps.append(_loop_result(out, act))
    return steps


def _loop_result(out: torch.Tensor, act: ACTState) -> Step:
    def finish(s: Shape):
        o, r = out[:s.N], act.h_out[:s.N]
        return lambda: o.copy_(r)
    return Step("loop_result", "copy", PLAIN_TORCH, bound_run(finish))


def _lazy_loop_steps(low: Lowered, loop: Op, n_loops: int) -> list[Step]:
    """The loop region with lazy depth (``mythos_rt.depth``): one region step whose
    passes are decided from the halting flags as it runs, then the ACT result."""
    ops = loop.body.ops
    st, act, lens = low.buffers.depth, low.buffers.act, low.buffers.cache_lens
    h, e_chunk, e = low.buffers.h, low.buf(loop.inputs[1]), low.buf(f"{loop.name}.e_work")
    pro, epi = low.impls["loop_prologue"], low.impls["loop_epilogue"]
    pro_params, epi_params = low.args["loop_prologue"], low.args["loop_epilogue"]
    combined, block_out = low.buf(ops[0].outputs[0]), low.buf(ops[-1].inputs[0])
    attention = [op for op in ops if "cache" in op.attrs]
    block = [[low.step(op, t) for op in ops[1:-1]] for t in range(n_loops)]

    def prologue(t: int, e_rows: torch.Tensor) -> Step:
        def bind(s: Shape):
            hv, ev, cv = h[:s.N], e_rows[:s.N], combined[:s.N]
            return lambda: pro.fn(hv, ev, pro_params, t, out=cv)
        return Step(f"loop_prologue[t={t}]", "loop_prologue", pro.backend, bound_run(bind))

    def epilogue(t: int, e_rows: torch.Tensor, state: ACTState, fuse: bool) -> Step:
        def bind(s: Shape):
            nxt = combined[:s.N] if fuse else None
            return epi.launcher(block_out[:s.N], h[:s.N], e_rows[:s.N], epi_params, t, state,
                                next_combined=nxt)
        return Step(f"loop_epilogue[t={t}]", "loop_epilogue", epi.backend, bound_run(bind))

    def own_offsets(s: Shape):
        src, dst = lens[:s.B], st.loop_lens[:s.B]
        return lambda: dst.copy_(src)

    def copy_step(name: str, bind) -> Step:
        return Step(name, "copy", PLAIN_TORCH, bound_run(bind))

    def copy_entries(b: int, lo: int, hi: int, t: int) -> None:
        for op in attention:
            key = op.attrs["cache"]["per_loop"]
            src, dst = low.buffers.caches[key.format(t=t - 1)], low.buffers.caches[key.format(t=t)]
            for a, c in zip(src, dst):
                c[b, lo:hi] = a[b, lo:hi]

    gathered_pass = [[copy_step(f"depth_gather[t={t}]", depth.gather(st, act, h, e)),
                      prologue(t, e), *block[t], epilogue(t, e, st.work, fuse=False),
                      copy_step(f"depth_scatter[t={t}]", depth.scatter(st, act, h))]
                     for t in range(n_loops)]
    steps = depth.LoopSteps(
        start=copy_step("depth_start", depth.store_chunk(st, act, lens, e_chunk, h)),
        prologue=[prologue(t, e_chunk) for t in range(n_loops)],
        chunk_pass=[[copy_step(f"depth_offsets[t={t}]", own_offsets), *block[t],
                     epilogue(t, e_chunk, act, fuse=t + 1 < n_loops)] for t in range(n_loops)],
        gathered_pass=gathered_pass,
        flush=copy_step("depth_flush", depth.flush(st, h)),
        unflush=copy_step("depth_unflush", depth.flush(st, h, back=True)),
        device_decode=depth.device_decode_steps(st, act, lens, e_chunk, h, n_loops,
                                                gathered_pass, copy_step))
    expand = depth.lazy_region(st, steps, n_loops=n_loops, chunk=low.chunk, cache_lens=lens,
                               act=act, copy_entries=copy_entries)

    def run(s: Shape) -> None:
        for step, shape in expand(s):
            step.run(shape)
    return [Step(f"loop[{st.mode}]", "loop", PLAIN_TORCH, run, expand=expand),
            _loop_result(low.buf(loop.outputs[0]), act)]


def _loop_region(low: Lowered, loop: Op, n_loops: int) -> list[Step]:
    """Every depth for every position (act_mode "eager"), or lazy depth."""
    if low.buffers.depth is None:
        return _loop_steps(low, loop, n_loops)
    return _lazy_loop_steps(low, loop, n_loops)


def _alias_all_reduce(low: Lowered, op: Op, g: Graph) -> None:
    """The reduction runs in place: its output is its input's buffer."""
    low.buffers.arena[op.outputs[0]] = low.buf(op.inputs[0])


def _bind_all_reduce(low: Lowered, op: Op, t):
    impl, x = low.impl(op), low.buf(op.inputs[0])
    return lambda s: impl.launcher(x[:s.N])


def _allocate_gather(low: Lowered, op: Op, g: Graph) -> None:
    cols = g.values[op.inputs[0]].shape[-1]
    low.buffers.workspaces[op.name] = gather_scratch(world_of(low.graph), low.n_max, cols,
                                                     low.dtype, low.device)


def _bind_all_gather(low: Lowered, op: Op, t):
    impl, x, out = low.impl(op), low.buf(op.inputs[0]), low.buf(op.outputs[0])
    scratch = low.buffers.workspaces[op.name]
    return lambda s: impl.launcher(x[:s.N], out[:s.N], scratch)


RULES: dict[str, Rule] = {
    "embed": Rule(_bind_embed),
    "rmsnorm": Rule(_bind_rmsnorm, "rmsnorm"),
    "add_rmsnorm": Rule(_bind_add_rmsnorm, "rmsnorm"),
    "add": Rule(_bind_add),
    "mla_attention": Rule(_bind_attention, "mla_attention", MLAWeights.build, _allocate_caches),
    "gqa_attention": Rule(_bind_attention, "gqa_attention", GQAWeights.build, _allocate_caches),
    "dense_ffn": Rule(_bind_dense_ffn, "dense_ffn", DenseFFN.build, _allocate_ffn_scratch),
    "moe": Rule(_bind_moe, "moe_ffn", PackedMoE.build),
    "head": Rule(_bind_head, "head", HeadWeights.build),
    "loop": Rule(None, steps=_loop_region),
    "loop_prologue": Rule(None, "loop_prologue"),
    "loop_epilogue": Rule(None, "loop_epilogue", allocate=_allocate_loop),
    "all_reduce": Rule(_bind_all_reduce, "all_reduce", allocate=_alias_all_reduce),
    "all_gather": Rule(_bind_all_gather, "all_gather", allocate=_allocate_gather),
}


def rule_of(op: Op) -> Rule:
    rule = RULES.get(op.kind)
    if rule is None:
        raise LoweringError(f"cannot lower op {op.name!r} of kind {op.kind!r}")
    return rule


def _graphs(graph: Graph) -> list[Graph]:
    """The graph and its loop bodies."""
    return [graph] + [op.body for op in graph.ops if op.body is not None]


def lower(graph: Graph, cfg: MythosConfig, weights: Mapping[str, torch.Tensor],
          device: torch.device, dtype: torch.dtype, *, max_batch: int, chunk: int,
          max_seq_len: int, max_loops: int, backend: str = "auto",
          overrides: Optional[Mapping[str, str]] = None, act_mode: str = "eager",
          lazy_window: Optional[int] = None) -> Lowered:
    """Place an optimized graph: select implementations, prepare op arguments, allocate
    (``act_mode``: "eager", or "lazy"/"reuse" for adaptive depth, ``mythos_rt.depth``;
    ``lazy_window``: its device-resident decode passes' width, default 16 on CUDA and 0,
    host-decided passes, elsewhere)."""
    if lazy_window is None:
        lazy_window = depth.DEVICE_WINDOW if device.type == "cuda" else 0
    kernels = {r.kernel for r in RULES.values() if r.kernel is not None}
    impls = {name: select(name, device, backend, overrides, dtype) for name in kernels}
    n_max = max_batch * chunk
    rope_dim = cfg.qk_rope_head_dim if cfg.attn_type == "mla" else cfg.head_dim
    cos, sin = rope_tables(rope_dim, max_seq_len, cfg.rope_theta, device=device)
    buffers = Buffers(
        arena={}, caches={},
        cache_lens=torch.zeros(max_batch, dtype=torch.int32, device=device),
        input_ids=torch.zeros(n_max, dtype=torch.long, device=device),
        # lazy depth's passes point the rows of earlier positions at one spare ACT row
        act=ACTState.allocate(n_max + (act_mode != "eager"), cfg.dim, dtype, device),
        h=torch.empty(n_max, cfg.dim, dtype=dtype, device=device),
        cos=cos, sin=sin,
        depth=None if act_mode == "eager" else depth.DepthState.allocate(
            act_mode, max_batch, max_seq_len, max_loops, n_max, cfg.dim, dtype, device,
            window=min(lazy_window, chunk)))
    low = Lowered(cfg, graph, device, dtype, max_batch, chunk, max_loops, impls, buffers,
                  weights=dict(weights), max_seq_len=max_seq_len)
    for g in _graphs(graph):
        for op in g.ops:
            rule, impl = rule_of(op), low.impl(op)
            if rule.build is not None:
                # the implementation's own form of the arguments, prepared once
                low.args[op.name] = impl.prepare(shard_args(rule.build(low.roles(op), cfg), op))
                if impl.workspace is not None:
                    buffers.workspaces[op.name] = impl.workspace(n_max, low.args[op.name], device)
            if rule.allocate is not None:
                rule.allocate(low, op, g)
            if op.kind == "loop" and buffers.depth is not None:  # the passes' injection rows
                buffers.arena[f"{op.name}.e_work"] = torch.empty(n_max, cfg.dim, dtype=dtype,
                                                                 device=device)
            for v in op.outputs:
                if v not in buffers.arena:
                    last = g.values[v].shape[-1]  # a symbol, or a shard's own width
                    width = (cfg.vocab_size if last == "vocab" else last if isinstance(last, int)
                             else cfg.dim)
                    buffers.arena[v] = torch.empty(n_max, width, dtype=dtype, device=device)
    return low


# ---- the same arguments from one module's state_dict (tests, benchmarks) ----------------

def op_args(kind: str, state_dict: Mapping[str, torch.Tensor], cfg: MythosConfig,
            prefix: str = "", dtype: Optional[torch.dtype] = None,
            device: Optional[torch.device | str] = None):
    """The generic arguments of a model's first ``kind`` op, built as ``lower`` builds
    them (the traced graph of ``cfg``, the pass pipeline, ``weights.materialize``, the
    kind's builder) from the parameters of that module alone.

    kind : an IR op kind with a builder (``mla_attention``, ``gqa_attention``, ``moe``,
        ``dense_ffn``, ``head``) or ``"loop"`` for the recurrent loop's ``LoopParams``.
    state_dict, prefix : the module's parameters, named as in the module under ``prefix``
        (e.g. a bare ``MoEFFN``'s state_dict and ``""``, or a whole model's and
        ``"recurrent.block.ffn."``; for ``"loop"``, the ``RecurrentBlock``'s).
    dtype : storage dtype (default: the state_dict's); device : default the state_dict's.
    """
    first = next(v for v in state_dict.values() if v.is_floating_point())
    g = run_passes(build_graph(cfg, first.dtype),
                   dtype=None if dtype is None else str(dtype).replace("torch.", ""))
    if kind == "loop":
        body = next(op.body for op in g.ops if op.kind == "loop")
        ops, module, build = _loop_ops(body), "recurrent", LoopParams.build
    else:
        found = [o for sub in _graphs(g) for o in sub.ops if o.kind == kind]
        if not found or RULES[kind].build is None:
            raise LoweringError(f"op_args: the {cfg.attn_type} model has no {kind!r} op "
                                "with arguments")
        ops, module, build = found[:1], found[0].name, RULES[kind].build
    names = [n for o in ops for n in o.weights.values()]
    sd = {f"{module}.{k[len(prefix):]}": v for k, v in state_dict.items() if k.startswith(prefix)}
    missing = sorted(sources(g, names) - set(sd))
    if missing:
        raise KeyError(f"op_args({kind!r}): the state_dict has no "
                       f"{prefix + missing[0][len(module) + 1:]!r}")
    W = materialize(g, sd, torch.device(device if device is not None else first.device),
                    names=names)
    return build({role: W[n] for o in ops for role, n in o.weights.items()}, cfg)
