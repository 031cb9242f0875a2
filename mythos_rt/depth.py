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
at most ``chunk`` positions over the batch rows from the first to the last with work
(``Shape.row0``). Rows in that span whose range is shorter than a piece are padded; a
padded query writes only loop-t slots of positions after the range (pending or not yet
generated), which are rewritten before anything reads them, and reads a real row's state
(its experts, so no other expert weights are read for it).

``"reuse"`` (approximate, Huginn-style): earlier positions are never resumed; their
missing loop-t entries are copies of their loop t−1 entries.

Since depth never increases along a row, a row's depths are fully described by
``deeper[b, t]``, the number of leading positions deeper than loop t, so no per-position
depth array exists. Prompt chunks decide their passes on the host: each loop reads the
chunk's halting flags once (free on a CPU).

Decode steps can instead run *device-resident* (``window`` W > 0, the default on CUDA):
no host read at all, a fixed list of launches that a CUDA graph can capture. Each loop
runs one pass of W positions per row starting at ``deeper[b, t]``; rows whose new token
has halted get an empty pass, and a pass with no real row at all sets ``skip``, so that
the MoE (most of a pass's weight bytes) returns at once. That is exact only while no row
has W or more positions missing a loop's entry, so the store keeps that bound: a decode
step whose row would reach W pending positions at its deepest loop runs the new token
through every loop (its output stays frozen by ACT; its cache entries are computed),
which catches the whole row up, and a prompt chunk ends by catching up every position
older than its last W − 1 (``lazy_region``). Positions in a pass past the new token are
padding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch

from .ops.recurrent import ACTState

# The stats a device-resident step counts on the device (DepthState.counts), in order.
COUNTED = ("block_evals", "catchup_evals", "positions", "eager_block_evals", "passes",
           "eager_passes", "pass_rows", "empty_passes")

# Positions per row of a device-resident decode pass on CUDA: a pass of 16 rows per row
# reads each weight once, like one row, and catch-up waits at most 15 steps.
DEVICE_WINDOW = 16


@dataclass
class Piece:
    """One batched pass of loop ``t``: row ``b`` runs positions ``start[b] + i``,
    ``i < W``. ``store_row`` indexes the flattened store and ``chunk_row`` the chunk's
    ACT arrays for each of the B·W rows; rows that are not real work (padding, and
    earlier positions for ``chunk_row``) point at the stores' spare last row."""
    start: torch.Tensor      # (B,) int32
    store_row: torch.Tensor  # (B·W,) int64
    chunk_row: torch.Tensor  # (B·W,) int64
    read_row: Optional[torch.Tensor] = None  # (B·W,) int64, store rows gathered (default
    # store_row): padding reads a real row's state (finite, that row's experts)

    @property
    def source(self) -> torch.Tensor:
        return self.store_row if self.read_row is None else self.read_row


@dataclass
class DepthState:
    """What lazy depth keeps between steps (allocated once, bounded by the cache size).

    h, e : (B_max·(S_max + 1), D) storage dtype: each position's state after its last
        computed loop and its injection input, row ``b·(S_max + 1) + position``; the
        spare row per batch row absorbs the writes of padded pass rows.
    deeper : (B_max, max_loops) int64 on the device, ``deeper[b, t]`` = leading positions
        of row b computed beyond loop t (their loop-t cache entries exist).
    loop_lens : (B_max,) int32, the offset of the current pass (the loop's attention ops
        read positions from it instead of ``cache_lens``).
    chunk_valid : (B_max,) int32, real tokens of each row in the current chunk (prefill
        pads ragged rows; padding never runs the loop).
    work : the ACT buffers of the pass's rows (the chunk's own are ``Buffers.act``,
        allocated with one spare row, ``n_max``).
    chunk_rows : (N_max,) int64, each chunk token's store row (``store_chunk``).
    window : W, positions per row of a device-resident decode pass (0: decode steps
        decide their passes on the host like prompt chunks).
    counts : int64 on the device, what device-resident steps add to ``stats`` (``COUNTED``,
        in that order); ``halt_counts`` the same for the halting histogram
        (``collect_stats`` folds them in).
    force, ran : (B_max,) scratch of a device-resident step (catch-up forced; loops the
        new token ran before halting); ``device_piece`` its pass's (fixed) rows.
    skip : (1,) int32 on the device, 1 while a device-resident pass has no real row: the
        loop's MoE then reads no expert weight (``moe_ffn``'s ``skip``); 0 otherwise.
    """
    h: torch.Tensor
    e: torch.Tensor
    deeper: torch.Tensor
    loop_lens: torch.Tensor
    chunk_valid: torch.Tensor
    work: ACTState
    chunk_rows: torch.Tensor
    seq_len: int
    mode: str = "lazy"
    window: int = 0
    counts: Optional[torch.Tensor] = None
    halt_counts: Optional[torch.Tensor] = None
    force: Optional[torch.Tensor] = None
    ran: Optional[torch.Tensor] = None
    device_piece: Optional[Piece] = None
    skip: Optional[torch.Tensor] = None
    stats: dict = field(default_factory=dict)
    piece: Optional[Piece] = None

    @classmethod
    def allocate(cls, mode: str, max_batch: int, max_seq_len: int, max_loops: int,
                 n_max: int, dim: int, dtype: torch.dtype, device,
                 window: int = 0) -> "DepthState":
        rows = max_batch * (max_seq_len + 1)
        if mode != "lazy":
            window = 0  # reuse copies entries per row (lower caps the window at chunk)
        i64 = dict(dtype=torch.int64, device=device)
        BW = max_batch * max(window, 1)
        st = cls(h=torch.zeros(rows, dim, dtype=dtype, device=device),
                 e=torch.zeros(rows, dim, dtype=dtype, device=device),
                 deeper=torch.zeros(max_batch, max_loops, **i64),
                 loop_lens=torch.zeros(max_batch, dtype=torch.int32, device=device),
                 chunk_valid=torch.zeros(max_batch, dtype=torch.int32, device=device),
                 work=ACTState.allocate(n_max, dim, dtype, device),
                 chunk_rows=torch.zeros(n_max, **i64),
                 seq_len=max_seq_len, mode=mode, window=window,
                 counts=torch.zeros(len(COUNTED), **i64),
                 halt_counts=torch.zeros(max_loops + 1, **i64),
                 force=torch.zeros(max_batch, dtype=torch.bool, device=device),
                 ran=torch.zeros(max_batch, **i64),
                 skip=torch.zeros(1, dtype=torch.int32, device=device),
                 device_piece=Piece(start=torch.zeros(max_batch, dtype=torch.int32,
                                                      device=device),
                                    store_row=torch.zeros(BW, **i64),
                                    chunk_row=torch.zeros(BW, **i64),
                                    read_row=torch.zeros(BW, **i64)))
        st.reset_stats(1)
        return st

    def reset_stats(self, n_loops: int) -> None:
        """Zero the counters (``Runtime.last_stats``) for a request of ``n_loops`` loops."""
        self.stats = {key: 0 for key in COUNTED}
        self.stats.update(reused_entries=0, halt_histogram=[0] * (n_loops + 1))
        self.counts.zero_()
        self.halt_counts.zero_()

    def collect_stats(self) -> dict:
        """``stats`` with the device-resident steps' counters added (one host read)."""
        stats = dict(self.stats)
        counts = self.counts.tolist()
        for key, n in zip(COUNTED, counts):
            stats[key] += n
        hist = list(stats["halt_histogram"])
        for loop, n in enumerate(self.halt_counts[:len(hist)].tolist()):
            hist[loop] += n
        stats["halt_histogram"] = hist
        return stats


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
    device_decode(shape) : a device-resident decode step's (step, shape) pairs
        (``device_decode_steps``).
    """
    start: object
    prologue: list
    chunk_pass: list
    gathered_pass: list
    flush: object
    unflush: object
    device_decode: Callable = None


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
    def passes(t: int, lo: list, n: list, lens: list, shape) -> Iterator:
        """Loop t's gathered passes over each row's range [lo, lo + n), in pieces of at
        most ``chunk`` positions; a piece spans only the batch rows from its first to its
        last with work (a row catching up alone does not pad every other row)."""
        T = shape.T
        for k in range(0, max(n), chunk):
            W = min(chunk, max(n) - k)
            busy = [b for b in range(len(n)) if n[b] > k]
            a, z = busy[0], busy[-1] + 1
            st.piece = _piece(st, lo[a:z], n[a:z], k, W, lens[a:z], T, act.n_max - 1, a)
            st.stats["passes"] += 1
            st.stats["pass_rows"] += (z - a) * W
            for step in steps.gathered_pass[t]:
                yield step, type(shape)(z - a, W, a)

    def expand(shape) -> Iterator:
        if shape.T == 1 and st.window:
            yield from steps.device_decode(shape)
            return
        B, T = shape.B, shape.T
        yield steps.start, shape
        lens = cache_lens[:B].tolist()
        valid = st.chunk_valid[:B].tolist()
        stats = st.stats
        stats["positions"] += sum(valid)
        stats["eager_block_evals"] += sum(valid) * n_loops
        stats["eager_passes"] += n_loops
        # the chunk's positions start at depth 0
        deeper = [[min(d, lens[b]) for d in row[:n_loops]]
                  for b, row in enumerate(st.deeper[:B].tolist())]
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
                s = deeper[b][t]
                if st.mode == "reuse" and s < lens[b]:
                    copy_entries(b, s, lens[b], t)
                    stats["reused_entries"] += lens[b] - s
                    s = deeper[b][t] = lens[b]
                lo.append(s)
                n.append(lens[b] + last[b] - s + 1)
            whole = max(last) == T - 1 and all(
                v == 0 or (deeper[b][t] >= lens[b] and tail[b] == t)
                for b, v in enumerate(valid))
            if whole:
                if in_store:
                    yield steps.unflush, shape
                    in_store = False
                if not fused:
                    yield steps.prologue[t], shape
                for step in steps.chunk_pass[t]:
                    yield step, shape
                stats["passes"] += 1
                stats["pass_rows"] += B * T
                fused = True
                for b in range(B):
                    if valid[b]:
                        tail[b] = t + 1
                        deeper[b][t] = lens[b] + valid[b]
                stats["block_evals"] += sum(valid)
                continue
            if not in_store:
                yield steps.flush, shape
                in_store = True
            fused = False
            for b in range(B):
                if n[b]:
                    stats["catchup_evals"] += lens[b] - lo[b]
                    deeper[b][t] = lens[b] + last[b] + 1
                    if last[b] == valid[b] - 1:
                        tail[b] = t + 1
            stats["block_evals"] += sum(n)
            yield from passes(t, lo, n, lens, shape)
        if st.window:  # device-resident decode follows: no row may keep W pending positions
            for t in range(n_loops):
                lo = [deeper[b][t] for b in range(B)]
                n = [max(0, lens[b] + valid[b] - st.window + 1 - lo[b]) for b in range(B)]
                if not max(n):
                    continue
                if not in_store:
                    yield steps.flush, shape
                    in_store = True
                stats["block_evals"] += sum(n)
                stats["catchup_evals"] += sum(n)
                for b in range(B):
                    deeper[b][t] += n[b]
                yield from passes(t, lo, n, lens, shape)
        st.piece = None
        st.deeper[:B, :n_loops].copy_(torch.tensor(deeper, dtype=torch.int64))
        if not in_store:  # later steps resume this chunk's positions from the store
            yield steps.flush, shape
        hist = stats["halt_histogram"]
        for b in range(B):
            for i in range(valid[b]):
                loop = halt_at[b * T + i]
                if loop < len(hist):
                    hist[loop] += 1
    return expand


def device_decode_steps(st: DepthState, act: ACTState, cache_lens: torch.Tensor,
                        e_chunk: torch.Tensor, h: torch.Tensor, n_loops: int,
                        gathered_pass: list, copy_step: Callable) -> Callable:
    """A decode step's lazy loop as a fixed list of launches (``st.window`` W > 0): no
    host read, so a CUDA graph can capture it. For each loop t a *window* step derives the
    pass from device state alone, then ``gathered_pass[t]`` runs W positions per row:
    those from ``deeper[b, t]`` up to the new token when the row runs loop t (its new
    token has not halted, or the row is forced), none otherwise (every pass row then
    points at the new token's state and writes only spare rows and unused cache slots).
    The module docstring says why W pending positions per row suffice."""
    W, S1, spare = st.window, st.seq_len + 1, act.n_max - 1
    store = store_chunk(st, act, cache_lens, e_chunk, h)

    def start(shape):
        B = shape.B
        begin, hv, idx = store(shape), h[:B], st.chunk_rows[:B]
        deeper, lens, valid = st.deeper[:B, :n_loops], cache_lens[:B], st.chunk_valid[:B]

        def run():
            begin()
            st.h.index_copy_(0, idx, hv)  # the new token's h (= e) joins the store
            L = lens.long()
            deeper.copy_(torch.minimum(deeper, L[:, None]))  # a new sequence starts at 0
            real = valid > 0
            # the row would reach W pending positions at its deepest loop: catch up all
            torch.logical_and(L - deeper[:, n_loops - 1] + 1 >= W, real, out=st.force[:B])
            st.ran[:B].zero_()
            n = real.sum()
            st.counts[2] += n
            st.counts[3] += n * n_loops
            st.counts[4:6] += n_loops  # passes: one per loop, as eager
            st.counts[6] += n_loops * B * W
        return run

    def window(t: int):
        def bind(shape):
            B = shape.B
            device = cache_lens.device
            i = torch.arange(W, device=device)[None, :]
            rows = torch.arange(B, device=device)[:, None]
            dp = st.device_piece
            piece = Piece(start=dp.start[:B], store_row=dp.store_row[:B * W],
                          chunk_row=dp.chunk_row[:B * W], read_row=dp.read_row[:B * W])
            store_row, chunk_row = piece.store_row.view(B, W), piece.chunk_row.view(B, W)
            read_row, lens, deeper = piece.read_row.view(B, W), cache_lens[:B], st.deeper[:B, t]

            def run():
                L = lens.long()
                running = ~act.halted[:B]  # padding rows were marked halted
                st.ran[:B] += running
                runs = running | st.force[:B]
                first = torch.where(runs, deeper, L + 1)
                pos = first[:, None] + i
                live = runs[:, None] & (pos <= L[:, None])
                base = rows * S1
                store_row.copy_(torch.where(live, base + pos, base + S1 - 1))
                read_row.copy_(torch.where(live, base + pos, base + L[:, None]))
                chunk_row.copy_(torch.where(live & (pos == L[:, None]), rows, spare))
                piece.start.copy_(first)
                st.loop_lens[:B].copy_(first)
                deeper.copy_(torch.where(runs, L + 1, deeper))
                st.skip.copy_(~live.any().view(1))
                st.counts[7] += st.skip[0]
                st.counts[0] += live.sum()
                st.counts[1] += (live & (pos < L[:, None])).sum()
                st.piece = piece
            return run
        return copy_step(f"depth_window[t={t}]", bind)

    def finish(shape):
        B = shape.B
        ones = torch.ones(B, dtype=torch.int64, device=cache_lens.device)

        def run():
            # loops run before halting (0 = never halted), real rows only
            loop = torch.where(act.halted[:B], st.ran[:B], 0)
            st.halt_counts.index_add_(0, loop, ones * (st.chunk_valid[:B] > 0))
            st.skip.zero_()  # the chunk passes that follow all have real rows
            st.piece = None
        return run

    first_step, last_step = copy_step("depth_start", start), copy_step("depth_finish", finish)
    windows = [window(t) for t in range(n_loops)]

    def steps(shape) -> Iterator:
        yield first_step, shape
        for t in range(n_loops):
            yield windows[t], shape
            for step in gathered_pass[t]:
                yield step, type(shape)(shape.B, W)
        yield last_step, shape
    return steps


def _piece(st: DepthState, lo: list[int], n: list[int], k: int, W: int, lens: list[int],
           T: int, spare: int, row0: int = 0) -> Piece:
    """Piece ``k`` (offset k within each row's range) of width W over the batch rows
    ``row0 + b`` (the lists are theirs). A row with no work left is placed after its
    chunk, where its padded queries touch only unused slots. Padding rows read the state
    of the piece's first real row, so that in the MoE they choose that row's experts and
    read no other expert's weights."""
    device = st.loop_lens.device
    B, S1 = len(lo), st.seq_len + 1
    first = [lo[b] + k if n[b] > k else lens[b] + T for b in range(B)]
    meta = torch.tensor([first, [max(0, n[b] - k) for b in range(B)], lens], dtype=torch.int64)
    meta = meta.to(device)
    start, live_n, L = meta[0][:, None], meta[1][:, None], meta[2][:, None]
    i = torch.arange(W, device=device)[None, :]
    pos = start + i
    live = i < live_n
    rows = torch.arange(row0, row0 + B, device=device)[:, None]
    store_row = torch.where(live, rows * S1 + pos, rows * S1 + S1 - 1)
    chunk_row = torch.where(live & (pos >= L), rows * T + pos - L, spare)
    b0 = next(b for b in range(B) if n[b] > k)  # every piece has real work
    read_row = torch.where(live, store_row, (row0 + b0) * S1 + lo[b0] + k)
    return Piece(start=meta[0].to(torch.int32), store_row=store_row.reshape(-1),
                 chunk_row=chunk_row.reshape(-1), read_row=read_row.reshape(-1))


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
        N = shape.B * shape.T
        hv, ev, offsets = h[:N], e[:N], st.loop_lens[shape.row0:][:shape.B]
        cum, h_out, halted = work.cum_p[:N], work.h_out[:N], work.halted[:N]

        def run():
            pc = st.piece
            torch.index_select(st.h, 0, pc.source, out=hv)
            torch.index_select(st.e, 0, pc.source, out=ev)
            torch.index_select(act.cum_p, 0, pc.chunk_row, out=cum)
            torch.index_select(act.h_out, 0, pc.chunk_row, out=h_out)
            torch.index_select(act.halted, 0, pc.chunk_row, out=halted)
            offsets.copy_(pc.start)
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
