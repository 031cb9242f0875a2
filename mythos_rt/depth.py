"""Adaptive depth: the recurrent loop with lazy ACT (``act_mode="lazy"`` or ``"reuse"``).

With a KV cache the reference runs every loop for every position: once ACT halts a
position its output is frozen, and the remaining loops only write its deeper cache
entries for later positions to attend to. Lazy depth stops a position when it halts and
keeps what resumes it (its ``h`` after its last loop and its injection input ``e``, in
``DepthState``). Before loop ``t`` of a chunk, every earlier position without a loop-t
entry is computed at loop t in the same batched pass as the chunk's own positions, so
depths no later position reaches are never computed. Exact: each position's loop-t
state depends only on loop-t entries of positions before it, which all exist when it runs.

Why one pass per loop is a contiguous range. A position's depth (loops computed) is the
deepest loop any position at or after it has needed, so depth never increases along a
row. At loop ``t`` the positions lacking a loop-t entry are therefore the suffix
``[s, L)`` of the cached ones (``s`` = positions deeper than t), and the chunk's
positions that must run are those up to its last running one; together one range
``[s, e]`` per row. That range is a chunked prefill at offset ``s`` (``loop_lens``), so
every backend's ordinary attention, MoE and loop kernels run it unchanged, in pieces of
at most ``chunk`` positions. Rows whose range is shorter than a piece are padded; a
padded query writes only loop-t slots of positions after the range (pending or not yet
generated), which are rewritten before anything reads them.

``"reuse"`` (approximate, Huginn-style): earlier positions are never resumed; their
missing loop-t entries are copies of their loop t−1 entries.

Bookkeeping is on the host: since depth never increases along a row, a row's depths are
fully described by ``deeper[b][t]``, the number of leading positions deeper than loop t,
so no per-position depth array exists. Each loop reads the chunk's halting flags once
(free on a CPU); on CUDA this mode therefore runs without CUDA graphs
(docs/adaptive-depth.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch

from .ops.recurrent import ACTState


@dataclass
class Piece:
    """One batched pass of loop ``t``: row ``b`` runs positions ``start[b] + i``,
    ``i < W``. ``store_row`` indexes the flattened store and ``chunk_row`` the chunk's
    ACT arrays for each of the B·W rows; rows that are not real work (padding, and
    earlier positions for ``chunk_row``) point at the stores' spare last row."""
    start: torch.Tensor      # (B,) int32
    store_row: torch.Tensor  # (B·W,) int64
    chunk_row: torch.Tensor  # (B·W,) int64


@dataclass
class DepthState:
    """What lazy depth keeps between steps (allocated once, bounded by the cache size).

    h, e : (B_max·(S_max + 1), D) storage dtype: each position's state after its last
        computed loop and its injection input, row ``b·(S_max + 1) + position``; the
        spare row per batch row absorbs the writes of padded pass rows.
    deeper : host lists, ``deeper[b][t]`` = leading positions of row b computed beyond
        loop t (their loop-t cache entries exist).
    loop_lens : (B_max,) int32, the offset of the current pass (the loop's attention ops
        read positions from it instead of ``cache_lens``).
    chunk_valid : (B_max,) int32, real tokens of each row in the current chunk (prefill
        pads ragged rows; padding never runs the loop).
    work : the ACT buffers of the pass's rows (the chunk's own are ``Buffers.act``,
        allocated with one spare row, ``n_max``).
    chunk_rows : (N_max,) int64, each chunk token's store row (``store_chunk``).
    """
    h: torch.Tensor
    e: torch.Tensor
    deeper: list
    loop_lens: torch.Tensor
    chunk_valid: torch.Tensor
    work: ACTState
    chunk_rows: torch.Tensor
    seq_len: int
    mode: str = "lazy"
    stats: dict = field(default_factory=dict)
    piece: Optional[Piece] = None

    @classmethod
    def allocate(cls, mode: str, max_batch: int, max_seq_len: int, max_loops: int,
                 n_max: int, dim: int, dtype: torch.dtype, device) -> "DepthState":
        rows = max_batch * (max_seq_len + 1)
        st = cls(h=torch.zeros(rows, dim, dtype=dtype, device=device),
                 e=torch.zeros(rows, dim, dtype=dtype, device=device),
                 deeper=[[0] * max_loops for _ in range(max_batch)],
                 loop_lens=torch.zeros(max_batch, dtype=torch.int32, device=device),
                 chunk_valid=torch.zeros(max_batch, dtype=torch.int32, device=device),
                 work=ACTState.allocate(n_max, dim, dtype, device),
                 chunk_rows=torch.zeros(n_max, dtype=torch.int64, device=device),
                 seq_len=max_seq_len, mode=mode)
        st.reset_stats(1)
        return st

    def reset_stats(self, n_loops: int) -> None:
        """Zero the counters (``Runtime.last_stats``) for a request of ``n_loops`` loops."""
        self.stats = {"block_evals": 0, "eager_block_evals": 0, "catchup_evals": 0,
                      "reused_entries": 0, "positions": 0,
                      "halt_histogram": [0] * (n_loops + 1)}


def store_bytes(max_batch: int, max_seq_len: int, dim: int, dtype_bytes: int) -> int:
    """Bytes ``DepthState`` allocates beyond the KV caches (the ``h`` and ``e`` stores)."""
    return 2 * max_batch * (max_seq_len + 1) * dim * dtype_bytes


@dataclass
class LoopSteps:
    """The steps a lazy loop region chooses from, per loop index ``t``.

    start : the chunk joins the store (``store_chunk``).
    prologue[t] : loop t's prologue on the chunk's own rows.
    chunk_pass[t] : [offsets := cache_lens, *block ops, epilogue (with the next prologue)]
        on the chunk's own rows — what eager depth runs.
    gathered_pass[t] : [gather, prologue, *block ops, epilogue, scatter] on a piece.
    flush / unflush : the chunk's h into the store / back (around gathered passes).
    """
    start: object
    prologue: list
    chunk_pass: list
    gathered_pass: list
    flush: object
    unflush: object


def lazy_region(st: DepthState, steps: LoopSteps, *, n_loops: int, chunk: int,
                cache_lens: torch.Tensor, act: ACTState, copy_entries: Callable,
                ) -> Callable[[tuple], Iterator]:
    """The loop region's ``expand(shape)``: yields (step, shape) as it decides each loop.

    Loop t runs as a *chunk pass* (eager's steps on the chunk's rows, no copies) when no
    earlier position lacks a loop-t entry, every chunk position has run loop t−1 and the
    chunk's last token still runs (so nothing would be skipped); otherwise as *gathered
    passes* over each row's range ``[s, e]``, in pieces of at most ``chunk`` positions.
    A chunk pass also computes chunk tokens that have halted: their rows are in the batch
    anyway, so dense work barely grows, and keeping them in step spares a gathered pass;
    the MoE does pay for their experts (counted in ``block_evals``).

    act : the chunk's ACT state (one row per chunk token, plus the spare row);
    copy_entries(row, lo, hi, t) : "reuse": copy loop t−1's cache entries of positions
        [lo, hi) of the row into loop t's caches.
    """
    def expand(shape) -> Iterator:
        B, T = shape.B, shape.T
        yield steps.start, shape
        lens = cache_lens[:B].tolist()
        valid = st.chunk_valid[:B].tolist()
        stats = st.stats
        stats["positions"] += sum(valid)
        stats["eager_block_evals"] += sum(valid) * n_loops
        for b in range(B):  # the chunk's positions start at depth 0
            st.deeper[b] = [min(d, lens[b]) for d in st.deeper[b]]
        tail = [0] * B  # depth of each row's last real chunk token
        halt_at = [0] * (B * T)
        was = [True] * (B * T)
        fused = False  # the chunk rows' next prologue is in place (a chunk pass ran)
        in_store = False  # the chunk's h is in the store, not its rows
        for t in range(n_loops + 1):
            halted = act.halted[:B * T].tolist()
            for j in range(B * T):
                if halted[j] and not was[j]:
                    halt_at[j] = t
            was = halted
            last = [max((i for i in range(valid[b]) if not halted[b * T + i]), default=-1)
                    for b in range(B)]
            if t == n_loops or max(last) < 0:
                break
            lo, n = [], []  # per row: the pass's first position and length
            for b in range(B):
                if last[b] < 0:
                    lo.append(0)
                    n.append(0)
                    continue
                s = st.deeper[b][t]
                if st.mode == "reuse" and s < lens[b]:
                    copy_entries(b, s, lens[b], t)
                    stats["reused_entries"] += lens[b] - s
                    s = st.deeper[b][t] = lens[b]
                lo.append(s)
                n.append(lens[b] + last[b] - s + 1)
            whole = max(last) == T - 1 and all(
                v == 0 or (st.deeper[b][t] >= lens[b] and tail[b] == t)
                for b, v in enumerate(valid))
            if whole:
                if in_store:
                    yield steps.unflush, shape
                    in_store = False
                if not fused:
                    yield steps.prologue[t], shape
                for step in steps.chunk_pass[t]:
                    yield step, shape
                fused = True
                for b in range(B):
                    if valid[b]:
                        tail[b] = t + 1
                        st.deeper[b][t] = lens[b] + valid[b]
                stats["block_evals"] += sum(valid)
                continue
            if not in_store:
                yield steps.flush, shape
                in_store = True
            fused = False
            for b in range(B):
                if n[b]:
                    stats["catchup_evals"] += lens[b] - lo[b]
                    st.deeper[b][t] = lens[b] + last[b] + 1
                    if last[b] == valid[b] - 1:
                        tail[b] = t + 1
            stats["block_evals"] += sum(n)
            for k in range(0, max(n), chunk):
                W = min(chunk, max(n) - k)
                st.piece = _piece(st, lo, n, k, W, lens, T, act.n_max - 1)
                for step in steps.gathered_pass[t]:
                    yield step, type(shape)(B, W)
        st.piece = None
        if not in_store:  # later steps resume this chunk's positions from the store
            yield steps.flush, shape
        hist = stats["halt_histogram"]
        for b in range(B):
            for i in range(valid[b]):
                loop = halt_at[b * T + i]
                if loop < len(hist):
                    hist[loop] += 1
    return expand


def _piece(st: DepthState, lo: list[int], n: list[int], k: int, W: int, lens: list[int],
           T: int, spare: int) -> Piece:
    """Piece ``k`` (offset k within each row's range) of width W. A row with no work left
    is placed after its chunk, where its padded queries touch only unused slots."""
    device = st.loop_lens.device
    B, S1 = len(lo), st.seq_len + 1
    first = [lo[b] + k if n[b] > k else lens[b] + T for b in range(B)]
    meta = torch.tensor([first, [max(0, n[b] - k) for b in range(B)], lens], dtype=torch.int64)
    meta = meta.to(device)
    start, live_n, L = meta[0][:, None], meta[1][:, None], meta[2][:, None]
    i = torch.arange(W, device=device)[None, :]
    pos = start + i
    live = i < live_n
    rows = torch.arange(B, device=device)[:, None]
    store_row = torch.where(live, rows * S1 + pos, rows * S1 + S1 - 1)
    chunk_row = torch.where(live & (pos >= L), rows * T + pos - L, spare)
    return Piece(start=meta[0].to(torch.int32), store_row=store_row.reshape(-1),
                 chunk_row=chunk_row.reshape(-1))


def store_chunk(st: DepthState, act: ACTState, cache_lens: torch.Tensor,
                e_chunk: torch.Tensor, h: torch.Tensor):
    """The chunk's start: its injection inputs enter the store, its rows start at h = e,
    its ACT state is reset and padding tokens are marked halted (they never run the loop).
    Remembers each chunk token's store row (padding: the spare row) in ``chunk_rows``."""
    S1 = st.seq_len + 1

    def bind(shape):
        B, T = shape.B, shape.T
        N = B * T
        ev, hv, idx = e_chunk[:N], h[:N], st.chunk_rows[:N]
        rows = torch.arange(B, device=ev.device)[:, None]
        i = torch.arange(T, device=ev.device)[None, :]

        def run():
            pos = cache_lens[:B].long()[:, None] + i
            ok = (pos < S1 - 1) & (i < st.chunk_valid[:B].long()[:, None])
            idx.copy_(torch.where(ok, rows * S1 + pos, rows * S1 + S1 - 1).reshape(-1))
            st.e.index_copy_(0, idx, ev)
            hv.copy_(ev)
            act.reset(N)
            act.halted[:N].copy_(~ok.reshape(-1))
            act.halted[-1] = True  # the spare row: earlier positions have halted
        return run
    return bind


def flush(st: DepthState, h: torch.Tensor, back: bool = False):
    """The chunk rows' h into the store (``back``: from the store into the chunk rows)."""
    def bind(shape):
        N = shape.B * shape.T
        hv, idx = h[:N], st.chunk_rows[:N]
        if back:
            return lambda: torch.index_select(st.h, 0, idx, out=hv)
        return lambda: st.h.index_copy_(0, idx, hv)
    return bind


def gather(st: DepthState, act: ACTState, h: torch.Tensor, e: torch.Tensor):
    """Load the current piece's rows: h and e from the store, ACT state from the chunk's
    (earlier positions read the spare row, halted: their ACT weight is 0), its offsets
    into loop_lens."""
    work = st.work

    def bind(shape):
        B, N = shape.B, shape.B * shape.T
        hv, ev = h[:N], e[:N]
        cum, h_out, halted = work.cum_p[:N], work.h_out[:N], work.halted[:N]

        def run():
            pc = st.piece
            torch.index_select(st.h, 0, pc.store_row, out=hv)
            torch.index_select(st.e, 0, pc.store_row, out=ev)
            torch.index_select(act.cum_p, 0, pc.chunk_row, out=cum)
            torch.index_select(act.h_out, 0, pc.chunk_row, out=h_out)
            torch.index_select(act.halted, 0, pc.chunk_row, out=halted)
            st.loop_lens[:B].copy_(pc.start)
        return run
    return bind


def scatter(st: DepthState, act: ACTState, h: torch.Tensor):
    """Store the piece's results: h of its positions and the ACT state of its chunk tokens
    (padding and earlier positions go to spare rows)."""
    work = st.work

    def bind(shape):
        N = shape.B * shape.T
        hv, cum, h_out, halted = h[:N], work.cum_p[:N], work.h_out[:N], work.halted[:N]

        def run():
            pc = st.piece
            st.h.index_copy_(0, pc.store_row, hv)
            act.cum_p.index_copy_(0, pc.chunk_row, cum)
            act.h_out.index_copy_(0, pc.chunk_row, h_out)
            act.halted.index_copy_(0, pc.chunk_row, halted)
            act.halted[-1] = True
        return run
    return bind
