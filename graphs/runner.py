"""Decode-step replay: one CUDA graph per (batch bucket, n_loops), eager replay elsewhere.

A decode step is hundreds of small launches (n_loops × the block's kernels); launch
overhead alone exceeds the memory-bound floor at batch 1. Every launch of a lowered
plan reads and writes preallocated buffers, so the whole step can be captured once and
replayed. On a GPU, batch sizes are rounded up to buckets (1, 2, 4, 8, then multiples
of 16), so that few graphs cover every batch and eager steps launch what replays do;
padding rows compute on their own cache rows, which no live sequence uses, and their
cache lengths are reset before each step so they never run past the cache. On a CPU
nothing is captured, and a padding row costs as much as a live one: steps run the
batch's rows exactly.

Capture is lazy: the first step of a (bucket, n_loops) runs eagerly — it is a real
step, and it compiles every Triton kernel — and the graph is captured right after, so
capture never sees a compile and never executes anything. That warm-up step runs on the
capture's side stream, as PyTorch recommends (lazily created handles and workspaces
then belong to the stream that captures). A capture that fails, whatever the exception,
leaves that (bucket, n_loops) eager, with the reason in ``fallbacks``. All graphs share
one memory pool. On a CPU (or with ``enabled=False``) the same API runs the plan eagerly, so this
logic is tested in CI.
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, 16, 32, 48, ... up to and including max_batch."""
    out = [b for b in (1, 2, 4, 8) if b < max_batch]
    b = 16
    while b < max_batch:
        out.append(b)
        b += 16
    return out + [max_batch]


class DecodeGraphs:
    """Runs decode steps (B rows × 1 token) of a lowered plan, captured when possible.

    Parameters
    ----------
    run_plan : ``run_plan(B, n_loops)`` executes one decode step eagerly for B rows.
    cache_lens : the plan's (max_batch,) int32 cache-length buffer (padding rows reset).
    input_ids : the plan's token-id input buffer (padding rows set to token 0).
    static : tensors whose addresses a captured graph bakes in (checked in debug mode).
    enabled : capture CUDA graphs (ignored, i.e. eager, on a non-CUDA device).
    pad : round batches up to buckets (default: on a CUDA device).
    """

    def __init__(self, run_plan: Callable[[int, int], None], device: torch.device,
                 max_batch: int, cache_lens: torch.Tensor, input_ids: torch.Tensor,
                 static: Optional[list[torch.Tensor]] = None, enabled: bool = True,
                 debug: bool = False, pad: Optional[bool] = None):
        self._run_plan = run_plan
        self.device = torch.device(device)
        self.buckets = batch_buckets(max_batch)
        self._lens, self._ids = cache_lens, input_ids
        self._static = list(static or [])
        self.enabled = enabled and self.device.type == "cuda"
        self.pad = self.device.type == "cuda" if pad is None else pad
        self.debug = debug
        self._graphs: dict[tuple[int, int], "torch.cuda.CUDAGraph"] = {}
        self._ptrs: dict[tuple[int, int], list[int]] = {}
        self._seen: set[tuple[int, int]] = set()
        self._pool = torch.cuda.graph_pool_handle() if self.enabled else None
        self._stream: Optional["torch.cuda.Stream"] = None
        self.fallbacks: dict[tuple[int, int], str] = {}  # (bucket, n_loops) -> why eager

    def bucket(self, B: int) -> int:
        """The rows a step of B rows runs: its bucket, or B itself when not padding."""
        for b in self.buckets:
            if B <= b:
                return b if self.pad else B
        raise ValueError(f"batch {B} exceeds the largest bucket {self.buckets[-1]}")

    @property
    def captured(self) -> list[tuple[int, int]]:
        """(bucket, n_loops) pairs that have a CUDA graph."""
        return sorted(self._graphs)

    def step(self, B: int, n_loops: int) -> int:
        """Run one decode step for rows [0, B); returns the bucket size it ran at."""
        b = self.bucket(B)
        if b > B:  # padding rows: valid token, cache length 0, so they stay in range
            self._ids[B:b].zero_()
            self._lens[B:b].zero_()
        key = (b, n_loops)
        graph = self._graphs.get(key)
        if graph is not None:
            if self.debug:
                self._check_pointers(key)
            graph.replay()
        elif self.enabled and key not in self._seen:
            self._seen.add(key)
            self._warm_up_and_capture(key)
        else:
            self._run_plan(b, n_loops)
        return b

    def _side_stream(self) -> "torch.cuda.Stream":
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        return self._stream

    def _warm_up_and_capture(self, key: tuple[int, int]) -> None:
        """The real step, on the capture's side stream, then the capture."""
        side, main = self._side_stream(), torch.cuda.current_stream(self.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            self._run_plan(*key)
        main.wait_stream(side)
        self._capture(key)

    def _capture(self, key: tuple[int, int]) -> None:
        b, n_loops = key
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        # Capturing records launches without running them: cache lengths and caches are
        # left exactly as the eager step just left them.
        try:
            with torch.cuda.graph(graph, pool=self._pool, stream=self._side_stream()):
                self._run_plan(b, n_loops)
        except Exception as exc:  # noqa: BLE001 - any failure (a sync, an assert in a
            # launcher, a driver error) leaves this step eager, with its reason
            why = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
            self.fallbacks[key] = why
            warnings.warn(f"decode step {key} cannot be captured in a CUDA graph and runs "
                          f"eagerly: {why}", stacklevel=3)
            return
        self._graphs[key] = graph
        self._ptrs[key] = [t.data_ptr() for t in self._static]

    def _check_pointers(self, key: tuple[int, int]) -> None:
        now = [t.data_ptr() for t in self._static]
        if now != self._ptrs[key]:
            raise RuntimeError(f"CUDA graph {key}: a static buffer moved since capture "
                               "(replaying would read stale memory)")

    def set_enabled(self, on: bool) -> None:
        """Turn capture on or off (always off on a non-CUDA device)."""
        self.enabled = bool(on) and self.device.type == "cuda"
        if self.enabled and self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()

    def reset(self) -> None:
        """Drop every captured graph (e.g. after buffers were reallocated)."""
        self._graphs.clear()
        self._ptrs.clear()
        self._seen.clear()
        self.fallbacks.clear()
