"""Runtime: a compiled OpenMythos model — ``mythos_rt.compile(...)`` returns one.

A Runtime runs the plans of one lowering: prefill in chunks of at most ``chunk`` tokens
per row (chunked prefill is exact: causal offsets come from the cache lengths), and
decode one token per step against per-layer / per-loop KV caches. Building one
(trace → passes → lower, or from an artifact) is ``mythos_rt.compiler``'s job.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator, Mapping, Optional, Protocol, Sequence, Union

import torch

from .config import MythosConfig
from .errors import InputError
from .graphs import DecodeGraphs
from .ir import Graph
from .lower import Lowered, Shape, Step
from .ops.recurrent import ACTState
from .options import CompileOptions, dtype_name
from .sampling import Sampler, SamplingParams


class StepObserver(Protocol):
    """Called around every plan step while installed with ``Runtime.observe`` (profiling)."""

    def on_step_start(self, step: Step, shape: Shape) -> None: ...

    def on_step_end(self, step: Step, shape: Shape) -> None: ...


class Runtime:
    """A compiled model: ``forward`` (stateless) and ``generate`` (KV-cached decode)."""

    def __init__(self, lowered: Lowered, options: CompileOptions, *,
                 traced: Optional[Graph] = None, timings: Optional[dict[str, float]] = None):
        self._low = lowered
        self.options = options
        self.config: MythosConfig = lowered.cfg
        self.device: torch.device = lowered.device
        self.dtype: torch.dtype = lowered.dtype
        self.graph: Graph = lowered.graph
        self.traced_graph = traced
        self.max_batch_size = lowered.max_batch
        self.max_seq_len = options.max_seq_len
        self.max_loops = lowered.max_loops
        self.timings = dict(timings or {})
        self._plans: dict[int, list[Step]] = {}
        self._observer: Optional[StepObserver] = None
        buf = lowered.buffers
        self.graphs = DecodeGraphs(
            lambda B, n: self._execute(Shape(B, 1), n), self.device, self.max_batch_size,
            buf.cache_lens, buf.input_ids, static=[buf.cache_lens, buf.input_ids,
                                                   buf.arena["logits"]],
            enabled=options.cuda_graphs, debug=options.debug)

    @property
    def use_cuda_graphs(self) -> bool:
        """Whether decode steps are captured/replayed as CUDA graphs (settable)."""
        return self.graphs.enabled

    @use_cuda_graphs.setter
    def use_cuda_graphs(self, on: bool) -> None:
        self.graphs.set_enabled(on)

    # ---- introspection --------------------------------------------------------------------
    @property
    def backends(self) -> dict[str, str]:
        """Registry op → backend that runs it."""
        return {name: sel.backend for name, sel in sorted(self._low.impls.items())}

    def __repr__(self) -> str:
        ops = ", ".join(f"{k}={v}" for k, v in self.backends.items())
        kernels = ""
        if "cpu" in self.backends.values():
            from .cpu import native
            kernels = f"; cpu row kernels: {native.describe()}"
        return (f"Runtime({self.config.attn_type}, dim={self.config.dim}, "
                f"device={self.device}, dtype={dtype_name(self.dtype)}, "
                f"max_batch_size={self.max_batch_size}, max_seq_len={self.max_seq_len}, "
                f"max_loops={self.max_loops}, ops: {ops}{kernels})")

    @property
    def weights(self) -> Mapping[str, torch.Tensor]:
        """Every tensor the plans read, by IR weight name (packed and derived ones included)."""
        return self._low.weights

    @property
    def chunk(self) -> int:
        """Prefill tokens per row per plan execution."""
        return self._low.chunk

    @property
    def act_state(self) -> ACTState:
        """The loop's ACT buffers (cumulative halting probability, halted flags) of the
        last plan execution's rows."""
        return self._low.buffers.act

    def save(self, directory: Union[str, os.PathLike]) -> str:
        """Write a runtime artifact (packed weights, optimized IR, config, options,
        autotune cache) that ``mythos_rt.load`` restores without tracing or packing."""
        from .artifact import write_artifact
        return str(write_artifact(directory, self.weights, self.graph, self.config, self.options))

    def plan(self, n_loops: int) -> list[Step]:
        if n_loops not in self._plans:
            self._plans[n_loops] = self._low.plan(n_loops)
        return self._plans[n_loops]

    # ---- input checks -----------------------------------------------------------------------
    def _check_prompts(self, input_ids: Any) -> tuple[list[torch.Tensor], bool]:
        """Return the prompts as 1-D int64 device tensors and whether the input was ragged."""
        if isinstance(input_ids, (list, tuple)):
            if not input_ids:
                raise InputError("input_ids is an empty list")
            if all(isinstance(x, int) for x in input_ids):
                input_ids = torch.tensor([list(input_ids)])
            else:
                rows = []
                for i, row in enumerate(input_ids):
                    row = torch.as_tensor(row) if not isinstance(row, torch.Tensor) else row
                    if row.dim() != 1 or row.numel() == 0:
                        raise InputError(f"input_ids[{i}] must be a non-empty 1-D sequence of "
                                         f"token ids, got shape {tuple(row.shape)}")
                    rows.append(self._check_ids(row[None], what=f"input_ids[{i}]")[0])
                if len(rows) > self.max_batch_size:
                    raise InputError(f"batch size {len(rows)} exceeds max_batch_size="
                                     f"{self.max_batch_size} (recompile with a larger max_batch_size)")
                return rows, True
        ids = self._check_ids(input_ids)
        return list(ids), False

    def _check_ids(self, input_ids: Any, what: str = "input_ids") -> torch.Tensor:
        if not isinstance(input_ids, torch.Tensor):
            raise InputError(f"{what} must be a torch.Tensor (or a list of 1-D sequences) of "
                             f"token ids, got {type(input_ids).__name__}")
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.dim() != 2:
            raise InputError(f"{what} must have shape (B, T), got {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise InputError(f"{what} must be an integer tensor, got {input_ids.dtype}")
        B, T = input_ids.shape
        if B < 1 or T < 1:
            raise InputError(f"{what} is empty: shape {tuple(input_ids.shape)}")
        if B > self.max_batch_size:
            raise InputError(f"batch size {B} exceeds max_batch_size={self.max_batch_size} "
                             "(recompile with a larger max_batch_size)")
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            bad = lo if lo < 0 else hi
            raise InputError(f"token id {bad} in {what} is outside the vocabulary [0, "
                             f"{self.config.vocab_size})")
        return input_ids.to(device=self.device, dtype=torch.long)

    def _check_loops(self, n_loops: Optional[int]) -> int:
        n = self.config.max_loop_iters if n_loops is None else n_loops
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise InputError(f"n_loops must be an integer >= 1, got {n_loops!r}")
        if n > self.max_loops:
            raise InputError(f"n_loops={n} exceeds the compiled max_loops={self.max_loops} "
                             "(recompile with max_loops >= n_loops)")
        return n

    def _check_sampling(self, max_new_tokens, longest: int) -> None:
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
            raise InputError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
        if longest + max_new_tokens > self.max_seq_len:
            raise InputError(f"prompt length {longest} + max_new_tokens {max_new_tokens} = "
                             f"{longest + max_new_tokens} exceeds max_seq_len={self.max_seq_len}")

    # ---- execution --------------------------------------------------------------------------
    @contextlib.contextmanager
    def observe(self, observer: StepObserver) -> Iterator[StepObserver]:
        """Call ``observer.on_step_start/on_step_end(step, shape)`` around every plan step
        run inside the block.

        A replayed CUDA graph runs no Python per step, so decode steps run eagerly while
        an observer is installed; without one nothing is added to a step's cost and
        graph capture is untouched.
        """
        if self._observer is not None:
            raise InputError("a step observer is already installed on this Runtime")
        graphs_were = self.use_cuda_graphs
        self.use_cuda_graphs = False
        self._observer = observer
        try:
            yield observer
        finally:
            self._observer = None
            self.use_cuda_graphs = graphs_were

    def _execute(self, shape: Shape, n_loops: int) -> None:
        observer = self._observer
        if observer is None:
            for step in self.plan(n_loops):
                step.run(shape)
            return
        for step in self.plan(n_loops):
            observer.on_step_start(step, shape)
            step.run(shape)
            observer.on_step_end(step, shape)

    def _run_chunk(self, ids: torch.Tensor, n_loops: int) -> torch.Tensor:
        """Run one chunk (B, T) at the current cache lengths; return logits (B, T, V) view.

        Inference mode: no autograd bookkeeping on the plan's views and in-place updates,
        which is a large share of a CPU decode step's cost.
        """
        B, T = ids.shape
        with torch.inference_mode():
            self._low.buffers.input_ids[:B * T].copy_(ids.reshape(-1))
            if T == 1:
                self.graphs.step(B, n_loops)
            else:
                self._execute(Shape(B, T), n_loops)
            return self._low.buffers.arena["logits"][:B * T].view(B, T, -1)

    def _prefill(self, prompts: list[torch.Tensor], n_loops: int, want_all: bool):
        """Prefill right-padded prompts in chunks; return last-token logits (B, V) or all.

        Padding only follows a row's real tokens: causal attention keeps real queries off
        it, and each row's cache length is set to its real length afterwards, so decode
        overwrites the padded cache slots.
        """
        B = len(prompts)
        lens = [int(p.numel()) for p in prompts]
        T = max(lens)
        ids = torch.zeros(B, T, dtype=torch.long, device=self.device)
        for b, p in enumerate(prompts):
            ids[b, :lens[b]] = p
        buffers = self._low.buffers
        buffers.cache_lens.zero_()
        chunk = self._low.chunk
        outs, last = [], torch.empty(B, self.config.vocab_size, dtype=self.dtype, device=self.device)
        for start in range(0, T, chunk):
            logits = self._run_chunk(ids[:, start:start + chunk], n_loops)
            if want_all:
                outs.append(logits.clone())
            for b, n in enumerate(lens):
                if start <= n - 1 < start + chunk:
                    last[b] = logits[b, n - 1 - start]
        buffers.cache_lens[:B] = torch.tensor(lens, dtype=torch.int32, device=self.device)
        return torch.cat(outs, dim=1) if want_all else last

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, n_loops: Optional[int] = None) -> torch.Tensor:
        """Stateless forward: logits (B, T, vocab), as the reference's forward without cache."""
        ids = self._check_ids(input_ids)
        n = self._check_loops(n_loops)
        if ids.shape[1] > self.max_seq_len:
            raise InputError(f"sequence length {ids.shape[1]} exceeds max_seq_len="
                             f"{self.max_seq_len}")
        return self._prefill(list(ids), n, want_all=True)

    __call__ = forward

    @torch.no_grad()
    def stream(self, input_ids, max_new_tokens: int, *, n_loops: Optional[int] = None,
               temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
               seed: Optional[int] = None, stop_ids: Sequence[int] = ()) -> Iterator[list[Optional[int]]]:
        """Yield, after each decode step, one new token id per row (None once a row stopped)."""
        prompts, _ = self._check_prompts(input_ids)
        finished = None
        for nxt, _, done in self._decode(prompts, max_new_tokens, n_loops, temperature,
                                          top_k, top_p, seed, stop_ids, want_logits=False):
            ids = nxt.tolist()
            yield [None if (finished is not None and finished[b]) else t for b, t in enumerate(ids)]
            finished = done.tolist() if done is not None else None

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int, *, n_loops: Optional[int] = None,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 seed: Optional[int] = None, stop_ids: Sequence[int] = (),
                 return_logits: bool = False):
        """Prefill once, then decode one token per step with the KV caches.

        ``input_ids``: a (B, T) tensor, or a list of 1-D sequences of different lengths
        (ragged batch: each row keeps its own positions and cache length, and equals
        running it alone). Returns ids (B, T + new) for a tensor input — rows that hit a
        stop id are padded with it — or a list of 1-D tensors (prompt + generated, ending
        at the stop id) for a list input; plus per-step logits (B, steps, vocab) when
        ``return_logits``. temperature 0 is greedy; ``seed`` makes sampling reproducible;
        generation ends early once every row produced one of ``stop_ids``.
        """
        prompts, ragged = self._check_prompts(input_ids)
        steps, logits = [], []
        for nxt, lg, done in self._decode(prompts, max_new_tokens, n_loops, temperature,
                                           top_k, top_p, seed, stop_ids, return_logits):
            steps.append(nxt)
            if return_logits:
                logits.append(lg)
        B, V = len(prompts), self.config.vocab_size
        new = torch.stack(steps, 1) if steps else torch.empty(B, 0, dtype=torch.long, device=self.device)
        stacked = torch.stack(logits, 1) if logits else torch.empty(B, 0, V, device=self.device)
        if ragged:
            out = []
            stops = torch.tensor(list(stop_ids), dtype=torch.long, device=self.device)
            for b, p in enumerate(prompts):
                row = new[b]
                hit = torch.isin(row, stops).nonzero()
                if len(hit):
                    row = row[: int(hit[0]) + 1]
                out.append(torch.cat([p, row]))
        else:
            out = torch.cat([torch.stack(prompts), new], dim=1)
        return (out, stacked) if return_logits else out

    def _decode(self, prompts: list[torch.Tensor], max_new_tokens, n_loops, temperature,
                top_k, top_p, seed, stop_ids, want_logits):
        """Yield (next ids (B,), logits (B, V) or None, finished (B,) or None) per step.

        ``prompts`` are the checked 1-D prompts of ``_check_prompts``.
        """
        n = self._check_loops(n_loops)
        params = SamplingParams(temperature, top_k, top_p, seed, stop_ids).check_vocab(
            self.config.vocab_size)
        self._check_sampling(max_new_tokens, max(int(p.numel()) for p in prompts))
        if max_new_tokens == 0:
            return
        B = len(prompts)
        sampler = Sampler(params, B, self.device)
        stops = torch.tensor(params.stop_ids, dtype=torch.long, device=self.device)
        finished = torch.zeros(B, dtype=torch.bool, device=self.device) if len(stops) else None
        logits = self._prefill(prompts, n, want_all=False)
        prev = None
        for i in range(max_new_tokens):
            nxt = sampler(logits)
            if finished is not None:
                if prev is not None:  # a stopped row repeats the stop id it produced
                    nxt = torch.where(finished, prev, nxt)
                finished = finished | torch.isin(nxt, stops)
                prev = nxt
            yield nxt, (logits.float().clone() if want_logits else None), finished
            # One host check per step, only when stop ids were given.
            if i + 1 == max_new_tokens or (finished is not None and bool(finished.all())):
                sampler.check()  # one host read of the non-finite flag per call
                return
            logits = self._run_chunk(nxt[:, None], n)[:, -1]
