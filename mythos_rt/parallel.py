"""Tensor and expert parallelism: the process group, and the pass that shards a graph.

A tensor-parallel runtime is one process per device (``torchrun --nproc-per-node N``),
each compiling the same model into its own share of it (docs/parallel.md):

* attention splits by heads (MLA: query heads, the latent cache replicated; GQA: KV
  heads with their query heads), the dense FFNs by hidden columns, each followed by
  one ``all_reduce`` of the output projection's partial sums;
* the MoE splits by experts: the router is replicated (top-k over all experts), each
  rank holds a contiguous range of routed experts and of the shared experts' hidden
  slices ("shared slots"), then one ``all_reduce``;
* the embedding and the tied head split by vocabulary rows (``Vp = ceil(V / N)`` per
  rank, the last padded with zero rows): ids outside a rank's rows read a zero row,
  then ``all_reduce``; the logits are ``all_gather``-ed;
* norms and the loop's per-position state (LTI, LoRA, ACT) are replicated: every rank
  holds the same reduced activations, so they stay identical without communication.

Uneven splits are allowed (ranks differ by at most one head, KV head, column, expert
or slot); a count smaller than the world size is an error naming it (a rank with no
head would hold nothing to compute). ``shard`` is a pure IR → IR pass run after the
pipeline: it records the split in the graph (``attrs["parallel"]``, each split op's
``attrs["shard"]``), inserts the communication ops as ordinary IR ops and rewrites the
split weights into slices of their checkpoint tensors, which ``weights.materialize``
reads alone.
"""

from __future__ import annotations

import atexit
import dataclasses
import math
import os
import re
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from .errors import InputError, clip
from .ir import Graph, Op, TensorSpec, WeightSpec
from .passes import remove_unused_weights

# Seconds a collective waits for the other ranks before it fails (a dead rank, a rank
# that never joined): an error on every live rank instead of a hang.
DEFAULT_TIMEOUT_S = 600.0
TIMEOUT_ENV = "MYTHOS_RT_DIST_TIMEOUT"


class ParallelError(InputError):
    """The model cannot be split as asked, or the ranks disagree (names what and why)."""


# ---- the process group -------------------------------------------------------------------

def timeout_s() -> float:
    """The collectives' timeout: ``$MYTHOS_RT_DIST_TIMEOUT`` seconds, else the default."""
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ParallelError(f"${TIMEOUT_ENV}={raw!r} must be a positive number of seconds")
    return value


def default_device() -> torch.device:
    """This rank's device: ``cuda:$LOCAL_RANK`` when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def setup(tensor_parallel: int, device: torch.device,
          what: str = "tensor_parallel") -> tuple[int, int]:
    """Join (or check) the default process group for ``tensor_parallel`` ranks; return
    ``(rank, world_size)``.

    An existing group (the caller's ``init_process_group``) is used as it is; otherwise
    one is started from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT): NCCL for a CUDA device, gloo for the CPU, with ``timeout_s()``.
    ``what`` names the request in errors.
    """
    if not isinstance(tensor_parallel, int) or isinstance(tensor_parallel, bool) \
            or tensor_parallel < 1:
        raise InputError(f"tensor_parallel must be a positive integer, got {tensor_parallel!r}")
    if not dist.is_available():
        raise ParallelError("tensor_parallel needs torch.distributed, which this torch "
                            "build lacks")
    if not dist.is_initialized():
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
                   if k not in os.environ]
        if missing:
            raise ParallelError(
                f"{what}={tensor_parallel} needs one process per rank: launch with "
                f"'torchrun --nproc-per-node {tensor_parallel} ...' (${missing[0]} is not set)")
        if os.environ["WORLD_SIZE"] != str(tensor_parallel):  # every rank sees it: no group
            raise ParallelError(f"{what}={tensor_parallel} but the process group has "
                                f"{os.environ['WORLD_SIZE']} ranks (torchrun --nproc-per-node "
                                "must equal it)")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(seconds=timeout_s()))
        # A group left open at interpreter exit can abort the process ("terminate called
        # without an active exception" from gloo's threads): close the one we opened.
        atexit.register(_close_group)
    world, rank = dist.get_world_size(), dist.get_rank()
    if world != tensor_parallel:
        raise ParallelError(f"{what}={tensor_parallel} but the process group has "
                            f"{world} ranks (torchrun --nproc-per-node must equal it)")
    return rank, world


def _close_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def agree(what: str, value: Any) -> None:
    """Check that every rank passed the same ``value``; else a ParallelError on every rank
    naming the ranks that differ (a rank that is missing is the collective's timeout)."""
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    odd = [r for r, v in enumerate(values) if v != values[0]]
    if odd:
        raise ParallelError(f"the ranks disagree on {what}: rank 0 has {values[0]!r}, rank "
                            f"{odd[0]} has {values[odd[0]]!r}")


def together(what: str, fn):
    """``fn()`` on every rank; when it raises on any rank, every rank raises (that rank its
    own error, the others a ParallelError naming it) instead of the others waiting in
    their next collective until the timeout."""
    error: Optional[BaseException] = None
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001 - re-raised below, after telling the others
        result, error = None, exc
    failures: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(failures, None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    bad = next((r for r, f in enumerate(failures) if f is not None), None)
    if bad is not None:
        raise ParallelError(f"{what} failed on rank {bad}: {clip(failures[bad], 300)}")
    return result


def shared_seed() -> int:
    """A random sampling seed drawn on rank 0 and given to every rank."""
    seed = [int(torch.randint(0, 2 ** 62, ()).item()) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(seed, src=0)
    return seed[0]


# ---- artifacts: one directory per rank --------------------------------------------------

_RANK_DIR = re.compile(r"rank(\d+)of(\d+)")


def rank_dir(directory, rank: int, world: int) -> Path:
    """Where rank ``rank`` of ``world`` saves its artifact inside ``directory``."""
    return Path(directory) / f"rank{rank}of{world}"


def saved_world(directory) -> Optional[int]:
    """The world size a sharded artifact directory was saved for (None: not one)."""
    d = Path(directory)
    if not d.is_dir():
        return None
    found = {int(m.group(2)) for p in d.iterdir()
             if (m := _RANK_DIR.fullmatch(p.name)) and p.is_dir()}
    if len(found) > 1:
        raise ParallelError(f"{directory}: holds artifacts of several world sizes "
                            f"({', '.join(map(str, sorted(found)))})")
    return found.pop() if found else None


def check_complete(directory, world: int) -> None:
    """Every rank's directory of a sharded artifact is there (each rank checks all of
    them, so a partial artifact is the same error on every rank, not a rank waiting for
    one that failed)."""
    missing = [rank_dir(directory, r, world).name for r in range(world)
               if not (rank_dir(directory, r, world) / "manifest.json").is_file()]
    if missing:
        raise ParallelError(f"{directory}: an artifact saved for tensor_parallel={world} but "
                            f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''} "
                            f"{'is' if len(missing) == 1 else 'are'} missing or incomplete "
                            f"(save it again from all {world} ranks)")


def check_share(g: Graph, world: int, rank: int, where) -> None:
    """The graph a rank directory holds is that rank's share (not a renamed other one)."""
    held = g.attrs.get("parallel", {"world_size": 1, "rank": 0})
    if held != {"world_size": world, "rank": rank}:
        raise ParallelError(f"{where}: holds the share of rank {held.get('rank')} of "
                            f"{held.get('world_size')}, expected rank {rank} of {world}")


# ---- the split -----------------------------------------------------------------------------

def share(n: int, world: int, rank: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous range of ``n`` items: sizes differ by at most one, the
    first ``n % world`` ranks hold the extra ones."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def vocab_rows(vocab: int, world: int) -> int:
    """Rows of the embedding each rank holds (the last rank's padded with zero rows)."""
    return -(-vocab // world)


def _need(count: int, what: str, world: int) -> None:
    if count < world:
        raise ParallelError(f"{what}={count} cannot be split over {world} ranks: every rank "
                            "needs at least one (use fewer ranks)")


def shard(g: Graph, world: int, rank: int) -> Graph:
    """Rank ``rank``'s share of an optimized graph (run after ``passes.run_passes``)."""
    if world == 1:
        return g
    g = g.clone()
    cfg = g.attrs["config"]
    g.attrs["parallel"] = {"world_size": world, "rank": rank}
    for graph in [g] + [op.body for op in g.ops if op.body is not None]:
        ops: list[Op] = []
        for op in graph.ops:
            ops.append(op)
            split = _SPLITS.get(op.kind)
            if split is None:
                continue
            comm = split(g, op, cfg, world, rank)
            ops.append(comm)
            _rewire(graph, op.outputs[0] if comm.kind == "all_reduce" else None, comm)
        graph.ops = ops
    return g.verify()


def _rewire(graph: Graph, partial: Optional[str], comm: Op) -> None:
    """Later readers of ``partial`` read the reduced value instead (an all_reduce's output
    is its input's buffer, reduced in place)."""
    if partial is None:
        return
    reduced = comm.outputs[0]
    graph.values[reduced] = graph.values[partial]
    for op in graph.ops:
        if op is not comm:
            op.inputs = [reduced if v == partial else v for v in op.inputs]
    graph.outputs = [reduced if v == partial else v for v in graph.outputs]


def _all_reduce(op: Op) -> Op:
    return Op("all_reduce", f"{op.name}.all_reduce", [op.outputs[0]],
              [f"{op.outputs[0]}.all_reduce"])


def _take(g: Graph, name: str, dim: int, start: int, stop: int) -> None:
    """Checkpoint weight ``name`` becomes its slice ``[start, stop)`` along ``dim``."""
    spec = g.weights[name]
    shape = list(spec.shape)
    shape[dim] = stop - start
    g.weights[name] = WeightSpec(tuple(shape), spec.dtype, {
        "fn": "take", "from": [name], "slices": [[dim, start, stop]]})


def _slice_derived(g: Graph, name: str, slices: list, shape: tuple, **params) -> None:
    """Derived weight ``name`` made from slices of its sources."""
    spec = g.weights[name]
    g.weights[name] = WeightSpec(shape, spec.dtype, dict(spec.derive, slices=slices, **params))


def _mla(g: Graph, op: Op, cfg: dict, world: int, rank: int) -> Op:
    H = cfg["n_heads"]
    _need(H, "n_heads", world)
    h0, h1 = share(H, world, rank)
    nope, rope, v, R = (cfg[k] for k in ("qk_nope_head_dim", "qk_rope_head_dim",
                                         "v_head_dim", "kv_lora_rank"))
    w = op.weights
    _take(g, w["q_up_nope"], 0, h0 * nope, h1 * nope)
    _take(g, w["q_up_rope"], 0, h0 * rope, h1 * rope)
    kv_up = w["kv_up"]
    rows = [0, h0 * (nope + v), h1 * (nope + v)]
    for role, width in (("w_uk", nope), ("w_uv", v)):
        _slice_derived(g, w[role], [rows], (h1 - h0, width, R), n_heads=h1 - h0)
    _take(g, kv_up, *rows)
    _take(g, w["wo"], 1, h0 * v, h1 * v)
    op.attrs["shard"] = {"split": "heads", "heads": [h0, h1], "of": H}
    return _all_reduce(op)


def _gqa(g: Graph, op: Op, cfg: dict, world: int, rank: int) -> Op:
    H, Hkv = cfg["n_heads"], cfg["n_kv_heads"]
    _need(Hkv, "n_kv_heads", world)
    k0, k1 = share(Hkv, world, rank)
    group, d = H // Hkv, cfg["dim"] // H
    w = op.weights
    _take(g, w["wq"], 0, k0 * group * d, k1 * group * d)
    _take(g, w["wk"], 0, k0 * d, k1 * d)
    _take(g, w["wv"], 0, k0 * d, k1 * d)
    _take(g, w["wo"], 1, k0 * group * d, k1 * group * d)
    op.attrs["shard"] = {"split": "kv_heads", "kv_heads": [k0, k1], "of": Hkv,
                         "args": {"n_heads": (k1 - k0) * group, "n_kv_heads": k1 - k0},
                         "cache": {"n_kv_heads": k1 - k0}}
    return _all_reduce(op)


def _dense_ffn(g: Graph, op: Op, cfg: dict, world: int, rank: int) -> Op:
    w13 = g.weights[op.weights["w13"]]
    hidden, D = w13.shape[0] // 2, w13.shape[1]
    _need(hidden, "the dense FFN's hidden size", world)
    c0, c1 = share(hidden, world, rank)
    _slice_derived(g, op.weights["w13"], [[0, c0, c1], [0, c0, c1]], (2 * (c1 - c0), D))
    _take(g, op.weights["down"], 1, c0, c1)
    op.attrs["shard"] = {"split": "columns", "columns": [c0, c1], "of": hidden}
    return _all_reduce(op)


def _moe(g: Graph, op: Op, cfg: dict, world: int, rank: int) -> Op:
    E, S, k, I = (op.attrs[a] for a in ("n_experts", "n_shared", "top_k", "expert_dim"))
    slots = S * k
    e0, e1 = share(E, world, rank)
    s0, s1 = share(slots, world, rank)
    w13, w2 = g.weights[op.weights["w13"]], g.weights[op.weights["w2"]]
    src13, src2 = w13.derive["from"], w2.derive["from"]
    from13 = src13[2 * e0:2 * e1]
    from2 = src2[e0:e1]
    sl13: list = [None] * len(from13)
    sl2: list = [None] * len(from2)
    for j in range(S):  # shared expert j holds slots [j·k, (j+1)·k), I columns each
        a, b = max(s0, j * k), min(s1, (j + 1) * k)
        if a < b:
            rows = [0, (a - j * k) * I, (b - j * k) * I]
            from13 += src13[2 * (E + j):2 * (E + j) + 2]
            sl13 += [rows, rows]
            from2.append(src2[E + j])
            sl2.append([1, rows[1], rows[2]])
    n = (e1 - e0) + (s1 - s0)
    _slice_derived(g, op.weights["w13"], sl13, (n, 2 * I, w13.shape[2]))
    g.weights[op.weights["w13"]].derive["from"] = from13
    _slice_derived(g, op.weights["w2"], sl2, (n, w2.shape[1], I))
    g.weights[op.weights["w2"]].derive["from"] = from2
    op.attrs["shard"] = {"split": "experts", "experts": [e0, e1], "of": E,
                         "shared_slots": [s0, s1], "of_slots": slots,
                         "args": {"expert_start": e0, "n_shared_slots": s1 - s0}}
    remove_unused_weights(g)  # other ranks' experts: nothing here reads them
    return _all_reduce(op)


def _vocab_slice(g: Graph, op: Op, cfg: dict, world: int, rank: int, extra: int) -> int:
    """Give ``op``'s weight the rank's ``Vp`` vocabulary rows (zero-padded) plus ``extra``
    zero rows; return ``Vp``."""
    V, Vp = cfg["vocab_size"], vocab_rows(cfg["vocab_size"], world)
    v0, v1 = min(V, rank * Vp), min(V, (rank + 1) * Vp)
    name = op.weights["w"]
    spec = g.weights[name]
    g.weights[name] = WeightSpec((Vp + extra, spec.shape[1]), spec.dtype, {
        "fn": "pad_rows", "from": [name], "slices": [[0, v0, v1]], "rows": Vp + extra})
    op.attrs["shard"] = {"split": "vocab", "rows": [v0, v1], "of": V}
    return Vp


def _embed(g: Graph, op: Op, cfg: dict, world: int, rank: int) -> Op:
    # one zero row past the rank's rows: where every id outside them reads
    Vp = _vocab_slice(g, op, cfg, world, rank, extra=1)
    op.attrs["vocab_start"], op.attrs["vocab_rows"] = rank * Vp, Vp
    return _all_reduce(op)


def _head(g: Graph, op: Op, cfg: dict, world: int, rank: int) -> Op:
    Vp = _vocab_slice(g, op, cfg, world, rank, extra=0)
    full = op.outputs[0]
    local = f"{full}.shard"
    g.values[local] = TensorSpec((g.values[full].shape[0], Vp), g.values[full].dtype)
    op.outputs = [local]
    return Op("all_gather", f"{op.name}.all_gather", [local], [full])


_SPLITS = {"mla_attention": _mla, "gqa_attention": _gqa, "dense_ffn": _dense_ffn,
           "moe": _moe, "embed": _embed, "head": _head}


# ---- what `mythos-rt inspect` shows of a sharded artifact -------------------------------

_SPLIT_WHAT = {"vocab": ("rows", "vocabulary rows"), "heads": ("heads", "query heads"),
               "kv_heads": ("kv_heads", "KV heads"), "columns": ("columns", "hidden columns"),
               "experts": ("experts", "routed experts")}


def _span(lo: int, hi: int) -> str:
    return "-" if hi <= lo else str(lo) if hi == lo + 1 else f"{lo}-{hi - 1}"


def weight_bytes(g: Graph) -> int:
    """Bytes of the weights a sharded graph's plan reads: one rank's share. (Unsharded, a
    tied head would count twice: it aliases the embedding, a shard gives each its own.)"""
    return sum(math.prod(g.weights[n].shape) * getattr(torch, g.weights[n].dtype).itemsize
               for n in g.weight_names_used())


def describe_split(graphs: list[Graph]) -> str:
    """A table of what each rank of a sharded model holds: per split op, each rank's
    heads, columns, experts (and shared slots) or vocabulary rows; then what every rank
    holds whole and each rank's weight bytes. ``graphs``: the ranks' graphs, in order."""
    from .memory import format_bytes
    world = len(graphs)
    rows = [["op", "split", *(f"rank {r}" for r in range(world))]]
    for ops in zip(*(list(g.walk()) for g in graphs)):
        shard_of = [op.attrs.get("shard") for op in ops]
        if shard_of[0] is None:
            continue
        key, what = _SPLIT_WHAT[shard_of[0]["split"]]
        cells = [_span(*s[key]) for s in shard_of]
        if "shared_slots" in shard_of[0]:
            what = f"{what} + shared slots"
            cells = [f"{c} + {_span(*s['shared_slots'])}" for c, s in zip(cells, shard_of)]
            what += f" (of {shard_of[0]['of']} + {shard_of[0]['of_slots']})"
        else:
            what += f" (of {shard_of[0]['of']})"
        rows.append([ops[0].name, what, *cells])
    rows.append(["weights", "bytes", *(format_bytes(weight_bytes(g)) for g in graphs)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    mla = any(op.kind == "mla_attention" for op in graphs[0].walk())
    lines.append("  whole on every rank: norms, MoE router, loop state (LTI, LoRA, ACT)"
                 + (", MLA down-projections and latent KV cache" if mla else ""))
    return "\n".join(lines) + "\n"


# ---- what the lowering asks -----------------------------------------------------------

def shard_args(args: Any, op: Op) -> Any:
    """An op's generic arguments with its shard's local counts (heads, expert range)."""
    local = op.attrs.get("shard", {}).get("args")
    return dataclasses.replace(args, **local) if local else args


def shard_config(cfg, op: Op):
    """The config an attention op's caches are allocated from: its shard's KV heads."""
    local = op.attrs.get("shard", {}).get("cache")
    return dataclasses.replace(cfg, **local) if local else cfg


def world_of(g: Graph) -> int:
    """The world size a graph was sharded for (1: not sharded)."""
    return g.attrs.get("parallel", {}).get("world_size", 1)
