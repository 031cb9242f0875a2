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

The host decides each loop's ranges from the halting flags (one read per loop; free on a
CPU). On CUDA this mode therefore runs without CUDA graphs (docs/adaptive-depth.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch

from .ops.recurrent import ACTState


@dataclass
class Piece:
    """One batched pass of loop ``t``: row ``b`` runs positions ``start[b] + i`` for
    ``i < W`` of which ``live[b, i]`` are real work; ``chunk_row`` indexes the chunk's
    per-token arrays (``b * T + position - L_b``) where ``in_chunk``."""
    start: torch.Tensor      # (B,) int32
    pos: torch.Tensor        # (B, W) int64, clamped to the cache
    live: torch.Tensor       # (B, W) bool
    in_chunk: torch.Tensor   # (B, W) bool
    chunk_row: torch.Tensor  # (B, W) int64, clamped to [0, B*T)

    @property
    def W(self) -> int:
        return self.pos.shape[1]


@dataclass
class DepthState:
    """What lazy depth keeps between steps (allocated once, bounded by the cache size).

    h, e : (B_max, S_max, D) storage dtype: each position's state after its last computed
        loop and its injection input.
    depth : (B_max, S_max) int32, loops computed per cached position.
    loop_lens : (B_max,) int32, the offset of the current pass (the loop's attention ops
        read positions from it instead of ``cache_lens``).
    chunk_valid : (B_max,) int32, real tokens of each row in the current chunk (prefill
        pads ragged rows; padding never runs the loop).
    work : the ACT buffers of the pass's rows (the chunk's own are ``Buffers.act``).
    halt_loop : (N_max,) int32, loop (1-based) at which each chunk token halted, 0 = not.
    """
    h: torch.Tensor
    e: torch.Tensor
    depth: torch.Tensor
    loop_lens: torch.Tensor
    chunk_valid: torch.Tensor
    work: ACTState
    halt_loop: torch.Tensor
    mode: str = "lazy"
    stats: dict = field(default_factory=dict)
    piece: Optional[Piece] = None

    @classmethod
    def allocate(cls, mode: str, max_batch: int, max_seq_len: int, n_max: int, dim: int,
                 dtype: torch.dtype, device) -> "DepthState":
        store = dict(dtype=dtype, device=device)
        st = cls(h=torch.zeros(max_batch, max_seq_len, dim, **store),
                 e=torch.zeros(max_batch, max_seq_len, dim, **store),
                 depth=torch.zeros(max_batch, max_seq_len, dtype=torch.int32, device=device),
                 loop_lens=torch.zeros(max_batch, dtype=torch.int32, device=device),
                 chunk_valid=torch.zeros(max_batch, dtype=torch.int32, device=device),
                 work=ACTState.allocate(n_max, dim, dtype, device),
                 halt_loop=torch.zeros(n_max, dtype=torch.int32, device=device), mode=mode)
        st.reset_stats(1)
        return st

    def reset_stats(self, n_loops: int) -> None:
        """Zero the counters (``Runtime.last_stats``) for a request of ``n_loops`` loops."""
        self.stats = {"block_evals": 0, "eager_block_evals": 0, "catchup_evals": 0,
                      "reused_entries": 0, "positions": 0,
                      "halt_histogram": [0] * (n_loops + 1)}


def store_bytes(max_batch: int, max_seq_len: int, dim: int, dtype_bytes: int) -> int:
    """Bytes ``DepthState`` allocates beyond the KV caches (``h`` and ``e`` stores, depth)."""
    return max_batch * max_seq_len * (2 * dim * dtype_bytes + 4)


def lazy_region(st: DepthState, *, n_loops: int, chunk: int, cache_lens: torch.Tensor,
                act: ACTState, start, body: Callable[[int], list], copy_entries: Callable,
                ) -> Callable[[tuple], Iterator]:
    """The loop region's ``expand(shape)``: yields (step, shape) for the chunk's start,
    then per loop and piece the gather, prologue, block, epilogue and scatter steps.

    act : the chunk's ACT state (one row per chunk token);
    start : the step that stores the chunk's positions (``store_chunk``);
    body(t) : loop t's steps [gather, prologue, *block ops, epilogue, scatter];
    copy_entries(rows, lo, hi, t) : "reuse": copy loop t−1's cache entries of positions
        [lo, hi) of the given rows into loop t's caches.
    """
    def expand(shape) -> Iterator:
        B, T = shape.B, shape.T
        yield start, shape
        lens = cache_lens[:B].tolist()
        valid = st.chunk_valid[:B].tolist()
        stats = st.stats
        stats["positions"] += sum(valid)
        stats["eager_block_evals"] += sum(valid) * n_loops
        S_max = st.depth.shape[1]
        cols = torch.arange(S_max, device=st.depth.device)
        before = cols[None, :] < cache_lens[:B].long()[:, None]  # (B, S_max): cached positions
        for t in range(n_loops):
            running = ~act.halted[:B * T].view(B, T)
            if not bool(running.any()):
                break
            idx = torch.arange(T, device=running.device)
            last = torch.where(running, idx, torch.full_like(idx, -1)).amax(1).tolist()
            deeper = ((st.depth[:B] > t) & before).sum(1).tolist()
            lo, hi = [], []  # per row: the pass's positions [lo, hi]
            for b in range(B):
                if last[b] < 0:
                    lo.append(0)
                    hi.append(-1)
                    continue
                s = deeper[b]
                if st.mode == "reuse" and s < lens[b]:
                    copy_entries(b, s, lens[b], t)
                    st.depth[b, s:lens[b]] = t + 1
                    stats["reused_entries"] += lens[b] - s
                    s = lens[b]
                stats["catchup_evals"] += lens[b] - s
                lo.append(s)
                hi.append(lens[b] + last[b])
            n = [max(0, h_ - l_ + 1) for l_, h_ in zip(lo, hi)]
            stats["block_evals"] += sum(n)
            for k in range(0, max(n), chunk):
                W = min(chunk, max(n) - k)
                st.piece = _piece(lo, n, k, W, lens, T, S_max, cache_lens.device)
                for step in body(t):
                    yield step, type(shape)(B, W)
        st.piece = None
        hist = torch.bincount(st.halt_loop[:B * T].view(B, T)[_valid_mask(valid, T, B, act)],
                              minlength=n_loops + 1).tolist()
        for i, c in enumerate(hist[:len(stats["halt_histogram"])]):
            stats["halt_histogram"][i] += c
    return expand


def _valid_mask(valid: list[int], T: int, B: int, act: ACTState) -> torch.Tensor:
    return (torch.arange(T, device=act.halted.device)[None, :]
            < torch.tensor(valid, device=act.halted.device)[:, None])


def _piece(lo: list[int], n: list[int], k: int, W: int, lens: list[int], T: int,
           S_max: int, device) -> Piece:
    """Piece ``k`` (offset k within each row's range) of width W. A row with no work left
    is placed after its chunk, where its padded queries touch only unused slots."""
    start = torch.tensor([lo[b] + k if n[b] > k else lens[b] + T for b in range(len(lo))],
                         dtype=torch.int64, device=device)
    i = torch.arange(W, device=device)
    pos = start[:, None] + i[None, :]
    live = i[None, :] < torch.tensor([n[b] - k for b in range(len(lo))], device=device)[:, None]
    L = torch.tensor(lens, dtype=torch.int64, device=device)[:, None]
    in_chunk = live & (pos >= L)
    B = len(lo)
    row = torch.arange(B, device=device)[:, None] * T + (pos - L)
    return Piece(start=start.to(torch.int32), pos=pos.clamp(max=S_max - 1), live=live,
                 in_chunk=in_chunk, chunk_row=row.clamp(0, B * T - 1))


def store_chunk(st: DepthState, act: ACTState, cache_lens: torch.Tensor,
                e_chunk: torch.Tensor, D: int):
    """The chunk's start: its positions enter the store with h = e and depth 0; its ACT
    state is reset and padding tokens are marked halted (they never run the loop)."""
    def bind(shape):
        B, T = shape.B, shape.T
        ev = e_chunk[:B * T].view(B, T, D)
        S_max = st.depth.shape[1]
        rows = torch.arange(B, device=ev.device)[:, None]
        i = torch.arange(T, device=ev.device)[None, :]

        def run():
            pos = cache_lens[:B].long()[:, None] + i
            ok = (pos < S_max) & (i < st.chunk_valid[:B].long()[:, None])
            p = pos.clamp(max=S_max - 1)
            b, q = rows.expand(B, T)[ok], p[ok]
            st.e[b, q] = ev[ok]
            st.h[b, q] = ev[ok]
            st.depth[b, q] = 0
            act.reset(B * T)
            act.halted[:B * T].copy_(~ok.reshape(-1))
            st.halt_loop[:B * T].zero_()
        return run
    return bind


def gather(st: DepthState, act: ACTState, h: torch.Tensor, e: torch.Tensor, D: int):
    """Load the current piece's rows: h and e from the store, ACT state from the chunk's
    (earlier positions have halted: their ACT weight is 0), its offsets into loop_lens."""
    work = st.work

    def bind(shape):
        B, W = shape.B, shape.T
        N = B * W
        hv, ev = h[:N].view(B, W, D), e[:N].view(B, W, D)
        rows = torch.arange(B, device=h.device)[:, None]

        def run():
            pc = st.piece
            hv.copy_(st.h[rows, pc.pos])
            ev.copy_(st.e[rows, pc.pos])
            r = pc.chunk_row.reshape(-1)
            inside = pc.in_chunk.reshape(-1)
            work.cum_p[:N].copy_(act.cum_p[r])
            work.h_out[:N].copy_(act.h_out[r])
            work.halted[:N].copy_(~inside | act.halted[r])
            st.loop_lens[:B].copy_(pc.start)
        return run
    return bind


def scatter(st: DepthState, act: ACTState, h: torch.Tensor, D: int, t: int):
    """Store the piece's results: h and depth of its live positions, ACT state of its
    chunk tokens (and the loop at which any of them halted)."""
    work = st.work

    def bind(shape):
        B, W = shape.B, shape.T
        N = B * W
        hv = h[:N].view(B, W, D)
        rows = torch.arange(B, device=h.device)[:, None].expand(B, W)

        def run():
            pc = st.piece
            live, inside = pc.live, pc.in_chunk.reshape(-1)
            st.h[rows[live], pc.pos[live]] = hv[live]
            st.depth[rows[live], pc.pos[live]] = t + 1
            r = pc.chunk_row.reshape(-1)[inside]
            newly = work.halted[:N][inside] & ~act.halted[r]
            act.cum_p[r] = work.cum_p[:N][inside]
            act.h_out[r] = work.h_out[:N][inside]
            act.halted[r] = work.halted[:N][inside]
            st.halt_loop[r[newly]] = t + 1
        return run
    return bind
